//! transformers `CLIPVisionModelWithProjection`: patch convolution, class token, position
//! embeddings, `pre_layrnorm` (sic, the checkpoint's name), pre-LN encoder, `post_layernorm` on
//! the class token (the pooled output) and the bias-free `visual_projection` (`image_embeds`).
//!
//! StoryGPT-V fine-tunes the last two encoder layers: [`ClipVisionModel::load_partially_trainable`]
//! loads those as `Var`s in a `VarMap` and the rest frozen.

use super::config::ClipVisionConfig;
use super::encoder::{ClipEncoder, EncoderShape};
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};
use nn::{Conv2d, Conv2dConfig, Embedding, LayerNorm, Linear};
use std::path::Path;

/// Outputs of [`ClipVisionModel::forward`].
#[derive(Debug, Clone)]
pub struct ClipVisionOutput {
    /// `(b, 1 + patches, hidden)`: the encoder output (no final norm, as transformers).
    pub last_hidden_state: Tensor,
    /// `(b, hidden)`: `post_layernorm` of the class token (StoryGPT-V's Mapper_LLM input).
    pub pooler_output: Tensor,
    /// `(b, projection_dim)`: `visual_projection(pooler_output)`, when the checkpoint has it
    /// (the FuseModule's image embedding).
    pub image_embeds: Option<Tensor>,
    /// The encoder input (after `pre_layrnorm`) then each layer's output (`layers + 1`).
    pub hidden_states: Vec<Tensor>,
}

/// The CLIP vision tower with its optional projection.
#[derive(Debug, Clone)]
pub struct ClipVisionModel {
    class_embedding: Tensor,
    patch_embedding: Conv2d,
    position_embedding: Embedding,
    pre_layrnorm: LayerNorm,
    encoder: ClipEncoder,
    post_layernorm: LayerNorm,
    visual_projection: Option<Linear>,
    config: ClipVisionConfig,
}

impl ClipVisionModel {
    /// Builds the tower from `vb` at the checkpoint root (tensors under `vision_model.`,
    /// `visual_projection.weight` at the root, read when present).
    pub fn new(vb: VarBuilder, config: &ClipVisionConfig) -> Result<Self> {
        Self::new_with(vb, config, |_| None)
    }

    /// As [`ClipVisionModel::new`], with encoder layer `i` read from `layer_vb(i)` when it
    /// returns a builder (a builder at the checkpoint root).
    pub fn new_with(
        vb: VarBuilder,
        config: &ClipVisionConfig,
        mut layer_vb: impl FnMut(usize) -> Option<VarBuilder<'static>>,
    ) -> Result<Self> {
        let c = config;
        let v = vb.pp("vision_model");
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
        let conv = Conv2dConfig {
            stride: c.patch_size,
            ..Default::default()
        };
        let visual_projection = if vb.contains_tensor("visual_projection.weight") {
            Some(Linear::new(
                vb.pp("visual_projection"),
                c.hidden_size,
                c.projection_dim,
                false,
            )?)
        } else {
            None
        };
        let n_pos = c.grid() * c.grid() + 1;
        Ok(Self {
            class_embedding: v.get(c.hidden_size, "embeddings.class_embedding")?,
            patch_embedding: Conv2d::new(
                v.pp("embeddings.patch_embedding"),
                c.num_channels,
                c.hidden_size,
                c.patch_size,
                conv,
                false,
            )?,
            position_embedding: Embedding::new(
                v.pp("embeddings.position_embedding"),
                n_pos,
                c.hidden_size,
            )?,
            pre_layrnorm: LayerNorm::new(v.pp("pre_layrnorm"), c.hidden_size, c.layer_norm_eps)?,
            encoder: ClipEncoder::new_with(v.pp("encoder"), &shape, |i| {
                layer_vb(i).map(|b| b.pp("vision_model.encoder"))
            })?,
            post_layernorm: LayerNorm::new(
                v.pp("post_layernorm"),
                c.hidden_size,
                c.layer_norm_eps,
            )?,
            visual_projection,
            config: c.clone(),
        })
    }

    /// Loads a transformers directory (`CLIPVisionModelWithProjection`, `CLIPVisionModel` or a
    /// full `CLIPModel`), or a diffusers-style directory holding `image_encoder/`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> anyhow::Result<Self> {
        let (dir, config, weights) = open(dir)?;
        Self::new(weights.var_builder(dtype, device), &config)
            .map_err(|e| anyhow::anyhow!("CLIP vision model in {}: {e}", dir.display()))
    }

    /// Loads like [`ClipVisionModel::load`], but the last `trainable_layers` encoder layers
    /// become `Var`s in `varmap` (named `vision_model.encoder.layers.{i}.…`); everything else is
    /// frozen. StoryGPT-V trains the last 2.
    pub fn load_partially_trainable(
        dir: &Path,
        varmap: &VarMap,
        trainable_layers: usize,
        dtype: DType,
        device: &Device,
    ) -> anyhow::Result<Self> {
        let (dir, config, weights) = open(dir)?;
        let first = config.num_hidden_layers.saturating_sub(trainable_layers);
        let trainable = weights.trainable_var_builder(varmap, dtype, device);
        Self::new_with(weights.var_builder(dtype, device), &config, |i| {
            (i >= first).then(|| trainable.clone())
        })
        .map_err(|e| anyhow::anyhow!("CLIP vision model in {}: {e}", dir.display()))
    }

    /// The configuration.
    pub fn config(&self) -> &ClipVisionConfig {
        &self.config
    }

    /// Runs the tower on `pixel_values` `(b, 3, image_size, image_size)` (normalised).
    pub fn forward(&self, pixel_values: &Tensor) -> Result<ClipVisionOutput> {
        let c = &self.config;
        let (b, ch, h, w) = pixel_values.dims4()?;
        if ch != c.num_channels || h != c.image_size || w != c.image_size {
            candle_core::bail!(
                "pixel_values has shape {:?}, the model expects (b, {}, {}, {})",
                pixel_values.dims(),
                c.num_channels,
                c.image_size,
                c.image_size
            )
        }
        let dtype = self.class_embedding.dtype();
        let patches = self
            .patch_embedding
            .forward(&pixel_values.to_dtype(dtype)?)?;
        let patches = patches.flatten_from(2)?.transpose(1, 2)?;
        let class = self
            .class_embedding
            .reshape((1, 1, c.hidden_size))?
            .broadcast_as((b, 1, c.hidden_size))?;
        let emb = Tensor::cat(&[&class, &patches], 1)?;
        let emb = emb.broadcast_add(&self.position_embedding.weight().unsqueeze(0)?)?;
        let h = self.pre_layrnorm.forward(&emb)?;
        let hidden_states = self.encoder.forward_all(&h, None, false)?;
        let last_hidden_state = hidden_states.last().expect("input state").clone();
        let cls = last_hidden_state.narrow(1, 0, 1)?.squeeze(1)?;
        let pooler_output = self.post_layernorm.forward(&cls)?;
        let image_embeds = self
            .visual_projection
            .as_ref()
            .map(|p| p.forward(&pooler_output))
            .transpose()?;
        Ok(ClipVisionOutput {
            last_hidden_state,
            pooler_output,
            image_embeds,
            hidden_states,
        })
    }
}

fn open(dir: &Path) -> anyhow::Result<(std::path::PathBuf, ClipVisionConfig, nn::Weights)> {
    let dir = super::resolve_dir(dir, "image_encoder");
    let configs = super::ClipConfigs::from_dir(&dir)?;
    let config = configs.vision.ok_or_else(|| {
        anyhow::anyhow!(
            "{}: config.json describes no CLIP vision tower",
            dir.display()
        )
    })?;
    let weights = nn::Weights::open(&dir)
        .map_err(|e| anyhow::anyhow!("CLIP vision weights in {}: {e}", dir.display()))?;
    Ok((dir, config, weights))
}
