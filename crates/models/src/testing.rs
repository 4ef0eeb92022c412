//! Tiny synthetic models (random weights, byte-level tokenizer) written as real HF
//! directories, so unit tests of every later method run in milliseconds through the same
//! loading path as real checkpoints.

use crate::Result;
use candle_core::{Device, Tensor};
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;

/// A byte-level BPE tokenizer.json with the 256 byte symbols, a few merges and ChatML
/// control tokens; vocab size 256 + merges + specials.
pub fn byte_tokenizer_json(merges: &[(&str, &str)]) -> serde_json::Value {
    // GPT-2's byte→unicode table, so every byte has a printable symbol.
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut pairs: Vec<(u32, char)> = bs
        .iter()
        .zip(&cs)
        .map(|(&b, &c)| (b, char::from_u32(c).unwrap()))
        .collect();
    pairs.sort();
    let mut vocab = serde_json::Map::new();
    for (i, (_, c)) in pairs.iter().enumerate() {
        vocab.insert(c.to_string(), json!(i));
    }
    let mut next = vocab.len();
    for (a, b) in merges {
        vocab.insert(format!("{a}{b}"), json!(next));
        next += 1;
    }
    let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
    let added: Vec<_> = specials
        .iter()
        .enumerate()
        .map(|(k, s)| {
            vocab.insert(s.to_string(), json!(next + k));
            json!({"id": next + k, "content": s, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges.iter().map(|(a, b)| format!("{a} {b}")).collect::<Vec<_>>()}
    })
}

/// max |a − b| over all elements (f32 tensors of the same shape); panics on shape mismatch,
/// which is what a test wants.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
        .expect("tensors of the same shape")
}

const TINY_MERGES: &[(&str, &str)] = &[("t", "h"), ("th", "e"), ("Ġ", "t"), ("a", "n"), ("i", "n")];

fn randn(shape: &[usize], std: f64, seed: u64) -> Result<Tensor> {
    // Deterministic across runs: a small LCG-free hash so tests do not depend on RNG crates.
    let n: usize = shape.iter().product();
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            // Sum of 4 uniforms → roughly normal, plenty for test weights.
            let mut acc = 0.0f64;
            for _ in 0..4 {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                acc += ((s >> 11) as f64) / ((1u64 << 53) as f64) - 0.5;
            }
            (acc * std * 1.732) as f32
        })
        .collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

struct Builder {
    t: HashMap<String, Tensor>,
    seed: u64,
}

impl Builder {
    /// std > 0: random; std == 0: zeros; std < 0: ones (norm weights).
    fn put(&mut self, name: String, shape: &[usize], std: f64) -> Result<()> {
        self.seed += 1;
        let t = if std > 0.0 {
            randn(shape, std, self.seed)?
        } else if std == 0.0 {
            Tensor::zeros(shape, candle_core::DType::F32, &Device::Cpu)?
        } else {
            Tensor::ones(shape, candle_core::DType::F32, &Device::Cpu)?
        };
        self.t.insert(name, t);
        Ok(())
    }
}

/// Write a tiny llama (or qwen2 when `qwen2`) HF directory.
pub fn write_tiny_llama(dir: &Path, qwen2: bool) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| crate::Error::io(dir, e))?;
    let tok = byte_tokenizer_json(TINY_MERGES);
    let vocab = tok["model"]["vocab"]
        .as_object()
        .map(|v| v.len())
        .unwrap_or(0);
    let (h, inter, layers, nh, nkv) = (32usize, 64usize, 2usize, 4usize, 2usize);
    let hd = h / nh;
    let cfg = json!({
        "architectures": [if qwen2 { "Qwen2ForCausalLM" } else { "LlamaForCausalLM" }],
        "model_type": if qwen2 { "qwen2" } else { "llama" },
        "hidden_size": h, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": nh, "num_key_value_heads": nkv, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "max_position_embeddings": 128, "vocab_size": vocab,
        "tie_word_embeddings": !qwen2, "hidden_act": "silu", "eos_token_id": vocab - 3,
    });
    let mut b = Builder {
        t: HashMap::new(),
        seed: 1,
    };
    let mut put = |name: String, shape: &[usize], std: f64| b.put(name, shape, std);
    put("model.embed_tokens.weight".into(), &[vocab, h], 0.5)?;
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        put(format!("{p}.self_attn.q_proj.weight"), &[nh * hd, h], 0.2)?;
        put(format!("{p}.self_attn.k_proj.weight"), &[nkv * hd, h], 0.2)?;
        put(format!("{p}.self_attn.v_proj.weight"), &[nkv * hd, h], 0.2)?;
        put(format!("{p}.self_attn.o_proj.weight"), &[h, nh * hd], 0.2)?;
        if qwen2 {
            put(format!("{p}.self_attn.q_proj.bias"), &[nh * hd], 0.1)?;
            put(format!("{p}.self_attn.k_proj.bias"), &[nkv * hd], 0.1)?;
            put(format!("{p}.self_attn.v_proj.bias"), &[nkv * hd], 0.1)?;
        }
        put(format!("{p}.mlp.gate_proj.weight"), &[inter, h], 0.2)?;
        put(format!("{p}.mlp.up_proj.weight"), &[inter, h], 0.2)?;
        put(format!("{p}.mlp.down_proj.weight"), &[h, inter], 0.2)?;
        put(format!("{p}.input_layernorm.weight"), &[h], -1.0)?;
        put(format!("{p}.post_attention_layernorm.weight"), &[h], -1.0)?;
    }
    put("model.norm.weight".into(), &[h], -1.0)?;
    if qwen2 {
        put("lm_head.weight".into(), &[vocab, h], 0.2)?;
    }
    write_dir(dir, &cfg, &tok, &b.t)
}

/// Write a tiny BERT HF directory (2 layers, hidden 32, with pooler).
pub fn write_tiny_bert(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| crate::Error::io(dir, e))?;
    let tok = byte_tokenizer_json(TINY_MERGES);
    let vocab = tok["model"]["vocab"]
        .as_object()
        .map(|v| v.len())
        .unwrap_or(0);
    let (h, inter, layers) = (32usize, 64usize, 2usize);
    let cfg = json!({"model_type": "bert", "vocab_size": vocab, "hidden_size": h, "num_hidden_layers": layers,
        "num_attention_heads": 4, "intermediate_size": inter, "max_position_embeddings": 64, "type_vocab_size": 2,
        "layer_norm_eps": 1e-12, "hidden_act": "gelu"});
    let mut b = Builder {
        t: HashMap::new(),
        seed: 100,
    };
    let mut put = |name: String, shape: &[usize], std: f64| b.put(name, shape, std);
    put("embeddings.word_embeddings.weight".into(), &[vocab, h], 0.5)?;
    put(
        "embeddings.position_embeddings.weight".into(),
        &[64, h],
        0.1,
    )?;
    put(
        "embeddings.token_type_embeddings.weight".into(),
        &[2, h],
        0.1,
    )?;
    let mut names = vec![];
    for i in 0..layers {
        let l = format!("encoder.layer.{i}");
        for (m, o, n) in [
            ("attention.self.query", h, h),
            ("attention.self.key", h, h),
            ("attention.self.value", h, h),
            ("attention.output.dense", h, h),
            ("intermediate.dense", inter, h),
            ("output.dense", h, inter),
        ] {
            names.push((format!("{l}.{m}"), o, n));
        }
    }
    names.push(("pooler.dense".into(), h, h));
    for (n, o, i) in names {
        put(format!("{n}.weight"), &[o, i], 0.2)?;
        put(format!("{n}.bias"), &[o], 0.05)?;
    }
    let mut lns = vec!["embeddings.LayerNorm".to_string()];
    for i in 0..layers {
        lns.push(format!("encoder.layer.{i}.attention.output.LayerNorm"));
        lns.push(format!("encoder.layer.{i}.output.LayerNorm"));
    }
    for n in lns {
        put(format!("{n}.weight"), &[h], -1.0)?;
        put(format!("{n}.bias"), &[h], 0.0)?;
    }
    write_dir(dir, &cfg, &tok, &b.t)
}

fn write_dir(
    dir: &Path,
    cfg: &serde_json::Value,
    tok: &serde_json::Value,
    t: &HashMap<String, Tensor>,
) -> Result<()> {
    let w = |name: &str, v: &serde_json::Value| -> Result<()> {
        let p = dir.join(name);
        std::fs::write(&p, serde_json::to_string_pretty(v).unwrap_or_default())
            .map_err(|e| crate::Error::io(p, e))
    };
    w("config.json", cfg)?;
    w("tokenizer.json", tok)?;
    w(
        "tokenizer_config.json",
        &json!({"eos_token": "<|im_end|>", "bos_token": null,
               "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"}),
    )?;
    candle_core::safetensors::save(t, dir.join("model.safetensors"))?;
    Ok(())
}
