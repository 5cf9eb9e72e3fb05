//! The UNet's attention stack: diffusers `Attention` (no group norm), GEGLU `FeedForward`,
//! `BasicTransformerBlock` and `Transformer2DModel` (continuous input, 1x1-conv or linear
//! projections).
//!
//! `attn2` (cross-attention) can hand back its probabilities `(batch, heads, h*w, tokens)`
//! inside the autograd graph; see [`super::AttentionCapture`].

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use nn::{Conv2d, Conv2dConfig, GroupNorm, LayerNorm, Linear, SdpaOptions};

use super::{CaptureState, CapturedAttention};

/// diffusers `Attention` as used in `BasicTransformerBlock`: bias-free `to_q`, `to_k`, `to_v`,
/// `to_out.0` with bias, `heads` heads of `dim_head`, scale `dim_head^-0.5`.
#[derive(Debug, Clone)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
}

impl Attention {
    /// `context_dim: None` builds self-attention.
    pub fn new(
        vb: VarBuilder,
        query_dim: usize,
        context_dim: Option<usize>,
        heads: usize,
        dim_head: usize,
    ) -> Result<Self> {
        let inner = heads * dim_head;
        let ctx = context_dim.unwrap_or(query_dim);
        Ok(Self {
            to_q: Linear::new(vb.pp("to_q"), query_dim, inner, false)?,
            to_k: Linear::new(vb.pp("to_k"), ctx, inner, false)?,
            to_v: Linear::new(vb.pp("to_v"), ctx, inner, false)?,
            to_out: Linear::new(vb.pp("to_out.0"), inner, query_dim, true)?,
            heads,
        })
    }

    /// `x: (b, n, query_dim)`, `context: (b, m, context_dim)` (self-attention when `None`).
    /// Returns the output and, when `return_probs`, the `(b, heads, n, m)` probabilities.
    pub fn forward(
        &self,
        xs: &Tensor,
        context: Option<&Tensor>,
        return_probs: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let ctx = context.unwrap_or(xs);
        let q = nn::split_heads(&self.to_q.forward(xs)?, self.heads)?;
        let k = nn::split_heads(&self.to_k.forward(ctx)?, self.heads)?;
        let v = nn::split_heads(&self.to_v.forward(ctx)?, self.heads)?;
        let opts = SdpaOptions {
            return_probs,
            ..Default::default()
        };
        let out = nn::scaled_dot_product_attention(&q, &k, &v, &opts)?;
        let y = self.to_out.forward(&nn::merge_heads(&out.output)?)?;
        Ok((y, out.probs))
    }
}

/// diffusers `FeedForward` with GEGLU: `net.2(h * gelu(gate))`, `[h, gate] = net.0.proj(x)`.
#[derive(Debug, Clone)]
pub struct FeedForward {
    proj: Linear,
    out: Linear,
    inner: usize,
}

impl FeedForward {
    /// Inner width `4 * dim`; tensor names `net.0.proj`, `net.2`.
    pub fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        let inner = 4 * dim;
        Ok(Self {
            proj: Linear::new(vb.pp("net.0.proj"), dim, 2 * inner, true)?,
            out: Linear::new(vb.pp("net.2"), inner, dim, true)?,
            inner,
        })
    }

    /// `(..., dim)` -> `(..., dim)`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let p = self.proj.forward(xs)?;
        debug_assert_eq!(p.dim(p.rank() - 1)?, 2 * self.inner);
        // One fused node on the CPU (the widest activations of the block), composed elsewhere.
        self.out.forward(&nn::fused::geglu(&p)?)
    }
}

/// diffusers `BasicTransformerBlock` (layer norms, self-attention, cross-attention, GEGLU).
#[derive(Debug, Clone)]
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
    attn2_name: String,
}

impl BasicTransformerBlock {
    /// `name` is the block's path inside the UNet (used to match capture requests).
    pub fn new(
        vb: VarBuilder,
        name: String,
        dim: usize,
        heads: usize,
        dim_head: usize,
        context_dim: usize,
    ) -> Result<Self> {
        Ok(Self {
            norm1: LayerNorm::new(vb.pp("norm1"), dim, 1e-5)?,
            attn1: Attention::new(vb.pp("attn1"), dim, None, heads, dim_head)?,
            norm2: LayerNorm::new(vb.pp("norm2"), dim, 1e-5)?,
            attn2: Attention::new(vb.pp("attn2"), dim, Some(context_dim), heads, dim_head)?,
            norm3: LayerNorm::new(vb.pp("norm3"), dim, 1e-5)?,
            ff: FeedForward::new(vb.pp("ff"), dim)?,
            attn2_name: format!("{name}.attn2"),
        })
    }

    /// `x: (b, n, dim)`, `context: (b, m, context_dim)`.
    pub(crate) fn forward(
        &self,
        xs: &Tensor,
        context: &Tensor,
        cap: &mut CaptureState,
    ) -> Result<Tensor> {
        let (a, _) = self.attn1.forward(&self.norm1.forward(xs)?, None, false)?;
        let xs = (a + xs)?;
        let want = cap.spec.matches(&self.attn2_name);
        let (a, probs) = self
            .attn2
            .forward(&self.norm2.forward(&xs)?, Some(context), want)?;
        if let Some(probs) = probs {
            cap.maps.push(CapturedAttention {
                layer: self.attn2_name.clone(),
                probs,
            });
        }
        let xs = (a + xs)?;
        self.ff.forward(&self.norm3.forward(&xs)?)? + xs
    }
}

/// `proj_in` / `proj_out`: 1x1 convolution (SD 1.x) or Linear (`use_linear_projection`).
#[derive(Debug, Clone)]
enum Proj {
    Conv(Conv2d),
    Linear(Linear),
}

impl Proj {
    fn new(vb: VarBuilder, cin: usize, cout: usize, linear: bool) -> Result<Self> {
        Ok(if linear {
            Proj::Linear(Linear::new(vb, cin, cout, true)?)
        } else {
            Proj::Conv(Conv2d::new(
                vb,
                cin,
                cout,
                1,
                Conv2dConfig::default(),
                true,
            )?)
        })
    }
}

/// diffusers `Transformer2DModel` for continuous `(N, C, H, W)` input.
#[derive(Debug, Clone)]
pub struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Proj,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Proj,
}

impl Transformer2DModel {
    /// `name` is the module's path inside the UNet, e.g. `down_blocks.1.attentions.0`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vb: VarBuilder,
        name: &str,
        in_channels: usize,
        heads: usize,
        num_layers: usize,
        context_dim: usize,
        groups: usize,
        use_linear_projection: bool,
    ) -> Result<Self> {
        let dim_head = in_channels / heads;
        let inner = heads * dim_head;
        let norm = GroupNorm::new(vb.pp("norm"), groups, in_channels, 1e-6, true)?;
        let proj_in = Proj::new(vb.pp("proj_in"), in_channels, inner, use_linear_projection)?;
        let blocks = (0..num_layers)
            .map(|i| {
                BasicTransformerBlock::new(
                    vb.pp(format!("transformer_blocks.{i}")),
                    format!("{name}.transformer_blocks.{i}"),
                    inner,
                    heads,
                    dim_head,
                    context_dim,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let proj_out = Proj::new(vb.pp("proj_out"), inner, in_channels, use_linear_projection)?;
        Ok(Self {
            norm,
            proj_in,
            blocks,
            proj_out,
        })
    }

    /// `x: (N, C, H, W)`, `context: (N, tokens, context_dim)` -> `(N, C, H, W)`.
    pub(crate) fn forward(
        &self,
        xs: &Tensor,
        context: &Tensor,
        cap: &mut CaptureState,
    ) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let normed = self.norm.forward(xs)?;
        let mut t = match &self.proj_in {
            Proj::Conv(conv) => {
                let y = conv.forward(&normed)?;
                let inner = y.dim(1)?;
                y.permute((0, 2, 3, 1))?.reshape((b, h * w, inner))?
            }
            Proj::Linear(lin) => {
                lin.forward(&normed.permute((0, 2, 3, 1))?.reshape((b, h * w, c))?)?
            }
        };
        for block in &self.blocks {
            t = block.forward(&t, context, cap)?;
        }
        let inner = t.dim(2)?;
        let out = match &self.proj_out {
            Proj::Conv(conv) => conv.forward(
                &t.reshape((b, h, w, inner))?
                    .permute((0, 3, 1, 2))?
                    .contiguous()?,
            )?,
            Proj::Linear(lin) => lin
                .forward(&t)?
                .reshape((b, h, w, c))?
                .permute((0, 3, 1, 2))?
                .contiguous()?,
        };
        out + xs
    }
}
