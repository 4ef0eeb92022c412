//! MPOBERT (EMNLP Findings 2023): a BERT encoder whose Q/K/V/attention-out/FFN matrices are
//! full-bond MPOs with one central tensor per matrix type shared by all layers (`share all`),
//! by groups of consecutive layers (`groups:G`, MPOBERT+), or by none; every layer keeps its own
//! auxiliary tensors, biases and LayerNorms, and optionally a rank-r adapter W = MPO + U·D
//! (U = 0 at the start, so the adapter begins as a no-op).
//!
//! The paper starts from ALBERT, whose layers are one layer already. A pretrained BERT's layers
//! differ, so the shared central is made ([`mpo::shared`]): the central of one chosen layer, or
//! a joint fit over the layers of a group; each layer's auxiliaries are then fitted to its own
//! matrix by least squares. Deeper models repeat the source layers cyclically (layer l starts
//! from source layer l mod S); with `init scaled` the auxiliaries of the layers past the source
//! depth are multiplied by (2L)^(−1/4), the paper's rule for stable deep stacks.
//!
//! A shared tensor is one `Var` held by several layers: the fine-tuning engine makes one
//! optimizer slot of it (its gradient is the sum over the layers), the model counts it once
//! ([`models::LinearLayer::param_ids`]), and the checkpoint stores it once: `model.safetensors`
//! holds each distinct tensor under the first name that holds it and `mpobert_manifest.json`
//! maps the other names to it (`aliases`).
//!
//! Layer 0's biases and LayerNorms can be shared by all layers (`share_norms`), as the released
//! code does. It is off by default: our layers come from six different pretrained layers, whose
//! biases and LayerNorm gains differ, so forcing layer 0's on every layer changes each layer's
//! output on top of the central's approximation, for a saving of 9·hidden + ffn numbers per
//! layer (six biases, two LayerNorms: 0.3% of a MiniLM layer).

use crate::mpop::MpoLayer;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use models::model::{Arch, Model};
use models::LinearLayer;
use mpo::{Mpo, MpoCores, MpoLinear, MpoShape};
use serde::{Deserialize, Serialize};
use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

pub const MANIFEST: &str = "mpobert_manifest.json";

/// The matrix types of a BERT layer that become shared-central MPOs (HF names in a layer).
pub const MATRICES: [&str; 6] = [
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
];

/// MPO sites per matrix (all the papers use five: A1 A2 C A3 A4).
const SITES: usize = 5;
/// Procrustes rounds of the joint central fit.
const JOINT_ITERS: usize = 12;
/// Standard deviation of the adapter's D at the start (BERT's initializer range).
const ADAPTER_STD: f64 = 0.02;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Share {
    /// One central per matrix type for the whole stack.
    All,
    /// One central per matrix type for each of G groups of consecutive layers.
    Groups(usize),
    /// Every layer its own central.
    None,
}

impl Share {
    pub fn groups(self, depth: usize) -> usize {
        match self {
            Share::All => 1,
            Share::Groups(g) => g,
            Share::None => depth,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Init {
    /// Layers past the source depth are plain copies.
    Copy,
    /// Their auxiliary tensors are scaled by (2L)^(−1/4).
    Scaled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CentralFrom {
    /// The central tensor of source layer K.
    Layer(usize),
    /// A joint fit over the source layers of each group.
    Joint,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MpoBertOptions {
    pub share: Share,
    pub depth: usize,
    /// Rank of the per-layer adapter (0: none).
    pub adapter_rank: usize,
    pub init: Init,
    pub central_from: CentralFrom,
    /// Share layer 0's biases and LayerNorms across layers (the released code's choice).
    pub share_norms: bool,
    pub seed: u64,
}

impl Default for MpoBertOptions {
    fn default() -> Self {
        MpoBertOptions {
            share: Share::All,
            depth: 0,
            adapter_rank: 0,
            init: Init::Scaled,
            central_from: CentralFrom::Joint,
            share_norms: false,
            seed: 42,
        }
    }
}

/// The auxiliary scale of new layers in a stack of `depth` layers: (2L)^(−1/4).
pub fn aux_scale(depth: usize) -> f64 {
    (2.0 * depth as f64).powf(-0.25)
}

/// A per-layer low-rank term U·D (U [out, r] starts at zero, D [r, in] ~ N(0, 0.02²)).
#[derive(Debug, Clone)]
pub struct Adapter {
    pub u: Var,
    pub d: Var,
}

/// One matrix of an MPOBERT layer: an MPO whose central core may be held by other layers, plus
/// the optional adapter.
#[derive(Debug)]
pub struct MpoBertLinear {
    pub mpo: MpoLayer,
    pub adapter: Option<Adapter>,
}

impl MpoBertLinear {
    /// Every parameter tensor: cores, bias, adapter U and D.
    pub fn vars(&self) -> Vec<Var> {
        let mut v: Vec<Var> = self.mpo.inner.cores().vars().to_vec();
        if let Some(b) = self.mpo.inner.bias() {
            v.push(b.clone());
        }
        if let Some(a) = &self.adapter {
            v.push(a.u.clone());
            v.push(a.d.clone());
        }
        v
    }
}

impl LinearLayer for MpoBertLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.mpo.forward(x)?;
        match &self.adapter {
            Some(a) => {
                let low = models::linear::matmul_t(x, a.d.as_tensor())?;
                y + models::linear::matmul_t(&low, a.u.as_tensor())?
            }
            None => Ok(y),
        }
    }
    fn in_features(&self) -> usize {
        self.mpo.in_features()
    }
    fn out_features(&self) -> usize {
        self.mpo.out_features()
    }
    fn num_params(&self) -> usize {
        self.vars().iter().map(|v| v.as_tensor().elem_count()).sum()
    }
    fn param_ids(&self) -> Vec<(candle_core::TensorId, usize)> {
        self.vars()
            .iter()
            .map(|v| (v.as_tensor().id(), v.as_tensor().elem_count()))
            .collect()
    }
    fn weight(&self) -> candle_core::Result<Tensor> {
        let w = self.mpo.weight()?;
        match &self.adapter {
            Some(a) => w + a.u.as_tensor().matmul(a.d.as_tensor())?,
            None => Ok(w),
        }
    }
    fn bias(&self) -> Option<Tensor> {
        self.mpo.bias()
    }
    fn kind(&self) -> String {
        "mpobert".into()
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// Whether `m` holds MPOBERT layers.
pub fn is_mpobert(m: &Model) -> bool {
    m.linears()
        .iter()
        .any(|(_, l)| l.inner().as_any().is::<MpoBertLinear>())
}

/// The parts of one MPOBERT matrix, as a source hands them to the architecture.
#[derive(Clone)]
struct Parts {
    shape: MpoShape,
    cores: Vec<Var>,
    bias: Option<Var>,
    adapter: Option<Adapter>,
}

/// MPOBERT matrices built from their parts as the architecture asks (shared `Var`s stay
/// shared); everything else comes from the dense tensors (a name mapped to the same tensor as
/// another gives the very same tensor, so it trains and counts once).
struct SharedLayers {
    parts: HashMap<String, Parts>,
}

impl models::source::SpecialLinears for SharedLayers {
    fn holds(&self, module: &str) -> bool {
        self.parts.contains_key(module)
    }
    fn build(
        &self,
        rest: &models::weights::Weights,
        module: &str,
        out_f: usize,
        in_f: usize,
        _bias: models::Bias,
    ) -> models::Result<models::Linear> {
        let p = &self.parts[module];
        models::source::check_linear_shape(
            &rest.path,
            module,
            [p.shape.orig_rows, p.shape.orig_cols],
            [out_f, in_f],
        )?;
        let layer = build_layer(p).map_err(|e| models::Error::Msg(format!("{module}: {e}")))?;
        Ok(models::Linear::new(Box::new(layer)))
    }
}

fn build_layer(p: &Parts) -> Result<MpoBertLinear> {
    let cores = MpoCores::from_vars(p.shape.clone(), p.cores.clone())?;
    // A Var's tensor handed to MpoLinear stays that Var (candle reuses variables), so a bias
    // held by several layers stays one parameter.
    let inner = MpoLinear::new(cores, p.bias.as_ref().map(|b| b.as_tensor().clone()))?;
    if let (Some(b), Some(v)) = (&p.bias, inner.bias()) {
        debug_assert_eq!(b.as_tensor().id(), v.as_tensor().id());
    }
    Ok(MpoBertLinear {
        mpo: MpoLayer::new(inner),
        adapter: p.adapter.clone(),
    })
}

/// One matrix's reconstruction error after sharing.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FitError {
    pub matrix: String,
    pub group: usize,
    pub source_layer: usize,
    /// ‖W − Ŵ‖_F / ‖W‖_F against the source layer's matrix.
    pub rel_error: f64,
}

/// What [`build`] made.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BuildReport {
    pub options: MpoBertOptions,
    pub source_depth: usize,
    pub groups: usize,
    /// Source layer of each layer (cyclic repetition).
    pub layer_sources: Vec<usize>,
    /// Every (matrix type, group, source layer)'s relative reconstruction error.
    pub errors: Vec<FitError>,
    /// Multiplier of the auxiliary tensors of layers past the source depth (1 for `copy`).
    pub new_layer_aux_scale: f64,
}

/// Check `o` against a source of `source_depth` layers whose matrices' smaller side is
/// `min_side`; errors name the option at fault.
pub fn check_options(o: &MpoBertOptions, source_depth: usize, min_side: usize) -> Result<()> {
    let max = models::untrusted::MAX_LAYERS;
    if o.depth < source_depth || o.depth > max {
        return Err(Error::option(
            "depth",
            format!(
                "`depth` {} is out of range: it must be at least the source's {source_depth} layers (deeper stacks repeat them) and at most {max}",
                o.depth
            ),
        ));
    }
    if let Share::Groups(g) = o.share {
        if g == 0 || g > o.depth || o.depth % g != 0 {
            return Err(Error::option(
                "share",
                format!(
                    "{g} groups do not divide the {} layers; choose a divisor of `depth`",
                    o.depth
                ),
            ));
        }
    }
    if o.adapter_rank > min_side {
        return Err(Error::option(
            "adapter_rank",
            format!(
                "`adapter_rank` {} is above the rank of the smallest matrix ({min_side}); use 0..={min_side}",
                o.adapter_rank
            ),
        ));
    }
    if let CentralFrom::Layer(k) = o.central_from {
        if k >= source_depth {
            return Err(Error::option(
                "central_from",
                format!(
                    "`central_from` layer {k} does not exist: the source has layers 0..={}",
                    source_depth - 1
                ),
            ));
        }
    }
    Ok(())
}

fn to_f64(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
}

fn core_tensor(data: &[f64], shape: [usize; 4], scale: f64) -> Result<Tensor> {
    let v: Vec<f32> = data.iter().map(|x| (x * scale) as f32).collect();
    Ok(Tensor::from_vec(v, &shape, &Device::Cpu)?)
}

/// Normal samples N(0, std²) from a seeded generator (Box-Muller).
fn normal(n: usize, std: f64, seed: u64) -> Vec<f32> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-12), rng.random::<f64>());
            (std * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
        })
        .collect()
}

/// Build an MPOBERT encoder from a BERT model (`src` is consumed: its tokenizer and
/// embeddings are kept).
pub fn build(mut src: Model, o: &MpoBertOptions, progress: bool) -> Result<(Model, BuildReport)> {
    let bert = src.bert().map_err(|_| {
        Error::Msg(format!(
            "{}: MPOBERT is built from a BERT encoder (such as minilm-l6), not a {} model",
            src.source.name,
            src.arch_name()
        ))
    })?;
    if is_mpobert(&src) {
        return Err(Error::Msg(format!(
            "{} is already an MPOBERT checkpoint; build from its dense source instead",
            src.source.name
        )));
    }
    let s_depth = bert.cfg.num_hidden_layers;
    let (h, inter) = (bert.cfg.hidden_size, bert.cfg.intermediate_size);
    check_options(o, s_depth, h.min(inter))?;
    let depth = o.depth;
    let groups = o.share.groups(depth);
    let per_group = depth / groups;
    let p = bert.prefix.clone();
    let layer_name = |l: usize, t: &str| format!("{p}encoder.layer.{l}.{t}");
    let linears: HashMap<String, &models::Linear> = bert.linears().into_iter().collect();
    let mut rest: HashMap<String, Tensor> = HashMap::new();
    let is_layer = |n: &str| n.starts_with(&format!("{p}encoder.layer."));
    for (name, l) in bert.linears() {
        if is_layer(&name) {
            continue;
        }
        rest.insert(format!("{name}.weight"), l.weight()?);
        if let Some(b) = l.bias() {
            rest.insert(format!("{name}.bias"), b);
        }
    }
    let layer_others: HashMap<String, Tensor> = bert
        .other_tensors()
        .into_iter()
        .map(|(n, t)| (n, t.clone()))
        .collect();
    for (n, t) in &layer_others {
        if !is_layer(n) {
            rest.insert(n.clone(), t.clone());
        }
    }
    // Per-layer dense tensors (LayerNorms): fresh copies, so repeated layers train apart; with
    // `share_norms` every layer gets layer 0's very tensor.
    let suffixes = [
        "attention.output.LayerNorm.weight",
        "attention.output.LayerNorm.bias",
        "output.LayerNorm.weight",
        "output.LayerNorm.bias",
    ];
    for l in 0..depth {
        for s in suffixes {
            let src_l = if o.share_norms { 0 } else { l % s_depth };
            let t = layer_others
                .get(&layer_name(src_l, s))
                .ok_or_else(|| Error::Msg(format!("{} is missing", layer_name(src_l, s))))?;
            let t = if o.share_norms && l > 0 {
                rest[&layer_name(0, s)].clone()
            } else {
                t.copy()?
            };
            rest.insert(layer_name(l, s), t);
        }
    }
    let layer_sources: Vec<usize> = (0..depth).map(|l| l % s_depth).collect();
    let scale = match o.init {
        Init::Copy => 1.0,
        Init::Scaled => aux_scale(depth),
    };
    let pb = crate::mpop::matrix_bar("mpobert", MATRICES.len() * s_depth, progress);
    let mut parts: HashMap<String, Parts> = HashMap::new();
    let mut errors = Vec::new();
    let mut shared_bias: HashMap<&str, Var> = HashMap::new();
    for t in MATRICES {
        // Each source layer's exact MPO.
        let mut ws = Vec::with_capacity(s_depth);
        let mut mpos = Vec::with_capacity(s_depth);
        for s in 0..s_depth {
            pb.set_message(layer_name(s, t));
            let lin = linears
                .get(&layer_name(s, t))
                .ok_or_else(|| Error::Msg(format!("{} is missing", layer_name(s, t))))?;
            let w = lin.weight()?;
            let (rows, cols) = w.dims2()?;
            let shape = MpoShape::from_table_or_auto(rows, cols, SITES)?;
            let wd = to_f64(&w)?;
            mpos.push(Mpo::<f64>::decompose(&wd, &shape)?);
            ws.push(wd);
            pb.inc(1);
        }
        let c = mpos[0].central_index();
        for g in 0..groups {
            let layers: Vec<usize> = (g * per_group..(g + 1) * per_group).collect();
            let mut srcs: Vec<usize> = layers.iter().map(|&l| l % s_depth).collect();
            srcs.sort_unstable();
            srcs.dedup();
            // Fitted MPO of each source layer in this group.
            let mut fitted: BTreeMap<usize, Mpo<f64>> = BTreeMap::new();
            if srcs.len() == 1 || o.share == Share::None {
                for &s in &srcs {
                    fitted.insert(s, mpos[s].clone());
                }
            } else {
                let mut members = srcs.clone();
                let from = match o.central_from {
                    CentralFrom::Joint => mpo::shared::CentralFrom::Joint { iters: JOINT_ITERS },
                    CentralFrom::Layer(k) => {
                        if !members.contains(&k) {
                            members.push(k);
                        }
                        let pos = members.iter().position(|&m| m == k).unwrap_or(0);
                        mpo::shared::CentralFrom::Member(pos)
                    }
                };
                let sel: Vec<Mpo<f64>> = members.iter().map(|&s| mpos[s].clone()).collect();
                let r = mpo::shared::share_central(&sel, from)?;
                for (s, m) in members.into_iter().zip(r.members) {
                    if srcs.contains(&s) {
                        fitted.insert(s, m);
                    }
                }
            }
            for (&s, m) in &fitted {
                errors.push(FitError {
                    matrix: t.to_string(),
                    group: g,
                    source_layer: s,
                    rel_error: m.relative_error(&ws[s])?,
                });
            }
            let any = fitted
                .values()
                .next()
                .ok_or_else(|| Error::Msg("empty layer group".into()))?;
            let central = Var::from_tensor(&core_tensor(&any.cores[c], any.core_shape(c), 1.0)?)?;
            for &l in &layers {
                let s = l % s_depth;
                let m = &fitted[&s];
                let sc = if l >= s_depth { scale } else { 1.0 };
                let mut cores = Vec::with_capacity(m.n());
                for k in 0..m.n() {
                    if k == c {
                        // Members of one group share the central: with more than one source
                        // layer it was fitted jointly, so every member's core c equals it.
                        if fitted.len() > 1 || per_group > 1 {
                            cores.push(central.clone());
                        } else {
                            cores.push(Var::from_tensor(&core_tensor(
                                &m.cores[k],
                                m.core_shape(k),
                                1.0,
                            )?)?);
                        }
                    } else {
                        cores.push(Var::from_tensor(&core_tensor(
                            &m.cores[k],
                            m.core_shape(k),
                            sc,
                        )?)?);
                    }
                }
                let bias_t = linears[&layer_name(if o.share_norms { 0 } else { s }, t)]
                    .bias()
                    .ok_or_else(|| Error::Msg(format!("{} has no bias", layer_name(s, t))))?;
                let bias = if o.share_norms {
                    shared_bias
                        .entry(t)
                        .or_insert(Var::from_tensor(&bias_t.copy()?)?)
                        .clone()
                } else {
                    Var::from_tensor(&bias_t.copy()?)?
                };
                let shape = m.shape();
                let adapter = if o.adapter_rank > 0 {
                    let (out_f, in_f) = (shape.orig_rows, shape.orig_cols);
                    let r = o.adapter_rank;
                    let seed = o.seed
                        ^ ((l as u64) << 8
                            | MATRICES.iter().position(|x| *x == t).unwrap_or(0) as u64)
                            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
                    Some(Adapter {
                        u: Var::zeros((out_f, r), DType::F32, &Device::Cpu)?,
                        d: Var::from_tensor(&Tensor::from_vec(
                            normal(r * in_f, ADAPTER_STD, seed),
                            (r, in_f),
                            &Device::Cpu,
                        )?)?,
                    })
                } else {
                    None
                };
                parts.insert(
                    layer_name(l, t),
                    Parts {
                        shape,
                        cores,
                        bias: Some(bias),
                        adapter,
                    },
                );
            }
        }
    }
    pb.finish_and_clear();
    let mut cfg = bert.cfg.clone();
    cfg.num_hidden_layers = depth;
    let source = models::source::Overlay::new(
        models::weights::Weights::new(rest, &src.source.path),
        SharedLayers { parts },
    );
    let new = models::bert::Bert::new(cfg, &source)?;
    src.arch = Arch::Encoder(Box::new(new));
    let report = BuildReport {
        options: o.clone(),
        source_depth: s_depth,
        groups,
        layer_sources,
        errors,
        new_layer_aux_scale: scale,
    };
    Ok((src, report))
}

/// `mpobert_manifest.json`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    /// Each MPOBERT matrix by module name.
    pub layers: BTreeMap<String, LayerManifest>,
    /// Tensor name → the name it is stored under (tensors held by several names).
    pub aliases: BTreeMap<String, String>,
    /// How the model was built (informational).
    #[serde(default)]
    pub build: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerManifest {
    pub row_factors: Vec<usize>,
    pub col_factors: Vec<usize>,
    pub orig_rows: usize,
    pub orig_cols: usize,
    pub bond_dims: Vec<usize>,
    pub adapter_rank: usize,
}

impl Manifest {
    fn validate(&self) -> std::result::Result<(), String> {
        use models::untrusted::{escape, MAX_WIDTH};
        if self.format != "mpolm-mpobert" {
            return Err(format!(
                "format '{}' is not an MPOBERT checkpoint (expected 'mpolm-mpobert')",
                escape(&self.format)
            ));
        }
        if self.version != 1 {
            return Err(format!(
                "version {} is not supported (this mpolm reads version 1)",
                self.version
            ));
        }
        for (name, l) in &self.layers {
            let shown = escape(name);
            let n = l.row_factors.len();
            if n == 0 || n > 64 || l.col_factors.len() != n || l.bond_dims.len() != n + 1 {
                return Err(format!(
                    "layer {shown}: {n} row factors, {} column factors and {} bonds do not fit (1 to 64 sites)",
                    l.col_factors.len(),
                    l.bond_dims.len()
                ));
            }
            for (f, orig) in [(&l.row_factors, l.orig_rows), (&l.col_factors, l.orig_cols)] {
                let p = f.iter().try_fold(1usize, |a, &x| a.checked_mul(x));
                if !matches!(p, Some(p) if p >= orig && p <= 2 * MAX_WIDTH)
                    || orig == 0
                    || orig > MAX_WIDTH
                {
                    return Err(format!(
                        "layer {shown}: factors {f:?} for {orig} are out of range"
                    ));
                }
            }
            // Inference caches the contracted matrix: the same ceiling as MPO checkpoints.
            if l.orig_rows
                .checked_mul(l.orig_cols)
                .is_none_or(|e| e > models::untrusted::MAX_MATRIX_ELEMS)
            {
                return Err(format!(
                    "layer {shown}: a {}×{} matrix is over the element limit",
                    l.orig_rows, l.orig_cols
                ));
            }
            if l.bond_dims.iter().any(|&d| d == 0 || d > MAX_WIDTH) {
                return Err(format!(
                    "layer {shown}: bond dimensions {:?} are out of range",
                    l.bond_dims
                ));
            }
            if l.adapter_rank > l.orig_rows.min(l.orig_cols) {
                return Err(format!(
                    "layer {shown}: adapter rank {} is above the matrix's rank",
                    l.adapter_rank
                ));
            }
        }
        for (a, b) in &self.aliases {
            if self.aliases.contains_key(b) || a == b {
                return Err(format!(
                    "alias '{}' → '{}' points to another alias",
                    escape(a),
                    escape(b)
                ));
            }
        }
        Ok(())
    }
}

/// The tensor names of one MPOBERT matrix.
fn core_key(module: &str, k: usize) -> String {
    format!("{module}.mpo.{}", Mpo::<f32>::core_name(k))
}

/// Save an MPOBERT model: every distinct tensor once (see the module docs).
pub fn save(m: &Model, dir: &Path, build: Option<&BuildReport>) -> Result<()> {
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut by_id: HashMap<candle_core::TensorId, String> = HashMap::new();
    let mut aliases = BTreeMap::new();
    let mut put = |name: String, t: &Tensor| -> Result<()> {
        match by_id.get(&t.id()) {
            Some(first) => {
                aliases.insert(name, first.clone());
            }
            None => {
                by_id.insert(t.id(), name.clone());
                tensors.insert(name, t.contiguous()?);
            }
        }
        Ok(())
    };
    let mut layers = BTreeMap::new();
    for (name, l) in m.linears() {
        if let Some(mb) = l.inner().as_any().downcast_ref::<MpoBertLinear>() {
            let cores = mb.mpo.inner.cores();
            for (k, v) in cores.vars().iter().enumerate() {
                put(core_key(&name, k), v.as_tensor())?;
            }
            if let Some(b) = mb.mpo.inner.bias() {
                put(format!("{name}.bias"), b.as_tensor())?;
            }
            if let Some(a) = &mb.adapter {
                put(format!("{name}.adapter.u"), a.u.as_tensor())?;
                put(format!("{name}.adapter.d"), a.d.as_tensor())?;
            }
            let s = cores.shape();
            layers.insert(
                name.clone(),
                LayerManifest {
                    row_factors: s.row_factors.clone(),
                    col_factors: s.col_factors.clone(),
                    orig_rows: s.orig_rows,
                    orig_cols: s.orig_cols,
                    bond_dims: cores.bonds(),
                    adapter_rank: mb.adapter.as_ref().map_or(0, |a| a.u.as_tensor().dims()[1]),
                },
            );
        } else {
            put(format!("{name}.weight"), &l.weight()?)?;
            if let Some(b) = l.bias() {
                put(format!("{name}.bias"), &b)?;
            }
        }
    }
    for (name, t) in m.other_tensors() {
        put(name, t)?;
    }
    let manifest = Manifest {
        format: "mpolm-mpobert".into(),
        version: 1,
        layers,
        aliases,
        build: build.and_then(|b| serde_json::to_value(b).ok()),
    };
    let text = serde_json::to_string_pretty(&manifest).map_err(|e| Error::Msg(e.to_string()))?;
    models::export::write_hf_dir(m, dir, &tensors, &[(MANIFEST, text)])?;
    Ok(())
}

/// Load a checkpoint written by [`save`]: every stored tensor becomes one tensor (one `Var` for
/// the MPOBERT matrices' parts) however many names hold it.
pub fn load(dir: &Path) -> Result<Model> {
    let mpath = dir.join(MANIFEST);
    let text = models::untrusted::read_text(&mpath, models::untrusted::MAX_JSON_BYTES)?;
    let man: Manifest = serde_json::from_str(&text)
        .map_err(|e| models::Error::config(&mpath, format!("invalid manifest: {e}")))?;
    man.validate()
        .map_err(|e| models::Error::config(&mpath, e))?;
    let st_path = dir.join("model.safetensors");
    let mut stored = models::weights::load_safetensors(&st_path)?;
    for (a, b) in &man.aliases {
        if !stored.contains_key(b) {
            return Err(models::Error::config(
                &mpath,
                format!(
                    "alias '{}' names '{}', which is not in model.safetensors",
                    models::untrusted::escape(a),
                    models::untrusted::escape(b)
                ),
            )
            .into());
        }
    }
    let resolve = |n: &str| -> String { man.aliases.get(n).cloned().unwrap_or_else(|| n.into()) };
    let mut vars: HashMap<String, Var> = HashMap::new();
    let mut var_of =
        |key: &str, shape: &[usize], stored: &HashMap<String, Tensor>| -> Result<Var> {
            let name = resolve(key);
            if let Some(v) = vars.get(&name) {
                if v.as_tensor().dims() != shape {
                    return Err(shape_err(&st_path, key, shape, v.as_tensor().dims()));
                }
                return Ok(v.clone());
            }
            let t = stored
                .get(&name)
                .ok_or_else(|| models::Error::MissingTensor {
                    path: st_path.clone(),
                    name: key.to_string(),
                })?;
            if t.dtype() != DType::F32 {
                return Err(models::Error::Safetensors {
                    path: st_path.clone(),
                    msg: format!("tensor '{name}' has dtype {:?}, expected F32", t.dtype()),
                }
                .into());
            }
            if t.dims() != shape {
                return Err(shape_err(&st_path, key, shape, t.dims()));
            }
            if t.flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .any(|v| !v.is_finite())
            {
                return Err(models::Error::Safetensors {
                    path: st_path.clone(),
                    msg: format!("tensor '{name}' holds NaN or infinite values"),
                }
                .into());
            }
            let v = Var::from_tensor(t)?;
            vars.insert(name, v.clone());
            Ok(v)
        };
    let mut parts = HashMap::new();
    for (module, lm) in &man.layers {
        let shape = MpoShape::new(
            lm.row_factors.clone(),
            lm.col_factors.clone(),
            lm.orig_rows,
            lm.orig_cols,
        )
        .map_err(|e| models::Error::config(&mpath, format!("layer {module}: {e}")))?;
        shape
            .check_bonds(&lm.bond_dims)
            .map_err(|e| models::Error::config(&mpath, format!("layer {module}: {e}")))?;
        let mut cores = Vec::new();
        for k in 0..shape.n() {
            let cs = shape.core_shape(&lm.bond_dims, k);
            cores.push(var_of(&core_key(module, k), &cs, &stored)?);
        }
        let bias = Some(var_of(&format!("{module}.bias"), &[lm.orig_rows], &stored)?);
        let adapter = if lm.adapter_rank > 0 {
            Some(Adapter {
                u: var_of(
                    &format!("{module}.adapter.u"),
                    &[lm.orig_rows, lm.adapter_rank],
                    &stored,
                )?,
                d: var_of(
                    &format!("{module}.adapter.d"),
                    &[lm.adapter_rank, lm.orig_cols],
                    &stored,
                )?,
            })
        } else {
            None
        };
        parts.insert(
            module.clone(),
            Parts {
                shape,
                cores,
                bias,
                adapter,
            },
        );
    }
    // Dense names that alias a stored tensor get that very tensor.
    for (a, b) in &man.aliases {
        if let Some(t) = stored.get(b).cloned() {
            stored.insert(a.clone(), t);
        }
    }
    let src = models::hub::ModelSource {
        name: dir.display().to_string(),
        format: models::hub::Format::HfDir,
        path: dir.to_path_buf(),
    };
    let mut types = BTreeMap::new();
    types.insert("f32 (as loaded)".to_string(), stored.len());
    let source = models::source::Overlay::new(
        models::weights::Weights::new(stored, &st_path),
        SharedLayers { parts },
    );
    let m = Model::from_source(src, &source, types)?;
    let missing = source.unbuilt(man.layers.keys());
    if !missing.is_empty() {
        return Err(models::Error::config(
            &mpath,
            format!("manifest names layers the model does not have: {missing:?}"),
        )
        .into());
    }
    Ok(m)
}

fn shape_err(path: &Path, name: &str, expected: &[usize], got: &[usize]) -> Error {
    models::Error::Shape {
        path: path.to_path_buf(),
        name: name.to_string(),
        expected: expected.to_vec(),
        got: got.to_vec(),
    }
    .into()
}

/// Parameters by how they are held: by several layers (shared), by one encoder layer, and the
/// rest (embeddings, pooler, heads); every tensor counted once.
#[derive(Debug, Clone, Serialize)]
pub struct ParamSummary {
    pub layers: usize,
    pub shared: usize,
    pub shared_tensors: usize,
    pub per_layer: usize,
    pub other: usize,
    pub total: usize,
}

pub fn summary(m: &Model) -> ParamSummary {
    // tensor id → (elements, layers holding it, held outside the encoder layers)
    let mut seen: HashMap<
        candle_core::TensorId,
        (usize, std::collections::BTreeSet<String>, bool),
    > = HashMap::new();
    let layer_of = |name: &str| -> Option<String> {
        let i = name.find("encoder.layer.")?;
        let rest = &name[i + "encoder.layer.".len()..];
        Some(rest.split('.').next().unwrap_or("").to_string())
    };
    let mut note = |name: &str, id, n| {
        let e = seen.entry(id).or_insert((n, Default::default(), false));
        match layer_of(name) {
            Some(l) => {
                e.1.insert(l);
            }
            None => e.2 = true,
        }
    };
    let mut unlisted = 0;
    for (name, l) in m.linears() {
        let ids = l.inner().param_ids();
        if ids.is_empty() {
            // Layers that do not list their tensors own them.
            unlisted += l.num_params();
        }
        for (id, n) in ids {
            note(&name, id, n);
        }
    }
    for (name, t) in m.other_tensors() {
        note(&name, t.id(), t.elem_count());
    }
    let mut s = ParamSummary {
        layers: m
            .linears()
            .iter()
            .filter_map(|(n, _)| layer_of(n))
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        shared: 0,
        shared_tensors: 0,
        per_layer: 0,
        other: unlisted,
        total: 0,
    };
    for (n, layers, outside) in seen.values() {
        if layers.len() > 1 {
            s.shared += n;
            s.shared_tensors += 1;
        } else if layers.len() == 1 && !outside {
            s.per_layer += n;
        } else {
            s.other += n;
        }
    }
    s.total = s.shared + s.per_layer + s.other;
    s
}
