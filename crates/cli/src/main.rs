//! `mpolm` — a thin CLI over the mpolm library crates. Each subcommand parses its flags,
//! calls into the libraries, prints a readable summary and writes the same numbers as JSON
//! with `--report`. Exit codes: 0 success, 2 error (printed as one line).

mod bench;
mod data_cmd;
mod eval_cmd;
mod finetune_cmd;
mod quant_cmd;
mod range;
mod report;
mod spectrum;
mod target;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use models::generate::{generate, SamplingParams};
use models::hub;
use models::Model;
use report::Report;
use serde_json::json;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "mpolm",
    version,
    about = "Decompose, compress, adapt, quantize and evaluate pretrained language models"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Write a JSON report of this command's numbers to PATH (atomically).
    #[arg(long, global = true)]
    report: Option<PathBuf>,
    /// Threads for matrix work (default: all cores; at most 4 per core).
    #[arg(long, global = true, value_parser = range::threads, allow_negative_numbers = true)]
    threads: Option<usize>,
    /// Print errors in full (every cause, backtraces where captured) instead of one line.
    #[arg(short, long, global = true)]
    verbose: bool,
    /// How a GGUF model's block-quantized weight matrices are held: `f32` (dequantized at
    /// load; the reference) or `quantized` (kept as stored: int8 decode, dequantized tiles
    /// for batches; 4–8× less weight memory).
    #[arg(long, global = true, default_value = "f32", value_parser = ["f32", "quantized"])]
    gguf_weights: String,
}

static GGUF_WEIGHTS: std::sync::OnceLock<models::GgufWeights> = std::sync::OnceLock::new();

/// The `--gguf-weights` choice (f32 unless set).
pub(crate) fn gguf_weights() -> models::GgufWeights {
    GGUF_WEIGHTS.get().copied().unwrap_or_default()
}

/// How the model's weights are held, for report lines: the `--gguf-weights` mode for GGUF
/// files, else the stored types (a quantized checkpoint keeps its packed and f16 tensors).
pub(crate) fn held_as(m: &models::Model) -> String {
    match m.source.format {
        models::hub::Format::Gguf => format!("{} GGUF weights", gguf_weights().name()),
        models::hub::Format::HfDir => m
            .stored_types
            .iter()
            .map(|(k, v)| format!("{k}×{v}"))
            .collect::<Vec<_>>()
            .join(", "),
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Download a model by alias into the cache (no-op when cached); list aliases without MODEL.
    Fetch {
        model: Option<String>,
        /// Re-hash the cached files (sha256) even when their size and time are unchanged;
        /// a corrupted file is fetched again.
        #[arg(long)]
        verify: bool,
    },
    /// Architecture, parameters per component, storage types and memory of a model.
    Inspect { model: String },
    /// Generate text with a causal model (KV cache; greedy at --temperature 0).
    Generate {
        model: String,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 64, value_parser = range::count, allow_negative_numbers = true)]
        max_new_tokens: usize,
        /// Sampling temperature (finite, >= 0; 0 = greedy).
        #[arg(long, default_value_t = 0.0, value_parser = range::nonneg, allow_negative_numbers = true)]
        temperature: f64,
        /// Nucleus sampling mass, in (0, 1].
        #[arg(long, default_value_t = 1.0, value_parser = range::fraction, allow_negative_numbers = true)]
        top_p: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Wrap the prompt in the model's chat template as a user message.
        #[arg(long)]
        chat: bool,
        /// Optional system message for --chat.
        #[arg(long)]
        system: Option<String>,
    },
    /// Decompose weight matrices into exact MPOs: bonds, spectra, entropies, error-vs-params curves.
    Spectrum {
        model: String,
        /// Comma-separated substrings or globs of module names (e.g. "layers.0.*,lm_head"); default all.
        #[arg(long, value_delimiter = ',')]
        matrices: Vec<String>,
        /// Number of MPO sites (cores), 1..=12.
        #[arg(long, default_value_t = 5, value_parser = range::sites, allow_negative_numbers = true)]
        n: usize,
        /// Factor shapes: `auto` (balanced) or `paper` (the papers' tables where they apply).
        #[arg(long, default_value = "auto", value_parser = ["auto", "paper"])]
        shapes: String,
        /// Write a PNG plot of the spectra and error curves.
        #[arg(long)]
        plot: Option<PathBuf>,
    },
    /// Compress a model's weight matrices (MPO decomposition) into a checkpoint other commands load.
    Compress {
        model: String,
        #[arg(long, default_value = "mpo", value_parser = ["mpo"])]
        method: String,
        /// Factor shapes: `auto` (balanced) or `paper` (the papers' tables where they apply).
        #[arg(long, default_value = "auto", value_parser = ["auto", "paper"])]
        shapes: String,
        /// Number of MPO sites (cores), 1..=12; the central tensor is index n/2.
        #[arg(long, default_value_t = 5, value_parser = range::sites, allow_negative_numbers = true)]
        n: usize,
        /// Cap every bond at D (>= 1).
        #[arg(long, conflicts_with_all = ["rel_error", "params_ratio"], value_parser = range::count, allow_negative_numbers = true)]
        bond: Option<usize>,
        /// Smallest bonds whose error bound is within this relative Frobenius error, in [0, 1].
        #[arg(long, conflicts_with = "params_ratio", value_parser = range::fraction0, allow_negative_numbers = true)]
        rel_error: Option<f64>,
        /// Keep about this fraction of each matrix's parameters, in (0, 1].
        #[arg(long, value_parser = range::fraction, allow_negative_numbers = true)]
        params_ratio: Option<f64>,
        /// Comma-separated substrings/globs of module names (default: every Linear and the embedding).
        #[arg(long, value_delimiter = ',')]
        matrices: Vec<String>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Export a (compressed/quantized) model as a plain dense HF directory that transformers
    /// loads (--dense), or as a llama.cpp GGUF file (--gguf --type …).
    #[command(group(clap::ArgGroup::new("format").required(true).args(["dense", "gguf"])))]
    Export {
        model: String,
        /// Contract every factored layer back to a dense matrix (HF directory).
        #[arg(long)]
        dense: bool,
        /// Write a llama.cpp GGUF v3 file (llama or qwen2 architecture).
        #[arg(long)]
        gguf: bool,
        /// GGUF recipe (llama.cpp names; q4_k_m mixes Q4_K/Q6_K like llama-quantize).
        #[arg(long = "type", value_name = "TYPE", default_value = "f16", conflicts_with = "dense",
              value_parser = clap::builder::PossibleValuesParser::new(methods::quant::gguf_export::TYPE_NAMES))]
        gguf_type: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Benchmarks (see BENCHMARKS.md for the peer comparisons).
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Evaluate a model on benchmark tasks (wikitext2, mmlu, gsm8k, ifeval, sst2, zeroshot, .jsonl files).
    Eval(eval_cmd::EvalArgs),
    /// The data folder in effect (--data-dir, else $MPOLM_DATA, else the project's data/) and
    /// the datasets it holds; --verify checks every file against SHA256SUMS.
    Data(data_cmd::DataArgs),
    /// Quantize a causal model with RTN or GPTQ into an AutoGPTQ-layout checkpoint.
    Quantize(quant_cmd::QuantizeArgs),
    /// Fine-tune (full, LoRA, MPO auxiliary/central/all) on sentence classification or text.
    Finetune(finetune_cmd::FinetuneArgs),
    /// The main job on a model: fetch, inspect and a greedy chat generation.
    Run {
        #[arg(default_value = hub::DEFAULT_CAUSAL)]
        model: String,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Prefill and decode tokens/s and peak RSS of a causal model (greedy, KV cache).
    Generate {
        #[arg(default_value = hub::DEFAULT_CAUSAL)]
        model: String,
        #[arg(long, default_value_t = 128, value_parser = range::count, allow_negative_numbers = true)]
        prompt_tokens: usize,
        /// New tokens per run (>= 2: the first comes from the prefill).
        #[arg(long, default_value_t = 64, value_parser = range::len2, allow_negative_numbers = true)]
        new_tokens: usize,
        #[arg(long, default_value_t = 3, value_parser = range::count, allow_negative_numbers = true)]
        repeats: usize,
    },
}

fn main() -> ExitCode {
    // Before any other thread exists: a thread attaches to an arena at its first allocation.
    models::kernels::keep_freed_memory();
    models::tmp::init();
    let cli = Cli::parse();
    let verbose = cli.verbose;
    if let Some(n) = cli.threads {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    // The command runs on a worker of rayon's pool rather than on the main thread: each parallel
    // kernel call then starts on the calling worker instead of handing its jobs across and
    // sleeping until they finish. At one thread that wake-up round trip was ~12% of a quantized
    // decode (futex/scheduler time in perf); now such calls run inline. The stack matches the
    // main thread's 8 MiB.
    let _ = rayon::ThreadPoolBuilder::new()
        .stack_size(8 << 20)
        .build_global();
    let mut res = None;
    rayon::scope(|_| res = Some(run(cli)));
    match res.expect("the command ran") {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_text(&e, verbose));
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    // candle's elementwise worker pool spins ~forever by default while rayon's GEMM threads
    // need the same cores; a short spin then yield measured 1.6x faster prefill on 2 cores.
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "64");
    }
    let _ = GGUF_WEIGHTS.set(if cli.gguf_weights == "quantized" {
        models::GgufWeights::Quantized
    } else {
        models::GgufWeights::F32
    });
    let mut rep = Report::new();
    if let Some(p) = &cli.report {
        target::check("--report", p, target::Target::File)?;
    }
    if let Some(cmd) = &cli.cmd {
        check_outputs(cmd)?;
    }
    match cli.cmd.unwrap_or(Cmd::Run {
        model: hub::DEFAULT_CAUSAL.into(),
    }) {
        Cmd::Fetch { model, verify } => cmd_fetch(model, verify, &mut rep)?,
        Cmd::Inspect { model } => {
            let m = load(&model)?;
            cmd_inspect(&m, &mut rep)?;
        }
        Cmd::Generate {
            model,
            prompt,
            max_new_tokens,
            temperature,
            top_p,
            seed,
            chat,
            system,
        } => {
            let m = load(&model)?;
            let p = SamplingParams {
                max_new_tokens,
                temperature,
                top_p,
                seed,
                stop_ids: vec![],
            };
            cmd_generate(&m, &prompt, system.as_deref(), chat, p, &mut rep)?;
        }
        Cmd::Bench(BenchCmd::Generate {
            model,
            prompt_tokens,
            new_tokens,
            repeats,
        }) => {
            anyhow::ensure!(
                prompt_tokens > 0 && new_tokens > 1 && repeats > 0,
                "--prompt-tokens, --new-tokens (>1) and --repeats must be positive"
            );
            let m = load(&model)?;
            let ctx = m.causal()?.max_positions();
            anyhow::ensure!(
                prompt_tokens.saturating_add(new_tokens) <= ctx,
                "--prompt-tokens {prompt_tokens} + --new-tokens {new_tokens} exceed the model's context of {ctx} tokens"
            );
            let r = bench::bench_generate(&m, prompt_tokens, new_tokens, repeats)?;
            println!(
                "{}: prefill {:.1} tok/s, decode {:.1} tok/s, peak RSS {:.0} MiB, weights {:.1} MiB ({}, {} threads)",
                model,
                r["prefill_tok_s"].as_f64().unwrap_or(0.0),
                r["decode_tok_s"].as_f64().unwrap_or(0.0),
                r["peak_rss_mb"].as_f64().unwrap_or(0.0),
                r["weight_bytes"].as_f64().unwrap_or(0.0) / (1024.0 * 1024.0),
                held_as(&m),
                r["threads"]
            );
            rep.set("bench_generate", r);
        }
        Cmd::Spectrum {
            model,
            matrices,
            n,
            shapes,
            plot,
        } => {
            anyhow::ensure!(n >= 1, "--n must be at least 1");
            let m = load(&model)?;
            let o = spectrum::Options {
                patterns: matrices,
                n,
                paper_shapes: shapes == "paper",
                plot: plot.as_deref(),
            };
            let specs = spectrum::analyse(&m, &o)?;
            println!(
                "{:<40} {:>11} {:>22} {:>10} {:>7} {:>9} {:>10}",
                "matrix", "shape", "full bonds", "params", "ratio", "C share", "max S"
            );
            for s in &specs {
                let mp = &s.mpo;
                let maxs = mp.entropies().iter().cloned().fold(0.0f64, f64::max);
                println!(
                    "{:<40} {:>11} {:>22} {:>10} {:>7.3} {:>8.1}% {:>10.3}",
                    s.name,
                    format!("{}x{}", mp.orig_rows, mp.orig_cols),
                    format!("{:?}", &mp.bond_dims[1..mp.bond_dims.len() - 1]),
                    mp.num_params(),
                    mp.ratio(),
                    100.0 * mp.central_share(),
                    maxs
                );
                // Where a 50% parameter budget lands on the bound curve, as a quick guide.
                if let Some((r, b, e)) = s.half_budget {
                    println!(
                        "{:<40}   at {:.0}% params: relative error {:.4} (bound {:.4})",
                        "",
                        100.0 * r,
                        e,
                        b
                    );
                }
            }
            if let Some(p) = &plot {
                println!("plot written to {}", p.display());
            }
            rep.set("command", json!("spectrum"));
            rep.set("model", json!(model));
            rep.set("n", json!(n));
            rep.set("shapes", json!(shapes));
            rep.set(
                "matrices",
                json!(specs.iter().map(spectrum::to_json).collect::<Vec<_>>()),
            );
        }
        Cmd::Eval(args) => eval_cmd::run(args, &mut rep)?,
        Cmd::Data(args) => data_cmd::run(args, &mut rep)?,
        Cmd::Quantize(args) => quant_cmd::run(args, &mut rep)?,
        Cmd::Finetune(args) => finetune_cmd::run(args, &mut rep)?,
        Cmd::Compress {
            model,
            method: _,
            shapes,
            n,
            bond,
            rel_error,
            params_ratio,
            matrices,
            out,
        } => {
            use methods::mpop::{self, Budget, CompressOptions, Shapes};
            let mut m = load(&model)?;
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
        }
        Cmd::Export {
            model,
            dense: _,
            gguf: true,
            gguf_type,
            out,
        } => {
            use methods::quant::gguf_export as ge;
            let m = load(&model)?;
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
        }
        Cmd::Export {
            model,
            dense: _,
            out,
            ..
        } => {
            let m = load(&model)?;
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
        }
        Cmd::Run { model } => {
            rep.set("command", json!("run"));
            let m = load(&model)?;
            cmd_inspect(&m, &mut rep)?;
            println!();
            let p = SamplingParams {
                max_new_tokens: 48,
                ..Default::default()
            };
            let chat = m.tokenizer.chat_template.is_some();
            cmd_generate(
                &m,
                "What is the capital of France? Answer in one sentence.",
                None,
                chat,
                p,
                &mut rep,
            )?;
        }
    }
    if let Some(path) = &cli.report {
        rep.write(path)?;
        eprintln!("report written to {}", path.display());
    }
    Ok(())
}

/// MODEL as any command takes it: an alias, an HF/GGUF path, or a method checkpoint
/// (MPO checkpoints are recognised by their manifest, quantized ones by quantize_config.json).
pub(crate) fn load(model: &str) -> Result<Model> {
    let p = std::path::Path::new(model);
    if p.join(methods::mpop::MANIFEST).exists() {
        return methods::mpop::load(p).with_context(|| format!("loading MPO checkpoint '{model}'"));
    }
    if methods::quant::is_quantized_dir(p) {
        return methods::quant::load_quantized(p)
            .with_context(|| format!("loading quantized checkpoint '{model}'"));
    }
    if p.join("adapter_config.json").exists() {
        return load_adapter(p).with_context(|| format!("loading LoRA adapter '{model}'"));
    }
    let m = Model::load_with(model, true, gguf_weights())
        .with_context(|| format!("loading model '{model}'"))?;
    Ok(m)
}

/// A PEFT LoRA adapter directory: its base model (`base_model_name_or_path`, loaded the usual
/// way; adapters stacked on adapters are followed, cycles refused) plus the adapter(s).
fn load_adapter(dir: &std::path::Path) -> Result<Model> {
    let (base, chain) = methods::lora::adapter_chain(dir)?;
    let mut m = load(&base)?;
    for a in chain {
        methods::lora::load_peft(&mut m, &a)?;
    }
    Ok(m)
}

/// The one line printed for an error: each cause's first line, joined as `{:#}` joins them
/// (what follows a first line is a backtrace candle appends when RUST_BACKTRACE is set).
/// `--verbose` prints everything.
fn error_text(e: &anyhow::Error, verbose: bool) -> String {
    if verbose {
        return format!("{e:?}");
    }
    e.chain()
        .map(|c| {
            let s = c.to_string();
            s.lines().next().unwrap_or("").trim_end().to_string()
        })
        .collect::<Vec<_>>()
        .join(": ")
}

/// Check every output path a command will write before it does any work.
fn check_outputs(cmd: &Cmd) -> Result<()> {
    use target::{check, Target};
    match cmd {
        Cmd::Compress { out, .. } => check("--out", out, Target::NewDir),
        Cmd::Export {
            gguf: true, out, ..
        } => check("--out", out, Target::NewFile),
        Cmd::Export { out, .. } => check("--out", out, Target::NewDir),
        Cmd::Spectrum { plot: Some(p), .. } => check("--plot", p, Target::File),
        Cmd::Quantize(a) => match &a.out {
            Some(o) if a.method != "none" => check("--out", o, Target::NewDir),
            _ => Ok(()),
        },
        Cmd::Finetune(a) => {
            check("--out", &a.out, Target::Dir)?;
            let used = a.out.is_dir()
                && std::fs::read_dir(&a.out).map_or(true, |mut d| d.next().is_some());
            anyhow::ensure!(
                a.resume || !used,
                "--out {}: exists and is not empty; choose a new --out, or pass --resume to continue the run saved there",
                a.out.display()
            );
            Ok(())
        }
        _ => Ok(()),
    }
}

fn cmd_fetch(model: Option<String>, verify: bool, rep: &mut Report) -> Result<()> {
    let Some(model) = model else {
        println!("{:<14} {:<7} {}", "alias", "format", "description");
        for s in hub::MODELS {
            println!(
                "{:<14} {:<7} {}",
                s.alias,
                format!("{:?}", s.format).to_lowercase(),
                s.description
            );
        }
        rep.set(
            "aliases",
            json!(hub::MODELS.iter().map(|s| s.alias).collect::<Vec<_>>()),
        );
        return Ok(());
    };
    let t0 = std::time::Instant::now();
    let src = match hub::spec(&model) {
        Some(s) if verify => hub::fetch_with_options(
            s,
            &hub::cache_dir(),
            &hub::FetchOptions {
                verify: true,
                ..Default::default()
            },
        )?,
        _ => hub::resolve(&model, true)?,
    };
    let size = dir_size(&src.path);
    println!(
        "{} -> {} ({:.1} MB)",
        model,
        src.path.display(),
        size as f64 / 1e6
    );
    rep.set("command", json!("fetch"));
    rep.set("model", json!(model));
    rep.set("path", json!(src.path));
    rep.set("format", json!(src.format));
    rep.set("bytes", json!(size));
    rep.set("seconds", json!(t0.elapsed().as_secs_f64()));
    Ok(())
}

fn dir_size(p: &std::path::Path) -> u64 {
    if p.is_file() {
        return p.metadata().map(|m| m.len()).unwrap_or(0);
    }
    std::fs::read_dir(p)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| dir_size(&e.path())).sum())
        .unwrap_or(0)
}

fn cmd_inspect(m: &Model, rep: &mut Report) -> Result<()> {
    let counts = m.param_counts();
    let total: usize = counts.values().sum();
    println!(
        "model:        {} ({})",
        m.source.name,
        m.source.path.display()
    );
    println!("architecture: {}", m.arch_name());
    let cfg_json = match &m.arch {
        models::Arch::Llama(l) => {
            let c = &l.cfg;
            println!(
                "layers {}  hidden {}  heads {} (kv {})  head_dim {}  ffn {}  vocab {}  ctx {}  tied {}",
                c.num_hidden_layers,
                c.hidden_size,
                c.num_attention_heads,
                c.num_kv_heads(),
                c.head_dim(),
                c.intermediate_size,
                c.vocab_size,
                c.max_position_embeddings,
                l.lm_head.is_none()
            );
            serde_json::to_value(c)?
        }
        models::Arch::Bert(b) => {
            let c = &b.cfg;
            println!(
                "layers {}  hidden {}  heads {}  ffn {}  vocab {}  max_pos {}  pooler {}  classifier {}",
                c.num_hidden_layers,
                c.hidden_size,
                c.num_attention_heads,
                c.intermediate_size,
                c.vocab_size,
                c.max_position_embeddings,
                b.pooler.is_some(),
                b.classifier.is_some()
            );
            serde_json::to_value(c)?
        }
        models::Arch::Gemma3(g) => {
            let c = &g.cfg;
            let sliding = (0..c.num_hidden_layers)
                .filter(|&i| c.is_sliding(i))
                .count();
            println!(
                "layers {} ({} sliding, window {})  hidden {}  heads {} (kv {})  head_dim {}  ffn {}  vocab {}  ctx {}  tied {}",
                c.num_hidden_layers,
                sliding,
                c.sliding_window,
                c.hidden_size,
                c.num_attention_heads,
                c.num_kv_heads(),
                c.head_dim(),
                c.intermediate_size,
                c.vocab_size,
                c.max_position_embeddings,
                g.lm_head.is_none()
            );
            serde_json::to_value(c)?
        }
    };
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
            gguf_weights().name()
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
            "gguf_weights": gguf_weights().name(),
            "load_seconds": m.load_secs,
        }),
    );
    Ok(())
}

pub(crate) fn fmt_int(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn cmd_generate(
    m: &Model,
    prompt: &str,
    system: Option<&str>,
    chat: bool,
    mut p: SamplingParams,
    rep: &mut Report,
) -> Result<()> {
    let lm = m.causal()?;
    let tok = &m.tokenizer;
    let text = if chat {
        let mut msgs = vec![];
        if let Some(s) = system {
            msgs.push(json!({"role": "system", "content": s}));
        }
        msgs.push(json!({"role": "user", "content": prompt}));
        tok.apply_chat_template(&json!(msgs), true)?
    } else {
        prompt.to_string()
    };
    // The chat template already carries any BOS it wants.
    let ids = tok.encode(&text, !chat)?;
    let mut stops = tok.eos_ids.clone();
    if chat {
        for s in ["<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"] {
            if let Some(id) = tok.token_to_id(s) {
                stops.push(id);
            }
        }
    }
    p.stop_ids = stops;
    if chat {
        println!("[chat] {prompt}");
    } else {
        print!("{prompt}");
    }
    let mut shown = String::new();
    let mut all = Vec::new();
    let (out, st) = generate(lm, &ids, &p, |id| {
        all.push(id);
        // Decode the whole continuation each time so multi-byte characters print correctly.
        if let Ok(s) = tok.decode(&all, true) {
            if s.len() > shown.len() && s.starts_with(&shown) {
                print!("{}", &s[shown.len()..]);
                let _ = std::io::stdout().flush();
                shown = s;
            }
        }
    })?;
    println!();
    let text_out = tok.decode(&out, true)?;
    println!(
        "[{} prompt tokens at {:.1} tok/s, {} new tokens at {:.1} tok/s, stop: {}]",
        st.prompt_tokens, st.prompt_tok_per_s, st.new_tokens, st.decode_tok_per_s, st.stopped_by
    );
    rep.set(
        "generate",
        json!({
            "prompt": prompt,
            "chat": chat,
            "rendered_prompt": text,
            "prompt_ids": ids,
            "output_ids": out,
            "output": text_out,
            "temperature": p.temperature,
            "top_p": p.top_p,
            "seed": p.seed,
            "stats": st,
        }),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// candle appends a backtrace to its error text when RUST_BACKTRACE is set; the printed
    /// error keeps one line (with every context) unless --verbose.
    #[test]
    fn errors_print_one_line_unless_verbose() {
        let candle = candle_core::Error::WithBacktrace {
            inner: Box::new(candle_core::Error::Msg("shape mismatch in matmul".into())),
            backtrace: Box::new(std::backtrace::Backtrace::force_capture()),
        };
        let e = anyhow::Error::from(candle).context("loading model 'm'");
        assert!(format!("{e:#}").lines().count() > 1, "the case this guards");
        let line = error_text(&e, false);
        assert_eq!(line, "loading model 'm': shape mismatch in matmul");
        let full = error_text(&e, true);
        assert!(
            full.lines().count() > 2 && full.contains("shape mismatch"),
            "{full}"
        );
    }
}
