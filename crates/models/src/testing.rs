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
    let (cfg, tok, t) = tiny_llama_parts(qwen2)?;
    write_dir(dir, &cfg, &tok, &t)
}

/// config.json, tokenizer.json and HF-named weights of the tiny llama / qwen2.
fn tiny_llama_parts(
    qwen2: bool,
) -> Result<(
    serde_json::Value,
    serde_json::Value,
    HashMap<String, Tensor>,
)> {
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
    Ok((cfg, tok, b.t))
}

/// GGUF files byte by byte, for tests: metadata and tensor entries are written exactly as
/// given (duplicates, zero dimensions, wild offsets), which no real writer would do.
pub mod gguf_bytes {
    /// A metadata value (GGUF type ids in the comments).
    #[derive(Clone, Debug)]
    pub enum Meta {
        U32(u32),    // 4
        I32(i32),    // 5
        F32(f32),    // 6
        Bool(bool),  // 7
        Str(String), // 8
        U64(u64),    // 10
        F64(f64),    // 12
        Strs(Vec<String>),
        I32s(Vec<i32>),
    }

    #[derive(Clone, Debug)]
    pub struct RawTensor {
        pub name: String,
        /// ggml order: the fastest-varying (row length) first, i.e. the reverse of HF's.
        pub dims: Vec<u64>,
        pub ggml_type: u32,
        /// Relative to the start of the data section.
        pub offset: u64,
        pub data: Vec<u8>,
    }

    #[derive(Clone, Debug)]
    pub struct RawGguf {
        pub version: u32,
        pub meta: Vec<(String, Meta)>,
        pub tensors: Vec<RawTensor>,
        /// Used to lay the data out (write `general.alignment` yourself to declare another).
        pub alignment: u64,
    }

    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }

    impl RawGguf {
        pub fn new() -> Self {
            RawGguf {
                version: 3,
                meta: vec![],
                tensors: vec![],
                alignment: 32,
            }
        }

        pub fn set(&mut self, key: &str, v: Meta) {
            match self.meta.iter_mut().find(|(k, _)| k == key) {
                Some(e) => e.1 = v,
                None => self.meta.push((key.to_string(), v)),
            }
        }

        /// Append a tensor at the next aligned offset after the last one.
        pub fn push(&mut self, name: &str, dims: Vec<u64>, ggml_type: u32, data: Vec<u8>) {
            let a = self.alignment.max(1);
            let offset = self
                .tensors
                .last()
                .map_or(0, |t| (t.offset + t.data.len() as u64).div_ceil(a) * a);
            self.tensors.push(RawTensor {
                name: name.to_string(),
                dims,
                ggml_type,
                offset,
                data,
            });
        }

        pub fn to_bytes(&self) -> Vec<u8> {
            let mut out = b"GGUF".to_vec();
            out.extend_from_slice(&self.version.to_le_bytes());
            out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
            out.extend_from_slice(&(self.meta.len() as u64).to_le_bytes());
            for (k, v) in &self.meta {
                string(&mut out, k);
                let (t, body): (u32, Vec<u8>) = match v {
                    Meta::U32(x) => (4, x.to_le_bytes().to_vec()),
                    Meta::I32(x) => (5, x.to_le_bytes().to_vec()),
                    Meta::F32(x) => (6, x.to_le_bytes().to_vec()),
                    Meta::Bool(x) => (7, vec![*x as u8]),
                    Meta::Str(x) => {
                        let mut b = vec![];
                        string(&mut b, x);
                        (8, b)
                    }
                    Meta::U64(x) => (10, x.to_le_bytes().to_vec()),
                    Meta::F64(x) => (12, x.to_le_bytes().to_vec()),
                    Meta::Strs(xs) => {
                        let mut b = 8u32.to_le_bytes().to_vec();
                        b.extend_from_slice(&(xs.len() as u64).to_le_bytes());
                        for x in xs {
                            string(&mut b, x);
                        }
                        (9, b)
                    }
                    Meta::I32s(xs) => {
                        let mut b = 5u32.to_le_bytes().to_vec();
                        b.extend_from_slice(&(xs.len() as u64).to_le_bytes());
                        for x in xs {
                            b.extend_from_slice(&x.to_le_bytes());
                        }
                        (9, b)
                    }
                };
                out.extend_from_slice(&t.to_le_bytes());
                out.extend_from_slice(&body);
            }
            for t in &self.tensors {
                string(&mut out, &t.name);
                out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
                for d in &t.dims {
                    out.extend_from_slice(&d.to_le_bytes());
                }
                out.extend_from_slice(&t.ggml_type.to_le_bytes());
                out.extend_from_slice(&t.offset.to_le_bytes());
            }
            let a = self.alignment.max(1) as usize;
            let start = out.len().div_ceil(a) * a;
            out.resize(start, 0);
            for t in &self.tensors {
                let at = start + t.offset as usize;
                if out.len() < at + t.data.len() {
                    out.resize(at + t.data.len(), 0);
                }
                out[at..at + t.data.len()].copy_from_slice(&t.data);
            }
            out
        }
    }

    impl Default for RawGguf {
        fn default() -> Self {
            Self::new()
        }
    }
}

/// The tiny llama as a GGUF (f32 tensors under llama.cpp names, a gpt2 tokenizer in the
/// metadata, the chat template of the HF directory), built with [`gguf_bytes`] so tests can
/// damage any field of a file that otherwise loads.
pub fn tiny_llama_gguf() -> Result<gguf_bytes::RawGguf> {
    use gguf_bytes::Meta;
    let (cfg, tok, t) = tiny_llama_parts(false)?;
    let mut g = gguf_bytes::RawGguf::new();
    let u = |k: &str| Meta::U32(cfg[k].as_u64().unwrap_or(0) as u32);
    g.set("general.architecture", Meta::Str("llama".into()));
    g.set("llama.embedding_length", u("hidden_size"));
    g.set("llama.feed_forward_length", u("intermediate_size"));
    g.set("llama.block_count", u("num_hidden_layers"));
    g.set("llama.attention.head_count", u("num_attention_heads"));
    g.set("llama.attention.head_count_kv", u("num_key_value_heads"));
    g.set("llama.context_length", u("max_position_embeddings"));
    g.set("llama.attention.layer_norm_rms_epsilon", Meta::F32(1e-6));
    g.set("llama.rope.freq_base", Meta::F32(10000.0));
    let vocab = tok["model"]["vocab"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let mut tokens = vec![String::new(); vocab.len()];
    for (s, id) in &vocab {
        if let Some(slot) = id.as_u64().and_then(|i| tokens.get_mut(i as usize)) {
            *slot = s.clone();
        }
    }
    let specials: Vec<u64> = tok["added_tokens"]
        .as_array()
        .map(|a| a.iter().filter_map(|t| t["id"].as_u64()).collect())
        .unwrap_or_default();
    let types = (0..tokens.len() as u64)
        .map(|i| if specials.contains(&i) { 3 } else { 1 })
        .collect();
    let merges = tok["model"]["merges"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|m| m.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    g.set("tokenizer.ggml.model", Meta::Str("gpt2".into()));
    g.set("tokenizer.ggml.pre", Meta::Str("smollm".into()));
    g.set("tokenizer.ggml.tokens", Meta::Strs(tokens.clone()));
    g.set("tokenizer.ggml.token_type", Meta::I32s(types));
    g.set("tokenizer.ggml.merges", Meta::Strs(merges));
    let eos = tokens.iter().position(|t| t == "<|im_end|>").unwrap_or(0) as u32;
    let bos = tokens.iter().position(|t| t == "<|im_start|>").unwrap_or(0) as u32;
    g.set("tokenizer.ggml.bos_token_id", Meta::U32(bos));
    g.set("tokenizer.ggml.eos_token_id", Meta::U32(eos));
    g.set("tokenizer.ggml.add_bos_token", Meta::Bool(false));
    g.set(
        "tokenizer.chat_template",
        Meta::Str("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}".into()),
    );
    let mut names: Vec<&String> = t.keys().collect();
    names.sort();
    for name in names {
        let Some(gname) = crate::gguf::gguf_name(name) else {
            continue;
        };
        let x = &t[name];
        let dims: Vec<u64> = x.dims().iter().rev().map(|&d| d as u64).collect();
        let data: Vec<u8> = x
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        g.push(&gname, dims, 0, data);
    }
    Ok(g)
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
