//! Calibrated (activation-aware) truncation: decompose W·S instead of W, where S whitens the
//! matrix's inputs, so that a discarded Schmidt value is output error instead of weight error.
//!
//! W is stored [out, in] and applied as y = x Wᵀ. With the input Gram G = Σ x xᵀ (in × in) and
//! any S with S Sᵀ = G, ‖(W − Ŵ)X‖_F² = tr(ΔW G ΔWᵀ) = ‖ΔW S‖_F². Decomposing W' = W S,
//! truncating W' to Ŵ' and setting Ŵ = Ŵ' S⁻¹ makes the output error exactly ‖W' − Ŵ'‖_F, which
//! the MPO bound sqrt(Σ_k ε_k²) controls (with equality when one bond is cut; with n = 2 that
//! is the Eckart–Young optimum of the weighted problem, i.e. SVD-LLM).
//!
//! S⁻¹ has to be folded back into the cores without growing their bonds. A core only carries
//! its own input leg j_k, so the fold is exact for a whitening that factors over the legs,
//! S = S_1 ⊗ … ⊗ S_n (S_k of size j_k × j_k acting on site k's leg). [`Whitening`] is always
//! such a product:
//!
//! * [`Whitening::cholesky`] fits the Kronecker structure to G by normalized partial traces
//!   (G_k = Tr_{¬k} G scaled to mean diagonal 1, times the scalar mean diag(G)) and takes each
//!   factor's Cholesky. The Cholesky factor of a Kronecker product is the product of the
//!   factors' Cholesky factors, so this is exact when G itself is Kronecker-structured, and
//!   always exact when a single site carries every input (the n = 2 layout i = [out, 1],
//!   j = [1, in]: plain SVD-LLM). Otherwise it is an approximation whose quality the caller
//!   measures with [`output_error2`] against the full G.
//! * [`Whitening::diagonal`] is ASVD's S = diag(s) with s_j = (mean |x_j|)^α; over several
//!   legs s is replaced by its best per-leg product, fitted by least squares in log space (the
//!   multiplicative main effects: exact when s is a product, and scale-free).
//!
//! Every factor is lower triangular (a Kronecker product of lower-triangular factors is lower
//! triangular in the row-major multi-index), so zero-padded input columns (at the end) stay
//! zero in W·S.

use crate::error::{Error, Result};
use crate::linalg::{gemm, view};
use crate::mpo::Mpo;
use crate::shapes::MpoShape;
use crate::truncate::Truncation;
use faer::{Mat, Side};

/// S = s_1 ⊗ … ⊗ S_n over the column factors of an MPO shape: per site a lower-triangular
/// j_k × j_k factor (row-major) and its inverse.
#[derive(Clone, Debug, PartialEq)]
pub struct Whitening {
    /// j_1..j_n.
    pub col_factors: Vec<usize>,
    /// S_k, row-major j_k × j_k, lower triangular.
    pub factors: Vec<Vec<f64>>,
    /// S_k⁻¹, row-major j_k × j_k, lower triangular.
    pub inverses: Vec<Vec<f64>>,
}

/// Whether S S ᵀ = G holds exactly for this shape (only one leg has more than one input).
pub fn kronecker_exact(shape: &MpoShape) -> bool {
    shape.col_factors.iter().filter(|&&j| j > 1).count() <= 1
}

/// G + damp · mean(diag G) · I for a row-major n × n Gram. A Gram whose diagonal is all zero
/// (no input ever reached the matrix) has no scale to damp with and is refused.
pub fn damped(g: &[f64], n: usize, damp: f64) -> Result<Vec<f64>> {
    check_len("Gram matrix", g.len(), n * n)?;
    if !(damp >= 0.0 && damp.is_finite()) {
        return Err(Error::Linalg(format!(
            "damping must be finite and ≥ 0, got {damp}"
        )));
    }
    let mean = (0..n).map(|i| g[i * n + i]).sum::<f64>() / n.max(1) as f64;
    if !(mean > 0.0 && mean.is_finite()) {
        return Err(Error::Linalg(format!(
            "the input Gram matrix has mean diagonal {mean}: no activations to whiten with"
        )));
    }
    let mut out = g.to_vec();
    for i in 0..n {
        out[i * n + i] += damp * mean;
    }
    Ok(out)
}

fn check_len(what: &str, got: usize, expected: usize) -> Result<()> {
    if got != expected {
        return Err(Error::Size {
            what: what.into(),
            got,
            expected,
        });
    }
    Ok(())
}

/// Lower Cholesky factor of a row-major symmetric positive-definite matrix.
fn cholesky(a: &[f64], n: usize) -> Result<Vec<f64>> {
    let llt = view(a, n, n).llt(Side::Lower).map_err(|_| {
        Error::Linalg(format!(
            "a {n}×{n} input Gram factor is not positive definite (raise the damping)"
        ))
    })?;
    let l = llt.L();
    let mut out = vec![0.0; n * n];
    for r in 0..n {
        for c in 0..=r {
            out[r * n + c] = l[(r, c)];
        }
    }
    Ok(out)
}

/// Inverse of a row-major lower-triangular matrix with a non-zero diagonal.
fn lower_inverse(l: &[f64], n: usize) -> Result<Vec<f64>> {
    for i in 0..n {
        let d = l[i * n + i];
        if !(d != 0.0 && d.is_finite()) {
            return Err(Error::Linalg(format!(
                "whitening factor has diagonal entry {d} at {i}: not invertible"
            )));
        }
        if (i + 1..n).any(|c| l[i * n + c] != 0.0) {
            return Err(Error::Linalg(
                "whitening factors must be lower triangular".into(),
            ));
        }
    }
    let mut inv = Mat::<f64>::zeros(n, n);
    faer::linalg::triangular_inverse::invert_lower_triangular(
        inv.as_mut(),
        view(l, n, n),
        faer::Par::Seq,
    );
    let mut out = vec![0.0; n * n];
    for r in 0..n {
        for c in 0..=r {
            out[r * n + c] = inv[(r, c)];
        }
    }
    if out.iter().any(|v| !v.is_finite()) {
        return Err(Error::Linalg(
            "whitening factor is too ill-conditioned to invert".into(),
        ));
    }
    Ok(out)
}

/// out[a, q, b] = Σ_p x[a, p, b] · m[p, q] for x viewed as [a, j, b] (m is j × j): a matrix
/// acting on one leg of a multi-index.
fn apply_leg(x: &[f64], a: usize, j: usize, b: usize, m: &[f64]) -> Vec<f64> {
    debug_assert_eq!(x.len(), a * j * b);
    if j == 1 {
        let s = m[0];
        return x.iter().map(|v| v * s).collect();
    }
    if b == 1 {
        return gemm(x, false, m, false, a, j, j);
    }
    let mut out = Vec::with_capacity(x.len());
    for blk in x.chunks(j * b) {
        // [j, b] block: mᵀ · block
        out.extend(gemm(m, true, blk, false, j, j, b));
    }
    out
}

/// Sizes before and after leg k of a multi-index with factors `f`.
fn around(f: &[usize], k: usize) -> (usize, usize) {
    (f[..k].iter().product(), f[k + 1..].iter().product())
}

impl Whitening {
    /// S = I (calibration off): every path through it equals the plain decomposition.
    pub fn identity(col_factors: &[usize]) -> Self {
        let eye = |j: usize| {
            let mut v = vec![0.0; j * j];
            for i in 0..j {
                v[i * j + i] = 1.0;
            }
            v
        };
        Self {
            col_factors: col_factors.to_vec(),
            factors: col_factors.iter().map(|&j| eye(j)).collect(),
            inverses: col_factors.iter().map(|&j| eye(j)).collect(),
        }
    }

    /// From explicit lower-triangular factors S_k (row-major j_k × j_k).
    pub fn from_factors(col_factors: &[usize], factors: Vec<Vec<f64>>) -> Result<Self> {
        if factors.len() != col_factors.len() {
            return Err(Error::Shape(format!(
                "{} whitening factors for {} sites",
                factors.len(),
                col_factors.len()
            )));
        }
        let mut inverses = Vec::with_capacity(factors.len());
        for (k, (f, &j)) in factors.iter().zip(col_factors).enumerate() {
            check_len(&format!("whitening factor {k}"), f.len(), j * j)?;
            inverses.push(lower_inverse(f, j)?);
        }
        Ok(Self {
            col_factors: col_factors.to_vec(),
            factors,
            inverses,
        })
    }

    /// Kronecker-factored Cholesky whitening of a (damped) Gram `g` of the matrix's
    /// `shape.orig_cols` inputs (row-major). Padded inputs get the mean diagonal, so they are
    /// neutral in the partial traces (their weight columns are zero anyway).
    pub fn cholesky(g: &[f64], shape: &MpoShape) -> Result<Self> {
        let (n0, cols) = (shape.orig_cols, shape.cols());
        check_len("Gram matrix", g.len(), n0 * n0)?;
        let mean = (0..n0).map(|i| g[i * n0 + i]).sum::<f64>() / n0 as f64;
        if !(mean > 0.0 && mean.is_finite()) {
            return Err(Error::Linalg(format!(
                "the input Gram matrix has mean diagonal {mean}: no activations to whiten with"
            )));
        }
        let gp: std::borrow::Cow<[f64]> = if cols == n0 {
            std::borrow::Cow::Borrowed(g)
        } else {
            let mut p = vec![0.0; cols * cols];
            for r in 0..n0 {
                p[r * cols..r * cols + n0].copy_from_slice(&g[r * n0..(r + 1) * n0]);
            }
            for i in n0..cols {
                p[i * cols + i] = mean;
            }
            std::borrow::Cow::Owned(p)
        };
        let f = &shape.col_factors;
        let mut factors = Vec::with_capacity(f.len());
        for k in 0..f.len() {
            let j = f[k];
            let (a, b) = around(f, k);
            // G_k[p, q] = Σ_{x, y} G[(x, p, y), (x, q, y)]
            let mut gk = vec![0.0; j * j];
            for x in 0..a {
                for p in 0..j {
                    for q in 0..j {
                        let mut acc = 0.0;
                        for y in 0..b {
                            acc += gp[((x * j + p) * b + y) * cols + (x * j + q) * b + y];
                        }
                        gk[p * j + q] += acc;
                    }
                }
            }
            let tr = (0..j).map(|i| gk[i * j + i]).sum::<f64>() / j as f64;
            gk.iter_mut().for_each(|v| *v /= tr);
            let mut s = cholesky(&gk, j)?;
            if k == 0 {
                let sc = mean.sqrt();
                s.iter_mut().for_each(|v| *v *= sc);
            }
            factors.push(s);
        }
        Self::from_factors(f, factors)
    }

    /// ASVD-style diagonal whitening diag(s) for per-input scales `s` (length orig_cols, all
    /// > 0), as its best per-leg product (least squares on log s; exact when one leg carries
    /// every input). Padded inputs take the geometric mean, neutral in the fit.
    pub fn diagonal(s: &[f64], shape: &MpoShape) -> Result<Self> {
        let (n0, cols) = (shape.orig_cols, shape.cols());
        check_len("input scales", s.len(), n0)?;
        if let Some(bad) = s.iter().find(|v| !(**v > 0.0 && v.is_finite())) {
            return Err(Error::Linalg(format!(
                "input scales must be finite and > 0, got {bad}"
            )));
        }
        let mut l: Vec<f64> = s.iter().map(|v| v.ln()).collect();
        let mu = l.iter().sum::<f64>() / n0 as f64;
        l.resize(cols, mu);
        let f = &shape.col_factors;
        let mut factors = Vec::with_capacity(f.len());
        for k in 0..f.len() {
            let j = f[k];
            let (a, b) = around(f, k);
            let mut eff = vec![0.0; j];
            for x in 0..a {
                for p in 0..j {
                    for y in 0..b {
                        eff[p] += l[(x * j + p) * b + y];
                    }
                }
            }
            let mut d = vec![0.0; j * j];
            for p in 0..j {
                let main = eff[p] / (a * b) as f64 - mu;
                let e = if k == 0 { main + mu } else { main };
                d[p * j + p] = e.exp();
            }
            factors.push(d);
        }
        Self::from_factors(f, factors)
    }

    /// The full S = S_1 ⊗ … ⊗ S_n (cols × cols, row-major; cols the padded column count).
    pub fn matrix(&self) -> Vec<f64> {
        let mut s = vec![1.0];
        let mut dim = 1;
        for (f, &j) in self.factors.iter().zip(&self.col_factors) {
            let nd = dim * j;
            let mut next = vec![0.0; nd * nd];
            for r1 in 0..dim {
                for c1 in 0..dim {
                    let v = s[r1 * dim + c1];
                    if v == 0.0 {
                        continue;
                    }
                    for r2 in 0..j {
                        for c2 in 0..j {
                            next[(r1 * j + r2) * nd + c1 * j + c2] = v * f[r2 * j + c2];
                        }
                    }
                }
            }
            s = next;
            dim = nd;
        }
        s
    }

    /// W·S for a row-major `rows × cols` matrix (cols the padded column count).
    pub fn apply(&self, w: &[f64], rows: usize) -> Vec<f64> {
        let f = &self.col_factors;
        let mut x = w.to_vec();
        for k in 0..f.len() {
            let (a, b) = around(f, k);
            x = apply_leg(&x, rows * a, f[k], b, &self.factors[k]);
        }
        x
    }

    /// Folds S⁻¹ into the cores: core k ← core k ×_{j_k} S_k⁻¹, so the MPO of W·S becomes an
    /// MPO of (W·S)·S⁻¹ with the same bonds. The spectra stay those of W·S (the whitened
    /// Schmidt values): slicing a bond later still truncates in the whitened basis, since the
    /// fold only touches the input legs.
    pub fn fold(&self, m: &mut Mpo<f64>) -> Result<()> {
        if m.col_factors != self.col_factors {
            return Err(Error::Shape(format!(
                "whitening over column factors {:?} cannot fold into an MPO with {:?}",
                self.col_factors, m.col_factors
            )));
        }
        for k in 0..m.n() {
            let [l, i, j, r] = m.core_shape(k);
            m.cores[k] = apply_leg(&m.cores[k], l * i, j, r, &self.inverses[k]);
        }
        Ok(())
    }
}

/// MPO of the row-major `shape.orig_rows × shape.orig_cols` matrix `w` truncated in the
/// whitened basis: Ŵ = MPO(W·S)·S⁻¹. The returned spectra are W·S's, so
/// `error_bound()` is the predicted output error ‖(W − Ŵ)·S‖_F.
pub fn decompose_whitened(
    w: &[f64],
    shape: &MpoShape,
    s: &Whitening,
    truncation: &Truncation,
) -> Result<Mpo<f64>> {
    shape.validate()?;
    check_len("matrix", w.len(), shape.orig_rows * shape.orig_cols)?;
    let (rows, cols) = (shape.rows(), shape.cols());
    // Whiten the padded matrix and decompose it as an unpadded one, so padded columns of
    // W·S are decomposed as they are rather than assumed zero.
    let mut wp = vec![0.0; rows * cols];
    for r in 0..shape.orig_rows {
        wp[r * cols..r * cols + shape.orig_cols]
            .copy_from_slice(&w[r * shape.orig_cols..(r + 1) * shape.orig_cols]);
    }
    let ws = s.apply(&wp, rows);
    let exact = MpoShape::exact(shape.row_factors.clone(), shape.col_factors.clone())?;
    // Full decomposition, then slicing: the arithmetic of `Mpo::decompose(..).truncate(..)`
    // (what plain compression runs), so that S = I reproduces it bit for bit.
    let mut m = Mpo::<f64>::decompose(&ws, &exact)?.truncate(truncation)?;
    s.fold(&mut m)?;
    Mpo::from_cores(shape, m.bond_dims, m.cores, m.spectra)
}

/// tr(ΔW G ΔWᵀ) = ‖ΔW·X‖_F² for a row-major `rows × cols` ΔW and the cols × cols Gram G.
pub fn output_error2(dw: &[f64], rows: usize, cols: usize, g: &[f64]) -> Result<f64> {
    check_len("matrix", dw.len(), rows * cols)?;
    check_len("Gram matrix", g.len(), cols * cols)?;
    let t = gemm(dw, false, g, false, rows, cols, cols);
    Ok(t.iter().zip(dw).map(|(a, b)| a * b).sum::<f64>().max(0.0))
}

/// Σ_ij ΔW_ij² s_j²: the error in a diagonal metric diag(s) (ASVD's).
pub fn diagonal_error2(dw: &[f64], rows: usize, s: &[f64]) -> Result<f64> {
    check_len("matrix", dw.len(), rows * s.len())?;
    Ok(dw
        .chunks(s.len().max(1))
        .map(|row| row.iter().zip(s).map(|(x, d)| (x * d).powi(2)).sum::<f64>())
        .sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legs_and_kronecker_matrix_agree() {
        // W·S by legs equals W times the explicit Kronecker product.
        let f = vec![2usize, 3, 2];
        let facs: Vec<Vec<f64>> = f
            .iter()
            .enumerate()
            .map(|(k, &j)| {
                let mut v = vec![0.0; j * j];
                for r in 0..j {
                    for c in 0..=r {
                        v[r * j + c] =
                            1.0 + 0.3 * (r + 2 * c + k) as f64 - if r == c { 0.2 } else { 0.0 };
                    }
                }
                v
            })
            .collect();
        let s = Whitening::from_factors(&f, facs).unwrap();
        let cols = 12;
        let w: Vec<f64> = (0..3 * cols).map(|i| ((i * 7) % 11) as f64 - 5.0).collect();
        let by_legs = s.apply(&w, 3);
        let full = gemm(&w, false, &s.matrix(), false, 3, cols, cols);
        for (a, b) in by_legs.iter().zip(&full) {
            assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        }
        // S⁻¹ by legs undoes S.
        let id = Whitening {
            factors: s.inverses.clone(),
            inverses: s.factors.clone(),
            col_factors: f.clone(),
        };
        let back = id.apply(&by_legs, 3);
        for (a, b) in back.iter().zip(&w) {
            assert!((a - b).abs() < 1e-10, "{a} vs {b}");
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        assert!(damped(&[0.0; 4], 2, 0.01).is_err());
        assert!(damped(&[1.0; 3], 2, 0.01).is_err());
        assert!(Whitening::from_factors(&[2], vec![vec![1.0, 1.0, 0.0, 1.0]]).is_err());
        assert!(Whitening::from_factors(&[2], vec![vec![0.0, 0.0, 0.0, 1.0]]).is_err());
        let shape = MpoShape::exact(vec![2, 2], vec![2, 2]).unwrap();
        assert!(Whitening::diagonal(&[1.0, 0.0, 1.0, 1.0], &shape).is_err());
        assert!(Whitening::cholesky(&[0.0; 16], &shape).is_err());
    }
}
