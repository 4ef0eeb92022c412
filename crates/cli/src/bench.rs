//! `mpolm bench generate`: prefill and decode speed and peak RSS of a causal model, on the
//! same deterministic prompt as `scripts/bench_torch_generate.py` so the two can be compared
//! as a ratio in one run (`scripts/bench_generate.sh`).

use crate::report::Report;
use crate::{held_as, load, range};
use anyhow::Result;
use candle_core::{Device, Tensor};
use models::generate::argmax;
use models::hub;
use models::Model;
use serde_json::{json, Value};
use std::time::Instant;

#[derive(clap::Subcommand)]
pub enum BenchCmd {
    /// Prefill and decode tokens/s and peak RSS of a causal model (greedy, KV cache).
    Generate(GenerateArgs),
}

#[derive(clap::Args)]
pub struct GenerateArgs {
    #[arg(default_value = hub::DEFAULT_CAUSAL)]
    pub model: String,
    #[arg(long, default_value_t = 128, value_parser = range::count, allow_negative_numbers = true)]
    pub prompt_tokens: usize,
    /// New tokens per run (>= 2: the first comes from the prefill).
    #[arg(long, default_value_t = 64, value_parser = range::len2, allow_negative_numbers = true)]
    pub new_tokens: usize,
    #[arg(long, default_value_t = 3, value_parser = range::count, allow_negative_numbers = true)]
    pub repeats: usize,
}

pub fn run(cmd: BenchCmd, lo: &models::LoadOptions, rep: &mut Report) -> Result<()> {
    match cmd {
        BenchCmd::Generate(a) => run_generate(a, lo, rep),
    }
}

fn run_generate(a: GenerateArgs, lo: &models::LoadOptions, rep: &mut Report) -> Result<()> {
    let GenerateArgs {
        model,
        prompt_tokens,
        new_tokens,
        repeats,
    } = a;
    anyhow::ensure!(
        prompt_tokens > 0 && new_tokens > 1 && repeats > 0,
        "--prompt-tokens, --new-tokens (>1) and --repeats must be positive"
    );
    let m = load(&model, lo)?;
    let ctx = m.causal()?.max_positions();
    anyhow::ensure!(
        prompt_tokens.saturating_add(new_tokens) <= ctx,
        "--prompt-tokens {prompt_tokens} + --new-tokens {new_tokens} exceed the model's context of {ctx} tokens"
    );
    let r = bench_generate(&m, prompt_tokens, new_tokens, repeats)?;
    println!(
        "{}: prefill {:.1} tok/s, decode {:.1} tok/s, peak RSS {:.0} MiB, weights {:.1} MiB ({}, {} threads)",
        model,
        r["prefill_tok_s"].as_f64().unwrap_or(0.0),
        r["decode_tok_s"].as_f64().unwrap_or(0.0),
        r["peak_rss_mb"].as_f64().unwrap_or(0.0),
        r["weight_bytes"].as_f64().unwrap_or(0.0) / (1024.0 * 1024.0),
        held_as(&m),
        r["threads"]
    );
    rep.set("bench_generate", r);
    Ok(())
}

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
        "gguf_weights": crate::gguf_weights(m).name(),
        "threads": candle_core::utils::get_num_threads(),
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "load_s": m.load_secs,
        "greedy_ids": first.unwrap_or_default(),
    }))
}
