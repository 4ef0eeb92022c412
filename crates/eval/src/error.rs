//! Typed errors of the evaluation harness. Each variant names the file, line or task at fault
//! and what to do, so the CLI can print it as one line.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
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

    #[error("unknown task '{name}' (known: {known}; or a path to a .jsonl task file)")]
    UnknownTask { name: String, known: String },

    /// The task cannot run on this model (wrong architecture, no classification head, …).
    /// `option` names the [`crate::EvalOptions`] field at fault, if one is.
    #[error("task {task}: {msg}")]
    Unsupported {
        task: String,
        msg: String,
        option: Option<&'static str>,
    },

    #[error("{0}")]
    Msg(String),

    /// An option value the task cannot use; `option` is the [`crate::EvalOptions`] field at
    /// fault and the text names options as `field_name`.
    #[error("{msg}")]
    InvalidOption { option: &'static str, msg: String },

    #[error(transparent)]
    Data(#[from] data::Error),

    #[error(transparent)]
    Model(#[from] models::Error),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
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
    pub fn unsupported(task: &str, msg: impl Into<String>) -> Self {
        Error::Unsupported {
            task: task.into(),
            msg: msg.into(),
            option: None,
        }
    }
    /// The task cannot run with this value of `option` (the text names it as `option`).
    pub fn unsupported_option(task: &str, option: &'static str, msg: impl Into<String>) -> Self {
        Error::Unsupported {
            task: task.into(),
            msg: msg.into(),
            option: Some(option),
        }
    }
    pub fn option(option: &'static str, msg: impl Into<String>) -> Self {
        Error::InvalidOption {
            option,
            msg: msg.into(),
        }
    }
    /// The option this error is about, if any.
    pub fn invalid_option(&self) -> Option<&'static str> {
        match self {
            Error::InvalidOption { option, .. } => Some(option),
            Error::Unsupported { option, .. } => *option,
            Error::Data(e) => e.invalid_option(),
            Error::Model(e) => e.invalid_option(),
            _ => None,
        }
    }
}
