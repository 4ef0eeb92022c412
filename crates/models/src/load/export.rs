//! Writing models back out as plain HF directories (config.json, model.safetensors,
//! tokenizer.json, tokenizer_config.json) that transformers loads directly — the exit door
//! for every method (dense export of MPO/LoRA models, the base of quantized checkpoints).

use crate::model::{Arch, Model};
use crate::{Error, Result};
use candle_core::Tensor;
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;

/// The dense state dict under HF names: every Linear's effective weight (MPO contracted,
/// quantized dequantized, adapters merged) and bias, plus norms and other tensors.
pub fn dense_state_dict(m: &Model) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for (name, l) in m.linears() {
        out.insert(format!("{name}.weight"), l.weight()?.contiguous()?);
        if let Some(b) = l.bias() {
            out.insert(format!("{name}.bias"), b.contiguous()?);
        }
    }
    for (name, t) in m.other_tensors() {
        out.insert(name, t.contiguous()?);
    }
    Ok(out)
}

/// config.json contents for the model's architecture.
pub fn config_json(m: &Model) -> Result<serde_json::Value> {
    let (mut v, arch) = match &m.arch {
        Arch::Causal(l) => (l.hf_config()?, l.hf_architecture()),
        Arch::Encoder(e) => (e.hf_config()?, e.hf_architecture()),
    };
    let obj = v
        .as_object_mut()
        .ok_or_else(|| Error::Msg("config is not an object".into()))?;
    obj.insert("architectures".into(), json!([arch]));
    obj.insert("torch_dtype".into(), json!("float32"));
    obj.retain(|_, v| !v.is_null());
    Ok(v)
}

/// Write `tensors` with the model's config and tokenizer as an HF directory. The directory is
/// assembled under a temporary name and renamed into place; an existing non-empty `dir` is
/// refused so nothing is overwritten.
pub fn write_hf_dir(
    m: &Model,
    dir: &Path,
    tensors: &HashMap<String, Tensor>,
    extra_files: &[(&str, String)],
) -> Result<()> {
    write_hf_dir_with(m, dir, tensors, extra_files, serde_json::Map::new())
}

/// [`write_hf_dir`] with `config` keys set over the architecture's config.json (what a
/// method's checkpoint tells other tools: `quantization_config`, the stored `torch_dtype`).
pub fn write_hf_dir_with(
    m: &Model,
    dir: &Path,
    tensors: &HashMap<String, Tensor>,
    extra_files: &[(&str, String)],
    config: serde_json::Map<String, serde_json::Value>,
) -> Result<()> {
    if dir.exists()
        && std::fs::read_dir(dir)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        return Err(Error::option(
            "out",
            format!(
                "{}: output directory exists and is not empty; choose a new `out`",
                dir.display()
            ),
        ));
    }
    let parent = crate::tmp::parent_of(dir);
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let tmp = crate::tmp::dir_in(&parent).map_err(|e| Error::io(&parent, e))?;
    let t = tmp.path();
    let w = |name: &str, s: String| -> Result<()> {
        std::fs::write(t.join(name), s).map_err(|e| Error::io(t.join(name), e))
    };
    w(
        "config.json",
        serde_json::to_string_pretty(&{
            let mut c = config_json(m)?;
            if let Some(obj) = c.as_object_mut() {
                obj.extend(config);
            }
            c
        })
        .unwrap_or_default(),
    )?;
    m.tokenizer
        .inner
        .save(t.join("tokenizer.json"), false)
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    let mut tc = json!({"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": false});
    if let Some(b) = &m.tokenizer.bos_token {
        tc["bos_token"] = json!(b);
    }
    if let Some(e) = &m.tokenizer.eos_token {
        tc["eos_token"] = json!(e);
    }
    if let Some(c) = &m.tokenizer.chat_template {
        tc["chat_template"] = json!(c);
    }
    if let Arch::Encoder(e) = &m.arch {
        if let Some(c) = e.tokenizer_class() {
            tc["tokenizer_class"] = json!(c);
        }
    }
    w(
        "tokenizer_config.json",
        serde_json::to_string_pretty(&tc).unwrap_or_default(),
    )?;
    for (name, text) in extra_files {
        w(name, text.clone())?;
    }
    let st = t.join("model.safetensors");
    candle_core::safetensors::save(tensors, &st)?;
    crate::tmp::publish(&st).map_err(|e| Error::io(&st, e))?;
    tmp.rename_to(dir).map_err(|e| Error::io(dir, e))?;
    Ok(())
}
