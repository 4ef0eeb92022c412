//! Calibrated MPO / SVD compression (issue #23 items 1–2): truncate every chosen matrix in the
//! basis whitened by its calibration inputs (`mpo::whiten`), and optionally spread one
//! parameter budget over all of them by their whitened spectra (`mpo::allocate`).
//!
//! Calibration is one pass over the *dense* model: the token windows of
//! `quant::calib::calibration_samples` go through the decoder layer by layer (the residual
//! stream of every window is kept, as the GPTQ driver does), and each chosen Linear's input Gram
//! Σ x xᵀ / N and mean |x| are accumulated while its layer runs (q/k/v share one input, as do
//! gate/up). Earlier layers are not compressed first (no true-sequential pass). Memory: the
//! model, the residual stream and, per input group, an f32 Gram (≈ 0.4 GB for SmolLM2-135M;
//! the f64 accumulators of one layer at a time).
//!
//! A calibrated checkpoint is an ordinary MPO checkpoint (`mpop::save`), with the whitened
//! Schmidt values as its stored spectra (see `mpo::Whitening::fold`).

use crate::mpop::{self, Budget, CompressOptions};
use crate::quant::calib::{hessian_key, layer_index, tap, untap_all};
use crate::quant::gptq::Hessian;
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use models::Model;
use mpo::allocate::{allocate_global, Item};
use mpo::whiten::{damped, decompose_whitened, diagonal_error2, kronecker_exact, output_error2};
use mpo::{Mpo, MpoShape, Truncation, Whitening};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

/// Which whitening the truncation uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Whiten {
    /// Plain truncation (S = I); with calibration data the output errors are still measured.
    None,
    /// S = Cholesky factor of the damped input Gram (SVD-LLM); Kronecker-factored over the
    /// input legs of an MPO.
    Cholesky,
    /// S = diag((mean |x_j|)^α) (ASVD); its best per-leg product over an MPO's legs.
    Diag,
}

/// How the parameter budget is spread over the chosen matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Allocate {
    /// Every matrix gets the same budget (its own `params_ratio` of its parameters).
    Uniform,
    /// One budget over all chosen matrices, cut greedily by normalized whitened error per
    /// parameter saved.
    Global,
}

#[derive(Debug, Clone)]
pub struct CalibratedOptions {
    pub compress: CompressOptions,
    pub whiten: Whiten,
    pub allocate: Allocate,
    /// Added to the Gram's diagonal as a fraction of its mean diagonal.
    pub damp: f64,
    /// ASVD's exponent α.
    pub alpha: f64,
}

impl CalibratedOptions {
    pub fn new(compress: CompressOptions) -> Self {
        Self {
            compress,
            whiten: Whiten::Cholesky,
            allocate: Allocate::Uniform,
            damp: 0.01,
            alpha: 0.5,
        }
    }
}

/// Input statistics of one group of Linears reading the same input.
#[derive(Debug, Clone)]
pub struct InputStats {
    pub n: usize,
    /// Σ x xᵀ / tokens, row-major n × n.
    pub gram: Vec<f32>,
    /// Σ |x_j| / tokens.
    pub abs_mean: Vec<f64>,
    pub tokens: usize,
}

/// Statistics by input group (`input_key` of a module name).
pub type Stats = BTreeMap<String, InputStats>;

/// The input group of a module: q/k/v read q_proj's input, gate/up gate_proj's.
pub fn input_key(name: &str) -> String {
    hessian_key(name)
}

/// Calibrated compression needs decoder inputs; anything else is named in the error.
fn check_calibratable(m: &Model, names: &[String]) -> Result<()> {
    if m.causal().is_err() {
        return Err(Error::option(
            "calib",
            format!(
                "{} is an encoder ({}); calibrated compression runs decoder layers on text and needs a causal LM such as smollm2-135m",
                m.source.name,
                m.arch_name()
            ),
        ));
    }
    if let Some(n) = names.iter().find(|n| layer_index(n).is_none()) {
        return Err(Error::option(
            "patterns",
            format!(
                "{n} is not inside a decoder layer, so calibration sees no input for it; choose decoder-layer matrices with `patterns` (e.g. layers.)"
            ),
        ));
    }
    Ok(())
}

/// One pass over the dense model: the input statistics of every Linear named in `names`
/// (all inside decoder layers) on the token windows `samples`, `batch` windows per forward.
pub fn collect_stats(
    m: &mut Model,
    samples: &[Vec<u32>],
    names: &[String],
    batch: usize,
    progress: bool,
) -> Result<Stats> {
    check_calibratable(m, names)?;
    if samples.is_empty() {
        return Err(Error::option(
            "nsamples",
            "no calibration windows (`nsamples`)",
        ));
    }
    let last = names
        .iter()
        .filter_map(|n| layer_index(n))
        .max()
        .unwrap_or(0);
    let lm = m.causal()?;
    let mut xs: Vec<Tensor> = samples
        .chunks(batch.max(1))
        .map(|c| {
            if c.iter().any(|s| s.len() != c[0].len()) {
                return Err(models::Error::Msg(
                    "calibration windows differ in length".into(),
                ));
            }
            let flat: Vec<u32> = c.iter().flatten().copied().collect();
            let ids = Tensor::from_vec(flat, (c.len(), c[0].len()), &Device::Cpu)?;
            lm.embed(&ids)
        })
        .collect::<models::Result<_>>()?;
    let pb = mpop::matrix_bar("calibrating", last + 1, progress);
    type Acc = Arc<Mutex<(Hessian, Vec<f64>)>>;
    let mut stats = Stats::new();
    for layer in 0..=last {
        let mut accs: HashMap<String, Acc> = HashMap::new();
        for (name, lin) in m.linears_mut() {
            if layer_index(&name) != Some(layer) || !names.contains(&name) {
                continue;
            }
            let key = input_key(&name);
            if accs.contains_key(&key) {
                continue;
            }
            let n = lin.in_features();
            let acc: Acc = Arc::new(Mutex::new((Hessian::new(n), vec![0.0; n])));
            accs.insert(key, acc.clone());
            tap(
                lin,
                Box::new(move |xv, rows| {
                    let mut a = acc
                        .lock()
                        .map_err(|_| candle_core::Error::Msg("poisoned".into()))?;
                    a.0.add_rows(xv, rows);
                    let n = a.1.len();
                    for row in xv.chunks(n.max(1)).take(rows) {
                        for (s, x) in a.1.iter_mut().zip(row) {
                            *s += x.abs() as f64;
                        }
                    }
                    Ok(())
                }),
            );
        }
        let run = (|| -> Result<()> {
            let lm = m.causal()?;
            for x in xs.iter_mut() {
                *x = lm.forward_layers(x, layer..layer + 1)?;
            }
            Ok(())
        })();
        untap_all(m);
        run?;
        for (key, acc) in accs {
            let (h, abs) = Arc::try_unwrap(acc)
                .map_err(|_| Error::Msg("internal: recorder still shared".into()))?
                .into_inner()
                .map_err(|_| Error::Msg("poisoned".into()))?;
            let tokens = h.count;
            // Hessian::finish is 2/N Σ x xᵀ.
            let gram: Vec<f32> = h.finish().iter().map(|v| (v * 0.5) as f32).collect();
            let abs_mean = abs.iter().map(|s| s / tokens.max(1) as f64).collect();
            stats.insert(
                key,
                InputStats {
                    n: h.n,
                    gram,
                    abs_mean,
                    tokens,
                },
            );
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    Ok(stats)
}

/// One compressed matrix.
#[derive(Debug, Clone, Serialize)]
pub struct MatrixReport {
    pub name: String,
    /// Last name component (q_proj, …, down_proj).
    pub module: String,
    pub layer: Option<usize>,
    pub rows: usize,
    pub cols: usize,
    pub bonds: Vec<usize>,
    pub dense_params: usize,
    pub mpo_params: usize,
    pub kept_ratio: f64,
    /// ‖W − Ŵ‖_F / ‖W‖_F.
    pub rel_error: f64,
    /// Predicted: sqrt(Σ discarded whitened Schmidt values²) / ‖W S‖_F (the weight-space
    /// bound when not whitened). Equal to the truth for one cut bond under an exact whitening.
    pub pred_rel_error: f64,
    /// Measured: sqrt(tr(ΔW G ΔWᵀ) / tr(W G Wᵀ)) with the full damped calibration Gram G.
    pub rel_output_error: Option<f64>,
    /// Diagonal whitening only: ‖ΔW diag(s)‖_F / ‖W diag(s)‖_F with the exact (unfactored) s.
    pub rel_diag_error: Option<f64>,
    /// Whether the factored whitening equals the one it approximates (one input leg).
    pub whitening_exact: bool,
    pub secs: f64,
}

/// Totals over a group of matrices (a module type or a layer).
#[derive(Debug, Clone, Serialize, Default)]
pub struct GroupSummary {
    pub matrices: usize,
    pub dense_params: usize,
    pub mpo_params: usize,
    pub kept_ratio: f64,
    /// Mean over the group's matrices.
    pub mean_pred_rel_error: f64,
    pub mean_rel_output_error: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CalibratedReport {
    pub whiten: Whiten,
    pub allocate: Allocate,
    pub damp: f64,
    pub alpha: f64,
    pub calibration_tokens: Option<usize>,
    /// Global allocation: the parameter budget over the chosen matrices.
    pub target_params: Option<usize>,
    pub dense_params: usize,
    pub mpo_params: usize,
    pub matrices: Vec<MatrixReport>,
    pub by_module: BTreeMap<String, GroupSummary>,
    pub by_layer: BTreeMap<String, GroupSummary>,
}

fn summarize<'a>(it: impl Iterator<Item = &'a MatrixReport>) -> GroupSummary {
    let mut s = GroupSummary::default();
    let (mut pred, mut out, mut n_out) = (0.0, 0.0, 0usize);
    for r in it {
        s.matrices += 1;
        s.dense_params += r.dense_params;
        s.mpo_params += r.mpo_params;
        pred += r.pred_rel_error;
        if let Some(e) = r.rel_output_error {
            out += e;
            n_out += 1;
        }
    }
    s.kept_ratio = s.mpo_params as f64 / s.dense_params.max(1) as f64;
    s.mean_pred_rel_error = pred / s.matrices.max(1) as f64;
    s.mean_rel_output_error = (n_out > 0).then(|| out / n_out as f64);
    s
}

/// What the truncation of one matrix works with.
struct Prepared {
    shape: MpoShape,
    w: Vec<f64>,
    whitening: Whitening,
    /// Damped Gram (orig cols), when calibrated.
    gram: Option<Vec<f64>>,
    /// ASVD scales, for the diagonal whitening.
    scales: Option<Vec<f64>>,
}

fn prepare(
    name: &str,
    lin: &models::Linear,
    o: &CalibratedOptions,
    stats: Option<&Stats>,
) -> Result<Prepared> {
    let (data, rows, cols) = mpop::weight_matrix(lin)?;
    let shape = mpop::mpo_shape(o.compress.shapes, rows, cols, o.compress.n)?;
    let w: Vec<f64> = data.iter().map(|&v| v as f64).collect();
    let st = match stats {
        Some(s) => Some(
            s.get(&input_key(name))
                .ok_or_else(|| Error::Msg(format!("no calibration statistics reached {name}")))?,
        ),
        None => None,
    };
    if let Some(st) = st {
        if st.n != cols {
            return Err(Error::Msg(format!(
                "{name}: calibration Gram is {}×{0}, the matrix has {cols} inputs",
                st.n
            )));
        }
    }
    let gram = match st {
        Some(st) => {
            let g: Vec<f64> = st.gram.iter().map(|&v| v as f64).collect();
            Some(damped(&g, cols, o.damp).map_err(|e| Error::Msg(format!("{name}: {e}")))?)
        }
        None => None,
    };
    let mut scales = None;
    let whitening = match (o.whiten, st, &gram) {
        (Whiten::None, ..) => Whitening::identity(&shape.col_factors),
        (Whiten::Cholesky, Some(_), Some(g)) => Whitening::cholesky(g, &shape)?,
        (Whiten::Diag, Some(st), _) => {
            let top = st.abs_mean.iter().cloned().fold(0.0f64, f64::max);
            if !(top > 0.0) {
                return Err(Error::Msg(format!(
                    "{name}: every calibration input is zero; nothing to scale by"
                )));
            }
            // Inputs that never fired get a small positive scale so S stays invertible.
            let s: Vec<f64> = st
                .abs_mean
                .iter()
                .map(|&a| a.max(1e-6 * top).powf(o.alpha))
                .collect();
            let wh = Whitening::diagonal(&s, &shape)?;
            scales = Some(s);
            wh
        }
        _ => {
            return Err(Error::option(
                "whiten",
                "`whiten` needs calibration data (`calib`)",
            ))
        }
    };
    Ok(Prepared {
        shape,
        w,
        whitening,
        gram,
        scales,
    })
}

/// Decompose and truncate one prepared matrix; returns the MPO (f32) and its report.
fn truncate_one(
    name: &str,
    p: &Prepared,
    t: &Truncation,
    t0: std::time::Instant,
) -> Result<(Mpo<f32>, MatrixReport)> {
    let cut = decompose_whitened(&p.w, &p.shape, &p.whitening, t)?;
    let (rows, cols) = (p.shape.orig_rows, p.shape.orig_cols);
    let what = cut.to_matrix()?;
    let dw: Vec<f64> = p.w.iter().zip(&what).map(|(a, b)| a - b).collect();
    let w2: f64 = p.w.iter().map(|v| v * v).sum();
    let rel_error = (dw.iter().map(|v| v * v).sum::<f64>() / w2.max(f64::MIN_POSITIVE)).sqrt();
    let energy = cut.frobenius_norm().unwrap_or(0.0);
    let pred_rel_error = cut.error_bound() / energy.max(f64::MIN_POSITIVE);
    let ratio = |num: f64, den: f64| (num / den.max(f64::MIN_POSITIVE)).sqrt();
    let rel_output_error = match &p.gram {
        Some(g) => Some(ratio(
            output_error2(&dw, rows, cols, g)?,
            output_error2(&p.w, rows, cols, g)?,
        )),
        None => None,
    };
    let rel_diag_error = match &p.scales {
        Some(s) => Some(ratio(
            diagonal_error2(&dw, rows, s)?,
            diagonal_error2(&p.w, rows, s)?,
        )),
        None => None,
    };
    let m32: Mpo<f32> = cut.cast();
    let report = MatrixReport {
        name: name.to_string(),
        module: name.rsplit('.').next().unwrap_or(name).to_string(),
        layer: layer_index(name),
        rows,
        cols,
        bonds: m32.bond_dims.clone(),
        dense_params: rows * cols,
        mpo_params: m32.num_params(),
        kept_ratio: m32.num_params() as f64 / (rows * cols) as f64,
        rel_error,
        pred_rel_error,
        rel_output_error,
        rel_diag_error,
        whitening_exact: kronecker_exact(&p.shape),
        secs: t0.elapsed().as_secs_f64(),
    };
    Ok((m32, report))
}

fn uniform_truncation(b: &Budget, shape: &MpoShape) -> Result<Truncation> {
    Ok(match b {
        Budget::Full => Truncation::Full,
        Budget::RelError(e) => Truncation::RelError(*e),
        Budget::ParamsRatio(r) => {
            Truncation::MaxParams((r * shape.dense_params() as f64).round() as usize)
        }
        Budget::Bond(_) => {
            return Err(Error::option(
                "bond",
                "`bond` fixes every bond whatever the spectra say; calibrated and globally allocated compression take `params_ratio` or `rel_error`",
            ))
        }
    })
}

/// Checks the options against each other (before any calibration work).
pub fn validate(o: &CalibratedOptions, calibrated: bool) -> Result<()> {
    if o.compress.n == 0 {
        return Err(Error::option(
            "n",
            "`n` (number of MPO sites) must be at least 1",
        ));
    }
    match o.compress.budget {
        Budget::ParamsRatio(r) if !(r > 0.0 && r <= 1.0) => {
            return Err(Error::option(
                "params_ratio",
                format!("`params_ratio` must be in (0, 1], got {r}"),
            ))
        }
        Budget::RelError(e) if !(0.0..1.0).contains(&e) => {
            return Err(Error::option(
                "rel_error",
                format!("`rel_error` must be in [0, 1), got {e}"),
            ))
        }
        Budget::Bond(_) => {
            uniform_truncation(&o.compress.budget, &MpoShape::exact(vec![1], vec![1])?)?;
        }
        _ => {}
    }
    if o.allocate == Allocate::Global && !matches!(o.compress.budget, Budget::ParamsRatio(_)) {
        return Err(Error::option(
            "allocate",
            "`allocate` global spreads a parameter budget and needs `params_ratio`",
        ));
    }
    if o.whiten != Whiten::None && !calibrated {
        return Err(Error::option(
            "whiten",
            "`whiten` needs calibration data (`calib`)",
        ));
    }
    if !(o.damp >= 0.0 && o.damp < 1.0) {
        return Err(Error::option(
            "damp",
            format!("`damp` must be in [0, 1), got {}", o.damp),
        ));
    }
    if !(o.alpha >= 0.0 && o.alpha.is_finite()) {
        return Err(Error::option(
            "alpha",
            format!("`alpha` must be finite and ≥ 0, got {}", o.alpha),
        ));
    }
    Ok(())
}

/// The matrices calibrated compression works on: `patterns`' choice, which with calibration
/// must lie inside decoder layers (default: every decoder-layer Linear).
pub fn chosen(m: &Model, o: &CalibratedOptions, calibrated: bool) -> Result<Vec<String>> {
    if calibrated {
        check_calibratable(m, &[])?;
    }
    let mut names = mpop::select(m, &o.compress.patterns, false);
    if calibrated && o.compress.patterns.is_empty() {
        names.retain(|n| layer_index(n).is_some());
    }
    if names.is_empty() {
        return Err(Error::option(
            "patterns",
            format!(
                "`patterns` {:?} matches no weight matrix of this model",
                o.compress.patterns.join(",")
            ),
        ));
    }
    if calibrated {
        check_calibratable(m, &names)?;
    }
    Ok(names)
}

/// Replace the chosen matrices of `m` (see [`chosen`]) by MPOs truncated in their whitened
/// bases, with the budget spread uniformly or globally. `stats` from [`collect_stats`] (None:
/// plain spectra, no output errors).
pub fn compress_calibrated(
    m: &mut Model,
    o: &CalibratedOptions,
    stats: Option<&Stats>,
    progress: bool,
) -> Result<CalibratedReport> {
    validate(o, stats.is_some())?;
    let names = chosen(m, o, stats.is_some())?;
    // Global: the whitened spectra of every matrix first (a bond-1 decomposition computes the
    // full spectra at the price of the smallest cores), then one greedy over all of them.
    let mut bonds_of: HashMap<String, Vec<usize>> = HashMap::new();
    let mut target = None;
    if o.allocate == Allocate::Global {
        let Budget::ParamsRatio(r) = o.compress.budget else {
            unreachable!("validated above")
        };
        let pb = mpop::matrix_bar("spectra", names.len(), progress);
        let mut shapes = Vec::new();
        let mut spectra = Vec::new();
        let mut dense = 0usize;
        for (name, lin) in m.linears() {
            if !names.contains(&name) {
                continue;
            }
            pb.set_message(name.clone());
            let p = prepare(&name, lin, o, stats)?;
            let probe = decompose_whitened(&p.w, &p.shape, &p.whitening, &Truncation::MaxBond(1))?;
            dense += p.shape.dense_params();
            shapes.push((name, p.shape));
            spectra.push(probe.spectra);
            pb.inc(1);
        }
        pb.finish_and_clear();
        let items: Vec<Item> = shapes
            .iter()
            .zip(&spectra)
            .map(|((_, shape), s)| Item { shape, spectra: s })
            .collect();
        let t = (r * dense as f64).floor() as usize;
        let alloc = allocate_global(&items, t).map_err(|e| {
            Error::option(
                "params_ratio",
                format!("`params_ratio` {r} cannot be met: {e}"),
            )
        })?;
        target = Some(t);
        for ((name, _), b) in shapes.into_iter().zip(alloc.bonds) {
            bonds_of.insert(name, b);
        }
    }
    let pb = mpop::matrix_bar("compressing", names.len(), progress);
    let mut reports = Vec::new();
    for (name, lin) in m.linears_mut() {
        if !names.contains(&name) {
            continue;
        }
        pb.set_message(name.clone());
        let t0 = std::time::Instant::now();
        let p = prepare(&name, lin, o, stats)?;
        let t = match bonds_of.get(&name) {
            Some(b) => Truncation::PerBond(b[1..b.len() - 1].to_vec()),
            None => uniform_truncation(&o.compress.budget, &p.shape)?,
        };
        let (cut, rep) = truncate_one(&name, &p, &t, t0)?;
        drop(p);
        mpop::install(lin, &cut)?;
        reports.push(rep);
        pb.inc(1);
    }
    pb.finish_and_clear();
    let mut by_module = BTreeMap::new();
    let mut by_layer = BTreeMap::new();
    let modules: std::collections::BTreeSet<&str> =
        reports.iter().map(|r| r.module.as_str()).collect();
    for md in modules {
        by_module.insert(
            md.to_string(),
            summarize(reports.iter().filter(|r| r.module == md)),
        );
    }
    let layers: std::collections::BTreeSet<Option<usize>> =
        reports.iter().map(|r| r.layer).collect();
    for l in layers {
        let key = l.map_or("outside layers".to_string(), |l| format!("{l:03}"));
        by_layer.insert(key, summarize(reports.iter().filter(|r| r.layer == l)));
    }
    let total = summarize(reports.iter());
    Ok(CalibratedReport {
        whiten: o.whiten,
        allocate: o.allocate,
        damp: o.damp,
        alpha: o.alpha,
        calibration_tokens: stats.and_then(|s| s.values().map(|v| v.tokens).max()),
        target_params: target,
        dense_params: total.dense_params,
        mpo_params: total.mpo_params,
        matrices: reports,
        by_module,
        by_layer,
    })
}
