//! The zero-shot suite that compression and quantization papers report (ARC-Easy/Challenge,
//! HellaSwag, PIQA, WinoGrande, BoolQ, OpenBookQA, LAMBADA), with lm-evaluation-harness 0.4.x's
//! prompts, splits, choices and metrics. Each task reads its dataset's source files as the
//! authors publish them (one sub-folder of the data folder per dataset) and turns every document
//! into lm-eval's requests: (context, continuation) pairs and the gold index.
//!
//! Metrics (lm-eval's `process_results`):
//! - multiple choice: `acc` = argmax of the choices' log-likelihoods is gold; `acc_norm` = argmax
//!   of log-likelihood / `len(choice)` — Python's `len`, i.e. Unicode code points of the choice
//!   text *without* the target delimiter " " (lm-eval's `completion_len`);
//! - `lambada_openai` (one continuation per document): `perplexity` = exp(−mean log-likelihood
//!   of the continuation over documents), `acc` = share of documents whose continuation is the
//!   greedy one (every token the argmax).

use super::{arc, boolq, hellaswag, lambada, piqa, winogrande};
use crate::lm::{Lm, Score};
use crate::metrics::{mean, stderr};
use crate::{EvalOptions, Metric, Result, TaskOutput, TaskResult};
use serde_json::{json, Map, Value};
use std::path::Path;

/// lm-eval's default `target_delimiter`, put between context and every choice.
pub const DELIM: &str = " ";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    ArcEasy,
    ArcChallenge,
    Hellaswag,
    Piqa,
    Winogrande,
    Boolq,
    Openbookqa,
    LambadaOpenai,
}

impl Task {
    /// `--task zeroshot`, in this order.
    pub const ALL: [Task; 8] = [
        Task::ArcEasy,
        Task::ArcChallenge,
        Task::Hellaswag,
        Task::Piqa,
        Task::Winogrande,
        Task::Boolq,
        Task::Openbookqa,
        Task::LambadaOpenai,
    ];

    /// lm-eval's task name.
    pub fn name(self) -> &'static str {
        match self {
            Task::ArcEasy => "arc_easy",
            Task::ArcChallenge => "arc_challenge",
            Task::Hellaswag => "hellaswag",
            Task::Piqa => "piqa",
            Task::Winogrande => "winogrande",
            Task::Boolq => "boolq",
            Task::Openbookqa => "openbookqa",
            Task::LambadaOpenai => "lambada_openai",
        }
    }

    pub fn from_name(s: &str) -> Option<Task> {
        let s = s.to_ascii_lowercase();
        let t = match s.as_str() {
            "arc_easy" | "arc-easy" => Task::ArcEasy,
            "arc_challenge" | "arc-challenge" => Task::ArcChallenge,
            "hellaswag" => Task::Hellaswag,
            "piqa" => Task::Piqa,
            "winogrande" => Task::Winogrande,
            "boolq" => Task::Boolq,
            "openbookqa" => Task::Openbookqa,
            "lambada_openai" | "lambada" => Task::LambadaOpenai,
            _ => return None,
        };
        Some(t)
    }

    /// Files read, relative to the data folder.
    pub fn files(self) -> &'static [&'static str] {
        match self {
            Task::ArcEasy => &[arc::EASY_FILE],
            Task::ArcChallenge => &[arc::CHALLENGE_FILE],
            Task::Hellaswag => &[hellaswag::FILE],
            Task::Piqa => &[piqa::FILE, piqa::LABELS_FILE],
            Task::Winogrande => &[winogrande::FILE],
            Task::Boolq => &[boolq::FILE],
            Task::Openbookqa => &[arc::OBQA_FILE],
            Task::LambadaOpenai => &[lambada::FILE],
        }
    }

    /// The split lm-eval evaluates (its dataset's name for it).
    pub fn split(self) -> &'static str {
        match self {
            Task::ArcEasy | Task::ArcChallenge | Task::Openbookqa | Task::LambadaOpenai => "test",
            _ => "validation",
        }
    }

    pub fn has_acc_norm(self) -> bool {
        matches!(
            self,
            Task::ArcEasy | Task::ArcChallenge | Task::Hellaswag | Task::Piqa | Task::Openbookqa
        )
    }

    /// Every document of the split, as lm-eval's requests.
    pub fn load(self, data_dir: &Path) -> Result<Vec<Doc>> {
        match self {
            Task::ArcEasy => arc::load_arc(&data_dir.join(arc::EASY_FILE)),
            Task::ArcChallenge => arc::load_arc(&data_dir.join(arc::CHALLENGE_FILE)),
            Task::Openbookqa => arc::load_openbookqa(&data_dir.join(arc::OBQA_FILE)),
            Task::Hellaswag => hellaswag::load(&data_dir.join(hellaswag::FILE)),
            Task::Piqa => piqa::load(
                &data_dir.join(piqa::FILE),
                &data_dir.join(piqa::LABELS_FILE),
            ),
            Task::Winogrande => winogrande::load(&data_dir.join(winogrande::FILE)),
            Task::Boolq => boolq::load(&data_dir.join(boolq::FILE)),
            Task::LambadaOpenai => lambada::load(&data_dir.join(lambada::FILE)),
        }
    }
}

/// One document as lm-eval scores it.
#[derive(Debug, Clone, PartialEq)]
pub struct Doc {
    /// (context, continuation) per choice. One context for all choices, except WinoGrande's
    /// partial evaluation (one context per option, the same continuation). LAMBADA: one pair.
    pub requests: Vec<(String, String)>,
    /// lm-eval's `doc_to_choice` (without the delimiter): the lengths `acc_norm` divides by.
    pub choices: Vec<String>,
    /// Index of the correct request (0 for LAMBADA's single continuation).
    pub gold: usize,
}

impl Doc {
    /// Choices sharing one context, continuations = delimiter + choice.
    pub fn choice(context: String, choices: Vec<String>, gold: usize) -> Doc {
        Doc {
            requests: choices
                .iter()
                .map(|c| (context.clone(), format!("{DELIM}{c}")))
                .collect(),
            choices,
            gold,
        }
    }
}

/// Index of the largest value (first on ties, as numpy's argmax).
pub fn argmax(x: &[f64]) -> usize {
    super::mmlu::argmax_f64(x)
}

/// Per-document outcome of a multiple-choice task.
#[derive(Debug, Clone, PartialEq)]
pub struct Judged {
    pub pred: usize,
    pub pred_norm: usize,
    pub acc: f64,
    pub acc_norm: f64,
}

/// lm-eval's multiple-choice `process_results` for one document.
pub fn judge(doc: &Doc, lls: &[f64]) -> Judged {
    let norm: Vec<f64> = lls
        .iter()
        .zip(&doc.choices)
        .map(|(l, c)| l / c.chars().count() as f64)
        .collect();
    let (pred, pred_norm) = (argmax(lls), argmax(&norm));
    Judged {
        pred,
        pred_norm,
        acc: (pred == doc.gold) as u8 as f64,
        acc_norm: (pred_norm == doc.gold) as u8 as f64,
    }
}

/// The task's metrics from per-document scores (one `Score` per request, in order).
pub fn metrics(task: Task, docs: &[Doc], scores: &[Vec<Score>]) -> Vec<Metric> {
    if task == Task::LambadaOpenai {
        let ll: Vec<f64> = scores.iter().map(|s| s[0].logprob).collect();
        let greedy: Vec<f64> = scores.iter().map(|s| s[0].greedy as u8 as f64).collect();
        return vec![
            Metric::new("perplexity", (-mean(&ll)).exp(), None).lower_better(),
            Metric::new("acc", mean(&greedy), stderr(&greedy)),
        ];
    }
    let (mut acc, mut acc_norm) = (Vec::new(), Vec::new());
    for (d, s) in docs.iter().zip(scores) {
        let lls: Vec<f64> = s.iter().map(|x| x.logprob).collect();
        let j = judge(d, &lls);
        acc.push(j.acc);
        acc_norm.push(j.acc_norm);
    }
    let mut m = vec![Metric::new("acc", mean(&acc), stderr(&acc))];
    if task.has_acc_norm() {
        m.push(Metric::new("acc_norm", mean(&acc_norm), stderr(&acc_norm)));
    }
    m
}

/// Run `tasks` (the whole suite with a `zeroshot` group entry when `group`).
pub fn run(lm: &Lm, tasks: &[Task], group: bool, opts: &EvalOptions) -> Result<TaskOutput> {
    if let Some(k) = opts.shots.filter(|&k| k > 0) {
        let name = if group { "zeroshot" } else { tasks[0].name() };
        return Err(crate::Error::unsupported(
            name,
            format!("the zero-shot suite runs with 0 shots (asked for {k})"),
        ));
    }
    // Load everything first so a missing file fails before any model work.
    let mut loaded = Vec::with_capacity(tasks.len());
    for &t in tasks {
        let all = t.load(&opts.data_dir)?;
        let n = all.len();
        loaded.push((t, super::limit(all, opts.limit), n));
    }
    let mut results = Vec::new();
    let mut samples = Vec::new();
    let mut configs = Map::new();
    let mut timings = Map::new();
    let mut accs = Vec::new();
    for (t, docs, n) in &loaded {
        let t0 = std::time::Instant::now();
        let pairs: Vec<(String, String)> = docs
            .iter()
            .flat_map(|d| d.requests.iter().cloned())
            .collect();
        let flat = lm.loglikelihood(&pairs, t.name())?;
        let mut scores = Vec::with_capacity(docs.len());
        let mut i = 0;
        for d in docs {
            scores.push(flat[i..i + d.requests.len()].to_vec());
            i += d.requests.len();
        }
        let ms = metrics(*t, docs, &scores);
        let alias = if group {
            format!(" - {}", t.name())
        } else {
            t.name().to_string()
        };
        let mut r = TaskResult::new(t.name(), &alias);
        if let Some(a) = ms.iter().find(|m| m.name == "acc") {
            accs.push(a.value);
        }
        r.metrics = ms;
        r.n_shot = Some(0);
        r.n_samples = Some((*n, docs.len()));
        results.push(r);
        if opts.log_samples {
            for (k, (d, s)) in docs.iter().zip(&scores).enumerate() {
                let lls: Vec<f64> = s.iter().map(|x| x.logprob).collect();
                let mut v = json!({"task": t.name(), "doc": k, "requests": d.requests,
                    "loglikelihoods": lls, "gold": d.gold});
                if *t == Task::LambadaOpenai {
                    v["greedy"] = json!(s[0].greedy);
                } else {
                    let j = judge(d, &lls);
                    v["pred"] = json!(j.pred);
                    v["pred_norm"] = json!(j.pred_norm);
                    v["acc"] = json!(j.acc);
                }
                samples.push(v);
            }
        }
        configs.insert(
            t.name().into(),
            json!({"split": t.split(), "files": t.files(), "num_fewshot": 0,
                   "target_delimiter": DELIM, "limit": opts.limit}),
        );
        timings.insert(t.name().into(), json!(t0.elapsed().as_secs_f64()));
    }
    let name = if group {
        "zeroshot".to_string()
    } else {
        tasks.iter().map(|t| t.name()).collect::<Vec<_>>().join(",")
    };
    if group {
        let mut g = TaskResult::new("zeroshot", "zeroshot");
        g.metrics.push(Metric::new("acc", mean(&accs), None));
        g.subtasks = tasks.iter().map(|t| t.name().to_string()).collect();
        g.n_shot = Some(0);
        results.insert(0, g);
    }
    let mut config = Value::Object(configs);
    config["max_length"] = json!(lm.max_length);
    config["batch_size"] = json!(lm.batch);
    config["seconds_per_task"] = Value::Object(timings);
    if group {
        config["group_acc"] = json!("unweighted mean of the member tasks' acc");
    }
    Ok(TaskOutput {
        task: name,
        results,
        seconds: 0.0,
        config,
        samples,
    })
}

/// Each JSONL record's string field `key`, or a one-line error naming file and line.
pub(crate) fn str_field<'v>(v: &'v Value, key: &str, path: &Path, line: usize) -> Result<&'v str> {
    match v.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(crate::Error::parse(
            path,
            line,
            format!("'{key}' must be a string"),
        )),
        None => Err(crate::Error::parse(path, line, format!("missing '{key}'"))),
    }
}
