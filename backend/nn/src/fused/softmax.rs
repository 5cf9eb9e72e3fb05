//! Fused `softmax(scale * x + mask)` over the last dimension (and log-softmax), with the causal
//! mask computed in the kernel instead of materialised, and a backward pass.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{kernel_dtype, rows_per_task, tensor_of, with_slice, KernelFloat};

/// The masks [`softmax_fused`] can apply on top of `scale * x`.
#[derive(Debug, Clone, Copy, Default)]
pub struct SoftmaxMask<'a> {
    /// Additive mask broadcastable to the input (0 keeps, `-inf` / very negative drops). It gets
    /// no gradient.
    pub additive: Option<&'a Tensor>,
    /// Bottom-right causal masking over the last two dimensions `(q_len, k_len)`: query `i`
    /// sees keys `j <= i + offset`; the offset is `k_len - q_len` (the cached positions).
    pub causal: bool,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct SoftmaxOp {
    pub(crate) scale: f64,
    /// `Some(offset)` for causal masking, offset = k_len - q_len.
    pub(crate) causal_offset: Option<usize>,
    /// Log-softmax instead of softmax.
    pub(crate) log: bool,
}

/// Where a row's mask values start in the (possibly broadcast) mask storage, and the stride of
/// its last dimension.
pub(crate) struct MaskIndex<'a> {
    pub(crate) dims: &'a [usize],
    pub(crate) strides: &'a [usize],
    pub(crate) start: usize,
}

impl MaskIndex<'_> {
    fn row_offset(&self, mut row: usize) -> usize {
        let rank = self.dims.len();
        let mut off = self.start;
        for i in (0..rank - 1).rev() {
            let d = self.dims[i];
            off += (row % d) * self.strides[i];
            row /= d;
        }
        off
    }
    fn last_stride(&self) -> usize {
        self.strides[self.dims.len() - 1]
    }
}

impl SoftmaxOp {
    pub(crate) fn forward<T: KernelFloat>(
        &self,
        x: &[T],
        dims: &[usize],
        mask: Option<(&[T], MaskIndex)>,
    ) -> Vec<T> {
        let k = *dims.last().unwrap_or(&1);
        let mut y = vec![T::zero(); x.len()];
        if k == 0 {
            return y;
        }
        let q_len = if dims.len() >= 2 {
            dims[dims.len() - 2]
        } else {
            1
        };
        let rows = x.len() / k;
        let block_rows = rows_per_task(rows, k);
        let scale = T::of(self.scale);
        y.par_chunks_mut(block_rows * k)
            .zip(x.par_chunks(block_rows * k))
            .enumerate()
            .for_each(|(bi, (yb, xb))| {
                let mut exps = Vec::new();
                for (ri, (yr, xr)) in yb.chunks_mut(k).zip(xb.chunks(k)).enumerate() {
                    let row = bi * block_rows + ri;
                    let visible = match self.causal_offset {
                        Some(off) => (row % q_len + off + 1).min(k),
                        None => k,
                    };
                    for (j, (yv, &xv)) in yr.iter_mut().zip(xr).enumerate() {
                        *yv = if j < visible {
                            xv * scale
                        } else {
                            T::neg_infinity()
                        };
                    }
                    if let Some((m, idx)) = &mask {
                        let (o, st) = (idx.row_offset(row), idx.last_stride());
                        for (j, yv) in yr.iter_mut().enumerate() {
                            *yv += m[o + j * st];
                        }
                    }
                    let max = yr
                        .iter()
                        .fold(T::neg_infinity(), |a, &b| num_traits::Float::max(a, b));
                    let mut sum = 0f64;
                    if self.log {
                        // The exponentials in a scratch row: the result needs the inputs.
                        exps.clear();
                        exps.extend(yr.iter().map(|&v| v - max));
                        T::exp_in_place(&mut exps);
                        exps.iter().for_each(|e| sum += e.wide());
                        // Shift first: `x - (max + ln s)` would round at large logits.
                        let ln_sum = T::of(sum.ln());
                        yr.iter_mut().for_each(|v| *v = (*v - max) - ln_sum);
                    } else {
                        yr.iter_mut().for_each(|v| *v -= max);
                        T::exp_in_place(yr);
                        yr.iter().for_each(|e| sum += e.wide());
                        let inv = T::of(1.0 / sum);
                        yr.iter_mut().for_each(|v| *v *= inv);
                    }
                }
            });
        y
    }

    /// Gradient w.r.t. `x` from the result `y` and its gradient.
    fn backward<T: KernelFloat>(&self, y: &[T], dy: &[T], k: usize) -> Vec<T> {
        let mut dx = vec![T::zero(); y.len()];
        if k == 0 {
            return dx;
        }
        let block = rows_per_task(y.len() / k, k) * k;
        let scale = T::of(self.scale);
        dx.par_chunks_mut(block)
            .zip(y.par_chunks(block))
            .zip(dy.par_chunks(block))
            .for_each(|((dxb, yb), dyb)| {
                for ((dxr, yr), dyr) in dxb.chunks_mut(k).zip(yb.chunks(k)).zip(dyb.chunks(k)) {
                    if self.log {
                        // d/dx log_softmax: dy - softmax * sum(dy).
                        let s: f64 = dyr.iter().map(|v| v.wide()).sum();
                        let s = T::of(s);
                        dxr.copy_from_slice(yr);
                        T::exp_in_place(dxr);
                        for (d, &g) in dxr.iter_mut().zip(dyr) {
                            *d = scale * (g - *d * s);
                        }
                    } else {
                        // d/dx softmax: y * (dy - sum(dy * y)); masked entries have y = 0.
                        let s: f64 = dyr.iter().zip(yr).map(|(&g, &v)| (g * v).wide()).sum();
                        let s = T::of(s);
                        for ((d, &yv), &g) in dxr.iter_mut().zip(yr).zip(dyr) {
                            *d = scale * yv * (g - s);
                        }
                    }
                }
            });
        dx
    }

    pub(crate) fn grad(&self, res: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let k = *res.dims().last().unwrap_or(&1);
        macro_rules! run {
            ($t:ty) => {{
                let dx = with_slice::<$t, _>(res, |ys| {
                    with_slice::<$t, _>(grad, |gs| Ok(self.backward(ys, gs, k)))
                })?;
                tensor_of(dx, res.dims())
            }};
        }
        match res.dtype() {
            candle_core::DType::F64 => run!(f64),
            _ => run!(f32),
        }
    }
}

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "nn-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = l.dims();
        let out = match s {
            CpuStorage::F32(_) => f32::storage(self.forward(f32::slice(s, l)?, dims, None)),
            CpuStorage::F64(_) => f64::storage(self.forward(f64::slice(s, l)?, dims, None)),
            _ => candle_core::bail!("nn-softmax: f32 or f64 input expected"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.grad(res, grad)?))
    }
}

impl CustomOp2 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "nn-softmax-masked"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = l1.dims();
        if l2.dims() != dims {
            candle_core::bail!(
                "nn-softmax: mask shape {:?} differs from input {:?}",
                l2.dims(),
                dims
            )
        }
        let idx = || MaskIndex {
            dims,
            strides: l2.stride(),
            start: l2.start_offset(),
        };
        let out = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(m)) => {
                f32::storage(self.forward(f32::slice(s1, l1)?, dims, Some((m.as_slice(), idx()))))
            }
            (CpuStorage::F64(_), CpuStorage::F64(m)) => {
                f64::storage(self.forward(f64::slice(s1, l1)?, dims, Some((m.as_slice(), idx()))))
            }
            _ => candle_core::bail!(
                "nn-softmax: f32 or f64 input and mask of the same dtype expected"
            ),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _mask: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(self.grad(res, grad)?), None))
    }
}

/// The causal mask's offset `k_len - q_len` for scores of shape `(.., q_len, k_len)`, or
/// `None` without causal masking.
pub(crate) fn causal_offset(dims: &[usize], causal: bool) -> Result<Option<usize>> {
    if !causal {
        return Ok(None);
    }
    if dims.len() < 2 {
        candle_core::bail!("causal softmax needs (.., q_len, k_len) input, got {dims:?}")
    }
    let (q, k) = (dims[dims.len() - 2], dims[dims.len() - 1]);
    if q > k {
        candle_core::bail!("causal attention with q_len {q} > k_len {k}")
    }
    Ok(Some(k - q))
}

/// Fused `softmax(scale * x + mask)` (or log-softmax) over the last dimension, computed in f32
/// (f64 for f64) and returned in the kernel dtype (the caller casts). Rows that are entirely
/// masked give NaN, as in PyTorch.
pub fn softmax_fused(xs: &Tensor, scale: f64, mask: SoftmaxMask, log: bool) -> Result<Tensor> {
    let kdt = kernel_dtype(xs.dtype());
    let causal_offset = causal_offset(xs.dims(), mask.causal)?;
    let op = SoftmaxOp {
        scale,
        causal_offset,
        log,
    };
    let x = xs.to_dtype(kdt)?.contiguous()?;
    match mask.additive {
        None => x.apply_op1(op),
        Some(m) => {
            // The broadcast view keeps stride-0 dimensions, so the mask is never materialised.
            let m = m.to_dtype(kdt)?.broadcast_as(x.shape())?;
            x.apply_op2(&m.detach(), op)
        }
    }
}
