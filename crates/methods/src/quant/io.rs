//! Quantized checkpoints in the AutoGPTQ layout: config.json + tokenizer of the base model,
//! `model.safetensors` with every quantized Linear as `<module>.qweight` (int32 [in·bits/32, out]),
//! `<module>.qzeros` (int32 [groups, out·bits/32]: zero − 1 in AutoGPTQ's `checkpoint_format`
//! "gptq" (v1), the zero itself in GPTQModel's "gptq_v2"), `<module>.scales` (f16 [groups, out]),
//! `<module>.g_idx` (int32 [in]) and `<module>.bias` (f16); every other tensor (embedding, norms,
//! head, fp16-kept layers) in f16; and `quantize_config.json`.

use super::layer::{QuantLinear, ZeroFormat};
use super::{Error, Result};
use candle_core::{DType, Device, Tensor};
use models::Model;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

pub const QUANT_CONFIG: &str = "quantize_config.json";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct QuantizeConfig {
    pub bits: u32,
    /// −1 = one group per output row.
    pub group_size: i64,
    pub damp_percent: f64,
    pub desc_act: bool,
    pub sym: bool,
    pub true_sequential: bool,
    pub quant_method: String,
    pub checkpoint_format: String,
    /// "gptq" or "rtn": how the integers were chosen (the format is the same).
    #[serde(default)]
    pub mpolm_method: String,
    /// Modules left in fp16.
    #[serde(default)]
    pub mpolm_fp16_modules: Vec<String>,
    /// INT8 activations (simulated) with their kept outlier dimensions, re-applied on load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mpolm_int8_activations: Option<super::actquant::Int8Config>,
}

impl QuantizeConfig {
    /// Every field a loader relies on: bits, group size (−1 or 1..=2^20), damping in [0, 1],
    /// format and method names.
    pub fn validate(&self) -> std::result::Result<(), String> {
        use models::untrusted::escape;
        super::pack::check_bits(self.bits).map_err(|e| e.to_string())?;
        if !(self.group_size == -1 || (1..=1 << 20).contains(&self.group_size)) {
            return Err(format!(
                "group_size {} must be -1 (one group per row) or in 1..=1048576",
                self.group_size
            ));
        }
        if !(self.damp_percent.is_finite() && (0.0..=1.0).contains(&self.damp_percent)) {
            return Err(format!(
                "damp_percent {} must be in [0, 1]",
                self.damp_percent
            ));
        }
        if self.quant_method != "gptq" {
            return Err(format!(
                "quant_method '{}' is not supported (only 'gptq')",
                escape(&self.quant_method)
            ));
        }
        if ZeroFormat::parse(&self.checkpoint_format).is_none() {
            return Err(format!(
                "checkpoint_format '{}' is not supported (only 'gptq' (v1) and 'gptq_v2')",
                escape(&self.checkpoint_format)
            ));
        }
        if !matches!(self.mpolm_method.as_str(), "" | "gptq" | "rtn") {
            return Err(format!(
                "mpolm_method '{}' is not one of gptq, rtn",
                escape(&self.mpolm_method)
            ));
        }
        Ok(())
    }

    /// Quantization groups along the input of a layer with `in_f` features.
    /// How `qzeros` are encoded (after [`QuantizeConfig::validate`]; v1 otherwise).
    pub fn zero_format(&self) -> ZeroFormat {
        ZeroFormat::parse(&self.checkpoint_format).unwrap_or_default()
    }

    pub fn groups(&self, in_f: usize) -> usize {
        if self.group_size <= 0 {
            1
        } else {
            in_f.div_ceil(self.group_size as usize)
        }
    }
}

pub fn is_quantized_dir(dir: &Path) -> bool {
    dir.is_dir() && dir.join(QUANT_CONFIG).exists()
}

fn i32_tensor(v: &[u32], shape: (usize, usize)) -> Result<Tensor> {
    let v: Vec<i32> = v.iter().map(|&x| x as i32).collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

fn f16(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::F16)?.contiguous()?)
}

/// Save a model whose decoder Linears are `QuantLinear`s (others are written in f16).
pub fn save_quantized(m: &Model, dir: &Path, cfg: &QuantizeConfig) -> Result<()> {
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut cfg = cfg.clone();
    cfg.validate().map_err(Error::Msg)?;
    cfg.mpolm_fp16_modules.clear();
    let fmt = cfg.zero_format();
    for (name, l) in m.linears() {
        if let Some(q) = l.inner().as_any().downcast_ref::<QuantLinear>() {
            if q.bits != cfg.bits {
                return Err(Error::Msg(format!(
                    "{name} is {}-bit but the config says {}",
                    q.bits, cfg.bits
                )));
            }
            let b = q.bits as usize;
            tensors.insert(
                format!("{name}.qweight"),
                i32_tensor(&q.qweight(), (q.in_f * b / 32, q.out_f))?,
            );
            tensors.insert(
                format!("{name}.qzeros"),
                i32_tensor(
                    &q.qzeros_as(fmt)
                        .map_err(|e| Error::Msg(format!("{name}: {e}")))?,
                    (q.groups(), q.out_f * b / 32),
                )?,
            );
            tensors.insert(
                format!("{name}.scales"),
                f16(&Tensor::from_vec(
                    q.scales.clone(),
                    (q.groups(), q.out_f),
                    &Device::Cpu,
                )?)?,
            );
            tensors.insert(
                format!("{name}.g_idx"),
                i32_tensor(&q.g_idx, (q.in_f, 1))?.reshape(q.in_f)?,
            );
        } else {
            tensors.insert(format!("{name}.weight"), f16(&l.weight()?)?);
            if super::calib::layer_index(&name).is_some() {
                cfg.mpolm_fp16_modules.push(name.clone());
            }
        }
        if let Some(b) = l.bias() {
            tensors.insert(format!("{name}.bias"), f16(&b)?);
        }
    }
    for (name, t) in m.other_tensors() {
        tensors.insert(name, f16(t)?);
    }
    let text = serde_json::to_string_pretty(&cfg).map_err(|e| Error::Msg(e.to_string()))?;
    models::export::write_hf_dir_with(m, dir, &tensors, &[(QUANT_CONFIG, text)], hf_config(&cfg))?;
    Ok(())
}

/// What transformers (and GPTQModel) read from config.json: `quantization_config` with the
/// fields of quantize_config.json that describe the format, and `torch_dtype` float16, the
/// dtype of every stored float tensor.
pub fn hf_config(cfg: &QuantizeConfig) -> serde_json::Map<String, serde_json::Value> {
    let mut m = serde_json::Map::new();
    m.insert(
        "quantization_config".into(),
        serde_json::json!({
            "quant_method": cfg.quant_method,
            "bits": cfg.bits,
            "group_size": cfg.group_size,
            "desc_act": cfg.desc_act,
            "sym": cfg.sym,
            "damp_percent": cfg.damp_percent,
            "true_sequential": cfg.true_sequential,
            "checkpoint_format": cfg.checkpoint_format,
        }),
    );
    m.insert("torch_dtype".into(), serde_json::json!("float16"));
    m
}

/// Load a checkpoint written by [`save_quantized`] (or any AutoGPTQ v1 / GPTQModel v2 checkpoint of a llama-
/// family model with the same tensor names) in one pass: the packed modules are checked, then
/// the architecture asks for its layers and gets `QuantLinear`s (no f32 copy is ever made),
/// f16 matrices as `HalfDense`, and the rest from the safetensors.
pub fn load_quantized(dir: &Path) -> Result<Model> {
    let cpath = dir.join(QUANT_CONFIG);
    let text = models::untrusted::read_text(&cpath, models::untrusted::MAX_JSON_BYTES)?;
    let cfg: QuantizeConfig = serde_json::from_str(&text)
        .map_err(|e| models::Error::config(&cpath, format!("invalid quantize_config.json: {e}")))?;
    cfg.validate()
        .map_err(|e| models::Error::config(&cpath, e))?;
    let st = dir.join("model.safetensors");
    // Weight matrices stored in f16 (embedding, head, projections kept in fp16) stay f16 in
    // memory (`HalfDense`): an f32 copy would double them, and the embedding and head are a large
    // part of a low-bit checkpoint.
    let keep_f16 = |name: &str, rank: usize, dtype: DType| {
        dtype == DType::F16 && name.ends_with(".weight") && rank == 2
    };
    let mut tensors = models::weights::load_safetensors_keeping(&st, |name, shape, dtype| {
        keep_f16(name, shape.len(), dtype)
    })?;
    let modules: BTreeSet<String> = tensors
        .keys()
        .filter_map(|k| k.strip_suffix(".qweight").map(String::from))
        .collect();
    let bad = |msg: String| -> Error {
        models::Error::Safetensors {
            path: st.clone(),
            msg,
        }
        .into()
    };
    let mut packed = HashMap::new();
    for name in &modules {
        let shown = models::untrusted::escape(name);
        let mut take = |suffix: &str| {
            tensors
                .remove(&format!("{name}.{suffix}"))
                .ok_or_else(|| bad(format!("tensor '{shown}.{suffix}' is missing")))
        };
        let (qw, qz, sc, gi) = (
            take("qweight")?,
            take("qzeros")?,
            take("scales")?,
            take("g_idx")?,
        );
        let u32s = |t: &Tensor, what: &str| -> Result<Vec<u32>> {
            if t.dtype() != DType::I32 {
                return Err(bad(format!(
                    "'{shown}.{what}' must be int32, found {:?}",
                    t.dtype()
                )));
            }
            Ok(t.flatten_all()?
                .to_vec1::<i32>()?
                .into_iter()
                .map(|x| x as u32)
                .collect())
        };
        let (qw_dims, qz_dims) = (qw.dims().to_vec(), qz.dims().to_vec());
        if qw_dims.len() != 2 || qz_dims.len() != 2 || sc.rank() != 2 {
            return Err(bad(format!(
                "'{shown}': qweight, qzeros and scales must be 2-D"
            )));
        }
        let in_f = gi.elem_count();
        let out_f = qw_dims[1];
        let scales = sc.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        if scales.iter().any(|s| !s.is_finite()) {
            return Err(bad(format!(
                "'{shown}.scales' holds NaN or infinite values (corrupt file?)"
            )));
        }
        let groups = cfg.groups(in_f);
        if sc.dims() != [groups, out_f] {
            return Err(bad(format!(
                "'{shown}.scales' has shape {:?}; group_size {} over {in_f} inputs needs [{groups}, {out_f}]",
                sc.dims(),
                cfg.group_size
            )));
        }
        let g_idx = u32s(&gi, "g_idx")?;
        // Without act-order, input i belongs to group i / group_size; only act-order
        // checkpoints may permute it.
        if !cfg.desc_act && cfg.group_size > 0 {
            let gs = cfg.group_size as usize;
            if let Some(i) = (0..in_f).find(|&i| g_idx[i] as usize != i / gs) {
                return Err(bad(format!(
                    "'{shown}.g_idx'[{i}] is {}, but group_size {gs} without desc_act puts input {i} in group {}",
                    g_idx[i],
                    i / gs
                )));
            }
        }
        let q = QuantLinear::from_packed_as(
            cfg.zero_format(),
            cfg.bits,
            in_f,
            out_f,
            u32s(&qw, "qweight")?,
            u32s(&qz, "qzeros")?,
            scales,
            g_idx,
            None,
        )
        .map_err(|e| bad(format!("'{shown}': {e}")))?;
        packed.insert(name.clone(), q);
    }
    let mut halves = HashMap::new();
    let names: Vec<String> = tensors
        .iter()
        .filter(|(k, t)| keep_f16(k, t.rank(), t.dtype()))
        .map(|(k, _)| k.clone())
        .collect();
    for k in names {
        let t = tensors.remove(&k).expect("listed above");
        halves.insert(k.trim_end_matches(".weight").to_string(), t);
    }
    let src = models::hub::ModelSource {
        name: dir.display().to_string(),
        format: models::hub::Format::HfDir,
        path: dir.to_path_buf(),
    };
    let mut types = BTreeMap::new();
    types.insert(format!("gptq int{} (packed)", cfg.bits), packed.len());
    if !halves.is_empty() {
        types.insert("f16".into(), halves.len());
    }
    let source = GptqSource {
        rest: models::weights::Weights::new(tensors, &st),
        packed: std::sync::Mutex::new(packed),
        halves: std::sync::Mutex::new(halves),
    };
    let mut m = Model::from_source(src, &source, types)?;
    let packed = source.packed.into_inner().unwrap_or_default();
    if !packed.is_empty() {
        return Err(bad(format!(
            "quantized modules the model does not have: {:?}",
            packed.keys().collect::<Vec<_>>()
        )));
    }
    if let Some(a) = &cfg.mpolm_int8_activations {
        super::actquant::apply(&mut m, a)
            .map_err(|e| models::Error::config(&cpath, e.to_string()))?;
    }
    Ok(m)
}

/// A GPTQ checkpoint as a weight source: packed modules become `QuantLinear`s and f16
/// matrices `HalfDense`s, each handed out once; the rest is plain safetensors.
struct GptqSource {
    rest: models::weights::Weights,
    packed: std::sync::Mutex<HashMap<String, QuantLinear>>,
    halves: std::sync::Mutex<HashMap<String, Tensor>>,
}

impl GptqSource {
    fn check(&self, module: &str, got: [usize; 2], want: [usize; 2]) -> models::Result<()> {
        if got != want {
            return Err(models::Error::Shape {
                path: self.rest.path.clone(),
                name: format!("{module}.weight"),
                expected: want.to_vec(),
                got: got.to_vec(),
            });
        }
        Ok(())
    }
}

impl models::WeightSource for GptqSource {
    fn path(&self) -> &Path {
        &self.rest.path
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        if let Some(t) = self.rest.tensors.get(name) {
            return Some(t.dims().to_vec());
        }
        let module = name.strip_suffix(".weight")?;
        let h = self.halves.lock().ok()?;
        h.get(module).map(|t| t.dims().to_vec())
    }
    fn tensor(&self, name: &str, shape: &[usize]) -> models::Result<Tensor> {
        // An f16 matrix asked for as a plain tensor (not a Linear) is widened like any other.
        let half = match name.strip_suffix(".weight") {
            Some(m) => self
                .halves
                .lock()
                .map_err(|_| models::Error::Msg("internal: source lock poisoned".into()))?
                .remove(m),
            None => None,
        };
        match half {
            Some(t) => models::weights::Weights::new(
                [(name.to_string(), t.to_dtype(DType::F32)?)].into(),
                &self.rest.path,
            )
            .get(name, shape),
            None => self.rest.get(name, shape),
        }
    }
    fn has_linear(&self, module: &str) -> bool {
        self.packed.lock().is_ok_and(|m| m.contains_key(module))
            || self.halves.lock().is_ok_and(|m| m.contains_key(module))
            || self.rest.contains(&format!("{module}.weight"))
    }
    fn linear(
        &self,
        module: &str,
        out_f: usize,
        in_f: usize,
        bias: models::Bias,
    ) -> models::Result<models::Linear> {
        let poisoned = || models::Error::Msg("internal: source lock poisoned".into());
        let q = self.packed.lock().map_err(|_| poisoned())?.remove(module);
        if let Some(mut q) = q {
            self.check(module, [q.out_f, q.in_f], [out_f, in_f])?;
            q.bias = models::source::bias_of(self, module, out_f, bias)?;
            return Ok(models::Linear::new(Box::new(q)));
        }
        let h = self.halves.lock().map_err(|_| poisoned())?.remove(module);
        if let Some(t) = h {
            let (o, i) = t.dims2()?;
            self.check(module, [o, i], [out_f, in_f])?;
            let b = models::source::bias_of(self, module, out_f, bias)?;
            return Ok(models::Linear::new(Box::new(models::half::HalfDense::new(
                &t, b,
            )?)));
        }
        models::source::dense_linear(self, module, out_f, in_f, bias)
    }
}
