//! What a user needs to choose MPO bonds (`mpolm spectrum`): each chosen weight matrix
//! decomposed exactly as [`crate::mpop::compress`] would (same selection, shapes and
//! decomposition), with its per-bond Schmidt spectra and the error-bound-vs-parameters curve.

use crate::mpop::{self, Shapes};
use crate::{Error, Result};
use models::Model;
use mpo::Mpo;

pub struct MatrixSpectrum {
    pub name: String,
    pub component: String,
    /// The full-bond (exact) MPO.
    pub mpo: Mpo<f32>,
    pub fro: f64,
    pub full_rel_error: f64,
    /// (parameter ratio, relative error bound) for a sweep of uniform bond caps.
    pub curve: Vec<(f64, f64)>,
    /// The sweep point nearest below half the dense parameters: (ratio, bound, exact error).
    pub half_budget: Option<(f64, f64, f64)>,
}

/// Decompose the layers `names` (from [`mpop::select`]) of `m` over `n` sites.
pub fn analyse(
    m: &Model,
    names: &[String],
    n: usize,
    shapes: Shapes,
    progress: bool,
) -> Result<Vec<MatrixSpectrum>> {
    let chosen: Vec<_> = m
        .linears()
        .into_iter()
        .filter(|(name, _)| names.contains(name))
        .collect();
    let pb = mpop::matrix_bar("decomposing", chosen.len(), progress);
    let mut out = Vec::new();
    for (name, l) in chosen {
        pb.set_message(name.clone());
        let (data, rows, cols) = mpop::weight_matrix(l)?;
        let shape = mpop::mpo_shape(shapes, rows, cols, n).map_err(|e| {
            Error::Msg(format!(
                "{name}: no MPO shape for {rows}x{cols} with n = {n}: {e}"
            ))
        })?;
        let mpo = Mpo::<f32>::decompose(&data, &shape)
            .map_err(|e| Error::Msg(format!("{name}: decomposition failed: {e}")))?;
        let fro = mpop::frobenius(&data);
        let full_rel_error = mpo.relative_error(&data)?;
        let full = shape.full_bonds();
        let maxb = *full.iter().max().unwrap_or(&1);
        let mut caps: Vec<usize> = (0..=64)
            .map(|i| ((maxb as f64).powf(i as f64 / 64.0)).round() as usize)
            .collect();
        caps.dedup();
        let dense = shape.dense_params() as f64;
        let curve: Vec<(f64, f64)> = caps
            .iter()
            .map(|&d| {
                let b = shape.capped_bonds(d);
                (
                    shape.params_for(&b) as f64 / dense,
                    mpo.error_bound_for(&b) / fro.max(1e-30),
                )
            })
            .collect();
        // The bound sums every bond's discarded weight; one exact point shows how loose it is.
        let half_budget = match caps
            .iter()
            .rev()
            .find(|&&d| shape.params_for(&shape.capped_bonds(d)) as f64 <= 0.5 * dense)
        {
            Some(&d) => {
                let b = shape.capped_bonds(d);
                let cut = mpo.truncate_to(&b)?;
                Some((
                    shape.params_for(&b) as f64 / dense,
                    mpo.error_bound_for(&b) / fro.max(1e-30),
                    cut.relative_error(&data)?,
                ))
            }
            None => None,
        };
        out.push(MatrixSpectrum {
            component: models::model::component(&name).to_string(),
            name,
            mpo,
            fro,
            full_rel_error,
            curve,
            half_budget,
        });
        pb.inc(1);
    }
    pb.finish_and_clear();
    Ok(out)
}
