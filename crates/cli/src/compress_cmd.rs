//! `mpolm compress MODEL --out DIR`: MPO-decompose a model's weight matrices into a checkpoint
//! the other commands load.

use crate::report::Report;
use crate::{fmt_int, load, range};
use anyhow::Result;
use methods::mpop::{self, Budget, CompressOptions, Shapes};
use serde_json::json;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct CompressArgs {
    pub model: String,
    #[arg(long, default_value = "mpo", value_parser = ["mpo"])]
    pub method: String,
    /// Factor shapes: `auto` (balanced) or `paper` (the papers' tables where they apply).
    #[arg(long, default_value = "auto", value_parser = ["auto", "paper"])]
    pub shapes: String,
    /// Number of MPO sites (cores), 1..=12; the central tensor is index n/2.
    #[arg(long, default_value_t = 5, value_parser = range::sites, allow_negative_numbers = true)]
    pub n: usize,
    /// Cap every bond at D (>= 1).
    #[arg(long, conflicts_with_all = ["rel_error", "params_ratio"], value_parser = range::count, allow_negative_numbers = true)]
    pub bond: Option<usize>,
    /// Smallest bonds whose error bound is within this relative Frobenius error, in [0, 1].
    #[arg(long, conflicts_with = "params_ratio", value_parser = range::fraction0, allow_negative_numbers = true)]
    pub rel_error: Option<f64>,
    /// Keep about this fraction of each matrix's parameters, in (0, 1].
    #[arg(long, value_parser = range::fraction, allow_negative_numbers = true)]
    pub params_ratio: Option<f64>,
    /// Comma-separated substrings/globs of module names (default: every Linear and the embedding).
    #[arg(long, value_delimiter = ',')]
    pub matrices: Vec<String>,
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
        out,
    } = a;
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
        shapes: if shapes == "paper" {
            Shapes::Paper
        } else {
            Shapes::Auto
        },
        n,
        budget,
        patterns: matrices,
    };
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
    mpop::save(&m, &out)?;
    println!("MPO checkpoint written to {}", out.display());
    rep.set("command", json!("compress"));
    rep.set("model", json!(model));
    rep.set("out", json!(out));
    rep.set("total_params_before", json!(before));
    rep.set("total_params_after", json!(after));
    rep.set("layers", json!(layers));
    Ok(())
}
