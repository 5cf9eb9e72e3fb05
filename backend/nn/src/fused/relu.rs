//! ReLU as one node whose backward is one threaded pass. candle's ReLU backward builds the
//! mask from five element-wise ops (zeros, compare, cast, multiply, and the gradient store's
//! add), each a full pass over the activation; the OPT MLP's `(batch, tokens, ffn)` activation
//! is the largest tensor of a stage-2 step after attention. The same arithmetic as candle's
//! (`max(x, 0)` forward, `g * [x >= 0]` backward), so the same bits.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{tensor_of, with_slice, KernelFloat};

/// Elements per rayon task.
const CHUNK: usize = 16_384;

#[derive(Debug, Clone, Copy)]
struct ReluOp;

fn forward<T: KernelFloat>(x: &[T]) -> Vec<T> {
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(y, x)| {
            y.iter_mut()
                .zip(x)
                .for_each(|(y, &x)| *y = num_traits::Float::max(x, T::zero()))
        });
    y
}

fn backward<T: KernelFloat>(x: &[T], g: &[T]) -> Vec<T> {
    let mut dx = vec![T::zero(); x.len()];
    dx.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
        .for_each(|(dx, (x, g))| {
            for ((d, &x), &g) in dx.iter_mut().zip(x).zip(g) {
                // A multiply, not a select, as candle does: an infinite or NaN gradient at
                // x < 0 stays NaN rather than becoming 0.
                *d = g * if x >= T::zero() { T::one() } else { T::zero() };
            }
        });
    dx
}

impl CustomOp1 for ReluOp {
    fn name(&self) -> &'static str {
        "nn-relu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match s {
            CpuStorage::F32(_) => f32::storage(forward(f32::slice(s, l)?)),
            CpuStorage::F64(_) => f64::storage(forward(f64::slice(s, l)?)),
            _ => candle_core::bail!("nn-relu: f32 or f64 input expected"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        macro_rules! run {
            ($t:ty) => {
                tensor_of(
                    with_slice::<$t, _>(x, |x| with_slice::<$t, _>(grad, |g| Ok(backward(x, g))))?,
                    x.dims(),
                )?
            };
        }
        let dx = match x.dtype() {
            candle_core::DType::F64 => run!(f64),
            _ => run!(f32),
        };
        Ok(Some(dx))
    }
}

/// `max(x, 0)` as one node (f32 / f64 CPU tensors).
pub fn relu_fused(xs: &Tensor) -> Result<Tensor> {
    xs.contiguous()?.apply_op1(ReluOp)
}
