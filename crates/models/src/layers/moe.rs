//! A mixture-of-experts feed-forward block (Switch top-1 or Shazeer/GShard top-2) that takes a
//! dense FFN's place through [`crate::CausalLm::feed_forwards_mut`]. The experts are any
//! [`FeedForward`] (dense SwiGLU copies, or MPO experts sharing a central tensor: the block
//! does not care), so the dense-expert baseline and MPOE run the same routing code.
//!
//! Routing is decided on the detached router probabilities; the chosen (token, expert) pairs
//! are sorted by expert so one gather copies the hidden states once, each expert runs on its
//! contiguous slice, and one scatter-add combines the gated outputs. The gates stay in the
//! graph, so the router learns through them and through the balance loss.

use crate::arch::FeedForward;
use crate::linear::Linear;
use crate::Result;
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use std::any::Any;
use std::sync::Mutex;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Router {
    /// Switch Transformer: the most probable expert; its output is weighted by p / p.detach()
    /// (value 1: the gate normalized over the one chosen expert, gradient to the router).
    Top1,
    /// The two most probable experts, gates renormalized over them (sparse upcycling).
    Top2,
}

impl Router {
    /// Experts each token is sent to.
    pub fn k(self) -> usize {
        match self {
            Router::Top1 => 1,
            Router::Top2 => 2,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Router::Top1 => "top1",
            Router::Top2 => "top2",
        }
    }
}

/// How a block routes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MoeConfig {
    pub router: Router,
    /// Slots per expert = ceil(capacity_factor · k · tokens / experts), at least 1.
    pub capacity_factor: f64,
    /// Whether assignments beyond an expert's capacity are dropped (the token then passes
    /// through the residual only for that choice); off = capacity is not enforced.
    pub drop_tokens: bool,
    /// Weight α of the balance loss α · E · Σ_e f_e · P_e.
    pub aux_loss_weight: f64,
}

/// Routing decisions for one batch of tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct Routing {
    /// Kept (token, expert) pairs, sorted by expert, tokens in order within an expert.
    pub pairs: Vec<(usize, usize)>,
    /// For each kept pair, the token's chosen experts (one or two) whose probabilities
    /// normalize its gate.
    pub chosen: Vec<Vec<usize>>,
    /// Kept tokens per expert.
    pub counts: Vec<usize>,
    /// Tokens whose first choice is each expert (before dropping): the balance loss's f.
    pub first: Vec<usize>,
    pub dropped: usize,
    pub capacity: usize,
}

/// Slots per expert for `n` tokens.
pub fn capacity(n: usize, experts: usize, k: usize, factor: f64) -> usize {
    ((factor * (k * n) as f64) / experts.max(1) as f64)
        .ceil()
        .max(1.0) as usize
}

/// Route `n` tokens given their probabilities `probs` [n × experts] (row-major). Ties go to the
/// lower expert index. First choices of all tokens claim slots before any second choice
/// (GShard's priority), each in token order.
pub fn route(probs: &[f32], n: usize, experts: usize, cfg: &MoeConfig) -> Routing {
    let k = cfg.router.k().min(experts);
    let cap = capacity(n, experts, cfg.router.k(), cfg.capacity_factor);
    let mut choice: Vec<Vec<usize>> = Vec::with_capacity(n);
    for t in 0..n {
        let row = &probs[t * experts..(t + 1) * experts];
        let mut idx: Vec<usize> = (0..experts).collect();
        idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        idx.truncate(k);
        choice.push(idx);
    }
    let mut first = vec![0; experts];
    for c in &choice {
        first[c[0]] += 1;
    }
    let mut fill = vec![0usize; experts];
    let mut kept: Vec<(usize, usize)> = Vec::with_capacity(n * k);
    let mut dropped = 0;
    for rank in 0..k {
        for (t, c) in choice.iter().enumerate() {
            let e = c[rank];
            if cfg.drop_tokens && fill[e] >= cap {
                dropped += 1;
                continue;
            }
            fill[e] += 1;
            kept.push((t, e));
        }
    }
    kept.sort_by_key(|&(t, e)| (e, t));
    let chosen = kept.iter().map(|&(t, _)| choice[t].clone()).collect();
    Routing {
        pairs: kept,
        chosen,
        counts: fill,
        first,
        dropped,
        capacity: cap,
    }
}

/// α · E · Σ_e f_e · P_e with f_e the fraction of tokens whose first choice is e and P_e the
/// mean router probability of e (Switch's loss; tensor2tensor's top-2 mean(density · proxy)
/// · E² is the same number). Differentiable through `probs` [n, E].
pub fn balance_loss(probs: &Tensor, first: &[usize], alpha: f64) -> Result<Tensor> {
    let (n, e) = probs.dims2()?;
    let f: Vec<f32> = first.iter().map(|&c| c as f32 / n.max(1) as f32).collect();
    let f = Tensor::from_vec(f, e, probs.device())?;
    let mean_p = probs.mean(0)?;
    Ok(((mean_p * f)?.sum_all()? * (alpha * e as f64))?)
}

/// Tokens each expert processed since the last [`MoeFfn::take_stats`], and dropped choices.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MoeStats {
    pub tokens: Vec<u64>,
    pub dropped: u64,
}

/// E experts behind a router [E, hidden].
#[derive(Debug)]
pub struct MoeFfn {
    pub router: Tensor,
    pub experts: Vec<Box<dyn FeedForward>>,
    pub cfg: MoeConfig,
    aux: Mutex<Option<Tensor>>,
    stats: Mutex<MoeStats>,
}

impl MoeFfn {
    pub fn new(router: Tensor, experts: Vec<Box<dyn FeedForward>>, cfg: MoeConfig) -> Result<Self> {
        let (e, _) = router.dims2()?;
        if e != experts.len() || e < 2 {
            crate::bail!(
                "a router with {e} rows for {} experts (at least 2, one row each)",
                experts.len()
            );
        }
        if cfg.router.k() > e {
            crate::bail!(
                "{} routing needs at least {} experts",
                cfg.router.name(),
                cfg.router.k()
            );
        }
        let stats = MoeStats {
            tokens: vec![0; e],
            dropped: 0,
        };
        Ok(MoeFfn {
            router,
            experts,
            cfg,
            aux: Mutex::new(None),
            stats: Mutex::new(stats),
        })
    }

    pub fn num_experts(&self) -> usize {
        self.experts.len()
    }

    /// Counts since the last call (then reset).
    pub fn take_stats(&self) -> MoeStats {
        let mut s = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        let e = s.tokens.len();
        std::mem::replace(
            &mut s,
            MoeStats {
                tokens: vec![0; e],
                dropped: 0,
            },
        )
    }

    /// The router's probabilities [n, E] for hidden states [n, d].
    pub fn probabilities(&self, x2: &Tensor) -> Result<Tensor> {
        let logits = crate::linear::matmul_t(x2, &self.router)?;
        Ok(crate::ops::softmax_last_dim(&logits)?)
    }
}

impl FeedForward for MoeFfn {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let d = *dims.last().unwrap_or(&0);
        let n = x.elem_count() / d.max(1);
        let e = self.experts.len();
        let x2 = x.reshape((n, d))?;
        if n == 0 {
            return Ok(x.zeros_like()?);
        }
        let probs = self.probabilities(&x2)?;
        let pv: Vec<f32> = probs
            .detach()
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        let r = route(&pv, n, e, &self.cfg);
        let dev = x.device();
        let tok: Vec<u32> = r.pairs.iter().map(|&(t, _)| t as u32).collect();
        let tok = Tensor::from_vec(tok, r.pairs.len(), dev)?;
        let flat = probs.flatten_all()?;
        let at = |f: &dyn Fn(usize) -> usize| -> Result<Tensor> {
            let idx: Vec<u32> = (0..r.pairs.len()).map(|j| f(j) as u32).collect();
            Ok(flat.index_select(&Tensor::from_vec(idx, r.pairs.len(), dev)?, 0)?)
        };
        let p = at(&|j| r.pairs[j].0 * e + r.pairs[j].1)?;
        let gate = match self.cfg.router {
            Router::Top1 => (&p / p.detach())?,
            Router::Top2 => {
                let denom = (at(&|j| r.pairs[j].0 * e + r.chosen[j][0])?
                    + at(&|j| r.pairs[j].0 * e + r.chosen[j][1])?)?;
                (&p / denom)?
            }
        };
        // The one copy of the hidden states: every kept pair's row, grouped by expert.
        let xs = x2.index_select(&tok, 0)?;
        let mut outs = Vec::with_capacity(e);
        let mut off = 0;
        for (ex, &c) in self.experts.iter().zip(&r.counts) {
            if c > 0 {
                outs.push(ex.forward(&xs.narrow(0, off, c)?)?);
                off += c;
            }
        }
        let y = Tensor::cat(&outs, 0)?;
        let y = y.broadcast_mul(&gate.unsqueeze(1)?.to_dtype(y.dtype())?)?;
        let out = Tensor::zeros((n, d), y.dtype(), dev)?.index_add(&tok, &y, 0)?;
        if crate::ops::training() {
            let aux = balance_loss(&probs, &r.first, self.cfg.aux_loss_weight)?;
            let mut slot = self.aux.lock().unwrap_or_else(|p| p.into_inner());
            *slot = Some(match slot.take() {
                Some(a) => (a + aux)?,
                None => aux,
            });
        }
        {
            let mut s = self.stats.lock().unwrap_or_else(|p| p.into_inner());
            for (t, c) in s.tokens.iter_mut().zip(&r.counts) {
                *t += *c as u64;
            }
            s.dropped += r.dropped as u64;
        }
        Ok(out.reshape(dims)?)
    }

    fn linears(&self) -> Vec<(String, &Linear)> {
        self.experts
            .iter()
            .enumerate()
            .flat_map(|(k, ex)| {
                ex.linears()
                    .into_iter()
                    .map(move |(n, l)| (format!("experts.{k}.{n}"), l))
            })
            .collect()
    }
    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        self.experts
            .iter_mut()
            .enumerate()
            .flat_map(|(k, ex)| {
                ex.linears_mut()
                    .into_iter()
                    .map(move |(n, l)| (format!("experts.{k}.{n}"), l))
            })
            .collect()
    }
    fn other_tensors(&self) -> Vec<(String, &Tensor)> {
        vec![("gate.weight".into(), &self.router)]
    }
    fn other_tensors_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        vec![("gate.weight".into(), &mut self.router)]
    }
    fn take_aux_loss(&self) -> Option<Tensor> {
        self.aux.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn cfg(router: Router, cf: f64, drop: bool) -> MoeConfig {
        MoeConfig {
            router,
            capacity_factor: cf,
            drop_tokens: drop,
            aux_loss_weight: 0.01,
        }
    }

    // 5 tokens, 3 experts; first choices 0, 0, 0, 1, 2 and second choices 1, 2, 1, 0, 0.
    const P: [f32; 15] = [
        0.6, 0.3, 0.1, //
        0.5, 0.1, 0.4, //
        0.7, 0.2, 0.1, //
        0.3, 0.6, 0.1, //
        0.25, 0.15, 0.6,
    ];

    #[test]
    fn top1_capacity_drops_the_late_tokens_of_a_full_expert() {
        // ceil(1.0 · 1 · 5 / 3) = 2 slots: expert 0 keeps tokens 0 and 1, drops token 2.
        let r = route(&P, 5, 3, &cfg(Router::Top1, 1.0, true));
        assert_eq!(r.capacity, 2);
        assert_eq!(r.pairs, vec![(0, 0), (1, 0), (3, 1), (4, 2)]);
        assert_eq!(r.counts, vec![2, 1, 1]);
        assert_eq!(r.first, vec![3, 1, 1]);
        assert_eq!(r.dropped, 1);
        // Without dropping the capacity is not enforced.
        let r = route(&P, 5, 3, &cfg(Router::Top1, 1.0, false));
        assert_eq!(r.counts, vec![3, 1, 1]);
        assert_eq!(r.dropped, 0);
    }

    #[test]
    fn top2_first_choices_claim_slots_before_second_choices() {
        // ceil(1.0 · 2 · 5 / 3) = 4 slots. First choices fill 3/1/1; second choices in token
        // order: t0→1 (2), t1→2 (2), t2→1 (3), t3→0 (4), t4→0 dropped (expert 0 full).
        let r = route(&P, 5, 3, &cfg(Router::Top2, 1.0, true));
        assert_eq!(r.capacity, 4);
        assert_eq!(r.counts, vec![4, 3, 2]);
        assert_eq!(r.dropped, 1);
        assert_eq!(
            r.pairs,
            vec![
                (0, 0),
                (1, 0),
                (2, 0),
                (3, 0),
                (0, 1),
                (2, 1),
                (3, 1),
                (1, 2),
                (4, 2)
            ]
        );
        assert_eq!(r.chosen[3], vec![1, 0]);
        // Capacity factor 0.5: ceil(0.5 · 10 / 3) = 2 slots.
        assert_eq!(route(&P, 5, 3, &cfg(Router::Top2, 0.5, true)).capacity, 2);
        assert_eq!(capacity(1, 8, 1, 0.01), 1);
    }

    #[test]
    fn balance_loss_matches_the_hand_computed_value() {
        let probs = Tensor::from_vec(P.to_vec(), (5, 3), &Device::Cpu).unwrap();
        let r = route(&P, 5, 3, &cfg(Router::Top1, 1.0, false));
        // f = (3/5, 1/5, 1/5); P = (2.35/5, 1.35/5, 1.3/5);
        // Σ f·P = (3·2.35 + 1.35 + 1.3)/25 = 9.7/25 = 0.388; × α E = 0.01 · 3 → 0.01164.
        let l = balance_loss(&probs, &r.first, 0.01)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((l - 0.01164).abs() < 1e-7, "{l}");
        // Uniform routing and probabilities give the minimum α (E · E · 1/E · 1/E = 1).
        let u = Tensor::full(0.25f32, (8, 4), &Device::Cpu).unwrap();
        let l = balance_loss(&u, &[2, 2, 2, 2], 0.5)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((l - 0.5).abs() < 1e-7, "{l}");
    }
}
