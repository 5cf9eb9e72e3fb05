//! OPT-architecture causal LM (OPT-6.7B, the paper's main LLM; OPT-350m's projections and
//! post-norm too), built from `nn` layers.
//!
//! Tensor names follow transformers' `OPTForCausalLM` (`model.decoder.embed_tokens`,
//! `embed_positions`, `project_in`, `layers.{i}.self_attn.{q,k,v,out}_proj`,
//! `self_attn_layer_norm`, `fc1`, `fc2`, `final_layer_norm`, `model.decoder.final_layer_norm`,
//! `project_out`; `lm_head` is tied to `embed_tokens`). facebook/opt checkpoints that store
//! `decoder.*` without the `model.` prefix are accepted too.

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::{attention_mask_for, logits_for, KvCache, LlmOutput, LogitsFor};

/// OPT's learned positions are offset by 2 (a fairseq legacy).
pub const OPT_POSITION_OFFSET: usize = 2;

/// The fields of an OPT `config.json` this implementation reads.
#[derive(Debug, Clone, Deserialize)]
pub struct OptConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// MLP inner width.
    pub ffn_dim: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Learned position table length (without the offset of 2).
    pub max_position_embeddings: usize,
    /// Embedding width; `project_in` / `project_out` exist when it differs from `hidden_size`.
    #[serde(default)]
    pub word_embed_proj_dim: Option<usize>,
    /// Pre-norm (every OPT but 350m).
    #[serde(default = "yes")]
    pub do_layer_norm_before: bool,
    /// Legacy switch that drops the final decoder LayerNorm.
    #[serde(default, rename = "_remove_final_layer_norm")]
    pub remove_final_layer_norm: bool,
    /// Biases on attention and MLP projections.
    #[serde(default = "yes")]
    pub enable_bias: bool,
    /// LayerNorms have weight and bias.
    #[serde(default = "yes")]
    pub layer_norm_elementwise_affine: bool,
    /// MLP activation (`relu`).
    #[serde(default = "relu")]
    pub activation_function: String,
}

fn yes() -> bool {
    true
}
fn relu() -> String {
    "relu".into()
}

impl OptConfig {
    /// Embedding width (`word_embed_proj_dim`, else `hidden_size`).
    pub fn embed_dim(&self) -> usize {
        self.word_embed_proj_dim.unwrap_or(self.hidden_size)
    }
}

#[derive(Debug, Clone)]
struct Layer {
    q: nn::Linear,
    k: nn::Linear,
    v: nn::Linear,
    out: nn::Linear,
    attn_ln: nn::LayerNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
    ffn_ln: nn::LayerNorm,
}

/// `OPTForCausalLM`: token ids or input embeddings in, logits and hidden states out.
#[derive(Debug, Clone)]
pub struct Opt {
    config: OptConfig,
    embed: nn::Embedding,
    positions: nn::Embedding,
    project_in: Option<nn::Linear>,
    project_out: Option<nn::Linear>,
    layers: Vec<Layer>,
    final_ln: Option<nn::LayerNorm>,
    act: nn::Activation,
    lm_head: nn::Linear,
}

const LN_EPS: f64 = 1e-5;

impl Opt {
    /// Builds the model; `vb` is rooted where `decoder.*` lives (`model.` for transformers
    /// directories; see [`super::CausalLm::load`] for the prefix detection).
    pub fn new(config: &OptConfig, vb: VarBuilder) -> Result<Self> {
        let c = config;
        let d = c.hidden_size;
        let e = c.embed_dim();
        let bias = c.enable_bias;
        let affine = c.layer_norm_elementwise_affine;
        let ln = |vb: VarBuilder| nn::LayerNorm::new_with(vb, d, LN_EPS, affine, affine);
        let act = nn::Activation::from_config_name(&c.activation_function).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "opt: unknown activation `{}`",
                c.activation_function
            ))
        })?;
        let dec = vb.pp("decoder");
        let embed = nn::Embedding::new(dec.pp("embed_tokens"), c.vocab_size, e)?;
        let positions = nn::Embedding::new(
            dec.pp("embed_positions"),
            c.max_position_embeddings + OPT_POSITION_OFFSET,
            d,
        )?;
        let (project_in, project_out) = if e != d {
            (
                Some(nn::Linear::new(dec.pp("project_in"), e, d, false)?),
                Some(nn::Linear::new(dec.pp("project_out"), d, e, false)?),
            )
        } else {
            (None, None)
        };
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let l = dec.pp("layers").pp(i);
            let a = l.pp("self_attn");
            layers.push(Layer {
                q: nn::Linear::new(a.pp("q_proj"), d, d, bias)?,
                k: nn::Linear::new(a.pp("k_proj"), d, d, bias)?,
                v: nn::Linear::new(a.pp("v_proj"), d, d, bias)?,
                out: nn::Linear::new(a.pp("out_proj"), d, d, bias)?,
                attn_ln: ln(l.pp("self_attn_layer_norm"))?,
                fc1: nn::Linear::new(l.pp("fc1"), d, c.ffn_dim, bias)?,
                fc2: nn::Linear::new(l.pp("fc2"), c.ffn_dim, d, bias)?,
                ffn_ln: ln(l.pp("final_layer_norm"))?,
            });
        }
        let final_ln = if c.do_layer_norm_before && !c.remove_final_layer_norm {
            Some(ln(dec.pp("final_layer_norm"))?)
        } else {
            None
        };
        Ok(Self {
            config: config.clone(),
            positions,
            project_in,
            project_out,
            layers,
            final_ln,
            act,
            lm_head: nn::Linear::from_tensors(embed.weight().clone(), None),
            embed,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &OptConfig {
        &self.config
    }

    /// The frozen input embedding table `(vocab, word_embed_proj_dim)` (also the tied lm_head).
    pub fn embedding_weight(&self) -> &Tensor {
        self.embed.weight()
    }

    /// Looks token ids `(b, s)` up in the input embedding table.
    pub fn embed_ids(&self, ids: &Tensor) -> Result<Tensor> {
        self.embed.forward(ids)
    }

    /// Position ids `(b, s)` as transformers computes them: `cumsum(mask) * mask - 1` over all
    /// `past + s` positions, keeping the last `s`; plain `past..past+s` without a mask.
    fn position_ids(
        &self,
        b: usize,
        s: usize,
        past: usize,
        attention_mask: Option<&Tensor>,
        dev: &Device,
    ) -> Result<Tensor> {
        let total = past + s;
        let pos: Vec<i64> = match attention_mask {
            None => (0..b)
                .flat_map(|_| (past..total).map(|p| p as i64))
                .collect(),
            Some(m) => {
                let m = m.to_dtype(DType::F32)?.to_vec2::<f32>()?;
                let mut out = Vec::with_capacity(b * s);
                for row in m.iter() {
                    if row.len() != total {
                        candle_core::bail!(
                            "opt: attention_mask has {} columns, expected {total} (cached {past} + new {s})",
                            row.len()
                        )
                    }
                    let mut cum = 0i64;
                    let mut full = Vec::with_capacity(total);
                    for &k in row {
                        let k = (k != 0.0) as i64;
                        cum += k;
                        full.push(cum * k - 1);
                    }
                    out.extend_from_slice(&full[past..]);
                }
                out
            }
        };
        // `-1` (padding) + offset 2 = row 1, as in transformers.
        let pos: Vec<i64> = pos
            .into_iter()
            .map(|p| p + OPT_POSITION_OFFSET as i64)
            .collect();
        Tensor::from_vec(pos, (b, s), dev)
    }

    /// Runs the decoder on `embeds: (b, s, word_embed_proj_dim)` after the cached positions.
    ///
    /// `attention_mask` is an optional `(b, cache.len() + s)` keep-mask; it sets both the
    /// learned positions (left padding shifts them, as in transformers) and the key padding.
    pub fn forward_embeds(
        &self,
        embeds: &Tensor,
        cache: &mut KvCache,
        attention_mask: Option<&Tensor>,
    ) -> Result<LlmOutput> {
        self.forward_embeds_with(embeds, cache, attention_mask, LogitsFor::All)
    }

    /// `forward_embeds` computing logits only for the positions `logits` names.
    pub fn forward_embeds_with(
        &self,
        embeds: &Tensor,
        cache: &mut KvCache,
        attention_mask: Option<&Tensor>,
        logits: LogitsFor,
    ) -> Result<LlmOutput> {
        let (b, s, _) = embeds.dims3()?;
        let past = cache.len();
        if past + s > self.config.max_position_embeddings {
            candle_core::bail!(
                "opt: {} positions exceed max_position_embeddings {}",
                past + s,
                self.config.max_position_embeddings
            )
        }
        let dtype = embeds.dtype();
        let mask = attention_mask_for(attention_mask, b, past + s, dtype)?;
        let pos = self.position_ids(b, s, past, attention_mask, embeds.device())?;
        let mut x = match &self.project_in {
            Some(p) => p.forward(embeds)?,
            None => embeds.clone(),
        };
        x = (x + self.positions.forward(&pos)?.to_dtype(dtype)?)?;
        let heads = self.config.num_attention_heads;
        let pre = self.config.do_layer_norm_before;
        for (i, l) in self.layers.iter().enumerate() {
            let residual = x.clone();
            let hs = if pre {
                l.attn_ln.forward(&x)?
            } else {
                x.clone()
            };
            let q = nn::split_heads(&l.q.forward(&hs)?, heads)?;
            let k = nn::split_heads(&l.k.forward(&hs)?, heads)?;
            let v = nn::split_heads(&l.v.forward(&hs)?, heads)?;
            let (k, v) = cache.append(i, &k, &v)?;
            let opts = nn::SdpaOptions {
                mask: mask.as_ref(),
                causal: true,
                scale: None,
                return_probs: false,
            };
            let att = nn::scaled_dot_product_attention(&q, &k, &v, &opts)?.output;
            x = (residual + l.out.forward(&nn::merge_heads(&att)?)?)?;
            if !pre {
                x = l.attn_ln.forward(&x)?;
            }
            let residual = x.clone();
            let hs = if pre {
                l.ffn_ln.forward(&x)?
            } else {
                x.clone()
            };
            let hs = l.fc2.forward(&self.act.forward(&l.fc1.forward(&hs)?)?)?;
            x = (residual + hs)?;
            if !pre {
                x = l.ffn_ln.forward(&x)?;
            }
        }
        if let Some(ln) = &self.final_ln {
            x = ln.forward(&x)?;
        }
        if let Some(p) = &self.project_out {
            x = p.forward(&x)?;
        }
        Ok(LlmOutput {
            logits: logits_for(&self.lm_head, &x, logits)?,
            last_hidden_state: x,
        })
    }

    /// Number of decoder layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }
}
