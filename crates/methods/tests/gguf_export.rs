//! GGUF export: metadata, names and values read back with our GGUF reader, dequantized values
//! within each format's error bound, logits of the re-loaded file against the source model,
//! llama.cpp's q4_k_m mix and the fallbacks for row lengths that are not block multiples.

use candle_core::quantized::gguf_file::Value;
use candle_core::{Device, Tensor};
use methods::quant::gguf_export::{export_gguf, ExportOptions, ExportReport, GgufType};
use models::gguf::{as_u64, GgufFile};
use models::testing::{byte_tokenizer_json, max_abs_diff, write_tiny_bert, write_tiny_llama};
use models::CausalLm;
use models::Model;
use serde_json::json;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn load(p: &Path) -> Model {
    Model::load(p.to_str().unwrap(), false).unwrap()
}

fn export(m: &Model, dir: &Path, ty: GgufType) -> (PathBuf, ExportReport) {
    let out = dir.join(format!("model-{}.gguf", ty.name()));
    let rep = export_gguf(m, &out, &ExportOptions::new(ty)).unwrap();
    (out, rep)
}

/// The source's dense state dict under llama.cpp names (HF layout, i.e. unpermuted).
fn source_tensors(m: &Model) -> HashMap<String, Tensor> {
    models::export::dense_state_dict(m).unwrap()
}

/// The exported file's tensors dequantized to f32 under HF names (q/k unpermuted).
fn read_back(p: &Path) -> (GgufFile, HashMap<String, Tensor>) {
    let g = GgufFile::open(p).unwrap();
    let w = models::source::GgufSource::llama(&g, false)
        .unwrap()
        .read_all()
        .unwrap();
    (g, w)
}

fn logits(m: &Model) -> Tensor {
    let ids = m.tokenizer.encode("the then in an thin", false).unwrap();
    let t = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    m.llama().unwrap().forward(&t, None).unwrap()
}

fn meta_u64(g: &GgufFile, k: &str) -> u64 {
    as_u64(g.meta(k).unwrap_or_else(|| panic!("missing {k}"))).unwrap()
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// Per-block check: every |Δ| ≤ factor · max|x| of its block of `bs` elements (+ slack).
fn check_blocks(name: &str, orig: &Tensor, back: &Tensor, bs: usize, factor: f32) {
    let a: Vec<f32> = orig.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = back.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(a.len(), b.len(), "{name}");
    for (k, (ca, cb)) in a.chunks(bs).zip(b.chunks(bs)).enumerate() {
        let amax = ca.iter().fold(0f32, |m, x| m.max(x.abs()));
        for (x, y) in ca.iter().zip(cb) {
            assert!(
                (x - y).abs() <= factor * amax + 1e-6,
                "{name} block {k}: {x} vs {y} (block max {amax}, bound {})",
                factor * amax
            );
        }
    }
}

#[test]
fn f32_round_trip_is_exact_and_logits_match() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("tiny");
    write_tiny_llama(&src, false).unwrap();
    let m = load(&src);
    let (out, rep) = export(&m, d.path(), GgufType::F32);
    assert_eq!(rep.arch, "llama");
    assert_eq!(rep.type_counts.keys().collect::<Vec<_>>(), vec!["f32"]);
    assert_eq!(rep.file_bytes, std::fs::metadata(&out).unwrap().len());

    let (g, back) = read_back(&out);
    assert_eq!(g.architecture().unwrap(), "llama");
    let cfg = &m.llama().unwrap().cfg;
    for (k, v) in [
        ("llama.block_count", cfg.num_hidden_layers),
        ("llama.embedding_length", cfg.hidden_size),
        ("llama.feed_forward_length", cfg.intermediate_size),
        ("llama.attention.head_count", cfg.num_attention_heads),
        ("llama.attention.head_count_kv", cfg.num_kv_heads()),
        ("llama.context_length", cfg.max_position_embeddings),
        ("llama.rope.dimension_count", cfg.head_dim()),
        ("llama.vocab_size", cfg.vocab_size),
        ("general.file_type", 0),
        ("general.quantization_version", 2),
    ] {
        assert_eq!(meta_u64(&g, k), v as u64, "{k}");
    }
    assert_eq!(
        g.meta_f64("llama.attention.layer_norm_rms_epsilon")
            .unwrap() as f32,
        cfg.rms_norm_eps as f32
    );
    assert_eq!(g.meta_str("tokenizer.ggml.model").unwrap(), "gpt2");
    match g.meta("tokenizer.ggml.tokens") {
        Some(Value::Array(a)) => assert_eq!(a.len(), cfg.vocab_size),
        other => panic!("tokens: {other:?}"),
    }
    // Tied head: no output.weight; every llama.cpp name present.
    let names: Vec<&String> = g.content.tensor_infos.keys().collect();
    assert!(!names.iter().any(|n| *n == "output.weight"));
    for n in [
        "token_embd.weight",
        "output_norm.weight",
        "blk.1.attn_q.weight",
        "blk.1.attn_k.weight",
        "blk.1.ffn_down.weight",
        "blk.0.attn_norm.weight",
    ] {
        assert!(names.iter().any(|x| *x == n), "{n} missing: {names:?}");
    }
    // ggml order: token_embd is [hidden, vocab].
    assert_eq!(
        g.content.tensor_infos["token_embd.weight"].shape.dims(),
        &[cfg.vocab_size, cfg.hidden_size]
    );
    let orig = source_tensors(&m);
    assert_eq!(orig.len(), back.len());
    for (k, t) in &orig {
        assert_eq!(max_abs_diff(t, &back[k]), 0.0, "{k}");
    }

    // Loaded back as a model: same tokenizer ids, same logits.
    let m2 = load(&out);
    let text = "the then <|im_start|>in an thin\n";
    assert_eq!(
        m.tokenizer.encode(text, false).unwrap(),
        m2.tokenizer.encode(text, false).unwrap()
    );
    assert_eq!(m2.tokenizer.eos_ids, m.tokenizer.eos_ids);
    assert_eq!(m2.tokenizer.chat_template, m.tokenizer.chat_template);
    let dl = max_abs_diff(&logits(&m), &logits(&m2));
    assert!(dl < 1e-4, "logits differ by {dl}");

    // Re-exporting the GGUF-loaded model carries the GGUF metadata over.
    let (out2, rep2) = export(&m2, &d.path().join("again"), GgufType::F32);
    assert!(rep2.tokenizer_from.contains("GGUF"));
    let (g2, back2) = read_back(&out2);
    assert_eq!(
        g2.meta_str("tokenizer.ggml.pre").unwrap(),
        g.meta_str("tokenizer.ggml.pre").unwrap()
    );
    for (k, t) in &orig {
        assert_eq!(max_abs_diff(t, &back2[k]), 0.0, "{k}");
    }
}

#[test]
fn f16_q8_0_q4_0_within_format_bounds() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("tiny");
    write_tiny_llama(&src, false).unwrap();
    let m = load(&src);
    let orig = source_tensors(&m);
    let base = logits(&m);
    for (ty, bs, factor, logit_tol) in [
        // f16: relative rounding 2^-11 per element.
        (GgufType::F16, 1, 1.0 / 2048.0, 0.005),
        // q8_0: d = amax/127, |Δ| ≤ d/2, plus the f16 rounding of d (127·amax·2^-11/127).
        (GgufType::Q8_0, 32, 1.0 / 254.0 + 1.0 / 2048.0, 0.08),
        // q4_0: d = max/-8, the clipped side loses up to d = amax/8.
        (GgufType::Q4_0, 32, 1.0 / 8.0 + 1.0 / 256.0, 0.5),
    ] {
        let (out, rep) = export(&m, d.path(), ty);
        // Only q4_0's tied output (wanted Q6_K, rows of 32) falls back, to Q8_0.
        assert!(
            rep.fallbacks
                .iter()
                .all(|f| f.starts_with("token_embd.weight: q6_K")),
            "{:?}",
            rep.fallbacks
        );
        assert_eq!(rep.fallbacks.len(), usize::from(ty == GgufType::Q4_0));
        let (g, back) = read_back(&out);
        for (k, t) in &orig {
            let gname = models::gguf::gguf_name(k).unwrap();
            let info = &g.content.tensor_infos[&gname];
            let want = if t.rank() == 1 {
                "F32".to_string()
            } else {
                match ty {
                    GgufType::F16 => "F16",
                    GgufType::Q8_0 => "Q8_0",
                    _ => "Q4_0",
                }
                .to_string()
            };
            // Tied embedding = output: q4_0 makes it Q6_K if rows allow, else Q8_0 (32 cols).
            let want = if gname == "token_embd.weight" && ty == GgufType::Q4_0 {
                "Q8_0".to_string()
            } else {
                want
            };
            assert_eq!(format!("{:?}", info.ggml_dtype), want, "{gname}");
            if t.rank() == 1 {
                assert_eq!(max_abs_diff(t, &back[k]), 0.0, "{k}");
            } else if ty == GgufType::F16 {
                let rel = ((t - &back[k]).unwrap().abs().unwrap()
                    - (t.abs().unwrap() * factor as f64).unwrap())
                .unwrap();
                assert!(max_abs(&rel.relu().unwrap()) <= 1e-7, "{k}");
            } else {
                // The permutation moves whole rows, so blocks are the same sets of values.
                let f = if gname == "token_embd.weight" && ty == GgufType::Q4_0 {
                    1.0 / 254.0 + 1.0 / 2048.0
                } else {
                    factor
                };
                check_blocks(k, t, &back[k], bs, f);
            }
        }
        let m2 = load(&out);
        // Random tiny models amplify weight noise; the logits' relative RMS error is bounded.
        let r = rel_rms(&base, &logits(&m2));
        eprintln!("{}: logits relative RMS error {r}", ty.name());
        assert!(
            r <= logit_tol,
            "{}: logits relative RMS error {r}",
            ty.name()
        );
    }
}

#[test]
fn k_quants_fall_back_on_short_rows() {
    // Rows of 32/64: no 256-blocks, so q4_k_m falls back the way llama.cpp does.
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("tiny");
    write_tiny_llama(&src, false).unwrap();
    let m = load(&src);
    let (out, rep) = export(&m, d.path(), GgufType::Q4KM);
    let g = GgufFile::open(&out).unwrap();
    let ty = |n: &str| format!("{:?}", g.content.tensor_infos[n].ggml_dtype);
    assert_eq!(ty("blk.1.attn_q.weight"), "Q5_0"); // q4_K → q5_0
                                                   // use_more_bits(i, 2) holds for layer 1 only: q6_K → q8_0 there.
    assert_eq!(ty("blk.1.attn_v.weight"), "Q8_0");
    assert_eq!(ty("blk.1.ffn_down.weight"), "Q8_0");
    assert_eq!(ty("blk.0.attn_v.weight"), "Q5_0");
    assert_eq!(ty("blk.0.ffn_down.weight"), "Q5_0");
    assert_eq!(ty("token_embd.weight"), "Q8_0"); // tied output: q8_0 when not 256-aligned
    assert_eq!(ty("blk.0.attn_norm.weight"), "F32");
    assert_eq!(meta_u64(&g, "general.file_type"), 15);
    // 2 layers × 7 matrices, all fallbacks; the tied embedding is not one (llama.cpp's rule).
    assert_eq!(rep.fallbacks.len(), 14, "{:#?}", rep.fallbacks);
    assert!(rep.fallbacks[0].contains("256"));
    let t = rep
        .tensors
        .iter()
        .find(|t| t.name == "blk.1.attn_q.weight")
        .unwrap();
    assert_eq!(t.fallback_from.as_deref(), Some("q4_K"));
    assert_eq!(t.shape, vec![32, 32]);
    let m2 = load(&out);
    let r = rel_rms(&logits(&m), &logits(&m2));
    eprintln!("q4_k_m with fallbacks: logits relative RMS error {r}");
    assert!(r < 0.3, "{r}");
}

/// A tiny llama with 256-multiple rows (hidden 256, ffn 512, 8 layers) for the k-quants.
fn write_k_llama(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let tok = byte_tokenizer_json(&[("t", "h"), ("th", "e")]);
    let vocab = tok["model"]["vocab"].as_object().unwrap().len();
    let (h, inter, layers, nh, nkv) = (256usize, 512usize, 8usize, 4usize, 1usize);
    let hd = h / nh;
    let cfg = json!({"model_type": "llama", "hidden_size": h, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": nh, "num_key_value_heads": nkv,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 64,
        "vocab_size": vocab, "tie_word_embeddings": true, "hidden_act": "silu"});
    let mut seed = 7u64;
    let mut rnd = |shape: &[usize], std: f32| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                let mut acc = 0f32;
                for _ in 0..4 {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    acc += ((seed >> 40) as f32) / ((1u64 << 24) as f32) - 0.5;
                }
                acc * std * 1.732
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    };
    let mut t = HashMap::new();
    t.insert(
        "model.embed_tokens.weight".to_string(),
        rnd(&[vocab, h], 0.5),
    );
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        for (n, o, inn) in [
            ("self_attn.q_proj", nh * hd, h),
            ("self_attn.k_proj", nkv * hd, h),
            ("self_attn.v_proj", nkv * hd, h),
            ("self_attn.o_proj", h, nh * hd),
            ("mlp.gate_proj", inter, h),
            ("mlp.up_proj", inter, h),
            ("mlp.down_proj", h, inter),
        ] {
            t.insert(format!("{p}.{n}.weight"), rnd(&[o, inn], 0.06));
        }
        for n in ["input_layernorm", "post_attention_layernorm"] {
            t.insert(format!("{p}.{n}.weight"), (rnd(&[h], 0.1) + 1.0).unwrap());
        }
    }
    t.insert("model.norm.weight".into(), (rnd(&[h], 0.1) + 1.0).unwrap());
    let w = |n: &str, v: &serde_json::Value| {
        std::fs::write(dir.join(n), serde_json::to_string(v).unwrap()).unwrap()
    };
    w("config.json", &cfg);
    w("tokenizer.json", &tok);
    w("tokenizer_config.json", &json!({"eos_token": "<|im_end|>"}));
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
}

fn rel_rms(a: &Tensor, b: &Tensor) -> f32 {
    let num: f32 = (a - b)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    let den: f32 = a.sqr().unwrap().mean_all().unwrap().to_scalar().unwrap();
    (num / den).sqrt()
}

#[test]
fn k_quant_recipes_follow_llama_cpp() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("k");
    write_k_llama(&src);
    let m = load(&src);
    let orig = source_tensors(&m);
    let base = logits(&m);
    // n_layers 8: use_more_bits → layers 0, 3, 6, 7.
    let more = [0usize, 3, 6, 7];
    for (ty, file_type, max_rel, max_logit_rel) in [
        (GgufType::Q6K, 18u64, 0.03f32, 0.2f32),
        (GgufType::Q4KM, 15, 0.12, 0.5),
        (GgufType::Q2K, 10, 0.6, 1.5),
    ] {
        let (out, rep) = export(&m, d.path(), ty);
        assert!(rep.fallbacks.is_empty(), "{:?}", rep.fallbacks);
        let (g, back) = read_back(&out);
        assert_eq!(meta_u64(&g, "general.file_type"), file_type);
        let tyof = |n: &str| format!("{:?}", g.content.tensor_infos[n].ggml_dtype);
        // The tied embedding is the output: Q6_K for every k-quant recipe.
        assert_eq!(tyof("token_embd.weight"), "Q6K", "{}", ty.name());
        for i in 0..8 {
            let (v, down, o, q) = match ty {
                GgufType::Q6K => ("Q6K", "Q6K", "Q6K", "Q6K"),
                GgufType::Q4KM if more.contains(&i) => ("Q6K", "Q6K", "Q4K", "Q4K"),
                GgufType::Q4KM => ("Q4K", "Q4K", "Q4K", "Q4K"),
                // n_gqa = 4 → attn_v q4_K.
                _ => ("Q4K", "Q3K", "Q3K", "Q2K"),
            };
            assert_eq!(tyof(&format!("blk.{i}.attn_v.weight")), v, "{i}");
            assert_eq!(tyof(&format!("blk.{i}.ffn_down.weight")), down, "{i}");
            assert_eq!(tyof(&format!("blk.{i}.attn_output.weight")), o, "{i}");
            assert_eq!(tyof(&format!("blk.{i}.attn_q.weight")), q, "{i}");
        }
        for (k, t) in &orig {
            if t.rank() == 2 {
                let r = rel_rms(t, &back[k]);
                assert!(r < max_rel, "{} {k}: relative RMS error {r}", ty.name());
            }
        }
        let r = rel_rms(&base, &logits(&load(&out)));
        eprintln!(
            "{}: logits relative RMS error {r}, {} bpw",
            ty.name(),
            rep.bits_per_weight
        );
        assert!(
            r < max_logit_rel,
            "{}: logits relative RMS error {r}",
            ty.name()
        );
        let bpw = rep.bits_per_weight;
        let (lo, hi) = match ty {
            GgufType::Q6K => (6.5, 7.5),
            GgufType::Q4KM => (4.5, 6.0),
            _ => (2.6, 4.5),
        };
        assert!(bpw > lo && bpw < hi, "{}: {bpw} bpw", ty.name());
    }
}

#[test]
fn qwen2_keeps_its_arch_biases_and_head() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("qwen");
    write_tiny_llama(&src, true).unwrap();
    let m = load(&src);
    let (out, rep) = export(&m, d.path(), GgufType::F32);
    assert_eq!(rep.arch, "qwen2");
    let (g, back) = read_back(&out);
    assert_eq!(g.architecture().unwrap(), "qwen2");
    assert_eq!(meta_u64(&g, "qwen2.block_count"), 2);
    for n in ["output.weight", "blk.0.attn_q.bias", "blk.1.attn_v.bias"] {
        assert!(g.content.tensor_infos.contains_key(n), "{n}");
    }
    for (k, t) in &source_tensors(&m) {
        assert_eq!(max_abs_diff(t, &back[k]), 0.0, "{k}");
    }
    let dl = max_abs_diff(&logits(&m), &logits(&load(&out)));
    assert!(dl < 1e-4, "{dl}");
}

#[test]
fn quantized_checkpoint_exports_its_dequantized_weights() {
    use methods::quant::{self, QuantOptions};
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("tiny");
    write_tiny_llama(&src, false).unwrap();
    let mut m = load(&src);
    let o = QuantOptions {
        method: quant::calib::Method::Rtn,
        bits: 4,
        group_size: 32,
        ..Default::default()
    };
    quant::quantize_model(&mut m, &o, None, false).unwrap();
    let (out, rep) = export(&m, d.path(), GgufType::F32);
    assert!(rep
        .tensors
        .iter()
        .any(|t| t.source_kind != "dense" && t.source_kind != "norm"));
    let dl = max_abs_diff(&logits(&m), &logits(&load(&out)));
    assert!(dl < 1e-4, "{dl}");
}

#[test]
fn refuses_encoders_and_existing_files() {
    let d = tempfile::tempdir().unwrap();
    let b = d.path().join("bert");
    write_tiny_bert(&b).unwrap();
    let e = export_gguf(
        &load(&b),
        &d.path().join("b.gguf"),
        &ExportOptions::new(GgufType::F16),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("causal"), "{e}");
    assert!(!e.contains('\n'));

    let src = d.path().join("tiny");
    write_tiny_llama(&src, false).unwrap();
    let out = d.path().join("exists.gguf");
    std::fs::write(&out, b"keep me").unwrap();
    let e = export_gguf(&load(&src), &out, &ExportOptions::new(GgufType::F16))
        .unwrap_err()
        .to_string();
    assert!(e.contains("exists"), "{e}");
    assert_eq!(std::fs::read(&out).unwrap(), b"keep me");
    // No temporary files left behind.
    let n = std::fs::read_dir(d.path()).unwrap().count();
    assert_eq!(n, 3);
}

/// A tiny llama upcycled to `experts` experts in `layers` (None = all), each expert's matrices
/// scaled by its own factor so that routing changes the output.
fn moe_model(dir: &Path, experts: usize, layers: Option<Vec<usize>>, qwen2: bool) -> Model {
    use methods::mpoe::{self, UpcycleOptions};
    write_tiny_llama(dir, qwen2).unwrap();
    let mut m = load(dir);
    let o = UpcycleOptions {
        experts,
        router: models::moe::Router::Top2,
        layers,
        ..Default::default()
    };
    mpoe::upcycle(&mut m, &o).unwrap();
    for (name, l) in m.linears_mut() {
        let Some(k) = name
            .split(".experts.")
            .nth(1)
            .and_then(|r| r.split('.').next())
            .and_then(|k| k.parse::<usize>().ok())
        else {
            continue;
        };
        let w = (l.weight().unwrap() * (1.0 + 0.25 * k as f64)).unwrap();
        l.replace(Box::new(models::linear::Dense {
            weight: w,
            bias: None,
        }));
    }
    m
}

/// Mixtral's layout: every layer's expert matrices stacked [E, out, in] in expert order under
/// `blk.N.ffn_{gate,up,down}_exps`, the router as `blk.N.ffn_gate_inp` in f32 whatever the
/// recipe, `llama.expert_count` / `expert_used_count`, and no dense FFN tensors left.
#[test]
fn a_mixture_of_experts_is_written_in_llama_cpp_expert_layout() {
    let d = tempfile::tempdir().unwrap();
    let m = moe_model(&d.path().join("moe"), 4, None, false);
    let (out, rep) = export(&m, d.path(), GgufType::F32);
    assert_eq!(rep.arch, "llama");
    let (g, back) = read_back(&out);
    assert_eq!(meta_u64(&g, "llama.expert_count"), 4);
    assert_eq!(meta_u64(&g, "llama.expert_used_count"), 2);
    let names: Vec<&String> = g.content.tensor_infos.keys().collect();
    assert!(!names
        .iter()
        .any(|n| n.contains("ffn_gate.") || n.contains("ffn_up.")));
    let src = source_tensors(&m);
    let layers = m.llama().unwrap().cfg.num_hidden_layers;
    for i in 0..layers {
        for mat in ["gate", "up", "down"] {
            let experts: Vec<Tensor> = (0..4)
                .map(|k| {
                    src[&format!("model.layers.{i}.mlp.experts.{k}.{mat}_proj.weight")].clone()
                })
                .collect();
            let want = Tensor::stack(&experts, 0).unwrap();
            let got = &back[&format!("model.layers.{i}.mlp.experts.{mat}_proj.weight")];
            assert_eq!(got.dims(), want.dims(), "layer {i} {mat}");
            assert_eq!(max_abs_diff(got, &want), 0.0, "layer {i} {mat}");
        }
        let router = &src[&format!("model.layers.{i}.mlp.gate.weight")];
        assert_eq!(
            max_abs_diff(&back[&format!("model.layers.{i}.mlp.gate.weight")], router),
            0.0
        );
    }
    // 10 tensors per layer (2 norms, 4 attention, router, 3 stacks) + embedding + final norm.
    assert_eq!(names.len(), 10 * layers + 2, "{names:?}");

    let (q, rep) = export(&m, &d.path().join("q"), GgufType::Q8_0);
    let g = GgufFile::open(&q).unwrap();
    let ty = |n: &str| {
        rep.tensors
            .iter()
            .find(|t| t.name == n)
            .unwrap()
            .ggml_type
            .clone()
    };
    assert_eq!(ty("blk.0.ffn_gate_inp.weight"), "f32");
    assert_eq!(ty("blk.0.ffn_down_exps.weight"), "q8_0");
    assert_eq!(
        g.content.tensor_infos["blk.0.ffn_up_exps.weight"]
            .shape
            .dims()
            .len(),
        3
    );

    // mpolm does not read expert GGUFs back: one clear error, not a missing-tensor one.
    let e = Model::load(q.to_str().unwrap(), false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("mixture-of-experts"), "{e}");
}

#[test]
fn expert_layouts_llama_cpp_cannot_hold_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let partial = moe_model(&d.path().join("p"), 4, Some(vec![0]), false);
    let e = export_gguf(
        &partial,
        &d.path().join("p.gguf"),
        &ExportOptions::new(GgufType::F32),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("every layer") && e.contains("layers 1"), "{e}");
    let qwen = moe_model(&d.path().join("q"), 4, None, true);
    let e = export_gguf(
        &qwen,
        &d.path().join("q.gguf"),
        &ExportOptions::new(GgufType::F32),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("qwen2"), "{e}");
    assert!(!d.path().join("p.gguf").exists() && !d.path().join("q.gguf").exists());
}
