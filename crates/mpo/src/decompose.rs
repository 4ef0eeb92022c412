//! Decomposition of a matrix into an MPO in the symmetric canonical gauge.
//!
//! Both algorithms return the same MPO (up to the sign of each bond vector):
//!
//! * [`Algorithm::SvdSweep`] is the seed algorithm: reshape W to [i_1..i_n, j_1..j_n], permute
//!   to (i_1, j_1, …, i_n, j_n), then for k = 1..n−1 take a thin SVD of the residual reshaped to
//!   d_{k−1}·i_k·j_k rows, keep U as core k and carry diag(λ)·Vᵀ on. Every SVD acts on the whole
//!   remaining matrix, so its singular values are W's Schmidt values at that bond and U is the
//!   Schmidt basis: the sweep already yields the left-canonical Vidal form, and the symmetric
//!   gauge is a diagonal rescaling (the seed code reaches the same point with three more
//!   rounds of SVDs).
//! * [`Algorithm::Gram`] (default) gets the same Schmidt bases from Gram matrices. With exact
//!   bonds, bond k is "left" when ∏_{m≤k} i_m j_m ≤ ∏_{m>k} i_m j_m and then d_k is the full
//!   left dimension, so its Schmidt basis is simply the eigenbasis of the left Gram matrix.
//!   The Gram of the largest left bond is formed once with one pass over W, the smaller ones
//!   are partial traces of it, and the right bonds mirror this. One more pass builds the
//!   central core. This replaces n−1 large SVDs by two symmetric rank-k updates, small
//!   eigendecompositions and two GEMMs, and computes only the kept slices of the central core
//!   when a truncation is requested up front.
//!
//! Symmetric gauge: core k = Λ_{k−1}^{1/2} Γ_k Λ_k^{1/2} (Vidal), i.e. √λ of every bond is
//! absorbed on both sides. The rescaling uses the same number for λ^{1/2} and λ^{−1/2} across a
//! bond, so the contraction is exact whatever the spectrum; Schmidt values below √ε·λ_max are
//! floored there so that (numerically) null bond directions cannot blow up core entries.

use crate::error::{Error, Result};
use crate::linalg::{
    eigh_desc, gemm, gemm_into, gemm_left_in_place, gemm_right_in_place, gram, thin_qr, thin_svd,
    PANEL,
};
use crate::mpo::Mpo;
use crate::permute::{interleave_map, permute};
use crate::scalar::{convert, Scalar};
use crate::shapes::MpoShape;
use crate::truncate::{select_bonds, Truncation};
use serde::{Deserialize, Serialize};

/// Which decomposition algorithm to run (same result, different cost).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Algorithm {
    /// Gram matrices + symmetric eigendecompositions (fast; default).
    #[default]
    Gram,
    /// The seed algorithm's sequential thin SVDs (faer).
    SvdSweep,
}

/// Arithmetic precision of the decomposition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Precision {
    /// Compute in f64 whatever the input type (accurate spectra for f32 weights; default).
    #[default]
    F64,
    /// Compute in the input type. For f32 this halves memory traffic and GEMM time, but the
    /// full-bond reconstruction is only good to ~1e-5 relative (vs ~1e-7) and small Schmidt
    /// values lose accuracy.
    Native,
}

/// Options for [`Mpo::decompose_with`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
pub struct DecomposeOptions {
    pub algorithm: Algorithm,
    pub precision: Precision,
    /// Applied during the decomposition (cheaper than truncating afterwards for the Gram
    /// algorithm); the full spectra are kept either way.
    pub truncation: Truncation,
}

impl DecomposeOptions {
    /// Default options with a truncation.
    pub fn truncated(truncation: Truncation) -> Self {
        Self {
            truncation,
            ..Self::default()
        }
    }
}

type Parts<R> = (Vec<usize>, Vec<Vec<R>>, Vec<Vec<f64>>);

impl<T: Scalar> Mpo<T> {
    /// Exact MPO of a row-major `orig_rows × orig_cols` matrix with default options.
    pub fn decompose(w: &[T], shape: &MpoShape) -> Result<Self> {
        Self::decompose_with(w, shape, &DecomposeOptions::default())
    }

    /// MPO of a row-major `orig_rows × orig_cols` matrix.
    pub fn decompose_with(w: &[T], shape: &MpoShape, opts: &DecomposeOptions) -> Result<Self> {
        shape.validate()?;
        let expected = shape.orig_rows * shape.orig_cols;
        if w.len() != expected {
            return Err(Error::Size {
                what: "matrix".into(),
                got: w.len(),
                expected,
            });
        }
        let (bonds, cores, spectra) =
            if opts.precision == Precision::F64 && T::DTYPE != candle_core::DType::F64 {
                let (b, c, s) = run::<f64>(&pad(&convert::<T, f64>(w), shape), shape, opts)?;
                (b, c.iter().map(|c| convert::<f64, T>(c)).collect(), s)
            } else {
                run::<T>(&pad(w, shape), shape, opts)?
            };
        Mpo::from_cores(shape, bonds, cores, spectra)
    }

    /// Brings an MPO with arbitrary cores (e.g. after fine-tuning) back to the symmetric
    /// canonical gauge and recomputes its bond spectra, without forming the matrix: a QR
    /// sweep left to right, then an SVD sweep right to left. Bonds may shrink to
    /// min(d_{k−1}·i_k·j_k, d_k) where a core is rank-deficient by shape.
    pub fn canonicalize(&self) -> Result<Mpo<T>> {
        let shape = self.shape();
        let m = shape.local_dims();
        let n = self.n();
        let mut d = self.bond_dims.clone();
        let mut cores: Vec<Vec<f64>> = self.cores.iter().map(|c| convert::<T, f64>(c)).collect();
        // Left-orthonormalize.
        for k in 0..n.saturating_sub(1) {
            let (rows, cols) = (d[k] * m[k], d[k + 1]);
            let (q, r) = thin_qr(&cores[k], rows, cols);
            let rk = rows.min(cols);
            cores[k] = q;
            cores[k + 1] = gemm(
                &r,
                false,
                &cores[k + 1],
                false,
                rk,
                cols,
                m[k + 1] * d[k + 2],
            );
            d[k + 1] = rk;
        }
        // Right sweep: SVD of each centre gives the exact Schmidt values of that bond.
        let mut spectra = vec![Vec::new(); n.saturating_sub(1)];
        for k in (1..n).rev() {
            let (rows, cols) = (d[k], m[k] * d[k + 1]);
            let (u, s, vt) = thin_svd(&cores[k], rows, cols)?;
            let rk = rows.min(cols);
            cores[k] = vt;
            let us: Vec<f64> = (0..rows * rk).map(|i| u[i] * s[i % rk]).collect();
            cores[k - 1] = gemm(
                &cores[k - 1],
                false,
                &us,
                false,
                d[k - 1] * m[k - 1],
                rows,
                rk,
            );
            d[k] = rk;
            spectra[k - 1] = s;
        }
        // Now core 0 = A Λ_1 and cores k ≥ 1 are right-orthonormal B_k = Γ_k Λ_{k+1}.
        let scale = floored_roots(&spectra);
        for k in 0..n {
            let (l, r) = (d[k], d[k + 1]);
            let left = |a: usize| if k == 0 { 1.0 } else { scale[k - 1][a] };
            let right = |b: usize| if k + 1 == n { 1.0 } else { 1.0 / scale[k][b] };
            apply_scaling(&mut cores[k], l, m[k], r, left, right);
        }
        Mpo::from_cores(
            &shape,
            d,
            cores.iter().map(|c| convert::<f64, T>(c)).collect(),
            spectra,
        )
    }
}

/// Zero-pads a row-major orig_rows×orig_cols matrix to the factor products (borrowing it
/// when there is nothing to pad: embedding tables are large).
fn pad<'a, T: Scalar>(w: &'a [T], shape: &MpoShape) -> std::borrow::Cow<'a, [T]> {
    if !shape.is_padded() {
        return std::borrow::Cow::Borrowed(w);
    }
    let (r, c) = (shape.rows(), shape.cols());
    let mut out = crate::permute::zeroed(r * c);
    for i in 0..shape.orig_rows {
        out[i * c..i * c + shape.orig_cols]
            .copy_from_slice(&w[i * shape.orig_cols..(i + 1) * shape.orig_cols]);
    }
    std::borrow::Cow::Owned(out)
}

fn run<R: Scalar>(w: &[R], shape: &MpoShape, opts: &DecomposeOptions) -> Result<Parts<R>> {
    if shape.n() == 1 {
        // One site: the core is W itself, [1, I, J, 1].
        return Ok((vec![1, 1], vec![w.to_vec()], Vec::new()));
    }
    match opts.algorithm {
        Algorithm::Gram => gram_decompose(w, shape, &opts.truncation, IN_PLACE_MIN),
        Algorithm::SvdSweep => svd_sweep(w, shape, &opts.truncation),
    }
}

/// √λ per bond, floored at √ε·λ_max so that the λ^{−1/2} factors stay bounded.
fn floored_roots(spectra: &[Vec<f64>]) -> Vec<Vec<f64>> {
    spectra
        .iter()
        .map(|s| {
            let top = s.first().copied().unwrap_or(0.0);
            if top <= 0.0 {
                return vec![1.0; s.len()];
            }
            let floor = top * f64::EPSILON.sqrt();
            s.iter().map(|&x| x.max(floor).sqrt()).collect()
        })
        .collect()
}

/// core[a, x, b] *= left(a) * right(b) for a core [l, m, r].
fn apply_scaling<R: Scalar>(
    core: &mut [R],
    l: usize,
    m: usize,
    r: usize,
    left: impl Fn(usize) -> f64,
    right: impl Fn(usize) -> f64,
) {
    let rs: Vec<f64> = (0..r).map(&right).collect();
    for a in 0..l {
        let la = left(a);
        for x in 0..m {
            let row = &mut core[(a * m + x) * r..(a * m + x + 1) * r];
            for (v, s) in row.iter_mut().zip(&rs) {
                *v = R::of(v.f() * la * s);
            }
        }
    }
}

/// Scales the sites of a left-canonical Schmidt-basis chain into the symmetric gauge, given
/// for every site whether it is left-canonical (A = ΛΓ), central (ΛΓΛ) or right-canonical (ΓΛ).
fn symmetric_gauge<R: Scalar>(
    cores: &mut [Vec<R>],
    bonds: &[usize],
    m: &[usize],
    spectra: &[Vec<f64>],
    center: usize,
) {
    let roots = floored_roots(spectra);
    let n = cores.len();
    // bond b (1..n-1) ↔ roots[b-1]
    let root = |b: usize, a: usize| {
        if b == 0 || b == n {
            1.0
        } else {
            roots[b - 1][a]
        }
    };
    for k in 0..n {
        let (l, r) = (bonds[k], bonds[k + 1]);
        use std::cmp::Ordering::*;
        match k.cmp(&center) {
            Less => apply_scaling(
                &mut cores[k],
                l,
                m[k],
                r,
                |a| 1.0 / root(k, a),
                |b| root(k + 1, b),
            ),
            Equal => apply_scaling(
                &mut cores[k],
                l,
                m[k],
                r,
                |a| 1.0 / root(k, a),
                |b| 1.0 / root(k + 1, b),
            ),
            Greater => apply_scaling(
                &mut cores[k],
                l,
                m[k],
                r,
                |a| root(k, a),
                |b| 1.0 / root(k + 1, b),
            ),
        }
    }
}

/// The seed algorithm: sequential thin SVDs over the interleaved tensor.
fn svd_sweep<R: Scalar>(w: &[R], shape: &MpoShape, trunc: &Truncation) -> Result<Parts<R>> {
    let n = shape.n();
    let m = shape.local_dims();
    let full = shape.full_bonds();
    let mut dims = shape.row_factors.clone();
    dims.extend(&shape.col_factors);
    let perm: Vec<usize> = (0..n).flat_map(|k| [k, n + k]).collect();
    let mut res = permute(w, &dims, &perm);
    let total = res.len();
    let mut cores = Vec::with_capacity(n);
    let mut spectra = Vec::with_capacity(n - 1);
    for k in 0..n - 1 {
        let rows = full[k] * m[k];
        let cols = total / (m[..=k].iter().product::<usize>());
        let (u, s, vt) = thin_svd(&res, rows, cols)?;
        debug_assert_eq!(rows.min(cols), full[k + 1]);
        cores.push(u);
        res = vt;
        for (j, row) in res.chunks_mut(cols).enumerate() {
            let sj = R::of(s[j]);
            row.iter_mut().for_each(|v| *v *= sj);
        }
        spectra.push(s);
    }
    cores.push(res);
    symmetric_gauge(&mut cores, &full, &m, &spectra, n - 1);
    let bonds = select_bonds(shape, &spectra, trunc)?;
    let tmp = Mpo::<R> {
        row_factors: shape.row_factors.clone(),
        col_factors: shape.col_factors.clone(),
        orig_rows: shape.orig_rows,
        orig_cols: shape.orig_cols,
        bond_dims: full,
        cores,
        spectra,
    };
    let t = tmp.truncate_to(&bonds)?;
    Ok((t.bond_dims, t.cores, t.spectra))
}

/// Eigenpairs of one bond's Gram matrix: Schmidt values (descending) and the basis as the
/// columns of a row-major dim×dim matrix.
struct BondBasis<R> {
    values: Vec<f64>,
    vectors: Vec<R>,
    dim: usize,
}

impl<R: Scalar> BondBasis<R> {
    fn new(g: &[R], dim: usize) -> Result<Self> {
        let (vals, vectors) = eigh_desc(g, dim)?;
        Ok(Self {
            values: vals.iter().map(|&v| v.max(0.0).sqrt()).collect(),
            vectors,
            dim,
        })
    }

    /// First `keep` basis vectors as a row-major dim×keep matrix, rows optionally reordered
    /// (`row_of[new] = old`).
    fn columns(&self, keep: usize, row_of: Option<&[usize]>) -> Vec<R> {
        let mut out = Vec::with_capacity(self.dim * keep);
        for r in 0..self.dim {
            let src = row_of.map_or(r, |p| p[r]);
            out.extend_from_slice(&self.vectors[src * self.dim..src * self.dim + keep]);
        }
        out
    }

    /// First `keep` basis vectors as rows (row-major keep×dim), columns optionally
    /// reordered (`col_of[new] = old`).
    fn rows_t(&self, keep: usize, col_of: Option<&[usize]>) -> Vec<R> {
        let mut out = vec![R::of(0.0); keep * self.dim];
        for r in 0..self.dim {
            let src = col_of.map_or(r, |p| p[r]);
            for c in 0..keep {
                out[c * self.dim + r] = self.vectors[src * self.dim + c];
            }
        }
        out
    }
}

/// G_small[a, b] = Σ_x G[(a, x), (b, x)] (trace out a trailing factor of size `t`).
fn trace_trailing<R: Scalar>(g: &[R], dim: usize, t: usize) -> Vec<R> {
    let small = dim / t;
    let mut out = vec![R::of(0.0); small * small];
    for a in 0..small {
        for b in 0..small {
            let mut acc = 0.0f64;
            for x in 0..t {
                acc += g[(a * t + x) * dim + b * t + x].f();
            }
            out[a * small + b] = R::of(acc);
        }
    }
    out
}

/// G_small[a, b] = Σ_x G[(x, a), (x, b)] (trace out a leading factor of size `t`).
fn trace_leading<R: Scalar>(g: &[R], dim: usize, t: usize) -> Vec<R> {
    let small = dim / t;
    let mut out = vec![R::of(0.0); small * small];
    for x in 0..t {
        for a in 0..small {
            let src =
                &g[(x * small + a) * dim + x * small..(x * small + a) * dim + x * small + small];
            for (o, v) in out[a * small..(a + 1) * small].iter_mut().zip(src) {
                *o += *v;
            }
        }
    }
    out
}

/// From this many entries of X on, the centre core is formed in place in X's buffer (panel by
/// panel): below it a fresh intermediate is cheap (allocator-recycled, cache-resident) and
/// one big product beats panels plus copies.
const IN_PLACE_MIN: usize = 2 * PANEL;

fn gram_decompose<R: Scalar>(
    w: &[R],
    shape: &MpoShape,
    trunc: &Truncation,
    in_place_min: usize,
) -> Result<Parts<R>> {
    let n = shape.n();
    let (rf, cf) = (&shape.row_factors, &shape.col_factors);
    let m = shape.local_dims();
    let full = shape.full_bonds();
    let mut lefts = vec![1usize; n + 1];
    for k in 0..n {
        lefts[k + 1] = lefts[k] * m[k];
    }
    let total = lefts[n];
    let rights: Vec<usize> = lefts.iter().map(|&l| total / l).collect();
    // Bonds 1..=c have the left side smaller; site c is the centre.
    let c = (1..n).filter(|&k| lefts[k] <= rights[k]).count();
    let (a_rows, a_cols): (usize, usize) = (rf[..c].iter().product(), cf[..c].iter().product());
    let (b_rows, b_cols): (usize, usize) =
        (rf[c + 1..].iter().product(), cf[c + 1..].iter().product());
    let (a, b, mc) = (a_rows * a_cols, b_rows * b_cols, m[c]);
    // X = W laid out as [(left rows, left cols), (i_c, j_c), (right rows, right cols)].
    let x = permute(
        w,
        &[a_rows, rf[c], b_rows, a_cols, cf[c], b_cols],
        &[0, 3, 1, 4, 2, 5],
    );

    let left_map = interleave_map(&rf[..c], &cf[..c]);
    let right_map = interleave_map(&rf[c + 1..], &cf[c + 1..]);
    let mut bases: Vec<Option<BondBasis<R>>> = (0..=n).map(|_| None).collect();
    if c > 0 {
        let g = gram(&x, a, mc * b, true);
        // reorder rows/cols to the interleaved order of the left group
        let mut blk_of_int = vec![0; a];
        for (blk, &i) in left_map.iter().enumerate() {
            blk_of_int[i] = blk;
        }
        let mut gk: Vec<R> = (0..a * a)
            .map(|idx| g[blk_of_int[idx / a] * a + blk_of_int[idx % a]])
            .collect();
        for k in (1..=c).rev() {
            // A unit site leaves the Gram unchanged: reuse the basis (keeps OPF's inner cores
            // exactly the identity).
            let basis = if k < c && m[k] == 1 {
                let next = bases[k + 1].as_ref().unwrap();
                BondBasis {
                    values: next.values.clone(),
                    vectors: next.vectors.clone(),
                    dim: next.dim,
                }
            } else {
                BondBasis::new(&gk, lefts[k])?
            };
            bases[k] = Some(basis);
            if k > 1 {
                gk = if m[k - 1] == 1 {
                    gk
                } else {
                    trace_trailing(&gk, lefts[k], m[k - 1])
                };
            }
        }
    }
    if c < n - 1 {
        let h = gram(&x, a * mc, b, false);
        let mut blk_of_int = vec![0; b];
        for (blk, &i) in right_map.iter().enumerate() {
            blk_of_int[i] = blk;
        }
        let mut hk: Vec<R> = (0..b * b)
            .map(|idx| h[blk_of_int[idx / b] * b + blk_of_int[idx % b]])
            .collect();
        for k in c + 1..n {
            let basis = if k > c + 1 && m[k - 1] == 1 {
                let prev = bases[k - 1].as_ref().unwrap();
                BondBasis {
                    values: prev.values.clone(),
                    vectors: prev.vectors.clone(),
                    dim: prev.dim,
                }
            } else {
                BondBasis::new(&hk, rights[k])?
            };
            bases[k] = Some(basis);
            if k + 1 < n {
                hk = if m[k] == 1 {
                    hk
                } else {
                    trace_leading(&hk, rights[k], m[k])
                };
            }
        }
    }
    let spectra: Vec<Vec<f64>> = (1..n)
        .map(|k| bases[k].as_ref().unwrap().values.clone())
        .collect();
    for (k, s) in spectra.iter().enumerate() {
        debug_assert_eq!(s.len(), full[k + 1]);
    }
    let d = select_bonds(shape, &spectra, trunc)?;

    let mut cores: Vec<Vec<R>> = Vec::with_capacity(n);
    // Left sites: A_k = (U_kᵀ ⊗ 1) U_{k+1}.
    for k in 0..c {
        let next = bases[k + 1].as_ref().unwrap().columns(d[k + 1], None); // [L_k·m_k, D_{k+1}]
        let core = if k == 0 {
            next
        } else {
            let prev = bases[k].as_ref().unwrap().columns(d[k], None); // [L_k, D_k]
            gemm(&prev, true, &next, false, d[k], lefts[k], m[k] * d[k + 1])
        };
        cores.push(core);
    }
    // Centre: U_cᵀ X V_{c+1}, contracting the cheaper side first.
    {
        // U_cᵀ is built row-major (a transposed left operand is slower in the GEMM).
        let ut = if c == 0 {
            vec![R::of(1.0)]
        } else {
            bases[c].as_ref().unwrap().rows_t(d[c], Some(&left_map))
        };
        let v = if c == n - 1 {
            vec![R::of(1.0)]
        } else {
            bases[c + 1]
                .as_ref()
                .unwrap()
                .columns(d[c + 1], Some(&right_map))
        };
        let (dl, dr) = (d[c], d[c + 1]);
        let u_first = (dl * mc * b) as f64 * (a + dr) as f64;
        let v_first = (a * mc * dr) as f64 * (b + dl) as f64;
        let mut core = x;
        let len = dl * mc * dr;
        if core.len() >= in_place_min {
            // Both products shrink (or keep) their operand, so they run in place in X's
            // buffer: the core never needs a second W-sized buffer.
            let mut tmp = Vec::new();
            if u_first <= v_first {
                gemm_left_in_place(&ut, dl, a, &mut core, mc * b, &mut tmp); // [dl, mc·b]
                gemm_right_in_place(&mut core, dl * mc, b, &v, dr, &mut tmp); // [dl·mc, dr]
            } else {
                gemm_right_in_place(&mut core, a * mc, b, &v, dr, &mut tmp); // [a·mc, dr]
                gemm_left_in_place(&ut, dl, a, &mut core, mc * dr, &mut tmp); // [dl, mc·dr]
            }
        } else if u_first <= v_first {
            // X is dead once the first product is formed: the core reuses its buffer.
            let y = gemm(&ut, false, &core, false, dl, a, mc * b); // [dl, mc·b]
            gemm_into(&y, false, &v, false, dl * mc, b, dr, &mut core[..len]);
        } else {
            let y = gemm(&core, false, &v, false, a * mc, b, dr); // [a·mc, dr]
            gemm_into(&ut, false, &y, false, dl, a, mc * dr, &mut core[..len]);
        }
        core.truncate(len);
        core.shrink_to_fit();
        cores.push(core);
    }
    // Right sites: B_k = V_kᵀ (1 ⊗ V_{k+1}).
    for k in c + 1..n {
        let vt = bases[k].as_ref().unwrap().rows_t(d[k], None); // [D_k, m_k·R_{k+1}]
        let core = if k == n - 1 {
            vt
        } else {
            let next = bases[k + 1].as_ref().unwrap().columns(d[k + 1], None); // [R_{k+1}, D_{k+1}]
            gemm(
                &vt,
                false,
                &next,
                false,
                d[k] * m[k],
                rights[k + 1],
                d[k + 1],
            )
        };
        cores.push(core);
    }
    symmetric_gauge(&mut cores, &d, &m, &spectra, c);
    Ok((d, cores, spectra))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(n: usize, seed: u64) -> Vec<f64> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 11) as f64 / (1u64 << 53) as f64) - 0.5
            })
            .collect()
    }

    #[test]
    fn interleave_map_small() {
        // rows [2], cols [3]: block (i, j) = i*3+j equals interleaved (i, j)
        assert_eq!(interleave_map(&[2], &[3]), (0..6).collect::<Vec<_>>());
        // rows [2,2], cols [1,1]: identity as well
        assert_eq!(interleave_map(&[2, 2], &[1, 1]), vec![0, 1, 2, 3]);
        // rows [1,2], cols [2,1]: block (i1,i2,j1,j2) dims [1,2,2,1] -> interleaved (i1 j1 i2 j2)
        // dims [1,2,2,1]: blk = i2*2 + j1 ; int = j1*2 + i2
        assert_eq!(interleave_map(&[1, 2], &[2, 1]), vec![0, 2, 1, 3]);
    }

    /// The centre core is written into the permuted input's buffer on both contraction
    /// orders (U first when the left bond is cut harder, V first when the right one is); both
    /// must reproduce the seed sweep's truncated matrix and spectra.
    #[test]
    fn centre_buffer_reuse_matches_svd_sweep_on_both_orders() {
        // m = [6, 6, 4]: centre site 1, a = 6, b = 4, full bonds [1, 6, 4, 1].
        let shape = MpoShape::exact(vec![2, 3, 2], vec![3, 2, 2]).unwrap();
        let w = lcg(shape.rows() * shape.cols(), 3);
        for (trunc, u_first) in [
            (Truncation::Full, true),
            (Truncation::PerBond(vec![2, 4]), true),
            (Truncation::PerBond(vec![6, 1]), false),
            (Truncation::PerBond(vec![5, 2]), false),
        ] {
            let (dl, dr, a, b, mc) = match &trunc {
                Truncation::PerBond(v) => (v[0], v[1], 6, 4, 6),
                _ => (6, 4, 6, 4, 6),
            };
            let cost_u = (dl * mc * b) as f64 * (a + dr) as f64;
            let cost_v = (a * mc * dr) as f64 * (b + dl) as f64;
            assert_eq!(
                cost_u <= cost_v,
                u_first,
                "{trunc:?} does not take the intended order"
            );
            let opts = |algorithm| DecomposeOptions {
                algorithm,
                truncation: trunc.clone(),
                ..Default::default()
            };
            let g = Mpo::decompose_with(&w, &shape, &opts(Algorithm::Gram)).unwrap();
            let s = Mpo::decompose_with(&w, &shape, &opts(Algorithm::SvdSweep)).unwrap();
            assert_eq!(g.bonds(), s.bonds());
            // the in-place (panelled) centre core equals the one from a fresh intermediate
            let (b0, c0, _) = gram_decompose(&w, &shape, &trunc, 0).unwrap();
            let (b1, c1, _) = gram_decompose(&w, &shape, &trunc, usize::MAX).unwrap();
            assert_eq!(b0, b1);
            for (x, y) in c0.iter().flatten().zip(c1.iter().flatten()) {
                assert!((x - y).abs() < 1e-13, "{trunc:?}: {x} vs {y}");
            }
            for (x, y) in g.spectra.iter().flatten().zip(s.spectra.iter().flatten()) {
                assert!((x - y).abs() < 1e-10, "{x} vs {y}");
            }
            let (mg, ms) = (g.to_matrix().unwrap(), s.to_matrix().unwrap());
            let diff: f64 = mg.iter().zip(&ms).map(|(x, y)| (x - y) * (x - y)).sum();
            let norm: f64 = ms.iter().map(|x| x * x).sum();
            assert!(
                (diff / norm).sqrt() < 1e-10,
                "{trunc:?}: {}",
                (diff / norm).sqrt()
            );
            if trunc == Truncation::Full {
                assert!(g.relative_error(&w).unwrap() < 1e-12);
            }
        }
    }

    /// Matrices whose buffers pass the huge-page threshold (≥ 4 MiB) go through the same
    /// code with advised allocations: full bond exact, truncation equal to the seed sweep.
    #[test]
    fn huge_page_sized_matrices() {
        let shape = MpoShape::auto(1024, 576, 4).unwrap();
        let w = lcg(shape.rows() * shape.cols(), 5);
        assert!(w.len() * 8 >= 4 << 20);
        let full = Mpo::decompose(&w, &shape).unwrap();
        assert!(full.relative_error(&w).unwrap() < 1e-12);
        let trunc = Truncation::MaxBond(full.bonds().iter().max().unwrap() / 2);
        let g =
            Mpo::decompose_with(&w, &shape, &DecomposeOptions::truncated(trunc.clone())).unwrap();
        let s = Mpo::decompose_with(
            &w,
            &shape,
            &DecomposeOptions {
                algorithm: Algorithm::SvdSweep,
                truncation: trunc,
                ..Default::default()
            },
        )
        .unwrap();
        let e_g = g.relative_error(&w).unwrap();
        let e_s = s.relative_error(&w).unwrap();
        assert!(
            e_g > 0.1 && (e_g - e_s).abs() < 1e-9 * e_s,
            "{e_g} vs {e_s}"
        );
    }

    #[test]
    fn both_algorithms_agree_on_spectra_and_reconstruct() {
        let shape = MpoShape::exact(vec![2, 3, 2, 2], vec![3, 2, 2, 1]).unwrap();
        let w = lcg(shape.rows() * shape.cols(), 7);
        let g = Mpo::decompose(&w, &shape).unwrap();
        let s = Mpo::decompose_with(
            &w,
            &shape,
            &DecomposeOptions {
                algorithm: Algorithm::SvdSweep,
                ..Default::default()
            },
        )
        .unwrap();
        for (a, b) in g.spectra.iter().zip(&s.spectra) {
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() < 1e-10, "{x} vs {y}");
            }
        }
        assert!(g.relative_error(&w).unwrap() < 1e-12);
        assert!(s.relative_error(&w).unwrap() < 1e-12);
    }
}
