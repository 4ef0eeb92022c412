//! MPOE (Gao et al., COLING 2022) and sparse upcycling: turn a pretrained dense SwiGLU FFN
//! into a mixture of E experts, each an exact copy of the FFN at the start, behind a new
//! router ([`models::moe::MoeFfn`]). With `mpo`, every expert's gate/up/down matrix is an
//! n-site MPO whose central tensor is ONE variable per layer and matrix held by all experts
//! (one optimizer slot, the summed gradient, saved once); each expert keeps its own auxiliary
//! tensors. Without it the experts are dense copies: the plain MoE baseline, same routing.
//!
//! Checkpoint layout: config.json (+ `num_local_experts`, `num_experts_per_tok`,
//! `mpolm_moe_layers`), tokenizer, `model.safetensors` with the dense tensors under HF names,
//! the router as `model.layers.L.mlp.gate.weight`, dense experts as
//! `model.layers.L.mlp.experts.K.{gate,up,down}_proj.weight`, MPO experts' cores as
//! `…experts.K.<m>.mpo.core_j` and a shared central tensor once as
//! `model.layers.L.mlp.shared.<m>.mpo.core_c`; and `moe_manifest.json` (routing, layers, the
//! MPO shapes) against which loading checks every tensor.

use crate::finetune::{TrainHook, Trainer};
use crate::mpop::{self, MpoLayer};
use crate::{Error, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use models::linear::Linear;
use models::llama::Mlp;
use models::moe::{MoeConfig, MoeFfn, Router};
use models::{FeedForward, Model};
use mpo::{ForwardMode, Mpo, MpoCores, MpoLinear, MpoManifest, MpoShape};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

pub const MANIFEST: &str = "moe_manifest.json";
/// The SwiGLU matrices every expert has.
pub const MATRICES: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];
/// More experts than this is not a model anyone upcycles (and bounds what a file can ask for).
pub const MAX_EXPERTS: usize = 256;

#[derive(Debug, Clone)]
pub struct UpcycleOptions {
    pub experts: usize,
    pub router: Router,
    /// MPO experts sharing each layer's and matrix's central tensor.
    pub mpo: bool,
    /// MPO sites (odd, 3..=9).
    pub sites: usize,
    /// Default: 1.0 for top-1 (Switch), 1.25 for top-2 (tensor2tensor's training value).
    pub capacity_factor: Option<f64>,
    pub drop_tokens: bool,
    /// Decoder layers to upcycle (None = all).
    pub layers: Option<Vec<usize>>,
    pub aux_loss_weight: f64,
    pub seed: u64,
}

impl Default for UpcycleOptions {
    fn default() -> Self {
        UpcycleOptions {
            experts: 8,
            router: Router::Top1,
            mpo: false,
            sites: 5,
            capacity_factor: None,
            drop_tokens: false,
            layers: None,
            aux_loss_weight: 0.01,
            seed: 42,
        }
    }
}

impl UpcycleOptions {
    pub fn config(&self) -> MoeConfig {
        MoeConfig {
            router: self.router,
            capacity_factor: self.capacity_factor.unwrap_or(match self.router {
                Router::Top1 => 1.0,
                Router::Top2 => 1.25,
            }),
            drop_tokens: self.drop_tokens,
            aux_loss_weight: self.aux_loss_weight,
        }
    }
}

/// The routing settings a block can run with (also what a manifest must hold).
fn check_config(cfg: &MoeConfig, experts: usize) -> std::result::Result<(), String> {
    if !(2..=MAX_EXPERTS).contains(&experts) {
        return Err(format!(
            "`experts` must be in 2..={MAX_EXPERTS}, got {experts}"
        ));
    }
    if cfg.router.k() > experts {
        return Err(format!(
            "`router` {} needs at least {} experts, got {experts}",
            cfg.router.name(),
            cfg.router.k()
        ));
    }
    if !(cfg.capacity_factor > 0.0 && cfg.capacity_factor <= 1e6) {
        return Err(format!(
            "`capacity_factor` must be > 0 (and at most 1e6), got {}",
            cfg.capacity_factor
        ));
    }
    if !(cfg.aux_loss_weight >= 0.0 && cfg.aux_loss_weight.is_finite()) {
        return Err(format!(
            "`aux_loss_weight` must be a finite number >= 0, got {}",
            cfg.aux_loss_weight
        ));
    }
    Ok(())
}

pub fn check(o: &UpcycleOptions) -> Result<()> {
    let opt = |msg: String| {
        let name = ["experts", "router", "capacity_factor", "aux_loss_weight"]
            .into_iter()
            .find(|n| msg.starts_with(&format!("`{n}`")))
            .unwrap_or("experts");
        Error::option(name, msg)
    };
    check_config(&o.config(), o.experts).map_err(opt)?;
    if o.mpo && (!(3..=9).contains(&o.sites) || o.sites % 2 == 0) {
        return Err(Error::option(
            "sites",
            format!(
                "`sites` must be 3, 5, 7 or 9 (odd, so there is one central tensor), got {}",
                o.sites
            ),
        ));
    }
    Ok(())
}

/// Layer indices from `all`, `odd`, `even` or a comma list of indices and ranges (`3,5,10-13`).
pub fn parse_layers(spec: &str, num_layers: usize) -> Result<Vec<usize>> {
    let bad = |m: String| Error::option("layers", m);
    let s = spec.trim();
    let mut v: BTreeSet<usize> = BTreeSet::new();
    match s {
        "all" => v.extend(0..num_layers),
        "odd" => v.extend((0..num_layers).filter(|i| i % 2 == 1)),
        "even" => v.extend((0..num_layers).step_by(2)),
        _ => {
            for part in s.split(',') {
                let part = part.trim();
                let num = |x: &str| {
                    x.trim().parse::<usize>().map_err(|_| {
                        bad(format!(
                            "`layers` '{}' is not all, odd, even or a list of indices and ranges like 3,5,10-13",
                            models::untrusted::escape(spec)
                        ))
                    })
                };
                let (a, b) = match part.split_once('-') {
                    Some((a, b)) => (num(a)?, num(b)?),
                    None => (num(part)?, num(part)?),
                };
                if a > b || b >= num_layers {
                    return Err(bad(format!(
                        "`layers` {part} is out of range: the model has layers 0..={}",
                        num_layers.saturating_sub(1)
                    )));
                }
                v.extend(a..=b);
            }
        }
    }
    if v.is_empty() {
        return Err(bad(format!(
            "`layers` '{}' selects no layer",
            models::untrusted::escape(spec)
        )));
    }
    Ok(v.into_iter().collect())
}

#[derive(Debug, Clone, Serialize)]
pub struct UpcycleReport {
    pub layers: Vec<usize>,
    pub experts: usize,
    pub router: String,
    pub mpo: bool,
    pub sites: Option<usize>,
    pub dense_params: usize,
    pub summary: MoeSummary,
}

/// N(0, 0.02²) router rows: the router is new; the output does not depend on it at the start
/// because every expert computes the same function.
fn router_init(e: usize, h: usize, seed: u64) -> Result<Tensor> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x0E0E_5EED);
    let w: Vec<f32> = (0..e * h)
        .map(|_| {
            let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-12), rng.random::<f64>());
            (0.02 * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
        })
        .collect();
    Ok(Tensor::from_vec(w, (e, h), &Device::Cpu)?)
}

/// E linears of one matrix: dense copies (distinct tensors, so each trains on its own), or
/// full-bond MPOs of the matrix sharing one central variable.
fn expert_linears(
    w: &Tensor,
    bias: Option<&Tensor>,
    e: usize,
    mpo_sites: Option<usize>,
) -> Result<Vec<Linear>> {
    let mut out = Vec::with_capacity(e);
    match mpo_sites {
        None => {
            for _ in 0..e {
                out.push(Linear::dense(
                    w.copy()?,
                    bias.map(|b| b.copy()).transpose()?,
                ));
            }
        }
        Some(n) => {
            let (rows, cols) = w.dims2()?;
            let data: Vec<f32> = w.flatten_all()?.to_vec1()?;
            let shape = MpoShape::auto(rows, cols, n)?;
            let full = Mpo::<f32>::decompose(&data, &shape)?;
            let bias_v: Option<Vec<f32>> = bias.map(|b| b.to_vec1()).transpose()?;
            let mut central: Option<Var> = None;
            for _ in 0..e {
                let mut cores = MpoCores::from_mpo(&full, &Device::Cpu)?;
                let c = cores.central_index();
                match &central {
                    Some(v) => cores.set_var(c, v.clone())?,
                    None => central = Some(cores.var(c).clone()),
                }
                let b = bias_v
                    .as_ref()
                    .map(|b| Tensor::from_slice(b, b.len(), &Device::Cpu))
                    .transpose()?;
                let lin = MpoLinear::new(cores, b)?.with_mode(ForwardMode::Auto);
                out.push(Linear::new(Box::new(MpoLayer::new(lin))));
            }
        }
    }
    Ok(out)
}

fn mlp_from(mut lins: Vec<Linear>) -> Box<dyn FeedForward> {
    let down_proj = lins.pop().expect("three matrices");
    let up_proj = lins.pop().expect("three matrices");
    let gate_proj = lins.pop().expect("three matrices");
    Box::new(Mlp {
        gate_proj,
        up_proj,
        down_proj,
    })
}

/// Replace the chosen layers' FFNs of `m` by mixtures of experts.
pub fn upcycle(m: &mut Model, o: &UpcycleOptions) -> Result<UpcycleReport> {
    check(o)?;
    let name = m.source.name.clone();
    let dense_params = m.total_params();
    let arch = m.arch_name().to_string();
    let lm = match &mut m.arch {
        models::Arch::Causal(l) => l,
        models::Arch::Encoder(_) => {
            return Err(Error::Msg(format!(
                "{name} is a {arch} encoder: it has no decoder FFN matrices to upcycle (use a llama or qwen2 causal model)"
            )))
        }
    };
    let h = lm.hidden_size();
    let n_layers = lm.num_layers();
    let layers = match &o.layers {
        Some(l) => l.clone(),
        None => (0..n_layers).collect(),
    };
    if let Some(&bad) = layers.iter().find(|&&i| i >= n_layers) {
        return Err(Error::option(
            "layers",
            format!(
                "`layers` {bad} is out of range: the model has layers 0..={}",
                n_layers.saturating_sub(1)
            ),
        ));
    }
    let cfg = o.config();
    let ffns = lm.feed_forwards_mut();
    if ffns.is_empty() {
        return Err(Error::Msg(format!(
            "{name} ({arch}) exposes no feed-forward blocks to upcycle"
        )));
    }
    for (i, (prefix, ffn)) in ffns.into_iter().enumerate() {
        if !layers.contains(&i) {
            continue;
        }
        if ffn.as_any().is::<MoeFfn>() {
            return Err(Error::Msg(format!(
                "{name}: {prefix} is already a mixture of experts"
            )));
        }
        let lins = ffn.linears();
        let mut mats = Vec::new();
        for want in MATRICES {
            let Some((_, l)) = lins.iter().find(|(n, _)| n == want) else {
                return Err(Error::Msg(format!(
                    "{name}: {prefix} has no {want} matrix; upcycling needs a SwiGLU FFN (gate_proj, up_proj, down_proj)"
                )));
            };
            mats.push((l.weight()?.detach(), l.bias().map(|b| b.detach())));
        }
        let mut per_matrix: Vec<Vec<Linear>> = mats
            .iter()
            .map(|(w, b)| expert_linears(w, b.as_ref(), o.experts, o.mpo.then_some(o.sites)))
            .collect::<Result<_>>()?;
        let mut experts = Vec::with_capacity(o.experts);
        for _ in 0..o.experts {
            let lins: Vec<Linear> = per_matrix.iter_mut().map(|v| v.remove(0)).collect();
            experts.push(mlp_from(lins));
        }
        let router = router_init(o.experts, h, o.seed.wrapping_add(i as u64))?;
        *ffn = Box::new(MoeFfn::new(router, experts, cfg.clone())?);
    }
    let summary = summary(m).ok_or_else(|| Error::Msg("no layer was upcycled".into()))?;
    Ok(UpcycleReport {
        layers,
        experts: o.experts,
        router: cfg.router.name().into(),
        mpo: o.mpo,
        sites: o.mpo.then_some(o.sites),
        dense_params,
        summary,
    })
}

/// The model's mixture-of-experts blocks with their layer index and HF prefix.
pub fn moe_layers(m: &Model) -> Vec<(usize, String, &MoeFfn)> {
    let models::Arch::Causal(l) = &m.arch else {
        return Vec::new();
    };
    l.feed_forwards()
        .into_iter()
        .enumerate()
        .filter_map(|(i, (p, f))| f.as_any().downcast_ref::<MoeFfn>().map(|x| (i, p, x)))
        .collect()
}

pub fn is_moe(m: &Model) -> bool {
    !moe_layers(m).is_empty()
}

/// Parameters of the experts: shared by several experts (MPOE's central tensors, counted once)
/// or held by one; and what one token activates.
#[derive(Debug, Clone, Serialize)]
pub struct MoeSummary {
    pub layers: Vec<usize>,
    pub experts: usize,
    pub router: String,
    pub capacity_factor: f64,
    pub drop_tokens: bool,
    /// `dense` or `mpo`, per the experts' first matrix.
    pub expert_kind: String,
    pub shared_params: usize,
    /// Parameters only one expert holds, summed over experts and layers.
    pub per_expert_params: usize,
    pub router_params: usize,
    pub total_params: usize,
    /// Total minus the parameters of the experts a token does not visit (E − k of them).
    pub active_params: usize,
}

pub fn summary(m: &Model) -> Option<MoeSummary> {
    let layers = moe_layers(m);
    let (_, _, first) = layers.first()?;
    let e = first.num_experts();
    let mut shared = 0;
    let mut own = 0;
    let mut router = 0;
    let mut inactive = 0f64;
    for (_, _, f) in &layers {
        let mut holders: HashMap<candle_core::TensorId, (usize, BTreeSet<usize>)> = HashMap::new();
        let mut layer_own_extra = 0;
        for (x, ex) in f.experts.iter().enumerate() {
            for (_, l) in ex.linears() {
                let ids = l.param_ids();
                if ids.is_empty() {
                    // A layer that lists no ids owns what it holds.
                    layer_own_extra += l.num_params();
                }
                for (id, n) in ids {
                    holders
                        .entry(id)
                        .or_insert((n, BTreeSet::new()))
                        .1
                        .insert(x);
                }
            }
        }
        let mut layer_own = layer_own_extra;
        for (n, who) in holders.values() {
            if who.len() > 1 {
                shared += n;
            } else {
                layer_own += n;
            }
        }
        own += layer_own;
        router += f.router.elem_count();
        let ne = f.num_experts();
        inactive += (ne - f.cfg.router.k().min(ne)) as f64 * layer_own as f64 / ne as f64;
    }
    let total = m.total_params();
    let kind = first
        .experts
        .first()
        .and_then(|x| x.linears().first().map(|(_, l)| l.kind()))
        .unwrap_or_default();
    Some(MoeSummary {
        layers: layers.iter().map(|(i, _, _)| *i).collect(),
        experts: e,
        router: first.cfg.router.name().into(),
        capacity_factor: first.cfg.capacity_factor,
        drop_tokens: first.cfg.drop_tokens,
        expert_kind: kind,
        shared_params: shared,
        per_expert_params: own,
        router_params: router,
        total_params: total,
        active_params: total - (inactive.round() as usize).min(total),
    })
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MpoEntry {
    pub shape: MpoManifest,
    /// One central tensor for all experts of this layer and matrix.
    pub shared_central: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MoeManifest {
    pub format: String,
    pub version: u32,
    pub experts: usize,
    pub config: MoeConfig,
    pub layers: Vec<usize>,
    /// MPO experts by `model.layers.L.mlp.<matrix>`; a matrix not listed is dense.
    #[serde(default)]
    pub mpo: BTreeMap<String, MpoEntry>,
}

impl MoeManifest {
    fn validate(&self) -> std::result::Result<(), String> {
        if self.format != "mpolm-moe" {
            return Err(format!(
                "format '{}' is not a mixture-of-experts checkpoint (expected 'mpolm-moe')",
                models::untrusted::escape(&self.format)
            ));
        }
        if self.version != 1 {
            return Err(format!(
                "version {} is not supported (this mpolm reads version 1)",
                self.version
            ));
        }
        check_config(&self.config, self.experts).map_err(|e| e.replace('`', "'"))?;
        if self.layers.is_empty()
            || self.layers.len() > models::untrusted::MAX_LAYERS
            || self.layers.windows(2).any(|w| w[0] >= w[1])
        {
            return Err("layers must be a non-empty increasing list of layer indices".into());
        }
        let mpos = mpop::Manifest {
            format: "mpolm-mpo".into(),
            version: 1,
            layers: self
                .mpo
                .iter()
                .map(|(k, v)| (k.clone(), v.shape.clone()))
                .collect(),
        };
        mpos.validate()
    }
}

fn is_expert_tensor(name: &str, prefixes: &[String]) -> bool {
    prefixes.iter().any(|p| name.starts_with(&format!("{p}.")))
}

/// Save a model with mixture-of-experts layers (layout in the module docs). `contract` writes
/// every expert matrix dense (what `export --dense` gives: the plain MoE of the same function).
pub fn save(m: &Model, dir: &Path, contract: bool) -> Result<()> {
    let layers = moe_layers(m);
    let first = layers
        .first()
        .ok_or_else(|| Error::Msg("the model has no mixture-of-experts layer".into()))?
        .2;
    let e = first.num_experts();
    let prefixes: Vec<String> = layers.iter().map(|(_, p, _)| p.clone()).collect();
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (name, l) in m.linears() {
        if is_expert_tensor(&name, &prefixes) {
            continue;
        }
        tensors.insert(format!("{name}.weight"), l.weight()?.contiguous()?);
        if let Some(b) = l.bias() {
            tensors.insert(format!("{name}.bias"), b.contiguous()?);
        }
    }
    for (name, t) in m.other_tensors() {
        tensors.insert(name, t.contiguous()?);
    }
    let mut mpo = BTreeMap::new();
    for (_, prefix, f) in &layers {
        if f.num_experts() != e || f.cfg != first.cfg {
            return Err(Error::Msg(format!(
                "{prefix}: every mixture-of-experts layer must have the same experts and routing to be saved"
            )));
        }
        for mat in MATRICES {
            let lins: Vec<&Linear> = f
                .experts
                .iter()
                .map(|x| {
                    x.linears()
                        .into_iter()
                        .find(|(n, _)| n == mat)
                        .map(|(_, l)| l)
                        .ok_or_else(|| Error::Msg(format!("{prefix}: an expert has no {mat}")))
                })
                .collect::<Result<_>>()?;
            let mpos: Vec<&MpoLayer> = lins
                .iter()
                .filter_map(|l| l.inner().as_any().downcast_ref::<MpoLayer>())
                .collect();
            let same_bonds = mpos.len() == lins.len()
                && mpos
                    .iter()
                    .all(|p| p.cores().bonds() == mpos[0].cores().bonds());
            if contract || !same_bonds {
                for (k, l) in lins.iter().enumerate() {
                    let key = format!("{prefix}.experts.{k}.{mat}");
                    tensors.insert(format!("{key}.weight"), l.weight()?.contiguous()?);
                    if let Some(b) = l.bias() {
                        tensors.insert(format!("{key}.bias"), b.contiguous()?);
                    }
                }
                continue;
            }
            let c = mpos[0].cores().central_index();
            let cid = mpos[0].cores().var(c).as_tensor().id();
            let shared = mpos
                .iter()
                .all(|p| p.cores().var(c).as_tensor().id() == cid);
            for (k, p) in mpos.iter().enumerate() {
                let key = format!("{prefix}.experts.{k}.{mat}");
                for (j, v) in p.cores().vars().iter().enumerate() {
                    let tname = if shared && j == c {
                        format!("{prefix}.shared.{mat}.mpo.{}", Mpo::<f32>::core_name(j))
                    } else {
                        format!("{key}.mpo.{}", Mpo::<f32>::core_name(j))
                    };
                    tensors.insert(tname, v.as_tensor().contiguous()?);
                }
                if let Some(b) = lins[k].bias() {
                    tensors.insert(format!("{key}.bias"), b.contiguous()?);
                }
            }
            let (shape, _) = mpos[0].cores().to_mpo::<f32>()?.to_parts();
            mpo.insert(
                format!("{prefix}.{mat}"),
                MpoEntry {
                    shape,
                    shared_central: shared,
                },
            );
        }
    }
    let man = MoeManifest {
        format: "mpolm-moe".into(),
        version: 1,
        experts: e,
        config: first.cfg.clone(),
        layers: layers.iter().map(|(i, _, _)| *i).collect(),
        mpo,
    };
    let text = serde_json::to_string_pretty(&man).map_err(|e| Error::Msg(e.to_string()))?;
    let mut cfg = serde_json::Map::new();
    cfg.insert("num_local_experts".into(), json!(e));
    cfg.insert("num_experts_per_tok".into(), json!(first.cfg.router.k()));
    cfg.insert("mpolm_moe_layers".into(), json!(man.layers));
    models::export::write_hf_dir_with(m, dir, &tensors, &[(MANIFEST, text)], cfg)?;
    Ok(())
}

/// The FFNs of the MoE layers: placeholders in the dense skeleton that [`load`] replaces by
/// the experts (the rest of the directory's tensors build the skeleton).
struct MoeLayers {
    prefixes: Vec<String>,
}

impl models::source::SpecialLinears for MoeLayers {
    fn holds(&self, module: &str) -> bool {
        is_expert_tensor(module, &self.prefixes)
    }
    fn build(
        &self,
        _rest: &models::weights::Weights,
        _module: &str,
        _out_f: usize,
        _in_f: usize,
        _bias: models::Bias,
    ) -> models::Result<Linear> {
        Ok(Linear::new(models::linear::empty()))
    }
}

/// Tensors of the MoE layers, taken out by name as the experts are built; what is left at the
/// end was not described by the manifest.
struct Store {
    map: HashMap<String, Tensor>,
    path: std::path::PathBuf,
}

impl Store {
    fn take(&mut self, key: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self
            .map
            .remove(key)
            .ok_or_else(|| models::Error::MissingTensor {
                path: self.path.clone(),
                name: key.to_string(),
            })?;
        if t.dims() != shape {
            return Err(models::Error::Shape {
                path: self.path.clone(),
                name: key.to_string(),
                expected: shape.to_vec(),
                got: t.dims().to_vec(),
            }
            .into());
        }
        let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        if v.iter().any(|x| !x.is_finite()) {
            return Err(models::Error::Safetensors {
                path: self.path.clone(),
                msg: format!(
                    "tensor '{}' holds NaN or infinite values",
                    models::untrusted::escape(key)
                ),
            }
            .into());
        }
        Ok(t.to_dtype(DType::F32)?)
    }
}

/// Load a checkpoint written by [`save`]: manifest and config checked against each other, the
/// dense skeleton built, then each MoE layer from its tensors (every one accounted for).
pub fn load(dir: &Path) -> Result<Model> {
    let mpath = dir.join(MANIFEST);
    let text = models::untrusted::read_text(&mpath, models::untrusted::MAX_JSON_BYTES)?;
    let man: MoeManifest = serde_json::from_str(&text)
        .map_err(|e| models::Error::config(&mpath, format!("invalid manifest: {e}")))?;
    man.validate()
        .map_err(|e| models::Error::config(&mpath, e))?;
    let cpath = dir.join("config.json");
    let ctext = models::untrusted::read_text(&cpath, models::untrusted::MAX_JSON_BYTES)?;
    let cfg: Value = serde_json::from_str(&ctext)
        .map_err(|e| models::Error::config(&cpath, format!("invalid JSON: {e}")))?;
    match cfg.get("num_local_experts").and_then(Value::as_u64) {
        Some(n) if n as usize == man.experts => {}
        other => {
            return Err(models::Error::config(
                &cpath,
                format!(
                    "num_local_experts is {}, but {MANIFEST} describes {} experts; the checkpoint is inconsistent",
                    other.map_or("missing".to_string(), |n| n.to_string()),
                    man.experts
                ),
            )
            .into())
        }
    }
    let st_path = dir.join("model.safetensors");
    let all = models::weights::load_safetensors(&st_path)?;
    let prefixes: Vec<String> = man
        .layers
        .iter()
        .map(|i| format!("model.layers.{i}.mlp"))
        .collect();
    let (moe, rest): (HashMap<_, _>, HashMap<_, _>) = all
        .into_iter()
        .partition(|(k, _)| is_expert_tensor(k, &prefixes));
    let mut types = BTreeMap::new();
    types.insert("f32 (as loaded)".to_string(), rest.len() + moe.len());
    let source = models::source::Overlay::new(
        models::weights::Weights::new(rest, &st_path),
        MoeLayers {
            prefixes: prefixes.clone(),
        },
    );
    let src = models::hub::ModelSource {
        name: dir.display().to_string(),
        format: models::hub::Format::HfDir,
        path: dir.to_path_buf(),
    };
    let mut m = Model::from_source(src, &source, types)?;
    let (h, inter) = {
        let l = m.llama().map_err(|_| {
            models::Error::config(
                &cpath,
                "mixture-of-experts checkpoints are llama/qwen2 models",
            )
        })?;
        (l.cfg.hidden_size, l.cfg.intermediate_size)
    };
    let n_layers = m.causal()?.num_layers();
    if let Some(bad) = man.layers.iter().find(|&&i| i >= n_layers) {
        return Err(models::Error::config(
            &mpath,
            format!("layer {bad} is out of range: the model has {n_layers} layers"),
        )
        .into());
    }
    let mut store = Store {
        map: moe,
        path: st_path.clone(),
    };
    let e = man.experts;
    let dims = |mat: &str| {
        if mat == "down_proj" {
            [h, inter]
        } else {
            [inter, h]
        }
    };
    let mut built: BTreeMap<usize, MoeFfn> = BTreeMap::new();
    let described: BTreeSet<String> = prefixes
        .iter()
        .flat_map(|p| MATRICES.iter().map(move |m| format!("{p}.{m}")))
        .collect();
    if let Some(k) = man.mpo.keys().find(|k| !described.contains(*k)) {
        return Err(models::Error::config(
            &mpath,
            format!(
                "MPO entry '{}' is not a matrix of the listed layers {:?}",
                models::untrusted::escape(k),
                man.layers
            ),
        )
        .into());
    }
    for (&li, prefix) in man.layers.iter().zip(&prefixes) {
        let router = store.take(&format!("{prefix}.gate.weight"), &[e, h])?;
        let mut per_matrix: Vec<Vec<Linear>> = Vec::new();
        for mat in MATRICES {
            let [rows, cols] = dims(mat);
            let mut lins = Vec::with_capacity(e);
            let bias_of = |store: &mut Store, key: &str| -> Result<Option<Tensor>> {
                let bk = format!("{key}.bias");
                if store.map.contains_key(&bk) {
                    Ok(Some(store.take(&bk, &[rows])?))
                } else {
                    Ok(None)
                }
            };
            match man.mpo.get(&format!("{prefix}.{mat}")) {
                None => {
                    for k in 0..e {
                        let key = format!("{prefix}.experts.{k}.{mat}");
                        let w = store.take(&format!("{key}.weight"), &[rows, cols])?;
                        lins.push(Linear::dense(w, bias_of(&mut store, &key)?));
                    }
                }
                Some(ent) => {
                    let s = &ent.shape;
                    if [s.orig_rows, s.orig_cols] != [rows, cols] {
                        return Err(models::Error::config(
                            &mpath,
                            format!(
                                "{prefix}.{mat}: MPO of a {}×{} matrix where the model has {rows}×{cols}",
                                s.orig_rows, s.orig_cols
                            ),
                        )
                        .into());
                    }
                    let n = s.core_shapes.len();
                    let c = n / 2;
                    let central = if ent.shared_central {
                        let key = format!("{prefix}.shared.{mat}.mpo.{}", Mpo::<f32>::core_name(c));
                        Some(store.take(&key, &s.core_shapes[c])?)
                    } else {
                        None
                    };
                    let mut shared_var: Option<Var> = None;
                    for k in 0..e {
                        let key = format!("{prefix}.experts.{k}.{mat}");
                        let mut vals = Vec::with_capacity(n);
                        for (j, shp) in s.core_shapes.iter().enumerate() {
                            let t = match (&central, j == c) {
                                (Some(t), true) => t.clone(),
                                _ => store.take(
                                    &format!("{key}.mpo.{}", Mpo::<f32>::core_name(j)),
                                    shp,
                                )?,
                            };
                            vals.push(t.flatten_all()?.to_vec1::<f32>()?);
                        }
                        let mp = Mpo::<f32>::from_parts(s, vals)
                            .map_err(|er| models::Error::config(&mpath, format!("{key}: {er}")))?;
                        let mut cores = MpoCores::from_mpo(&mp, &Device::Cpu)?;
                        if ent.shared_central {
                            match &shared_var {
                                Some(v) => cores.set_var(c, v.clone())?,
                                None => shared_var = Some(cores.var(c).clone()),
                            }
                        }
                        let b = bias_of(&mut store, &key)?;
                        let lin = MpoLinear::new(cores, b)?.with_mode(ForwardMode::Auto);
                        lins.push(Linear::new(Box::new(MpoLayer::new(lin))));
                    }
                }
            }
            per_matrix.push(lins);
        }
        let mut experts = Vec::with_capacity(e);
        for _ in 0..e {
            experts.push(mlp_from(
                per_matrix.iter_mut().map(|v| v.remove(0)).collect(),
            ));
        }
        built.insert(li, MoeFfn::new(router, experts, man.config.clone())?);
    }
    if let Some(extra) = store.map.keys().min() {
        return Err(models::Error::config(
            &mpath,
            format!(
                "tensor '{}' is not described by the manifest ({} experts in layers {:?})",
                models::untrusted::escape(extra),
                e,
                man.layers
            ),
        )
        .into());
    }
    for (i, (_, ffn)) in m.causal_mut()?.feed_forwards_mut().into_iter().enumerate() {
        if let Some(b) = built.remove(&i) {
            *ffn = Box::new(b);
        }
    }
    Ok(m)
}

/// During fine-tuning: per-expert token counts into the log, and MPOE's Bernoulli(p_b) mask
/// of the shared central tensors' update (drawn per step from the seed, so a resumed run
/// draws the same masks).
pub(crate) struct MoeHook {
    p: f64,
    seed: u64,
    checked: bool,
    masked_steps: Vec<usize>,
    /// Tokens per expert over the run, by layer prefix.
    totals: BTreeMap<String, Vec<u64>>,
    /// Per step: tokens per expert summed over layers, and dropped choices.
    steps: Vec<(usize, Vec<u64>, u64)>,
}

impl MoeHook {
    pub(crate) fn new(p: Option<f64>, seed: u64) -> Result<Self> {
        let p = p.unwrap_or(0.0);
        if !(0.0..=1.0).contains(&p) {
            return Err(Error::option(
                "central_mask_p",
                format!("`central_mask_p` must be in [0, 1], got {p}"),
            ));
        }
        Ok(MoeHook {
            p,
            seed,
            checked: false,
            masked_steps: Vec::new(),
            totals: BTreeMap::new(),
            steps: Vec::new(),
        })
    }

    /// Whether step `step` masks the central tensors.
    pub(crate) fn draw(p: f64, seed: u64, step: usize) -> bool {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(
            seed ^ 0xCE17_0A5C ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        rng.random::<f64>() < p
    }
}

/// The central tensors several experts share, once each.
pub fn shared_centrals(m: &Model) -> Vec<Var> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for (_, _, f) in moe_layers(m) {
        let mut count: HashMap<candle_core::TensorId, (usize, Var)> = HashMap::new();
        for ex in &f.experts {
            for (_, l) in ex.linears() {
                if let Some(p) = l.inner().as_any().downcast_ref::<MpoLayer>() {
                    let v = p.cores().var(p.cores().central_index());
                    count.entry(v.as_tensor().id()).or_insert((0, v.clone())).0 += 1;
                }
            }
        }
        for (id, (n, v)) in count {
            if n > 1 && seen.insert(id) {
                out.push(v);
            }
        }
    }
    out
}

impl TrainHook for MoeHook {
    fn name(&self) -> &'static str {
        "moe"
    }

    fn before_step(&mut self, tr: &mut Trainer<'_>, _step: usize) -> Result<()> {
        if !self.checked {
            self.checked = true;
            if self.p > 0.0 && shared_centrals(tr.model).is_empty() {
                return Err(Error::option(
                    "central_mask_p",
                    "`central_mask_p` masks the central tensor the experts share, but this model has none (upcycle it with mpo experts first)",
                ));
            }
        }
        // Evaluation forwards between steps are not training tokens.
        for (_, _, f) in moe_layers(tr.model) {
            f.take_stats();
        }
        Ok(())
    }

    fn after_backward(
        &mut self,
        tr: &mut Trainer<'_>,
        grads: &mut GradStore,
        step: usize,
    ) -> Result<()> {
        let layers = moe_layers(tr.model);
        if layers.is_empty() {
            return Ok(());
        }
        let mut sum: Vec<u64> = Vec::new();
        let mut dropped = 0;
        for (_, prefix, f) in &layers {
            let s = f.take_stats();
            let t = self
                .totals
                .entry(prefix.clone())
                .or_insert_with(|| vec![0; s.tokens.len()]);
            for (a, b) in t.iter_mut().zip(&s.tokens) {
                *a += b;
            }
            if sum.len() < s.tokens.len() {
                sum.resize(s.tokens.len(), 0);
            }
            for (a, b) in sum.iter_mut().zip(&s.tokens) {
                *a += b;
            }
            dropped += s.dropped;
        }
        self.steps.push((step + 1, sum, dropped));
        if self.p > 0.0 && Self::draw(self.p, self.seed, step) {
            for v in shared_centrals(tr.model) {
                grads.remove(v.as_tensor());
            }
            self.masked_steps.push(step + 1);
        }
        Ok(())
    }

    fn state(&self) -> Value {
        if self.steps.is_empty() && self.masked_steps.is_empty() {
            return Value::Null;
        }
        json!({
            "central_mask_p": self.p,
            "masked_steps": self.masked_steps,
            "expert_tokens": self.totals,
            "steps": self.steps.iter().map(|(s, t, d)| json!({"step": s, "expert_tokens": t, "dropped": d})).collect::<Vec<_>>(),
        })
    }

    fn restore(&mut self, _tr: &mut Trainer<'_>, state: &Value) -> Result<()> {
        let bad = || Error::Msg("the checkpoint's mixture-of-experts log is malformed".into());
        self.masked_steps =
            serde_json::from_value(state["masked_steps"].clone()).map_err(|_| bad())?;
        self.totals = serde_json::from_value(state["expert_tokens"].clone()).map_err(|_| bad())?;
        self.steps = state["steps"]
            .as_array()
            .ok_or_else(bad)?
            .iter()
            .map(|s| {
                Ok((
                    s["step"].as_u64().ok_or_else(bad)? as usize,
                    serde_json::from_value(s["expert_tokens"].clone()).map_err(|_| bad())?,
                    s["dropped"].as_u64().ok_or_else(bad)?,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(())
    }
}
