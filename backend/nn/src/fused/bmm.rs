//! Batched matrix products for attention: `op(a) @ op(b)` over a batch of `(batch x heads)`
//! small matrices, with the transposes expressed as strides (no copies) and a backward pass.
//!
//! candle's CPU matmul walks the batch one entry at a time and splits each small product
//! across threads; for attention's hundreds of `(64 x 8) @ (8 x 77)` products that threading
//! costs more than the maths. Here the batch is split across rayon threads instead and each
//! product runs single-threaded; a batch smaller than the thread count threads each product.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use super::{tensor_of, with_slice, KernelFloat};

/// Whether an operand is used as stored or transposed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transpose {
    /// Used as stored, `(batch, rows, cols)`.
    No,
    /// Used transposed: stored `(batch, cols, rows)`.
    Yes,
}

impl Transpose {
    fn flip(self) -> Self {
        match self {
            Self::No => Self::Yes,
            Self::Yes => Self::No,
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct BmmOp {
    pub(crate) ta: Transpose,
    pub(crate) tb: Transpose,
}

/// `(rows, cols)` of an operand as used, with (row stride, col stride) of its storage.
fn as_used(dims: &[usize], t: Transpose) -> ((usize, usize), (isize, isize)) {
    let (r, c) = (dims[dims.len() - 2], dims[dims.len() - 1]);
    match t {
        Transpose::No => ((r, c), (c as isize, 1)),
        Transpose::Yes => ((c, r), (1, c as isize)),
    }
}

impl BmmOp {
    /// `(batch, m, n, k)`: the batch is every dimension before the last two (equal in both).
    fn shapes(&self, a: &[usize], b: &[usize]) -> Result<(usize, usize, usize, usize)> {
        let rank = a.len();
        if rank < 3 || b.len() != rank || a[..rank - 2] != b[..rank - 2] {
            candle_core::bail!(
                "batched_matmul: expected (batch.., m, k) and (batch.., k, n), got {a:?} and {b:?}"
            )
        }
        let ((m, k), _) = as_used(a, self.ta);
        let ((k2, n), _) = as_used(b, self.tb);
        if k != k2 {
            candle_core::bail!(
                "batched_matmul: inner sizes differ ({a:?} {:?} @ {b:?} {:?})",
                self.ta,
                self.tb
            )
        }
        Ok((a[..rank - 2].iter().product(), m, n, k))
    }

    /// The product's shape: the batch dimensions of `a`, then `(m, n)`.
    fn out_shape(&self, a: &[usize], m: usize, n: usize) -> Shape {
        let mut dims = a[..a.len() - 2].to_vec();
        dims.extend([m, n]);
        Shape::from(dims)
    }

    pub(crate) fn run<T: KernelFloat>(
        &self,
        a: &[T],
        ad: &[usize],
        b: &[T],
        bd: &[usize],
    ) -> Result<(Vec<T>, Shape)> {
        let (batch, m, n, k) = self.shapes(ad, bd)?;
        let (_, (a_rs, a_cs)) = as_used(ad, self.ta);
        let (_, (b_rs, b_cs)) = as_used(bd, self.tb);
        let mut out = vec![T::zero(); batch * m * n];
        if m * n == 0 {
            return Ok((out, self.out_shape(ad, m, n)));
        }
        let threads = rayon::current_num_threads().max(1);
        let product = |dst: &mut [T], i: usize, par: Parallelism| {
            let (ap, bp) = (
                &a[i * m * k..(i + 1) * m * k],
                &b[i * k * n..(i + 1) * k * n],
            );
            // SAFETY: `dst` is an m x n row-major block, `ap` / `bp` hold one batch entry of each
            // operand and the strides address only inside them (checked shapes above).
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    dst.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    ap.as_ptr(),
                    a_cs,
                    a_rs,
                    bp.as_ptr(),
                    b_cs,
                    b_rs,
                    T::zero(),
                    T::one(),
                    false,
                    false,
                    false,
                    par,
                )
            }
        };
        if batch >= threads {
            out.par_chunks_mut(m * n)
                .enumerate()
                .for_each(|(i, dst)| product(dst, i, Parallelism::None));
        } else {
            let par = if threads > 1 {
                Parallelism::Rayon(threads)
            } else {
                Parallelism::None
            };
            out.chunks_mut(m * n)
                .enumerate()
                .for_each(|(i, dst)| product(dst, i, par));
        }
        Ok((out, self.out_shape(ad, m, n)))
    }
}

impl CustomOp2 for BmmOp {
    fn name(&self) -> &'static str {
        "nn-batched-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        match s1 {
            CpuStorage::F32(_) => {
                let (v, s) = self.run(
                    f32::slice(s1, l1)?,
                    l1.dims(),
                    f32::slice(s2, l2)?,
                    l2.dims(),
                )?;
                Ok((f32::storage(v), s))
            }
            CpuStorage::F64(_) => {
                let (v, s) = self.run(
                    f64::slice(s1, l1)?,
                    l1.dims(),
                    f64::slice(s2, l2)?,
                    l2.dims(),
                )?;
                Ok((f64::storage(v), s))
            }
            _ => candle_core::bail!("nn-batched-matmul: f32 or f64 operands expected"),
        }
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        use Transpose::{No, Yes};
        let g = g.contiguous()?;
        // C = op(A) op(B). Each gradient is again one batched product of stored operands.
        let da = match self.ta {
            No => bmm_raw(&g, b, No, self.tb.flip())?,
            Yes => bmm_raw(b, &g, self.tb, Yes)?,
        };
        let db = match self.tb {
            No => bmm_raw(a, &g, self.ta.flip(), No)?,
            Yes => bmm_raw(&g, a, Yes, self.ta)?,
        };
        Ok((Some(da), Some(db)))
    }
}

/// The product without a graph node (used by the backward pass).
pub(crate) fn bmm_raw(a: &Tensor, b: &Tensor, ta: Transpose, tb: Transpose) -> Result<Tensor> {
    let op = BmmOp { ta, tb };
    macro_rules! run {
        ($t:ty) => {{
            let (v, s) = with_slice::<$t, _>(a, |av| {
                with_slice::<$t, _>(b, |bv| op.run(av, a.dims(), bv, b.dims()))
            })?;
            tensor_of(v, s.dims())
        }};
    }
    match a.dtype() {
        candle_core::DType::F64 => run!(f64),
        _ => run!(f32),
    }
}

/// `op(a) @ op(b)` for `a: (batch, m, k)` (or `(batch, k, m)` with `ta = Yes`) and
/// `b: (batch, k, n)` (or `(batch, n, k)` with `tb = Yes`), differentiable in both. The batch
/// may be several dimensions, equal in both (`(batch, heads, m, k)`): attention then needs no
/// reshapes, each of which would be one more node for the backward pass to fill.
///
/// f32 / f64 CPU tensors only (see [`super::use_fused`]); the operands are made contiguous.
pub fn batched_matmul(a: &Tensor, b: &Tensor, ta: Transpose, tb: Transpose) -> Result<Tensor> {
    if a.dtype() != b.dtype() {
        candle_core::bail!(
            "batched_matmul: dtypes differ ({:?} and {:?})",
            a.dtype(),
            b.dtype()
        )
    }
    a.contiguous()?
        .apply_op2(&b.contiguous()?, BmmOp { ta, tb })
}
