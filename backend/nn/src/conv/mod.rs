//! A fast CPU 2-D convolution with a fast backward pass, as a candle custom op.
//!
//! candle 0.11's CPU conv2d forward is fine, but its backward is slow: the input gradient runs
//! through an unblocked `conv_transpose2d` loop and the kernel gradient through a convolution
//! by the whole output gradient. Training the UNet / VAE on the CPU spends most of its time
//! there. This module computes, with `cols` the im2col matrix of the input
//! (`(C_in*kh*kw, positions)`):
//!
//! * forward: `y = W cols (+ b)` (gemms over groups of samples or bands of rows, see
//!   [`kernel`]), the optional per-channel bias added as the output is written;
//! * backward: `dW = sum g cols^T`, `dx = col2im(W^T g)` and `db` = per-channel sums of `g`.
//!
//! 1x1 / stride 1 / no padding convolutions skip im2col and col2im where a sample's input is
//! its own column matrix.
//!
//! [`conv2d`] / [`conv2d_with`] / [`conv2d_bias`] pick this op on the CPU (f32 / f64; f16 /
//! bf16 computed in f32) for dilation 1 and groups 1, and fall back to candle's
//! `Tensor::conv2d` (plus a broadcast bias add) otherwise (CUDA, grouped or dilated
//! convolutions), so nothing becomes CPU-only.

mod kernel;

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor,
};

use crate::fused::KernelFloat;
use crate::layers::Conv2dConfig;
use kernel::{ConvFloat, Geom, Grads};

/// Sets the column-matrix size limit (elements) for convolutions called from this thread.
/// Results stay correct (the summation order of the kernel gradient may change); tests lower
/// it to exercise the banded path on small images. `usize::MAX` is as good as no limit.
#[doc(hidden)]
pub fn set_max_cols_elems(elems: usize) {
    kernel::set_cols_limit(Some(elems));
}

/// Restores the default column-matrix size limit for this thread.
#[doc(hidden)]
pub fn reset_max_cols_elems() {
    kernel::set_cols_limit(None);
}

/// True when [`conv2d_with`] runs `x` through the fast CPU op rather than candle's conv2d.
pub fn uses_fast_path(x: &Tensor, cfg: &Conv2dConfig) -> bool {
    x.device().is_cpu()
        && cfg.dilation == 1
        && cfg.groups == 1
        && cfg.stride >= 1
        && matches!(
            x.dtype(),
            DType::F32 | DType::F64 | DType::F16 | DType::BF16
        )
}

/// `conv2d(x, w)` with dilation 1 and one group: `x (N, C_in, H, W)`, `w (C_out, C_in, kh, kw)`.
pub fn conv2d(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    conv2d_with(
        x,
        w,
        &Conv2dConfig {
            padding,
            stride,
            dilation: 1,
            groups: 1,
        },
    )
}

/// `conv2d(x, w)` with any [`Conv2dConfig`]: the fast op when [`uses_fast_path`], candle's
/// `Tensor::conv2d` otherwise. `w` is cast to `x`'s dtype by the caller.
pub fn conv2d_with(x: &Tensor, w: &Tensor, cfg: &Conv2dConfig) -> Result<Tensor> {
    conv2d_bias(x, w, None, cfg)
}

/// `conv2d(x, w) + bias` (`bias (C_out,)` broadcast over `(N, C_out, H, W)`). On the fast path
/// the bias is added as the output is written and its gradient comes out of the same backward
/// call, which saves a pass over the output each way and a graph node (candle accumulates
/// every node's gradient with two extra passes).
pub fn conv2d_bias(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    cfg: &Conv2dConfig,
) -> Result<Tensor> {
    if !uses_fast_path(x, cfg) {
        let y = x.conv2d(w, cfg.padding, cfg.stride, cfg.dilation, cfg.groups)?;
        return match bias {
            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?.reshape((1, (), 1, 1))?),
            None => Ok(y),
        };
    }
    let op = FastConv2d {
        padding: cfg.padding,
        stride: cfg.stride,
    };
    // No f16 / bf16 kernels here: compute in f32 and cast back (the casts have backward).
    let kdt = crate::fused::kernel_dtype(x.dtype());
    // The op reads plain row-major slices; `contiguous` is free when already so.
    let xk = x.to_dtype(kdt)?.contiguous()?;
    let wk = w.to_dtype(kdt)?.contiguous()?;
    let y = match bias {
        Some(b) => xk.apply_op3(&wk, &b.to_dtype(kdt)?.contiguous()?, op)?,
        None => xk.apply_op2(&wk, op)?,
    };
    y.to_dtype(x.dtype())
}

/// The custom op: arguments `x (N, C_in, H, W)`, `w (C_out, C_in, kh, kw)` and, as a
/// [`CustomOp3`], `bias (C_out,)`, all contiguous.
#[derive(Debug, Clone, Copy)]
struct FastConv2d {
    padding: usize,
    stride: usize,
}

/// The contiguous slice of a CPU storage under `layout`.
fn slice_of<'a, T: KernelFloat>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    T::slice(s, l)
}

impl FastConv2d {
    fn fwd(
        &self,
        (s1, l1): (&CpuStorage, &Layout),
        (s2, l2): (&CpuStorage, &Layout),
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geom::new(l1.dims(), l2.dims(), self.padding, self.stride)?;
        if let Some((_, lb)) = bias {
            if lb.dims() != [g.o] {
                candle_core::bail!("conv2d: bias {:?} for {} output channels", lb.dims(), g.o)
            }
        }
        fn run<T: ConvFloat>(
            g: &Geom,
            (s1, l1): (&CpuStorage, &Layout),
            (s2, l2): (&CpuStorage, &Layout),
            bias: Option<(&CpuStorage, &Layout)>,
        ) -> Result<CpuStorage> {
            let b = bias.map(|(s, l)| slice_of::<T>(s, l)).transpose()?;
            let y = kernel::forward(g, slice_of(s1, l1)?, slice_of(s2, l2)?, b);
            Ok(T::storage(y))
        }
        let out = match s1 {
            CpuStorage::F32(_) => run::<f32>(&g, (s1, l1), (s2, l2), bias)?,
            CpuStorage::F64(_) => run::<f64>(&g, (s1, l1), (s2, l2), bias)?,
            _ => candle_core::bail!("fast conv2d: unsupported dtype {:?}", s1.dtype()),
        };
        Ok((out, Shape::from((g.n, g.o, g.ho, g.wo))))
    }

    /// `(dx, dw, db)`, each only for an argument that needs a gradient (`db` only with a bias).
    fn grads(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = Geom::new(x.dims(), w.dims(), self.padding, self.stride)?;
        // The gradient arrives in any layout (e.g. broadcast from a sum).
        let grad = grad.contiguous()?;
        // Frozen inputs / kernels (an image, a frozen layer) need no gradient: skip their work.
        let want = (x.track_op(), w.track_op());
        let want_db = bias.is_some_and(|b| b.track_op());
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let (Storage::Cpu(xs), Storage::Cpu(ws), Storage::Cpu(gs)) = (&*xs, &*ws, &*gs) else {
            candle_core::bail!("fast conv2d backward: tensors are not on the CPU")
        };
        fn run<T: ConvFloat>(
            g: &Geom,
            (xs, xl): (&CpuStorage, &Layout),
            (ws, wl): (&CpuStorage, &Layout),
            (gs, gl): (&CpuStorage, &Layout),
            want: (bool, bool, bool),
        ) -> Result<(Grads<T>, Option<Vec<T>>)> {
            let x = slice_of::<T>(xs, xl)?;
            let w = slice_of::<T>(ws, wl)?;
            let grad = slice_of::<T>(gs, gl)?;
            let db = want
                .2
                .then(|| crate::fused::bias::bias_grad(grad, g.n, g.o, g.ho * g.wo));
            Ok((kernel::backward(g, x, w, grad, want.0, want.1), db))
        }
        let dev = x.device();
        let want = (want.0, want.1, want_db);
        let args = ((xs, xl), (ws, wl), (gs, gl));
        macro_rules! wrap {
            ($t:ty) => {{
                let ((dx, dw), db) = run::<$t>(&g, args.0, args.1, args.2, want)?;
                (
                    dx.map(|d| Tensor::from_vec(d, x.shape(), dev))
                        .transpose()?,
                    dw.map(|d| Tensor::from_vec(d, w.shape(), dev))
                        .transpose()?,
                    db.map(|d| Tensor::from_vec(d, g.o, dev)).transpose()?,
                )
            }};
        }
        Ok(match x.dtype() {
            DType::F32 => wrap!(f32),
            DType::F64 => wrap!(f64),
            dt => candle_core::bail!("fast conv2d backward: unsupported dtype {dt:?}"),
        })
    }
}

impl CustomOp2 for FastConv2d {
    fn name(&self) -> &'static str {
        "nn-fast-conv2d"
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

impl CustomOp3 for FastConv2d {
    fn name(&self) -> &'static str {
        "nn-fast-conv2d-bias"
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
