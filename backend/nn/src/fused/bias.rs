//! `x + b` for a per-channel bias on `(N, C, *)` activations (convolution outputs), threaded,
//! with a backward that sums the bias gradient per channel in one pass. candle's broadcast add
//! reduces that gradient over `(N, H, W)` single-threaded, which cost ~9% of a VAE step.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{kernel_dtype, tensor_of, with_slice, KernelFloat};

#[derive(Debug, Clone, Copy)]
struct ChannelBiasOp;

fn dims(shape: &Shape) -> Result<(usize, usize, usize)> {
    let d = shape.dims();
    if d.len() < 2 {
        candle_core::bail!("channel bias expects (N, C, *) input, got {d:?}")
    }
    Ok((d[0], d[1], d[2..].iter().product()))
}

fn forward<T: KernelFloat>(x: &[T], b: &[T], c: usize, s: usize) -> Vec<T> {
    let mut y = vec![T::zero(); x.len()];
    if s == 0 {
        return y;
    }
    y.par_chunks_mut(s)
        .zip(x.par_chunks(s))
        .enumerate()
        .for_each(|(nc, (yr, xr))| {
            let bias = b[nc % c];
            yr.iter_mut().zip(xr).for_each(|(y, &x)| *y = x + bias);
        });
    y
}

/// Per-channel sums of `g` (`(N, C, S)`), added over samples in order (also the fast conv's
/// bias gradient).
pub(crate) fn bias_grad<T: KernelFloat>(g: &[T], n: usize, c: usize, s: usize) -> Vec<T> {
    let per_plane: Vec<f64> = if s == 0 {
        vec![0.0; n * c]
    } else {
        g.par_chunks(s)
            .map(|p| p.iter().map(|v| v.wide()).sum::<f64>())
            .collect()
    };
    (0..c)
        .map(|ch| T::of((0..n).map(|i| per_plane[i * c + ch]).sum::<f64>()))
        .collect()
}

impl CustomOp2 for ChannelBiasOp {
    fn name(&self) -> &'static str {
        "nn-channel-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, c, s) = dims(l1.shape())?;
        if l2.dims() != [c] {
            candle_core::bail!("channel bias: bias {:?} for {c} channels", l2.dims())
        }
        let out = match s1 {
            CpuStorage::F32(_) => {
                f32::storage(forward(f32::slice(s1, l1)?, f32::slice(s2, l2)?, c, s))
            }
            CpuStorage::F64(_) => {
                f64::storage(forward(f64::slice(s1, l1)?, f64::slice(s2, l2)?, c, s))
            }
            _ => candle_core::bail!("nn-channel-bias: f32 or f64 input expected"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, c, s) = dims(x.shape())?;
        let db = match x.dtype() {
            candle_core::DType::F64 => tensor_of(
                with_slice::<f64, _>(grad, |g| Ok(bias_grad(g, n, c, s)))?,
                &[c],
            )?,
            _ => tensor_of(
                with_slice::<f32, _>(grad, |g| Ok(bias_grad(g, n, c, s)))?,
                &[c],
            )?,
        };
        Ok((Some(grad.clone()), Some(db)))
    }
}

/// `x + b` with `b: (C,)` broadcast over `(N, C, *)`, computed in f32 (f64 for f64) and cast
/// back; differentiable in both.
pub fn channel_bias_fused(xs: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let dtype = xs.dtype();
    let kdt = kernel_dtype(dtype);
    xs.to_dtype(kdt)?
        .contiguous()?
        .apply_op2(&bias.to_dtype(kdt)?.contiguous()?, ChannelBiasOp)?
        .to_dtype(dtype)
}
