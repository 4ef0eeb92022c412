//! The plain MPO data type, its diagnostics and its checkpoint form.
//!
//! Cores are flat row-major buffers so they map 1:1 onto candle/torch tensors and onto
//! safetensors entries; `spectra` keeps the full Schmidt spectrum of the decomposed matrix at
//! every bond, so later code (MPOP squeezing, relative-error truncation) can price a cut
//! without touching the cores.

use crate::error::{Error, Result};
use crate::scalar::{convert, Scalar};
use crate::shapes::MpoShape;
use serde::{Deserialize, Serialize};

/// A matrix W[orig_rows, orig_cols] as a chain of n cores T_k[d_{k-1}, i_k, j_k, d_k].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Mpo<T> {
    /// i_1..i_n (factor the padded rows = out_features).
    pub row_factors: Vec<usize>,
    /// j_1..j_n (factor the padded columns = in_features).
    pub col_factors: Vec<usize>,
    /// Rows before zero-padding.
    pub orig_rows: usize,
    /// Columns before zero-padding.
    pub orig_cols: usize,
    /// d_0..d_n (d_0 = d_n = 1); core k has shape [bond_dims[k], i_k, j_k, bond_dims[k+1]].
    pub bond_dims: Vec<usize>,
    /// Row-major core buffers.
    pub cores: Vec<Vec<T>>,
    /// Schmidt values at bonds 1..n-1 (descending), of the matrix that was decomposed or
    /// last canonicalized; each list has that bond's untruncated length, so the values past
    /// the current bond dimension are exactly the discarded ones.
    pub spectra: Vec<Vec<f64>>,
}

/// JSON-able description of an [`Mpo`]; the cores travel separately as tensors named
/// `core_{k}` with the shapes listed here.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MpoManifest {
    pub row_factors: Vec<usize>,
    pub col_factors: Vec<usize>,
    pub orig_rows: usize,
    pub orig_cols: usize,
    pub bond_dims: Vec<usize>,
    pub core_shapes: Vec<[usize; 4]>,
    pub spectra: Vec<Vec<f64>>,
    /// "f32" or "f64".
    pub dtype: String,
}

impl<T: Scalar> Mpo<T> {
    /// Assembles an MPO from parts, checking every size.
    pub fn from_cores(
        shape: &MpoShape,
        bond_dims: Vec<usize>,
        cores: Vec<Vec<T>>,
        spectra: Vec<Vec<f64>>,
    ) -> Result<Self> {
        let m = Self {
            row_factors: shape.row_factors.clone(),
            col_factors: shape.col_factors.clone(),
            orig_rows: shape.orig_rows,
            orig_cols: shape.orig_cols,
            bond_dims,
            cores,
            spectra,
        };
        m.validate()?;
        Ok(m)
    }

    /// Checks shape, bonds, core sizes and spectra lengths.
    pub fn validate(&self) -> Result<()> {
        let shape = self.shape();
        shape.validate()?;
        shape.check_bonds(&self.bond_dims)?;
        if self.cores.len() != shape.n() {
            return Err(Error::Shape(format!(
                "{} cores for {} sites",
                self.cores.len(),
                shape.n()
            )));
        }
        for k in 0..shape.n() {
            let expected: usize = self.core_shape(k).iter().product();
            if self.cores[k].len() != expected {
                return Err(Error::Size {
                    what: format!("core {k}"),
                    got: self.cores[k].len(),
                    expected,
                });
            }
        }
        if !self.spectra.is_empty() && self.spectra.len() + 1 != shape.n() {
            return Err(Error::Shape(format!(
                "{} spectra for {} bonds",
                self.spectra.len(),
                shape.n() - 1
            )));
        }
        Ok(())
    }

    /// The factor shape (a copy).
    pub fn shape(&self) -> MpoShape {
        MpoShape {
            row_factors: self.row_factors.clone(),
            col_factors: self.col_factors.clone(),
            orig_rows: self.orig_rows,
            orig_cols: self.orig_cols,
        }
    }

    /// Number of sites n.
    pub fn n(&self) -> usize {
        self.cores.len()
    }

    /// Current bond dimensions d_0..d_n.
    pub fn bonds(&self) -> &[usize] {
        &self.bond_dims
    }

    /// [d_{k-1}, i_k, j_k, d_k] of core k (0-based).
    pub fn core_shape(&self, k: usize) -> [usize; 4] {
        [
            self.bond_dims[k],
            self.row_factors[k],
            self.col_factors[k],
            self.bond_dims[k + 1],
        ]
    }

    /// Σ_k d_{k-1} i_k j_k d_k.
    pub fn num_params(&self) -> usize {
        self.cores.iter().map(Vec::len).sum()
    }

    /// ρ = params / (orig_rows · orig_cols); > 1 means over-parameterized (OPF).
    pub fn ratio(&self) -> f64 {
        self.num_params() as f64 / (self.orig_rows * self.orig_cols) as f64
    }

    /// Index of the central tensor (n // 2); all others are auxiliary.
    pub fn central_index(&self) -> usize {
        self.n() / 2
    }

    /// Whether core k is the central tensor.
    pub fn is_central(&self, k: usize) -> bool {
        k == self.central_index()
    }

    /// Fraction of the parameters held by the central tensor.
    pub fn central_share(&self) -> f64 {
        self.cores[self.central_index()].len() as f64 / self.num_params() as f64
    }

    /// ‖W‖_F of the decomposed matrix (from a bond spectrum; exact for any bond).
    pub fn frobenius_norm(&self) -> Option<f64> {
        self.spectra
            .first()
            .map(|s| s.iter().map(|x| x * x).sum::<f64>().sqrt())
    }

    /// Norms ε_k of the singular values discarded at each bond 1..n-1 by the current bonds.
    pub fn discarded_norms(&self) -> Vec<f64> {
        crate::truncate::discarded_norms(&self.spectra, &self.bond_dims)
    }

    /// Error bound sqrt(Σ ε_k²) ≥ ‖W − Ŵ‖_F for the current bonds (NaN when the spectra are
    /// unknown, e.g. for cores imported without them; see [`Mpo::canonicalize`]).
    pub fn error_bound(&self) -> f64 {
        self.error_bound_for(&self.bond_dims)
    }

    /// Error bound the MPO would have with bonds `bond_dims` (d_0..d_n).
    pub fn error_bound_for(&self, bond_dims: &[usize]) -> f64 {
        if self.spectra.len() + 1 != self.n() {
            return f64::NAN;
        }
        crate::truncate::error_bound(&self.spectra, bond_dims)
    }

    /// Entanglement entropy S_k = −Σ p ln p, p = λ²/Σλ², of each bond's full spectrum.
    pub fn entropies(&self) -> Vec<f64> {
        self.spectra.iter().map(|s| entropy(s)).collect()
    }

    /// Exact ‖W − Ŵ‖_F against the original (unpadded, row-major) matrix.
    pub fn frobenius_error(&self, w: &[T]) -> Result<f64> {
        if w.len() != self.orig_rows * self.orig_cols {
            return Err(Error::Size {
                what: "matrix".into(),
                got: w.len(),
                expected: self.orig_rows * self.orig_cols,
            });
        }
        let what = self.to_matrix()?;
        Ok(w.iter()
            .zip(&what)
            .map(|(a, b)| (a.f() - b.f()).powi(2))
            .sum::<f64>()
            .sqrt())
    }

    /// ‖W − Ŵ‖_F / ‖W‖_F.
    pub fn relative_error(&self, w: &[T]) -> Result<f64> {
        let norm = w.iter().map(|x| x.f() * x.f()).sum::<f64>().sqrt();
        Ok(self.frobenius_error(w)? / norm.max(f64::MIN_POSITIVE))
    }

    /// The same MPO in another precision.
    pub fn cast<U: Scalar>(&self) -> Mpo<U> {
        Mpo {
            row_factors: self.row_factors.clone(),
            col_factors: self.col_factors.clone(),
            orig_rows: self.orig_rows,
            orig_cols: self.orig_cols,
            bond_dims: self.bond_dims.clone(),
            cores: self.cores.iter().map(|c| convert(c)).collect(),
            spectra: self.spectra.clone(),
        }
    }

    /// Splits into a JSON-able manifest and the core buffers (checkpoint form).
    pub fn to_parts(&self) -> (MpoManifest, Vec<Vec<T>>) {
        let manifest = MpoManifest {
            row_factors: self.row_factors.clone(),
            col_factors: self.col_factors.clone(),
            orig_rows: self.orig_rows,
            orig_cols: self.orig_cols,
            bond_dims: self.bond_dims.clone(),
            core_shapes: (0..self.n()).map(|k| self.core_shape(k)).collect(),
            spectra: self.spectra.clone(),
            dtype: if T::DTYPE == candle_core::DType::F32 {
                "f32".into()
            } else {
                "f64".into()
            },
        };
        (manifest, self.cores.clone())
    }

    /// Inverse of [`Mpo::to_parts`].
    pub fn from_parts(manifest: &MpoManifest, cores: Vec<Vec<T>>) -> Result<Self> {
        let shape = MpoShape::new(
            manifest.row_factors.clone(),
            manifest.col_factors.clone(),
            manifest.orig_rows,
            manifest.orig_cols,
        )?;
        let m = Self::from_cores(
            &shape,
            manifest.bond_dims.clone(),
            cores,
            manifest.spectra.clone(),
        )?;
        for k in 0..m.n() {
            if manifest.core_shapes.get(k) != Some(&m.core_shape(k)) {
                return Err(Error::Shape(format!(
                    "manifest core {k} shape disagrees with its bonds"
                )));
            }
        }
        Ok(m)
    }

    /// Checkpoint name of core k (the manifest's tensors are `core_0`, `core_1`, …).
    pub fn core_name(k: usize) -> String {
        format!("core_{k}")
    }

    /// Cores as candle tensors of shape [d_{k-1}, i_k, j_k, d_k].
    pub fn core_tensors(&self, device: &candle_core::Device) -> Result<Vec<candle_core::Tensor>> {
        (0..self.n())
            .map(|k| {
                Ok(crate::contract::tensor_from(
                    &self.cores[k],
                    &self.core_shape(k),
                    device,
                )?)
            })
            .collect()
    }
}

/// Entropy −Σ p ln p of p = λ²/Σλ² (0 for an all-zero spectrum).
pub fn entropy(spectrum: &[f64]) -> f64 {
    let total: f64 = spectrum.iter().map(|x| x * x).sum();
    if total <= 0.0 {
        return 0.0;
    }
    spectrum
        .iter()
        .map(|x| x * x / total)
        .filter(|&p| p > 0.0)
        .map(|p| -p * p.ln())
        .sum()
}
