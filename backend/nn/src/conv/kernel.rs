//! The arithmetic of the fast conv2d on plain row-major slices: geometry, the work plan,
//! im2col / col2im and the gemm-based forward and backward passes.
//!
//! Work is cut into *units*. A unit is either a group of whole samples whose column matrices
//! sit side by side (small maps: at 8x8 one sample gives a gemm only 64 columns, a group of
//! four gives 256), or a single large sample cut into bands of output rows so that the column
//! buffer stays near the L2 cache size. Units run in parallel, each with single-threaded
//! gemms, unless there are fewer units than threads (inference at batch 1): then units run one
//! after the other with threaded gemms and im2col / col2im threaded over channels.
//!
//! Determinism: the plan depends only on the geometry, never on the thread count, and the
//! kernel gradient is accumulated per fixed chunk of units and the chunks added in order. gemm
//! splits its work over output blocks only, never over the reduction, so a result is the same
//! bits whatever the number of threads (a resumed training run must reproduce the same bits).

use rayon::prelude::*;
use std::cell::Cell;

use crate::fused::KernelFloat;
use crate::sgemm::{matmul, matmul_lhs, Lhs, Mat};

/// Target size, in elements, of one column matrix: 128K f32 = 512 KiB, so it stays in the L2
/// cache while the gemm walks it. Measured on this 2-core EPYC (1 MiB L2 per core) with gemm
/// 0.19, single-threaded 32 x 288 products: 75 GFLOP/s with 256 columns, 71 with 512, 40 with
/// 4096, 21 with 16384 (a whole 64x64 frame at once).
const MAX_COLS_ELEMS: usize = 1 << 17;

/// A unit never has fewer columns than this (unless the limit is smaller), so the deep kernels
/// of large models still give the gemm a useful panel width.
const MIN_BAND_COLS: usize = 256;

/// Kernel-gradient chunks of the backward pass: each keeps its own partial sum.
const DW_CHUNKS: usize = 16;

/// At most this many elements in all kernel-gradient partial sums together (SD-sized kernels
/// are 15M elements: they get fewer chunks rather than a gigabyte of partials).
const DW_PARTIALS_BUDGET: usize = 1 << 24;

thread_local! {
    /// Test override of [`MAX_COLS_ELEMS`] for the calling thread.
    static COLS_LIMIT: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Overrides the column-matrix size limit (elements) for convolutions called from this thread;
/// `None` restores the default. Results stay correct; tests lower it to exercise bands.
pub(super) fn set_cols_limit(elems: Option<usize>) {
    COLS_LIMIT.with(|c| c.set(elems.map(|e| e.max(1))));
}

/// Sizes of one convolution.
#[derive(Debug, Clone, Copy)]
pub(super) struct Geom {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub o: usize,
    pub kh: usize,
    pub kw: usize,
    pub pad: usize,
    pub stride: usize,
    pub ho: usize,
    pub wo: usize,
}

impl Geom {
    pub fn new(x: &[usize], w: &[usize], pad: usize, stride: usize) -> candle_core::Result<Self> {
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
    pub fn ckk(&self) -> usize {
        self.c * self.kh * self.kw
    }
    pub fn in_len(&self) -> usize {
        self.c * self.h * self.w
    }
    /// Output positions per channel: `H_out * W_out`.
    fn plane(&self) -> usize {
        self.ho * self.wo
    }
    pub fn out_len(&self) -> usize {
        self.o * self.plane()
    }
    /// The input is its own column matrix (1x1, stride 1, no padding).
    fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0
    }
    /// Stride 1 with `W_out == W` (3x3 / padding 1 and the like): a band of output rows of one
    /// kernel tap is one contiguous run of the input plane, shifted by `kx - pad`, except for
    /// the `pad` columns at each row end that wrap into the neighbouring row.
    fn is_row_shift(&self) -> bool {
        self.stride == 1 && self.wo == self.w
    }
    /// Output rows `oy` of `oy0..oy1` whose input row `oy + ky - pad` lies inside `[0, H)`
    /// (stride 1).
    fn valid_oy(&self, ky: usize, (oy0, oy1): (usize, usize)) -> (usize, usize) {
        let lo = self.pad.saturating_sub(ky).clamp(oy0, oy1);
        let hi = (self.h + self.pad).saturating_sub(ky).clamp(lo, oy1);
        (lo, hi)
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

/// How one call is cut into units (see the module comment).
#[derive(Debug, Clone, Copy)]
struct Plan {
    /// Samples per unit.
    group: usize,
    /// Output rows per band; `ho` (one band) whenever `group > 1`.
    band_rows: usize,
    /// Units one after the other with threaded gemms (fewer units than threads).
    serial: bool,
}

impl Plan {
    fn new(g: &Geom) -> Self {
        let limit = COLS_LIMIT.with(Cell::get).unwrap_or(MAX_COLS_ELEMS);
        let target = (limit / g.ckk().max(1))
            .max(MIN_BAND_COLS.min(limit))
            .max(1);
        let (group, band_rows) = if g.plane() >= target || g.n <= 1 {
            let rows = if g.is_pointwise() {
                g.ho
            } else {
                (target / g.wo).clamp(1, g.ho)
            };
            (1, rows)
        } else {
            ((target / g.plane()).clamp(1, g.n), g.ho)
        };
        Self {
            group,
            band_rows,
            serial: g.n.div_ceil(group) < rayon::current_num_threads(),
        }
    }

    fn units(&self, g: &Geom) -> usize {
        g.n.div_ceil(self.group)
    }

    /// Samples `s0..s1` of unit `u`.
    fn samples(&self, g: &Geom, u: usize) -> (usize, usize) {
        (u * self.group, ((u + 1) * self.group).min(g.n))
    }

    /// Output row bands `oy0..oy1`.
    fn bands(&self, g: &Geom) -> impl Iterator<Item = (usize, usize)> {
        let (rows, ho) = (self.band_rows, g.ho);
        (0..ho)
            .step_by(rows)
            .map(move |oy0| (oy0, (oy0 + rows).min(ho)))
    }

    /// Threads per gemm: all of them when units run one after the other.
    fn gemm_threads(&self) -> usize {
        if self.serial {
            rayon::current_num_threads()
        } else {
            1
        }
    }
}

/// Per-thread scratch buffers, kept between calls: a fresh multi-megabyte buffer per call
/// costs page faults that show in profiles.
#[derive(Default)]
pub(super) struct Scratch<T> {
    cols: Vec<T>,
    dcols: Vec<T>,
    tmp: Vec<T>,
}

/// The float types the convolution runs in, each with its thread-local [`Scratch`].
pub(super) trait ConvFloat: KernelFloat {
    /// Runs `f` with this thread's scratch (taken out of the thread-local for the duration, so
    /// a nested call, e.g. from rayon work stealing, just starts with empty buffers).
    fn with_scratch<R>(f: impl FnOnce(&mut Scratch<Self>) -> R) -> R;
}

macro_rules! conv_float {
    ($t:ty, $key:ident) => {
        thread_local! {
            static $key: Cell<Scratch<$t>> = Cell::new(Scratch::default());
        }
        impl ConvFloat for $t {
            fn with_scratch<R>(f: impl FnOnce(&mut Scratch<Self>) -> R) -> R {
                let mut s = $key.with(Cell::take);
                let r = f(&mut s);
                $key.with(|c| c.set(s));
                r
            }
        }
    };
}
conv_float!(f32, SCRATCH_F32);
conv_float!(f64, SCRATCH_F64);

/// Fills `cols` (`ckk` rows of `ld = (s1 - s0) * band` columns, sample after sample) with the
/// patches of output rows `oy0..oy1` of samples `s0..s1` of `x` (`N, C_in, H, W`). Parallel
/// over channels when `par`.
#[allow(clippy::too_many_arguments)]
fn im2col<T: KernelFloat>(
    g: &Geom,
    x: &[T],
    (s0, s1): (usize, usize),
    (oy0, oy1): (usize, usize),
    cols: &mut Vec<T>,
    par: bool,
) {
    let band = (oy1 - oy0) * g.wo;
    let ld = (s1 - s0) * band;
    cols.resize(g.ckk() * ld, T::zero());
    let fill = |(c, block): (usize, &mut [T])| {
        for s in s0..s1 {
            let xc = &x[s * g.in_len() + c * g.h * g.w..][..g.h * g.w];
            for ky in 0..g.kh {
                for kx in 0..g.kw {
                    let row = &mut block[(ky * g.kw + kx) * ld + (s - s0) * band..][..band];
                    let (lo, hi) = g.valid_ox(kx);
                    if g.is_row_shift() {
                        // One copy of the whole run, then the wrapped columns zeroed.
                        let (ylo, yhi) = g.valid_oy(ky, (oy0, oy1));
                        row[..(ylo - oy0) * g.wo].fill(T::zero());
                        row[(yhi - oy0) * g.wo..].fill(T::zero());
                        let run = &mut row[(ylo - oy0) * g.wo..(yhi - oy0) * g.wo];
                        let start = ((ylo + ky - g.pad) * g.w + kx) as isize - g.pad as isize;
                        shifted(run, xc, start, |d, s| *d = s, T::zero());
                        for r in run.chunks_exact_mut(g.w) {
                            r[..lo].fill(T::zero());
                            r[hi..].fill(T::zero());
                        }
                        continue;
                    }
                    for oy in oy0..oy1 {
                        let seg = &mut row[(oy - oy0) * g.wo..][..g.wo];
                        let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                        if iy < 0 || iy >= g.h as isize {
                            seg.fill(T::zero());
                            continue;
                        }
                        let xr = &xc[iy as usize * g.w..][..g.w];
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
        }
    };
    let per_channel = g.kh * g.kw * ld;
    if per_channel == 0 {
        return;
    }
    if par {
        cols.par_chunks_mut(per_channel).enumerate().for_each(fill);
    } else {
        cols.chunks_mut(per_channel).enumerate().for_each(fill);
    }
}

/// `f(dst[i], src[start + i])` for the `i` with `start + i` inside `src`; the other `dst`
/// elements get `fill`.
fn shifted<T: Copy>(dst: &mut [T], src: &[T], start: isize, f: impl Fn(&mut T, T), fill: T) {
    let d0 = (-start).clamp(0, dst.len() as isize) as usize;
    let s0 = (start.max(0) as usize).min(src.len());
    let len = (dst.len() - d0).min(src.len() - s0);
    dst[..d0].iter_mut().for_each(|d| *d = fill);
    for (d, &v) in dst[d0..d0 + len].iter_mut().zip(&src[s0..s0 + len]) {
        f(d, v);
    }
    dst[d0 + len..].iter_mut().for_each(|d| *d = fill);
}

/// `dst[start + i] += run[i]` (through `add`) for the `i` with `start + i` inside `dst`.
fn add_shifted<T: Copy>(dst: &mut [T], run: &[T], start: isize, add: &mut impl FnMut(&mut T, T)) {
    let r0 = (-start).clamp(0, run.len() as isize) as usize;
    let d0 = (start.max(0) as usize).min(dst.len());
    let len = (run.len() - r0).min(dst.len() - d0);
    for (d, &v) in dst[d0..d0 + len].iter_mut().zip(&run[r0..r0 + len]) {
        add(d, v);
    }
}

/// Zeroes, in column gradients laid out as [`im2col`] writes them, the entries of columns
/// that lie in the padding (`ox` outside `valid_ox`): with [`Geom::is_row_shift`], [`col2im`]
/// adds whole runs and these would otherwise land in the neighbouring input row.
fn zero_wrapped_columns<T: KernelFloat>(g: &Geom, cols: &mut [T], ld: usize, par: bool) {
    let per_channel = g.kh * g.kw * ld;
    let zero = |block: &mut [T]| {
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                let (lo, hi) = g.valid_ox(kx);
                if lo == 0 && hi == g.wo {
                    continue;
                }
                let row = &mut block[(ky * g.kw + kx) * ld..][..ld];
                for r in row.chunks_exact_mut(g.wo) {
                    r[..lo].fill(T::zero());
                    r[hi..].fill(T::zero());
                }
            }
        }
    };
    if per_channel == 0 {
        return;
    }
    let cols = &mut cols[..g.c * per_channel];
    if par {
        cols.par_chunks_mut(per_channel).for_each(zero);
    } else {
        cols.chunks_mut(per_channel).for_each(zero);
    }
}

/// The adjoint of [`im2col`]: adds the column gradients of output rows `oy0..oy1` of samples
/// `s0..s1` into `dx` (those samples' input gradients, `(s1 - s0, C_in, H, W)`). Parallel over
/// input planes when `par`.
fn col2im<T: KernelFloat>(
    g: &Geom,
    cols: &[T],
    (s0, s1): (usize, usize),
    (oy0, oy1): (usize, usize),
    dx: &mut [T],
    par: bool,
) {
    let band = (oy1 - oy0) * g.wo;
    let ld = (s1 - s0) * band;
    let add = |(i, plane): (usize, &mut [T])| {
        let (s, c) = (i / g.c, i % g.c);
        let block = &cols[c * g.kh * g.kw * ld..];
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                let row = &block[(ky * g.kw + kx) * ld + s * band..][..band];
                let (lo, hi) = g.valid_ox(kx);
                if hi <= lo {
                    continue;
                }
                if g.is_row_shift() {
                    // One add of the whole run: the wrapped columns were zeroed by
                    // `zero_wrapped_columns`, so they add nothing to the neighbouring rows.
                    let (ylo, yhi) = g.valid_oy(ky, (oy0, oy1));
                    let run = &row[(ylo - oy0) * g.wo..(yhi - oy0) * g.wo];
                    let start = ((ylo + ky - g.pad) * g.w + kx) as isize - g.pad as isize;
                    let mut run_acc = |d: &mut T, s: T| *d += s;
                    add_shifted(plane, run, start, &mut run_acc);
                    continue;
                }
                for oy in oy0..oy1 {
                    let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                    if iy < 0 || iy >= g.h as isize {
                        continue;
                    }
                    let seg = &row[(oy - oy0) * g.wo + lo..(oy - oy0) * g.wo + hi];
                    let dr = &mut plane[iy as usize * g.w..][..g.w];
                    let ix0 = lo * g.stride + kx - g.pad;
                    if g.stride == 1 {
                        // Plain slices so the loop vectorises.
                        for (d, s) in dr[ix0..ix0 + seg.len()].iter_mut().zip(seg) {
                            *d += *s;
                        }
                    } else {
                        for (d, s) in dr[ix0..].iter_mut().step_by(g.stride).zip(seg) {
                            *d += *s;
                        }
                    }
                }
            }
        }
    };
    let plane = g.h * g.w;
    if plane == 0 {
        return;
    }
    let dx = &mut dx[..(s1 - s0) * g.in_len()];
    if par {
        dx.par_chunks_mut(plane).enumerate().for_each(add);
    } else {
        dx.chunks_mut(plane).enumerate().for_each(add);
    }
}

/// Forward pass of one unit (samples `s0..s1`) into `y` (those samples' outputs).
#[allow(clippy::too_many_arguments)]
fn forward_unit<T: KernelFloat>(
    g: &Geom,
    plan: &Plan,
    x: &[T],
    wm: &Lhs<T>,
    bias: Option<&[T]>,
    (s0, s1): (usize, usize),
    y: &mut [T],
    sc: &mut Scratch<T>,
) {
    let (ckk, plane, ns) = (g.ckk(), g.plane(), s1 - s0);
    let par = plan.gemm_threads();
    for (oy0, oy1) in plan.bands(g) {
        let band = (oy1 - oy0) * g.wo;
        let ld = ns * band;
        if ns == 1 {
            // One sample: the gemm writes straight into its NCHW output rows.
            let cols = if g.is_pointwise() {
                Mat::rows(&x[s0 * g.in_len()..][..g.in_len()], ckk, plane)
            } else {
                im2col(g, x, (s0, s1), (oy0, oy1), &mut sc.cols, plan.serial);
                Mat::rows(&sc.cols, ckk, ld)
            };
            let dst = &mut y[oy0 * g.wo..];
            matmul_lhs(dst, plane, wm, cols, false, par);
            if let Some(b) = bias {
                for (o, &bo) in b.iter().enumerate() {
                    dst[o * plane..o * plane + band]
                        .iter_mut()
                        .for_each(|v| *v += bo);
                }
            }
        } else {
            // Several whole samples: `(C_out, ns * plane)` product, then scattered to NCHW
            // with the bias added on the way.
            im2col(g, x, (s0, s1), (oy0, oy1), &mut sc.cols, plan.serial);
            sc.tmp.resize(g.o * ld, T::zero());
            let cols = Mat::rows(&sc.cols, ckk, ld);
            matmul_lhs(&mut sc.tmp, ld, wm, cols, false, par);
            for s in 0..ns {
                for o in 0..g.o {
                    let src = &sc.tmp[o * ld + s * band..][..band];
                    let dst = &mut y[s * g.out_len() + o * plane + oy0 * g.wo..][..band];
                    let bo = bias.map_or(T::zero(), |b| b[o]);
                    dst.iter_mut().zip(src).for_each(|(d, &v)| *d = v + bo);
                }
            }
        }
    }
}

/// `conv2d(x, w) (+ bias)`: `x (N, C_in, H, W)`, `w (C_out, C_in, kh, kw)`, `bias (C_out)`.
pub(super) fn forward<T: ConvFloat>(g: &Geom, x: &[T], w: &[T], bias: Option<&[T]>) -> Vec<T> {
    let mut y = vec![T::zero(); g.n * g.out_len()];
    if y.is_empty() {
        return y;
    }
    let plan = Plan::new(g);
    // The kernel is the left operand of every unit's product: packed once here.
    let wm = Lhs::prepacked(Mat::rows(w, g.o, g.ckk()));
    let run = |(u, y_u): (usize, &mut [T])| {
        let samples = plan.samples(g, u);
        T::with_scratch(|sc| forward_unit(g, &plan, x, &wm, bias, samples, y_u, sc))
    };
    let unit_len = plan.group * g.out_len();
    if plan.serial {
        y.chunks_mut(unit_len).enumerate().for_each(run);
    } else {
        y.par_chunks_mut(unit_len).enumerate().for_each(run);
    }
    y
}

/// Backward pass of one unit (samples `s0..s1`): adds `g cols^T` into `dw` and writes
/// `col2im(W^T g)` into `dx` (those samples' input gradients, zero on entry), each only when
/// given.
#[allow(clippy::too_many_arguments)]
fn backward_unit<T: KernelFloat>(
    g: &Geom,
    plan: &Plan,
    (x, wt, grad): (&[T], &Lhs<T>, &[T]),
    (s0, s1): (usize, usize),
    mut dw: Option<&mut [T]>,
    mut dx: Option<&mut [T]>,
    sc: &mut Scratch<T>,
) {
    let (ckk, plane, ns) = (g.ckk(), g.plane(), s1 - s0);
    let par = plan.gemm_threads();
    let Scratch { cols, dcols, tmp } = sc;
    for (oy0, oy1) in plan.bands(g) {
        let band = (oy1 - oy0) * g.wo;
        let ld = ns * band;
        // The band's output gradient as a `(C_out, ld)` matrix: a strided view of one sample,
        // or the samples' planes gathered side by side.
        let gm = if ns == 1 {
            Mat::new(&grad[s0 * g.out_len() + oy0 * g.wo..], g.o, band, plane, 1)
        } else {
            tmp.resize(g.o * ld, T::zero());
            for s in 0..ns {
                for o in 0..g.o {
                    let src = &grad[(s0 + s) * g.out_len() + o * plane + oy0 * g.wo..][..band];
                    tmp[o * ld + s * band..][..band].copy_from_slice(src);
                }
            }
            Mat::rows(tmp, g.o, ld)
        };
        let direct = ns == 1 && g.is_pointwise();
        if let Some(dw) = dw.as_deref_mut() {
            let cols_t = if direct {
                Mat::rows_t(&x[s0 * g.in_len()..][..g.in_len()], ckk, plane)
            } else {
                im2col(g, x, (s0, s1), (oy0, oy1), cols, plan.serial);
                Mat::rows_t(cols, ckk, ld)
            };
            matmul(dw, ckk, gm, cols_t, true, par);
        }
        if let Some(dx) = dx.as_deref_mut() {
            if direct {
                matmul_lhs(dx, plane, wt, gm, false, par);
            } else {
                dcols.resize(ckk * ld, T::zero());
                matmul_lhs(dcols, ld, wt, gm, false, par);
                if g.is_row_shift() {
                    zero_wrapped_columns(g, dcols, ld, plan.serial);
                }
                col2im(g, dcols, (s0, s1), (oy0, oy1), dx, plan.serial);
            }
        }
    }
}

/// `(dx, dw)` of one backward pass.
pub(super) type Grads<T> = (Option<Vec<T>>, Option<Vec<T>>);

/// Returns `(dx, dw)`, each `None` when not wanted (that argument needs no gradient).
pub(super) fn backward<T: ConvFloat>(
    g: &Geom,
    x: &[T],
    w: &[T],
    grad: &[T],
    want_dx: bool,
    want_dw: bool,
) -> Grads<T> {
    let dw_len = g.o * g.ckk();
    let mut dx = want_dx.then(|| vec![T::zero(); g.n * g.in_len()]);
    if g.out_len() == 0 || g.in_len() == 0 || g.n == 0 {
        return (dx, want_dw.then(|| vec![T::zero(); dw_len]));
    }
    let plan = Plan::new(g);
    let units = plan.units(g);
    // Units go in a fixed number of contiguous chunks, each with its own dW accumulator, and
    // the partial sums are added in chunk order: a rayon fold / reduce tree depends on work
    // stealing, and a resumed training run must reproduce the same bits.
    let max_chunks = if want_dw {
        DW_CHUNKS.min((DW_PARTIALS_BUDGET / dw_len.max(1)).max(1))
    } else {
        DW_CHUNKS
    };
    let units_per_chunk = units.div_ceil(units.min(max_chunks));
    let chunk_samples = units_per_chunk * plan.group;
    // `W^T` is the left operand of every unit's input-gradient product: packed once here.
    let wt = if want_dx {
        Lhs::prepacked(Mat::rows_t(w, g.o, g.ckk()))
    } else {
        Lhs::view(Mat::rows_t(w, g.o, g.ckk()))
    };
    let run_chunk = |(ci, dx_chunk): (usize, Option<&mut [T]>)| -> Vec<T> {
        let mut dw = vec![T::zero(); if want_dw { dw_len } else { 0 }];
        let mut dx_chunk = dx_chunk;
        let first = ci * chunk_samples;
        T::with_scratch(|sc| {
            for u in ci * units_per_chunk..((ci + 1) * units_per_chunk).min(units) {
                let (s0, s1) = plan.samples(g, u);
                let dx_u = dx_chunk
                    .as_deref_mut()
                    .map(|d| &mut d[(s0 - first) * g.in_len()..(s1 - first) * g.in_len()]);
                let dw_u = want_dw.then_some(&mut dw[..]);
                backward_unit(g, &plan, (x, &wt, grad), (s0, s1), dw_u, dx_u, sc);
            }
        });
        dw
    };
    let n_chunks = units.div_ceil(units_per_chunk);
    let partials: Vec<Vec<T>> = match (dx.as_mut(), plan.serial) {
        (Some(d), true) => d
            .chunks_mut(chunk_samples * g.in_len())
            .map(Some)
            .enumerate()
            .map(run_chunk)
            .collect(),
        (Some(d), false) => d
            .par_chunks_mut(chunk_samples * g.in_len())
            .map(Some)
            .enumerate()
            .map(run_chunk)
            .collect(),
        (None, true) => (0..n_chunks).map(|ci| run_chunk((ci, None))).collect(),
        (None, false) => (0..n_chunks)
            .into_par_iter()
            .map(|ci| run_chunk((ci, None)))
            .collect(),
    };
    if !want_dw {
        return (dx, None);
    }
    let mut partials = partials.into_iter();
    let mut dw = partials.next().unwrap_or_else(|| vec![T::zero(); dw_len]);
    let rest: Vec<Vec<T>> = partials.collect();
    if !rest.is_empty() {
        // Each element adds the chunks in order: the same bits however rayon splits this.
        dw.par_chunks_mut(4096).enumerate().for_each(|(i, d)| {
            for p in &rest {
                for (s, t) in d.iter_mut().zip(&p[i * 4096..]) {
                    *s += *t;
                }
            }
        });
    }
    (dx, Some(dw))
}
