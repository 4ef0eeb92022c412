//! `mpolm` — a thin CLI over the mpolm library crates. Each subcommand parses its flags,
//! calls into the libraries, prints a readable summary and writes the same numbers as JSON
//! with `--report`. Exit codes: 0 success, 2 error (printed as one line).

mod bench;
mod calisr_plot;
mod compress_cmd;
mod data_cmd;
mod eval_cmd;
mod export_cmd;
mod fetch_cmd;
mod finetune_cmd;
mod flags;
mod generate_cmd;
mod inspect_cmd;
mod mpobert_cmd;
mod quant_cmd;
mod range;
mod report;
mod run_cmd;
mod spectrum;
mod target;
mod upcycle_cmd;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use models::hub;
use models::Model;
use report::Report;
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

/// How the model's GGUF weights are held, for reports (f32 for sources that are not GGUF).
pub(crate) fn gguf_weights(m: &models::Model) -> models::GgufWeights {
    m.gguf_weights.unwrap_or_default()
}

/// How the model's weights are held, for report lines: the `--gguf-weights` mode for GGUF
/// files, else the stored types (a quantized checkpoint keeps its packed and f16 tensors).
pub(crate) fn held_as(m: &models::Model) -> String {
    match m.source.format {
        models::hub::Format::Gguf => format!("{} GGUF weights", gguf_weights(m).name()),
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
    Fetch(fetch_cmd::FetchArgs),
    /// Architecture, parameters per component, storage types and memory of a model.
    Inspect(inspect_cmd::InspectArgs),
    /// Generate text with a causal model (KV cache; greedy at --temperature 0).
    Generate(generate_cmd::GenerateArgs),
    /// Decompose weight matrices into exact MPOs: bonds, spectra, entropies, error-vs-params curves.
    Spectrum(spectrum::SpectrumArgs),
    /// Compress a model's weight matrices (MPO decomposition) into a checkpoint other commands load.
    Compress(compress_cmd::CompressArgs),
    /// Build an MPOBERT encoder (central tensors shared across layers, deeper stacks) from a BERT model.
    Mpobert(mpobert_cmd::MpoBertArgs),
    /// Export a (compressed/quantized) model as a plain dense HF directory that transformers
    /// loads (--dense), or as a llama.cpp GGUF file (--gguf --type …).
    Export(export_cmd::ExportArgs),
    /// Benchmarks (see BENCHMARKS.md for the peer comparisons).
    #[command(subcommand)]
    Bench(bench::BenchCmd),
    /// Evaluate a model on benchmark tasks (wikitext2, mmlu, gsm8k, ifeval, sst2, zeroshot, .jsonl files).
    Eval(eval_cmd::EvalArgs),
    /// The data folder in effect (--data-dir, else $MPOLM_DATA, else the project's data/) and
    /// the datasets it holds; --verify checks every file against SHA256SUMS.
    Data(data_cmd::DataArgs),
    /// Quantize a causal model with RTN or GPTQ into an AutoGPTQ-layout checkpoint.
    Quantize(quant_cmd::QuantizeArgs),
    /// Fine-tune (full, LoRA, MPO auxiliary/central/all) on sentence classification or text.
    Finetune(finetune_cmd::FinetuneArgs),
    /// Upcycle a dense causal model into a mixture of experts (dense or MPOE experts sharing a
    /// central tensor) and write a checkpoint the other commands load.
    Upcycle(upcycle_cmd::UpcycleArgs),
    /// The main job on a model: fetch, inspect and a greedy chat generation.
    Run(run_cmd::RunArgs),
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
    let lo = models::LoadOptions {
        progress: true,
        gguf: if cli.gguf_weights == "quantized" {
            models::GgufWeights::Quantized
        } else {
            models::GgufWeights::F32
        },
    };
    let mut rep = Report::new();
    if let Some(p) = &cli.report {
        target::check("--report", p, target::Target::File)?;
    }
    if let Some(cmd) = &cli.cmd {
        check_outputs(cmd)?;
    }
    match cli.cmd.unwrap_or(Cmd::Run(run_cmd::RunArgs {
        model: hub::DEFAULT_CAUSAL.into(),
    })) {
        Cmd::Fetch(args) => fetch_cmd::run(args, &mut rep)?,
        Cmd::Inspect(args) => inspect_cmd::run(args, &lo, &mut rep)?,
        Cmd::Generate(args) => generate_cmd::run(args, &lo, &mut rep)?,
        Cmd::Bench(cmd) => bench::run(cmd, &lo, &mut rep)?,
        Cmd::Spectrum(args) => spectrum::run(args, &lo, &mut rep)?,
        Cmd::Eval(args) => eval_cmd::run(args, &lo, &mut rep)?,
        Cmd::Data(args) => data_cmd::run(args, &mut rep)?,
        Cmd::Quantize(args) => quant_cmd::run(args, &lo, &mut rep)?,
        Cmd::Finetune(args) => finetune_cmd::run(args, &lo, &mut rep)?,
        Cmd::Compress(args) => compress_cmd::run(args, &lo, &mut rep)?,
        Cmd::Mpobert(args) => mpobert_cmd::run(args, &lo, &mut rep)?,
        Cmd::Export(args) => export_cmd::run(args, &lo, &mut rep)?,
        Cmd::Upcycle(args) => upcycle_cmd::run(args, &lo, &mut rep)?,
        Cmd::Run(args) => run_cmd::run(args, &lo, &mut rep)?,
    }
    if let Some(path) = &cli.report {
        rep.write(path)?;
        eprintln!("report written to {}", path.display());
    }
    Ok(())
}

/// MODEL as any command takes it (see `methods::open`), with the kind in the error context.
pub(crate) fn load(model: &str, lo: &models::LoadOptions) -> Result<Model> {
    let kind = methods::Kind::of(model);
    methods::open(model, lo).with_context(|| format!("loading {} '{model}'", kind.describe()))
}

/// The one line printed for an error: each cause's first line, joined as `{:#}` joins them
/// (what follows a first line is a backtrace candle appends when RUST_BACKTRACE is set).
/// `--verbose` prints everything.
fn error_text(e: &anyhow::Error, verbose: bool) -> String {
    if verbose {
        let s = format!("{e:?}");
        return match flags::names_options(e) {
            true => flags::with_flags(&s),
            false => s,
        };
    }
    e.chain()
        .map(|c| {
            let s = flags::cause_text(c);
            s.lines().next().unwrap_or("").trim_end().to_string()
        })
        .collect::<Vec<_>>()
        .join(": ")
}

/// Check every output path a command will write before it does any work.
fn check_outputs(cmd: &Cmd) -> Result<()> {
    use target::{check, Target};
    match cmd {
        Cmd::Compress(a) => check("--out", &a.out, Target::NewDir),
        Cmd::Upcycle(a) => check("--out", &a.out, Target::NewDir),
        Cmd::Mpobert(a) => check("--out", &a.out, Target::NewDir),
        Cmd::Export(a) if a.gguf => check("--out", &a.out, Target::NewFile),
        Cmd::Export(a) => check("--out", &a.out, Target::NewDir),
        Cmd::Spectrum(a) => match &a.plot {
            Some(p) => check("--plot", p, Target::File),
            None => Ok(()),
        },
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
