//! GGUF checkpoints (llama.cpp's format): by default every tensor is dequantized to f32 (our
//! full-precision baseline) and renamed to HF names; with `load_llama_quantized` the
//! block-typed weight matrices stay as stored (for `qlinear::QLinear`). For the llama
//! architecture the q/k rows that llama.cpp's converter permuted for its interleaved RoPE are
//! put back in HF order (whole quantized rows are moved; blocks never span rows).
//!
//! The format's other facts live beside the reader: [`names`] (the HF ↔ GGUF tensor names,
//! both directions), [`types`] (the ggml type table) and [`write`] (the v3 file writer).

pub mod names;
pub mod types;
pub mod write;

use crate::config::{LlamaConfig, RopeScaling};
use crate::untrusted::{self, escape};
use crate::{Error, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::Tensor;
use std::collections::{BTreeMap, HashSet};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

pub struct GgufFile {
    pub path: PathBuf,
    pub content: Content,
}

impl GgufFile {
    /// Open and parse the header; the whole layout is validated ([`check_layout`]) before
    /// candle's reader sees it, which trusts some fields it divides or indexes by.
    pub fn open(path: &Path) -> Result<Self> {
        let (f, size) = untrusted::open_regular(path)?;
        let gerr = |msg: String| Error::Gguf {
            path: path.to_path_buf(),
            msg,
        };
        let mut r = std::io::BufReader::with_capacity(1 << 16, f);
        check_layout(&mut r, size).map_err(gerr)?;
        r.seek(SeekFrom::Start(0)).map_err(|e| Error::io(path, e))?;
        let content = Content::read(&mut r).map_err(|e| gerr(e.to_string()))?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            content,
        })
    }

    pub fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    pub fn architecture(&self) -> Result<String> {
        self.meta_str("general.architecture")
    }

    pub fn meta_str(&self, key: &str) -> Result<String> {
        match self.meta(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(self.err(format!("metadata key '{key}' is not a string"))),
            None => Err(self.err(format!("missing metadata key '{key}'"))),
        }
    }

    pub fn meta_usize(&self, key: &str) -> Result<usize> {
        let v = self
            .meta(key)
            .ok_or_else(|| self.err(format!("missing metadata key '{key}'")))?;
        as_u64(v)
            .map(|x| x as usize)
            .ok_or_else(|| self.err(format!("metadata key '{key}' is not an integer")))
    }

    pub fn meta_f64(&self, key: &str) -> Option<f64> {
        self.meta(key).and_then(as_f64)
    }

    pub(crate) fn err(&self, msg: String) -> Error {
        Error::Gguf {
            path: self.path.clone(),
            msg,
        }
    }

    /// Per-tensor storage types (for reports): name → ggml type name.
    pub fn tensor_types(&self) -> BTreeMap<String, String> {
        self.content
            .tensor_infos
            .iter()
            .map(|(k, v)| (k.clone(), format!("{:?}", v.ggml_dtype)))
            .collect()
    }

    /// LLaMA-family config from `<arch>.*` metadata.
    pub fn llama_config(&self) -> Result<LlamaConfig> {
        let arch = self.architecture()?;
        if !matches!(arch.as_str(), "llama" | "qwen2" | "mistral") {
            return Err(Error::UnsupportedArch {
                path: self.path.clone(),
                arch: escape(&arch),
                supported:
                    "llama, qwen2, mistral (GGUF); llama, qwen2, mistral, bert (HF directories)"
                        .into(),
            });
        }
        let k = |s: &str| format!("{arch}.{s}");
        let hidden = self.meta_usize(&k("embedding_length"))?;
        let n_heads = self.meta_usize(&k("attention.head_count"))?;
        let n_kv = match self.meta(&k("attention.head_count_kv")) {
            None => n_heads,
            Some(_) => self.meta_usize(&k("attention.head_count_kv"))?,
        };
        let vocab = match self.content.tensor_infos.get("token_embd.weight") {
            Some(t) => t.shape.dims().first().copied().unwrap_or(0),
            None => return Err(self.err("missing tensor 'token_embd.weight'".into())),
        };
        let bos_token_id =
            match self.meta("tokenizer.ggml.bos_token_id") {
                None => None,
                Some(v) => Some(as_u64(v).and_then(|x| u32::try_from(x).ok()).ok_or_else(
                    || self.err("tokenizer.ggml.bos_token_id is not a token id".into()),
                )?),
            };
        let head_dim = self
            .meta_usize(&k("attention.key_length"))
            .ok()
            .or_else(|| self.meta_usize(&k("rope.dimension_count")).ok());
        let rope_scaling = match self.meta(&k("rope.scaling.type")) {
            Some(Value::String(t)) if t != "none" => Some(RopeScaling {
                rope_type: Some(t.clone()),
                factor: self.meta_f64(&k("rope.scaling.factor")),
                low_freq_factor: None,
                high_freq_factor: None,
                original_max_position_embeddings: self
                    .meta_usize(&k("rope.scaling.original_context_length"))
                    .ok(),
            }),
            _ => None,
        };
        let eos = self.meta("tokenizer.ggml.eos_token_id").and_then(as_u64);
        let cfg = LlamaConfig {
            model_type: if arch == "mistral" {
                "llama".into()
            } else {
                arch.clone()
            },
            hidden_size: hidden,
            intermediate_size: self.meta_usize(&k("feed_forward_length"))?,
            num_hidden_layers: self.meta_usize(&k("block_count"))?,
            num_attention_heads: n_heads,
            num_key_value_heads: Some(n_kv),
            // checked_div: a zero head count is reported by validate() below.
            head_dim: head_dim.filter(|&d| Some(d) != hidden.checked_div(n_heads)),
            rms_norm_eps: self
                .meta_f64(&k("attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-5),
            rope_theta: self.meta_f64(&k("rope.freq_base")).unwrap_or(10000.0),
            rope_scaling,
            max_position_embeddings: self.meta_usize(&k("context_length")).unwrap_or(4096),
            vocab_size: vocab,
            tie_word_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
            attention_bias: Some(self.content.tensor_infos.contains_key("blk.0.attn_q.bias")),
            mlp_bias: false,
            bos_token_id,
            eos_token_id: eos.map(|e| serde_json::json!(e)),
            hidden_act: Some("silu".into()),
        };
        cfg.validate(&self.path)?;
        Ok(cfg)
    }

    /// Gemma 3 config from `gemma3.*` metadata. What the file does not say takes the values
    /// transformers and llama.cpp assume for gemma3: local RoPE base 10000, every 6th layer
    /// global, query_pre_attn_scalar = head_dim (llama.cpp's rule for all sizes but 27B).
    pub fn gemma3_config(&self) -> Result<crate::gemma3::Gemma3Config> {
        let arch = self.architecture()?;
        if arch != "gemma3" {
            return Err(Error::UnsupportedArch {
                path: self.path.clone(),
                arch: escape(&arch),
                supported: "gemma3".into(),
            });
        }
        let k = |s: &str| format!("gemma3.{s}");
        let hidden = self.meta_usize(&k("embedding_length"))?;
        let n_heads = self.meta_usize(&k("attention.head_count"))?;
        let n_kv = match self.meta(&k("attention.head_count_kv")) {
            None => n_heads,
            Some(_) => self.meta_usize(&k("attention.head_count_kv"))?,
        };
        let head_dim = match self.meta(&k("attention.key_length")) {
            Some(_) => self.meta_usize(&k("attention.key_length"))?,
            None => hidden.checked_div(n_heads).unwrap_or(0),
        };
        let vocab = match self.content.tensor_infos.get("token_embd.weight") {
            Some(t) => t.shape.dims().first().copied().unwrap_or(0),
            None => return Err(self.err("missing tensor 'token_embd.weight'".into())),
        };
        let id = |key: &str| -> Result<Option<u32>> {
            match self.meta(key) {
                None => Ok(None),
                Some(v) => Ok(Some(
                    as_u64(v)
                        .and_then(|x| u32::try_from(x).ok())
                        .ok_or_else(|| self.err(format!("{key} is not a token id")))?,
                )),
            }
        };
        let rope_scaling = match self.meta(&k("rope.scaling.type")) {
            Some(Value::String(t)) if t != "none" => Some(RopeScaling {
                rope_type: Some(t.clone()),
                factor: self.meta_f64(&k("rope.scaling.factor")),
                low_freq_factor: None,
                high_freq_factor: None,
                original_max_position_embeddings: self
                    .meta_usize(&k("rope.scaling.original_context_length"))
                    .ok(),
            }),
            _ => None,
        };
        let cfg = crate::gemma3::Gemma3Config {
            model_type: "gemma3_text".into(),
            hidden_size: hidden,
            intermediate_size: self.meta_usize(&k("feed_forward_length"))?,
            num_hidden_layers: self.meta_usize(&k("block_count"))?,
            num_attention_heads: n_heads,
            num_key_value_heads: Some(n_kv),
            head_dim,
            rms_norm_eps: self
                .meta_f64(&k("attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-6),
            rope_theta: self.meta_f64(&k("rope.freq_base")).unwrap_or(1_000_000.0),
            rope_local_base_freq: 10_000.0,
            rope_scaling,
            max_position_embeddings: self.meta_usize(&k("context_length")).unwrap_or(32768),
            vocab_size: vocab,
            query_pre_attn_scalar: head_dim as f64,
            sliding_window: self
                .meta_usize(&k("attention.sliding_window"))
                .unwrap_or(4096),
            sliding_window_pattern: 6,
            layer_types: None,
            final_logit_softcapping: self.meta_f64(&k("final_logit_softcapping")),
            attn_logit_softcapping: self.meta_f64(&k("attn_logit_softcapping")),
            hidden_activation: "gelu_pytorch_tanh".into(),
            tie_word_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
            bos_token_id: id("tokenizer.ggml.bos_token_id")?,
            eos_token_id: id("tokenizer.ggml.eos_token_id")?.map(|e| serde_json::json!(e)),
        };
        cfg.validate(&self.path)?;
        Ok(cfg)
    }
}

/// The first NaN/infinite number of a tensor's raw data: every value of a float type, or
/// the scale fields of each block of a quantized one (its integer codes cannot be
/// non-finite, so finite scales give finite weights). None when all are finite.
pub(crate) fn nonfinite(t: candle_core::quantized::GgmlDType, data: &[u8]) -> Option<&'static str> {
    types::of(t).first_nonfinite(data)
}

/// A reader that knows its position and how many bytes the file has left, so every length
/// read from the file is checked against what can actually follow.
struct Scan<'a, R> {
    r: &'a mut R,
    pos: u64,
    size: u64,
}

impl<R: Read> Scan<'_, R> {
    fn left(&self) -> u64 {
        self.size.saturating_sub(self.pos)
    }
    fn bytes<const N: usize>(&mut self, what: &str) -> std::result::Result<[u8; N], String> {
        let mut b = [0u8; N];
        self.r
            .read_exact(&mut b)
            .map_err(|_| format!("file ends inside {what} at byte {} (truncated?)", self.pos))?;
        self.pos += N as u64;
        Ok(b)
    }
    fn u32(&mut self, what: &str) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(self.bytes::<4>(what)?))
    }
    fn u64(&mut self, what: &str) -> std::result::Result<u64, String> {
        Ok(u64::from_le_bytes(self.bytes::<8>(what)?))
    }
    fn skip(&mut self, n: u64, what: &str) -> std::result::Result<(), String> {
        if n > self.left() {
            return Err(format!(
                "{what} of {n} bytes at byte {} runs past the end of the {}-byte file",
                self.pos, self.size
            ));
        }
        let got = std::io::copy(&mut self.r.by_ref().take(n), &mut std::io::sink())
            .map_err(|e| format!("reading {what}: {e}"))?;
        if got != n {
            return Err(format!("file ends inside {what} (truncated?)"));
        }
        self.pos += n;
        Ok(())
    }
    /// A string of at most `max` bytes, returned when `keep` (else skipped).
    fn string(
        &mut self,
        what: &str,
        max: u64,
        keep: bool,
    ) -> std::result::Result<Option<Vec<u8>>, String> {
        let n = self.u64(what)?;
        if n > max || n > self.left() {
            return Err(format!(
                "{what} claims {n} bytes at byte {} (limit {}, {} bytes left in the file)",
                self.pos,
                max.min(self.left()),
                self.left()
            ));
        }
        if !keep {
            self.skip(n, what)?;
            return Ok(None);
        }
        let mut v = vec![0u8; n as usize];
        self.r
            .read_exact(&mut v)
            .map_err(|_| format!("file ends inside {what} (truncated?)"))?;
        self.pos += n;
        // candle drops trailing NULs, so "a" and "a\0" are one name to it.
        while v.last() == Some(&0) {
            v.pop();
        }
        Ok(Some(v))
    }
}

/// GGUF value type id → fixed size in bytes (None: string or array).
fn fixed_size(t: u32) -> std::result::Result<Option<u64>, String> {
    Ok(match t {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        8 | 9 => None,
        _ => return Err(format!("unknown metadata value type {t}")),
    })
}

/// Everything about a GGUF file's layout that can be checked without the tensor data, in
/// one place: magic and version (2 or 3), counts and every length against the bytes that are
/// left, metadata keys unique, no nested arrays, `general.alignment` a power of two,
/// tensor names unique, 1–4 dimensions each ≥ 1 with an element count that does not
/// overflow, a known ggml type whose block divides the first dimension, and every tensor's
/// bytes (type size × blocks, in checked arithmetic) aligned, inside the file and
/// overlapping no other tensor. Ceilings: [`untrusted`]'s `MAX_GGUF_*`. Returns the offset
/// of the tensor data.
pub fn check_layout<R: Read>(r: &mut R, size: u64) -> std::result::Result<u64, String> {
    let mut s = Scan { r, pos: 0, size };
    let magic = s.bytes::<4>("the magic")?;
    if &magic != b"GGUF" {
        return Err("not a GGUF file (bad magic)".into());
    }
    let version = s.u32("the version")?;
    if !(2..=3).contains(&version) {
        return Err(format!(
            "GGUF version {version} is not supported (2 or 3; re-convert the model with a current llama.cpp)"
        ));
    }
    let n_tensors = s.u64("the tensor count")?;
    let n_kv = s.u64("the metadata count")?;
    // A metadata entry takes ≥ 13 bytes (key length, type, one byte), a tensor entry ≥ 24.
    if n_kv > untrusted::MAX_GGUF_KV || n_kv.saturating_mul(13) > s.left() {
        return Err(format!(
            "header declares {n_kv} metadata entries; the limit is {} and the {}-byte file can hold at most {}",
            untrusted::MAX_GGUF_KV,
            size,
            s.left() / 13
        ));
    }
    if n_tensors > untrusted::MAX_GGUF_TENSORS || n_tensors.saturating_mul(24) > s.left() {
        return Err(format!(
            "header declares {n_tensors} tensors; the limit is {} and the {}-byte file can hold at most {}",
            untrusted::MAX_GGUF_TENSORS,
            size,
            s.left() / 24
        ));
    }
    let mut keys = HashSet::new();
    let mut alignment = candle_core::quantized::gguf_file::DEFAULT_ALIGNMENT;
    let mut elements = 0u64;
    for i in 0..n_kv {
        let key = s
            .string(&format!("metadata key {i}"), untrusted::MAX_GGUF_NAME, true)?
            .unwrap_or_default();
        let key = String::from_utf8_lossy(&key).into_owned();
        let t = s.u32("a metadata type")?;
        let what = format!("metadata '{}'", escape(&key));
        if !keys.insert(key.clone()) {
            return Err(format!("{what} appears twice"));
        }
        match fixed_size(t).map_err(|e| format!("{what}: {e}"))? {
            Some(n) => {
                let mut v = 0u64;
                for k in 0..n {
                    v |= (s.bytes::<1>(&what)?[0] as u64) << (8 * k);
                }
                if key == "general.alignment" {
                    // Unsigned or non-negative signed integers only (candle's reader falls back
                    // to 32 for other types, llama.cpp refuses them).
                    let negative = matches!(t, 1 | 3 | 5 | 11) && (v >> (8 * n - 1)) & 1 == 1;
                    if !matches!(t, 0..=5 | 10 | 11) || negative {
                        return Err(format!("{what} must be a non-negative integer"));
                    }
                    if v == 0 || !v.is_power_of_two() || v > untrusted::MAX_GGUF_ALIGNMENT {
                        return Err(format!(
                            "{what} is {v}; it must be a power of two from 1 to {}",
                            untrusted::MAX_GGUF_ALIGNMENT
                        ));
                    }
                    // candle reads 64-bit alignments as the default; keep both readers agreeing.
                    if matches!(t, 10 | 11) && v != alignment {
                        return Err(format!(
                            "{what} must be stored as a 32-bit integer (the format's type)"
                        ));
                    }
                    alignment = v;
                }
            }
            None if t == 8 => {
                s.string(&what, u64::MAX, false)?;
            }
            None => {
                let et = s.u32(&what)?;
                let n = s.u64(&what)?;
                elements = elements.saturating_add(n);
                if elements > untrusted::MAX_GGUF_ARRAY_TOTAL {
                    return Err(format!(
                        "{what}: metadata arrays hold more than {} elements in all",
                        untrusted::MAX_GGUF_ARRAY_TOTAL
                    ));
                }
                match fixed_size(et).map_err(|e| format!("{what}: {e}"))? {
                    Some(w) => s.skip(n.saturating_mul(w), &what)?,
                    None if et == 8 => {
                        if n.saturating_mul(8) > s.left() {
                            return Err(format!(
                                "{what}: {n} strings cannot fit in the {} bytes left",
                                s.left()
                            ));
                        }
                        for _ in 0..n {
                            s.string(&what, u64::MAX, false)?;
                        }
                    }
                    None => return Err(format!("{what}: nested arrays are not supported")),
                }
            }
        }
    }
    let mut names = HashSet::new();
    let mut extents: Vec<(u64, u64, String)> = Vec::with_capacity(n_tensors as usize);
    for i in 0..n_tensors {
        let name = s
            .string(&format!("tensor name {i}"), untrusted::MAX_GGUF_NAME, true)?
            .unwrap_or_default();
        let name = String::from_utf8_lossy(&name).into_owned();
        let what = format!("tensor '{}'", escape(&name));
        if !names.insert(name.clone()) {
            return Err(format!("{what} appears twice"));
        }
        let n_dims = s.u32(&what)?;
        if !(1..=4).contains(&n_dims) {
            return Err(format!("{what} has {n_dims} dimensions (1 to 4 allowed)"));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(s.u64(&what)?);
        }
        let type_id = s.u32(&what)?;
        let offset = s.u64(&what)?;
        let Some(ty) = types::by_id(type_id) else {
            return Err(format!("{what} has unknown ggml type {type_id}"));
        };
        let (tname, block, type_size) = (ty.upper_name(), ty.block as u64, ty.bytes as u64);
        if dims.contains(&0) {
            return Err(format!("{what} has a zero dimension {dims:?}"));
        }
        let elems = dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .filter(|&n| n <= i64::MAX as u64)
            .ok_or_else(|| format!("{what}: dimensions {dims:?} overflow the element count"))?;
        // ggml blocks never span rows: the first (fastest) dimension holds whole blocks.
        if dims[0] % block != 0 {
            return Err(format!(
                "{what}: row length {} is not a multiple of the {tname} block of {block}",
                dims[0]
            ));
        }
        let bytes = (elems / block)
            .checked_mul(type_size)
            .ok_or_else(|| format!("{what}: byte size overflows"))?;
        if offset % alignment != 0 {
            return Err(format!(
                "{what}: data offset {offset} is not a multiple of the alignment {alignment}"
            ));
        }
        extents.push((offset, bytes, what));
    }
    let data = s
        .pos
        .div_ceil(alignment)
        .checked_mul(alignment)
        .ok_or("tensor data offset overflows")?;
    extents.sort();
    let mut end_prev = 0u64;
    let mut prev = String::new();
    for (offset, bytes, what) in extents {
        let start = data.checked_add(offset);
        let end = start.and_then(|a| a.checked_add(bytes));
        match (start, end) {
            (Some(_), Some(end)) if end <= size => {}
            _ => {
                return Err(format!(
                    "{what}: {bytes} bytes at data offset {offset} run past the end of the {size}-byte file (truncated?)"
                ))
            }
        }
        if offset < end_prev {
            return Err(format!("{what} overlaps {prev}"));
        }
        end_prev = offset + bytes;
        prev = what;
    }
    Ok(data)
}

/// Inverse of llama.cpp's `permute`: rows grouped [head, 2, hd/2] → HF's [head, hd/2, 2] order.
pub fn unpermute(t: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    let rest: usize = dims[1..].iter().product();
    let hd = rows / n_head;
    t.reshape((n_head, hd / 2, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

/// The forward permutation (HF → llama.cpp), for GGUF export.
pub fn permute(t: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    let rest: usize = dims[1..].iter().product();
    let hd = rows / n_head;
    t.reshape((n_head, 2, hd / 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

/// llama.cpp tensor name → HF name (llama, qwen2, mistral).
pub fn hf_name(gguf: &str) -> Option<String> {
    names::LLAMA.hf_name(gguf)
}

/// HF name → llama.cpp tensor name (inverse of [`hf_name`]).
pub fn gguf_name(hf: &str) -> Option<String> {
    names::LLAMA.gguf_name(hf)
}

pub fn as_u64(v: &Value) -> Option<u64> {
    Some(match v {
        Value::U8(x) => *x as u64,
        Value::U16(x) => *x as u64,
        Value::U32(x) => *x as u64,
        Value::U64(x) => *x,
        Value::I8(x) if *x >= 0 => *x as u64,
        Value::I16(x) if *x >= 0 => *x as u64,
        Value::I32(x) if *x >= 0 => *x as u64,
        Value::I64(x) if *x >= 0 => *x as u64,
        _ => return None,
    })
}

pub fn as_f64(v: &Value) -> Option<f64> {
    Some(match v {
        Value::F32(x) => *x as f64,
        Value::F64(x) => *x,
        other => as_u64(other)? as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for n in [
            "blk.3.attn_q.weight",
            "blk.0.ffn_down.weight",
            "token_embd.weight",
            "output.weight",
            "blk.12.attn_k.bias",
        ] {
            assert_eq!(gguf_name(&hf_name(n).unwrap()).unwrap(), n);
        }
    }

    #[test]
    fn permute_inverts() -> candle_core::Result<()> {
        let t = Tensor::arange(0f32, 8.0 * 3.0, &candle_core::Device::Cpu)?.reshape((8, 3))?;
        let p = permute(&t, 2)?;
        let back = unpermute(&p, 2)?;
        assert_eq!(back.to_vec2::<f32>()?, t.to_vec2::<f32>()?);
        // One head of 4 rows [r0 r1 r2 r3] becomes [r0 r2 r1 r3] (halves interleaved).
        let rows: Vec<f32> = p.narrow(1, 0, 1)?.flatten_all()?.to_vec1()?;
        assert_eq!(&rows[..4], &[0.0, 6.0, 3.0, 9.0]);
        Ok(())
    }
}
