//! User task files (`--task path/to/file.jsonl`), one JSON object per line, all of one kind:
//!
//! - multiple choice: `{"context": "...", "choices": ["a", "b", ...], "gold": 0}` — each
//!   choice is scored as the continuation `target_delimiter + choice` of the context. Metrics:
//!   `acc` (highest log-likelihood) and `acc_norm` (log-likelihood divided by the choice's length
//!   in characters, as lm-eval's Python `len`).
//! - generation: `{"prompt": "...", "target": "...", "regex": "optional", "until": ["\n\n"],
//!   "max_tokens": 256, "ignore_case": false}` — greedy generation until a stop string (default
//!   "\n\n") or EOS; the answer is the regex's first match (its first capture group when it has
//!   one), else the whole output; metric `exact_match` of the trimmed answer and target.
//!
//! lm-eval's `target_delimiter` (default " ") and `fewshot_delimiter` (default "\n\n") may be set
//! per line. Other keys (ids, metadata) are ignored. With `--shots K`, K other lines (drawn once
//! with `--seed`) are prepended as "context + target_delimiter + gold choice" / "prompt +
//! target_delimiter + target", each followed by the query line's `fewshot_delimiter`.

use crate::data;
use crate::lm::{GenRequest, Lm};
use crate::metrics::{mean, stderr};
use crate::{Error, EvalOptions, Metric, Result, TaskOutput, TaskResult};
use rand::seq::index::sample;
use rand::SeedableRng;
use regex::Regex;
use serde_json::{json, Value};
use std::path::Path;

pub const DEFAULT_UNTIL: &str = "\n\n";
pub const DEFAULT_MAX_GEN: usize = 256;
/// lm-eval's defaults.
pub const DEFAULT_TARGET_DELIMITER: &str = " ";
pub const DEFAULT_FEWSHOT_DELIMITER: &str = "\n\n";

/// How a line joins its answer and the next few-shot example (lm-eval's task fields).
#[derive(Debug, Clone, PartialEq)]
pub struct Delimiters {
    pub target: String,
    pub fewshot: String,
}

#[derive(Debug, Clone)]
pub enum Doc {
    Choice {
        context: String,
        choices: Vec<String>,
        gold: usize,
        delims: Delimiters,
    },
    Gen {
        prompt: String,
        target: String,
        regex: Option<Regex>,
        until: Vec<String>,
        max_tokens: Option<usize>,
        ignore_case: bool,
        delims: Delimiters,
    },
}

impl Doc {
    fn is_choice(&self) -> bool {
        matches!(self, Doc::Choice { .. })
    }
    pub fn delimiters(&self) -> &Delimiters {
        match self {
            Doc::Choice { delims, .. } | Doc::Gen { delims, .. } => delims,
        }
    }
    /// The text this document contributes as a few-shot example.
    fn as_shot(&self) -> String {
        let t = &self.delimiters().target;
        match self {
            Doc::Choice {
                context,
                choices,
                gold,
                ..
            } => format!("{context}{t}{}", choices[*gold]),
            Doc::Gen { prompt, target, .. } => format!("{prompt}{t}{target}"),
        }
    }
}

pub fn task_name(p: &Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "jsonl".into())
}

fn string(v: &Value, key: &str, path: &Path, line: usize) -> Result<String> {
    match v.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(Error::parse(
            path,
            line,
            format!("'{key}' must be a string"),
        )),
        None => Err(Error::parse(path, line, format!("missing '{key}'"))),
    }
}

fn delimiters(v: &Value, path: &Path, line: usize) -> Result<Delimiters> {
    let get = |key: &str, default: &str| match v.get(key) {
        None | Some(Value::Null) => Ok(default.to_string()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(Error::parse(
            path,
            line,
            format!("'{key}' must be a string"),
        )),
    };
    Ok(Delimiters {
        target: get("target_delimiter", DEFAULT_TARGET_DELIMITER)?,
        fewshot: get("fewshot_delimiter", DEFAULT_FEWSHOT_DELIMITER)?,
    })
}

fn parse_doc(v: &Value, path: &Path, line: usize) -> Result<Doc> {
    if v.get("choices").is_some() || v.get("context").is_some() {
        let context = string(v, "context", path, line)?;
        let choices = match v.get("choices") {
            Some(Value::Array(a)) if a.len() >= 2 => a
                .iter()
                .map(|c| {
                    c.as_str()
                        .map(String::from)
                        .ok_or_else(|| Error::parse(path, line, "every choice must be a string"))
                })
                .collect::<Result<Vec<_>>>()?,
            Some(Value::Array(_)) => {
                return Err(Error::parse(
                    path,
                    line,
                    "'choices' needs at least 2 entries",
                ))
            }
            Some(_) => {
                return Err(Error::parse(
                    path,
                    line,
                    "'choices' must be an array of strings",
                ))
            }
            None => return Err(Error::parse(path, line, "missing 'choices'")),
        };
        let gold = match v.get("gold") {
            Some(g) => g.as_u64().ok_or_else(|| {
                Error::parse(
                    path,
                    line,
                    "'gold' must be a non-negative integer (0-based index)",
                )
            })? as usize,
            None => {
                return Err(Error::parse(
                    path,
                    line,
                    "missing 'gold' (0-based index of the correct choice)",
                ))
            }
        };
        if gold >= choices.len() {
            return Err(Error::parse(
                path,
                line,
                format!(
                    "'gold' {gold} is out of range for {} choices",
                    choices.len()
                ),
            ));
        }
        let delims = delimiters(v, path, line)?;
        // Files written for the old verbatim convention would silently score "  choice".
        if !delims.target.is_empty()
            && delims.target.trim().is_empty()
            && choices.iter().all(|c| c.starts_with(char::is_whitespace))
        {
            return Err(Error::parse(
                path,
                line,
                format!(
                    "every choice starts with whitespace and the target delimiter {:?} adds more; drop the leading spaces (lm-eval's convention) or set \"target_delimiter\": \"\"",
                    delims.target
                ),
            ));
        }
        return Ok(Doc::Choice {
            context,
            choices,
            gold,
            delims,
        });
    }
    if v.get("prompt").is_some() || v.get("target").is_some() {
        let prompt = string(v, "prompt", path, line)?;
        let target = string(v, "target", path, line)?;
        let regex = match v.get("regex") {
            None | Some(Value::Null) => None,
            Some(Value::String(r)) => Some(Regex::new(r).map_err(|e| {
                Error::parse(
                    path,
                    line,
                    format!("invalid 'regex': {}", e.to_string().replace('\n', " ")),
                )
            })?),
            Some(_) => return Err(Error::parse(path, line, "'regex' must be a string")),
        };
        let until = match v.get("until") {
            None | Some(Value::Null) => vec![DEFAULT_UNTIL.to_string()],
            Some(Value::Array(a)) => a
                .iter()
                .map(|c| {
                    c.as_str().map(String::from).ok_or_else(|| {
                        Error::parse(path, line, "'until' must be an array of strings")
                    })
                })
                .collect::<Result<Vec<_>>>()?,
            Some(_) => {
                return Err(Error::parse(
                    path,
                    line,
                    "'until' must be an array of strings",
                ))
            }
        };
        let max_tokens = match v.get("max_tokens") {
            None | Some(Value::Null) => None,
            Some(m) => Some(m.as_u64().ok_or_else(|| {
                Error::parse(path, line, "'max_tokens' must be a positive integer")
            })? as usize),
        };
        let ignore_case = v
            .get("ignore_case")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        return Ok(Doc::Gen {
            prompt,
            target,
            regex,
            until,
            max_tokens,
            ignore_case,
            delims: delimiters(v, path, line)?,
        });
    }
    Err(Error::parse(path, line, "a task line needs either 'context'/'choices'/'gold' (multiple choice) or 'prompt'/'target' (generation)"))
}

/// Parse a task file's text; every line must be of the same kind as the first.
pub fn parse(text: &str, path: &Path) -> Result<Vec<Doc>> {
    let mut docs: Vec<Doc> = Vec::new();
    for (line, v) in data::parse_jsonl(text, path)? {
        let d = parse_doc(&v, path, line)?;
        if let Some(first) = docs.first() {
            if first.is_choice() != d.is_choice() {
                let (a, b) = if first.is_choice() {
                    ("multiple-choice", "generation")
                } else {
                    ("generation", "multiple-choice")
                };
                return Err(Error::parse(
                    path,
                    line,
                    format!("a {b} line in a {a} file (all lines must be of one kind)"),
                ));
            }
        }
        docs.push(d);
    }
    Ok(docs)
}

pub fn load(path: &Path) -> Result<Vec<Doc>> {
    let text = data::read_text(path)?;
    parse(&text, path)
}

/// Extract the answer from a generation: first regex match (group 1 if any), else the text.
pub fn extract(resp: &str, regex: Option<&Regex>) -> Option<String> {
    match regex {
        None => Some(resp.trim().to_string()),
        Some(r) => r.captures(resp).map(|c| {
            c.get(1)
                .or_else(|| c.get(0))
                .map(|m| m.as_str().trim().to_string())
                .unwrap_or_default()
        }),
    }
}

/// Few-shot prefix for document `i`: the first K of K+1 seeded candidates other than `i`.
fn shots_for(docs: &[Doc], cands: &[usize], k: usize, i: usize) -> String {
    let mut s = String::new();
    for &c in cands.iter().filter(|&&c| c != i).take(k) {
        s.push_str(&docs[c].as_shot());
        s.push_str(&docs[i].delimiters().fewshot);
    }
    s
}

pub fn run(lm: &Lm, path: &Path, opts: &EvalOptions) -> Result<TaskOutput> {
    let name = task_name(path);
    let all = load(path)?;
    let n = all.len();
    let k = opts.shots.unwrap_or(0);
    if k >= n && k > 0 {
        return Err(Error::unsupported_option(
            &name,
            "shots",
            format!(
                "`shots` {k} needs more than {k} lines in {}",
                path.display()
            ),
        ));
    }
    let cands: Vec<usize> = {
        let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
        sample(&mut rng, n, (k + 1).min(n)).into_iter().collect()
    };
    let used = opts.limit.unwrap_or(n).min(n);
    let mut r = TaskResult::new(&name, &name);
    r.n_shot = Some(k);
    r.n_samples = Some((n, used));
    let mut samples = Vec::new();
    let kind;
    if all[0].is_choice() {
        kind = "multiple_choice";
        let mut requests: Vec<(String, Vec<String>)> = Vec::new();
        for (i, d) in all.iter().take(used).enumerate() {
            if let Doc::Choice {
                context,
                choices,
                delims,
                ..
            } = d
            {
                requests.push((
                    format!("{}{context}", shots_for(&all, &cands, k, i)),
                    choices
                        .iter()
                        .map(|c| format!("{}{c}", delims.target))
                        .collect(),
                ));
            }
        }
        let scores = lm.loglikelihood_choices(&requests, &name)?;
        let (mut acc, mut acc_norm) = (Vec::new(), Vec::new());
        for (i, d) in all.iter().take(used).enumerate() {
            if let Doc::Choice { choices, gold, .. } = d {
                let ll: Vec<f64> = scores[i].iter().map(|s| s.logprob).collect();
                let norm: Vec<f64> = ll
                    .iter()
                    .zip(choices)
                    .map(|(l, c)| l / (c.chars().count().max(1) as f64))
                    .collect();
                let (p, pn) = (super::mmlu::argmax_f64(&ll), super::mmlu::argmax_f64(&norm));
                acc.push((p == *gold) as u8 as f64);
                acc_norm.push((pn == *gold) as u8 as f64);
                if opts.log_samples {
                    samples.push(json!({"doc": i, "context": requests[i].0, "loglikelihoods": ll, "pred": p, "pred_norm": pn, "gold": gold}));
                }
            }
        }
        r.metrics.push(Metric::new("acc", mean(&acc), stderr(&acc)));
        r.metrics
            .push(Metric::new("acc_norm", mean(&acc_norm), stderr(&acc_norm)));
    } else {
        kind = "generation";
        let default_max = opts.max_gen_tokens.unwrap_or(DEFAULT_MAX_GEN);
        let mut reqs = Vec::new();
        let mut prompts = Vec::new();
        for (i, d) in all.iter().take(used).enumerate() {
            if let Doc::Gen {
                prompt,
                until,
                max_tokens,
                ..
            } = d
            {
                let p = format!("{}{prompt}", shots_for(&all, &cands, k, i));
                let mut until = until.clone();
                for &e in &lm.tok.eos_ids {
                    until.push(lm.tok.decode(&[e], false)?);
                }
                reqs.push(GenRequest {
                    context: lm.encode(&p)?,
                    until,
                    max_new_tokens: max_tokens.unwrap_or(default_max),
                });
                prompts.push(p);
            }
        }
        let outs = lm.generate_until(&reqs, &name, |_, _| {})?;
        let mut em = Vec::new();
        for (i, (d, o)) in all.iter().take(used).zip(&outs).enumerate() {
            if let Doc::Gen {
                target,
                regex,
                ignore_case,
                ..
            } = d
            {
                let ans = extract(&o.text, regex.as_ref());
                let ok = match &ans {
                    Some(a) if *ignore_case => a.to_lowercase() == target.trim().to_lowercase(),
                    Some(a) => a == target.trim(),
                    None => false,
                };
                em.push(ok as u8 as f64);
                if opts.log_samples {
                    samples.push(json!({"doc": i, "prompt": prompts[i], "response": o.text, "extracted": ans, "target": target, "exact_match": ok as u8}));
                }
            }
        }
        r.metrics
            .push(Metric::new("exact_match", mean(&em), stderr(&em)));
    }
    let d0 = all[0].delimiters();
    let output_type = match kind {
        "multiple_choice" => "multiple_choice",
        _ => "generate_until",
    };
    let metric_list: Vec<Value> = r
        .metrics
        .iter()
        .map(|m| json!({"metric": m.name, "aggregation": "mean", "higher_is_better": m.higher_is_better}))
        .collect();
    Ok(TaskOutput {
        task: name.clone(),
        results: vec![r],
        seconds: 0.0,
        // lm-eval's task config fields first, then mpolm's own.
        config: json!({"task": name, "dataset_path": path, "output_type": output_type, "num_fewshot": k,
            "target_delimiter": d0.target, "fewshot_delimiter": d0.fewshot, "metric_list": metric_list,
            "fewshot_config": {"sampler": "seeded_random", "seed": opts.seed},
            "file": path, "kind": kind, "seed": opts.seed, "max_length": lm.max_length, "batch_size": lm.batch, "generation_batch_size": lm.gen_batch}),
        samples,
    })
}
