//! OPF (Gao et al., ACL 2023): over-parameterized fine-tuning. The most important weight
//! matrices are replaced by their exact, untruncated MPO over a long 1-padded chain
//! ([`mpo::MpoShape::opf_chain`]: a deep linear factorization with several times the
//! parameters), every tensor trains, and at the end each chain is contracted back, so the
//! saved model is a plain dense checkpoint of the original architecture and size.
//!
//! Importance per matrix (methods.md §3) on a few training batches: zero-ablation
//! |L(W) − L(W = 0)|, first-order Taylor Σ|∂L/∂W ⊙ W|, or the released code's Fisher
//! Σ_batches mean(g²); the top-N of each module group (Q, K, V, attention-out, FFN-in, FFN-out)
//! are decomposed at once (static) or n per group every T steps (dynamic). Unlike the released
//! code, whose optimizer is built before the decomposition and never sees the new tensors, the
//! chains join the optimizer when they appear ([`Trainer::rebuild_optimizer`]) and the dense
//! weight they replace leaves it.

use crate::finetune::data::Batch;
use crate::finetune::{self, FinetuneOptions, Method, TrainHook, Trainer};
use crate::mpop::MpoLayer;
use crate::{Error, Result};
use candle_core::{Device, Tensor, Var};
use models::linear::Dense;
use models::Model;
use mpo::{Mpo, MpoCores, MpoLinear, MpoShape};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Select {
    /// Score once, decompose the top-N of each group, then train.
    Static,
    /// Every `every` steps re-score and decompose the next `per_round` of each group until N.
    Dynamic,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Score {
    /// |mean loss − mean loss with W = 0| (the paper's static criterion).
    Ablation,
    /// Σ_entries |ḡ ⊙ W|, ḡ the gradient of the mean loss over the scoring batches (the
    /// paper's dynamic criterion).
    Taylor,
    /// Σ_batches mean(g_b²) (the released code's `calculate_fisher`, without its per-tensor
    /// gradient clipping).
    Fisher,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpfOptions {
    pub select: Select,
    pub score: Score,
    /// Matrices decomposed per module group in all (N).
    pub top_n: usize,
    /// Dynamic: steps between rounds (default: the run split evenly over the rounds).
    pub every: Option<usize>,
    /// Dynamic: matrices added per group and round (n).
    pub per_round: usize,
    /// Chain length: 2 is OPF-SVD, 11 the paper's chains, 15 the released code's.
    pub sites: usize,
    /// Training batches the scores are computed on.
    pub score_batches: usize,
}

impl Default for OpfOptions {
    fn default() -> Self {
        OpfOptions {
            select: Select::Static,
            score: Score::Ablation,
            top_n: 1,
            every: None,
            per_round: 1,
            sites: 11,
            score_batches: 4,
        }
    }
}

/// The module groups OPF ranks matrices within.
pub const GROUPS: [&str; 6] = ["Q", "K", "V", "AO", "FFN-in", "FFN-out"];

/// The group of a Linear by its HF name (BERT and llama-family names); `None` for the
/// embedding, pooler, heads and anything else.
pub fn group_of(name: &str) -> Option<&'static str> {
    let last = name.rsplit('.').next().unwrap_or(name);
    Some(
        if name.ends_with("attention.self.query") || last == "q_proj" {
            "Q"
        } else if name.ends_with("attention.self.key") || last == "k_proj" {
            "K"
        } else if name.ends_with("attention.self.value") || last == "v_proj" {
            "V"
        } else if name.ends_with("attention.output.dense") || last == "o_proj" {
            "AO"
        } else if name.ends_with("intermediate.dense") || last == "gate_proj" || last == "up_proj" {
            "FFN-in"
        } else if name.ends_with(".output.dense") || last == "down_proj" {
            "FFN-out"
        } else {
            return None;
        },
    )
}

/// Every matrix OPF may decompose, with its group, in the model's order.
pub fn candidates(m: &Model) -> Vec<(String, &'static str)> {
    m.linears()
        .into_iter()
        .filter_map(|(n, _)| group_of(&n).map(|g| (n, g)))
        .collect()
}

/// The options alone: ranges, and `opf` options only with `method` opf.
pub(crate) fn check_options(o: &FinetuneOptions) -> Result<()> {
    let Some(p) = &o.opf else {
        return Ok(());
    };
    if o.method != Method::Opf {
        return Err(Error::option(
            "method",
            "the `opf_select`, `opf_score`, `opf_top_n`, `opf_every`, `opf_per_round` and `opf_sites` options apply only with `method` opf",
        ));
    }
    if p.top_n == 0 {
        return Err(Error::option(
            "opf_top_n",
            "`method` opf needs `opf_top_n` N >= 1 (matrices decomposed per module group)",
        ));
    }
    if !(2..=mpo::OPF_MAX_SITES).contains(&p.sites) {
        return Err(Error::option(
            "opf_sites",
            format!(
                "`opf_sites` {} is out of range: an OPF chain has 2 (OPF-SVD) to {} sites",
                p.sites,
                mpo::OPF_MAX_SITES
            ),
        ));
    }
    if p.score_batches == 0 {
        return Err(Error::option(
            "opf_score_batches",
            "`opf_score_batches` must be at least 1",
        ));
    }
    match p.select {
        Select::Static => {
            if p.every.is_some() || p.per_round != 1 {
                return Err(Error::option(
                    "opf_select",
                    "`opf_every` and `opf_per_round` apply only with `opf_select` dynamic",
                ));
            }
        }
        Select::Dynamic => {
            if p.every == Some(0) {
                return Err(Error::option("opf_every", "`opf_every` must be at least 1"));
            }
            if p.per_round == 0 || p.per_round > p.top_n {
                return Err(Error::option(
                    "opf_per_round",
                    format!(
                        "`opf_per_round` {} is out of range: use 1..={} (at most `opf_top_n`)",
                        p.per_round, p.top_n
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// The options against the model: a dense model, N within every group, a chain for every
/// candidate matrix.
pub(crate) fn check_model(m: &Model, o: &FinetuneOptions) -> Result<()> {
    if o.method != Method::Opf {
        return Ok(());
    }
    let p = o.opf.clone().unwrap_or_default();
    if finetune::has_mpo(m) {
        return Err(Error::option("method", format!(
            "{}: an MPO checkpoint cannot be tuned with `method` opf, which decomposes dense matrices; contract it to a dense model first",
            o.model
        )));
    }
    let c = candidates(m);
    for g in GROUPS {
        let k = c.iter().filter(|(_, x)| *x == g).count();
        if k > 0 && p.top_n > k {
            return Err(Error::option(
                "opf_top_n",
                format!(
                    "`opf_top_n` {} is larger than the module group {g} of {} ({k} matrices); use 1..={k}",
                    p.top_n, o.model
                ),
            ));
        }
    }
    if c.is_empty() {
        return Err(Error::option(
            "method",
            format!(
                "{} has no attention or FFN matrix for `method` opf to decompose",
                o.model
            ),
        ));
    }
    for (name, l) in m.linears() {
        if group_of(&name).is_none() {
            continue;
        }
        let (r, k) = (l.out_features(), l.in_features());
        MpoShape::opf_chain(r, k, p.sites)
            .map_err(|e| Error::option("opf_sites", format!("{name}: {e}")))?;
    }
    Ok(())
}

fn dense_mut<'a>(m: &'a mut Model, name: &str) -> Result<&'a mut Dense> {
    m.linears_mut()
        .into_iter()
        .find(|(n, _)| n == name)
        .and_then(|(_, l)| l.inner_mut().as_any_mut().downcast_mut::<Dense>())
        .ok_or_else(|| Error::Msg(format!("{name} is not a dense matrix of this model")))
}

fn mean_loss(m: &Model, batches: &[Batch]) -> Result<f64> {
    let mut s = 0.0;
    for b in batches {
        s += finetune::batch_loss(m, b)?.to_scalar::<f32>()? as f64;
    }
    Ok(s / batches.len().max(1) as f64)
}

/// The importance of each matrix in `names` (dense Linears of `m`) on `batches`.
pub fn scores(
    m: &mut Model,
    batches: &[Batch],
    score: Score,
    names: &[String],
) -> Result<Vec<f64>> {
    if batches.is_empty() {
        return Err(Error::Msg("OPF scores need at least one batch".into()));
    }
    let was = models::ops::training();
    let r = scores_inner(m, batches, score, names);
    models::ops::set_training(was);
    r
}

fn scores_inner(
    m: &mut Model,
    batches: &[Batch],
    score: Score,
    names: &[String],
) -> Result<Vec<f64>> {
    if score == Score::Ablation {
        models::ops::set_training(false);
        finetune::refresh(m);
        let base = mean_loss(m, batches)?;
        let mut out = Vec::with_capacity(names.len());
        for n in names {
            let d = dense_mut(m, n)?;
            let zero = d.weight.zeros_like()?;
            let w = std::mem::replace(&mut d.weight, zero);
            let l = mean_loss(m, batches);
            dense_mut(m, n)?.weight = w;
            out.push((base - l?).abs());
        }
        return Ok(out);
    }
    models::ops::set_training(true);
    // The gradient is taken with respect to each scored weight; one that is not yet a
    // variable (outside a training run) becomes one in place, which changes no value.
    let mut ws = Vec::with_capacity(names.len());
    for n in names {
        let d = dense_mut(m, n)?;
        if !d.weight.is_variable() {
            d.weight = Var::from_tensor(&d.weight)?.as_tensor().clone();
        }
        ws.push(d.weight.clone());
    }
    let mut acc: Vec<Option<Tensor>> = vec![None; names.len()];
    let mut fisher = vec![0.0f64; names.len()];
    for b in batches {
        let grads = finetune::batch_loss(m, b)?.backward()?;
        for (k, w) in ws.iter().enumerate() {
            let Some(g) = grads.get(w) else { continue };
            match score {
                Score::Fisher => {
                    fisher[k] += g.sqr()?.mean_all()?.to_scalar::<f32>()? as f64;
                }
                _ => {
                    acc[k] = Some(match acc[k].take() {
                        Some(a) => (a + g)?,
                        None => g.clone(),
                    });
                }
            }
        }
    }
    if score == Score::Fisher {
        return Ok(fisher);
    }
    let nb = batches.len() as f64;
    ws.iter()
        .zip(acc)
        .map(|(w, g)| {
            Ok(match g {
                Some(g) => (g * w)?.abs()?.sum_all()?.to_scalar::<f32>()? as f64 / nb,
                None => 0.0,
            })
        })
        .collect()
}

/// Replace the dense matrices `names` by their exact MPO over the OPF chain of `sites` sites,
/// keeping each bias (the same variable, so its optimizer moments carry over). Returns the
/// parameters added.
pub fn decompose(m: &mut Model, names: &[String], sites: usize) -> Result<usize> {
    let mut added = 0usize;
    for n in names {
        let d = dense_mut(m, n)?;
        let w = d.weight.detach();
        let (rows, cols) = w.dims2()?;
        let shape = MpoShape::opf_chain(rows, cols, sites)?;
        let data: Vec<f32> = w.flatten_all()?.to_vec1()?;
        let chain = Mpo::<f32>::decompose(&data, &shape)?;
        added += chain.num_params().saturating_sub(rows * cols);
        let layer = MpoLinear::new(MpoCores::from_mpo(&chain, &Device::Cpu)?, d.bias.clone())?;
        let (_, lin) = m
            .linears_mut()
            .into_iter()
            .find(|(x, _)| x == n)
            .expect("found above");
        lin.replace(Box::new(MpoLayer::new(layer)));
    }
    Ok(added)
}

/// Contract the chains of `names` back into dense matrices (the bias kept).
pub fn contract(m: &mut Model, names: &[String]) -> Result<()> {
    for n in names {
        let (_, lin) = m
            .linears_mut()
            .into_iter()
            .find(|(x, _)| x == n)
            .ok_or_else(|| Error::Msg(format!("{n}: no such matrix")))?;
        let Some(mp) = lin.inner().as_any().downcast_ref::<MpoLayer>() else {
            return Err(Error::Msg(format!("{n} is not an OPF chain")));
        };
        let weight = mp.inner.to_dense()?.detach().contiguous()?;
        let bias = mp.inner.bias().map(|b| b.as_tensor().detach());
        lin.replace(Box::new(Dense { weight, bias }));
    }
    Ok(())
}

/// One scoring round: the step it ran before, what it chose and every score it saw.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Round {
    pub step: usize,
    pub chosen: Vec<String>,
    pub scores: BTreeMap<String, f64>,
}

/// What the OPF hook records in the log (and restores from on resume).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct OpfState {
    pub rounds: Vec<Round>,
    /// Steps between dynamic rounds in effect.
    pub every: usize,
    /// Model parameters while training (chains in place) and after contraction.
    pub train_params: usize,
    pub deploy_params: usize,
    /// One timed forward + backward pass on the same batch: the dense model before the first
    /// decomposition, and with every chain in place after the last.
    pub dense_pass_secs: Option<f64>,
    pub opf_pass_secs: Option<f64>,
    /// opf_pass_secs / dense_pass_secs.
    pub step_overhead: Option<f64>,
}

pub struct OpfHook {
    o: OpfOptions,
    st: OpfState,
}

impl OpfHook {
    pub fn new(o: &FinetuneOptions) -> Self {
        OpfHook {
            o: o.opf.clone().unwrap_or_default(),
            st: OpfState::default(),
        }
    }

    fn rounds_total(&self) -> usize {
        match self.o.select {
            Select::Static => 1,
            Select::Dynamic => self.o.top_n.div_ceil(self.o.per_round),
        }
    }

    fn chosen(&self) -> Vec<String> {
        self.st
            .rounds
            .iter()
            .flat_map(|r| r.chosen.iter().cloned())
            .collect()
    }

    fn timed_pass(tr: &mut Trainer<'_>, step: usize) -> Result<f64> {
        let b = tr.batch_at(step)?;
        models::ops::set_training(true);
        let t0 = Instant::now();
        let g = finetune::batch_loss(tr.model, &b)?.backward()?;
        drop(g);
        Ok(t0.elapsed().as_secs_f64())
    }

    fn round(&mut self, tr: &mut Trainer<'_>, step: usize) -> Result<()> {
        if self.st.dense_pass_secs.is_none() {
            self.st.dense_pass_secs = Some(Self::timed_pass(tr, step)?);
        }
        let done = self.chosen();
        let quota = match self.o.select {
            Select::Static => self.o.top_n,
            Select::Dynamic => self.o.per_round,
        };
        let pool: Vec<(String, &'static str)> = candidates(tr.model)
            .into_iter()
            .filter(|(n, _)| !done.contains(n))
            .collect();
        let names: Vec<String> = pool.iter().map(|(n, _)| n.clone()).collect();
        let batches = (step..step + self.o.score_batches)
            .map(|s| tr.batch_at(s))
            .collect::<Result<Vec<_>>>()?;
        let sc = scores(tr.model, &batches, self.o.score, &names)?;
        let mut chosen = Vec::new();
        for g in GROUPS {
            let have = done.iter().filter(|n| group_of(n) == Some(g)).count();
            let take = quota.min(self.o.top_n.saturating_sub(have));
            let mut ranked: Vec<(usize, f64)> = pool
                .iter()
                .enumerate()
                .filter(|(_, (_, x))| *x == g)
                .map(|(k, _)| (k, sc[k]))
                .collect();
            // Highest first; ties keep the model's order.
            ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            chosen.extend(ranked.iter().take(take).map(|(k, _)| names[*k].clone()));
        }
        decompose(tr.model, &chosen, self.o.sites)?;
        tr.rebuild_optimizer()?;
        self.st.train_params = self.st.train_params.max(tr.model.total_params());
        self.st.rounds.push(Round {
            step,
            chosen,
            scores: names.into_iter().zip(sc).collect(),
        });
        if self.st.rounds.len() == self.rounds_total() {
            self.st.opf_pass_secs = Some(Self::timed_pass(tr, step)?);
        }
        Ok(())
    }
}

impl TrainHook for OpfHook {
    fn name(&self) -> &'static str {
        "opf"
    }

    fn before_step(&mut self, tr: &mut Trainer<'_>, step: usize) -> Result<()> {
        if self.st.every == 0 {
            self.st.every = match (self.o.select, self.o.every) {
                (Select::Static, _) => usize::MAX,
                (Select::Dynamic, Some(t)) => t,
                (Select::Dynamic, None) => (tr.log.total_steps / self.rounds_total()).max(1),
            };
        }
        let r = self.st.rounds.len();
        if r < self.rounds_total() && step >= r.saturating_mul(self.st.every) {
            self.round(tr, step)?;
        }
        Ok(())
    }

    fn finish(&mut self, tr: &mut Trainer<'_>) -> Result<()> {
        contract(tr.model, &self.chosen())?;
        self.st.deploy_params = tr.model.total_params();
        tr.log.total_params = self.st.deploy_params;
        self.st.step_overhead = match (self.st.dense_pass_secs, self.st.opf_pass_secs) {
            (Some(d), Some(o)) if d > 0.0 => Some(o / d),
            _ => None,
        };
        Ok(())
    }

    fn state(&self) -> Value {
        serde_json::to_value(&self.st).unwrap_or(Value::Null)
    }

    fn restore(&mut self, tr: &mut Trainer<'_>, state: &Value) -> Result<()> {
        let st: OpfState = serde_json::from_value(state.clone())
            .map_err(|e| Error::Msg(format!("invalid OPF state in the checkpoint log: {e}")))?;
        self.st = st;
        // The checkpoint's values overwrite these chains' cores right after.
        decompose(tr.model, &self.chosen(), self.o.sites)?;
        tr.rebuild_optimizer()
    }
}
