//! Dense products for the CPU kernels: `dst (+)= lhs * rhs` on strided views, with an AVX-512
//! f32 path.
//!
//! The `gemm` crate (which candle uses too) reaches about 70 GFLOP/s per core on this
//! project's Zen 5 machine with either its AVX2 or its AVX-512 micro-kernel, while the core
//! sustains about 200 GFLOP/s or more of 512-bit FMAs (oneDNN's convolutions in PyTorch run at
//! 125-170). The micro-kernel here keeps a full 8 x 32 tile of the output in 16 zmm registers
//! and reached 195-330 GFLOP/s on packed panels in a scratch benchmark (CPU time, machine
//! shared; 8 x 48, 12 x 32 and 14 x 32 tiles measured within that range; an array of
//! accumulators instead of named variables gave 70).
//! Everything else (f64, CPUs without AVX-512F, `STORYGPT_NN_SGEMM=0`) goes to `gemm`.
//!
//! Determinism: every output element is the same sequence of f32 operations whatever the
//! tiling or thread split: its sum runs over `k` in blocks ([`depth_block`], a function of `k`
//! only), each block accumulated
//! from zero in order by one micro-kernel call and then added to the element, blocks in order.
//! Threads split the output, never the reduction, so results do not depend on the thread
//! count (a resumed training run reproduces the same bits).

use candle_core::DType;
use gemm::Parallelism;
use rayon::prelude::*;
use std::cell::Cell;

use crate::fused::KernelFloat;

/// A borrowed `rows x cols` matrix view: element `(i, j)` at `data[i * rs + j * cs]`. Only
/// built by the constructors, which check that every element lies inside the borrowed slice.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a, T> {
    data: &'a [T],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a, T> Mat<'a, T> {
    pub fn new(data: &'a [T], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
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
    pub fn rows(data: &'a [T], rows: usize, cols: usize) -> Self {
        Self::new(data, rows, cols, cols, 1)
    }
    /// The `cols x rows` transpose of a row-major `rows x cols` slice.
    pub fn rows_t(data: &'a [T], rows: usize, cols: usize) -> Self {
        Self::new(data, cols, rows, 1, cols)
    }
}

/// A left operand, optionally packed once up front for the AVX-512 kernel: a kernel matrix
/// used by many products (every unit of a convolution) is then packed once per call rather
/// than once per product.
pub(crate) struct Lhs<'a, T> {
    mat: Mat<'a, T>,
    packed: Option<avx512::Packed>,
}

impl<'a, T: KernelFloat> Lhs<'a, T> {
    /// `mat` as is (packed inside each product).
    pub fn view(mat: Mat<'a, T>) -> Self {
        Self { mat, packed: None }
    }
    /// `mat`, packed now when the AVX-512 path will be used.
    pub fn prepacked(mat: Mat<'a, T>) -> Self {
        let packed = (T::DTYPE == DType::F32 && avx512::available())
            .then(|| avx512::Packed::new(&cast_mat(mat)));
        Self { mat, packed }
    }
}

/// `dst (m x n, row stride dst_rs) = lhs (m x k) * rhs (k x n)` (+ `dst` when `accumulate`),
/// on `threads` rayon threads (1: the calling thread only).
pub(crate) fn matmul<T: KernelFloat>(
    dst: &mut [T],
    dst_rs: usize,
    lhs: Mat<T>,
    rhs: Mat<T>,
    accumulate: bool,
    threads: usize,
) {
    matmul_lhs(dst, dst_rs, &Lhs::view(lhs), rhs, accumulate, threads)
}

/// [`matmul`] with a possibly prepacked left operand.
pub(crate) fn matmul_lhs<T: KernelFloat>(
    dst: &mut [T],
    dst_rs: usize,
    lhs: &Lhs<T>,
    rhs: Mat<T>,
    accumulate: bool,
    threads: usize,
) {
    let lhs_mat = lhs.mat;
    let (m, k, n) = (lhs_mat.rows, lhs_mat.cols, rhs.cols);
    assert_eq!(rhs.rows, k, "inner sizes differ");
    if m == 0 || n == 0 {
        return;
    }
    assert!(n <= dst_rs && (m - 1) * dst_rs + n <= dst.len());
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                dst[i * dst_rs..i * dst_rs + n].fill(T::zero());
            }
        }
        return;
    }
    if let Some(dst32) = as_f32_mut(dst) {
        if avx512::available() {
            let a = match &lhs.packed {
                Some(p) => avx512::Left::Packed(p),
                None => avx512::Left::View(cast_mat(lhs_mat)),
            };
            return avx512::sgemm(dst32, dst_rs, &a, cast_mat(rhs), accumulate, threads);
        }
    }
    let lhs = lhs_mat;
    let par = if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // SAFETY: gemm reads lhs.data[i*rs + l*cs] for i < m, l < k and rhs.data likewise for
    // l < k, j < n: inside those slices, checked by `Mat::new`. It writes dst[i*dst_rs + j]
    // for i < m, j < n: inside `dst` (asserted above), which is borrowed mutably and so
    // aliases neither input. T is f32 or f64 (the only `KernelFloat`s), both supported by
    // gemm. With read_dst = false gemm does not read dst.
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

/// `dst` as f32 when `T` is f32.
fn as_f32_mut<T: KernelFloat>(dst: &mut [T]) -> Option<&mut [f32]> {
    // SAFETY: T is f32 itself when its dtype is F32 (the only KernelFloats are f32 and f64).
    (T::DTYPE == DType::F32)
        .then(|| unsafe { std::slice::from_raw_parts_mut(dst.as_mut_ptr().cast(), dst.len()) })
}

/// The same view typed as f32; only called when `T` is f32.
fn cast_mat<T: KernelFloat>(m: Mat<T>) -> Mat<f32> {
    assert_eq!(T::DTYPE, DType::F32);
    // SAFETY: T is f32 (asserted), so this is the same slice.
    let data = unsafe { std::slice::from_raw_parts(m.data.as_ptr().cast(), m.data.len()) };
    Mat {
        data,
        rows: m.rows,
        cols: m.cols,
        rs: m.rs,
        cs: m.cs,
    }
}

/// Reduction depth per micro-kernel call (and per packed block).
const KC: usize = 320;

/// The depth of the reduction blocks for a product of depth `k`: `k` split evenly into blocks
/// of at most [`KC`] (a 3x3 convolution over 32 channels, `k = 288`, is one block rather than
/// 256 + 32 with a second pass over the output).
fn depth_block(k: usize) -> usize {
    k.div_ceil(k.div_ceil(KC).max(1)).max(1)
}

/// Whether the AVX-512 f32 kernels run on this CPU (and `STORYGPT_NN_SGEMM` is not `0`).
pub(crate) fn avx512_available() -> bool {
    avx512::available()
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;
    use std::arch::x86_64::*;

    /// Rows of the output tile (one broadcast lhs value each).
    const MR: usize = 8;
    /// Columns of the output tile: two 16-lane zmm registers. (8 x 48 in 24 registers measured
    /// the same on packed panels, but most model widths are multiples of 32, not 48.)
    const NR: usize = 32;
    /// Output columns per packed rhs block: `KC x NC` f32 = 640 KiB of the 1 MiB L2 cache.
    const NC: usize = 512;
    /// Output rows per packed lhs block: `MC x KC` f32 = 160 KiB.
    const MC: usize = 128;

    pub fn available() -> bool {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            std::is_x86_feature_detected!("avx512f")
                && std::env::var("STORYGPT_NN_SGEMM").map_or(true, |v| v != "0")
        })
    }

    thread_local! {
        /// Packing buffers `(lhs, rhs)`, kept between calls (taken out while in use, so a
        /// nested call just allocates its own).
        static PACK: Cell<(Vec<f32>, Vec<f32>)> = const { Cell::new((Vec::new(), Vec::new())) };
    }

    /// Raw output pointer that may be sent to other threads: they write disjoint tiles.
    #[derive(Clone, Copy)]
    struct DstPtr(*mut f32);
    // SAFETY: only used for writes to disjoint column ranges by the threads of one call,
    // which borrows the destination mutably for its whole duration.
    unsafe impl Send for DstPtr {}
    unsafe impl Sync for DstPtr {}

    /// A whole left operand packed for [`kernel`]: for each depth block, all rows
    /// as panels of [`MR`] (zero-padded to a multiple of `MR`). Row `r`, depth `pc + kk` of
    /// the block at `pc` sits at `pc * m_pad + (r / MR) * MR * kc + kk * MR + r % MR`.
    pub struct Packed {
        data: Vec<f32>,
        rows: usize,
        m_pad: usize,
    }

    impl Packed {
        pub fn new(a: &Mat<f32>) -> Self {
            let m_pad = a.rows.div_ceil(MR) * MR;
            let mut data = vec![0f32; m_pad * a.cols];
            let kb = depth_block(a.cols);
            for pc in (0..a.cols).step_by(kb) {
                let kc = kb.min(a.cols - pc);
                pack_lhs(
                    a,
                    0,
                    a.rows,
                    pc,
                    kc,
                    &mut data[pc * m_pad..pc * m_pad + m_pad * kc],
                );
            }
            Self {
                data,
                rows: a.rows,
                m_pad,
            }
        }
    }

    /// The left operand of [`sgemm`].
    pub enum Left<'a> {
        View(Mat<'a, f32>),
        Packed(&'a Packed),
    }

    pub fn sgemm(
        dst: &mut [f32],
        dst_rs: usize,
        a: &Left,
        b: Mat<f32>,
        accumulate: bool,
        threads: usize,
    ) {
        let (m, n) = (lhs_rows(a), b.cols);
        let ptr = DstPtr(dst.as_mut_ptr());
        // One panel-aligned block of columns (or, when there are few columns, of rows) per
        // thread. Either split leaves each element's arithmetic unchanged.
        let (col_panels, row_panels) = (n.div_ceil(NR), m.div_ceil(MR));
        let by_cols = col_panels >= 2 * threads || col_panels >= row_panels;
        let (panels, width) = if by_cols {
            (col_panels, NR)
        } else {
            (row_panels, MR)
        };
        let parts = threads.clamp(1, panels);
        let per = panels.div_ceil(parts) * width;
        let run = |p: usize| {
            let (lo, hi) = (p * per, ((p + 1) * per).min(if by_cols { n } else { m }));
            let (rows, cols) = if by_cols {
                ((0, m), (lo, hi))
            } else {
                ((lo, hi), (0, n))
            };
            if lo < hi {
                // SAFETY: see `DstPtr`; `dst` covers (m-1)*dst_rs + n elements (checked by
                // the caller) and this thread writes its own rows / columns of it only.
                unsafe { sgemm_block(ptr, dst_rs, a, b, rows, cols, accumulate) }
            }
        };
        if parts == 1 {
            run(0);
        } else {
            (0..parts).into_par_iter().for_each(run);
        }
    }

    /// Rows `i0..i1` (`i0` a multiple of [`MR`]), columns `j0..j1` of the product, blocked
    /// for the caches.
    ///
    /// # Safety
    /// `dst.0` points to at least `(m - 1) * dst_rs + n` writable f32 that nothing else
    /// reads or writes in that block during the call; AVX-512F is available.
    unsafe fn sgemm_block(
        dst: DstPtr,
        dst_rs: usize,
        a: &Left,
        b: Mat<f32>,
        (i0, i1): (usize, usize),
        (j0, j1): (usize, usize),
        accumulate: bool,
    ) {
        let k = b.rows;
        let (mut apack, mut bpack) = PACK.with(Cell::take);
        apack.resize(MC * KC, 0.0);
        bpack.resize(KC * NC, 0.0);
        for jc in (j0..j1).step_by(NC) {
            let nc = NC.min(j1 - jc);
            let kb = depth_block(k);
            for pc in (0..k).step_by(kb) {
                let kc = kb.min(k - pc);
                pack_rhs(&b, pc, kc, jc, nc, &mut bpack);
                let add = accumulate || pc > 0;
                for ic in (i0..i1).step_by(MC) {
                    let mc = MC.min(i1 - ic);
                    let panels = match a {
                        Left::View(a) => {
                            pack_lhs(a, ic, mc, pc, kc, &mut apack);
                            apack.as_ptr()
                        }
                        Left::Packed(p) => p.data.as_ptr().add(pc * p.m_pad + ic * kc),
                    };
                    for pi in 0..mc.div_ceil(MR) {
                        let r0 = ic + pi * MR;
                        let ap = panels.add(pi * kc * MR);
                        for pj in 0..nc.div_ceil(NR) {
                            let c0 = jc + pj * NR;
                            let bp = bpack.as_ptr().add(pj * kc * NR);
                            let (rows, cols) = (MR.min(i1 - r0), NR.min(jc + nc - c0));
                            // Edge tiles: the packed panels are zero-padded, and the kernel
                            // masks the rows / columns it reads and writes in `dst`.
                            let out = dst.0.wrapping_add(r0 * dst_rs + c0);
                            kernel(kc, ap, bp, out, dst_rs, add, rows, cols);
                        }
                    }
                }
            }
        }
        PACK.with(|c| c.set((apack, bpack)));
    }

    /// Rows of the left operand.
    fn lhs_rows(a: &Left) -> usize {
        match a {
            Left::View(a) => a.rows,
            Left::Packed(p) => p.rows,
        }
    }

    /// Packs rows `ic..ic+mc`, depth `pc..pc+kc` of `a` as panels of [`MR`] rows: panel `p`
    /// holds, for each depth step, its `MR` values (rows past `mc` are zero). Written in
    /// order; a transposed operand (`rs == 1`) is read in order too.
    fn pack_lhs(a: &Mat<f32>, ic: usize, mc: usize, pc: usize, kc: usize, out: &mut [f32]) {
        for p in 0..mc.div_ceil(MR) {
            let panel = &mut out[p * kc * MR..(p + 1) * kc * MR];
            let rows = MR.min(mc - p * MR);
            let base = (ic + p * MR) * a.rs + pc * a.cs;
            let mut done = 0;
            if a.cs == 1 && rows == MR {
                // Rows contiguous in depth (the usual row-major operand): 8 x 8 blocks
                // transposed in registers instead of one scalar load and store per value.
                let starts: [usize; MR] = std::array::from_fn(|r| base + r * a.rs);
                // SAFETY: AVX-512F (and so AVX) is available wherever this module runs.
                done = unsafe { transpose_depth_blocks(a.data, starts, kc, panel, MR, 0) };
            }
            for (kk, step) in panel.chunks_exact_mut(MR).enumerate().skip(done) {
                let at = base + kk * a.cs;
                if a.rs == 1 && rows == MR {
                    step.copy_from_slice(&a.data[at..at + MR]);
                } else {
                    for (r, v) in step.iter_mut().enumerate() {
                        *v = if r < rows { a.data[at + r * a.rs] } else { 0.0 };
                    }
                }
            }
        }
    }

    /// Packs depth `pc..pc+kc`, columns `jc..jc+nc` of `b` as panels of [`NR`] columns:
    /// panel `p` holds, for each depth step, its `NR` values (columns past `nc` are zero).
    fn pack_rhs(b: &Mat<f32>, pc: usize, kc: usize, jc: usize, nc: usize, out: &mut [f32]) {
        for p in 0..nc.div_ceil(NR) {
            let panel = &mut out[p * kc * NR..(p + 1) * kc * NR];
            let cols = NR.min(nc - p * NR);
            let c0 = jc + p * NR;
            if b.cs == 1 {
                for kk in 0..kc {
                    let base = (pc + kk) * b.rs + c0;
                    let row = &mut panel[kk * NR..(kk + 1) * NR];
                    row[..cols].copy_from_slice(&b.data[base..base + cols]);
                    row[cols..].fill(0.0);
                }
            } else {
                if cols < NR {
                    panel.fill(0.0);
                }
                let mut done = 0;
                if b.rs == 1 {
                    // Columns contiguous in depth (a transposed operand, e.g. `x W^T`): blocks
                    // of 8 columns x 8 depth steps transposed in registers.
                    for j0 in (0..cols - cols % 8).step_by(8) {
                        let starts: [usize; 8] = std::array::from_fn(|r| pc + (c0 + j0 + r) * b.cs);
                        // SAFETY: AVX-512F (and so AVX) is available wherever this module runs.
                        done = unsafe { transpose_depth_blocks(b.data, starts, kc, panel, NR, j0) };
                    }
                }
                for j in 0..cols {
                    let base = pc * b.rs + (c0 + j) * b.cs;
                    if b.rs == 1 {
                        // Whatever the blocks above left: the columns past the last full 8,
                        // and for every column the depth steps past the last full 8.
                        let first = if j < cols - cols % 8 { done } else { 0 };
                        let src = &b.data[base..base + kc];
                        for (kk, &v) in src.iter().enumerate().skip(first) {
                            panel[kk * NR + j] = v;
                        }
                    } else {
                        for kk in 0..kc {
                            panel[kk * NR + j] = b.data[base + kk * b.rs];
                        }
                    }
                }
            }
        }
    }

    /// Copies 8 sequences of `src` (starting at `starts`, each contiguous and `kc` long) into
    /// `dst` transposed: value `kk` of sequence `r` goes to `dst[kk * stride + col + r]`, for
    /// the depth steps `kk` in whole blocks of 8. Returns how many steps it copied (`kc` rounded
    /// down to a multiple of 8); the caller copies the rest. A pure copy: the product's bits do
    /// not change.
    ///
    /// # Safety
    /// AVX is available.
    #[target_feature(enable = "avx")]
    unsafe fn transpose_depth_blocks(
        src: &[f32],
        starts: [usize; 8],
        kc: usize,
        dst: &mut [f32],
        stride: usize,
        col: usize,
    ) -> usize {
        let blocks = kc / 8 * 8;
        if blocks == 0 {
            return 0;
        }
        // Every read and write below lies inside these bounds (checked once, not per value).
        assert!(starts.iter().all(|&s| s + blocks <= src.len()));
        assert!(col + 8 <= stride && (blocks - 1) * stride + col + 8 <= dst.len());
        let (sp, dp) = (src.as_ptr(), dst.as_mut_ptr());
        for kk in (0..blocks).step_by(8) {
            let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(sp.add(starts[i] + kk)));
            // Pairs interleaved, then quads, then the 128-bit halves swapped into place.
            let t0 = _mm256_unpacklo_ps(r[0], r[1]);
            let t1 = _mm256_unpackhi_ps(r[0], r[1]);
            let t2 = _mm256_unpacklo_ps(r[2], r[3]);
            let t3 = _mm256_unpackhi_ps(r[2], r[3]);
            let t4 = _mm256_unpacklo_ps(r[4], r[5]);
            let t5 = _mm256_unpackhi_ps(r[4], r[5]);
            let t6 = _mm256_unpacklo_ps(r[6], r[7]);
            let t7 = _mm256_unpackhi_ps(r[6], r[7]);
            let q0 = _mm256_shuffle_ps::<0x44>(t0, t2);
            let q1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
            let q2 = _mm256_shuffle_ps::<0x44>(t1, t3);
            let q3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
            let q4 = _mm256_shuffle_ps::<0x44>(t4, t6);
            let q5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
            let q6 = _mm256_shuffle_ps::<0x44>(t5, t7);
            let q7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
            let out = [
                _mm256_permute2f128_ps::<0x20>(q0, q4),
                _mm256_permute2f128_ps::<0x20>(q1, q5),
                _mm256_permute2f128_ps::<0x20>(q2, q6),
                _mm256_permute2f128_ps::<0x20>(q3, q7),
                _mm256_permute2f128_ps::<0x31>(q0, q4),
                _mm256_permute2f128_ps::<0x31>(q1, q5),
                _mm256_permute2f128_ps::<0x31>(q2, q6),
                _mm256_permute2f128_ps::<0x31>(q3, q7),
            ];
            for (i, v) in out.into_iter().enumerate() {
                _mm256_storeu_ps(dp.add((kk + i) * stride + col), v);
            }
        }
        blocks
    }

    /// The first `rows x cols` of the `MR x NR` tile at `c` (row stride `ldc`) get (`add`:
    /// plus) the product of packed panels `a` (`k x MR`) and `b` (`k x NR`). The accumulators
    /// are named variables: an array of them is not kept in registers by LLVM (measured: 70
    /// vs 195 GFLOP/s).
    ///
    /// # Safety
    /// AVX-512F is available; `a` / `b` hold `k * MR` / `k * NR` f32; rows `< rows`, columns
    /// `< cols` of the tile lie inside the destination (the others are never touched: masked
    /// loads and stores do not access masked-out lanes).
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    unsafe fn kernel(
        k: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        add: bool,
        rows: usize,
        cols: usize,
    ) {
        let lanes = |n: usize| -> __mmask16 { ((1u32 << n.min(16)) - 1) as __mmask16 };
        let (m0, m1) = (lanes(cols), lanes(cols.saturating_sub(16)));
        macro_rules! tile {
            ($($r:literal => $c0:ident $c1:ident),*) => {{
                $(let (mut $c0, mut $c1) = (_mm512_setzero_ps(), _mm512_setzero_ps());)*
                let (mut ap, mut bp) = (a, b);
                for _ in 0..k {
                    let b0 = _mm512_loadu_ps(bp);
                    let b1 = _mm512_loadu_ps(bp.add(16));
                    $(
                        let av = _mm512_set1_ps(*ap.add($r));
                        $c0 = _mm512_fmadd_ps(av, b0, $c0);
                        $c1 = _mm512_fmadd_ps(av, b1, $c1);
                    )*
                    ap = ap.add(MR);
                    bp = bp.add(NR);
                }
                // Add to (or store) the tile, row by row, masked to the valid part.
                $(
                    if $r < rows {
                        let p0 = c.wrapping_add($r * ldc);
                        let p1 = p0.wrapping_add(16);
                        let z = _mm512_setzero_ps();
                        let (v0, v1) = if add {
                            (
                                _mm512_add_ps(_mm512_mask_loadu_ps(z, m0, p0), $c0),
                                _mm512_add_ps(_mm512_mask_loadu_ps(z, m1, p1), $c1),
                            )
                        } else {
                            ($c0, $c1)
                        };
                        _mm512_mask_storeu_ps(p0, m0, v0);
                        _mm512_mask_storeu_ps(p1, m1, v1);
                    }
                )*
            }};
        }
        tile!(0 => c00 c01, 1 => c10 c11, 2 => c20 c21, 3 => c30 c31,
              4 => c40 c41, 5 => c50 c51, 6 => c60 c61, 7 => c70 c71);
    }

    #[cfg(test)]
    mod packing_tests {
        use super::*;

        /// Checks panels of `width` lanes over depth `kc`: lane `i` of panel `p` at depth `kk`
        /// holds `value(p * width + i, kk)` for the first `n` lanes, zero past them.
        fn expect_panels(
            out: &[f32],
            width: usize,
            kc: usize,
            n: usize,
            value: impl Fn(usize, usize) -> f32,
        ) {
            for p in 0..n.div_ceil(width) {
                for kk in 0..kc {
                    for i in 0..width {
                        let lane = p * width + i;
                        let want = if lane < n { value(lane, kk) } else { 0.0 };
                        assert_eq!(
                            out[p * kc * width + kk * width + i],
                            want,
                            "lane {lane}, depth {kk}"
                        );
                    }
                }
            }
        }

        /// Packing is a copy: every panel slot holds the operand's value at its row (or
        /// column) and depth, or zero past the edge, whatever the strides; this covers the
        /// register-transposed blocks and the scalar edges around them.
        #[test]
        fn packed_panels_hold_the_operand_values_for_any_layout_and_edge() {
            if !available() {
                // The packing's register transposes need AVX; the module runs only on
                // AVX-512F CPUs (this project's machines have it).
                eprintln!("skipped: no AVX-512F on this CPU (or STORYGPT_NN_SGEMM=0)");
                return;
            }
            let data: Vec<f32> = (0..40_000).map(|i| i as f32 + 0.5).collect();
            for (rows, cols) in [(8, 8), (17, 21), (40, 45), (9, 3), (64, 70)] {
                for transposed in [false, true] {
                    // Padded strides, so a layout bug reads a wrong value, not a neighbour.
                    let m = if transposed {
                        Mat::new(&data, rows, cols, 1, rows + 3)
                    } else {
                        Mat::new(&data, rows, cols, cols + 5, 1)
                    };
                    let at = |r: usize, c: usize| m.data[r * m.rs + c * m.cs];
                    for (pc, kc) in [(0, m.cols), (1, m.cols - 1), (2, 9.min(m.cols - 2))] {
                        // As the left operand: rows ic.., depth pc..pc+kc.
                        let (ic, mc) = (1, m.rows - 1);
                        let mut out = vec![f32::NAN; mc.div_ceil(MR) * MR * kc];
                        pack_lhs(&m, ic, mc, pc, kc, &mut out);
                        expect_panels(&out, MR, kc, mc, |row, kk| at(ic + row, pc + kk));
                    }
                    // As the right operand: depth rows pc..pc+kc, columns jc..jc+nc.
                    let t = Mat::new(&data, m.cols, m.rows, m.cs, m.rs);
                    let at_t = |k: usize, c: usize| t.data[k * t.rs + c * t.cs];
                    for (pc, kc) in [(0, t.rows), (1, t.rows - 1), (3, 8.min(t.rows - 3))] {
                        let (jc, nc) = (2, t.cols - 2);
                        let mut out = vec![f32::NAN; nc.div_ceil(NR) * NR * kc];
                        pack_rhs(&t, pc, kc, jc, nc, &mut out);
                        expect_panels(&out, NR, kc, nc, |col, kk| at_t(pc + kk, jc + col));
                    }
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod avx512 {
    use super::*;
    pub struct Packed;
    impl Packed {
        pub fn new(_: &Mat<f32>) -> Self {
            unreachable!("no AVX-512 off x86_64")
        }
    }
    pub enum Left<'a> {
        View(Mat<'a, f32>),
        Packed(&'a Packed),
    }
    pub fn available() -> bool {
        false
    }
    pub fn sgemm(_: &mut [f32], _: usize, _: &Left, _: Mat<f32>, _: bool, _: usize) {
        unreachable!("no AVX-512 off x86_64")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u64) -> Vec<f32> {
        // A small LCG: deterministic values in [-1, 1).
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// `(lhs transposed, rhs transposed)` storage for an `m x k` times `k x n` product.
    fn views<'a>(
        a: &'a [f32],
        b: &'a [f32],
        (m, n, k): (usize, usize, usize),
        (ta, tb): (bool, bool),
    ) -> (Mat<'a, f32>, Mat<'a, f32>) {
        let lhs = if ta {
            Mat::rows_t(a, k, m)
        } else {
            Mat::rows(a, m, k)
        };
        let rhs = if tb {
            Mat::rows_t(b, n, k)
        } else {
            Mat::rows(b, k, n)
        };
        (lhs, rhs)
    }

    #[test]
    fn matches_a_plain_product_on_odd_shapes_and_strides_and_any_thread_count() {
        let shapes = [
            (1, 1, 1),
            (7, 50, 3),
            (8, 48, 256),
            (9, 97, 300),
            (3, 5, 600),
            (130, 530, 513),
            (17, 1100, 40),
            // Few columns: split by rows.
            (200, 40, 70),
            (61, 60, 300),
        ];
        let pools: Vec<_> = [1, 3]
            .iter()
            .map(|&t| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(t)
                    .build()
                    .unwrap()
            })
            .collect();
        for (i, &(m, n, k)) in shapes.iter().enumerate() {
            let a = data(m * k, 2 * i as u64);
            let b = data(k * n, 2 * i as u64 + 1);
            let init = data(m * (n + 3), 99);
            for t in [(false, false), (true, false), (false, true), (true, true)] {
                let (lhs, rhs) = views(&a, &b, (m, n, k), t);
                for accumulate in [false, true] {
                    // Reference in f64; dst has a row stride wider than n.
                    let mut want = vec![0f64; m * n];
                    for r in 0..m {
                        for c in 0..n {
                            let mut s = if accumulate {
                                init[r * (n + 3) + c] as f64
                            } else {
                                0.0
                            };
                            for l in 0..k {
                                s += lhs.data[r * lhs.rs + l * lhs.cs] as f64
                                    * rhs.data[l * rhs.rs + c * rhs.cs] as f64;
                            }
                            want[r * n + c] = s;
                        }
                    }
                    let mut outs = vec![];
                    for (pool, threads) in pools.iter().zip([1, 3]) {
                        let mut dst = init.clone();
                        pool.install(|| matmul(&mut dst, n + 3, lhs, rhs, accumulate, threads));
                        for r in 0..m {
                            for c in 0..n {
                                let d = (dst[r * (n + 3) + c] as f64 - want[r * n + c]).abs();
                                assert!(d < 1e-4 * (k as f64).sqrt(), "{m}x{n}x{k} {t:?}: {d}");
                            }
                            // Padding columns are never written.
                            for c in n..n + 3 {
                                assert_eq!(dst[r * (n + 3) + c], init[r * (n + 3) + c]);
                            }
                        }
                        outs.push(dst);
                    }
                    // A prepacked left operand gives the same bits (on 3 threads).
                    let mut dst = init.clone();
                    let packed = Lhs::prepacked(lhs);
                    pools[1].install(|| matmul_lhs(&mut dst, n + 3, &packed, rhs, accumulate, 3));
                    outs.push(dst);
                    assert_eq!(
                        outs[0], outs[2],
                        "{m}x{n}x{k} {t:?}: prepacking changes bits"
                    );
                    assert_eq!(outs[0], outs[1], "{m}x{n}x{k} {t:?}: threads change bits");
                }
            }
        }
    }
}
