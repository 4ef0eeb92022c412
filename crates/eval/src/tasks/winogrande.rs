//! WinoGrande (Sakaguchi et al.), winogrande_xl validation = the authors' `dev.jsonl`
//! (`{"qID", "sentence", "option1", "option2", "answer": "1"|"2"}`), as `winogrande/dev.jsonl`.
//! lm-eval 0.4.x scores it by partial evaluation (Trinh & Le): one context per option, the
//! sentence up to the blank with the option put in, and one shared continuation, " " + the
//! stripped rest of the sentence after the blank; acc.

use super::zeroshot::{str_field, Doc, DELIM};
use crate::{data, Error, Result};
use std::path::Path;

pub const FILE: &str = "winogrande/dev.jsonl";

pub fn load(path: &Path) -> Result<Vec<Doc>> {
    data::read_jsonl(path)?
        .iter()
        .map(|(line, v)| {
            let line = *line;
            let sentence = str_field(v, "sentence", path, line)?;
            let blank = sentence
                .find('_')
                .ok_or_else(|| Error::parse(path, line, "'sentence' has no blank '_'"))?;
            let options = [
                str_field(v, "option1", path, line)?,
                str_field(v, "option2", path, line)?,
            ];
            let gold = match str_field(v, "answer", path, line)? {
                "1" => 0,
                "2" => 1,
                other => {
                    return Err(Error::parse(
                        path,
                        line,
                        format!("'answer' must be \"1\" or \"2\", found '{other}'"),
                    ))
                }
            };
            let target = format!("{DELIM}{}", sentence[blank + 1..].trim());
            let contexts: Vec<String> = options
                .iter()
                .map(|o| format!("{}{o}", &sentence[..blank]))
                .collect();
            Ok(Doc {
                requests: contexts
                    .iter()
                    .map(|c| (c.clone(), target.clone()))
                    .collect(),
                choices: contexts,
                gold,
            })
        })
        .collect()
}
