//! The VAE's `Encoder` and `Decoder` (diffusers `DownEncoderBlock2D`, `UpDecoderBlock2D`,
//! `UNetMidBlock2D` with its single-head spatial self-attention).
//!
//! The attention loads either diffusers' current names (`to_q`, `to_k`, `to_v`, `to_out.0`)
//! or the legacy ones of older VAE checkpoints (`query`, `key`, `value`, `proj_attn`).

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use nn::{Conv2d, GroupNorm, Linear, SdpaOptions};

use crate::unet::resnet::{conv_same, Downsample2D, ResnetBlock2D, Upsample2D};

/// The VAE mid-block attention: group norm, one head over all `H*W` positions, residual.
#[derive(Debug, Clone)]
pub struct VaeAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl VaeAttention {
    /// Reads `to_q`/`to_k`/`to_v`/`to_out.0`, or `query`/`key`/`value`/`proj_attn` when the
    /// checkpoint uses the legacy names.
    pub fn new(vb: VarBuilder, channels: usize, groups: usize, eps: f64) -> Result<Self> {
        let legacy = !vb.contains_tensor("to_q.weight") && vb.contains_tensor("query.weight");
        let names = if legacy {
            ["query", "key", "value", "proj_attn"]
        } else {
            ["to_q", "to_k", "to_v", "to_out.0"]
        };
        let lin = |n: &str| Linear::new(vb.pp(n), channels, channels, true);
        Ok(Self {
            group_norm: GroupNorm::new(vb.pp("group_norm"), groups, channels, eps, true)?,
            to_q: lin(names[0])?,
            to_k: lin(names[1])?,
            to_v: lin(names[2])?,
            to_out: lin(names[3])?,
        })
    }

    /// `(N, C, H, W)` -> `(N, C, H, W)`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let t = self
            .group_norm
            .forward(xs)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = self.to_q.forward(&t)?.unsqueeze(1)?;
        let k = self.to_k.forward(&t)?.unsqueeze(1)?;
        let v = self.to_v.forward(&t)?.unsqueeze(1)?;
        let o = nn::scaled_dot_product_attention(&q, &k, &v, &SdpaOptions::default())?.output;
        let o = self.to_out.forward(&o.squeeze(1)?)?;
        let o = o.transpose(1, 2)?.reshape((b, c, h, w))?;
        o + xs
    }
}

/// diffusers `UNetMidBlock2D` without time embedding: ResNet, attention, ResNet.
#[derive(Debug, Clone)]
pub struct VaeMidBlock {
    resnets: [ResnetBlock2D; 2],
    attention: Option<VaeAttention>,
}

impl VaeMidBlock {
    /// Tensor names `resnets.{0,1}`, `attentions.0`.
    pub fn new(
        vb: VarBuilder,
        channels: usize,
        groups: usize,
        add_attention: bool,
    ) -> Result<Self> {
        let r = |i: usize| {
            ResnetBlock2D::new(
                vb.pp(format!("resnets.{i}")),
                channels,
                channels,
                None,
                groups,
                1e-6,
                1.0,
            )
        };
        let attention = if add_attention {
            Some(VaeAttention::new(
                vb.pp("attentions.0"),
                channels,
                groups,
                1e-6,
            )?)
        } else {
            None
        };
        Ok(Self {
            resnets: [r(0)?, r(1)?],
            attention,
        })
    }

    /// `(N, C, H, W)` -> `(N, C, H, W)`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut h = self.resnets[0].forward(xs, None)?;
        if let Some(a) = &self.attention {
            h = a.forward(&h)?;
        }
        self.resnets[1].forward(&h, None)
    }
}

/// Shapes shared by the encoder and decoder.
#[derive(Debug, Clone)]
pub struct CoderShape {
    /// `block_out_channels` of the config.
    pub block_out_channels: Vec<usize>,
    /// `layers_per_block` of the config.
    pub layers_per_block: usize,
    /// Group-norm groups.
    pub groups: usize,
    /// Whether the mid block has attention.
    pub mid_attention: bool,
}

/// A stack of ResNets followed by an optional resampler (`DownEncoderBlock2D` /
/// `UpDecoderBlock2D`).
#[derive(Debug, Clone)]
struct ResBlock {
    resnets: Vec<ResnetBlock2D>,
    down: Option<Downsample2D>,
    up: Option<Upsample2D>,
}

impl ResBlock {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut h = xs.clone();
        for r in &self.resnets {
            h = r.forward(&h, None)?;
        }
        if let Some(d) = &self.down {
            h = d.forward(&h)?;
        }
        if let Some(u) = &self.up {
            h = u.forward(&h, None)?;
        }
        Ok(h)
    }
}

fn resnets(
    vb: &VarBuilder,
    n: usize,
    cin: usize,
    cout: usize,
    g: usize,
) -> Result<Vec<ResnetBlock2D>> {
    (0..n)
        .map(|i| {
            let c = if i == 0 { cin } else { cout };
            ResnetBlock2D::new(vb.pp(format!("resnets.{i}")), c, cout, None, g, 1e-6, 1.0)
        })
        .collect()
}

/// diffusers VAE `Encoder`: image `(N, in, H, W)` -> moments `(N, 2*latent, H/f, W/f)`.
#[derive(Debug, Clone)]
pub struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<ResBlock>,
    mid_block: VaeMidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    /// `out_channels` is `2 * latent_channels` (`double_z`).
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        s: &CoderShape,
    ) -> Result<Self> {
        let ch = &s.block_out_channels;
        let n = ch.len();
        let conv_in = conv_same(vb.pp("conv_in"), in_channels, ch[0], 3)?;
        let mut down_blocks = Vec::with_capacity(n);
        let mut out_ch = ch[0];
        for (i, &c) in ch.iter().enumerate() {
            let in_ch = out_ch;
            out_ch = c;
            let bvb = vb.pp(format!("down_blocks.{i}"));
            let down = if i + 1 < n {
                Some(Downsample2D::new(bvb.pp("downsamplers.0"), out_ch, 0)?)
            } else {
                None
            };
            down_blocks.push(ResBlock {
                resnets: resnets(&bvb, s.layers_per_block, in_ch, out_ch, s.groups)?,
                down,
                up: None,
            });
        }
        Ok(Self {
            conv_in,
            down_blocks,
            mid_block: VaeMidBlock::new(vb.pp("mid_block"), ch[n - 1], s.groups, s.mid_attention)?,
            conv_norm_out: GroupNorm::new(vb.pp("conv_norm_out"), s.groups, ch[n - 1], 1e-6, true)?,
            conv_out: conv_same(vb.pp("conv_out"), ch[n - 1], out_channels, 3)?,
        })
    }

    /// Image -> moments.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(xs)?;
        for b in &self.down_blocks {
            h = b.forward(&h)?;
        }
        h = self.mid_block.forward(&h)?;
        self.conv_out.forward(&self.conv_norm_out.forward_silu(&h)?)
    }
}

/// diffusers VAE `Decoder`: latent `(N, latent, h, w)` -> image `(N, out, h*f, w*f)`.
#[derive(Debug, Clone)]
pub struct Decoder {
    conv_in: Conv2d,
    mid_block: VaeMidBlock,
    up_blocks: Vec<ResBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    /// Up blocks have `layers_per_block + 1` ResNets each.
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        s: &CoderShape,
    ) -> Result<Self> {
        let ch = &s.block_out_channels;
        let n = ch.len();
        let conv_in = conv_same(vb.pp("conv_in"), in_channels, ch[n - 1], 3)?;
        let mid_block = VaeMidBlock::new(vb.pp("mid_block"), ch[n - 1], s.groups, s.mid_attention)?;
        let mut up_blocks = Vec::with_capacity(n);
        let mut out_ch = ch[n - 1];
        for i in 0..n {
            let prev = out_ch;
            out_ch = ch[n - 1 - i];
            let bvb = vb.pp(format!("up_blocks.{i}"));
            let up = if i + 1 < n {
                Some(Upsample2D::new(bvb.pp("upsamplers.0"), out_ch)?)
            } else {
                None
            };
            up_blocks.push(ResBlock {
                resnets: resnets(&bvb, s.layers_per_block + 1, prev, out_ch, s.groups)?,
                down: None,
                up,
            });
        }
        Ok(Self {
            conv_in,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::new(vb.pp("conv_norm_out"), s.groups, ch[0], 1e-6, true)?,
            conv_out: conv_same(vb.pp("conv_out"), ch[0], out_channels, 3)?,
        })
    }

    /// Latent -> image.
    pub fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(z)?;
        h = self.mid_block.forward(&h)?;
        for b in &self.up_blocks {
            h = b.forward(&h)?;
        }
        self.conv_out.forward(&self.conv_norm_out.forward_silu(&h)?)
    }
}
