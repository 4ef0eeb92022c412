//! Calibrated MPO / SVD compression of a tiny llama: S = I gives the plain compression bit for
//! bit, real calibration statistics are consistent, the SVD layout's measured output error is
//! its prediction and beats plain truncation, and the global allocation meets its budget.

use methods::mpop::{self, Budget, CompressOptions, MpoLayer, Shapes};
use methods::mpop_calib::{
    collect_stats, compress_calibrated, Allocate, CalibratedOptions, InputStats, Stats, Whiten,
};
use methods::quant::calib::calibration_samples;
use models::{testing, Model};

fn tiny() -> (tempfile::TempDir, Model) {
    let d = tempfile::tempdir().unwrap();
    testing::write_tiny_llama(&d.path().join("m"), false).unwrap();
    let m = Model::load(d.path().join("m").to_str().unwrap(), false).unwrap();
    (d, m)
}

fn reload(d: &tempfile::TempDir) -> Model {
    Model::load(d.path().join("m").to_str().unwrap(), false).unwrap()
}

fn opts(shapes: Shapes, n: usize, budget: Budget) -> CompressOptions {
    CompressOptions {
        shapes,
        n,
        budget,
        patterns: vec!["layers.".into()],
    }
}

fn cores(m: &Model) -> Vec<(String, Vec<usize>, Vec<Vec<f32>>)> {
    m.linears()
        .into_iter()
        .filter_map(|(n, l)| {
            let mp = l.inner().as_any().downcast_ref::<MpoLayer>()?;
            let mpo: mpo::Mpo<f32> = mp.cores().to_mpo().unwrap();
            Some((n, mpo.bond_dims.clone(), mpo.cores.clone()))
        })
        .collect()
}

fn stats_of(m: &mut Model, names: &[String]) -> Stats {
    let text: String = (0..300)
        .map(|i| format!("the cat {i} sat on the mat while a dog ran round the hall. "))
        .collect();
    let samples = calibration_samples(m, &text, 6, 24, 1).unwrap();
    collect_stats(m, &samples, names, 4, false).unwrap()
}

fn decoder_names(m: &Model) -> Vec<String> {
    mpop::select(m, &["layers.".to_string()], false)
}

/// Identity input statistics (and no damping) make every whitening S = I: the calibrated path
/// must then produce the plain compression's bonds and cores exactly, for MPO and SVD layouts.
#[test]
fn identity_statistics_give_the_plain_compression() {
    for (shapes, n) in [(Shapes::Auto, 3), (Shapes::Svd, 2)] {
        let (d, mut plain) = tiny();
        mpop::compress(
            &mut plain,
            &opts(shapes, n, Budget::ParamsRatio(0.6)),
            false,
        )
        .unwrap();
        let cal = reload(&d);
        let mut stats = Stats::new();
        for (name, l) in cal.linears() {
            if name.contains("layers.") {
                let k = l.in_features();
                let mut gram = vec![0f32; k * k];
                for i in 0..k {
                    gram[i * k + i] = 1.0;
                }
                let key = methods::mpop_calib::input_key(&name);
                stats.insert(
                    key,
                    InputStats {
                        n: k,
                        gram,
                        abs_mean: vec![1.0; k],
                        tokens: 1,
                    },
                );
            }
        }
        for whiten in [Whiten::Cholesky, Whiten::Diag, Whiten::None] {
            let mut co = CalibratedOptions::new(opts(shapes, n, Budget::ParamsRatio(0.6)));
            co.whiten = whiten;
            co.damp = 0.0;
            let mut m = reload(&d);
            let r = compress_calibrated(&mut m, &co, Some(&stats), false).unwrap();
            assert_eq!(r.matrices.len(), 14);
            let (a, b) = (cores(&plain), cores(&m));
            assert_eq!(a.len(), 14);
            assert_eq!(a, b, "{shapes:?} {whiten:?}");
            // With G = I the output error is the weight error.
            for x in &r.matrices {
                let o = x.rel_output_error.unwrap();
                assert!((o - x.rel_error).abs() <= 1e-6 * x.rel_error, "{x:?}");
            }
        }
    }
}

/// Real statistics: every group saw every token, (mean |x|)² ≤ mean x² per input (Jensen);
/// SVD-LLM's measured output error equals its prediction and is below plain truncation's on
/// every matrix; ASVD's error in its own metric equals its prediction; the global allocation
/// meets the budget within one cut.
#[test]
fn calibrated_svd_is_exact_and_beats_plain() {
    let (d, mut m) = tiny();
    let names = decoder_names(&m);
    let stats = stats_of(&mut m, &names);
    // q/k/v and gate/up share inputs: 4 groups per layer.
    assert_eq!(stats.len(), 8);
    for (k, s) in &stats {
        assert_eq!(s.tokens, 6 * 24, "{k}");
        for j in 0..s.n {
            let (a, g) = (s.abs_mean[j], s.gram[j * s.n + j] as f64);
            assert!(a > 0.0 && a * a <= g * (1.0 + 1e-5), "{k}[{j}]: {a}² > {g}");
        }
    }
    let run = |whiten: Whiten, allocate: Allocate, shapes: Shapes, n: usize, ratio: f64| {
        let mut co = CalibratedOptions::new(opts(shapes, n, Budget::ParamsRatio(ratio)));
        co.whiten = whiten;
        co.allocate = allocate;
        let mut m = reload(&d);
        compress_calibrated(&mut m, &co, Some(&stats), false).unwrap()
    };
    let svd_llm = run(Whiten::Cholesky, Allocate::Uniform, Shapes::Svd, 2, 0.4);
    let plain = run(Whiten::None, Allocate::Uniform, Shapes::Svd, 2, 0.4);
    for (c, p) in svd_llm.matrices.iter().zip(&plain.matrices) {
        assert_eq!(c.bonds, p.bonds);
        assert!(c.whitening_exact);
        let out = c.rel_output_error.unwrap();
        assert!((out - c.pred_rel_error).abs() <= 1e-6 * out, "{c:?}");
        assert!(out < p.rel_output_error.unwrap(), "{c:?} vs {p:?}");
        // the weight error is what it gives up
        assert!(c.rel_error > p.rel_error, "{c:?} vs {p:?}");
    }
    let asvd = run(Whiten::Diag, Allocate::Uniform, Shapes::Svd, 2, 0.4);
    for c in &asvd.matrices {
        let e = c.rel_diag_error.unwrap();
        assert!((e - c.pred_rel_error).abs() <= 1e-6 * e, "{c:?}");
    }
    // MPO layout: the Kronecker fit is an approximation; both numbers are reported.
    let mpo = run(Whiten::Cholesky, Allocate::Uniform, Shapes::Auto, 3, 0.5);
    assert!(mpo.matrices.iter().any(|c| !c.whitening_exact));
    assert!(mpo
        .matrices
        .iter()
        .all(|c| c.rel_output_error.unwrap().is_finite() && c.pred_rel_error > 0.0));
    for ratio in [0.3, 0.6] {
        for (shapes, n) in [(Shapes::Svd, 2), (Shapes::Auto, 3)] {
            let g = run(Whiten::Cholesky, Allocate::Global, shapes, n, ratio);
            let target = g.target_params.unwrap();
            assert_eq!(target, (ratio * g.dense_params as f64).floor() as usize);
            assert!(g.mpo_params <= target, "{} > {target}", g.mpo_params);
            // within one cut: no cut saves more than a bond index of the widest core pair
            let step = g
                .matrices
                .iter()
                .map(|c| 2 * c.rows.max(c.cols) * c.bonds.iter().max().unwrap())
                .max()
                .unwrap();
            assert!(
                target - g.mpo_params < step,
                "{ratio}: {} vs {target}",
                g.mpo_params
            );
            let s: usize = g.by_module.values().map(|s| s.mpo_params).sum();
            assert_eq!(s, g.mpo_params);
            let s: usize = g.by_layer.values().map(|s| s.mpo_params).sum();
            assert_eq!(s, g.mpo_params);
        }
    }
    // The calibrated checkpoint saves and reloads as an ordinary MPO checkpoint.
    let mut co = CalibratedOptions::new(opts(Shapes::Svd, 2, Budget::ParamsRatio(0.4)));
    co.allocate = Allocate::Global;
    let mut m = reload(&d);
    compress_calibrated(&mut m, &co, Some(&stats), false).unwrap();
    let out = d.path().join("ck");
    mpop::save(&m, &out).unwrap();
    let back = mpop::load(&out).unwrap();
    assert_eq!(cores(&back), cores(&m));
}

/// Options that cannot work are errors naming the option, before any work.
#[test]
fn bad_options_are_refused() {
    let (_d, mut m) = tiny();
    let bad = |co: &CalibratedOptions, stats: Option<&Stats>, m: &mut Model, needle: &str| {
        let e = compress_calibrated(m, co, stats, false).unwrap_err();
        assert!(e.to_string().contains(needle), "{e} lacks {needle}");
    };
    let mut co = CalibratedOptions::new(opts(Shapes::Auto, 3, Budget::RelError(0.1)));
    co.whiten = Whiten::None;
    co.allocate = Allocate::Global;
    bad(&co, None, &mut m, "`allocate` global");
    co.allocate = Allocate::Uniform;
    co.whiten = Whiten::Cholesky;
    bad(&co, None, &mut m, "`whiten` needs calibration");
    let co = CalibratedOptions::new(opts(Shapes::Auto, 3, Budget::ParamsRatio(1.5)));
    bad(&co, None, &mut m, "(0, 1]");
    let names = decoder_names(&m);
    let stats = stats_of(&mut m, &names);
    let co = CalibratedOptions::new(opts(Shapes::Auto, 3, Budget::Bond(2)));
    bad(&co, Some(&stats), &mut m, "`bond`");
    let mut co = CalibratedOptions::new(opts(Shapes::Auto, 3, Budget::ParamsRatio(0.5)));
    co.compress.patterns = vec!["embed".into()];
    bad(&co, Some(&stats), &mut m, "not inside a decoder layer");
    // an encoder cannot be calibrated
    let d = tempfile::tempdir().unwrap();
    testing::write_tiny_bert(&d.path().join("b")).unwrap();
    let mut b = Model::load(d.path().join("b").to_str().unwrap(), false).unwrap();
    let names = mpop::select(&b, &[], false);
    let e = collect_stats(&mut b, &[vec![1, 2, 3]], &names, 1, false).unwrap_err();
    assert!(e.to_string().contains("encoder"), "{e}");
}
