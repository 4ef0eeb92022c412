//! Task names → specs, and running one spec on a model.

pub mod arc;
pub mod boolq;
pub mod gsm8k;
pub mod hellaswag;
pub mod ifeval;
pub mod jsonl;
pub mod lambada;
pub mod mmlu;
pub mod piqa;
pub mod sst2;
pub mod wikitext;
pub mod winogrande;
pub mod zeroshot;

use crate::lm::Lm;
use crate::{Error, EvalOptions, Result, TaskOutput};
use models::{Arch, Model};
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq)]
pub enum TaskSpec {
    Wikitext2,
    /// The selected subjects (all 57 for `mmlu`); every `mmlu*` name in one list merges here.
    Mmlu {
        subjects: Vec<&'static str>,
    },
    Gsm8k,
    Ifeval,
    Sst2,
    /// Zero-shot suite tasks; `group` = the whole suite asked for as `zeroshot` (adds a group
    /// entry to the report).
    ZeroShot {
        tasks: Vec<zeroshot::Task>,
        group: bool,
    },
    Jsonl(PathBuf),
}

impl TaskSpec {
    pub fn name(&self) -> String {
        match self {
            TaskSpec::Wikitext2 => "wikitext2".into(),
            TaskSpec::Mmlu { .. } => "mmlu".into(),
            TaskSpec::Gsm8k => "gsm8k".into(),
            TaskSpec::Ifeval => "ifeval".into(),
            TaskSpec::Sst2 => "sst2".into(),
            TaskSpec::ZeroShot { group: true, .. } => "zeroshot".into(),
            TaskSpec::ZeroShot { tasks, .. } => {
                tasks.iter().map(|t| t.name()).collect::<Vec<_>>().join(",")
            }
            TaskSpec::Jsonl(p) => jsonl::task_name(p),
        }
    }
}

pub const KNOWN: &str = "wikitext2, mmlu, mmlu_<subject>, mmlu_{stem,humanities,social_sciences,other}, gsm8k, ifeval, sst2, zeroshot (arc_easy, arc_challenge, hellaswag, piqa, winogrande, boolq, openbookqa, lambada_openai)";

/// Parse `--task a,b,…`. MMLU names (`mmlu`, `mmlu_<category>`, `mmlu_<subject>`) merge into
/// one MMLU run over the union of their subjects.
pub fn parse_tasks(list: &str) -> Result<Vec<TaskSpec>> {
    let mut out: Vec<TaskSpec> = Vec::new();
    let mut mmlu: Vec<&'static str> = Vec::new();
    let mut mmlu_at: Option<usize> = None;
    for raw in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let lower = raw.to_ascii_lowercase();
        let spec = match lower.as_str() {
            "wikitext2" | "wikitext" | "wikitext-2" => Some(TaskSpec::Wikitext2),
            "gsm8k" | "gsm8k_cot" => Some(TaskSpec::Gsm8k),
            "ifeval" => Some(TaskSpec::Ifeval),
            "sst2" | "sst-2" | "glue_sst2" => Some(TaskSpec::Sst2),
            _ => None,
        };
        if let Some(s) = spec {
            if !out.contains(&s) {
                out.push(s);
            }
            continue;
        }
        if lower == "zeroshot" {
            // The suite replaces any of its tasks named on their own.
            out.retain(|s| !matches!(s, TaskSpec::ZeroShot { .. }));
            out.push(TaskSpec::ZeroShot {
                tasks: zeroshot::Task::ALL.to_vec(),
                group: true,
            });
            continue;
        }
        if let Some(t) = zeroshot::Task::from_name(&lower) {
            let known = out.iter().any(|s| match s {
                TaskSpec::ZeroShot { tasks, .. } => tasks.contains(&t),
                _ => false,
            });
            if !known {
                out.push(TaskSpec::ZeroShot {
                    tasks: vec![t],
                    group: false,
                });
            }
            continue;
        }
        if lower == "mmlu" || lower.starts_with("mmlu_") {
            let subs = mmlu::select(&lower).ok_or_else(|| Error::UnknownTask {
                name: raw.into(),
                known: KNOWN.into(),
            })?;
            for s in subs {
                if !mmlu.contains(&s) {
                    mmlu.push(s);
                }
            }
            if mmlu_at.is_none() {
                mmlu_at = Some(out.len());
                out.push(TaskSpec::Mmlu { subjects: vec![] });
            }
            continue;
        }
        let p = PathBuf::from(raw);
        if raw.ends_with(".jsonl") || p.is_file() {
            out.push(TaskSpec::Jsonl(p));
            continue;
        }
        return Err(Error::UnknownTask {
            name: raw.into(),
            known: KNOWN.into(),
        });
    }
    if let Some(i) = mmlu_at {
        // Keep the canonical subject order.
        let subjects = mmlu::SUBJECTS
            .iter()
            .map(|(s, _)| *s)
            .filter(|s| mmlu.contains(s))
            .collect();
        out[i] = TaskSpec::Mmlu { subjects };
    }
    if out.is_empty() {
        return Err(Error::Msg(format!("no task given (known: {KNOWN})")));
    }
    Ok(out)
}

/// Causal-LM wrapper with the options' batch and length settings.
pub(crate) fn causal<'a>(
    model: &'a Model,
    task: &str,
    opts: &'a EvalOptions,
    default_max: Option<usize>,
) -> Result<Lm<'a>> {
    let llama = match &model.arch {
        Arch::Llama(l) => l,
        Arch::Bert(_) => {
            return Err(Error::unsupported(
                task,
                format!(
                    "needs a causal LM, but {} is an encoder (bert)",
                    model.source.name
                ),
            ))
        }
        Arch::Gemma3(_) => {
            return Err(Error::unsupported(
                task,
                format!(
                    "does not run gemma3 models yet ({}); it needs a llama-family causal LM",
                    model.source.name
                ),
            ))
        }
    };
    let ctx = llama.cfg.max_position_embeddings;
    let max_length = opts
        .max_length
        .unwrap_or_else(|| default_max.unwrap_or(ctx).min(ctx));
    if max_length > ctx {
        return Err(Error::unsupported(
            task,
            format!("--max-length {max_length} exceeds the model's context of {ctx}"),
        ));
    }
    let mut lm = Lm::new(
        llama,
        &model.tokenizer,
        opts.batch_size,
        max_length,
        opts.progress,
    );
    lm.gen_batch = opts.gen_batch_size.max(1);
    lm.cache = opts.cache.as_deref();
    Ok(lm)
}

pub(crate) fn limit<T>(mut v: Vec<T>, limit: Option<usize>) -> Vec<T> {
    if let Some(n) = limit {
        v.truncate(n);
    }
    v
}

/// Run one task on a loaded model.
pub fn run_task(model: &Model, spec: &TaskSpec, opts: &EvalOptions) -> Result<TaskOutput> {
    let t0 = std::time::Instant::now();
    let mut out = match spec {
        TaskSpec::Wikitext2 => wikitext::run(&causal(model, "wikitext2", opts, Some(2048))?, opts)?,
        TaskSpec::Mmlu { subjects } => {
            mmlu::run(&causal(model, "mmlu", opts, None)?, subjects, opts)?
        }
        TaskSpec::Gsm8k => gsm8k::run(&causal(model, "gsm8k", opts, None)?, opts)?,
        TaskSpec::Ifeval => ifeval::run(&causal(model, "ifeval", opts, None)?, opts)?,
        TaskSpec::Sst2 => match &model.arch {
            Arch::Bert(b) => sst2::run_classifier(b, &model.tokenizer, opts)?,
            Arch::Llama(_) | Arch::Gemma3(_) => {
                sst2::run_prompted(&causal(model, "sst2", opts, None)?, opts)?
            }
        },
        TaskSpec::ZeroShot { tasks, group } => zeroshot::run(
            &causal(model, &spec.name(), opts, None)?,
            tasks,
            *group,
            opts,
        )?,
        TaskSpec::Jsonl(p) => jsonl::run(&causal(model, &spec.name(), opts, None)?, p, opts)?,
    };
    out.seconds = t0.elapsed().as_secs_f64();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_lists() {
        let t = parse_tasks("wikitext2, mmlu_anatomy,gsm8k,mmlu_abstract_algebra").unwrap();
        assert_eq!(t.len(), 3);
        assert_eq!(
            t[1],
            TaskSpec::Mmlu {
                subjects: vec!["abstract_algebra", "anatomy"]
            }
        );
        match &parse_tasks("mmlu").unwrap()[0] {
            TaskSpec::Mmlu { subjects } => assert_eq!(subjects.len(), 57),
            _ => panic!(),
        }
        match &parse_tasks("mmlu_stem").unwrap()[0] {
            TaskSpec::Mmlu { subjects } => assert_eq!(subjects.len(), 19),
            _ => panic!(),
        }
        assert_eq!(
            parse_tasks("x/y.jsonl").unwrap(),
            vec![TaskSpec::Jsonl("x/y.jsonl".into())]
        );
        let e = parse_tasks("nope").unwrap_err().to_string();
        assert!(e.contains("unknown task 'nope'"), "{e}");
        assert!(parse_tasks("mmlu_nope").is_err());
        assert!(parse_tasks(" , ").is_err());
        let z = parse_tasks("piqa,zeroshot,arc_easy,LAMBADA").unwrap();
        assert_eq!(z.len(), 1, "{z:?}");
        assert_eq!(z[0].name(), "zeroshot");
        let z = parse_tasks("boolq,winogrande,boolq").unwrap();
        assert_eq!(z.len(), 2);
        assert_eq!(z[1].name(), "winogrande");
    }
}
