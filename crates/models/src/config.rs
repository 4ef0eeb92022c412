//! Architecture configs, read from HF `config.json` or built from GGUF metadata.

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
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |m: String| Err(Error::config(path, m));
        if self.num_attention_heads == 0 || self.hidden_size == 0 || self.num_hidden_layers == 0 {
            return bad(
                "hidden_size, num_hidden_layers and num_attention_heads must be > 0".into(),
            );
        }
        if self.num_attention_heads % self.num_kv_heads() != 0 {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.num_kv_heads()
            ));
        }
        if self.head_dim() % 2 != 0 {
            return bad(format!(
                "head_dim {} must be even for RoPE",
                self.head_dim()
            ));
        }
        if let Some(act) = &self.hidden_act {
            if act != "silu" && act != "swish" {
                return bad(format!(
                    "hidden_act '{act}' is not supported (LLaMA-family models use silu)"
                ));
            }
        }
        if let Some(rs) = &self.rope_scaling {
            let t = rs.rope_type.as_deref().unwrap_or("default");
            if !matches!(t, "default" | "linear" | "llama3") {
                return bad(format!(
                    "rope_scaling type '{t}' is not supported (supported: default, linear, llama3)"
                ));
            }
        }
        Ok(())
    }
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
    pub fn validate(&self, path: &Path) -> Result<()> {
        if self.num_attention_heads == 0 || self.hidden_size % self.num_attention_heads != 0 {
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
                format!("hidden_act '{}' is not supported", self.hidden_act),
            ));
        }
        Ok(())
    }
}

/// Parse a config file into T, turning serde's messages into "path: missing field 'x'" lines.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::config(path, format!("invalid config: {e}")))
}

/// `model_type` (or `architectures[0]`) of an HF config.json.
pub fn model_type(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
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
