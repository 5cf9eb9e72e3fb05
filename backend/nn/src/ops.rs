//! Differentiable softmax and activation functions.
//!
//! All functions here are built from candle primitives whose backward pass is implemented
//! (unlike `candle_nn::ops::softmax_last_dim`, whose gradient is silently dropped).

use candle_core::{DType, Result, Tensor, D};

use crate::compute_dtype;

/// Numerically stable softmax over the last dimension, differentiable.
///
/// Computes `exp(x - max(x)) / sum(exp(x - max(x)))` in f32 (f64 stays f64) and casts back to
/// the input dtype. The subtracted maximum is detached: softmax is shift invariant, so this does
/// not change the gradient. Rows that are entirely `-inf` give NaN, as in PyTorch.
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    let dtype = xs.dtype();
    if crate::fused::use_fused(xs) {
        return crate::fused::softmax_fused(xs, 1.0, Default::default(), false)?.to_dtype(dtype);
    }
    softmax_last_dim_composed(xs)
}

/// [`softmax_last_dim`] from candle primitives (any device; the reference for the fused kernel).
pub fn softmax_last_dim_composed(xs: &Tensor) -> Result<Tensor> {
    let dtype = xs.dtype();
    let x = xs.to_dtype(compute_dtype(dtype))?;
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&s)?.to_dtype(dtype)
}

/// Numerically stable log-softmax over the last dimension, differentiable (computed in f32).
pub fn log_softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    let dtype = xs.dtype();
    if crate::fused::use_fused(xs) {
        return crate::fused::softmax_fused(xs, 1.0, Default::default(), true)?.to_dtype(dtype);
    }
    log_softmax_last_dim_composed(xs)
}

/// [`log_softmax_last_dim`] from candle primitives (the reference for the fused kernel).
pub fn log_softmax_last_dim_composed(xs: &Tensor) -> Result<Tensor> {
    let dtype = xs.dtype();
    let x = xs.to_dtype(compute_dtype(dtype))?;
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)?.to_dtype(dtype)
}

/// Exact GELU, `0.5 x (1 + erf(x / sqrt 2))` (PyTorch's default `nn.GELU()`).
pub fn gelu(xs: &Tensor) -> Result<Tensor> {
    xs.gelu_erf()
}

/// GELU with the tanh approximation (`gelu_new`, `gelu_pytorch_tanh`, `approximate="tanh"`).
pub fn gelu_tanh(xs: &Tensor) -> Result<Tensor> {
    xs.gelu()
}

/// Logistic sigmoid `1 / (1 + exp(-x))` with a stable backward (`s (1 - s)`).
pub fn sigmoid(xs: &Tensor) -> Result<Tensor> {
    // candle_nn's sigmoid is a custom op that does implement `bwd`; the gradient tests check it.
    candle_nn::ops::sigmoid(xs)
}

/// Quick-GELU as in OpenAI CLIP: `x * sigmoid(1.702 x)`.
pub fn quick_gelu(xs: &Tensor) -> Result<Tensor> {
    xs.mul(&sigmoid(&(xs * 1.702)?)?)
}

/// SiLU / swish: `x * sigmoid(x)`.
pub fn silu(xs: &Tensor) -> Result<Tensor> {
    xs.silu()
}

/// ReLU: `max(x, 0)`.
pub fn relu(xs: &Tensor) -> Result<Tensor> {
    if crate::fused::use_fused(xs) && matches!(xs.dtype(), DType::F32 | DType::F64) {
        return crate::fused::relu_fused(xs);
    }
    xs.relu()
}

/// An activation function chosen by configuration (`hidden_act` / `act_fn` in HF configs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Activation {
    /// Exact erf GELU (`"gelu"`).
    Gelu,
    /// Tanh-approximated GELU (`"gelu_new"`, `"gelu_pytorch_tanh"`, `"gelu_fast"`).
    GeluTanh,
    /// `x * sigmoid(1.702 x)` (`"quick_gelu"`, CLIP).
    QuickGelu,
    /// `x * sigmoid(x)` (`"silu"`, `"swish"`, Llama, UNet).
    Silu,
    /// `max(x, 0)` (`"relu"`, OPT).
    Relu,
    /// The identity (`"linear"`, `"identity"`).
    Identity,
}

impl Activation {
    /// Applies the activation.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Gelu => gelu(xs),
            Self::GeluTanh => gelu_tanh(xs),
            Self::QuickGelu => quick_gelu(xs),
            Self::Silu => silu(xs),
            Self::Relu => relu(xs),
            Self::Identity => Ok(xs.clone()),
        }
    }

    /// Parses the activation names used by transformers / diffusers configs.
    pub fn from_config_name(name: &str) -> Option<Self> {
        Some(match name {
            "gelu" => Self::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" | "gelu-approximate" => Self::GeluTanh,
            "quick_gelu" => Self::QuickGelu,
            "silu" | "swish" => Self::Silu,
            "relu" => Self::Relu,
            "linear" | "identity" => Self::Identity,
            _ => return None,
        })
    }
}

impl std::str::FromStr for Activation {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Self::from_config_name(s).ok_or_else(|| format!("unknown activation `{s}`"))
    }
}

impl candle_core::Module for Activation {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Activation::forward(self, xs)
    }
}

/// Mean squared error `mean((a - b)^2)`, differentiable in both arguments.
pub fn mse(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.sub(b)?.sqr()?.mean_all()
}

/// True for bf16 on the CPU, where candle 0.11's gemm / conv kernels have no bf16 support:
/// those products are computed in f32 and cast back (see [`matmul`]).
pub(crate) fn needs_f32_kernel(t: &Tensor) -> bool {
    t.dtype() == DType::BF16 && t.device().is_cpu()
}

/// `a.matmul(b)` that also works for bf16 on the CPU (computed in f32 there, cast back).
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if needs_f32_kernel(a) {
        a.to_dtype(DType::F32)?
            .matmul(&b.to_dtype(DType::F32)?)?
            .to_dtype(DType::BF16)
    } else {
        a.matmul(b)
    }
}
