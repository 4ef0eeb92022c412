//! `QuantLinear`: packed AutoGPTQ-layout weights behind `models::LinearLayer`, with a
//! dequantise-on-the-fly matmul (one layer's f32 weight exists only during its own forward).

use super::gptq::Quantized;
use super::pack;
use super::{Error, Result};
use candle_core::{Device, Tensor};
use models::LinearLayer;
use rayon::prelude::*;
use std::any::Any;

#[derive(Debug, Clone)]
pub struct QuantLinear {
    pub bits: u32,
    pub in_f: usize,
    pub out_f: usize,
    /// [in·bits/32, out] words (stored as int32 in checkpoints).
    pub qweight: Vec<u32>,
    /// [groups, out·bits/32] words holding zero − 1.
    pub qzeros: Vec<u32>,
    /// [groups, out] (f16 values).
    pub scales: Vec<f32>,
    /// [in]
    pub g_idx: Vec<u32>,
    pub bias: Option<Tensor>,
    /// Unpacked zeros [groups, out] as f32, cached for the matmul.
    zeros_f: Vec<f32>,
}

impl QuantLinear {
    pub fn groups(&self) -> usize {
        self.scales.len() / self.out_f.max(1)
    }

    pub fn from_quantized(q: &Quantized, bits: u32, bias: Option<Tensor>) -> Result<Self> {
        let qweight = pack::pack_rows(&q.q, q.in_f, q.out_f, bits)?;
        let zm1: Vec<u32> = q
            .zeros
            .iter()
            .map(|&z| z.wrapping_sub(1) & ((1u32 << bits) - 1))
            .collect();
        let qzeros = pack::pack_cols(&zm1, q.groups(), q.out_f, bits)?;
        Self::from_packed(
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
            .map(|z| z as f32 + 1.0)
            .collect();
        Ok(QuantLinear {
            bits,
            in_f,
            out_f,
            qweight,
            qzeros,
            scales,
            g_idx,
            bias,
            zeros_f,
        })
    }

    /// Integer codes [in, out].
    pub fn codes(&self) -> Vec<u32> {
        pack::unpack_rows(&self.qweight, self.in_f, self.out_f, self.bits).unwrap_or_default()
    }

    /// Dequantised Wᵀ [in, out] row-major (the orientation the matmul wants).
    pub fn dequant_t(&self) -> Vec<f32> {
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

    /// Storage in bits: packed codes, f16 scales, packed zeros, int32 g_idx, f16 bias.
    pub fn storage_bits(&self) -> u64 {
        (self.qweight.len() as u64 + self.qzeros.len() as u64 + self.g_idx.len() as u64) * 32
            + self.scales.len() as u64 * 16
            + self.bias.as_ref().map_or(0, |b| b.elem_count() as u64 * 16)
    }
}

impl LinearLayer for QuantLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
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
    fn weight(&self) -> candle_core::Result<Tensor> {
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
