//! Parameterised layers: Linear, Embedding and Conv2d, with PyTorch tensor names.
//!
//! The forward passes use only matmul / broadcast / index-select / conv2d, all of which have a
//! backward pass in candle 0.11 (checked by finite differences in `tests/grad.rs`). On the CPU,
//! `Conv2d` runs [`crate::conv`]'s custom op, whose backward is much faster than candle's
//! (checked in `tests/conv.rs`).
//! Built from a `VarMap`-backed `VarBuilder` the parameters are trainable `Var`s initialised as
//! PyTorch does; built from [`crate::Weights`] they are frozen tensors.

use candle_core::{DType, Result, Tensor, D};
use candle_nn::{Init, VarBuilder};

/// `torch.nn.Linear(in, out, bias)`: `y = x W^T + b` on the last dimension of any-rank input.
///
/// Tensor names: `weight` `(out, in)`, `bias` `(out,)`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// Builds the layer; initialisation (for a `VarMap`) is PyTorch's: kaiming-uniform weight,
    /// bias uniform in `±1/sqrt(in)`.
    pub fn new(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = vb.get_with_hints(
            (out_dim, in_dim),
            "weight",
            candle_nn::init::DEFAULT_KAIMING_UNIFORM,
        )?;
        let bias = if bias {
            let bound = 1. / (in_dim as f64).sqrt();
            Some(vb.get_with_hints(
                out_dim,
                "bias",
                Init::Uniform {
                    lo: -bound,
                    up: bound,
                },
            )?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    /// Builds the layer from existing tensors (`weight` is `(out, in)`).
    pub fn from_tensors(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// Applies the layer to `(..., in)` and returns `(..., out)`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        // CPU: one fused node (f16 / bf16 computed in f32 inside it). A handful of rows (LLM
        // decoding: one token) is a few matrix-vector products, streamed by the fused op in
        // f32 / f64; in f16 / bf16 they stay on candle's matmul, as converting the weight to f32
        // on every call would cost more than the product.
        let rows = xs.elem_count() / xs.dims().last().copied().unwrap_or(1).max(1);
        let same_kernel_dtype = matches!(
            (xs.dtype(), self.weight.dtype()),
            (DType::F32, DType::F32) | (DType::F64, DType::F64)
        );
        if crate::fused::use_fused(xs) && (rows >= 16 || same_kernel_dtype) {
            return crate::fused::linear_fused(xs, &self.weight, self.bias.as_ref());
        }
        self.forward_composed(xs)
    }

    /// The composed path (matmul + broadcast add): every device; the reference the fused
    /// CPU op is tested against.
    pub fn forward_composed(&self, xs: &Tensor) -> Result<Tensor> {
        let dims = xs.dims();
        let in_dim = *dims
            .last()
            .ok_or_else(|| candle_core::Error::msg("Linear on a scalar"))?;
        let lead: Vec<usize> = dims[..dims.len() - 1].to_vec();
        let x2 = xs.reshape(((), in_dim))?;
        let w = self.weight.to_dtype(xs.dtype())?;
        let mut y = crate::ops::matmul(&x2, &w.t()?)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(&b.to_dtype(xs.dtype())?)?;
        }
        let mut out_shape = lead;
        out_shape.push(self.weight.dim(0)?);
        y.reshape(out_shape)
    }

    /// The `(out, in)` weight.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The `(out,)` bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

impl candle_core::Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Linear::forward(self, xs)
    }
}

/// `torch.nn.Embedding(num, dim)`: looks rows up by integer id (any integer dtype, any shape).
///
/// Tensor name: `weight` `(num, dim)` (init: standard normal, as PyTorch).
#[derive(Debug, Clone)]
pub struct Embedding {
    weight: Tensor,
}

impl Embedding {
    /// Builds the layer.
    pub fn new(vb: VarBuilder, num_embeddings: usize, dim: usize) -> Result<Self> {
        let weight = vb.get_with_hints(
            (num_embeddings, dim),
            "weight",
            Init::Randn {
                mean: 0.,
                stdev: 1.,
            },
        )?;
        Ok(Self { weight })
    }

    /// Builds the layer from an existing `(num, dim)` table.
    pub fn from_tensors(weight: Tensor) -> Self {
        Self { weight }
    }

    /// Maps ids of shape `S` to embeddings of shape `S + (dim,)`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let mut shape = ids.dims().to_vec();
        shape.push(self.weight.dim(D::Minus1)?);
        self.weight
            .index_select(&ids.flatten_all()?, 0)?
            .reshape(shape)
    }

    /// The `(num, dim)` table.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

impl candle_core::Module for Embedding {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Embedding::forward(self, xs)
    }
}

/// Hyper-parameters of a 2-D convolution (PyTorch semantics, symmetric padding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dConfig {
    /// Zero padding on each side.
    pub padding: usize,
    /// Stride.
    pub stride: usize,
    /// Dilation.
    pub dilation: usize,
    /// Number of channel groups.
    pub groups: usize,
}

impl Default for Conv2dConfig {
    fn default() -> Self {
        Self {
            padding: 0,
            stride: 1,
            dilation: 1,
            groups: 1,
        }
    }
}

/// `torch.nn.Conv2d(in, out, kernel, stride, padding, dilation, groups, bias)` on NCHW input.
///
/// Tensor names: `weight` `(out, in / groups, k, k)`, `bias` `(out,)`.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    config: Conv2dConfig,
}

impl Conv2d {
    /// Builds a square-kernel convolution with PyTorch's default initialisation.
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        kernel_size: usize,
        config: Conv2dConfig,
        bias: bool,
    ) -> Result<Self> {
        if config.groups == 0 || !in_channels.is_multiple_of(config.groups) {
            candle_core::bail!(
                "Conv2d `{}`: {in_channels} input channels not divisible by {} groups",
                vb.prefix(),
                config.groups
            )
        }
        let per_group = in_channels / config.groups;
        let weight = vb.get_with_hints(
            (out_channels, per_group, kernel_size, kernel_size),
            "weight",
            candle_nn::init::DEFAULT_KAIMING_UNIFORM,
        )?;
        let bias = if bias {
            let bound = 1. / ((per_group * kernel_size * kernel_size) as f64).sqrt();
            Some(vb.get_with_hints(
                out_channels,
                "bias",
                Init::Uniform {
                    lo: -bound,
                    up: bound,
                },
            )?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            config,
        })
    }

    /// Builds the layer from existing tensors.
    pub fn from_tensors(weight: Tensor, bias: Option<Tensor>, config: Conv2dConfig) -> Self {
        Self {
            weight,
            bias,
            config,
        }
    }

    /// Applies the convolution to `(N, C_in, H, W)`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let w = self.weight.to_dtype(xs.dtype())?;
        if crate::conv::uses_fast_path(xs, c) {
            // CPU: the fast op (f16 / bf16 computed in f32 inside it), with the bias fused in
            // unless the fused kernels are switched off for an A/B run.
            return match &self.bias {
                Some(b) if crate::fused::use_fused(xs) => {
                    crate::conv::conv2d_bias(xs, &w, Some(b), c)
                }
                Some(b) => {
                    let y = crate::conv::conv2d_with(xs, &w, c)?;
                    y.broadcast_add(&b.to_dtype(xs.dtype())?.reshape((1, (), 1, 1))?)
                }
                None => crate::conv::conv2d_with(xs, &w, c),
            };
        }
        let y = if crate::ops::needs_f32_kernel(xs) {
            xs.to_dtype(DType::F32)?
                .conv2d(
                    &w.to_dtype(DType::F32)?,
                    c.padding,
                    c.stride,
                    c.dilation,
                    c.groups,
                )?
                .to_dtype(DType::BF16)?
        } else {
            xs.conv2d(&w, c.padding, c.stride, c.dilation, c.groups)?
        };
        match &self.bias {
            Some(b) if crate::fused::use_fused(&y) => crate::fused::channel_bias_fused(&y, b),
            Some(b) => {
                let b = b.to_dtype(xs.dtype())?.reshape((1, (), 1, 1))?;
                y.broadcast_add(&b)
            }
            None => Ok(y),
        }
    }

    /// The `(out, in / groups, k, k)` kernel.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The `(out,)` bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The convolution hyper-parameters.
    pub fn config(&self) -> &Conv2dConfig {
        &self.config
    }
}

impl candle_core::Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Conv2d::forward(self, xs)
    }
}
