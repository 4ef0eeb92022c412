//! Calibrated truncation (`mpo::whiten`) and global allocation (`mpo::allocate`) against
//! references computed here without them: output errors ‖(W − Ŵ)X‖_F from X itself, the
//! Eckart–Young optimum of the weighted problem from an SVD of W·X, hand-worked greedy steps.

mod common;

use common::{frob, gaussian};
use mpo::allocate::{allocate_global, Item};
use mpo::linalg::{gemm, thin_qr, thin_svd};
use mpo::whiten::{damped, decompose_whitened, diagonal_error2, output_error2};
use mpo::{DecomposeOptions, Mpo, MpoShape, Truncation, Whitening};

/// ‖(W − Ŵ)·X‖_F for W, Ŵ [rows, cols] and X [cols, t].
fn output_error(w: &[f64], what: &[f64], x: &[f64], rows: usize, cols: usize, t: usize) -> f64 {
    let dw: Vec<f64> = w.iter().zip(what).map(|(a, b)| a - b).collect();
    frob(&gemm(&dw, false, x, false, rows, cols, t))
}

fn kron(a: &[f64], na: usize, b: &[f64], nb: usize) -> Vec<f64> {
    let n = na * nb;
    let mut out = vec![0.0; n * n];
    for r1 in 0..na {
        for c1 in 0..na {
            for r2 in 0..nb {
                for c2 in 0..nb {
                    out[(r1 * nb + r2) * n + c1 * nb + c2] = a[r1 * na + c1] * b[r2 * nb + c2];
                }
            }
        }
    }
    out
}

/// An ill-conditioned n × n mixing matrix: Q · diag(10^(−3 k/(n−1))) with Q orthogonal.
fn ill_conditioned(n: usize, seed: u64) -> Vec<f64> {
    conditioned(n, seed, 3.0)
}

/// Q · diag(10^(−decades · k/(n−1))).
fn conditioned(n: usize, seed: u64, decades: f64) -> Vec<f64> {
    let (q, _) = thin_qr(&gaussian(n * n, seed), n, n);
    let mut a = q;
    for r in 0..n {
        for c in 0..n {
            a[r * n + c] *= 10f64.powf(-decades * c as f64 / (n.max(2) - 1) as f64);
        }
    }
    a
}

fn gram_of(x: &[f64], cols: usize, t: usize) -> Vec<f64> {
    gemm(x, false, x, true, cols, t, cols)
}

/// With S = I (a Gram equal to the identity, or the explicit identity) every whitened path
/// gives the plain decomposition's bonds and cores bit for bit.
#[test]
fn identity_whitening_equals_plain() {
    for (shape, truncs) in [
        (
            MpoShape::auto(24, 18, 3).unwrap(),
            vec![
                Truncation::Full,
                Truncation::MaxBond(3),
                Truncation::MaxParams(200),
                Truncation::RelError(0.3),
            ],
        ),
        (
            MpoShape::exact(vec![9, 1], vec![1, 7]).unwrap(),
            vec![Truncation::MaxBond(2), Truncation::MaxParams(40)],
        ),
        // padded columns (7 → 8)
        (
            MpoShape::new(vec![2, 3], vec![2, 4], 6, 7).unwrap(),
            vec![Truncation::Full, Truncation::MaxBond(3)],
        ),
    ] {
        let w = gaussian(shape.orig_rows * shape.orig_cols, 11);
        let c = shape.orig_cols;
        let mut eye = vec![0.0; c * c];
        for i in 0..c {
            eye[i * c + i] = 1.0;
        }
        let whitenings = [
            Whitening::identity(&shape.col_factors),
            Whitening::cholesky(&eye, &shape).unwrap(),
            Whitening::diagonal(&vec![1.0; c], &shape).unwrap(),
        ];
        for t in &truncs {
            // what plain compression (`mpop::compress`) runs
            let plain = Mpo::<f64>::decompose(&w, &shape)
                .unwrap()
                .truncate(t)
                .unwrap();
            for s in &whitenings {
                let cal = decompose_whitened(&w, &shape, s, t).unwrap();
                assert_eq!(cal.bond_dims, plain.bond_dims, "{shape:?} {t:?}");
                assert_eq!(cal.cores, plain.cores, "{shape:?} {t:?}");
                assert_eq!(cal.spectra, plain.spectra);
            }
        }
    }
}

/// SVD layout (i = [out, 1], j = [1, in]) with correlated inputs X = A·Z: the rank-r
/// truncation's output error is exactly the discarded whitened weight, equals the Eckart–Young
/// optimum min_{rank B ≤ r} ‖(W − B)X‖_F computed from an SVD of W·X, and beats plain
/// truncation at the same rank.
#[test]
fn svd_layout_cholesky_is_the_weighted_optimum() {
    let (rows, cols, t) = (10, 12, 40);
    let shape = MpoShape::exact(vec![rows, 1], vec![1, cols]).unwrap();
    let w = gaussian(rows * cols, 1);
    let x = gemm(
        &ill_conditioned(cols, 2),
        false,
        &gaussian(cols * t, 3),
        false,
        cols,
        cols,
        t,
    );
    let g = gram_of(&x, cols, t);
    let s = Whitening::cholesky(&g, &shape).unwrap();
    // S Sᵀ reproduces G: the one-leg layout is exact.
    let sm = s.matrix();
    let back = gemm(&sm, false, &sm, true, cols, cols, cols);
    for (a, b) in back.iter().zip(&g) {
        assert!((a - b).abs() < 1e-9 * frob(&g), "{a} vs {b}");
    }
    let (_, sigma, _) = thin_svd(&gemm(&w, false, &x, false, rows, cols, t), rows, t).unwrap();
    for r in [1, 3, 6] {
        let trunc = Truncation::MaxBond(r);
        let cal = decompose_whitened(&w, &shape, &s, &trunc).unwrap();
        assert_eq!(cal.bond_dims, vec![1, r, 1]);
        let what = cal.to_matrix().unwrap();
        let got = output_error(&w, &what, &x, rows, cols, t);
        let predicted = cal.error_bound();
        assert!(
            (got - predicted).abs() <= 1e-6 * predicted,
            "{got} vs {predicted}"
        );
        let optimum = sigma[r..].iter().map(|v| v * v).sum::<f64>().sqrt();
        assert!(
            (got - optimum).abs() <= 1e-6 * optimum,
            "{got} vs EY {optimum}"
        );
        // output_error2 is the same quantity from G
        let dw: Vec<f64> = w.iter().zip(&what).map(|(a, b)| a - b).collect();
        let e2 = output_error2(&dw, rows, cols, &g).unwrap();
        assert!((e2.sqrt() - got).abs() <= 1e-6 * got);
        // plain truncation at the same rank is strictly worse on these inputs
        let plain =
            Mpo::<f64>::decompose_with(&w, &shape, &DecomposeOptions::truncated(trunc)).unwrap();
        let plain_err = output_error(&w, &plain.to_matrix().unwrap(), &x, rows, cols, t);
        assert!(
            got < 0.99 * plain_err,
            "rank {r}: {got} vs plain {plain_err}"
        );
        // and so is any other rank-r matrix tried: perturbed factors of the optimum
        for seed in 0..3 {
            let mut other = cal.clone();
            for (v, e) in other.cores[1].iter_mut().zip(gaussian(r * cols, 50 + seed)) {
                *v += 1e-2 * e;
            }
            let e = output_error(&w, &other.to_matrix().unwrap(), &x, rows, cols, t);
            assert!(e >= got * (1.0 - 1e-12), "{e} < {got}");
        }
    }
}

/// MPO layout with a Kronecker-structured Gram (X = (A_1 ⊗ A_2 ⊗ A_3)·Z): the partial-trace fit
/// recovers G exactly, one cut bond costs exactly its discarded whitened weight, several cut
/// bonds stay within the root-sum-square bound, and the output error beats plain truncation.
#[test]
fn mpo_layout_kronecker_gram_is_exact() {
    let shape = MpoShape::exact(vec![3, 2, 2], vec![2, 3, 2]).unwrap();
    let (rows, cols, t) = (12, 12, 60);
    // One decade per factor: the product's Gram spans six.
    let a = kron(
        &kron(&conditioned(2, 5, 1.0), 2, &conditioned(3, 6, 1.0), 3),
        6,
        &conditioned(2, 7, 1.0),
        2,
    );
    // Z with orthonormal rows, so that G = A Aᵀ is exactly a Kronecker product.
    let (q, _) = thin_qr(&gaussian(t * cols, 8), t, cols);
    let x = gemm(&a, false, &q, true, cols, cols, t);
    let g = gram_of(&x, cols, t);
    let s = Whitening::cholesky(&g, &shape).unwrap();
    let sm = s.matrix();
    let back = gemm(&sm, false, &sm, true, cols, cols, cols);
    for (p, q) in back.iter().zip(&g) {
        assert!((p - q).abs() < 1e-9 * frob(&g), "{p} vs {q}");
    }
    let w = gaussian(rows * cols, 9);
    let full = shape.full_bonds();
    assert_eq!(full, vec![1, 6, 4, 1]);
    for (bonds, single) in [
        (vec![3, 4], true),
        (vec![6, 2], true),
        (vec![4, 3], false),
        (vec![2, 2], false),
    ] {
        let trunc = Truncation::PerBond(bonds.clone());
        let cal = decompose_whitened(&w, &shape, &s, &trunc).unwrap();
        let got = output_error(&w, &cal.to_matrix().unwrap(), &x, rows, cols, t);
        let bound = cal.error_bound();
        if single {
            assert!(
                (got - bound).abs() <= 1e-6 * bound,
                "{bonds:?}: {got} vs {bound}"
            );
        } else {
            assert!(
                got <= bound * (1.0 + 1e-9) && got > 0.0,
                "{bonds:?}: {got} vs {bound}"
            );
        }
        let plain =
            Mpo::<f64>::decompose_with(&w, &shape, &DecomposeOptions::truncated(trunc)).unwrap();
        let plain_err = output_error(&w, &plain.to_matrix().unwrap(), &x, rows, cols, t);
        assert!(got < plain_err, "{bonds:?}: {got} vs plain {plain_err}");
    }
}

/// When the Gram is not Kronecker-structured the fit is an approximation: the prediction and
/// the truth differ, and `output_error2` with the full G is the truth.
#[test]
fn non_kronecker_gram_reports_the_true_error() {
    let shape = MpoShape::exact(vec![3, 4], vec![3, 4]).unwrap();
    let (rows, cols, t) = (12, 12, 50);
    let x = gemm(
        &ill_conditioned(cols, 21),
        false,
        &gaussian(cols * t, 22),
        false,
        cols,
        cols,
        t,
    );
    let g = gram_of(&x, cols, t);
    let s = Whitening::cholesky(&g, &shape).unwrap();
    let w = gaussian(rows * cols, 23);
    let cal = decompose_whitened(&w, &shape, &s, &Truncation::MaxBond(4)).unwrap();
    let what = cal.to_matrix().unwrap();
    let dw: Vec<f64> = w.iter().zip(&what).map(|(a, b)| a - b).collect();
    let truth = output_error(&w, &what, &x, rows, cols, t);
    let e2 = output_error2(&dw, rows, cols, &g).unwrap();
    assert!((e2.sqrt() - truth).abs() <= 1e-9 * truth);
    assert!((cal.error_bound() - truth).abs() > 1e-3 * truth);
}

/// ASVD's diagonal whitening: exact in the SVD layout (the error in the diag(s) metric is the
/// discarded whitened weight and the Eckart–Young optimum of W·diag(s)); over several legs a
/// product s = s_1 ⊗ s_2 is recovered exactly.
#[test]
fn diagonal_whitening_is_exact_in_the_svd_layout() {
    let (rows, cols) = (8, 10);
    let shape = MpoShape::exact(vec![rows, 1], vec![1, cols]).unwrap();
    let w = gaussian(rows * cols, 31);
    let sc: Vec<f64> = (0..cols)
        .map(|j| 0.05 + (j as f64 * 1.7).sin().abs() * 3.0)
        .collect();
    let s = Whitening::diagonal(&sc, &shape).unwrap();
    let ws: Vec<f64> = w
        .iter()
        .enumerate()
        .map(|(i, v)| v * sc[i % cols])
        .collect();
    let (_, sigma, _) = thin_svd(&ws, rows, cols).unwrap();
    for r in [1, 4] {
        let cal = decompose_whitened(&w, &shape, &s, &Truncation::MaxBond(r)).unwrap();
        let dw: Vec<f64> = w
            .iter()
            .zip(cal.to_matrix().unwrap())
            .map(|(a, b)| a - b)
            .collect();
        let got = diagonal_error2(&dw, rows, &sc).unwrap().sqrt();
        let optimum = sigma[r..].iter().map(|v| v * v).sum::<f64>().sqrt();
        assert!((got - cal.error_bound()).abs() <= 1e-6 * got, "{got}");
        assert!(
            (got - optimum).abs() <= 1e-6 * optimum,
            "{got} vs {optimum}"
        );
    }
    // a per-leg product is fitted exactly over two legs
    let shape2 = MpoShape::exact(vec![2, 5], vec![2, 5]).unwrap();
    let (s1, s2) = ([0.5, 3.0], [1.0, 0.2, 4.0, 2.0, 0.7]);
    let prod: Vec<f64> = s1
        .iter()
        .flat_map(|a| s2.iter().map(move |b| a * b))
        .collect();
    let d = Whitening::diagonal(&prod, &shape2).unwrap().matrix();
    for (j, p) in prod.iter().enumerate() {
        assert!((d[j * 10 + j] - p).abs() < 1e-12 * p, "{j}");
    }
}

/// Zero-padded inputs: the whitened MPO at full bonds still reproduces W.
#[test]
fn padded_inputs_reconstruct_at_full_bond() {
    let shape = MpoShape::new(vec![2, 3], vec![2, 4], 6, 7).unwrap();
    let (rows, cols, t) = (6, 7, 30);
    let x = gemm(
        &ill_conditioned(cols, 41),
        false,
        &gaussian(cols * t, 42),
        false,
        cols,
        cols,
        t,
    );
    let g = damped(&gram_of(&x, cols, t), cols, 0.01).unwrap();
    let s = Whitening::cholesky(&g, &shape).unwrap();
    let w = gaussian(rows * cols, 43);
    let cal = decompose_whitened(&w, &shape, &s, &Truncation::Full).unwrap();
    let what = cal.to_matrix().unwrap();
    let d: f64 = w
        .iter()
        .zip(&what)
        .map(|(a, b)| (a - b).powi(2))
        .sum::<f64>()
        .sqrt();
    assert!(d < 1e-9 * frob(&w), "{d}");
}

/// The greedy by hand: spectra [3, 2, 1] and [3, 3, 3] (3 × 3 SVD layouts, 6 parameters per
/// rank), budget half of 18 + 18. Normalized costs per parameter: 1/14 < 4/14 < 9/27, so
/// matrix 1 loses ranks 3 and 2 first, then matrix 2 one rank.
#[test]
fn global_allocation_by_hand() {
    let shape = MpoShape::exact(vec![3, 1], vec![1, 3]).unwrap();
    let a = vec![vec![3.0, 2.0, 1.0]];
    let b = vec![vec![3.0, 3.0, 3.0]];
    let items = [
        Item {
            shape: &shape,
            spectra: &a,
        },
        Item {
            shape: &shape,
            spectra: &b,
        },
    ];
    let r = allocate_global(&items, 18).unwrap();
    assert_eq!(r.bonds, vec![vec![1, 1, 1], vec![1, 2, 1]]);
    assert_eq!((r.params, r.cuts, r.last_saved), (18, 3, 6));
    // One cut less needed: only the decaying matrix is touched.
    let r = allocate_global(&items, 30).unwrap();
    assert_eq!(r.bonds, vec![vec![1, 2, 1], vec![1, 3, 1]]);
    assert!(allocate_global(&items, 11).is_err());
}

/// Two real matrices, one with a fast-decaying spectrum and one flat: the budget is met
/// (≤ target, within one cut) at several ratios, the fast-decaying matrix is cut first, and
/// it ends with the smaller bond.
#[test]
fn global_allocation_cuts_the_decaying_matrix_first() {
    let n = 16;
    let shape = MpoShape::exact(vec![n, 1], vec![1, n]).unwrap();
    let make = |sig: &dyn Fn(usize) -> f64, seed: u64| -> Vec<f64> {
        let (u, _) = thin_qr(&gaussian(n * n, seed), n, n);
        let (v, _) = thin_qr(&gaussian(n * n, seed + 1), n, n);
        let mut us = u;
        for r in 0..n {
            for c in 0..n {
                us[r * n + c] *= sig(c);
            }
        }
        gemm(&us, false, &v, true, n, n, n)
    };
    let fast = make(&|i| 0.5f64.powi(i as i32), 60);
    let flat = make(&|i| 1.0 - 0.01 * i as f64, 70);
    let sp = |w: &[f64]| Mpo::<f64>::decompose(w, &shape).unwrap().spectra;
    let (sf, sl) = (sp(&fast), sp(&flat));
    let items = [
        Item {
            shape: &shape,
            spectra: &sl,
        },
        Item {
            shape: &shape,
            spectra: &sf,
        },
    ];
    let dense = 2 * n * n;
    for ratio in [0.95, 0.8, 0.5, 0.3] {
        let target = (ratio * dense as f64) as usize;
        let r = allocate_global(&items, target).unwrap();
        let params: usize = r.bonds.iter().map(|b| shape.params_for(b)).sum();
        assert_eq!(params, r.params);
        assert!(params <= target, "{ratio}: {params} > {target}");
        assert!(
            target - params < r.last_saved,
            "{ratio}: more than one cut below"
        );
        // At 0.3 both are down to rank 2, where the fast matrix's next value (0.5 of its
        // first) costs more of its energy than the flat one's.
        if ratio >= 0.5 {
            assert!(r.bonds[1][1] < r.bonds[0][1], "{ratio}: {:?}", r.bonds);
        }
    }
    // Full rank costs 2 × 16 × 32 parameters; the first 10 cuts (32 each) all land on the
    // fast matrix.
    let r = allocate_global(&items, 2 * n * 2 * n - 10 * 2 * n).unwrap();
    assert_eq!(r.bonds[0][1], n);
    assert_eq!(r.bonds[1][1], n - 10);
}
