//! WikiText-2 perplexity: the test split (`wikitext2/test.txt`, the tokenised WikiText-2 text as
//! one document) is tokenised once and scored with rolling windows (`lm::rolling_rows`: first
//! token predicted from the BOS/EOS prefix token, each window at most `max_length` tokens,
//! `stride` new tokens per later window). Reports token perplexity and lm-eval's
//! `loglikelihood_rolling` metrics: word_perplexity = exp(−Σll / words), byte_perplexity =
//! exp(−Σll / bytes), bits_per_byte = −Σll / bytes / ln 2 (words = pieces of `re.split(r"\s+")`).
//! With `--limit N` only the first N windows are scored and the counts cover their text.

use crate::data;
use crate::lm::{rolling_rows, Lm, Row};
use crate::metrics::Perplexity;
use crate::{Error, EvalOptions, Metric, PplProtocol, Result, TaskOutput, TaskResult};
use serde_json::json;

/// The HF-style protocol: complete windows of `window` tokens from the start of the stream,
/// each scored alone with its first token as context only; `limit` = first N windows.
pub fn disjoint_rows(tokens: &[u32], window: usize, limit: Option<usize>) -> Vec<Row> {
    let mut rows: Vec<Row> = tokens
        .chunks_exact(window.max(2))
        .map(|w| Row {
            input: w[..w.len() - 1].to_vec(),
            targets: w[1..].to_vec(),
        })
        .collect();
    if let Some(n) = limit {
        rows.truncate(n);
    }
    rows
}

/// Perplexity of `text` (all of it, or its first `limit` windows).
pub fn perplexity(
    lm: &Lm,
    text: &str,
    stride: usize,
    limit: Option<usize>,
) -> Result<(Perplexity, usize, usize)> {
    let tokens = lm.encode(text)?;
    if tokens.is_empty() {
        return Err(Error::Msg("wikitext2: the text is empty".into()));
    }
    let rows = rolling_rows(&tokens, lm.prefix_token()?, lm.max_length, stride);
    let n_windows = rows.len();
    let rows = super::limit(rows, limit);
    let scored: usize = rows.iter().map(|r| r.targets.len()).sum();
    let scores = lm.score_rows(&rows, "wikitext2")?;
    let ll: f64 = scores.iter().map(|s| s.logprob).sum();
    let covered = if scored == tokens.len() {
        text.to_string()
    } else {
        lm.tok.decode(&tokens[..scored], false)?
    };
    Ok((Perplexity::new(ll, scored, &covered), n_windows, rows.len()))
}

pub fn run(lm: &Lm, opts: &EvalOptions) -> Result<TaskOutput> {
    let path = opts.data_dir.join("wikitext2").join("test.txt");
    let text = data::read_text(&path)?;
    let stride = opts.stride.unwrap_or(lm.max_length);
    if stride == 0 || stride > lm.max_length {
        return Err(Error::unsupported_option(
            "wikitext2",
            "stride",
            format!("`stride` must be in 1..={} (the max length)", lm.max_length),
        ));
    }
    if opts.ppl_protocol == PplProtocol::Disjoint {
        return run_disjoint(lm, &text, &path, opts);
    }
    let (p, n_windows, used) = perplexity(lm, &text, stride, opts.limit)?;
    let mut r = TaskResult::new("wikitext2", "wikitext2");
    r.metrics
        .push(Metric::new("word_perplexity", p.word_perplexity, None).lower_better());
    r.metrics
        .push(Metric::new("byte_perplexity", p.byte_perplexity, None).lower_better());
    r.metrics
        .push(Metric::new("bits_per_byte", p.bits_per_byte, None).lower_better());
    r.metrics
        .push(Metric::new("token_perplexity", p.token_perplexity, None).lower_better());
    r.n_shot = Some(0);
    r.n_samples = Some((n_windows, used));
    Ok(TaskOutput {
        task: "wikitext2".into(),
        results: vec![r],
        seconds: 0.0,
        config: json!({
            "file": path, "protocol": "rolling", "max_length": lm.max_length, "stride": stride, "windows": n_windows,
            "windows_scored": used, "batch_size": lm.batch, "prefix_token": lm.prefix_token()?,
            "loglikelihood": p.loglikelihood, "tokens": p.tokens, "words": p.words, "bytes": p.bytes,
        }),
        samples: vec![],
    })
}

/// Token perplexity under [`PplProtocol::Disjoint`] and what it was computed from.
#[derive(Debug, Clone, Copy)]
pub struct DisjointPerplexity {
    pub ppl: f64,
    /// Complete windows in the text.
    pub windows: usize,
    /// Windows scored (the first ones; all unless limited).
    pub windows_scored: usize,
    pub loglikelihood: f64,
    /// Tokens predicted: `window − 1` per scored window.
    pub tokens_predicted: usize,
}

/// The disjoint protocol on `text`: windows of `lm.max_length` tokens, the first `limit` of
/// them (all when None), every token but each window's first predicted from its left context
/// inside the window; ppl = exp(−Σll / tokens predicted). `label` names the progress bar and
/// the task in errors.
pub fn disjoint_perplexity(
    lm: &Lm,
    text: &str,
    limit: Option<usize>,
    label: &str,
) -> Result<DisjointPerplexity> {
    let tokens = lm.encode(text)?;
    let window = lm.max_length;
    let windows = tokens.len() / window;
    if windows == 0 {
        return Err(Error::unsupported(
            label,
            format!(
                "the disjoint protocol needs one window of {window} tokens; the text has {}",
                tokens.len()
            ),
        ));
    }
    let rows = disjoint_rows(&tokens, window, limit);
    let scores = lm.score_rows(&rows, label)?;
    let loglikelihood: f64 = scores.iter().map(|s| s.logprob).sum();
    let tokens_predicted: usize = rows.iter().map(|r| r.targets.len()).sum();
    Ok(DisjointPerplexity {
        ppl: (-loglikelihood / tokens_predicted as f64).exp(),
        windows,
        windows_scored: rows.len(),
        loglikelihood,
        tokens_predicted,
    })
}

/// [`disjoint_perplexity`] as the wikitext2 task (the number `quantize --ppl-windows` and the
/// GPTQ papers report). Word and byte perplexities are not defined for it: each window's first
/// token is never predicted.
fn run_disjoint(
    lm: &Lm,
    text: &str,
    path: &std::path::Path,
    opts: &EvalOptions,
) -> Result<TaskOutput> {
    let d = disjoint_perplexity(lm, text, opts.limit, "wikitext2")?;
    let mut r = TaskResult::new("wikitext2", "wikitext2");
    r.metrics
        .push(Metric::new("token_perplexity", d.ppl, None).lower_better());
    r.n_shot = Some(0);
    r.n_samples = Some((d.windows, d.windows_scored));
    Ok(TaskOutput {
        task: "wikitext2".into(),
        results: vec![r],
        seconds: 0.0,
        config: json!({
            "file": path, "protocol": "disjoint", "max_length": lm.max_length, "windows": d.windows,
            "windows_scored": d.windows_scored, "batch_size": lm.batch, "loglikelihood": d.loglikelihood,
            "tokens_predicted": d.tokens_predicted,
        }),
        samples: vec![],
    })
}
