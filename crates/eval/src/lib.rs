//! Evaluation harness for mpolm, following lm-evaluation-harness conventions (prompts,
//! log-likelihood encoding, metrics and the results JSON shape):
//!
//! - `wikitext2`: rolling-window token/word/byte perplexity and bits per byte;
//! - `mmlu` (and `mmlu_<subject>`, `mmlu_<category>`): 0–5-shot multiple choice, per subject,
//!   per category and overall accuracy;
//! - `gsm8k`: 8-shot chain of thought, greedy generation, strict and flexible exact match;
//! - `ifeval`: the verifiable instructions, prompt- and instruction-level, strict and loose;
//! - `sst2`: a fine-tuned BERT classifier, or k-shot prompting of a causal model;
//! - `zeroshot`: ARC-Easy/Challenge, HellaSwag, PIQA, WinoGrande, BoolQ, OpenBookQA and LAMBADA
//!   with lm-eval 0.4.x's prompts and metrics (see `tasks::zeroshot`);
//! - any `.jsonl` task file (multiple choice or generation; see README.md).
//!
//! [`lm::Lm`] is the model side: batched, prefix-sharing log-likelihood and KV-cached greedy
//! generation. Tasks only build requests and aggregate.

pub mod cache;
/// The data readers, shared with the training code (`mpolm-data`).
pub use data;
pub mod error;
pub mod ifeval;
pub mod lm;
pub mod metrics;
pub mod punkt;
pub mod tasks;

pub use error::{Error, Result};
pub use tasks::{parse_tasks, run_task, TaskSpec};

use serde_json::{json, Map, Value};
use std::path::PathBuf;

/// Settings shared by all tasks (the CLI flags).
#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub data_dir: PathBuf,
    /// Few-shot examples; None = the task's default (lm-eval's).
    pub shots: Option<usize>,
    /// At most this many documents per task (per subject for MMLU, windows for wikitext2).
    pub limit: Option<usize>,
    /// Rows per forward pass for log-likelihood.
    pub batch_size: usize,
    /// Generations decoded together (gsm8k, ifeval, generation JSONL tasks). Decoding is
    /// memory-bound and each row's output is the one it gets alone, so this defaults to 8.
    pub gen_batch_size: usize,
    /// Seed for sampled few-shot examples (SST-2, JSONL).
    pub seed: u64,
    /// Longest model input; None = the model's context (2048 at most for wikitext2 windows).
    pub max_length: Option<usize>,
    /// Rolling-window stride for wikitext2 (None = max length: lm-eval's disjoint windows).
    pub stride: Option<usize>,
    /// How wikitext2 windows are scored (rolling: lm-eval's, the default).
    pub ppl_protocol: PplProtocol,
    /// Generation budget; None = the task's default (gsm8k 256, ifeval 1280, jsonl 256).
    pub max_gen_tokens: Option<usize>,
    /// Keep per-document prompts, outputs and scores in the report.
    pub log_samples: bool,
    pub progress: bool,
    /// Reuse and record request results (see [`cache::RequestCache`]); None = compute all.
    pub cache: Option<std::sync::Arc<cache::RequestCache>>,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            data_dir: data::project_data_dir(),
            shots: None,
            limit: None,
            batch_size: 1,
            gen_batch_size: 8,
            seed: 1234,
            max_length: None,
            stride: None,
            ppl_protocol: PplProtocol::Rolling,
            max_gen_tokens: None,
            log_samples: false,
            progress: false,
            cache: None,
        }
    }
}

/// The version every task reports under `versions` (lm-eval's results need one per task).
pub const TASK_VERSION: f64 = 1.0;

/// Perplexity protocols people compare against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PplProtocol {
    /// lm-eval's `loglikelihood_rolling`: every token predicted once, the first from the BOS/EOS
    /// prefix token, later windows with the preceding tokens as context.
    Rolling,
    /// The HF/GPTQ-paper protocol: the token stream cut into complete windows of max length,
    /// each scored alone, its first token not predicted.
    Disjoint,
}

impl PplProtocol {
    pub fn name(self) -> &'static str {
        match self {
            PplProtocol::Rolling => "rolling",
            PplProtocol::Disjoint => "disjoint",
        }
    }
}

/// One metric under lm-eval's "metric,filter" key.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Metric {
    pub name: String,
    pub filter: String,
    pub value: f64,
    pub stderr: Option<f64>,
    pub higher_is_better: bool,
}

impl Metric {
    pub fn new(name: &str, value: f64, stderr: Option<f64>) -> Self {
        Metric {
            name: name.into(),
            filter: "none".into(),
            value,
            stderr,
            higher_is_better: true,
        }
    }
    pub fn filtered(name: &str, filter: &str, value: f64, stderr: Option<f64>) -> Self {
        Metric {
            name: name.into(),
            filter: filter.into(),
            value,
            stderr,
            higher_is_better: true,
        }
    }
    pub fn lower_better(mut self) -> Self {
        self.higher_is_better = false;
        self
    }
}

/// One entry of `results` (a task, a subtask or a group).
#[derive(Debug, Clone)]
pub struct TaskResult {
    pub name: String,
    /// Display name (indented for subtasks, as lm-eval's aliases).
    pub alias: String,
    pub metrics: Vec<Metric>,
    pub n_shot: Option<usize>,
    /// (documents in the split, documents evaluated)
    pub n_samples: Option<(usize, usize)>,
    /// Non-empty for groups (MMLU overall and categories).
    pub subtasks: Vec<String>,
}

impl TaskResult {
    pub fn new(name: &str, alias: &str) -> Self {
        TaskResult {
            name: name.into(),
            alias: alias.into(),
            metrics: vec![],
            n_shot: None,
            n_samples: None,
            subtasks: vec![],
        }
    }
    pub fn metric(&self, name: &str) -> Option<f64> {
        let (n, f) = name.split_once(',').unwrap_or((name, "none"));
        self.metrics
            .iter()
            .find(|m| m.name == n && m.filter == f)
            .map(|m| m.value)
    }
}

/// Everything one task run produced.
#[derive(Debug, Clone)]
pub struct TaskOutput {
    pub task: String,
    /// The main entry first, then subtasks/groups.
    pub results: Vec<TaskResult>,
    pub seconds: f64,
    /// Task settings (prompt format, shots, stop strings, window, …).
    pub config: Value,
    pub samples: Vec<Value>,
}

fn num(x: f64) -> Value {
    if x.is_finite() {
        json!(x)
    } else {
        Value::Null
    }
}

/// The lm-evaluation-harness shaped report: `results` (task → "metric,filter" → value, with
/// "metric_stderr,filter"), `groups`, `group_subtasks`, `configs`, `n-shot`, `n-samples`,
/// `higher_is_better`, plus `samples` when logged.
pub fn results_json(outputs: &[TaskOutput]) -> Value {
    let mut results = Map::new();
    let mut groups = Map::new();
    let mut group_subtasks = Map::new();
    let mut configs = Map::new();
    let mut nshot = Map::new();
    let mut nsamples = Map::new();
    let mut hib = Map::new();
    let mut samples = Map::new();
    let mut versions = Map::new();
    for o in outputs {
        configs.insert(o.task.clone(), o.config.clone());
        if !o.samples.is_empty() {
            samples.insert(o.task.clone(), Value::Array(o.samples.clone()));
        }
        for r in &o.results {
            let mut m = Map::new();
            m.insert("alias".into(), json!(r.alias));
            let mut h = Map::new();
            for x in &r.metrics {
                m.insert(format!("{},{}", x.name, x.filter), num(x.value));
                m.insert(
                    format!("{}_stderr,{}", x.name, x.filter),
                    x.stderr.map(num).unwrap_or_else(|| json!("N/A")),
                );
                h.insert(x.name.clone(), json!(x.higher_is_better));
            }
            if let Some(k) = r.n_shot {
                nshot.insert(r.name.clone(), json!(k));
            }
            if let Some((orig, eff)) = r.n_samples {
                nsamples.insert(r.name.clone(), json!({"original": orig, "effective": eff}));
            }
            hib.insert(r.name.clone(), Value::Object(h));
            // lm-eval's make_table reads a version for every entry; these are mpolm's task
            // versions (raised when a task's prompt or metric changes).
            versions.insert(r.name.clone(), json!(TASK_VERSION));
            if !r.subtasks.is_empty() {
                groups.insert(r.name.clone(), Value::Object(m.clone()));
                group_subtasks.insert(r.name.clone(), json!(r.subtasks));
            }
            results.insert(r.name.clone(), Value::Object(m));
        }
    }
    let mut root = Map::new();
    root.insert("results".into(), Value::Object(results));
    if !groups.is_empty() {
        root.insert("groups".into(), Value::Object(groups));
        root.insert("group_subtasks".into(), Value::Object(group_subtasks));
    }
    root.insert("configs".into(), Value::Object(configs));
    root.insert("n-shot".into(), Value::Object(nshot));
    root.insert("n-samples".into(), Value::Object(nsamples));
    root.insert("higher_is_better".into(), Value::Object(hib));
    root.insert("versions".into(), Value::Object(versions));
    if !samples.is_empty() {
        root.insert("samples".into(), Value::Object(samples));
    }
    Value::Object(root)
}

/// A readable markdown table (as lm-eval prints).
pub fn format_table(outputs: &[TaskOutput]) -> String {
    let mut rows: Vec<[String; 7]> = vec![];
    for o in outputs {
        for r in &o.results {
            for (k, m) in r.metrics.iter().enumerate() {
                let first = k == 0;
                rows.push([
                    if first {
                        r.alias.clone()
                    } else {
                        String::new()
                    },
                    if first {
                        r.n_shot.map(|n| n.to_string()).unwrap_or_default()
                    } else {
                        String::new()
                    },
                    m.filter.clone(),
                    format!("{} {}", m.name, if m.higher_is_better { "↑" } else { "↓" }),
                    format!("{:.4}", m.value),
                    m.stderr.map(|s| format!("± {s:.4}")).unwrap_or_default(),
                    if first {
                        r.n_samples.map(|(_, e)| e.to_string()).unwrap_or_default()
                    } else {
                        String::new()
                    },
                ]);
            }
        }
    }
    let head = ["Task", "n-shot", "Filter", "Metric", "Value", "Stderr", "n"];
    let mut w: Vec<usize> = head.iter().map(|h| h.chars().count()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: &[String]| -> String {
        let mut s = String::from("|");
        for (i, c) in cells.iter().enumerate() {
            let pad = w[i] - c.chars().count();
            if i >= 4 {
                s.push_str(&format!(" {}{} |", " ".repeat(pad), c));
            } else {
                s.push_str(&format!(" {}{} |", c, " ".repeat(pad)));
            }
        }
        s
    };
    let mut out = line(&head.map(String::from));
    out.push('\n');
    out.push_str(&format!(
        "|{}|",
        w.iter()
            .map(|n| "-".repeat(n + 2))
            .collect::<Vec<_>>()
            .join("|")
    ));
    out.push('\n');
    for r in &rows {
        out.push_str(&line(r));
        out.push('\n');
    }
    out
}
