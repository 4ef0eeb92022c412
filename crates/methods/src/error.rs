//! The methods crate's one error type (MPOP, squeezing, LoRA, quantization and fine-tuning all
//! return it), so that errors cross between methods without conversion.

/// An error of a method. Texts name options by their field names in backticks (`lora_r`);
/// [`Error::option`] tells a front end that the error concerns an option, so it can show its
/// own name for it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Model(#[from] models::Error),
    #[error(transparent)]
    Mpo(#[from] mpo::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Data(#[from] data::Error),
    /// An option value (or combination) the method cannot use; `option` is the field at fault.
    #[error("{msg}")]
    InvalidOption { option: &'static str, msg: String },
    #[error("{0}")]
    Msg(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn option(option: &'static str, msg: impl Into<String>) -> Self {
        Error::InvalidOption {
            option,
            msg: msg.into(),
        }
    }

    /// The option this error is about, if any (its text names options as `field_name`).
    pub fn invalid_option(&self) -> Option<&'static str> {
        match self {
            Error::InvalidOption { option, .. } => Some(option),
            Error::Model(e) => e.invalid_option(),
            Error::Data(e) => e.invalid_option(),
            _ => None,
        }
    }
}
