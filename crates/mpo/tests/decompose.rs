//! Decomposition, truncation and diagnostics: exactness at full bond, the error bound,
//! monotonicity, spectra, gauge, padding, canonicalization and serialization.

mod common;

use common::{frob, gaussian, rel_diff, shape_strategy};
use mpo::{preset, Algorithm, DecomposeOptions, Mpo, MpoShape, Precision, Truncation};
use proptest::prelude::*;

fn opts(algorithm: Algorithm) -> DecomposeOptions {
    DecomposeOptions {
        algorithm,
        ..Default::default()
    }
}

fn check_spectra(m: &Mpo<f64>, w: &[f64]) {
    let norm2 = frob(w).powi(2);
    let full = m.shape().full_bonds();
    assert_eq!(m.spectra.len() + 1, m.n().max(1));
    for (k, s) in m.spectra.iter().enumerate() {
        assert_eq!(s.len(), full[k + 1], "spectrum length at bond {}", k + 1);
        assert!(
            s.windows(2).all(|p| p[0] >= p[1]),
            "bond {} not sorted",
            k + 1
        );
        let total: f64 = s.iter().map(|x| x * x).sum();
        assert!(
            (total - norm2).abs() <= 1e-9 * norm2.max(1e-300),
            "Σλ² {total} vs ‖W‖² {norm2}"
        );
    }
}

proptest! {
    #![proptest_config(common::config(48))]

    /// Exact bonds reproduce W to round-off with both algorithms (f64).
    #[test]
    fn full_bond_is_exact_f64(shape in shape_strategy(6000), seed in 0u64..1000) {
        let w = gaussian(shape.orig_rows * shape.orig_cols, seed);
        for alg in [Algorithm::Gram, Algorithm::SvdSweep] {
            let m = Mpo::decompose_with(&w, &shape, &opts(alg)).unwrap();
            prop_assert_eq!(m.bonds(), &shape.full_bonds()[..]);
            prop_assert_eq!(m.num_params(), shape.full_params());
            let err = m.relative_error(&w).unwrap();
            prop_assert!(err < 1e-10, "{:?}: relative error {}", alg, err);
            check_spectra(&m, &w);
        }
    }

    /// f32 weights: the default (f64 arithmetic, f32 cores) is exact to f32 round-off; the
    /// all-f32 arithmetic path accumulates a few more roundings over the sweep.
    #[test]
    fn full_bond_is_exact_f32(shape in shape_strategy(6000), seed in 0u64..1000) {
        let w: Vec<f32> = gaussian(shape.orig_rows * shape.orig_cols, seed).iter().map(|&x| x as f32).collect();
        for (precision, tol) in [(Precision::F64, 1e-6), (Precision::Native, 5e-5)] {
            for algorithm in [Algorithm::Gram, Algorithm::SvdSweep] {
                let o = DecomposeOptions { algorithm, precision, ..Default::default() };
                let m = Mpo::<f32>::decompose_with(&w, &shape, &o).unwrap();
                let err = m.relative_error(&w).unwrap();
                prop_assert!(err < tol, "{:?}/{:?}: relative error {}", precision, algorithm, err);
            }
        }
        let m = Mpo::<f32>::decompose(&w, &shape).unwrap();
        prop_assert!(m.relative_error(&w).unwrap() < 1e-5);
    }

    /// Uniform caps: the exact error never exceeds sqrt(Σ ε_k²), the bound shrinks as the cap
    /// grows, and so does the exact error. (Cutting all bonds at once is not an orthogonal
    /// projection of W, so strict monotonicity of the exact error is not a theorem; a scan of
    /// 3,600 random shapes found one tiny violation (6.5e-4 relative), on a zero-padded
    /// matrix. The exact-error check therefore runs on unpadded shapes.)
    #[test]
    fn truncation_bound_and_monotonicity(shape in shape_strategy(6000), seed in 0u64..1000) {
        let w = gaussian(shape.orig_rows * shape.orig_cols, seed);
        let norm = frob(&w);
        let full = Mpo::decompose(&w, &shape).unwrap();
        let top = *shape.full_bonds().iter().max().unwrap();
        let mut prev_err = f64::INFINITY;
        let mut prev_bound = f64::INFINITY;
        for d in 1..=top {
            let t = full.truncate(&Truncation::MaxBond(d)).unwrap();
            let err = t.frobenius_error(&w).unwrap();
            let bound = t.error_bound();
            prop_assert!(err <= bound * (1.0 + 1e-9) + 1e-12 * norm, "D={}: err {} > bound {}", d, err, bound);
            if !shape.is_padded() {
                prop_assert!(err <= prev_err + 1e-10 * norm, "D={}: err {} > previous {}", d, err, prev_err);
            }
            prop_assert!(bound <= prev_bound + 1e-12 * norm);
            prev_err = err;
            prev_bound = bound;
        }
        prop_assert!(prev_err < 1e-10 * norm.max(1e-300));
    }

    /// Per-bond lists: bound holds; cutting a single bond costs exactly its ε.
    #[test]
    fn per_bond_truncation(shape in shape_strategy(6000), seed in 0u64..1000, frac in proptest::collection::vec(0.0f64..1.0, 4)) {
        prop_assume!(shape.n() >= 2);
        let w = gaussian(shape.orig_rows * shape.orig_cols, seed);
        let norm = frob(&w);
        let full = Mpo::decompose(&w, &shape).unwrap();
        let fb = shape.full_bonds();
        let list: Vec<usize> = (1..shape.n()).map(|k| ((fb[k] as f64 * frac[(k - 1) % 4]).ceil() as usize).max(1)).collect();
        let t = full.truncate(&Truncation::PerBond(list.clone())).unwrap();
        prop_assert_eq!(&t.bonds()[1..shape.n()], &list[..]);
        let err = t.frobenius_error(&w).unwrap();
        prop_assert!(err <= t.error_bound() * (1.0 + 1e-9) + 1e-12 * norm);
        // single bond
        let k = 1 + (seed as usize % (shape.n() - 1));
        let mut b = fb.clone();
        b[k] = list[k - 1];
        let single = full.truncate_to(&b).unwrap();
        let eps = single.discarded_norms()[k - 1];
        let err1 = single.frobenius_error(&w).unwrap();
        // The bound is exact for one cut of the padded matrix; the original block can only
        // lose less than that.
        if shape.is_padded() {
            prop_assert!(err1 <= eps + 1e-9 * norm, "single-bond cut: err {} vs ε {}", err1, eps);
        } else {
            prop_assert!((err1 - eps).abs() <= 1e-9 * norm, "single-bond cut: err {} vs ε {}", err1, eps);
        }
    }

    /// Relative-error targets: the chosen bonds meet the target bound, and the matrix is within it.
    #[test]
    fn relative_error_truncation(shape in shape_strategy(6000), seed in 0u64..1000, eps in 0.01f64..0.8) {
        let w = gaussian(shape.orig_rows * shape.orig_cols, seed);
        let norm = frob(&w);
        let full = Mpo::decompose(&w, &shape).unwrap();
        let t = full.truncate(&Truncation::RelError(eps)).unwrap();
        prop_assert!(t.error_bound() <= eps * norm * (1.0 + 1e-12));
        prop_assert!(t.frobenius_error(&w).unwrap() <= eps * norm * (1.0 + 1e-9));
        prop_assert!(t.num_params() <= full.num_params());
    }

    /// Truncating during the decomposition gives the same matrix as truncating afterwards, and
    /// the two algorithms agree on truncated matrices.
    #[test]
    fn truncation_paths_agree(shape in shape_strategy(6000), seed in 0u64..1000, d in 1usize..6) {
        let w = gaussian(shape.orig_rows * shape.orig_cols, seed);
        let a = Mpo::decompose(&w, &shape).unwrap().truncate(&Truncation::MaxBond(d)).unwrap();
        let b = Mpo::decompose_with(&w, &shape, &DecomposeOptions::truncated(Truncation::MaxBond(d))).unwrap();
        let c = Mpo::decompose_with(&w, &shape, &DecomposeOptions { truncation: Truncation::MaxBond(d), algorithm: Algorithm::SvdSweep, ..Default::default() }).unwrap();
        prop_assert_eq!(a.bonds(), b.bonds());
        let (ma, mb, mc) = (a.to_matrix().unwrap(), b.to_matrix().unwrap(), c.to_matrix().unwrap());
        // Degenerate Schmidt values could make the kept subspace ambiguous; Gaussian data has none.
        prop_assert!(rel_diff(&mb, &ma) < 1e-8);
        prop_assert!(rel_diff(&mc, &ma) < 1e-6);
    }
}

#[test]
fn symmetric_gauge_balances_each_bond() {
    // In the symmetric gauge, contracting everything left of bond k gives L_k Λ_k^{1/2} with
    // orthonormal L_k: its Gram matrix is diag(λ_k). Check bond 2 of a 4-site MPO.
    let shape = MpoShape::exact(vec![2, 3, 2, 2], vec![2, 2, 3, 1]).unwrap();
    let w = gaussian(shape.rows() * shape.cols(), 3);
    let m = Mpo::decompose(&w, &shape).unwrap();
    let d = m.bonds().to_vec();
    let mm = shape.local_dims();
    // left block of sites 0, 1: [m0·m1, d2]
    let l01 = mpo::linalg::gemm(
        &m.cores[0],
        false,
        &m.cores[1],
        false,
        mm[0],
        d[1],
        mm[1] * d[2],
    );
    let g = mpo::linalg::gemm(&l01, true, &l01, false, d[2], mm[0] * mm[1], d[2]);
    for a in 0..d[2] {
        for b in 0..d[2] {
            let expect = if a == b { m.spectra[1][a] } else { 0.0 };
            assert!(
                (g[a * d[2] + b] - expect).abs() < 1e-10,
                "({a},{b}): {} vs {expect}",
                g[a * d[2] + b]
            );
        }
    }
    // and from the right: R Rᵀ = diag(λ) for sites 2, 3
    let r23 = mpo::linalg::gemm(
        &m.cores[2],
        false,
        &m.cores[3],
        false,
        d[2] * mm[2],
        d[3],
        mm[3],
    );
    let h = mpo::linalg::gemm(&r23, false, &r23, true, d[2], mm[2] * mm[3], d[2]);
    for a in 0..d[2] {
        assert!((h[a * d[2] + a] - m.spectra[1][a]).abs() < 1e-10);
    }
}

#[test]
fn real_size_shapes_are_exact() {
    for name in [
        "balanced-768x768",
        "opf-bert-base-attn-768x768",
        "mpobert-768x768-n9",
    ] {
        let shape = preset(name).unwrap();
        let w = gaussian(shape.orig_rows * shape.orig_cols, 11);
        let m = Mpo::decompose(&w, &shape).unwrap();
        assert_eq!(m.num_params(), shape.full_params(), "{name}");
        let err = m.relative_error(&w).unwrap();
        assert!(err < 1e-10, "{name}: {err}");
    }
}

#[test]
fn opf_inner_cores_are_identities() {
    // 1×1 sites carry no data: in the symmetric gauge they are exactly the identity, so an
    // over-parameterized OPF chain starts as a deep linear net initialised at I.
    let shape = MpoShape::one_padded_chain(&[8, 6], &[4, 3], 6).unwrap();
    let w = gaussian(48 * 12, 5);
    let m = Mpo::decompose(&w, &shape).unwrap();
    for k in 1..5 {
        let d = m.bonds()[k];
        for a in 0..d {
            for b in 0..d {
                let v = m.cores[k][a * d + b];
                assert!(
                    (v - if a == b { 1.0 } else { 0.0 }).abs() < 1e-12,
                    "core {k} ({a},{b}) = {v}"
                );
            }
        }
    }
    assert!(m.ratio() > 1.0);
    assert!(m.relative_error(&w).unwrap() < 1e-12);
}

#[test]
fn rank_deficient_and_zero_matrices() {
    // Outer product of per-site vectors: rank 1 at every bond, entropy 0, no NaNs.
    let shape = MpoShape::exact(vec![2, 3, 2], vec![3, 2, 2]).unwrap();
    let u = gaussian(12, 1);
    let v = gaussian(12, 2);
    let w: Vec<f64> = (0..144).map(|i| u[i / 12] * v[i % 12]).collect();
    let m = Mpo::decompose(&w, &shape).unwrap();
    assert!(m.cores.iter().flatten().all(|x| x.is_finite()));
    assert!(m.relative_error(&w).unwrap() < 1e-10);
    let z = vec![0.0f64; 144];
    let mz = Mpo::decompose(&z, &shape).unwrap();
    assert!(mz.cores.iter().flatten().all(|x| x.is_finite()));
    assert!(mz.to_matrix().unwrap().iter().all(|x| *x == 0.0));
    assert_eq!(mz.entropies(), vec![0.0, 0.0]);
    // A product of per-site matrices (a Kronecker product) has Schmidt rank 1 at every bond.
    let a = gaussian(6, 3); // 2×3
    let b = gaussian(6, 4); // 3×2
    let c = gaussian(4, 5); // 2×2
    let mut k = vec![0.0; 144];
    for i0 in 0..2 {
        for i1 in 0..3 {
            for i2 in 0..2 {
                for j0 in 0..3 {
                    for j1 in 0..2 {
                        for j2 in 0..2 {
                            k[((i0 * 3 + i1) * 2 + i2) * 12 + (j0 * 2 + j1) * 2 + j2] =
                                a[i0 * 3 + j0] * b[i1 * 2 + j1] * c[i2 * 2 + j2];
                        }
                    }
                }
            }
        }
    }
    let mk = Mpo::decompose(&k, &shape).unwrap();
    for e in mk.entropies() {
        assert!(e.abs() < 1e-10, "entropy {e}");
    }
    let t = mk.truncate(&Truncation::MaxBond(1)).unwrap();
    assert!(t.relative_error(&k).unwrap() < 1e-10);
}

#[test]
fn diagnostics() {
    let shape = preset("balanced-768x768").unwrap();
    let w = gaussian(768 * 768, 9);
    let m = Mpo::decompose(&w, &shape).unwrap();
    assert_eq!(m.central_index(), 2);
    assert!(m.is_central(2));
    assert!((m.central_share() - 0.889).abs() < 5e-4);
    assert!((m.ratio() - 663_840.0 / 589_824.0).abs() < 1e-12);
    let ent = m.entropies();
    assert_eq!(ent.len(), 4);
    for (k, e) in ent.iter().enumerate() {
        assert!(*e > 0.0 && *e <= (m.bonds()[k + 1] as f64).ln() + 1e-9);
    }
    // the central bonds carry the most entanglement (MPOP's motivation for freezing C)
    assert!(ent[1] > ent[0] && ent[2] > ent[3]);
    assert!((m.frobenius_norm().unwrap() - frob(&w)).abs() < 1e-9 * frob(&w));
    let cut = m.truncate(&Truncation::MaxBond(100)).unwrap();
    let next = cut.bound_after_cut(2).unwrap();
    assert!(next >= cut.error_bound());
    let mut b = cut.bonds().to_vec();
    b[2] -= 1;
    assert_eq!(next, cut.error_bound_for(&b));
}

#[test]
fn padded_matrices_roundtrip() {
    // BERT-style vocabulary padding, scaled down: 31 (prime) rows padded to 32.
    let shape = MpoShape::auto(31, 12, 3).unwrap();
    assert!(shape.is_padded());
    assert_eq!(shape.rows(), 32);
    let w = gaussian(31 * 12, 4);
    let m = Mpo::decompose(&w, &shape).unwrap();
    let back = m.to_matrix().unwrap();
    assert_eq!(back.len(), 31 * 12);
    assert!(rel_diff(&back, &w) < 1e-12);
    let padded = m.to_padded_matrix();
    let pc = shape.cols();
    for i in 31..shape.rows() {
        assert!(padded[i * pc..(i + 1) * pc].iter().all(|x| x.abs() < 1e-12));
    }
}

#[test]
fn canonicalize_recovers_spectra_and_matrix() {
    let shape = MpoShape::exact(vec![2, 3, 2, 2], vec![2, 2, 2, 3]).unwrap();
    let w = gaussian(24 * 24, 8);
    let m = Mpo::decompose(&w, &shape).unwrap();
    let c = m.canonicalize().unwrap();
    assert!(rel_diff(&c.to_matrix().unwrap(), &w) < 1e-10);
    for (a, b) in m.spectra.iter().zip(&c.spectra) {
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-9);
        }
    }
    // Perturb the cores as training would, then re-canonicalize a truncated MPO: the spectra
    // describe the new matrix and slicing it obeys the bound again.
    let mut t = m.truncate(&Truncation::MaxBond(5)).unwrap();
    for (k, core) in t.cores.iter_mut().enumerate() {
        let noise = gaussian(core.len(), 100 + k as u64);
        core.iter_mut().zip(noise).for_each(|(x, e)| *x += 0.05 * e);
    }
    let what = t.to_matrix().unwrap();
    let tc = t.canonicalize().unwrap();
    assert!(rel_diff(&tc.to_matrix().unwrap(), &what) < 1e-10);
    for s in &tc.spectra {
        let total: f64 = s.iter().map(|x| x * x).sum();
        assert!((total - frob(&what).powi(2)).abs() < 1e-9 * total);
    }
    let cut = tc.truncate(&Truncation::MaxBond(3)).unwrap();
    assert!(cut.frobenius_error(&what).unwrap() <= cut.error_bound() * (1.0 + 1e-9));
}

#[test]
fn checkpoint_roundtrip() {
    let shape = preset("albert-768x768").unwrap();
    let w = gaussian(768 * 768, 6);
    let m = Mpo::decompose(&w, &shape)
        .unwrap()
        .truncate(&Truncation::MaxBond(64))
        .unwrap();
    let (manifest, cores) = m.to_parts();
    let json = serde_json::to_string(&manifest).unwrap();
    let back: mpo::MpoManifest = serde_json::from_str(&json).unwrap();
    assert_eq!(back.dtype, "f64");
    let m2 = Mpo::from_parts(&back, cores).unwrap();
    // JSON may round the last bit of an f64; everything else is exact.
    assert_eq!(
        (&m.row_factors, &m.col_factors, &m.bond_dims, &m.cores),
        (&m2.row_factors, &m2.col_factors, &m2.bond_dims, &m2.cores)
    );
    for (a, b) in m.spectra.iter().flatten().zip(m2.spectra.iter().flatten()) {
        assert!((a - b).abs() <= 1e-14 * a.abs());
    }
    let m32 = m.cast::<f32>();
    let (man32, cores32) = m32.to_parts();
    assert_eq!(man32.dtype, "f32");
    assert!(Mpo::from_parts(&man32, cores32).unwrap() == m32);
    // corrupt sizes are rejected
    let (manifest, mut cores) = m.to_parts();
    cores[1].pop();
    assert!(Mpo::from_parts(&manifest, cores).is_err());
}

#[test]
fn bad_inputs_are_errors() {
    let shape = MpoShape::exact(vec![2, 2], vec![2, 2]).unwrap();
    assert!(Mpo::<f64>::decompose(&[0.0; 15], &shape).is_err());
    assert!(MpoShape::new(vec![2, 2], vec![2], 4, 2).is_err());
    assert!(MpoShape::new(vec![2, 2], vec![2, 2], 5, 4).is_err());
    let m = Mpo::decompose(&gaussian(16, 1), &shape).unwrap();
    assert!(m.truncate(&Truncation::PerBond(vec![1, 1])).is_err());
    assert!(m.truncate(&Truncation::MaxBond(0)).is_err());
    assert!(m.truncate_to(&[1, 9, 1]).is_err());
}
