//! `mpolm quantize`: RTN / GPTQ quantization into an AutoGPTQ-layout checkpoint, with total
//! bits, file size, peak RSS and (optionally) WikiText-2 perplexity and a sample generation.
//! MODEL may also be a quantized checkpoint (with `--method none`) to evaluate or generate.

use crate::report::Report;
use anyhow::Result;
use methods::quant::{self, calib::Method, pipeline, KeepFp16};
use serde_json::json;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct QuantizeArgs {
    /// Model alias, HF directory, .gguf file, or (with --method none) a quantized checkpoint.
    pub model: String,
    /// rtn, gptq, or none (no quantization: evaluate MODEL as it is, e.g. the f32 baseline).
    #[arg(long, default_value = "gptq", value_parser = ["rtn", "gptq", "none"])]
    pub method: String,
    /// Bits per weight: 2, 3, 4 or 8.
    #[arg(long, default_value_t = 4)]
    pub bits: u32,
    /// Input columns per scale/zero group; -1 = one group per output row. Must divide every
    /// layer's in_features (64 by default: AutoGPTQ's usual 128 does not divide SmolLM2's 576).
    #[arg(long, default_value_t = 64, allow_hyphen_values = true)]
    pub group_size: i64,
    /// GPTQ act-order (desc_act): quantize columns by decreasing Hessian diagonal (g_idx stored).
    #[arg(long)]
    pub act_order: bool,
    /// Hessian damping as a fraction of its mean diagonal, in [0, 1).
    #[arg(long, default_value_t = 0.01, value_parser = crate::range::fraction_below1, allow_negative_numbers = true)]
    pub damp: f64,
    /// Symmetric grid (zero at 2^(bits-1)).
    #[arg(long)]
    pub sym: bool,
    /// How the checkpoint stores zero points: gptq (AutoGPTQ v1, zero − 1; what transformers
    /// and most loaders read) or gptq_v2 (GPTQModel: the zero itself, so a zero of 0 survives).
    #[arg(long, default_value = "gptq", value_parser = ["gptq", "gptq_v2"])]
    pub checkpoint_format: String,
    /// Calibration text file (default: the WikiText-2 validation split; its test split is never used).
    #[arg(long)]
    pub calib: Option<PathBuf>,
    #[arg(long, default_value_t = 128, value_parser = crate::range::count, allow_negative_numbers = true)]
    pub nsamples: usize,
    #[arg(long, default_value_t = 512, value_parser = crate::range::len2, allow_negative_numbers = true)]
    pub seqlen: usize,
    /// Keep projections in fp16: attn | ffn | q,k,v,o,gate,up,down | crucial:N.
    #[arg(long)]
    pub keep_fp16: Option<String>,
    /// Quantize every decoder projection's input to INT8 per token (simulated, LLM.int8-style),
    /// keeping outlier dimensions in full precision (see --keep-outliers). Outliers are found on
    /// the calibration text (--calib, --nsamples, --seqlen) with the unquantized model.
    #[arg(long)]
    pub int8_activations: bool,
    /// With --int8-activations: `all` keeps every input dimension whose calibration |x| reaches
    /// --outlier-threshold (LLM.int8); N keeps the N outlier dimensions found in the most layers
    /// (per projection role) and quantizes the rest; 0 quantizes every dimension.
    #[arg(long, default_value = "all")]
    pub keep_outliers: String,
    /// |x| from which an input dimension counts as an outlier (LLM.int8 uses 6).
    #[arg(long, default_value_t = quant::actquant::DEFAULT_THRESHOLD, value_parser = crate::range::positive_f32, allow_negative_numbers = true)]
    pub outlier_threshold: f32,
    /// Output checkpoint directory (must not exist or be empty).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// After quantizing (and reloading the checkpoint), perplexity over the first K
    /// non-overlapping --ppl-window-token windows of the evaluation text.
    #[arg(long, default_value_t = 0, value_parser = crate::range::count0, allow_negative_numbers = true)]
    pub ppl_windows: usize,
    /// Tokens per perplexity window (the RESULTS.md protocol uses 512).
    #[arg(long, default_value_t = 512, value_parser = crate::range::len2, allow_negative_numbers = true)]
    pub ppl_window: usize,
    /// Evaluation text for --ppl-windows (default: WikiText-2 test split).
    #[arg(long)]
    pub ppl_data: Option<PathBuf>,
    /// Generate from this prompt with the (reloaded) quantized model.
    #[arg(long)]
    pub prompt: Option<String>,
    #[arg(long, default_value_t = 32, value_parser = crate::range::count, allow_negative_numbers = true)]
    pub max_new_tokens: usize,
    /// Seed of the calibration window draw.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(a: QuantizeArgs, lo: &models::LoadOptions, rep: &mut Report) -> Result<()> {
    let t0 = std::time::Instant::now();
    let method = match a.method.as_str() {
        "rtn" => Some(Method::Rtn),
        "gptq" => Some(Method::Gptq),
        _ => None,
    };
    if method.is_some() {
        quant::pack::check_bits(a.bits)?;
        anyhow::ensure!(
            a.group_size == -1 || a.group_size > 0,
            "--group-size must be positive or -1, got {}",
            a.group_size
        );
        anyhow::ensure!(
            a.out.is_some(),
            "--out DIR is required to write the quantized checkpoint"
        );
    }
    let keep = KeepFp16::parse(a.keep_fp16.as_deref().unwrap_or(""))?;
    let keep_outliers = quant::actquant::KeepOutliers::parse(&a.keep_outliers)?;
    anyhow::ensure!(
        a.int8_activations
            || (keep_outliers == quant::actquant::KeepOutliers::All
                && a.outlier_threshold == quant::actquant::DEFAULT_THRESHOLD),
        "--keep-outliers and --outlier-threshold only apply with --int8-activations"
    );
    anyhow::ensure!(
        a.outlier_threshold > 0.0,
        "--outlier-threshold must be positive, got {}",
        a.outlier_threshold
    );
    // Check data files before the (slow) work. Defaults come from the data folder in effect
    // ($MPOLM_DATA, else the project's data/), as for `eval`.
    let wikitext2 = eval::data::resolve_data_dir(None).join("wikitext2");
    let calib_path = a
        .calib
        .clone()
        .unwrap_or_else(|| wikitext2.join("valid.txt"));
    let calib = if method == Some(Method::Gptq) || a.int8_activations {
        Some(pipeline::Calibration {
            text: quant::read_text(&calib_path, "calibration")?,
            source: calib_path.display().to_string(),
        })
    } else {
        None
    };
    let ppl_path = a
        .ppl_data
        .clone()
        .unwrap_or_else(|| wikitext2.join("test.txt"));
    let ppl_text = if a.ppl_windows > 0 {
        Some(quant::read_text(&ppl_path, "evaluation")?)
    } else {
        None
    };

    let m = crate::load(&a.model, lo)?;
    if let (Some(_), KeepFp16::Crucial(n)) = (method, &keep) {
        let projections = pipeline::decoder_projections(&m);
        anyhow::ensure!(
            *n <= projections,
            "--keep-fp16 crucial:{n} is out of range: this model has {projections} decoder projections (use crucial:0..={projections})"
        );
    }
    let o = pipeline::PipelineOptions {
        method,
        bits: a.bits,
        group_size: a.group_size,
        act_order: a.act_order,
        damp: a.damp,
        sym: a.sym,
        keep,
        keep_spec: a.keep_fp16.clone(),
        calib,
        nsamples: a.nsamples,
        seqlen: a.seqlen,
        seed: a.seed,
        int8: a.int8_activations.then_some(pipeline::Int8Options {
            threshold: a.outlier_threshold,
            keep: keep_outliers,
        }),
        out: a.out.clone(),
        checkpoint_format: quant::ZeroFormat::parse(&a.checkpoint_format).unwrap_or_default(),
        progress: true,
    };
    let (m, r) = pipeline::run(m, &o)?;
    if let Some(p) = &r.int8_activations {
        println!(
            "int8 activations: {} projections, {} input dimensions kept in full precision (--keep-outliers {}, |x| ≥ {}; {} calibration windows, {:.1}s)",
            p.projections, p.kept_dims, p.keep_outliers, p.threshold, p.calib_windows, p.secs
        );
        for (role, o) in &p.outliers {
            let top: Vec<String> = o
                .iter()
                .take(3)
                .map(|o| {
                    format!(
                        "dim {} in {} layers (max |x| {:.1})",
                        o.dim, o.layers, o.max_abs
                    )
                })
                .collect();
            println!(
                "  {role:<10} {:>4} outlier dims; top: {}",
                o.len(),
                top.join(", ")
            );
        }
    }
    if let Some(q) = &r.quantize {
        let fp16 = q.layers.iter().filter(|l| l.kind == "fp16").count();
        println!(
            "{} {}-bit (group {}, act-order {}, sym {}): {} projections quantized, {} kept fp16 in {:.1}s{}",
            q.method, q.bits, q.group_size, q.act_order, q.sym, q.layers.len() - fp16, fp16, q.secs,
            q.calib_first_ids.as_ref().map_or(String::new(), |_| format!(" (calibration {} × {} tokens from {})", q.calib_windows, q.seqlen, calib_path.display()))
        );
        let mut worst: Vec<_> = q.layers.iter().collect();
        worst.sort_by(|x, y| {
            y.loss
                .partial_cmp(&x.loss)
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        for l in worst.iter().take(5) {
            println!(
                "  largest error: {:<40} {:>7} loss {:.4e}",
                l.name, l.kind, l.loss
            );
        }
        rep.set("quantize", json!(q));
    }
    if let Some(p) = &r.int8_activations {
        rep.set("int8_activations", json!(p));
    }
    let s = &r.summary;
    println!(
        "model: {} params, total {:.1} Mbit = {:.1} MiB ({:.2} bits/param), files {:.1} MiB",
        s.params,
        s.total_bits as f64 / 1e6,
        s.total_bits as f64 / 8.0 / 1048576.0,
        s.bits_per_param,
        s.file_bytes as f64 / 1048576.0
    );
    let mut summary = json!(s);
    if let Some(text) = &ppl_text {
        let tp = std::time::Instant::now();
        // The disjoint protocol of `eval --ppl-protocol disjoint`, one window per forward.
        let lm = eval::lm::Lm::new(m.causal()?, &m.tokenizer, 1, a.ppl_window, false);
        let p = eval::tasks::wikitext::disjoint_perplexity(
            &lm,
            text,
            Some(a.ppl_windows),
            "perplexity",
        )?;
        let (k, window) = (p.windows_scored, lm.max_length);
        println!(
            "perplexity {:.3} on the first {k} × {window}-token windows of {} ({:.1}s)",
            p.ppl,
            ppl_path.display(),
            tp.elapsed().as_secs_f64()
        );
        summary["perplexity"] = json!({"ppl": p.ppl, "windows": k, "window": window, "data": ppl_path.display().to_string()});
    }
    if let Some(prompt) = &a.prompt {
        let ids = m.tokenizer.encode(prompt, false)?;
        let sp = models::generate::SamplingParams {
            max_new_tokens: a.max_new_tokens,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop_ids: vec![],
        };
        let (toks, st) = models::generate::generate(m.causal()?, &ids, &sp, |_| {})?;
        let text = m.tokenizer.decode(&toks, true)?;
        println!("{prompt}{text}");
        summary["generation"] = json!({"prompt": prompt, "text": text, "stats": st});
    }
    let rss = quant::peak_rss_mib();
    println!(
        "peak RSS {:.0} MiB, {:.1}s total",
        rss,
        t0.elapsed().as_secs_f64()
    );
    summary["peak_rss_mib"] = json!(rss);
    summary["secs"] = json!(t0.elapsed().as_secs_f64());
    rep.set("model_summary", summary);
    Ok(())
}
