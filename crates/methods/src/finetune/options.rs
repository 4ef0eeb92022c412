//! What a run computes (task, method, hyper-parameters: the resume fingerprint) and how it is
//! driven, with the checks made before any work.

use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// Sentence classification with a BERT encoder (GLUE SST-2 or any labelled TSV/JSONL).
    Sst2,
    /// Causal language modelling on text.
    Lm,
    /// Masked-LM (continued) pre-training of an encoder on text: BERT's 15% / 80-10-10 masking.
    Mlm,
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
    /// OPF: the most important matrices train as long exact MPO chains, contracted back at
    /// the end ([`crate::opf`]).
    Opf,
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
    /// OPF's selection, scores and chains (with `method` opf; its defaults when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opf: Option<crate::opf::OpfOptions>,
    /// MPOE: probability p_b that a step leaves the experts' shared central tensors unchanged
    /// (1 freezes them); None = never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub central_mask_p: Option<f64>,
    /// Start in full fine-tuning and switch to `method` by stable rank ([`crate::calisr`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calisr: Option<crate::calisr::CalisrOptions>,
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
            opf: None,
            central_mask_p: None,
            calisr: None,
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

pub(crate) fn fingerprint(o: &FinetuneOptions) -> Value {
    serde_json::to_value(o).unwrap_or(Value::Null)
}

pub(crate) fn check_options(o: &FinetuneOptions) -> Result<()> {
    let bad = |option: &'static str, s: String| Err(Error::option(option, s));
    if o.batch == 0 {
        return bad("batch", "`batch` must be at least 1".into());
    }
    if o.epochs == 0 && o.max_steps.is_none() {
        return bad("epochs", "`epochs` must be at least 1".into());
    }
    if !(o.lr > 0.0) || !o.lr.is_finite() {
        return bad(
            "lr",
            format!("`lr` must be a positive number, got {}", o.lr),
        );
    }
    if let Some(l) = o.mpo_lr {
        if !(l >= 0.0) || !l.is_finite() {
            return bad("mpo_lr", format!("`mpo_lr` must be >= 0, got {l}"));
        }
    }
    if !(0.0..1.0).contains(&o.lora_dropout) {
        return bad(
            "lora_dropout",
            format!("`lora_dropout` must be in [0, 1), got {}", o.lora_dropout),
        );
    }
    if o.method == Method::Lora && o.lora_r == 0 {
        return bad("lora_r", "`lora_r` must be at least 1".into());
    }
    if o.max_len < 2 {
        return bad("max_len", "`max_len` must be at least 2".into());
    }
    // Zero counts would finish "successfully" with an untrained model.
    for (name, v) in [
        ("max_steps", o.max_steps),
        ("limit", o.limit),
        ("eval_limit", o.eval_limit),
    ] {
        if v == Some(0) {
            return bad(name, format!("`{name}` must be at least 1"));
        }
    }
    crate::calisr::check(o)?;
    if o.eval_batch == 0 {
        return bad("eval_batch", "`eval_batch` must be at least 1".into());
    }
    if !(0.0..=1.0).contains(&o.warmup_ratio) {
        return bad(
            "warmup_ratio",
            format!("`warmup_ratio` must be in [0, 1], got {}", o.warmup_ratio),
        );
    }
    for (name, v) in [
        ("max_grad_norm", o.max_grad_norm),
        ("weight_decay", o.weight_decay),
    ] {
        if !(v >= 0.0) || !v.is_finite() {
            return bad(
                name,
                format!("`{name}` must be a finite number >= 0, got {v}"),
            );
        }
    }
    if o.method == Method::Lora && (!(o.lora_alpha > 0.0) || !o.lora_alpha.is_finite()) {
        return bad(
            "lora_alpha",
            format!(
                "`lora_alpha` must be a positive number, got {}",
                o.lora_alpha
            ),
        );
    }
    crate::opf::check_options(o)
}

/// A LoRA rank above a targeted matrix's smaller side adds parameters without adding rank
/// (and a huge one allocates r × features before failing).
pub(crate) fn check_lora_rank(m: &Model, o: &FinetuneOptions) -> Result<()> {
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
        Some((dim, name)) if o.lora_r > dim => Err(Error::option("lora_r", format!(
            "`lora_r` {} is out of range: the targeted matrix {name} has {dim} as its smaller dimension (use 1..={dim})",
            o.lora_r
        ))),
        _ => Ok(()),
    }
}
