//! `mpolm generate MODEL --prompt …`: text from a causal model (KV cache; greedy at
//! --temperature 0), optionally through its chat template.

use crate::load;
use crate::range;
use crate::report::Report;
use anyhow::Result;
use models::generate::{generate, SamplingParams};
use models::Model;
use serde_json::json;
use std::io::Write;

#[derive(clap::Args)]
pub struct GenerateArgs {
    pub model: String,
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value_t = 64, value_parser = range::count, allow_negative_numbers = true)]
    pub max_new_tokens: usize,
    /// Sampling temperature (finite, >= 0; 0 = greedy).
    #[arg(long, default_value_t = 0.0, value_parser = range::nonneg, allow_negative_numbers = true)]
    pub temperature: f64,
    /// Nucleus sampling mass, in (0, 1].
    #[arg(long, default_value_t = 1.0, value_parser = range::fraction, allow_negative_numbers = true)]
    pub top_p: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long)]
    pub chat: bool,
    /// Optional system message for --chat.
    #[arg(long)]
    pub system: Option<String>,
}

pub fn run(a: GenerateArgs, lo: &models::LoadOptions, rep: &mut Report) -> Result<()> {
    let GenerateArgs {
        model,
        prompt,
        max_new_tokens,
        temperature,
        top_p,
        seed,
        chat,
        system,
    } = a;
    let m = load(&model, lo)?;
    let p = SamplingParams {
        max_new_tokens,
        temperature,
        top_p,
        seed,
        stop_ids: vec![],
    };
    show(&m, &prompt, system.as_deref(), chat, p, rep)
}

/// Streams the continuation of PROMPT to stdout and sets the report's `generate` entry
/// (`mpolm run` uses it too).
pub fn show(
    m: &Model,
    prompt: &str,
    system: Option<&str>,
    chat: bool,
    mut p: SamplingParams,
    rep: &mut Report,
) -> Result<()> {
    let llama = m.causal()?;
    let tok = &m.tokenizer;
    let text = if chat {
        let mut msgs = vec![];
        if let Some(s) = system {
            msgs.push(json!({"role": "system", "content": s}));
        }
        msgs.push(json!({"role": "user", "content": prompt}));
        tok.apply_chat_template(&json!(msgs), true)?
    } else {
        prompt.to_string()
    };
    // The chat template already carries any BOS it wants.
    let ids = tok.encode(&text, !chat)?;
    let mut stops = tok.eos_ids.clone();
    if chat {
        for &s in llama.end_of_turn_tokens() {
            if let Some(id) = tok.token_to_id(s) {
                stops.push(id);
            }
        }
    }
    p.stop_ids = stops;
    if chat {
        println!("[chat] {prompt}");
    } else {
        print!("{prompt}");
    }
    let mut shown = String::new();
    let mut all = Vec::new();
    let (out, st) = generate(llama, &ids, &p, |id| {
        all.push(id);
        // Decode the whole continuation each time so multi-byte characters print correctly.
        if let Ok(s) = tok.decode(&all, true) {
            if s.len() > shown.len() && s.starts_with(&shown) {
                print!("{}", &s[shown.len()..]);
                let _ = std::io::stdout().flush();
                shown = s;
            }
        }
    })?;
    println!();
    let text_out = tok.decode(&out, true)?;
    println!(
        "[{} prompt tokens at {:.1} tok/s, {} new tokens at {:.1} tok/s, stop: {}]",
        st.prompt_tokens, st.prompt_tok_per_s, st.new_tokens, st.decode_tok_per_s, st.stopped_by
    );
    rep.set(
        "generate",
        json!({
            "prompt": prompt,
            "chat": chat,
            "rendered_prompt": text,
            "prompt_ids": ids,
            "output_ids": out,
            "output": text_out,
            "temperature": p.temperature,
            "top_p": p.top_p,
            "seed": p.seed,
            "stats": st,
        }),
    );
    Ok(())
}
