//! The two element types the crate works in. A tiny trait instead of a numeric-tower crate:
//! everything heavy goes through faer (which needs `RealField`) and candle (which needs
//! `WithDType`, whose `DTYPE` names the matching candle dtype), and conversions through f64
//! are all the glue code needs.

/// f32 or f64.
pub trait Scalar:
    faer::traits::RealField
    + candle_core::WithDType
    + Copy
    + Default
    + Send
    + Sync
    + std::fmt::Debug
    + 'static
{
    /// Unit roundoff of the type, used to set relative thresholds.
    const EPSILON: f64;
    /// Lossy conversion from f64.
    fn of(x: f64) -> Self;
    /// Widening conversion to f64.
    fn f(self) -> f64;
}

impl Scalar for f32 {
    const EPSILON: f64 = f32::EPSILON as f64;
    #[inline(always)]
    fn of(x: f64) -> Self {
        x as f32
    }
    #[inline(always)]
    fn f(self) -> f64 {
        self as f64
    }
}

impl Scalar for f64 {
    const EPSILON: f64 = f64::EPSILON;
    #[inline(always)]
    fn of(x: f64) -> Self {
        x
    }
    #[inline(always)]
    fn f(self) -> f64 {
        self
    }
}

/// Converts a slice element-wise between the two scalar types.
pub fn convert<A: Scalar, B: Scalar>(src: &[A]) -> Vec<B> {
    src.iter().map(|&x| B::of(x.f())).collect()
}
