//! One entry point from a MODEL argument (alias, HF directory or .gguf file) to a ready model,
//! its tokenizer and a description of what was loaded.

use crate::arch::{CausalLm, Encoder};
use crate::bert::Bert;
use crate::config::{self, BertConfig, LlamaConfig};
use crate::gemma3::{Gemma3, Gemma3Config};
use crate::gguf::GgufFile;
use crate::hub::{self, Format, ModelSource};
use crate::linear::Linear;
use crate::llama::Llama;
use crate::source::{GgufSource, WeightSource};
use crate::tokenizer::Tokenizer;
use crate::weights::Weights;
use crate::{Error, Result};
use candle_core::Tensor;
use std::collections::BTreeMap;
use std::path::Path;

/// A loaded architecture: a causal LM or an encoder, behind its trait.
#[derive(Debug)]
pub enum Arch {
    Causal(Box<dyn CausalLm>),
    Encoder(Box<dyn Encoder>),
}

#[derive(Debug)]
pub struct Model {
    pub source: ModelSource,
    pub arch: Arch,
    pub tokenizer: Tokenizer,
    /// How tensors were stored on disk (GGUF types or safetensors dtypes) → count.
    pub stored_types: BTreeMap<String, usize>,
    /// How a GGUF source's block-typed weights are held; None for other sources.
    pub gguf_weights: Option<GgufWeights>,
    pub load_secs: f64,
}

/// Architectures by config.json `model_type`, and how each is built from a source. A new
/// architecture is one file and one line here.
type Build = fn(&Path, &str, &Tokenizer, &dyn WeightSource) -> Result<Arch>;
const REGISTRY: &[(&[&str], Build)] = &[
    (&["llama", "qwen2", "mistral"], build_llama),
    (&["gemma3_text"], build_gemma3),
    (&["bert"], build_bert),
];

fn supported() -> String {
    REGISTRY
        .iter()
        .flat_map(|(names, _)| names.iter())
        .copied()
        .collect::<Vec<_>>()
        .join(", ")
}

fn build_llama(cfg_path: &Path, mt: &str, tok: &Tokenizer, w: &dyn WeightSource) -> Result<Arch> {
    let mut cfg: LlamaConfig = config::read_json(cfg_path)?;
    cfg.model_type = mt.to_string();
    cfg.validate(cfg_path)?;
    tok.check_fits(cfg.vocab_size, &cfg_path.with_file_name("tokenizer.json"))?;
    Ok(Arch::Causal(Box::new(Llama::new(cfg, w)?)))
}

fn build_gemma3(cfg_path: &Path, mt: &str, tok: &Tokenizer, w: &dyn WeightSource) -> Result<Arch> {
    let mut cfg: Gemma3Config = config::read_json(cfg_path)?;
    cfg.model_type = mt.to_string();
    cfg.validate(cfg_path)?;
    tok.check_fits(cfg.vocab_size, &cfg_path.with_file_name("tokenizer.json"))?;
    Ok(Arch::Causal(Box::new(Gemma3::new(cfg, w)?)))
}

fn build_bert(cfg_path: &Path, _mt: &str, tok: &Tokenizer, w: &dyn WeightSource) -> Result<Arch> {
    let cfg: BertConfig = config::read_json(cfg_path)?;
    cfg.validate(cfg_path)?;
    tok.check_fits(cfg.vocab_size, &cfg_path.with_file_name("tokenizer.json"))?;
    Ok(Arch::Encoder(Box::new(Bert::new(cfg, w)?)))
}

/// How a model is opened: progress display and how GGUF weights are held.
#[derive(Clone, Copy, Debug, Default)]
pub struct LoadOptions {
    pub progress: bool,
    pub gguf: GgufWeights,
}

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
        let src_format = src.format;
        let (arch, tokenizer, stored_types) = match src.format {
            Format::Gguf => load_gguf(&src.path, progress, gguf)?,
            Format::HfDir => {
                hf_preflight(&src.path)?;
                let w = Weights::from_hf_dir(&src.path)?;
                let mut types = BTreeMap::new();
                types.insert("f32 (as loaded)".to_string(), w.tensors.len());
                let (arch, tok) = build_hf(&src.path, &w)?;
                (arch, tok, types)
            }
        };
        Ok(Model {
            source: src,
            arch,
            tokenizer,
            stored_types,
            gguf_weights: (src_format == Format::Gguf).then_some(gguf),
            load_secs: t0.elapsed().as_secs_f64(),
        })
    }

    /// Build the architecture of an HF directory (config.json, tokenizer) in one pass from
    /// `w` — how method checkpoints (MPO, quantized) load: their source answers for the
    /// layers they store and passes the rest to the directory's safetensors.
    pub fn from_source(
        src: ModelSource,
        w: &dyn WeightSource,
        stored_types: BTreeMap<String, usize>,
    ) -> Result<Model> {
        let t0 = std::time::Instant::now();
        let (arch, tokenizer) = build_hf(&src.path, w)?;
        Ok(Model {
            source: src,
            arch,
            tokenizer,
            stored_types,
            gguf_weights: None,
            load_secs: t0.elapsed().as_secs_f64(),
        })
    }

    pub fn arch_name(&self) -> &str {
        match &self.arch {
            Arch::Causal(m) => m.model_type(),
            Arch::Encoder(m) => m.model_type(),
        }
    }

    /// The causal LM, or an error naming what this command needs.
    pub fn causal(&self) -> Result<&dyn CausalLm> {
        match &self.arch {
            Arch::Causal(m) => Ok(m.as_ref()),
            Arch::Encoder(_) => crate::bail!(
                "{} is an encoder ({}); this command needs a causal LM such as smollm2-135m",
                self.source.name,
                self.arch_name()
            ),
        }
    }

    pub fn causal_mut(&mut self) -> Result<&mut dyn CausalLm> {
        match &mut self.arch {
            Arch::Causal(m) => Ok(m.as_mut()),
            Arch::Encoder(_) => crate::bail!(
                "{} is an encoder; this command needs a causal LM such as smollm2-135m",
                self.source.name
            ),
        }
    }

    /// The encoder, or an error naming what this command needs.
    pub fn encoder(&self) -> Result<&dyn Encoder> {
        match &self.arch {
            Arch::Encoder(m) => Ok(m.as_ref()),
            Arch::Causal(_) => crate::bail!(
                "{} is a causal LM; this command needs an encoder such as minilm-l6",
                self.source.name
            ),
        }
    }

    pub fn encoder_mut(&mut self) -> Result<&mut dyn Encoder> {
        match &mut self.arch {
            Arch::Encoder(m) => Ok(m.as_mut()),
            Arch::Causal(_) => crate::bail!(
                "{} is a causal LM; this command needs an encoder such as minilm-l6",
                self.source.name
            ),
        }
    }

    /// The llama-family decoder itself, for what only it supports (GGUF export).
    pub fn llama(&self) -> Result<&Llama> {
        let c = self.causal()?;
        c.as_any().downcast_ref::<Llama>().ok_or_else(|| {
            Error::Msg(format!(
                "{} is a {} model; this needs a llama-family model (llama, qwen2, mistral)",
                self.source.name,
                c.model_type()
            ))
        })
    }

    /// The BERT encoder itself.
    pub fn bert(&self) -> Result<&Bert> {
        let e = self.encoder()?;
        e.as_any()
            .downcast_ref::<Bert>()
            .ok_or_else(|| Error::Msg(format!("{} is not a BERT encoder", self.source.name)))
    }

    pub fn linears(&self) -> Vec<(String, &Linear)> {
        match &self.arch {
            Arch::Causal(m) => m.linears(),
            Arch::Encoder(m) => m.linears(),
        }
    }

    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        match &mut self.arch {
            Arch::Causal(m) => m.linears_mut(),
            Arch::Encoder(m) => m.linears_mut(),
        }
    }

    /// Tensors that are not inside a Linear (norms, position/type embeddings).
    pub fn other_tensors(&self) -> Vec<(String, &Tensor)> {
        match &self.arch {
            Arch::Causal(m) => m.other_tensors(),
            Arch::Encoder(m) => m.other_tensors(),
        }
    }

    pub fn other_tensors_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        match &mut self.arch {
            Arch::Causal(m) => m.other_tensors_mut(),
            Arch::Encoder(m) => m.other_tensors_mut(),
        }
    }

    /// PEFT's default LoRA targets for this architecture.
    pub fn peft_default_targets(&self) -> &'static [&'static str] {
        match &self.arch {
            Arch::Causal(m) => m.peft_default_targets(),
            Arch::Encoder(m) => m.peft_default_targets(),
        }
    }

    /// Parameters per component (embedding, q, k, v, o, ffn parts, norms, head, …) and total.
    /// A tensor held by several layers (tied or shared across layers) counts once, under the
    /// first name that holds it.
    pub fn param_counts(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        let mut seen = std::collections::HashSet::new();
        for (name, l) in self.linears() {
            let shared: usize = l
                .param_ids()
                .into_iter()
                .filter(|(id, _)| !seen.insert(*id))
                .map(|(_, n)| n)
                .sum();
            *m.entry(component(&name).to_string()).or_insert(0) +=
                l.num_params().saturating_sub(shared);
        }
        for (name, t) in self.other_tensors() {
            if seen.insert(t.id()) {
                *m.entry(component(&name).to_string()).or_insert(0) += t.elem_count();
            }
        }
        m
    }

    pub fn total_params(&self) -> usize {
        self.param_counts().values().sum()
    }

    /// Bytes of all parameters as held in memory (packed layers count their packed size;
    /// shared tensors once).
    pub fn weight_bytes(&self) -> usize {
        let mut seen = std::collections::HashSet::new();
        let mut lin = 0;
        for (_, l) in self.linears() {
            let shared: usize = l
                .param_ids()
                .into_iter()
                .filter(|(id, _)| !seen.insert(*id))
                .map(|(_, n)| n * 4)
                .sum();
            lin += l.storage_bytes().saturating_sub(shared);
        }
        let other: usize = self
            .other_tensors()
            .iter()
            .filter(|(_, t)| seen.insert(t.id()))
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

/// The architectures mpolm reads from GGUF files, by `general.architecture`.
enum GgufConfig {
    Llama(LlamaConfig),
    Gemma3(Gemma3Config),
}

fn load_gguf(
    path: &Path,
    progress: bool,
    mode: GgufWeights,
) -> Result<(Arch, Tokenizer, BTreeMap<String, usize>)> {
    let g = GgufFile::open(path)?;
    let arch = g.architecture()?;
    if let Some(e) = g
        .meta(&format!("{arch}.expert_count"))
        .and_then(crate::gguf::as_u64)
    {
        if e > 0 {
            return Err(g.err(format!(
                "a mixture-of-experts file ({e} experts per layer); mpolm reads mixtures of experts from its own checkpoints, not from GGUF"
            )));
        }
    }
    // The config first: an architecture mpolm lacks is the message, whatever its tokenizer.
    let cfg = match g.architecture()?.as_str() {
        "gemma3" => GgufConfig::Gemma3(g.gemma3_config()?),
        _ => GgufConfig::Llama(g.llama_config()?),
    };
    let tokenizer = Tokenizer::from_gguf(&g)?;
    let pb = progress.then(|| {
        let pb = indicatif::ProgressBar::new(0);
        pb.set_style(
            indicatif::ProgressStyle::with_template(match mode {
                GgufWeights::F32 => "dequantizing {bar:30} {pos}/{len} tensors {elapsed}",
                GgufWeights::Quantized => "loading {bar:30} {pos}/{len} tensors {elapsed}",
            })
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        pb
    });
    let keep = mode == GgufWeights::Quantized;
    let (arch, types) = match cfg {
        GgufConfig::Gemma3(cfg) => {
            tokenizer.check_fits(cfg.vocab_size, path)?;
            // llama.cpp's converter stores Gemma's zero-centred norm weights as 1 + w; they
            // are put back to w, as transformers' GGUF loader does. No q/k permutation.
            let src = GgufSource::new(&g, &crate::gguf::names::GEMMA3, None, keep, pb)?
                .with_norms_shifted(-1.0);
            let arch = Arch::Causal(Box::new(Gemma3::new(cfg, &src)?));
            let types = src.stored_types();
            src.finish();
            (arch, types)
        }
        GgufConfig::Llama(cfg) => {
            tokenizer.check_fits(cfg.vocab_size, path)?;
            // llama.cpp interleaves llama's q/k rows for its RoPE; the source puts them back.
            let heads =
                (cfg.model_type == "llama").then(|| (cfg.num_attention_heads, cfg.num_kv_heads()));
            let src = GgufSource::new(&g, &crate::gguf::names::LLAMA, heads, keep, pb)?;
            let arch = Arch::Causal(Box::new(Llama::new(cfg, &src)?));
            let types = src.stored_types();
            src.finish();
            (arch, types)
        }
    };
    Ok((arch, tokenizer, types))
}

/// What an HF directory is, checked before any weight is read: its config.json
/// `model_type`, a tokenizer.json beside it, and an architecture mpolm has.
fn hf_preflight(dir: &Path) -> Result<(std::path::PathBuf, String, Build)> {
    let cfg_path = dir.join("config.json");
    let mt = config::model_type(&cfg_path)?;
    let tok_path = dir.join("tokenizer.json");
    if !tok_path.exists() {
        return Err(Error::io(
            &tok_path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "missing tokenizer.json"),
        ));
    }
    let Some((_, build)) = REGISTRY
        .iter()
        .find(|(names, _)| names.contains(&mt.as_str()))
    else {
        return Err(Error::UnsupportedArch {
            path: cfg_path,
            arch: crate::untrusted::escape(&mt),
            supported: supported(),
        });
    };
    Ok((cfg_path, mt, *build))
}

/// The architecture and tokenizer of an HF directory, its weights from `w`.
fn build_hf(dir: &Path, w: &dyn WeightSource) -> Result<(Arch, Tokenizer)> {
    let (cfg_path, mt, build) = hf_preflight(dir)?;
    let tokenizer = Tokenizer::from_hf_dir(dir)?;
    let arch = build(&cfg_path, &mt, &tokenizer, w)?;
    Ok((arch, tokenizer))
}
