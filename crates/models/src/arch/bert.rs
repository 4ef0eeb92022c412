//! BERT encoder (BertModel) with pooler and an optional sequence-classification head, as in
//! transformers' BertForSequenceClassification. Accepts checkpoints with or without the
//! `bert.` prefix (sentence-transformers saves the bare BertModel).

use crate::config::BertConfig;
use crate::linear::Linear;
use crate::ops;
use crate::source::{Bias, WeightSource};
use crate::Result;
use candle_core::{DType, Tensor, D};
use std::any::Any;

#[derive(Debug)]
struct LayerNorm {
    w: Tensor,
    b: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn load(w: &dyn WeightSource, name: &str, h: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm {
            w: w.tensor(&format!("{name}.weight"), &[h])?,
            b: w.tensor(&format!("{name}.bias"), &[h])?,
            eps,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(ops::layer_norm(x, &self.w, &self.b, self.eps)?)
    }
}

#[derive(Debug)]
struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_ln: LayerNorm,
    intermediate: Linear,
    output: Linear,
    out_ln: LayerNorm,
}

/// One list of names for both the shared and the mutable view, so they cannot drift.
macro_rules! linear_list {
    ($s:ident, $iter:ident, $opt:ident, $($m:tt)?) => {{
        let p = $s.prefix.clone();
        let mut v = vec![(format!("{p}embeddings.word_embeddings"), &$($m)? $s.word_embeddings)];
        for (i, l) in $s.layers.$iter().enumerate() {
            let n = format!("{p}encoder.layer.{i}");
            v.push((format!("{n}.attention.self.query"), &$($m)? l.query));
            v.push((format!("{n}.attention.self.key"), &$($m)? l.key));
            v.push((format!("{n}.attention.self.value"), &$($m)? l.value));
            v.push((format!("{n}.attention.output.dense"), &$($m)? l.attn_out));
            v.push((format!("{n}.intermediate.dense"), &$($m)? l.intermediate));
            v.push((format!("{n}.output.dense"), &$($m)? l.output));
        }
        if let Some(x) = $s.pooler.$opt() {
            v.push((format!("{p}pooler.dense"), x));
        }
        if let Some(x) = $s.classifier.$opt() {
            v.push(("classifier".into(), x));
        }
        if let Some(h) = $s.mlm.$opt() {
            v.push(("cls.predictions.transform.dense".into(), &$($m)? h.dense));
        }
        v
    }};
}

macro_rules! other_list {
    ($s:ident, $iter:ident, $($m:tt)?) => {{
        let p = $s.prefix.clone();
        let mut v = vec![
            (format!("{p}embeddings.position_embeddings.weight"), &$($m)? $s.position_embeddings),
            (format!("{p}embeddings.token_type_embeddings.weight"), &$($m)? $s.token_type_embeddings),
            (format!("{p}embeddings.LayerNorm.weight"), &$($m)? $s.emb_ln.w),
            (format!("{p}embeddings.LayerNorm.bias"), &$($m)? $s.emb_ln.b),
        ];
        for (i, l) in $s.layers.$iter().enumerate() {
            let n = format!("{p}encoder.layer.{i}");
            v.push((format!("{n}.attention.output.LayerNorm.weight"), &$($m)? l.attn_ln.w));
            v.push((format!("{n}.attention.output.LayerNorm.bias"), &$($m)? l.attn_ln.b));
            v.push((format!("{n}.output.LayerNorm.weight"), &$($m)? l.out_ln.w));
            v.push((format!("{n}.output.LayerNorm.bias"), &$($m)? l.out_ln.b));
        }
        if let Some(h) = &$($m)? $s.mlm {
            v.push(("cls.predictions.transform.LayerNorm.weight".into(), &$($m)? h.ln.w));
            v.push(("cls.predictions.transform.LayerNorm.bias".into(), &$($m)? h.ln.b));
            v.push(("cls.predictions.bias".into(), &$($m)? h.bias));
        }
        v
    }};
}

/// BertForMaskedLM's head (`cls.predictions`): dense + activation + LayerNorm, then the decoder
/// tied to the word embeddings plus an output bias over the vocabulary.
#[derive(Debug)]
struct MlmHead {
    dense: Linear,
    ln: LayerNorm,
    bias: Tensor,
}

#[derive(Debug)]
pub struct Bert {
    pub cfg: BertConfig,
    /// "bert." or "" — the prefix the checkpoint used, kept for saving under the same names.
    pub prefix: String,
    pub word_embeddings: Linear,
    position_embeddings: Tensor,
    token_type_embeddings: Tensor,
    emb_ln: LayerNorm,
    layers: Vec<Layer>,
    pub pooler: Option<Linear>,
    pub classifier: Option<Linear>,
    mlm: Option<MlmHead>,
}

fn lin(w: &dyn WeightSource, name: &str, out_f: usize, in_f: usize) -> Result<Linear> {
    w.linear(name, out_f, in_f, Bias::Required)
}

impl Bert {
    /// Build the encoder in one pass from `w` (HF names, with or without `bert.`).
    pub fn new(cfg: BertConfig, w: &dyn WeightSource) -> Result<Self> {
        let prefix = if w.contains("bert.embeddings.word_embeddings.weight") {
            "bert."
        } else {
            ""
        }
        .to_string();
        let (h, inter, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps);
        let p = |s: &str| format!("{prefix}{s}");
        let word_embeddings = w.linear(
            &p("embeddings.word_embeddings"),
            cfg.vocab_size,
            h,
            Bias::Optional,
        )?;
        let position_embeddings = w.tensor(
            &p("embeddings.position_embeddings.weight"),
            &[cfg.max_position_embeddings, h],
        )?;
        let token_type_embeddings = w.tensor(
            &p("embeddings.token_type_embeddings.weight"),
            &[cfg.type_vocab_size, h],
        )?;
        let emb_ln = LayerNorm::load(w, &p("embeddings.LayerNorm"), h, eps)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = p(&format!("encoder.layer.{i}"));
            layers.push(Layer {
                query: lin(w, &format!("{l}.attention.self.query"), h, h)?,
                key: lin(w, &format!("{l}.attention.self.key"), h, h)?,
                value: lin(w, &format!("{l}.attention.self.value"), h, h)?,
                attn_out: lin(w, &format!("{l}.attention.output.dense"), h, h)?,
                attn_ln: LayerNorm::load(w, &format!("{l}.attention.output.LayerNorm"), h, eps)?,
                intermediate: lin(w, &format!("{l}.intermediate.dense"), inter, h)?,
                output: lin(w, &format!("{l}.output.dense"), h, inter)?,
                out_ln: LayerNorm::load(w, &format!("{l}.output.LayerNorm"), h, eps)?,
            });
        }
        let pooler = if w.has_linear(&p("pooler.dense")) {
            Some(lin(w, &p("pooler.dense"), h, h)?)
        } else {
            None
        };
        let classifier = match (w.shape("classifier.weight"), cfg.num_labels) {
            (Some(dims), n) => {
                let n = n.unwrap_or_else(|| dims.first().copied().unwrap_or(0));
                Some(lin(w, "classifier", n, h)?)
            }
            _ => None,
        };
        let mlm = if w.has_linear("cls.predictions.transform.dense") {
            Some(MlmHead {
                dense: lin(w, "cls.predictions.transform.dense", h, h)?,
                ln: LayerNorm::load(w, "cls.predictions.transform.LayerNorm", h, eps)?,
                bias: w.tensor("cls.predictions.bias", &[cfg.vocab_size])?,
            })
        } else {
            None
        };
        Ok(Bert {
            mlm,
            cfg,
            prefix,
            word_embeddings,
            position_embeddings,
            token_type_embeddings,
            emb_ln,
            layers,
            pooler,
            classifier,
        })
    }

    /// Attach (or replace) a classification head [num_labels, hidden].
    pub fn set_classifier(&mut self, weight: Tensor, bias: Tensor) {
        self.classifier = Some(Linear::dense(weight, Some(bias)));
    }

    /// Attach (or replace) the masked-LM head: transform dense [h, h] with bias, its LayerNorm,
    /// and the output bias [vocab] (the decoder is the word embedding matrix).
    pub fn set_mlm_head(
        &mut self,
        dense_w: Tensor,
        dense_b: Tensor,
        ln_w: Tensor,
        ln_b: Tensor,
        bias: Tensor,
    ) {
        self.mlm = Some(MlmHead {
            dense: Linear::dense(dense_w, Some(dense_b)),
            ln: LayerNorm {
                w: ln_w,
                b: ln_b,
                eps: self.cfg.layer_norm_eps,
            },
            bias,
        });
    }

    /// Masked-LM logits [n, vocab] of hidden states [n, hidden].
    pub fn mlm_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let Some(h) = &self.mlm else {
            crate::bail!("this model has no masked-LM head (cls.predictions.*)");
        };
        let x = self.act(&h.dense.forward(hidden)?)?;
        let x = h.ln.forward(&x)?;
        Ok(self.word_embeddings.forward(&x)?.broadcast_add(&h.bias)?)
    }

    fn act(&self, i: &Tensor) -> Result<Tensor> {
        Ok(match self.cfg.hidden_act.as_str() {
            "relu" => i.relu()?,
            "gelu_new" | "gelu_pytorch_tanh" => i.gelu()?,
            _ => ops::gelu_erf(i)?,
        })
    }

    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        linear_list!(self, iter_mut, as_mut, mut)
    }

    pub fn linears(&self) -> Vec<(String, &Linear)> {
        linear_list!(self, iter, as_ref,)
    }

    /// Non-Linear tensors (position/type embeddings, LayerNorms) with their names.
    pub fn other_tensors(&self) -> Vec<(String, &Tensor)> {
        other_list!(self, iter,)
    }

    pub fn other_tensors_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        other_list!(self, iter_mut, mut)
    }

    /// Last hidden states [b, t, hidden]. `mask` [b, t]: 1 for tokens, 0 for padding.
    pub fn forward(
        &self,
        ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let h = self.cfg.hidden_size;
        if t > self.cfg.max_position_embeddings {
            crate::bail!(
                "input of {t} tokens exceeds max_position_embeddings {}",
                self.cfg.max_position_embeddings
            );
        }
        let words = self
            .word_embeddings
            .embed(&ids.flatten_all()?)?
            .reshape((b, t, h))?;
        let pos = self.position_embeddings.narrow(0, 0, t)?.unsqueeze(0)?;
        let types = match token_type_ids {
            Some(tt) => self
                .token_type_embeddings
                .index_select(&tt.flatten_all()?, 0)?
                .reshape((b, t, h))?,
            None => self
                .token_type_embeddings
                .narrow(0, 0, 1)?
                .unsqueeze(0)?
                .broadcast_as((b, t, h))?,
        };
        let x = words.broadcast_add(&pos)?.add(&types)?;
        let mut x = self.emb_ln.forward(&x)?;
        let add_mask = match mask {
            // (1 - m) · f32::MIN, as transformers' extended attention mask.
            Some(m) => Some(
                ((m.to_dtype(DType::F32)?.affine(-1.0, 1.0)? * f32::MIN as f64)?)
                    .reshape((b, 1, 1, t))?,
            ),
            None => None,
        };
        let nh = self.cfg.num_attention_heads;
        let hd = h / nh;
        let scale = 1.0 / (hd as f64).sqrt();
        // The fused kernel reads heads in place from [b, t, heads, hd] (no transposes) and has
        // its own backward; other dtypes/devices keep the composed form.
        let fused = crate::fused::usable(&[&x]);
        let key_mask = match (fused, mask) {
            (true, Some(m)) => {
                Some((m.to_dtype(DType::F32)?.affine(-1.0, 1.0)? * f32::MIN as f64)?)
            }
            _ => None,
        };
        for l in &self.layers {
            if fused {
                let q = l.query.forward(&x)?.reshape((b, t, nh, hd))?;
                let k = l.key.forward(&x)?.reshape((b, t, nh, hd))?;
                let v = l.value.forward(&x)?.reshape((b, t, nh, hd))?;
                let o = crate::fused::attention(&q, &k, &v, false, scale, key_mask.as_ref())?
                    .reshape((b, t, h))?;
                x = self.ffn(l, &o, &x)?;
                continue;
            }
            let heads = |lin: &Linear| -> Result<Tensor> {
                Ok(lin
                    .forward(&x)?
                    .reshape((b, t, nh, hd))?
                    .transpose(1, 2)?
                    .contiguous()?)
            };
            let (q, k, v) = (heads(&l.query)?, heads(&l.key)?, heads(&l.value)?);
            let mut s = (q.matmul(&k.t()?)? * scale)?;
            if let Some(m) = &add_mask {
                s = s.broadcast_add(m)?;
            }
            let p = ops::softmax_last_dim(&s)?;
            let o = p.matmul(&v)?.transpose(1, 2)?.reshape((b, t, h))?;
            x = self.ffn(l, &o, &x)?;
        }
        Ok(x)
    }

    /// Attention output projection + residual + LayerNorm, then the feed-forward block.
    fn ffn(&self, l: &Layer, o: &Tensor, x: &Tensor) -> Result<Tensor> {
        let a = l.attn_ln.forward(&(l.attn_out.forward(o)? + x)?)?;
        let i = self.act(&l.intermediate.forward(&a)?)?;
        l.out_ln.forward(&(l.output.forward(&i)? + &a)?)
    }

    /// tanh(dense(h[:, 0])) — BERT's pooled [CLS] output [b, hidden].
    pub fn pool(&self, hidden: &Tensor) -> Result<Tensor> {
        let cls = hidden.narrow(1, 0, 1)?.squeeze(1)?;
        match &self.pooler {
            Some(p) => Ok(p.forward(&cls)?.tanh()?),
            None => crate::bail!("this checkpoint has no pooler weights (pooler.dense.*)"),
        }
    }

    /// Classification logits [b, num_labels] from the pooled output.
    pub fn classify(&self, pooled: &Tensor) -> Result<Tensor> {
        match &self.classifier {
            Some(c) => Ok(c.forward(pooled)?),
            None => crate::bail!("this model has no classification head (fine-tune it with a classification task first)"),
        }
    }

    /// Mean of the last hidden states over unmasked tokens [b, hidden] (sentence-transformers pooling).
    pub fn mean_pool(hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let m = mask.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?;
        let s = hidden.broadcast_mul(&m)?.sum(1)?;
        let n = m.sum(1)?.clamp(1e-9, f64::MAX)?;
        Ok(s.broadcast_div(&n)?)
    }
}

impl crate::arch::Encoder for Bert {
    fn model_type(&self) -> &str {
        &self.cfg.model_type
    }
    fn hidden_size(&self) -> usize {
        self.cfg.hidden_size
    }
    fn max_positions(&self) -> usize {
        self.cfg.max_position_embeddings
    }
    fn summary(&self) -> String {
        let c = &self.cfg;
        format!(
            "layers {}  hidden {}  heads {}  ffn {}  vocab {}  max_pos {}  pooler {}  classifier {}",
            c.num_hidden_layers,
            c.hidden_size,
            c.num_attention_heads,
            c.intermediate_size,
            c.vocab_size,
            c.max_position_embeddings,
            self.pooler.is_some(),
            self.classifier.is_some()
        )
    }
    fn forward(
        &self,
        ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        Bert::forward(self, ids, token_type_ids, mask)
    }
    fn pool(&self, hidden: &Tensor) -> Result<Tensor> {
        Bert::pool(self, hidden)
    }
    fn classify(&self, pooled: &Tensor) -> Result<Tensor> {
        Bert::classify(self, pooled)
    }
    fn num_labels(&self) -> Option<usize> {
        self.classifier.as_ref().map(|c| c.out_features())
    }
    fn set_classifier(&mut self, weight: Tensor, bias: Tensor) {
        self.cfg.num_labels = Some(weight.dims().first().copied().unwrap_or(0));
        Bert::set_classifier(self, weight, bias)
    }
    fn linears(&self) -> Vec<(String, &Linear)> {
        Bert::linears(self)
    }
    fn has_mlm_head(&self) -> bool {
        self.mlm.is_some()
    }
    fn mlm_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Bert::mlm_logits(self, hidden)
    }
    fn set_mlm_head(&mut self, t: [Tensor; 5]) {
        let [dw, db, lw, lb, b] = t;
        Bert::set_mlm_head(self, dw, db, lw, lb, b)
    }
    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        Bert::linears_mut(self)
    }
    fn other_tensors(&self) -> Vec<(String, &Tensor)> {
        Bert::other_tensors(self)
    }
    fn other_tensors_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        Bert::other_tensors_mut(self)
    }
    fn hf_config(&self) -> Result<serde_json::Value> {
        serde_json::to_value(&self.cfg).map_err(|e| crate::Error::Msg(e.to_string()))
    }
    fn hf_architecture(&self) -> &'static str {
        if self.classifier.is_some() {
            "BertForSequenceClassification"
        } else {
            "BertModel"
        }
    }
    fn tokenizer_class(&self) -> Option<&'static str> {
        Some("BertTokenizerFast")
    }
    fn peft_default_targets(&self) -> &'static [&'static str] {
        &["query", "value"]
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}
