//! Allowed ranges of the numeric flags, as clap value parsers: a bad value stops the command
//! while the arguments are parsed, before any model is loaded, with one line naming the flag
//! (clap adds it) and the range.
//!
//! Counts have ceilings well above any real use so that arithmetic on them (steps × epochs,
//! batch × length) cannot overflow and no allocation is sized from an absurd value.

use std::ops::RangeInclusive;

/// Largest count accepted by count flags (steps, epochs, examples, tokens, …).
pub const MAX_COUNT: usize = 1 << 32;

/// Threads: up to 4 per available core (at least 4). More only adds scheduling overhead,
/// and pool start-up must never be asked for thousands of threads.
pub fn max_threads() -> usize {
    4 * std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn int_in(s: &str, r: RangeInclusive<usize>) -> Result<usize, String> {
    let v: usize = s
        .trim()
        .parse()
        .map_err(|_| format!("expected a whole number in {}..={}", r.start(), r.end()))?;
    if r.contains(&v) {
        Ok(v)
    } else {
        Err(format!("must be in {}..={}, got {v}", r.start(), r.end()))
    }
}

fn float(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("expected a number, got '{s}'"))?;
    if v.is_finite() {
        Ok(v)
    } else {
        Err(format!("must be a finite number, got {v}"))
    }
}

pub fn threads(s: &str) -> Result<usize, String> {
    let max = max_threads();
    int_in(s, 1..=max).map_err(|e| format!("{e} (at most 4 per core of this machine)"))
}

/// A count of at least 1 (steps, epochs, batch sizes, examples, tokens).
pub fn count(s: &str) -> Result<usize, String> {
    int_in(s, 1..=MAX_COUNT)
}

/// A count that may be 0 (0 switches the feature off).
pub fn count0(s: &str) -> Result<usize, String> {
    int_in(s, 0..=MAX_COUNT)
}

/// A length in tokens of at least 2 (one input and one target).
pub fn len2(s: &str) -> Result<usize, String> {
    int_in(s, 2..=MAX_COUNT)
}

/// MPO sites: 1 (the matrix itself) to 12; beyond that every factor is 1.
pub fn sites(s: &str) -> Result<usize, String> {
    int_in(s, 1..=12)
}

/// ≥ 0, finite.
pub fn nonneg(s: &str) -> Result<f64, String> {
    let v = float(s)?;
    if v >= 0.0 {
        Ok(v)
    } else {
        Err(format!("must be >= 0, got {v}"))
    }
}

/// > 0, finite.
pub fn positive(s: &str) -> Result<f64, String> {
    let v = float(s)?;
    if v > 0.0 {
        Ok(v)
    } else {
        Err(format!("must be > 0, got {v}"))
    }
}

/// A fraction in (0, 1].
pub fn fraction(s: &str) -> Result<f64, String> {
    let v = float(s)?;
    if v > 0.0 && v <= 1.0 {
        Ok(v)
    } else {
        Err(format!("must be in (0, 1], got {v}"))
    }
}

/// A fraction in [0, 1].
pub fn fraction0(s: &str) -> Result<f64, String> {
    let v = float(s)?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("must be in [0, 1], got {v}"))
    }
}

/// A probability of dropping or cutting: [0, 1).
pub fn fraction_below1(s: &str) -> Result<f64, String> {
    let v = float(s)?;
    if (0.0..1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("must be in [0, 1), got {v}"))
    }
}

/// f32 flags: > 0 and finite as an f32.
pub fn positive_f32(s: &str) -> Result<f32, String> {
    let v = positive(s)? as f32;
    if v.is_finite() && v > 0.0 {
        Ok(v)
    } else {
        Err(format!("must be a positive f32, got {s}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_accept_their_ends_and_refuse_outside() {
        assert_eq!(count("1"), Ok(1));
        assert!(count("0").unwrap_err().contains("1..=4294967296"));
        assert!(count("-3").is_err() && count("x").is_err());
        assert_eq!(count0("0"), Ok(0));
        assert!(len2("1").is_err() && len2("2").is_ok());
        assert!(sites("0").is_err() && sites("12").is_ok() && sites("13").is_err());
        assert!(threads("0").is_err() && threads("1").is_ok());
        assert!(threads(&max_threads().to_string()).is_ok());
        assert!(threads(&(max_threads() + 1).to_string()).is_err());
        for bad in ["nan", "NaN", "inf", "-inf", "1e400"] {
            assert!(nonneg(bad).is_err(), "{bad}");
            assert!(fraction(bad).is_err(), "{bad}");
        }
        assert_eq!(nonneg("0"), Ok(0.0));
        assert!(nonneg("-0.1").is_err());
        assert!(positive("0").is_err() && positive("1e-9").is_ok());
        assert!(fraction("0").is_err() && fraction("1").is_ok() && fraction("1.5").is_err());
        assert!(fraction0("0").is_ok() && fraction0("2").is_err());
        assert!(fraction_below1("0").is_ok() && fraction_below1("1").is_err());
        assert!(positive_f32("1e39").is_err() && positive_f32("6").is_ok());
    }
}
