//! Fused CPU kernels with a backward pass, as candle custom ops.
//!
//! The composed layers in [`crate::norm`], [`crate::ops`] and [`crate::attention`] are built from
//! 6-10 candle primitives each, every one a fresh allocation and most single-threaded; on small
//! training tensors that per-op cost dominates a step. The ops here do the same maths in one
//! threaded pass forward and one backward (candle's autograd calls [`candle_core::CustomOp1::bwd`]
//! and friends), for f32 and f64 on the CPU. The layers pick them through [`use_fused`]: other
//! devices keep the composed path, so nothing becomes CPU-only, and f16 / bf16 inputs are cast to
//! f32 around the op (the composed path computes in f32 as well).
//!
//! Every kernel is checked against finite differences in f64 and against the composed op in f32
//! (`tests/fused.rs`).

pub mod bias;
pub mod bmm;
pub mod geglu;
pub mod heads;
pub mod linear;
pub mod norm;
pub mod relu;
pub mod sdpa;
pub mod softmax;
pub mod vexp;

use candle_core::{CpuStorage, DType, Layout, Result, Storage, Tensor};
use num_traits::Float;

pub use bias::channel_bias_fused;
pub use bmm::{batched_matmul, Transpose};
pub use geglu::{geglu, geglu_composed, geglu_fused};
pub use heads::{merge_heads_fused, split_heads_fused};
pub use linear::linear_fused;
pub use norm::{group_norm_fused, layer_norm_fused, rms_norm_fused};
pub use relu::relu_fused;
pub use sdpa::attention_fused;
pub use softmax::{softmax_fused, SoftmaxMask};

/// Whether a tensor of this device / dtype goes through the fused CPU kernels.
///
/// `STORYGPT_NN_FUSED=0` turns them off (for A/B benchmarks against the composed path).
pub fn use_fused(t: &Tensor) -> bool {
    t.device().is_cpu()
        && matches!(
            t.dtype(),
            DType::F32 | DType::F64 | DType::F16 | DType::BF16
        )
        && fused_enabled()
}

fn fused_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("STORYGPT_NN_FUSED").map_or(true, |v| v != "0"))
}

/// The dtype a fused kernel computes in: f64 stays f64, every other float is computed in f32.
pub(crate) fn kernel_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Float types the kernels are written for (f32 in production, f64 for gradient checks).
pub(crate) trait KernelFloat:
    Float
    + candle_core::WithDType
    + Send
    + Sync
    + std::iter::Sum
    + std::ops::AddAssign
    + std::ops::MulAssign
    + 'static
{
    /// Wraps a result vector as candle CPU storage.
    fn storage(v: Vec<Self>) -> CpuStorage;
    /// Borrows the slice of a contiguous storage, honouring the layout's start offset.
    fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [Self]>;
    /// Widens to f64 (accumulators).
    fn wide(self) -> f64;
    /// Converts from f64 (constants, accumulators).
    fn of(v: f64) -> Self {
        Self::from(v).expect("f64 fits in the kernel float")
    }
    /// `xs[i] = xs[i].exp()`, the bits of the scalar `exp` (vectorised for f32).
    fn exp_in_place(xs: &mut [Self]);
}

macro_rules! kernel_float {
    ($t:ty, $variant:ident, $exp:expr) => {
        impl KernelFloat for $t {
            fn wide(self) -> f64 {
                self as f64
            }
            fn exp_in_place(xs: &mut [Self]) {
                ($exp)(xs)
            }
            fn storage(v: Vec<Self>) -> CpuStorage {
                CpuStorage::$variant(v)
            }
            fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [Self]> {
                let CpuStorage::$variant(data) = s else {
                    candle_core::bail!("fused kernel: expected {} storage", stringify!($t))
                };
                let Some((start, end)) = l.contiguous_offsets() else {
                    candle_core::bail!("fused kernel: input is not contiguous")
                };
                Ok(&data[start..end])
            }
        }
    };
}
kernel_float!(f32, F32, vexp::exp_in_place);
kernel_float!(f64, F64, |xs: &mut [f64]| xs
    .iter_mut()
    .for_each(|x| *x = x.exp()));

/// Runs `f` on the contiguous CPU data of `t` (made contiguous first if needed).
pub(crate) fn with_slice<T: KernelFloat, R>(
    t: &Tensor,
    f: impl FnOnce(&[T]) -> Result<R>,
) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => f(T::slice(cpu, layout)?),
        _ => candle_core::bail!("fused kernel: tensor is not on the CPU"),
    }
}

/// Wraps kernel output as a tensor on the CPU.
pub(crate) fn tensor_of<T: KernelFloat>(v: Vec<T>, shape: &[usize]) -> Result<Tensor> {
    Tensor::from_vec(v, shape, &candle_core::Device::Cpu)
}

/// Rows per rayon task: about 16k elements each so scheduling stays cheap, but never so many
/// that some thread is left without work.
pub(crate) fn rows_per_task(rows: usize, row_len: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let fair_share = rows.div_ceil(threads).max(1);
    (16_384 / row_len.max(1)).clamp(1, fair_share)
}

/// Rows per block for a kernel whose blocks also carry partial sums (a row norm's weight and
/// bias gradients): the partition must not depend on the thread count, or neither would the
/// sums' bits (`train all` runs a stage on one thread beside another process, and a bundle
/// must come out the same on any machine). It is the partition [`rows_per_task`] makes for two
/// threads, the count every shipped bundle was trained with.
pub(crate) fn rows_per_partial_sum(rows: usize, row_len: usize) -> usize {
    const SPLIT: usize = 2;
    let share = rows.div_ceil(SPLIT).max(1);
    (16_384 / row_len.max(1)).clamp(1, share)
}
