//! `mpolm finetune`: full, LoRA and MPO (auxiliary / central / all) fine-tuning of an encoder on
//! sentence classification or of a causal model on text, with checkpoints and `--resume`.

use crate::report::Report;
use anyhow::{Context, Result};
use methods::finetune::{self, FinetuneOptions, Method, RunControl, Task};
use methods::opf::{OpfOptions, Score, Select};
use serde_json::json;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct FinetuneArgs {
    /// Model alias, HF directory, MPO checkpoint or quantized checkpoint (LoRA only).
    pub model: String,
    /// sst2: sentence classification with an encoder (GLUE TSV or JSONL with sentence/label);
    /// lm: causal language modelling on a .txt or .jsonl ({"text": ...}) file; mlm: masked-LM
    /// pre-training of an encoder on such text (BERT's 15% / 80-10-10 masking).
    #[arg(long, value_parser = ["sst2", "lm", "mlm"])]
    pub task: String,
    /// Training data: a file, or a GLUE task folder with train.tsv (+ dev.tsv for evaluation).
    #[arg(long)]
    pub data: PathBuf,
    /// Evaluation file (default: dev.tsv beside the training data, or 5% of the LM blocks).
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// full, lora, mpo-aux (MPOP: central tensors frozen), mpo-central, mpo-all, opf (the most
    /// important matrices train as long exact MPO chains, contracted back to dense at the end).
    #[arg(long, default_value = "full", value_parser = ["full", "lora", "mpo-aux", "mpo-central", "mpo-all", "opf"])]
    pub method: String,
    /// Learning rate (finite, > 0).
    #[arg(long, default_value_t = 2e-5, value_parser = crate::range::positive, allow_negative_numbers = true)]
    pub lr: f64,
    /// Learning rate of MPO tensors (default: --lr; 0 freezes them).
    #[arg(long, value_parser = crate::range::nonneg, allow_negative_numbers = true)]
    pub mpo_lr: Option<f64>,
    #[arg(long, default_value_t = 0.0, value_parser = crate::range::nonneg, allow_negative_numbers = true)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 1, value_parser = crate::range::count, allow_negative_numbers = true)]
    pub epochs: usize,
    /// Stop after this many optimizer steps (the schedule spans them).
    #[arg(long, value_parser = crate::range::count, allow_negative_numbers = true)]
    pub max_steps: Option<usize>,
    #[arg(long, default_value_t = 32, value_parser = crate::range::count, allow_negative_numbers = true)]
    pub batch: usize,
    /// Token cap per example (classification) or block length (lm), >= 2.
    #[arg(long, default_value_t = 64, value_parser = crate::range::len2, allow_negative_numbers = true)]
    pub max_len: usize,
    /// Warmup as a fraction of all steps, in [0, 1].
    #[arg(long, default_value_t = 0.06, value_parser = crate::range::fraction0, allow_negative_numbers = true)]
    pub warmup_ratio: f64,
    /// Warmup in optimizer steps; overrides --warmup-ratio when given.
    #[arg(long, value_parser = crate::range::count0, allow_negative_numbers = true)]
    pub warmup_steps: Option<usize>,
    /// Clip the global gradient norm (finite, >= 0; 0 = off).
    #[arg(long, default_value_t = 1.0, value_parser = crate::range::nonneg, allow_negative_numbers = true)]
    pub max_grad_norm: f64,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Use only the first N training examples (blocks for lm).
    #[arg(long, value_parser = crate::range::count, allow_negative_numbers = true)]
    pub limit: Option<usize>,
    /// Evaluate on only the first N held-out examples (blocks for lm) after each epoch.
    #[arg(long, value_parser = crate::range::count, allow_negative_numbers = true)]
    pub eval_limit: Option<usize>,
    /// Examples per forward pass when evaluating.
    #[arg(long, default_value_t = 64, value_parser = crate::range::count, allow_negative_numbers = true)]
    pub eval_batch: usize,
    /// LoRA rank: >= 1 and at most the smallest dimension of a targeted matrix.
    #[arg(long, default_value_t = 8, value_parser = crate::range::count, allow_negative_numbers = true)]
    pub lora_r: usize,
    #[arg(long, default_value_t = 16.0, value_parser = crate::range::positive, allow_negative_numbers = true)]
    pub lora_alpha: f64,
    #[arg(long, default_value_t = 0.0, value_parser = crate::range::fraction_below1, allow_negative_numbers = true)]
    pub lora_dropout: f64,
    /// Comma-separated module names (PEFT semantics: exact or suffix); default q,v projections.
    #[arg(long, value_delimiter = ',')]
    pub lora_targets: Vec<String>,
    /// MPO sites when a dense model is decomposed for an mpo-* method.
    #[arg(long, default_value_t = 5, value_parser = crate::range::sites, allow_negative_numbers = true)]
    pub mpo_n: usize,
    /// Put training examples of similar length in the same batch (shuffled mega-batches of 50
    /// batches, each sorted by length, as Hugging Face's group_by_length): much less padding.
    #[arg(long)]
    pub group_by_length: bool,
    /// MPOE: probability p_b in [0, 1] that a step leaves the experts' shared central tensors
    /// unchanged (1 freezes them); for checkpoints from `upcycle --mpo`.
    #[arg(long, value_parser = crate::range::fraction0, allow_negative_numbers = true)]
    pub central_mask_p: Option<f64>,
    /// After tuning, squeeze MPO bonds (MPOP Algorithm 2) with auxiliary-only recovery.
    #[arg(long)]
    pub squeeze: bool,
    /// Squeeze until the model has this fraction of its dense parameter count.
    #[arg(long, default_value_t = 0.6, requires = "squeeze", value_parser = crate::range::fraction, allow_negative_numbers = true)]
    pub target_params: f64,
    /// Stop (and roll back the last cut) when the eval loss moves more than this.
    #[arg(long, default_value_t = 0.1, requires = "squeeze", value_parser = crate::range::positive, allow_negative_numbers = true)]
    pub delta: f64,
    #[arg(long, default_value_t = 50, requires = "squeeze", value_parser = crate::range::count, allow_negative_numbers = true)]
    pub max_iters: usize,
    /// Auxiliary-only training steps after each cut.
    #[arg(long, default_value_t = 20, requires = "squeeze", value_parser = crate::range::count0, allow_negative_numbers = true)]
    pub recover_steps: usize,
    /// Fraction of MPO parameters cut per iteration, in [0, 1) (0 = one bond index, as Algorithm 2).
    #[arg(long, default_value_t = 0.03, requires = "squeeze", value_parser = crate::range::fraction_below1, allow_negative_numbers = true)]
    pub cut_fraction: f64,
    /// delta: fixed recovery then compare eval loss (paper); window: the released code's
    /// moving-average trigger (window 10, +0.03, 10 steps).
    #[arg(long, default_value = "delta", value_parser = ["delta", "window"], requires = "squeeze")]
    pub squeeze_trigger: String,
    /// OPF: decompose the top-N of each module group once before training (static) or
    /// --opf-per-round of them every --opf-every steps until N (dynamic).
    #[arg(long, value_parser = ["static", "dynamic"])]
    pub opf_select: Option<String>,
    /// OPF importance: ablation |L - L(W=0)| (static default), taylor sum|g*W| (dynamic
    /// default), fisher sum of mean(g^2) (the released code).
    #[arg(long, value_parser = ["ablation", "taylor", "fisher"])]
    pub opf_score: Option<String>,
    /// OPF: matrices decomposed per module group (Q, K, V, attention-out, FFN-in, FFN-out).
    #[arg(long, value_parser = crate::range::count, allow_negative_numbers = true)]
    pub opf_top_n: Option<usize>,
    /// OPF dynamic: steps between rounds (default: the run split evenly over the rounds).
    #[arg(long, value_parser = crate::range::count, allow_negative_numbers = true)]
    pub opf_every: Option<usize>,
    /// OPF dynamic: matrices added per group each round (default 1).
    #[arg(long, value_parser = crate::range::count, allow_negative_numbers = true)]
    pub opf_per_round: Option<usize>,
    /// OPF chain length: 2 (OPF-SVD) to 64; 11 is the paper's, 15 the released code's.
    #[arg(long, value_parser = crate::range::count, allow_negative_numbers = true)]
    pub opf_sites: Option<usize>,
    /// OPF: training batches the importance scores are computed on (default 4).
    #[arg(long, value_parser = crate::range::count, allow_negative_numbers = true)]
    pub opf_score_batches: Option<usize>,
    /// CaliSr: train fully first, then switch to --method (mpo-aux or lora) by stable rank:
    /// d = the whole model at once (CaliSr-D), s = attention and FFN each on its own (CaliSr-S).
    /// Writes calisr_srank.png beside the log.
    #[arg(long, value_parser = ["d", "s"])]
    pub calisr: Option<String>,
    /// δ in (0, 1): a component switches once SRS_D, the fraction of its last n probes in which
    /// the lightweight update gave the lower stable rank, exceeds it.
    #[arg(long, default_value_t = 0.5, requires = "calisr", value_parser = crate::calisr_plot::open_unit, allow_negative_numbers = true)]
    pub calisr_delta: f64,
    /// n: the number of probes SRS_D is taken over.
    #[arg(long, default_value_t = 3, requires = "calisr", value_parser = crate::range::count, allow_negative_numbers = true)]
    pub calisr_probes: usize,
    /// Probe every this many optimizer steps.
    #[arg(long, default_value_t = 10, requires = "calisr", value_parser = crate::range::count, allow_negative_numbers = true)]
    pub calisr_every: usize,
    /// Switch everything at this fraction of the steps instead of by the rule (in [0, 1]; the
    /// paper's Table 5 check); probes are still logged until then.
    #[arg(long, requires = "calisr", value_parser = crate::range::fraction0, allow_negative_numbers = true)]
    pub calisr_switch_at: Option<f64>,
    /// Learning rate of what only the full phase trains (LoRA's base weights, MPO central
    /// cores); default --lr (--mpo-lr for MPO cores).
    #[arg(long, requires = "calisr", value_parser = crate::range::positive, allow_negative_numbers = true)]
    pub calisr_fft_lr: Option<f64>,
    /// Save a checkpoint every N steps (always at epoch ends).
    #[arg(long, value_parser = crate::range::count, allow_negative_numbers = true)]
    pub save_every: Option<usize>,
    /// Continue the run saved in --out (same options required).
    #[arg(long)]
    pub resume: bool,
    /// Stop after N steps leaving a checkpoint (to split a run; resume continues it).
    #[arg(long, hide = true, value_parser = crate::range::count, allow_negative_numbers = true)]
    pub stop_after: Option<usize>,
    #[arg(long)]
    pub out: PathBuf,
}

pub fn options(a: &FinetuneArgs) -> FinetuneOptions {
    FinetuneOptions {
        model: a.model.clone(),
        task: match a.task.as_str() {
            "lm" => Task::Lm,
            "mlm" => Task::Mlm,
            _ => Task::Sst2,
        },
        method: match a.method.as_str() {
            "lora" => Method::Lora,
            "mpo-aux" => Method::MpoAux,
            "mpo-central" => Method::MpoCentral,
            "mpo-all" => Method::MpoAll,
            "opf" => Method::Opf,
            _ => Method::Full,
        },
        data: a.data.clone(),
        eval_data: a.eval_data.clone(),
        lr: a.lr,
        mpo_lr: a.mpo_lr,
        weight_decay: a.weight_decay,
        epochs: a.epochs,
        batch: a.batch,
        max_len: a.max_len,
        warmup_ratio: a.warmup_ratio,
        warmup_steps: a.warmup_steps,
        max_grad_norm: a.max_grad_norm,
        seed: a.seed,
        max_steps: a.max_steps,
        limit: a.limit,
        eval_limit: a.eval_limit,
        eval_batch: a.eval_batch,
        lora_r: a.lora_r,
        lora_alpha: a.lora_alpha,
        lora_dropout: a.lora_dropout,
        lora_targets: a.lora_targets.clone(),
        mpo_n: a.mpo_n,
        group_by_length: a.group_by_length,
        central_mask_p: a.central_mask_p,
        squeeze: a.squeeze.then(|| methods::squeeze::SqueezeOptions {
            target_params: a.target_params,
            delta: a.delta,
            max_iters: a.max_iters,
            recover_steps: a.recover_steps,
            cut_fraction: a.cut_fraction,
            trigger: if a.squeeze_trigger == "window" {
                methods::squeeze::Trigger::Window
            } else {
                methods::squeeze::Trigger::Delta
            },
            ..Default::default()
        }),
        opf: opf_options(a),
        calisr: a.calisr.as_ref().map(|r| methods::calisr::CalisrOptions {
            rule: if r == "d" {
                methods::calisr::Rule::D
            } else {
                methods::calisr::Rule::S
            },
            delta: a.calisr_delta,
            probes: a.calisr_probes,
            every: a.calisr_every,
            switch_at: a.calisr_switch_at,
            fft_lr: a.calisr_fft_lr,
        }),
    }
}

/// OPF's options when `--method opf` or any `--opf-*` flag is given (the library refuses the
/// flags with another method).
fn opf_options(a: &FinetuneArgs) -> Option<OpfOptions> {
    let any = a.opf_select.is_some()
        || a.opf_score.is_some()
        || a.opf_top_n.is_some()
        || a.opf_every.is_some()
        || a.opf_per_round.is_some()
        || a.opf_sites.is_some()
        || a.opf_score_batches.is_some();
    if a.method != "opf" && !any {
        return None;
    }
    let d = OpfOptions::default();
    let select = match a.opf_select.as_deref() {
        Some("dynamic") => Select::Dynamic,
        _ => Select::Static,
    };
    Some(OpfOptions {
        select,
        score: match (a.opf_score.as_deref(), select) {
            (Some("ablation"), _) | (None, Select::Static) => Score::Ablation,
            (Some("fisher"), _) => Score::Fisher,
            _ => Score::Taylor,
        },
        // 0 is refused by the library with a message naming the flag.
        top_n: a.opf_top_n.unwrap_or(0),
        every: a.opf_every,
        per_round: a.opf_per_round.unwrap_or(d.per_round),
        sites: a.opf_sites.unwrap_or(d.sites),
        score_batches: a.opf_score_batches.unwrap_or(d.score_batches),
    })
}

pub fn run(a: FinetuneArgs, lo: &models::LoadOptions, rep: &mut Report) -> Result<()> {
    let o = options(&a);
    methods::calisr::check(&o)?;
    let mut m = crate::load(&a.model, lo)?;
    let ctl = RunControl {
        resume: a.resume,
        save_every: a.save_every,
        stop_after: a.stop_after,
        progress: true,
    };
    let r = finetune::finetune(&mut m, &o, &a.out, &ctl)
        .with_context(|| format!("fine-tuning {}", a.model))?;
    println!(
        "{} {} on {}: {} of {} parameters tuned ({:.2}%)",
        a.method,
        a.task,
        a.model,
        crate::fmt_int(r.tuned_params),
        crate::fmt_int(r.total_params),
        100.0 * r.tuned_params as f64 / r.total_params.max(1) as f64
    );
    println!(
        "{} / {} steps in {:.1} s ({:.1} examples/s), last loss {}",
        r.steps,
        r.total_steps,
        r.train_secs,
        r.examples_per_sec,
        r.final_loss.map_or("-".into(), |l| format!("{l:.4}"))
    );
    if let Some(e) = &r.eval {
        println!(
            "eval: loss {:.4}, {} {:.4} ({} examples)",
            e.loss, e.metric, e.value, e.examples
        );
    }
    if let Some(s) = r.hooks.get("opf") {
        let n = |k: &str| s[k].as_u64().unwrap_or(0) as usize;
        let chosen: usize = s["rounds"].as_array().map_or(0, |v| {
            v.iter()
                .map(|r| r["chosen"].as_array().map_or(0, Vec::len))
                .sum()
        });
        println!(
            "opf: {chosen} matrices trained as chains; parameters {} while training, {} deployed",
            crate::fmt_int(n("train_params")),
            crate::fmt_int(n("deploy_params"))
        );
        if let (Some(d), Some(o), Some(x)) = (
            s["dense_pass_secs"].as_f64(),
            s["opf_pass_secs"].as_f64(),
            s["step_overhead"].as_f64(),
        ) {
            println!(
                "opf step time: forward+backward {:.3} s with the chains vs {:.3} s dense ({x:.2}x)",
                o, d
            );
        }
    }
    if o.calisr.is_some() {
        calisr_summary(&a.out, r.total_steps, rep)?;
    }
    if r.finished {
        println!("model written to {}", a.out.display());
    } else {
        println!("stopped; continue with --resume --out {}", a.out.display());
    }
    rep.set("command", json!("finetune"));
    rep.set("options", serde_json::to_value(&o)?);
    rep.set("result", serde_json::to_value(&r)?);
    Ok(())
}

/// Each component's switch step from the log, printed and reported, and the stable-rank plot.
fn calisr_summary(out: &std::path::Path, total: usize, rep: &mut Report) -> Result<()> {
    let p = out.join(finetune::LOG_FILE);
    let log: finetune::FinetuneLog = serde_json::from_str(
        &std::fs::read_to_string(&p).with_context(|| format!("{}: cannot read", p.display()))?,
    )
    .with_context(|| format!("{}: invalid log", p.display()))?;
    let Some(v) = log.hooks.get("calisr") else {
        return Ok(());
    };
    let st: methods::calisr::CalisrState = serde_json::from_value(v.clone())?;
    let last = st.probes.last();
    for (g, s) in &st.switched {
        println!("calisr: {g} switched to lightweight tuning at step {s} of {total}");
    }
    if st.switched.is_empty() {
        println!(
            "calisr: nothing switched in {total} steps ({} probes)",
            st.probes.len()
        );
    }
    let plot = out.join(crate::calisr_plot::PLOT_FILE);
    crate::calisr_plot::plot(&st, total, &plot)?;
    println!("calisr: stable-rank plot written to {}", plot.display());
    rep.set(
        "calisr",
        json!({"switched": st.switched, "probes": st.probes.len(), "last_probe": last, "plot": plot}),
    );
    Ok(())
}
