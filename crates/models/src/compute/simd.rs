//! Runtime dispatch to AVX2+FMA code, shared by every hand-written kernel in the workspace.

/// Whether this CPU has AVX2 and FMA (detected once).
pub fn avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static F: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *F.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Evaluates a block compiled for AVX2+FMA when the CPU has them (the block becomes a closure
/// whose only call site is a function with those features, so it is inlined there and its loops
/// vectorise 8-wide), else for the portable baseline. A macro, not a function taking a closure:
/// one closure called from both branches would have two call sites and stay un-inlined.
/// `simd!(if COND; BLOCK)` takes the AVX2 branch only when COND (which must imply AVX2+FMA) holds.
#[macro_export]
macro_rules! simd {
    (if $cond:expr; $body:expr) => {{
        #[cfg(target_arch = "x86_64")]
        {
            if $cond {
                // SAFETY: the caller's condition implies the features, detected at run time.
                unsafe { $crate::simd::with_avx2(|| $body) }
            } else {
                $body
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            $body
        }
    }};
    ($body:expr) => {
        $crate::simd!(if $crate::simd::avx2_fma(); $body)
    };
}

/// # Safety
/// The CPU must support AVX2 and FMA (use [`simd!`](crate::simd!)).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[doc(hidden)]
pub unsafe fn with_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// Sum of the 8 lanes.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn hsum256(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let lo = _mm256_castps256_ps128(v);
    let hi = _mm256_extractf128_ps(v, 1);
    let s = _mm_add_ps(lo, hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}
