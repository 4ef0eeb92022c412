//! LAMBADA as OpenAI prepared it for GPT-2 (`lambada_test.jsonl`, `{"text"}` a line; lm-eval's
//! `lambada_openai`, test split), as `lambada/lambada_test.jsonl`. Context = the text up to its
//! last " " (Python's `text.split(' ')[:-1]` joined by " "), continuation = " " + the last piece.
//! Metrics: perplexity (exp of minus the mean continuation log-likelihood) and acc (the
//! continuation is the greedy one).

use super::zeroshot::{str_field, Doc};
use crate::{data, Result};
use std::path::Path;

pub const FILE: &str = "lambada/lambada_test.jsonl";

/// (context, continuation) of one passage.
pub fn split(text: &str) -> (String, String) {
    match text.rfind(' ') {
        Some(i) => (text[..i].to_string(), format!(" {}", &text[i + 1..])),
        None => (String::new(), format!(" {text}")),
    }
}

pub fn load(path: &Path) -> Result<Vec<Doc>> {
    data::read_jsonl(path)?
        .iter()
        .map(|(line, v)| {
            let (ctx, cont) = split(str_field(v, "text", path, *line)?);
            Ok(Doc {
                choices: vec![cont.trim_start_matches(' ').to_string()],
                requests: vec![(ctx, cont)],
                gold: 0,
            })
        })
        .collect()
}
