//! Global budget allocation: bond dimensions for many MPOs at once under one parameter budget.
//!
//! Greedy on the (whitened) bond spectra: starting from exact bonds, repeatedly drop the bond
//! index, over all matrices and bonds, whose removal adds the least normalized error per
//! parameter saved, until the total fits the budget. Cutting index d_k − 1 of bond k costs
//! λ²_{k, d_k − 1} of discarded weight (exact for a single cut; the bound sqrt(Σ ε_k²) for
//! several) and saves d_{k−1} m_k + m_{k+1} d_{k+1} parameters.
//!
//! The cost is divided by the matrix's total energy Σ λ² (= ‖W S‖_F², its output energy when
//! the spectra are whitened): matrices sit at very different scales (the residual stream
//! grows with depth, FFN-down inputs are larger than attention inputs), and an absolute error
//! would spend the whole budget on the loudest matrices; what a layer's consumer sees is the
//! fraction of that layer's output that is lost.

use crate::error::{Error, Result};
use crate::shapes::MpoShape;

/// One matrix of the allocation: its factor shape and the spectra of its exact MPO (bonds
/// 1..n−1, descending).
#[derive(Clone, Copy, Debug)]
pub struct Item<'a> {
    pub shape: &'a MpoShape,
    pub spectra: &'a [Vec<f64>],
}

/// The chosen bonds d_0..d_n per item and the bookkeeping of the greedy.
#[derive(Clone, Debug, PartialEq)]
pub struct Allocation {
    pub bonds: Vec<Vec<usize>>,
    /// Σ parameters of the chosen MPOs.
    pub params: usize,
    /// The budget the greedy had to meet.
    pub target: usize,
    /// Parameters saved by the last cut (0 when no cut was needed): the total before that cut
    /// was above `target`, so `target − params < last_saved`.
    pub last_saved: usize,
    /// Number of single-index cuts made.
    pub cuts: usize,
}

/// Normalized predicted error Σ_k ε_k² / Σ λ² of `bonds` for one item.
pub fn normalized_error2(spectra: &[Vec<f64>], bonds: &[usize]) -> f64 {
    let energy = energy(spectra);
    crate::truncate::error_bound(spectra, bonds).powi(2) / energy
}

fn energy(spectra: &[Vec<f64>]) -> f64 {
    let e: f64 = spectra
        .first()
        .map(|s| s.iter().map(|x| x * x).sum())
        .unwrap_or(0.0);
    if e > 0.0 {
        e
    } else {
        1.0
    }
}

/// Bonds for every item so that the total parameter count is at most `target` (see the
/// module docs). Fails when even bond 1 everywhere does not fit.
pub fn allocate_global(items: &[Item<'_>], target: usize) -> Result<Allocation> {
    let mut bonds: Vec<Vec<usize>> = Vec::with_capacity(items.len());
    let mut energies = Vec::with_capacity(items.len());
    let mut params = 0usize;
    for (t, it) in items.iter().enumerate() {
        let full = it.shape.full_bonds();
        if it.spectra.len() + 1 != it.shape.n()
            || it.spectra.iter().zip(&full[1..]).any(|(s, &d)| s.len() < d)
        {
            return Err(Error::Bonds(format!(
                "matrix {t}: the spectra do not cover its {} bonds",
                it.shape.n() - 1
            )));
        }
        params += it.shape.params_for(&full);
        energies.push(energy(it.spectra));
        bonds.push(full);
    }
    let min: usize = items
        .iter()
        .map(|it| it.shape.params_for(&it.shape.capped_bonds(1)))
        .sum();
    if min > target {
        return Err(Error::Bonds(format!(
            "a budget of {target} parameters is below the {min} of bond 1 everywhere"
        )));
    }
    let mut last_saved = 0;
    let mut cuts = 0;
    let locals: Vec<Vec<usize>> = items.iter().map(|it| it.shape.local_dims()).collect();
    while params > target {
        // (score, item, bond, saved)
        let mut best: Option<(f64, usize, usize, usize)> = None;
        for (t, it) in items.iter().enumerate() {
            let (b, m) = (&bonds[t], &locals[t]);
            for k in 1..m.len() {
                if b[k] <= 1 {
                    continue;
                }
                let v = it.spectra[k - 1][b[k] - 1];
                let saved = b[k - 1] * m[k - 1] + m[k] * b[k + 1];
                let score = v * v / energies[t] / saved as f64;
                if best.is_none_or(|(s, ..)| score < s) {
                    best = Some((score, t, k, saved));
                }
            }
        }
        let Some((_, t, k, saved)) = best else {
            // Unreachable after the bond-1 check; kept as an error rather than a panic.
            return Err(Error::Bonds("no bond left to cut".into()));
        };
        bonds[t][k] -= 1;
        params -= saved;
        last_saved = saved;
        cuts += 1;
    }
    Ok(Allocation {
        bonds,
        params,
        target,
        last_saved,
        cuts,
    })
}
