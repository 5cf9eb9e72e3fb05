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

fn forward<T: KernelFloat>(
    x: &[T],
    w: &[T],
    b: Option<&[T]>,
    (rows, inp, out): (usize, usize, usize),
) -> Vec<T> {
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
        fn run<T: KernelFloat>(
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
