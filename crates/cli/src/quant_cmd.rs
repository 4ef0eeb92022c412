//! `mpolm quantize`: RTN / GPTQ quantization into an AutoGPTQ-layout checkpoint, with total
//! bits, file size, peak RSS and (optionally) WikiText-2 perplexity and a sample generation.
//! MODEL may also be a quantized checkpoint (with `--method none`) to evaluate or generate.

use crate::report::Report;
use anyhow::{Context, Result};
use methods::quant::{self, calib::Method, KeepFp16, QuantOptions, QuantizeConfig};
use serde_json::json;
use std::path::{Path, PathBuf};

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
    let calib_text = if method == Some(Method::Gptq) || a.int8_activations {
        Some(quant::read_text(&calib_path, "calibration")?)
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

    let mut m = crate::load(&a.model, lo)?;
    let base_params = m.total_params();
    let mut out_dir = None;
    // Outliers are a property of the activations, so they are found on the model as loaded
    // (before its weights are quantized).
    let int8 = match (&calib_text, a.int8_activations) {
        (Some(t), true) => {
            let samples = quant::calib::calibration_samples(&m, t, a.nsamples, a.seqlen, a.seed)?;
            let ti = std::time::Instant::now();
            let absmax = quant::actquant::input_absmax(&mut m, &samples)?;
            let p = quant::actquant::plan(&absmax, a.outlier_threshold, keep_outliers);
            println!(
                "int8 activations: {} projections, {} input dimensions kept in full precision (--keep-outliers {}, |x| ≥ {}; {} calibration windows, {:.1}s)",
                p.projections, p.kept_total, keep_outliers, a.outlier_threshold, samples.len(), ti.elapsed().as_secs_f64()
            );
            for (r, o) in &p.outliers {
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
                    "  {r:<10} {:>4} outlier dims; top: {}",
                    o.len(),
                    top.join(", ")
                );
            }
            Some(p)
        }
        _ => None,
    };
    if let Some(method) = method {
        let o = QuantOptions {
            method,
            bits: a.bits,
            group_size: if a.group_size < 0 {
                0
            } else {
                a.group_size as usize
            },
            act_order: a.act_order,
            damp: a.damp,
            sym: a.sym,
            keep: keep.clone(),
            ..Default::default()
        };
        if let KeepFp16::Crucial(n) = &keep {
            let projections = m
                .linears()
                .iter()
                .filter(|(name, _)| quant::calib::layer_index(name).is_some())
                .count();
            anyhow::ensure!(
                *n <= projections,
                "--keep-fp16 crucial:{n} is out of range: this model has {projections} decoder projections (use crucial:0..={projections})"
            );
        }
        quant::calib::validate(&m, &o)?;
        let calib = match &calib_text {
            Some(t) => Some(quant::calib::calibration_samples(
                &m, t, a.nsamples, a.seqlen, a.seed,
            )?),
            None => None,
        };
        let tq = std::time::Instant::now();
        let reps = quant::quantize_model(&mut m, &o, calib.as_deref(), true)?;
        let qsecs = tq.elapsed().as_secs_f64();
        let fp16: Vec<&str> = reps
            .iter()
            .filter(|r| r.kind == "fp16")
            .map(|r| r.name.as_str())
            .collect();
        println!(
            "{} {}-bit (group {}, act-order {}, sym {}): {} projections quantized, {} kept fp16 in {:.1}s{}",
            a.method, a.bits, a.group_size, a.act_order, a.sym, reps.len() - fp16.len(), fp16.len(), qsecs,
            calib.as_ref().map_or(String::new(), |c| format!(" (calibration {} × {} tokens from {})", c.len(), a.seqlen, calib_path.display()))
        );
        let mut worst: Vec<_> = reps.iter().collect();
        worst.sort_by(|x, y| {
            y.loss
                .partial_cmp(&x.loss)
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        for r in worst.iter().take(5) {
            println!(
                "  largest error: {:<40} {:>7} loss {:.4e}",
                r.name, r.kind, r.loss
            );
        }
        let dir = a.out.clone().unwrap_or_default();
        let cfg = QuantizeConfig {
            bits: a.bits,
            group_size: a.group_size,
            damp_percent: a.damp,
            desc_act: a.act_order,
            sym: a.sym,
            true_sequential: true,
            quant_method: "gptq".into(),
            checkpoint_format: "gptq".into(),
            mpolm_method: a.method.clone(),
            mpolm_fp16_modules: vec![],
            mpolm_int8_activations: int8.as_ref().map(|p| p.config.clone()),
        };
        quant::save_quantized(&m, &dir, &cfg)?;
        rep.set("quantize", json!({"method": a.method, "bits": a.bits, "group_size": a.group_size, "act_order": a.act_order,
            "sym": a.sym, "damp": a.damp, "keep_fp16": a.keep_fp16, "nsamples": a.nsamples, "seqlen": a.seqlen,
            "calib": calib_text.as_ref().map(|_| calib_path.display().to_string()), "secs": qsecs, "layers": reps,
            // Lets scripts/gptq_torch.py check that it drew the same calibration windows.
            "calib_first_ids": calib.as_ref().map(|c| c.iter().take(4).map(|w| w[..w.len().min(8)].to_vec()).collect::<Vec<_>>()), "out": dir.display().to_string()}));
        // Continue with the checkpoint as saved (what users will load).
        drop(m);
        m = quant::load_quantized(&dir).with_context(|| format!("reloading {}", dir.display()))?;
        out_dir = Some(dir);
    }
    if let Some(p) = &int8 {
        if out_dir.is_none() {
            // No checkpoint (--method none): apply to the model in memory.
            quant::actquant::apply(&mut m, &p.config)?;
        }
        rep.set(
            "int8_activations",
            json!({"threshold": a.outlier_threshold, "keep_outliers": keep_outliers.to_string(),
            "projections": p.projections, "kept_dims": p.kept_total, "outliers": p.outliers}),
        );
    }
    let quantized = m.linears().iter().any(|(_, l)| {
        l.inner()
            .as_any()
            .downcast_ref::<quant::QuantLinear>()
            .is_some()
    });
    let bits = quant::total_bits(&m, if quantized { 16 } else { 32 });
    let file_bytes = match &out_dir {
        Some(d) => quant::dir_size(d),
        None => {
            let p = Path::new(&a.model);
            if p.is_dir() {
                quant::dir_size(p)
            } else {
                std::fs::metadata(&m.source.path)
                    .map(|x| x.len())
                    .unwrap_or(0)
            }
        }
    };
    println!(
        "model: {} params, total {:.1} Mbit = {:.1} MiB ({:.2} bits/param), files {:.1} MiB",
        base_params,
        bits as f64 / 1e6,
        bits as f64 / 8.0 / 1048576.0,
        bits as f64 / base_params.max(1) as f64,
        file_bytes as f64 / 1048576.0
    );
    let mut summary = json!({"params": base_params, "total_bits": bits, "bits_per_param": bits as f64 / base_params.max(1) as f64, "file_bytes": file_bytes});
    if let Some(text) = &ppl_text {
        let tp = std::time::Instant::now();
        anyhow::ensure!(a.ppl_window >= 2, "--ppl-window must be at least 2 tokens");
        let (ppl, k) = quant::perplexity(&m, text, a.ppl_windows, a.ppl_window)?;
        println!(
            "perplexity {:.3} on the first {k} × {}-token windows of {} ({:.1}s)",
            ppl,
            a.ppl_window,
            ppl_path.display(),
            tp.elapsed().as_secs_f64()
        );
        summary["perplexity"] = json!({"ppl": ppl, "windows": k, "window": a.ppl_window, "data": ppl_path.display().to_string()});
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
        let (toks, st) = models::generate::generate(m.llama()?, &ids, &sp, |_| {})?;
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
