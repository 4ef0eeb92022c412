//! The model side of every task: batched log-likelihood of token rows (right padding plus a
//! key mask, identical rows computed once, a shared token prefix computed once and its KV cache
//! cloned for every row that starts with it), lm-eval's request encoding and rolling windows,
//! and KV-cached greedy generation with text stop sequences.

use crate::cache::{gen_key, score_key, Key, RequestCache};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use indicatif::ProgressBar;
use models::generate::argmax;
use models::llama::Cache;
use models::tokenizer::Tokenizer;
use models::CausalLm;
use std::collections::HashMap;

/// Rows sharing at least this many leading tokens share one prefix forward (KV cache clone).
pub const MIN_SHARED_PREFIX: usize = 16;
/// Positions per LM-head GEMM when scoring (bounds the [positions, vocab] logits buffer).
const HEAD_CHUNK: usize = 256;

/// A causal model with its tokenizer and batching settings.
pub struct Lm<'a> {
    pub model: &'a dyn CausalLm,
    pub tok: &'a Tokenizer,
    /// Rows per forward pass of log-likelihood scoring (≥ 1).
    pub batch: usize,
    /// Generations decoded together (≥ 1); [`Lm::new`] sets it to `batch`.
    pub gen_batch: usize,
    /// Longest sequence fed to the model; longer inputs are left-truncated (as lm-eval).
    pub max_length: usize,
    pub progress: bool,
    /// Results of earlier runs of the same requests on the same model and settings.
    pub cache: Option<&'a RequestCache>,
}

/// Token ids to score: the last `targets.len()` positions of `input` predict `targets`
/// (so `input` ends one token before the last target).
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub input: Vec<u32>,
    pub targets: Vec<u32>,
}

/// Sum of target log-probabilities (natural log) and whether every target was the argmax.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Score {
    pub logprob: f64,
    pub greedy: bool,
}

/// A greedy generation request: context ids, stop strings, token budget.
#[derive(Debug, Clone)]
pub struct GenRequest {
    pub context: Vec<u32>,
    pub until: Vec<String>,
    pub max_new_tokens: usize,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct GenOutput {
    /// The continuation, cut before the first stop string.
    pub text: String,
    pub new_tokens: usize,
    /// "stop_string", "eos", "max_new_tokens" or "context_length".
    pub stopped_by: String,
}

/// Log-softmax statistics of one logits row: log-sum-exp and argmax.
pub fn log_softmax_at(logits: &[f32], target: u32) -> (f64, bool) {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    let lse = max + sum.ln();
    (
        logits[target as usize] as f64 - lse,
        argmax(logits) == target,
    )
}

fn lcp(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Earliest byte index in `text` where any non-empty stop string starts.
pub fn first_stop(text: &str, until: &[String]) -> Option<usize> {
    until
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min()
}

/// Rolling-window rows over `tokens` with lm-eval's `loglikelihood_rolling` layout: the first
/// token is predicted from `prefix_token`; every token is predicted exactly once; each window
/// feeds at most `max_length` tokens. The first window predicts `max_length` tokens, later ones
/// `stride` new tokens each with the preceding tokens as context (stride = max_length gives
/// lm-eval's disjoint windows, including its full-context last window).
pub fn rolling_rows(
    tokens: &[u32],
    prefix_token: u32,
    max_length: usize,
    stride: usize,
) -> Vec<Row> {
    assert!(max_length >= 1 && stride >= 1 && stride <= max_length);
    let mut s = Vec::with_capacity(tokens.len() + 1);
    s.push(prefix_token);
    s.extend_from_slice(tokens);
    let n = tokens.len();
    let mut rows = Vec::new();
    let mut t0 = 1usize; // targets are s[1..=n]
    while t0 <= n {
        let t1 = if t0 == 1 {
            (max_length + 1).min(n + 1)
        } else {
            (t0 + stride).min(n + 1)
        };
        let i0 = (t1 - 1).saturating_sub(max_length);
        rows.push(Row {
            input: s[i0..t1 - 1].to_vec(),
            targets: s[t0..t1].to_vec(),
        });
        t0 = t1;
    }
    rows
}

struct Unit {
    input: Vec<u32>,
    /// First position whose logits some request needs.
    need_from: usize,
    /// (row index, first position of that row's targets).
    reqs: Vec<(usize, usize)>,
}

pub fn progress_bar(len: u64, what: &str, show: bool) -> Option<ProgressBar> {
    if !show {
        return None;
    }
    let pb = ProgressBar::new(len);
    pb.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{what:<12} {{bar:30}} {{pos}}/{{len}} {{msg}} [{{elapsed_precise}} < {{eta_precise}}]"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    Some(pb)
}

impl<'a> Lm<'a> {
    pub fn new(
        model: &'a dyn CausalLm,
        tok: &'a Tokenizer,
        batch: usize,
        max_length: usize,
        progress: bool,
    ) -> Self {
        Lm {
            model,
            tok,
            batch: batch.max(1),
            gen_batch: batch.max(1),
            max_length: max_length.clamp(2, model.max_positions()),
            progress,
            cache: None,
        }
    }

    /// lm-eval's prefix token: BOS when the tokenizer has one, else EOS.
    pub fn prefix_token(&self) -> Result<u32> {
        self.tok
            .bos_id
            .or_else(|| self.tok.eos_ids.first().copied())
            .ok_or_else(|| {
                Error::Msg(
                    "the tokenizer has neither a BOS nor an EOS token to start empty contexts with"
                        .into(),
                )
            })
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.tok.encode(text, false)?)
    }

    /// lm-eval's `_encode_pair`: trailing whitespace of the context moves to the continuation;
    /// the continuation is `encode(context + continuation)` minus the context's token count.
    /// An empty context becomes the prefix token.
    pub fn encode_pair(&self, context: &str, continuation: &str) -> Result<(Vec<u32>, Vec<u32>)> {
        if context.is_empty() {
            return Ok((vec![self.prefix_token()?], self.encode(continuation)?));
        }
        let trimmed = context.trim_end();
        let (ctx, cont) = if trimmed.len() < context.len() {
            (
                trimmed.to_string(),
                format!("{}{}", &context[trimmed.len()..], continuation),
            )
        } else {
            (context.to_string(), continuation.to_string())
        };
        let whole = self.encode(&format!("{ctx}{cont}"))?;
        let ctx_enc = self.encode(&ctx)?;
        let cont_enc = whole
            .get(ctx_enc.len().min(whole.len())..)
            .unwrap_or(&[])
            .to_vec();
        Ok((ctx_enc, cont_enc))
    }

    /// The row lm-eval scores for a (context, continuation) pair: the last `max_length + 1`
    /// tokens of context + continuation, minus the final one as input.
    pub fn pair_row(&self, ctx: &[u32], cont: &[u32]) -> Row {
        let mut full: Vec<u32> = ctx.iter().chain(cont).copied().collect();
        if full.len() > self.max_length + 1 {
            full.drain(..full.len() - self.max_length - 1);
        }
        full.pop();
        Row {
            input: full,
            targets: cont.to_vec(),
        }
    }

    /// Log-likelihood of (context, continuation) string pairs.
    pub fn loglikelihood(&self, pairs: &[(String, String)], label: &str) -> Result<Vec<Score>> {
        let mut rows = Vec::with_capacity(pairs.len());
        for (c, x) in pairs {
            let (ce, xe) = self.encode_pair(c, x)?;
            rows.push(self.pair_row(&ce, &xe));
        }
        self.score_rows(&rows, label)
    }

    /// Log-likelihood of every choice of every document: `docs` = (context, continuations).
    /// Same numbers as [`Lm::loglikelihood`] on the flattened pairs, but each context is
    /// stored and tokenised once. Returns one score per choice, in order.
    pub fn loglikelihood_choices(
        &self,
        docs: &[(String, Vec<String>)],
        label: &str,
    ) -> Result<Vec<Vec<Score>>> {
        let pb = if docs.len() > 200 {
            progress_bar(docs.len() as u64, "tokenizing", self.progress)
        } else {
            None
        };
        let mut rows = Vec::new();
        for (ctx, choices) in docs {
            let trimmed = ctx.trim_end();
            let ctx_enc = if ctx.is_empty() {
                None
            } else {
                Some(self.encode(trimmed)?)
            };
            for c in choices {
                let (ce, xe) = match &ctx_enc {
                    None => self.encode_pair(ctx, c)?,
                    Some(ce) => {
                        // encode_pair with the context's tokens reused.
                        let whole = self.encode(&format!("{ctx}{c}"))?;
                        (
                            ce.clone(),
                            whole
                                .get(ce.len().min(whole.len())..)
                                .unwrap_or(&[])
                                .to_vec(),
                        )
                    }
                };
                rows.push(self.pair_row(&ce, &xe));
            }
            if let Some(pb) = &pb {
                pb.inc(1);
            }
        }
        if let Some(pb) = pb {
            pb.finish_and_clear();
        }
        let flat = self.score_rows(&rows, label)?;
        let mut out = Vec::with_capacity(docs.len());
        let mut i = 0;
        for (_, choices) in docs {
            out.push(flat[i..i + choices.len()].to_vec());
            i += choices.len();
        }
        Ok(out)
    }

    /// Score rows: identical inputs run once; rows sharing ≥ MIN_SHARED_PREFIX leading tokens
    /// run that prefix once (its KV cache is cloned per batch); batches are right-padded with a
    /// key mask.
    pub fn score_rows(&self, rows: &[Row], label: &str) -> Result<Vec<Score>> {
        let mut out = vec![
            Score {
                logprob: 0.0,
                greedy: true
            };
            rows.len()
        ];
        let mut units: Vec<Unit> = Vec::new();
        let mut by_input: HashMap<&[u32], usize> = HashMap::new();
        for (i, r) in rows.iter().enumerate() {
            if r.targets.is_empty() {
                continue; // nothing to score: log p = 0 (as lm-eval with an empty continuation)
            }
            if r.input.is_empty() || r.targets.len() > r.input.len() {
                return Err(Error::Msg(format!(
                    "internal: row {i} has {} inputs for {} targets",
                    r.input.len(),
                    r.targets.len()
                )));
            }
            if r.input.len() > self.model.max_positions() {
                return Err(Error::Msg(format!(
                    "a request of {} tokens exceeds the model's context of {}",
                    r.input.len(),
                    self.model.max_positions()
                )));
            }
            let start = r.input.len() - r.targets.len();
            let u = *by_input.entry(r.input.as_slice()).or_insert_with(|| {
                units.push(Unit {
                    input: r.input.clone(),
                    need_from: start,
                    reqs: vec![],
                });
                units.len() - 1
            });
            units[u].need_from = units[u].need_from.min(start);
            units[u].reqs.push((i, start));
        }
        // Group units that share a long token prefix (sorted order puts them together).
        let mut order: Vec<usize> = (0..units.len()).collect();
        order.sort_by(|&a, &b| units[a].input.cmp(&units[b].input));
        let mut groups: Vec<(usize, Vec<usize>)> = Vec::new(); // (prefix len, units)
        for &u in &order {
            if let Some((p, g)) = groups.last_mut() {
                let first = &units[g[0]].input;
                let l = (*p)
                    .min(lcp(first, &units[u].input))
                    .min(units[u].need_from);
                if l >= MIN_SHARED_PREFIX {
                    *p = l;
                    g.push(u);
                    continue;
                }
            }
            groups.push((units[u].need_from, vec![u]));
        }
        // Rows without a shared prefix are batched together.
        let (mut shared, lone): (Vec<_>, Vec<_>) = groups
            .into_iter()
            .partition(|(p, g)| g.len() >= 2 && *p >= MIN_SHARED_PREFIX);
        let lone: Vec<usize> = lone.into_iter().flat_map(|(_, g)| g).collect();
        if !lone.is_empty() {
            shared.push((0, lone));
        }
        let pb = progress_bar(rows.len() as u64, label, self.progress);
        for (p, mut g) in shared {
            // Longest first, so padding within a batch is small and the ETA pessimistic.
            g.sort_by_key(|&u| std::cmp::Reverse(units[u].input.len()));
            let mut caches: HashMap<usize, Cache> = HashMap::new();
            for chunk in g.chunks(self.batch) {
                let n_rows: u64 = chunk.iter().map(|&u| units[u].reqs.len() as u64).sum();
                // A chunk is the unit of caching: it is reused only whole and recomputed whole,
                // so every score is the one an uninterrupted run computes in the same batch.
                let keys: Vec<(usize, Key)> = match self.cache {
                    Some(_) => chunk
                        .iter()
                        .flat_map(|&u| units[u].reqs.iter())
                        .map(|&(ri, _)| (ri, score_key(&rows[ri].input, &rows[ri].targets)))
                        .collect(),
                    None => vec![],
                };
                if let Some(c) = self.cache {
                    let ks: Vec<Key> = keys.iter().map(|(_, k)| *k).collect();
                    if let Some(scores) = c.scores(&ks) {
                        for ((ri, _), s) in keys.iter().zip(scores) {
                            out[*ri] = s;
                        }
                        if let Some(pb) = &pb {
                            pb.inc(n_rows);
                        }
                        continue;
                    }
                }
                let cache = if p > 0 {
                    let b = chunk.len();
                    let c = match caches.entry(b) {
                        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                        std::collections::hash_map::Entry::Vacant(e) => {
                            e.insert(self.prefix_cache(&units[chunk[0]].input[..p], b)?)
                        }
                    };
                    Some(c.clone())
                } else {
                    None
                };
                self.score_chunk(rows, &units, chunk, p, cache, &mut out)?;
                if let Some(c) = self.cache {
                    let items: Vec<(Key, Score)> =
                        keys.iter().map(|&(ri, k)| (k, out[ri])).collect();
                    c.put_scores(&items)?;
                }
                if let Some(pb) = &pb {
                    pb.inc(n_rows);
                }
            }
        }
        if let Some(pb) = pb {
            pb.finish_and_clear();
        }
        Ok(out)
    }

    /// KV cache of `prefix`, computed once and repeated over `b` rows.
    fn prefix_cache(&self, prefix: &[u32], b: usize) -> Result<Cache> {
        let mut cache = self.model.new_cache();
        let ids = Tensor::new(prefix, &Device::Cpu)?.unsqueeze(0)?;
        self.model.forward_hidden(&ids, Some(&mut cache), None)?;
        Ok(if b > 1 { cache.repeat(b)? } else { cache })
    }

    fn score_chunk(
        &self,
        rows: &[Row],
        units: &[Unit],
        chunk: &[usize],
        p: usize,
        cache: Option<Cache>,
        out: &mut [Score],
    ) -> Result<()> {
        let b = chunk.len();
        let t = chunk
            .iter()
            .map(|&u| units[u].input.len() - p)
            .max()
            .unwrap_or(0);
        let mut ids = vec![0u32; b * t];
        let mut mask = vec![0u32; b * (p + t)];
        let mut padded = false;
        for (r, &u) in chunk.iter().enumerate() {
            let suf = &units[u].input[p..];
            ids[r * t..r * t + suf.len()].copy_from_slice(suf);
            mask[r * (p + t)..r * (p + t) + p + suf.len()]
                .iter_mut()
                .for_each(|m| *m = 1);
            padded |= suf.len() < t;
        }
        let ids = Tensor::from_vec(ids, (b, t), &Device::Cpu)?;
        let key_mask = if padded {
            Some(Tensor::from_vec(mask, (b, p + t), &Device::Cpu)?)
        } else {
            None
        };
        let mut cache = cache;
        let hidden = self
            .model
            .forward_hidden(&ids, cache.as_mut(), key_mask.as_ref())?; // [b, t, h]
        let h = hidden.dim(2)?;
        let hidden = hidden.reshape((b * t, h))?;
        // Positions whose logits are needed: (unit, position in the unit's input).
        let mut need: Vec<(usize, usize)> = Vec::new();
        let mut flat: Vec<u32> = Vec::new();
        for (r, &u) in chunk.iter().enumerate() {
            for pos in units[u].need_from..units[u].input.len() {
                need.push((u, pos));
                flat.push((r * t + pos - p) as u32);
            }
        }
        for (k, idx) in flat.chunks(HEAD_CHUNK).enumerate() {
            let n = idx.len();
            let sel = hidden.index_select(&Tensor::new(idx, &Device::Cpu)?, 0)?;
            let logits = self.model.head(&sel)?.to_dtype(DType::F32)?;
            let v = logits.dim(1)?;
            let logits = logits.flatten_all()?.to_vec1::<f32>()?;
            for j in 0..n {
                let (u, pos) = need[k * HEAD_CHUNK + j];
                let row = &logits[j * v..(j + 1) * v];
                let mut stats: Option<(f64, u32)> = None;
                for &(ri, start) in &units[u].reqs {
                    if pos < start {
                        continue;
                    }
                    let (lse, am) = *stats.get_or_insert_with(|| {
                        let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
                        let sum: f64 = row.iter().map(|&l| (l as f64 - max).exp()).sum();
                        (max + sum.ln(), argmax(row))
                    });
                    // Targets of row `ri` start at input position `start`.
                    let target = rows[ri].targets[pos - start];
                    out[ri].logprob += row[target as usize] as f64 - lse;
                    out[ri].greedy &= am == target;
                }
            }
        }
        Ok(())
    }

    /// Greedy generation for each request, KV-cached, `batch` requests decoding together.
    /// Requests whose contexts share ≥ MIN_SHARED_PREFIX leading tokens (a few-shot prefix) run
    /// that prefix once and copy its cache to every row.
    pub fn generate_until(
        &self,
        reqs: &[GenRequest],
        label: &str,
        mut on_done: impl FnMut(usize, &GenOutput),
    ) -> Result<Vec<GenOutput>> {
        let mut ctxs: Vec<Vec<u32>> = Vec::with_capacity(reqs.len());
        for r in reqs {
            let mut c = r.context.clone();
            if c.is_empty() {
                c.push(self.prefix_token()?);
            }
            // Leave room for the continuation, as lm-eval (left truncation).
            let room = self.max_length.saturating_sub(r.max_new_tokens).max(1);
            if c.len() > room {
                c.drain(..c.len() - room);
            }
            ctxs.push(c);
        }
        // Each output is the one its request gets alone, so cached requests simply leave the
        // queue.
        let mut outs: Vec<Option<GenOutput>> = vec![None; reqs.len()];
        let keys: Vec<Key> = match self.cache {
            Some(_) => reqs
                .iter()
                .zip(&ctxs)
                .map(|(r, c)| gen_key(c, &r.until, r.max_new_tokens))
                .collect(),
            None => vec![],
        };
        if let Some(c) = self.cache {
            for (i, k) in keys.iter().enumerate() {
                if let Some(o) = c.generation(k) {
                    on_done(i, &o);
                    outs[i] = Some(o);
                }
            }
        }
        let mut order: Vec<usize> = (0..reqs.len()).filter(|&i| outs[i].is_none()).collect();
        order.sort_by(|&a, &b| ctxs[a].cmp(&ctxs[b]));
        let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
        for &i in &order {
            let lim = ctxs[i].len() - 1;
            if let Some((p, g)) = groups.last_mut() {
                let l = (*p).min(lcp(&ctxs[g[0]], &ctxs[i])).min(lim);
                if l >= MIN_SHARED_PREFIX {
                    *p = l;
                    g.push(i);
                    continue;
                }
            }
            groups.push((lim, vec![i]));
        }
        // Keep the caller's order inside the progress display: groups are processed in order of
        // their first request.
        groups.sort_by_key(|(_, g)| *g.iter().min().unwrap_or(&0));
        let pb = progress_bar(reqs.len() as u64, label, self.progress);
        if let Some(pb) = &pb {
            pb.inc(outs.iter().filter(|o| o.is_some()).count() as u64);
        }
        let mut write_err: Option<Error> = None;
        for (p, mut g) in groups {
            g.sort();
            let p = if g.len() >= 2 && p >= MIN_SHARED_PREFIX {
                p
            } else {
                0
            };
            let prefix = if p > 0 {
                let mut c = self.model.new_cache();
                let ids = Tensor::new(&ctxs[g[0]][..p], &Device::Cpu)?.unsqueeze(0)?;
                self.model.forward_hidden(&ids, Some(&mut c), None)?;
                Some(c)
            } else {
                None
            };
            let mut done = |i: usize, o: GenOutput| {
                on_done(i, &o);
                if let (Some(c), None) = (self.cache, &write_err) {
                    write_err = c.put_generation(keys[i], &o).err();
                }
                outs[i] = Some(o);
                if let Some(pb) = &pb {
                    pb.inc(1);
                }
            };
            if self.gen_batch > 1 && g.len() > 1 {
                let rows: Vec<(&[u32], &GenRequest)> =
                    g.iter().map(|&i| (&ctxs[i][p..], &reqs[i])).collect();
                self.greedy_batch(&rows, prefix.as_ref(), p, &mut |r, o| done(g[r], o))?;
            } else {
                for &i in &g {
                    let cache = prefix.clone().unwrap_or_else(|| self.model.new_cache());
                    let r = &reqs[i];
                    done(
                        i,
                        self.greedy(&ctxs[i][p..], cache, &r.until, r.max_new_tokens)?,
                    );
                }
            }
            if let Some(e) = write_err.take() {
                return Err(e);
            }
        }
        if let Some(pb) = pb {
            pb.finish_and_clear();
        }
        Ok(outs
            .into_iter()
            .map(|o| o.expect("every request generated"))
            .collect())
    }

    /// Greedy decoding of a group of requests, up to `batch` rows at a time, each row decoded as
    /// [`Lm::greedy`] would decode it alone. `rows` are (context after the prefix, request),
    /// `prefix` the single-row cache of the first `p` context tokens they share.
    ///
    /// The first rows' contexts are right-padded into one prefill; each step then appends one
    /// token per row at the end of the cache, with the padding holes masked and every row at its
    /// own RoPE positions. When a row finishes, the next request takes its slot (continuous
    /// batching): its context runs alone from the prefix cache and its keys are written into the
    /// slot's row, so the batch stays full and the weights are read once per step for all rows.
    fn greedy_batch(
        &self,
        rows: &[(&[u32], &GenRequest)],
        prefix: Option<&Cache>,
        p: usize,
        on_done: &mut dyn FnMut(usize, GenOutput),
    ) -> Result<()> {
        // Longest contexts first: the first prefill is then as wide as any later context, so a
        // freed slot's row always has room for the next one's context.
        let mut queue: Vec<usize> = (0..rows.len()).collect();
        queue.sort_by_key(|&r| std::cmp::Reverse(rows[r].0.len()));
        let mut queue: std::collections::VecDeque<usize> = queue.into();
        while !queue.is_empty() {
            let first: Vec<usize> = queue.drain(..self.gen_batch.min(queue.len())).collect();
            self.batch_run(rows, prefix, p, first, &mut queue, on_done)?;
        }
        Ok(())
    }

    /// One batch: prefill `first`, then decode, refilling freed slots from `queue` while the
    /// cache stays within a horizon (a cache grown without bound would make every step attend
    /// over ever more holes); then drain.
    #[allow(clippy::too_many_arguments)]
    fn batch_run(
        &self,
        rows: &[(&[u32], &GenRequest)],
        prefix: Option<&Cache>,
        p: usize,
        first: Vec<usize>,
        queue: &mut std::collections::VecDeque<usize>,
        on_done: &mut dyn FnMut(usize, GenOutput),
    ) -> Result<()> {
        struct Slot {
            row: usize,
            dec: Decoded,
            /// Context tokens after the prefix, in cache positions p .. p + len.
            len: usize,
            /// Cache position of the row's first generated token (the keys between p + len and
            /// here are another row's or padding).
            gen_start: usize,
            /// RoPE position (= true sequence length) of the next token fed.
            pos: usize,
            /// Logits not yet turned into a token; None once consumed.
            logits: Option<Vec<f32>>,
            live: bool,
        }
        let b = first.len();
        let t = first.iter().map(|&r| rows[r].0.len()).max().unwrap_or(0);
        if t == 0 {
            return Err(Error::Msg("internal: empty generation context".into()));
        }
        let max_new = first
            .iter()
            .map(|&r| rows[r].1.max_new_tokens)
            .max()
            .unwrap_or(0);
        let horizon = p + t + 2 * max_new;
        // Prefill: contexts right-padded to t; the padded keys are masked.
        let mut ids = vec![0u32; b * t];
        let mut mask = vec![0u32; b * (p + t)];
        for (i, &r) in first.iter().enumerate() {
            let ctx = rows[r].0;
            ids[i * t..i * t + ctx.len()].copy_from_slice(ctx);
            mask[i * (p + t)..i * (p + t) + p + ctx.len()].fill(1);
        }
        let mut cache = match prefix {
            Some(c) => c.repeat(b)?,
            None => self.model.new_cache(),
        };
        let ragged = first.iter().any(|&r| rows[r].0.len() < t);
        let key_mask = match ragged {
            true => Some(Tensor::from_vec(mask, (b, p + t), &Device::Cpu)?),
            false => None,
        };
        let ids = Tensor::from_vec(ids, (b, t), &Device::Cpu)?;
        let hidden = self
            .model
            .forward_hidden(&ids, Some(&mut cache), key_mask.as_ref())?;
        let h = hidden.dim(2)?;
        let last: Vec<u32> = first
            .iter()
            .enumerate()
            .map(|(i, &r)| (i * t + rows[r].0.len() - 1) as u32)
            .collect();
        let sel = hidden
            .reshape((b * t, h))?
            .index_select(&Tensor::new(last, &Device::Cpu)?, 0)?;
        let logits = self
            .model
            .head(&sel)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        let mut slots: Vec<Slot> = first
            .iter()
            .zip(logits)
            .map(|(&r, lg)| Slot {
                row: r,
                dec: Decoded::default(),
                len: rows[r].0.len(),
                gen_start: p + t,
                pos: p + rows[r].0.len(),
                logits: Some(lg),
                live: true,
            })
            .collect();
        loop {
            // Turn fresh logits into tokens; finished rows report and free their slot.
            for s in slots.iter_mut() {
                let Some(lg) = s.logits.take() else { continue };
                let r = rows[s.row].1;
                let stop = match r.max_new_tokens {
                    0 => Some("max_new_tokens"),
                    n => s.dec.step(self, &lg, &r.until, n, s.pos)?,
                };
                if let Some(why) = stop {
                    s.live = false;
                    on_done(s.row, std::mem::take(&mut s.dec).finish(why));
                }
            }
            // Refill freed slots while the cache has room before the horizon.
            let mut refilled = false;
            for si in 0..slots.len() {
                if slots[si].live {
                    continue;
                }
                let Some(&r) = queue.front() else { break };
                let (ctx, req) = rows[r];
                let at = cache.seq_len;
                if p + ctx.len() > at || at + req.max_new_tokens > horizon {
                    break;
                }
                queue.pop_front();
                let mut c = prefix.cloned().unwrap_or_else(|| self.model.new_cache());
                let x = Tensor::new(ctx, &Device::Cpu)?.unsqueeze(0)?;
                let lg = self.model.forward_last(&x, Some(&mut c))?.squeeze(0)?;
                cache.write_row(si, &c, p, ctx.len())?;
                slots[si] = Slot {
                    row: r,
                    dec: Decoded::default(),
                    len: ctx.len(),
                    gen_start: at,
                    pos: p + ctx.len(),
                    logits: Some(lg.to_dtype(DType::F32)?.to_vec1::<f32>()?),
                    live: true,
                };
                refilled = true;
            }
            if refilled {
                continue; // the new rows' first tokens come from their own prefill
            }
            // No refill now: finished rows leave the batch (a waiting request would come back
            // in a new batch).
            if slots.iter().any(|s| !s.live) {
                let keep: Vec<u32> = (0..slots.len())
                    .filter(|&i| slots[i].live)
                    .map(|i| i as u32)
                    .collect();
                if keep.is_empty() {
                    return Ok(());
                }
                cache = cache.select_rows(&keep)?;
                slots.retain(|s| s.live);
            }
            // Keys: the prefix, the row's own context, then its generated tokens.
            let total = cache.seq_len + 1;
            let m: Vec<u32> = slots
                .iter()
                .flat_map(|s| {
                    let (ctx_end, g) = (p + s.len, s.gen_start);
                    (0..total).map(move |j| u32::from(j < ctx_end || j >= g))
                })
                .collect();
            let n = slots.len();
            let key_mask = Tensor::from_vec(m, (n, total), &Device::Cpu)?;
            let start: Vec<usize> = slots.iter().map(|s| s.pos).collect();
            // A live row's last generated token is the one to feed.
            let ids: Vec<u32> = slots.iter().map(|s| s.dec.last()).collect();
            let ids = Tensor::from_vec(ids, (n, 1), &Device::Cpu)?;
            let hidden = self.model.forward_hidden_at(
                &ids,
                Some(&mut cache),
                Some(&key_mask),
                Some(&start),
            )?;
            let logits = self
                .model
                .head(&hidden.squeeze(1)?)?
                .to_dtype(DType::F32)?
                .to_vec2::<f32>()?;
            for (s, lg) in slots.iter_mut().zip(logits) {
                s.pos += 1;
                s.logits = Some(lg);
            }
        }
    }

    /// Greedy decoding after `ids` (the part of the context not already in `cache`).
    pub fn greedy(
        &self,
        ids: &[u32],
        mut cache: Cache,
        until: &[String],
        max_new: usize,
    ) -> Result<GenOutput> {
        let mut dec = Decoded::default();
        let mut stopped = "max_new_tokens";
        if max_new > 0 {
            let mut x = Tensor::new(ids, &Device::Cpu)?.unsqueeze(0)?;
            loop {
                let logits = self
                    .model
                    .forward_last(&x, Some(&mut cache))?
                    .squeeze(0)?
                    .to_vec1::<f32>()?;
                if let Some(why) = dec.step(self, &logits, until, max_new, cache.seq_len)? {
                    stopped = why;
                    break;
                }
                x = Tensor::new(&[dec.last()], &Device::Cpu)?.unsqueeze(0)?;
            }
        }
        Ok(dec.finish(stopped))
    }

    /// Longest sequence generation may reach.
    fn gen_limit(&self) -> usize {
        self.max_length.min(self.model.max_positions())
    }
}

/// A generation's tokens and text so far, with the greedy step that both decoders (one row,
/// batched rows) take, so they stop for the same reasons in the same order.
#[derive(Default)]
struct Decoded {
    ids: Vec<u32>,
    text: String,
}

impl Decoded {
    /// Take the argmax of `logits` as the next token and say why generation ends here, if it
    /// does: EOS (not kept), a stop string (cut from the text), the token budget, or the context
    /// (`len`, the sequence length so far, has no room for feeding the token).
    fn step(
        &mut self,
        lm: &Lm,
        logits: &[f32],
        until: &[String],
        max_new: usize,
        len: usize,
    ) -> Result<Option<&'static str>> {
        let tok = argmax(logits);
        if lm.tok.eos_ids.contains(&tok) {
            return Ok(Some("eos"));
        }
        self.ids.push(tok);
        self.text = lm.tok.decode(&self.ids, false)?;
        Ok(if let Some(k) = first_stop(&self.text, until) {
            self.text.truncate(k);
            Some("stop_string")
        } else if self.ids.len() >= max_new {
            Some("max_new_tokens")
        } else if len + 1 > lm.gen_limit() {
            Some("context_length")
        } else {
            None
        })
    }

    /// The last token taken (the next one to feed); 0 before any.
    fn last(&self) -> u32 {
        self.ids.last().copied().unwrap_or(0)
    }

    fn finish(self, stopped_by: &str) -> GenOutput {
        GenOutput {
            new_tokens: self.ids.len(),
            text: self.text,
            stopped_by: stopped_by.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rolling_windows_cover_every_token_once() {
        let toks: Vec<u32> = (10..30).collect();
        for (l, s) in [(4, 4), (4, 2), (8, 3), (25, 25), (1, 1)] {
            let rows = rolling_rows(&toks, 0, l, s);
            let all: Vec<u32> = rows.iter().flat_map(|r| r.targets.clone()).collect();
            assert_eq!(all, toks, "L={l} s={s}");
            for r in &rows {
                assert!(r.input.len() <= l && r.targets.len() <= r.input.len());
                // The input is exactly the tokens before the targets' last one.
                let full: Vec<u32> = std::iter::once(0).chain(toks.iter().copied()).collect();
                let end = full
                    .iter()
                    .position(|&x| x == *r.targets.last().unwrap())
                    .unwrap();
                assert_eq!(r.input, full[end - r.input.len()..end].to_vec());
            }
        }
        // lm-eval layout for L = stride = 4 over 10 tokens: [P,a,b,c]→abcd, [c..f]... last window full context.
        let rows = rolling_rows(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 0, 4, 4);
        assert_eq!(
            rows[0],
            Row {
                input: vec![0, 1, 2, 3],
                targets: vec![1, 2, 3, 4]
            }
        );
        assert_eq!(
            rows[1],
            Row {
                input: vec![4, 5, 6, 7],
                targets: vec![5, 6, 7, 8]
            }
        );
        assert_eq!(
            rows[2],
            Row {
                input: vec![6, 7, 8, 9],
                targets: vec![9, 10]
            }
        );
    }

    #[test]
    fn stop_strings() {
        let u = vec!["Q:".to_string(), "\n\n".to_string(), String::new()];
        assert_eq!(first_stop("abc\n\nQ: x", &u), Some(3));
        assert_eq!(first_stop("abc Q: x\n\n", &u), Some(4));
        assert_eq!(first_stop("abc", &u), None);
    }
}
