//! Matrix product operator (tensor-train) math shared by every seed method (MPOP, OPF, MPOE,
//! MPOBERT): factor shapes and padding ([`shapes`]), exact decomposition into the symmetric
//! canonical gauge with per-bond spectra ([`decompose`]), truncation and its error bound
//! ([`truncate`]), truncation in an activation-whitened basis ([`whiten`]) and one parameter
//! budget spread over many matrices ([`allocate`]), contraction back to the matrix or through an input batch ([`contract`]), and
//! candle layers with per-core trainable flags ([`layer`]). No model code lives here.
//!
//! ```
//! use mpo::{Mpo, MpoShape, Truncation};
//! let shape = MpoShape::auto(12, 8, 3).unwrap();
//! let w: Vec<f64> = (0..96).map(|i| ((i * 37 % 11) as f64 - 5.0) / 7.0).collect();
//! let full = Mpo::decompose(&w, &shape).unwrap();
//! assert!(full.relative_error(&w).unwrap() < 1e-12);
//! let cut = full.truncate(&Truncation::MaxBond(2)).unwrap();
//! assert!(cut.frobenius_error(&w).unwrap() <= cut.error_bound() * (1.0 + 1e-9));
//! ```

pub mod allocate;
pub mod bench;
pub mod contract;
pub mod decompose;
pub mod error;
pub mod layer;
pub mod linalg;
pub mod mpo;
pub mod permute;
pub mod scalar;
pub mod shapes;
pub mod shared;
pub mod truncate;
pub mod whiten;

pub use contract::{apply_cores, dense_from_cores, dense_from_cores_with, embed_cores};
pub use decompose::{Algorithm, DecomposeOptions, Precision};
pub use error::{Error, Result};
pub use layer::{ForwardMode, MpoCores, MpoEmbedding, MpoLinear};
pub use mpo::{entropy, Mpo, MpoManifest};
pub use scalar::Scalar;
pub use shapes::{
    balanced_factors, factor_or_pad, opf_split, preset, presets, table_factors, MpoShape, Preset,
    OPF_MAX_SITES,
};
pub use truncate::{error_bound, select_bonds, Truncation};
pub use whiten::{decompose_whitened, output_error2, Whitening};
