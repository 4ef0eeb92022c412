//! Gemma 3 text decoder (transformers' `Gemma3ForCausalLM`, model_type `gemma3_text`):
//! embeddings scaled by √hidden, RMSNorm as x·(1 + w) in f32, per-head q/k RMSNorm, four norms
//! per layer (input, post-attention, pre- and post-feedforward), gated GELU-tanh MLP,
//! attention scale query_pre_attn_scalar^-½, sliding-window layers with their own RoPE base
//! interleaved with global layers, optional logit soft-capping, tied head.
//! Its public API mirrors [`crate::llama::Llama`] name for name and shares its KV [`Cache`].
//! Norm weights are held as HF stores them (w, not 1 + w).

use crate::arch::{CausalLm, FeedForward};
use crate::cache::{Cache, KvBuf};
use crate::config::{LlamaConfig, RopeScaling};
use crate::linear::Linear;
use crate::llama::rope_tables_for;
use crate::ops;
use crate::source::{Bias, WeightSource};
use crate::untrusted::escape;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::any::Any;
use std::path::Path;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Gemma3Config {
    #[serde(default = "default_model_type")]
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default = "default_head_dim")]
    pub head_dim: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base of the global (full-attention) layers.
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// RoPE base of the sliding-window layers.
    #[serde(default = "default_local_theta")]
    pub rope_local_base_freq: f64,
    /// Applies to the global layers only, as in transformers.
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    pub vocab_size: usize,
    #[serde(default = "default_qpas")]
    pub query_pre_attn_scalar: f64,
    #[serde(default = "default_window")]
    pub sliding_window: usize,
    /// Every n-th layer (1-based) is global, the others slide; `layer_types` overrides it.
    #[serde(default = "default_pattern")]
    pub sliding_window_pattern: usize,
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    #[serde(default)]
    pub final_logit_softcapping: Option<f64>,
    #[serde(default)]
    pub attn_logit_softcapping: Option<f64>,
    #[serde(default = "default_act")]
    pub hidden_activation: String,
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
}

fn default_model_type() -> String {
    "gemma3_text".into()
}
fn default_head_dim() -> usize {
    256
}
fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    1_000_000.0
}
fn default_local_theta() -> f64 {
    10_000.0
}
fn default_max_pos() -> usize {
    131_072
}
fn default_qpas() -> f64 {
    256.0
}
fn default_window() -> usize {
    4096
}
fn default_pattern() -> usize {
    6
}
fn default_act() -> String {
    "gelu_pytorch_tanh".into()
}
fn default_true() -> bool {
    true
}

impl Gemma3Config {
    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    pub fn eos_ids(&self) -> Vec<u32> {
        self.as_llama().eos_ids()
    }

    /// Whether layer `i` attends through the sliding window (transformers' `layer_types`).
    pub fn is_sliding(&self, i: usize) -> bool {
        match &self.layer_types {
            Some(t) => t.get(i).is_some_and(|s| s == "sliding_attention"),
            None => (i + 1) % self.sliding_window_pattern.max(1) != 0,
        }
    }

    /// The fields a LLaMA config shares, so their checks are the same code.
    fn as_llama(&self) -> LlamaConfig {
        LlamaConfig {
            model_type: "llama".into(),
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.num_key_value_heads,
            head_dim: Some(self.head_dim),
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: self.rope_theta,
            rope_scaling: self.rope_scaling.clone(),
            max_position_embeddings: self.max_position_embeddings,
            vocab_size: self.vocab_size,
            tie_word_embeddings: self.tie_word_embeddings,
            attention_bias: Some(false),
            mlp_bias: false,
            bos_token_id: self.bos_token_id,
            eos_token_id: self.eos_token_id.clone(),
            hidden_act: None,
        }
    }

    /// As [`LlamaConfig::validate`] for the shared fields, plus gemma3's own.
    pub fn validate(&self, path: &Path) -> Result<()> {
        self.as_llama().validate(path)?;
        let bad = |m: String| Err(Error::config(path, m));
        for (name, v) in [
            ("rope_local_base_freq", Some(self.rope_local_base_freq)),
            ("query_pre_attn_scalar", Some(self.query_pre_attn_scalar)),
            ("final_logit_softcapping", self.final_logit_softcapping),
            ("attn_logit_softcapping", self.attn_logit_softcapping),
        ] {
            if let Some(v) = v {
                if !(v.is_finite() && v > 0.0) {
                    return bad(format!(
                        "{name} is {v}; it must be a positive finite number"
                    ));
                }
            }
        }
        if self.sliding_window == 0 || self.sliding_window > crate::untrusted::MAX_CONTEXT {
            return bad(format!(
                "sliding_window is {}; it must be in 1..={}",
                self.sliding_window,
                crate::untrusted::MAX_CONTEXT
            ));
        }
        if self.sliding_window_pattern == 0 {
            return bad("sliding_window_pattern must be at least 1".into());
        }
        if let Some(t) = &self.layer_types {
            if t.len() != self.num_hidden_layers {
                return bad(format!(
                    "layer_types names {} layers; the model has {}",
                    t.len(),
                    self.num_hidden_layers
                ));
            }
            if let Some(s) = t
                .iter()
                .find(|s| *s != "sliding_attention" && *s != "full_attention")
            {
                return bad(format!(
                    "layer type '{}' is not supported (sliding_attention, full_attention)",
                    escape(s)
                ));
            }
        }
        if !matches!(
            self.hidden_activation.as_str(),
            "gelu_pytorch_tanh" | "gelu_tanh"
        ) {
            return bad(format!(
                "hidden_activation '{}' is not supported (gemma3 uses gelu_pytorch_tanh)",
                escape(&self.hidden_activation)
            ));
        }
        Ok(())
    }
}

/// One list of module names for both the shared and the mutable view, so they cannot drift.
macro_rules! linear_list {
    ($s:ident, $iter:ident, $opt:ident, $lin:ident, $($m:tt)?) => {{
        let mut v = vec![("model.embed_tokens".to_string(), &$($m)? $s.embed_tokens)];
        for (i, l) in $s.layers.$iter().enumerate() {
            let p = format!("model.layers.{i}");
            v.push((format!("{p}.self_attn.q_proj"), &$($m)? l.attn.q_proj));
            v.push((format!("{p}.self_attn.k_proj"), &$($m)? l.attn.k_proj));
            v.push((format!("{p}.self_attn.v_proj"), &$($m)? l.attn.v_proj));
            v.push((format!("{p}.self_attn.o_proj"), &$($m)? l.attn.o_proj));
            for (n, x) in l.mlp.$lin() {
                v.push((format!("{p}.mlp.{n}"), x));
            }
        }
        if let Some(h) = $s.lm_head.$opt() {
            v.push(("lm_head".into(), h));
        }
        v
    }};
}

macro_rules! norm_list {
    ($s:ident, $iter:ident, $other:ident, $($m:tt)?) => {{
        let mut v = Vec::new();
        for (i, l) in $s.layers.$iter().enumerate() {
            let p = format!("model.layers.{i}");
            v.push((format!("{p}.input_layernorm.weight"), &$($m)? l.input_layernorm));
            v.push((format!("{p}.self_attn.q_norm.weight"), &$($m)? l.attn.q_norm));
            v.push((format!("{p}.self_attn.k_norm.weight"), &$($m)? l.attn.k_norm));
            v.push((format!("{p}.post_attention_layernorm.weight"), &$($m)? l.post_attention_layernorm));
            v.push((format!("{p}.pre_feedforward_layernorm.weight"), &$($m)? l.pre_feedforward_layernorm));
            v.push((format!("{p}.post_feedforward_layernorm.weight"), &$($m)? l.post_feedforward_layernorm));
            for (n, x) in l.mlp.$other() {
                v.push((format!("{p}.mlp.{n}"), x));
            }
        }
        v.push(("model.norm.weight".into(), &$($m)? $s.norm));
        v
    }};
}

#[derive(Debug)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: Tensor,
    k_norm: Tensor,
    n_heads: usize,
    n_kv: usize,
    head_dim: usize,
    scale: f64,
    /// Keys a query may see, itself included (sliding layers only).
    window: Option<usize>,
    softcap: Option<f64>,
}

/// The gated GELU-tanh feed-forward block.
#[derive(Debug)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

#[derive(Debug)]
struct Layer {
    input_layernorm: Tensor,
    post_attention_layernorm: Tensor,
    pre_feedforward_layernorm: Tensor,
    post_feedforward_layernorm: Tensor,
    attn: Attention,
    mlp: Box<dyn FeedForward>,
}

#[derive(Debug)]
pub struct Gemma3 {
    pub cfg: Gemma3Config,
    /// Token embedding [vocab, hidden] (unscaled, as stored); also the LM head when tied.
    pub embed_tokens: Linear,
    layers: Vec<Layer>,
    pub norm: Tensor,
    /// None when the head is tied to `embed_tokens` (always, for released gemma3 models).
    pub lm_head: Option<Linear>,
    /// RoPE tables of the global layers (rope_theta, rope_scaling) …
    cos: Tensor,
    sin: Tensor,
    /// … and of the sliding layers (rope_local_base_freq, no scaling).
    cos_local: Tensor,
    sin_local: Tensor,
}

fn lin(w: &dyn WeightSource, name: &str, out_f: usize, in_f: usize) -> Result<Linear> {
    w.linear(name, out_f, in_f, Bias::Optional)
}

/// Gemma's RMSNorm: x·rsqrt(mean(x²) + eps)·(1 + w), in f32 like transformers.
fn norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    ops::rms_norm(x, &(w + 1.0)?, eps)
}

fn softcap(x: &Tensor, cap: Option<f64>) -> candle_core::Result<Tensor> {
    match cap {
        Some(c) => (x / c)?.tanh()? * c,
        None => Ok(x.clone()),
    }
}

/// What one forward over `t` new positions after `offset` cached ones needs per layer kind.
struct Masks {
    /// Whether the global / sliding layers take the generic path, and its additive mask.
    global: Option<Option<Tensor>>,
    local: Option<Option<Tensor>>,
}

impl Gemma3 {
    /// Build the decoder in one pass, asking `w` for every tensor and Linear by HF name.
    pub fn new(cfg: Gemma3Config, w: &dyn WeightSource) -> Result<Self> {
        let (h, inter, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim());
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_kv_heads());
        let embed_tokens = lin(w, "model.embed_tokens", cfg.vocab_size, h)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let vec = |n: &str, d: usize| w.tensor(&format!("{p}.{n}.weight"), &[d]);
            layers.push(Layer {
                input_layernorm: vec("input_layernorm", h)?,
                post_attention_layernorm: vec("post_attention_layernorm", h)?,
                pre_feedforward_layernorm: vec("pre_feedforward_layernorm", h)?,
                post_feedforward_layernorm: vec("post_feedforward_layernorm", h)?,
                attn: Attention {
                    q_proj: lin(w, &format!("{p}.self_attn.q_proj"), nh * hd, h)?,
                    k_proj: lin(w, &format!("{p}.self_attn.k_proj"), nkv * hd, h)?,
                    v_proj: lin(w, &format!("{p}.self_attn.v_proj"), nkv * hd, h)?,
                    o_proj: lin(w, &format!("{p}.self_attn.o_proj"), h, nh * hd)?,
                    q_norm: vec("self_attn.q_norm", hd)?,
                    k_norm: vec("self_attn.k_norm", hd)?,
                    n_heads: nh,
                    n_kv: nkv,
                    head_dim: hd,
                    scale: cfg.query_pre_attn_scalar.powf(-0.5),
                    window: cfg.is_sliding(i).then_some(cfg.sliding_window),
                    softcap: cfg.attn_logit_softcapping,
                },
                mlp: Box::new(Mlp {
                    gate_proj: lin(w, &format!("{p}.mlp.gate_proj"), inter, h)?,
                    up_proj: lin(w, &format!("{p}.mlp.up_proj"), inter, h)?,
                    down_proj: lin(w, &format!("{p}.mlp.down_proj"), h, inter)?,
                }),
            });
        }
        let norm = w.tensor("model.norm.weight", &[h])?;
        let lm_head = if cfg.tie_word_embeddings && !w.has_linear("lm_head") {
            None
        } else {
            Some(lin(w, "lm_head", cfg.vocab_size, h)?)
        };
        let dev = Device::Cpu;
        let max_pos = cfg.max_position_embeddings;
        let (cos, sin) =
            rope_tables_for(cfg.rope_theta, cfg.rope_scaling.as_ref(), hd, max_pos, &dev)?;
        let (cos_local, sin_local) =
            rope_tables_for(cfg.rope_local_base_freq, None, hd, max_pos, &dev)?;
        Ok(Gemma3 {
            cfg,
            embed_tokens,
            layers,
            norm,
            lm_head,
            cos,
            sin,
            cos_local,
            sin_local,
        })
    }

    /// Which layers take the generic attention path, with the masks they need. The fused
    /// kernel knows only a causal flag and a per-key mask, so a sliding window that actually
    /// cuts (more than `window` keys) over several queries, or soft-capped scores, go through
    /// the generic path with a full additive mask; a single query (decoding) keeps the fused
    /// kernel over the window's last keys.
    fn masks(
        &self,
        x: &Tensor,
        b: usize,
        t: usize,
        offset: usize,
        key_mask: Option<&Tensor>,
    ) -> Result<Masks> {
        let fused_ok =
            crate::fused::usable(&[x, &self.cos]) && self.cfg.attn_logit_softcapping.is_none();
        let w = self.cfg.sliding_window;
        let cuts = offset + t > w && t > 1;
        let dev = x.device();
        Ok(Masks {
            global: (!fused_ok)
                .then(|| crate::arch::attention_mask(b, t, offset, None, key_mask, dev))
                .transpose()?,
            local: (!fused_ok || cuts)
                .then(|| crate::arch::attention_mask(b, t, offset, Some(w), key_mask, dev))
                .transpose()?,
        })
    }

    /// Decoder layers `range` over `x` at cache positions `offset..`, with each kind's RoPE
    /// tables; `kv` is the whole cache's per-layer slots.
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        mut x: Tensor,
        range: std::ops::Range<usize>,
        offset: usize,
        global: &(Tensor, Tensor),
        local: &(Tensor, Tensor),
        key_mask: Option<&Tensor>,
        mut kv: Option<&mut Vec<Option<KvBuf>>>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let masks = self.masks(&x, b, t, offset, key_mask)?;
        for i in range {
            let layer = &self.layers[i];
            let (tables, generic) = if layer.attn.window.is_some() {
                (local, masks.local.as_ref())
            } else {
                (global, masks.global.as_ref())
            };
            let slot = kv.as_mut().map(|c| &mut c[i]);
            x = self.block(layer, &x, tables, generic, key_mask, slot)?;
        }
        Ok(x)
    }

    /// One decoder layer: norm → attention → norm, residual; norm → MLP → norm, residual.
    fn block(
        &self,
        layer: &Layer,
        x: &Tensor,
        (cos, sin): &(Tensor, Tensor),
        generic: Option<&Option<Tensor>>,
        key_mask: Option<&Tensor>,
        kv: Option<&mut Option<KvBuf>>,
    ) -> Result<Tensor> {
        let eps = self.cfg.rms_norm_eps;
        let h = norm(x, &layer.input_layernorm, eps)?;
        let h = layer
            .attn
            .forward(&h, cos, sin, generic, key_mask, kv, eps)?;
        let x = (x + norm(&h, &layer.post_attention_layernorm, eps)?)?;
        let h = norm(&x, &layer.pre_feedforward_layernorm, eps)?;
        let h = layer.mlp.forward(&h)?;
        Ok((&x + norm(&h, &layer.post_feedforward_layernorm, eps)?)?)
    }
}

impl CausalLm for Gemma3 {
    fn model_type(&self) -> &str {
        &self.cfg.model_type
    }
    fn hidden_size(&self) -> usize {
        self.cfg.hidden_size
    }
    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }
    fn max_positions(&self) -> usize {
        self.cfg.max_position_embeddings
    }
    fn num_layers(&self) -> usize {
        self.layers.len()
    }
    fn summary(&self) -> String {
        let c = &self.cfg;
        let sliding = (0..c.num_hidden_layers)
            .filter(|&i| c.is_sliding(i))
            .count();
        format!(
            "layers {} ({} sliding, window {})  hidden {}  heads {} (kv {})  head_dim {}  ffn {}  vocab {}  ctx {}  tied {}",
            c.num_hidden_layers,
            sliding,
            c.sliding_window,
            c.hidden_size,
            c.num_attention_heads,
            c.num_kv_heads(),
            c.head_dim(),
            c.intermediate_size,
            c.vocab_size,
            c.max_position_embeddings,
            self.lm_head.is_none()
        )
    }

    /// [`Gemma3::forward_hidden`] where row r's tokens sit at RoPE positions `start[r]`, … (see
    /// `Llama::forward_hidden_at`). The sliding window counts cache slots, as transformers'
    /// mask counts cache positions, so padding holes inside a window narrow it.
    fn forward_hidden_at(
        &self,
        ids: &Tensor,
        mut cache: Option<&mut Cache>,
        key_mask: Option<&Tensor>,
        start: Option<&[usize]>,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let offset = cache.as_ref().map_or(0, |c| c.seq_len);
        // Both RoPE tables (global and sliding layers) at the same positions.
        let global = crate::llama::positions(&self.cos, &self.sin, b, t, offset, start)?;
        let local = crate::llama::positions(&self.cos_local, &self.sin_local, b, t, offset, start)?;
        let x = self.embed(ids)?;
        let kv = cache.as_mut().map(|c| &mut c.kv);
        let x = self.run(
            x,
            0..self.layers.len(),
            offset,
            &global,
            &local,
            key_mask,
            kv,
        )?;
        if let Some(c) = cache {
            c.seq_len += t;
        }
        Ok(norm(&x, &self.norm, self.cfg.rms_norm_eps)?)
    }

    /// The token embedding scaled by √hidden (cast to the embedding's dtype, f32 here, as
    /// transformers does).
    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let x =
            self.embed_tokens
                .embed(&ids.flatten_all()?)?
                .reshape((b, t, self.cfg.hidden_size))?;
        Ok((x * (self.cfg.hidden_size as f64).sqrt() as f32 as f64)?)
    }

    /// Residual stream after decoder layers `range` applied to `x` [b, t, hidden] at positions
    /// 0..t, causal, no cache, no final norm (`x` is already the scaled embedding).
    fn forward_layers(&self, x: &Tensor, range: std::ops::Range<usize>) -> Result<Tensor> {
        let (_, t, _) = x.dims3()?;
        if range.end > self.layers.len() || t > self.cfg.max_position_embeddings {
            crate::bail!(
                "layers {range:?} of {} or {t} positions (max {}) out of range",
                self.layers.len(),
                self.cfg.max_position_embeddings
            );
        }
        let global = (self.cos.narrow(0, 0, t)?, self.sin.narrow(0, 0, t)?);
        let local = (
            self.cos_local.narrow(0, 0, t)?,
            self.sin_local.narrow(0, 0, t)?,
        );
        self.run(x.clone(), range, 0, &global, &local, None, None)
    }

    fn head(&self, hidden: &Tensor) -> Result<Tensor> {
        let logits = match &self.lm_head {
            Some(h) => h.forward(hidden)?,
            None => self.embed_tokens.forward(hidden)?,
        };
        Ok(softcap(&logits, self.cfg.final_logit_softcapping)?)
    }

    /// Mean cross-entropy of the head's logits for hidden states [n, d] against targets [n]
    /// (see `Llama::head_loss`; soft-capped logits take head + cross-entropy).
    fn head_loss(&self, hidden: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        if self.cfg.final_logit_softcapping.is_none() {
            if let Some(d) = head.inner().as_any().downcast_ref::<crate::linear::Dense>() {
                if d.bias.is_none() {
                    return Ok(crate::fused::linear_cross_entropy(
                        hidden, &d.weight, targets,
                    )?);
                }
            }
        }
        Ok(crate::fused::cross_entropy(&self.head(hidden)?, targets)?)
    }

    fn linears(&self) -> Vec<(String, &Linear)> {
        linear_list!(self, iter, as_ref, linears,)
    }
    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        linear_list!(self, iter_mut, as_mut, linears_mut, mut)
    }
    /// Norm weights with their HF names (w of x·(1 + w)).
    fn other_tensors(&self) -> Vec<(String, &Tensor)> {
        norm_list!(self, iter, other_tensors,)
    }
    fn other_tensors_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        norm_list!(self, iter_mut, other_tensors_mut, mut)
    }
    fn feed_forwards_mut(&mut self) -> Vec<(String, &mut Box<dyn FeedForward>)> {
        self.layers
            .iter_mut()
            .enumerate()
            .map(|(i, l)| (format!("model.layers.{i}.mlp"), &mut l.mlp))
            .collect()
    }
    fn tied_head(&self) -> bool {
        self.lm_head.is_none()
    }
    fn hf_config(&self) -> Result<serde_json::Value> {
        let mut v =
            serde_json::to_value(&self.cfg).map_err(|e| crate::Error::Msg(e.to_string()))?;
        if let Some(obj) = v.as_object_mut() {
            obj.insert(
                "tie_word_embeddings".into(),
                serde_json::json!(self.lm_head.is_none()),
            );
        }
        Ok(v)
    }
    fn hf_architecture(&self) -> &'static str {
        "Gemma3ForCausalLM"
    }
    fn peft_default_targets(&self) -> &'static [&'static str] {
        &["q_proj", "v_proj"]
    }
    fn end_of_turn_tokens(&self) -> &'static [&'static str] {
        &["<end_of_turn>"]
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

impl Attention {
    /// `generic`: None for the fused path, Some(mask) for the generic one.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        generic: Option<&Option<Tensor>>,
        key_mask: Option<&Tensor>,
        kv: Option<&mut Option<KvBuf>>,
        eps: f64,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.n_heads, self.n_kv, self.head_dim);
        let q = self.q_proj.forward(x)?.reshape((b, t, nh, hd))?;
        let k = self.k_proj.forward(x)?.reshape((b, t, nkv, hd))?;
        let v = self.v_proj.forward(x)?.reshape((b, t, nkv, hd))?;
        let q = norm(&q, &self.q_norm, eps)?;
        let k = norm(&k, &self.k_norm, eps)?;
        let Some(mask) = generic else {
            let q = crate::fused::rope_bthd(&q, cos, sin)?;
            let k = crate::fused::rope_bthd(&k, cos, sin)?;
            let (mut k, mut v) = match kv {
                Some(slot) => KvBuf::append(slot, &k, &v)?,
                None => (k, v),
            };
            let mut pad = match key_mask {
                Some(km) => Some(((km.to_dtype(DType::F32)? - 1.0)? * 1e30)?),
                None => None,
            };
            let total = k.dim(1)?;
            if let Some(w) = self.window.filter(|&w| total > w) {
                // Only reached with one query (see `Gemma3::masks`): its window is the last w
                // keys, which the causal alignment of the fused kernel then sees in full.
                k = k.narrow(1, total - w, w)?;
                v = v.narrow(1, total - w, w)?;
                pad = pad.map(|p| p.narrow(1, total - w, w)).transpose()?;
            }
            let o = crate::fused::attention(&q, &k, &v, t > 1, self.scale, pad.as_ref())?;
            return Ok(self.o_proj.forward(&o.reshape((b, t, nh * hd))?)?);
        };
        let q = ops::rope(&q.transpose(1, 2)?, cos, sin)?;
        let k = ops::rope(&k.transpose(1, 2)?, cos, sin)?;
        let (k, v) = match kv {
            Some(slot) => {
                let (k, v) = KvBuf::append(slot, &k.transpose(1, 2)?, &v)?;
                (k.transpose(1, 2)?, v.transpose(1, 2)?)
            }
            None => (k, v.transpose(1, 2)?),
        };
        let v = v.contiguous()?;
        let total = k.dim(2)?;
        let g = nh / nkv;
        // Query heads sharing a KV head form one matrix: [b, nkv, g·t, hd] · [b, nkv, hd, T].
        let q = q.contiguous()?.reshape((b, nkv, g * t, hd))?;
        let mut s = softcap(&(q.matmul(&k.t()?)? * self.scale)?, self.softcap)?;
        if let Some(m) = mask {
            let s5 = s.reshape((b, nkv, g, t, total))?;
            s = s5
                .broadcast_add(&m.unsqueeze(2)?)?
                .reshape((b, nkv, g * t, total))?;
        }
        let p = ops::softmax_last_dim(&s)?;
        let o = p.matmul(&v)?;
        let o = o
            .reshape((b, nh, t, hd))?
            .transpose(1, 2)?
            .reshape((b, t, nh * hd))?;
        Ok(self.o_proj.forward(&o)?)
    }
}

impl FeedForward for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let g = self.gate_proj.forward(x)?;
        let u = self.up_proj.forward(x)?;
        // candle's gelu is the tanh approximation (transformers' gelu_pytorch_tanh).
        Ok(self.down_proj.forward(&(g.gelu()? * u)?)?)
    }
    fn linears(&self) -> Vec<(String, &Linear)> {
        vec![
            ("gate_proj".into(), &self.gate_proj),
            ("up_proj".into(), &self.up_proj),
            ("down_proj".into(), &self.down_proj),
        ]
    }
    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        vec![
            ("gate_proj".into(), &mut self.gate_proj),
            ("up_proj".into(), &mut self.up_proj),
            ("down_proj".into(), &mut self.down_proj),
        ]
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}
