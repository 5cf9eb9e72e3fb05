//! GEGLU, `h * gelu(gate)` with `[h, gate]` the two halves of the last dimension (diffusers'
//! `GEGLU` feed-forward, erf GELU; f32 erf to 1.5e-7, f64 libm's), as one custom op with a
//! backward.
//!
//! Composed it is five graph nodes (two narrows, GELU, multiply, and the narrows' padded
//! gradients), each a fresh activation-sized buffer with candle's `zeros_like` + `add`
//! gradient accumulation; the transformer's widest activations go through it.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{kernel_dtype, rows_per_task, tensor_of, with_slice, KernelFloat};

#[derive(Debug, Clone, Copy)]
struct GegluOp;

/// `(rows, inner)` of a `(..., 2 * inner)` input.
fn dims(shape: &[usize]) -> Result<(usize, usize)> {
    match shape.split_last() {
        Some((&last, lead)) if last % 2 == 0 => Ok((lead.iter().product(), last / 2)),
        _ => candle_core::bail!("geglu: expected (..., 2 * inner) input, got {shape:?}"),
    }
}

/// `(gelu(g), gelu'(g))` in the kernel float, from `g` and `e = exp(-g^2 / 2)` (the
/// exponentials of a row are computed together, vectorised: [`KernelFloat::exp_in_place`]).
trait Erf: KernelFloat {
    fn gelu_and_slope(g: Self, e: Self) -> (Self, Self);
}

/// `1 / sqrt(2 pi)`.
const INV_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

impl Erf for f32 {
    /// erf by Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7, under f32 rounding of
    /// the result's scale), sharing `exp(-g^2 / 2)` with the density: libm's `erff` took 9% of
    /// a UNet training step.
    fn gelu_and_slope(g: f32, e: f32) -> (f32, f32) {
        let x = g.abs() * std::f32::consts::FRAC_1_SQRT_2;
        // e = exp(-x^2), also the density's exponential
        let t = 1.0 / (1.0 + 0.327_591_1 * x);
        let poly = t
            * (0.254_829_6
                + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152 + t * 1.061_405_4))));
        let erf = (1.0 - poly * e).copysign(g);
        let cdf = 0.5 * (1.0 + erf);
        (g * cdf, cdf + g * e * INV_SQRT_2PI as f32)
    }
}

impl Erf for f64 {
    /// libm's erf: f64 is the gradient-check precision.
    fn gelu_and_slope(g: f64, e: f64) -> (f64, f64) {
        let cdf = 0.5 * (1.0 + libm::erf(g * std::f64::consts::FRAC_1_SQRT_2));
        (g * cdf, cdf + g * e * INV_SQRT_2PI)
    }
}

/// `out[i] = exp(-g[i]^2 / 2)`.
fn half_square_exps<T: Erf>(g: &[T], out: &mut Vec<T>) {
    out.clear();
    out.extend(g.iter().map(|&g| T::of(-0.5) * g * g));
    T::exp_in_place(out);
}

fn forward<T: Erf>(p: &[T], rows: usize, inner: usize) -> Vec<T> {
    let mut y = vec![T::zero(); rows * inner];
    if y.is_empty() {
        return y;
    }
    let per = rows_per_task(rows, 2 * inner);
    y.par_chunks_mut(per * inner)
        .zip(p.par_chunks(per * 2 * inner))
        .for_each(|(yb, pb)| {
            let mut exps = Vec::new();
            for (yr, pr) in yb.chunks_exact_mut(inner).zip(pb.chunks_exact(2 * inner)) {
                let (h, g) = pr.split_at(inner);
                half_square_exps(g, &mut exps);
                for (((y, &h), &g), &e) in yr.iter_mut().zip(h).zip(g).zip(&exps) {
                    *y = h * T::gelu_and_slope(g, e).0;
                }
            }
        });
    y
}

/// `dp = [dy * gelu(g), dy * h * gelu'(g)]`.
fn backward<T: Erf>(p: &[T], dy: &[T], rows: usize, inner: usize) -> Vec<T> {
    let mut dp = vec![T::zero(); rows * 2 * inner];
    if dp.is_empty() {
        return dp;
    }
    let per = rows_per_task(rows, 2 * inner);
    dp.par_chunks_mut(per * 2 * inner)
        .zip(p.par_chunks(per * 2 * inner))
        .zip(dy.par_chunks(per * inner))
        .for_each(|((db, pb), yb)| {
            let mut exps = Vec::new();
            for ((dr, pr), yr) in db
                .chunks_exact_mut(2 * inner)
                .zip(pb.chunks_exact(2 * inner))
                .zip(yb.chunks_exact(inner))
            {
                let (h, g) = pr.split_at(inner);
                let (dh, dg) = dr.split_at_mut(inner);
                half_square_exps(g, &mut exps);
                for i in 0..inner {
                    let (gelu, slope) = T::gelu_and_slope(g[i], exps[i]);
                    dh[i] = yr[i] * gelu;
                    dg[i] = yr[i] * h[i] * slope;
                }
            }
        });
    dp
}

impl CustomOp1 for GegluOp {
    fn name(&self) -> &'static str {
        "nn-geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, inner) = dims(l.dims())?;
        let out = match s.dtype() {
            DType::F32 => f32::storage(forward(f32::slice(s, l)?, rows, inner)),
            DType::F64 => f64::storage(forward(f64::slice(s, l)?, rows, inner)),
            dt => candle_core::bail!("nn-geglu: f32 or f64 input expected, got {dt:?}"),
        };
        let mut shape = l.dims().to_vec();
        *shape.last_mut().expect("checked by dims") = inner;
        Ok((out, Shape::from(shape)))
    }

    fn bwd(&self, p: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (rows, inner) = dims(p.dims())?;
        fn run<T: Erf>(p: &Tensor, grad: &Tensor, rows: usize, inner: usize) -> Result<Tensor> {
            let dp = with_slice::<T, _>(p, |ps| {
                with_slice::<T, _>(grad, |g| Ok(backward(ps, g, rows, inner)))
            })?;
            tensor_of(dp, p.dims())
        }
        Ok(Some(match p.dtype() {
            DType::F64 => run::<f64>(p, grad, rows, inner)?,
            _ => run::<f32>(p, grad, rows, inner)?,
        }))
    }
}

/// `h * gelu(gate)` for `[h, gate]` the halves of `p (..., 2 * inner)` (erf GELU):
/// `(..., inner)`, computed in f32 (f64 for f64) and cast back; differentiable.
pub fn geglu_fused(p: &Tensor) -> Result<Tensor> {
    let dtype = p.dtype();
    p.to_dtype(kernel_dtype(dtype))?
        .contiguous()?
        .apply_op1(GegluOp)?
        .to_dtype(dtype)
}

/// [`geglu_fused`] on the CPU, the composed candle ops (narrow, GELU, multiply) elsewhere.
pub fn geglu(p: &Tensor) -> Result<Tensor> {
    if super::use_fused(p) {
        return geglu_fused(p);
    }
    geglu_composed(p)
}

/// The composed GEGLU: every device; the reference the fused op is tested against.
pub fn geglu_composed(p: &Tensor) -> Result<Tensor> {
    let last = p.rank().saturating_sub(1);
    let inner = p.dim(last)? / 2;
    let h = p.narrow(last, 0, inner)?;
    let gate = p.narrow(last, inner, inner)?;
    h * crate::ops::gelu(&gate)?
}
