//! Benchmarks of the MPO core, callable from the CLI or `examples/bench_mpo.rs`.
//!
//! The test matrices come from a counter-based generator (splitmix64 → Box–Muller) that
//! `scripts/mpo_reference.py` reimplements with numpy, so both sides decompose the same
//! matrices and their errors can be compared directly.

use crate::decompose::{Algorithm, DecomposeOptions};
use crate::layer::{ForwardMode, MpoLinear};
use crate::mpo::Mpo;
use crate::shapes::MpoShape;
use crate::truncate::Truncation;
use candle_core::{Device, Module, Tensor};
use serde::Serialize;
use std::time::Instant;

/// The weight matrices of SmolLM2-135M (hidden 576, 9 heads × 64, 3 KV heads, FFN 1536,
/// vocabulary 49152), stored [out, in].
pub fn smollm2_matrices() -> Vec<(&'static str, usize, usize)> {
    vec![
        ("q_proj/o_proj 576x576", 576, 576),
        ("k_proj/v_proj 192x576", 192, 576),
        ("gate/up_proj 1536x576", 1536, 576),
        ("down_proj 576x1536", 576, 1536),
        ("embed_tokens 49152x576", 49152, 576),
    ]
}

fn splitmix(seed: u64, i: u64) -> u64 {
    let mut z = seed.wrapping_add((i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Standard normal rows×cols matrix, identical to `gaussian_matrix` in mpo_reference.py:
/// entry e uses u1 = U(2e), u2 = U(2e+1) with U(i) = (splitmix64(seed, i) >> 11)·2⁻⁵³ and
/// x = sqrt(−2 ln(1 − u1))·cos(2π u2).
pub fn gaussian_matrix(rows: usize, cols: usize, seed: u64) -> Vec<f64> {
    use rayon::prelude::*;
    let scale = 1.0 / (1u64 << 53) as f64;
    (0..rows * cols)
        .into_par_iter()
        .map(|e| {
            let u1 = (splitmix(seed, 2 * e as u64) >> 11) as f64 * scale;
            let u2 = (splitmix(seed, 2 * e as u64 + 1) >> 11) as f64 * scale;
            (-2.0 * (1.0 - u1).ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
        })
        .collect()
}

/// One decomposition + reconstruction measurement.
#[derive(Clone, Debug, Serialize)]
pub struct DecompResult {
    pub setting: String,
    pub max_bond: Option<usize>,
    pub bonds: Vec<usize>,
    pub params: usize,
    pub ratio: f64,
    pub rel_error: f64,
    pub rel_bound: f64,
    pub decompose_s: f64,
    pub reconstruct_s: f64,
    pub total_s: f64,
}

/// Measurements for one matrix.
#[derive(Clone, Debug, Serialize)]
pub struct DecompReport {
    pub name: String,
    pub rows: usize,
    pub cols: usize,
    pub row_factors: Vec<usize>,
    pub col_factors: Vec<usize>,
    pub dtype: String,
    pub algorithm: String,
    pub threads: usize,
    pub results: Vec<DecompResult>,
}

fn time<R>(reps: usize, mut f: impl FnMut() -> R) -> (f64, R) {
    let mut best = f64::INFINITY;
    let mut out = None;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        let r = f();
        best = best.min(t.elapsed().as_secs_f64());
        out = Some(r);
    }
    (best, out.unwrap())
}

fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|x| x * x).sum();
    (num / den).sqrt()
}

/// Decomposes a seeded Gaussian matrix at full bond and at the largest uniform bond whose
/// parameter count is ≤ `budget`·I·J, timing decomposition (truncation included) and
/// reconstruction separately (best of `reps`). f64 arithmetic.
#[allow(clippy::too_many_arguments)]
pub fn bench_decompose(
    name: &str,
    rows: usize,
    cols: usize,
    n: usize,
    seed: u64,
    budget: f64,
    algorithm: Algorithm,
    reps: usize,
) -> crate::Result<DecompReport> {
    let shape = MpoShape::auto(rows, cols, n)?;
    let w = gaussian_matrix(rows, cols, seed);
    let d_half = shape.max_bond_for_params((budget * (rows * cols) as f64) as usize);
    let mut results = Vec::new();
    for (setting, trunc, cap) in [
        ("full".to_string(), Truncation::Full, None),
        (
            format!("budget{:.0}%", budget * 100.0),
            Truncation::MaxBond(d_half),
            Some(d_half),
        ),
    ] {
        let opts = DecomposeOptions {
            algorithm,
            truncation: trunc,
            ..Default::default()
        };
        let (td, m) = time(reps, || Mpo::decompose_with(&w, &shape, &opts));
        let m = m?;
        let (tr, what) = time(reps, || m.to_matrix());
        let what = what?;
        let norm = w.iter().map(|x| x * x).sum::<f64>().sqrt();
        results.push(DecompResult {
            setting,
            max_bond: cap,
            bonds: m.bonds().to_vec(),
            params: m.num_params(),
            ratio: m.ratio(),
            rel_error: rel_err(&what, &w),
            rel_bound: m.error_bound() / norm,
            decompose_s: td,
            reconstruct_s: tr,
            total_s: td + tr,
        });
    }
    Ok(DecompReport {
        name: name.to_string(),
        rows,
        cols,
        row_factors: shape.row_factors.clone(),
        col_factors: shape.col_factors.clone(),
        dtype: "f64".into(),
        algorithm: format!("{algorithm:?}"),
        threads: rayon::current_num_threads(),
        results,
    })
}

/// Forward timing of an MPO linear layer (contract path) against the dense product.
#[derive(Clone, Debug, Serialize)]
pub struct ForwardResult {
    pub setting: String,
    pub bonds: Vec<usize>,
    pub ratio: f64,
    pub contract_s: f64,
    pub rebuild_s: f64,
    pub dense_s: f64,
    /// dense / contract (> 1: the MPO forward is faster)
    pub speedup_vs_dense: f64,
    pub rel_diff_contract_vs_rebuild: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ForwardReport {
    pub name: String,
    pub rows: usize,
    pub cols: usize,
    pub batch: usize,
    pub dtype: String,
    pub results: Vec<ForwardResult>,
}

/// y = x·Wᵀ for x[batch, cols] in f32 on the CPU: dense matmul vs the MPO layer's contract
/// and rebuild paths, at full bond and at the largest uniform bond with ρ ≤ `rho`.
pub fn bench_forward(
    name: &str,
    rows: usize,
    cols: usize,
    n: usize,
    batch: usize,
    rho: f64,
    reps: usize,
) -> crate::Result<ForwardReport> {
    let dev = Device::Cpu;
    let shape = MpoShape::auto(rows, cols, n)?;
    let w = gaussian_matrix(rows, cols, 1);
    let full = Mpo::decompose(&w, &shape)?.cast::<f32>();
    let w32: Vec<f32> = w.iter().map(|&v| v as f32).collect();
    let wt = Tensor::from_vec(w32, (rows, cols), &dev)?;
    let x: Vec<f32> = gaussian_matrix(batch, cols, 2)
        .iter()
        .map(|&v| v as f32)
        .collect();
    let x = Tensor::from_vec(x, (batch, cols), &dev)?;
    let wtt = wt.t()?.contiguous()?;
    let (dense_s, _) = time(reps, || x.matmul(&wtt).unwrap());
    let d = shape.max_bond_for_params((rho * (rows * cols) as f64) as usize);
    let mut results = Vec::new();
    for (setting, m) in [
        ("full".to_string(), full.clone()),
        (format!("rho{rho}"), full.truncate(&Truncation::MaxBond(d))?),
    ] {
        let layer = MpoLinear::from_mpo(&m, None, &dev)?.with_mode(ForwardMode::Contract);
        let (contract_s, yc) = time(reps, || layer.forward(&x).unwrap());
        let (rebuild_s, yr) = time(reps, || {
            layer.forward_with(&x, ForwardMode::Rebuild).unwrap()
        });
        let diff = (&yc - &yr)?.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt()
            / yr.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt();
        results.push(ForwardResult {
            setting,
            bonds: m.bonds().to_vec(),
            ratio: m.ratio(),
            contract_s,
            rebuild_s,
            dense_s,
            speedup_vs_dense: dense_s / contract_s,
            rel_diff_contract_vs_rebuild: diff as f64,
        });
    }
    Ok(ForwardReport {
        name: name.to_string(),
        rows,
        cols,
        batch,
        dtype: "f32".into(),
        results,
    })
}
