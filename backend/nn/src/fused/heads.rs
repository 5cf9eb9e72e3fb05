//! Attention's head split `(b, s, heads * d) -> (b, heads, s, d)` and merge (the inverse) as
//! one graph node each. Composed from candle primitives each is a reshape, a transpose and a
//! copy: three nodes the size of the activation, and the backward pass zero-fills and adds a
//! gradient for every node. Pure copies, so the values (and their gradients) are the same bits.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{tensor_of, with_slice, KernelFloat};

#[derive(Debug, Clone, Copy)]
struct HeadsOp {
    heads: usize,
    /// `true`: split `(b, s, h * d) -> (b, h, s, d)`; `false`: merge, the inverse.
    split: bool,
}

/// `(b, s, h, d)` of the split layout, from either side's shape.
fn sizes(op: HeadsOp, dims: &[usize]) -> Result<(usize, usize, usize, usize)> {
    match (op.split, dims) {
        (true, &[b, s, hd]) => {
            if op.heads == 0 || !hd.is_multiple_of(op.heads) {
                candle_core::bail!(
                    "split_heads: width {hd} not divisible by {} heads",
                    op.heads
                )
            }
            Ok((b, s, op.heads, hd / op.heads))
        }
        (false, &[b, h, s, d]) => Ok((b, s, h, d)),
        _ => candle_core::bail!(
            "{}: unexpected shape {dims:?}",
            if op.split {
                "split_heads"
            } else {
                "merge_heads"
            }
        ),
    }
}

/// Copies between the two layouts: `split` reads `(b, s, h, d)` and writes `(b, h, s, d)`;
/// otherwise the reverse. Each task writes one `(b, h)` block (split) or one `(b, s)` row.
fn permute<T: KernelFloat>(
    x: &[T],
    (_, s, h, d): (usize, usize, usize, usize),
    split: bool,
) -> Vec<T> {
    let mut y = vec![T::zero(); x.len()];
    if x.is_empty() {
        return y;
    }
    if split {
        y.par_chunks_mut(s * d).enumerate().for_each(|(bh, block)| {
            let (bi, hi) = (bh / h, bh % h);
            for (si, out) in block.chunks_exact_mut(d).enumerate() {
                let at = ((bi * s + si) * h + hi) * d;
                out.copy_from_slice(&x[at..at + d]);
            }
        });
    } else {
        y.par_chunks_mut(h * d).enumerate().for_each(|(bs, row)| {
            let (bi, si) = (bs / s, bs % s);
            for (hi, out) in row.chunks_exact_mut(d).enumerate() {
                let at = ((bi * h + hi) * s + si) * d;
                out.copy_from_slice(&x[at..at + d]);
            }
        });
    }
    y
}

impl HeadsOp {
    fn out_dims(self, (b, s, h, d): (usize, usize, usize, usize)) -> Vec<usize> {
        if self.split {
            vec![b, h, s, d]
        } else {
            vec![b, s, h * d]
        }
    }
}

impl CustomOp1 for HeadsOp {
    fn name(&self) -> &'static str {
        if self.split {
            "nn-split-heads"
        } else {
            "nn-merge-heads"
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = sizes(*self, l.dims())?;
        let out = match s {
            CpuStorage::F32(_) => f32::storage(permute(f32::slice(s, l)?, dims, self.split)),
            CpuStorage::F64(_) => f64::storage(permute(f64::slice(s, l)?, dims, self.split)),
            _ => candle_core::bail!("{}: f32 or f64 input expected", self.name()),
        };
        Ok((out, Shape::from(self.out_dims(dims))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // The gradient goes back through the inverse copy.
        let dims = sizes(*self, x.dims())?;
        let back = !self.split;
        let g = match x.dtype() {
            candle_core::DType::F64 => tensor_of(
                with_slice::<f64, _>(grad, |g| Ok(permute(g, dims, back)))?,
                x.dims(),
            )?,
            _ => tensor_of(
                with_slice::<f32, _>(grad, |g| Ok(permute(g, dims, back)))?,
                x.dims(),
            )?,
        };
        Ok(Some(g))
    }
}

/// `(b, s, heads * d) -> (b, heads, s, d)`, contiguous, as one node (f32 / f64 CPU tensors).
pub fn split_heads_fused(xs: &Tensor, heads: usize) -> Result<Tensor> {
    xs.contiguous()?.apply_op1(HeadsOp { heads, split: true })
}

/// `(b, heads, s, d) -> (b, s, heads * d)`, as one node (f32 / f64 CPU tensors).
pub fn merge_heads_fused(xs: &Tensor) -> Result<Tensor> {
    let heads = xs.dims4()?.1;
    xs.contiguous()?.apply_op1(HeadsOp {
        heads,
        split: false,
    })
}
