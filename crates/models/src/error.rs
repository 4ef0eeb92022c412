//! Typed errors for model loading. Every variant names the file or item at fault and, where
//! there is one, what the user should do — the CLI prints them as one line.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("unknown model '{name}': not a directory or .gguf file, and not a known alias (known: {known})")]
    UnknownModel { name: String, known: String },

    #[error("{0}")]
    Fetch(String),

    #[error("{path}: {msg}")]
    Config { path: PathBuf, msg: String },

    #[error("{path}: unsupported architecture '{arch}' (supported: {supported})")]
    UnsupportedArch {
        path: PathBuf,
        arch: String,
        supported: String,
    },

    #[error("{path}: malformed safetensors: {msg}")]
    Safetensors { path: PathBuf, msg: String },

    #[error("{path}: malformed GGUF: {msg}")]
    Gguf { path: PathBuf, msg: String },

    #[error("{path}: tensor '{name}' is missing")]
    MissingTensor { path: PathBuf, name: String },

    #[error("{path}: tensor '{name}' has shape {got:?}, expected {expected:?}")]
    Shape {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("chat template: {0}")]
    Template(String),

    #[error("{0}")]
    Msg(String),

    /// An option value (or combination) that cannot be used; `option` is the field at fault and
    /// the text names options as `field_name`, so a front end can show its own names for them.
    #[error("{msg}")]
    InvalidOption { option: &'static str, msg: String },

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
    pub fn config(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Config {
            path: path.into(),
            msg: msg.into(),
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
            _ => None,
        }
    }
}

#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => { return Err($crate::Error::Msg(format!($($arg)*))) };
}
