//! `mpolm run [MODEL]` (also `mpolm` alone): the main job on a model — fetch, inspect and a
//! greedy chat generation.

use crate::report::Report;
use crate::{generate_cmd, inspect_cmd, load};
use anyhow::Result;
use models::generate::SamplingParams;
use models::hub;
use serde_json::json;

#[derive(clap::Args)]
pub struct RunArgs {
    #[arg(default_value = hub::DEFAULT_CAUSAL)]
    pub model: String,
}

pub fn run(a: RunArgs, lo: &models::LoadOptions, rep: &mut Report) -> Result<()> {
    rep.set("command", json!("run"));
    let m = load(&a.model, lo)?;
    inspect_cmd::show(&m, rep)?;
    println!();
    let p = SamplingParams {
        max_new_tokens: 48,
        ..Default::default()
    };
    let chat = m.tokenizer.chat_template.is_some();
    generate_cmd::show(
        &m,
        "What is the capital of France? Answer in one sentence.",
        None,
        chat,
        p,
        rep,
    )
}
