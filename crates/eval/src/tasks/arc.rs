//! ARC (AI2 Reasoning Challenge, Easy and Challenge sets) and OpenBookQA: both published by AI2
//! as JSONL with `{"id", "question": {"stem", "choices": [{"text", "label"}, …]}, "answerKey"}`
//! (ARC-V1-Feb2018, OpenBookQA-V1-Sep2018/Data/Main). lm-eval 0.4.x:
//! - `arc_easy` / `arc_challenge` (test split): "Question: {stem}\nAnswer:", choices " {text}",
//!   gold = the label list's index of `answerKey`; acc, acc_norm;
//! - `openbookqa` (main, test split): the bare stem as context, choices " {text}", gold = index of
//!   `answerKey.lstrip()`; acc, acc_norm.

use super::zeroshot::{str_field, Doc};
use crate::{data, Error, Result};
use serde_json::Value;
use std::path::Path;

pub const EASY_FILE: &str = "arc/ARC-Easy-Test.jsonl";
pub const CHALLENGE_FILE: &str = "arc/ARC-Challenge-Test.jsonl";
pub const OBQA_FILE: &str = "openbookqa/test.jsonl";

/// (stem, choice texts, gold index) of one AI2 question record.
fn question(
    v: &Value,
    path: &Path,
    line: usize,
    lstrip_key: bool,
) -> Result<(String, Vec<String>, usize)> {
    let q = v
        .get("question")
        .ok_or_else(|| Error::parse(path, line, "missing 'question'"))?;
    let stem = str_field(q, "stem", path, line)?.to_string();
    let choices = q
        .get("choices")
        .and_then(Value::as_array)
        .ok_or_else(|| Error::parse(path, line, "'question.choices' must be an array"))?;
    let mut texts = Vec::with_capacity(choices.len());
    let mut labels = Vec::with_capacity(choices.len());
    for c in choices {
        texts.push(str_field(c, "text", path, line)?.to_string());
        labels.push(str_field(c, "label", path, line)?.to_string());
    }
    if texts.len() < 2 {
        return Err(Error::parse(
            path,
            line,
            "a question needs at least 2 choices",
        ));
    }
    let key = str_field(v, "answerKey", path, line)?;
    let key = if lstrip_key { key.trim_start() } else { key };
    let gold = labels.iter().position(|l| l == key).ok_or_else(|| {
        Error::parse(
            path,
            line,
            format!("answerKey '{key}' is not one of the labels {labels:?}"),
        )
    })?;
    Ok((stem, texts, gold))
}

pub fn load_arc(path: &Path) -> Result<Vec<Doc>> {
    data::read_jsonl(path)?
        .iter()
        .map(|(line, v)| {
            let (stem, texts, gold) = question(v, path, *line, false)?;
            Ok(Doc::choice(
                format!("Question: {stem}\nAnswer:"),
                texts,
                gold,
            ))
        })
        .collect()
}

pub fn load_openbookqa(path: &Path) -> Result<Vec<Doc>> {
    data::read_jsonl(path)?
        .iter()
        .map(|(line, v)| {
            let (stem, texts, gold) = question(v, path, *line, true)?;
            Ok(Doc::choice(stem, texts, gold))
        })
        .collect()
}
