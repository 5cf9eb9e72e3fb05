//! A fast CPU 2-D convolution with a fast backward pass, as a candle custom op.
//!
//! candle 0.11's CPU conv2d forward is fine, but its backward is slow: the input gradient runs
//! through an unblocked `conv_transpose2d` loop and the kernel gradient through a convolution
//! by the whole output gradient. Training the UNet / VAE on the CPU spends most of its time
//! there. This module computes, per sample `n` (`cols_n` is the im2col matrix of `x_n`,
//! `(C_in*kh*kw, H_out*W_out)`):
//!
//! * forward: `y_n = W cols_n` (one gemm, written straight into NCHW);
//! * backward: `dW = sum_n g_n cols_n^T` and `dx_n = col2im(W^T g_n)`.
//!
//! 1x1 / stride 1 / no padding convolutions skip im2col and col2im: the input sample itself is
//! the column matrix. Large images are processed in bands of output rows so that the column
//! buffer stays bounded (SD 1.5 VAE decoders run 3x3 convolutions on 512x512 maps).
//!
//! Threading: with at least as many samples as rayon threads, samples run in parallel, each
//! with single-threaded gemms and a per-thread column buffer; with fewer (inference at batch
//! 1-2), samples run one after the other with multi-threaded gemms.
//!
//! [`conv2d`] / [`conv2d_with`] pick this op on the CPU (f32 / f64; f16 / bf16 computed in f32)
//! for dilation 1 and groups 1, and fall back to candle's `Tensor::conv2d` otherwise (CUDA,
//! grouped or dilated convolutions), so nothing becomes CPU-only.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp2, DType, Layout, Result, Shape, Storage, Tensor, WithDType,
};
use gemm::Parallelism;
use rayon::prelude::*;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::layers::Conv2dConfig;

/// Target size, in elements, of one im2col buffer (a band of output rows): 128K f32 = 512 KiB,
/// so a band stays in the L2 cache while the gemm walks it. Measured on this 2-core EPYC
/// (1 MiB L2 per core) with gemm 0.19, single-threaded 32 x 288 products: 75 GFLOP/s with 256
/// columns, 71 with 512, 40 with 4096, 21 with 16384 (the whole 64x64 frame at once).
static MAX_COLS_ELEMS: AtomicUsize = AtomicUsize::new(1 << 17);

/// A band is never narrower than this many output columns (unless the limit is smaller), so
/// the deep kernels of large models still give the gemm a useful panel width.
const MIN_BAND_COLS: usize = 256;

/// Sets the im2col band size limit (elements). Results do not depend on it; tests lower it to
/// exercise the banded path on small images.
#[doc(hidden)]
pub fn set_max_cols_elems(elems: usize) {
    MAX_COLS_ELEMS.store(elems.max(1), Ordering::Relaxed);
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
    if !uses_fast_path(x, cfg) {
        return x.conv2d(w, cfg.padding, cfg.stride, cfg.dilation, cfg.groups);
    }
    let op = FastConv2d {
        padding: cfg.padding,
        stride: cfg.stride,
    };
    match x.dtype() {
        DType::F32 | DType::F64 => {
            // The op reads plain row-major slices; `contiguous` is free when already so.
            x.contiguous()?
                .apply_op2(&w.to_dtype(x.dtype())?.contiguous()?, op)
        }
        // No f16 / bf16 kernels here: compute in f32 and cast back (the casts have backward).
        dt => x
            .to_dtype(DType::F32)?
            .contiguous()?
            .apply_op2(&w.to_dtype(DType::F32)?.contiguous()?, op)?
            .to_dtype(dt),
    }
}

/// The custom op: arguments `x (N, C_in, H, W)` and `w (C_out, C_in, kh, kw)`, both contiguous.
#[derive(Debug, Clone, Copy)]
struct FastConv2d {
    padding: usize,
    stride: usize,
}

/// Sizes of one convolution.
#[derive(Debug, Clone, Copy)]
struct Geom {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    kh: usize,
    kw: usize,
    pad: usize,
    stride: usize,
    ho: usize,
    wo: usize,
}

impl Geom {
    fn new(x: &[usize], w: &[usize], pad: usize, stride: usize) -> Result<Self> {
        let (&[n, c, h, wd], &[o, ci, kh, kw]) = (x, w) else {
            candle_core::bail!("conv2d: expected 4-d input and kernel, got {x:?} and {w:?}")
        };
        if c != ci {
            candle_core::bail!("conv2d: input has {c} channels, kernel expects {ci} ({w:?})")
        }
        if stride == 0 || kh == 0 || kw == 0 || h + 2 * pad < kh || wd + 2 * pad < kw {
            candle_core::bail!(
                "conv2d: kernel {kh}x{kw} (padding {pad}, stride {stride}) does not fit input {x:?}"
            )
        }
        Ok(Self {
            n,
            c,
            h,
            w: wd,
            o,
            kh,
            kw,
            pad,
            stride,
            ho: (h + 2 * pad - kh) / stride + 1,
            wo: (wd + 2 * pad - kw) / stride + 1,
        })
    }

    /// Rows of the column matrix: `C_in * kh * kw`.
    fn ckk(&self) -> usize {
        self.c * self.kh * self.kw
    }
    fn in_len(&self) -> usize {
        self.c * self.h * self.w
    }
    fn out_len(&self) -> usize {
        self.o * self.ho * self.wo
    }
    /// The input is its own column matrix (1x1, stride 1, no padding).
    fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0
    }
    /// Output rows per im2col band.
    fn band_rows(&self) -> usize {
        let limit = MAX_COLS_ELEMS.load(Ordering::Relaxed);
        let cols = (limit / self.ckk().max(1)).max(MIN_BAND_COLS.min(limit));
        (cols / self.wo.max(1)).clamp(1, self.ho)
    }
    /// Range of `ox` whose input column `ox * stride + kx - pad` lies inside `[0, W)`.
    fn valid_ox(&self, kx: usize) -> (usize, usize) {
        let (s, p) = (self.stride, self.pad);
        let lo = if kx >= p { 0 } else { (p - kx).div_ceil(s) };
        let hi = if self.w + p > kx {
            ((self.w + p - kx - 1) / s + 1).min(self.wo)
        } else {
            0
        };
        (lo.min(hi), hi)
    }
}

/// Fills `cols` (`ckk` rows of `(oy1 - oy0) * wo`) with the patches of output rows
/// `oy0..oy1` of one sample `x` (`C_in, H, W`). Parallel over channels when `par`.
fn im2col<T: WithDType>(g: &Geom, x: &[T], oy0: usize, oy1: usize, cols: &mut [T], par: bool) {
    let band = (oy1 - oy0) * g.wo;
    let per_channel = g.kh * g.kw * band;
    let fill = |(c, dst): (usize, &mut [T])| {
        let xc = &x[c * g.h * g.w..(c + 1) * g.h * g.w];
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                let row = &mut dst[(ky * g.kw + kx) * band..(ky * g.kw + kx + 1) * band];
                let (lo, hi) = g.valid_ox(kx);
                for oy in oy0..oy1 {
                    let seg = &mut row[(oy - oy0) * g.wo..(oy - oy0 + 1) * g.wo];
                    let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                    if iy < 0 || iy >= g.h as isize {
                        seg.fill(T::zero());
                        continue;
                    }
                    let xr = &xc[iy as usize * g.w..(iy as usize + 1) * g.w];
                    seg[..lo].fill(T::zero());
                    seg[hi..].fill(T::zero());
                    if hi > lo {
                        // First input column read; `lo` was chosen so this is >= 0.
                        let ix0 = lo * g.stride + kx - g.pad;
                        if g.stride == 1 {
                            seg[lo..hi].copy_from_slice(&xr[ix0..ix0 + hi - lo]);
                        } else {
                            for (d, s) in seg[lo..hi]
                                .iter_mut()
                                .zip(xr[ix0..].iter().step_by(g.stride))
                            {
                                *d = *s;
                            }
                        }
                    }
                }
            }
        }
    };
    let cols = &mut cols[..g.c * per_channel];
    if par {
        cols.par_chunks_mut(per_channel).enumerate().for_each(fill);
    } else {
        cols.chunks_mut(per_channel).enumerate().for_each(fill);
    }
}

/// The adjoint of [`im2col`]: adds the column gradients of output rows `oy0..oy1` into one
/// sample's input gradient `dx` (`C_in, H, W`). Parallel over channels when `par`.
fn col2im<T: WithDType>(g: &Geom, cols: &[T], oy0: usize, oy1: usize, dx: &mut [T], par: bool) {
    let band = (oy1 - oy0) * g.wo;
    let per_channel = g.kh * g.kw * band;
    let add = |(c, dxc): (usize, &mut [T])| {
        let src = &cols[c * per_channel..(c + 1) * per_channel];
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                let row = &src[(ky * g.kw + kx) * band..(ky * g.kw + kx + 1) * band];
                let (lo, hi) = g.valid_ox(kx);
                if hi <= lo {
                    continue;
                }
                for oy in oy0..oy1 {
                    let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                    if iy < 0 || iy >= g.h as isize {
                        continue;
                    }
                    let seg = &row[(oy - oy0) * g.wo + lo..(oy - oy0) * g.wo + hi];
                    let dr = &mut dxc[iy as usize * g.w..(iy as usize + 1) * g.w];
                    let ix0 = lo * g.stride + kx - g.pad;
                    for (d, s) in dr[ix0..].iter_mut().step_by(g.stride).zip(seg) {
                        *d += *s;
                    }
                }
            }
        }
    };
    let dx = &mut dx[..g.in_len()];
    if par {
        dx.par_chunks_mut(g.h * g.w).enumerate().for_each(add);
    } else {
        dx.chunks_mut(g.h * g.w).enumerate().for_each(add);
    }
}

/// A borrowed `rows x cols` matrix view for [`matmul`]: element `(i, j)` at
/// `data[i * rs + j * cs]`. Only built by the constructors, which check that every element
/// lies inside the borrowed slice.
#[derive(Clone, Copy)]
struct Mat<'a, T> {
    data: &'a [T],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a, T> Mat<'a, T> {
    fn new(data: &'a [T], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        if rows > 0 && cols > 0 {
            assert!((rows - 1) * rs + (cols - 1) * cs < data.len());
        }
        Self {
            data,
            rows,
            cols,
            rs,
            cs,
        }
    }
    /// A row-major `rows x cols` slice.
    fn rows(data: &'a [T], rows: usize, cols: usize) -> Self {
        Self::new(data, rows, cols, cols, 1)
    }
    /// The `cols x rows` transpose of a row-major `rows x cols` slice.
    fn rows_t(data: &'a [T], rows: usize, cols: usize) -> Self {
        Self::new(data, cols, rows, 1, cols)
    }
}

/// `dst (m x n, row stride dst_rs) = lhs (m x k) * rhs (k x n)` (+ `dst` when `accumulate`).
#[allow(clippy::too_many_arguments)]
fn matmul<T: WithDType>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    dst_rs: usize,
    lhs: Mat<T>,
    rhs: Mat<T>,
    accumulate: bool,
    par: Parallelism,
) {
    assert!(T::DTYPE == DType::F32 || T::DTYPE == DType::F64);
    assert!((lhs.rows, lhs.cols, rhs.rows, rhs.cols) == (m, k, k, n));
    if m == 0 || n == 0 {
        return;
    }
    assert!(n <= dst_rs && (m - 1) * dst_rs + n <= dst.len());
    if k == 0 {
        if !accumulate {
            dst.fill(T::zero());
        }
        return;
    }
    // SAFETY: gemm reads lhs.data[i*rs + l*cs] for i < m, l < k and rhs.data likewise for
    // l < k, j < n: inside those slices, checked by `Mat::new` with the shapes asserted
    // equal above. It writes dst[i*dst_rs + j] for i < m, j < n: inside `dst` (asserted
    // above), which is borrowed mutably and so aliases neither input. T is f32 or f64
    // (asserted), both supported by gemm. With read_dst = false gemm does not read dst.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            T::one(),
            T::one(),
            false,
            false,
            false,
            par,
        )
    }
}

/// Gemm threading for work on one sample: all rayon threads when samples run serially.
fn sample_parallelism(serial_samples: bool) -> Parallelism {
    if serial_samples {
        Parallelism::Rayon(rayon::current_num_threads())
    } else {
        Parallelism::None
    }
}

/// Whether to run samples one after the other (each using every thread) rather than in
/// parallel.
fn serial_samples(g: &Geom) -> bool {
    g.n < rayon::current_num_threads()
}

/// Forward pass of one sample into `y` (`C_out, H_out*W_out`); `cols` is scratch.
fn forward_sample<T: WithDType>(
    g: &Geom,
    x: &[T],
    w: &[T],
    y: &mut [T],
    cols: &mut Vec<T>,
    serial: bool,
) {
    let (ckk, howo) = (g.ckk(), g.ho * g.wo);
    let par = sample_parallelism(serial);
    if g.is_pointwise() {
        let wm = Mat::rows(w, g.o, ckk);
        matmul(
            g.o,
            howo,
            ckk,
            y,
            howo,
            wm,
            Mat::rows(x, ckk, howo),
            false,
            par,
        );
        return;
    }
    let rows = g.band_rows();
    cols.resize(ckk * rows * g.wo, T::zero());
    for oy0 in (0..g.ho).step_by(rows) {
        let oy1 = (oy0 + rows).min(g.ho);
        let band = (oy1 - oy0) * g.wo;
        im2col(g, x, oy0, oy1, cols, serial);
        // Output columns oy0*wo.. of every channel row: dst row stride stays H_out*W_out.
        matmul(
            g.o,
            band,
            ckk,
            &mut y[oy0 * g.wo..],
            howo,
            Mat::rows(w, g.o, ckk),
            Mat::rows(cols, ckk, band),
            false,
            par,
        );
    }
}

fn forward<T: WithDType>(g: &Geom, x: &[T], w: &[T]) -> Vec<T> {
    let mut y = vec![T::zero(); g.n * g.out_len()];
    if g.out_len() == 0 {
        return y;
    }
    let serial = serial_samples(g);
    let run = |cols: &mut Vec<T>, (i, y_n): (usize, &mut [T])| {
        let x_n = &x[i * g.in_len()..(i + 1) * g.in_len()];
        forward_sample(g, x_n, w, y_n, cols, serial)
    };
    if serial {
        let mut cols = Vec::new();
        y.chunks_mut(g.out_len())
            .enumerate()
            .for_each(|item| run(&mut cols, item));
    } else {
        y.par_chunks_mut(g.out_len())
            .enumerate()
            .for_each_init(Vec::new, run);
    }
    y
}

/// Backward pass of one sample: adds `g_n cols_n^T` into `dw` and writes `col2im(W^T g_n)`
/// into `dx` (zero on entry), each only when given. `cols` / `dcols` are scratch.
#[allow(clippy::too_many_arguments)]
fn backward_sample<T: WithDType>(
    g: &Geom,
    x: &[T],
    w: &[T],
    grad: &[T],
    dw: Option<&mut [T]>,
    dx: Option<&mut [T]>,
    cols: &mut Vec<T>,
    dcols: &mut Vec<T>,
    serial: bool,
) {
    let (ckk, howo) = (g.ckk(), g.ho * g.wo);
    let par = sample_parallelism(serial);
    let wt = Mat::rows_t(w, g.o, ckk);
    if g.is_pointwise() {
        let gm = Mat::rows(grad, g.o, howo);
        if let Some(dw) = dw {
            matmul(
                g.o,
                ckk,
                howo,
                dw,
                ckk,
                gm,
                Mat::rows_t(x, ckk, howo),
                true,
                par,
            );
        }
        if let Some(dx) = dx {
            matmul(ckk, howo, g.o, dx, howo, wt, gm, false, par);
        }
        return;
    }
    let rows = g.band_rows();
    cols.resize(ckk * rows * g.wo, T::zero());
    if dx.is_some() {
        dcols.resize(ckk * rows * g.wo, T::zero());
    }
    let (mut dw, mut dx) = (dw, dx);
    for oy0 in (0..g.ho).step_by(rows) {
        let oy1 = (oy0 + rows).min(g.ho);
        let band = (oy1 - oy0) * g.wo;
        // The band's columns of g_n (O x band, row stride H_out*W_out).
        let g_band = Mat::new(&grad[oy0 * g.wo..], g.o, band, howo, 1);
        im2col(g, x, oy0, oy1, cols, serial);
        if let Some(dw) = dw.as_deref_mut() {
            let cols_t = Mat::rows_t(cols, ckk, band);
            matmul(g.o, ckk, band, dw, ckk, g_band, cols_t, true, par);
        }
        if let Some(dx) = dx.as_deref_mut() {
            matmul(ckk, band, g.o, dcols, band, wt, g_band, false, par);
            col2im(g, dcols, oy0, oy1, dx, serial);
        }
    }
}

/// `(dx, dw)` of one backward pass.
type Grads<T> = (Option<Vec<T>>, Option<Vec<T>>);

/// Returns `(dx, dw)`, each `None` when not wanted (that argument needs no gradient).
fn backward<T: WithDType>(
    g: &Geom,
    x: &[T],
    w: &[T],
    grad: &[T],
    want_dx: bool,
    want_dw: bool,
) -> Grads<T> {
    let dw_len = if want_dw { g.o * g.ckk() } else { 0 };
    let mut dx = want_dx.then(|| vec![T::zero(); g.n * g.in_len()]);
    let done = |dx, dw: Vec<T>| (dx, want_dw.then_some(dw));
    if g.out_len() == 0 || g.in_len() == 0 {
        return done(dx, vec![T::zero(); dw_len]);
    }
    let serial = serial_samples(g);
    let x_n = |i: usize| &x[i * g.in_len()..(i + 1) * g.in_len()];
    let g_n = |i: usize| &grad[i * g.out_len()..(i + 1) * g.out_len()];
    if serial {
        let (mut dw, mut cols, mut dcols) = (vec![T::zero(); dw_len], Vec::new(), Vec::new());
        for i in 0..g.n {
            let dx_n = dx
                .as_mut()
                .map(|d| &mut d[i * g.in_len()..(i + 1) * g.in_len()]);
            let dw_n = want_dw.then_some(&mut dw[..]);
            backward_sample(
                g,
                x_n(i),
                w,
                g_n(i),
                dw_n,
                dx_n,
                &mut cols,
                &mut dcols,
                true,
            );
        }
        return done(dx, dw);
    }
    // Samples go in a fixed number of contiguous chunks, each with its own dW accumulator, and
    // the partial sums are added in chunk order: a rayon fold / reduce tree depends on work
    // stealing, and a resumed training run must reproduce the same bits.
    let chunk = g.n.div_ceil(g.n.min(DW_CHUNKS)).max(1);
    let run_chunk = |(ci, dx_chunk): (usize, Option<&mut [T]>)| -> Vec<T> {
        let (mut dw, mut cols, mut dcols) = (vec![T::zero(); dw_len], Vec::new(), Vec::new());
        let first = ci * chunk;
        let last = (first + chunk).min(g.n);
        let mut dx_chunk = dx_chunk;
        for i in first..last {
            let dx_n = dx_chunk
                .as_deref_mut()
                .map(|d| &mut d[(i - first) * g.in_len()..(i - first + 1) * g.in_len()]);
            let dw_n = want_dw.then_some(&mut dw[..]);
            backward_sample(
                g,
                x_n(i),
                w,
                g_n(i),
                dw_n,
                dx_n,
                &mut cols,
                &mut dcols,
                false,
            );
        }
        dw
    };
    let partials: Vec<Vec<T>> = match dx.as_mut() {
        Some(d) => d
            .par_chunks_mut(chunk * g.in_len())
            .enumerate()
            .map(|(ci, c)| run_chunk((ci, Some(c))))
            .collect(),
        None => (0..g.n.div_ceil(chunk))
            .into_par_iter()
            .map(|ci| run_chunk((ci, None)))
            .collect(),
    };
    let mut dw = vec![T::zero(); dw_len];
    for p in &partials {
        for (s, t) in dw.iter_mut().zip(p) {
            *s += *t;
        }
    }
    done(dx, dw)
}

/// Sample chunks of the parallel backward pass (each keeps a dW accumulator).
const DW_CHUNKS: usize = 16;

/// The contiguous slice of a CPU storage under `layout`.
fn slice_of<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!(
            "fast conv2d: non-contiguous argument (shape {:?})",
            l.shape()
        )
    };
    Ok(&s.as_slice::<T>()?[start..end])
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
        let g = Geom::new(l1.dims(), l2.dims(), self.padding, self.stride)?;
        let shape = Shape::from((g.n, g.o, g.ho, g.wo));
        let out = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => {
                CpuStorage::F32(forward(&g, slice_of(s1, l1)?, slice_of(s2, l2)?))
            }
            (CpuStorage::F64(_), CpuStorage::F64(_)) => {
                CpuStorage::F64(forward(&g, slice_of(s1, l1)?, slice_of(s2, l2)?))
            }
            _ => candle_core::bail!(
                "fast conv2d: unsupported dtypes {:?} / {:?}",
                s1.dtype(),
                s2.dtype()
            ),
        };
        Ok((out, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = Geom::new(x.dims(), w.dims(), self.padding, self.stride)?;
        // The gradient arrives in any layout (e.g. broadcast from a sum).
        let grad = grad.contiguous()?;
        // Frozen inputs / kernels (an image, a frozen layer) need no gradient: skip their work.
        let want = (x.track_op(), w.track_op());
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let (Storage::Cpu(xs), Storage::Cpu(ws), Storage::Cpu(gs)) = (&*xs, &*ws, &*gs) else {
            candle_core::bail!("fast conv2d backward: tensors are not on the CPU")
        };
        fn run<T: WithDType>(
            g: &Geom,
            (xs, xl): (&CpuStorage, &Layout),
            (ws, wl): (&CpuStorage, &Layout),
            (gs, gl): (&CpuStorage, &Layout),
            want: (bool, bool),
        ) -> Result<Grads<T>> {
            let x = slice_of::<T>(xs, xl)?;
            let w = slice_of::<T>(ws, wl)?;
            let grad = slice_of::<T>(gs, gl)?;
            Ok(backward(g, x, w, grad, want.0, want.1))
        }
        let dev = x.device();
        let (xshape, wshape) = (x.shape().clone(), w.shape().clone());
        let args = ((xs, xl), (ws, wl), (gs, gl));
        let (dx, dw) = match x.dtype() {
            DType::F32 => {
                let (dx, dw) = run::<f32>(&g, args.0, args.1, args.2, want)?;
                (
                    dx.map(|d| Tensor::from_vec(d, xshape, dev)).transpose()?,
                    dw.map(|d| Tensor::from_vec(d, wshape, dev)).transpose()?,
                )
            }
            DType::F64 => {
                let (dx, dw) = run::<f64>(&g, args.0, args.1, args.2, want)?;
                (
                    dx.map(|d| Tensor::from_vec(d, xshape, dev)).transpose()?,
                    dw.map(|d| Tensor::from_vec(d, wshape, dev)).transpose()?,
                )
            }
            dt => candle_core::bail!("fast conv2d backward: unsupported dtype {dt:?}"),
        };
        Ok((dx, dw))
    }
}
