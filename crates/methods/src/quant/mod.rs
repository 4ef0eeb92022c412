//! Quantization: round-to-nearest and GPTQ, packed storage and inference.
//!
//! * [`gptq`] — the per-matrix algorithms (min-max group grid, GPTQ with act-order, damped
//!   inverse-Hessian Cholesky and lazy 128-column block updates).
//! * [`pack`] — AutoGPTQ v1 bit packing (qweight / qzeros).
//! * [`layer::QuantLinear`] — packed weights behind `models::LinearLayer`, multiplied by the
//!   int8 / dequantized-tile kernels of [`kernels`] (or dequantised whole, the legacy path).
//! * [`calib`] — Hessian capture through recording Linear wrappers and the true-sequential
//!   layer-by-layer driver ([`quantize_model`]).
//! * [`io`] — AutoGPTQ-layout checkpoints ([`save_quantized`], [`load_quantized`]).
//! * [`actquant`] — INT8 activations with outlier dimensions kept (LLM.int8-style).
//! * [`pipeline`] — `mpolm quantize` end to end: outliers, quantization, checkpoint, summary.

pub mod actquant;
pub mod calib;
pub mod gguf_export;
pub mod gptq;
pub mod io;
pub mod kernels;
pub mod layer;
pub mod pack;
pub mod pipeline;

pub use calib::{quantize_model, LayerReport, QuantOptions};
pub use io::{is_quantized_dir, load_quantized, save_quantized, QuantizeConfig};
pub use layer::{QuantLinear, ZeroFormat};

use models::Model;
use std::path::Path;

// The crate's error type, under the path quantization code has always used.
pub use crate::error::{Error, Result};

/// Which projections stay in fp16.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum KeepFp16 {
    #[default]
    None,
    /// Module-name suffixes (`q_proj`, `gate_proj`, …).
    Names(Vec<String>),
    /// The N projections with the largest quantization error.
    Crucial(usize),
}

impl KeepFp16 {
    /// `attn`, `ffn`, `q,k,v,o,gate,up,down` (any subset) or `crucial:N`.
    pub fn parse(s: &str) -> Result<Self> {
        let s = s.trim();
        if s.is_empty() || s == "none" {
            return Ok(KeepFp16::None);
        }
        if let Some(n) = s.strip_prefix("crucial:") {
            let n: usize = n.parse().map_err(|_| {
                Error::option(
                    "keep_fp16",
                    format!("`keep_fp16` crucial:N needs a count, got '{s}'"),
                )
            })?;
            return Ok(KeepFp16::Crucial(n));
        }
        let mut v = Vec::new();
        for part in s.split(',') {
            let p = part.trim();
            let names: &[&str] = match p {
                "attn" => &["q_proj", "k_proj", "v_proj", "o_proj"],
                "ffn" | "mlp" => &["gate_proj", "up_proj", "down_proj"],
                "q" | "k" | "v" | "o" | "gate" | "up" | "down" => &[],
                _ => return Err(Error::option("keep_fp16", format!("`keep_fp16`: unknown part '{p}' (use attn, ffn, q,k,v,o,gate,up,down or crucial:N)"))),
            };
            if names.is_empty() {
                v.push(format!("{p}_proj"));
            } else {
                v.extend(names.iter().map(|s| s.to_string()));
            }
        }
        Ok(KeepFp16::Names(v))
    }

    pub fn keeps(&self, name: &str) -> bool {
        match self {
            KeepFp16::Names(v) => v.iter().any(|s| name.ends_with(&format!(".{s}"))),
            _ => false,
        }
    }
}

/// Storage of a model as it would be saved: Σ params × bits (quantized layers: packed codes,
/// f16 scales, packed zeros, int32 g_idx; every other tensor f16), or `dense_bits` for all
/// tensors when nothing is quantized (the f32 baseline).
pub fn total_bits(m: &Model, dense_bits: u64) -> u64 {
    let mut bits = 0u64;
    for (_, l) in m.linears() {
        if let Some(q) = l.inner().as_any().downcast_ref::<QuantLinear>() {
            bits += q.storage_bits();
        } else {
            bits += l.num_params() as u64 * dense_bits;
        }
    }
    for (_, t) in m.other_tensors() {
        bits += t.elem_count() as u64 * dense_bits;
    }
    bits
}

/// Peak resident set size of this process in MiB (VmHWM), 0 where /proc is unavailable.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Total size of the files in a directory (bytes).
pub fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Read a text file (calibration or evaluation data) with an error naming it and its role.
pub fn read_text(path: &Path, what: &str) -> Result<String> {
    std::fs::read_to_string(path)
        .map_err(|e| Error::Msg(format!("{what} file {}: {e}", path.display())))
}
