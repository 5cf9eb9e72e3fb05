//! `y = x W^T + b` on the last dimension of any-rank input, as one custom op with a backward.
//!
//! The composed `Linear` is five graph nodes (reshape, transpose of W, matmul, broadcast add,
//! reshape) and candle accumulates every node's gradient with a `zeros_like` and an `add`, two
//! extra passes over an activation-sized tensor each; the bias gradient of the broadcast add is
//! reduced single-threaded. Here the products run through [`crate::sgemm`] (AVX-512 f32
//! micro-kernel where available), the bias is written into the output before the product
//! accumulates onto it, and the backward computes `dx = g W`, `dW = g^T x` and `db` (column
//! sums of `g`, fixed-order partial sums) only for the arguments that need them.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{kernel_dtype, tensor_of, with_slice, KernelFloat};
use crate::sgemm::{matmul, matmul_lhs, Lhs, Mat};
use candle_core::backend::BackendStorage;

#[derive(Debug, Clone, Copy)]
struct LinearOp;

/// `(rows, in)` of the input and `out` of the weight.
fn dims(x: &[usize], w: &[usize]) -> Result<(usize, usize, usize)> {
    let (Some((&inp, lead)), &[out, win]) = (x.split_last(), w) else {
        candle_core::bail!(
            "linear: expected (..., in) input and (out, in) weight, got {x:?} and {w:?}"
        )
    };
    if inp != win {
        candle_core::bail!("linear: input has {inp} features, weight {w:?} expects {win}")
    }
    Ok((lead.iter().product(), inp, out))
}

/// Row blocks for threading: about one per thread, whole micro-panels of 8 rows.
fn row_block(rows: usize) -> usize {
    rows.div_ceil(rayon::current_num_threads().max(1))
        .next_multiple_of(8)
        .max(8)
}

/// Below this many rows the product is a few matrix-vector products (LLM decoding: one row per
/// token): they stream the weight once, threaded over its rows, instead of packing it.
const GEMV_ROWS: usize = 16;

fn forward<T: KernelFloat + Dot>(
    x: &[T],
    w: &[T],
    b: Option<&[T]>,
    (rows, inp, out): (usize, usize, usize),
) -> Vec<T> {
    if rows < GEMV_ROWS {
        return gemv(x, w, b, (rows, inp, out));
    }
    let mut y = vec![T::zero(); rows * out];
    if y.is_empty() {
        return y;
    }
    let block = row_block(rows);
    y.par_chunks_mut(block * out)
        .zip(x.par_chunks(block * inp))
        .for_each(|(yb, xb)| {
            let r = yb.len() / out;
            // The bias first, then the product accumulated onto it.
            if let Some(b) = b {
                yb.chunks_exact_mut(out)
                    .for_each(|row| row.copy_from_slice(b));
            }
            let wt = Mat::rows_t(w, out, inp);
            matmul(yb, out, Mat::rows(xb, r, inp), wt, b.is_some(), 1);
        });
    y
}

/// `y = x W^T + b` for a few rows of `x`: each weight row is read once, from memory in order,
/// and dotted with every row of `x`; threads take contiguous runs of weight rows.
fn gemv<T: KernelFloat + Dot>(
    x: &[T],
    w: &[T],
    b: Option<&[T]>,
    (rows, inp, out): (usize, usize, usize),
) -> Vec<T> {
    let mut y = vec![T::zero(); rows * out];
    if y.is_empty() {
        return y;
    }
    let threads = rayon::current_num_threads().max(1);
    // Whole weight rows per task, at least 64 KiB of weights each so scheduling stays cheap.
    let per_task = out
        .div_ceil(threads)
        .max((16384 / inp.max(1)).max(1))
        .min(out);
    // Each task's outputs as (weight row, x row) pairs, copied into `y` afterwards.
    let blocks: Vec<Vec<T>> = w
        .par_chunks(per_task * inp)
        .enumerate()
        .map(|(t, wb)| {
            let first = t * per_task;
            let mut part = Vec::with_capacity(wb.len() / inp.max(1) * rows);
            for (j, wr) in wb.chunks_exact(inp).enumerate() {
                let bias = b.map_or(T::zero(), |b| b[first + j]);
                for xr in x.chunks_exact(inp) {
                    part.push(bias + T::dot(wr, xr));
                }
            }
            part
        })
        .collect();
    for (t, part) in blocks.iter().enumerate() {
        let first = t * per_task;
        for (j, vals) in part.chunks_exact(rows).enumerate() {
            for (r, &v) in vals.iter().enumerate() {
                y[r * out + first + j] = v;
            }
        }
    }
    y
}

/// Dot products of equal-length slices, vectorised where the CPU allows.
pub(crate) trait Dot: Sized {
    /// `sum(a[i] * b[i])`.
    fn dot(a: &[Self], b: &[Self]) -> Self;
}

impl Dot for f64 {
    fn dot(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }
}

impl Dot for f32 {
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if crate::sgemm::avx512_available() {
            // SAFETY: AVX-512F was detected; the slices have equal lengths (checked by zip below
            // in the portable path, asserted here).
            assert_eq!(a.len(), b.len());
            return unsafe { dot_avx512(a, b) };
        }
        // Eight independent partial sums (vectorisable; one sum would serialise on its adds).
        let mut acc = [0f32; 8];
        let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
        let tail: f32 = ca
            .remainder()
            .iter()
            .zip(cb.remainder())
            .map(|(x, y)| x * y)
            .sum();
        for (xa, xb) in ca.zip(cb) {
            for i in 0..8 {
                acc[i] += xa[i] * xb[i];
            }
        }
        acc.iter().sum::<f32>() + tail
    }
}

/// # Safety
/// AVX-512F is available and `a.len() == b.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len();
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    // Four accumulators hide the FMA latency.
    let (mut s0, mut s1, mut s2, mut s3) = (
        _mm512_setzero_ps(),
        _mm512_setzero_ps(),
        _mm512_setzero_ps(),
        _mm512_setzero_ps(),
    );
    let mut i = 0;
    while i + 64 <= n {
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)), s0);
        s1 = _mm512_fmadd_ps(
            _mm512_loadu_ps(pa.add(i + 16)),
            _mm512_loadu_ps(pb.add(i + 16)),
            s1,
        );
        s2 = _mm512_fmadd_ps(
            _mm512_loadu_ps(pa.add(i + 32)),
            _mm512_loadu_ps(pb.add(i + 32)),
            s2,
        );
        s3 = _mm512_fmadd_ps(
            _mm512_loadu_ps(pa.add(i + 48)),
            _mm512_loadu_ps(pb.add(i + 48)),
            s3,
        );
        i += 64;
    }
    while i < n {
        let m: __mmask16 = ((1u32 << (n - i).min(16)) - 1) as __mmask16;
        let z = _mm512_setzero_ps();
        s0 = _mm512_fmadd_ps(
            _mm512_mask_loadu_ps(z, m, pa.add(i)),
            _mm512_mask_loadu_ps(z, m, pb.add(i)),
            s0,
        );
        i += 16;
    }
    _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)))
}

/// `dx = g W` (rows split over threads).
fn grad_x<T: KernelFloat>(g: &[T], w: &[T], (rows, inp, out): (usize, usize, usize)) -> Vec<T> {
    let mut dx = vec![T::zero(); rows * inp];
    if dx.is_empty() {
        return dx;
    }
    let block = row_block(rows);
    dx.par_chunks_mut(block * inp)
        .zip(g.par_chunks(block * out))
        .for_each(|(db, gb)| {
            let r = db.len() / inp;
            matmul(
                db,
                inp,
                Mat::rows(gb, r, out),
                Mat::rows(w, out, inp),
                false,
                1,
            );
        });
    dx
}

/// `dW = g^T x`: the reduction runs over the rows, so threads split the output instead.
fn grad_w<T: KernelFloat>(g: &[T], x: &[T], (rows, inp, out): (usize, usize, usize)) -> Vec<T> {
    let mut dw = vec![T::zero(); out * inp];
    let gt = Lhs::view(Mat::rows_t(g, rows, out));
    matmul_lhs(
        &mut dw,
        inp,
        &gt,
        Mat::rows(x, rows, inp),
        false,
        rayon::current_num_threads(),
    );
    dw
}

/// Column sums of `g (rows, out)`: partial sums in f64 over fixed blocks of rows, added in
/// block order (the same bits whatever the thread count).
fn grad_b<T: KernelFloat>(g: &[T], out: usize) -> Vec<T> {
    const BLOCK: usize = 256;
    if out == 0 {
        return Vec::new();
    }
    let partials: Vec<Vec<f64>> = g
        .par_chunks(BLOCK * out)
        .map(|gb| {
            let mut s = vec![0f64; out];
            for row in gb.chunks_exact(out) {
                s.iter_mut().zip(row).for_each(|(s, v)| *s += v.wide());
            }
            s
        })
        .collect();
    (0..out)
        .map(|j| T::of(partials.iter().map(|p| p[j]).sum::<f64>()))
        .collect()
}

impl LinearOp {
    fn fwd(
        &self,
        (sx, lx): (&CpuStorage, &Layout),
        (sw, lw): (&CpuStorage, &Layout),
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let d = dims(lx.dims(), lw.dims())?;
        if let Some((_, lb)) = bias {
            if lb.dims() != [d.2] {
                candle_core::bail!("linear: bias {:?} for {} outputs", lb.dims(), d.2)
            }
        }
        fn run<T: KernelFloat + Dot>(
            (sx, lx): (&CpuStorage, &Layout),
            (sw, lw): (&CpuStorage, &Layout),
            bias: Option<(&CpuStorage, &Layout)>,
            d: (usize, usize, usize),
        ) -> Result<CpuStorage> {
            let b = bias.map(|(s, l)| T::slice(s, l)).transpose()?;
            Ok(T::storage(forward(
                T::slice(sx, lx)?,
                T::slice(sw, lw)?,
                b,
                d,
            )))
        }
        let out = match sx.dtype() {
            DType::F32 => run::<f32>((sx, lx), (sw, lw), bias, d)?,
            DType::F64 => run::<f64>((sx, lx), (sw, lw), bias, d)?,
            dt => candle_core::bail!("nn-linear: f32 or f64 input expected, got {dt:?}"),
        };
        let mut shape = lx.dims().to_vec();
        *shape.last_mut().expect("checked by dims") = d.2;
        Ok((out, Shape::from(shape)))
    }

    /// `(dx, dW, db)`, each only for an argument that needs a gradient.
    fn grads(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = dims(x.dims(), w.dims())?;
        let want = (x.track_op(), w.track_op(), b.is_some_and(|b| b.track_op()));
        fn run<T: KernelFloat>(
            x: &Tensor,
            w: &Tensor,
            grad: &Tensor,
            d: (usize, usize, usize),
            want: (bool, bool, bool),
        ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
            with_slice::<T, _>(grad, |g| {
                let dx = if want.0 {
                    let v = with_slice::<T, _>(w, |w| Ok(grad_x(g, w, d)))?;
                    Some(tensor_of(v, x.dims())?)
                } else {
                    None
                };
                let dw = if want.1 {
                    let v = with_slice::<T, _>(x, |x| Ok(grad_w(g, x, d)))?;
                    Some(tensor_of(v, w.dims())?)
                } else {
                    None
                };
                let db = if want.2 {
                    Some(tensor_of(grad_b(g, d.2), &[d.2])?)
                } else {
                    None
                };
                Ok((dx, dw, db))
            })
        }
        match x.dtype() {
            DType::F64 => run::<f64>(x, w, grad, d, want),
            _ => run::<f32>(x, w, grad, d, want),
        }
    }
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "nn-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.fwd((s1, l1), (s2, l2), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = self.grads(x, w, None, grad)?;
        Ok((dx, dw))
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "nn-linear-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.fwd((s1, l1), (s2, l2), Some((s3, l3)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.grads(x, w, Some(b), grad)
    }
}

/// `x W^T (+ b)` for `x (..., in)`, `W (out, in)`, `b (out,)`: one graph node, computed in f32
/// (f64 for f64) and cast back; differentiable in all three.
pub fn linear_fused(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let dtype = x.dtype();
    let kdt = kernel_dtype(dtype);
    let xk = x.to_dtype(kdt)?.contiguous()?;
    let wk = w.to_dtype(kdt)?.contiguous()?;
    let y = match b {
        Some(b) => xk.apply_op3(&wk, &b.to_dtype(kdt)?.contiguous()?, LinearOp)?,
        None => xk.apply_op2(&wk, LinearOp)?,
    };
    y.to_dtype(dtype)
}
