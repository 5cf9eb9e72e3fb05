//! The convolutional pieces shared by the UNet and the VAE: `ResnetBlock2D`, `Downsample2D`,
//! `Upsample2D`, and the sinusoidal timestep embedding + `TimestepEmbedding` MLP.
//!
//! Tensor names follow diffusers (`norm1`, `conv1`, `time_emb_proj`, `norm2`, `conv2`,
//! `conv_shortcut`; `conv` for the resamplers; `linear_1`, `linear_2`), so diffusers state
//! dicts load unchanged. All layers come from `nn` and are differentiable.

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;
use nn::{Conv2d, Conv2dConfig, GroupNorm, Linear};

/// A 3x3 (or `k`x`k`) "same" convolution with bias.
pub(crate) fn conv_same(vb: VarBuilder, cin: usize, cout: usize, k: usize) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: k / 2,
        ..Default::default()
    };
    Conv2d::new(vb, cin, cout, k, cfg, true)
}

/// diffusers `ResnetBlock2D` with `time_embedding_norm="default"`, SiLU, pre-norm.
#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

impl ResnetBlock2D {
    /// `temb_channels: None` builds the VAE variant without `time_emb_proj`; a 1x1
    /// `conv_shortcut` is added when the channel count changes.
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        temb_channels: Option<usize>,
        groups: usize,
        eps: f64,
        output_scale_factor: f64,
    ) -> Result<Self> {
        let norm1 = GroupNorm::new(vb.pp("norm1"), groups, in_channels, eps, true)?;
        let conv1 = conv_same(vb.pp("conv1"), in_channels, out_channels, 3)?;
        let time_emb_proj = match temb_channels {
            Some(t) => Some(Linear::new(vb.pp("time_emb_proj"), t, out_channels, true)?),
            None => None,
        };
        let norm2 = GroupNorm::new(vb.pp("norm2"), groups, out_channels, eps, true)?;
        let conv2 = conv_same(vb.pp("conv2"), out_channels, out_channels, 3)?;
        let conv_shortcut = if in_channels != out_channels {
            Some(Conv2d::new(
                vb.pp("conv_shortcut"),
                in_channels,
                out_channels,
                1,
                Conv2dConfig::default(),
                true,
            )?)
        } else {
            None
        };
        Ok(Self {
            norm1,
            conv1,
            time_emb_proj,
            norm2,
            conv2,
            conv_shortcut,
            output_scale_factor,
        })
    }

    /// `x: (N, C_in, H, W)`, `temb: (N, T)` (ignored when the block has no `time_emb_proj`).
    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let mut h = self.conv1.forward(&self.norm1.forward_silu(xs)?)?;
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            let t = proj.forward(&nn::silu(temb)?)?.unsqueeze(2)?.unsqueeze(3)?;
            h = h.broadcast_add(&t)?;
        }
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(xs)?,
            None => xs.clone(),
        };
        let out = (skip + h)?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale_factor
        }
    }
}

/// diffusers `Downsample2D` with `use_conv=True`: a stride-2 3x3 convolution. With
/// `padding == 0` (the VAE encoder) the input is first padded by one zero row/column at the
/// bottom/right, as diffusers does.
#[derive(Debug, Clone)]
pub struct Downsample2D {
    conv: Conv2d,
    padding: usize,
}

impl Downsample2D {
    /// Tensor names: `conv.weight`, `conv.bias`.
    pub fn new(vb: VarBuilder, channels: usize, padding: usize) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding,
            stride: 2,
            ..Default::default()
        };
        let conv = Conv2d::new(vb.pp("conv"), channels, channels, 3, cfg, true)?;
        Ok(Self { conv, padding })
    }

    /// `(N, C, H, W)` -> `(N, C, ceil(H/2), ceil(W/2))`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if self.padding == 0 {
            let xs = xs.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
            self.conv.forward(&xs)
        } else {
            self.conv.forward(xs)
        }
    }
}

/// diffusers `Upsample2D` with `use_conv=True`: nearest-neighbour upsampling then a 3x3 conv.
#[derive(Debug, Clone)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    /// Tensor names: `conv.weight`, `conv.bias`.
    pub fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        Ok(Self {
            conv: conv_same(vb.pp("conv"), channels, channels, 3)?,
        })
    }

    /// Upsamples to `size` (the skip connection's `(H, W)`) or by 2 when `None`.
    pub fn forward(&self, xs: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        self.conv.forward(&xs.upsample_nearest2d(th, tw)?)
    }
}

/// diffusers `get_timestep_embedding`: `(N,)` timesteps -> `(N, dim)` f32 sinusoids,
/// `exp(-ln(10000) * i / (dim/2 - shift))`, `[sin, cos]` (or `[cos, sin]` when flipped).
pub fn timestep_embedding(
    timesteps: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
) -> Result<Tensor> {
    let half = dim / 2;
    // f32 arithmetic in the same order as diffusers, so the phases agree to the last bit
    // that matters at t ~ 1000.
    let neg_log = -(10000f32.ln());
    let denom = half as f32 - freq_shift as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| (neg_log * i as f32 / denom).exp())
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), timesteps.device())?;
    let t = timesteps.to_dtype(DType::F32)?.unsqueeze(1)?;
    let args = t.broadcast_mul(&freqs)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    let emb = if flip_sin_to_cos {
        Tensor::cat(&[cos, sin], 1)?
    } else {
        Tensor::cat(&[sin, cos], 1)?
    };
    if dim % 2 == 1 {
        emb.pad_with_zeros(1, 0, 1)
    } else {
        Ok(emb)
    }
}

/// diffusers `TimestepEmbedding`: `linear_2(silu(linear_1(x)))`.
#[derive(Debug, Clone)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    /// Tensor names: `linear_1`, `linear_2`.
    pub fn new(vb: VarBuilder, in_dim: usize, dim: usize) -> Result<Self> {
        Ok(Self {
            linear_1: Linear::new(vb.pp("linear_1"), in_dim, dim, true)?,
            linear_2: Linear::new(vb.pp("linear_2"), dim, dim, true)?,
        })
    }

    /// `(N, in_dim)` -> `(N, dim)`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.linear_2
            .forward(&nn::silu(&self.linear_1.forward(xs)?)?)
    }
}
