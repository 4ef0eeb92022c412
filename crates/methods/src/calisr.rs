//! CaliSr (stable-rank calibration of parameter-efficient fine-tuning, LREC-COLING 2024): train
//! in full fine-tuning (FFT) first and switch each component to lightweight fine-tuning (LFT:
//! MPOP's auxiliary-only tuning, or LoRA) once the stable rank says the lightweight update
//! generalises better.
//!
//! The weight is W = W_core + W_extra: LFT trains the core parameters only, FFT both. A probe
//! (Algorithm 1) previews this step's optimizer update and applies it to copies: the core part
//! alone gives W_LFT, core and extra together W_FFT. Per MPO matrix the core parameters are the
//! auxiliary cores and the extra one is the central core; per LoRA matrix the core is the adapter
//! (A, B) and the extra is the base weight W_0, which only FFT trains; a matrix without an
//! adapter under LoRA has no core, so W_LFT = W (LFT leaves it frozen).
//!
//! The paper writes SR(W) per matrix but decides per model (CaliSr-D) or per component
//! (CaliSr-S), so a probe aggregates: the mean stable rank over the component's matrices (the
//! generalisation bound it cites sums srank over layers, and a mean orders like the sum). The
//! probed matrices are the attention (Q, K, V, output) and FFN (in, out; gate/up/down) ones, the
//! two components the paper names. Everything else (embeddings, pooler, norms, biases) switches
//! with the whole model: in CaliSr-S when the last probed component has switched.
//!
//! SRS_D is the fraction of the last n probes of a component with SR(W_LFT) < SR(W_FFT); it is
//! only computed once n probes exist (a single early probe would otherwise decide alone), and
//! the component switches when it exceeds δ. A switch takes effect in the optimizer update of
//! the probe's own step: the decision already used that step's gradients.

use crate::finetune::{optim, TrainHook, Trainer};
use crate::mpop::MpoLayer;
use crate::{Error, Result};
use candle_core::backprop::GradStore;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap, HashSet};

/// Relative change of the Rayleigh quotient at which power iteration stops.
pub const POWER_TOL: f64 = 1e-10;
/// Iteration cap of power iteration (reported as not converged when reached).
pub const POWER_MAX_ITERS: usize = 3000;

/// The stable rank of a matrix and how its spectral norm was found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StableRank {
    /// ‖W‖_F² / ‖W‖_2² (0 for the zero matrix).
    pub srank: f64,
    pub frobenius_sq: f64,
    /// ‖W‖_2² as power iteration found it.
    pub spectral_sq: f64,
    pub iters: usize,
    pub converged: bool,
}

/// The deterministic start vector: every matrix of a size starts from the same one, so that two
/// equal matrices get bit-identical results (a probe whose update is zero compares equal).
fn start_vector(n: usize) -> Vec<f64> {
    let mut z = 0x5EED_CA11u64;
    (0..n)
        .map(|_| {
            z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            x ^= x >> 31;
            // Uniform in [0.5, 1.5): no zero entry, so no eigenvector is missed by symmetry.
            0.5 + (x >> 11) as f64 / (1u64 << 53) as f64
        })
        .collect()
}

/// srank(W) = ‖W‖_F²/‖W‖_2² of a row-major `rows×cols` matrix, with ‖W‖_2² the top eigenvalue
/// of the Gram matrix on W's smaller side found by power iteration (stopping when the Rayleigh
/// quotient changes by at most `tol` relative, or after `max_iters`).
pub fn stable_rank_with(
    w: &[f32],
    rows: usize,
    cols: usize,
    tol: f64,
    max_iters: usize,
) -> StableRank {
    assert_eq!(
        w.len(),
        rows * cols,
        "stable_rank: data does not fit the shape"
    );
    let a: Vec<f64> = w.iter().map(|&x| x as f64).collect();
    let frobenius_sq: f64 = a.iter().map(|x| x * x).sum();
    if frobenius_sq == 0.0 {
        return StableRank {
            srank: 0.0,
            frobenius_sq,
            spectral_sq: 0.0,
            iters: 0,
            converged: true,
        };
    }
    let rows_side = rows <= cols;
    let n = rows.min(cols);
    let g = mpo::linalg::gram(&a, rows, cols, rows_side);
    let mut v = start_vector(n);
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    v.iter_mut().for_each(|x| *x /= norm);
    let mut gv = vec![0.0f64; n];
    let mut lambda = 0.0f64;
    let mut iters = 0;
    let mut converged = false;
    while iters < max_iters {
        iters += 1;
        for (i, out) in gv.iter_mut().enumerate() {
            *out = g[i * n..(i + 1) * n]
                .iter()
                .zip(&v)
                .map(|(a, b)| a * b)
                .sum();
        }
        let rq: f64 = gv.iter().zip(&v).map(|(a, b)| a * b).sum();
        let nrm = gv.iter().map(|x| x * x).sum::<f64>().sqrt();
        if nrm == 0.0 {
            break;
        }
        v.iter_mut().zip(&gv).for_each(|(x, y)| *x = y / nrm);
        let done = (rq - lambda).abs() <= tol * rq.abs();
        lambda = rq;
        if done {
            converged = true;
            break;
        }
    }
    StableRank {
        srank: if lambda > 0.0 {
            frobenius_sq / lambda
        } else {
            0.0
        },
        frobenius_sq,
        spectral_sq: lambda,
        iters,
        converged,
    }
}

/// [`stable_rank_with`] at [`POWER_TOL`] and [`POWER_MAX_ITERS`].
pub fn stable_rank(w: &[f32], rows: usize, cols: usize) -> StableRank {
    stable_rank_with(w, rows, cols, POWER_TOL, POWER_MAX_ITERS)
}

/// The stable rank of W + ΔW, the matrix after a candidate update.
pub fn stable_rank_after(w: &[f32], delta: &[f32], rows: usize, cols: usize) -> StableRank {
    assert_eq!(w.len(), delta.len(), "stable_rank_after: shapes differ");
    let sum: Vec<f32> = w.iter().zip(delta).map(|(a, b)| a + b).collect();
    stable_rank(&sum, rows, cols)
}

/// SRS_D over the last `n` indicators 1[SR(W_LFT) < SR(W_FFT)]; `None` until `n` exist.
pub fn srs(lower: &[bool], n: usize) -> Option<f64> {
    if n == 0 || lower.len() < n {
        return None;
    }
    let w = &lower[lower.len() - n..];
    Some(w.iter().filter(|&&b| b).count() as f64 / n as f64)
}

/// Whether a component with these probe results switches: SRS_D > δ.
pub fn should_switch(lower: &[bool], n: usize, delta: f64) -> bool {
    srs(lower, n).is_some_and(|s| s > delta)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Rule {
    /// CaliSr-D: the whole model switches at once.
    D,
    /// CaliSr-S: attention and FFN switch on their own.
    S,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalisrOptions {
    pub rule: Rule,
    /// δ: switch when SRS_D > δ (paper: 0.45–0.6).
    pub delta: f64,
    /// n: the probes SRS_D is taken over (paper: 3 or 5).
    pub probes: usize,
    /// Probe every this many optimizer steps.
    pub every: usize,
    /// Switch everything at this fraction of the steps instead of by the rule (the paper's
    /// Table 5); probes still run and are logged until then.
    pub switch_at: Option<f64>,
    /// Learning rate of the tensors only the full phase trains (LoRA's base weights, MPO
    /// central cores); default: their group's (`lr`, or `mpo_lr` for MPO cores). LoRA's
    /// adapters want a far larger rate than full fine-tuning of the base tolerates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fft_lr: Option<f64>,
}

impl Default for CalisrOptions {
    fn default() -> Self {
        CalisrOptions {
            rule: Rule::S,
            delta: 0.5,
            probes: 3,
            every: 10,
            switch_at: None,
            fft_lr: None,
        }
    }
}

/// The option checks (before any work).
pub fn check(o: &crate::finetune::FinetuneOptions) -> Result<()> {
    use crate::finetune::Method;
    let Some(c) = &o.calisr else {
        return Ok(());
    };
    if !matches!(o.method, Method::MpoAux | Method::Lora) {
        let m = serde_json::to_value(o.method)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
        return Err(Error::option("calisr", format!(
            "`calisr` switches from full to lightweight fine-tuning, so `method` must be a lightweight one (mpo-aux or lora), got {m}"
        )));
    }
    if !(c.delta > 0.0 && c.delta < 1.0) {
        return Err(Error::option(
            "calisr_delta",
            format!("`calisr_delta` must be in (0, 1), got {}", c.delta),
        ));
    }
    if c.probes == 0 {
        return Err(Error::option(
            "calisr_probes",
            "`calisr_probes` must be at least 1",
        ));
    }
    if c.every == 0 {
        return Err(Error::option(
            "calisr_every",
            "`calisr_every` must be at least 1",
        ));
    }
    if let Some(l) = c.fft_lr {
        if !(l > 0.0 && l.is_finite()) {
            return Err(Error::option(
                "calisr_fft_lr",
                format!("`calisr_fft_lr` must be a positive number, got {l}"),
            ));
        }
    }
    if let Some(f) = c.switch_at {
        if !(0.0..=1.0).contains(&f) {
            return Err(Error::option(
                "calisr_switch_at",
                format!("`calisr_switch_at` must be in [0, 1], got {f}"),
            ));
        }
    }
    Ok(())
}

/// The part of a transformer a matrix belongs to, by its HF module name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Component {
    Attention,
    Ffn,
    Other,
}

impl Component {
    pub fn of(name: &str) -> Component {
        if name.contains(".attention.self.")
            || name.contains(".attention.output.dense")
            || name.contains(".self_attn.")
        {
            Component::Attention
        } else if name.contains(".intermediate.dense")
            || name.contains(".mlp.")
            || (name.contains("encoder.layer.") && name.ends_with(".output.dense"))
        {
            Component::Ffn
        } else {
            Component::Other
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Component::Attention => "attention",
            Component::Ffn => "ffn",
            Component::Other => "other",
        }
    }
}

/// One component's result in one probe.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupProbe {
    /// Mean stable rank over the component's matrices after the LFT / the FFT candidate update.
    pub sr_lft: f64,
    pub sr_fft: f64,
    pub lower: bool,
    /// SRS_D over the last n probes, once there are n.
    pub srs: Option<f64>,
    pub matrices: usize,
    /// Matrices whose power iteration hit the cap.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unconverged: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProbeLog {
    /// 0-based step whose gradients were probed.
    pub step: usize,
    pub groups: BTreeMap<String, GroupProbe>,
}

/// What the hook stores in the training log (and resumes from).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CalisrState {
    /// Component (or "model") → the first step whose update was lightweight for it.
    pub switched: BTreeMap<String, usize>,
    pub probes: Vec<ProbeLog>,
}

/// The CaliSr [`TrainHook`].
pub struct CalisrHook {
    o: CalisrOptions,
    st: CalisrState,
    started: bool,
}

impl CalisrHook {
    pub fn new(o: CalisrOptions) -> Self {
        CalisrHook {
            o,
            st: CalisrState::default(),
            started: false,
        }
    }

    /// The decision groups: one for the whole model (D), or attention and FFN (S).
    fn groups(&self) -> &'static [&'static str] {
        match self.o.rule {
            Rule::D => &["model"],
            Rule::S => &["attention", "ffn"],
        }
    }

    fn group_of(&self, c: Component) -> Option<&'static str> {
        match (self.o.rule, c) {
            (Rule::D, _) => Some("model"),
            (Rule::S, Component::Other) => None,
            (Rule::S, c) => Some(c.name()),
        }
    }

    /// Whether the modules of component `c` are still fully tuned.
    fn in_fft(&self, c: Component) -> bool {
        match self.group_of(c) {
            Some(g) => !self.st.switched.contains_key(g),
            // Everything outside the probed components follows the last of them.
            None => self
                .groups()
                .iter()
                .any(|g| !self.st.switched.contains_key(*g)),
        }
    }

    /// Put the trainer's trainable set in line with the switches so far.
    /// Returns the ids of the tensors that train now.
    fn apply(&self, tr: &mut Trainer<'_>) -> Result<HashSet<candle_core::TensorId>> {
        let names = tr
            .model
            .linears()
            .into_iter()
            .map(|(n, _)| n)
            .chain(tr.model.other_tensors().into_iter().map(|(n, _)| n));
        let fft: HashSet<String> = names.filter(|n| self.in_fft(Component::of(n))).collect();
        tr.fft_modules = Some(fft);
        tr.rebuild_optimizer()?;
        if let Some(lr) = self.o.fft_lr {
            let lora = tr.opts.method == crate::finetune::Method::Lora;
            let centrals: HashSet<String> = tr
                .model
                .linears()
                .iter()
                .filter_map(|(n, l)| {
                    let c = l.inner().as_any().downcast_ref::<MpoLayer>()?.cores();
                    Some(format!(
                        "{n}.mpo.{}",
                        mpo::Mpo::<f32>::core_name(c.central_index())
                    ))
                })
                .collect();
            for sl in &mut tr.opt.slots {
                let adapter_or_head = sl.name.contains(".lora_A.")
                    || sl.name.contains(".lora_B.")
                    || sl.name.starts_with("classifier.");
                if (lora && !adapter_or_head) || centrals.contains(&sl.name) {
                    sl.lr = lr;
                }
            }
        }
        Ok(count_trained(tr))
    }

    fn fixed_step(&self, total: usize) -> Option<usize> {
        self.o
            .switch_at
            .map(|f| (f * total as f64).round() as usize)
            .filter(|&s| s < total)
    }

    pub fn state_of(&self) -> &CalisrState {
        &self.st
    }
}

/// Count as tuned only the optimizer's tensors that the model trains: the frozen ones it keeps
/// for checkpoints ([`crate::finetune::prepare_phased`]) get no gradient.
fn count_trained(tr: &mut Trainer<'_>) -> HashSet<candle_core::TensorId> {
    let mut live = HashSet::new();
    for (_, l) in tr.model.linears() {
        let inner = l.inner();
        if let Some(mp) = inner.as_any().downcast_ref::<MpoLayer>() {
            let c = mp.cores();
            for k in (0..c.n()).filter(|&k| c.is_trainable(k)) {
                live.insert(c.var(k).as_tensor().id());
            }
            live.extend(mp.inner.bias().map(|b| b.as_tensor().id()));
            continue;
        }
        let dense = if let Some(ll) = inner.as_any().downcast_ref::<crate::lora::LoraLinear>() {
            live.insert(ll.a().as_tensor().id());
            live.insert(ll.b().as_tensor().id());
            ll.base().as_any().downcast_ref::<models::linear::Dense>()
        } else {
            inner.as_any().downcast_ref::<models::linear::Dense>()
        };
        if let Some(d) = dense {
            live.insert(d.weight.id());
            live.extend(d.bias.as_ref().map(|b| b.id()));
        }
    }
    live.extend(tr.model.other_tensors().into_iter().map(|(_, t)| t.id()));
    tr.log.tuned_params = tr
        .opt
        .slots
        .iter()
        .filter(|s| live.contains(&s.var.as_tensor().id()))
        .map(|s| s.var.as_tensor().elem_count())
        .sum();
    live
}

/// The weights after the candidate update of one step, per trainable tensor (`None`: it does
/// not change in this step).
struct Preview<'a> {
    opt: &'a optim::AdamW,
    grads: &'a GradStore,
    slot: HashMap<&'a str, usize>,
    lr_factor: f64,
    scale: f64,
}

impl Preview<'_> {
    fn updated(&self, name: &str, current: &Tensor) -> Result<Option<Tensor>> {
        let Some(&i) = self.slot.get(name) else {
            return Ok(None);
        };
        let var = &self.opt.slots[i].var;
        let Some(g) = self.grads.get(var.as_tensor()) else {
            return Ok(None);
        };
        let v = self.opt.preview(i, g, self.lr_factor, self.scale)?;
        Ok(Some(Tensor::from_vec(
            v,
            current.shape(),
            &candle_core::Device::Cpu,
        )?))
    }

    fn or_current(&self, name: &str, current: &Tensor) -> Result<Tensor> {
        Ok(self
            .updated(name, current)?
            .unwrap_or_else(|| current.clone()))
    }
}

fn f32_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1()?)
}

/// (W_LFT, W_FFT) of one Linear after this step's candidate update, or `None` when the layer is
/// not a matrix the probe knows.
fn candidates(
    p: &Preview<'_>,
    name: &str,
    lin: &models::Linear,
) -> Result<Option<(Tensor, Tensor)>> {
    let inner = lin.inner();
    if let Some(mp) = inner.as_any().downcast_ref::<MpoLayer>() {
        let c = mp.cores();
        let central = c.central_index();
        let mut lft = Vec::with_capacity(c.n());
        let mut fft = Vec::with_capacity(c.n());
        for k in 0..c.n() {
            let cur = c.var(k).as_tensor().detach();
            let key = format!("{name}.mpo.{}", mpo::Mpo::<f32>::core_name(k));
            let upd = p.or_current(&key, &cur)?;
            lft.push(if k == central { cur } else { upd.clone() });
            fft.push(upd);
        }
        return Ok(Some((
            mpo::dense_from_cores(&lft, c.shape())?,
            mpo::dense_from_cores(&fft, c.shape())?,
        )));
    }
    if let Some(ll) = inner.as_any().downcast_ref::<crate::lora::LoraLinear>() {
        let a = p.or_current(
            &format!("{name}.lora_A.weight"),
            &ll.a().as_tensor().detach(),
        )?;
        let b = p.or_current(
            &format!("{name}.lora_B.weight"),
            &ll.b().as_tensor().detach(),
        )?;
        let delta = (b.matmul(&a)? * ll.scale())?;
        let w0 = ll.base().weight()?.detach();
        let w0_new = p.or_current(&format!("{name}.weight"), &w0)?;
        return Ok(Some(((&w0 + &delta)?, (&w0_new + &delta)?)));
    }
    if let Some(d) = inner.as_any().downcast_ref::<models::linear::Dense>() {
        let w0 = d.weight.detach();
        let w_new = p.or_current(&format!("{name}.weight"), &w0)?;
        return Ok(Some((w0, w_new)));
    }
    Ok(None)
}

impl CalisrHook {
    fn probe(&mut self, tr: &mut Trainer<'_>, grads: &mut GradStore, step: usize) -> Result<()> {
        let open: Vec<&'static str> = self
            .groups()
            .iter()
            .copied()
            .filter(|g| !self.st.switched.contains_key(*g))
            .collect();
        if open.is_empty() {
            return Ok(());
        }
        let norm = tr.opt.grad_norm(grads)?;
        let p = Preview {
            opt: &tr.opt,
            grads: &*grads,
            slot: tr
                .opt
                .slots
                .iter()
                .enumerate()
                .map(|(i, s)| (s.name.as_str(), i))
                .collect(),
            lr_factor: tr
                .lr_factor_override
                .unwrap_or_else(|| optim::linear_schedule(step, tr.warmup, tr.log.total_steps)),
            scale: optim::clip_scale(norm, tr.opts.max_grad_norm),
        };
        // group → (Σ SR_LFT, Σ SR_FFT, matrices, unconverged)
        let mut sums: BTreeMap<&'static str, (f64, f64, usize, usize)> = BTreeMap::new();
        for (name, lin) in tr.model.linears() {
            let comp = Component::of(&name);
            if comp == Component::Other {
                continue;
            }
            let Some(g) = self.group_of(comp).filter(|g| open.contains(g)) else {
                continue;
            };
            let Some((lft, fft)) = candidates(&p, &name, lin)? else {
                continue;
            };
            let (r, c) = lft.dims2()?;
            let a = stable_rank(&f32_vec(&lft)?, r, c);
            let b = stable_rank(&f32_vec(&fft)?, r, c);
            let e = sums.entry(g).or_default();
            e.0 += a.srank;
            e.1 += b.srank;
            e.2 += 1;
            e.3 += usize::from(!a.converged) + usize::from(!b.converged);
        }
        let mut rec = ProbeLog {
            step,
            groups: BTreeMap::new(),
        };
        let mut switch = Vec::new();
        for (g, (sl, sf, k, unconv)) in sums {
            let (sr_lft, sr_fft) = (sl / k as f64, sf / k as f64);
            let lower = sr_lft < sr_fft;
            let mut history: Vec<bool> = self
                .st
                .probes
                .iter()
                .filter_map(|p| p.groups.get(g).map(|x| x.lower))
                .collect();
            history.push(lower);
            let s = srs(&history, self.o.probes);
            if self.o.switch_at.is_none() && should_switch(&history, self.o.probes, self.o.delta) {
                switch.push(g);
            }
            rec.groups.insert(
                g.to_string(),
                GroupProbe {
                    sr_lft,
                    sr_fft,
                    lower,
                    srs: s,
                    matrices: k,
                    unconverged: unconv,
                },
            );
        }
        drop(p);
        self.st.probes.push(rec);
        if !switch.is_empty() {
            for g in switch {
                self.st.switched.insert(g.to_string(), step);
            }
            // This step's update is already the lightweight one for them: the gradients of
            // what froze are dropped before the optimizer sees them.
            let live = self.apply(tr)?;
            for sl in &tr.opt.slots {
                if !live.contains(&sl.var.as_tensor().id()) {
                    grads.remove(sl.var.as_tensor());
                }
            }
        }
        Ok(())
    }
}

impl TrainHook for CalisrHook {
    fn name(&self) -> &'static str {
        "calisr"
    }

    fn before_step(&mut self, tr: &mut Trainer<'_>, step: usize) -> Result<()> {
        let mut changed = !self.started;
        self.started = true;
        if self.fixed_step(tr.log.total_steps) == Some(step) {
            for g in self.groups() {
                self.st.switched.entry(g.to_string()).or_insert(step);
            }
            changed = true;
        }
        if changed {
            self.apply(tr)?;
        }
        Ok(())
    }

    fn after_backward(
        &mut self,
        tr: &mut Trainer<'_>,
        grads: &mut GradStore,
        step: usize,
    ) -> Result<()> {
        if (step + 1) % self.o.every != 0 {
            return Ok(());
        }
        self.probe(tr, grads, step)
    }

    fn finish(&mut self, tr: &mut Trainer<'_>) -> Result<()> {
        // Anything trained afterwards (squeezing) follows the method alone.
        tr.fft_modules = None;
        if tr.opts.method == crate::finetune::Method::Lora {
            // The base weights trained in the full phase: the adapters are folded into them
            // and the model is saved whole, not as an adapter over the unchanged base.
            crate::lora::merge(tr.model)?;
        }
        Ok(())
    }

    fn state(&self) -> Value {
        serde_json::to_value(&self.st).unwrap_or(Value::Null)
    }

    fn restore(&mut self, tr: &mut Trainer<'_>, state: &Value) -> Result<()> {
        self.st = serde_json::from_value(state.clone())
            .map_err(|e| Error::Msg(format!("invalid CaliSr state in the checkpoint: {e}")))?;
        self.started = true;
        self.apply(tr).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_by_name() {
        for (n, c) in [
            ("encoder.layer.0.attention.self.query", Component::Attention),
            (
                "encoder.layer.3.attention.output.dense",
                Component::Attention,
            ),
            ("encoder.layer.3.intermediate.dense", Component::Ffn),
            ("encoder.layer.3.output.dense", Component::Ffn),
            ("model.layers.1.self_attn.o_proj", Component::Attention),
            ("model.layers.1.mlp.down_proj", Component::Ffn),
            ("pooler.dense", Component::Other),
            ("embeddings.word_embeddings", Component::Other),
            ("model.embed_tokens", Component::Other),
            ("classifier", Component::Other),
            ("encoder.layer.3.output.LayerNorm.weight", Component::Other),
        ] {
            assert_eq!(Component::of(n), c, "{n}");
        }
    }
}
