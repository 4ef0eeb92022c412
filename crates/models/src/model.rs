//! One entry point from a MODEL argument (alias, HF directory or .gguf file) to a ready model,
//! its tokenizer and a description of what was loaded.

use crate::bert::Bert;
use crate::config::{self, BertConfig, LlamaConfig};
use crate::gemma3::Gemma3;
use crate::gguf::GgufFile;
use crate::hub::{self, Format, ModelSource};
use crate::linear::Linear;
use crate::llama::Llama;
use crate::qlinear::QLinear;
use crate::tokenizer::Tokenizer;
use crate::weights::Weights;
use crate::{Error, Result};
use candle_core::Tensor;
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug)]
pub enum Arch {
    Llama(Llama),
    Bert(Bert),
    Gemma3(Gemma3),
}

#[derive(Debug)]
pub struct Model {
    pub source: ModelSource,
    pub arch: Arch,
    pub tokenizer: Tokenizer,
    /// How tensors were stored on disk (GGUF types or safetensors dtypes) → count.
    pub stored_types: BTreeMap<String, usize>,
    pub load_secs: f64,
}

const SUPPORTED: &str = "llama, qwen2, mistral, bert (gemma3 from GGUF)";

/// How a GGUF checkpoint's block-quantized weight matrices are held in memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GgufWeights {
    /// Dequantized to f32 at load (the reference path; all fixtures and results use it).
    #[default]
    F32,
    /// Kept in their block format behind [`crate::qlinear::QLinear`].
    Quantized,
}

impl GgufWeights {
    pub fn name(self) -> &'static str {
        match self {
            GgufWeights::F32 => "f32",
            GgufWeights::Quantized => "quantized",
        }
    }
}

impl Model {
    /// Resolve MODEL (fetching aliases on demand) and load it.
    pub fn load(model: &str, progress: bool) -> Result<Model> {
        Self::load_with(model, progress, GgufWeights::F32)
    }

    /// [`Self::load`] with a choice of how GGUF weights are held (ignored for HF directories).
    pub fn load_with(model: &str, progress: bool, gguf: GgufWeights) -> Result<Model> {
        let src = hub::resolve(model, progress)?;
        Self::load_source_with(src, progress, gguf)
    }

    pub fn load_source(src: ModelSource, progress: bool) -> Result<Model> {
        Self::load_source_with(src, progress, GgufWeights::F32)
    }

    pub fn load_source_with(src: ModelSource, progress: bool, gguf: GgufWeights) -> Result<Model> {
        let t0 = std::time::Instant::now();
        let (arch, tokenizer, stored_types) = match src.format {
            Format::Gguf => load_gguf(&src.path, progress, gguf)?,
            Format::HfDir => load_hf_dir(&src.path)?,
        };
        Ok(Model {
            source: src,
            arch,
            tokenizer,
            stored_types,
            load_secs: t0.elapsed().as_secs_f64(),
        })
    }

    /// Build an HF directory's architecture (config.json, tokenizer) from weights supplied by
    /// the caller — how method checkpoints (MPO, quantized) rebuild a model before swapping
    /// their own layers in.
    pub fn from_weights(src: ModelSource, w: Weights) -> Result<Model> {
        let t0 = std::time::Instant::now();
        let (arch, tokenizer, stored_types) = build_hf(&src.path, w)?;
        Ok(Model {
            source: src,
            arch,
            tokenizer,
            stored_types,
            load_secs: t0.elapsed().as_secs_f64(),
        })
    }

    pub fn arch_name(&self) -> &str {
        match &self.arch {
            Arch::Llama(m) => &m.cfg.model_type,
            Arch::Bert(m) => &m.cfg.model_type,
            Arch::Gemma3(m) => &m.cfg.model_type,
        }
    }

    pub fn llama(&self) -> Result<&Llama> {
        match &self.arch {
            Arch::Llama(m) => Ok(m),
            Arch::Bert(_) => crate::bail!(
                "{} is an encoder (bert); this command needs a causal LM such as smollm2-135m",
                self.source.name
            ),
            Arch::Gemma3(_) => crate::bail!(
                "{} is a gemma3 model; this command supports only llama-family causal LMs so far (gemma3 runs with inspect and generate)",
                self.source.name
            ),
        }
    }

    /// The causal LM behind any decoder architecture, for generation.
    pub fn causal(&self) -> Result<&dyn crate::generate::Decode> {
        match &self.arch {
            Arch::Llama(m) => Ok(m),
            Arch::Gemma3(m) => Ok(m),
            Arch::Bert(_) => crate::bail!(
                "{} is an encoder (bert); this command needs a causal LM such as smollm2-135m",
                self.source.name
            ),
        }
    }

    pub fn bert(&self) -> Result<&Bert> {
        match &self.arch {
            Arch::Bert(m) => Ok(m),
            Arch::Llama(_) | Arch::Gemma3(_) => crate::bail!(
                "{} is a causal LM; this command needs an encoder such as minilm-l6",
                self.source.name
            ),
        }
    }

    pub fn linears(&self) -> Vec<(String, &Linear)> {
        match &self.arch {
            Arch::Llama(m) => m.linears(),
            Arch::Bert(m) => m.linears(),
            Arch::Gemma3(m) => m.linears(),
        }
    }

    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        match &mut self.arch {
            Arch::Llama(m) => m.linears_mut(),
            Arch::Bert(m) => m.linears_mut(),
            Arch::Gemma3(m) => m.linears_mut(),
        }
    }

    /// Tensors that are not inside a Linear (norms, position/type embeddings).
    pub fn other_tensors(&self) -> Vec<(String, &Tensor)> {
        match &self.arch {
            Arch::Llama(m) => m.norms(),
            Arch::Bert(m) => m.other_tensors(),
            Arch::Gemma3(m) => m.norms(),
        }
    }

    pub fn other_tensors_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        match &mut self.arch {
            Arch::Llama(m) => m.norms_mut(),
            Arch::Bert(m) => m.other_tensors_mut(),
            Arch::Gemma3(m) => m.norms_mut(),
        }
    }

    /// Parameters per component (embedding, q, k, v, o, ffn parts, norms, head, …) and total.
    pub fn param_counts(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for (name, l) in self.linears() {
            *m.entry(component(&name).to_string()).or_insert(0) += l.num_params();
        }
        for (name, t) in self.other_tensors() {
            *m.entry(component(&name).to_string()).or_insert(0) += t.elem_count();
        }
        m
    }

    pub fn total_params(&self) -> usize {
        self.param_counts().values().sum()
    }

    /// Bytes of all parameters as held in memory (packed layers count their packed size).
    pub fn weight_bytes(&self) -> usize {
        let lin: usize = self.linears().iter().map(|(_, l)| l.storage_bytes()).sum();
        let other: usize = self
            .other_tensors()
            .iter()
            .map(|(_, t)| t.elem_count() * t.dtype().size_in_bytes())
            .sum();
        lin + other
    }
}

/// Component of a parameter by its HF name.
pub fn component(name: &str) -> &'static str {
    let n = name.trim_end_matches(".weight").trim_end_matches(".bias");
    if n.contains("layernorm") || n.contains("LayerNorm") || n.ends_with("norm") {
        "norm"
    } else if n.ends_with("embed_tokens") || n.ends_with("word_embeddings") {
        "embedding"
    } else if n.ends_with("position_embeddings") || n.ends_with("token_type_embeddings") {
        "embedding_pos_type"
    } else if n.ends_with("q_proj") || n.ends_with("self.query") {
        "attn_q"
    } else if n.ends_with("k_proj") || n.ends_with("self.key") {
        "attn_k"
    } else if n.ends_with("v_proj") || n.ends_with("self.value") {
        "attn_v"
    } else if n.ends_with("o_proj") || n.ends_with("attention.output.dense") {
        "attn_o"
    } else if n.ends_with("gate_proj") {
        "ffn_gate"
    } else if n.ends_with("up_proj") || n.ends_with("intermediate.dense") {
        "ffn_up"
    } else if n.ends_with("down_proj") || n.ends_with("output.dense") {
        "ffn_down"
    } else if n.ends_with("pooler.dense") {
        "pooler"
    } else if n == "lm_head" || n == "classifier" {
        "head"
    } else {
        "other"
    }
}

fn load_gguf(
    path: &Path,
    progress: bool,
    mode: GgufWeights,
) -> Result<(Arch, Tokenizer, BTreeMap<String, usize>)> {
    let g = GgufFile::open(path)?;
    if g.architecture()? == "gemma3" {
        return load_gemma3_gguf(&g, progress, mode);
    }
    let cfg = g.llama_config()?;
    let tokenizer = Tokenizer::from_gguf(&g)?;
    tokenizer.check_fits(cfg.vocab_size, path)?;
    let pb = if progress {
        let pb = indicatif::ProgressBar::new(0);
        pb.set_style(
            indicatif::ProgressStyle::with_template(match mode {
                GgufWeights::F32 => "dequantizing {bar:30} {pos}/{len} tensors {elapsed}",
                GgufWeights::Quantized => "loading {bar:30} {pos}/{len} tensors {elapsed}",
            })
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Some(pb)
    } else {
        None
    };
    let (w, mut quantized) = match mode {
        GgufWeights::F32 => (g.load_llama_weights(&cfg, pb.as_ref())?, Default::default()),
        GgufWeights::Quantized => g.load_llama_quantized(&cfg, pb.as_ref())?,
    };
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    let mut types = BTreeMap::new();
    for t in g.tensor_types().values() {
        *types.entry(t.clone()).or_insert(0) += 1;
    }
    let mut arch = Arch::Llama(Llama::new(cfg, &w)?);
    drop(w);
    if let Arch::Llama(m) = &mut arch {
        for (name, lin) in m.linears_mut() {
            if let Some(q) = quantized.remove(&format!("{name}.weight")) {
                let bias = lin.bias();
                let ql = QLinear::new(q, bias).map_err(|e| Error::Gguf {
                    path: path.to_path_buf(),
                    msg: format!("{name}: {e}"),
                })?;
                lin.replace(Box::new(ql));
            }
        }
    }
    // Every kept block tensor must have found its Linear, or a broadcast placeholder would be
    // left where a weight belongs.
    if let Some(name) = quantized.keys().next() {
        return Err(Error::Gguf {
            path: path.to_path_buf(),
            msg: format!("quantized tensor '{name}' belongs to no linear layer"),
        });
    }
    Ok((arch, tokenizer, types))
}

/// [`load_gguf`] for gemma3 files (its own config and tensor names).
fn load_gemma3_gguf(
    g: &GgufFile,
    progress: bool,
    mode: GgufWeights,
) -> Result<(Arch, Tokenizer, BTreeMap<String, usize>)> {
    let cfg = g.gemma3_config()?;
    let tokenizer = Tokenizer::from_gguf(g)?;
    tokenizer.check_fits(cfg.vocab_size, &g.path)?;
    let pb = progress.then(|| {
        let pb = indicatif::ProgressBar::new(0);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "loading {bar:30} {pos}/{len} tensors {elapsed}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        pb
    });
    let (w, mut quantized) = g.load_gemma3(pb.as_ref(), mode == GgufWeights::Quantized)?;
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    let mut types = BTreeMap::new();
    for t in g.tensor_types().values() {
        *types.entry(t.clone()).or_insert(0) += 1;
    }
    let mut m = Gemma3::new(cfg, &w)?;
    drop(w);
    for (name, lin) in m.linears_mut() {
        if let Some(q) = quantized.remove(&format!("{name}.weight")) {
            let ql = QLinear::new(q, None).map_err(|e| Error::Gguf {
                path: g.path.clone(),
                msg: format!("{name}: {e}"),
            })?;
            lin.replace(Box::new(ql));
        }
    }
    if let Some(name) = quantized.keys().next() {
        return Err(Error::Gguf {
            path: g.path.clone(),
            msg: format!("quantized tensor '{name}' belongs to no linear layer"),
        });
    }
    Ok((Arch::Gemma3(m), tokenizer, types))
}

fn load_hf_dir(dir: &Path) -> Result<(Arch, Tokenizer, BTreeMap<String, usize>)> {
    let cfg_path = dir.join("config.json");
    let mt = config::model_type(&cfg_path)?;
    let tok_path = dir.join("tokenizer.json");
    if !tok_path.exists() {
        return Err(Error::io(
            &tok_path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "missing tokenizer.json"),
        ));
    }
    let arch_ok = matches!(mt.as_str(), "llama" | "qwen2" | "mistral" | "bert");
    if !arch_ok {
        return Err(Error::UnsupportedArch {
            path: cfg_path,
            arch: crate::untrusted::escape(&mt),
            supported: SUPPORTED.into(),
        });
    }
    build_hf(dir, Weights::from_hf_dir(dir)?)
}

fn build_hf(dir: &Path, w: Weights) -> Result<(Arch, Tokenizer, BTreeMap<String, usize>)> {
    let cfg_path = dir.join("config.json");
    let mt = config::model_type(&cfg_path)?;
    if !matches!(mt.as_str(), "llama" | "qwen2" | "mistral" | "bert") {
        return Err(Error::UnsupportedArch {
            path: cfg_path,
            arch: crate::untrusted::escape(&mt),
            supported: SUPPORTED.into(),
        });
    }
    let mut types = BTreeMap::new();
    types.insert("f32 (as loaded)".to_string(), w.tensors.len());
    let tokenizer = Tokenizer::from_hf_dir(dir)?;
    let tok_path = dir.join("tokenizer.json");
    let arch = if mt == "bert" {
        let cfg: BertConfig = config::read_json(&cfg_path)?;
        cfg.validate(&cfg_path)?;
        tokenizer.check_fits(cfg.vocab_size, &tok_path)?;
        Arch::Bert(Bert::new(cfg, &w)?)
    } else {
        let mut cfg: LlamaConfig = config::read_json(&cfg_path)?;
        cfg.model_type = mt;
        cfg.validate(&cfg_path)?;
        tokenizer.check_fits(cfg.vocab_size, &tok_path)?;
        Arch::Llama(Llama::new(cfg, &w)?)
    };
    Ok((arch, tokenizer, types))
}
