//! Differentiable normalisation layers: LayerNorm, GroupNorm and Llama-style RMSNorm.
//!
//! candle 0.11's fused `candle_nn::ops::layer_norm` / `rms_norm` (and the `LayerNorm` /
//! `RmsNorm` modules using them) drop gradients silently; these are written with primitive ops
//! instead. Statistics are computed in f32 (f64 stays f64) and the result is cast back to the
//! input dtype, so the layers work in f32, f16 and bf16.

use candle_core::{Result, Tensor, D};
use candle_nn::{Init, VarBuilder};

use crate::compute_dtype;

/// Functional layer norm over the last dimension: `(x - mean) / sqrt(var + eps) * w + b`
/// (biased variance, as PyTorch). `weight` / `bias` have the size of the last dimension.
pub fn layer_norm(
    xs: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    if crate::fused::use_fused(xs) {
        return crate::fused::layer_norm_fused(xs, weight, bias, eps);
    }
    layer_norm_composed(xs, weight, bias, eps)
}

/// [`layer_norm`] from candle primitives (any device; the reference for the fused kernel).
pub fn layer_norm_composed(
    xs: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    let dtype = xs.dtype();
    let cdt = compute_dtype(dtype);
    let x = xs.to_dtype(cdt)?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let mut y = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    if let Some(w) = weight {
        y = y.broadcast_mul(&w.to_dtype(cdt)?)?;
    }
    if let Some(b) = bias {
        y = y.broadcast_add(&b.to_dtype(cdt)?)?;
    }
    y.to_dtype(dtype)
}

/// Functional Llama / T5 RMS norm exactly as transformers' `LlamaRMSNorm`:
/// `weight * (x_f32 * rsqrt(mean(x_f32^2) + eps)).to(input_dtype)`.
pub fn rms_norm(xs: &Tensor, weight: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    if crate::fused::use_fused(xs) {
        return crate::fused::rms_norm_fused(xs, weight, eps);
    }
    rms_norm_composed(xs, weight, eps)
}

/// [`rms_norm`] from candle primitives (any device; the reference for the fused kernel).
pub fn rms_norm_composed(xs: &Tensor, weight: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let dtype = xs.dtype();
    let x = xs.to_dtype(compute_dtype(dtype))?;
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let y = x.broadcast_div(&(ms + eps)?.sqrt()?)?.to_dtype(dtype)?;
    match weight {
        Some(w) => y.broadcast_mul(&w.to_dtype(dtype)?),
        None => Ok(y),
    }
}

/// Functional group norm for `(N, C, *)` inputs (NCHW images or `(N, C, L)` sequences):
/// channels are split into `num_groups` groups, each normalised over its channels and all
/// spatial positions; `weight` / `bias` have shape `(C,)`.
pub fn group_norm(
    xs: &Tensor,
    num_groups: usize,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    let dims = xs.dims().to_vec();
    if dims.len() < 2 {
        candle_core::bail!("group_norm expects (N, C, *) input, got {:?}", dims)
    }
    let c = dims[1];
    if num_groups == 0 || !c.is_multiple_of(num_groups) {
        candle_core::bail!("group_norm: {c} channels are not divisible into {num_groups} groups")
    }
    if crate::fused::use_fused(xs) {
        return crate::fused::group_norm_fused(xs, num_groups, weight, bias, eps, false);
    }
    group_norm_composed(xs, num_groups, weight, bias, eps)
}

/// [`group_norm`] from candle primitives (any device; the reference for the fused kernel).
pub fn group_norm_composed(
    xs: &Tensor,
    num_groups: usize,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    let dims = xs.dims().to_vec();
    if dims.len() < 2 {
        candle_core::bail!("group_norm expects (N, C, *) input, got {:?}", dims)
    }
    let (n, c) = (dims[0], dims[1]);
    if num_groups == 0 || !c.is_multiple_of(num_groups) {
        candle_core::bail!("group_norm: {c} channels are not divisible into {num_groups} groups")
    }
    let dtype = xs.dtype();
    let cdt = compute_dtype(dtype);
    let x = xs.to_dtype(cdt)?.reshape((n, num_groups, ()))?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xc
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .reshape(dims.as_slice())?;
    let mut param_shape = vec![1usize; dims.len()];
    param_shape[1] = c;
    let mut y = y;
    if let Some(w) = weight {
        y = y.broadcast_mul(&w.to_dtype(cdt)?.reshape(param_shape.as_slice())?)?;
    }
    if let Some(b) = bias {
        y = y.broadcast_add(&b.to_dtype(cdt)?.reshape(param_shape.as_slice())?)?;
    }
    y.to_dtype(dtype)
}

/// `silu(group_norm(x))`, the pair that opens every UNet / VAE resnet block, fused into one
/// kernel on the CPU (composed elsewhere).
pub fn group_norm_silu(
    xs: &Tensor,
    num_groups: usize,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    if crate::fused::use_fused(xs) {
        return crate::fused::group_norm_fused(xs, num_groups, weight, bias, eps, true);
    }
    group_norm_composed(xs, num_groups, weight, bias, eps)?.silu()
}

/// `torch.nn.LayerNorm(size, eps, elementwise_affine)` over the last dimension.
///
/// Tensor names: `weight`, `bias` (both shape `(size,)`).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Option<Tensor>,
    bias: Option<Tensor>,
    eps: f64,
}

impl LayerNorm {
    /// Affine layer norm with `weight` (init 1) and `bias` (init 0).
    pub fn new(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        Self::new_with(vb, size, eps, true, true)
    }

    /// Layer norm with optional `weight` (elementwise affine) and optional `bias`.
    pub fn new_with(
        vb: VarBuilder,
        size: usize,
        eps: f64,
        affine: bool,
        bias: bool,
    ) -> Result<Self> {
        let weight = if affine {
            Some(vb.get_with_hints(size, "weight", Init::Const(1.))?)
        } else {
            None
        };
        let bias = if affine && bias {
            Some(vb.get_with_hints(size, "bias", Init::Const(0.))?)
        } else {
            None
        };
        Ok(Self { weight, bias, eps })
    }

    /// Builds the layer from existing tensors.
    pub fn from_tensors(weight: Option<Tensor>, bias: Option<Tensor>, eps: f64) -> Self {
        Self { weight, bias, eps }
    }

    /// Normalises over the last dimension.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        layer_norm(xs, self.weight.as_ref(), self.bias.as_ref(), self.eps)
    }

    /// The scale parameter, if affine.
    pub fn weight(&self) -> Option<&Tensor> {
        self.weight.as_ref()
    }

    /// The shift parameter, if present.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

impl candle_core::Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        LayerNorm::forward(self, xs)
    }
}

/// `torch.nn.GroupNorm(num_groups, num_channels, eps, affine)` for `(N, C, *)` inputs.
///
/// Tensor names: `weight`, `bias` (both shape `(num_channels,)`).
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Option<Tensor>,
    bias: Option<Tensor>,
    num_groups: usize,
    eps: f64,
}

impl GroupNorm {
    /// Builds the layer; `affine` adds `weight` (init 1) and `bias` (init 0).
    pub fn new(
        vb: VarBuilder,
        num_groups: usize,
        num_channels: usize,
        eps: f64,
        affine: bool,
    ) -> Result<Self> {
        if num_groups == 0 || !num_channels.is_multiple_of(num_groups) {
            candle_core::bail!(
                "GroupNorm `{}`: {num_channels} channels are not divisible into {num_groups} groups",
                vb.prefix()
            )
        }
        let (weight, bias) = if affine {
            (
                Some(vb.get_with_hints(num_channels, "weight", Init::Const(1.))?),
                Some(vb.get_with_hints(num_channels, "bias", Init::Const(0.))?),
            )
        } else {
            (None, None)
        };
        Ok(Self {
            weight,
            bias,
            num_groups,
            eps,
        })
    }

    /// Normalises each group over its channels and all positions.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        group_norm(
            xs,
            self.num_groups,
            self.weight.as_ref(),
            self.bias.as_ref(),
            self.eps,
        )
    }

    /// `silu(self.forward(xs))` in one fused kernel on the CPU.
    pub fn forward_silu(&self, xs: &Tensor) -> Result<Tensor> {
        group_norm_silu(
            xs,
            self.num_groups,
            self.weight.as_ref(),
            self.bias.as_ref(),
            self.eps,
        )
    }

    /// The number of groups.
    pub fn num_groups(&self) -> usize {
        self.num_groups
    }
}

impl candle_core::Module for GroupNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        GroupNorm::forward(self, xs)
    }
}

/// Llama-style RMS norm (`LlamaRMSNorm`): `weight * x * rsqrt(mean(x^2) + eps)`, the statistics
/// in f32 for f16 / bf16 inputs.
///
/// Tensor name: `weight` (shape `(size,)`, init 1).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// Builds the layer.
    pub fn new(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        let weight = vb.get_with_hints(size, "weight", Init::Const(1.))?;
        Ok(Self { weight, eps })
    }

    /// Normalises over the last dimension.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        rms_norm(xs, Some(&self.weight), self.eps)
    }

    /// The scale parameter.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

impl candle_core::Module for RmsNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        RmsNorm::forward(self, xs)
    }
}
