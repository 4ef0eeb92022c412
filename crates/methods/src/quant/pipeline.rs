//! The quantize pipeline, start to end: INT8-activation outliers found on the model as loaded,
//! RTN / GPTQ with its calibration windows, the AutoGPTQ-layout checkpoint saved and reloaded
//! (what users will load), and the storage summary. Evaluation (perplexity, generation) is the
//! caller's: it gets the reloaded model back.

use super::actquant::{self, Int8Plan, KeepOutliers};
use super::calib::{self, Method};
use super::{Error, KeepFp16, LayerReport, QuantOptions, QuantizeConfig, Result};
use models::Model;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Calibration text and where it came from (echoed in the report).
#[derive(Debug, Clone)]
pub struct Calibration {
    pub text: String,
    pub source: String,
}

/// INT8 activations: which input dimensions stay in full precision.
#[derive(Debug, Clone, Copy)]
pub struct Int8Options {
    pub threshold: f32,
    pub keep: KeepOutliers,
}

#[derive(Debug, Clone)]
pub struct PipelineOptions {
    /// None: nothing is quantized or written (INT8 activations may still apply in memory).
    pub method: Option<Method>,
    pub bits: u32,
    /// AutoGPTQ's convention: −1 = one group per output row.
    pub group_size: i64,
    pub act_order: bool,
    pub damp: f64,
    pub sym: bool,
    pub keep: KeepFp16,
    /// How the fp16 choice was written, echoed in the report.
    pub keep_spec: Option<String>,
    /// Needed by GPTQ and INT8 activations; RTN ignores it.
    pub calib: Option<Calibration>,
    pub nsamples: usize,
    pub seqlen: usize,
    pub seed: u64,
    pub int8: Option<Int8Options>,
    /// The checkpoint directory (required with a method).
    pub out: Option<PathBuf>,
    /// AutoGPTQ's v1 (`gptq`, what most loaders expect) or GPTQModel's `gptq_v2`.
    pub checkpoint_format: super::ZeroFormat,
    pub progress: bool,
}

/// The `quantize` section of the report.
#[derive(Debug, Clone, Serialize)]
pub struct QuantizeReport {
    pub method: String,
    pub bits: u32,
    pub group_size: i64,
    pub act_order: bool,
    pub sym: bool,
    pub damp: f64,
    pub keep_fp16: Option<String>,
    pub nsamples: usize,
    pub seqlen: usize,
    /// The calibration source, when calibration text was used.
    pub calib: Option<String>,
    pub secs: f64,
    pub layers: Vec<LayerReport>,
    /// The first tokens of the first calibration windows, so scripts/gptq_torch.py can check
    /// that it drew the same ones.
    pub calib_first_ids: Option<Vec<Vec<u32>>>,
    pub out: String,
    /// Calibration windows drawn (for printing).
    #[serde(skip)]
    pub calib_windows: usize,
}

/// The `int8_activations` section of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Int8Report {
    pub threshold: f32,
    pub keep_outliers: String,
    pub projections: usize,
    pub kept_dims: usize,
    pub outliers: BTreeMap<String, Vec<actquant::Outlier>>,
    #[serde(skip)]
    pub calib_windows: usize,
    #[serde(skip)]
    pub secs: f64,
}

/// Storage of the resulting model (the start of the `model_summary` section).
#[derive(Debug, Clone, Serialize)]
pub struct ModelSummary {
    pub params: usize,
    pub total_bits: u64,
    pub bits_per_param: f64,
    pub file_bytes: u64,
}

#[derive(Debug, Clone)]
pub struct PipelineReport {
    pub quantize: Option<QuantizeReport>,
    pub int8_activations: Option<Int8Report>,
    pub summary: ModelSummary,
    /// The checkpoint written, if any.
    pub out: Option<PathBuf>,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Rtn => "rtn",
            Method::Gptq => "gptq",
        }
    }
}

/// Number of decoder projections (the ones quantized; `KeepFp16::Crucial` counts among them).
pub fn decoder_projections(m: &Model) -> usize {
    m.linears()
        .iter()
        .filter(|(name, _)| calib::layer_index(name).is_some())
        .count()
}

/// Run the pipeline on `m`; returns the model to evaluate (the reloaded checkpoint when one
/// was written) and the report.
pub fn run(mut m: Model, o: &PipelineOptions) -> Result<(Model, PipelineReport)> {
    let base_params = m.total_params();
    let calib_text = o.calib.as_ref().map(|c| c.text.as_str());
    let samples = |m: &Model| match calib_text {
        Some(t) => calib::calibration_samples(m, t, o.nsamples, o.seqlen, o.seed).map(Some),
        None => Err(Error::Msg(
            "this quantization needs calibration text".into(),
        )),
    };
    // Outliers are a property of the activations, so they are found on the model as loaded
    // (before its weights are quantized).
    let mut plan: Option<(Int8Plan, Int8Report)> = None;
    if let Some(i8o) = &o.int8 {
        let s = samples(&m)?.unwrap_or_default();
        let ti = std::time::Instant::now();
        let absmax = actquant::input_absmax(&mut m, &s)?;
        let p = actquant::plan(&absmax, i8o.threshold, i8o.keep);
        let r = Int8Report {
            threshold: i8o.threshold,
            keep_outliers: i8o.keep.to_string(),
            projections: p.projections,
            kept_dims: p.kept_total,
            outliers: p.outliers.clone(),
            calib_windows: s.len(),
            secs: ti.elapsed().as_secs_f64(),
        };
        plan = Some((p, r));
    }
    let mut quantize = None;
    let mut out_dir = None;
    if let Some(method) = o.method {
        let dir = o
            .out
            .clone()
            .ok_or_else(|| Error::Msg("a quantized model needs an output directory".into()))?;
        let qo = QuantOptions {
            method,
            bits: o.bits,
            group_size: if o.group_size < 0 {
                0
            } else {
                o.group_size as usize
            },
            act_order: o.act_order,
            damp: o.damp,
            sym: o.sym,
            keep: o.keep.clone(),
            zero_format: o.checkpoint_format,
            ..Default::default()
        };
        calib::validate(&m, &qo)?;
        let calib = if method == Method::Gptq || calib_text.is_some() {
            samples(&m)?
        } else {
            None
        };
        let tq = std::time::Instant::now();
        let layers = super::quantize_model(&mut m, &qo, calib.as_deref(), o.progress)?;
        let secs = tq.elapsed().as_secs_f64();
        let cfg = QuantizeConfig {
            bits: o.bits,
            group_size: o.group_size,
            damp_percent: o.damp,
            desc_act: o.act_order,
            sym: o.sym,
            true_sequential: true,
            quant_method: "gptq".into(),
            checkpoint_format: o.checkpoint_format.name().into(),
            mpolm_method: method.name().into(),
            mpolm_fp16_modules: vec![],
            mpolm_int8_activations: plan.as_ref().map(|(p, _)| p.config.clone()),
        };
        super::save_quantized(&m, &dir, &cfg)?;
        quantize = Some(QuantizeReport {
            method: method.name().into(),
            bits: o.bits,
            group_size: o.group_size,
            act_order: o.act_order,
            sym: o.sym,
            damp: o.damp,
            keep_fp16: o.keep_spec.clone(),
            nsamples: o.nsamples,
            seqlen: o.seqlen,
            calib: o.calib.as_ref().map(|c| c.source.clone()),
            secs,
            layers,
            calib_first_ids: calib.as_ref().map(|c| {
                c.iter()
                    .take(4)
                    .map(|w| w[..w.len().min(8)].to_vec())
                    .collect()
            }),
            out: dir.display().to_string(),
            calib_windows: calib.as_ref().map_or(0, |c| c.len()),
        });
        // Continue with the checkpoint as saved (what users will load).
        drop(m);
        m = super::load_quantized(&dir)
            .map_err(|e| Error::Msg(format!("reloading {}: {e}", dir.display())))?;
        out_dir = Some(dir);
    }
    if let Some((p, _)) = &plan {
        if out_dir.is_none() {
            // No checkpoint: apply to the model in memory.
            actquant::apply(&mut m, &p.config)?;
        }
    }
    let quantized = m.linears().iter().any(|(_, l)| {
        l.inner()
            .as_any()
            .downcast_ref::<super::QuantLinear>()
            .is_some()
    });
    let total_bits = super::total_bits(&m, if quantized { 16 } else { 32 });
    let file_bytes = match &out_dir {
        Some(d) => super::dir_size(d),
        None if m.source.path.is_dir() => super::dir_size(&m.source.path),
        None => std::fs::metadata(&m.source.path)
            .map(|x| x.len())
            .unwrap_or(0),
    };
    let summary = ModelSummary {
        params: base_params,
        total_bits,
        bits_per_param: total_bits as f64 / base_params.max(1) as f64,
        file_bytes,
    };
    Ok((
        m,
        PipelineReport {
            quantize,
            int8_activations: plan.map(|(_, r)| r),
            summary,
            out: out_dir,
        },
    ))
}
