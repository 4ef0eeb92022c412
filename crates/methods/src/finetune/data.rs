//! Training data for the fine-tuning engine: sentence classification (GLUE SST-2 TSV, or JSONL
//! with `sentence`/`text` and `label`) and causal-LM text (plain text or JSONL with `text`),
//! tokenized once, with a batch order that is a pure function of (seed, epoch) so that a resumed
//! run sees exactly the batches the interrupted one would have.

use super::{Error, Result};
use candle_core::{Device, Tensor};
use models::tokenizer::Tokenizer;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub enum Example {
    Cls { ids: Vec<u32>, label: u32 },
    Lm { ids: Vec<u32> },
}

#[derive(Debug)]
pub struct Dataset {
    pub train: Vec<Example>,
    pub eval: Vec<Example>,
    pub train_path: PathBuf,
    pub eval_path: Option<PathBuf>,
    pub num_labels: usize,
}

/// Where the data is and how much of it to use.
#[derive(Debug, Clone, Copy)]
pub struct Spec<'a> {
    pub data: &'a Path,
    pub eval: Option<&'a Path>,
    /// Token cap per example (classification) or block length (lm).
    pub max_len: usize,
    pub limit: Option<usize>,
    pub eval_limit: Option<usize>,
}

/// A padded batch ready for the model.
pub struct Batch {
    pub ids: Tensor,
    /// [b, t] 1 = token, 0 = padding (classification only).
    pub mask: Option<Tensor>,
    /// Class labels [b] (classification only), or the original ids of the masked tokens (MLM).
    pub labels: Option<Tensor>,
    /// Masked-LM: positions (into the flattened [b·t] ids) whose token is to be predicted.
    pub masked: Option<Tensor>,
    pub rows: usize,
    pub tokens: usize,
}

fn parse_err(path: &Path, line: usize, msg: impl std::fmt::Display) -> Error {
    Error::Msg(format!("{}:{line}: {msg}", path.display()))
}

fn is_jsonl(p: &Path) -> bool {
    matches!(
        p.extension().and_then(|e| e.to_str()),
        Some("jsonl") | Some("json")
    )
}

/// (sentence, label, line) rows from a TSV with `sentence` and `label` columns or a JSONL file.
fn read_labelled(path: &Path) -> Result<Vec<(String, u32, usize)>> {
    if !path.exists() {
        return Err(Error::option("data", format!(
            "{}: not found; pass `data` with a TSV (sentence<TAB>label) or JSONL file, or a GLUE task folder holding train.tsv and dev.tsv",
            path.display()
        )));
    }
    let mut out = Vec::new();
    if is_jsonl(path) {
        for (line, v) in ::data::read_jsonl(path)? {
            let text = v
                .get("sentence")
                .or_else(|| v.get("text"))
                .and_then(|s| s.as_str())
                .ok_or_else(|| {
                    parse_err(path, line, "missing string field \"sentence\" or \"text\"")
                })?;
            let label = v.get("label").and_then(|l| l.as_u64()).ok_or_else(|| {
                parse_err(path, line, "missing non-negative integer field \"label\"")
            })?;
            out.push((text.to_string(), binary_label(path, line, label)?, line));
        }
    } else {
        let (header, rows) = ::data::read_tsv(path)?;
        let col = |name: &str| {
            header.iter().position(|h| h.trim() == name).ok_or_else(|| {
                parse_err(
                    path,
                    1,
                    format!("no '{name}' column in the header {header:?}"),
                )
            })
        };
        let (si, li) = (col("sentence")?, col("label")?);
        for (line, r) in rows {
            let s = r
                .get(si)
                .ok_or_else(|| parse_err(path, line, "missing sentence column"))?;
            let l = r
                .get(li)
                .ok_or_else(|| parse_err(path, line, "missing label column"))?;
            let label: u64 = l.trim().parse().map_err(|_| {
                parse_err(
                    path,
                    line,
                    format!("label must be a non-negative integer, found {l:?}"),
                )
            })?;
            out.push((s.clone(), binary_label(path, line, label)?, line));
        }
    }
    if out.is_empty() {
        return Err(parse_err(path, 1, "no examples"));
    }
    Ok(out)
}

/// SST-2 is binary: any other label is a data error, not a reason to widen the classifier.
fn binary_label(path: &Path, line: usize, label: u64) -> Result<u32> {
    match label {
        0 | 1 => Ok(label as u32),
        _ => Err(parse_err(
            path,
            line,
            format!("label {label} is not 0 (negative) or 1 (positive); SST-2 labels are binary"),
        )),
    }
}

/// Token ids of one sentence for an encoder, cut to `max_len` keeping the final [SEP].
fn encode_cls(tok: &Tokenizer, s: &str, max_len: usize) -> Result<Vec<u32>> {
    let mut ids = tok.encode(s, true)?;
    if ids.len() > max_len && max_len >= 2 {
        let last = *ids.last().unwrap_or(&0);
        ids.truncate(max_len - 1);
        ids.push(last);
    }
    Ok(ids)
}

/// Classification data. `data` is a file, or a folder holding `train.tsv` (and `dev.tsv`, used
/// for evaluation unless `eval` names another file).
pub fn load_classification(spec: &Spec, tok: &Tokenizer) -> Result<Dataset> {
    let Spec {
        data,
        eval,
        max_len,
        limit,
        eval_limit,
    } = *spec;
    let (train_path, mut eval_path) = if data.is_dir() {
        let dev = data.join("dev.tsv");
        (data.join("train.tsv"), dev.exists().then_some(dev))
    } else {
        (data.to_path_buf(), None)
    };
    if let Some(e) = eval {
        eval_path = Some(e.to_path_buf());
    }
    let mut rows = read_labelled(&train_path)?;
    if let Some(n) = limit {
        rows.truncate(n);
    }
    // Labels were checked to be 0 or 1 when read.
    let num_labels = 2usize;
    let mut train = Vec::with_capacity(rows.len());
    for (s, label, _) in &rows {
        train.push(Example::Cls {
            ids: encode_cls(tok, s, max_len)?,
            label: *label,
        });
    }
    let mut ev = Vec::new();
    if let Some(p) = &eval_path {
        let mut rows = read_labelled(p)?;
        if let Some(n) = eval_limit {
            rows.truncate(n);
        }
        for (s, label, _) in rows {
            ev.push(Example::Cls {
                ids: encode_cls(tok, &s, max_len)?,
                label,
            });
        }
    }
    Ok(Dataset {
        train,
        eval: ev,
        train_path,
        eval_path,
        num_labels,
    })
}

/// Documents of a text file (one document; blank-line separated paragraphs are kept together)
/// or of a JSONL file (field `text`, one document a line).
fn read_docs(path: &Path) -> Result<Vec<String>> {
    if !path.exists() {
        return Err(Error::option("data", format!(
            "{}: not found; pass `data` with a .txt file or a .jsonl file of {{\"text\": ...}} lines",
            path.display()
        )));
    }
    if is_jsonl(path) {
        ::data::read_jsonl(path)?
            .into_iter()
            .map(|(line, v)| {
                v.get("text")
                    .and_then(|t| t.as_str())
                    .map(String::from)
                    .ok_or_else(|| parse_err(path, line, "missing string field \"text\""))
            })
            .collect()
    } else {
        let t = std::fs::read_to_string(path)
            .map_err(|e| Error::Msg(format!("{}: {e}", path.display())))?;
        if t.trim().is_empty() {
            return Err(parse_err(path, 1, "empty file"));
        }
        Ok(vec![t])
    }
}

/// Concatenate documents (EOS between them, as HF's `group_texts`) into blocks of `block` ids.
fn blocks(tok: &Tokenizer, docs: &[String], block: usize) -> Result<Vec<Example>> {
    let eos = tok.eos_token.as_deref().and_then(|e| tok.token_to_id(e));
    let mut all = Vec::new();
    for d in docs {
        all.extend(tok.encode(d, false)?);
        if let Some(e) = eos {
            all.push(e);
        }
    }
    Ok(all
        .chunks_exact(block)
        .map(|c| Example::Lm { ids: c.to_vec() })
        .collect())
}

/// Causal-LM data in blocks of `max_len` tokens. Without an eval file, the last 5% of the
/// blocks (at least one) are held out for evaluation.
pub fn load_lm(spec: &Spec, tok: &Tokenizer) -> Result<Dataset> {
    let Spec {
        data,
        eval,
        max_len,
        limit,
        eval_limit,
    } = *spec;
    if max_len < 2 {
        return Err(Error::option(
            "max_len",
            "`max_len` must be at least 2 for language modelling",
        ));
    }
    let mut train = blocks(tok, &read_docs(data)?, max_len)?;
    let mut ev = match eval {
        Some(e) => blocks(tok, &read_docs(e)?, max_len)?,
        None => {
            let k = (train.len() / 20).max(1);
            if train.len() <= k {
                return Err(Error::option("max_len", format!(
                    "{}: too little text for one training block of {max_len} tokens plus a held-out block; lower `max_len` or pass more text",
                    data.display()
                )));
            }
            train.split_off(train.len() - k)
        }
    };
    if train.is_empty() {
        return Err(Error::option(
            "max_len",
            format!(
                "{}: shorter than one block of {max_len} tokens; lower `max_len`",
                data.display()
            ),
        ));
    }
    if let Some(n) = limit {
        train.truncate(n);
    }
    if let Some(n) = eval_limit {
        ev.truncate(n);
    }
    Ok(Dataset {
        train,
        eval: ev,
        train_path: data.to_path_buf(),
        eval_path: eval.map(Path::to_path_buf),
        num_labels: 0,
    })
}

/// The training order of epoch `epoch`: a seeded shuffle, the same on every run and resume.
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(
        seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (epoch as u64 + 1),
    );
    idx.shuffle(&mut rng);
    idx
}

/// The epoch order with batches of similar length (Hugging Face's `group_by_length`): the seeded
/// shuffle of [`epoch_order`] is cut into mega-batches of up to 50 batches, and each is sorted by
/// length, longest first, so a batch pads to little more than its own examples. Sentence data
/// wastes about two thirds of every padded batch without it. Only the order changes, so it stays a
/// pure function of (seed, epoch) and the last, possibly short, batch stays last.
pub fn grouped_epoch_order(lens: &[usize], batch: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut idx = epoch_order(lens.len(), seed, epoch);
    let batch = batch.max(1);
    let mult = (lens.len() / (batch * 4)).clamp(1, 50);
    for mega in idx.chunks_mut(mult * batch) {
        mega.sort_by_key(|&i| std::cmp::Reverse(lens[i]));
    }
    idx
}

impl Example {
    pub fn n_tokens(&self) -> usize {
        match self {
            Example::Cls { ids, .. } | Example::Lm { ids } => ids.len(),
        }
    }
}

/// Pad a set of examples into one batch (padding id 0, masked out).
pub fn make_batch(ex: &[&Example]) -> Result<Batch> {
    let b = ex.len();
    let t = ex.iter().map(|e| e.n_tokens()).max().unwrap_or(1).max(1);
    let mut ids = vec![0u32; b * t];
    let mut mask = vec![0u32; b * t];
    let mut labels = Vec::new();
    let mut tokens = 0;
    for (r, e) in ex.iter().enumerate() {
        let seq = match e {
            Example::Cls { ids, label } => {
                labels.push(*label);
                ids
            }
            Example::Lm { ids } => ids,
        };
        ids[r * t..r * t + seq.len()].copy_from_slice(seq);
        mask[r * t..r * t + seq.len()]
            .iter_mut()
            .for_each(|m| *m = 1);
        tokens += seq.len();
    }
    let dev = Device::Cpu;
    let cls = !labels.is_empty();
    Ok(Batch {
        ids: Tensor::from_vec(ids, (b, t), &dev)?,
        mask: if cls {
            Some(Tensor::from_vec(mask, (b, t), &dev)?)
        } else {
            None
        },
        labels: if cls {
            Some(Tensor::from_vec(labels, b, &dev)?)
        } else {
            None
        },
        masked: None,
        rows: b,
        tokens,
    })
}

/// Masked-LM text: blocks of `max_len − 2` token ids, each wrapped as `[CLS] … [SEP]`; without
/// an eval file the last 5% of the blocks (at least one) are held out.
pub fn load_mlm(spec: &Spec, tok: &Tokenizer) -> Result<Dataset> {
    let (cls, sep) = match (tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")) {
        (Some(c), Some(s)) => (c, s),
        _ => {
            return Err(Error::option(
                "task",
                "`task` mlm needs a BERT tokenizer with [CLS], [SEP] and [MASK] tokens",
            ))
        }
    };
    if spec.max_len < 3 {
        return Err(Error::option(
            "max_len",
            "`max_len` must be at least 3 for masked-LM blocks ([CLS] + text + [SEP])",
        ));
    }
    let inner = Spec {
        max_len: spec.max_len - 2,
        ..*spec
    };
    let mut d = load_lm(&inner, tok)?;
    let wrap = |e: &mut Example| {
        if let Example::Lm { ids } = e {
            ids.insert(0, cls);
            ids.push(sep);
        }
    };
    d.train.iter_mut().for_each(wrap);
    d.eval.iter_mut().for_each(wrap);
    Ok(d)
}

/// The token ids masking needs.
#[derive(Debug, Clone)]
pub struct MlmTokens {
    pub mask: u32,
    pub vocab: u32,
    /// Never chosen for prediction ([CLS], [SEP], [PAD]).
    pub special: Vec<u32>,
}

impl MlmTokens {
    pub fn of(tok: &Tokenizer, vocab: usize) -> Result<Self> {
        let mask = tok.token_to_id("[MASK]").ok_or_else(|| {
            Error::option(
                "task",
                "`task` mlm needs a tokenizer with a [MASK] token (a BERT tokenizer)",
            )
        })?;
        let special = ["[CLS]", "[SEP]", "[PAD]"]
            .iter()
            .filter_map(|t| tok.token_to_id(t))
            .collect();
        Ok(MlmTokens {
            mask,
            vocab: vocab as u32,
            special,
        })
    }
}

/// Share of tokens chosen for prediction (BERT: 15%).
pub const MLM_PROBABILITY: f64 = 0.15;

/// BERT's masking of `ids` in place: each non-special token is chosen with probability 0.15;
/// a chosen token becomes [MASK] with probability 0.8, a uniformly random token with 0.1, and
/// stays with 0.1. Returns the chosen positions with their original ids. A sequence with no
/// token chosen gets its first eligible one, so every batch has something to predict.
pub fn mask_tokens(ids: &mut [u32], t: &MlmTokens, rng: &mut impl rand::Rng) -> Vec<(usize, u32)> {
    let mut out = Vec::new();
    for (i, id) in ids.iter_mut().enumerate() {
        if t.special.contains(id) || rng.random::<f64>() >= MLM_PROBABILITY {
            continue;
        }
        out.push((i, *id));
        let r = rng.random::<f64>();
        if r < 0.8 {
            *id = t.mask;
        } else if r < 0.9 {
            *id = rng.random_range(0..t.vocab.max(1));
        }
    }
    if out.is_empty() {
        if let Some(i) = ids.iter().position(|id| !t.special.contains(id)) {
            out.push((i, ids[i]));
            ids[i] = t.mask;
        }
    }
    out
}

/// Mask a batch of MLM blocks, seeded by (seed, step): a resumed run masks identically.
pub fn mask_batch(b: &mut Batch, t: &MlmTokens, seed: u64, step: u64) -> Result<()> {
    let (rows, len) = b.ids.dims2()?;
    let mut ids = b.ids.flatten_all()?.to_vec1::<u32>()?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(
        seed.wrapping_mul(0xD1B5_4A32_D192_ED03) ^ step.wrapping_add(0x5EED),
    );
    let mut pos = Vec::new();
    let mut gold = Vec::new();
    for r in 0..rows {
        for (i, id) in mask_tokens(&mut ids[r * len..(r + 1) * len], t, &mut rng) {
            pos.push((r * len + i) as u32);
            gold.push(id);
        }
    }
    if pos.is_empty() {
        return Err(Error::Msg(
            "a masked-LM batch has no maskable token (only special tokens)".into(),
        ));
    }
    let dev = Device::Cpu;
    b.ids = Tensor::from_vec(ids, (rows, len), &dev)?;
    b.masked = Some(Tensor::from_vec(pos.clone(), pos.len(), &dev)?);
    b.labels = Some(Tensor::from_vec(gold, pos.len(), &dev)?);
    Ok(())
}
