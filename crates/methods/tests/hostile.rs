//! Method checkpoints from strangers (issue 24): MPO manifests, GPTQ `quantize_config.json`
//! and packed tensors, PEFT adapter configs. Each reproduction gives one error; property
//! tests set manifest/config fields to extremes and require "error or success, no panic".
//! Cases per property: `PROPTEST_CASES` (CI defaults below).

use methods::lora;
use methods::mpop::{self, Budget, CompressOptions, Shapes};
use methods::quant::{self, calib::Method, KeepFp16, QuantOptions};
use models::{testing, Model};
use proptest::prelude::*;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

fn edit_json(p: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(p, v.to_string()).unwrap();
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

/// A tiny MPO checkpoint and a tiny 4-bit RTN checkpoint (group size 16), written once; each
/// test edits a copy.
struct Fixtures {
    _dir: tempfile::TempDir,
    base: PathBuf,
    mpo: PathBuf,
    q4: PathBuf,
}

fn fixtures() -> &'static Fixtures {
    static F: OnceLock<Fixtures> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base");
        testing::write_tiny_llama(&base, false).unwrap();
        let mut m = Model::load(base.to_str().unwrap(), false).unwrap();
        let o = CompressOptions {
            shapes: Shapes::Auto,
            n: 3,
            budget: Budget::ParamsRatio(0.5),
            patterns: vec![],
        };
        mpop::compress(&mut m, &o, false).unwrap();
        let mpo = dir.path().join("mpo");
        mpop::save(&m, &mpo).unwrap();

        let mut m = Model::load(base.to_str().unwrap(), false).unwrap();
        let o = QuantOptions {
            method: Method::Rtn,
            bits: 4,
            group_size: 16,
            keep: KeepFp16::default(),
            ..Default::default()
        };
        quant::quantize_model(&mut m, &o, None, false).unwrap();
        let q4 = dir.path().join("q4");
        let cfg = quant::QuantizeConfig {
            bits: 4,
            group_size: 16,
            damp_percent: 0.01,
            desc_act: false,
            sym: false,
            true_sequential: true,
            quant_method: "gptq".into(),
            checkpoint_format: "gptq".into(),
            mpolm_method: "rtn".into(),
            mpolm_fp16_modules: vec![],
            mpolm_int8_activations: None,
        };
        quant::save_quantized(&m, &q4, &cfg).unwrap();
        Fixtures {
            _dir: dir,
            base,
            mpo,
            q4,
        }
    })
}

fn mpo_copy() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("mpo");
    copy_dir(&fixtures().mpo, &p);
    (d, p)
}

fn q4_copy() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("q4");
    copy_dir(&fixtures().q4, &p);
    (d, p)
}

fn mpo_err(edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let (_d, p) = mpo_copy();
    edit_json(&p.join(mpop::MANIFEST), edit);
    match mpop::load(&p) {
        Ok(_) => panic!("the edited MPO checkpoint loaded"),
        Err(e) => e.to_string(),
    }
}

fn q4_err(edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let (_d, p) = q4_copy();
    edit_json(&p.join(quant::io::QUANT_CONFIG), edit);
    match quant::load_quantized(&p) {
        Ok(_) => panic!("the edited quantized checkpoint loaded"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn untouched_fixtures_load() {
    mpop::load(&fixtures().mpo).unwrap();
    quant::load_quantized(&fixtures().q4).unwrap();
}

#[test]
fn mpo_manifest_version_format_dtype() {
    let e = mpo_err(|v| v["version"] = json!(2));
    assert!(
        e.contains("mpo_manifest.json") && e.contains("version 2"),
        "{e}"
    );
    let e = mpo_err(|v| v["format"] = json!("something-else"));
    assert!(e.contains("format 'something-else'"), "{e}");
    let e = mpo_err(|v| {
        let layers = v["layers"].as_object_mut().unwrap();
        let first = layers.values_mut().next().unwrap();
        first["dtype"] = json!("f64");
    });
    assert!(e.contains("dtype 'f64'"), "{e}");
}

#[test]
fn mpo_manifest_sizes_that_wrap_or_explode() {
    // Row factors whose product wraps modulo 2^64 to a small number.
    let e = mpo_err(|v| {
        let layers = v["layers"].as_object_mut().unwrap();
        let l = layers.values_mut().next().unwrap();
        let n = l["row_factors"].as_array().unwrap().len();
        let mut f = vec![json!(1u64 << 32); n];
        f[0] = json!((1u64 << 32) + 1);
        l["row_factors"] = json!(f);
    });
    assert!(
        e.contains("row factors") && e.contains("out of range"),
        "{e}"
    );
    // A matrix far beyond any model, which bond-1 cores would "contract" to.
    let e = mpo_err(|v| {
        let layers = v["layers"].as_object_mut().unwrap();
        let l = layers.values_mut().next().unwrap();
        l["orig_rows"] = json!(1u64 << 22);
        l["orig_cols"] = json!(1u64 << 22);
    });
    assert!(
        e.contains("element limit") || e.contains("out of range"),
        "{e}"
    );
}

#[test]
fn gptq_config_fields_are_checked() {
    let e = q4_err(|v| v["group_size"] = json!(0));
    assert!(e.contains("group_size 0"), "{e}");
    let e = q4_err(|v| v["group_size"] = json!(-7));
    assert!(e.contains("group_size -7"), "{e}");
    // A valid-looking size that disagrees with the stored scales (16 per group).
    let e = q4_err(|v| v["group_size"] = json!(8));
    assert!(e.contains("scales") && e.contains("group_size 8"), "{e}");
    let e = q4_err(|v| v["damp_percent"] = json!(-1.0));
    assert!(e.contains("damp_percent"), "{e}");
    let e = q4_err(|v| v["quant_method"] = json!("awq"));
    assert!(e.contains("quant_method 'awq'"), "{e}");
    let e = q4_err(|v| v["bits"] = json!(5));
    assert!(e.contains("bit width 5"), "{e}");
}

#[test]
fn gptq_nan_scales_are_refused() {
    let (_d, p) = q4_copy();
    let st = p.join("model.safetensors");
    let mut t = candle_core::safetensors::load(&st, &candle_core::Device::Cpu).unwrap();
    let key = "model.layers.0.mlp.up_proj.scales";
    let s = t[key].to_dtype(candle_core::DType::F32).unwrap();
    let mut v: Vec<f32> = s.flatten_all().unwrap().to_vec1().unwrap();
    v[3] = f32::NAN;
    let s = candle_core::Tensor::from_vec(v, s.dims(), &candle_core::Device::Cpu)
        .unwrap()
        .to_dtype(candle_core::DType::F16)
        .unwrap();
    t.insert(key.into(), s);
    candle_core::safetensors::save(&t, &st).unwrap();
    let e = quant::load_quantized(&p).unwrap_err().to_string();
    assert!(e.contains("up_proj.scales") && e.contains("NaN"), "{e}");
}

/// An adapter directory (a real one, saved from the tiny model) whose base is `base`.
fn adapter(dir: &Path, base: &str) {
    let mut m = Model::load(fixtures().base.to_str().unwrap(), false).unwrap();
    let c = lora::LoraConfig {
        r: 2,
        alpha: 4.0,
        dropout: 0.0,
        target_modules: vec!["q_proj".into()],
        seed: 1,
    };
    lora::apply(&mut m, &c).unwrap();
    lora::save_peft(&m, &c, base, "CAUSAL_LM", &[], dir).unwrap();
}

#[test]
fn adapter_base_cycles_are_errors() {
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("a");
    let b = d.path().join("b");
    // Its own base.
    adapter(&a, a.to_str().unwrap());
    let e = lora::adapter_chain(&a).unwrap_err().to_string();
    assert!(
        e.contains("cycle") && e.contains("adapter_config.json"),
        "{e}"
    );
    // Two adapters naming each other.
    adapter(&a, b.to_str().unwrap());
    adapter(&b, a.to_str().unwrap());
    let e = lora::adapter_chain(&a).unwrap_err().to_string();
    assert!(e.contains("cycle"), "{e}");
    // A proper stack: b on a on the base model.
    adapter(&a, fixtures().base.to_str().unwrap());
    let (base, chain) = lora::adapter_chain(&b).unwrap();
    assert_eq!(base, fixtures().base.to_str().unwrap());
    assert_eq!(chain, vec![a.clone(), b.clone()]);
}

#[test]
fn adapter_stacks_have_a_depth_limit() {
    let d = tempfile::tempdir().unwrap();
    let n = models::untrusted::MAX_ADAPTER_DEPTH + 1;
    let dirs: Vec<PathBuf> = (0..n).map(|i| d.path().join(format!("a{i}"))).collect();
    adapter(&dirs[0], fixtures().base.to_str().unwrap());
    for i in 1..n {
        adapter(&dirs[i], dirs[i - 1].to_str().unwrap());
    }
    let e = lora::adapter_chain(&dirs[n - 1]).unwrap_err().to_string();
    assert!(e.contains("deep"), "{e}");
    assert!(lora::adapter_chain(&dirs[n - 2]).is_ok());
}

fn cases(default: u32) -> ProptestConfig {
    let n = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases: n,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn extreme() -> impl Strategy<Value = serde_json::Value> {
    prop::sample::select(vec![
        json!(0),
        json!(1),
        json!(-1),
        json!(7),
        json!(1u64 << 32),
        json!(1u64 << 62),
        json!(u64::MAX),
        json!(1e300),
        json!(-0.5),
        json!(null),
        json!("x\u{1b}[2J"),
        json!([]),
        json!([1u64 << 40, 1u64 << 40]),
        json!({}),
        json!(true),
    ])
}

proptest! {
    #![proptest_config(cases(60))]

    /// One field of the manifest (top level or of one layer) set to an extreme value.
    #[test]
    fn mpo_manifest_fields(
        top in any::<bool>(),
        key in prop::sample::select(vec![
            "format", "version", "layers", "row_factors", "col_factors", "orig_rows",
            "orig_cols", "bond_dims", "core_shapes", "spectra", "dtype",
        ]),
        v in extreme(),
    ) {
        let (_d, p) = mpo_copy();
        edit_json(&p.join(mpop::MANIFEST), |m| {
            if top {
                m[key] = v.clone();
            } else if let Some(l) = m["layers"].as_object_mut().and_then(|l| l.values_mut().next()) {
                l[key] = v.clone();
            }
        });
        if let Err(e) = mpop::load(&p) {
            prop_assert!(!e.to_string().contains('\n') && !e.to_string().contains('\u{1b}'), "{}", e);
        }
    }

    /// One field of quantize_config.json set to an extreme value.
    #[test]
    fn gptq_config_fields(
        key in prop::sample::select(vec![
            "bits", "group_size", "damp_percent", "desc_act", "sym", "quant_method",
            "checkpoint_format", "mpolm_method", "mpolm_fp16_modules",
        ]),
        v in extreme(),
    ) {
        let (_d, p) = q4_copy();
        edit_json(&p.join(quant::io::QUANT_CONFIG), |m| m[key] = v.clone());
        if let Err(e) = quant::load_quantized(&p) {
            prop_assert!(!e.to_string().contains('\n') && !e.to_string().contains('\u{1b}'), "{}", e);
        }
    }

    /// One field of adapter_config.json set to an extreme value, applied to the tiny model.
    #[test]
    fn adapter_config_fields(
        key in prop::sample::select(vec![
            "r", "lora_alpha", "lora_dropout", "peft_type", "bias", "target_modules",
            "use_dora", "base_model_name_or_path", "fan_in_fan_out",
        ]),
        v in extreme(),
    ) {
        static A: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
        let (_k, src) = A.get_or_init(|| {
            let d = tempfile::tempdir().unwrap();
            let a = d.path().join("a");
            adapter(&a, fixtures().base.to_str().unwrap());
            (d, a)
        });
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a");
        copy_dir(src, &a);
        edit_json(&a.join(lora::ADAPTER_CONFIG), |m| m[key] = v.clone());
        let r = lora::adapter_chain(&a).and_then(|(base, chain)| {
            let mut m = Model::load(&base, false)?;
            for c in chain {
                lora::load_peft(&mut m, &c)?;
            }
            Ok(m)
        });
        if let Err(e) = r {
            prop_assert!(!e.to_string().contains('\n') && !e.to_string().contains('\u{1b}'), "{}", e);
        }
    }
}
