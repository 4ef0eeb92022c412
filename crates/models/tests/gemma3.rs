//! gemma3: a tiny random model against a naive, loop-by-loop reference written here from
//! transformers' modeling_gemma3 (sliding window of 4, different RoPE bases per layer kind,
//! soft-capping), through every attention path (fused, generic with a window mask, KV-cached
//! decoding past the window); and the real gemma3-270m against transformers' outputs saved by
//! `scripts/make_gemma3_fixture.py` (token ids, logit slices, final hidden state, greedy
//! continuations). Like reference.rs, the real model is fetched into the cache on first use.

use candle_core::{DType, Device, IndexOp, Tensor};
use models::gemma3::{Gemma3, Gemma3Config};
use models::generate::{generate, SamplingParams};
use models::testing::max_abs_diff as max_abs;
use models::weights::Weights;
use models::{CausalLm, Model};
use serde_json::Value;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

// ---------------------------------------------------------------------------------------------
// Tiny model vs a naive reference

const H: usize = 16;
const FF: usize = 24;
const NH: usize = 4;
const NKV: usize = 2;
const HD: usize = 8;
const LAYERS: usize = 3;
const VOCAB: usize = 32;
const WINDOW: usize = 4;

fn tiny_cfg(softcap: bool) -> Gemma3Config {
    serde_json::from_value(serde_json::json!({
        "hidden_size": H, "intermediate_size": FF, "num_hidden_layers": LAYERS,
        "num_attention_heads": NH, "num_key_value_heads": NKV, "head_dim": HD,
        "rope_theta": 10000.0, "rope_local_base_freq": 50.0, "max_position_embeddings": 64,
        "vocab_size": VOCAB, "query_pre_attn_scalar": 6.0, "sliding_window": WINDOW,
        "sliding_window_pattern": 2,
        "final_logit_softcapping": if softcap { Some(3.0) } else { None },
        "attn_logit_softcapping": if softcap { Some(2.0) } else { None },
    }))
    .unwrap()
}

/// Deterministic weights in [-scale, scale) (a 64-bit LCG; no dependence on a RNG crate).
struct Lcg(u64);
impl Lcg {
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                self.0 = self
                    .0
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }
}

fn tiny_weights() -> HashMap<String, Vec<f32>> {
    let mut r = Lcg(7);
    let mut w = HashMap::new();
    w.insert("model.embed_tokens.weight".into(), r.vec(VOCAB * H, 1.0));
    w.insert("model.norm.weight".into(), r.vec(H, 0.5));
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        for (n, len, s) in [
            ("self_attn.q_proj", NH * HD * H, 0.6),
            ("self_attn.k_proj", NKV * HD * H, 0.6),
            ("self_attn.v_proj", NKV * HD * H, 0.6),
            ("self_attn.o_proj", H * NH * HD, 0.4),
            ("mlp.gate_proj", FF * H, 0.5),
            ("mlp.up_proj", FF * H, 0.5),
            ("mlp.down_proj", H * FF, 0.5),
            ("self_attn.q_norm", HD, 0.5),
            ("self_attn.k_norm", HD, 0.5),
            ("input_layernorm", H, 0.5),
            ("post_attention_layernorm", H, 0.5),
            ("pre_feedforward_layernorm", H, 0.5),
            ("post_feedforward_layernorm", H, 0.5),
        ] {
            w.insert(format!("{p}.{n}.weight"), r.vec(len, s));
        }
    }
    w
}

fn tiny_model(softcap: bool) -> (Gemma3, HashMap<String, Vec<f32>>) {
    let raw = tiny_weights();
    let shape = |n: &str, len: usize| -> Vec<usize> {
        if n.ends_with("norm.weight") {
            vec![len]
        } else if n.contains("embed") {
            vec![VOCAB, H]
        } else if n.contains("o_proj") {
            vec![H, NH * HD]
        } else if n.contains("down_proj") {
            vec![H, FF]
        } else {
            vec![len / H, H]
        }
    };
    let tensors = raw
        .iter()
        .map(|(n, v)| {
            let t = Tensor::from_vec(v.clone(), shape(n, v.len()), &Device::Cpu).unwrap();
            (n.clone(), t)
        })
        .collect();
    let m = Gemma3::new(tiny_cfg(softcap), &Weights::new(tensors, "tiny")).unwrap();
    (m, raw)
}

fn matvec(w: &[f32], x: &[f32], rows: usize) -> Vec<f32> {
    let cols = x.len();
    (0..rows)
        .map(|r| (0..cols).map(|c| w[r * cols + c] * x[c]).sum())
        .collect()
}

/// Gemma RMSNorm: x / √(mean x² + eps) · (1 + w).
fn rms(x: &[f32], w: &[f32]) -> Vec<f32> {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let r = 1.0 / (ms + 1e-6).sqrt();
    x.iter().zip(w).map(|(v, w)| v * r * (1.0 + w)).collect()
}

fn gelu_tanh(x: f32) -> f32 {
    let c = (2.0f32 / std::f32::consts::PI).sqrt();
    0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
}

/// Rotate-half RoPE of one head at position `pos` with base `theta`.
fn rope(x: &mut [f32], pos: usize, theta: f64) {
    let half = x.len() / 2;
    for i in 0..half {
        let inv = 1.0 / theta.powf(2.0 * i as f64 / x.len() as f64);
        let a = pos as f64 * inv;
        let (c, s) = (a.cos() as f32, a.sin() as f32);
        let (x1, x2) = (x[i], x[i + half]);
        x[i] = x1 * c - x2 * s;
        x[i + half] = x2 * c + x1 * s;
    }
}

/// What differs between the tiny config and the one a gemma3 GGUF implies.
struct Kind {
    local_theta: f64,
    scalar: f32,
    /// Every `pattern`-th layer (1-based) is global.
    pattern: usize,
}

const TINY: Kind = Kind {
    local_theta: 50.0,
    scalar: 6.0,
    pattern: 2,
};

/// Logits [t][vocab] of the whole sequence, one position and one head at a time.
fn naive_logits(
    w: &HashMap<String, Vec<f32>>,
    ids: &[u32],
    softcap: bool,
    kind: &Kind,
) -> Vec<Vec<f32>> {
    let cap = |x: f32, c: f32| if softcap { (x / c).tanh() * c } else { x };
    let emb = &w["model.embed_tokens.weight"];
    let scale = (H as f32).sqrt();
    let mut x: Vec<Vec<f32>> = ids
        .iter()
        .map(|&i| {
            emb[i as usize * H..(i as usize + 1) * H]
                .iter()
                .map(|v| v * scale)
                .collect()
        })
        .collect();
    let t = ids.len();
    for l in 0..LAYERS {
        let g = |n: &str| &w[&format!("model.layers.{l}.{n}.weight")];
        let sliding = (l + 1) % kind.pattern != 0;
        let theta = if sliding { kind.local_theta } else { 10000.0 };
        let mut qs = vec![];
        let mut ks = vec![];
        let mut vs = vec![];
        for (p, xp) in x.iter().enumerate() {
            let h = rms(xp, g("input_layernorm"));
            let q = matvec(g("self_attn.q_proj"), &h, NH * HD);
            let k = matvec(g("self_attn.k_proj"), &h, NKV * HD);
            let v = matvec(g("self_attn.v_proj"), &h, NKV * HD);
            let mut q: Vec<Vec<f32>> = q
                .chunks(HD)
                .map(|c| rms(c, g("self_attn.q_norm")))
                .collect();
            let mut k: Vec<Vec<f32>> = k
                .chunks(HD)
                .map(|c| rms(c, g("self_attn.k_norm")))
                .collect();
            q.iter_mut().for_each(|c| rope(c, p, theta));
            k.iter_mut().for_each(|c| rope(c, p, theta));
            qs.push(q);
            ks.push(k);
            vs.push(v.chunks(HD).map(|c| c.to_vec()).collect::<Vec<_>>());
        }
        for p in 0..t {
            let mut o = vec![0f32; NH * HD];
            for hh in 0..NH {
                let kv = hh / (NH / NKV);
                let keys: Vec<usize> = (0..=p).filter(|&j| !sliding || p - j < WINDOW).collect();
                let s: Vec<f32> = keys
                    .iter()
                    .map(|&j| {
                        let d: f32 = qs[p][hh].iter().zip(&ks[j][kv]).map(|(a, b)| a * b).sum();
                        cap(d / kind.scalar.sqrt(), 2.0)
                    })
                    .collect();
                let m = s.iter().cloned().fold(f32::MIN, f32::max);
                let e: Vec<f32> = s.iter().map(|v| (v - m).exp()).collect();
                let z: f32 = e.iter().sum();
                for (&j, ej) in keys.iter().zip(&e) {
                    for d in 0..HD {
                        o[hh * HD + d] += ej / z * vs[j][kv][d];
                    }
                }
            }
            let a = matvec(g("self_attn.o_proj"), &o, H);
            let a = rms(&a, g("post_attention_layernorm"));
            let xp: Vec<f32> = x[p].iter().zip(&a).map(|(u, v)| u + v).collect();
            let h = rms(&xp, g("pre_feedforward_layernorm"));
            let gt = matvec(g("mlp.gate_proj"), &h, FF);
            let up = matvec(g("mlp.up_proj"), &h, FF);
            let act: Vec<f32> = gt.iter().zip(&up).map(|(a, b)| gelu_tanh(*a) * b).collect();
            let d = rms(
                &matvec(g("mlp.down_proj"), &act, H),
                g("post_feedforward_layernorm"),
            );
            x[p] = xp.iter().zip(&d).map(|(u, v)| u + v).collect();
        }
    }
    x.iter()
        .map(|xp| {
            let h = rms(xp, &w["model.norm.weight"]);
            matvec(emb, &h, VOCAB)
                .into_iter()
                .map(|v| cap(v, 3.0))
                .collect()
        })
        .collect()
}

const IDS: [u32; 11] = [3, 17, 5, 29, 0, 8, 8, 21, 13, 2, 31];

fn want(raw: &HashMap<String, Vec<f32>>, softcap: bool) -> Tensor {
    let rows = naive_logits(raw, &IDS, softcap, &TINY);
    Tensor::from_vec(rows.concat(), (IDS.len(), VOCAB), &Device::Cpu).unwrap()
}

fn row(ids: &[u32]) -> Tensor {
    Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}

fn check_paths(softcap: bool) {
    let (m, raw) = tiny_model(softcap);
    let want = want(&raw, softcap);
    let n = IDS.len();
    // One forward over all 11 positions: the sliding layers' window cuts (generic path).
    let full = m.forward(&row(&IDS), None).unwrap().i(0).unwrap();
    let d = max_abs(&full, &want);
    assert!(d < 1e-4, "full forward vs naive: {d}");
    // Within the window (fused path unless soft-capped): the first 4 positions.
    let short = m.forward(&row(&IDS[..WINDOW]), None).unwrap().i(0).unwrap();
    let d = max_abs(&short, &want.narrow(0, 0, WINDOW).unwrap());
    assert!(d < 1e-4, "forward within the window vs naive: {d}");
    // Token by token through the KV cache: single queries past the window.
    let mut cache = m.new_cache();
    for (p, &id) in IDS.iter().enumerate() {
        let l = m.forward_last(&row(&[id]), Some(&mut cache)).unwrap();
        let d = max_abs(&l.i(0).unwrap(), &want.i(p).unwrap());
        assert!(d < 1e-4, "cached decode at position {p} vs naive: {d}");
    }
    // A chunk after a cached prefix: several queries with an offset, window cutting.
    let mut cache = m.new_cache();
    m.forward(&row(&IDS[..3]), Some(&mut cache)).unwrap();
    let rest = m
        .forward(&row(&IDS[3..]), Some(&mut cache))
        .unwrap()
        .i(0)
        .unwrap();
    let d = max_abs(&rest, &want.narrow(0, 3, n - 3).unwrap());
    assert!(d < 1e-4, "chunk after a cached prefix vs naive: {d}");
}

#[test]
fn tiny_gemma3_matches_naive_reference_on_every_attention_path() {
    check_paths(false);
}

#[test]
fn tiny_gemma3_soft_capping_matches_naive_reference() {
    check_paths(true);
}

#[test]
fn tiny_gemma3_padded_batch_and_layers_agree() {
    let (m, raw) = tiny_model(false);
    let want = want(&raw, false);
    // Right-padded second row: its valid positions must not see the padding.
    let n = IDS.len();
    let short = 7;
    let mut ids2 = IDS[..short].to_vec();
    ids2.resize(n, 0);
    let ids = Tensor::from_vec([IDS.to_vec(), ids2].concat(), (2, n), &Device::Cpu).unwrap();
    let km: Vec<u32> = (0..2 * n)
        .map(|i| u32::from(i < n || i - n < short))
        .collect();
    let km = Tensor::from_vec(km, (2, n), &Device::Cpu).unwrap();
    let h = m.forward_hidden(&ids, None, Some(&km)).unwrap();
    let logits = m.head(&h).unwrap();
    assert!(max_abs(&logits.i(0).unwrap(), &want) < 1e-4);
    let d = max_abs(
        &logits.i((1, 0..short)).unwrap(),
        &want.narrow(0, 0, short).unwrap(),
    );
    assert!(d < 1e-4, "padded row vs naive: {d}");
    // forward_layers over all layers + final norm + head = forward.
    let x = m
        .embed_tokens
        .embed(&row(&IDS).flatten_all().unwrap())
        .unwrap();
    let x = (x.unsqueeze(0).unwrap() * (H as f64).sqrt()).unwrap();
    let x = m.forward_layers(&x, 0..LAYERS).unwrap();
    let x = models::ops::rms_norm(&x, &(&m.norm + 1.0).unwrap(), 1e-6).unwrap();
    let d = max_abs(&m.head(&x).unwrap().i(0).unwrap(), &want);
    assert!(d < 1e-4, "forward_layers vs naive: {d}");
    // Every Linear and norm is listed under its HF name.
    assert_eq!(m.linears().len(), 1 + 7 * LAYERS);
    assert_eq!(m.other_tensors().len(), 1 + 6 * LAYERS);
    assert!(m
        .other_tensors()
        .iter()
        .any(|(n, _)| n == "model.layers.2.pre_feedforward_layernorm.weight"));
    assert_eq!(m.cfg.vocab_size, VOCAB);
    assert!(m.head(&h).unwrap().dtype() == DType::F32);
}

#[test]
fn gemma3_config_refuses_bad_values() {
    let p = std::path::Path::new("config.json");
    let mut c = tiny_cfg(false);
    c.validate(p).unwrap();
    c.sliding_window = 0;
    assert!(c
        .validate(p)
        .unwrap_err()
        .to_string()
        .contains("sliding_window"));
    let mut c = tiny_cfg(false);
    c.layer_types = Some(vec!["sliding_attention".into()]);
    assert!(c
        .validate(p)
        .unwrap_err()
        .to_string()
        .contains("layer_types"));
    let mut c = tiny_cfg(false);
    c.final_logit_softcapping = Some(f64::NAN);
    assert!(c.validate(p).is_err());
    let mut c = tiny_cfg(false);
    c.hidden_activation = "relu".into();
    assert!(c.validate(p).is_err());
}

/// The tiny weights as a gemma3 GGUF the way llama.cpp writes one: llama.cpp tensor names,
/// norm weights stored as 1 + w, and a SentencePiece vocabulary with control, user-defined
/// (including a run of spaces, which the loader must respell) and byte tokens.
fn tiny_gguf() -> models::testing::gguf_bytes::RawGguf {
    use models::testing::gguf_bytes::{Meta, RawGguf};
    let mut g = RawGguf::new();
    g.set("general.architecture", Meta::Str("gemma3".into()));
    for (k, v) in [
        ("embedding_length", H),
        ("feed_forward_length", FF),
        ("block_count", LAYERS),
        ("attention.head_count", NH),
        ("attention.head_count_kv", NKV),
        ("attention.key_length", HD),
        ("attention.sliding_window", WINDOW),
        ("context_length", 64),
    ] {
        g.set(&format!("gemma3.{k}"), Meta::U32(v as u32));
    }
    g.set("gemma3.attention.layer_norm_rms_epsilon", Meta::F32(1e-6));
    g.set("gemma3.rope.freq_base", Meta::F32(10000.0));
    let mut tokens: Vec<String> = [
        "<pad>",
        "<eos>",
        "<bos>",
        "<unk>",
        "<start_of_turn>",
        "<end_of_turn>",
        "\n",
        "  ",
        "\u{2581}",
        "a",
        "b",
        "c",
        "ab",
        "abc",
        "\u{2581}a",
        "\u{2581}ab",
        "bc",
        "<0x7A>",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut types = vec![3, 3, 3, 3, 3, 3, 4, 4, 1, 1, 1, 1, 1, 1, 1, 1, 1, 6];
    while tokens.len() < VOCAB {
        tokens.push(format!("<unused{}>", tokens.len()));
        types.push(3);
    }
    g.set("tokenizer.ggml.model", Meta::Str("llama".into()));
    g.set("tokenizer.ggml.pre", Meta::Str("default".into()));
    g.set("tokenizer.ggml.scores", Meta::I32s(vec![0; VOCAB]));
    g.set("tokenizer.ggml.tokens", Meta::Strs(tokens));
    g.set("tokenizer.ggml.token_type", Meta::I32s(types));
    g.set("tokenizer.ggml.bos_token_id", Meta::U32(2));
    g.set("tokenizer.ggml.eos_token_id", Meta::U32(1));
    g.set("tokenizer.ggml.unknown_token_id", Meta::U32(3));
    g.set("tokenizer.ggml.add_bos_token", Meta::Bool(true));
    let mut raw: Vec<(String, Vec<f32>)> = tiny_weights().into_iter().collect();
    raw.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, v) in raw {
        let gname = name
            .replace("model.embed_tokens.weight", "token_embd.weight")
            .replace("model.norm.weight", "output_norm.weight")
            .replace("model.layers.", "blk.");
        let gname = [
            ("input_layernorm", "attn_norm"),
            ("self_attn.q_norm", "attn_q_norm"),
            ("self_attn.k_norm", "attn_k_norm"),
            ("post_attention_layernorm", "post_attention_norm"),
            ("pre_feedforward_layernorm", "ffn_norm"),
            ("post_feedforward_layernorm", "post_ffw_norm"),
            ("self_attn.q_proj", "attn_q"),
            ("self_attn.k_proj", "attn_k"),
            ("self_attn.v_proj", "attn_v"),
            ("self_attn.o_proj", "attn_output"),
            ("mlp.gate_proj", "ffn_gate"),
            ("mlp.up_proj", "ffn_up"),
            ("mlp.down_proj", "ffn_down"),
        ]
        .iter()
        .fold(gname, |n, (a, b)| n.replace(a, b));
        let is_norm = name.ends_with("norm.weight");
        let cols = if is_norm {
            v.len()
        } else if name.contains("o_proj") {
            NH * HD
        } else if name.contains("down_proj") {
            FF
        } else {
            H
        };
        let dims = if is_norm {
            vec![cols as u64]
        } else {
            vec![cols as u64, (v.len() / cols) as u64]
        };
        let data: Vec<u8> = v
            .iter()
            .flat_map(|x| (if is_norm { x + 1.0 } else { *x }).to_le_bytes())
            .collect();
        g.push(&gname, dims, 0, data);
    }
    g
}

#[test]
fn tiny_gemma3_gguf_loads_to_the_reference_model_and_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    std::fs::write(&path, tiny_gguf().to_bytes()).unwrap();
    let m = Model::load(path.to_str().unwrap(), false).unwrap();
    let g = gemma(&m);
    // The GGUF implies local base 10000, scale head_dim^-½ and every 6th layer global (none
    // of 3): the reference with those, fed the norms the file stores minus 1.
    let kind = Kind {
        local_theta: 10000.0,
        scalar: HD as f32,
        pattern: 6,
    };
    let rows = naive_logits(&tiny_weights(), &IDS, false, &kind);
    let want = Tensor::from_vec(rows.concat(), (IDS.len(), VOCAB), &Device::Cpu).unwrap();
    let got = g.forward(&row(&IDS), None).unwrap().i(0).unwrap();
    let d = max_abs(&got, &want);
    assert!(d < 1e-4, "tiny GGUF forward vs naive: {d}");
    // Merges ranked by token order: a+b (12), then ab+c before a+bc (13), then ▁a+b before
    // ▁+ab (15); "  " is respelled ▁▁ and splits as ▁ ▁ (no ▁▁ merge partner beyond it).
    let tok = &m.tokenizer;
    assert_eq!(tok.encode("abc ab", true).unwrap(), vec![2, 13, 15]);
    assert_eq!(tok.encode("abc ab", false).unwrap(), vec![13, 15]);
    assert_eq!(tok.decode(&[13, 15], false).unwrap(), "abc ab");
    assert_eq!(tok.encode("  a", false).unwrap(), vec![7, 9]);
    // Control and user-defined tokens whole; z by byte fallback, y (no byte token) as <unk>.
    assert_eq!(
        tok.encode("<start_of_turn>ab<end_of_turn>\nz", false)
            .unwrap(),
        vec![4, 12, 5, 6, 17]
    );
    assert_eq!(tok.decode(&[17, 9], false).unwrap(), "za");
    assert_eq!(tok.encode("y", false).unwrap(), vec![3]);
    assert_eq!(tok.decode(&[2, 9, 1], true).unwrap(), "a");
}

#[test]
fn bad_gemma3_gguf_files_give_one_error() {
    use models::testing::gguf_bytes::{Meta, RawGguf};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.gguf");
    let err = |edit: &dyn Fn(&mut RawGguf)| -> String {
        let mut g = tiny_gguf();
        edit(&mut g);
        std::fs::write(&path, g.to_bytes()).unwrap();
        match Model::load(path.to_str().unwrap(), false) {
            Ok(_) => panic!("a bad gemma3 GGUF loaded"),
            Err(e) => e.to_string(),
        }
    };
    let tokens = |g: &mut RawGguf, f: &dyn Fn(&mut Vec<String>)| {
        if let Some((_, Meta::Strs(t))) = g
            .meta
            .iter_mut()
            .find(|(k, _)| k == "tokenizer.ggml.tokens")
        {
            f(t);
        }
    };
    for (edit, want) in [
        (
            &(|g: &mut RawGguf| g.set("gemma3.attention.sliding_window", Meta::U32(0)))
                as &dyn Fn(&mut RawGguf),
            "sliding_window",
        ),
        (
            &|g| g.set("gemma3.attention.key_length", Meta::U32(7)),
            "head_dim",
        ),
        (
            &|g| g.set("gemma3.attention.head_count", Meta::U32(0)),
            "num_attention_heads",
        ),
        (
            &|g| g.set("gemma3.context_length", Meta::U32(u32::MAX)),
            "max_position_embeddings",
        ),
        (
            &|g| g.set("tokenizer.ggml.unknown_token_id", Meta::U32(999)),
            "unknown_token_id",
        ),
        (
            &|g| g.set("tokenizer.ggml.bos_token_id", Meta::U32(32)),
            "bos",
        ),
        (
            &|g| g.tensors.retain(|t| t.name != "blk.1.post_ffw_norm.weight"),
            "post_feedforward_layernorm",
        ),
        (&|g| tokens(g, &|t| t.truncate(2)), "vocabulary"),
    ] {
        let e = err(edit);
        assert!(
            e.contains(want) && !e.contains('\n'),
            "want '{want}' in one line: {e}"
        );
    }
    // Only gemma3 gets the SentencePiece builder (others rank merges by score).
    let mut g = models::testing::tiny_llama_gguf().unwrap();
    g.set("tokenizer.ggml.model", Meta::Str("llama".into()));
    std::fs::write(&path, g.to_bytes()).unwrap();
    let e = Model::load(path.to_str().unwrap(), false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("gemma3 GGUF files only"), "{e}");
    // Empty or repeated token strings are odd but not fatal: the file still loads or errors.
    for f in [
        &(|t: &mut Vec<String>| t[10] = String::new()) as &dyn Fn(&mut Vec<String>),
        &|t| t[20] = "a".into(),
        &|t| t[4] = String::new(),
    ] {
        let mut g = tiny_gguf();
        tokens(&mut g, f);
        std::fs::write(&path, g.to_bytes()).unwrap();
        let _ = Model::load(path.to_str().unwrap(), false);
    }
}

// ---------------------------------------------------------------------------------------------
// gemma3-270m vs transformers

const LOGIT_TOL: f32 = 5e-3;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn fixture_json() -> Value {
    let p = fixtures().join("gemma3-270m.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn fixture_tensors() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixtures().join("gemma3-270m_logits.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

static GEMMA: OnceLock<Model> = OnceLock::new();

fn model() -> &'static Model {
    GEMMA.get_or_init(|| {
        Model::load("gemma3-270m", true).unwrap_or_else(|e| panic!("loading gemma3-270m: {e}"))
    })
}

fn gemma(m: &Model) -> &Gemma3 {
    m.causal()
        .ok()
        .and_then(|c| c.as_any().downcast_ref::<Gemma3>())
        .expect("gemma3-270m did not load as gemma3")
}

#[test]
fn gemma3_270m_tokenizer_matches_transformers() {
    let fx = fixture_json();
    let tok = &model().tokenizer;
    let mut cases: Vec<&Value> = fx["tokenizer_cases"].as_array().unwrap().iter().collect();
    cases.extend(fx["prompts"].as_array().unwrap().iter());
    for c in cases {
        let text = c["text"].as_str().unwrap();
        assert_eq!(
            tok.encode(text, true).unwrap(),
            ids(&c["ids"]),
            "ids of {text:?}"
        );
        let ns = ids(&c["ids_no_special"]);
        assert_eq!(tok.encode(text, false).unwrap(), ns, "ids of {text:?}");
        if let Some(d) = c.get("decoded").and_then(|d| d.as_str()) {
            assert_eq!(tok.decode(&ns, false).unwrap(), d, "decode of {text:?}");
        }
    }
    assert_eq!(tok.bos_id, fx["bos_token_id"].as_u64().map(|x| x as u32));
    assert_eq!(
        tok.eos_ids,
        vec![fx["eos_token_id"].as_u64().unwrap() as u32]
    );
    assert_eq!(
        tok.vocab_size(),
        fx["vocab_size_tokenizer"].as_u64().unwrap() as usize
    );
}

#[test]
fn gemma3_270m_logits_match_transformers() {
    let fx = fixture_json();
    let t = fixture_tensors();
    let g = gemma(model());
    for (i, p) in fx["prompts"].as_array().unwrap().iter().enumerate() {
        let x = row(&ids(&p["ids"]));
        let hidden = g.forward_hidden(&x, None, None).unwrap();
        let n = hidden.dim(1).unwrap();
        let last = hidden.i((0, n - 1)).unwrap();
        let logits = g.head(&last.unsqueeze(0).unwrap()).unwrap().i(0).unwrap();
        let top = t[&format!("top_ids.{i}")].to_dtype(DType::U32).unwrap();
        let d_top = max_abs(
            &logits.index_select(&top, 0).unwrap(),
            &t[&format!("top_logits.{i}")],
        );
        let stride = fx["logits"]["spread_stride"].as_u64().unwrap() as u32;
        let spread: Vec<u32> = (0..g.cfg.vocab_size as u32)
            .step_by(stride as usize)
            .collect();
        let spread = Tensor::new(spread.as_slice(), &Device::Cpu).unwrap();
        let d_spread = max_abs(
            &logits.index_select(&spread, 0).unwrap(),
            &t[&format!("spread_logits.{i}")],
        );
        eprintln!("gemma3-270m prompt {i} ({n} tokens): max |Δlogit| top-64 {d_top:.2e}, spread {d_spread:.2e}");
        assert!(d_top <= LOGIT_TOL && d_spread <= LOGIT_TOL, "prompt {i}");
        let best = logits.argmax(0).unwrap().to_scalar::<u32>().unwrap();
        assert_eq!(
            best,
            top.i(0).unwrap().to_scalar::<u32>().unwrap(),
            "prompt {i} argmax"
        );
        if i == 0 {
            let dh = max_abs(&last, &t["hidden.0"]);
            eprintln!("gemma3-270m final hidden: max |Δ| {dh:.2e}");
            assert!(dh <= 1e-3, "final hidden: {dh}");
        }
    }
}

#[test]
fn gemma3_270m_cached_decode_past_the_window_matches_transformers() {
    // The long prompt (705 tokens > window 512): prefill all but the last 3 tokens, then
    // decode them one at a time; the last logits must equal transformers' full forward.
    let fx = fixture_json();
    let t = fixture_tensors();
    let g = gemma(model());
    let prompts = fx["prompts"].as_array().unwrap();
    let i = prompts.len() - 1;
    let all = ids(&prompts[i]["ids"]);
    assert!(all.len() > g.cfg.sliding_window);
    let mut cache = g.new_cache();
    let split = all.len() - 3;
    g.forward_last(&row(&all[..split]), Some(&mut cache))
        .unwrap();
    let mut logits = None;
    for &id in &all[split..] {
        logits = Some(g.forward_last(&row(&[id]), Some(&mut cache)).unwrap());
    }
    let logits = logits.unwrap().i(0).unwrap();
    let top = t[&format!("top_ids.{i}")].to_dtype(DType::U32).unwrap();
    let d = max_abs(
        &logits.index_select(&top, 0).unwrap(),
        &t[&format!("top_logits.{i}")],
    );
    eprintln!("gemma3-270m cached decode past the window: max |Δlogit| top-64 {d:.2e}");
    assert!(d <= LOGIT_TOL, "{d}");
}

#[test]
fn gemma3_270m_greedy_matches_transformers() {
    let fx = fixture_json();
    let m = model();
    let g = gemma(m);
    let mut checked = 0;
    for p in fx["prompts"].as_array().unwrap() {
        let Some(want) = p.get("greedy_ids") else {
            continue;
        };
        let want = ids(want);
        let stopped = p["greedy_stopped_at_eos"].as_bool().unwrap_or(false);
        let sp = SamplingParams {
            max_new_tokens: want.len().max(16),
            stop_ids: if stopped {
                m.tokenizer.eos_ids.clone()
            } else {
                vec![]
            },
            ..Default::default()
        };
        let (got, _) = generate(g, &ids(&p["ids"]), &sp, |_| {}).unwrap();
        assert_eq!(got, want, "greedy continuation of {:?}", p["text"]);
        assert_eq!(
            m.tokenizer.decode(&got, false).unwrap(),
            p["greedy_text"].as_str().unwrap()
        );
        checked += 1;
    }
    assert_eq!(checked, 2);
}
