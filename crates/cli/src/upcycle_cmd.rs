//! `mpolm upcycle MODEL --experts E --router top1|top2 [--mpo] --out DIR`: turn a dense causal
//! model's FFNs into mixtures of experts (sparse upcycling; MPOE with `--mpo`) and write a
//! checkpoint the other commands load.

use crate::report::Report;
use crate::{fmt_int, load};
use anyhow::Result;
use methods::mpoe::{self, UpcycleOptions};
use models::moe::Router;
use serde_json::json;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct UpcycleArgs {
    pub model: String,
    /// Experts per upcycled layer (>= 2), each an exact copy of the dense FFN at the start.
    #[arg(long, value_parser = crate::range::count, allow_negative_numbers = true)]
    pub experts: usize,
    /// top1: Switch routing (one expert, output scaled by the gate); top2: two experts,
    /// gates renormalized over them.
    #[arg(long, value_parser = ["top1", "top2"])]
    pub router: String,
    /// MPO experts: each matrix an n-site MPO whose central tensor all experts of the layer
    /// share (MPOE); without it the experts are dense copies.
    #[arg(long)]
    pub mpo: bool,
    /// MPO sites with --mpo: 3, 5, 7 or 9.
    #[arg(long, default_value_t = 5, requires = "mpo", value_parser = crate::range::sites, allow_negative_numbers = true)]
    pub sites: usize,
    /// Slots per expert = ceil(c · k · tokens / E) (> 0; default 1.0 for top1, 1.25 for top2).
    #[arg(long, value_parser = crate::range::positive, allow_negative_numbers = true)]
    pub capacity_factor: Option<f64>,
    /// Drop the assignments beyond an expert's capacity (off: capacity is not enforced).
    #[arg(long)]
    pub drop_tokens: bool,
    /// Which decoder layers: all, odd, even, or indices and ranges (3,5,10-13).
    #[arg(long, default_value = "all")]
    pub layers: String,
    /// Weight of the router's balance loss in the training loss (>= 0).
    #[arg(long, default_value_t = 0.01, value_parser = crate::range::nonneg, allow_negative_numbers = true)]
    pub aux_loss_weight: f64,
    /// Seed of the routers' initialization.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(a: UpcycleArgs, lo: &models::LoadOptions, rep: &mut Report) -> Result<()> {
    let mut o = UpcycleOptions {
        experts: a.experts,
        router: if a.router == "top2" {
            Router::Top2
        } else {
            Router::Top1
        },
        mpo: a.mpo,
        sites: a.sites,
        capacity_factor: a.capacity_factor,
        drop_tokens: a.drop_tokens,
        layers: None,
        aux_loss_weight: a.aux_loss_weight,
        seed: a.seed,
    };
    // Options first: a bad --experts should not wait for a model to load.
    mpoe::check(&o)?;
    let mut m = load(&a.model, lo)?;
    if let models::Arch::Causal(l) = &m.arch {
        o.layers = Some(mpoe::parse_layers(&a.layers, l.num_layers())?);
    }
    let r = mpoe::upcycle(&mut m, &o)?;
    mpoe::save(&m, &a.out, false)?;
    let s = &r.summary;
    println!(
        "upcycled {} of {} layers' FFNs into {} {} experts each ({} routing, capacity factor {}, token dropping {})",
        r.layers.len(),
        m.causal()?.num_layers(),
        r.experts,
        match r.sites {
            Some(n) => format!("MPO ({n}-site, shared central tensor)"),
            None => "dense".into(),
        },
        r.router,
        s.capacity_factor,
        if s.drop_tokens { "on" } else { "off" }
    );
    println!(
        "parameters: {} dense -> {} total ({} shared by experts, {} per-expert, {} router); {} active per token",
        fmt_int(r.dense_params),
        fmt_int(s.total_params),
        fmt_int(s.shared_params),
        fmt_int(s.per_expert_params),
        fmt_int(s.router_params),
        fmt_int(s.active_params)
    );
    println!("checkpoint written to {}", a.out.display());
    rep.set("command", json!("upcycle"));
    rep.set("out", json!(a.out));
    rep.set("upcycle", serde_json::to_value(&r)?);
    Ok(())
}
