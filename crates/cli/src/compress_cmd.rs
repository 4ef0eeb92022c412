//! `mpolm compress MODEL --out DIR`: MPO-decompose a model's weight matrices into a checkpoint
//! the other commands load. With `--calib` the truncation is activation-aware (whitened by the
//! calibration inputs, `methods::mpop_calib`); `--allocate global` spreads one parameter budget
//! over all chosen matrices.

use crate::report::Report;
use crate::{fmt_int, load, range};
use anyhow::Result;
use methods::mpop::{self, Budget, CompressOptions, Shapes};
use methods::mpop_calib::{self, Allocate, CalibratedOptions, Whiten};
use methods::quant;
use serde_json::json;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct CompressArgs {
    pub model: String,
    #[arg(long, default_value = "mpo", value_parser = ["mpo"])]
    pub method: String,
    /// Factor shapes: `auto` (balanced), `paper` (the papers' tables where they apply) or `svd`
    /// (two sites i = [out, 1], j = [1, in]: a rank-r factorization; with --calib, SVD-LLM).
    #[arg(long, default_value = "auto", value_parser = ["auto", "paper", "svd"])]
    pub shapes: String,
    /// Number of MPO sites (cores), 1..=12 (default 5); the central tensor is index n/2.
    #[arg(long, value_parser = range::sites, allow_negative_numbers = true)]
    pub n: Option<usize>,
    /// Cap every bond at D (>= 1).
    #[arg(long, conflicts_with_all = ["rel_error", "params_ratio"], value_parser = range::count, allow_negative_numbers = true)]
    pub bond: Option<usize>,
    /// Smallest bonds whose error bound is within this relative Frobenius error, in [0, 1].
    #[arg(long, conflicts_with = "params_ratio", value_parser = range::fraction0, allow_negative_numbers = true)]
    pub rel_error: Option<f64>,
    /// Keep about this fraction of each matrix's parameters, in (0, 1].
    #[arg(long, value_parser = range::fraction, allow_negative_numbers = true)]
    pub params_ratio: Option<f64>,
    /// Comma-separated substrings/globs of module names (default: every Linear and the
    /// embedding; with --calib every decoder-layer Linear).
    #[arg(long, value_delimiter = ',')]
    pub matrices: Vec<String>,
    /// Calibration text: truncate in the basis whitened by each matrix's inputs on it (one
    /// pass over the dense model).
    #[arg(long)]
    pub calib: Option<PathBuf>,
    /// Calibration windows (default 128).
    #[arg(long, value_parser = range::count, allow_negative_numbers = true)]
    pub nsamples: Option<usize>,
    /// Tokens per calibration window (default 512).
    #[arg(long, value_parser = range::len2, allow_negative_numbers = true)]
    pub seqlen: Option<usize>,
    /// Seed of the calibration window draw (default 0).
    #[arg(long)]
    pub seed: Option<u64>,
    /// With --calib: `cholesky` (default; the damped input Gram's Cholesky factor,
    /// Kronecker-factored over an MPO's input legs), `diag` (ASVD: (mean |x|)^alpha) or `none`
    /// (plain truncation, output errors still measured).
    #[arg(long, value_parser = ["none", "cholesky", "diag"])]
    pub whiten: Option<String>,
    /// Gram damping as a fraction of its mean diagonal, in [0, 1) (default 0.01).
    #[arg(long, value_parser = range::fraction_below1, allow_negative_numbers = true)]
    pub damp: Option<f64>,
    /// ASVD's exponent for --whiten diag (default 0.5).
    #[arg(long, value_parser = range::nonneg, allow_negative_numbers = true)]
    pub alpha: Option<f64>,
    /// `uniform`: every matrix keeps --params-ratio of its parameters; `global`: one budget
    /// over all chosen matrices, cut where the normalized (whitened) error per parameter is least.
    #[arg(long, default_value = "uniform", value_parser = ["uniform", "global"])]
    pub allocate: String,
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(a: CompressArgs, lo: &models::LoadOptions, rep: &mut Report) -> Result<()> {
    let CompressArgs {
        model,
        method: _,
        shapes,
        n,
        bond,
        rel_error,
        params_ratio,
        matrices,
        calib,
        nsamples,
        seqlen,
        seed,
        whiten,
        damp,
        alpha,
        allocate,
        out,
    } = a;
    let shapes = match shapes.as_str() {
        "paper" => Shapes::Paper,
        "svd" => Shapes::Svd,
        _ => Shapes::Auto,
    };
    if shapes == Shapes::Svd && n.is_some_and(|n| n != 2) {
        anyhow::bail!("--shapes svd always has 2 sites; drop --n");
    }
    let n = n.unwrap_or(if shapes == Shapes::Svd { 2 } else { 5 });
    let global = allocate == "global";
    if calib.is_none() {
        for (flag, given) in [
            ("--whiten", whiten.is_some()),
            ("--nsamples", nsamples.is_some()),
            ("--seqlen", seqlen.is_some()),
            ("--seed", seed.is_some()),
            ("--damp", damp.is_some()),
            ("--alpha", alpha.is_some()),
        ] {
            anyhow::ensure!(!given, "{flag} needs calibration text: add --calib FILE");
        }
    }
    let whiten = match whiten.as_deref() {
        Some("none") => Whiten::None,
        Some("diag") => Whiten::Diag,
        _ => Whiten::Cholesky,
    };
    anyhow::ensure!(
        alpha.is_none() || whiten == Whiten::Diag,
        "--alpha only applies with --whiten diag"
    );
    if calib.is_some() || global {
        anyhow::ensure!(
            bond.is_none(),
            "--bond fixes every bond whatever the spectra say; with --calib or --allocate global give the budget as --params-ratio (or --rel-error)"
        );
        anyhow::ensure!(
            !global || params_ratio.is_some(),
            "--allocate global spreads a parameter budget: add --params-ratio R"
        );
    }
    // Read the calibration text before the (slow) model load.
    let calib_text = match &calib {
        Some(p) => Some(quant::read_text(p, "calibration")?),
        None => None,
    };
    let mut m = load(&model, lo)?;
    let before = m.total_params();
    let budget = match (bond, rel_error, params_ratio) {
        (Some(d), _, _) => Budget::Bond(d),
        (_, Some(e), _) => Budget::RelError(e),
        (_, _, Some(r)) => Budget::ParamsRatio(r),
        _ => Budget::Full,
    };
    if let Budget::Bond(0) = budget {
        anyhow::bail!("--bond must be at least 1");
    }
    let o = CompressOptions {
        shapes,
        n,
        budget,
        patterns: matrices,
    };
    if calib_text.is_some() || global {
        let mut co = CalibratedOptions::new(o);
        co.whiten = if calib_text.is_some() {
            whiten
        } else {
            Whiten::None
        };
        co.allocate = if global {
            Allocate::Global
        } else {
            Allocate::Uniform
        };
        co.damp = damp.unwrap_or(co.damp);
        co.alpha = alpha.unwrap_or(co.alpha);
        let mut calib_report = json!(null);
        let stats = match &calib_text {
            Some(text) => {
                mpop_calib::validate(&co, true)?;
                let names = mpop_calib::chosen(&m, &co, true)?;
                let (ns, sl, sd) = (
                    nsamples.unwrap_or(128),
                    seqlen.unwrap_or(512),
                    seed.unwrap_or(0),
                );
                let samples = quant::calib::calibration_samples(&m, text, ns, sl, sd)?;
                let tc = std::time::Instant::now();
                let stats = mpop_calib::collect_stats(&mut m, &samples, &names, 4, true)?;
                let secs = tc.elapsed().as_secs_f64();
                let src = calib.as_ref().map(|p| p.display().to_string());
                println!(
                    "calibration: {ns} × {sl} tokens from {}, {} input groups, {secs:.1} s",
                    src.as_deref().unwrap_or(""),
                    stats.len()
                );
                calib_report = json!({"file": src, "nsamples": ns, "seqlen": sl, "seed": sd, "input_groups": stats.len(), "secs": secs});
                Some(stats)
            }
            None => None,
        };
        let t0 = std::time::Instant::now();
        let r = mpop_calib::compress_calibrated(&mut m, &co, stats.as_ref(), true)?;
        let secs = t0.elapsed().as_secs_f64();
        drop(stats);
        println!(
            "{:<40} {:>22} {:>10} {:>10} {:>9} {:>9} {:>9}",
            "matrix", "bonds", "dense", "mpo", "rel err", "pred out", "out err"
        );
        let opt = |v: Option<f64>| v.map_or("-".to_string(), |e| format!("{e:.5}"));
        for l in &r.matrices {
            println!(
                "{:<40} {:>22} {:>10} {:>10} {:>9.5} {:>9.5} {:>9}",
                l.name,
                format!("{:?}", &l.bonds[1..l.bonds.len() - 1]),
                l.dense_params,
                l.mpo_params,
                l.rel_error,
                l.pred_rel_error,
                opt(l.rel_output_error)
            );
        }
        println!(
            "{:<10} {:>6} {:>10} {:>10}",
            "module", "kept", "pred out", "out err"
        );
        for (md, s) in &r.by_module {
            println!(
                "{md:<10} {:>6.3} {:>10.5} {:>10}",
                s.kept_ratio,
                s.mean_pred_rel_error,
                opt(s.mean_rel_output_error)
            );
        }
        let after = m.total_params();
        println!(
            "whiten {:?}, allocate {:?}: chosen matrices {} -> {} params ({:.3}); total params {} -> {} ({:.1}%), {secs:.1} s",
            co.whiten,
            co.allocate,
            fmt_int(r.dense_params),
            fmt_int(r.mpo_params),
            r.mpo_params as f64 / r.dense_params.max(1) as f64,
            fmt_int(before),
            fmt_int(after),
            100.0 * after as f64 / before as f64,
        );
        save(&m, &model, &out, before, rep)?;
        rep.set("calibration", calib_report);
        rep.set("compress_secs", json!(secs));
        rep.set("layers", json!(r.matrices));
        rep.set("calibrated", json!(r));
        return Ok(());
    }
    let t0 = std::time::Instant::now();
    let layers = mpop::compress(&mut m, &o, true)?;
    println!(
        "{:<40} {:>22} {:>11} {:>11} {:>9}",
        "matrix", "bonds", "dense", "mpo", "rel err"
    );
    for l in &layers {
        println!(
            "{:<40} {:>22} {:>11} {:>11} {:>9.5}",
            l.name,
            format!("{:?}", &l.bonds[1..l.bonds.len() - 1]),
            l.dense_params,
            l.mpo_params,
            l.rel_error
        );
    }
    let after = m.total_params();
    println!(
        "total params {} -> {} ({:.1}%), {:.1} s",
        fmt_int(before),
        fmt_int(after),
        100.0 * after as f64 / before as f64,
        t0.elapsed().as_secs_f64()
    );
    save(&m, &model, &out, before, rep)?;
    rep.set("layers", json!(layers));
    Ok(())
}

/// Write the checkpoint and the report fields both compress paths share.
fn save(m: &models::Model, model: &str, out: &Path, before: usize, rep: &mut Report) -> Result<()> {
    mpop::save(m, out)?;
    println!("MPO checkpoint written to {}", out.display());
    rep.set("command", json!("compress"));
    rep.set("model", json!(model));
    rep.set("out", json!(out));
    rep.set("total_params_before", json!(before));
    rep.set("total_params_after", json!(m.total_params()));
    Ok(())
}
