//! Fused GroupNorm (optionally with the SiLU that follows it in every resnet block), LayerNorm
//! and RMSNorm: one threaded pass forward, one backward that gives the input, weight and bias
//! gradients together.
//!
//! Statistics are accumulated in f64 whatever the kernel float, so f32 results match the
//! composed (f32) path to rounding.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{
    kernel_dtype, rows_per_partial_sum, rows_per_task, tensor_of, with_slice, KernelFloat,
};

/// `1 / (1 + e)`: the sigmoid of `z` from `e = exp(-z)`.
fn sigmoid_of<T: KernelFloat>(e: T) -> T {
    T::one() / (T::one() + e)
}

/// `out[i] = exp(-z[i])` (vectorised, the scalar `exp`'s bits).
fn exp_of_negated<T: KernelFloat>(z: &[T], out: &mut Vec<T>) {
    out.clear();
    out.extend(z.iter().map(|&v| -v));
    T::exp_in_place(out);
}

/// Mean and `1 / sqrt(var + eps)` (biased variance) of `xs`, two-pass in f64.
fn moments<T: KernelFloat>(xs: &[T], eps: f64) -> (T, T) {
    let n = xs.len().max(1) as f64;
    let mean = xs.iter().map(|v| v.wide()).sum::<f64>() / n;
    let var = xs
        .iter()
        .map(|v| {
            let d = v.wide() - mean;
            d * d
        })
        .sum::<f64>()
        / n;
    (T::of(mean), T::of(1.0 / (var + eps).sqrt()))
}

/// `1 / sqrt(mean(x^2) + eps)` in f64.
fn inv_rms<T: KernelFloat>(xs: &[T], eps: f64) -> T {
    let n = xs.len().max(1) as f64;
    let ms = xs
        .iter()
        .map(|v| {
            let v = v.wide();
            v * v
        })
        .sum::<f64>()
        / n;
    T::of(1.0 / (ms + eps).sqrt())
}

// ---------------------------------------------------------------------------------------------
// GroupNorm (+ SiLU)

/// `(N, C, S)` group norm with per-channel weight and bias, optionally followed by SiLU.
#[derive(Debug, Clone, Copy)]
struct GroupNormOp {
    groups: usize,
    eps: f64,
    silu: bool,
}

impl GroupNormOp {
    /// `(n, c, spatial)` of an `(N, C, *)` shape.
    fn dims(&self, shape: &Shape) -> Result<(usize, usize, usize)> {
        let d = shape.dims();
        if d.len() < 2 {
            candle_core::bail!("group_norm expects (N, C, *) input, got {d:?}")
        }
        let s = d[2..].iter().product();
        if self.groups == 0 || !d[1].is_multiple_of(self.groups) {
            candle_core::bail!(
                "group_norm: {} channels are not divisible into {} groups",
                d[1],
                self.groups
            )
        }
        Ok((d[0], d[1], s))
    }

    fn forward<T: KernelFloat>(&self, x: &[T], w: &[T], b: &[T], c: usize, s: usize) -> Vec<T> {
        let cpg = c / self.groups;
        let group_len = cpg * s;
        let mut y = vec![T::zero(); x.len()];
        if group_len == 0 {
            return y;
        }
        y.par_chunks_mut(group_len)
            .zip(x.par_chunks(group_len))
            .enumerate()
            .for_each(|(ng, (yg, xg))| {
                let (mean, rstd) = moments(xg, self.eps);
                let first = (ng % self.groups) * cpg;
                let mut neg_exp = Vec::new();
                for ci in 0..cpg {
                    let scale = rstd * w[first + ci];
                    let shift = b[first + ci] - mean * scale;
                    let range = ci * s..(ci + 1) * s;
                    let yc = &mut yg[range.clone()];
                    for (yv, &xv) in yc.iter_mut().zip(&xg[range]) {
                        *yv = xv * scale + shift;
                    }
                    if self.silu {
                        // z * sigmoid(z), the exponentials of a channel at once.
                        exp_of_negated(yc, &mut neg_exp);
                        for (yv, &e) in yc.iter_mut().zip(&neg_exp) {
                            *yv *= sigmoid_of(e);
                        }
                    }
                }
            });
        y
    }

    /// `(dx, dweight, dbias)` from the input, parameters and output gradient.
    #[allow(clippy::too_many_arguments)]
    fn backward<T: KernelFloat>(
        &self,
        x: &[T],
        w: &[T],
        b: &[T],
        dy: &[T],
        n: usize,
        c: usize,
        s: usize,
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        let cpg = c / self.groups;
        let group_len = cpg * s;
        let mut dx = vec![T::zero(); x.len()];
        // Per-sample partial parameter gradients, `(N, C)`, summed over samples at the end.
        let mut dw_part = vec![T::zero(); n * c];
        let mut db_part = vec![T::zero(); n * c];
        if group_len > 0 {
            dx.par_chunks_mut(group_len)
                .zip(x.par_chunks(group_len))
                .zip(dy.par_chunks(group_len))
                .zip(dw_part.par_chunks_mut(cpg).zip(db_part.par_chunks_mut(cpg)))
                .enumerate()
                .for_each(|(ng, (((dxg, xg), dyg), (dwg, dbg)))| {
                    let (mean, rstd) = moments(xg, self.eps);
                    let first = (ng % self.groups) * cpg;
                    let (mut sum_g, mut sum_gx) = (0f64, 0f64);
                    let (mut zs, mut neg_exp) = (Vec::new(), Vec::new());
                    for ci in 0..cpg {
                        let (wc, bc) = (w[first + ci], b[first + ci]);
                        let (mut dwc, mut dbc) = (T::zero(), T::zero());
                        let range = ci * s..(ci + 1) * s;
                        if self.silu {
                            // The channel's exponentials at once, for the sigmoids below.
                            zs.clear();
                            zs.extend(xg[range.clone()].iter().map(|&xv| {
                                let xhat = (xv - mean) * rstd;
                                xhat * wc + bc
                            }));
                            exp_of_negated(&zs, &mut neg_exp);
                        }
                        for (j, ((dxv, &xv), &dyv)) in dxg[range.clone()]
                            .iter_mut()
                            .zip(&xg[range.clone()])
                            .zip(&dyg[range])
                            .enumerate()
                        {
                            let xhat = (xv - mean) * rstd;
                            let dz = if self.silu {
                                let z = zs[j];
                                let sg = sigmoid_of(neg_exp[j]);
                                dyv * sg * (T::one() + z * (T::one() - sg))
                            } else {
                                dyv
                            };
                            dbc += dz;
                            dwc += dz * xhat;
                            let g = dz * wc; // gradient w.r.t. xhat
                            sum_g += g.wide();
                            sum_gx += (g * xhat).wide();
                            *dxv = g;
                        }
                        dwg[ci] = dwc;
                        dbg[ci] = dbc;
                    }
                    let len = group_len as f64;
                    let (mean_g, mean_gx) = (T::of(sum_g / len), T::of(sum_gx / len));
                    for (dxv, &xv) in dxg.iter_mut().zip(xg) {
                        let xhat = (xv - mean) * rstd;
                        *dxv = rstd * (*dxv - mean_g - xhat * mean_gx);
                    }
                });
        }
        let sum_over_samples = |part: Vec<T>| -> Vec<T> {
            let mut out = vec![T::zero(); c];
            for row in part.chunks(c.max(1)) {
                for (o, &v) in out.iter_mut().zip(row) {
                    *o += v;
                }
            }
            out
        };
        (dx, sum_over_samples(dw_part), sum_over_samples(db_part))
    }
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        if self.silu {
            "nn-group-norm-silu"
        } else {
            "nn-group-norm"
        }
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
        let (_, c, s) = self.dims(l1.shape())?;
        let out = match s1 {
            CpuStorage::F32(_) => f32::storage(self.forward(
                f32::slice(s1, l1)?,
                f32::slice(s2, l2)?,
                f32::slice(s3, l3)?,
                c,
                s,
            )),
            CpuStorage::F64(_) => f64::storage(self.forward(
                f64::slice(s1, l1)?,
                f64::slice(s2, l2)?,
                f64::slice(s3, l3)?,
                c,
                s,
            )),
            _ => candle_core::bail!("{}: f32 or f64 input expected", self.name()),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, c, s) = self.dims(x.shape())?;
        macro_rules! run {
            ($t:ty) => {{
                let (dx, dw, db) = with_slice::<$t, _>(x, |xs| {
                    with_slice::<$t, _>(w, |ws| {
                        with_slice::<$t, _>(b, |bs| {
                            with_slice::<$t, _>(grad, |gs| {
                                Ok(self.backward(xs, ws, bs, gs, n, c, s))
                            })
                        })
                    })
                })?;
                (
                    tensor_of(dx, x.dims())?,
                    tensor_of(dw, &[c])?,
                    tensor_of(db, &[c])?,
                )
            }};
        }
        let (dx, dw, db) = match x.dtype() {
            candle_core::DType::F64 => run!(f64),
            _ => run!(f32),
        };
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// Fused group norm of `(N, C, *)` input, optionally followed by SiLU, computed in f32 (f64 for
/// f64) and cast back. `weight` / `bias` are `(C,)`; `None` means 1 / 0.
pub fn group_norm_fused(
    xs: &Tensor,
    groups: usize,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let dtype = xs.dtype();
    let kdt = kernel_dtype(dtype);
    let op = GroupNormOp { groups, eps, silu };
    let (_, c, _) = op.dims(xs.shape())?;
    let (w, b) = params(weight, bias, c, xs)?;
    let x = xs.to_dtype(kdt)?.contiguous()?;
    x.apply_op3(&w.to_dtype(kdt)?, &b.to_dtype(kdt)?, op)?
        .to_dtype(dtype)
}

/// Weight and bias tensors, constants 1 / 0 where absent (they carry no gradient).
fn params(
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    size: usize,
    like: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let kdt = kernel_dtype(like.dtype());
    let w = match weight {
        Some(w) => w.clone(),
        None => Tensor::ones(size, kdt, like.device())?,
    };
    let b = match bias {
        Some(b) => b.clone(),
        None => Tensor::zeros(size, kdt, like.device())?,
    };
    Ok((w, b))
}

// ---------------------------------------------------------------------------------------------
// LayerNorm and RMSNorm over the last dimension

/// Which row normalisation: LayerNorm (centre and scale, weight and bias) or RMSNorm (scale
/// only, weight only).
#[derive(Debug, Clone, Copy, PartialEq)]
enum RowNorm {
    Layer,
    Rms,
}

#[derive(Debug, Clone, Copy)]
struct RowNormOp {
    kind: RowNorm,
    eps: f64,
}

impl RowNormOp {
    fn stats<T: KernelFloat>(&self, row: &[T]) -> (T, T) {
        match self.kind {
            RowNorm::Layer => moments(row, self.eps),
            RowNorm::Rms => (T::zero(), inv_rms(row, self.eps)),
        }
    }

    fn forward<T: KernelFloat>(&self, x: &[T], w: &[T], b: Option<&[T]>, d: usize) -> Vec<T> {
        let mut y = vec![T::zero(); x.len()];
        if d == 0 {
            return y;
        }
        let block = rows_per_task(x.len() / d, d) * d;
        y.par_chunks_mut(block)
            .zip(x.par_chunks(block))
            .for_each(|(yb, xb)| {
                for (yr, xr) in yb.chunks_mut(d).zip(xb.chunks(d)) {
                    let (mean, rstd) = self.stats(xr);
                    for (j, (yv, &xv)) in yr.iter_mut().zip(xr).enumerate() {
                        let v = (xv - mean) * rstd * w[j];
                        *yv = match b {
                            Some(b) => v + b[j],
                            None => v,
                        };
                    }
                }
            });
        y
    }

    /// `(dx, dweight, dbias)`; `dbias` is empty for RMSNorm.
    fn backward<T: KernelFloat>(
        &self,
        x: &[T],
        w: &[T],
        dy: &[T],
        d: usize,
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        let mut dx = vec![T::zero(); x.len()];
        if d == 0 {
            return (dx, vec![], vec![]);
        }
        let centred = self.kind == RowNorm::Layer;
        // Each block sums its rows' weight / bias gradients: a fixed partition, fixed bits.
        let block = rows_per_partial_sum(x.len() / d, d) * d;
        let (dw, db) = dx
            .par_chunks_mut(block)
            .zip(x.par_chunks(block))
            .zip(dy.par_chunks(block))
            .map(|((dxb, xb), dyb)| {
                let mut dw = vec![T::zero(); d];
                let mut db = vec![T::zero(); if centred { d } else { 0 }];
                for ((dxr, xr), dyr) in dxb.chunks_mut(d).zip(xb.chunks(d)).zip(dyb.chunks(d)) {
                    let (mean, rstd) = self.stats(xr);
                    let (mut sum_g, mut sum_gx) = (0f64, 0f64);
                    for j in 0..d {
                        let xhat = (xr[j] - mean) * rstd;
                        dw[j] += dyr[j] * xhat;
                        if centred {
                            db[j] += dyr[j];
                        }
                        let g = dyr[j] * w[j];
                        sum_g += g.wide();
                        sum_gx += (g * xhat).wide();
                    }
                    let mean_g = if centred {
                        T::of(sum_g / d as f64)
                    } else {
                        T::zero()
                    };
                    let mean_gx = T::of(sum_gx / d as f64);
                    for j in 0..d {
                        let xhat = (xr[j] - mean) * rstd;
                        dxr[j] = rstd * (dyr[j] * w[j] - mean_g - xhat * mean_gx);
                    }
                }
                (dw, db)
            })
            // Collected in order and summed sequentially: a rayon `reduce` tree depends on work
            // stealing, and a resumed training run must reproduce the same bits.
            .collect::<Vec<_>>()
            .into_iter()
            .fold(
                (
                    vec![T::zero(); d],
                    vec![T::zero(); if centred { d } else { 0 }],
                ),
                |(mut aw, mut ab), (bw, bb)| {
                    aw.iter_mut().zip(&bw).for_each(|(a, &b)| *a += b);
                    ab.iter_mut().zip(&bb).for_each(|(a, &b)| *a += b);
                    (aw, ab)
                },
            );
        (dx, dw, db)
    }
}

fn last_dim(shape: &Shape) -> Result<usize> {
    shape
        .dims()
        .last()
        .copied()
        .ok_or_else(|| candle_core::Error::msg("normalisation of a scalar"))
}

impl CustomOp3 for RowNormOp {
    fn name(&self) -> &'static str {
        "nn-layer-norm"
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
        let d = last_dim(l1.shape())?;
        let out = match s1 {
            CpuStorage::F32(_) => f32::storage(self.forward(
                f32::slice(s1, l1)?,
                f32::slice(s2, l2)?,
                Some(f32::slice(s3, l3)?),
                d,
            )),
            CpuStorage::F64(_) => f64::storage(self.forward(
                f64::slice(s1, l1)?,
                f64::slice(s2, l2)?,
                Some(f64::slice(s3, l3)?),
                d,
            )),
            _ => candle_core::bail!("{}: f32 or f64 input expected", CustomOp3::name(self)),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = self.grads(x, w, grad)?;
        Ok((Some(dx), Some(dw), db))
    }
}

impl CustomOp2 for RowNormOp {
    fn name(&self) -> &'static str {
        "nn-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = last_dim(l1.shape())?;
        let out = match s1 {
            CpuStorage::F32(_) => {
                f32::storage(self.forward(f32::slice(s1, l1)?, f32::slice(s2, l2)?, None, d))
            }
            CpuStorage::F64(_) => {
                f64::storage(self.forward(f64::slice(s1, l1)?, f64::slice(s2, l2)?, None, d))
            }
            _ => candle_core::bail!("{}: f32 or f64 input expected", CustomOp2::name(self)),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = self.grads(x, w, grad)?;
        Ok((Some(dx), Some(dw)))
    }
}

impl RowNormOp {
    fn grads(
        &self,
        x: &Tensor,
        w: &Tensor,
        grad: &Tensor,
    ) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        let d = last_dim(x.shape())?;
        macro_rules! run {
            ($t:ty) => {{
                let (dx, dw, db) = with_slice::<$t, _>(x, |xs| {
                    with_slice::<$t, _>(w, |ws| {
                        with_slice::<$t, _>(grad, |gs| Ok(self.backward(xs, ws, gs, d)))
                    })
                })?;
                let db = match self.kind {
                    RowNorm::Layer => Some(tensor_of(db, &[d])?),
                    RowNorm::Rms => None,
                };
                (tensor_of(dx, x.dims())?, tensor_of(dw, &[d])?, db)
            }};
        }
        Ok(match x.dtype() {
            candle_core::DType::F64 => run!(f64),
            _ => run!(f32),
        })
    }
}

/// Fused layer norm over the last dimension (biased variance, as PyTorch), computed in f32
/// (f64 for f64) and cast back. `None` weight / bias mean 1 / 0.
pub fn layer_norm_fused(
    xs: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    let dtype = xs.dtype();
    let kdt = kernel_dtype(dtype);
    let d = last_dim(xs.shape())?;
    let (w, b) = params(weight, bias, d, xs)?;
    let op = RowNormOp {
        kind: RowNorm::Layer,
        eps,
    };
    xs.to_dtype(kdt)?
        .contiguous()?
        .apply_op3(&w.to_dtype(kdt)?, &b.to_dtype(kdt)?, op)?
        .to_dtype(dtype)
}

/// Fused RMS norm over the last dimension. For f32 / f64 the weight is applied inside the
/// kernel; for f16 / bf16 the input is normalised in f32, cast back and then multiplied by the
/// weight in the input dtype, exactly as transformers' `LlamaRMSNorm` rounds.
pub fn rms_norm_fused(xs: &Tensor, weight: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let dtype = xs.dtype();
    let kdt = kernel_dtype(dtype);
    let d = last_dim(xs.shape())?;
    let op = RowNormOp {
        kind: RowNorm::Rms,
        eps,
    };
    let x = xs.to_dtype(kdt)?.contiguous()?;
    if dtype == kdt {
        let w = match weight {
            Some(w) => w.clone(),
            None => Tensor::ones(d, kdt, xs.device())?,
        };
        return x.apply_op2(&w.to_dtype(kdt)?, op);
    }
    let ones = Tensor::ones(d, kdt, xs.device())?;
    let y = x.apply_op2(&ones, op)?.to_dtype(dtype)?;
    match weight {
        Some(w) => y.broadcast_mul(&w.to_dtype(dtype)?),
        None => Ok(y),
    }
}
