//! Calibration and the layer-by-layer driver.
//!
//! GPTQ needs, for every Linear of decoder layer i, the Hessian 2/N Σ x xᵀ of its inputs when
//! layers 0…i−1 are already quantized (true-sequential across layers). The driver keeps the
//! residual stream X_i (the input of layer i, computed with the quantized earlier layers) for
//! every calibration batch and, per layer:
//!
//! * wraps layer i's Linears in recorders that add XᵀX into a shared `Mutex<Hessian>`
//!   (q/k/v share one Hessian, gate/up another) and runs layer i alone on X_i
//!   (`Llama::forward_layers`); architecture files are not edited;
//! * quantizes the layer's projections;
//! * runs the quantized layer i on X_i to get X_{i+1}.
//!
//! So each layer costs two passes through one decoder layer, and memory is the model, the
//! cached residual stream (nsamples × seqlen × hidden f32) and the Hessians of one layer.
//! Within a layer the seven projections are quantized from one pass (AutoGPTQ's in-layer
//! q/k/v → o → gate/up → down sub-sequencing is not done).

use super::gptq::{self, Grid, Hessian};
use super::layer::QuantLinear;
use super::{Error, KeepFp16, Result};
use candle_core::{DType, Device, Tensor};
use models::linear::Dense;
use models::{LinearLayer, Model};
use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Rtn,
    Gptq,
}

#[derive(Debug, Clone)]
pub struct QuantOptions {
    pub method: Method,
    pub bits: u32,
    /// 0 = one group per output row (AutoGPTQ's group_size −1).
    pub group_size: usize,
    pub act_order: bool,
    pub damp: f64,
    pub sym: bool,
    pub keep: KeepFp16,
    /// Lazy-update block size (128 in the paper).
    pub block: usize,
    /// Calibration sequences per forward pass.
    pub batch: usize,
    /// How the layers encode their zero points (the checkpoint format they will be saved in).
    pub zero_format: super::ZeroFormat,
}

impl Default for QuantOptions {
    fn default() -> Self {
        QuantOptions {
            method: Method::Gptq,
            bits: 4,
            group_size: 128,
            act_order: false,
            damp: 0.01,
            sym: false,
            keep: KeepFp16::None,
            block: 128,
            batch: 4,
            zero_format: super::ZeroFormat::V1,
        }
    }
}

impl QuantOptions {
    pub fn grid(&self) -> Grid {
        Grid {
            bits: self.bits,
            group_size: self.group_size,
            sym: self.sym,
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct LayerReport {
    pub name: String,
    /// "gptq4", "rtn3", "fp16".
    pub kind: String,
    pub in_features: usize,
    pub out_features: usize,
    /// GPTQ loss (RTN: squared weight error); for fp16-kept layers the error they would have had.
    pub loss: f64,
    pub secs: f64,
}

/// Decoder-layer index of a module name `model.layers.N.…`.
pub fn layer_index(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// The quantization targets: every Linear inside a decoder layer (embedding and head stay).
fn targets(m: &Model) -> Vec<(String, usize, usize)> {
    m.linears()
        .into_iter()
        .filter(|(n, _)| layer_index(n).is_some())
        .map(|(n, l)| (n, l.in_features(), l.out_features()))
        .collect()
}

/// Validate options against the model before any work.
pub fn validate(m: &Model, o: &QuantOptions) -> Result<()> {
    super::pack::check_bits(o.bits)?;
    m.causal()?;
    if !(0.0..1.0).contains(&o.damp) {
        return Err(Error::option(
            "damp",
            format!("`damp` must be in [0, 1), got {}", o.damp),
        ));
    }
    let b = o.bits as usize;
    for (n, i, out) in targets(m) {
        if o.group_size != 0 && i % o.group_size != 0 {
            return Err(Error::option(
                "group_size",
                format!(
                    "`group_size` {} does not divide in_features {i} of {n}",
                    o.group_size
                ),
            ));
        }
        if (i * b) % 32 != 0 || (out * b) % 32 != 0 {
            return Err(Error::Msg(format!("{n} ({out}×{i}) cannot be packed in {} bits: in and out features × bits must be multiples of 32", o.bits)));
        }
    }
    Ok(())
}

/// `nsamples` random windows of `seqlen` tokens from a calibration text (seeded, as GPTQ's
/// get_wikitext2 draws random windows from the training split).
pub fn calibration_samples(
    m: &Model,
    text: &str,
    nsamples: usize,
    seqlen: usize,
    seed: u64,
) -> Result<Vec<Vec<u32>>> {
    if nsamples == 0 || seqlen < 2 {
        return Err(Error::option(
            "nsamples",
            "`nsamples` must be ≥ 1 and `seqlen` ≥ 2",
        ));
    }
    let ids = m.tokenizer.encode(text, false)?;
    if ids.len() <= seqlen {
        return Err(Error::option(
            "seqlen",
            format!(
                "calibration text has {} tokens, fewer than `seqlen` {seqlen}",
                ids.len()
            ),
        ));
    }
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407)
        | 1;
    let mut out = Vec::with_capacity(nsamples);
    for _ in 0..nsamples {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        let start = (s % (ids.len() - seqlen) as u64) as usize;
        out.push(ids[start..start + seqlen].to_vec());
    }
    Ok(out)
}

fn f16_dense(l: &dyn LinearLayer) -> Result<Dense> {
    let w = l.weight()?.to_dtype(DType::F16)?.to_dtype(DType::F32)?;
    let b = match l.bias() {
        Some(b) => Some(b.to_dtype(DType::F16)?.to_dtype(DType::F32)?),
        None => None,
    };
    Ok(Dense { weight: w, bias: b })
}

fn weight_vec(l: &dyn LinearLayer) -> Result<Vec<f32>> {
    Ok(l.weight()?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

/// Quantize one Linear (already validated), returning the packed layer and its report.
fn quantize_one(
    name: &str,
    l: &dyn LinearLayer,
    o: &QuantOptions,
    prep: Option<&gptq::Prepared>,
) -> Result<(QuantLinear, LayerReport)> {
    let t0 = std::time::Instant::now();
    let (in_f, out_f) = (l.in_features(), l.out_features());
    let w = weight_vec(l)?;
    let q = match (o.method, prep) {
        (Method::Gptq, Some(p)) => gptq::gptq(&w, out_f, in_f, &o.grid(), p, o.block)?,
        _ => gptq::rtn(&w, out_f, in_f, &o.grid())?,
    };
    let bias = match l.bias() {
        Some(b) => Some(b.to_dtype(DType::F16)?.to_dtype(DType::F32)?),
        None => None,
    };
    let ql = QuantLinear::from_quantized_as(o.zero_format, &q, o.bits, bias)?;
    let kind = format!(
        "{}{}",
        if o.method == Method::Gptq {
            "gptq"
        } else {
            "rtn"
        },
        o.bits
    );
    Ok((
        ql,
        LayerReport {
            name: name.into(),
            kind,
            in_features: in_f,
            out_features: out_f,
            loss: q.loss,
            secs: t0.elapsed().as_secs_f64(),
        },
    ))
}

/// Quantize every decoder-layer Linear of `m` in place (QuantLinear swapped in; fp16-kept
/// layers become f16-rounded dense). GPTQ needs `calib` (token windows); RTN ignores it.
pub fn quantize_model(
    m: &mut Model,
    o: &QuantOptions,
    calib: Option<&[Vec<u32>]>,
    progress: bool,
) -> Result<Vec<LayerReport>> {
    validate(m, o)?;
    let names: Vec<String> = targets(m).into_iter().map(|t| t.0).collect();
    let n_layers = names
        .iter()
        .filter_map(|n| layer_index(n))
        .max()
        .map_or(0, |x| x + 1);
    let pb = if progress {
        indicatif::ProgressBar::new(names.len() as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    pb.set_style(
        indicatif::ProgressStyle::with_template("quantizing {bar:30} {pos}/{len} {msg} {elapsed}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let crucial = match o.keep {
        KeepFp16::Crucial(n) => n,
        _ => 0,
    };
    let mut reports = Vec::new();
    // Originals (f16-rounded) kept for crucial:N, by name.
    let mut originals: HashMap<String, Dense> = HashMap::new();
    let mut swap_in = |m: &mut Model,
                       layer: usize,
                       prepared: &HashMap<String, gptq::Prepared>,
                       reports: &mut Vec<LayerReport>|
     -> Result<()> {
        for (name, lin) in m.linears_mut() {
            if layer_index(&name) != Some(layer) {
                continue;
            }
            if o.keep.keeps(&name) {
                let d = f16_dense(lin.inner())?;
                lin.replace(Box::new(d));
                reports.push(LayerReport {
                    name: name.clone(),
                    kind: "fp16".into(),
                    in_features: lin.in_features(),
                    out_features: lin.out_features(),
                    loss: 0.0,
                    secs: 0.0,
                });
                pb.inc(1);
                continue;
            }
            let prep = prepared.get(&hessian_key(&name));
            if o.method == Method::Gptq && prep.is_none() {
                return Err(Error::Msg(format!(
                    "no calibration activations reached {name}"
                )));
            }
            let (ql, rep) = quantize_one(&name, lin.inner(), o, prep)?;
            if crucial > 0 {
                originals.insert(name.clone(), f16_dense(lin.inner())?);
            }
            lin.replace(Box::new(ql));
            pb.set_message(name.clone());
            pb.inc(1);
            reports.push(rep);
        }
        Ok(())
    };
    match o.method {
        Method::Rtn => {
            for layer in 0..n_layers {
                swap_in(m, layer, &HashMap::new(), &mut reports)?;
            }
        }
        Method::Gptq => {
            let calib = calib
                .filter(|c| !c.is_empty())
                .ok_or_else(|| Error::option("calib", "GPTQ needs calibration data (`calib`)"))?;
            let lm = m.causal()?;
            // X_0: the residual stream entering layer 0 for every calibration batch.
            let mut xs: Vec<Tensor> = calib
                .chunks(o.batch.max(1))
                .map(|c| {
                    let flat: Vec<u32> = c.iter().flatten().copied().collect();
                    let ids = Tensor::from_vec(flat, (c.len(), c[0].len()), &Device::Cpu)?;
                    lm.embed(&ids)
                })
                .collect::<models::Result<_>>()?;
            for layer in 0..n_layers {
                let hess = calibration_pass(m, layer, &xs, o)?;
                let mut prepared = HashMap::new();
                for (k, h) in hess {
                    let h = Arc::try_unwrap(h)
                        .map_err(|_| Error::Msg("Hessian still shared".into()))?
                        .into_inner()
                        .map_err(|_| Error::Msg("Hessian lock poisoned".into()))?;
                    prepared.insert(k, gptq::prepare(&h.finish(), h.n, o.damp, o.act_order)?);
                }
                swap_in(m, layer, &prepared, &mut reports)?;
                if layer + 1 < n_layers {
                    let llama = m.causal()?;
                    for x in xs.iter_mut() {
                        *x = llama.forward_layers(x, layer..layer + 1)?;
                    }
                }
            }
        }
    }
    pb.finish_and_clear();
    if crucial > 0 {
        let mut order: Vec<usize> = (0..reports.len())
            .filter(|&i| reports[i].kind != "fp16")
            .collect();
        order.sort_by(|&a, &b| {
            reports[b]
                .loss
                .partial_cmp(&reports[a].loss)
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        let keep: BTreeMap<String, usize> = order
            .into_iter()
            .take(crucial)
            .map(|i| (reports[i].name.clone(), i))
            .collect();
        for (name, lin) in m.linears_mut() {
            if let Some(&i) = keep.get(&name) {
                if let Some(d) = originals.remove(&name) {
                    lin.replace(Box::new(d));
                    reports[i].kind = "fp16".into();
                }
            }
        }
    }
    Ok(reports)
}

/// Modules reading the same input share one Hessian.
pub(crate) fn hessian_key(name: &str) -> String {
    for (s, k) in [
        ("k_proj", "q_proj"),
        ("v_proj", "q_proj"),
        ("up_proj", "gate_proj"),
    ] {
        if let Some(p) = name.strip_suffix(s) {
            return format!("{p}{k}");
        }
    }
    name.to_string()
}

type Hess = Arc<Mutex<Hessian>>;

/// Called with every input a tapped Linear sees, as f32 rows (values, row count).
pub(crate) type Record = Box<dyn Fn(&[f32], usize) -> candle_core::Result<()> + Send + Sync>;

/// A Linear that hands each input to `record` and otherwise behaves as the wrapped layer: how
/// calibration observes activations (Hessians here, outlier statistics in `actquant`).
pub(crate) struct Tap {
    inner: Box<dyn LinearLayer>,
    record: Record,
}

impl std::fmt::Debug for Tap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tap").field("inner", &self.inner).finish()
    }
}

impl LinearLayer for Tap {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let n = x.dim(x.rank() - 1)?;
        let x2 = x.contiguous()?.reshape(((), n))?.to_dtype(DType::F32)?;
        let rows = x2.dim(0)?;
        (self.record)(&x2.flatten_all()?.to_vec1::<f32>()?, rows)?;
        self.inner.forward(x)
    }
    fn embed(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        self.inner.embed(ids)
    }
    fn in_features(&self) -> usize {
        self.inner.in_features()
    }
    fn out_features(&self) -> usize {
        self.inner.out_features()
    }
    fn num_params(&self) -> usize {
        self.inner.num_params()
    }
    fn weight(&self) -> candle_core::Result<Tensor> {
        self.inner.weight()
    }
    fn bias(&self) -> Option<Tensor> {
        self.inner.bias()
    }
    fn kind(&self) -> String {
        self.inner.kind()
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// Wraps `lin` in a [`Tap`] calling `record`.
pub(crate) fn tap(lin: &mut models::Linear, record: Record) {
    lin.wrap(|inner| Box::new(Tap { inner, record }));
}

/// Puts back the layer of every [`Tap`] in the model.
pub(crate) fn untap_all(m: &mut Model) {
    for (_, lin) in m.linears_mut() {
        if lin.inner().as_any().downcast_ref::<Tap>().is_some() {
            lin.wrap(|mut b| match b.as_any_mut().downcast_mut::<Tap>() {
                Some(t) => std::mem::replace(&mut t.inner, models::linear::empty()),
                None => b,
            });
        }
    }
}

/// Runs decoder layer `layer` alone on the cached inputs `xs` with its Linears recording,
/// and returns the Hessians of its modules (by `hessian_key`).
fn calibration_pass(
    m: &mut Model,
    layer: usize,
    xs: &[Tensor],
    o: &QuantOptions,
) -> Result<HashMap<String, Hess>> {
    let mut hess: HashMap<String, Hess> = HashMap::new();
    for (name, lin) in m.linears_mut() {
        if layer_index(&name) != Some(layer) || o.keep.keeps(&name) {
            continue;
        }
        let key = hessian_key(&name);
        if hess.contains_key(&key) {
            continue; // another module with the same input records it
        }
        let h = Arc::new(Mutex::new(Hessian::new(lin.in_features())));
        hess.insert(key, h.clone());
        tap(
            lin,
            Box::new(move |xv, rows| {
                h.lock()
                    .map_err(|_| candle_core::Error::Msg("poisoned".into()))?
                    .add_rows(xv, rows);
                Ok(())
            }),
        );
    }
    let run = (|| -> Result<()> {
        let llama = m.causal()?;
        for x in xs {
            llama.forward_layers(x, layer..layer + 1)?;
        }
        Ok(())
    })();
    // Remove the taps (always, even after an error).
    untap_all(m);
    run?;
    Ok(hess)
}
