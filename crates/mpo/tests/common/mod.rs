//! Shared helpers for the integration tests.
#![allow(dead_code)]

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Standard normal samples (Box–Muller) from a seeded generator.
#[allow(deprecated)]
pub fn gaussian(n: usize, seed: u64) -> Vec<f64> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let u1: f64 = rng.gen::<f64>().max(1e-300);
            let u2: f64 = rng.gen();
            (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
        })
        .collect()
}

pub fn frob(a: &[f64]) -> f64 {
    a.iter().map(|x| x * x).sum::<f64>().sqrt()
}

pub fn rel_diff(a: &[f64], b: &[f64]) -> f64 {
    let d: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f64>()
        .sqrt();
    d / frob(b).max(1e-300)
}

/// y = x·Wᵀ (+ b) for row-major x[batch, in], W[out, in].
pub fn dense_linear(
    x: &[f64],
    w: &[f64],
    b: Option<&[f64]>,
    batch: usize,
    inp: usize,
    out: usize,
) -> Vec<f64> {
    let mut y = vec![0.0; batch * out];
    for r in 0..batch {
        for o in 0..out {
            let mut acc = b.map_or(0.0, |b| b[o]);
            for i in 0..inp {
                acc += x[r * inp + i] * w[o * inp + i];
            }
            y[r * out + o] = acc;
        }
    }
    y
}

/// Deterministic proptest configuration: a fixed seed (override with MPO_PROPTEST_SEED) and
/// case count (override with MPO_PROPTEST_CASES), no regression files.
pub fn config(cases: u32) -> proptest::test_runner::Config {
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    proptest::test_runner::Config {
        cases: env("MPO_PROPTEST_CASES").map_or(cases, |c| c as u32),
        rng_seed: proptest::test_runner::RngSeed::Fixed(
            env("MPO_PROPTEST_SEED").unwrap_or(0x4d504f),
        ),
        failure_persistence: None,
        ..Default::default()
    }
}

/// Random factor shapes with n ≤ 5, factors ≤ 4, at most `max_entries` matrix entries and
/// random zero-padding of rows/columns.
pub fn shape_strategy(
    max_entries: usize,
) -> impl proptest::strategy::Strategy<Value = mpo::MpoShape> {
    use proptest::prelude::*;
    (1usize..=5)
        .prop_flat_map(|n| {
            (
                proptest::collection::vec(1usize..=4, n),
                proptest::collection::vec(1usize..=4, n),
                0.5f64..=1.0,
                0.5f64..=1.0,
            )
        })
        .prop_filter("small enough", move |(r, c, _, _)| {
            r.iter().product::<usize>() * c.iter().product::<usize>() <= max_entries
        })
        .prop_map(|(r, c, fr, fc)| {
            let (pr, pc) = (r.iter().product::<usize>(), c.iter().product::<usize>());
            let or = ((pr as f64 * fr).ceil() as usize).clamp(1, pr);
            let oc = ((pc as f64 * fc).ceil() as usize).clamp(1, pc);
            mpo::MpoShape::new(r, c, or, oc).unwrap()
        })
}
