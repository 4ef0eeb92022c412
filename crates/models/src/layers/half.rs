//! A dense Linear (or embedding) whose weight stays in f16, as checkpoints store it: half the
//! memory of an f32 copy, and decoding, which is memory-bound, reads half the bytes.
//!
//! * Few activation rows (decoding): the row gemv reads the f16 rows directly
//!   ([`kernels::gemv_multi`], F16C conversion in registers).
//! * Many rows (prefill, scoring): tiles of weight rows are converted to f32 into one reused
//!   buffer and multiplied with the f32 GEMM, as the quantized layers do.
//!
//! Values are exactly those of the f32 copy (f16 → f32 is exact), so only the summation order
//! of the gemv can differ from a dense layer. The input gradient is provided (LoRA over a model
//! whose head or embedding is held in f16); the weight itself is frozen.

use crate::frozen::{self, FrozenWeight};
use crate::kernels::{self, GEMV_MAX_ROWS};
use crate::linear::LinearLayer;
use candle_core::{bail, CpuStorage, DType, Device, Result, Storage, Tensor};
use half::f16;
use rayon::prelude::*;
use std::any::Any;
use std::sync::Arc;

/// f32 elements of one converted weight tile (1 MiB: stays in L2 while the GEMM runs).
const TILE_ELEMS: usize = 1 << 18;

#[derive(Debug, Clone)]
pub struct HalfDense {
    /// [out, in], f16, contiguous, on the CPU: the loaded tensor itself, not a copy.
    w: Tensor,
    out_f: usize,
    in_f: usize,
    pub bias: Option<Tensor>,
}

impl HalfDense {
    /// From an [out, in] tensor of any float dtype (rounded to f16 unless it is f16 already).
    pub fn new(weight: &Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (out_f, in_f) = weight.dims2()?;
        let w = weight
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F16)?
            .contiguous()?;
        Ok(HalfDense {
            w,
            out_f,
            in_f,
            bias,
        })
    }

    /// Runs `f` on the f16 elements.
    fn with_data<T>(w: &Tensor, f: impl FnOnce(&[f16]) -> Result<T>) -> Result<T> {
        let (st, l) = w.storage_and_layout();
        match (&*st, l.contiguous_offsets()) {
            (Storage::Cpu(CpuStorage::F16(v)), Some((a, b))) => f(&v[a..b]),
            _ => bail!("f16 linear: weight must be a contiguous f16 CPU tensor"),
        }
    }
}

/// dst[i] = src[i] as f32 (F16C eight at a time), over rayon's threads for large slices.
pub fn f16_to_f32(src: &[f16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len());
    const CHUNK: usize = 1 << 14;
    if src.len() >= 4 * CHUNK {
        dst.par_chunks_mut(CHUNK)
            .zip(src.par_chunks(CHUNK))
            .for_each(|(d, s)| convert(s, d));
    } else {
        convert(src, dst);
    }
}

fn convert(src: &[f16], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c") {
            // SAFETY: features checked; both slices have the same length.
            unsafe { convert_f16c(src, dst) };
            return;
        }
    }
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn convert_f16c(src: &[f16], dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let n8 = src.len() & !7;
    let mut i = 0;
    while i < n8 {
        let h = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
        _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
        i += 8;
    }
    for j in n8..src.len() {
        dst[j] = src[j].to_f32();
    }
}

/// W's rows r0 .. r0 + buf.len()/k as f32 (the tiles of the batched products).
fn fill(w: &[f16], k: usize) -> impl Fn(usize, &mut [f32]) -> Result<()> + '_ {
    move |r0, buf| {
        f16_to_f32(&w[r0 * k..r0 * k + buf.len()], buf);
        Ok(())
    }
}

/// W [n, k] in f16 as a frozen weight: the gemv for few rows, converted tiles for many.
struct F16Weight {
    w: Tensor,
    n: usize,
    k: usize,
}

impl FrozenWeight for F16Weight {
    const WHAT: &'static str = "f16 linear";
    const OP: &'static str = "mpolm-f16-matmul";
    const OP_T: &'static str = "mpolm-f16-matmul-t";
    fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }
    fn x_wt(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        let (n, k) = (self.n, self.k);
        HalfDense::with_data(&self.w, |w| {
            if m <= GEMV_MAX_ROWS {
                let mut y = vec![0f32; m * n];
                kernels::gemv_multi(&mut y, x, k, m, w, k, n, k, false);
                return Ok(y);
            }
            kernels::tiled_x_wt(x, (m, k, n), TILE_ELEMS / k.max(1), fill(w, k))
        })
    }
    fn g_w(&self, g: &[f32], m: usize) -> Result<Vec<f32>> {
        let (n, k) = (self.n, self.k);
        HalfDense::with_data(&self.w, |w| {
            kernels::tiled_g_w(g, (m, k, n), TILE_ELEMS / k.max(1), fill(w, k))
        })
    }
}

impl LinearLayer for HalfDense {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = if x.dtype() == DType::F32 && matches!(x.device(), Device::Cpu) {
            let w = Arc::new(F16Weight {
                w: self.w.clone(),
                n: self.out_f,
                k: self.in_f,
            });
            frozen::matmul(x, &w)?
        } else {
            if x.dims().last() != Some(&self.in_f) {
                bail!(
                    "{}: input {:?} does not end in {} features",
                    F16Weight::WHAT,
                    x.dims(),
                    self.in_f
                );
            }
            crate::kernels::generic_linear(x, &self.weight()?.to_dtype(x.dtype())?, None)?
        };
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
        self.w.elem_count() + self.bias.as_ref().map_or(0, |b| b.elem_count())
    }
    fn storage_bytes(&self) -> usize {
        2 * self.w.elem_count() + 4 * self.bias.as_ref().map_or(0, |b| b.elem_count())
    }
    fn weight(&self) -> Result<Tensor> {
        let mut out = vec![0f32; self.w.elem_count()];
        Self::with_data(&self.w, |w| {
            f16_to_f32(w, &mut out);
            Ok(())
        })?;
        Tensor::from_vec(out, (self.out_f, self.in_f), &Device::Cpu)
    }
    fn bias(&self) -> Option<Tensor> {
        self.bias.clone()
    }
    fn kind(&self) -> String {
        "f16".into()
    }
    /// Rows converted one by one: the whole table is never materialised in f32.
    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let ids = ids.to_dtype(DType::U32)?.to_vec1::<u32>()?;
        let k = self.in_f;
        let mut out = vec![0f32; ids.len() * k];
        Self::with_data(&self.w, |w| {
            for (dst, &id) in out.chunks_exact_mut(k).zip(&ids) {
                let id = id as usize;
                if id >= self.out_f {
                    bail!(
                        "token id {id} is out of range for a table of {} rows",
                        self.out_f
                    );
                }
                convert(&w[id * k..(id + 1) * k], dst);
            }
            Ok(())
        })?;
        Tensor::from_vec(out, (ids.len(), k), &Device::Cpu)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}
