//! One central tensor for several MPOs of the same shape (MPOBERT shares a central tensor per
//! matrix type across layers), each member keeping its own auxiliary tensors.
//!
//! Every member W_l is first brought to the mixed canonical form around its central core:
//! W_l = Q_L · Ĉ_l · Q_R with Q_L (the contracted left auxiliaries) orthonormal in columns and
//! Q_R (the right ones) orthonormal in rows, so ‖W_l − Q_L · X · Q_R‖_F = ‖Ĉ_l − X‖_F for any X.
//! A member then gets a shared central C through two small per-member maps on the bonds,
//! Ĉ_l ≈ G_l ×₁ C ×₃ H_l, and its new auxiliaries are Q_L·G_l and H_l·Q_R split back into cores
//! by SVD. Because the Q's are isometries, fitting G_l and H_l by least squares in the central's
//! space is least squares on W_l itself.
//!
//! The central is either one member's own (`Member(k)`: exact for that member) or a joint fit
//! (`Joint`): generalized Procrustes over the members (orthogonal G_l, H_l; C the mean of the
//! aligned centrals G_lᵀ Ĉ_l H_lᵀ, which lowers Σ_l ‖Ĉ_l − G_l C H_l‖² at every step), after
//! which G_l and H_l are refitted without the orthogonality constraint.

use crate::error::{Error, Result};
use crate::linalg::{eigh_desc, gemm, thin_qr, thin_svd};
use crate::mpo::Mpo;

/// Where the shared central tensor comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CentralFrom {
    /// The central core of member k (k indexes the slice given to [`share_central`]).
    Member(usize),
    /// A joint fit over all members (`iters` Procrustes rounds).
    Joint { iters: usize },
}

/// The result of [`share_central`].
#[derive(Clone, Debug)]
pub struct SharedCentral {
    /// The shared central core, shape `[d_c, i_c, j_c, d_{c+1}]` as in every member.
    pub central: Vec<f64>,
    /// Each member with its own auxiliary cores and the shared central in place.
    pub members: Vec<Mpo<f64>>,
}

/// Most rounds of the unconstrained least-squares refit of each member's bond maps; it stops
/// earlier once a round lowers the error by less than `REFIT_TOL` of itself.
const REFIT_ROUNDS: usize = 40;
const REFIT_TOL: f64 = 1e-6;

/// Share one central tensor among `mpos` (same shape and bonds; full bonds are what makes the
/// fit meaningful, since truncated auxiliaries are not isometries onto the matrix).
pub fn share_central(mpos: &[Mpo<f64>], from: CentralFrom) -> Result<SharedCentral> {
    let first = mpos
        .first()
        .ok_or_else(|| Error::Shape("no MPO to share a central tensor between".into()))?;
    for m in mpos {
        if m.row_factors != first.row_factors
            || m.col_factors != first.col_factors
            || m.bond_dims != first.bond_dims
        {
            return Err(Error::Shape(format!(
                "members must share factors and bonds: {:?}×{:?} bonds {:?} vs {:?}×{:?} bonds {:?}",
                first.row_factors,
                first.col_factors,
                first.bond_dims,
                m.row_factors,
                m.col_factors,
                m.bond_dims
            )));
        }
    }
    let c = first.central_index();
    let [al, ic, jc, be] = first.core_shape(c);
    let dims = Dims { al, m: ic * jc, be };
    let canon: Vec<Canon> = mpos.iter().map(canonical).collect::<Result<_>>()?;
    let n = canon.len();
    let eye = |d: usize| -> Vec<f64> {
        let mut e = vec![0.0; d * d];
        (0..d).for_each(|i| e[i * d + i] = 1.0);
        e
    };
    let mut g: Vec<Vec<f64>> = vec![eye(al); n];
    let mut h: Vec<Vec<f64>> = vec![eye(be); n];
    let central = match from {
        CentralFrom::Member(k) => {
            if k >= n {
                return Err(Error::Shape(format!(
                    "member {k} does not exist ({n} members)"
                )));
            }
            let cen = canon[k].c.clone();
            for l in (0..n).filter(|&l| l != k) {
                for _ in 0..2 {
                    g[l] = procrustes_g(&canon[l].c, &cen, &h[l], dims)?;
                    h[l] = procrustes_h(&canon[l].c, &cen, &g[l], dims)?;
                }
                refit(&canon[l].c, &cen, &mut g[l], &mut h[l], dims)?;
            }
            cen
        }
        CentralFrom::Joint { iters } => {
            // Start from the member with the largest norm: the others align to it first.
            let start = (0..n)
                .max_by(|&a, &b| norm(&canon[a].c).total_cmp(&norm(&canon[b].c)))
                .unwrap_or(0);
            let mut cen = canon[start].c.clone();
            for _ in 0..iters.max(1) {
                for l in 0..n {
                    g[l] = procrustes_g(&canon[l].c, &cen, &h[l], dims)?;
                    h[l] = procrustes_h(&canon[l].c, &cen, &g[l], dims)?;
                }
                let mut mean = vec![0.0; al * dims.m * be];
                for l in 0..n {
                    // Gᵀ Ĉ Hᵀ: the member's central seen in the shared basis.
                    let x = mode1(&g[l], true, &canon[l].c, dims);
                    let x = mode3(&x, &h[l], true, dims);
                    mean.iter_mut()
                        .zip(&x)
                        .for_each(|(a, b)| *a += b / n as f64);
                }
                cen = mean;
            }
            for l in 0..n {
                refit(&canon[l].c, &cen, &mut g[l], &mut h[l], dims)?;
            }
            cen
        }
    };
    let mut members = Vec::with_capacity(n);
    for (l, (m, cn)) in mpos.iter().zip(&canon).enumerate() {
        let left = gemm(&cn.ql, false, &g[l], false, cn.a, al, al);
        let right = gemm(&h[l], false, &cn.qr, false, be, be, cn.b);
        members.push(assemble(m, &left, &central, &right)?);
    }
    Ok(SharedCentral { central, members })
}

#[derive(Clone, Copy)]
struct Dims {
    al: usize,
    m: usize,
    be: usize,
}

/// A member in mixed canonical form: W = Q_L [a, α] · C [α, m, β] · Q_R [β, b].
struct Canon {
    a: usize,
    b: usize,
    ql: Vec<f64>,
    qr: Vec<f64>,
    c: Vec<f64>,
}

fn norm(x: &[f64]) -> f64 {
    x.iter().map(|v| v * v).sum::<f64>().sqrt()
}

fn canonical(m: &Mpo<f64>) -> Result<Canon> {
    let c = m.central_index();
    let n = m.n();
    // Left auxiliaries contracted: [(i_1 j_1 … i_{c} j_{c}), d_c].
    let (mut left, mut a) = (vec![1.0], 1usize);
    for k in 0..c {
        let [d0, i, j, d1] = m.core_shape(k);
        left = gemm(&left, false, &m.cores[k], false, a, d0, i * j * d1);
        a *= i * j;
    }
    // Right auxiliaries contracted: [d_{c+1}, (i_{c+2} j_{c+2} … i_n j_n)].
    let (mut right, mut b) = (vec![1.0], 1usize);
    for k in (c + 1..n).rev() {
        let [d0, i, j, d1] = m.core_shape(k);
        right = gemm(&m.cores[k], false, &right, false, d0 * i * j, d1, b);
        b *= i * j;
    }
    let [al, ic, jc, be] = m.core_shape(c);
    if a < al || b < be {
        return Err(Error::Bonds(format!(
            "bond dimensions {:?} exceed the sizes they join ({a}, {b}); not a full-bond MPO",
            m.bond_dims
        )));
    }
    let (ql, rl) = thin_qr(&left, a, al);
    // Right block = L_R · Q_R from the QR of its transpose.
    let rt = transpose(&right, be, b);
    let (q2, r2) = thin_qr(&rt, b, be);
    let qr = transpose(&q2, b, be);
    let lr = transpose(&r2, be, be);
    let dims = Dims { al, m: ic * jc, be };
    let cc = mode1(&rl, false, &m.cores[c], dims);
    let cc = mode3(&cc, &lr, false, dims);
    Ok(Canon {
        a,
        b,
        ql,
        qr,
        c: cc,
    })
}

fn transpose(x: &[f64], r: usize, c: usize) -> Vec<f64> {
    let mut t = vec![0.0; r * c];
    for i in 0..r {
        for j in 0..c {
            t[j * r + i] = x[i * c + j];
        }
    }
    t
}

/// g ×₁ x: [α, α]·x[α, (m β)] (gᵀ with `t`).
fn mode1(g: &[f64], t: bool, x: &[f64], d: Dims) -> Vec<f64> {
    gemm(g, t, x, false, d.al, d.al, d.m * d.be)
}

/// x ×₃ h: x[(α m), β]·h[β, β] (hᵀ with `t`).
fn mode3(x: &[f64], h: &[f64], t: bool, d: Dims) -> Vec<f64> {
    gemm(x, false, h, t, d.al * d.m, d.be, d.be)
}

/// Orthogonal G maximising ⟨target, G·(C ×₃ H)⟩ (Procrustes).
fn procrustes_g(target: &[f64], cen: &[f64], h: &[f64], d: Dims) -> Result<Vec<f64>> {
    let mm = mode3(cen, h, false, d);
    let k = d.m * d.be;
    let cross = gemm(target, false, &mm, true, d.al, k, d.al);
    polar(&cross, d.al)
}

/// Orthogonal H maximising ⟨target, (G ×₁ C)·H⟩ over the mode-3 unfolding.
fn procrustes_h(target: &[f64], cen: &[f64], g: &[f64], d: Dims) -> Result<Vec<f64>> {
    let nn = mode1(g, false, cen, d);
    let k = d.al * d.m;
    let cross = gemm(&nn, true, target, false, d.be, k, d.be);
    polar(&cross, d.be)
}

/// U·Vᵀ of the SVD of a square matrix: the nearest orthogonal matrix.
fn polar(x: &[f64], n: usize) -> Result<Vec<f64>> {
    let (u, _, vt) = thin_svd(x, n, n)?;
    Ok(gemm(&u, false, &vt, false, n, n, n))
}

/// Unconstrained least squares for G then H, alternating (each step lowers the error).
fn refit(target: &[f64], cen: &[f64], g: &mut Vec<f64>, h: &mut Vec<f64>, d: Dims) -> Result<()> {
    let mut last = f64::INFINITY;
    for _ in 0..REFIT_ROUNDS {
        // G = T₍₁₎ Mᵀ (M Mᵀ)⁺ with M = (C ×₃ H)₍₁₎.
        let mm = mode3(cen, h, false, d);
        let k = d.m * d.be;
        let cross = gemm(target, false, &mm, true, d.al, k, d.al);
        let gram = gemm(&mm, false, &mm, true, d.al, k, d.al);
        *g = gemm(
            &cross,
            false,
            &pinv_sym(&gram, d.al)?,
            false,
            d.al,
            d.al,
            d.al,
        );
        // H = (NᵀN)⁺ Nᵀ T₍₃₎ with N = (G ×₁ C)₍₃₎.
        let nn = mode1(g, false, cen, d);
        let k = d.al * d.m;
        let cross = gemm(&nn, true, target, false, d.be, k, d.be);
        let gram = gemm(&nn, true, &nn, false, d.be, k, d.be);
        *h = gemm(
            &pinv_sym(&gram, d.be)?,
            false,
            &cross,
            false,
            d.be,
            d.be,
            d.be,
        );
        let fit = mode3(&nn, h, false, d);
        let err = norm(
            &fit.iter()
                .zip(target)
                .map(|(a, b)| a - b)
                .collect::<Vec<_>>(),
        );
        if last - err <= REFIT_TOL * err {
            break;
        }
        last = err;
    }
    Ok(())
}

/// Pseudo-inverse of a symmetric positive semi-definite matrix (eigenvalues below 1e-12 of
/// the largest dropped).
fn pinv_sym(a: &[f64], n: usize) -> Result<Vec<f64>> {
    let (vals, vecs) = eigh_desc(a, n)?;
    let cut = vals.first().copied().unwrap_or(0.0).max(0.0) * 1e-12;
    let mut scaled = vecs.clone();
    for r in 0..n {
        for (c, &v) in vals.iter().enumerate() {
            scaled[r * n + c] *= if v > cut { 1.0 / v } else { 0.0 };
        }
    }
    Ok(gemm(&scaled, false, &vecs, true, n, n, n))
}

/// Cores of `like`'s shape from a left block [a, α], a central and a right block [β, b]:
/// sequential SVDs split the blocks back into sites (left to right, right to left).
fn assemble(like: &Mpo<f64>, left: &[f64], central: &[f64], right: &[f64]) -> Result<Mpo<f64>> {
    let c = like.central_index();
    let n = like.n();
    let shape = like.shape();
    let mut cores: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut bonds = vec![1usize; n + 1];
    let [al, _, _, be] = like.core_shape(c);
    bonds[c] = al;
    bonds[c + 1] = be;
    // Left: rest holds [(r_prev i_k j_k), (everything after k)].
    let mut rest = left.to_vec();
    let mut r_prev = 1usize;
    let mut cols: usize = like.row_factors[..c]
        .iter()
        .zip(&like.col_factors[..c])
        .map(|(i, j)| i * j)
        .product::<usize>()
        * al;
    for k in 0..c {
        let ij = like.row_factors[k] * like.col_factors[k];
        cols /= ij;
        if k + 1 == c {
            cores[k] = rest.clone();
            break;
        }
        let rows = r_prev * ij;
        let (u, s, vt) = thin_svd(&rest, rows, cols)?;
        let r = s.len();
        cores[k] = u;
        let mut next = vt;
        for (row, sv) in next.chunks_mut(cols).zip(&s) {
            row.iter_mut().for_each(|v| *v *= sv);
        }
        rest = next;
        bonds[k + 1] = r;
        r_prev = r;
    }
    cores[c] = central.to_vec();
    // Right: rest holds [(everything before k), (i_k j_k r_next)].
    let mut rest = right.to_vec();
    let mut r_next = 1usize;
    let mut rows: usize = be
        * like.row_factors[c + 1..]
            .iter()
            .zip(&like.col_factors[c + 1..])
            .map(|(i, j)| i * j)
            .product::<usize>();
    for k in (c + 1..n).rev() {
        let ij = like.row_factors[k] * like.col_factors[k];
        rows /= ij;
        if k == c + 1 {
            cores[k] = rest.clone();
            break;
        }
        let cols = ij * r_next;
        let (u, s, vt) = thin_svd(&rest, rows, cols)?;
        let r = s.len();
        cores[k] = vt;
        let mut us = u;
        for row in us.chunks_mut(r) {
            row.iter_mut().zip(&s).for_each(|(v, sv)| *v *= sv);
        }
        rest = us;
        bonds[k] = r;
        r_next = r;
    }
    Mpo::from_cores(&shape, bonds, cores, Vec::new())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shapes::MpoShape;

    fn matrix(rows: usize, cols: usize, seed: u64) -> Vec<f64> {
        crate::bench::gaussian_matrix(rows, cols, seed)
    }

    #[test]
    fn a_members_own_central_reproduces_it_and_the_joint_fit_beats_zero() {
        let shape = MpoShape::auto(24, 12, 5).unwrap();
        let ws: Vec<Vec<f64>> = (0..3).map(|s| matrix(24, 12, s)).collect();
        let mpos: Vec<Mpo<f64>> = ws
            .iter()
            .map(|w| Mpo::decompose(w, &shape).unwrap())
            .collect();
        let err = |r: &SharedCentral| -> Vec<f64> {
            r.members
                .iter()
                .zip(&ws)
                .map(|(m, w)| m.relative_error(w).unwrap())
                .collect()
        };
        let one = share_central(&mpos, CentralFrom::Member(1)).unwrap();
        let e1 = err(&one);
        assert!(e1[1] < 1e-10, "member 1 keeps its own central: {e1:?}");
        // The shared central is the same buffer in every member.
        let c = mpos[0].central_index();
        for m in &one.members {
            assert_eq!(m.cores[c], one.central);
        }
        // The final least-squares refit can always fall back to G = 0, so no member is fitted
        // worse than the zero matrix; on unrelated random matrices the fit is partial.
        let joint = share_central(&mpos, CentralFrom::Joint { iters: 10 }).unwrap();
        let ej = err(&joint);
        assert!(ej.iter().all(|&e| e < 1.0), "joint {ej:?}");
        // Identical members share a central exactly.
        let same = vec![mpos[0].clone(), mpos[0].clone()];
        let r = share_central(&same, CentralFrom::Joint { iters: 3 }).unwrap();
        for m in &r.members {
            assert!(m.relative_error(&ws[0]).unwrap() < 1e-9);
        }
    }

    #[test]
    fn members_related_by_bond_maps_share_a_central_exactly() {
        // W_2 = Q_L G C H Q_R of W_1 for random invertible G, H: representable exactly.
        let shape = MpoShape::auto(16, 16, 3).unwrap();
        let w = matrix(16, 16, 7);
        let m1 = Mpo::decompose(&w, &shape).unwrap();
        let mut m2 = m1.clone();
        let c = m1.central_index();
        let [al, i, j, be] = m1.core_shape(c);
        let g = matrix(al, al, 8);
        let x = gemm(&g, false, &m1.cores[c], false, al, al, i * j * be);
        m2.cores[c] = x;
        let w2 = m2.to_matrix().unwrap();
        let r = share_central(&[m1, m2], CentralFrom::Member(0)).unwrap();
        let e = r.members[1].relative_error(&w2).unwrap();
        assert!(e < 1e-8, "{e}");
    }
}
