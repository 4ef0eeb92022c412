//! Quantization: packing, known answers against the AutoGPTQ reference, GPTQ vs RTN, the
//! dequantising matmul, checkpoints round-trip and bad inputs.

use candle_core::{Device, Tensor};
use methods::quant::{self, gptq, pack, KeepFp16, QuantLinear, QuantOptions};
use models::CausalLm;
use models::LinearLayer;

fn lcg(seed: u64) -> impl FnMut() -> f64 {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 11) as f64) / ((1u64 << 53) as f64)
    }
}

fn randn(n: usize, seed: u64) -> Vec<f32> {
    let mut r = lcg(seed);
    (0..n)
        .map(|_| ((0..4).map(|_| r() - 0.5).sum::<f64>() * 1.732) as f32)
        .collect()
}

#[test]
fn packing_round_trips_exactly() {
    for bits in [2u32, 3, 4, 8] {
        let (n, cols) = (96usize, 64usize);
        let mut r = lcg(bits as u64);
        let vals: Vec<u32> = (0..n * cols)
            .map(|_| (r() * (1u64 << bits) as f64) as u32)
            .collect();
        let w = pack::pack_rows(&vals, n, cols, bits).unwrap();
        assert_eq!(w.len(), n * bits as usize / 32 * cols);
        assert_eq!(
            pack::unpack_rows(&w, n, cols, bits).unwrap(),
            vals,
            "rows, {bits} bits"
        );
        let z = pack::pack_cols(&vals, cols, n, bits).unwrap();
        assert_eq!(
            pack::unpack_cols(&z, cols, n, bits).unwrap(),
            vals,
            "cols, {bits} bits"
        );
    }
}

#[test]
fn packing_matches_autogptq_reference() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/quant/pack_reference.json"
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let flat_u = |x: &serde_json::Value| -> Vec<u32> {
        x.as_array()
            .unwrap()
            .iter()
            .flat_map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|e| e.as_i64().unwrap() as i32 as u32)
            })
            .collect()
    };
    let flat_f = |x: &serde_json::Value| -> Vec<f32> {
        x.as_array()
            .unwrap()
            .iter()
            .flat_map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|e| e.as_f64().unwrap() as f32)
            })
            .collect()
    };
    let cases = v["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 4);
    for c in cases {
        let bits = c["bits"].as_u64().unwrap() as u32;
        let (n_in, n_out) = (
            c["in"].as_u64().unwrap() as usize,
            c["out"].as_u64().unwrap() as usize,
        );
        let q = flat_u(&c["q"]);
        let zeros = flat_u(&c["zeros"]);
        let groups = zeros.len() / n_out;
        let qweight = pack::pack_rows(&q, n_in, n_out, bits).unwrap();
        assert_eq!(qweight, flat_u(&c["qweight"]), "qweight, {bits} bits");
        let zm1: Vec<u32> = zeros.iter().map(|z| z - 1).collect();
        let qzeros = pack::pack_cols(&zm1, groups, n_out, bits).unwrap();
        assert_eq!(qzeros, flat_u(&c["qzeros"]), "qzeros, {bits} bits");
        // Loading the reference arrays and dequantising gives the reference weight.
        let g_idx: Vec<u32> = c["g_idx"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e.as_u64().unwrap() as u32)
            .collect();
        let ql = QuantLinear::from_packed(
            bits,
            n_in,
            n_out,
            flat_u(&c["qweight"]),
            flat_u(&c["qzeros"]),
            flat_f(&c["scales"]),
            g_idx,
            None,
        )
        .unwrap();
        let wt = ql.dequant_t(); // [in, out]
        assert_eq!(wt, flat_f(&c["dequant"]), "dequant, {bits} bits");
        assert_eq!(ql.codes(), q);
        // The same zeros in GPTQModel's gptq_v2 encoding, both ways.
        assert_eq!(
            ql.qzeros_as(quant::ZeroFormat::V2).unwrap(),
            flat_u(&c["qzeros_v2"]),
            "v1 -> v2 qzeros, {bits} bits"
        );
        let v2 = QuantLinear::from_packed_as(
            quant::ZeroFormat::V2,
            bits,
            n_in,
            n_out,
            flat_u(&c["qweight"]),
            flat_u(&c["qzeros_v2"]),
            flat_f(&c["scales"]),
            ql.g_idx.clone(),
            None,
        )
        .unwrap();
        assert_eq!(v2.dequant_t(), wt, "v2 dequant, {bits} bits");
        assert_eq!(
            v2.qzeros_as(quant::ZeroFormat::V1).unwrap(),
            flat_u(&c["qzeros"]),
            "v2 -> v1 qzeros, {bits} bits"
        );
    }
    // Zeros that include 0: only v2 holds them; converting to v1 is refused, not wrapped.
    let v2_cases = v["v2_cases"].as_array().unwrap();
    assert_eq!(v2_cases.len(), 4);
    for c in v2_cases {
        let bits = c["bits"].as_u64().unwrap() as u32;
        let (n_in, n_out) = (
            c["in"].as_u64().unwrap() as usize,
            c["out"].as_u64().unwrap() as usize,
        );
        assert!(flat_u(&c["zeros"]).contains(&0));
        let g_idx: Vec<u32> = c["g_idx"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e.as_u64().unwrap() as u32)
            .collect();
        let ql = QuantLinear::from_packed_as(
            quant::ZeroFormat::V2,
            bits,
            n_in,
            n_out,
            flat_u(&c["qweight"]),
            flat_u(&c["qzeros_v2"]),
            flat_f(&c["scales"]),
            g_idx,
            None,
        )
        .unwrap();
        assert_eq!(
            ql.dequant_t(),
            flat_f(&c["dequant"]),
            "v2 dequant, {bits} bits"
        );
        let e = ql.qzeros_as(quant::ZeroFormat::V1).unwrap_err().to_string();
        assert!(e.contains("gptq_v2"), "{e}");
    }
}

/// Inputs with strongly correlated features, as real activations have.
fn correlated_inputs(tokens: usize, n: usize, seed: u64) -> Vec<f32> {
    let base = randn(tokens * 4, seed);
    let mix = randn(4 * n, seed + 1);
    let noise = randn(tokens * n, seed + 2);
    let mut x = vec![0f32; tokens * n];
    for t in 0..tokens {
        for i in 0..n {
            let mut s = 0.3 * noise[t * n + i];
            for k in 0..4 {
                s += base[t * 4 + k] * mix[k * n + i];
            }
            x[t * n + i] = s * (1.0 + (i % 7) as f32 * 0.3);
        }
    }
    x
}

fn out_err(x: &[f32], w: &[f32], q: &[f32], tokens: usize, n: usize, out: usize) -> f64 {
    let mut e = 0f64;
    for t in 0..tokens {
        for j in 0..out {
            let (mut a, mut b) = (0f64, 0f64);
            for i in 0..n {
                a += (x[t * n + i] * w[j * n + i]) as f64;
                b += (x[t * n + i] * q[j * n + i]) as f64;
            }
            e += (a - b).powi(2);
        }
    }
    e
}

#[test]
fn gptq_beats_rtn_on_a_random_layer() {
    let (n, out, tokens) = (128usize, 64usize, 512usize);
    let w = randn(out * n, 7);
    let x = correlated_inputs(tokens, n, 11);
    let mut h = gptq::Hessian::new(n);
    let xt = Tensor::from_vec(x.clone(), (tokens, n), &Device::Cpu).unwrap();
    let xtx = xt
        .t()
        .unwrap()
        .matmul(&xt)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    h.add_xtx(&xtx, tokens);
    for bits in [2u32, 3, 4] {
        for (gs, act) in [(0usize, false), (32, false), (32, true)] {
            let g = gptq::Grid {
                bits,
                group_size: gs,
                sym: false,
            };
            let p = gptq::prepare(&h.finish(), n, 0.01, act).unwrap();
            let r = gptq::rtn(&w, out, n, &g).unwrap();
            let q = gptq::gptq(&w, out, n, &g, &p, 32).unwrap();
            let (er, eq) = (
                out_err(&x, &w, &r.dequant(), tokens, n, out),
                out_err(&x, &w, &q.dequant(), tokens, n, out),
            );
            assert!(
                eq < 0.9 * er,
                "bits {bits} group {gs} act-order {act}: GPTQ output error {eq} not below RTN {er}"
            );
            // Packed layer reproduces the unpacked dequantisation.
            let ql = QuantLinear::from_quantized(&q, bits, None).unwrap();
            let wq = ql
                .weight()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(wq, q.dequant());
        }
    }
}

#[test]
fn dequantised_matmul_equals_dense_matmul_of_dequantised_weights() {
    let (n, out) = (96usize, 64usize);
    let w = randn(out * n, 3);
    for bits in [2u32, 3, 4, 8] {
        let q = gptq::rtn(
            &w,
            out,
            n,
            &gptq::Grid {
                bits,
                group_size: 32,
                sym: bits == 4,
            },
        )
        .unwrap();
        let bias = Tensor::from_vec(randn(out, 5), out, &Device::Cpu).unwrap();
        let ql = QuantLinear::from_quantized(&q, bits, Some(bias.clone())).unwrap();
        let x = Tensor::from_vec(randn(2 * 5 * n, 9), (2, 5, n), &Device::Cpu).unwrap();
        let y = ql.forward(&x).unwrap();
        let wd = Tensor::from_vec(q.dequant(), (out, n), &Device::Cpu).unwrap();
        let yref = models::linear::matmul_t(&x, &wd)
            .unwrap()
            .broadcast_add(&bias)
            .unwrap();
        let d = (y - yref)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-4, "{bits} bits: max |Δ| {d}");
        // The grid is the issue's: every dequantised value is s·(q − z) with q in range.
        assert!(ql.codes().iter().all(|&c| c < (1 << bits)));
    }
}

fn tiny() -> (tempfile::TempDir, std::path::PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("tiny");
    models::testing::write_tiny_llama(&p, false).unwrap();
    (d, p)
}

fn calib_text() -> String {
    (0..200)
        .map(|i| format!("the cat {i} sat on the mat and then the dog ran in the hall. "))
        .collect()
}

fn logits(m: &models::Model, ids: &[u32]) -> Vec<f32> {
    let t = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    m.llama()
        .unwrap()
        .forward(&t, None)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

#[test]
fn tiny_model_gptq_save_load_generate() {
    let (d, p) = tiny();
    let mut m = models::Model::load(p.to_str().unwrap(), false).unwrap();
    let ids: Vec<u32> = m.tokenizer.encode("the cat sat on the mat", false).unwrap();
    let base = logits(&m, &ids);
    let calib = quant::calib::calibration_samples(&m, &calib_text(), 8, 32, 0).unwrap();
    let o = QuantOptions {
        bits: 4,
        group_size: 16,
        act_order: true,
        ..Default::default()
    };
    let reps = quant::quantize_model(&mut m, &o, Some(&calib), false).unwrap();
    assert_eq!(reps.len(), 14);
    assert!(reps.iter().all(|r| r.kind == "gptq4" && r.loss.is_finite()));
    assert_eq!(
        m.linears()
            .iter()
            .filter(|(_, l)| l.kind() == "gptq4")
            .count(),
        14
    );
    let ql = logits(&m, &ids);
    let diff = base
        .iter()
        .zip(&ql)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let scale = base.iter().fold(0f32, |a, b| a.max(b.abs()));
    assert!(
        diff > 0.0 && diff < 0.3 * scale,
        "4-bit logits moved by {diff} (max |logit| {scale})"
    );
    let out = d.path().join("q4");
    let cfg = quant::QuantizeConfig {
        bits: 4,
        group_size: 16,
        damp_percent: 0.01,
        desc_act: true,
        sym: false,
        true_sequential: true,
        quant_method: "gptq".into(),
        checkpoint_format: "gptq".into(),
        mpolm_method: "gptq".into(),
        mpolm_fp16_modules: vec![],
        mpolm_int8_activations: None,
    };
    quant::save_quantized(&m, &out, &cfg).unwrap();
    assert!(quant::is_quantized_dir(&out));
    let qc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("quantize_config.json")).unwrap())
            .unwrap();
    assert_eq!(qc["quant_method"], "gptq");
    assert_eq!(qc["desc_act"], true);
    // config.json tells transformers/GPTQModel the same format, and the dtype actually stored.
    let hc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    let q = &hc["quantization_config"];
    for k in [
        "quant_method",
        "bits",
        "group_size",
        "desc_act",
        "sym",
        "damp_percent",
        "true_sequential",
        "checkpoint_format",
    ] {
        assert_eq!(q[k], qc[k], "quantization_config.{k}");
    }
    assert_eq!(hc["torch_dtype"], "float16");
    let raw =
        candle_core::safetensors::load(out.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    for (name, t) in &raw {
        assert!(
            matches!(t.dtype(), candle_core::DType::F16 | candle_core::DType::I32),
            "{name} is {:?}",
            t.dtype()
        );
    }
    let st = models::weights::load_safetensors(&out.join("model.safetensors")).unwrap();
    assert_eq!(
        st["model.layers.0.self_attn.q_proj.qweight"].dims(),
        &[4, 32]
    );
    assert_eq!(st["model.layers.0.self_attn.q_proj.qzeros"].dims(), &[2, 4]);
    assert_eq!(
        st["model.layers.0.self_attn.q_proj.scales"].dims(),
        &[2, 32]
    );
    assert_eq!(st["model.layers.0.self_attn.q_proj.g_idx"].dims(), &[32]);
    assert!(!st.contains_key("model.layers.0.self_attn.q_proj.weight"));
    let m2 = quant::load_quantized(&out).unwrap();
    assert_eq!(
        m2.linears()
            .iter()
            .filter(|(_, l)| l.kind() == "gptq4")
            .count(),
        14
    );
    // The embedding (tied head) stays in f16 as stored: exactly the f16 rounding of the in-memory
    // model's table, at half its bytes.
    let (_, emb) = m2
        .linears()
        .into_iter()
        .find(|(n, _)| n == "model.embed_tokens")
        .unwrap();
    assert_eq!(emb.kind(), "f16");
    assert_eq!(m2.stored_types.get("f16"), Some(&1));
    let (_, emb1) = m
        .linears()
        .into_iter()
        .find(|(n, _)| n == "model.embed_tokens")
        .unwrap();
    let rounded = emb1
        .weight()
        .unwrap()
        .to_dtype(candle_core::DType::F16)
        .unwrap()
        .to_dtype(candle_core::DType::F32)
        .unwrap();
    assert_eq!(
        emb.weight()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        rounded.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
    assert_eq!(emb.storage_bytes(), 2 * emb.num_params());
    // Packed layers are bit-identical; only the f16 storage of the embedding/norms differs.
    let l2 = logits(&m2, &ids);
    let diff2 = ql
        .iter()
        .zip(&l2)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff2 < 2e-2, "reloaded logits differ by {diff2}");
    // GPTQModel's gptq_v2 (the zero itself): v1 -> v2 -> v1 gives the same dequantized weights
    // in every layer and the v1 file's words again.
    let v2 = d.path().join("q4v2");
    let cfg2 = quant::QuantizeConfig {
        checkpoint_format: "gptq_v2".into(),
        ..cfg.clone()
    };
    quant::save_quantized(&m2, &v2, &cfg2).unwrap();
    let hc2: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(v2.join("config.json")).unwrap()).unwrap();
    assert_eq!(hc2["quantization_config"]["checkpoint_format"], "gptq_v2");
    let m3 = quant::load_quantized(&v2).unwrap();
    let back = d.path().join("q4v1");
    quant::save_quantized(&m3, &back, &cfg).unwrap();
    let (f1, f2, f3) = (
        models::weights::load_safetensors(&out.join("model.safetensors")).unwrap(),
        models::weights::load_safetensors(&v2.join("model.safetensors")).unwrap(),
        models::weights::load_safetensors(&back.join("model.safetensors")).unwrap(),
    );
    let ints = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<i32>().unwrap();
    let mut zeros_seen = 0;
    for (name, t) in &f1 {
        if name.ends_with(".qzeros") {
            let (a, b) = (ints(t), ints(&f2[name]));
            assert_ne!(a, b, "{name}: v2 must not store v1's words");
            // 4 bits: eight zeros per word, each one larger in v2 (no v1 zero here wraps).
            let un = |w: &[i32]| -> Vec<u32> {
                w.iter()
                    .flat_map(|&x| (0..8).map(move |k| ((x as u32) >> (4 * k)) & 15))
                    .collect()
            };
            for (z1, z2) in un(&a).iter().zip(un(&b)) {
                assert_eq!(z1 + 1, z2, "{name}");
            }
            zeros_seen += 1;
        }
        assert_eq!(t.dtype(), f3[name].dtype(), "{name}");
        assert_eq!(
            t.to_dtype(candle_core::DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            f3[name]
                .to_dtype(candle_core::DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            "{name} after v1 -> v2 -> v1"
        );
    }
    assert_eq!(zeros_seen, 14);
    for ((n, a), (_, b)) in m2.linears().into_iter().zip(m3.linears()) {
        if let (Some(a), Some(b)) = (
            a.inner().as_any().downcast_ref::<QuantLinear>(),
            b.inner().as_any().downcast_ref::<QuantLinear>(),
        ) {
            assert_eq!(
                a.dequant_t(),
                b.dequant_t(),
                "{n}: v1 and v2 dequantize alike"
            );
        }
    }
    let sp = models::generate::SamplingParams {
        max_new_tokens: 5,
        temperature: 0.0,
        top_p: 1.0,
        seed: 0,
        stop_ids: vec![],
    };
    let (toks, _) = models::generate::generate(m2.llama().unwrap(), &ids, &sp, |_| {}).unwrap();
    assert!(!toks.is_empty());
    assert!(quant::total_bits(&m2, 16) < quant::total_bits(&m2, 32));
}

#[test]
fn tiny_model_rtn8_is_close_and_keep_fp16_works() {
    let (_d, p) = tiny();
    let base_m = models::Model::load(p.to_str().unwrap(), false).unwrap();
    let ids: Vec<u32> = base_m.tokenizer.encode("the dog ran", false).unwrap();
    let base = logits(&base_m, &ids);
    let mut m = models::Model::load(p.to_str().unwrap(), false).unwrap();
    let o = QuantOptions {
        method: quant::calib::Method::Rtn,
        bits: 8,
        group_size: 0,
        keep: KeepFp16::parse("attn").unwrap(),
        ..Default::default()
    };
    let reps = quant::quantize_model(&mut m, &o, None, false).unwrap();
    assert_eq!(reps.iter().filter(|r| r.kind == "fp16").count(), 8);
    assert_eq!(reps.iter().filter(|r| r.kind == "rtn8").count(), 6);
    let d = base
        .iter()
        .zip(&logits(&m, &ids))
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let scale = base.iter().fold(0f32, |a, b| a.max(b.abs()));
    assert!(
        d < 0.01 * scale,
        "8-bit RTN moved logits by {d} (max |logit| {scale})"
    );
    // crucial:N keeps the N largest-error projections in fp16.
    let mut m = models::Model::load(p.to_str().unwrap(), false).unwrap();
    let calib = quant::calib::calibration_samples(&m, &calib_text(), 4, 32, 1).unwrap();
    let o = QuantOptions {
        bits: 2,
        group_size: 16,
        keep: KeepFp16::Crucial(3),
        ..Default::default()
    };
    let reps = quant::quantize_model(&mut m, &o, Some(&calib), false).unwrap();
    let kept: Vec<_> = reps.iter().filter(|r| r.kind == "fp16").collect();
    assert_eq!(kept.len(), 3);
    let min_kept = kept.iter().map(|r| r.loss).fold(f64::INFINITY, f64::min);
    assert!(reps
        .iter()
        .filter(|r| r.kind == "gptq2")
        .all(|r| r.loss <= min_kept));
    assert_eq!(
        m.linears()
            .iter()
            .filter(|(_, l)| l.kind() == "dense")
            .count(),
        3 + 1
    );
}

#[test]
fn bad_inputs_give_clear_errors() {
    let err = pack::pack_rows(&[0; 32], 32, 1, 5).unwrap_err().to_string();
    assert!(err.contains("unsupported bit width 5"), "{err}");
    let w = randn(32 * 48, 1);
    let err = gptq::rtn(
        &w,
        32,
        48,
        &gptq::Grid {
            bits: 4,
            group_size: 32,
            sym: false,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("group size 32 does not divide in_features 48"),
        "{err}"
    );
    let (_d, p) = tiny();
    let mut m = models::Model::load(p.to_str().unwrap(), false).unwrap();
    let o = QuantOptions {
        bits: 5,
        ..Default::default()
    };
    let err = quant::quantize_model(&mut m, &o, None, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("unsupported bit width 5"), "{err}");
    let o = QuantOptions {
        bits: 4,
        group_size: 24,
        ..Default::default()
    };
    let err = quant::quantize_model(&mut m, &o, None, false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`group_size` 24 does not divide in_features 32"),
        "{err}"
    );
    let o = QuantOptions {
        bits: 4,
        group_size: 16,
        ..Default::default()
    };
    let err = quant::quantize_model(&mut m, &o, None, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("GPTQ needs calibration data"), "{err}");
    let err = quant::read_text(
        std::path::Path::new("/nonexistent/calib.txt"),
        "calibration",
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("/nonexistent/calib.txt") && err.contains("calibration"),
        "{err}"
    );
    let err = KeepFp16::parse("attn,foo").unwrap_err().to_string();
    assert!(err.contains("unknown part 'foo'"), "{err}");
    let err = quant::load_quantized(&p).unwrap_err().to_string();
    assert!(err.contains("quantize_config.json"), "{err}");
}

/// Timing of the per-matrix GPTQ work at SmolLM2's largest shape (run with --ignored).
#[test]
#[ignore]
fn timing_gptq_smollm2_down_proj() {
    let (n, out, tokens) = (1536usize, 576usize, 1024usize);
    let x = correlated_inputs(tokens, n, 1);
    let xt = Tensor::from_vec(x, (tokens, n), &Device::Cpu).unwrap();
    let xtx = xt
        .t()
        .unwrap()
        .matmul(&xt)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let mut h = gptq::Hessian::new(n);
    h.add_xtx(&xtx, tokens);
    let t = std::time::Instant::now();
    let p = gptq::prepare(&h.finish(), n, 0.01, false).unwrap();
    eprintln!("prepare {n}: {:.2}s", t.elapsed().as_secs_f64());
    let w = randn(out * n, 2);
    let t = std::time::Instant::now();
    gptq::gptq(
        &w,
        out,
        n,
        &gptq::Grid {
            bits: 4,
            group_size: 64,
            sym: false,
        },
        &p,
        128,
    )
    .unwrap();
    eprintln!("gptq {out}x{n}: {:.2}s", t.elapsed().as_secs_f64());
}

/// GPTQ against the PyTorch port of AutoGPTQ's fasterquant (scripts/gptq_torch.py --fixture,
/// mpolm grid, computed in f64): same codes, scales, zeros and g_idx up to f32 round-off.
#[test]
fn gptq_matches_torch_fasterquant_reference() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/quant/gptq_reference.json"
    );
    let f: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let vf = |v: &serde_json::Value| -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    };
    let vu = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let (n, out, tokens) = (
        f["n"].as_u64().unwrap() as usize,
        f["out"].as_u64().unwrap() as usize,
        f["tokens"].as_u64().unwrap() as usize,
    );
    let (x, w) = (vf(&f["x"]), vf(&f["w"]));
    let mut h = gptq::Hessian::new(n);
    h.add_rows(&x, tokens);
    for c in f["cases"].as_array().unwrap() {
        let gs = c["group_size"].as_i64().unwrap();
        let g = gptq::Grid {
            bits: c["bits"].as_u64().unwrap() as u32,
            group_size: if gs < 0 { 0 } else { gs as usize },
            sym: c["sym"].as_bool().unwrap(),
        };
        let act = c["act_order"].as_bool().unwrap();
        let p = gptq::prepare(&h.finish(), n, 0.01, act).unwrap();
        let q = gptq::gptq(&w, out, n, &g, &p, c["block"].as_u64().unwrap() as usize).unwrap();
        let what = format!("bits {} group {gs} act-order {act} sym {}", g.bits, g.sym);
        assert_eq!(q.g_idx, vu(&c["g_idx"]), "{what}: g_idx");
        let codes = vu(&c["q"]);
        let same = q.q.iter().zip(&codes).filter(|(a, b)| a == b).count();
        // A code may flip where round-off moves a value across a rounding boundary; that
        // must stay rare and off by one.
        assert!(
            same as f64 >= 0.99 * codes.len() as f64,
            "{what}: only {same}/{} codes equal the reference",
            codes.len()
        );
        assert!(
            q.q.iter().zip(&codes).all(|(a, b)| a.abs_diff(*b) <= 1),
            "{what}"
        );
        let (sr, zr) = (vf(&c["scales"]), vu(&c["zeros"]));
        let s_same = q.scales.iter().zip(&sr).filter(|(a, b)| a == b).count();
        assert!(
            s_same as f64 >= 0.97 * sr.len() as f64,
            "{what}: scales {s_same}/{}",
            sr.len()
        );
        let z_same = q.zeros.iter().zip(&zr).filter(|(a, b)| a == b).count();
        assert!(
            z_same as f64 >= 0.97 * zr.len() as f64,
            "{what}: zeros {z_same}/{}",
            zr.len()
        );
        let lr = c["loss"].as_f64().unwrap();
        assert!(
            (q.loss - lr).abs() <= 0.02 * lr,
            "{what}: loss {} vs {lr}",
            q.loss
        );
    }
}

/// The damped inverse-Hessian factor equals GPTQ's chol → inverse → upper chol, done here
/// with plain f64 loops on a badly conditioned Hessian (dead column, act-order permutation).
#[test]
fn inverse_hessian_factor_matches_three_step_reference() {
    let (n, tokens) = (80usize, 60usize); // fewer tokens than inputs: H singular before damping
    let mut x = correlated_inputs(tokens, n, 3);
    for t in 0..tokens {
        x[t * n + 7] = 0.0;
    }
    let mut h = gptq::Hessian::new(n);
    h.add_rows(&x, tokens);
    let hf = h.finish();
    for act in [false, true] {
        let p = gptq::prepare(&hf, n, 0.01, act).unwrap();
        // Reference on the same permuted, damped matrix.
        let mut hp = vec![0f64; n * n];
        for a in 0..n {
            for b in 0..n {
                let (pa, pb) = (p.perm[a], p.perm[b]);
                hp[a * n + b] = if pa == pb && p.dead[pa] {
                    1.0
                } else {
                    hf[pa * n + pb]
                };
            }
        }
        let md = (0..n).map(|i| hp[i * n + i]).sum::<f64>() / n as f64;
        for i in 0..n {
            hp[i * n + i] += 0.01 * md;
        }
        let chol = |a: &[f64]| -> Vec<f64> {
            let mut l = vec![0f64; n * n];
            for j in 0..n {
                for i in j..n {
                    let s: f64 =
                        a[i * n + j] - (0..j).map(|k| l[i * n + k] * l[j * n + k]).sum::<f64>();
                    l[i * n + j] = if i == j { s.sqrt() } else { s / l[j * n + j] };
                }
            }
            l
        };
        let l = chol(&hp);
        let mut li = vec![0f64; n * n];
        for c in 0..n {
            li[c * n + c] = 1.0 / l[c * n + c];
            for i in c + 1..n {
                let s: f64 = (c..i).map(|k| l[i * n + k] * li[k * n + c]).sum();
                li[i * n + c] = -s / l[i * n + i];
            }
        }
        let mut hinv = vec![0f64; n * n];
        for a in 0..n {
            for b in 0..n {
                hinv[a * n + b] = (0..n).map(|k| li[k * n + a] * li[k * n + b]).sum();
            }
        }
        let l2 = chol(&hinv);
        let scale = (0..n).map(|i| l2[i * n + i].abs()).fold(0f64, f64::max);
        for a in 0..n {
            for b in 0..n {
                let want = if b >= a { l2[b * n + a] } else { 0.0 };
                let got = p.hinv[a * n + b] as f64;
                assert!(
                    (got - want).abs() <= 1e-5 * scale,
                    "act {act}: U[{a}][{b}] = {got}, reference {want}"
                );
            }
        }
    }
}
