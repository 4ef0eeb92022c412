//! LLaMA-family decoder (llama, qwen2, mistral): RMSNorm, RoPE (default / linear / llama3
//! scaling), grouped-query attention, SwiGLU MLP, optional q/k/v biases, tied embeddings.
//! Tensor names are HF names (`model.layers.N.self_attn.q_proj.weight`, …).

use crate::config::LlamaConfig;
use crate::linear::Linear;
use crate::ops;
use crate::weights::Weights;
use crate::Result;
use candle_core::{DType, Device, Tensor};

/// One list of module names for both the shared and the mutable view, so they cannot drift.
macro_rules! linear_list {
    ($s:ident, $iter:ident, $opt:ident, $($m:tt)?) => {{
        let mut v = vec![("model.embed_tokens".to_string(), &$($m)? $s.embed_tokens)];
        for (i, l) in $s.layers.$iter().enumerate() {
            let p = format!("model.layers.{i}");
            v.push((format!("{p}.self_attn.q_proj"), &$($m)? l.attn.q_proj));
            v.push((format!("{p}.self_attn.k_proj"), &$($m)? l.attn.k_proj));
            v.push((format!("{p}.self_attn.v_proj"), &$($m)? l.attn.v_proj));
            v.push((format!("{p}.self_attn.o_proj"), &$($m)? l.attn.o_proj));
            v.push((format!("{p}.mlp.gate_proj"), &$($m)? l.mlp.gate_proj));
            v.push((format!("{p}.mlp.up_proj"), &$($m)? l.mlp.up_proj));
            v.push((format!("{p}.mlp.down_proj"), &$($m)? l.mlp.down_proj));
        }
        if let Some(h) = $s.lm_head.$opt() {
            v.push(("lm_head".into(), h));
        }
        v
    }};
}

macro_rules! norm_list {
    ($s:ident, $iter:ident, $($m:tt)?) => {{
        let mut v = Vec::new();
        for (i, l) in $s.layers.$iter().enumerate() {
            v.push((format!("model.layers.{i}.input_layernorm.weight"), &$($m)? l.input_layernorm));
            v.push((format!("model.layers.{i}.post_attention_layernorm.weight"), &$($m)? l.post_attention_layernorm));
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
    n_heads: usize,
    n_kv: usize,
    head_dim: usize,
}

#[derive(Debug)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

#[derive(Debug)]
struct Layer {
    input_layernorm: Tensor,
    post_attention_layernorm: Tensor,
    attn: Attention,
    mlp: Mlp,
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

/// Per-layer key/value cache for incremental decoding.
#[derive(Debug, Clone)]
pub struct Cache {
    pub(crate) kv: Vec<Option<KvBuf>>,
    pub seq_len: usize,
}

/// One layer's keys and values, [b, capacity, kv_heads, head_dim] with the first `len`
/// positions filled: a decode step writes its position in place instead of concatenating the
/// whole cache into a new tensor, and for b = 1 the filled part is a contiguous prefix that the
/// fused attention reads without a copy. Capacity doubles when full.
#[derive(Debug)]
pub(crate) struct KvBuf {
    k: Tensor,
    v: Tensor,
    len: usize,
}

impl Clone for KvBuf {
    // Appends write into the buffers, so clones (a shared few-shot prefix extended per choice)
    // must not share them.
    fn clone(&self) -> Self {
        self.resized(self.k.dims()[1]).expect("copy a KV cache")
    }
}

impl KvBuf {
    /// New buffers of `cap` (≥ len) positions holding this one's filled prefix.
    fn resized(&self, cap: usize) -> Result<KvBuf> {
        let (b, _, nkv, hd) = self.k.dims4()?;
        let copy = |t: &Tensor| -> Result<Tensor> {
            let c = Tensor::zeros((b, cap, nkv, hd), t.dtype(), t.device())?;
            if self.len > 0 {
                c.slice_set(&t.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
            }
            Ok(c)
        };
        Ok(KvBuf {
            k: copy(&self.k)?,
            v: copy(&self.v)?,
            len: self.len,
        })
    }

    /// Append k/v [b, t, kv_heads, hd] and return all filled positions [b, len, kv_heads, hd].
    pub(crate) fn append(
        slot: &mut Option<KvBuf>,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (b, t, nkv, hd) = k.dims4()?;
        let len = slot.as_ref().map_or(0, |s| s.len);
        let need = len + t;
        let cap = need.next_power_of_two().max(64);
        match slot {
            None => {
                *slot = Some(KvBuf {
                    k: Tensor::zeros((b, cap, nkv, hd), k.dtype(), k.device())?,
                    v: Tensor::zeros((b, cap, nkv, hd), v.dtype(), v.device())?,
                    len: 0,
                })
            }
            Some(s) if s.k.dim(1)? < need => *s = s.resized(cap)?,
            Some(_) => {}
        }
        let s = slot.as_mut().expect("allocated above");
        s.k.slice_set(&k.contiguous()?, 1, len)?;
        s.v.slice_set(&v.contiguous()?, 1, len)?;
        s.len = need;
        Ok((s.k.narrow(1, 0, need)?, s.v.narrow(1, 0, need)?))
    }
}

impl Cache {
    pub fn new(n_layers: usize) -> Self {
        Cache {
            kv: vec![None; n_layers],
            seq_len: 0,
        }
    }

    /// Batch rows of the cache (every layer's buffers).
    pub fn rows(&self) -> usize {
        self.kv.iter().flatten().next().map_or(0, |s| s.k.dims()[0])
    }

    /// A cache of `b` rows, each a copy of this single-row cache: a shared prompt prefix run
    /// once, then extended by `b` different continuations.
    pub fn repeat(&self, b: usize) -> Result<Cache> {
        self.map(|t| {
            let (rows, cap, nkv, hd) = t.dims4()?;
            if rows != 1 {
                crate::bail!("only a single-row cache can be repeated");
            }
            Ok(t.broadcast_as((b, cap, nkv, hd))?.contiguous()?)
        })
    }

    /// The cache of the batch rows `rows`, in that order (drops finished generations from a
    /// batch).
    pub fn select_rows(&self, rows: &[u32]) -> Result<Cache> {
        let idx = Tensor::new(rows, &Device::Cpu)?;
        self.map(|t| Ok(t.index_select(&idx, 0)?))
    }

    /// Overwrite positions `from .. from + len` of batch row `row` with those of the
    /// single-row cache `src`, in place (a new request joining a decoding batch in a freed row).
    pub fn write_row(&mut self, row: usize, src: &Cache, from: usize, len: usize) -> Result<()> {
        if src.kv.len() != self.kv.len() || src.seq_len < from + len || self.seq_len < from + len {
            crate::bail!(
                "write_row: positions {from}..{} do not fit both caches",
                from + len
            );
        }
        for (d, s) in self.kv.iter().zip(&src.kv) {
            let (Some(d), Some(s)) = (d, s) else {
                crate::bail!("write_row: a layer has no cache yet");
            };
            for (dt, st) in [(&d.k, &s.k), (&d.v, &s.v)] {
                let (b, cap, nkv, hd) = dt.dims4()?;
                if row >= b || st.dim(0)? != 1 || !dt.is_contiguous() {
                    crate::bail!("write_row: row {row} of a {b}-row cache from a 1-row one");
                }
                let block = st.narrow(1, from, len)?.contiguous()?.flatten_all()?;
                // A contiguous tensor's flat view shares its storage, so this writes in place.
                dt.flatten_all()?
                    .slice_set(&block, 0, (row * cap + from) * nkv * hd)?;
            }
        }
        Ok(())
    }

    fn map(&self, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Cache> {
        let mut kv = Vec::with_capacity(self.kv.len());
        for s in &self.kv {
            kv.push(match s {
                Some(s) => Some(KvBuf {
                    k: f(&s.k)?,
                    v: f(&s.v)?,
                    len: s.len,
                }),
                None => None,
            });
        }
        Ok(Cache {
            kv,
            seq_len: self.seq_len,
        })
    }
}

fn lin(w: &Weights, name: &str, out_f: usize, in_f: usize, bias: bool) -> Result<Linear> {
    let weight = w.get(&format!("{name}.weight"), &[out_f, in_f])?;
    let b = if bias {
        Some(w.get(&format!("{name}.bias"), &[out_f])?)
    } else {
        w.get_opt(&format!("{name}.bias"), &[out_f])?
    };
    Ok(Linear::dense(weight, b))
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
    pub fn new(cfg: LlamaConfig, w: &Weights) -> Result<Self> {
        let (h, inter, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim());
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_kv_heads());
        let bias = cfg.qkv_bias();
        let embed = w.get("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            layers.push(Layer {
                input_layernorm: w.get(&format!("{p}.input_layernorm.weight"), &[h])?,
                post_attention_layernorm: w
                    .get(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                attn: Attention {
                    q_proj: lin(w, &format!("{p}.self_attn.q_proj"), nh * hd, h, bias)?,
                    k_proj: lin(w, &format!("{p}.self_attn.k_proj"), nkv * hd, h, bias)?,
                    v_proj: lin(w, &format!("{p}.self_attn.v_proj"), nkv * hd, h, bias)?,
                    o_proj: lin(w, &format!("{p}.self_attn.o_proj"), h, nh * hd, false)?,
                    n_heads: nh,
                    n_kv: nkv,
                    head_dim: hd,
                },
                mlp: Mlp {
                    gate_proj: lin(w, &format!("{p}.mlp.gate_proj"), inter, h, cfg.mlp_bias)?,
                    up_proj: lin(w, &format!("{p}.mlp.up_proj"), inter, h, cfg.mlp_bias)?,
                    down_proj: lin(w, &format!("{p}.mlp.down_proj"), h, inter, cfg.mlp_bias)?,
                },
            });
        }
        let norm = w.get("model.norm.weight", &[h])?;
        let lm_head = if cfg.tie_word_embeddings && !w.contains("lm_head.weight") {
            None
        } else {
            Some(lin(w, "lm_head", cfg.vocab_size, h, false)?)
        };
        let (cos, sin) = rope_tables(&cfg, &Device::Cpu)?;
        Ok(Llama {
            cfg,
            embed_tokens: Linear::dense(embed, None),
            layers,
            norm,
            lm_head,
            cos,
            sin,
        })
    }

    pub fn new_cache(&self) -> Cache {
        Cache::new(self.layers.len())
    }

    /// Every swappable Linear with its HF module name; the embedding is included as
    /// `model.embed_tokens` (and doubles as the head when tied).
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        linear_list!(self, iter_mut, as_mut, mut)
    }

    pub fn linears(&self) -> Vec<(String, &Linear)> {
        linear_list!(self, iter, as_ref,)
    }

    /// Norm weights with their HF names (for parameter counts, exports and training).
    pub fn norms(&self) -> Vec<(String, &Tensor)> {
        norm_list!(self, iter,)
    }

    pub fn norms_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        norm_list!(self, iter_mut, mut)
    }

    /// Final hidden states [b, t, hidden] (after the last norm). `key_mask` [b, T] (1 = keep,
    /// 0 = padding) covers cached plus new positions and is only needed for padded batches.
    pub fn forward_hidden(
        &self,
        ids: &Tensor,
        cache: Option<&mut Cache>,
        key_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.forward_hidden_at(ids, cache, key_mask, None)
    }

    /// [`Llama::forward_hidden`] where row r's tokens sit at RoPE positions `start[r]`,
    /// `start[r] + 1`, …, whatever its place in the cache: a batch of generations whose prompts
    /// differ in length shares one cache with padding holes (hidden by `key_mask`) and still
    /// gives every row the positions it would have alone. None: positions follow the cache.
    pub fn forward_hidden_at(
        &self,
        ids: &Tensor,
        mut cache: Option<&mut Cache>,
        key_mask: Option<&Tensor>,
        start: Option<&[usize]>,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let offset = cache.as_ref().map_or(0, |c| c.seq_len);
        let last = match start {
            Some(s) if s.len() != b => {
                crate::bail!("{} start positions for a batch of {b} rows", s.len())
            }
            Some(s) => s.iter().max().copied().unwrap_or(0),
            None => offset,
        };
        if last + t > self.cfg.max_position_embeddings {
            crate::bail!(
                "sequence of {} tokens exceeds the model's max_position_embeddings {}",
                last + t,
                self.cfg.max_position_embeddings
            );
        }
        let mut x =
            self.embed_tokens
                .embed(&ids.flatten_all()?)?
                .reshape((b, t, self.cfg.hidden_size))?;
        let (cos, sin) = match start {
            None => (
                self.cos.narrow(0, offset, t)?,
                self.sin.narrow(0, offset, t)?,
            ),
            Some(s) => {
                let pos: Vec<u32> = s
                    .iter()
                    .flat_map(|&p| (p..p + t).map(|q| q as u32))
                    .collect();
                let idx = Tensor::new(pos, &Device::Cpu)?;
                let half = self.cos.dim(1)?;
                (
                    self.cos.index_select(&idx, 0)?.reshape((b, t, half))?,
                    self.sin.index_select(&idx, 0)?.reshape((b, t, half))?,
                )
            }
        };
        let mask = generic_attention_mask(&[&x, &cos, &sin], b, t, offset, key_mask)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let kv = cache.as_mut().map(|c| &mut c.kv[i]);
            x = self.block(layer, &x, &cos, &sin, mask.as_ref(), key_mask, kv)?;
        }
        if let Some(c) = cache {
            c.seq_len += t;
        }
        Ok(ops::rms_norm(&x, &self.norm, self.cfg.rms_norm_eps)?)
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// One decoder layer: pre-norm attention and MLP, each with its residual.
    #[allow(clippy::too_many_arguments)]
    fn block(
        &self,
        layer: &Layer,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        key_mask: Option<&Tensor>,
        kv: Option<&mut Option<KvBuf>>,
    ) -> Result<Tensor> {
        let h = ops::rms_norm(x, &layer.input_layernorm, self.cfg.rms_norm_eps)?;
        let x = (x + layer.attn.forward(&h, cos, sin, mask, key_mask, kv)?)?;
        let h = ops::rms_norm(&x, &layer.post_attention_layernorm, self.cfg.rms_norm_eps)?;
        Ok((&x + layer.mlp.forward(&h)?)?)
    }

    /// Residual stream after decoder layers `range` applied to `x` [b, t, hidden] at positions
    /// 0..t, causal, no cache, no final norm. Layer-wise drivers (GPTQ calibration) use it to
    /// run one layer on cached inputs instead of re-running the whole prefix.
    pub fn forward_layers(&self, x: &Tensor, range: std::ops::Range<usize>) -> Result<Tensor> {
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
        let mut x = x.clone();
        for layer in &self.layers[range] {
            x = self.block(layer, &x, &cos, &sin, mask.as_ref(), None, None)?;
        }
        Ok(x)
    }

    pub fn head(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(match &self.lm_head {
            Some(h) => h.forward(hidden)?,
            None => self.embed_tokens.forward(hidden)?,
        })
    }

    /// Mean cross-entropy of the head's logits for hidden states [n, d] against targets [n].
    /// A plain dense head (tied or not, no bias) goes through `fused::linear_cross_entropy`,
    /// which never holds the [n, vocab] logits: a frozen head (LoRA, MPO tuning) then costs
    /// chunk-sized buffers instead of the logits, their gradient and candle's accumulation
    /// of it. Other heads (trained, quantized, MPO, adapters) take head + cross-entropy.
    pub fn head_loss(&self, hidden: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        if let Some(d) = head.inner().as_any().downcast_ref::<crate::linear::Dense>() {
            if d.bias.is_none() {
                return Ok(crate::fused::linear_cross_entropy(
                    hidden, &d.weight, targets,
                )?);
            }
        }
        Ok(crate::fused::cross_entropy(&self.head(hidden)?, targets)?)
    }

    /// Logits for every position [b, t, vocab].
    pub fn forward(&self, ids: &Tensor, cache: Option<&mut Cache>) -> Result<Tensor> {
        let h = self.forward_hidden(ids, cache, None)?;
        self.head(&h)
    }

    /// Logits of the last position only [b, vocab]: what decoding needs, without the
    /// vocab-sized GEMM over the whole prompt.
    pub fn forward_last(&self, ids: &Tensor, cache: Option<&mut Cache>) -> Result<Tensor> {
        let h = self.forward_hidden(ids, cache, None)?;
        let t = h.dim(1)?;
        let last = h.narrow(1, t - 1, 1)?.squeeze(1)?;
        self.head(&last)
    }
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
    attention_mask(b, t, offset, key_mask, inputs[0].device())
}

/// Additive mask [b or 1, 1, t, T]: causal over the new positions plus optional key padding.
fn attention_mask(
    b: usize,
    t: usize,
    offset: usize,
    key_mask: Option<&Tensor>,
    dev: &Device,
) -> Result<Option<Tensor>> {
    let total = offset + t;
    let causal = if t > 1 {
        let m: Vec<f32> = (0..t)
            .flat_map(|i| {
                (0..total).map(move |j| {
                    if j > i + offset {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
            })
            .collect();
        Some(Tensor::from_vec(m, (1, 1, t, total), dev)?)
    } else {
        None
    };
    let pad = match key_mask {
        Some(km) => {
            let km = km.to_dtype(DType::F32)?;
            // 1 → 0, 0 → -inf (as a large negative so fully masked rows stay finite).
            Some(((km - 1.0)? * 1e30)?.reshape((b, 1, 1, total))?)
        }
        None => None,
    };
    Ok(match (causal, pad) {
        (Some(c), Some(p)) => Some(c.broadcast_add(&p)?),
        (Some(c), None) => Some(c),
        (None, Some(p)) => Some(p),
        (None, None) => None,
    })
}

impl Attention {
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        key_mask: Option<&Tensor>,
        kv: Option<&mut Option<KvBuf>>,
    ) -> Result<Tensor> {
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
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let g = self.gate_proj.forward(x)?;
        let u = self.up_proj.forward(x)?;
        if crate::fused::usable(&[&g, &u]) {
            return self.down_proj.forward(&crate::fused::silu_mul(&g, &u)?);
        }
        self.down_proj.forward(&(g.silu()? * u)?)
    }
}
