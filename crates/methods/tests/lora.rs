//! LoRA: forward = merged dense forward, gradients (analytic vs finite differences), dropout
//! reproducibility, PEFT file round trips, and agreement with real PEFT outputs
//! (fixtures from scripts/make_peft_fixture.py).

use candle_core::{DType, Device, Tensor, Var};
use methods::lora::{self, LoraConfig, LoraLinear};
use models::linear::Dense;
use models::testing::{self, max_abs_diff};
use models::CausalLm;
use models::{LinearLayer, Model};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// `models::ops::set_training` is process-wide: tests run one at a time.
static LOCK: Mutex<()> = Mutex::new(());
fn lock() -> std::sync::MutexGuard<'static, ()> {
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft")
}

fn ids() -> Tensor {
    Tensor::new(&[[5u32, 77, 12, 200, 3, 9]], &Device::Cpu).unwrap()
}

fn llama_logits(m: &Model, ids: &Tensor) -> Tensor {
    m.llama().unwrap().forward(ids, None).unwrap()
}

fn bert_logits(m: &Model, ids: &Tensor) -> Tensor {
    let b = m.bert().unwrap();
    let h = b.forward(ids, None, None).unwrap();
    b.classify(&b.pool(&h).unwrap()).unwrap()
}

fn rand_tensor(shape: &[usize], scale: f64, seed: u64, dt: DType) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|_| (rng.random::<f64>() * 2.0 - 1.0) * scale)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dt)
        .unwrap()
}

/// Give every B a random nonzero value (a fresh adapter has B = 0).
fn randomize_b(vars: &[(String, Var)], seed: u64) {
    for (k, (n, v)) in vars.iter().enumerate() {
        if n.ends_with("lora_B.weight") {
            v.set(&rand_tensor(v.dims(), 0.3, seed + k as u64, DType::F32))
                .unwrap();
        }
    }
}

fn tiny_llama() -> (tempfile::TempDir, Model) {
    let d = tempfile::tempdir().unwrap();
    testing::write_tiny_llama(&d.path().join("m"), false).unwrap();
    let m = Model::load(d.path().join("m").to_str().unwrap(), false).unwrap();
    (d, m)
}

fn tiny_bert_with_head() -> (tempfile::TempDir, Model) {
    let d = tempfile::tempdir().unwrap();
    testing::write_tiny_bert(&d.path().join("b")).unwrap();
    let mut m = Model::load(d.path().join("b").to_str().unwrap(), false).unwrap();
    if let models::Arch::Encoder(b) = &mut m.arch {
        b.set_classifier(
            rand_tensor(&[2, 32], 0.3, 99, DType::F32),
            rand_tensor(&[2], 0.1, 98, DType::F32),
        );
    }
    (d, m)
}

fn cfg(targets: &[&str], r: usize, alpha: f64) -> LoraConfig {
    LoraConfig {
        r,
        alpha,
        dropout: 0.0,
        target_modules: targets.iter().map(|s| s.to_string()).collect(),
        seed: 7,
    }
}

fn lora_layers(m: &Model) -> Vec<String> {
    m.linears()
        .into_iter()
        .filter(|(_, l)| l.inner().as_any().is::<LoraLinear>())
        .map(|(n, _)| n)
        .collect()
}

#[test]
fn targets_init_and_forward_equals_merged() {
    let _g = lock();
    let (_d, mut m) = tiny_llama();
    let base = llama_logits(&m, &ids());

    // Defaults: q_proj, v_proj only; never the embedding.
    let c = LoraConfig {
        target_modules: LoraConfig::default_targets(&m),
        ..cfg(&[], 4, 8.0)
    };
    assert_eq!(c.target_modules, ["q_proj", "v_proj"]);
    let mut m2 = Model::load(m.source.path.to_str().unwrap(), false).unwrap();
    let vars = lora::apply(&mut m2, &c).unwrap();
    assert_eq!(vars.len(), 8);
    assert_eq!(vars[0].0, "model.layers.0.self_attn.q_proj.lora_A.weight");
    assert_eq!(lora_layers(&m2).len(), 4);
    // B = 0: the fresh adapter changes nothing; A ~ U(−1/√in, 1/√in), not all equal.
    assert_eq!(max_abs_diff(&llama_logits(&m2, &ids()), &base), 0.0);
    let a = vars[0]
        .1
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let bound = 1.0 / (32f32).sqrt();
    assert!(a.iter().all(|v| v.abs() <= bound));
    assert!(a.iter().any(|v| v.abs() > 0.5 * bound));
    // Deterministic from the seed.
    let mut m3 = Model::load(m.source.path.to_str().unwrap(), false).unwrap();
    let vars3 = lora::apply(&mut m3, &c).unwrap();
    assert_eq!(
        max_abs_diff(vars[0].1.as_tensor(), vars3[0].1.as_tensor()),
        0.0
    );
    assert!(max_abs_diff(vars[0].1.as_tensor(), vars[4].1.as_tensor()) > 0.0);
    // Applying twice is refused; no match is an error naming available modules.
    let e = lora::apply(&mut m2, &c).unwrap_err().to_string();
    assert!(e.contains("already has a LoRA"), "{e}");
    let e = lora::apply(&mut m3, &cfg(&["nope"], 4, 8.0))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("match no module") && e.contains("model.layers.0"),
        "{e}"
    );
    // Globs and all-linear skip the embedding (tied head).
    let mut m4 = Model::load(m.source.path.to_str().unwrap(), false).unwrap();
    lora::apply(&mut m4, &cfg(&["all-linear"], 2, 2.0)).unwrap();
    assert_eq!(lora_layers(&m4).len(), 14);
    let mut m5 = Model::load(m.source.path.to_str().unwrap(), false).unwrap();
    lora::apply(&mut m5, &cfg(&["layers.1.*proj"], 2, 2.0)).unwrap();
    assert_eq!(lora_layers(&m5).len(), 7);

    // Nonzero B on several projections and the (explicitly named) embedding.
    let c = cfg(&["q_proj", "v_proj", "down_proj", "embed_tokens"], 4, 8.0);
    let vars = lora::apply(&mut m, &c).unwrap();
    randomize_b(&vars, 1);
    let (name, l) = m.linears().into_iter().nth(1).unwrap();
    assert_eq!(name, "model.layers.0.self_attn.q_proj");
    assert_eq!(l.kind(), "lora+dense");
    assert_eq!(l.num_params(), 32 * 32 + 4 * (32 + 32));
    let with = llama_logits(&m, &ids());
    assert!(
        max_abs_diff(&with, &base) > 1e-2,
        "the adapter must change the output"
    );
    let n = lora::merge(&mut m).unwrap();
    assert_eq!(n, 7);
    assert!(lora_layers(&m).is_empty());
    let merged = llama_logits(&m, &ids());
    let d = max_abs_diff(&with, &merged);
    assert!(d < 1e-5, "LoRA forward vs merged: {d}");
}

#[test]
fn gradients_reach_a_and_b() {
    let _g = lock();
    let (_d, mut m) = tiny_llama();
    let vars = lora::apply(&mut m, &cfg(&["q_proj", "v_proj"], 4, 8.0)).unwrap();
    models::ops::set_training(true);
    let logits = llama_logits(&m, &ids());
    models::ops::set_training(false);
    let loss = logits.sqr().unwrap().mean_all().unwrap();
    let grads = loss.backward().unwrap();
    for (n, v) in &vars {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("no grad for {n}"));
        let gmax = g.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        let gmax = gmax.to_scalar::<f32>().unwrap();
        // With B = 0: dL/dA = scale·Bᵀ·(…) = 0 exactly, dL/dB ≠ 0.
        if n.ends_with("lora_A.weight") {
            assert_eq!(gmax, 0.0, "{n}");
        } else {
            assert!(gmax > 0.0 && gmax.is_finite(), "{n}: {gmax}");
        }
    }
}

#[test]
fn finite_difference_gradients_on_a_tiny_layer() {
    let _g = lock();
    let dt = DType::F64;
    let base = Dense {
        weight: rand_tensor(&[5, 4], 0.5, 1, dt),
        bias: Some(rand_tensor(&[5], 0.1, 2, dt)),
    };
    let layer = LoraLinear::from_tensors(
        Box::new(base),
        rand_tensor(&[3, 4], 0.5, 3, dt),
        rand_tensor(&[5, 3], 0.5, 4, dt),
        6.0,
        0.0,
        0,
        0,
    )
    .unwrap();
    assert!((layer.scale() - 2.0).abs() < 1e-12);
    let x = rand_tensor(&[2, 3, 4], 1.0, 5, dt);
    let c = rand_tensor(&[2, 3, 5], 1.0, 6, dt);
    let loss = |l: &LoraLinear| -> Tensor {
        l.forward(&x)
            .unwrap()
            .sin()
            .unwrap()
            .mul(&c)
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let grads = loss(&layer).backward().unwrap();
    for (name, var, (i, j)) in [("A", layer.a(), (1, 2)), ("B", layer.b(), (4, 0))] {
        let g = grads.get(var.as_tensor()).unwrap();
        let analytic = g
            .get(i)
            .unwrap()
            .get(j)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let orig = var.as_tensor().copy().unwrap();
        let h = 1e-6;
        let bump = |delta: f64| -> f64 {
            let mut v = orig.to_vec2::<f64>().unwrap();
            v[i][j] += delta;
            var.set(&Tensor::new(v, &Device::Cpu).unwrap()).unwrap();
            loss(&layer).to_scalar::<f64>().unwrap()
        };
        let numeric = (bump(h) - bump(-h)) / (2.0 * h);
        var.set(&orig).unwrap();
        assert!(analytic.abs() > 1e-3, "{name}: degenerate test");
        assert!(
            (analytic - numeric).abs() < 1e-6 * (1.0 + analytic.abs()),
            "d loss / d {name}[{i},{j}]: analytic {analytic} vs finite difference {numeric}"
        );
    }
}

#[test]
fn dropout_masks_are_a_function_of_seed_layer_step_call() {
    let _g = lock();
    let (_d, mut m) = tiny_llama();
    let mut c = cfg(&["q_proj", "v_proj"], 4, 8.0);
    c.dropout = 0.5;
    let vars = lora::apply(&mut m, &c).unwrap();
    randomize_b(&vars, 3);
    let eval = llama_logits(&m, &ids());
    models::ops::set_training(true);
    let run = |m: &Model, step: u64| -> (Tensor, Tensor) {
        lora::set_step(m, step);
        (llama_logits(m, &ids()), llama_logits(m, &ids()))
    };
    let (s5a, s5b) = run(&m, 5);
    let (s5a2, s5b2) = run(&m, 5);
    let (s6a, _) = run(&m, 6);
    // A "resumed" model (fresh load, same config) draws the same masks at step 5.
    let (_d2, mut r) = tiny_llama();
    let vars_r = lora::apply(&mut r, &c).unwrap();
    randomize_b(&vars_r, 3);
    let (r5a, _) = run(&r, 5);
    models::ops::set_training(false);
    assert_eq!(max_abs_diff(&s5a, &s5a2), 0.0);
    assert_eq!(max_abs_diff(&s5b, &s5b2), 0.0);
    assert_eq!(max_abs_diff(&s5a, &r5a), 0.0);
    assert!(
        max_abs_diff(&s5a, &s5b) > 1e-4,
        "second call in a step must draw a new mask"
    );
    assert!(
        max_abs_diff(&s5a, &s6a) > 1e-4,
        "another step must draw a new mask"
    );
    assert!(
        max_abs_diff(&s5a, &eval) > 1e-4,
        "dropout is active while training"
    );
    let eval2 = llama_logits(&m, &ids());
    assert_eq!(max_abs_diff(&eval, &eval2), 0.0, "no dropout at inference");
}

#[test]
fn save_load_round_trip_and_refusals() {
    let _g = lock();
    let (_d, mut m) = tiny_llama();
    let c = cfg(
        &["q_proj", "k_proj", "v_proj", "o_proj", "embed_tokens"],
        4,
        16.0,
    );
    let vars = lora::apply(&mut m, &c).unwrap();
    randomize_b(&vars, 11);
    let want = llama_logits(&m, &ids());
    let out = tempfile::tempdir().unwrap();
    let adir = out.path().join("adapter");
    lora::save_peft(&m, &c, "tiny-llama", "CAUSAL_LM", &[], &adir).unwrap();
    let mut files: Vec<String> = std::fs::read_dir(&adir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(files, ["adapter_config.json", "adapter_model.safetensors"]);
    let cj: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(adir.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cj["peft_type"], "LORA");
    // PEFT gets the directory it can load; mpolm keeps the name it was given.
    let base_dir = std::fs::canonicalize(&m.source.path).unwrap();
    assert_eq!(
        cj["base_model_name_or_path"],
        base_dir.display().to_string()
    );
    assert_eq!(cj["mpolm_base_model"], "tiny-llama");
    assert_eq!(lora::adapter_base(&adir).unwrap(), "tiny-llama");
    // An alias cached as GGUF: PEFT gets the upstream repository (it cannot load the GGUF),
    // mpolm keeps the alias.
    let format = m.source.format;
    m.source.format = models::hub::Format::Gguf;
    let gdir = out.path().join("adapter-gguf");
    lora::save_peft(&m, &c, "smollm2-135m", "CAUSAL_LM", &[], &gdir).unwrap();
    m.source.format = format;
    let gj: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(gdir.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        gj["base_model_name_or_path"],
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    );
    assert_eq!(lora::adapter_base(&gdir).unwrap(), "smollm2-135m");
    assert_eq!(cj["r"], 4);
    assert_eq!(cj["lora_alpha"], 16.0);
    assert_eq!(
        cj["target_modules"],
        serde_json::json!(["embed_tokens", "k_proj", "o_proj", "q_proj", "v_proj"])
    );
    let st = candle_core::safetensors::load(adir.join("adapter_model.safetensors"), &Device::Cpu)
        .unwrap();
    assert_eq!(st.len(), 18);
    // A LoRA on the embedding is stored as PEFT's lora_embedding_A [r, vocab] / _B [hidden, r].
    assert_eq!(
        st["base_model.model.model.embed_tokens.lora_embedding_A"].dims(),
        [4, 264]
    );
    assert_eq!(
        st["base_model.model.model.embed_tokens.lora_embedding_B"].dims(),
        [32, 4]
    );
    assert_eq!(
        st["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"].dims(),
        [16, 4]
    );

    let (_d2, mut fresh) = tiny_llama();
    let got_cfg = lora::load_peft(&mut fresh, &adir).unwrap();
    assert_eq!((got_cfg.r, got_cfg.alpha, got_cfg.seed), (4, 16.0, 7));
    assert_eq!(lora_layers(&fresh).len(), 9);
    assert_eq!(max_abs_diff(&llama_logits(&fresh, &ids()), &want), 0.0);
    // Loading again onto the same layers is refused.
    let e = lora::load_peft(&mut fresh, &adir).unwrap_err().to_string();
    assert!(e.contains("already has a LoRA"), "{e}");

    // PEFT also saves a targeted embedding's base weight (….base_layer.weight): accepted.
    let mut with_base = st.clone();
    let emb = m.linears()[0]
        .1
        .inner()
        .as_any()
        .downcast_ref::<LoraLinear>()
        .unwrap()
        .base()
        .weight()
        .unwrap();
    with_base.insert(
        "base_model.model.model.embed_tokens.base_layer.weight".into(),
        emb,
    );
    let pdir = out.path().join("peftlike");
    std::fs::create_dir_all(&pdir).unwrap();
    std::fs::copy(
        adir.join("adapter_config.json"),
        pdir.join("adapter_config.json"),
    )
    .unwrap();
    candle_core::safetensors::save(&with_base, pdir.join("adapter_model.safetensors")).unwrap();
    let (_d5, mut fresh2) = tiny_llama();
    lora::load_peft(&mut fresh2, &pdir).unwrap();
    assert_eq!(max_abs_diff(&llama_logits(&fresh2, &ids()), &want), 0.0);

    // A tensor of the wrong shape: a one-line error naming it; the model is left untouched.
    let mut bad: std::collections::HashMap<String, Tensor> = st.clone();
    let key = "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight";
    bad.insert(
        key.into(),
        Tensor::zeros((4, 31), DType::F32, &Device::Cpu).unwrap(),
    );
    let bdir = out.path().join("bad");
    std::fs::create_dir_all(&bdir).unwrap();
    std::fs::copy(
        adir.join("adapter_config.json"),
        bdir.join("adapter_config.json"),
    )
    .unwrap();
    candle_core::safetensors::save(&bad, bdir.join("adapter_model.safetensors")).unwrap();
    let (_d3, mut other) = tiny_llama();
    let e = lora::load_peft(&mut other, &bdir).unwrap_err().to_string();
    assert!(
        e.contains(key) && e.contains("shape") && !e.contains('\n'),
        "{e}"
    );
    assert!(lora_layers(&other).is_empty());
    // An adapter for another architecture: the missing module is named.
    let (_d4, mut bert) = tiny_bert_with_head();
    let e = lora::load_peft(&mut bert, &adir).unwrap_err().to_string();
    assert!(
        e.contains("base_model.model.model.") && e.contains("does not have"),
        "{e}"
    );
    assert!(lora_layers(&bert).is_empty());
    // Unsupported PEFT options are refused.
    let mut cj2 = cj.clone();
    cj2["use_dora"] = serde_json::json!(true);
    std::fs::write(bdir.join("adapter_config.json"), cj2.to_string()).unwrap();
    let e = lora::load_peft(&mut other, &bdir).unwrap_err().to_string();
    assert!(e.contains("use_dora"), "{e}");
    // Saving a model without LoRA layers is an error, not an empty adapter.
    assert!(lora::save_peft(&other, &c, "x", "CAUSAL_LM", &[], &out.path().join("e")).is_err());
}

#[test]
fn bert_seq_cls_round_trip_with_classifier() {
    let _g = lock();
    // A checkpoint without the "bert." prefix, as sentence-transformers saves it.
    let (_d, mut m) = tiny_bert_with_head();
    let vars = lora::apply(&mut m, &cfg(&["query", "value"], 2, 4.0)).unwrap();
    assert_eq!(vars.len(), 8);
    randomize_b(&vars, 21);
    let head = {
        let b = m.bert().unwrap();
        let c = b.classifier.as_ref().unwrap();
        vec![
            ("classifier.weight".to_string(), c.weight().unwrap()),
            ("classifier.bias".to_string(), c.bias().unwrap()),
        ]
    };
    let want = bert_logits(&m, &ids());
    let out = tempfile::tempdir().unwrap();
    let c = cfg(&["query", "value"], 2, 4.0);
    lora::save_peft(&m, &c, "tiny-bert", "SEQ_CLS", &head, out.path()).unwrap();
    let st =
        candle_core::safetensors::load(out.path().join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    // PEFT's paths inside BertForSequenceClassification.
    assert!(
        st.contains_key("base_model.model.bert.encoder.layer.1.attention.self.value.lora_A.weight")
    );
    assert!(st.contains_key("base_model.model.classifier.weight"));
    assert!(st.contains_key("base_model.model.classifier.bias"));
    // Load into a fresh base without a classifier: the head comes from the adapter.
    let d2 = tempfile::tempdir().unwrap();
    testing::write_tiny_bert(d2.path()).unwrap();
    let mut fresh = Model::load(d2.path().to_str().unwrap(), false).unwrap();
    assert!(fresh.bert().unwrap().classifier.is_none());
    lora::load_peft(&mut fresh, out.path()).unwrap();
    assert_eq!(max_abs_diff(&bert_logits(&fresh, &ids()), &want), 0.0);
}

fn read_logits(path: &Path) -> (Tensor, Tensor) {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let ids: Vec<Vec<u32>> = serde_json::from_value(v["input_ids"].clone()).unwrap();
    let shape: Vec<usize> = serde_json::from_value(v["shape"].clone()).unwrap();
    let vals: Vec<f32> = serde_json::from_value(v["logits"].clone()).unwrap();
    (
        Tensor::new(ids, &Device::Cpu).unwrap(),
        Tensor::from_vec(vals, shape, &Device::Cpu).unwrap(),
    )
}

#[test]
fn peft_fixture_llama_matches_peft_logits() {
    let _g = lock();
    let f = fixtures().join("llama");
    let mut m = Model::load(f.join("base").to_str().unwrap(), false).unwrap();
    let (ids, want) = read_logits(&f.join("logits.json"));
    let before = max_abs_diff(&llama_logits(&m, &ids), &want);
    let c = lora::load_peft(&mut m, &f.join("adapter")).unwrap();
    assert_eq!((c.r, c.alpha), (4, 12.0));
    assert_eq!(lora_layers(&m).len(), 14);
    let d = max_abs_diff(&llama_logits(&m, &ids), &want);
    println!("PEFT llama fixture: max |Δlogits| = {d:.3e} (base without adapter: {before:.3e})");
    assert!(before > 1e-1, "the adapter must matter in this fixture");
    assert!(d < 1e-4, "LoRA llama vs PEFT: max |Δ| = {d}");
    // Merged: the same within float noise.
    lora::merge(&mut m).unwrap();
    let d = max_abs_diff(&llama_logits(&m, &ids), &want);
    assert!(d < 1e-4, "merged LoRA llama vs PEFT: max |Δ| = {d}");
}

#[test]
fn peft_fixture_bert_seq_cls_matches_peft_logits() {
    let _g = lock();
    let f = fixtures().join("bert");
    let mut m = Model::load(f.join("base").to_str().unwrap(), false).unwrap();
    assert!(m.bert().unwrap().classifier.is_none());
    let (ids, want) = read_logits(&f.join("logits.json"));
    lora::load_peft(&mut m, &f.join("adapter")).unwrap();
    assert_eq!(lora_layers(&m).len(), 4);
    let got = bert_logits(&m, &ids);
    let d = max_abs_diff(&got, &want);
    println!("PEFT bert SEQ_CLS fixture: max |Δlogits| = {d:.3e}");
    assert!(d < 1e-4, "LoRA bert vs PEFT: max |Δ| = {d}");
}

/// Our adapters for the other direction (PEFT loads what we save): always written to a
/// temporary directory; with MPOLM_LORA_EXPORT=DIR also kept in DIR for
/// scripts/check_peft_adapter.py together with our logits.
#[test]
fn export_adapters_for_peft_check() {
    let _g = lock();
    let keep = std::env::var_os("MPOLM_LORA_EXPORT").map(PathBuf::from);
    let tmp = tempfile::tempdir().unwrap();
    let root = keep.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    let write_logits = |path: &Path, ids: &Tensor, t: &Tensor| {
        let v = serde_json::json!({
            "input_ids": ids.to_vec2::<u32>().unwrap(),
            "shape": t.dims(),
            "logits": t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        });
        std::fs::write(path, v.to_string()).unwrap();
    };
    let ids = Tensor::new(&[[3u32, 17, 42, 5, 63, 8, 21]], &Device::Cpu).unwrap();

    let f = fixtures().join("llama");
    let mut m = Model::load(f.join("base").to_str().unwrap(), false).unwrap();
    // A glob: saved as a regex target_modules that PEFT must fullmatch to the same layers.
    let c = cfg(&["q_proj", "v_proj", "layers.1.*_proj"], 3, 5.0);
    let vars = lora::apply(&mut m, &c).unwrap();
    randomize_b(&vars, 31);
    let d = root.join("llama");
    lora::save_peft(
        &m,
        &c,
        &f.join("base").to_string_lossy(),
        "CAUSAL_LM",
        &[],
        &d,
    )
    .unwrap();
    write_logits(&d.join("ours_logits.json"), &ids, &llama_logits(&m, &ids));

    let f = fixtures().join("bert");
    let mut m = Model::load(f.join("base").to_str().unwrap(), false).unwrap();
    if let models::Arch::Encoder(b) = &mut m.arch {
        b.set_classifier(
            rand_tensor(&[3, 16], 0.5, 41, DType::F32),
            rand_tensor(&[3], 0.1, 42, DType::F32),
        );
    }
    let c = cfg(&["query", "key", "value", "attention.output.dense"], 2, 3.0);
    let vars = lora::apply(&mut m, &c).unwrap();
    randomize_b(&vars, 51);
    let head = {
        let cl = m.bert().unwrap().classifier.as_ref().unwrap();
        vec![
            ("classifier.weight".to_string(), cl.weight().unwrap()),
            ("classifier.bias".to_string(), cl.bias().unwrap()),
        ]
    };
    let d = root.join("bert");
    lora::save_peft(
        &m,
        &c,
        &f.join("base").to_string_lossy(),
        "SEQ_CLS",
        &head,
        &d,
    )
    .unwrap();
    write_logits(&d.join("ours_logits.json"), &ids, &bert_logits(&m, &ids));
    if let Some(k) = keep {
        println!(
            "wrote adapters for scripts/check_peft_adapter.py under {}",
            k.display()
        );
    }
}
