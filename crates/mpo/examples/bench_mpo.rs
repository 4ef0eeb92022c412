//! Times MPO decomposition + reconstruction on SmolLM2-135M-shaped Gaussian matrices (full
//! bond and a 50% parameter budget) and the MPO-linear forward against a dense matmul; prints
//! JSON. Compare with `python3 scripts/mpo_reference.py` (same matrices, numpy seed algorithm).
//!
//! cargo run --release -p mpo --example bench_mpo -- [--only SUBSTR] [--reps N]
//!     [--algorithm gram|svd] [--skip-embedding] [--no-forward] [--batch B] [--rho R]

use mpo::bench::{bench_decompose, bench_forward, smollm2_matrices};
use mpo::Algorithm;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let has = |flag: &str| args.iter().any(|a| a == flag);
    let reps: usize = value("--reps").map_or(Ok(5), |v| v.parse())?;
    let batch: usize = value("--batch").map_or(Ok(512), |v| v.parse())?;
    let rho: f64 = value("--rho").map_or(Ok(0.3), |v| v.parse())?;
    let algorithm = match value("--algorithm").as_deref() {
        None | Some("gram") => Algorithm::Gram,
        Some("svd") => Algorithm::SvdSweep,
        Some(other) => return Err(format!("unknown algorithm {other}").into()),
    };
    let only = value("--only");
    let mut decompose = Vec::new();
    let mut forward = Vec::new();
    for (name, rows, cols) in smollm2_matrices() {
        if only.as_deref().is_some_and(|o| !name.contains(o))
            || (has("--skip-embedding") && rows == 49152)
        {
            continue;
        }
        let reps = if rows * cols > 10_000_000 {
            reps.min(2)
        } else {
            reps
        };
        let r = bench_decompose(name, rows, cols, 5, 42, 0.5, algorithm, reps)?;
        eprintln!("{name}: {}", serde_json::to_string(&r.results)?);
        decompose.push(r);
        if !has("--no-forward") && rows != 49152 {
            let f = bench_forward(name, rows, cols, 5, batch, rho, reps.min(3))?;
            eprintln!("{name} forward: {}", serde_json::to_string(&f.results)?);
            forward.push(f);
        }
    }
    println!(
        "{}",
        serde_json::to_string_pretty(
            &serde_json::json!({ "decompose": decompose, "forward": forward })
        )?
    );
    Ok(())
}
