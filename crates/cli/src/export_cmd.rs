//! `mpolm export MODEL (--dense | --gguf --type …) --out PATH`: a (compressed/quantized) model
//! as a plain dense HF directory or a llama.cpp GGUF file.

use crate::report::Report;
use crate::{fmt_int, load};
use anyhow::Result;
use methods::quant::gguf_export as ge;
use serde_json::json;
use std::path::PathBuf;

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("format").required(true).args(["dense", "gguf"])))]
pub struct ExportArgs {
    pub model: String,
    /// Contract every factored layer back to a dense matrix (HF directory).
    #[arg(long)]
    pub dense: bool,
    /// Write a llama.cpp GGUF v3 file (llama or qwen2 architecture).
    #[arg(long)]
    pub gguf: bool,
    /// GGUF recipe (llama.cpp names; q4_k_m mixes Q4_K/Q6_K like llama-quantize).
    #[arg(long = "type", value_name = "TYPE", default_value = "f16", conflicts_with = "dense",
          value_parser = clap::builder::PossibleValuesParser::new(ge::TYPE_NAMES))]
    pub gguf_type: String,
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(a: ExportArgs, lo: &models::LoadOptions, rep: &mut Report) -> Result<()> {
    match a.gguf {
        true => gguf(a, lo, rep),
        false => dense(a, lo, rep),
    }
}

fn gguf(a: ExportArgs, lo: &models::LoadOptions, rep: &mut Report) -> Result<()> {
    let ExportArgs {
        model,
        gguf_type,
        out,
        ..
    } = a;
    let m = load(&model, lo)?;
    let mut o = ge::ExportOptions::new(ge::GgufType::parse(&gguf_type)?);
    (o.progress, o.print_tensors) = (true, true);
    let r = ge::export_gguf(&m, &out, &o)?;
    println!(
        "GGUF {} ({} arch) written to {}: {} params, {:.2} MiB, {:.2} bits/weight, types {:?}, {} fallback(s), {:.1} s",
        r.recipe, r.arch, out.display(), fmt_int(r.n_params), r.file_bytes as f64 / 1048576.0,
        r.bits_per_weight, r.type_counts, r.fallbacks.len(), r.seconds
    );
    rep.set("command", json!("export"));
    rep.set("format", json!("gguf"));
    for (k, v) in [
        ("out", json!(out)),
        ("type", json!(r.recipe)),
        ("arch", json!(r.arch)),
        ("file_bytes", json!(r.file_bytes)),
        ("n_params", json!(r.n_params)),
        ("bits_per_weight", json!(r.bits_per_weight)),
        ("type_counts", json!(r.type_counts)),
        ("fallbacks", json!(r.fallbacks)),
        ("tensors", json!(r.tensors)),
        ("tokenizer_from", json!(r.tokenizer_from)),
        ("seconds", json!(r.seconds)),
    ] {
        rep.set(k, v);
    }
    Ok(())
}

fn dense(a: ExportArgs, lo: &models::LoadOptions, rep: &mut Report) -> Result<()> {
    let ExportArgs { model, out, .. } = a;
    let m = load(&model, lo)?;
    if let Some(s) = methods::mpoe::summary(&m) {
        // Dense experts, same routing: transformers has no layout for a subset of MoE layers
        // with these routers, so this stays an mpolm mixture-of-experts checkpoint.
        methods::mpoe::save(&m, &out, true)?;
        let back = methods::open(out.to_str().unwrap_or_default(), lo)?;
        let written = back.total_params();
        println!(
            "mixture of experts with dense experts ({} experts in {} layers, {} params) written to {}",
            s.experts,
            s.layers.len(),
            fmt_int(written),
            out.display()
        );
        rep.set("command", json!("export"));
        rep.set("out", json!(out));
        rep.set("parameters_written", json!(written));
        rep.set("source_parameters", json!(m.total_params()));
        return Ok(());
    }
    let t = models::export::dense_state_dict(&m)?;
    models::export::write_hf_dir(&m, &out, &t, &[])?;
    // What was written, not the source's count: a full-bond MPO holds more
    // parameters than the dense matrices it contracts to.
    let written: usize = t.values().map(|x| x.elem_count()).sum();
    println!(
        "dense HF directory ({} params) written to {}",
        fmt_int(written),
        out.display()
    );
    rep.set("command", json!("export"));
    rep.set("out", json!(out));
    rep.set("tensors", json!(t.len()));
    rep.set("parameters_written", json!(written));
    rep.set("source_parameters", json!(m.total_params()));
    Ok(())
}
