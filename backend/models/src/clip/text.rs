//! transformers `CLIPTextModel` (and the projection of `CLIPTextModelWithProjection`): token +
//! position embeddings, causal pre-LN encoder, `final_layer_norm`, pooled output at the EOS.
//!
//! Pooling follows transformers' current `CLIPTextTransformer.forward`: when the config's
//! `eos_token_id == 2` (legacy configs, e.g. SD 1.5's `text_encoder/config.json`) the pooled
//! position is `argmax(input_ids)` (the EOS has the largest id in CLIP's vocabulary); otherwise it
//! is the first position whose id equals `eos_token_id` (position 0 if there is none, as
//! `argmax` of an all-zero mask gives).

use super::config::ClipTextConfig;
use super::encoder::{ClipEncoder, EncoderShape};
use candle_core::{DType, Device, IndexOp, Result, Tensor};
use candle_nn::VarBuilder;
use nn::{Embedding, LayerNorm, Linear};

/// Outputs of [`ClipTextModel::forward`].
#[derive(Debug, Clone)]
pub struct ClipTextOutput {
    /// `(b, s, hidden)` after `final_layer_norm` (what conditions the UNet).
    pub last_hidden_state: Tensor,
    /// `(b, hidden)`: `last_hidden_state` at the EOS position.
    pub pooler_output: Tensor,
    /// `text_projection(pooler_output)` when the checkpoint has `text_projection.weight`.
    pub text_embeds: Option<Tensor>,
    /// Embeddings then each layer's output (`layers + 1` tensors, before the final norm).
    pub hidden_states: Vec<Tensor>,
}

/// The CLIP text tower.
#[derive(Debug, Clone)]
pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Embedding,
    encoder: ClipEncoder,
    final_layer_norm: LayerNorm,
    text_projection: Option<Linear>,
    config: ClipTextConfig,
}

impl ClipTextModel {
    /// Builds the tower from `vb` at the checkpoint root: tensors under `text_model.` (or at the
    /// root if the checkpoint has no such prefix); `text_projection` is read when present.
    pub fn new(vb: VarBuilder, config: &ClipTextConfig) -> Result<Self> {
        let root_has_tower = vb.contains_tensor("embeddings.token_embedding.weight")
            && !vb.contains_tensor("text_model.embeddings.token_embedding.weight");
        let t = if root_has_tower {
            vb.clone()
        } else {
            vb.pp("text_model")
        };
        let c = config;
        let act = nn::Activation::from_config_name(&c.hidden_act).ok_or_else(|| {
            candle_core::Error::Msg(format!("hidden_act `{}` is not supported", c.hidden_act))
        })?;
        let shape = EncoderShape {
            hidden: c.hidden_size,
            intermediate: c.intermediate_size,
            heads: c.num_attention_heads,
            layers: c.num_hidden_layers,
            eps: c.layer_norm_eps,
            act,
        };
        let text_projection = if vb.contains_tensor("text_projection.weight") {
            Some(Linear::new(
                vb.pp("text_projection"),
                c.hidden_size,
                c.projection_dim,
                false,
            )?)
        } else {
            None
        };
        Ok(Self {
            token_embedding: Embedding::new(
                t.pp("embeddings.token_embedding"),
                c.vocab_size,
                c.hidden_size,
            )?,
            position_embedding: Embedding::new(
                t.pp("embeddings.position_embedding"),
                c.max_position_embeddings,
                c.hidden_size,
            )?,
            encoder: ClipEncoder::new_with(t.pp("encoder"), &shape, |_| None)?,
            final_layer_norm: LayerNorm::new(
                t.pp("final_layer_norm"),
                c.hidden_size,
                c.layer_norm_eps,
            )?,
            text_projection,
            config: c.clone(),
        })
    }

    /// Loads a transformers `save_pretrained` directory (`config.json` + `model.safetensors` or
    /// `pytorch_model.bin`), a full `CLIPModel` directory, or a diffusers pipeline directory
    /// (its `text_encoder/`).
    pub fn load(dir: &std::path::Path, dtype: DType, device: &Device) -> anyhow::Result<Self> {
        let dir = super::resolve_dir(dir, "text_encoder");
        let configs = super::ClipConfigs::from_dir(&dir)?;
        let config = configs.text.ok_or_else(|| {
            anyhow::anyhow!(
                "{}: config.json describes no CLIP text tower",
                dir.display()
            )
        })?;
        let weights = nn::Weights::open(&dir)
            .map_err(|e| anyhow::anyhow!("CLIP text weights in {}: {e}", dir.display()))?;
        Self::new(weights.var_builder(dtype, device), &config)
            .map_err(|e| anyhow::anyhow!("CLIP text model in {}: {e}", dir.display()))
    }

    /// The configuration.
    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// Token + position embeddings of `input_ids` `(b, s)` (any integer dtype).
    pub fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (_, s) = input_ids.dims2()?;
        if s > self.config.max_position_embeddings {
            candle_core::bail!(
                "sequence length {s} exceeds max_position_embeddings {}",
                self.config.max_position_embeddings
            )
        }
        let pos = Tensor::arange(0u32, s as u32, input_ids.device())?;
        let tok = self.token_embedding.forward(input_ids)?;
        tok.broadcast_add(&self.position_embedding.forward(&pos)?)
    }

    /// The pooled output of `input_ids` `(b, s)` (no attention mask), computed only over the
    /// positions up to the last row's pooled position: the attention is causal, so later
    /// (padding) positions cannot change it. Short captions padded to 77 tokens cost a few
    /// positions instead of 77 (contrastive training pools only).
    pub fn pooled(&self, input_ids: &Tensor) -> Result<Tensor> {
        let keep = eos_positions(input_ids, self.config.eos_token_id)?
            .into_iter()
            .max()
            .map_or(0, |p| p + 1);
        // Every row's pooled position lies in the prefix, and for legacy argmax pooling the
        // first maximum of the prefix is the first maximum of the row.
        let ids = if keep > 0 && keep < input_ids.dim(1)? {
            input_ids.narrow(1, 0, keep)?
        } else {
            input_ids.clone()
        };
        Ok(self.forward(&ids, None)?.pooler_output)
    }

    /// Runs the tower on `input_ids` `(b, s)`; `attention_mask` `(b, s)` of 1 / 0 (optional, the
    /// Stable Diffusion pipelines pass none) masks padded keys in addition to the causal mask.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<ClipTextOutput> {
        let h = self.embed(input_ids)?;
        let mask = attention_mask
            .map(|m| nn::padding_mask(m, h.dtype()))
            .transpose()?;
        let hidden_states = self.encoder.forward_all(&h, mask.as_ref(), true)?;
        let last = hidden_states.last().expect("input state").clone();
        let last_hidden_state = self.final_layer_norm.forward(&last)?;
        let pooler_output = pool_at_eos(&last_hidden_state, input_ids, self.config.eos_token_id)?;
        let text_embeds = self
            .text_projection
            .as_ref()
            .map(|p| p.forward(&pooler_output))
            .transpose()?;
        Ok(ClipTextOutput {
            last_hidden_state,
            pooler_output,
            text_embeds,
            hidden_states,
        })
    }
}

/// The pooled position per row, as transformers chooses it (see the module comment).
pub fn eos_positions(input_ids: &Tensor, eos_token_id: i64) -> Result<Vec<usize>> {
    let ids = input_ids.to_dtype(DType::I64)?.to_vec2::<i64>()?;
    Ok(ids
        .iter()
        .map(|row| {
            if eos_token_id == 2 {
                // torch.argmax: the first maximal element.
                let max = row.iter().copied().max().unwrap_or(0);
                row.iter().position(|&x| x == max).unwrap_or(0)
            } else {
                row.iter().position(|&x| x == eos_token_id).unwrap_or(0)
            }
        })
        .collect())
}

fn pool_at_eos(hidden: &Tensor, input_ids: &Tensor, eos_token_id: i64) -> Result<Tensor> {
    let rows = eos_positions(input_ids, eos_token_id)?
        .into_iter()
        .enumerate()
        .map(|(b, p)| hidden.i((b, p))?.unsqueeze(0))
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&rows, 0)
}
