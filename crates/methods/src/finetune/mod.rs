//! The fine-tuning engine every method uses: choose the trainable tensors for a method (full,
//! LoRA, MPO auxiliary / central / all), run AdamW with linear warmup + decay, gradient clipping
//! and per-group learning rates, evaluate each epoch, checkpoint every N steps and resume with
//! the identical loss curve, and save the result in the method's own format.
//!
//! Trainable tensors are `candle_core::Var`s that share storage with the model's tensors, so the
//! optimizer's in-place `Var::set` is what the model sees. Frozen tensors stay plain tensors
//! (MPO cores: detached), so no gradient flows into them.
//!
//! Output directory layout: the final model (HF dir, MPO checkpoint or PEFT adapter) at the top,
//! `finetune_log.json` (options, loss curve, evaluations), and `checkpoint/` (trainable tensors,
//! AdamW moments and the step) while training runs.

pub mod data;
pub mod optim;

use crate::mpop::{self, Error, MpoLayer, Result};
use candle_core::{DType, Device, Tensor, Var};
use data::{Batch, Dataset, Example};
use models::linear::Dense;
use models::model::{Arch, Model};
use optim::{AdamW, AdamWConfig};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub const LOG_FILE: &str = "finetune_log.json";
pub const CHECKPOINT_DIR: &str = "checkpoint";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// Sentence classification with a BERT encoder (GLUE SST-2 or any labelled TSV/JSONL).
    Sst2,
    /// Causal language modelling on text.
    Lm,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    Full,
    Lora,
    /// MPOP's lightweight fine-tuning: auxiliary tensors train, central tensors are frozen.
    MpoAux,
    /// Only the central tensors train (MPOP's `CT_learn`).
    MpoCentral,
    MpoAll,
}

impl Method {
    pub fn is_mpo(self) -> bool {
        matches!(self, Method::MpoAux | Method::MpoCentral | Method::MpoAll)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinetuneOptions {
    /// The model argument as given (recorded; LoRA adapters name it as their base model).
    pub model: String,
    pub task: Task,
    pub method: Method,
    pub data: PathBuf,
    pub eval_data: Option<PathBuf>,
    pub lr: f64,
    /// Learning rate of MPO tensors (MPOP's `mpo_lr`); defaults to `lr`.
    pub mpo_lr: Option<f64>,
    pub weight_decay: f64,
    pub epochs: usize,
    pub batch: usize,
    pub max_len: usize,
    /// Warmup as a fraction of all steps, unless `warmup_steps` is given.
    pub warmup_ratio: f64,
    pub warmup_steps: Option<usize>,
    /// Global gradient-norm clip (0 = off).
    pub max_grad_norm: f64,
    pub seed: u64,
    /// Cap on the number of optimizer steps (the schedule spans this many).
    pub max_steps: Option<usize>,
    pub limit: Option<usize>,
    pub eval_limit: Option<usize>,
    pub eval_batch: usize,
    pub lora_r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    /// Empty = PEFT's defaults for the architecture.
    pub lora_targets: Vec<String>,
    /// Number of MPO sites when a dense model is decomposed for an mpo-* method.
    pub mpo_n: usize,
    /// After fine-tuning, squeeze the MPO bonds (MPOP Algorithm 2).
    pub squeeze: Option<crate::squeeze::SqueezeOptions>,
    /// Batch examples of similar length together ([`data::grouped_epoch_order`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub group_by_length: bool,
}

impl Default for FinetuneOptions {
    fn default() -> Self {
        FinetuneOptions {
            model: String::new(),
            task: Task::Sst2,
            method: Method::Full,
            data: PathBuf::new(),
            eval_data: None,
            lr: 2e-5,
            mpo_lr: None,
            weight_decay: 0.0,
            epochs: 1,
            batch: 32,
            max_len: 64,
            warmup_ratio: 0.06,
            warmup_steps: None,
            max_grad_norm: 1.0,
            seed: 42,
            max_steps: None,
            limit: None,
            eval_limit: None,
            eval_batch: 64,
            lora_r: 8,
            lora_alpha: 16.0,
            lora_dropout: 0.0,
            lora_targets: Vec::new(),
            mpo_n: 5,
            squeeze: None,
            group_by_length: false,
        }
    }
}

/// How a run is driven, as opposed to what it computes (not part of the resume fingerprint).
#[derive(Debug, Clone, Default)]
pub struct RunControl {
    pub resume: bool,
    /// Write a checkpoint every N optimizer steps (and at the end of each epoch).
    pub save_every: Option<usize>,
    /// Stop after this many steps, leaving a checkpoint to resume from.
    pub stop_after: Option<usize>,
    pub progress: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepLog {
    pub step: usize,
    pub epoch: usize,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// Wall time of this optimizer step (forward, backward, update).
    #[serde(default)]
    pub secs: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalLog {
    pub step: usize,
    pub epoch: usize,
    pub loss: f64,
    /// Classification accuracy, or perplexity for language modelling.
    pub metric: String,
    pub value: f64,
    pub examples: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FinetuneLog {
    pub options: FinetuneOptions,
    pub steps: Vec<StepLog>,
    pub evals: Vec<EvalLog>,
    pub tuned_params: usize,
    pub total_params: usize,
    pub total_steps: usize,
    pub train_examples: usize,
    pub eval_examples: usize,
    pub train_secs: f64,
    pub finished: bool,
    #[serde(default)]
    pub squeeze: Option<Value>,
}

/// A trainable tensor with its learning-rate group.
pub struct Param {
    pub name: String,
    pub var: Var,
    pub mpo: bool,
    pub decay: bool,
}

fn to_var(t: &mut Tensor) -> Result<Var> {
    let v = Var::from_tensor(t)?;
    *t = v.as_tensor().clone();
    Ok(v)
}

fn no_decay(name: &str) -> bool {
    name.ends_with(".bias")
        || name.contains("LayerNorm")
        || name.contains("layernorm")
        || name.contains("norm.weight")
}

/// Make `name`'s dense weight (and bias) trainable in place.
fn dense_vars(
    name: &str,
    lin: &mut models::Linear,
    weight: bool,
    out: &mut Vec<Param>,
) -> Result<()> {
    let Some(d) = lin.inner_mut().as_any_mut().downcast_mut::<Dense>() else {
        return Ok(());
    };
    if weight {
        out.push(Param {
            name: format!("{name}.weight"),
            var: to_var(&mut d.weight)?,
            mpo: false,
            decay: true,
        });
    }
    if let Some(b) = d.bias.as_mut() {
        out.push(Param {
            name: format!("{name}.bias"),
            var: to_var(b)?,
            mpo: false,
            decay: false,
        });
    }
    Ok(())
}

/// Set each MPO layer's trainable cores for `method` and collect them (bias included).
fn mpo_vars(name: &str, mp: &mut MpoLayer, method: Method, out: &mut Vec<Param>) {
    let cores = mp.inner.cores_mut();
    match method {
        Method::MpoAux => cores.freeze_central(),
        Method::MpoCentral => cores.train_only_central(),
        Method::MpoAll | Method::Full => cores.set_all_trainable(true),
        Method::Lora => cores.set_all_trainable(false),
    }
    for k in 0..cores.n() {
        if cores.is_trainable(k) {
            out.push(Param {
                name: format!("{name}.mpo.{}", mpo::Mpo::<f32>::core_name(k)),
                var: cores.var(k).clone(),
                mpo: true,
                decay: true,
            });
        }
    }
    let bias_on = method != Method::Lora;
    mp.inner.set_bias_trainable(bias_on);
    if let (Some(b), true) = (mp.inner.bias(), bias_on) {
        out.push(Param {
            name: format!("{name}.bias"),
            var: b.clone(),
            mpo: false,
            decay: false,
        });
    }
}

/// Rebuild the cached dense matrices of MPO layers after their cores changed.
pub fn refresh(m: &mut Model) {
    for (_, l) in m.linears_mut() {
        if let Some(mp) = l.inner_mut().as_any_mut().downcast_mut::<MpoLayer>() {
            mp.invalidate();
        }
    }
}

fn has_mpo(m: &Model) -> bool {
    m.linears()
        .iter()
        .any(|(_, l)| l.inner().as_any().downcast_ref::<MpoLayer>().is_some())
}

fn lora_config(m: &Model, o: &FinetuneOptions) -> crate::lora::LoraConfig {
    crate::lora::LoraConfig {
        r: o.lora_r,
        alpha: o.lora_alpha,
        dropout: o.lora_dropout,
        target_modules: if o.lora_targets.is_empty() {
            crate::lora::LoraConfig::default_targets(m)
        } else {
            o.lora_targets.clone()
        },
        seed: o.seed,
    }
}

/// Prepare the model for `o.method` and return its trainable tensors. For MPO methods a dense
/// model is first decomposed at full bond (lossless), as MPOP does before lightweight tuning.
pub fn prepare(m: &mut Model, o: &FinetuneOptions, progress: bool) -> Result<Vec<Param>> {
    let mut ps = Vec::new();
    let is_quant = m
        .linears()
        .iter()
        .any(|(_, l)| l.inner().as_any().is::<crate::quant::layer::QuantLinear>());
    if is_quant && o.method != Method::Lora {
        return Err(Error::Msg(format!(
            "{}: a quantized model's packed weights cannot be trained with --method {}; use --method lora (adapters over the frozen quantized weights)",
            o.model,
            serde_json::to_value(o.method).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
        )));
    }
    if o.method.is_mpo() && !has_mpo(m) {
        if progress {
            eprintln!("decomposing every Linear and the embedding as a full-bond MPO (n = {}) before tuning", o.mpo_n);
        }
        mpop::compress(
            m,
            &mpop::CompressOptions {
                shapes: mpop::Shapes::Auto,
                n: o.mpo_n,
                budget: mpop::Budget::Full,
                patterns: Vec::new(),
            },
            progress,
        )?;
    }
    if o.method == Method::Lora {
        let cfg = lora_config(m, o);
        for (name, var) in crate::lora::apply(m, &cfg)? {
            ps.push(Param {
                name,
                var,
                mpo: false,
                decay: true,
            });
        }
        // The freshly initialised head trains too (PEFT's modules_to_save).
        for (name, lin) in m.linears_mut() {
            if name == "classifier" {
                dense_vars(&name, lin, true, &mut ps)?;
            }
        }
        return Ok(ps);
    }
    let full = o.method == Method::Full;
    for (name, lin) in m.linears_mut() {
        if let Some(mp) = lin.inner_mut().as_any_mut().downcast_mut::<MpoLayer>() {
            mpo_vars(&name, mp, o.method, &mut ps);
        } else {
            // MPOP: non-MPO parameters (biases, the classifier) still train; dense weights that
            // were not decomposed train only in full fine-tuning.
            dense_vars(&name, lin, full || name == "classifier", &mut ps)?;
        }
    }
    for (name, t) in m.other_tensors_mut() {
        let decay = !no_decay(&name);
        ps.push(Param {
            var: to_var(t)?,
            name,
            mpo: false,
            decay,
        });
    }
    Ok(ps)
}

/// Attach a new classification head (HF init: N(0, 0.02), zero bias) when the encoder has none.
fn ensure_head(m: &mut Model, num_labels: usize, seed: u64) -> Result<()> {
    let Arch::Bert(b) = &mut m.arch else {
        return Ok(());
    };
    if let Some(c) = &b.classifier {
        if c.out_features() != num_labels {
            return Err(Error::Msg(format!(
                "the model's classification head has {} labels but the data has {num_labels}",
                c.out_features()
            )));
        }
        return Ok(());
    }
    use rand::{Rng, SeedableRng};
    let h = b.cfg.hidden_size;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0xC1A5_5EED);
    // Box-Muller normal samples, N(0, 0.02²).
    let w: Vec<f32> = (0..num_labels * h)
        .map(|_| {
            let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-12), rng.random::<f64>());
            (0.02 * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
        })
        .collect();
    b.set_classifier(
        Tensor::from_vec(w, (num_labels, h), &Device::Cpu)?,
        Tensor::zeros(num_labels, DType::F32, &Device::Cpu)?,
    );
    b.cfg.num_labels = Some(num_labels);
    Ok(())
}

/// Mean cross-entropy of a batch: classification logits vs labels, or next-token prediction.
pub fn batch_loss(m: &Model, b: &Batch) -> Result<Tensor> {
    match &m.arch {
        Arch::Bert(bert) => {
            let h = bert.forward(&b.ids, None, b.mask.as_ref())?;
            let logits = bert.classify(&bert.pool(&h)?)?;
            let labels = b
                .labels
                .as_ref()
                .ok_or_else(|| Error::Msg("classification batch without labels".into()))?;
            Ok(models::fused::cross_entropy(&logits, labels)?)
        }
        Arch::Llama(l) => {
            let (bs, t) = b.ids.dims2()?;
            let h = l.forward_hidden(&b.ids.narrow(1, 0, t - 1)?, None, None)?;
            let d = h.dim(2)?;
            let h = h.contiguous()?.reshape((bs * (t - 1), d))?;
            let target = b.ids.narrow(1, 1, t - 1)?.contiguous()?.flatten_all()?;
            Ok(l.head_loss(&h, &target)?)
        }
        Arch::Gemma3(l) => {
            let (bs, t) = b.ids.dims2()?;
            let h = l.forward_hidden(&b.ids.narrow(1, 0, t - 1)?, None, None)?;
            let d = h.dim(2)?;
            let h = h.contiguous()?.reshape((bs * (t - 1), d))?;
            let target = b.ids.narrow(1, 1, t - 1)?.contiguous()?.flatten_all()?;
            Ok(l.head_loss(&h, &target)?)
        }
    }
}

/// Loss and task metric over the evaluation set, in inference mode.
pub fn evaluate(m: &mut Model, ds: &[Example], batch: usize) -> Result<(f64, f64, &'static str)> {
    models::ops::set_training(false);
    refresh(m);
    let mut loss_sum = 0.0;
    let mut n = 0usize;
    let mut correct = 0usize;
    let mut tokens = 0usize;
    // Loss and accuracy do not depend on the order, so batch by length: less padding.
    let mut by_len: Vec<&Example> = ds.iter().collect();
    by_len.sort_by_key(|e| e.n_tokens());
    for chunk in by_len.chunks(batch.max(1)) {
        let refs: Vec<&Example> = chunk.to_vec();
        let b = data::make_batch(&refs)?;
        match &m.arch {
            Arch::Bert(bert) => {
                let h = bert.forward(&b.ids, None, b.mask.as_ref())?;
                let logits = bert.classify(&bert.pool(&h)?)?.detach();
                let labels = b.labels.as_ref().expect("classification batch");
                let l = models::fused::cross_entropy(&logits, labels)?.to_scalar::<f32>()? as f64;
                loss_sum += l * b.rows as f64;
                let pred = logits.argmax(1)?.to_vec1::<u32>()?;
                let gold = labels.to_vec1::<u32>()?;
                correct += pred.iter().zip(&gold).filter(|(a, b)| a == b).count();
                n += b.rows;
            }
            Arch::Llama(_) | Arch::Gemma3(_) => {
                let l = batch_loss(m, &b)?.to_scalar::<f32>()? as f64;
                let (bs, t) = b.ids.dims2()?;
                let k = bs * (t - 1);
                loss_sum += l * k as f64;
                tokens += k;
                n += b.rows;
            }
        }
    }
    Ok(match &m.arch {
        Arch::Bert(_) => (
            loss_sum / n.max(1) as f64,
            correct as f64 / n.max(1) as f64,
            "accuracy",
        ),
        Arch::Llama(_) | Arch::Gemma3(_) => {
            let l = loss_sum / tokens.max(1) as f64;
            (l, l.exp(), "perplexity")
        }
    })
}

/// What a finished (or stopped) run reports.
#[derive(Debug, Clone, Serialize)]
pub struct FinetuneReport {
    pub out: PathBuf,
    pub tuned_params: usize,
    pub total_params: usize,
    pub steps: usize,
    pub total_steps: usize,
    pub final_loss: Option<f64>,
    pub eval: Option<EvalLog>,
    pub train_secs: f64,
    pub examples_per_sec: f64,
    pub finished: bool,
}

fn write_json(path: &Path, v: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| Error::Msg(e.to_string()))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = models::tmp::file_in(dir).map_err(|e| io_err(dir, e))?;
    std::io::Write::write_all(&mut tmp, text.as_bytes()).map_err(|e| io_err(path, e))?;
    tmp.persist(path).map_err(|e| io_err(path, e.error))?;
    Ok(())
}

fn io_err(p: &Path, e: std::io::Error) -> Error {
    Error::Msg(format!("{}: {e}", p.display()))
}

fn fingerprint(o: &FinetuneOptions) -> Value {
    serde_json::to_value(o).unwrap_or(Value::Null)
}

/// The previous checkpoint while a new one is moved into place.
pub const CHECKPOINT_OLD: &str = "checkpoint.old";

/// Save trainable tensors, AdamW moments and the log under `out/checkpoint` (replaced whole).
///
/// The new checkpoint is complete under a temp name before anything is moved, and a complete
/// checkpoint exists at every instant: `checkpoint`, or `checkpoint.old` only between the two
/// renames (which [`checkpoint_dir`] falls back to), so a run killed anywhere here resumes.
fn save_checkpoint(out: &Path, opt: &AdamW, log: &FinetuneLog) -> Result<()> {
    let tmp = models::tmp::dir_in(out).map_err(|e| io_err(out, e))?;
    let mut params = HashMap::new();
    let mut moments = HashMap::new();
    for s in &opt.slots {
        let shape = s.var.as_tensor().shape().clone();
        params.insert(s.name.clone(), s.var.as_tensor().contiguous()?);
        moments.insert(
            format!("{}.m", s.name),
            Tensor::from_slice(&s.m, shape.clone(), &Device::Cpu)?,
        );
        moments.insert(
            format!("{}.v", s.name),
            Tensor::from_slice(&s.v, shape, &Device::Cpu)?,
        );
    }
    candle_core::safetensors::save(&params, tmp.path().join("params.safetensors"))?;
    candle_core::safetensors::save(&moments, tmp.path().join("optimizer.safetensors"))?;
    write_json(
        &tmp.path().join("state.json"),
        &json!({"optimizer_step": opt.step, "log": log}),
    )?;
    let dst = out.join(CHECKPOINT_DIR);
    let old = out.join(CHECKPOINT_OLD);
    if is_checkpoint(&dst) {
        // `checkpoint` is complete, so `checkpoint.old` is not needed until the rename below.
        remove_dir_if_present(&old)?;
        std::fs::rename(&dst, &old).map_err(|e| io_err(&dst, e))?;
    } else {
        // A broken `checkpoint` (killed while being removed) is not worth keeping; a complete
        // `checkpoint.old` stays the fallback until the new one is in place.
        remove_dir_if_present(&dst)?;
    }
    tmp.rename_to(&dst).map_err(|e| io_err(&dst, e))?;
    remove_dir_if_present(&old)
}

/// Whether `dir` holds a complete checkpoint (its state is written last).
fn is_checkpoint(dir: &Path) -> bool {
    dir.join("state.json").is_file()
}

/// The checkpoint to resume from: `checkpoint`, else `checkpoint.old` (left by a run killed
/// while rotating them).
pub fn checkpoint_dir(out: &Path) -> Option<PathBuf> {
    [CHECKPOINT_DIR, CHECKPOINT_OLD]
        .iter()
        .map(|d| out.join(d))
        .find(|d| is_checkpoint(d))
}

fn remove_dir_if_present(d: &Path) -> Result<()> {
    match std::fs::remove_dir_all(d) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err(d, e)),
        _ => Ok(()),
    }
}

/// Remove the checkpoints of a finished run: first renamed to a temp name (one atomic step,
/// so no half-deleted `checkpoint` is ever seen), then deleted.
fn remove_checkpoints(out: &Path) {
    for d in [CHECKPOINT_DIR, CHECKPOINT_OLD] {
        let p = out.join(d);
        if !p.exists() {
            continue;
        }
        if let Ok(t) = models::tmp::dir_in(out) {
            let gone = t.path().join(d);
            if std::fs::rename(&p, &gone).is_ok() {
                continue; // deleted with `t`
            }
        }
        let _ = std::fs::remove_dir_all(&p);
    }
}

/// Restore a checkpoint into `opt` (same parameter names and shapes required).
fn load_checkpoint(out: &Path, opt: &mut AdamW, o: &FinetuneOptions) -> Result<FinetuneLog> {
    let dir = checkpoint_dir(out).unwrap_or_else(|| out.join(CHECKPOINT_DIR));
    let sp = dir.join("state.json");
    let text = std::fs::read_to_string(&sp).map_err(|_| {
        Error::Msg(format!(
            "{}: no checkpoint to resume from (expected {}); run without --resume to start",
            out.display(),
            sp.display()
        ))
    })?;
    let state: Value = serde_json::from_str(&text)
        .map_err(|e| Error::Msg(format!("{}: invalid checkpoint state: {e}", sp.display())))?;
    let log: FinetuneLog = serde_json::from_value(state["log"].clone())
        .map_err(|e| Error::Msg(format!("{}: invalid checkpoint log: {e}", sp.display())))?;
    let (a, b) = (fingerprint(&log.options), fingerprint(o));
    if a != b {
        let diff: Vec<String> = match (a.as_object(), b.as_object()) {
            (Some(x), Some(y)) => x
                .keys()
                .filter(|k| x.get(*k) != y.get(*k))
                .map(|k| {
                    format!(
                        "{k}: {} vs {}",
                        x[k.as_str()],
                        y.get(k.as_str()).unwrap_or(&Value::Null)
                    )
                })
                .collect(),
            _ => vec![],
        };
        return Err(Error::Msg(format!(
            "{}: the checkpoint belongs to a different run ({}); resume with the same options or choose a new --out",
            out.display(),
            diff.join(", ")
        )));
    }
    let params = candle_core::safetensors::load(dir.join("params.safetensors"), &Device::Cpu)?;
    let moments = candle_core::safetensors::load(dir.join("optimizer.safetensors"), &Device::Cpu)?;
    if params.len() != opt.slots.len() {
        return Err(Error::Msg(format!(
            "{}: the checkpoint holds {} trainable tensors, this run has {}",
            dir.display(),
            params.len(),
            opt.slots.len()
        )));
    }
    for s in &mut opt.slots {
        let get = |m: &HashMap<String, Tensor>, k: &str| -> Result<Tensor> {
            let t = m.get(k).ok_or_else(|| {
                Error::Msg(format!(
                    "{}: tensor '{k}' missing from the checkpoint",
                    dir.display()
                ))
            })?;
            if t.dims() != s.var.as_tensor().dims() {
                return Err(Error::Msg(format!(
                    "{}: tensor '{k}' has shape {:?}, this run expects {:?}",
                    dir.display(),
                    t.dims(),
                    s.var.as_tensor().dims()
                )));
            }
            Ok(t.clone())
        };
        s.var.set(&get(&params, &s.name)?)?;
        s.m = get(&moments, &format!("{}.m", s.name))?
            .flatten_all()?
            .to_vec1()?;
        s.v = get(&moments, &format!("{}.v", s.name))?
            .flatten_all()?
            .to_vec1()?;
    }
    opt.step = state["optimizer_step"].as_u64().unwrap_or(0);
    Ok(log)
}

/// Write the final model into `out` in the method's format.
fn save_model(m: &Model, o: &FinetuneOptions, out: &Path) -> Result<()> {
    // Writers that refuse a non-empty directory get a fresh one inside the temp dir.
    let guard = models::tmp::dir_in(out).map_err(|e| io_err(out, e))?;
    let tmp = guard.path().join("final");
    if o.method == Method::Lora {
        let cfg = lora_config(m, o);
        let head: Vec<(String, Tensor)> = m
            .linears()
            .into_iter()
            .filter(|(n, _)| n == "classifier")
            .flat_map(|(n, l)| {
                let mut v = vec![(format!("{n}.weight"), l.weight())];
                if let Some(b) = l.bias() {
                    v.push((format!("{n}.bias"), Ok(b)));
                }
                v
            })
            .map(|(n, t)| Ok((n, t?)))
            .collect::<candle_core::Result<_>>()?;
        let task_type = if o.task == Task::Lm {
            "CAUSAL_LM"
        } else {
            "SEQ_CLS"
        };
        std::fs::create_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
        crate::lora::save_peft(m, &cfg, &o.model, task_type, &head, &tmp)?;
    } else if has_mpo(m) {
        mpop::save(m, &tmp)?;
    } else {
        let t = models::export::dense_state_dict(m)?;
        models::export::write_hf_dir(m, &tmp, &t, &[])?;
    }
    for e in std::fs::read_dir(&tmp).map_err(|e| io_err(&tmp, e))? {
        let e = e.map_err(|e| io_err(&tmp, e))?;
        let dst = out.join(e.file_name());
        std::fs::rename(e.path(), &dst).map_err(|er| io_err(&dst, er))?;
    }
    Ok(())
}

fn load_data(m: &Model, o: &FinetuneOptions) -> Result<Dataset> {
    let spec = data::Spec {
        data: &o.data,
        eval: o.eval_data.as_deref(),
        max_len: o.max_len,
        limit: o.limit,
        eval_limit: o.eval_limit,
    };
    match (o.task, &m.arch) {
        (Task::Sst2, Arch::Bert(_)) => data::load_classification(&spec, &m.tokenizer),
        (Task::Lm, Arch::Llama(_)) => data::load_lm(&spec, &m.tokenizer),
        (Task::Sst2, _) => Err(Error::Msg(format!(
            "--task sst2 fine-tunes an encoder classifier, but {} is a {} model; use --task lm for causal models",
            o.model,
            m.arch_name()
        ))),
        (Task::Lm, _) => Err(Error::Msg(format!(
            "--task lm needs a causal model, but {} is a {} encoder; use --task sst2",
            o.model,
            m.arch_name()
        ))),
    }
}

fn check_options(o: &FinetuneOptions) -> Result<()> {
    let bad = |s: String| Err(Error::Msg(s));
    if o.batch == 0 {
        return bad("--batch must be at least 1".into());
    }
    if o.epochs == 0 && o.max_steps.is_none() {
        return bad("--epochs must be at least 1".into());
    }
    if !(o.lr > 0.0) || !o.lr.is_finite() {
        return bad(format!("--lr must be a positive number, got {}", o.lr));
    }
    if let Some(l) = o.mpo_lr {
        if !(l >= 0.0) || !l.is_finite() {
            return bad(format!("--mpo-lr must be >= 0, got {l}"));
        }
    }
    if !(0.0..1.0).contains(&o.lora_dropout) {
        return bad(format!(
            "--lora-dropout must be in [0, 1), got {}",
            o.lora_dropout
        ));
    }
    if o.method == Method::Lora && o.lora_r == 0 {
        return bad("--lora-r must be at least 1".into());
    }
    if o.max_len < 2 {
        return bad("--max-len must be at least 2".into());
    }
    // Zero counts would finish "successfully" with an untrained model.
    for (name, v) in [
        ("--max-steps", o.max_steps),
        ("--limit", o.limit),
        ("--eval-limit", o.eval_limit),
    ] {
        if v == Some(0) {
            return bad(format!("{name} must be at least 1"));
        }
    }
    if o.eval_batch == 0 {
        return bad("--eval-batch must be at least 1".into());
    }
    if !(0.0..=1.0).contains(&o.warmup_ratio) {
        return bad(format!(
            "--warmup-ratio must be in [0, 1], got {}",
            o.warmup_ratio
        ));
    }
    for (name, v) in [
        ("--max-grad-norm", o.max_grad_norm),
        ("--weight-decay", o.weight_decay),
    ] {
        if !(v >= 0.0) || !v.is_finite() {
            return bad(format!("{name} must be a finite number >= 0, got {v}"));
        }
    }
    if o.method == Method::Lora && (!(o.lora_alpha > 0.0) || !o.lora_alpha.is_finite()) {
        return bad(format!(
            "--lora-alpha must be a positive number, got {}",
            o.lora_alpha
        ));
    }
    Ok(())
}

/// A LoRA rank above a targeted matrix's smaller side adds parameters without adding rank
/// (and a huge one allocates r × features before failing).
fn check_lora_rank(m: &Model, o: &FinetuneOptions) -> Result<()> {
    if o.method != Method::Lora {
        return Ok(());
    }
    let cfg = lora_config(m, o);
    let smallest = m
        .linears()
        .into_iter()
        .filter(|(name, _)| cfg.selects(name))
        .map(|(name, l)| (l.in_features().min(l.out_features()), name))
        .min();
    match smallest {
        Some((dim, name)) if o.lora_r > dim => Err(Error::Msg(format!(
            "--lora-r {} is out of range: the targeted matrix {name} has {dim} as its smaller dimension (use 1..={dim})",
            o.lora_r
        ))),
        _ => Ok(()),
    }
}

/// A training session: the model prepared for its method, data, optimizer and schedule.
pub struct Trainer<'a> {
    pub model: &'a mut Model,
    pub opts: FinetuneOptions,
    pub data: Dataset,
    pub opt: AdamW,
    pub log: FinetuneLog,
    pub steps_per_epoch: usize,
    pub warmup: usize,
    pub lora: bool,
    /// Replaces the schedule's lr multiplier (squeezing's recovery phases train at a constant lr).
    pub lr_factor_override: Option<f64>,
}

impl<'a> Trainer<'a> {
    pub fn new(model: &'a mut Model, o: &FinetuneOptions, progress: bool) -> Result<Self> {
        check_options(o)?;
        check_lora_rank(model, o)?;
        let data = load_data(model, o)?;
        if o.task == Task::Sst2 {
            ensure_head(model, data.num_labels, o.seed)?;
        }
        let params = prepare(model, o, progress)?;
        if params.is_empty() {
            return Err(Error::Msg("this method leaves no tensor to train".into()));
        }
        let mpo_lr = o.mpo_lr.unwrap_or(o.lr);
        let slots = params
            .iter()
            .filter(|p| !(p.mpo && mpo_lr == 0.0))
            .map(|p| {
                let lr = if p.mpo { mpo_lr } else { o.lr };
                let wd = if p.decay { o.weight_decay } else { 0.0 };
                (p.name.clone(), p.var.clone(), lr, wd)
            })
            .collect();
        let opt = AdamW::new(AdamWConfig::default(), slots);
        let steps_per_epoch = data.train.len().div_ceil(o.batch);
        let mut total = steps_per_epoch * o.epochs.max(1);
        if let Some(ms) = o.max_steps {
            total = if o.epochs == 0 { ms } else { total.min(ms) };
        }
        let warmup = o
            .warmup_steps
            .unwrap_or_else(|| (o.warmup_ratio * total as f64).ceil() as usize);
        let tuned: usize = opt
            .slots
            .iter()
            .map(|s| s.var.as_tensor().elem_count())
            .sum();
        let log = FinetuneLog {
            options: o.clone(),
            steps: Vec::new(),
            evals: Vec::new(),
            tuned_params: tuned,
            total_params: model.total_params(),
            total_steps: total,
            train_examples: data.train.len(),
            eval_examples: data.eval.len(),
            train_secs: 0.0,
            finished: false,
            squeeze: None,
        };
        Ok(Trainer {
            model,
            opts: o.clone(),
            data,
            opt,
            log,
            steps_per_epoch,
            warmup,
            lora: o.method == Method::Lora,
            lr_factor_override: None,
        })
    }

    /// Re-collect the trainable tensors after layers were replaced (squeezing). Moments are kept
    /// for tensors that are still the same variable and reset for new ones.
    pub fn rebuild_optimizer(&mut self) -> Result<()> {
        let params = prepare(self.model, &self.opts, false)?;
        let mpo_lr = self.opts.mpo_lr.unwrap_or(self.opts.lr);
        let mut old: HashMap<String, optim::Slot> = self
            .opt
            .slots
            .drain(..)
            .map(|s| (s.name.clone(), s))
            .collect();
        for p in params {
            if p.mpo && mpo_lr == 0.0 {
                continue;
            }
            let lr = if p.mpo { mpo_lr } else { self.opts.lr };
            let wd = if p.decay { self.opts.weight_decay } else { 0.0 };
            let n = p.var.as_tensor().elem_count();
            let (m, v) = match old.remove(&p.name) {
                Some(s) if s.var.as_tensor().id() == p.var.as_tensor().id() => (s.m, s.v),
                _ => (vec![0.0; n], vec![0.0; n]),
            };
            self.opt.slots.push(optim::Slot {
                name: p.name,
                var: p.var,
                lr,
                weight_decay: wd,
                m,
                v,
            });
        }
        self.log.tuned_params = self
            .opt
            .slots
            .iter()
            .map(|s| s.var.as_tensor().elem_count())
            .sum();
        self.log.total_params = self.model.total_params();
        Ok(())
    }

    /// The examples of global step `step` (epoch order from the seed).
    fn batch_at(&self, step: usize) -> Result<Batch> {
        let epoch = step / self.steps_per_epoch;
        let k = step % self.steps_per_epoch;
        let order = if self.opts.group_by_length {
            let lens: Vec<usize> = self.data.train.iter().map(Example::n_tokens).collect();
            data::grouped_epoch_order(&lens, self.opts.batch, self.opts.seed, epoch)
        } else {
            data::epoch_order(self.data.train.len(), self.opts.seed, epoch)
        };
        let idx = &order[k * self.opts.batch..((k + 1) * self.opts.batch).min(order.len())];
        let ex: Vec<&Example> = idx.iter().map(|&i| &self.data.train[i]).collect();
        data::make_batch(&ex)
    }

    /// One optimizer step on the batch of global step `step`; returns the loss.
    pub fn train_step(&mut self, step: usize) -> Result<StepLog> {
        let b = self.batch_at(step)?;
        let t0 = Instant::now();
        models::ops::set_training(true);
        if self.lora {
            crate::lora::set_step(self.model, step as u64);
        }
        let loss = batch_loss(self.model, &b)?;
        let lv = loss.to_scalar::<f32>()? as f64;
        if !lv.is_finite() {
            return Err(Error::Msg(format!(
                "the loss became {lv} at step {step}; lower --lr or enable --max-grad-norm"
            )));
        }
        let grads = loss.backward()?;
        let norm = self.opt.grad_norm(&grads)?;
        let scale = optim::clip_scale(norm, self.opts.max_grad_norm);
        let f = self
            .lr_factor_override
            .unwrap_or_else(|| optim::linear_schedule(step, self.warmup, self.log.total_steps));
        self.opt.step(&grads, f, scale)?;
        Ok(StepLog {
            step: step + 1,
            epoch: step / self.steps_per_epoch,
            loss: lv,
            lr: self.opts.lr * f,
            grad_norm: norm,
            secs: t0.elapsed().as_secs_f64(),
        })
    }

    pub fn evaluate(&mut self, step: usize) -> Result<Option<EvalLog>> {
        if self.data.eval.is_empty() {
            return Ok(None);
        }
        let (loss, value, metric) = evaluate(self.model, &self.data.eval, self.opts.eval_batch)?;
        Ok(Some(EvalLog {
            step,
            epoch: step.saturating_sub(1) / self.steps_per_epoch,
            loss,
            metric: metric.into(),
            value,
            examples: self.data.eval.len(),
        }))
    }
}

fn prepare_out(out: &Path, resume: bool) -> Result<()> {
    if !resume
        && out.exists()
        && std::fs::read_dir(out)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        return Err(Error::Msg(format!(
            "{}: exists and is not empty; choose a new --out, or pass --resume to continue the run saved there",
            out.display()
        )));
    }
    std::fs::create_dir_all(out).map_err(|e| io_err(out, e))
}

/// Fine-tune `m` as `o` says, writing everything under `out`.
pub fn finetune(
    m: &mut Model,
    o: &FinetuneOptions,
    out: &Path,
    ctl: &RunControl,
) -> Result<FinetuneReport> {
    if ctl.resume && checkpoint_dir(out).is_none() {
        return Err(Error::Msg(format!(
            "{}: no checkpoint to resume from; run without --resume to start a new run there",
            out.display()
        )));
    }
    let mut tr = Trainer::new(m, o, ctl.progress)?;
    if let Some(so) = &o.squeeze {
        crate::squeeze::check(&tr, so)?;
    }
    prepare_out(out, ctl.resume)?;
    let mut start = 0usize;
    if ctl.resume {
        tr.log = load_checkpoint(out, &mut tr.opt, o)?;
        start = tr.opt.step as usize;
        refresh(tr.model);
    }
    let total = tr.log.total_steps;
    let pb = ctl.progress.then(|| {
        let pb = indicatif::ProgressBar::new(total as u64);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix} [{bar:30}] {pos}/{len} steps {msg} [{elapsed_precise}<{eta_precise}]",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        pb.set_prefix("finetune");
        pb.set_position(start as u64);
        pb
    });
    let t0 = Instant::now();
    let secs_before = tr.log.train_secs;
    let mut examples = 0usize;
    let mut step = start;
    let mut stopped = false;
    while step < total {
        let s = tr.train_step(step)?;
        examples += tr.opts.batch.min(tr.data.train.len());
        step += 1;
        if let Some(pb) = &pb {
            let rate = examples as f64 / t0.elapsed().as_secs_f64().max(1e-9);
            pb.set_message(format!(
                "loss {:.4} lr {:.2e} {:.1} ex/s",
                s.loss, s.lr, rate
            ));
            pb.set_position(step as u64);
        }
        tr.log.steps.push(s);
        let epoch_end = step % tr.steps_per_epoch == 0 || step == total;
        if epoch_end {
            if let Some(e) = tr.evaluate(step)? {
                if let Some(pb) = &pb {
                    pb.println(format!(
                        "epoch {} step {step}: eval loss {:.4}, {} {:.4}",
                        e.epoch + 1,
                        e.loss,
                        e.metric,
                        e.value
                    ));
                }
                tr.log.evals.push(e);
            }
        }
        tr.log.train_secs = secs_before + t0.elapsed().as_secs_f64();
        let stop_now = ctl.stop_after.is_some_and(|k| step >= k) && step < total;
        if ctl.save_every.is_some_and(|k| k > 0 && step % k == 0)
            || (epoch_end && step < total)
            || stop_now
        {
            save_checkpoint(out, &tr.opt, &tr.log)?;
            write_json(&out.join(LOG_FILE), &tr.log)?;
        }
        if stop_now {
            stopped = true;
            break;
        }
    }
    if let Some(pb) = &pb {
        pb.finish_and_clear();
    }
    if let (false, Some(so)) = (stopped, tr.opts.squeeze.clone()) {
        let t1 = Instant::now();
        let r = crate::squeeze::squeeze(&mut tr, &so, step, ctl.progress)?;
        if ctl.progress {
            eprintln!(
                "squeezed {} -> {} parameters ({:.1}% of dense) in {} iterations: {}",
                r.start_params,
                r.final_params,
                100.0 * r.final_ratio,
                r.iters.len(),
                r.stop_reason
            );
        }
        tr.log.train_secs += t1.elapsed().as_secs_f64();
        tr.log.squeeze = serde_json::to_value(&r).ok();
        tr.log.total_params = tr.model.total_params();
        if let Some(e) = tr.evaluate(step)? {
            tr.log.evals.push(e);
        }
    }
    models::ops::set_training(false);
    refresh(tr.model);
    if !stopped {
        tr.log.finished = true;
        save_model(tr.model, &tr.opts, out)?;
        // The finished log before the checkpoints go, so that a kill in between leaves a
        // finished run rather than neither.
        write_json(&out.join(LOG_FILE), &tr.log)?;
        remove_checkpoints(out);
    } else {
        write_json(&out.join(LOG_FILE), &tr.log)?;
    }
    let secs = t0.elapsed().as_secs_f64();
    Ok(FinetuneReport {
        out: out.to_path_buf(),
        tuned_params: tr.log.tuned_params,
        total_params: tr.log.total_params,
        steps: step,
        total_steps: total,
        final_loss: tr.log.steps.last().map(|s| s.loss),
        eval: tr.log.evals.last().cloned(),
        train_secs: tr.log.train_secs,
        examples_per_sec: examples as f64 / secs.max(1e-9),
        finished: !stopped,
    })
}
