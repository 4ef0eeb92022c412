//! `mpolm mpobert MODEL --share all|groups:G|none --depth L --out DIR`: build an MPOBERT encoder
//! (central tensors shared across layers) from a BERT model and write its checkpoint.

use crate::report::Report;
use crate::{fmt_int, load, range};
use anyhow::Result;
use methods::mpobert::{self, CentralFrom, Init, MpoBertOptions, Share};
use serde_json::json;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct MpoBertArgs {
    pub model: String,
    /// Which layers share a central tensor per matrix type: `all`, `groups:G` (G groups of
    /// consecutive layers; G must divide --depth) or `none`.
    #[arg(long, default_value = "all", value_parser = parse_share)]
    pub share: Share,
    /// Number of layers (at least the source's; deeper stacks repeat the source layers).
    #[arg(long, value_parser = range::count, allow_negative_numbers = true)]
    pub depth: usize,
    /// Rank of a per-layer adapter W = MPO + U·D (U = 0 at the start); 0 = none.
    #[arg(long, default_value_t = 0, value_parser = range::count0, allow_negative_numbers = true)]
    pub adapter_rank: usize,
    /// Layers past the source depth: `copy`, or `scaled` (auxiliaries × (2L)^(−1/4)).
    #[arg(long, default_value = "scaled", value_parser = ["copy", "scaled"])]
    pub init: String,
    /// The shared central: `layer:K` (source layer K's) or `joint` (fitted over the layers).
    #[arg(long, default_value = "joint", value_parser = parse_central)]
    pub central_from: CentralFrom,
    /// Share layer 0's biases and LayerNorms across all layers (the released code's choice).
    #[arg(long)]
    pub share_norms: bool,
    /// Seed of the adapters' initialisation.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    #[arg(long)]
    pub out: PathBuf,
}

fn parse_share(s: &str) -> Result<Share, String> {
    match s {
        "all" => Ok(Share::All),
        "none" => Ok(Share::None),
        _ => match s.strip_prefix("groups:").map(str::parse::<usize>) {
            Some(Ok(g)) if g >= 1 => Ok(Share::Groups(g)),
            _ => Err(format!("'{s}' is not all, none or groups:G with G >= 1")),
        },
    }
}

fn parse_central(s: &str) -> Result<CentralFrom, String> {
    match s {
        "joint" => Ok(CentralFrom::Joint),
        _ => match s.strip_prefix("layer:").map(str::parse::<usize>) {
            Some(Ok(k)) => Ok(CentralFrom::Layer(k)),
            _ => Err(format!("'{s}' is not joint or layer:K with K >= 0")),
        },
    }
}

pub fn run(a: MpoBertArgs, lo: &models::LoadOptions, rep: &mut Report) -> Result<()> {
    let src = load(&a.model, lo)?;
    let before = src.total_params();
    let o = MpoBertOptions {
        share: a.share,
        depth: a.depth,
        adapter_rank: a.adapter_rank,
        init: if a.init == "copy" {
            Init::Copy
        } else {
            Init::Scaled
        },
        central_from: a.central_from,
        share_norms: a.share_norms,
        seed: a.seed,
    };
    let t0 = std::time::Instant::now();
    let (m, r) = mpobert::build(src, &o, true)?;
    println!(
        "source layers {}, depth {}, {} group(s) of {} layers; new layers' auxiliaries × {:.4}",
        r.source_depth,
        a.depth,
        r.groups,
        a.depth / r.groups,
        r.new_layer_aux_scale
    );
    println!("relative reconstruction error ‖W − Ŵ‖/‖W‖ of each source layer's matrices:");
    print!("{:<6} {:<7}", "group", "layer");
    for t in mpobert::MATRICES {
        print!(" {:>22}", t);
    }
    println!();
    let mut keys: Vec<(usize, usize)> =
        r.errors.iter().map(|e| (e.group, e.source_layer)).collect();
    keys.sort_unstable();
    keys.dedup();
    for (g, s) in keys {
        print!("{g:<6} {s:<7}");
        for t in mpobert::MATRICES {
            match r
                .errors
                .iter()
                .find(|e| e.group == g && e.source_layer == s && e.matrix == t)
            {
                Some(e) => print!(" {:>22.5}", e.rel_error),
                None => print!(" {:>22}", "-"),
            }
        }
        println!();
    }
    let ps = mpobert::summary(&m);
    println!(
        "params: shared {} ({} tensors), per-layer {}, other {}, total {} (source {}), {:.1} s",
        fmt_int(ps.shared),
        ps.shared_tensors,
        fmt_int(ps.per_layer),
        fmt_int(ps.other),
        fmt_int(ps.total),
        fmt_int(before),
        t0.elapsed().as_secs_f64()
    );
    mpobert::save(&m, &a.out, Some(&r))?;
    println!("MPOBERT checkpoint written to {}", a.out.display());
    rep.set("command", json!("mpobert"));
    rep.set("model", json!(a.model));
    rep.set("out", json!(a.out));
    rep.set("source_params", json!(before));
    rep.set("params", json!(ps));
    rep.set("build", json!(r));
    Ok(())
}
