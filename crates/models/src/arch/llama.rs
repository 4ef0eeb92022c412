//! LLaMA-family decoder (llama, qwen2, mistral): RMSNorm, RoPE (default / linear / llama3
//! scaling), grouped-query attention, SwiGLU MLP, optional q/k/v biases, tied embeddings.
//! Tensor names are HF names (`model.layers.N.self_attn.q_proj.weight`, …).

use crate::arch::{AttnInputs, CausalLm, FeedForward, SelfAttention};
pub use crate::cache::Cache;
use crate::cache::{KvBuf, KvSlot};
use crate::config::LlamaConfig;
use crate::linear::Linear;
use crate::ops;
use crate::source::{Bias, WeightSource};
use crate::Result;
use candle_core::{DType, Device, Tensor};
use std::any::Any;

/// Blocks' Linears under the layers' HF prefixes, for both views so they cannot drift.
macro_rules! linear_list {
    ($s:ident, $iter:ident, $opt:ident, $lin:ident, $($m:tt)?) => {{
        let mut v = vec![("model.embed_tokens".to_string(), &$($m)? $s.embed_tokens)];
        for (i, l) in $s.layers.$iter().enumerate() {
            for (n, x) in l.attn.$lin() {
                v.push((format!("model.layers.{i}.self_attn.{n}"), x));
            }
            for (n, x) in l.mlp.$lin() {
                v.push((format!("model.layers.{i}.mlp.{n}"), x));
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
            v.push((format!("model.layers.{i}.input_layernorm.weight"), &$($m)? l.input_layernorm));
            for (n, x) in l.attn.$other() {
                v.push((format!("model.layers.{i}.self_attn.{n}"), x));
            }
            v.push((format!("model.layers.{i}.post_attention_layernorm.weight"), &$($m)? l.post_attention_layernorm));
            for (n, x) in l.mlp.$other() {
                v.push((format!("model.layers.{i}.mlp.{n}"), x));
            }
        }
        v.push(("model.norm.weight".into(), &$($m)? $s.norm));
        v
    }};
}

/// Grouped-query attention with RoPE and optional q/k/v biases.
#[derive(Debug)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub n_heads: usize,
    pub n_kv: usize,
    pub head_dim: usize,
}

/// The SwiGLU feed-forward block.
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
    attn: Box<dyn SelfAttention>,
    mlp: Box<dyn FeedForward>,
}

#[derive(Debug)]
pub struct Llama {
    pub cfg: LlamaConfig,
    /// Token embedding [vocab, hidden]; also the LM head when tied.
    pub embed_tokens: Linear,
    layers: Vec<Layer>,
    pub norm: Tensor,
    /// None when the head is tied to `embed_tokens`.
    pub lm_head: Option<Linear>,
    cos: Tensor,
    sin: Tensor,
}

/// cos/sin tables [max_pos, head_dim/2] with the configured frequency scaling.
fn rope_tables(cfg: &LlamaConfig, dev: &Device) -> Result<(Tensor, Tensor)> {
    rope_tables_for(
        cfg.rope_theta,
        cfg.rope_scaling.as_ref(),
        cfg.head_dim(),
        cfg.max_position_embeddings,
        dev,
    )
}

/// [`rope_tables`] from the parts (gemma3 builds one table per base frequency).
pub(crate) fn rope_tables_for(
    theta: f64,
    scaling: Option<&crate::config::RopeScaling>,
    hd: usize,
    max_pos: usize,
    dev: &Device,
) -> Result<(Tensor, Tensor)> {
    let mut inv: Vec<f64> = (0..hd / 2)
        .map(|i| 1.0 / theta.powf(2.0 * i as f64 / hd as f64))
        .collect();
    if let Some(rs) = scaling {
        let factor = rs.factor.unwrap_or(1.0);
        match rs.rope_type.as_deref().unwrap_or("default") {
            "linear" => inv.iter_mut().for_each(|f| *f /= factor),
            "llama3" => {
                // Same piecewise rule as transformers' _compute_llama3_parameters.
                let low = rs.low_freq_factor.unwrap_or(1.0);
                let high = rs.high_freq_factor.unwrap_or(4.0);
                let old = rs.original_max_position_embeddings.unwrap_or(8192) as f64;
                let low_wl = old / low;
                let high_wl = old / high;
                for f in inv.iter_mut() {
                    let wl = 2.0 * std::f64::consts::PI / *f;
                    if wl > low_wl {
                        *f /= factor;
                    } else if wl >= high_wl {
                        let smooth = (old / wl - low) / (high - low);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
            _ => {}
        }
    }
    let n = max_pos.max(1);
    let mut cos = Vec::with_capacity(n * hd / 2);
    let mut sin = Vec::with_capacity(n * hd / 2);
    for p in 0..n {
        for f in &inv {
            // f32 angle like transformers (positions·inv_freq in float32).
            let a = (p as f32) * (*f as f32);
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    Ok((
        Tensor::from_vec(cos, (n, hd / 2), dev)?,
        Tensor::from_vec(sin, (n, hd / 2), dev)?,
    ))
}

impl Llama {
    /// Build the decoder in one pass, asking `w` for every tensor and Linear by HF name.
    pub fn new(cfg: LlamaConfig, w: &dyn WeightSource) -> Result<Self> {
        let (h, inter, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim());
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_kv_heads());
        let qkv = if cfg.qkv_bias() {
            Bias::Required
        } else {
            Bias::Optional
        };
        let mlp_bias = if cfg.mlp_bias {
            Bias::Required
        } else {
            Bias::Optional
        };
        let embed_tokens = w.linear("model.embed_tokens", cfg.vocab_size, h, Bias::Optional)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let a = format!("{p}.self_attn");
            let f = format!("{p}.mlp");
            let attn = Attention {
                q_proj: w.linear(&format!("{a}.q_proj"), nh * hd, h, qkv)?,
                k_proj: w.linear(&format!("{a}.k_proj"), nkv * hd, h, qkv)?,
                v_proj: w.linear(&format!("{a}.v_proj"), nkv * hd, h, qkv)?,
                o_proj: w.linear(&format!("{a}.o_proj"), h, nh * hd, Bias::Optional)?,
                n_heads: nh,
                n_kv: nkv,
                head_dim: hd,
            };
            let mlp = Mlp {
                gate_proj: w.linear(&format!("{f}.gate_proj"), inter, h, mlp_bias)?,
                up_proj: w.linear(&format!("{f}.up_proj"), inter, h, mlp_bias)?,
                down_proj: w.linear(&format!("{f}.down_proj"), h, inter, mlp_bias)?,
            };
            layers.push(Layer {
                input_layernorm: w.tensor(&format!("{p}.input_layernorm.weight"), &[h])?,
                post_attention_layernorm: w
                    .tensor(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                attn: Box::new(attn),
                mlp: Box::new(mlp),
            });
        }
        let norm = w.tensor("model.norm.weight", &[h])?;
        let lm_head = if cfg.tie_word_embeddings && !w.has_linear("lm_head") {
            None
        } else {
            Some(w.linear("lm_head", cfg.vocab_size, h, Bias::Optional)?)
        };
        let (cos, sin) = rope_tables(&cfg, &Device::Cpu)?;
        Ok(Llama {
            cfg,
            embed_tokens,
            layers,
            norm,
            lm_head,
            cos,
            sin,
        })
    }

    /// One decoder layer: pre-norm attention and MLP, each with its residual.
    fn block(
        &self,
        layer: &Layer,
        x: &Tensor,
        at: &AttnInputs,
        kv: Option<&mut KvSlot>,
    ) -> Result<Tensor> {
        let h = ops::rms_norm(x, &layer.input_layernorm, self.cfg.rms_norm_eps)?;
        let x = (x + layer.attn.forward(&h, at, kv)?)?;
        let h = ops::rms_norm(&x, &layer.post_attention_layernorm, self.cfg.rms_norm_eps)?;
        Ok((&x + layer.mlp.forward(&h)?)?)
    }
}

impl CausalLm for Llama {
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
        format!(
            "layers {}  hidden {}  heads {} (kv {})  head_dim {}  ffn {}  vocab {}  ctx {}  tied {}",
            c.num_hidden_layers,
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

    fn forward_hidden_at(
        &self,
        ids: &Tensor,
        mut cache: Option<&mut Cache>,
        key_mask: Option<&Tensor>,
        start: Option<&[usize]>,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let offset = cache.as_ref().map_or(0, |c| c.seq_len);
        let (cos, sin) = positions(&self.cos, &self.sin, b, t, offset, start)?;
        let mut x = self.embed(ids)?;
        let mask = generic_attention_mask(&[&x, &cos, &sin], b, t, offset, key_mask)?;
        let at = AttnInputs {
            cos: &cos,
            sin: &sin,
            mask: mask.as_ref(),
            key_mask,
        };
        for (i, layer) in self.layers.iter().enumerate() {
            let kv = cache.as_mut().map(|c| &mut c.kv[i]);
            x = self.block(layer, &x, &at, kv)?;
        }
        if let Some(c) = cache {
            c.seq_len += t;
        }
        Ok(ops::rms_norm(&x, &self.norm, self.cfg.rms_norm_eps)?)
    }

    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        Ok(self
            .embed_tokens
            .embed(&ids.flatten_all()?)?
            .reshape((b, t, self.cfg.hidden_size))?)
    }

    fn forward_layers(&self, x: &Tensor, range: std::ops::Range<usize>) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        if range.end > self.layers.len() || t > self.cfg.max_position_embeddings {
            crate::bail!(
                "layers {range:?} of {} or {t} positions (max {}) out of range",
                self.layers.len(),
                self.cfg.max_position_embeddings
            );
        }
        let cos = self.cos.narrow(0, 0, t)?;
        let sin = self.sin.narrow(0, 0, t)?;
        let mask = generic_attention_mask(&[x, &cos, &sin], b, t, 0, None)?;
        let at = AttnInputs {
            cos: &cos,
            sin: &sin,
            mask: mask.as_ref(),
            key_mask: None,
        };
        let mut x = x.clone();
        for layer in &self.layers[range] {
            x = self.block(layer, &x, &at, None)?;
        }
        Ok(x)
    }

    fn head(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(match &self.lm_head {
            Some(h) => h.forward(hidden)?,
            None => self.embed_tokens.forward(hidden)?,
        })
    }

    /// A plain dense head (tied or not, no bias) goes through `fused::linear_cross_entropy`,
    /// which never holds the [n, vocab] logits: a frozen head (LoRA, MPO tuning) then costs
    /// chunk-sized buffers instead of the logits, their gradient and candle's accumulation
    /// of it. Other heads (trained, quantized, MPO, adapters) take head + cross-entropy.
    fn head_loss(&self, hidden: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        dense_head_loss(head, hidden, targets)
    }

    fn linears(&self) -> Vec<(String, &Linear)> {
        linear_list!(self, iter, as_ref, linears,)
    }
    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        linear_list!(self, iter_mut, as_mut, linears_mut, mut)
    }
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
    fn feed_forwards(&self) -> Vec<(String, &dyn FeedForward)> {
        self.layers
            .iter()
            .enumerate()
            .map(|(i, l)| (format!("model.layers.{i}.mlp"), l.mlp.as_ref()))
            .collect()
    }
    fn attentions_mut(&mut self) -> Vec<(String, &mut Box<dyn SelfAttention>)> {
        self.layers
            .iter_mut()
            .enumerate()
            .map(|(i, l)| (format!("model.layers.{i}.self_attn"), &mut l.attn))
            .collect()
    }
    fn tied_head(&self) -> bool {
        self.lm_head.is_none()
    }
    fn hf_config(&self) -> Result<serde_json::Value> {
        use serde_json::json;
        let mut v =
            serde_json::to_value(&self.cfg).map_err(|e| crate::Error::Msg(e.to_string()))?;
        if let Some(obj) = v.as_object_mut() {
            obj.insert("tie_word_embeddings".into(), json!(self.lm_head.is_none()));
            obj.insert("head_dim".into(), json!(self.cfg.head_dim()));
            obj.insert("num_key_value_heads".into(), json!(self.cfg.num_kv_heads()));
            obj.insert("attention_bias".into(), json!(self.cfg.qkv_bias()));
            if obj.get("rope_scaling").is_some_and(|r| r.is_null()) {
                obj.remove("rope_scaling");
            }
        }
        Ok(v)
    }
    fn hf_architecture(&self) -> &'static str {
        if self.cfg.model_type == "qwen2" {
            "Qwen2ForCausalLM"
        } else {
            "LlamaForCausalLM"
        }
    }
    fn peft_default_targets(&self) -> &'static [&'static str] {
        &["q_proj", "v_proj"]
    }
    fn end_of_turn_tokens(&self) -> &'static [&'static str] {
        // ChatML (SmolLM2, Qwen2), Llama 3 and Phi-style turn ends, and GPT-style document ends.
        &["<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>"]
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// Cross-entropy of a head without the [n, vocab] logits when the head is plain dense.
pub(crate) fn dense_head_loss(head: &Linear, hidden: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if let Some(d) = head.inner().as_any().downcast_ref::<crate::linear::Dense>() {
        if d.bias.is_none() {
            return Ok(crate::fused::linear_cross_entropy(
                hidden, &d.weight, targets,
            )?);
        }
    }
    Ok(crate::fused::cross_entropy(
        &head.forward(hidden)?,
        targets,
    )?)
}

/// The cos/sin rows of positions `offset..offset + t` (or row r's `start[r]..start[r] + t`).
pub(crate) fn positions(
    cos: &Tensor,
    sin: &Tensor,
    b: usize,
    t: usize,
    offset: usize,
    start: Option<&[usize]>,
) -> Result<(Tensor, Tensor)> {
    let max = cos.dim(0)?;
    let last = match start {
        Some(s) if s.len() != b => {
            crate::bail!("{} start positions for a batch of {b} rows", s.len())
        }
        Some(s) => s.iter().max().copied().unwrap_or(0),
        None => offset,
    };
    if last + t > max {
        crate::bail!(
            "sequence of {} tokens exceeds the model's max_position_embeddings {max}",
            last + t
        );
    }
    Ok(match start {
        None => (cos.narrow(0, offset, t)?, sin.narrow(0, offset, t)?),
        Some(s) => {
            let pos: Vec<u32> = s
                .iter()
                .flat_map(|&p| (p..p + t).map(|q| q as u32))
                .collect();
            let idx = Tensor::new(pos, &Device::Cpu)?;
            let half = cos.dim(1)?;
            (
                cos.index_select(&idx, 0)?.reshape((b, t, half))?,
                sin.index_select(&idx, 0)?.reshape((b, t, half))?,
            )
        }
    })
}

/// The additive mask only the generic attention path reads (the fused kernels take the causal
/// flag and the key mask themselves), so f32 CPU forwards do not build a t×T mask per call.
fn generic_attention_mask(
    inputs: &[&Tensor],
    b: usize,
    t: usize,
    offset: usize,
    key_mask: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    if crate::fused::usable(inputs) {
        return Ok(None);
    }
    crate::arch::attention_mask(b, t, offset, None, key_mask, inputs[0].device())
}

impl SelfAttention for Attention {
    fn forward(&self, x: &Tensor, at: &AttnInputs, kv: Option<&mut KvSlot>) -> Result<Tensor> {
        let (cos, sin, mask, key_mask) = (at.cos, at.sin, at.mask, at.key_mask);
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.n_heads, self.n_kv, self.head_dim);
        let scale = 1.0 / (hd as f64).sqrt();
        let q = self.q_proj.forward(x)?.reshape((b, t, nh, hd))?;
        let k = self.k_proj.forward(x)?.reshape((b, t, nkv, hd))?;
        let v = self.v_proj.forward(x)?.reshape((b, t, nkv, hd))?;
        if crate::fused::usable(&[x, cos, sin]) {
            // Heads stay in [b, t, h, hd]; RoPE and attention are fused kernels (with their own
            // backward when training). With a cache, the queries are positions T − t … T − 1
            // of the T cached keys, which is how the fused kernel aligns its causal mask.
            let q = crate::fused::rope_bthd(&q, cos, sin)?;
            let k = crate::fused::rope_bthd(&k, cos, sin)?;
            let (k, v) = match kv {
                Some(slot) => KvBuf::append(slot, &k, &v)?,
                None => (k, v),
            };
            let pad = match key_mask {
                // 1 → 0, 0 → a large negative (fully masked rows stay finite), as below.
                Some(km) => Some(((km.to_dtype(DType::F32)? - 1.0)? * 1e30)?),
                None => None,
            };
            let o = crate::fused::attention(&q, &k, &v, t > 1, scale, pad.as_ref())?;
            return Ok(self.o_proj.forward(&o.reshape((b, t, nh * hd))?)?);
        }
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
        // Group the query heads that share a KV head into one matrix so GQA needs no
        // repeated K/V copies: [b, nkv, g·t, hd] · [b, nkv, hd, T].
        let q = q.contiguous()?.reshape((b, nkv, g * t, hd))?;
        let mut s = (q.matmul(&k.t()?)? * scale)?;
        if let Some(m) = mask {
            let s5 = s.reshape((b, nkv, g, t, total))?;
            let m5 = m.unsqueeze(2)?; // [b|1, 1, 1, t, T]
            s = s5.broadcast_add(&m5)?.reshape((b, nkv, g * t, total))?;
        }
        let p = ops::softmax_last_dim(&s)?;
        let o = p.matmul(&v)?; // [b, nkv, g·t, hd]
        let o = o
            .reshape((b, nh, t, hd))?
            .transpose(1, 2)?
            .reshape((b, t, nh * hd))?;
        Ok(self.o_proj.forward(&o)?)
    }
    fn linears(&self) -> Vec<(String, &Linear)> {
        vec![
            ("q_proj".into(), &self.q_proj),
            ("k_proj".into(), &self.k_proj),
            ("v_proj".into(), &self.v_proj),
            ("o_proj".into(), &self.o_proj),
        ]
    }
    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        vec![
            ("q_proj".into(), &mut self.q_proj),
            ("k_proj".into(), &mut self.k_proj),
            ("v_proj".into(), &mut self.v_proj),
            ("o_proj".into(), &mut self.o_proj),
        ]
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl FeedForward for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let g = self.gate_proj.forward(x)?;
        let u = self.up_proj.forward(x)?;
        if crate::fused::usable(&[&g, &u]) {
            return Ok(self.down_proj.forward(&crate::fused::silu_mul(&g, &u)?)?);
        }
        Ok(self.down_proj.forward(&(g.silu()? * u)?)?)
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
