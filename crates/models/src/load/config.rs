//! Architecture configs, read from HF `config.json` or built from GGUF metadata.

use crate::untrusted::{
    escape, MAX_CONTEXT, MAX_HEADS, MAX_HEAD_DIM, MAX_JSON_BYTES, MAX_LABELS, MAX_LAYERS,
    MAX_VOCAB, MAX_WIDTH,
};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RopeScaling {
    #[serde(alias = "type", default)]
    pub rope_type: Option<String>,
    #[serde(default)]
    pub factor: Option<f64>,
    #[serde(default)]
    pub low_freq_factor: Option<f64>,
    #[serde(default)]
    pub high_freq_factor: Option<f64>,
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
}

/// LLaMA-family decoder (llama, qwen2, mistral): RMSNorm, RoPE, GQA, SwiGLU.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LlamaConfig {
    #[serde(default = "default_llama")]
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    pub vocab_size: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// q/k/v biases (qwen2 has them without saying so in config.json).
    #[serde(default)]
    pub attention_bias: Option<bool>,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    pub hidden_act: Option<String>,
}

fn default_llama() -> String {
    "llama".into()
}
fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10000.0
}
fn default_max_pos() -> usize {
    4096
}

impl LlamaConfig {
    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }
    pub fn qkv_bias(&self) -> bool {
        self.attention_bias.unwrap_or(self.model_type == "qwen2")
    }
    pub fn eos_ids(&self) -> Vec<u32> {
        match &self.eos_token_id {
            Some(serde_json::Value::Number(n)) => {
                n.as_u64().map(|x| vec![x as u32]).unwrap_or_default()
            }
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|x| x.as_u64().map(|x| x as u32))
                .collect(),
            _ => vec![],
        }
    }
    /// Every field against the ceilings in [`crate::untrusted`] and the model's own
    /// invariants, in checked arithmetic: a config is validated before anything is sized by it.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |m: String| Err(Error::config(path, m));
        for (name, v, max) in [
            ("hidden_size", self.hidden_size, MAX_WIDTH),
            ("intermediate_size", self.intermediate_size, MAX_WIDTH),
            ("num_hidden_layers", self.num_hidden_layers, MAX_LAYERS),
            ("num_attention_heads", self.num_attention_heads, MAX_HEADS),
            ("num_key_value_heads", self.num_kv_heads(), MAX_HEADS),
            ("vocab_size", self.vocab_size, MAX_VOCAB),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                MAX_CONTEXT,
            ),
        ] {
            in_range(path, name, v, max)?;
        }
        if let Some(d) = self.head_dim {
            in_range(path, "head_dim", d, MAX_HEAD_DIM)?;
        }
        if self.num_attention_heads % self.num_kv_heads() != 0 {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.num_kv_heads()
            ));
        }
        let hd = self.head_dim();
        if hd == 0 || hd % 2 != 0 || hd > MAX_HEAD_DIM {
            return bad(format!(
                "head_dim {hd} must be even and in 2..={MAX_HEAD_DIM} (RoPE rotates pairs)"
            ));
        }
        if self.num_attention_heads * hd > MAX_WIDTH {
            return bad(format!(
                "num_attention_heads × head_dim = {} exceeds the limit {MAX_WIDTH}",
                self.num_attention_heads * hd
            ));
        }
        positive_finite(path, "rms_norm_eps", self.rms_norm_eps)?;
        positive_finite(path, "rope_theta", self.rope_theta)?;
        if let Some(act) = &self.hidden_act {
            if act != "silu" && act != "swish" {
                return bad(format!(
                    "hidden_act '{}' is not supported (LLaMA-family models use silu)",
                    escape(act)
                ));
            }
        }
        if let Some(rs) = &self.rope_scaling {
            let t = rs.rope_type.as_deref().unwrap_or("default");
            if !matches!(t, "default" | "linear" | "llama3") {
                return bad(format!(
                    "rope_scaling type '{}' is not supported (supported: default, linear, llama3)",
                    escape(t)
                ));
            }
            for (name, v) in [
                ("rope_scaling.factor", rs.factor),
                ("rope_scaling.low_freq_factor", rs.low_freq_factor),
                ("rope_scaling.high_freq_factor", rs.high_freq_factor),
            ] {
                if let Some(v) = v {
                    positive_finite(path, name, v)?;
                }
            }
            if let Some(o) = rs.original_max_position_embeddings {
                in_range(
                    path,
                    "rope_scaling.original_max_position_embeddings",
                    o,
                    MAX_CONTEXT,
                )?;
            }
            if t == "llama3"
                && rs.high_freq_factor.unwrap_or(4.0) <= rs.low_freq_factor.unwrap_or(1.0)
            {
                // The smoothing divides by their difference.
                return bad("rope_scaling: high_freq_factor must exceed low_freq_factor".into());
            }
        }
        if let Some(b) = self.bos_token_id {
            token_in_vocab(path, "bos_token_id", b as u64, self.vocab_size)?;
        }
        match &self.eos_token_id {
            None | Some(serde_json::Value::Null) => {}
            Some(serde_json::Value::Number(n)) => {
                let id = n.as_u64().ok_or_else(|| {
                    Error::config(path, format!("eos_token_id {n} is not a token id"))
                })?;
                token_in_vocab(path, "eos_token_id", id, self.vocab_size)?;
            }
            Some(serde_json::Value::Array(a)) => {
                for v in a {
                    let id = v.as_u64().ok_or_else(|| {
                        Error::config(path, format!("eos_token_id {v} is not a token id"))
                    })?;
                    token_in_vocab(path, "eos_token_id", id, self.vocab_size)?;
                }
            }
            Some(other) => {
                return bad(format!(
                    "eos_token_id must be a token id or a list of them, found {other}"
                ))
            }
        }
        Ok(())
    }
}

fn in_range(path: &Path, name: &str, v: usize, max: usize) -> Result<()> {
    if v == 0 || v > max {
        return Err(Error::config(
            path,
            format!("{name} is {v}; it must be in 1..={max}"),
        ));
    }
    Ok(())
}

fn positive_finite(path: &Path, name: &str, v: f64) -> Result<()> {
    if !(v.is_finite() && v > 0.0) {
        return Err(Error::config(
            path,
            format!("{name} is {v}; it must be a positive finite number"),
        ));
    }
    Ok(())
}

fn token_in_vocab(path: &Path, name: &str, id: u64, vocab: usize) -> Result<()> {
    if id >= vocab as u64 {
        return Err(Error::config(
            path,
            format!("{name} {id} is outside the vocabulary of {vocab} tokens"),
        ));
    }
    Ok(())
}

/// BERT encoder (config.json of BertModel).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BertConfig {
    #[serde(default = "default_bert")]
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_gelu")]
    pub hidden_act: String,
    #[serde(default = "default_max_pos_bert")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_ln_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    /// Number of labels for a sequence-classification head (0: none).
    #[serde(default)]
    pub num_labels: Option<usize>,
    #[serde(default)]
    pub id2label: Option<std::collections::BTreeMap<String, String>>,
}

fn default_bert() -> String {
    "bert".into()
}
fn default_gelu() -> String {
    "gelu".into()
}
fn default_max_pos_bert() -> usize {
    512
}
fn default_type_vocab() -> usize {
    2
}
fn default_ln_eps() -> f64 {
    1e-12
}

impl BertConfig {
    /// As [`LlamaConfig::validate`], for the encoder's fields.
    pub fn validate(&self, path: &Path) -> Result<()> {
        for (name, v, max) in [
            ("hidden_size", self.hidden_size, MAX_WIDTH),
            ("intermediate_size", self.intermediate_size, MAX_WIDTH),
            ("num_hidden_layers", self.num_hidden_layers, MAX_LAYERS),
            ("num_attention_heads", self.num_attention_heads, MAX_HEADS),
            ("vocab_size", self.vocab_size, MAX_VOCAB),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                MAX_CONTEXT,
            ),
            ("type_vocab_size", self.type_vocab_size, MAX_VOCAB),
        ] {
            in_range(path, name, v, max)?;
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return Err(Error::config(
                path,
                format!(
                    "hidden_size {} is not divisible by num_attention_heads {}",
                    self.hidden_size, self.num_attention_heads
                ),
            ));
        }
        if !matches!(
            self.hidden_act.as_str(),
            "gelu" | "gelu_new" | "gelu_pytorch_tanh" | "relu"
        ) {
            return Err(Error::config(
                path,
                format!("hidden_act '{}' is not supported", escape(&self.hidden_act)),
            ));
        }
        positive_finite(path, "layer_norm_eps", self.layer_norm_eps)?;
        if let Some(n) = self.num_labels {
            if n > MAX_LABELS {
                return Err(Error::config(
                    path,
                    format!("num_labels is {n}; the limit is {MAX_LABELS}"),
                ));
            }
        }
        if let Some(p) = self.pad_token_id {
            token_in_vocab(path, "pad_token_id", p as u64, self.vocab_size)?;
        }
        Ok(())
    }
}

/// Parse a config file into T, turning serde's messages into "path: missing field 'x'" lines.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = crate::untrusted::read_text(path, MAX_JSON_BYTES)?;
    serde_json::from_str(&text).map_err(|e| Error::config(path, format!("invalid config: {e}")))
}

/// `model_type` (or `architectures[0]`) of an HF config.json.
pub fn model_type(path: &Path) -> Result<String> {
    let text = crate::untrusted::read_text(path, MAX_JSON_BYTES)?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::config(path, format!("invalid JSON: {e}")))?;
    if let Some(t) = v.get("model_type").and_then(|t| t.as_str()) {
        return Ok(t.to_string());
    }
    if let Some(a) = v
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(|a| a.as_str())
    {
        return Ok(a.to_string());
    }
    Err(Error::config(path, "missing key 'model_type'"))
}
