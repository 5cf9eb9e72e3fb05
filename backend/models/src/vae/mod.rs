//! diffusers `AutoencoderKL` (the Stable Diffusion VAE): encoder -> `quant_conv` -> diagonal
//! Gaussian posterior; `post_quant_conv` -> decoder.
//!
//! Config-driven from `vae/config.json`; tensor names as diffusers (legacy attention names are
//! also read, see [`blocks::VaeAttention`]). Built from `nn` layers, so it is differentiable
//! end to end (StoryGPT-V keeps it frozen, but the gradient tests check it anyway).
//! `scaling_factor` (0.18215 for SD 1.x) is exposed, not applied: callers multiply latents by
//! it after [`DiagonalGaussian::sample`] and divide before [`AutoencoderKL::decode`].

pub mod blocks;
pub mod conformance;

use std::path::Path;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use nn::{Conv2d, Conv2dConfig};
use serde::Deserialize;

use blocks::{CoderShape, Decoder, Encoder};

/// The diffusers `AutoencoderKL` config (field names as in `config.json`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct VaeConfig {
    /// Image channels in.
    pub in_channels: usize,
    /// Image channels out.
    pub out_channels: usize,
    /// All `DownEncoderBlock2D`.
    pub down_block_types: Vec<String>,
    /// All `UpDecoderBlock2D`.
    pub up_block_types: Vec<String>,
    /// Channels per resolution.
    pub block_out_channels: Vec<usize>,
    /// ResNets per encoder block (decoder blocks have one more).
    pub layers_per_block: usize,
    /// Activation (`silu`).
    pub act_fn: String,
    /// Latent channels.
    pub latent_channels: usize,
    /// Group-norm groups.
    pub norm_num_groups: usize,
    /// Image size the model was trained on.
    pub sample_size: Option<usize>,
    /// Latent scale (0.18215 for SD 1.x).
    pub scaling_factor: f64,
    /// Latent shift (SD3 / Flux); `None` for SD 1.x.
    pub shift_factor: Option<f64>,
    /// Whether `quant_conv` exists.
    pub use_quant_conv: bool,
    /// Whether `post_quant_conv` exists.
    pub use_post_quant_conv: bool,
    /// Whether the mid blocks have attention.
    pub mid_block_add_attention: bool,
}

impl Default for VaeConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into()],
            up_block_types: vec!["UpDecoderBlock2D".into()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: "silu".into(),
            latent_channels: 4,
            norm_num_groups: 32,
            sample_size: Some(32),
            scaling_factor: 0.18215,
            shift_factor: None,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }
}

impl VaeConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading VAE config {}", path.display()))?;
        let cfg: Self = serde_json::from_str(&text)
            .with_context(|| format!("parsing VAE config {}", path.display()))?;
        cfg.validate()
            .with_context(|| format!("unsupported VAE config {}", path.display()))?;
        Ok(cfg)
    }

    /// Checks that every option has a supported value.
    pub fn validate(&self) -> anyhow::Result<()> {
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            bail!("block type lists do not match block_out_channels ({n})")
        }
        if let Some(t) = self
            .down_block_types
            .iter()
            .find(|t| *t != "DownEncoderBlock2D")
        {
            bail!("down block type `{t}` is not supported")
        }
        if let Some(t) = self
            .up_block_types
            .iter()
            .find(|t| *t != "UpDecoderBlock2D")
        {
            bail!("up block type `{t}` is not supported")
        }
        if self.act_fn != "silu" {
            bail!("act_fn `{}` is not supported (only silu)", self.act_fn)
        }
        if let Some(c) = self
            .block_out_channels
            .iter()
            .find(|c| *c % self.norm_num_groups != 0)
        {
            bail!(
                "{c} channels are not divisible into {} groups",
                self.norm_num_groups
            )
        }
        Ok(())
    }

    /// Spatial downscaling factor (8 for SD).
    pub fn downscale(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

/// The VAE posterior `N(mean, exp(logvar))` with `logvar` clamped to `[-30, 20]`.
#[derive(Debug, Clone)]
pub struct DiagonalGaussian {
    /// `(N, latent, h, w)`.
    pub mean: Tensor,
    /// `(N, latent, h, w)`, clamped.
    pub logvar: Tensor,
}

impl DiagonalGaussian {
    /// Splits `(N, 2*latent, h, w)` moments into mean and clamped log-variance.
    pub fn from_moments(moments: &Tensor) -> Result<Self> {
        let c = moments.dim(1)? / 2;
        let mean = moments.narrow(1, 0, c)?;
        let logvar = moments.narrow(1, c, c)?.clamp(-30f32, 20f32)?;
        Ok(Self { mean, logvar })
    }

    /// `exp(0.5 * logvar)`.
    pub fn std(&self) -> Result<Tensor> {
        (&self.logvar * 0.5)?.exp()
    }

    /// `mean + std * noise` with caller-provided standard-normal `noise` (deterministic given
    /// the noise; draw it with `Tensor::randn` or a seeded generator).
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        self.mean.add(&self.std()?.mul(noise)?)
    }

    /// The mode (= mean).
    pub fn mode(&self) -> &Tensor {
        &self.mean
    }
}

/// diffusers `AutoencoderKL`.
#[derive(Debug, Clone)]
pub struct AutoencoderKL {
    config: VaeConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
}

impl AutoencoderKL {
    /// Builds the VAE from `config`; `vb` may read a checkpoint or a `VarMap`.
    pub fn new(vb: VarBuilder, config: &VaeConfig) -> anyhow::Result<Self> {
        config.validate()?;
        Ok(Self::build(vb, config)?)
    }

    fn build(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        let shape = CoderShape {
            block_out_channels: cfg.block_out_channels.clone(),
            layers_per_block: cfg.layers_per_block,
            groups: cfg.norm_num_groups,
            mid_attention: cfg.mid_block_add_attention,
        };
        let lc = cfg.latent_channels;
        let conv1 =
            |name: &str, c: usize| Conv2d::new(vb.pp(name), c, c, 1, Conv2dConfig::default(), true);
        Ok(Self {
            config: cfg.clone(),
            encoder: Encoder::new(vb.pp("encoder"), cfg.in_channels, 2 * lc, &shape)?,
            decoder: Decoder::new(vb.pp("decoder"), lc, cfg.out_channels, &shape)?,
            quant_conv: cfg
                .use_quant_conv
                .then(|| conv1("quant_conv", 2 * lc))
                .transpose()?,
            post_quant_conv: cfg
                .use_post_quant_conv
                .then(|| conv1("post_quant_conv", lc))
                .transpose()?,
        })
    }

    /// Loads a frozen VAE from a diffusers `vae/` directory (or a pipeline directory).
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> anyhow::Result<Self> {
        let dir = crate::unet::resolve_component_dir(dir, "vae");
        let config = VaeConfig::from_file(&dir.join("config.json"))?;
        let weights = nn::Weights::open(&dir)
            .with_context(|| format!("opening VAE weights in {}", dir.display()))?;
        Self::new(weights.var_builder(dtype, device), &config)
            .with_context(|| format!("building VAE from {}", dir.display()))
    }

    /// The config the model was built from.
    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// The latent scale from the config (0.18215 for SD 1.x).
    pub fn scaling_factor(&self) -> f64 {
        self.config.scaling_factor
    }

    /// Image `(N, 3, H, W)` in `[-1, 1]` -> posterior over `(N, latent, H/f, W/f)`.
    pub fn encode(&self, xs: &Tensor) -> Result<DiagonalGaussian> {
        let mut moments = self.encoder.forward(xs)?;
        if let Some(q) = &self.quant_conv {
            moments = q.forward(&moments)?;
        }
        DiagonalGaussian::from_moments(&moments)
    }

    /// Unscaled latent `(N, latent, h, w)` -> image `(N, 3, h*f, w*f)`.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(p) => p.forward(z)?,
            None => z.clone(),
        };
        self.decoder.forward(&z)
    }
}
