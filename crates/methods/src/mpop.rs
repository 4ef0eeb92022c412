//! MPOP (Gao et al., ACL 2021), part 1: compress a pretrained model by replacing chosen Linear
//! layers (and the embedding, which stays tied to the LM head) with MPOs, save and reload the
//! compressed checkpoint, and contract it back to a dense HF directory.
//!
//! Checkpoint layout (`--out DIR`): config.json + tokenizer files of the base model,
//! `model.safetensors` holding every dense tensor under its HF name and each MPO layer's cores as
//! `<module>.mpo.core_<k>` (bias as `<module>.bias`), and `mpo_manifest.json` describing each
//! MPO layer (factors, bonds, spectra) so loading can check every tensor against it.

use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use models::{LinearLayer, Model};
use mpo::{ForwardMode, Mpo, MpoLinear, MpoManifest, MpoShape, Truncation};
use serde::{Deserialize, Serialize};
use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

pub const MANIFEST: &str = "mpo_manifest.json";

/// An MPO weight behind the model's pluggable Linear. For inference the contracted matrix is
/// built once and kept (rebuilding it per call made decoding ~40x slower); while training
/// (`models::ops::training()`) every call goes through the cores so gradients reach them.
#[derive(Debug)]
pub struct MpoLayer {
    pub inner: MpoLinear,
    dense: std::sync::OnceLock<Tensor>,
}

impl MpoLayer {
    pub fn new(inner: MpoLinear) -> Self {
        MpoLayer {
            inner,
            dense: std::sync::OnceLock::new(),
        }
    }

    fn cached_dense(&self) -> candle_core::Result<&Tensor> {
        if let Some(w) = self.dense.get() {
            return Ok(w);
        }
        let w = self.inner.to_dense()?.detach();
        Ok(self.dense.get_or_init(|| w))
    }

    pub fn cores(&self) -> &mpo::MpoCores {
        self.inner.cores()
    }

    /// W rebuilt from the cores for a training step: frozen cores get no gradient GEMM.
    fn trained_dense(&self) -> candle_core::Result<Tensor> {
        let c = self.inner.cores();
        mpo::dense_from_cores_with(&c.tensors(), c.shape(), &models::kernels::matmul)
    }

    /// Drop the cached dense matrix after the cores changed (training).
    pub fn invalidate(&mut self) {
        self.dense = std::sync::OnceLock::new();
    }
}

impl LinearLayer for MpoLayer {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if models::ops::training() {
            let batch = x.elem_count() / self.in_features().max(1);
            if self.inner.resolve_mode(batch) == ForwardMode::Contract {
                return candle_core::Module::forward(&self.inner, x);
            }
            // Rebuild W from the cores (differentiably), then one fused Linear: its backward
            // is one GEMM per tracked input and folds the bias, where candle's broadcast matmul
            // of xᵀ-views and a separate bias add cost extra copies and gradient nodes.
            let w = self.trained_dense()?;
            return models::kernels::linear(x, &w, self.inner.bias_tensor().as_ref());
        }
        let y = models::linear::matmul_t(x, self.cached_dense()?)?;
        match self.inner.bias() {
            Some(b) => y.broadcast_add(b.as_tensor()),
            None => Ok(y),
        }
    }
    fn in_features(&self) -> usize {
        self.inner.cores().shape().orig_cols
    }
    fn out_features(&self) -> usize {
        self.inner.cores().shape().orig_rows
    }
    fn num_params(&self) -> usize {
        self.inner.cores().num_params() + self.inner.bias().map_or(0, |b| b.elem_count())
    }
    fn weight(&self) -> candle_core::Result<Tensor> {
        self.inner.to_dense()
    }
    fn bias(&self) -> Option<Tensor> {
        self.inner.bias().map(|b| b.as_tensor().clone())
    }
    fn kind(&self) -> String {
        "mpo".into()
    }
    /// The cores by id, so a core several layers hold (MPOE's shared central tensor) counts
    /// and saves once.
    fn param_ids(&self) -> Vec<(candle_core::TensorId, usize)> {
        let mut v: Vec<_> = (self.inner.cores().vars().iter())
            .map(|c| (c.as_tensor().id(), c.as_tensor().elem_count()))
            .collect();
        if let Some(b) = self.inner.bias() {
            v.push((b.as_tensor().id(), b.as_tensor().elem_count()));
        }
        v
    }
    fn embed(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        if models::ops::training() {
            // Rows straight from the cores avoid a vocab-sized table per step, but gather one
            // slice of every core per token: with wide bonds that is far more memory than the
            // table itself (9 GB for a full-bond 30k×384 embedding and 2k tokens), so then
            // rebuild the table (differentiably) and index it.
            let c = self.inner.cores();
            let b = c.bonds();
            let s = c.shape();
            let per_token: usize = (0..c.n()).map(|k| b[k] * s.col_factors[k] * b[k + 1]).sum();
            if ids.elem_count() * per_token <= s.orig_rows * s.orig_cols {
                return mpo::embed_cores(ids, &c.tensors(), s);
            }
            return self.trained_dense()?.index_select(&ids.flatten_all()?, 0);
        }
        self.cached_dense()?.index_select(ids, 0)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Shapes {
    Auto,
    Paper,
    /// Two sites, i = [out, 1], j = [1, in]: a rank-r factorization (plain SVD), whose second
    /// core carries the whole input index (so a full input whitening folds into it exactly).
    Svd,
}

#[derive(Debug, Clone)]
pub enum Budget {
    Full,
    Bond(usize),
    RelError(f64),
    /// Fraction of each matrix's dense parameter count.
    ParamsRatio(f64),
}

#[derive(Debug, Clone)]
pub struct CompressOptions {
    pub shapes: Shapes,
    pub n: usize,
    pub budget: Budget,
    /// Module-name patterns (`*` wildcards, substring match); empty = every Linear and the
    /// embedding; the classification head is never compressed.
    pub patterns: Vec<String>,
}

/// `*`-separated pieces of `pat` occur in `name` in order.
pub fn matches(pat: &str, name: &str) -> bool {
    let mut rest = name;
    for p in pat.split('*').filter(|p| !p.is_empty()) {
        match rest.find(p) {
            Some(k) => rest = &rest[k + p.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    #[test]
    fn patterns() {
        let n = "model.layers.10.self_attn.q_proj";
        assert!(super::matches("q_proj", n));
        assert!(super::matches("layers.10.*proj", n));
        assert!(!super::matches("layers.1.*", n));
        assert!(!super::matches("mlp*q_proj", n));
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct LayerReport {
    pub name: String,
    pub rows: usize,
    pub cols: usize,
    pub bonds: Vec<usize>,
    pub dense_params: usize,
    pub mpo_params: usize,
    pub rel_error: f64,
    pub rel_error_bound: f64,
}

/// The Linear layers (the embedding among them) whose names match one of `patterns` (all
/// when empty), in model order; a classification head only with `with_head` (it is never
/// compressed, but its spectrum can be looked at).
pub fn select(m: &Model, patterns: &[String], with_head: bool) -> Vec<String> {
    m.linears()
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| with_head || n != "classifier")
        .filter(|n| patterns.is_empty() || patterns.iter().any(|p| matches(p, n)))
        .collect()
}

/// A layer's effective weight as row-major entries and its (rows, cols).
pub fn weight_matrix(l: &models::Linear) -> Result<(Vec<f32>, usize, usize)> {
    let w = l.weight()?;
    let (rows, cols) = w.dims2()?;
    Ok((w.flatten_all()?.to_vec1()?, rows, cols))
}

/// The factor shape of a rows × cols matrix split over `n` sites.
pub fn mpo_shape(shapes: Shapes, rows: usize, cols: usize, n: usize) -> Result<MpoShape> {
    Ok(match shapes {
        Shapes::Paper => MpoShape::from_table_or_auto(rows, cols, n)?,
        Shapes::Auto => MpoShape::auto(rows, cols, n)?,
        Shapes::Svd => MpoShape::exact(vec![rows, 1], vec![1, cols])?,
    })
}

pub fn frobenius(data: &[f32]) -> f64 {
    data.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt()
}

/// A bar over matrices, named by the one being decomposed (hidden unless `show`).
pub(crate) fn matrix_bar(what: &str, len: usize, show: bool) -> indicatif::ProgressBar {
    let pb = if show {
        indicatif::ProgressBar::new(len as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    pb.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{what} {{bar:30}} {{pos}}/{{len}} {{msg}} [{{elapsed}}<{{eta}}]"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    pb
}

fn truncation(b: &Budget, shape: &MpoShape) -> Truncation {
    match b {
        Budget::Full => Truncation::Full,
        Budget::Bond(d) => Truncation::MaxBond(*d),
        Budget::RelError(e) => Truncation::RelError(*e),
        Budget::ParamsRatio(r) => {
            Truncation::MaxParams((r * shape.dense_params() as f64).round() as usize)
        }
    }
}

/// Put the truncated `cut` in `lin`'s place, keeping `lin`'s bias.
pub(crate) fn install(lin: &mut models::Linear, cut: &Mpo<f32>) -> Result<()> {
    let bias: Option<Vec<f32>> = match lin.bias() {
        Some(b) => Some(b.to_vec1()?),
        None => None,
    };
    let layer =
        MpoLinear::from_mpo(cut, bias.as_deref(), &Device::Cpu)?.with_mode(ForwardMode::Auto);
    lin.replace(Box::new(MpoLayer::new(layer)));
    Ok(())
}

/// Replace the chosen layers of `m` with MPOs; returns one report per compressed layer.
pub fn compress(m: &mut Model, o: &CompressOptions, progress: bool) -> Result<Vec<LayerReport>> {
    if o.n == 0 {
        return Err(Error::option(
            "n",
            "`n` (number of MPO sites) must be at least 1",
        ));
    }
    if let Budget::ParamsRatio(r) = o.budget {
        if !(r > 0.0) {
            return Err(Error::option(
                "params_ratio",
                format!("`params_ratio` must be > 0, got {r}"),
            ));
        }
    }
    if let Budget::RelError(e) = o.budget {
        if !(0.0..1.0).contains(&e) {
            return Err(Error::option(
                "rel_error",
                format!("`rel_error` must be in [0, 1), got {e}"),
            ));
        }
    }
    let chosen = select(m, &o.patterns, false);
    if chosen.is_empty() {
        return Err(Error::option(
            "patterns",
            format!(
                "`patterns` {:?} matches no weight matrix of this model",
                o.patterns.join(",")
            ),
        ));
    }
    let pb = matrix_bar("compressing", chosen.len(), progress);
    let mut reports = Vec::new();
    for (name, lin) in m.linears_mut() {
        if !chosen.contains(&name) {
            continue;
        }
        pb.set_message(name.clone());
        let (data, rows, cols) = weight_matrix(lin)?;
        let shape = mpo_shape(o.shapes, rows, cols, o.n)?;
        let full = Mpo::<f32>::decompose(&data, &shape)?;
        let cut = full.truncate(&truncation(&o.budget, &shape))?;
        let rel_error = cut.relative_error(&data)?;
        let fro = frobenius(&data).max(1e-30);
        reports.push(LayerReport {
            name: name.clone(),
            rows,
            cols,
            bonds: cut.bond_dims.clone(),
            dense_params: rows * cols,
            mpo_params: cut.num_params(),
            rel_error,
            rel_error_bound: cut.error_bound() / fro,
        });
        install(lin, &cut)?;
        pb.inc(1);
    }
    pb.finish_and_clear();
    Ok(reports)
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub layers: BTreeMap<String, MpoManifest>,
}

impl Manifest {
    /// What [`save`] writes: format "mpolm-mpo" version 1, f32 cores, and per layer sizes that
    /// multiply out without overflow within the model-width ceiling (the mpo crate's own checks
    /// then run on numbers that cannot wrap), with finite spectra.
    pub fn validate(&self) -> std::result::Result<(), String> {
        use models::untrusted::{escape, MAX_MATRIX_ELEMS, MAX_VOCAB, MAX_WIDTH};
        if self.format != "mpolm-mpo" {
            return Err(format!(
                "format '{}' is not an MPO checkpoint (expected 'mpolm-mpo')",
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
            if l.dtype != "f32" {
                return Err(format!(
                    "layer {shown}: dtype '{}' is not supported (only f32)",
                    escape(&l.dtype)
                ));
            }
            let n = l.row_factors.len();
            if n == 0 || n > 64 || l.col_factors.len() != n || l.core_shapes.len() != n {
                return Err(format!(
                    "layer {shown}: {} row factors, {} column factors and {} cores must agree (1 to 64 sites)",
                    n,
                    l.col_factors.len(),
                    l.core_shapes.len()
                ));
            }
            // Rows can be the vocabulary (the embedding), columns a model width.
            let max = MAX_VOCAB.max(MAX_WIDTH);
            for (what, f, orig) in [
                ("row", &l.row_factors, l.orig_rows),
                ("column", &l.col_factors, l.orig_cols),
            ] {
                let p = f.iter().try_fold(1usize, |a, &x| a.checked_mul(x));
                if !matches!(p, Some(p) if p >= 1 && p <= 2 * max) || orig == 0 || orig > max {
                    return Err(format!(
                        "layer {shown}: {what} factors {f:?} for {orig} {what}s are out of range"
                    ));
                }
            }
            // Cores of bond 1 are tiny whatever the matrix they contract to, so the dense
            // size needs its own ceiling.
            if l.orig_rows
                .checked_mul(l.orig_cols)
                .is_none_or(|e| e > MAX_MATRIX_ELEMS)
            {
                return Err(format!(
                    "layer {shown}: a {}×{} matrix is over the {MAX_MATRIX_ELEMS}-element limit",
                    l.orig_rows, l.orig_cols
                ));
            }
            if l.bond_dims.len() != n + 1 || l.bond_dims.iter().any(|&d| d == 0 || d > max) {
                return Err(format!(
                    "layer {shown}: bond dimensions {:?} must be {} values in 1..={max}",
                    l.bond_dims,
                    n + 1
                ));
            }
            for c in &l.core_shapes {
                if c.iter()
                    .try_fold(1usize, |a, &x| a.checked_mul(x))
                    .is_none()
                {
                    return Err(format!("layer {shown}: core shape {c:?} overflows"));
                }
            }
            if l.spectra
                .iter()
                .flatten()
                .any(|s| !(s.is_finite() && *s >= 0.0))
            {
                return Err(format!(
                    "layer {shown}: spectra must be finite and non-negative"
                ));
            }
        }
        Ok(())
    }
}

/// Save a model whose layers may be MPOs (see the module docs for the layout).
pub fn save(m: &Model, dir: &Path) -> Result<()> {
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut layers = BTreeMap::new();
    for (name, l) in m.linears() {
        if let Some(mp) = l.inner().as_any().downcast_ref::<MpoLayer>() {
            let mpo: Mpo<f32> = mp.cores().to_mpo()?;
            let (man, _) = mpo.to_parts();
            for (k, t) in mp.cores().tensors().iter().enumerate() {
                tensors.insert(
                    format!("{name}.mpo.{}", Mpo::<f32>::core_name(k)),
                    t.contiguous()?,
                );
            }
            layers.insert(name.clone(), man);
        } else {
            tensors.insert(format!("{name}.weight"), l.weight()?.contiguous()?);
        }
        if let Some(b) = l.bias() {
            tensors.insert(format!("{name}.bias"), b.contiguous()?);
        }
    }
    for (name, t) in m.other_tensors() {
        tensors.insert(name, t.contiguous()?);
    }
    let manifest = Manifest {
        format: "mpolm-mpo".into(),
        version: 1,
        layers,
    };
    let text = serde_json::to_string_pretty(&manifest).map_err(|e| Error::Msg(e.to_string()))?;
    models::export::write_hf_dir(m, dir, &tensors, &[(MANIFEST, text)])?;
    Ok(())
}

/// The MPO layers of a checkpoint written by [`save`], built from their cores as the
/// architecture asks for them (the rest of the checkpoint is plain safetensors).
struct MpoLayers {
    mpos: BTreeMap<String, Mpo<f32>>,
}

impl models::source::SpecialLinears for MpoLayers {
    fn holds(&self, module: &str) -> bool {
        self.mpos.contains_key(module)
    }
    fn build(
        &self,
        rest: &models::weights::Weights,
        module: &str,
        out_f: usize,
        in_f: usize,
        bias: models::Bias,
    ) -> models::Result<models::Linear> {
        let mpo = &self.mpos[module];
        let shape = mpo.shape();
        models::source::check_linear_shape(
            &rest.path,
            module,
            [shape.rows(), shape.cols()],
            [out_f, in_f],
        )?;
        let bias: Option<Vec<f32>> = match models::source::bias_of(rest, module, out_f, bias)? {
            Some(b) => Some(b.to_vec1()?),
            None => None,
        };
        let layer = MpoLinear::from_mpo(mpo, bias.as_deref(), &Device::Cpu)
            .map_err(|e| models::Error::Msg(format!("{module}: {e}")))?;
        Ok(models::Linear::new(Box::new(MpoLayer::new(layer))))
    }
}

/// Load a checkpoint written by [`save`] in one pass: the manifest and every core are checked,
/// then the architecture asks for its layers and gets the MPO ones built from their cores.
pub fn load(dir: &Path) -> Result<Model> {
    let mpath = dir.join(MANIFEST);
    let text = models::untrusted::read_text(&mpath, models::untrusted::MAX_JSON_BYTES)?;
    let man: Manifest = serde_json::from_str(&text)
        .map_err(|e| models::Error::config(&mpath, format!("invalid manifest: {e}")))?;
    man.validate()
        .map_err(|e| models::Error::config(&mpath, e))?;
    let st_path = dir.join("model.safetensors");
    let mut tensors = models::weights::load_safetensors(&st_path)?;
    let mut mpos = BTreeMap::new();
    for (name, lm) in &man.layers {
        let mut cores = Vec::new();
        for (k, shp) in lm.core_shapes.iter().enumerate() {
            let key = format!("{name}.mpo.{}", Mpo::<f32>::core_name(k));
            let t = tensors
                .remove(&key)
                .ok_or_else(|| models::Error::MissingTensor {
                    path: st_path.clone(),
                    name: key.clone(),
                })?;
            if t.dtype() != DType::F32 {
                return Err(models::Error::Safetensors {
                    path: st_path.clone(),
                    msg: format!("tensor '{key}' has dtype {:?}, expected F32", t.dtype()),
                }
                .into());
            }
            if t.dims() != shp {
                return Err(models::Error::Shape {
                    path: st_path.clone(),
                    name: key,
                    expected: shp.to_vec(),
                    got: t.dims().to_vec(),
                }
                .into());
            }
            cores.push(t);
        }
        let vals = cores
            .iter()
            .map(|c| c.flatten_all()?.to_vec1::<f32>())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let shown = models::untrusted::escape(name);
        if vals.iter().flatten().any(|v| !v.is_finite()) {
            return Err(models::Error::Safetensors {
                path: st_path.clone(),
                msg: format!("the cores of layer {shown} hold NaN or infinite values"),
            }
            .into());
        }
        let mpo = Mpo::<f32>::from_parts(lm, vals)
            .map_err(|e| models::Error::config(&mpath, format!("layer {shown}: {e}")))?;
        mpos.insert(name.clone(), mpo);
    }
    if let Some(extra) = tensors.keys().find(|k| k.contains(".mpo.core_")) {
        return Err(models::Error::config(
            &mpath,
            format!("tensor '{extra}' is not described by the manifest"),
        )
        .into());
    }
    let src = models::hub::ModelSource {
        name: dir.display().to_string(),
        format: models::hub::Format::HfDir,
        path: dir.to_path_buf(),
    };
    let mut types = BTreeMap::new();
    types.insert("f32 (as loaded)".to_string(), tensors.len() + mpos.len());
    let source = models::source::Overlay::new(
        models::weights::Weights::new(tensors, &st_path),
        MpoLayers { mpos },
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

/// Linear layers by kind with their parameter counts, for reports.
pub fn summary(m: &Model) -> BTreeMap<String, (usize, usize)> {
    let mut s = BTreeMap::new();
    for (_, l) in m.linears() {
        let e = s.entry(l.kind()).or_insert((0, 0));
        e.0 += 1;
        e.1 += l.num_params();
    }
    s
}
