//! Text generation with a KV cache: one prefill over the prompt, then one token per step.
//! Greedy at temperature 0 (argmax, first index on ties as torch does), else temperature +
//! nucleus (top-p) sampling from a seeded RNG so runs are reproducible.

use crate::llama::{Cache, Llama};
use crate::Result;
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct SamplingParams {
    pub max_new_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
    /// Generation stops after emitting any of these.
    pub stop_ids: Vec<u32>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            max_new_tokens: 64,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop_ids: vec![],
        }
    }
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct GenStats {
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub prompt_secs: f64,
    pub decode_secs: f64,
    pub prompt_tok_per_s: f64,
    pub decode_tok_per_s: f64,
    pub stopped_by: String,
}

pub struct Sampler {
    rng: rand::rngs::StdRng,
    temperature: f64,
    top_p: f64,
}

impl Sampler {
    pub fn new(p: &SamplingParams) -> Self {
        Sampler {
            rng: rand::rngs::StdRng::seed_from_u64(p.seed),
            temperature: p.temperature,
            top_p: p.top_p,
        }
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.temperature <= 0.0 {
            return argmax(logits);
        }
        let t = self.temperature as f32;
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, ((l - max) / t).exp()))
            .collect();
        let z: f32 = probs.iter().map(|p| p.1).sum();
        probs.iter_mut().for_each(|p| p.1 /= z);
        if self.top_p < 1.0 {
            probs.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap_or(std::cmp::Ordering::Equal));
            let mut cum = 0.0f32;
            let mut keep = 0;
            for p in &probs {
                keep += 1;
                cum += p.1;
                if cum >= self.top_p as f32 {
                    break;
                }
            }
            probs.truncate(keep.max(1));
        }
        let total: f32 = probs.iter().map(|p| p.1).sum();
        let mut r = self.rng.random::<f32>() * total;
        for p in &probs {
            r -= p.1;
            if r <= 0.0 {
                return p.0;
            }
        }
        probs.last().map(|p| p.0).unwrap_or(0)
    }
}

pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

/// What generation needs of a causal LM (llama-family and gemma3 decoders).
pub trait Decode {
    fn new_cache(&self) -> Cache;
    /// Logits of the last position [b, vocab], appending the new positions to `cache`.
    fn forward_last(&self, ids: &Tensor, cache: Option<&mut Cache>) -> Result<Tensor>;
    fn max_positions(&self) -> usize;
}

impl Decode for Llama {
    fn new_cache(&self) -> Cache {
        Llama::new_cache(self)
    }
    fn forward_last(&self, ids: &Tensor, cache: Option<&mut Cache>) -> Result<Tensor> {
        Llama::forward_last(self, ids, cache)
    }
    fn max_positions(&self) -> usize {
        self.cfg.max_position_embeddings
    }
}

impl Decode for crate::gemma3::Gemma3 {
    fn new_cache(&self) -> Cache {
        crate::gemma3::Gemma3::new_cache(self)
    }
    fn forward_last(&self, ids: &Tensor, cache: Option<&mut Cache>) -> Result<Tensor> {
        crate::gemma3::Gemma3::forward_last(self, ids, cache)
    }
    fn max_positions(&self) -> usize {
        self.cfg.max_position_embeddings
    }
}

/// Generate up to `max_new_tokens` after `prompt`, calling `on_token` for each new id.
pub fn generate(
    model: &dyn Decode,
    prompt: &[u32],
    p: &SamplingParams,
    mut on_token: impl FnMut(u32),
) -> Result<(Vec<u32>, GenStats)> {
    if prompt.is_empty() {
        crate::bail!(
            "empty prompt: give at least one token (or use a model whose tokenizer adds BOS)"
        );
    }
    let mut cache = model.new_cache();
    let mut sampler = Sampler::new(p);
    let mut out = Vec::new();
    let mut st = GenStats {
        prompt_tokens: prompt.len(),
        stopped_by: "max_new_tokens".into(),
        ..Default::default()
    };
    if p.max_new_tokens == 0 {
        return Ok((out, st));
    }
    let t0 = Instant::now();
    let ids = Tensor::new(prompt, &Device::Cpu)?.unsqueeze(0)?;
    let logits = model
        .forward_last(&ids, Some(&mut cache))?
        .squeeze(0)?
        .to_vec1::<f32>()?;
    st.prompt_secs = t0.elapsed().as_secs_f64();
    let mut next = sampler.sample(&logits);
    let t1 = Instant::now();
    loop {
        out.push(next);
        on_token(next);
        if p.stop_ids.contains(&next) {
            st.stopped_by = "eos".into();
            break;
        }
        if out.len() >= p.max_new_tokens {
            break;
        }
        if cache.seq_len + 1 > model.max_positions() {
            st.stopped_by = "context_length".into();
            break;
        }
        let ids = Tensor::new(&[next], &Device::Cpu)?.unsqueeze(0)?;
        let logits = model
            .forward_last(&ids, Some(&mut cache))?
            .squeeze(0)?
            .to_vec1::<f32>()?;
        next = sampler.sample(&logits);
    }
    st.decode_secs = t1.elapsed().as_secs_f64();
    st.new_tokens = out.len();
    st.prompt_tok_per_s = prompt.len() as f64 / st.prompt_secs.max(1e-9);
    // The first new token comes from the prefill, so decode covers new_tokens - 1 steps.
    st.decode_tok_per_s = (out.len().saturating_sub(1)) as f64 / st.decode_secs.max(1e-9);
    Ok((out, st))
}
