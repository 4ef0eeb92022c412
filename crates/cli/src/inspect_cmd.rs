//! `mpolm inspect MODEL`: architecture, parameters per component, storage types and memory.

use crate::report::Report;
use crate::{fmt_int, gguf_weights, load};
use anyhow::Result;
use models::Model;
use serde_json::json;

#[derive(clap::Args)]
pub struct InspectArgs {
    pub model: String,
}

pub fn run(a: InspectArgs, lo: &models::LoadOptions, rep: &mut Report) -> Result<()> {
    let m = load(&a.model, lo)?;
    show(&m, rep)
}

/// Prints the summary and sets the report's `inspect` entry (`mpolm run` shows it too).
pub fn show(m: &Model, rep: &mut Report) -> Result<()> {
    let counts = m.param_counts();
    let total: usize = counts.values().sum();
    println!(
        "model:        {} ({})",
        m.source.name,
        m.source.path.display()
    );
    println!("architecture: {}", m.arch_name());
    let (summary, cfg_json) = match &m.arch {
        models::Arch::Causal(l) => (l.summary(), l.hf_config()?),
        models::Arch::Encoder(e) => (e.summary(), e.hf_config()?),
    };
    println!("{summary}");
    println!(
        "stored as:    {}",
        m.stored_types
            .iter()
            .map(|(k, v)| format!("{k}×{v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    // The GGUF weight mode only exists for GGUF sources; other formats hold what they store.
    match m.source.format {
        models::hub::Format::Gguf => println!(
            "compute:      f32 (GGUF weights: {})",
            gguf_weights(m).name()
        ),
        models::hub::Format::HfDir => println!("compute:      f32 (weights held as stored)"),
    }
    println!("{:<20} {:>14} {:>7}", "component", "params", "share");
    for (k, v) in &counts {
        println!(
            "{:<20} {:>14} {:>6.2}%",
            k,
            fmt_int(*v),
            100.0 * *v as f64 / total.max(1) as f64
        );
    }
    println!("{:<20} {:>14}", "total", fmt_int(total));
    println!(
        "memory (f32):        {:.1} MiB",
        total as f64 * 4.0 / (1024.0 * 1024.0)
    );
    println!(
        "weights as held:     {:.1} MiB",
        m.weight_bytes() as f64 / (1024.0 * 1024.0)
    );
    let moe = methods::mpoe::summary(m);
    if let Some(s) = &moe {
        println!(
            "experts:      {} {} experts in layers {:?} ({} routing, capacity factor {}, token dropping {})",
            s.experts,
            s.expert_kind,
            s.layers,
            s.router,
            s.capacity_factor,
            if s.drop_tokens { "on" } else { "off" }
        );
        println!(
            "              {} shared by experts, {} per-expert, {} router; {} active per token",
            fmt_int(s.shared_params),
            fmt_int(s.per_expert_params),
            fmt_int(s.router_params),
            fmt_int(s.active_params)
        );
    }
    // Tensors held by several layers (MPOBERT's shared centrals) are counted once above.
    let shared = methods::mpobert::is_mpobert(m).then(|| methods::mpobert::summary(m));
    if let Some(s) = &shared {
        println!(
            "shared across layers: {} in {} tensors; per layer: {} over {} layers ({} each on average); other: {}",
            fmt_int(s.shared),
            s.shared_tensors,
            fmt_int(s.per_layer),
            s.layers,
            fmt_int(s.per_layer / s.layers.max(1)),
            fmt_int(s.other)
        );
    }
    let kinds: std::collections::BTreeMap<String, usize> =
        m.linears()
            .iter()
            .fold(Default::default(), |mut acc, (_, l)| {
                *acc.entry(l.kind()).or_insert(0) += 1;
                acc
            });
    rep.set(
        "inspect",
        json!({
            "model": m.source.name,
            "path": m.source.path,
            "architecture": m.arch_name(),
            "config": cfg_json,
            "stored_types": m.stored_types,
            "linear_kinds": kinds,
            "params": counts,
            "total_params": total,
            "memory_f32_bytes": total * 4,
            "weight_bytes": m.weight_bytes(),
            "gguf_weights": gguf_weights(m).name(),
            "load_seconds": m.load_secs,
            "moe": moe,
            "mpobert_params": shared,
        }),
    );
    Ok(())
}
