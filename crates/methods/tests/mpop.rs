//! MPOP compression on tiny models: exact at full bond, bounded when truncated, and the
//! checkpoint / dense export round trips reproduce the compressed model's outputs.

use candle_core::{Device, Tensor};
use methods::mpop::{self, Budget, CompressOptions, Shapes};
use models::CausalLm;
use models::{testing, Model};

fn logits(m: &Model) -> Tensor {
    let ids = Tensor::new(&[[5u32, 77, 12, 200, 3, 9]], &Device::Cpu).unwrap();
    m.llama().unwrap().forward(&ids, None).unwrap()
}

use models::testing::max_abs_diff as max_abs;

fn opts(budget: Budget) -> CompressOptions {
    CompressOptions {
        shapes: Shapes::Auto,
        n: 3,
        budget,
        patterns: vec![],
    }
}

fn tiny(qwen2: bool) -> (tempfile::TempDir, Model) {
    let d = tempfile::tempdir().unwrap();
    testing::write_tiny_llama(&d.path().join("m"), qwen2).unwrap();
    let m = Model::load(d.path().join("m").to_str().unwrap(), false).unwrap();
    (d, m)
}

#[test]
fn full_bond_compression_is_exact_and_keeps_tying() {
    for qwen2 in [false, true] {
        let (_d, mut m) = tiny(qwen2);
        let want = logits(&m);
        let reps = mpop::compress(&mut m, &opts(Budget::Full), false).unwrap();
        assert_eq!(reps.len(), m.linears().len());
        for r in &reps {
            assert!(r.rel_error < 1e-5, "{r:?}");
        }
        assert!(m.linears().iter().all(|(_, l)| l.kind() == "mpo"));
        if !qwen2 {
            assert!(
                m.llama().unwrap().lm_head.is_none(),
                "tied head stays tied to the (MPO) embedding"
            );
        }
        let d = max_abs(&logits(&m), &want);
        assert!(d < 1e-3, "qwen2={qwen2}: {d}");
    }
}

#[test]
fn params_ratio_budget_is_respected_and_error_within_bound() {
    let (_d, mut m) = tiny(false);
    let reps = mpop::compress(&mut m, &opts(Budget::ParamsRatio(0.5)), false).unwrap();
    for r in &reps {
        assert!(
            r.mpo_params as f64 <= 0.5 * r.dense_params as f64 + 1.0,
            "{r:?}"
        );
        assert!(
            r.rel_error <= r.rel_error_bound * (1.0 + 1e-4) + 1e-6,
            "{r:?}"
        );
        assert!(r.rel_error > 0.0);
    }
    let mut m2 = Model::load(_d.path().join("m").to_str().unwrap(), false).unwrap();
    let e = mpop::compress(
        &mut m2,
        &CompressOptions {
            patterns: vec!["nothing".into()],
            ..opts(Budget::Full)
        },
        false,
    )
    .unwrap_err();
    assert!(e.to_string().contains("matches no weight matrix"), "{e}");
}

#[test]
fn checkpoint_and_dense_export_round_trip() {
    let (d, mut m) = tiny(false);
    mpop::compress(
        &mut m,
        &CompressOptions {
            patterns: vec!["mlp".into(), "q_proj".into()],
            ..opts(Budget::Bond(3))
        },
        false,
    )
    .unwrap();
    let want = logits(&m);
    let ck = d.path().join("ck");
    mpop::save(&m, &ck).unwrap();
    let back = mpop::load(&ck).unwrap();
    assert_eq!(
        back.linears()
            .iter()
            .filter(|(_, l)| l.kind() == "mpo")
            .count(),
        2 * 4
    );
    assert_eq!(back.total_params(), m.total_params());
    assert!(max_abs(&logits(&back), &want) < 1e-5);
    // Saving again into the same directory is refused (nothing overwritten).
    assert!(mpop::save(&m, &ck)
        .unwrap_err()
        .to_string()
        .contains("not empty"));

    let dense = d.path().join("dense");
    models::export::write_hf_dir(
        &back,
        &dense,
        &models::export::dense_state_dict(&back).unwrap(),
        &[],
    )
    .unwrap();
    let plain = Model::load(dense.to_str().unwrap(), false).unwrap();
    assert!(plain.linears().iter().all(|(_, l)| l.kind() == "dense"));
    assert!(max_abs(&logits(&plain), &want) < 1e-4);
}

#[test]
fn checkpoint_that_disagrees_with_its_manifest_is_refused() {
    let (d, mut m) = tiny(false);
    mpop::compress(
        &mut m,
        &CompressOptions {
            patterns: vec!["layers.0.mlp.up_proj".into()],
            ..opts(Budget::Full)
        },
        false,
    )
    .unwrap();
    let ck = d.path().join("ck");
    mpop::save(&m, &ck).unwrap();
    let mf = ck.join(mpop::MANIFEST);
    let text = std::fs::read_to_string(&mf).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let layer = &mut v["layers"]["model.layers.0.mlp.up_proj"];
    let s0 = layer["core_shapes"][0][3].as_u64().unwrap();
    layer["core_shapes"][0][3] = serde_json::json!(s0 + 1);
    std::fs::write(&mf, v.to_string()).unwrap();
    let e = mpop::load(&ck).unwrap_err().to_string();
    assert!(
        e.contains("model.layers.0.mlp.up_proj.mpo.core_0") && e.contains("shape"),
        "{e}"
    );
    std::fs::write(&mf, "{ broken").unwrap();
    let e = mpop::load(&ck).unwrap_err().to_string();
    assert!(
        e.contains("mpo_manifest.json") && e.contains("invalid manifest"),
        "{e}"
    );
}

#[test]
fn bert_compression_keeps_outputs() {
    let d = tempfile::tempdir().unwrap();
    testing::write_tiny_bert(d.path()).unwrap();
    let mut m = Model::load(d.path().to_str().unwrap(), false).unwrap();
    let ids = Tensor::new(&[[1u32, 50, 60, 70, 2]], &Device::Cpu).unwrap();
    let want = m.bert().unwrap().forward(&ids, None, None).unwrap();
    mpop::compress(&mut m, &opts(Budget::Full), false).unwrap();
    let got = m.bert().unwrap().forward(&ids, None, None).unwrap();
    assert!(max_abs(&got, &want) < 1e-3);
}

/// The training rebuild (`dense_from_cores_with` over `models::kernels::matmul`, as MpoLayer
/// uses it) equals candle's composed rebuild in value and in every auxiliary core's gradient,
/// and gives the frozen central core no gradient at all.
#[test]
fn training_rebuild_matches_candle_and_skips_the_frozen_core() {
    use candle_core::Var;
    // Sizes that need padding, so the rebuild's final slice is exercised too.
    let shape = mpo::MpoShape::new(vec![2, 3, 2, 3, 2], vec![3, 2, 2, 2, 2], 70, 45).unwrap();
    let (rows, cols) = (shape.orig_rows, shape.orig_cols);
    assert!(
        shape.rows() * shape.cols() > rows * cols,
        "{shape:?} is not padded"
    );
    let w: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 7919 % 997) as f32 / 997.0) - 0.5)
        .collect();
    let m = mpo::Mpo::<f32>::decompose(&w, &shape).unwrap();
    let mut cores = mpo::MpoCores::from_mpo(&m, &Device::Cpu).unwrap();
    cores.freeze_central();
    let c = cores.central_index();
    let probe = Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu).unwrap();
    let run = |tracked: bool| {
        let ts = cores.tensors();
        let w = if tracked {
            mpo::dense_from_cores_with(&ts, cores.shape(), &models::kernels::matmul).unwrap()
        } else {
            mpo::dense_from_cores(&ts, cores.shape()).unwrap()
        };
        let g = (&w * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        (w, g)
    };
    let (w_ref, g_ref) = run(false);
    let (w_new, g_new) = run(true);
    let wt = Tensor::from_vec(w.clone(), (rows, cols), &Device::Cpu).unwrap();
    assert!(max_abs(&w_new, &wt) < 1e-5, "rebuild is not W");
    assert!(max_abs(&w_new, &w_ref) < 1e-5);
    let vars: Vec<Var> = cores.vars().to_vec();
    for (k, v) in vars.iter().enumerate() {
        let (a, b) = (g_new.get(v.as_tensor()), g_ref.get(v.as_tensor()));
        if k == c {
            assert!(
                a.is_none() && b.is_none(),
                "the frozen central core got a gradient"
            );
            continue;
        }
        let (a, b) = (a.expect("aux gradient"), b.expect("reference gradient"));
        let scale = b
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .max(1.0);
        assert!(
            max_abs(a, b) / scale < 1e-4,
            "core {k}: {} vs scale {scale}",
            max_abs(a, b)
        );
    }
}
