//! HellaSwag (Zellers et al.), validation split: `hellaswag/hellaswag_val.jsonl` as in the
//! authors' repository (`{"ind", "activity_label", "ctx_a", "ctx_b", "ctx", "split",
//! "split_type", "label", "endings", "source_id"}`). lm-eval 0.4.x's `process_docs`: query =
//! preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()), choices =
//! preprocess(ending), where preprocess strips, turns " [title]" into ". ", drops every
//! "[…]" and replaces double spaces once; continuations " {choice}"; acc, acc_norm.

use super::zeroshot::{str_field, Doc};
use crate::{data, Error, Result};
use regex::Regex;
use serde_json::Value;
use std::path::Path;
use std::sync::OnceLock;

pub const FILE: &str = "hellaswag/hellaswag_val.jsonl";

/// Python's `str.capitalize()`: first character upper-cased, the rest lower-cased.
pub fn capitalize(s: &str) -> String {
    let mut it = s.chars();
    match it.next() {
        None => String::new(),
        Some(c) => c
            .to_uppercase()
            .chain(it.as_str().to_lowercase().chars())
            .collect(),
    }
}

/// lm-eval's `hellaswag.utils.preprocess`.
pub fn preprocess(text: &str) -> String {
    static BRACKETS: OnceLock<Regex> = OnceLock::new();
    // Python's `.` in `re` matches anything but "\n", as the regex crate's default.
    let re = BRACKETS.get_or_init(|| Regex::new(r"\[.*?\]").expect("valid regex"));
    let t = text.trim().replace(" [title]", ". ");
    re.replace_all(&t, "").replace("  ", " ")
}

fn label(v: &Value, path: &Path, line: usize) -> Result<usize> {
    // The authors' file has an integer; HF's copy a string: both name the same index.
    match v.get("label") {
        Some(Value::Number(n)) => n.as_u64().map(|x| x as usize),
        Some(Value::String(s)) => s.trim().parse().ok(),
        _ => None,
    }
    .ok_or_else(|| {
        Error::parse(
            path,
            line,
            "'label' must be the index of the correct ending",
        )
    })
}

pub fn load(path: &Path) -> Result<Vec<Doc>> {
    data::read_jsonl(path)?
        .iter()
        .map(|(line, v)| {
            let (line, v) = (*line, v);
            let act = str_field(v, "activity_label", path, line)?;
            let ctx_a = str_field(v, "ctx_a", path, line)?;
            let ctx_b = str_field(v, "ctx_b", path, line)?;
            let endings = v
                .get("endings")
                .and_then(Value::as_array)
                .ok_or_else(|| Error::parse(path, line, "'endings' must be an array"))?
                .iter()
                .map(|e| {
                    e.as_str()
                        .map(preprocess)
                        .ok_or_else(|| Error::parse(path, line, "every ending must be a string"))
                })
                .collect::<Result<Vec<_>>>()?;
            let gold = label(v, path, line)?;
            if gold >= endings.len() {
                return Err(Error::parse(
                    path,
                    line,
                    format!(
                        "'label' {gold} is out of range for {} endings",
                        endings.len()
                    ),
                ));
            }
            let query = preprocess(&format!("{act}: {ctx_a} {}", capitalize(ctx_b)));
            Ok(Doc::choice(query, endings, gold))
        })
        .collect()
}
