//! UNet resolution blocks: `CrossAttnDownBlock2D` / `DownBlock2D`, `UNetMidBlock2DCrossAttn`,
//! `CrossAttnUpBlock2D` / `UpBlock2D` (a down/up block without a `Transformer2DModel` per
//! ResNet is the plain variant).

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::resnet::{Downsample2D, ResnetBlock2D, Upsample2D};
use super::transformer::Transformer2DModel;
use super::CaptureState;

/// Shape parameters shared by the blocks of one UNet.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BlockParams {
    pub temb: usize,
    pub groups: usize,
    pub eps: f64,
    pub use_linear_projection: bool,
}

/// Attention settings of one cross-attention block.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttnParams {
    pub heads: usize,
    pub transformer_layers: usize,
    pub context_dim: usize,
}

fn transformer(
    vb: &VarBuilder,
    name: &str,
    i: usize,
    channels: usize,
    p: &BlockParams,
    a: &AttnParams,
) -> Result<Transformer2DModel> {
    Transformer2DModel::new(
        vb.pp(format!("attentions.{i}")),
        &format!("{name}.attentions.{i}"),
        channels,
        a.heads,
        a.transformer_layers,
        a.context_dim,
        p.groups,
        p.use_linear_projection,
    )
}

/// `CrossAttnDownBlock2D` (with `attn`) or `DownBlock2D` (without).
#[derive(Debug, Clone)]
pub struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Downsample2D>,
}

impl DownBlock {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        vb: VarBuilder,
        name: &str,
        in_ch: usize,
        out_ch: usize,
        layers: usize,
        add_downsample: bool,
        downsample_padding: usize,
        p: &BlockParams,
        attn: Option<&AttnParams>,
    ) -> Result<Self> {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for i in 0..layers {
            let cin = if i == 0 { in_ch } else { out_ch };
            resnets.push(ResnetBlock2D::new(
                vb.pp(format!("resnets.{i}")),
                cin,
                out_ch,
                Some(p.temb),
                p.groups,
                p.eps,
                1.0,
            )?);
            if let Some(a) = attn {
                attentions.push(transformer(&vb, name, i, out_ch, p, a)?);
            }
        }
        let downsampler = if add_downsample {
            Some(Downsample2D::new(
                vb.pp("downsamplers.0"),
                out_ch,
                downsample_padding,
            )?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            downsampler,
        })
    }

    /// Returns the output and the states handed to the up path (one per ResNet, plus the
    /// downsampled output).
    pub(crate) fn forward(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        cap: &mut CaptureState,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut h = xs.clone();
        let mut states = Vec::new();
        for (i, resnet) in self.resnets.iter().enumerate() {
            h = resnet.forward(&h, Some(temb))?;
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(&h, context, cap)?;
            }
            states.push(h.clone());
        }
        if let Some(d) = &self.downsampler {
            h = d.forward(&h)?;
            states.push(h.clone());
        }
        Ok((h, states))
    }
}

/// `UNetMidBlock2DCrossAttn`: ResNet, then (Transformer2DModel, ResNet).
#[derive(Debug, Clone)]
pub struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
}

impl MidBlock {
    pub(crate) fn new(
        vb: VarBuilder,
        name: &str,
        channels: usize,
        scale: f64,
        p: &BlockParams,
        a: &AttnParams,
    ) -> Result<Self> {
        let resnet = |i: usize| {
            ResnetBlock2D::new(
                vb.pp(format!("resnets.{i}")),
                channels,
                channels,
                Some(p.temb),
                p.groups,
                p.eps,
                scale,
            )
        };
        Ok(Self {
            resnets: vec![resnet(0)?, resnet(1)?],
            attentions: vec![transformer(&vb, name, 0, channels, p, a)?],
        })
    }

    pub(crate) fn forward(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        cap: &mut CaptureState,
    ) -> Result<Tensor> {
        let mut h = self.resnets[0].forward(xs, Some(temb))?;
        for (attn, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            h = attn.forward(&h, context, cap)?;
            h = resnet.forward(&h, Some(temb))?;
        }
        Ok(h)
    }
}

/// `CrossAttnUpBlock2D` (with `attn`) or `UpBlock2D` (without).
#[derive(Debug, Clone)]
pub struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Upsample2D>,
}

impl UpBlock {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        vb: VarBuilder,
        name: &str,
        in_ch: usize,
        prev_out_ch: usize,
        out_ch: usize,
        layers: usize,
        add_upsample: bool,
        p: &BlockParams,
        attn: Option<&AttnParams>,
    ) -> Result<Self> {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for i in 0..layers {
            let skip = if i == layers - 1 { in_ch } else { out_ch };
            let cin = if i == 0 { prev_out_ch } else { out_ch };
            resnets.push(ResnetBlock2D::new(
                vb.pp(format!("resnets.{i}")),
                cin + skip,
                out_ch,
                Some(p.temb),
                p.groups,
                p.eps,
                1.0,
            )?);
            if let Some(a) = attn {
                attentions.push(transformer(&vb, name, i, out_ch, p, a)?);
            }
        }
        let upsampler = if add_upsample {
            Some(Upsample2D::new(vb.pp("upsamplers.0"), out_ch)?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            upsampler,
        })
    }

    /// Number of skip states this block consumes.
    pub(crate) fn num_resnets(&self) -> usize {
        self.resnets.len()
    }

    /// `skips` are consumed from the back; `up_size` is the target size of the upsampler.
    pub(crate) fn forward(
        &self,
        xs: &Tensor,
        skips: &[Tensor],
        temb: &Tensor,
        context: &Tensor,
        up_size: Option<(usize, usize)>,
        cap: &mut CaptureState,
    ) -> Result<Tensor> {
        let mut h = xs.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            let skip = &skips[skips.len() - 1 - i];
            h = Tensor::cat(&[&h, skip], 1)?;
            h = resnet.forward(&h, Some(temb))?;
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(&h, context, cap)?;
            }
        }
        if let Some(u) = &self.upsampler {
            h = u.forward(&h, up_size)?;
        }
        Ok(h)
    }
}
