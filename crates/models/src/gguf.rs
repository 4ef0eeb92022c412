//! GGUF checkpoints (llama.cpp's format): by default every tensor is dequantized to f32 (our
//! full-precision baseline) and renamed to HF names; with `load_llama_quantized` the
//! block-typed weight matrices stay as stored (for `qlinear::QLinear`). For the llama
//! architecture the q/k rows that llama.cpp's converter permuted for its interleaved RoPE are
//! put back in HF order (whole quantized rows are moved; blocks never span rows).

use crate::config::{LlamaConfig, RopeScaling};
use crate::weights::Weights;
use crate::{Error, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

pub struct GgufFile {
    pub path: PathBuf,
    pub content: Content,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let content = Content::read(&mut f).map_err(|e| Error::Gguf {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            content,
        })
    }

    pub fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    pub fn architecture(&self) -> Result<String> {
        self.meta_str("general.architecture")
    }

    pub fn meta_str(&self, key: &str) -> Result<String> {
        match self.meta(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(self.err(format!("metadata key '{key}' is not a string"))),
            None => Err(self.err(format!("missing metadata key '{key}'"))),
        }
    }

    pub fn meta_usize(&self, key: &str) -> Result<usize> {
        let v = self
            .meta(key)
            .ok_or_else(|| self.err(format!("missing metadata key '{key}'")))?;
        as_u64(v)
            .map(|x| x as usize)
            .ok_or_else(|| self.err(format!("metadata key '{key}' is not an integer")))
    }

    pub fn meta_f64(&self, key: &str) -> Option<f64> {
        self.meta(key).and_then(as_f64)
    }

    fn err(&self, msg: String) -> Error {
        Error::Gguf {
            path: self.path.clone(),
            msg,
        }
    }

    /// Per-tensor storage types (for reports): name → ggml type name.
    pub fn tensor_types(&self) -> BTreeMap<String, String> {
        self.content
            .tensor_infos
            .iter()
            .map(|(k, v)| (k.clone(), format!("{:?}", v.ggml_dtype)))
            .collect()
    }

    /// LLaMA-family config from `<arch>.*` metadata.
    pub fn llama_config(&self) -> Result<LlamaConfig> {
        let arch = self.architecture()?;
        if !matches!(arch.as_str(), "llama" | "qwen2" | "mistral") {
            return Err(Error::UnsupportedArch {
                path: self.path.clone(),
                arch,
                supported:
                    "llama, qwen2, mistral (GGUF); llama, qwen2, mistral, bert (HF directories)"
                        .into(),
            });
        }
        let k = |s: &str| format!("{arch}.{s}");
        let hidden = self.meta_usize(&k("embedding_length"))?;
        let n_heads = self.meta_usize(&k("attention.head_count"))?;
        let n_kv = self
            .meta_usize(&k("attention.head_count_kv"))
            .unwrap_or(n_heads);
        let vocab = match self.content.tensor_infos.get("token_embd.weight") {
            Some(t) => t.shape.dims()[0],
            None => return Err(self.err("missing tensor 'token_embd.weight'".into())),
        };
        let head_dim = self
            .meta_usize(&k("attention.key_length"))
            .ok()
            .or_else(|| self.meta_usize(&k("rope.dimension_count")).ok());
        let rope_scaling = match self.meta(&k("rope.scaling.type")) {
            Some(Value::String(t)) if t != "none" => Some(RopeScaling {
                rope_type: Some(t.clone()),
                factor: self.meta_f64(&k("rope.scaling.factor")),
                low_freq_factor: None,
                high_freq_factor: None,
                original_max_position_embeddings: self
                    .meta_usize(&k("rope.scaling.original_context_length"))
                    .ok(),
            }),
            _ => None,
        };
        let eos = self.meta("tokenizer.ggml.eos_token_id").and_then(as_u64);
        let cfg = LlamaConfig {
            model_type: if arch == "mistral" {
                "llama".into()
            } else {
                arch.clone()
            },
            hidden_size: hidden,
            intermediate_size: self.meta_usize(&k("feed_forward_length"))?,
            num_hidden_layers: self.meta_usize(&k("block_count"))?,
            num_attention_heads: n_heads,
            num_key_value_heads: Some(n_kv),
            head_dim: head_dim.filter(|&d| d != hidden / n_heads),
            rms_norm_eps: self
                .meta_f64(&k("attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-5),
            rope_theta: self.meta_f64(&k("rope.freq_base")).unwrap_or(10000.0),
            rope_scaling,
            max_position_embeddings: self.meta_usize(&k("context_length")).unwrap_or(4096),
            vocab_size: vocab,
            tie_word_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
            attention_bias: Some(self.content.tensor_infos.contains_key("blk.0.attn_q.bias")),
            mlp_bias: false,
            bos_token_id: self
                .meta("tokenizer.ggml.bos_token_id")
                .and_then(as_u64)
                .map(|x| x as u32),
            eos_token_id: eos.map(|e| serde_json::json!(e)),
            hidden_act: Some("silu".into()),
        };
        cfg.validate(&self.path)?;
        Ok(cfg)
    }

    /// Dequantize every tensor to f32 under its HF name.
    pub fn load_llama_weights(
        &self,
        cfg: &LlamaConfig,
        progress: Option<&indicatif::ProgressBar>,
    ) -> Result<Weights> {
        Ok(self.load_llama(cfg, progress, false)?.0)
    }

    /// Like [`Self::load_llama_weights`], but the weight matrices of Linear layers (and the
    /// embedding) stored in a block type are returned as they are, in HF row order, under
    /// their HF names; the `Weights` hold a zero-cost broadcast placeholder of the right shape
    /// in their place, which the caller must swap out (see `Model::load_with`).
    pub fn load_llama_quantized(
        &self,
        cfg: &LlamaConfig,
        progress: Option<&indicatif::ProgressBar>,
    ) -> Result<(Weights, HashMap<String, QTensor>)> {
        self.load_llama(cfg, progress, true)
    }

    fn load_llama(
        &self,
        cfg: &LlamaConfig,
        progress: Option<&indicatif::ProgressBar>,
        keep_quantized: bool,
    ) -> Result<(Weights, HashMap<String, QTensor>)> {
        let mut f = std::fs::File::open(&self.path).map_err(|e| Error::io(&self.path, e))?;
        let permute = cfg.model_type == "llama";
        let mut names: Vec<&String> = self.content.tensor_infos.keys().collect();
        names.sort();
        if let Some(pb) = progress {
            pb.set_length(names.len() as u64);
        }
        let mut out = HashMap::new();
        let mut quantized = HashMap::new();
        for name in names {
            let q = self
                .content
                .tensor(&mut f, name, &Device::Cpu)
                .map_err(|e| self.err(format!("tensor '{name}': {e}")))?;
            // Tensors we do not model (e.g. rope_freqs) are kept under their GGUF name.
            let hf = hf_name(name).unwrap_or_else(|| name.clone());
            let heads = if !permute {
                None
            } else if hf.ends_with("self_attn.q_proj.weight")
                || hf.ends_with("self_attn.q_proj.bias")
            {
                Some(cfg.num_attention_heads)
            } else if hf.ends_with("self_attn.k_proj.weight")
                || hf.ends_with("self_attn.k_proj.bias")
            {
                Some(cfg.num_kv_heads())
            } else {
                None
            };
            let is_matrix = hf.ends_with("_proj.weight")
                || hf == "lm_head.weight"
                || hf == "model.embed_tokens.weight";
            if keep_quantized && is_matrix && crate::qlinear::is_supported(q.dtype()) {
                let q = match heads {
                    Some(n) => crate::qlinear::unpermute_rows(&q, n),
                    None => Ok(q),
                }
                .map_err(|e| self.err(format!("tensor '{name}': {e}")))?;
                let (rows, cols) = q
                    .shape()
                    .dims2()
                    .map_err(|e| self.err(format!("tensor '{name}': {e}")))?;
                let placeholder =
                    Tensor::zeros((), DType::F32, &Device::Cpu)?.broadcast_as((rows, cols))?;
                out.insert(hf.clone(), placeholder);
                quantized.insert(hf, q);
            } else {
                let mut t = q
                    .dequantize(&Device::Cpu)
                    .map_err(|e| self.err(format!("tensor '{name}': {e}")))?;
                if let Some(n) = heads {
                    t = unpermute(&t, n)?;
                }
                out.insert(hf, t);
            }
            if let Some(pb) = progress {
                pb.inc(1);
            }
        }
        Ok((Weights::new(out, &self.path), quantized))
    }
}

/// Inverse of llama.cpp's `permute`: rows grouped [head, 2, hd/2] → HF's [head, hd/2, 2] order.
pub fn unpermute(t: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    let rest: usize = dims[1..].iter().product();
    let hd = rows / n_head;
    t.reshape((n_head, hd / 2, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

/// The forward permutation (HF → llama.cpp), for GGUF export.
pub fn permute(t: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    let rest: usize = dims[1..].iter().product();
    let hd = rows / n_head;
    t.reshape((n_head, 2, hd / 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

/// llama.cpp tensor name → HF name.
pub fn hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (idx, tail) = rest.split_once('.')?;
    let (module, kind) = tail.rsplit_once('.')?;
    let m = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{idx}.{m}.{kind}"))
}

/// HF name → llama.cpp tensor name (inverse of [`hf_name`]).
pub fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (idx, tail) = rest.split_once('.')?;
    let (module, kind) = tail.rsplit_once('.')?;
    let m = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{idx}.{m}.{kind}"))
}

pub fn as_u64(v: &Value) -> Option<u64> {
    Some(match v {
        Value::U8(x) => *x as u64,
        Value::U16(x) => *x as u64,
        Value::U32(x) => *x as u64,
        Value::U64(x) => *x,
        Value::I8(x) if *x >= 0 => *x as u64,
        Value::I16(x) if *x >= 0 => *x as u64,
        Value::I32(x) if *x >= 0 => *x as u64,
        Value::I64(x) if *x >= 0 => *x as u64,
        _ => return None,
    })
}

pub fn as_f64(v: &Value) -> Option<f64> {
    Some(match v {
        Value::F32(x) => *x as f64,
        Value::F64(x) => *x,
        other => as_u64(other)? as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for n in [
            "blk.3.attn_q.weight",
            "blk.0.ffn_down.weight",
            "token_embd.weight",
            "output.weight",
            "blk.12.attn_k.bias",
        ] {
            assert_eq!(gguf_name(&hf_name(n).unwrap()).unwrap(), n);
        }
    }

    #[test]
    fn permute_inverts() -> candle_core::Result<()> {
        let t = Tensor::arange(0f32, 8.0 * 3.0, &Device::Cpu)?.reshape((8, 3))?;
        let p = permute(&t, 2)?;
        let back = unpermute(&p, 2)?;
        assert_eq!(back.to_vec2::<f32>()?, t.to_vec2::<f32>()?);
        // One head of 4 rows [r0 r1 r2 r3] becomes [r0 r2 r1 r3] (halves interleaved).
        let rows: Vec<f32> = p.narrow(1, 0, 1)?.flatten_all()?.to_vec1()?;
        assert_eq!(&rows[..4], &[0.0, 6.0, 3.0, 9.0]);
        Ok(())
    }
}
