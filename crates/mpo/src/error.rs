//! One error type for the crate. Messages name the offending value so that a caller (or the CLI)
//! can print them as a single line without extra context.

/// Errors produced by shape handling, decomposition, truncation and the candle layers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Factor lists that cannot describe the requested matrix.
    #[error("invalid MPO shape: {0}")]
    Shape(String),

    /// Bond dimensions or truncation requests that do not fit the MPO.
    #[error("invalid bond dimensions: {0}")]
    Bonds(String),

    /// A buffer whose length does not match the shape it is declared with.
    #[error("size mismatch: {what} has {got} elements, expected {expected}")]
    Size {
        what: String,
        got: usize,
        expected: usize,
    },

    /// A dense linear-algebra kernel (SVD, eigendecomposition) failed to converge.
    #[error("linear algebra failure: {0}")]
    Linalg(String),

    /// An unknown preset name.
    #[error("unknown MPO shape preset '{name}' (known: {known})")]
    UnknownPreset { name: String, known: String },

    /// Errors bubbled up from candle when building layers.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Crate-wide result alias.
pub type Result<T> = std::result::Result<T, Error>;
