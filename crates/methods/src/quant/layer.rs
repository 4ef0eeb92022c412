//! `QuantLinear`: packed AutoGPTQ-layout weights behind `models::LinearLayer`.
//!
//! At construction the weights are repacked into [`QKernel`] (int8 dot-product kernels, see
//! `kernels.rs`) and the AutoGPTQ qweight is dropped (rebuilt from the kernel's codes when
//! saving). Layers whose groups do not fit blocks of 32 inputs, and every layer when
//! `MPOLM_QMATMUL=legacy`, keep qweight and the former path: the whole layer dequantised to
//! f32 during its own forward, then one dense matmul.

use super::gptq::Quantized;
use super::kernels::QKernel;
use super::pack;
use super::{Error, Result};
use candle_core::{DType, Device, Tensor};
use models::frozen::{self, FrozenWeight};
use models::LinearLayer;
use rayon::prelude::*;
use std::any::Any;
use std::borrow::Cow;
use std::sync::Arc;

/// How QuantLinear multiplies (`MPOLM_QMATMUL`, read once): `auto` (default: int8 kernel up to
/// [`INT8_MAX_ROWS`] activation rows, dequantized tiles + f32 GEMM above), `int8`, `tiles`, or
/// `legacy` (no repacking; the whole layer dequantised per forward, as before the kernels).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QMode {
    Auto,
    Int8,
    Tiles,
    Legacy,
}

pub fn qmode() -> QMode {
    static M: std::sync::OnceLock<QMode> = std::sync::OnceLock::new();
    *M.get_or_init(|| match std::env::var("MPOLM_QMATMUL").ok().as_deref() {
        Some("int8") => QMode::Int8,
        Some("tiles") => QMode::Tiles,
        Some("legacy") => QMode::Legacy,
        _ => QMode::Auto,
    })
}

/// Above this many activation rows the batch path (dequantized tiles + f32 GEMM) wins
/// (crates/methods/examples/bench_qmatmul.rs, BENCHMARKS.md "#8 quantized kernels").
pub const INT8_MAX_ROWS: usize = 8;

/// How a checkpoint's `qzeros` encode each zero point. AutoGPTQ's format (`checkpoint_format`
/// "gptq", v1) stores zero − 1, so a zero of 0 wraps to 2^bits − 1 and reads back as 2^bits (v1's
/// known quirk, which every v1 kernel shares); GPTQModel's "gptq_v2" stores the zero itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ZeroFormat {
    #[default]
    V1,
    V2,
}

impl ZeroFormat {
    /// The `checkpoint_format` value of quantize_config.json / config.json.
    pub fn name(self) -> &'static str {
        match self {
            ZeroFormat::V1 => "gptq",
            ZeroFormat::V2 => "gptq_v2",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "gptq" => Some(ZeroFormat::V1),
            "gptq_v2" => Some(ZeroFormat::V2),
            _ => None,
        }
    }

    /// What is added to a stored value to get the zero point.
    fn offset(self) -> f32 {
        match self {
            ZeroFormat::V1 => 1.0,
            ZeroFormat::V2 => 0.0,
        }
    }
}

#[derive(Debug, Clone)]
pub struct QuantLinear {
    pub bits: u32,
    pub in_f: usize,
    pub out_f: usize,
    /// [in·bits/32, out] words (stored as int32 in checkpoints); empty when `kern` holds the
    /// codes (see [`QuantLinear::qweight`]).
    qweight: Vec<u32>,
    /// [groups, out·bits/32] words holding the zero points as `zero_format` encodes them.
    pub qzeros: Vec<u32>,
    pub zero_format: ZeroFormat,
    /// [groups, out] (f16 values).
    pub scales: Vec<f32>,
    /// [in]
    pub g_idx: Vec<u32>,
    pub bias: Option<Tensor>,
    /// Unpacked zeros [groups, out] as f32, cached for the matmul.
    zeros_f: Vec<f32>,
    /// The repacked weights for the int8 / tiled kernels (None: legacy path).
    kern: Option<Arc<QKernel>>,
}

impl QuantLinear {
    pub fn groups(&self) -> usize {
        self.scales.len() / self.out_f.max(1)
    }

    /// The layer of a quantization result, its zeros encoded as `fmt`: in v1 a zero of 0 takes
    /// AutoGPTQ's wrapped encoding, so the layer computes what the saved v1 file will (v1's
    /// quirk); in v2 every zero is kept.
    pub fn from_quantized_as(
        fmt: ZeroFormat,
        q: &Quantized,
        bits: u32,
        bias: Option<Tensor>,
    ) -> Result<Self> {
        let qweight = pack::pack_rows(&q.q, q.in_f, q.out_f, bits)?;
        let mask = (1u32 << bits) - 1;
        let stored: Vec<u32> = match fmt {
            ZeroFormat::V1 => q.zeros.iter().map(|&z| z.wrapping_sub(1) & mask).collect(),
            ZeroFormat::V2 => q.zeros.iter().map(|&z| z & mask).collect(),
        };
        let qzeros = pack::pack_cols(&stored, q.groups(), q.out_f, bits)?;
        Self::from_packed_as(
            fmt,
            bits,
            q.in_f,
            q.out_f,
            qweight,
            qzeros,
            q.scales.clone(),
            q.g_idx.clone(),
            bias,
        )
    }

    pub fn from_quantized(q: &Quantized, bits: u32, bias: Option<Tensor>) -> Result<Self> {
        Self::from_quantized_as(ZeroFormat::V1, q, bits, bias)
    }

    /// A layer from AutoGPTQ v1 words (`qzeros` holding zero − 1).
    #[allow(clippy::too_many_arguments)]
    pub fn from_packed(
        bits: u32,
        in_f: usize,
        out_f: usize,
        qweight: Vec<u32>,
        qzeros: Vec<u32>,
        scales: Vec<f32>,
        g_idx: Vec<u32>,
        bias: Option<Tensor>,
    ) -> Result<Self> {
        Self::from_packed_as(
            ZeroFormat::V1,
            bits,
            in_f,
            out_f,
            qweight,
            qzeros,
            scales,
            g_idx,
            bias,
        )
    }

    /// A layer from packed words whose `qzeros` are encoded as `fmt` says.
    #[allow(clippy::too_many_arguments)]
    pub fn from_packed_as(
        fmt: ZeroFormat,
        bits: u32,
        in_f: usize,
        out_f: usize,
        qweight: Vec<u32>,
        qzeros: Vec<u32>,
        scales: Vec<f32>,
        g_idx: Vec<u32>,
        bias: Option<Tensor>,
    ) -> Result<Self> {
        pack::check_bits(bits)?;
        let b = bits as usize;
        if (in_f * b) % 32 != 0 || (out_f * b) % 32 != 0 {
            return Err(Error::Msg(format!("{in_f}×{out_f} layer cannot be packed in {bits} bits (in and out · bits must be multiples of 32)")));
        }
        if qweight.len() != in_f * b / 32 * out_f {
            return Err(Error::Msg(format!(
                "qweight has {} words, expected {}×{out_f}",
                qweight.len(),
                in_f * b / 32
            )));
        }
        if scales.is_empty() || scales.len() % out_f != 0 {
            return Err(Error::Msg(format!(
                "scales has {} values, not a multiple of out_features {out_f}",
                scales.len()
            )));
        }
        let groups = scales.len() / out_f;
        if g_idx.len() != in_f || g_idx.iter().any(|&g| g as usize >= groups) {
            return Err(Error::Msg(format!(
                "g_idx must have {in_f} entries below {groups}"
            )));
        }
        let zeros_f: Vec<f32> = pack::unpack_cols(&qzeros, groups, out_f, bits)?
            .into_iter()
            .map(|z| z as f32 + fmt.offset())
            .collect();
        let kern = if qmode() == QMode::Legacy {
            None
        } else {
            QKernel::new(bits, in_f, out_f, &qweight, &scales, &zeros_f, &g_idx).map(Arc::new)
        };
        Ok(QuantLinear {
            bits,
            in_f,
            out_f,
            qweight: if kern.is_some() { Vec::new() } else { qweight },
            qzeros,
            zero_format: fmt,
            scales,
            g_idx,
            bias,
            // The kernel holds its own zeros; only the legacy path reads these.
            zeros_f: if kern.is_some() { Vec::new() } else { zeros_f },
            kern,
        })
    }

    /// The same layer on the legacy path (qweight kept, whole-layer dequantisation per forward):
    /// the reference for A/B comparisons.
    pub fn without_kernel(&self) -> QuantLinear {
        let mut q = self.clone();
        q.qweight = self.qweight().into_owned();
        if self.kern.is_some() {
            q.zeros_f = pack::unpack_cols(&self.qzeros, self.groups(), self.out_f, self.bits)
                .expect("qzeros were validated at construction")
                .into_iter()
                .map(|z| z as f32 + self.zero_format.offset())
                .collect();
        }
        q.kern = None;
        q
    }

    /// `qzeros` encoded as `fmt` (the same zero points). Fails for the zeros `fmt` cannot hold:
    /// 0 in v1 (it would read back as 2^bits) and 2^bits (v1's wrapped 0) in v2.
    pub fn qzeros_as(&self, fmt: ZeroFormat) -> Result<Vec<u32>> {
        if fmt == self.zero_format {
            return Ok(self.qzeros.clone());
        }
        let (groups, mask) = (self.groups(), (1u32 << self.bits) - 1);
        let vals = pack::unpack_cols(&self.qzeros, groups, self.out_f, self.bits)?;
        let conv: Vec<u32> = match fmt {
            ZeroFormat::V1 => vals
                .iter()
                .map(|&z| match z {
                    0 => Err(Error::Msg(format!(
                        "a zero point of 0 has no gptq (v1) encoding (v1 stores zero − 1, and 0 would read back as {}); save as gptq_v2",
                        1u32 << self.bits
                    ))),
                    z => Ok(z - 1),
                })
                .collect::<Result<_>>()?,
            ZeroFormat::V2 => vals
                .iter()
                .map(|&s| match s {
                    s if s == mask => Err(Error::Msg(format!(
                        "a v1 zero point of {} (a wrapped 0) does not fit {} bits of gptq_v2",
                        mask + 1,
                        self.bits
                    ))),
                    s => Ok(s + 1),
                })
                .collect::<Result<_>>()?,
        };
        Ok(pack::pack_cols(&conv, groups, self.out_f, self.bits)?)
    }

    /// The repacked kernel weights, when this layer uses them.
    pub fn kernel(&self) -> Option<&QKernel> {
        self.kern.as_deref()
    }

    /// AutoGPTQ qweight [in·bits/32, out] (rebuilt from the kernel layout when it was dropped).
    pub fn qweight(&self) -> Cow<'_, [u32]> {
        match &self.kern {
            Some(k) => Cow::Owned(
                pack::pack_rows(&k.codes_in_out(), self.in_f, self.out_f, self.bits)
                    .expect("kernel codes fit their bit width"),
            ),
            None => Cow::Borrowed(&self.qweight),
        }
    }

    /// Integer codes [in, out].
    pub fn codes(&self) -> Vec<u32> {
        match &self.kern {
            Some(k) => k.codes_in_out(),
            None => pack::unpack_rows(&self.qweight, self.in_f, self.out_f, self.bits)
                .unwrap_or_default(),
        }
    }

    /// Dequantised Wᵀ [in, out] row-major (the orientation the matmul wants).
    pub fn dequant_t(&self) -> Vec<f32> {
        if let Some(k) = &self.kern {
            return pack::transpose(&k.dequant_rows(), self.out_f, self.in_f);
        }
        let (n_out, bits) = (self.out_f, self.bits as usize);
        let mask = (1u64 << bits) - 1;
        let mut wt = vec![0f32; self.in_f * n_out];
        wt.par_chunks_mut(n_out).enumerate().for_each(|(i, row)| {
            let bit = i * bits;
            let (r, s) = (bit / 32, bit % 32);
            let g = self.g_idx[i] as usize;
            let sc = &self.scales[g * n_out..(g + 1) * n_out];
            let zr = &self.zeros_f[g * n_out..(g + 1) * n_out];
            let w0 = &self.qweight[r * n_out..(r + 1) * n_out];
            if s + bits <= 32 {
                for j in 0..n_out {
                    let q = ((w0[j] >> s) as u64 & mask) as f32;
                    row[j] = sc[j] * (q - zr[j]);
                }
            } else {
                let w1 = &self.qweight[(r + 1) * n_out..(r + 2) * n_out];
                for j in 0..n_out {
                    let v = ((w0[j] as u64) >> s) | ((w1[j] as u64) << (32 - s));
                    row[j] = sc[j] * ((v & mask) as f32 - zr[j]);
                }
            }
        });
        wt
    }

    fn wt_tensor(&self) -> candle_core::Result<Tensor> {
        Tensor::from_vec(self.dequant_t(), (self.in_f, self.out_f), &Device::Cpu)
    }

    /// Storage in bits (as saved): packed codes, f16 scales, packed zeros, int32 g_idx, f16 bias.
    pub fn storage_bits(&self) -> u64 {
        let qw = (self.in_f * self.bits as usize / 32 * self.out_f) as u64;
        (qw + self.qzeros.len() as u64 + self.g_idx.len() as u64) * 32
            + self.scales.len() as u64 * 16
            + self.bias.as_ref().map_or(0, |b| b.elem_count() as u64 * 16)
    }
}

/// y = x·Wᵀ on the kernel layout (int8 for few rows, dequantized layer or tiles for many); the
/// backward gives the input gradient (LoRA over frozen quantized weights).
impl FrozenWeight for QKernel {
    const WHAT: &'static str = "quantized linear";
    const OP: &'static str = "mpolm-qmatmul";
    const OP_T: &'static str = "mpolm-qmatmul-t";
    fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }
    fn x_wt(&self, x: &[f32], m: usize) -> candle_core::Result<Vec<f32>> {
        let mut y = vec![0f32; m * self.n];
        let int8 = match qmode() {
            QMode::Int8 => true,
            QMode::Tiles => false,
            _ => m <= INT8_MAX_ROWS,
        };
        if int8 {
            self.matmul_int8(x, m, &mut y);
        } else {
            self.matmul_batch(x, m, &mut y)?;
        }
        Ok(y)
    }
    fn g_w(&self, g: &[f32], m: usize) -> candle_core::Result<Vec<f32>> {
        let mut gx = vec![0f32; m * self.k];
        self.matmul_t_tiles(g, m, &mut gx)?;
        Ok(gx)
    }
}

impl QuantLinear {
    fn forward_kernel(&self, k: &Arc<QKernel>, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = frozen::matmul(x, k)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

impl LinearLayer for QuantLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if let Some(k) = &self.kern {
            if x.dtype() == DType::F32 && matches!(x.device(), Device::Cpu) {
                return self.forward_kernel(k, x);
            }
        }
        let dims = x.dims().to_vec();
        let lead: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.contiguous()?.reshape((lead, self.in_f))?;
        let y = x2.matmul(&self.wt_tensor()?)?;
        let mut od = dims[..dims.len() - 1].to_vec();
        od.push(self.out_f);
        let y = y.reshape(od)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
    fn in_features(&self) -> usize {
        self.in_f
    }
    fn out_features(&self) -> usize {
        self.out_f
    }
    fn num_params(&self) -> usize {
        self.in_f * self.out_f + self.bias.as_ref().map_or(0, |b| b.elem_count())
    }
    /// What the layer holds in memory: packed words, scales and zeros, and the kernel layout.
    fn storage_bytes(&self) -> usize {
        4 * (self.qweight.len()
            + self.qzeros.len()
            + self.scales.len()
            + self.g_idx.len()
            + self.zeros_f.len())
            + self.kern.as_ref().map_or(0, |k| k.heap_bytes())
            + 4 * self.bias.as_ref().map_or(0, |b| b.elem_count())
    }
    fn weight(&self) -> candle_core::Result<Tensor> {
        if let Some(k) = &self.kern {
            return Tensor::from_vec(k.dequant_rows(), (self.out_f, self.in_f), &Device::Cpu);
        }
        self.wt_tensor()?.t()?.contiguous()
    }
    fn bias(&self) -> Option<Tensor> {
        self.bias.clone()
    }
    fn kind(&self) -> String {
        format!("gptq{}", self.bits)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}
