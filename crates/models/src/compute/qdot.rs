//! Decode-time (few-row) products with GGUF legacy block types: y = x·Wᵀ where W's rows are
//! Q4_0 / Q4_1 / Q5_0 / Q8_0 blocks of 32 weights and x is first rounded to Q8 blocks of 32
//! (scale amax/127, as llama.cpp does), then int8 dot products with AVX2 `maddubs`.
//!
//! Why not candle's QMatMul: candle 0.11 has AVX2 dot products only for Q4_0, Q8_0 and the K
//! types; Q4_1, Q5_0 and Q5_1 (the default smollm2-135m is Q4_1, qwen2.5-0.5b mostly Q5_0) run
//! its scalar fallback, 5–20× slower than memory bandwidth allows. Rows are split over rayon
//! threads like the f32 gemv in [`crate::kernels`].
//!
//! Block layouts (ggml): Q4_0 {d: f16, qs: [u8; 16]} value d·(q − 8), element j in the low
//! nibble of qs[j], j+16 in the high one; Q4_1 {d, m: f16, qs} value d·q + m; Q5_0 {d, qh: u32,
//! qs} value d·((q | bit_j(qh) << 4) − 16); Q8_0 {d, qs: [i8; 32]} value d·q.

use candle_core::quantized::GgmlDType;
use candle_core::{bail, Result};
use half::f16;
use rayon::prelude::*;

/// Types this module computes.
pub fn supports(t: GgmlDType) -> bool {
    crate::gguf::types::of(t).int8_dot && avx2()
}

fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// x rounded to Q8 blocks of 32: scales d, int8 values, and d·Σq per block (Q4_1's offset term).
pub struct Q8Act {
    pub d: Vec<f32>,
    pub s: Vec<f32>,
    pub q: Vec<i8>,
}

/// Round one row (length a multiple of 32) to Q8 blocks, like ggml's quantize_row_q8_0/q8_1.
pub fn quantize_act(x: &[f32]) -> Q8Act {
    let nb = x.len() / 32;
    let mut a = Q8Act {
        d: Vec::with_capacity(nb),
        s: Vec::with_capacity(nb),
        q: vec![0; x.len()],
    };
    // Rounding half away from zero, as ggml's reference quantize_row_q8_0/q8_1 (ties to even
    // flipped a near-tie greedy token against llama.cpp); `simd!` compiles the loop with AVX2,
    // where LLVM lowers round() to a vector add-and-truncate instead of a libm call per value.
    crate::simd!({
        for (b, xb) in x.chunks_exact(32).enumerate() {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            let qb = &mut a.q[b * 32..(b + 1) * 32];
            for (q, v) in qb.iter_mut().zip(xb) {
                *q = (v * id).round() as i8;
            }
            let sum: i32 = qb.iter().map(|&q| q as i32).sum();
            // ggml stores d and d·Σq of a Q8 block in f16; doing the same makes the rounded
            // activations identical to llama.cpp's, so results differ from it only by summation
            // order (which matters for greedy near-ties).
            a.d.push(f16::from_f32(d).to_f32());
            a.s.push(f16::from_f32(d * sum as f32).to_f32());
        }
    });
    a
}

fn block_bytes(t: GgmlDType) -> usize {
    crate::gguf::types::of(t).bytes
}

/// y[r·n + i] = <x_r, W_i> for the m rows of x [m, k] and the n rows of W (raw blocks).
pub fn matmul(t: GgmlDType, w: &[u8], n: usize, k: usize, x: &[f32], y: &mut [f32]) -> Result<()> {
    if !supports(t) {
        bail!("qdot: no kernel for {t:?} on this CPU");
    }
    if !k.is_multiple_of(32) || w.len() != n * k / 32 * block_bytes(t) || y.len() * k != x.len() * n
    {
        bail!(
            "qdot: inconsistent sizes (n {n}, k {k}, {} weight bytes)",
            w.len()
        );
    }
    let rb = k / 32 * block_bytes(t);
    let m = x.len() / k.max(1);
    for r in 0..m {
        let a = quantize_act(&x[r * k..(r + 1) * k]);
        let yr = &mut y[r * n..(r + 1) * n];
        // 64 rows per job: whole cache lines of y, and enough jobs to balance two threads.
        yr.par_chunks_mut(64).enumerate().for_each(|(c, ys)| {
            // Four rows at a time share each activation block load and keep four independent
            // accumulation chains in flight.
            for (g, out) in ys.chunks_mut(4).enumerate() {
                let r0 = c * 64 + g * 4;
                let rows: [&[u8]; 4] = std::array::from_fn(|j| {
                    let r = r0 + j.min(out.len() - 1);
                    &w[r * rb..(r + 1) * rb]
                });
                // SAFETY: supports() checked AVX2/FMA/F16C; each row holds k/32 whole blocks
                // and the activation as many.
                let v = unsafe { avx::dot4(t, rows, &a) };
                out.copy_from_slice(&v[..out.len()]);
            }
        });
    }
    Ok(())
}

#[cfg(target_arch = "x86_64")]
mod avx {
    use super::Q8Act;
    use candle_core::quantized::GgmlDType;
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn f16(p: *const u8) -> f32 {
        let h = u16::from_le_bytes([*p, *p.add(1)]) as i32;
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h)))
    }

    /// Σ x·y over 32 signed int8 pairs, as 8 f32 partial sums.
    #[inline(always)]
    unsafe fn mul_sum_i8(x: __m256i, y: __m256i) -> __m256 {
        let ax = _mm256_sign_epi8(x, x);
        let sy = _mm256_sign_epi8(y, x);
        mul_sum_u8(ax, sy)
    }

    /// Σ x·y with x unsigned (< 128 here) and y signed.
    #[inline(always)]
    unsafe fn mul_sum_u8(ax: __m256i, sy: __m256i) -> __m256 {
        let dot = _mm256_maddubs_epi16(ax, sy);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(dot, _mm256_set1_epi16(1)))
    }

    /// 16 bytes of nibbles → 32 bytes: low nibbles in the low lane, high nibbles in the high.
    #[inline(always)]
    unsafe fn nibbles(p: *const u8) -> __m256i {
        let t = _mm_loadu_si128(p as *const __m128i);
        let b = _mm256_set_m128i(_mm_srli_epi16(t, 4), t);
        _mm256_and_si256(b, _mm256_set1_epi8(0x0f))
    }

    /// 32 bits → 32 bytes, 0xFF where the bit is set.
    #[inline(always)]
    unsafe fn bits(p: *const u8) -> __m256i {
        let x32 = u32::from_le_bytes([*p, *p.add(1), *p.add(2), *p.add(3)]);
        let shuf = _mm256_set_epi64x(
            0x0303030303030303,
            0x0202020202020202,
            0x0101010101010101,
            0x0000000000000000,
        );
        let b = _mm256_shuffle_epi8(_mm256_set1_epi32(x32 as i32), shuf);
        let b = _mm256_or_si256(b, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
        _mm256_cmpeq_epi8(b, _mm256_set1_epi64x(-1))
    }

    #[inline(always)]
    unsafe fn hsum(x: __m256) -> f32 {
        let r = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
        let r = _mm_add_ps(r, _mm_movehl_ps(r, r));
        let r = _mm_add_ss(r, _mm_movehdup_ps(r));
        _mm_cvtss_f32(r)
    }

    /// One weight block as signed bytes (q − zero point folded in where the type has one),
    /// its scale, and (Q4_1) its offset m: value = d·q + m.
    #[inline(always)]
    unsafe fn block<const T: u8>(p: *const u8) -> (__m256i, f32, f32) {
        let m = if T == Q4_1 { f16(p.add(2)) } else { 0.0 };
        (quants::<T>(p), f16(p), m)
    }

    const PREFETCH_BYTES: usize = 2048;
    const Q4_0: u8 = 0;
    const Q4_1: u8 = 1;
    const Q5_0: u8 = 2;
    const Q8_0: u8 = 3;

    /// The signed (Q4_0, Q5_0, Q8_0) or unsigned (Q4_1) quants of one block.
    #[inline(always)]
    unsafe fn quants<const T: u8>(p: *const u8) -> __m256i {
        match T {
            Q4_0 => _mm256_sub_epi8(nibbles(p.add(2)), _mm256_set1_epi8(8)),
            Q4_1 => nibbles(p.add(4)),
            Q5_0 => {
                // q | 0xF0 where the fifth bit is clear = q − 16 as a signed byte.
                let hi = _mm256_andnot_si256(bits(p.add(2)), _mm256_set1_epi8(0xF0u8 as i8));
                _mm256_or_si256(nibbles(p.add(6)), hi)
            }
            _ => _mm256_loadu_si256(p.add(2) as *const __m256i),
        }
    }

    /// Eight f16 values at `p`, `p + stride`, … as f32.
    #[inline(always)]
    unsafe fn f16x8(p: *const u8, stride: usize) -> __m256 {
        let mut h = [0u16; 8];
        for (j, v) in h.iter_mut().enumerate() {
            *v = (p.add(j * stride) as *const u16).read_unaligned();
        }
        _mm256_cvtph_ps(_mm_loadu_si128(h.as_ptr() as *const __m128i))
    }

    /// Four weight rows against one activation row, eight blocks at a time: their scales are converted with one vector
    /// `cvtph` per row and multiplied by the activation scales as a vector, then broadcast from
    /// memory (a load, not a shuffle) into the per-block FMA; Q4_1's offset term m·Σa is one
    /// vector FMA per eight blocks. Per block and row this leaves the quant unpacking, the
    /// int8 dot product and one FMA, like ggml's kernels.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot4_x8<const T: u8, const BB: usize>(rows: [&[u8]; 4], a: &Q8Act) -> [f32; 4] {
        let nb = a.d.len();
        let q = a.q.as_ptr();
        let (ad, asum) = (a.d.as_ptr(), a.s.as_ptr());
        let w = rows.map(|r| r.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut offv = [_mm256_setzero_ps(); 4];
        let mut ds = [[0f32; 8]; 4];
        let mut b = 0;
        while b + 8 <= nb {
            let dy = _mm256_loadu_ps(ad.add(b));
            for r in 0..4 {
                let p = w[r].add(b * BB);
                // The rows stream from DRAM (a model is larger than the L3), and perf put the
                // stalls on the first touch of each row's next blocks; prefetching 2 KiB ahead
                // in every row measured +15–30% decode at one thread (BENCHMARKS.md, #6).
                let q = p.wrapping_add(PREFETCH_BYTES);
                for l in 0..(8 * BB).div_ceil(64) {
                    _mm_prefetch::<_MM_HINT_T0>(q.wrapping_add(l * 64) as *const i8);
                }
                _mm256_storeu_ps(ds[r].as_mut_ptr(), _mm256_mul_ps(f16x8(p, BB), dy));
                if T == Q4_1 {
                    let m = f16x8(p.add(2), BB);
                    offv[r] = _mm256_fmadd_ps(m, _mm256_loadu_ps(asum.add(b)), offv[r]);
                }
            }
            #[allow(clippy::needless_range_loop)] // j also offsets the block pointers
            for j in 0..8 {
                let qy = _mm256_loadu_si256(q.add((b + j) * 32) as *const __m256i);
                for r in 0..4 {
                    let qx = quants::<T>(w[r].add((b + j) * BB));
                    let p = if T == Q4_1 {
                        mul_sum_u8(qx, qy)
                    } else {
                        mul_sum_i8(qx, qy)
                    };
                    acc[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(&ds[r][j]), p, acc[r]);
                }
            }
            b += 8;
        }
        let mut off = [0f32; 4];
        for bt in b..nb {
            let qy = _mm256_loadu_si256(q.add(bt * 32) as *const __m256i);
            let dy = *ad.add(bt);
            for r in 0..4 {
                let (qx, dx, mx) = block::<T>(w[r].add(bt * BB));
                let p = if T == Q4_1 {
                    off[r] += mx * *asum.add(bt);
                    mul_sum_u8(qx, qy)
                } else {
                    mul_sum_i8(qx, qy)
                };
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(dx * dy), p, acc[r]);
            }
        }
        std::array::from_fn(|r| hsum(acc[r]) + hsum(offv[r]) + off[r])
    }

    /// <row_j, a> for four rows of one type (each k/32 whole blocks, as many as `a` has).
    pub unsafe fn dot4(t: GgmlDType, rows: [&[u8]; 4], a: &Q8Act) -> [f32; 4] {
        match t {
            GgmlDType::Q4_0 => dot4_x8::<Q4_0, 18>(rows, a),
            GgmlDType::Q4_1 => dot4_x8::<Q4_1, 20>(rows, a),
            GgmlDType::Q5_0 => dot4_x8::<Q5_0, 22>(rows, a),
            _ => dot4_x8::<Q8_0, 34>(rows, a),
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod avx {
    use super::Q8Act;
    use candle_core::quantized::GgmlDType;
    pub unsafe fn dot4(_t: GgmlDType, _rows: [&[u8]; 4], _a: &Q8Act) -> [f32; 4] {
        unreachable!("supports() is false off x86_64")
    }
}
