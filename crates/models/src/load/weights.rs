//! Named f32 tensors from safetensors (single file or sharded) with shape-checked access.
//! This is the only path weights take into an architecture, so every missing or mis-shaped
//! tensor is reported with its file and name.

use crate::untrusted::{self, escape};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Largest safetensors JSON header we accept (the format's own limit).
const MAX_HEADER: u64 = 100_000_000;

#[derive(Debug, Default)]
pub struct Weights {
    pub tensors: HashMap<String, Tensor>,
    pub path: PathBuf,
}

impl Weights {
    pub fn new(tensors: HashMap<String, Tensor>, path: impl Into<PathBuf>) -> Self {
        Weights {
            tensors,
            path: path.into(),
        }
    }

    /// Load every `*.safetensors` of an HF directory (index-driven when sharded), as f32.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.exists() {
            let text = untrusted::read_text(&index, untrusted::MAX_JSON_BYTES)?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::config(&index, format!("invalid JSON: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::config(&index, "missing key 'weight_map'"))?;
            let mut f = Vec::new();
            for (tensor, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    Error::config(
                        &index,
                        format!("weight_map entry '{}' is not a file name", escape(tensor)),
                    )
                })?;
                // Shards are files of this directory: an index must not make us read
                // elsewhere (another model's weights, or /dev/zero).
                if untrusted::confined_join(dir, file).is_none() {
                    return Err(Error::config(
                        &index,
                        format!(
                            "weight_map names '{}', which is outside the model directory",
                            escape(file)
                        ),
                    ));
                }
                f.push(file.to_string());
            }
            f.sort();
            f.dedup();
            f.into_iter().map(|s| dir.join(s)).collect()
        } else {
            let single = dir.join("model.safetensors");
            if single.exists() {
                vec![single]
            } else {
                let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
                    .map_err(|e| Error::io(dir, e))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                    .collect();
                v.sort();
                v
            }
        };
        if files.is_empty() {
            return Err(Error::io(
                dir.join("model.safetensors"),
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no *.safetensors weights in the model directory",
                ),
            ));
        }
        let mut tensors = HashMap::new();
        for f in &files {
            for (name, t) in load_safetensors(f)? {
                if tensors.insert(name.clone(), t).is_some() {
                    return Err(Error::Safetensors {
                        path: f.clone(),
                        msg: format!("tensor '{}' is also in another shard", escape(&name)),
                    });
                }
            }
        }
        Ok(Weights {
            tensors,
            path: files[0].clone(),
        })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The tensor `name`, which must have exactly `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            path: self.path.clone(),
            name: name.to_string(),
        })?;
        // Integer tensors have no place in an architecture's weights (packed formats take
        // theirs out before building one); refuse them here, at load, not at the first matmul.
        if !t.dtype().is_float() {
            return Err(Error::Safetensors {
                path: self.path.clone(),
                msg: format!(
                    "tensor '{name}' has dtype {:?}; model weights must be floating point",
                    t.dtype()
                ),
            });
        }
        if t.dims() != shape {
            return Err(Error::Shape {
                path: self.path.clone(),
                name: name.to_string(),
                expected: shape.to_vec(),
                got: t.dims().to_vec(),
            });
        }
        Ok(t.clone())
    }

    pub fn get_opt(&self, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        if self.contains(name) {
            self.get(name, shape).map(Some)
        } else {
            Ok(None)
        }
    }
}

/// Read one safetensors file to f32 tensors, with the header checked up front so a truncated
/// or corrupt file gives a precise message instead of a panic deep in a parser.
pub fn load_safetensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    load_safetensors_keeping(path, |_, _, _| false)
}

/// [`load_safetensors`], except that float tensors for which `keep(name, shape, dtype)` is true
/// stay in their stored dtype (f16 matrices held as f16 by the layer that takes them).
pub fn load_safetensors_keeping(
    path: &Path,
    keep: impl Fn(&str, &[usize], DType) -> bool,
) -> Result<HashMap<String, Tensor>> {
    let bad = |msg: String| Error::Safetensors {
        path: path.to_path_buf(),
        msg,
    };
    let (mut f, size) = untrusted::open_regular(path)?;
    let mut len = [0u8; 8];
    if size < 8 || f.read_exact(&mut len).is_err() {
        return Err(bad(format!(
            "file is {size} bytes, too short for the 8-byte header length"
        )));
    }
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER {
        return Err(bad(format!("header length {n} exceeds the 100 MB limit")));
    }
    if 8 + n > size {
        return Err(bad(format!(
            "header length {n} runs past the end of the {size}-byte file (truncated?)"
        )));
    }
    let mmap = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io(path, e))?;
    let st = safetensors::SafeTensors::deserialize(&mmap).map_err(|e| bad(e.to_string()))?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let dtype = match view.dtype() {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            safetensors::Dtype::F64 => DType::F64,
            safetensors::Dtype::I64 => DType::I64,
            safetensors::Dtype::U32 => DType::U32,
            safetensors::Dtype::U8 => DType::U8,
            safetensors::Dtype::I32 => DType::I32,
            other => {
                return Err(bad(format!(
                    "tensor '{}' has unsupported dtype {other:?}",
                    escape(&name)
                )))
            }
        };
        let t = Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &Device::Cpu)
            .map_err(|e| bad(format!("tensor '{}': {e}", escape(&name))))?;
        let t = if dtype.is_float() && dtype != DType::F32 && !keep(&name, view.shape(), dtype) {
            t.to_dtype(DType::F32)?
        } else {
            t
        };
        out.insert(name, t);
    }
    Ok(out)
}
