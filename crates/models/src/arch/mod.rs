//! What every architecture offers the rest of mpolm. Eval, calibration, fine-tuning, generation
//! and export work through these traits, so a new architecture is one file implementing them
//! plus a line in [`crate::model`]'s registry; nothing else matches on the architecture.
//!
//! The blocks inside a layer are pluggable the way [`Linear`] is: a decoder layer holds a
//! `Box<dyn FeedForward>` and a `Box<dyn SelfAttention>`, so a method can replace a dense FFN
//! by a mixture of experts without touching the architecture file.

pub mod bert;
pub mod cache;
pub mod gemma3;
pub mod llama;

use crate::cache::{Cache, KvSlot};
use crate::linear::Linear;
use crate::Result;
use candle_core::Tensor;
use std::any::Any;

/// A decoder-only language model.
pub trait CausalLm: std::fmt::Debug + Send + Sync {
    /// `model_type` as in config.json (`llama`, `qwen2`, `gemma3`).
    fn model_type(&self) -> &str;
    fn hidden_size(&self) -> usize;
    fn vocab_size(&self) -> usize;
    /// Longest sequence the position tables cover.
    fn max_positions(&self) -> usize;
    fn num_layers(&self) -> usize;
    /// One line of the architecture's dimensions (for `inspect`).
    fn summary(&self) -> String;
    fn new_cache(&self) -> Cache {
        Cache::new(self.num_layers())
    }

    /// Final hidden states [b, t, hidden] (after the last norm). `key_mask` [b, T] (1 = keep,
    /// 0 = padding) covers cached plus new positions. `start[r]`: position of row r's first
    /// token (rows of different prompt lengths sharing one cache); None follows the cache.
    fn forward_hidden_at(
        &self,
        ids: &Tensor,
        cache: Option<&mut Cache>,
        key_mask: Option<&Tensor>,
        start: Option<&[usize]>,
    ) -> Result<Tensor>;

    fn forward_hidden(
        &self,
        ids: &Tensor,
        cache: Option<&mut Cache>,
        key_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.forward_hidden_at(ids, cache, key_mask, None)
    }

    /// The residual stream entering layer 0 for `ids` [b, t]: [b, t, hidden].
    fn embed(&self, ids: &Tensor) -> Result<Tensor>;

    /// The residual stream after layers `range` applied to `x` at positions 0..t, causal, no
    /// cache, no final norm (layer-wise calibration runs one layer at a time on it).
    fn forward_layers(&self, x: &Tensor, range: std::ops::Range<usize>) -> Result<Tensor>;

    /// Logits of hidden states.
    fn head(&self, hidden: &Tensor) -> Result<Tensor>;

    /// Mean cross-entropy of the head's logits for hidden states [n, d] against targets [n].
    fn head_loss(&self, hidden: &Tensor, targets: &Tensor) -> Result<Tensor> {
        Ok(crate::fused::cross_entropy(&self.head(hidden)?, targets)?)
    }

    /// Logits for every position [b, t, vocab].
    fn forward(&self, ids: &Tensor, cache: Option<&mut Cache>) -> Result<Tensor> {
        let h = self.forward_hidden(ids, cache, None)?;
        self.head(&h)
    }

    /// Logits of the last position only [b, vocab].
    fn forward_last(&self, ids: &Tensor, cache: Option<&mut Cache>) -> Result<Tensor> {
        let h = self.forward_hidden(ids, cache, None)?;
        let t = h.dim(1)?;
        let last = h.narrow(1, t - 1, 1)?.squeeze(1)?;
        self.head(&last)
    }

    /// Every Linear with its HF module name, the embedding included; the order is fixed
    /// (adapters derive per-layer seeds from it).
    fn linears(&self) -> Vec<(String, &Linear)>;
    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)>;
    /// Tensors outside Linears (norms) with their HF names.
    fn other_tensors(&self) -> Vec<(String, &Tensor)>;
    fn other_tensors_mut(&mut self) -> Vec<(String, &mut Tensor)>;

    /// Each layer's feed-forward block with its HF prefix (`model.layers.N.mlp`).
    fn feed_forwards_mut(&mut self) -> Vec<(String, &mut Box<dyn FeedForward>)>;

    /// Each layer's feed-forward block, read-only (empty where an architecture does not list
    /// them; a mixture of experts' auxiliary loss is then not collected).
    fn feed_forwards(&self) -> Vec<(String, &dyn FeedForward)> {
        Vec::new()
    }

    /// The auxiliary losses the blocks recorded in the last training forward (a router's
    /// balance loss), summed and taken; None when no block has one.
    fn take_aux_loss(&self) -> Result<Option<Tensor>> {
        let mut sum: Option<Tensor> = None;
        for (_, f) in self.feed_forwards() {
            if let Some(a) = f.take_aux_loss() {
                sum = Some(match sum {
                    Some(s) => (s + a)?,
                    None => a,
                });
            }
        }
        Ok(sum)
    }

    /// Each layer's self-attention block with its HF prefix (`model.layers.N.self_attn`),
    /// for architectures whose attention is a plain [`SelfAttention`] (empty otherwise:
    /// gemma3's layers pick their own RoPE table and window).
    fn attentions_mut(&mut self) -> Vec<(String, &mut Box<dyn SelfAttention>)> {
        Vec::new()
    }

    /// Whether the head is the embedding (no separate `lm_head`).
    fn tied_head(&self) -> bool;

    /// config.json for an HF export of this model, and its `architectures` entry.
    fn hf_config(&self) -> Result<serde_json::Value>;
    fn hf_architecture(&self) -> &'static str;

    /// PEFT's default LoRA targets for this architecture (module name suffixes).
    fn peft_default_targets(&self) -> &'static [&'static str];

    /// Tokens that end a chat turn besides EOS (the chat templates' end-of-turn markers).
    fn end_of_turn_tokens(&self) -> &'static [&'static str];

    fn as_any(&self) -> &dyn Any;
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

/// A bidirectional encoder with an optional classification head.
pub trait Encoder: std::fmt::Debug + Send + Sync {
    fn model_type(&self) -> &str;
    fn hidden_size(&self) -> usize;
    fn max_positions(&self) -> usize;
    /// One line of the architecture's dimensions (for `inspect`).
    fn summary(&self) -> String;
    /// Last hidden states [b, t, hidden]; `mask` [b, t]: 1 for tokens, 0 for padding.
    fn forward(
        &self,
        ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        mask: Option<&Tensor>,
    ) -> Result<Tensor>;
    /// The pooled representation a classifier reads.
    fn pool(&self, hidden: &Tensor) -> Result<Tensor>;
    /// Logits of the classification head; an error when there is none.
    fn classify(&self, pooled: &Tensor) -> Result<Tensor>;
    /// Labels of the classification head; None without one.
    fn num_labels(&self) -> Option<usize>;
    /// Attach (or replace) a classification head [num_labels, hidden].
    fn set_classifier(&mut self, weight: Tensor, bias: Tensor);
    /// Whether a masked-LM head is present.
    fn has_mlm_head(&self) -> bool {
        false
    }
    /// Masked-LM logits [n, vocab] of hidden states [n, hidden]; an error without a head.
    fn mlm_logits(&self, _hidden: &Tensor) -> Result<Tensor> {
        crate::bail!("{} has no masked-LM head", self.model_type())
    }
    /// Attach a masked-LM head: transform weight [h, h], its bias, LayerNorm weight and bias
    /// [h], output bias [vocab]; ignored by encoders without one.
    fn set_mlm_head(&mut self, _tensors: [Tensor; 5]) {}
    fn linears(&self) -> Vec<(String, &Linear)>;
    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)>;
    fn other_tensors(&self) -> Vec<(String, &Tensor)>;
    fn other_tensors_mut(&mut self) -> Vec<(String, &mut Tensor)>;
    /// Map a PEFT module name of the bare encoder to ours (prefixes differ between
    /// checkpoints); identity by default.
    fn module_name(&self, peft_name: &str) -> String {
        peft_name.to_string()
    }
    fn hf_config(&self) -> Result<serde_json::Value>;
    fn hf_architecture(&self) -> &'static str;
    /// `tokenizer_class` for tokenizer_config.json, where transformers needs one.
    fn tokenizer_class(&self) -> Option<&'static str> {
        None
    }
    fn peft_default_targets(&self) -> &'static [&'static str];
    fn as_any(&self) -> &dyn Any;
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

/// A decoder layer's feed-forward block (dense SwiGLU today; a mixture of experts replaces
/// it through [`CausalLm::feed_forwards_mut`]).
pub trait FeedForward: std::fmt::Debug + Send + Sync {
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
    /// Linears with names relative to the block (`gate_proj`, `experts.3.up_proj`).
    fn linears(&self) -> Vec<(String, &Linear)>;
    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)>;
    /// Other parameters (a router's weight) relative to the block.
    fn other_tensors(&self) -> Vec<(String, &Tensor)> {
        Vec::new()
    }
    fn other_tensors_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        Vec::new()
    }
    /// A loss term the block recorded in its last training forward (a router's balance loss),
    /// taken so that each forward's term is added once.
    fn take_aux_loss(&self) -> Option<Tensor> {
        None
    }
    fn as_any(&self) -> &dyn Any;
}

/// What a layer's attention needs besides its input: the RoPE tables of the positions being
/// run and the masks (`mask`: the additive causal/padding mask the generic path reads, None
/// where the fused kernels apply them; `key_mask` [b, T]: 1 = keep, 0 = padding).
pub struct AttnInputs<'a> {
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
    pub mask: Option<&'a Tensor>,
    pub key_mask: Option<&'a Tensor>,
}

/// A decoder layer's self-attention block, pluggable like [`FeedForward`].
pub trait SelfAttention: std::fmt::Debug + Send + Sync {
    fn forward(&self, x: &Tensor, at: &AttnInputs, kv: Option<&mut KvSlot>) -> Result<Tensor>;
    /// Linears with names relative to the block (`q_proj`, …).
    fn linears(&self) -> Vec<(String, &Linear)>;
    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)>;
    fn other_tensors(&self) -> Vec<(String, &Tensor)> {
        Vec::new()
    }
    fn other_tensors_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        Vec::new()
    }
    fn as_any(&self) -> &dyn Any;
}

/// Additive mask [b or 1, 1, t, T] for queries at cache positions `offset..offset + t`:
/// causal, optionally limited to the last `window` keys (the query itself included, as
/// transformers' sliding-window mask: key j is visible from i when i − j < window), plus key
/// padding. None when nothing is masked.
pub(crate) fn attention_mask(
    b: usize,
    t: usize,
    offset: usize,
    window: Option<usize>,
    key_mask: Option<&Tensor>,
    dev: &candle_core::Device,
) -> Result<Option<Tensor>> {
    let total = offset + t;
    let cuts = window.is_some_and(|w| total > w);
    let causal = if t > 1 || cuts {
        let w = window.unwrap_or(usize::MAX);
        let m: Vec<f32> = (0..t)
            .flat_map(|i| {
                (0..total).map(move |j| {
                    let q = i + offset;
                    if j > q || q - j >= w {
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
            let km = km.to_dtype(candle_core::DType::F32)?;
            // 1 → 0, 0 → a large negative, so rows with every key padded stay finite.
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
