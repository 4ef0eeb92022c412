//! `mpolm eval MODEL --task T[,T…]`: run evaluation tasks (crates/eval) on a model, print an
//! lm-eval style table and put the lm-eval shaped results into the `--report` JSON.

use crate::report::Report;
use anyhow::Result;
use eval::{EvalOptions, TaskSpec};
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct EvalArgs {
    /// Model: alias (e.g. smollm2-135m), HF directory or .gguf file.
    pub model: String,
    /// Comma-separated tasks: wikitext2, mmlu, mmlu_<subject>, mmlu_<category>, gsm8k, ifeval,
    /// sst2, zeroshot (arc_easy, arc_challenge, hellaswag, piqa, winogrande, boolq, openbookqa,
    /// lambada_openai), or a path to a .jsonl task file.
    #[arg(long, alias = "tasks", required = true)]
    pub task: String,
    /// Few-shot examples (default per task: mmlu 0, gsm8k 8, others 0).
    #[arg(long, value_parser = crate::range::count0, allow_negative_numbers = true)]
    pub shots: Option<usize>,
    /// Evaluate at most N documents per task (per subject for MMLU, windows for wikitext2).
    #[arg(long, value_parser = crate::range::count, allow_negative_numbers = true)]
    pub limit: Option<usize>,
    /// Sequences per forward pass: rows of log-likelihood batches (default 1), and generations
    /// decoded together for gsm8k, ifeval and generation .jsonl tasks (default 8; every output is
    /// the one it would be alone).
    #[arg(long, value_parser = crate::range::count, allow_negative_numbers = true)]
    pub batch: Option<usize>,
    /// Seed for sampled few-shot examples (sst2, .jsonl tasks).
    #[arg(long, default_value_t = 1234)]
    pub seed: u64,
    /// Data folder laid out as the project's data/ (wikitext2/, mmlu/, gsm8k/, ifeval/, glue/);
    /// default $MPOLM_DATA when set, else the project's own data/ (`mpolm data` shows which).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Longest model input in tokens (default: the model's context; 2048 for wikitext2 windows).
    #[arg(long, value_parser = crate::range::len2, allow_negative_numbers = true)]
    pub max_length: Option<usize>,
    /// wikitext2 window stride in tokens (default: max length, lm-eval's disjoint windows).
    #[arg(long, value_parser = crate::range::count, allow_negative_numbers = true)]
    pub stride: Option<usize>,
    /// wikitext2 protocol: `rolling` (lm-eval's loglikelihood_rolling: every token predicted once,
    /// the default) or `disjoint` (complete windows of --max-length tokens scored alone, each
    /// window's first token not predicted: the HF / GPTQ-paper number, token perplexity only).
    #[arg(long, default_value = "rolling", value_parser = ["rolling", "disjoint"])]
    pub ppl_protocol: String,
    /// Generation budget (default: gsm8k 256, ifeval 1280, .jsonl 256).
    #[arg(long, value_parser = crate::range::count, allow_negative_numbers = true)]
    pub max_gen_tokens: Option<usize>,
    /// Keep per-document prompts, outputs and scores in the report under "samples".
    #[arg(long)]
    pub log_samples: bool,
    /// Neither reuse nor record request results (by default every result is kept under
    /// $MPOLM_CACHE/eval, keyed by the model's bytes, this build and the batch settings, so an
    /// interrupted run resumes where it stopped).
    #[arg(long)]
    pub no_cache: bool,
}

pub fn run(a: EvalArgs, lo: &models::LoadOptions, rep: &mut Report) -> Result<()> {
    let t0 = Instant::now();
    anyhow::ensure!(a.batch != Some(0), "--batch must be at least 1");
    anyhow::ensure!(a.limit != Some(0), "--limit must be at least 1");
    anyhow::ensure!(
        a.max_gen_tokens != Some(0),
        "--max-gen-tokens must be at least 1"
    );
    if let Some(m) = a.max_length {
        anyhow::ensure!(m >= 2, "--max-length must be at least 2");
    }
    let specs = eval::parse_tasks(&a.task)?;
    let (data_dir, data_origin) = eval::data::resolve(a.data_dir.as_deref());
    if specs.iter().any(|s| !matches!(s, TaskSpec::Jsonl(_))) {
        eval::data::require(&data_dir)?;
    }
    let m = crate::load(&a.model, lo)?;
    let batch_size = a.batch.unwrap_or(1);
    let gen_batch_size = a.batch.unwrap_or(8);
    let cache = match a.no_cache {
        true => None,
        false => Some(std::sync::Arc::new(open_cache(
            &a.model,
            crate::gguf_weights(&m),
            batch_size,
            gen_batch_size,
        )?)),
    };
    let opts = EvalOptions {
        data_dir: data_dir.clone(),
        shots: a.shots,
        limit: a.limit,
        batch_size,
        gen_batch_size,
        seed: a.seed,
        max_length: a.max_length,
        stride: a.stride,
        ppl_protocol: match a.ppl_protocol.as_str() {
            "disjoint" => eval::PplProtocol::Disjoint,
            _ => eval::PplProtocol::Rolling,
        },
        max_gen_tokens: a.max_gen_tokens,
        log_samples: a.log_samples,
        progress: true,
        cache: cache.clone(),
    };
    let mut outputs = Vec::new();
    let mut task_secs = serde_json::Map::new();
    for spec in &specs {
        let name = spec.name();
        eprintln!("running {name} …");
        let o = eval::run_task(&m, spec, &opts)?;
        eprintln!("{name}: {:.1} s", o.seconds);
        task_secs.insert(name, json!(o.seconds));
        outputs.push(o);
    }
    print!("{}", eval::format_table(&outputs));
    let total = t0.elapsed().as_secs_f64();
    println!(
        "[{} in {:.1} s; model load {:.1} s; weights {:.1} MiB ({}); peak RSS {:.0} MiB]",
        a.model,
        total,
        m.load_secs,
        m.weight_bytes() as f64 / (1024.0 * 1024.0),
        crate::held_as(&m),
        crate::bench::peak_rss_mib()
    );

    let cache_json = match &cache {
        Some(c) => {
            println!(
                "[request cache: {} results reused, {} computed; {}]",
                c.hits(),
                c.written(),
                c.path().display()
            );
            json!({"path": c.path(), "reused": c.hits(), "computed": c.written()})
        }
        None => serde_json::Value::Null,
    };
    let res = eval::results_json(&outputs);
    rep.set("command", json!("eval"));
    if let serde_json::Value::Object(map) = res {
        for (k, v) in map {
            rep.set(&k, v);
        }
    }
    rep.set(
        "config",
        json!({
            "model": a.model,
            "tasks": specs.iter().map(|s| s.name()).collect::<Vec<_>>(),
            "num_fewshot": a.shots,
            "limit": a.limit,
            "batch_size": opts.batch_size,
            "generation_batch_size": opts.gen_batch_size,
            "seed": a.seed,
            "max_length": a.max_length,
            "stride": a.stride,
            "ppl_protocol": a.ppl_protocol,
            "max_gen_tokens": a.max_gen_tokens,
            "data_dir": data_dir,
            "data_dir_origin": data_origin.name(),
            "request_cache": cache_json,
            "device": "cpu",
            "dtype": "f32",
            "threads": std::env::var("RAYON_NUM_THREADS").ok(),
        }),
    );
    rep.set(
        "model",
        json!({
            "name": m.source.name,
            "path": m.source.path,
            "architecture": m.arch_name(),
            "parameters": m.total_params(),
            "stored_types": m.stored_types,
            "gguf_weights": crate::gguf_weights(&m).name(),
            "weight_bytes": m.weight_bytes(),
            "peak_rss_mb": crate::bench::peak_rss_mib(),
            "linear_kinds": m.linears().iter().fold(std::collections::BTreeMap::<String, usize>::new(), |mut acc, (_, l)| {
                *acc.entry(l.kind()).or_insert(0) += 1;
                acc
            }),
        }),
    );
    rep.set("timings", json!({"model_load_seconds": m.load_secs, "tasks_seconds": task_secs, "total_seconds": total}));
    rep.set(
        "total_evaluation_time_seconds",
        json!(format!("{total:.2}")),
    );
    Ok(())
}

/// The request cache for this model and these settings: the fingerprint covers the bytes of
/// the program and of every file the model is loaded from, the GGUF weight mode, the thread
/// count and the batch sizes — everything that can change a computed number.
fn open_cache(
    model: &str,
    gguf: models::GgufWeights,
    batch: usize,
    gen_batch: usize,
) -> Result<eval::cache::RequestCache> {
    let exe = std::env::current_exe()?;
    let parts = [
        ("program", eval::cache::hash_file(&exe)?),
        ("model", model_hash(model, 0)?),
        ("gguf_weights", gguf.name().to_string()),
        ("threads", rayon::current_num_threads().to_string()),
        ("batch", batch.to_string()),
        ("generation_batch", gen_batch.to_string()),
    ];
    let fp = eval::cache::fingerprint(&parts);
    let about = json!({"model": model, "parts": parts.iter().map(|(k, v)| json!([k, v])).collect::<Vec<_>>()});
    let dir = models::hub::cache_dir().join("eval");
    Ok(eval::cache::RequestCache::open(&dir, &fp, &about)?)
}

/// sha256 over the files a MODEL argument loads: the file, or every regular file of the
/// directory (two levels deep), plus an adapter's base model.
fn model_hash(model: &str, depth: usize) -> Result<String> {
    anyhow::ensure!(
        depth < 8,
        "{model}: adapters name each other as base models more than 8 deep"
    );
    let p = std::path::Path::new(model);
    let src = match p.exists() {
        true => p.to_path_buf(),
        false => models::hub::resolve(model, false)?.path,
    };
    let mut files = vec![];
    if src.is_dir() {
        for e in std::fs::read_dir(&src)?.flatten() {
            let q = e.path();
            if q.is_dir() {
                files.extend(std::fs::read_dir(&q)?.flatten().map(|e| e.path()));
            } else {
                files.push(q);
            }
        }
    } else {
        files.push(src.clone());
    }
    files.retain(|f| f.is_file());
    files.sort();
    let mut parts = vec![];
    for f in &files {
        let name = f.strip_prefix(&src).unwrap_or(f).display().to_string();
        parts.push((name, eval::cache::hash_file(f)?));
    }
    let adapter = src.join("adapter_config.json");
    if adapter.is_file() {
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&adapter)?)?;
        if let Some(base) = v["base_model_name_or_path"].as_str() {
            parts.push(("base".into(), model_hash(base, depth + 1)?));
        }
    }
    let parts: Vec<(&str, String)> = parts.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    Ok(eval::cache::fingerprint(&parts))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(model: &str, task: &str, data: PathBuf) -> EvalArgs {
        EvalArgs {
            model: model.into(),
            task: task.into(),
            shots: Some(1),
            limit: Some(2),
            batch: Some(2),
            seed: 1,
            data_dir: Some(data),
            max_length: None,
            stride: None,
            ppl_protocol: "rolling".into(),
            max_gen_tokens: Some(3),
            log_samples: false,
            no_cache: true,
        }
    }

    #[test]
    fn eval_report_has_lm_eval_shape() {
        let d = tempfile::tempdir().unwrap();
        let m = d.path().join("m");
        models::testing::write_tiny_llama(&m, false).unwrap();
        let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/eval/data");
        let mut rep = Report::new();
        run(
            args(
                m.to_str().unwrap(),
                "mmlu_anatomy,wikitext2,gsm8k",
                data.clone(),
            ),
            &Default::default(),
            &mut rep,
        )
        .unwrap();
        let out = d.path().join("r.json");
        rep.write(&out).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
        assert!(v["results"]["mmlu_anatomy"]["acc,none"].is_number());
        assert!(v["results"]["mmlu_anatomy"]["acc_stderr,none"].is_number());
        assert!(v["results"]["wikitext2"]["bits_per_byte,none"].is_number());
        assert!(v["results"]["gsm8k"]["exact_match,flexible-extract"].is_number());
        assert_eq!(v["n-shot"]["mmlu_anatomy"], 1);
        assert_eq!(v["n-samples"]["gsm8k"]["effective"], 2);
        assert_eq!(v["config"]["batch_size"], 2);
        assert_eq!(v["model"]["architecture"], "llama");
        assert!(v["timings"]["tasks_seconds"]["mmlu"].is_number());

        // Errors are single lines naming what to fix.
        let e = run(
            args(m.to_str().unwrap(), "wikitext2", "/nonexistent/d".into()),
            &Default::default(),
            &mut rep,
        )
        .unwrap_err();
        assert!(
            format!("{e:#}").starts_with("/nonexistent/d: not found"),
            "{e:#}"
        );
        let e = run(
            args(m.to_str().unwrap(), "bogus", data),
            &Default::default(),
            &mut rep,
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("unknown task 'bogus'"), "{e:#}");
    }
}
