//! LoRA adapters (Hu et al., 2021), file-compatible with Hugging Face PEFT.
//!
//! A [`LoraLinear`] wraps any frozen [`LinearLayer`] (dense, MPO, packed quantized) and adds a
//! trainable low-rank update: `y = base(x) + (α/r) · (dropout(x) · Aᵀ) · Bᵀ`, with `A` `[r, in]`
//! initialised as PEFT does (kaiming_uniform(a=√5), i.e. U(−1/√in, 1/√in), deterministic from
//! the seed and the layer's index) and `B` `[out, r]` zero, so a fresh adapter leaves the model
//! unchanged. Scaling is α/r (rsLoRA and DoRA are not supported and are refused on load).
//!
//! # Files
//! [`save_peft`] writes `adapter_config.json` and `adapter_model.safetensors` the way PEFT's
//! `save_pretrained` does; [`load_peft`] reads them (ours or PEFT's).
//! Keys: `base_model.model.<path>.lora_A.weight` `[r, in]` and `….lora_B.weight` `[out, r]`;
//! `modules_to_save` tensors as `base_model.model.<path>.weight` / `.bias`. A LoRA on an
//! embedding (only when a target entry names it explicitly) is written as PEFT's
//! `lora_embedding_A` `[r, vocab]` = Bᵀ and `lora_embedding_B` `[hidden, r]` = Aᵀ. With a
//! tied llama head the embedding LoRA also changes the head here (it does not in PEFT).
//!
//! # Module paths (our names vs. the HF model class PEFT wrapped)
//! Our module names are the checkpoint's HF names. `<path>` is the module's name inside the
//! transformers class for `task_type`:
//! - llama family (`CAUSAL_LM`, LlamaForCausalLM / Qwen2ForCausalLM): identical
//!   (`model.layers.0.self_attn.q_proj`, `lm_head`).
//! - bert with `SEQ_CLS` (BertForSequenceClassification): the encoder lives under `bert.`, the
//!   head is `classifier`. A checkpoint saved without the `bert.` prefix (a bare BertModel, e.g.
//!   sentence-transformers) gets `bert.` added; `classifier` never has it.
//! - bert with any other task type (BertModel): the `bert.` prefix is dropped.
//!
//! On load a path is matched to our modules as is, then without, then with `bert.`, so an
//! adapter from either class loads into a bert checkpoint with or without the prefix.
//!
//! # Dropout
//! Masks are a pure function of (seed, layer index, step, call number within the step):
//! [`set_step`] sets the step and resets the call counter, so a resumed run draws the same masks.

use crate::mpop::matches;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use models::linear::{matmul_t, Dense};
use models::untrusted;
use models::{Arch, LinearLayer, Model};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::any::Any;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
const PREFIX: &str = "base_model.model.";
/// safetensors metadata key holding [`LoraConfig::seed`] (PEFT ignores metadata; an unknown
/// adapter_config.json key would make it warn).
const SEED_META: &str = "mpolm_seed";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// PEFT semantics: an entry selects a module whose name equals it or ends with
    /// `.{entry}`; entries containing `*` are globs ([`crate::mpop::matches`]); `all-linear`
    /// selects every Linear except embeddings and output heads. Globs and `all-linear` never
    /// select an embedding or a head; a plain entry may name any module.
    pub target_modules: Vec<String>,
    pub seed: u64,
}

impl LoraConfig {
    /// PEFT's defaults: llama family q_proj, v_proj; bert query, value.
    pub fn default_targets(arch: &Model) -> Vec<String> {
        arch.peft_default_targets()
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    /// Whether this config selects the module `name`.
    pub fn selects(&self, name: &str) -> bool {
        self.target_modules.iter().any(|e| entry_selects(e, name))
    }
}

fn is_embedding_or_head(name: &str) -> bool {
    matches!(models::model::component(name), "embedding" | "head")
}

fn entry_selects(entry: &str, name: &str) -> bool {
    if entry == "all-linear" {
        !is_embedding_or_head(name)
    } else if entry.contains('*') {
        !is_embedding_or_head(name) && matches(entry, name)
    } else {
        name == entry || name.ends_with(&format!(".{entry}"))
    }
}

fn err<T>(m: impl Into<String>) -> Result<T> {
    Err(Error::Msg(m.into()))
}

/// splitmix64 finaliser, to turn (seed, layer, step, call) into an RNG seed.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn seed_of(parts: &[u64]) -> u64 {
    parts.iter().fold(0x6C6F_7261u64, |h, &p| mix(h ^ mix(p)))
}

/// A frozen base layer plus a trainable low-rank update.
#[derive(Debug)]
pub struct LoraLinear {
    base: Box<dyn LinearLayer>,
    a: Var,
    b: Var,
    r: usize,
    alpha: f64,
    scale: f64,
    dropout: f64,
    seed: u64,
    index: u64,
    step: AtomicU64,
    calls: AtomicU64,
}

impl LoraLinear {
    /// Wrap `base` with a fresh adapter: A ~ U(−1/√in, 1/√in) from (seed, index), B = 0.
    pub fn new(
        base: Box<dyn LinearLayer>,
        r: usize,
        alpha: f64,
        dropout: f64,
        seed: u64,
        index: u64,
    ) -> Result<Self> {
        let (a, b) = init_ab(base.as_ref(), r, seed, index)?;
        Self::from_tensors(base, a, b, alpha, dropout, seed, index)
    }

    /// Wrap `base` with given A `[r, in]` and B `[out, r]` (copied into new Vars).
    pub fn from_tensors(
        base: Box<dyn LinearLayer>,
        a: Tensor,
        b: Tensor,
        alpha: f64,
        dropout: f64,
        seed: u64,
        index: u64,
    ) -> Result<Self> {
        let r = a.dims().first().copied().unwrap_or(0);
        check_hparams(r, dropout)?;
        check_shape("lora_A", &a, &[r, base.in_features()])?;
        check_shape("lora_B", &b, &[base.out_features(), r])?;
        Ok(Self::build(
            base,
            Var::from_tensor(&a)?,
            Var::from_tensor(&b)?,
            alpha,
            dropout,
            seed,
            index,
        ))
    }

    fn build(
        base: Box<dyn LinearLayer>,
        a: Var,
        b: Var,
        alpha: f64,
        dropout: f64,
        seed: u64,
        index: u64,
    ) -> Self {
        let r = a.dims()[0];
        LoraLinear {
            base,
            a,
            b,
            r,
            alpha,
            scale: alpha / r as f64,
            dropout,
            seed,
            index,
            step: AtomicU64::new(0),
            calls: AtomicU64::new(0),
        }
    }

    pub fn a(&self) -> &Var {
        &self.a
    }
    pub fn b(&self) -> &Var {
        &self.b
    }
    pub fn base(&self) -> &dyn LinearLayer {
        self.base.as_ref()
    }
    /// The base layer, to train it beside the adapter (CaliSr's full fine-tuning phase).
    pub fn base_mut(&mut self) -> &mut dyn LinearLayer {
        self.base.as_mut()
    }
    pub fn r(&self) -> usize {
        self.r
    }
    pub fn alpha(&self) -> f64 {
        self.alpha
    }
    /// α/r.
    pub fn scale(&self) -> f64 {
        self.scale
    }
    pub fn dropout(&self) -> f64 {
        self.dropout
    }
    /// Set the training step and restart the per-step call count (dropout masks).
    pub fn set_step(&self, step: u64) {
        self.step.store(step, Ordering::SeqCst);
        self.calls.store(0, Ordering::SeqCst);
    }

    fn dropped(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if !(models::ops::training() && self.dropout > 0.0) {
            return Ok(x.clone());
        }
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        let step = self.step.load(Ordering::SeqCst);
        let mut rng = StdRng::seed_from_u64(seed_of(&[self.seed, self.index, step, call]));
        let p = self.dropout;
        let keep = (1.0 / (1.0 - p)) as f32;
        let mask: Vec<f32> = (0..x.elem_count())
            .map(|_| if rng.random::<f64>() < p { 0.0 } else { keep })
            .collect();
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        x.mul(&mask)
    }

    /// scale · B·A `[out, in]`.
    pub fn delta(&self) -> candle_core::Result<Tensor> {
        self.b.as_tensor().matmul(self.a.as_tensor())? * self.scale
    }
}

fn check_hparams(r: usize, dropout: f64) -> Result<()> {
    if r == 0 {
        return err("LoRA rank r must be at least 1");
    }
    if !(0.0..1.0).contains(&dropout) {
        return err(format!("LoRA dropout must be in [0, 1), got {dropout}"));
    }
    Ok(())
}

fn check_shape(what: &str, t: &Tensor, want: &[usize]) -> Result<()> {
    if t.dims() != want {
        return err(format!(
            "{what} has shape {:?}, expected {:?}",
            t.dims(),
            want
        ));
    }
    Ok(())
}

/// PEFT's init for one layer: A [r, in] ~ U(−1/√in, 1/√in), B [out, r] = 0, in the base's
/// dtype and device.
fn init_ab(base: &dyn LinearLayer, r: usize, seed: u64, index: u64) -> Result<(Tensor, Tensor)> {
    let (i, o) = (base.in_features(), base.out_features());
    let w = base.weight()?;
    let (dt, dev) = (w.dtype(), w.device().clone());
    let bound = 1.0 / (i.max(1) as f64).sqrt();
    let mut rng = StdRng::seed_from_u64(seed_of(&[seed, index, u64::MAX]));
    let v: Vec<f64> = (0..r * i)
        .map(|_| (rng.random::<f64>() * 2.0 - 1.0) * bound)
        .collect();
    let a = Tensor::from_vec(v, (r, i), &dev)?.to_dtype(dt)?;
    let b = Tensor::zeros((o, r), dt, &dev)?;
    Ok((a, b))
}

impl LinearLayer for LoraLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.base.forward(x)?;
        let h = matmul_t(&self.dropped(x)?, self.a.as_tensor())?;
        let d = matmul_t(&h, self.b.as_tensor())?;
        y + (d * self.scale)?
    }
    fn in_features(&self) -> usize {
        self.base.in_features()
    }
    fn out_features(&self) -> usize {
        self.base.out_features()
    }
    fn num_params(&self) -> usize {
        self.base.num_params() + self.r * (self.in_features() + self.out_features())
    }
    fn weight(&self) -> candle_core::Result<Tensor> {
        self.base.weight()? + self.delta()?
    }
    fn bias(&self) -> Option<Tensor> {
        self.base.bias()
    }
    /// Embedding rows: base rows + scale · B[ids] · A, without materialising B·A.
    fn embed(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let e = self.base.embed(ids)?;
        let rows = self.b.as_tensor().index_select(ids, 0)?;
        e + (rows.matmul(self.a.as_tensor())? * self.scale)?
    }
    fn kind(&self) -> String {
        format!("lora+{}", self.base.kind())
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

fn as_lora(l: &dyn LinearLayer) -> Option<&LoraLinear> {
    l.as_any().downcast_ref::<LoraLinear>()
}

fn some_names(model: &Model) -> String {
    let names: Vec<String> = model.linears().into_iter().map(|(n, _)| n).collect();
    let mut s = names.iter().take(8).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > 8 {
        s.push_str(&format!(", … ({} in all)", names.len()));
    }
    s
}

/// Wrap every layer selected by `cfg` in a fresh [`LoraLinear`]; returns the trainable Vars
/// named `<module>.lora_A.weight` / `<module>.lora_B.weight` (our module names).
pub fn apply(model: &mut Model, cfg: &LoraConfig) -> Result<Vec<(String, Var)>> {
    check_hparams(cfg.r, cfg.dropout)?;
    if cfg.target_modules.is_empty() {
        return err("LoRA target_modules is empty; name modules such as q_proj,v_proj");
    }
    // Validate before touching anything.
    let mut picked = vec![];
    for (idx, (name, lin)) in model.linears().into_iter().enumerate() {
        if !cfg.selects(&name) {
            continue;
        }
        if as_lora(lin.inner()).is_some() {
            return err(format!(
                "{name} already has a LoRA adapter; merge it first (lora::merge)"
            ));
        }
        let (a, b) = init_ab(lin.inner(), cfg.r, cfg.seed, idx as u64)?;
        picked.push((idx, name, a, b));
    }
    if picked.is_empty() {
        return err(format!(
            "LoRA target_modules {:?} match no module of this model; available: {}",
            cfg.target_modules,
            some_names(model)
        ));
    }
    let mut out = vec![];
    let mut it = picked.into_iter().peekable();
    for (idx, (name, lin)) in model.linears_mut().into_iter().enumerate() {
        if it.peek().is_none_or(|p| p.0 != idx) {
            continue;
        }
        let (_, pname, a, b) = it.next().expect("peeked");
        debug_assert_eq!(pname, name);
        let (a, b) = (Var::from_tensor(&a)?, Var::from_tensor(&b)?);
        out.push((format!("{name}.lora_A.weight"), a.clone()));
        out.push((format!("{name}.lora_B.weight"), b.clone()));
        lin.wrap(|base| {
            Box::new(LoraLinear::build(
                base,
                a,
                b,
                cfg.alpha,
                cfg.dropout,
                cfg.seed,
                idx as u64,
            ))
        });
    }
    Ok(out)
}

/// Set the training step of every LoRA layer (and restart their per-step call counts), so
/// dropout masks depend only on (seed, layer, step, call within step).
pub fn set_step(model: &Model, step: u64) {
    for (_, l) in model.linears() {
        if let Some(ll) = as_lora(l.inner()) {
            ll.set_step(step);
        }
    }
}

/// Replace each LoRA layer by a dense layer with the merged weight W + (α/r)·B·A; returns how
/// many were merged.
pub fn merge(model: &mut Model) -> Result<usize> {
    let mut n = 0;
    for (_, lin) in model.linears_mut() {
        let merged = match as_lora(lin.inner()) {
            Some(ll) => Dense {
                weight: ll.weight()?.detach(),
                bias: ll.bias().map(|b| b.detach()),
            },
            None => continue,
        };
        lin.replace(Box::new(merged));
        n += 1;
    }
    Ok(n)
}

/// Our module name → the module path inside the HF class PEFT wraps for `task_type`.
fn peft_path(model: &Model, name: &str, task_type: &str) -> String {
    match &model.arch {
        Arch::Encoder(_) => {
            // sentence-transformers checkpoints store the bare encoder (no `bert.` prefix);
            // PEFT's SEQ_CLS model wraps it with one.
            let bare = model.bert().map_or(true, |b| b.prefix.is_empty());
            let head = name == "classifier" || name.starts_with("classifier.");
            if head {
                name.to_string()
            } else if task_type == "SEQ_CLS" {
                if bare {
                    format!("bert.{name}")
                } else {
                    name.to_string()
                }
            } else {
                name.strip_prefix("bert.").unwrap_or(name).to_string()
            }
        }
        Arch::Causal(_) => name.to_string(),
    }
}

/// A PEFT module path → our module name, if the model has it.
fn our_name(names: &BTreeSet<String>, path: &str) -> Option<String> {
    let mut cands = vec![path.to_string()];
    if let Some(s) = path.strip_prefix("bert.") {
        cands.push(s.to_string());
    }
    cands.push(format!("bert.{path}"));
    cands.into_iter().find(|c| names.contains(c))
}

fn regex_escape(s: &str) -> String {
    let mut o = String::new();
    for c in s.chars() {
        if !(c.is_ascii_alphanumeric() || c == '_') {
            o.push('\\');
        }
        o.push(c);
    }
    o
}

fn io_err(p: &Path, e: impl std::fmt::Display) -> Error {
    Error::Msg(format!("{}: {e}", p.display()))
}

fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let dst = dir.join(name);
    models::tmp::write_file(&dst, bytes).map_err(|e| io_err(&dst, e))
}

/// Write the model's LoRA layers (and `modules_to_save` tensors, named like
/// `classifier.weight` with our module names) as a PEFT adapter directory: `adapter_config.json`
/// and `adapter_model.safetensors`, each written atomically. `task_type`: `CAUSAL_LM` or
/// `SEQ_CLS` (decides the module paths, see the module docs).
pub fn save_peft(
    model: &Model,
    cfg: &LoraConfig,
    base_model: &str,
    task_type: &str,
    modules_to_save: &[(String, Tensor)],
    dir: &Path,
) -> Result<()> {
    let mut tensors: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut wrapped = BTreeSet::new();
    let mut wrapped_paths = vec![];
    for (name, lin) in model.linears() {
        let Some(ll) = as_lora(lin.inner()) else {
            continue;
        };
        if ll.r != cfg.r || ll.alpha != cfg.alpha {
            return err(format!(
                "{name} has LoRA r={} alpha={}, but the config says r={} alpha={}; PEFT files need one rank and alpha",
                ll.r, ll.alpha, cfg.r, cfg.alpha
            ));
        }
        let path = peft_path(model, &name, task_type);
        let k = format!("{PREFIX}{path}");
        let (a, b) = (ll.a.as_tensor().detach(), ll.b.as_tensor().detach());
        if models::model::component(&name) == "embedding" {
            tensors.insert(format!("{k}.lora_embedding_A"), b.t()?.contiguous()?);
            tensors.insert(format!("{k}.lora_embedding_B"), a.t()?.contiguous()?);
        } else {
            tensors.insert(format!("{k}.lora_A.weight"), a.contiguous()?);
            tensors.insert(format!("{k}.lora_B.weight"), b.contiguous()?);
        }
        wrapped.insert(name);
        wrapped_paths.push(path);
    }
    if wrapped.is_empty() {
        return err("the model has no LoRA layers to save (lora::apply or lora::load_peft first)");
    }
    let mut save_modules = BTreeSet::new();
    for (name, t) in modules_to_save {
        let path = peft_path(model, name, task_type);
        let module = path
            .strip_suffix(".weight")
            .or_else(|| path.strip_suffix(".bias"))
            .unwrap_or(&path)
            .to_string();
        save_modules.insert(module);
        let k = format!("{PREFIX}{path}");
        if tensors.contains_key(&k) {
            return err(format!("modules_to_save tensor {name} given twice"));
        }
        tensors.insert(k, t.detach().contiguous()?);
    }
    // target_modules: our list when it selects exactly the wrapped layers with PEFT's own
    // (suffix) semantics, else a regex that fullmatches exactly the wrapped paths.
    let all: Vec<String> = model.linears().into_iter().map(|(n, _)| n).collect();
    let plain = cfg
        .target_modules
        .iter()
        .all(|e| !e.contains('*') && e != "all-linear" && !e.is_empty());
    let same = all.iter().all(|n| cfg.selects(n) == wrapped.contains(n));
    let targets = if plain && same {
        let mut t = cfg.target_modules.clone();
        t.sort();
        t.dedup();
        json!(t)
    } else {
        let alts: Vec<String> = wrapped_paths.iter().map(|p| regex_escape(p)).collect();
        json!(format!("^(?:{})$", alts.join("|")))
    };
    let config = json!({
        "alpha_pattern": {},
        "auto_mapping": null,
        "base_model_name_or_path": peft_base(model, base_model),
        "mpolm_base_model": base_model,
        "bias": "none",
        "exclude_modules": null,
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layer_replication": null,
        "layers_pattern": null,
        "layers_to_transform": null,
        "lora_alpha": cfg.alpha,
        "lora_bias": false,
        "lora_dropout": cfg.dropout,
        "modules_to_save": if save_modules.is_empty() { json!(null) } else { json!(save_modules) },
        "peft_type": "LORA",
        "r": cfg.r,
        "rank_pattern": {},
        "revision": null,
        "target_modules": targets,
        "task_type": task_type,
        "use_dora": false,
        "use_rslora": false,
    });
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.insert(SEED_META.to_string(), cfg.seed.to_string());
    let bytes = safetensors::tensor::serialize(tensors.iter(), Some(meta))
        .map_err(|e| io_err(&dir.join(ADAPTER_WEIGHTS), e))?;
    write_atomic(dir, ADAPTER_WEIGHTS, &bytes)?;
    let text = serde_json::to_string_pretty(&config).map_err(|e| Error::Msg(e.to_string()))?;
    write_atomic(dir, ADAPTER_CONFIG, text.as_bytes())?;
    Ok(())
}

enum Plan {
    Lora {
        idx: usize,
        a: Tensor,
        b: Tensor,
    },
    Replace {
        idx: usize,
        weight: Tensor,
        bias: Option<Tensor>,
    },
    Classifier {
        weight: Tensor,
        bias: Tensor,
    },
}

/// Whether `dir` is an adapter directory (holds `adapter_config.json`).
pub fn is_adapter_dir(dir: &Path) -> bool {
    dir.join(ADAPTER_CONFIG).exists()
}

/// What PEFT's `AutoPeftModel` is told the base is: the directory the base model was read
/// from when it is a plain HF directory (an alias means nothing to PEFT), the upstream
/// repository id for an alias cached as GGUF, else the name as given (a GGUF file, a method
/// checkpoint, another adapter: mpolm resolves those itself).
fn peft_base(model: &Model, base_model: &str) -> String {
    let plain_dir = crate::Kind::of(base_model) == crate::Kind::Plain
        && model.source.format == models::hub::Format::HfDir;
    if let Some(Ok(p)) = plain_dir.then(|| std::fs::canonicalize(&model.source.path)) {
        return p.display().to_string();
    }
    // An alias cached as GGUF: PEFT cannot load that file, but it resolves the upstream
    // repository the GGUF was converted from (the alias stays in `mpolm_base_model`).
    match models::hub::spec(base_model) {
        Some(s) if !Path::new(base_model).exists() => s.upstream.to_string(),
        _ => base_model.to_string(),
    }
}

/// The base model of the adapter `dir` as mpolm names it: `mpolm_base_model` (the alias or
/// path given when mpolm wrote it, portable across machines), else PEFT's
/// `base_model_name_or_path`.
pub fn adapter_base(dir: &Path) -> Result<String> {
    let cpath = dir.join(ADAPTER_CONFIG);
    let text = untrusted::read_text(&cpath, untrusted::MAX_JSON_BYTES)?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| io_err(&cpath, format!("invalid JSON: {e}")))?;
    let named = v
        .get("mpolm_base_model")
        .and_then(|b| b.as_str())
        .filter(|b| !b.is_empty());
    match named.or_else(|| v.get("base_model_name_or_path").and_then(|b| b.as_str())) {
        // It becomes a path or alias, and part of messages: no control characters.
        Some(b) if b.chars().any(char::is_control) => err(format!(
            "{}: base_model_name_or_path '{}' contains control characters",
            cpath.display(),
            untrusted::escape(b)
        )),
        Some(b) if !b.is_empty() => Ok(b.to_string()),
        _ => err(format!(
            "{}: no base_model_name_or_path; the adapter does not say which model it belongs to",
            cpath.display()
        )),
    }
}

/// Follow `base_model_name_or_path` from the adapter `dir` through every adapter it names
/// (an adapter may be trained on top of another) to a model that is not an adapter. Returns
/// that model and the adapters to apply to it, innermost first. An adapter that is its own
/// base, adapters naming each other, or a chain deeper than
/// [`untrusted::MAX_ADAPTER_DEPTH`] are errors (following them recursed until the stack
/// overflowed).
pub fn adapter_chain(dir: &Path) -> Result<(String, Vec<PathBuf>)> {
    let mut chain = vec![dir.to_path_buf()];
    let mut seen = vec![std::fs::canonicalize(dir).map_err(|e| io_err(dir, e))?];
    loop {
        let cur = chain.last().expect("starts non-empty");
        let base = adapter_base(cur)?;
        let bp = Path::new(&base);
        if !is_adapter_dir(bp) {
            chain.reverse();
            return Ok((base, chain));
        }
        let canon = std::fs::canonicalize(bp).map_err(|e| io_err(bp, e))?;
        if let Some(k) = seen.iter().position(|s| *s == canon) {
            return err(format!(
                "{}: base_model_name_or_path '{}' leads back to the adapter {} (a cycle); point it at the base model",
                cur.join(ADAPTER_CONFIG).display(),
                untrusted::escape(&base),
                chain[k].display()
            ));
        }
        if chain.len() >= untrusted::MAX_ADAPTER_DEPTH {
            return err(format!(
                "{}: adapters stacked more than {} deep",
                dir.display(),
                untrusted::MAX_ADAPTER_DEPTH
            ));
        }
        seen.push(canon);
        chain.push(bp.to_path_buf());
    }
}

/// Read a PEFT LoRA adapter directory (written by PEFT or by [`save_peft`]), check every
/// tensor against the model, and apply it: LoRA layers wrap the matching modules and
/// `modules_to_save` tensors replace theirs (a bert `classifier` is attached if absent).
/// Nothing is changed when any check fails. Which modules get a LoRA is decided by the
/// tensors present, not by `target_modules`; the returned config carries PEFT's
/// `target_modules` as stored (a list, or one regex string) and the seed from the safetensors
/// metadata (0 for adapters not written by mpolm).
pub fn load_peft(model: &mut Model, dir: &Path) -> Result<LoraConfig> {
    let cpath = dir.join(ADAPTER_CONFIG);
    let text = untrusted::read_text(&cpath, untrusted::MAX_JSON_BYTES)?;
    let c: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| io_err(&cpath, format!("invalid JSON: {e}")))?;
    let bad = |m: String| -> Result<LoraConfig> { err(format!("{}: {m}", cpath.display())) };
    if let Some(t) = c.get("peft_type").and_then(|v| v.as_str()) {
        if t != "LORA" {
            return bad(format!(
                "peft_type {} is not supported (only LORA)",
                untrusted::escape(t)
            ));
        }
    }
    let truthy = |k: &str| match c.get(k) {
        None | Some(serde_json::Value::Null) => false,
        Some(serde_json::Value::Bool(b)) => *b,
        Some(serde_json::Value::Object(o)) => !o.is_empty(),
        Some(serde_json::Value::Array(a)) => !a.is_empty(),
        Some(serde_json::Value::String(s)) => !s.is_empty(),
        Some(_) => true,
    };
    for k in [
        "use_rslora",
        "use_dora",
        "rank_pattern",
        "alpha_pattern",
        "fan_in_fan_out",
        "lora_bias",
        "layer_replication",
        "target_parameters",
        "trainable_token_indices",
        "alora_invocation_tokens",
        "use_qalora",
        "use_bdlora",
    ] {
        if truthy(k) {
            return bad(format!(
                "{k} is set; this LoRA loader supports plain LoRA only"
            ));
        }
    }
    if let Some(b) = c.get("bias").and_then(|v| v.as_str()) {
        if b != "none" {
            return bad(format!(
                "bias \"{}\" is not supported (only \"none\")",
                untrusted::escape(b)
            ));
        }
    }
    let r = match c.get("r").and_then(|v| v.as_u64()) {
        Some(r) if r > 0 => r as usize,
        _ => return bad("missing or invalid \"r\"".into()),
    };
    let alpha = c.get("lora_alpha").and_then(|v| v.as_f64()).unwrap_or(8.0);
    let dropout = c
        .get("lora_dropout")
        .and_then(|v| v.as_f64())
        .unwrap_or(0.0);
    check_hparams(r, dropout)?;
    let target_modules: Vec<String> = match c.get("target_modules") {
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_str().map(String::from))
            .collect(),
        Some(serde_json::Value::String(s)) => vec![s.clone()],
        _ => vec![],
    };

    let wpath = dir.join(ADAPTER_WEIGHTS);
    if !wpath.exists() {
        return err(format!(
            "{}: missing (only safetensors adapters are supported)",
            wpath.display()
        ));
    }
    let bytes = {
        use std::io::Read;
        let (f, len) = untrusted::open_regular(&wpath)?;
        let mut b = Vec::with_capacity(len as usize);
        f.take(len)
            .read_to_end(&mut b)
            .map_err(|e| io_err(&wpath, e))?;
        b
    };
    let seed = safetensors::SafeTensors::read_metadata(&bytes)
        .ok()
        .and_then(|(_, m)| m.metadata().as_ref()?.get(SEED_META)?.parse::<u64>().ok())
        .unwrap_or(0);
    let raw = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .map_err(|e| io_err(&wpath, e))?;
    let werr = |m: String| -> Error { Error::Msg(format!("{}: {m}", wpath.display())) };

    let names: Vec<String> = model.linears().into_iter().map(|(n, _)| n).collect();
    let name_set: BTreeSet<String> = names.iter().cloned().collect();
    let index_of = |n: &str| names.iter().position(|x| x == n);
    let linears = model.linears();
    let dims = |idx: usize| (linears[idx].1.in_features(), linears[idx].1.out_features());

    // Group tensors by module.
    #[derive(Default)]
    struct Parts {
        a: Option<(String, Tensor)>,
        b: Option<(String, Tensor)>,
        emb: bool,
        weight: Option<(String, Tensor)>,
        bias: Option<(String, Tensor)>,
    }
    let mut mods: BTreeMap<String, Parts> = BTreeMap::new();
    for (key, t) in raw {
        let t = t.to_dtype(DType::F32)?;
        let Some(rest) = key.strip_prefix(PREFIX) else {
            return Err(werr(format!("tensor {key} does not start with {PREFIX}")));
        };
        let found = [
            (".lora_A.weight", 0, false),
            (".lora_B.weight", 1, false),
            (".lora_embedding_A", 0, true),
            (".lora_embedding_B", 1, true),
            (".weight", 2, false),
            (".bias", 3, false),
        ]
        .into_iter()
        .find_map(|(suf, kind, emb)| rest.strip_suffix(suf).map(|m| (m.to_string(), kind, emb)));
        let Some((module, kind, emb)) = found else {
            return Err(werr(format!(
                "tensor {key} is neither a LoRA nor a modules_to_save tensor"
            )));
        };
        let module = match module.strip_suffix(".base_layer") {
            Some(m) if kind >= 2 => m.to_string(),
            _ => module,
        };
        let p = mods.entry(module).or_default();
        p.emb |= emb;
        let slot = match kind {
            0 => &mut p.a,
            1 => &mut p.b,
            2 => &mut p.weight,
            _ => &mut p.bias,
        };
        *slot = Some((key, t));
    }

    let mut plan = vec![];
    let is_bert = matches!(model.arch, Arch::Encoder(_));
    for (module, p) in mods {
        let target = our_name(&name_set, &module);
        // Full tensors (modules_to_save, or a targeted embedding's base weight).
        if p.weight.is_some() || p.bias.is_some() {
            if is_bert
                && module == "classifier"
                && target.as_deref().is_none_or(|t| t == "classifier")
            {
                let (Some((kw, w)), Some((kb, b))) = (p.weight, p.bias) else {
                    return Err(werr(
                        "classifier needs both classifier.weight and classifier.bias".into(),
                    ));
                };
                let h = match &model.arch {
                    Arch::Encoder(e) => e.hidden_size(),
                    Arch::Causal(l) => l.hidden_size(),
                };
                let n = w.dims().first().copied().unwrap_or(0);
                if w.dims() != [n, h] || n == 0 {
                    return Err(werr(format!(
                        "{kw} has shape {:?}, expected [num_labels, {h}]",
                        w.dims()
                    )));
                }
                if b.dims() != [n] {
                    return Err(werr(format!(
                        "{kb} has shape {:?}, expected [{n}]",
                        b.dims()
                    )));
                }
                plan.push(Plan::Classifier { weight: w, bias: b });
            } else {
                let Some(our) = target.clone() else {
                    let k = p.weight.as_ref().or(p.bias.as_ref()).map(|x| x.0.clone());
                    return Err(werr(format!(
                        "modules_to_save tensor {}: this model has no module {module}",
                        k.unwrap_or_default()
                    )));
                };
                let idx = index_of(&our).expect("name from the model");
                let (i, o) = dims(idx);
                let weight = match p.weight {
                    Some((k, w)) => {
                        if w.dims() != [o, i] {
                            return Err(werr(format!(
                                "{k} has shape {:?}, but {our} needs [{o}, {i}]",
                                w.dims()
                            )));
                        }
                        w
                    }
                    None => linears[idx].1.weight()?,
                };
                let bias = match p.bias {
                    Some((k, b)) => {
                        if b.dims() != [o] {
                            return Err(werr(format!(
                                "{k} has shape {:?}, but {our} needs [{o}]",
                                b.dims()
                            )));
                        }
                        Some(b)
                    }
                    None => linears[idx].1.bias(),
                };
                plan.push(Plan::Replace { idx, weight, bias });
            }
        }
        if p.a.is_none() && p.b.is_none() {
            continue;
        }
        let (Some((ka, a)), Some((kb, b))) = (p.a, p.b) else {
            return Err(werr(format!("{module} has only one of lora_A / lora_B")));
        };
        let Some(our) = target else {
            return Err(werr(format!(
                "tensor {ka} targets module {module}, which this model does not have (modules: {})",
                some_names(model)
            )));
        };
        let idx = index_of(&our).expect("name from the model");
        if as_lora(linears[idx].1.inner()).is_some() {
            return Err(werr(format!(
                "{our} already has a LoRA adapter; merge it first"
            )));
        }
        let (i, o) = dims(idx);
        // Shapes as stored: Linear A [r, in], B [out, r]; embedding A [r, vocab], B [hidden, r]
        // (our in = hidden, out = vocab for an embedding).
        let (want_a, want_b) = if p.emb {
            ([r, o], [i, r])
        } else {
            ([r, i], [o, r])
        };
        for (k, t, want) in [(&ka, &a, want_a), (&kb, &b, want_b)] {
            if t.dims() != want {
                return Err(werr(format!(
                    "{k} has shape {:?} but this model's {our} needs {want:?} (r={r}, in={i}, out={o}); the adapter was made for another model",
                    t.dims()
                )));
            }
        }
        let (a, b) = if p.emb {
            (b.t()?.contiguous()?, a.t()?.contiguous()?)
        } else {
            (a, b)
        };
        plan.push(Plan::Lora { idx, a, b });
    }
    if !plan.iter().any(|p| matches!(p, Plan::Lora { .. })) {
        return Err(werr("no lora_A / lora_B tensors found".into()));
    }
    drop(linears);

    // Apply: replacements first, so a LoRA never wraps a layer about to be replaced.
    let mut loras = HashMap::new();
    let mut repl = HashMap::new();
    for p in plan {
        match p {
            Plan::Lora { idx, a, b } => {
                loras.insert(idx, (a, b));
            }
            Plan::Replace { idx, weight, bias } => {
                repl.insert(idx, (weight, bias));
            }
            Plan::Classifier { weight, bias } => {
                if let Arch::Encoder(bt) = &mut model.arch {
                    bt.set_classifier(weight, bias);
                }
            }
        }
    }
    for (idx, (_, lin)) in model.linears_mut().into_iter().enumerate() {
        if let Some((weight, bias)) = repl.remove(&idx) {
            lin.replace(Box::new(Dense { weight, bias }));
        }
        if let Some((a, b)) = loras.remove(&idx) {
            let (a, b) = (Var::from_tensor(&a)?, Var::from_tensor(&b)?);
            lin.wrap(|base| {
                Box::new(LoraLinear::build(
                    base, a, b, alpha, dropout, seed, idx as u64,
                ))
            });
        }
    }
    Ok(LoraConfig {
        r,
        alpha,
        dropout,
        target_modules,
        seed,
    })
}
