//! `mpolm bench generate`: prefill and decode speed and peak RSS of a causal model, on the
//! same deterministic prompt as `scripts/bench_torch_generate.py` so the two can be compared
//! as a ratio in one run (`scripts/bench_generate.sh`).

use anyhow::Result;
use candle_core::{Device, Tensor};
use models::generate::argmax;
use models::Model;
use serde_json::{json, Value};
use std::time::Instant;

/// The same paragraph as the peer scripts (`scripts/bench_prompt.py`), repeated, then cut at
/// the id level.
const PARAGRAPH: &str =
    "The old lighthouse keeper climbed the spiral stairs every evening, counting each \
of the one hundred and twelve steps as his father had done before him. From the \
lantern room he could see the fishing boats returning to the harbor, their sails \
catching the last orange light of the sun, while gulls circled above the breakwater \
and the tide crept slowly over the dark rocks below. ";

pub fn prompt_ids(m: &Model, n: usize) -> Result<Vec<u32>> {
    let mut text = PARAGRAPH.to_string();
    let mut ids = m.tokenizer.encode(&text, false)?;
    while ids.len() < n {
        text.push_str(PARAGRAPH);
        ids = m.tokenizer.encode(&text, false)?;
    }
    ids.truncate(n);
    Ok(ids)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Peak resident set size of this process in MiB (VmHWM), or 0 where /proc is unavailable.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

pub fn bench_generate(
    m: &Model,
    prompt_tokens: usize,
    new_tokens: usize,
    repeats: usize,
) -> Result<Value> {
    let l = m.causal()?;
    let ids = prompt_ids(m, prompt_tokens)?;
    let x = Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
    let run = || -> Result<(f64, f64, Vec<u32>)> {
        let mut cache = l.new_cache();
        let t = Instant::now();
        let logits = l.forward_last(&x, Some(&mut cache))?;
        let prefill = t.elapsed().as_secs_f64();
        let mut next = argmax(&logits.squeeze(0)?.to_vec1::<f32>()?);
        let mut out = vec![next];
        let t = Instant::now();
        for _ in 1..new_tokens {
            let xi = Tensor::new(&[next], &Device::Cpu)?.unsqueeze(0)?;
            let lg = l.forward_last(&xi, Some(&mut cache))?;
            next = argmax(&lg.squeeze(0)?.to_vec1::<f32>()?);
            out.push(next);
        }
        Ok((prefill, t.elapsed().as_secs_f64(), out))
    };
    run()?; // warm-up
    let mut pre = vec![];
    let mut dec = vec![];
    let mut first: Option<Vec<u32>> = None;
    let pb = indicatif::ProgressBar::new(repeats as u64);
    for _ in 0..repeats {
        let (p, d, out) = run()?;
        pre.push(p);
        dec.push((new_tokens - 1) as f64 / d);
        if let Some(f) = &first {
            anyhow::ensure!(
                f == &out,
                "greedy decoding was not deterministic across repeats"
            );
        } else {
            first = Some(out);
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    Ok(json!({
        "model": m.source.name,
        "prefill_tok_s": prompt_tokens as f64 / median(pre),
        "decode_tok_s": median(dec),
        "peak_rss_mb": peak_rss_mib(),
        "weight_bytes": m.weight_bytes(),
        "gguf_weights": crate::gguf_weights().name(),
        "threads": candle_core::utils::get_num_threads(),
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "load_s": m.load_secs,
        "greedy_ids": first.unwrap_or_default(),
    }))
}
