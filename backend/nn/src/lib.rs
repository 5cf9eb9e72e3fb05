//! Differentiable tensor layers on candle, weight loading and gradient checks (see ARCHITECTURE).
//!
//! Everything trainable in the project is built from this crate. The layers here are assembled
//! only from candle primitives that have a backward pass: candle 0.11's fast fused ops
//! (`candle_nn::ops::softmax_last_dim`, `layer_norm`, `rms_norm`, `rotary_emb::rope*`) run
//! their backward as a silent no-op, so parameters upstream of them never learn. See
//! `docs/NN.md` and the `candle_trap_*` tests.
//!
//! * [`layers`]: [`Linear`], [`Embedding`], [`Conv2d`].
//! * [`conv`]: [`conv::conv2d`], a fast CPU convolution (im2col + gemm) with a fast backward,
//!   used by [`Conv2d`]; candle's conv2d elsewhere (CUDA, groups, dilation).
//! * [`norm`]: [`LayerNorm`], [`GroupNorm`], [`RmsNorm`] (computed in f32, cast back).
//! * [`ops`]: [`softmax_last_dim`], [`log_softmax_last_dim`], [`Activation`] and the
//!   individual activation functions.
//! * [`attention`]: [`scaled_dot_product_attention`] that can return its probabilities.
//! * [`rotary`]: [`RotaryEmbedding`] (Llama rotate-half convention, KV-cache offsets).
//! * [`weights`]: [`Weights`], a safetensors / torch-pickle loader usable as a `VarBuilder`.
//! * [`optim`]: in-place [`AdamW`] (PyTorch semantics, checkpointable), [`clip_grad_norm`], [`Ema`].
//! * [`mod@gradcheck`]: finite-difference gradient checks and "every parameter gets a gradient".

pub mod alloc;
pub mod attention;
pub mod conv;
pub mod device;
pub mod fused;
pub mod gradcheck;
pub mod layers;
pub mod norm;
pub mod ops;
pub mod optim;
pub mod rotary;
mod sgemm;
pub mod weights;

pub use alloc::retain_freed_memory;
pub use attention::{
    causal_mask, merge_heads, padding_mask, repeat_kv, scaled_dot_product_attention, split_heads,
    AttentionOutput, SdpaOptions,
};
pub use device::{
    join_cpu_pool, on_cpu_pool, on_shared_cores, parse_device, pin_cpu_threads, share_cpu_cores,
};
pub use gradcheck::{
    check_all_vars_get_gradient, gradcheck, vars_without_gradient, weighted_sum_loss,
    GradCheckOptions, GradCheckReport,
};
pub use layers::{Conv2d, Conv2dConfig, Embedding, Linear};
pub use norm::{group_norm, group_norm_silu, layer_norm, rms_norm, GroupNorm, LayerNorm, RmsNorm};
pub use ops::{
    gelu, gelu_tanh, log_softmax_last_dim, matmul, mse, quick_gelu, relu, sigmoid, silu,
    softmax_last_dim, Activation,
};
pub use optim::{clip_grad_norm, AdamW, Ema};
pub use rotary::RotaryEmbedding;
pub use weights::{Weights, WeightsError};

/// Re-exported so that users of this crate name the same candle types.
pub use candle_core;
/// Re-exported so that users of this crate name the same candle-nn types.
pub use candle_nn;

/// The float dtype that norms and softmax compute in: f64 stays f64 (for gradient checks),
/// everything else (f32, f16, bf16) is computed in f32.
pub(crate) fn compute_dtype(dtype: candle_core::DType) -> candle_core::DType {
    match dtype {
        candle_core::DType::F64 => candle_core::DType::F64,
        _ => candle_core::DType::F32,
    }
}
