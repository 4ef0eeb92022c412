//! BoolQ (Clark et al.), validation split, as `boolq/dev.jsonl`. lm-eval 0.4.x reads SuperGLUE's
//! copy (`{"question", "passage", "idx", "label": true|false}`, whose passage starts with the
//! Wikipedia title and " -- "); the authors' own file (`{"question", "title", "answer",
//! "passage"}`) is read too, its passage prefixed with "{title} -- " to give the same text.
//! Prompt "{passage}\nQuestion: {question}?\nAnswer:", choices " no", " yes"; acc.

use super::zeroshot::{str_field, Doc};
use crate::{data, Error, Result};
use serde_json::Value;
use std::path::Path;

pub const FILE: &str = "boolq/dev.jsonl";

pub fn load(path: &Path) -> Result<Vec<Doc>> {
    data::read_jsonl(path)?
        .iter()
        .map(|(line, v)| {
            let line = *line;
            let question = str_field(v, "question", path, line)?;
            let passage = str_field(v, "passage", path, line)?;
            let (passage, answer) = match (v.get("label"), v.get("answer")) {
                (Some(l), _) => (passage.to_string(), l),
                (None, Some(a)) => (
                    format!("{} -- {passage}", str_field(v, "title", path, line)?),
                    a,
                ),
                (None, None) => {
                    return Err(Error::parse(path, line, "missing 'label' (or 'answer')"))
                }
            };
            let gold = match answer {
                Value::Bool(b) => *b as usize,
                Value::Number(n) if n.as_u64() == Some(0) => 0,
                Value::Number(n) if n.as_u64() == Some(1) => 1,
                _ => {
                    return Err(Error::parse(
                        path,
                        line,
                        "the answer must be true/false (or 0/1)",
                    ))
                }
            };
            Ok(Doc::choice(
                format!("{passage}\nQuestion: {question}?\nAnswer:"),
                vec!["no".into(), "yes".into()],
                gold,
            ))
        })
        .collect()
}
