//! `exp` over f32 slices, 8 lanes at a time, giving exactly the bits of the C library's
//! scalar `expf` that `f32::exp` calls.
//!
//! The fused softmax, GroupNorm+SiLU and GEGLU kernels called `expf` once per element (4-8%
//! of a training step, perf in docs/TRAINING.md). A vectorised exp with its own polynomial
//! would change every trained weight, and the shipped bundle is defined as what `train all`
//! makes. So this is glibc's own algorithm (since 2.27, from ARM's optimized-routines: `x * 32
//! / ln 2 = k + r`, `2^(k/32)` from a 32-entry table, a cubic in `r`, all in f64, rounded to
//! f32 once) with the same operations in the same order, the fused multiply-adds where glibc's
//! FMA build (`__expf_fma`, what the dynamic linker picks on every CPU with AVX-512) has them.
//! Inputs off its fast path (|x| >= 88, infinities, NaN) go to the scalar `expf` itself, except
//! the common masked-softmax case `x < -103.97` (and -inf), whose result is +0. A test
//! compares every f32 bit pattern with `f32::exp`.

/// `2^(i/32)` as f64 bits, minus `i << 47` (the table of glibc's `__exp2f_data`).
const TABLE: [u64; 32] = [
    0x3ff0000000000000,
    0x3fefd9b0d3158574,
    0x3fefb5586cf9890f,
    0x3fef9301d0125b51,
    0x3fef72b83c7d517b,
    0x3fef54873168b9aa,
    0x3fef387a6e756238,
    0x3fef1e9df51fdee1,
    0x3fef06fe0a31b715,
    0x3feef1a7373aa9cb,
    0x3feedea64c123422,
    0x3feece086061892d,
    0x3feebfdad5362a27,
    0x3feeb42b569d4f82,
    0x3feeab07dd485429,
    0x3feea47eb03a5585,
    0x3feea09e667f3bcd,
    0x3fee9f75e8ec5f74,
    0x3feea11473eb0187,
    0x3feea589994cce13,
    0x3feeace5422aa0db,
    0x3feeb737b0cdc5e5,
    0x3feec49182a3f090,
    0x3feed503b23e255d,
    0x3feee89f995ad3ad,
    0x3feeff76f2fb5e47,
    0x3fef199bdd85529c,
    0x3fef3720dcef9069,
    0x3fef5818dcfba487,
    0x3fef7c97337b9b5f,
    0x3fefa4afa2a490da,
    0x3fefd0765b6e4540,
];
/// `32 / ln 2`.
const INV_LN2_N: u64 = 0x40471547652b82fe;
/// The cubic's coefficients, highest first.
const C0: u64 = 0x3ebc6af84b912394;
const C1: u64 = 0x3f2ebfce50fac4f3;
const C2: u64 = 0x3f962e42ff0c52d6;
/// `1.5 * 2^52`: adding it rounds to an integer held in the low mantissa bits.
const SHIFT: u64 = 0x4338000000000000;
/// Below this, `expf` underflows to +0 (`log(2^-150)`).
const UNDERFLOW: f32 = -103.972_08;

/// `xs[i] = xs[i].exp()` for every element, with `f32::exp`'s bits.
pub(crate) fn exp_in_place(xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx512::available() {
        // SAFETY: the CPU has AVX-512F (checked at run time).
        unsafe { avx512::exp_in_place(xs) };
        return;
    }
    xs.iter_mut().for_each(|x| *x = x.exp());
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;
    use std::arch::x86_64::*;

    pub fn available() -> bool {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            std::is_x86_feature_detected!("avx512f")
                && std::env::var("STORYGPT_NN_VEXP").map_or(true, |v| v != "0")
        })
    }

    /// The lanes of `chunk` (originally `orig`) marked in `special`: the scalar `expf`.
    #[cold]
    fn off_fast_path(chunk: &mut [f32], orig: &[f32; 8], special: u32) {
        for (l, (y, &x)) in chunk.iter_mut().zip(orig).enumerate() {
            if special & (1 << l) != 0 {
                *y = if x < UNDERFLOW { 0.0 } else { x.exp() };
            }
        }
    }

    #[target_feature(enable = "avx512f,avx2")]
    pub unsafe fn exp_in_place(xs: &mut [f32]) {
        let inv = _mm512_set1_pd(f64::from_bits(INV_LN2_N));
        let shift = _mm512_set1_pd(f64::from_bits(SHIFT));
        let (c0, c1, c2) = (
            _mm512_set1_pd(f64::from_bits(C0)),
            _mm512_set1_pd(f64::from_bits(C1)),
            _mm512_set1_pd(f64::from_bits(C2)),
        );
        let one = _mm512_set1_pd(1.0);
        let t = |i: usize| _mm512_loadu_si512(TABLE[i..i + 8].as_ptr().cast());
        let (t0, t1, t2, t3) = (t(0), t(8), t(16), t(24));
        let low5 = _mm512_set1_epi64(31);
        let bit4 = _mm512_set1_epi64(16);
        let mut chunks = xs.chunks_exact_mut(8);
        for chunk in &mut chunks {
            let mut orig = [0f32; 8];
            orig.copy_from_slice(chunk);
            let xf = _mm256_loadu_ps(orig.as_ptr());
            // |x| >= 88 (top 12 bits above 0x42a), infinities and NaN leave the fast path.
            let abstop = _mm256_and_si256(
                _mm256_srli_epi32::<20>(_mm256_castps_si256(xf)),
                _mm256_set1_epi32(0x7ff),
            );
            let special = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(
                abstop,
                _mm256_set1_epi32(0x42a),
            ))) as u32;
            let xd = _mm512_cvtps_pd(xf);
            // kd = round(x * 32 / ln 2) by the shift trick; r = x * 32 / ln 2 - kd.
            let kd_shifted = _mm512_fmadd_pd(inv, xd, shift);
            let ki = _mm512_castpd_si512(kd_shifted);
            let kd = _mm512_sub_pd(kd_shifted, shift);
            let r = _mm512_fmsub_pd(inv, xd, kd);
            // s = 2^(k/32): the table entry of k mod 32 with k's bits added to its exponent.
            let idx = _mm512_and_si512(ki, low5);
            let lo = _mm512_permutex2var_epi64(t0, idx, t1);
            let hi = _mm512_permutex2var_epi64(t2, idx, t3);
            let entry = _mm512_mask_blend_epi64(_mm512_test_epi64_mask(idx, bit4), lo, hi);
            let s = _mm512_castsi512_pd(_mm512_add_epi64(entry, _mm512_slli_epi64::<47>(ki)));
            // s * (C0 r^3 + C1 r^2 + C2 r + 1), in glibc's order of operations.
            let z = _mm512_fmadd_pd(r, c0, c1);
            let r2 = _mm512_mul_pd(r, r);
            let y = _mm512_fmadd_pd(r, c2, one);
            let y = _mm512_fmadd_pd(z, r2, y);
            let y = _mm512_mul_pd(y, s);
            _mm256_storeu_ps(chunk.as_mut_ptr(), _mm512_cvtpd_ps(y));
            if special != 0 {
                off_fast_path(chunk, &orig, special);
            }
        }
        chunks
            .into_remainder()
            .iter_mut()
            .for_each(|x| *x = x.exp());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    /// Every f32 bit pattern through [`exp_in_place`] against `f32::exp`, bit for bit (NaNs
    /// only need to stay NaN).
    #[test]
    fn every_f32_gives_the_bits_of_f32_exp() {
        const BLOCK: u64 = 1 << 16;
        let mismatches: Vec<(u32, u32, u32)> = (0..(1u64 << 32) / BLOCK)
            .into_par_iter()
            .flat_map_iter(|b| {
                let xs: Vec<f32> = (b * BLOCK..(b + 1) * BLOCK)
                    .map(|i| f32::from_bits(i as u32))
                    .collect();
                let mut ys = xs.clone();
                // Odd offsets too, so the scalar tail and every lane position are covered.
                exp_in_place(&mut ys[(b % 8) as usize..]);
                ys[..(b % 8) as usize].iter_mut().for_each(|y| *y = y.exp());
                xs.into_iter()
                    .zip(ys)
                    .filter(|(x, y)| {
                        let want = x.exp();
                        !(want.to_bits() == y.to_bits() || (want.is_nan() && y.is_nan()))
                    })
                    .map(|(x, y)| (x.to_bits(), y.to_bits(), x.exp().to_bits()))
                    .take(4)
                    .collect::<Vec<_>>()
            })
            .collect();
        assert!(
            mismatches.is_empty(),
            "{} inputs differ, e.g. (x, got, want) {:x?}",
            mismatches.len(),
            &mismatches[..mismatches.len().min(8)]
        );
    }
}
