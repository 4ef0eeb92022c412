//! GLUE SST-2 (validation = `glue/SST-2/dev.tsv`). Two ways, chosen by the model:
//! - a BERT encoder with a classification head: accuracy of argmax over its logits
//!   ([CLS] pooled → classifier; label 0 = negative, 1 = positive);
//! - a causal LM: lm-eval's glue/sst2 prompt "{sentence}\nQuestion: Is this sentence positive
//!   or negative?\nAnswer:" with choices " negative"/" positive", K shots drawn once (seeded)
//!   from the train split and shared by every document (so their KV cache is shared too).

use crate::data;
use crate::lm::{progress_bar, Lm};
use crate::metrics::{mean, stderr};
use crate::{Error, EvalOptions, Metric, Result, TaskOutput, TaskResult};
use candle_core::{Device, Tensor};
use models::tokenizer::Tokenizer;
use models::Encoder;
use rand::seq::index::sample;
use rand::SeedableRng;
use serde_json::json;
use std::path::Path;

pub const LABELS: [&str; 2] = ["negative", "positive"];

#[derive(Debug, Clone, PartialEq)]
pub struct Doc {
    pub sentence: String,
    pub label: usize,
}

pub fn load(path: &Path) -> Result<Vec<Doc>> {
    let (header, rows) = data::read_tsv(path)?;
    let si = header
        .iter()
        .position(|h| h == "sentence")
        .ok_or_else(|| Error::parse(path, 1, "no 'sentence' column"))?;
    let li = header
        .iter()
        .position(|h| h == "label")
        .ok_or_else(|| Error::parse(path, 1, "no 'label' column"))?;
    rows.into_iter()
        .map(|(line, r)| {
            let sentence = r
                .get(si)
                .ok_or_else(|| Error::parse(path, line, "missing sentence column"))?
                .clone();
            let label = match r.get(li).map(|s| s.trim()) {
                Some("0") => 0,
                Some("1") => 1,
                other => {
                    return Err(Error::parse(
                        path,
                        line,
                        format!("label must be 0 or 1, found {other:?}"),
                    ))
                }
            };
            Ok(Doc { sentence, label })
        })
        .collect()
}

pub fn doc_to_text(sentence: &str) -> String {
    format!("{sentence}\nQuestion: Is this sentence positive or negative?\nAnswer:")
}

pub fn context(shots: &[Doc], sentence: &str) -> String {
    let mut s = String::new();
    for d in shots {
        s.push_str(&doc_to_text(&d.sentence));
        s.push(' ');
        s.push_str(LABELS[d.label]);
        s.push_str("\n\n");
    }
    s.push_str(&doc_to_text(sentence));
    s
}

/// `k` distinct training examples drawn with a seeded RNG.
pub fn draw_shots(train: &[Doc], k: usize, seed: u64) -> Vec<Doc> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    sample(&mut rng, train.len(), k.min(train.len()))
        .into_iter()
        .map(|i| train[i].clone())
        .collect()
}

fn dev(opts: &EvalOptions) -> Result<(std::path::PathBuf, Vec<Doc>, usize)> {
    let path = opts.data_dir.join("glue").join("SST-2").join("dev.tsv");
    let all = load(&path)?;
    let n = all.len();
    Ok((path, super::limit(all, opts.limit), n))
}

fn output(
    acc: Vec<f64>,
    n: usize,
    k: Option<usize>,
    config: serde_json::Value,
    samples: Vec<serde_json::Value>,
) -> TaskOutput {
    let mut r = TaskResult::new("sst2", "sst2");
    r.metrics.push(Metric::new("acc", mean(&acc), stderr(&acc)));
    r.n_shot = k;
    r.n_samples = Some((n, acc.len()));
    TaskOutput {
        task: "sst2".into(),
        results: vec![r],
        seconds: 0.0,
        config,
        samples,
    }
}

pub fn run_prompted(lm: &Lm, opts: &EvalOptions) -> Result<TaskOutput> {
    let (path, docs, n) = dev(opts)?;
    let k = opts.shots.unwrap_or(0);
    let shots = if k > 0 {
        draw_shots(
            &load(&opts.data_dir.join("glue").join("SST-2").join("train.tsv"))?,
            k,
            opts.seed,
        )
    } else {
        vec![]
    };
    let requests: Vec<(String, Vec<String>)> = docs
        .iter()
        .map(|d| {
            (
                context(&shots, &d.sentence),
                LABELS.iter().map(|l| format!(" {l}")).collect(),
            )
        })
        .collect();
    let scores = lm.loglikelihood_choices(&requests, "sst2")?;
    let mut acc = Vec::new();
    let mut samples = Vec::new();
    for (i, d) in docs.iter().enumerate() {
        let (a, b) = (scores[i][0].logprob, scores[i][1].logprob);
        let pred = if b > a { 1 } else { 0 };
        acc.push((pred == d.label) as u8 as f64);
        if opts.log_samples {
            samples.push(json!({"doc": i, "context": requests[i].0, "loglikelihoods": [a, b], "pred": pred, "gold": d.label}));
        }
    }
    let cfg = json!({"file": path, "mode": "k-shot prompting", "num_fewshot": k, "seed": opts.seed,
                     "choices": [" negative", " positive"], "shots": shots.iter().map(|s| &s.sentence).collect::<Vec<_>>(),
                     "max_length": lm.max_length, "batch_size": lm.batch});
    Ok(output(acc, n, Some(k), cfg, samples))
}

pub fn run_classifier(
    bert: &dyn Encoder,
    tok: &Tokenizer,
    opts: &EvalOptions,
) -> Result<TaskOutput> {
    let Some(labels) = bert.num_labels() else {
        return Err(Error::unsupported(
            "sst2",
            "this encoder has no classification head (classifier.weight); fine-tune it on SST-2 first, or evaluate a causal LM (k-shot prompting)",
        ));
    };
    if labels != 2 {
        return Err(Error::unsupported(
            "sst2",
            format!("the classification head has {labels} labels; SST-2 needs 2"),
        ));
    }
    let (path, docs, n) = dev(opts)?;
    let maxp = bert.max_positions();
    let pb = progress_bar(docs.len() as u64, "sst2", opts.progress);
    let mut acc = Vec::new();
    let mut samples = Vec::new();
    for (ci, chunk) in docs.chunks(opts.batch_size.max(1)).enumerate() {
        let mut enc = Vec::new();
        for d in chunk {
            let mut ids = tok.encode(&d.sentence, true)?;
            ids.truncate(maxp);
            enc.push(ids);
        }
        let t = enc.iter().map(|e| e.len()).max().unwrap_or(1).max(1);
        let b = enc.len();
        let mut ids = vec![0u32; b * t];
        let mut mask = vec![0u32; b * t];
        for (r, e) in enc.iter().enumerate() {
            ids[r * t..r * t + e.len()].copy_from_slice(e);
            mask[r * t..r * t + e.len()].iter_mut().for_each(|m| *m = 1);
        }
        let ids = Tensor::from_vec(ids, (b, t), &Device::Cpu)?;
        let mask = Tensor::from_vec(mask, (b, t), &Device::Cpu)?;
        let h = bert.forward(&ids, None, Some(&mask))?;
        let logits = bert.classify(&bert.pool(&h)?)?.to_vec2::<f32>()?;
        for (j, l) in logits.iter().enumerate() {
            let pred = if l[1] > l[0] { 1 } else { 0 };
            let d = &chunk[j];
            acc.push((pred == d.label) as u8 as f64);
            if opts.log_samples {
                samples.push(json!({"doc": ci * opts.batch_size.max(1) + j, "sentence": d.sentence, "logits": l, "pred": pred, "gold": d.label}));
            }
        }
        if let Some(pb) = &pb {
            pb.inc(chunk.len() as u64);
        }
    }
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    let cfg = json!({"file": path, "mode": "classifier", "batch_size": opts.batch_size});
    Ok(output(acc, n, None, cfg, samples))
}
