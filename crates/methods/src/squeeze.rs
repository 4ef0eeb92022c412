//! MPOP, part 2: dimension squeezing (Gao et al., ACL 2021, Algorithm 2). Starting from a tuned
//! MPO model, repeatedly cut the bonds whose removal has the least *estimated* error (the bound
//! sqrt(Σ ε_k²) from the spectra of the freshly re-canonicalized MPOs), recover by training only
//! the auxiliary tensors (all central tensors frozen), and stop when the evaluation loss has
//! moved more than Δ from the loss p recorded at the start, when the parameter target is
//! reached, or at the iteration limit. A failed iteration is rolled back, so the result is the
//! last model within Δ.
//!
//! Two deliberate departures, both configurable:
//! - Algorithm 2 removes one bond index per iteration. On a real model that is thousands of
//!   recoveries, so each iteration removes the cheapest cuts (ranked by estimated squared-error
//!   increase per parameter saved) until `cut_fraction` of the current MPO parameters are gone;
//!   `cut_fraction = 0` restores the one-index-per-iteration rule.
//! - The released code's trigger (a moving average of the training loss over `window` steps
//!   must stay below its starting value + `threshold` for `patience` steps before the next cut)
//!   is available as [`Trigger::Window`]; [`Trigger::Delta`] is the paper's fixed recovery.

use crate::mpop::MpoLayer;
use crate::{Error, Result};
use candle_core::{Device, Var};
use models::Model;
use mpo::{Mpo, MpoLinear};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What squeezing needs from the training engine that runs it: the model, its trainable
/// tensors, recovery steps and evaluation. The fine-tuning `Trainer` implements it, and calls
/// [`squeeze`] after training; squeezing itself does not know how training is done, so the
/// dependency runs one way (finetune → squeeze), as for the other methods it trains.
pub trait Recovery {
    fn model(&self) -> &Model;
    fn model_mut(&mut self) -> &mut Model;
    /// Whether the run trains MPO layers (an mpo-* method), the only ones squeezing cuts.
    fn trains_mpo(&self) -> bool;
    /// Whether there is held-out data to compute the evaluation loss on.
    fn has_eval_data(&self) -> bool;
    /// From now on train the auxiliary MPO tensors only (central tensors frozen), at a
    /// constant learning-rate multiplier `lr_factor`.
    fn start_recovery(&mut self, lr_factor: f64) -> Result<()>;
    /// Back to the run's own learning-rate schedule.
    fn end_recovery(&mut self);
    /// Collect the trainable tensors again after layers were replaced (moments kept for the
    /// tensors that are still the same variable).
    fn layers_replaced(&mut self) -> Result<()>;
    /// The trainable tensors by name.
    fn trainable(&self) -> Vec<(String, Var)>;
    /// One optimizer step on the batch of global step `step`, recorded by the host; returns
    /// the training loss.
    fn recovery_step(&mut self, step: usize) -> Result<f64>;
    /// The evaluation after `step` steps, None without evaluation data.
    fn score(&mut self, step: usize) -> Result<Option<Score>>;
}

/// An evaluation: the loss squeezing compares and the task's metric.
#[derive(Debug, Clone)]
pub struct Score {
    pub loss: f64,
    pub metric: String,
    pub value: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    /// Train `recover_steps`, then compare the evaluation loss with p (Algorithm 2).
    Delta,
    /// Train until the moving training loss is within `threshold` of its reference for
    /// `patience` consecutive steps (at most `recover_steps`; not converging stops the loop).
    Window,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SqueezeOptions {
    /// Stop once the model has at most this fraction of its dense parameter count.
    pub target_params: f64,
    /// Largest allowed |p − p̃| of the evaluation loss.
    pub delta: f64,
    pub max_iters: usize,
    pub recover_steps: usize,
    /// Fraction of the current MPO parameters cut per iteration (0 = one bond index).
    pub cut_fraction: f64,
    pub trigger: Trigger,
    pub window: usize,
    pub threshold: f64,
    pub patience: usize,
    /// Constant learning-rate multiplier (of `lr` / `mpo_lr`) during recovery.
    pub lr_factor: f64,
}

impl Default for SqueezeOptions {
    fn default() -> Self {
        SqueezeOptions {
            target_params: 0.6,
            delta: 0.1,
            max_iters: 50,
            recover_steps: 20,
            cut_fraction: 0.03,
            trigger: Trigger::Delta,
            window: 10,
            threshold: 0.03,
            patience: 10,
            lr_factor: 1.0,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SqueezeIter {
    pub iter: usize,
    pub cuts: usize,
    pub params: usize,
    pub ratio: f64,
    pub estimated_rel_error: f64,
    pub eval_loss: f64,
    pub metric: String,
    pub value: f64,
    pub accepted: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct SqueezeReport {
    pub reference_loss: f64,
    pub dense_params: usize,
    pub start_params: usize,
    pub final_params: usize,
    pub final_ratio: f64,
    pub stop_reason: String,
    pub iters: Vec<SqueezeIter>,
}

/// Parameters of an MPO with bonds `d` over local dims `m`.
fn mpo_params(m: &[usize], d: &[usize]) -> usize {
    m.iter()
        .enumerate()
        .map(|(k, mk)| d[k] * mk * d[k + 1])
        .sum()
}

struct Layer {
    name: String,
    canon: Mpo<f64>,
    bias: Option<Vec<f32>>,
    local: Vec<usize>,
    norm2: f64,
    bonds: Vec<usize>,
}

/// Canonical MPOs (fresh spectra) of every MPO layer.
fn canonical_layers(tr: &impl Recovery) -> Result<Vec<Layer>> {
    let mut out = Vec::new();
    for (name, l) in tr.model().linears() {
        let Some(mp) = l.inner().as_any().downcast_ref::<MpoLayer>() else {
            continue;
        };
        let canon = mp.cores().to_mpo::<f64>()?.canonicalize()?;
        let norm2 = canon.frobenius_norm().map(|x| x * x).unwrap_or_else(|| {
            canon
                .spectra
                .first()
                .map_or(1.0, |s| s.iter().map(|x| x * x).sum())
        });
        let bias = match mp.inner.bias() {
            Some(b) => Some(b.as_tensor().to_vec1::<f32>()?),
            None => None,
        };
        out.push(Layer {
            name,
            local: canon.shape().local_dims(),
            bonds: canon.bonds().to_vec(),
            canon,
            bias,
            norm2: norm2.max(1e-30),
        });
    }
    Ok(out)
}

/// Estimated relative squared error of `l` at bonds `d` (from its spectra).
fn est(l: &Layer, d: &[usize]) -> f64 {
    let e = l.canon.error_bound_for(d);
    e * e / l.norm2
}

/// Choose cuts: repeatedly take the (layer, bond) whose next index costs the least estimated
/// error per parameter saved, until `want` parameters are gone. Returns the number of cuts.
fn choose_cuts(layers: &mut [Layer], want: usize) -> usize {
    let mut removed = 0usize;
    let mut cuts = 0usize;
    loop {
        let mut best: Option<(f64, usize, usize, usize)> = None;
        for (li, l) in layers.iter().enumerate() {
            let base = est(l, &l.bonds);
            let p0 = mpo_params(&l.local, &l.bonds);
            for k in 1..l.bonds.len() - 1 {
                if l.bonds[k] <= 1 {
                    continue;
                }
                let mut d = l.bonds.clone();
                d[k] -= 1;
                let saved = p0.saturating_sub(mpo_params(&l.local, &d));
                if saved == 0 {
                    continue;
                }
                let score = (est(l, &d) - base).max(0.0) / saved as f64;
                if best.is_none_or(|b| score < b.0) {
                    best = Some((score, li, k, saved));
                }
            }
        }
        let Some((_, li, k, saved)) = best else {
            break;
        };
        layers[li].bonds[k] -= 1;
        removed += saved;
        cuts += 1;
        if removed >= want {
            break;
        }
    }
    cuts
}

/// Swap in the truncated layers whose bonds changed; returns how many were replaced.
fn apply(tr: &mut impl Recovery, layers: &[Layer]) -> Result<usize> {
    let by_name: BTreeMap<&str, &Layer> = layers.iter().map(|l| (l.name.as_str(), l)).collect();
    let mut n = 0;
    for (name, lin) in tr.model_mut().linears_mut() {
        let Some(l) = by_name.get(name.as_str()) else {
            continue;
        };
        if l.bonds == l.canon.bonds() {
            continue;
        }
        let cut: Mpo<f32> = l.canon.truncate_to(&l.bonds)?.cast();
        let layer = MpoLinear::from_mpo(&cut, l.bias.as_deref(), &Device::Cpu)?;
        lin.replace(Box::new(MpoLayer::new(layer)));
        n += 1;
    }
    tr.layers_replaced()?;
    Ok(n)
}

/// Copies of every MPO layer and every other trainable tensor, to roll an iteration back.
struct Snapshot {
    layers: Vec<(String, Mpo<f32>, Option<Vec<f32>>)>,
    others: Vec<(String, candle_core::Tensor)>,
}

fn snapshot(tr: &impl Recovery) -> Result<Snapshot> {
    let mut layers = Vec::new();
    for (name, l) in tr.model().linears() {
        if let Some(mp) = l.inner().as_any().downcast_ref::<MpoLayer>() {
            let bias = match mp.inner.bias() {
                Some(b) => Some(b.as_tensor().to_vec1::<f32>()?),
                None => None,
            };
            layers.push((name, mp.cores().to_mpo::<f32>()?, bias));
        }
    }
    let others = tr
        .trainable()
        .into_iter()
        .filter(|(name, _)| !name.contains(".mpo.core_"))
        .map(|(name, var)| Ok((name, var.as_tensor().copy()?)))
        .collect::<Result<_>>()?;
    Ok(Snapshot { layers, others })
}

fn restore(tr: &mut impl Recovery, s: &Snapshot) -> Result<()> {
    let by_name: BTreeMap<&str, _> = s
        .layers
        .iter()
        .map(|(n, m, b)| (n.as_str(), (m, b)))
        .collect();
    for (name, lin) in tr.model_mut().linears_mut() {
        if let Some((m, b)) = by_name.get(name.as_str()) {
            let layer = MpoLinear::from_mpo(m, b.as_deref(), &Device::Cpu)?;
            lin.replace(Box::new(MpoLayer::new(layer)));
        }
    }
    tr.layers_replaced()?;
    let vars: BTreeMap<String, Var> = tr.trainable().into_iter().collect();
    for (name, t) in &s.others {
        if let Some(var) = vars.get(name) {
            var.set(t)?;
        }
    }
    Ok(())
}

/// Dense parameter count of the model (MPO layers counted as the matrices they stand for).
fn dense_params(tr: &impl Recovery) -> usize {
    let mut n = 0;
    for (_, l) in tr.model().linears() {
        n += l.in_features() * l.out_features() + l.bias().map_or(0, |b| b.elem_count());
    }
    n + tr
        .model()
        .other_tensors()
        .iter()
        .map(|(_, t)| t.elem_count())
        .sum::<usize>()
}

/// What squeezing needs, checked before fine-tuning starts so a bad option does not cost a run.
pub fn check(tr: &impl Recovery, o: &SqueezeOptions) -> Result<()> {
    if !tr.trains_mpo() {
        return Err(Error::option(
            "squeeze",
            "`squeeze` needs an MPO method (`method` mpo-aux)",
        ));
    }
    if !(o.target_params > 0.0 && o.target_params <= 1.0) {
        return Err(Error::option(
            "target_params",
            format!("`target_params` must be in (0, 1], got {}", o.target_params),
        ));
    }
    if !tr.has_eval_data() {
        return Err(Error::option(
            "eval_data",
            "squeezing compares evaluation losses; give `eval_data` (or a GLUE folder with dev.tsv)",
        ));
    }
    Ok(())
}

/// Run the squeezing loop on a host whose model already has MPO layers (mpo-* methods).
/// `first_step` is the global step counter to continue from (batches keep their order).
pub fn squeeze(
    tr: &mut impl Recovery,
    o: &SqueezeOptions,
    first_step: usize,
    progress: bool,
) -> Result<SqueezeReport> {
    check(tr, o)?;
    // Recovery trains auxiliary tensors only, whatever the method trained before.
    tr.start_recovery(o.lr_factor)?;
    let dense = dense_params(tr);
    let start = tr.model().total_params();
    let target = (o.target_params * dense as f64) as usize;
    let p = tr
        .score(first_step)?
        .ok_or_else(|| Error::Msg("no evaluation data".into()))?;
    let mut step = first_step;
    let mut iters = Vec::new();
    let pb = progress.then(|| {
        let pb = indicatif::ProgressBar::new(o.max_iters as u64);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "squeeze [{bar:30}] {pos}/{len} {msg} [{elapsed_precise}]",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        pb
    });
    let mut stop_reason = format!("iteration limit ({})", o.max_iters);
    for it in 0..o.max_iters {
        let now = tr.model().total_params();
        if now <= target {
            stop_reason = format!("reached the target of {target} parameters");
            break;
        }
        let snap = snapshot(tr)?;
        let mut layers = canonical_layers(tr)?;
        let want = ((o.cut_fraction * now as f64) as usize).clamp(1, now - target);
        let cuts = choose_cuts(&mut layers, want);
        if cuts == 0 {
            stop_reason = "no bond left to cut".into();
            break;
        }
        let est_err: f64 = {
            let tot: f64 = layers.iter().map(|l| l.norm2).sum();
            (layers
                .iter()
                .map(|l| est(l, &l.bonds) * l.norm2)
                .sum::<f64>()
                / tot)
                .sqrt()
        };
        apply(tr, &layers)?;
        // Recover.
        let mut ok = true;
        match o.trigger {
            Trigger::Delta => {
                for _ in 0..o.recover_steps {
                    tr.recovery_step(step)?;
                    step += 1;
                }
            }
            Trigger::Window => {
                // Converged once the moving training loss stays within `threshold` of p.
                let mut hist: Vec<f64> = Vec::new();
                let mut good = 0;
                ok = false;
                for _ in 0..o.recover_steps.max(o.window + o.patience) {
                    hist.push(tr.recovery_step(step)?);
                    step += 1;
                    if hist.len() < o.window {
                        continue;
                    }
                    let avg = hist[hist.len() - o.window..].iter().sum::<f64>() / o.window as f64;
                    good = if avg <= p.loss + o.threshold {
                        good + 1
                    } else {
                        0
                    };
                    if good >= o.patience {
                        ok = true;
                        break;
                    }
                }
            }
        }
        let e = tr
            .score(step)?
            .ok_or_else(|| Error::Msg("no evaluation data".into()))?;
        if o.trigger == Trigger::Delta {
            ok = (e.loss - p.loss).abs() <= o.delta;
        }
        let params = tr.model().total_params();
        iters.push(SqueezeIter {
            iter: it + 1,
            cuts,
            params,
            ratio: params as f64 / dense as f64,
            estimated_rel_error: est_err,
            eval_loss: e.loss,
            metric: e.metric.clone(),
            value: e.value,
            accepted: ok,
        });
        if let Some(pb) = &pb {
            pb.inc(1);
            pb.set_message(format!(
                "{:.1}% params, eval loss {:.4} (p {:.4}), {} {:.4}",
                100.0 * params as f64 / dense as f64,
                e.loss,
                p.loss,
                e.metric,
                e.value
            ));
        }
        if !ok {
            restore(tr, &snap)?;
            stop_reason = match o.trigger {
                Trigger::Delta => format!(
                    "iteration {} moved the evaluation loss by {:.4} (> Δ = {}); rolled back",
                    it + 1,
                    (e.loss - p.loss).abs(),
                    o.delta
                ),
                Trigger::Window => format!(
                    "iteration {} did not converge within {} steps; rolled back",
                    it + 1,
                    o.recover_steps.max(o.window + o.patience)
                ),
            };
            break;
        }
    }
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    tr.end_recovery();
    let final_params = tr.model().total_params();
    Ok(SqueezeReport {
        reference_loss: p.loss,
        dense_params: dense,
        start_params: start,
        final_params,
        final_ratio: final_params as f64 / dense as f64,
        stop_reason,
        iters,
    })
}
