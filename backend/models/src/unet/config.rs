//! `UNet2DConditionModel` configuration, read from a diffusers `unet/config.json`.
//!
//! Only the options used by Stable Diffusion 1.x/2.x-style UNets are supported; a config that
//! asks for anything else (class embeddings, added conditions, scale-shift time embeddings,
//! dual cross-attention, ...) is rejected with an error naming the option instead of being
//! silently misread.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// A config value that diffusers accepts either as one number or as a per-block list.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    /// The same value for every block.
    One(T),
    /// One value per down block (in down-block order).
    Many(Vec<T>),
}

impl<T: Clone> OneOrMany<T> {
    /// Expands to exactly `n` values; `what` names the option in the error.
    pub fn expand(&self, n: usize, what: &str) -> Result<Vec<T>> {
        match self {
            OneOrMany::One(v) => Ok(vec![v.clone(); n]),
            OneOrMany::Many(v) if v.len() == n => Ok(v.clone()),
            OneOrMany::Many(v) => bail!("`{what}` has {} entries, expected {n}", v.len()),
        }
    }
}

/// The diffusers `UNet2DConditionModel` config (field names as in `config.json`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct UNetConfig {
    /// Height / width of the latent the model was trained on.
    pub sample_size: Option<usize>,
    /// Latent channels in.
    pub in_channels: usize,
    /// Latent channels out.
    pub out_channels: usize,
    /// Map the input from [0, 1] to [-1, 1] first.
    pub center_input_sample: bool,
    /// Sinusoidal timestep embedding: cos half first.
    pub flip_sin_to_cos: bool,
    /// `downscale_freq_shift` of the timestep embedding.
    pub freq_shift: f64,
    /// `CrossAttnDownBlock2D` or `DownBlock2D`, one per resolution.
    pub down_block_types: Vec<String>,
    /// `UNetMidBlock2DCrossAttn` (the only supported mid block).
    pub mid_block_type: Option<String>,
    /// `CrossAttnUpBlock2D` or `UpBlock2D`, one per resolution (deepest first).
    pub up_block_types: Vec<String>,
    /// Must be false (true is not supported).
    pub only_cross_attention: OneOrMany<bool>,
    /// Output channels of each down block.
    pub block_out_channels: Vec<usize>,
    /// ResNet layers per down block (up blocks have one more).
    pub layers_per_block: OneOrMany<usize>,
    /// Padding of the stride-2 downsampling convolutions.
    pub downsample_padding: usize,
    /// Output scale of the mid block's ResNets.
    pub mid_block_scale_factor: f64,
    /// Activation (`silu`).
    pub act_fn: String,
    /// Group-norm groups.
    pub norm_num_groups: usize,
    /// Group-norm epsilon.
    pub norm_eps: f64,
    /// Width of `encoder_hidden_states`.
    pub cross_attention_dim: OneOrMany<usize>,
    /// Transformer blocks per `Transformer2DModel`.
    pub transformer_layers_per_block: OneOrMany<usize>,
    /// Legacy diffusers name: for SD 1.x this is the NUMBER OF HEADS (used when
    /// `num_attention_heads` is absent).
    pub attention_head_dim: OneOrMany<usize>,
    /// Number of heads (newer configs); overrides `attention_head_dim` when set.
    pub num_attention_heads: Option<OneOrMany<usize>>,
    /// Must be false.
    pub dual_cross_attention: bool,
    /// `proj_in` / `proj_out` are Linear layers instead of 1x1 convolutions.
    pub use_linear_projection: bool,
    /// Accepted; attention softmax is always computed in f32 here.
    pub upcast_attention: bool,
    /// Must be `default`.
    pub resnet_time_scale_shift: String,
    /// Must be `positional`.
    pub time_embedding_type: String,
    /// Must be absent.
    pub class_embed_type: Option<String>,
    /// Must be absent.
    pub addition_embed_type: Option<String>,
    /// Must be absent.
    pub time_cond_proj_dim: Option<usize>,
    /// Must be absent.
    pub timestep_post_act: Option<String>,
    /// Must be absent.
    pub encoder_hid_dim: Option<usize>,
    /// Kernel of `conv_in`.
    pub conv_in_kernel: usize,
    /// Kernel of `conv_out`.
    pub conv_out_kernel: usize,
}

impl Default for UNetConfig {
    fn default() -> Self {
        Self {
            sample_size: None,
            in_channels: 4,
            out_channels: 4,
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: vec![
                "CrossAttnDownBlock2D".into(),
                "CrossAttnDownBlock2D".into(),
                "CrossAttnDownBlock2D".into(),
                "DownBlock2D".into(),
            ],
            mid_block_type: Some("UNetMidBlock2DCrossAttn".into()),
            up_block_types: vec![
                "UpBlock2D".into(),
                "CrossAttnUpBlock2D".into(),
                "CrossAttnUpBlock2D".into(),
                "CrossAttnUpBlock2D".into(),
            ],
            only_cross_attention: OneOrMany::One(false),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: OneOrMany::One(2),
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            act_fn: "silu".into(),
            norm_num_groups: 32,
            norm_eps: 1e-5,
            cross_attention_dim: OneOrMany::One(1280),
            transformer_layers_per_block: OneOrMany::One(1),
            attention_head_dim: OneOrMany::One(8),
            num_attention_heads: None,
            dual_cross_attention: false,
            use_linear_projection: false,
            upcast_attention: false,
            resnet_time_scale_shift: "default".into(),
            time_embedding_type: "positional".into(),
            class_embed_type: None,
            addition_embed_type: None,
            time_cond_proj_dim: None,
            timestep_post_act: None,
            encoder_hid_dim: None,
            conv_in_kernel: 3,
            conv_out_kernel: 3,
        }
    }
}

impl UNetConfig {
    /// The Stable Diffusion 1.5 UNet (`runwayml/stable-diffusion-v1-5/unet/config.json`).
    pub fn sd15() -> Self {
        Self {
            sample_size: Some(64),
            cross_attention_dim: OneOrMany::One(768),
            ..Self::default()
        }
    }

    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading UNet config {}", path.display()))?;
        let cfg: Self = serde_json::from_str(&text)
            .with_context(|| format!("parsing UNet config {}", path.display()))?;
        cfg.validate()
            .with_context(|| format!("unsupported UNet config {}", path.display()))?;
        Ok(cfg)
    }

    /// Number of down blocks (= resolutions).
    pub fn num_blocks(&self) -> usize {
        self.block_out_channels.len()
    }

    /// Heads per down block, resolving diffusers' legacy `attention_head_dim` meaning.
    pub fn heads_per_block(&self) -> Result<Vec<usize>> {
        let n = self.num_blocks();
        match &self.num_attention_heads {
            Some(h) => h.expand(n, "num_attention_heads"),
            None => self.attention_head_dim.expand(n, "attention_head_dim"),
        }
    }

    /// Checks that every option has a supported value.
    pub fn validate(&self) -> Result<()> {
        let n = self.num_blocks();
        if n == 0 {
            bail!("`block_out_channels` is empty")
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            bail!(
                "{} down and {} up block types for {n} block_out_channels",
                self.down_block_types.len(),
                self.up_block_types.len()
            )
        }
        for t in &self.down_block_types {
            if t != "CrossAttnDownBlock2D" && t != "DownBlock2D" {
                bail!("down block type `{t}` is not supported")
            }
        }
        for t in &self.up_block_types {
            if t != "CrossAttnUpBlock2D" && t != "UpBlock2D" {
                bail!("up block type `{t}` is not supported")
            }
        }
        match self.mid_block_type.as_deref() {
            Some("UNetMidBlock2DCrossAttn") => {}
            other => bail!("mid block type {other:?} is not supported"),
        }
        if self
            .only_cross_attention
            .expand(n, "only_cross_attention")?
            .iter()
            .any(|b| *b)
        {
            bail!("`only_cross_attention: true` is not supported")
        }
        if self.dual_cross_attention {
            bail!("`dual_cross_attention: true` is not supported")
        }
        if self.act_fn != "silu" {
            bail!("act_fn `{}` is not supported (only silu)", self.act_fn)
        }
        if self.resnet_time_scale_shift != "default" {
            bail!(
                "resnet_time_scale_shift `{}` is not supported",
                self.resnet_time_scale_shift
            )
        }
        if self.time_embedding_type != "positional" {
            bail!(
                "time_embedding_type `{}` is not supported",
                self.time_embedding_type
            )
        }
        for (name, v) in [
            ("class_embed_type", &self.class_embed_type),
            ("addition_embed_type", &self.addition_embed_type),
            ("timestep_post_act", &self.timestep_post_act),
        ] {
            if let Some(v) = v {
                bail!("`{name}: {v}` is not supported")
            }
        }
        if self.time_cond_proj_dim.is_some() || self.encoder_hid_dim.is_some() {
            bail!("`time_cond_proj_dim` / `encoder_hid_dim` are not supported")
        }
        if self.conv_in_kernel.is_multiple_of(2) || self.conv_out_kernel.is_multiple_of(2) {
            bail!("conv_in_kernel / conv_out_kernel must be odd")
        }
        let heads = self.heads_per_block()?;
        for (c, h) in self.block_out_channels.iter().zip(&heads) {
            if *h == 0 || c % h != 0 {
                bail!("{c} channels cannot be split into {h} attention heads")
            }
            if c % self.norm_num_groups != 0 {
                bail!(
                    "{c} channels are not divisible into {} groups",
                    self.norm_num_groups
                )
            }
        }
        self.layers_per_block.expand(n, "layers_per_block")?;
        self.cross_attention_dim.expand(n, "cross_attention_dim")?;
        self.transformer_layers_per_block
            .expand(n, "transformer_layers_per_block")?;
        Ok(())
    }
}
