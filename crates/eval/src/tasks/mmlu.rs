//! MMLU (Hendrycks et al.) with lm-eval's default prompt:
//! description "The following are multiple choice questions (with answers) about {subject}.\n\n",
//! then K dev-split shots (first K, "{question}\nA. …\nB. …\nC. …\nD. …\nAnswer: X" joined by
//! "\n\n"), then the test question ending "Answer:"; the answer is the highest log-likelihood
//! continuation among " A", " B", " C", " D". Per-subject accuracy; category (lm-eval's four
//! groups) and overall accuracy are averaged over documents (lm-eval's weight_by_size).

use crate::data;
use crate::lm::Lm;
use crate::metrics::{mean, stderr};
use crate::{Error, EvalOptions, Metric, Result, TaskOutput, TaskResult};
use serde_json::json;
use std::path::Path;

/// The 57 subjects with their lm-eval category.
pub const SUBJECTS: &[(&str, &str)] = &[
    ("abstract_algebra", "stem"),
    ("anatomy", "stem"),
    ("astronomy", "stem"),
    ("business_ethics", "other"),
    ("clinical_knowledge", "other"),
    ("college_biology", "stem"),
    ("college_chemistry", "stem"),
    ("college_computer_science", "stem"),
    ("college_mathematics", "stem"),
    ("college_medicine", "other"),
    ("college_physics", "stem"),
    ("computer_security", "stem"),
    ("conceptual_physics", "stem"),
    ("econometrics", "social_sciences"),
    ("electrical_engineering", "stem"),
    ("elementary_mathematics", "stem"),
    ("formal_logic", "humanities"),
    ("global_facts", "other"),
    ("high_school_biology", "stem"),
    ("high_school_chemistry", "stem"),
    ("high_school_computer_science", "stem"),
    ("high_school_european_history", "humanities"),
    ("high_school_geography", "social_sciences"),
    ("high_school_government_and_politics", "social_sciences"),
    ("high_school_macroeconomics", "social_sciences"),
    ("high_school_mathematics", "stem"),
    ("high_school_microeconomics", "social_sciences"),
    ("high_school_physics", "stem"),
    ("high_school_psychology", "social_sciences"),
    ("high_school_statistics", "stem"),
    ("high_school_us_history", "humanities"),
    ("high_school_world_history", "humanities"),
    ("human_aging", "other"),
    ("human_sexuality", "social_sciences"),
    ("international_law", "humanities"),
    ("jurisprudence", "humanities"),
    ("logical_fallacies", "humanities"),
    ("machine_learning", "stem"),
    ("management", "other"),
    ("marketing", "other"),
    ("medical_genetics", "other"),
    ("miscellaneous", "other"),
    ("moral_disputes", "humanities"),
    ("moral_scenarios", "humanities"),
    ("nutrition", "other"),
    ("philosophy", "humanities"),
    ("prehistory", "humanities"),
    ("professional_accounting", "other"),
    ("professional_law", "humanities"),
    ("professional_medicine", "other"),
    ("professional_psychology", "social_sciences"),
    ("public_relations", "social_sciences"),
    ("security_studies", "social_sciences"),
    ("sociology", "social_sciences"),
    ("us_foreign_policy", "social_sciences"),
    ("virology", "other"),
    ("world_religions", "humanities"),
];

pub const CATEGORIES: &[&str] = &["humanities", "social_sciences", "other", "stem"];
const LETTERS: [&str; 4] = ["A", "B", "C", "D"];
pub const MAX_SHOTS: usize = 5;

/// Subjects named by `mmlu`, `mmlu_<category>` or `mmlu_<subject>`.
pub fn select(name: &str) -> Option<Vec<&'static str>> {
    if name == "mmlu" {
        return Some(SUBJECTS.iter().map(|s| s.0).collect());
    }
    let rest = name.strip_prefix("mmlu_")?;
    if CATEGORIES.contains(&rest) {
        return Some(
            SUBJECTS
                .iter()
                .filter(|s| s.1 == rest)
                .map(|s| s.0)
                .collect(),
        );
    }
    SUBJECTS.iter().find(|s| s.0 == rest).map(|s| vec![s.0])
}

pub fn category(subject: &str) -> &'static str {
    SUBJECTS
        .iter()
        .find(|s| s.0 == subject)
        .map(|s| s.1)
        .unwrap_or("other")
}

#[derive(Debug, Clone, PartialEq)]
pub struct Doc {
    pub question: String,
    pub choices: [String; 4],
    /// 0..=3
    pub answer: usize,
}

pub fn description(subject: &str) -> String {
    format!(
        "The following are multiple choice questions (with answers) about {}.\n\n",
        subject.replace('_', " ")
    )
}

pub fn doc_to_text(d: &Doc) -> String {
    format!(
        "{}\nA. {}\nB. {}\nC. {}\nD. {}\nAnswer:",
        d.question.trim(),
        d.choices[0],
        d.choices[1],
        d.choices[2],
        d.choices[3]
    )
}

/// The full context: description, shots (each "text answer" + "\n\n") and the question.
pub fn context(subject: &str, shots: &[Doc], doc: &Doc) -> String {
    let mut s = description(subject);
    for d in shots {
        s.push_str(&doc_to_text(d));
        s.push(' ');
        s.push_str(LETTERS[d.answer]);
        s.push_str("\n\n");
    }
    s.push_str(&doc_to_text(doc));
    s
}

/// `<dir>/mmlu/<split>/<subject>_<split>.csv` (no header; question, A, B, C, D, answer letter).
pub fn load(data_dir: &Path, subject: &str, split: &str) -> Result<Vec<Doc>> {
    let path = data_dir
        .join("mmlu")
        .join(split)
        .join(format!("{subject}_{split}.csv"));
    let text = data::read_text(&path)?;
    let mut docs = Vec::new();
    for (line, rec) in data::parse_csv(&text, &path)? {
        if rec.len() != 6 {
            return Err(Error::parse(
                &path,
                line,
                format!(
                    "expected 6 columns (question, A, B, C, D, answer), found {}",
                    rec.len()
                ),
            ));
        }
        let answer = LETTERS
            .iter()
            .position(|l| *l == rec[5].trim())
            .ok_or_else(|| {
                Error::parse(
                    &path,
                    line,
                    format!("answer must be A, B, C or D, found '{}'", rec[5]),
                )
            })?;
        docs.push(Doc {
            question: rec[0].clone(),
            choices: [
                rec[1].clone(),
                rec[2].clone(),
                rec[3].clone(),
                rec[4].clone(),
            ],
            answer,
        });
    }
    Ok(docs)
}

pub fn run(lm: &Lm, subjects: &[&'static str], opts: &EvalOptions) -> Result<TaskOutput> {
    let k = opts.shots.unwrap_or(0);
    if k > MAX_SHOTS {
        return Err(Error::unsupported_option(
            "mmlu",
            "shots",
            format!("`shots` {k}: the dev split has {MAX_SHOTS} examples per subject"),
        ));
    }
    data::require(&opts.data_dir.join("mmlu"))?;
    // (subject, docs, n in split)
    let mut per: Vec<(&str, Vec<Doc>, usize)> = Vec::new();
    let mut requests: Vec<(String, Vec<String>)> = Vec::new();
    for &subject in subjects {
        let shots = if k > 0 {
            load(&opts.data_dir, subject, "dev")?
        } else {
            vec![]
        };
        if shots.len() < k {
            return Err(Error::option(
                "shots",
                format!(
                    "mmlu/dev/{subject}_dev.csv has {} examples, fewer than `shots` {k}",
                    shots.len()
                ),
            ));
        }
        let all = load(&opts.data_dir, subject, "test")?;
        let n = all.len();
        let docs = super::limit(all, opts.limit);
        for d in &docs {
            requests.push((
                context(subject, &shots[..k], d),
                LETTERS.iter().map(|l| format!(" {l}")).collect(),
            ));
        }
        per.push((subject, docs, n));
    }
    let scores = lm.loglikelihood_choices(&requests, "mmlu")?;

    let mut results = Vec::new();
    let mut samples = Vec::new();
    let mut all_correct: Vec<f64> = Vec::new();
    let mut by_cat: Vec<(&str, Vec<f64>, Vec<String>)> =
        CATEGORIES.iter().map(|c| (*c, vec![], vec![])).collect();
    let mut sub_results = Vec::new();
    let mut i = 0usize; // document index over all subjects
    for (subject, docs, n) in &per {
        let mut correct = Vec::with_capacity(docs.len());
        for d in docs {
            let ll: Vec<f64> = scores[i].iter().map(|s| s.logprob).collect();
            let pred = argmax_f64(&ll);
            let ok = (pred == d.answer) as u8 as f64;
            correct.push(ok);
            if opts.log_samples {
                samples.push(
                    json!({"subject": subject, "context": requests[i].0, "loglikelihoods": ll,
                                    "pred": LETTERS[pred], "gold": LETTERS[d.answer], "acc": ok}),
                );
            }
            i += 1;
        }
        let name = format!("mmlu_{subject}");
        let mut r = TaskResult::new(&name, &format!("  - {}", subject.replace('_', " ")));
        r.metrics
            .push(Metric::new("acc", mean(&correct), stderr(&correct)));
        r.n_shot = Some(k);
        r.n_samples = Some((*n, docs.len()));
        let c = category(subject);
        if let Some(e) = by_cat.iter_mut().find(|e| e.0 == c) {
            e.1.extend_from_slice(&correct);
            e.2.push(name);
        }
        all_correct.extend_from_slice(&correct);
        sub_results.push((c, r));
    }
    let mut top = TaskResult::new("mmlu", "mmlu");
    top.metrics
        .push(Metric::new("acc", mean(&all_correct), stderr(&all_correct)));
    top.n_shot = Some(k);
    results.push(top);
    let mut cat_results = Vec::new();
    for (c, v, names) in &by_cat {
        if names.is_empty() {
            continue;
        }
        let mut r = TaskResult::new(&format!("mmlu_{c}"), &format!(" - {}", c.replace('_', " ")));
        r.metrics.push(Metric::new("acc", mean(v), stderr(v)));
        r.subtasks = names.clone();
        r.n_shot = Some(k);
        cat_results.push(r);
        results[0].subtasks.push(format!("mmlu_{c}"));
    }
    // Order: overall, then each category followed by its subjects (as lm-eval prints).
    for cr in cat_results {
        let c = cr.name.trim_start_matches("mmlu_").to_string();
        results.push(cr);
        for (sc, r) in &sub_results {
            if *sc == c {
                results.push(r.clone());
            }
        }
    }
    Ok(TaskOutput {
        task: "mmlu".into(),
        results,
        seconds: 0.0,
        config: json!({
            "split": "test", "fewshot_split": "dev", "num_fewshot": k, "fewshot_sampler": "first_n",
            "subjects": subjects, "limit_per_subject": opts.limit, "choices": [" A", " B", " C", " D"],
            "max_length": lm.max_length, "batch_size": lm.batch,
        }),
        samples,
    })
}

/// Index of the largest value (first on ties, as numpy's argmax).
pub fn argmax_f64(x: &[f64]) -> usize {
    let mut b = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[b] {
            b = i;
        }
    }
    b
}
