//! Finding and reading the benchmark and training data: the data folder (the caller's choice,
//! else `$MPOLM_DATA`, else the project's own `data/`), the datasets it should hold, a small
//! RFC 4180 CSV reader (MMLU), TSV (GLUE) and JSONL with line numbers.
//!
//! Below both the evaluation harness and the training code, so that neither depends on the
//! other to read a file.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// What went wrong reading the data, naming the file (and line) at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A data file or folder is not there; `hint` says where data is looked for, naming the
    /// option that chooses the folder as `data_dir`.
    #[error("{path}: not found ({hint})")]
    MissingData { path: PathBuf, hint: String },

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Malformed input: file and 1-based line number.
    #[error("{path}:{line}: {msg}")]
    Parse {
        path: PathBuf,
        line: usize,
        msg: String,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub fn parse(path: impl Into<PathBuf>, line: usize, msg: impl Into<String>) -> Self {
        Error::Parse {
            path: path.into(),
            line,
            msg: msg.into(),
        }
    }
    /// The option this error is about, if any: a missing file is fixed by choosing the data
    /// folder.
    pub fn invalid_option(&self) -> Option<&'static str> {
        match self {
            Error::MissingData { .. } => Some("data_dir"),
            _ => None,
        }
    }
}

pub const DATA_ENV: &str = "MPOLM_DATA";

/// The project's own `data/` folder. Located at build time because a binary built from a
/// checkout must find the data it ships with from any working directory. When that folder is
/// gone (the checkout moved or was deleted, or an unchanged crate was reused from a target
/// directory another clone built), the nearest `data/` holding `SHA256SUMS` above the working
/// directory is used instead; a binary copied away from any checkout uses `--data-dir` or
/// `$MPOLM_DATA`.
pub fn project_data_dir() -> PathBuf {
    // crates/data → the workspace root.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).ancestors().nth(2);
    let built = root.unwrap_or(Path::new(".")).join("data");
    let cwd = std::env::current_dir().ok();
    pick_project_data_dir(built, cwd.as_deref())
}

fn pick_project_data_dir(built: PathBuf, cwd: Option<&Path>) -> PathBuf {
    let marked = |d: &Path| d.join("SHA256SUMS").is_file();
    if marked(&built) {
        return built;
    }
    cwd.into_iter()
        .flat_map(Path::ancestors)
        .map(|a| a.join("data"))
        .find(|d| marked(d))
        .unwrap_or(built)
}

/// Where the data folder in effect came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataOrigin {
    /// The caller named it.
    Flag,
    /// `$MPOLM_DATA`.
    Env,
    /// The project's own `data/` folder.
    Project,
}

impl DataOrigin {
    pub fn name(self) -> &'static str {
        match self {
            DataOrigin::Flag => "flag",
            DataOrigin::Env => "env",
            DataOrigin::Project => "project",
        }
    }
}

/// The resolution order as a pure function of its inputs: an explicit folder, else a non-empty
/// environment value, else the project's folder.
pub fn resolve_from(
    flag: Option<&Path>,
    env: Option<OsString>,
    project: PathBuf,
) -> (PathBuf, DataOrigin) {
    if let Some(p) = flag {
        return (p.to_path_buf(), DataOrigin::Flag);
    }
    match env {
        Some(v) if !v.is_empty() => (PathBuf::from(v), DataOrigin::Env),
        _ => (project, DataOrigin::Project),
    }
}

/// The data folder in effect and where it came from (see [`resolve_from`]).
pub fn resolve(flag: Option<&Path>) -> (PathBuf, DataOrigin) {
    resolve_from(flag, std::env::var_os(DATA_ENV), project_data_dir())
}

/// The data folder in effect (see [`resolve`]).
pub fn resolve_data_dir(flag: Option<&Path>) -> PathBuf {
    resolve(flag).0
}

/// A dataset the project carries: its folder under the data dir and the files read from it.
pub struct Dataset {
    pub name: &'static str,
    pub folder: &'static str,
    pub files: &'static [&'static str],
}

/// The datasets read by default (MMLU lists one subject per split here; the task
/// checks all 57 when it runs).
pub const DATASETS: &[Dataset] = &[
    Dataset {
        name: "wikitext2",
        folder: "wikitext2",
        files: &["test.txt", "valid.txt"],
    },
    Dataset {
        name: "mmlu",
        folder: "mmlu",
        files: &[
            "dev/abstract_algebra_dev.csv",
            "val/abstract_algebra_val.csv",
            "test/abstract_algebra_test.csv",
        ],
    },
    Dataset {
        name: "gsm8k",
        folder: "gsm8k",
        files: &["test.jsonl", "train.jsonl"],
    },
    Dataset {
        name: "ifeval",
        folder: "ifeval",
        files: &["input_data.jsonl"],
    },
    Dataset {
        name: "sst2",
        folder: "glue/SST-2",
        files: &["train.tsv", "dev.tsv", "test.tsv"],
    },
    Dataset {
        name: "tinyshakespeare",
        folder: "tinyshakespeare",
        files: &["input.txt"],
    },
];

/// Checksums listed in `SHA256SUMS` (sha256sum's format: `<hex>  <path relative to the data
/// dir>`); empty when the file is absent, as in a user's own data folder.
pub fn read_checksums(dir: &Path) -> Result<std::collections::BTreeMap<String, String>> {
    let p = dir.join("SHA256SUMS");
    let mut out = std::collections::BTreeMap::new();
    if !p.is_file() {
        return Ok(out);
    }
    let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
    for (i, l) in text.lines().enumerate() {
        if l.trim().is_empty() {
            continue;
        }
        let (h, f) = l
            .split_once("  ")
            .filter(|(h, _)| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| Error::parse(&p, i + 1, "expected '<sha256 hex>  <path>'"))?;
        out.insert(f.to_string(), h.to_ascii_lowercase());
    }
    Ok(out)
}

fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or_else(|_| p.to_path_buf())
    }
}

/// `path` must exist; otherwise a one-line error naming it (absolute) and how to fix it.
pub fn require(path: &Path) -> Result<PathBuf> {
    if path.exists() {
        Ok(path.to_path_buf())
    } else {
        Err(Error::MissingData {
            path: absolute(path),
            hint: format!(
                "pass another `data_dir` or set {DATA_ENV} to a folder laid out as the project's data/ (wikitext2/, mmlu/, gsm8k/, ifeval/, glue/)"
            ),
        })
    }
}

pub fn read_text(path: &Path) -> Result<String> {
    require(path)?;
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

/// Parse CSV text (RFC 4180: `"` quoting, `""` escapes, newlines inside quotes; LF or CRLF
/// record ends). Returns records with the 1-based line each starts on.
pub fn parse_csv(text: &str, path: &Path) -> Result<Rows> {
    let mut out = Vec::new();
    let mut rec: Vec<String> = Vec::new();
    let mut field = String::new();
    let mut in_quotes = false;
    let mut line = 1usize;
    let mut rec_line = 1usize;
    let mut field_started = false; // anything (even "") seen for the current record
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if in_quotes {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => in_quotes = false,
                '\n' => {
                    line += 1;
                    field.push(c);
                }
                _ => field.push(c),
            }
            continue;
        }
        match c {
            '"' if field.is_empty() => {
                in_quotes = true;
                field_started = true;
            }
            ',' => {
                rec.push(std::mem::take(&mut field));
                field_started = true;
            }
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                if field_started || !field.is_empty() {
                    rec.push(std::mem::take(&mut field));
                    out.push((rec_line, std::mem::take(&mut rec)));
                }
                field_started = false;
                line += 1;
                rec_line = line;
            }
            _ => {
                field.push(c);
                field_started = true;
            }
        }
    }
    if in_quotes {
        return Err(Error::parse(path, rec_line, "unterminated quoted field"));
    }
    if field_started || !field.is_empty() {
        rec.push(field);
        out.push((rec_line, rec));
    }
    Ok(out)
}

/// Records with the 1-based line each starts on.
pub type Rows = Vec<(usize, Vec<String>)>;

/// Tab-separated file with one header line, no quoting (GLUE). Returns the header and the rows
/// with their 1-based line numbers.
pub fn read_tsv(path: &Path) -> Result<(Vec<String>, Rows)> {
    let text = read_text(path)?;
    let mut lines = text.lines().enumerate();
    let header: Vec<String> = match lines.next() {
        Some((_, h)) => h.split('\t').map(String::from).collect(),
        None => return Err(Error::parse(path, 1, "empty file (expected a header line)")),
    };
    let rows = lines
        .filter(|(_, l)| !l.is_empty())
        .map(|(i, l)| (i + 1, l.split('\t').map(String::from).collect()))
        .collect();
    Ok((header, rows))
}

/// JSON objects, one a line (blank lines skipped), each with its 1-based line number.
pub fn read_jsonl(path: &Path) -> Result<Vec<(usize, serde_json::Value)>> {
    let text = read_text(path)?;
    parse_jsonl(&text, path)
}

pub fn parse_jsonl(text: &str, path: &Path) -> Result<Vec<(usize, serde_json::Value)>> {
    let mut out = Vec::new();
    for (i, l) in text.lines().enumerate() {
        if l.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(l)
            .map_err(|e| Error::parse(path, i + 1, format!("invalid JSON: {e}")))?;
        if !v.is_object() {
            return Err(Error::parse(path, i + 1, "expected a JSON object"));
        }
        out.push((i + 1, v));
    }
    if out.is_empty() {
        return Err(Error::parse(path, 1, "no records (empty file)"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vanished_build_time_data_dir_falls_back_to_the_checkout_above_the_working_dir() {
        let d = tempfile::tempdir().unwrap();
        let gone = d.path().join("old-clone/data");
        let here = d.path().join("clone");
        std::fs::create_dir_all(here.join("data")).unwrap();
        std::fs::create_dir_all(here.join("crates/cli")).unwrap();
        let cwd = here.join("crates/cli");
        // No SHA256SUMS yet: nothing is a project data dir, the build-time path stands.
        assert_eq!(pick_project_data_dir(gone.clone(), Some(&cwd)), gone);
        std::fs::write(here.join("data/SHA256SUMS"), "").unwrap();
        assert_eq!(
            pick_project_data_dir(gone.clone(), Some(&cwd)),
            here.join("data")
        );
        // A build-time folder that is still there wins over the working directory.
        std::fs::create_dir_all(&gone).unwrap();
        std::fs::write(gone.join("SHA256SUMS"), "").unwrap();
        assert_eq!(pick_project_data_dir(gone.clone(), Some(&cwd)), gone);
    }

    #[test]
    fn csv_quotes_newlines_and_crlf() {
        let t = "a,\"b, c\",\"say \"\"hi\"\"\"\r\n\"multi\nline\",,x\nlast,1,2";
        let r = parse_csv(t, Path::new("t.csv")).unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!(
            r[0],
            (1, vec!["a".into(), "b, c".into(), "say \"hi\"".into()])
        );
        assert_eq!(r[1], (2, vec!["multi\nline".into(), "".into(), "x".into()]));
        assert_eq!(r[2], (4, vec!["last".into(), "1".into(), "2".into()]));
        let e = parse_csv("a,\"open\n", Path::new("t.csv"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("t.csv:1: unterminated"), "{e}");
    }

    #[test]
    fn missing_data_names_path() {
        let e = read_text(Path::new("/nonexistent/data/mmlu/test"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("/nonexistent/data/mmlu/test: not found"),
            "{e}"
        );
        assert!(e.contains("pass another `data_dir`"), "{e}");
    }
}
