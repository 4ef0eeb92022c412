//! PIQA (Bisk et al.), validation split as the authors publish it: `piqa/valid.jsonl`
//! (`{"id", "goal", "sol1", "sol2"}`) and `piqa/valid-labels.lst` (one 0/1 a line, the correct
//! solution). lm-eval 0.4.x: "Question: {goal}\nAnswer:", choices " {sol1}", " {sol2}"; acc,
//! acc_norm.

use super::zeroshot::{str_field, Doc};
use crate::{data, Error, Result};
use std::path::Path;

pub const FILE: &str = "piqa/valid.jsonl";
pub const LABELS_FILE: &str = "piqa/valid-labels.lst";

pub fn load(path: &Path, labels_path: &Path) -> Result<Vec<Doc>> {
    let rows = data::read_jsonl(path)?;
    let text = data::read_text(labels_path)?;
    let labels: Vec<(usize, &str)> = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim()))
        .filter(|(_, l)| !l.is_empty())
        .collect();
    if labels.len() != rows.len() {
        return Err(Error::Msg(format!(
            "{}: {} labels for {} questions in {}",
            labels_path.display(),
            labels.len(),
            rows.len(),
            path.display()
        )));
    }
    rows.iter()
        .zip(&labels)
        .map(|((line, v), (lline, l))| {
            let gold = match *l {
                "0" => 0,
                "1" => 1,
                other => {
                    return Err(Error::parse(
                        labels_path,
                        *lline,
                        format!("label must be 0 or 1, found '{other}'"),
                    ))
                }
            };
            let goal = str_field(v, "goal", path, *line)?;
            let sols = vec![
                str_field(v, "sol1", path, *line)?.to_string(),
                str_field(v, "sol2", path, *line)?.to_string(),
            ];
            Ok(Doc::choice(
                format!("Question: {goal}\nAnswer:"),
                sols,
                gold,
            ))
        })
        .collect()
}
