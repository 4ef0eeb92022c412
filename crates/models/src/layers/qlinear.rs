//! A Linear whose weight stays in its GGUF block format (Q4_0 … Q8_0, Q2_K … Q6_K): the model
//! then holds the file's bytes, not an f32 copy (`--gguf-weights quantized`).
//!
//! Two paths, chosen per call by the number of activation rows m:
//! * m small (decode): the activations are rounded to Q8 blocks and dotted with the weight
//!   blocks in int8 — [`crate::qdot`] (AVX2) for Q4_0/Q4_1/Q5_0/Q8_0, candle's `QMatMul` for
//!   the rest. Memory-bound, so reading 4–8× fewer bytes than f32 is the whole point.
//! * m large (prefill, eval windows): tiles of weight rows are dequantized to f32 (in parallel)
//!   into one reused buffer and multiplied with the project's f32 GEMM ([`crate::kernels`]).
//!   Dequantizing costs O(n·k) once per call while the GEMM costs O(m·n·k), and candle's
//!   int8 path is much slower than f32 GEMM at large m for most types on this CPU (measured
//!   per type: see [`QLinear::prefers_int8`]).
//!
//! The activations of the int8 path are rounded to Q8_0/Q8_K (as llama.cpp does), so the
//! two paths differ by that rounding, not by the weights: the tiled path is the exact product
//! with the dequantized weights.

use crate::kernels;
use crate::linear::LinearLayer;
use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8_0, GgmlType,
};
use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{bail, CpuStorage, Device, Module, Result, Storage, Tensor};
use rayon::prelude::*;
use std::any::Any;
use std::borrow::Cow;
use std::sync::Arc;

/// Block types a [`QLinear`] can hold (the ones llama.cpp writes for weight matrices).
pub const SUPPORTED: &str = "Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K";

/// Which product a forward call runs (tests and benchmarks force one; models use `Auto`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QPath {
    /// Int8 for few rows, tiles for many ([`QLinear::prefers_int8`]).
    Auto,
    /// Int8 dot products: [`crate::qdot`] where it has the type, else candle's QMatMul.
    Int8,
    /// candle's QMatMul always.
    Candle,
    /// Dequantized row tiles + f32 GEMM.
    Tiled,
}

/// f32 elements of one dequantized weight tile: 256 Ki floats (1 MiB) stays in L2 while the
/// GEMM streams the activations past it.
const TILE_ELEMS: usize = 1 << 18;

pub struct QLinear {
    q: Arc<QTensor>,
    mm: QMatMul,
    bias: Option<Tensor>,
    out_f: usize,
    in_f: usize,
    path: QPath,
}

impl std::fmt::Debug for QLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "QLinear[{}x{} {:?}, bias {}]",
            self.out_f,
            self.in_f,
            self.q.dtype(),
            self.bias.is_some()
        )
    }
}

/// GGUF-style name of a block type ("Q4_K"), as llama.cpp and the `gguf` package print it.
pub fn type_name(t: GgmlDType) -> String {
    crate::gguf::types::of(t).upper_name()
}

pub fn is_supported(t: GgmlDType) -> bool {
    crate::gguf::types::of(t).linear
}

impl QLinear {
    /// `q` is the weight [out, in] in HF row order; `bias` [out] in f32.
    pub fn new(q: QTensor, bias: Option<Tensor>) -> Result<Self> {
        let (out_f, in_f) = q.shape().dims2()?;
        let t = q.dtype();
        if !is_supported(t) {
            bail!(
                "GGUF type {} cannot back a quantized linear layer (supported: {SUPPORTED}); \
                 load with `gguf_weights` f32",
                type_name(t)
            );
        }
        if !in_f.is_multiple_of(t.block_size()) {
            bail!(
                "quantized weight {out_f}x{in_f}: {in_f} columns are not a multiple of the {} block size {}",
                type_name(t),
                t.block_size()
            );
        }
        if let Some(b) = &bias {
            if b.dims() != [out_f] {
                bail!(
                    "quantized linear bias has shape {:?}, want [{out_f}]",
                    b.dims()
                );
            }
        }
        let q = Arc::new(q);
        Ok(QLinear {
            mm: QMatMul::from_arc(q.clone())?,
            q,
            bias,
            out_f,
            in_f,
            path: QPath::Auto,
        })
    }

    pub fn with_path(mut self, path: QPath) -> Self {
        self.path = path;
        self
    }

    pub fn qtensor(&self) -> &QTensor {
        &self.q
    }

    /// Bytes of the stored weight (blocks) plus the f32 bias.
    pub fn storage_bytes(&self) -> usize {
        self.q.storage_size_in_bytes() + self.bias.as_ref().map_or(0, |b| 4 * b.elem_count())
    }

    /// Whether m activation rows take the int8 path rather than dequantized tiles + f32 GEMM.
    /// Decode (m = 1) always does: it reads the fewest bytes. From m = 4 on, the tiles were
    /// faster for every type at the smollm2 shapes on this 2-core AVX2 machine (BENCHMARKS.md,
    /// #6: `cargo test --release -p mpolm-models --test qlinear -- --ignored time_paths`).
    pub fn prefers_int8(_t: GgmlDType, m: usize) -> bool {
        m < 4
    }

    fn int8(&self, x: &Tensor) -> Result<Tensor> {
        let (m, k) = x.dims2()?;
        let x = x.contiguous()?;
        let (st, lay) = x.storage_and_layout();
        let xs: &[f32] = match &*st {
            Storage::Cpu(CpuStorage::F32(v)) => &v[lay.start_offset()..lay.start_offset() + m * k],
            _ => bail!("quantized linear: input must be f32 on the CPU"),
        };
        let mut y = vec![0f32; m * self.out_f];
        crate::qdot::matmul(self.q.dtype(), &self.q.data()?, self.out_f, k, xs, &mut y)?;
        drop(st);
        Tensor::from_vec(y, (m, self.out_f), &Device::Cpu)
    }

    /// x [m, k] (contiguous f32) · Wᵀ by dequantized row tiles and the f32 GEMM.
    fn tiled(&self, x: &Tensor) -> Result<Tensor> {
        let (m, k) = x.dims2()?;
        let n = self.out_f;
        let x = x.contiguous()?;
        let (st, lay) = x.storage_and_layout();
        let xs: &[f32] = match &*st {
            Storage::Cpu(CpuStorage::F32(v)) => &v[lay.start_offset()..lay.start_offset() + m * k],
            _ => bail!("quantized linear: input must be f32 on the CPU"),
        };
        let data = self.q.data()?;
        let t = self.q.dtype();
        let row_bytes = k / t.block_size() * t.type_size();
        let threads = candle_core::utils::get_num_threads().max(1);
        let out = kernels::tiled_x_wt(xs, (m, k, n), TILE_ELEMS / k, |r0, w| {
            let rt = w.len() / k;
            let bytes = &data[r0 * row_bytes..(r0 + rt) * row_bytes];
            // Rows per dequantization job: enough jobs for every thread, whole rows each.
            let per = rt.div_ceil(threads).max(1);
            w.par_chunks_mut(per * k)
                .zip(bytes.par_chunks(per * row_bytes))
                .try_for_each(|(dst, src)| dequantize_rows(t, src, dst))
        })?;
        drop(st);
        Tensor::from_vec(out, (m, n), &Device::Cpu)
    }
}

/// Dequantize whole rows: `src` holds blocks of one type, `dst` their f32 values.
pub fn dequantize_rows(t: GgmlDType, src: &[u8], dst: &mut [f32]) -> Result<()> {
    fn go<T: GgmlType>(src: &[u8], dst: &mut [f32]) -> Result<()> {
        let sz = std::mem::size_of::<T>();
        if !src.len().is_multiple_of(sz)
            || dst.len() != src.len() / sz * T::BLCK_SIZE
            || !(src.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>())
        {
            bail!(
                "dequantize_rows: {} bytes do not hold whole aligned {:?} blocks for {} values",
                src.len(),
                T::DTYPE,
                dst.len()
            );
        }
        // SAFETY: the blocks are plain-old-data structs (integers and f16), the length and
        // alignment were checked above, and the bytes come from a block slice of that type.
        let blocks =
            unsafe { std::slice::from_raw_parts(src.as_ptr() as *const T, src.len() / sz) };
        T::to_float(blocks, dst);
        Ok(())
    }
    use GgmlDType::*;
    match t {
        Q4_0 => go::<BlockQ4_0>(src, dst),
        Q4_1 => go::<BlockQ4_1>(src, dst),
        Q5_0 => go::<BlockQ5_0>(src, dst),
        Q5_1 => go::<BlockQ5_1>(src, dst),
        Q8_0 => go::<BlockQ8_0>(src, dst),
        Q2K => go::<BlockQ2K>(src, dst),
        Q3K => go::<BlockQ3K>(src, dst),
        Q4K => go::<BlockQ4K>(src, dst),
        Q5K => go::<BlockQ5K>(src, dst),
        Q6K => go::<BlockQ6K>(src, dst),
        other => bail!("dequantize_rows: unsupported type {}", type_name(other)),
    }
}

/// Reorder the rows of a quantized [rows, k] tensor: row i of the result is row `src_row(i)`
/// of `q`. Every block lies within one row, so this moves bytes and never requantizes.
pub fn reorder_rows(q: &QTensor, src_row: impl Fn(usize) -> usize) -> Result<QTensor> {
    let (rows, k) = q.shape().dims2()?;
    let t = q.dtype();
    let rb = k / t.block_size() * t.type_size();
    let data = q.data()?;
    if data.len() != rows * rb {
        bail!("reorder_rows: {} bytes for {rows} rows of {rb}", data.len());
    }
    let mut out = Vec::with_capacity(data.len());
    for i in 0..rows {
        let s = src_row(i);
        out.extend_from_slice(&data[s * rb..(s + 1) * rb]);
    }
    let st = QStorage::from_data(Cow::Owned(out), &Device::Cpu, t)?;
    QTensor::new(st, (rows, k))
}

/// [`crate::gguf::unpermute`] on the rows of a quantized q/k projection (llama.cpp's
/// interleaved-RoPE order back to HF order), by moving whole rows.
pub fn unpermute_rows(q: &QTensor, n_head: usize) -> Result<QTensor> {
    let rows = q.shape().dims2()?.0;
    if n_head == 0 || !rows.is_multiple_of(n_head) || !(rows / n_head).is_multiple_of(2) {
        bail!("unpermute_rows: {rows} rows do not split into {n_head} heads of even size");
    }
    let hd = rows / n_head;
    // Same index map as `unpermute`: reshape (head, hd/2, 2) then swap the last two axes, so
    // output (h, a, b) with a < 2, b < hd/2 reads input (h, b, a).
    reorder_rows(q, |i| {
        let (h, r) = (i / hd, i % hd);
        let (a, b) = (r / (hd / 2), r % (hd / 2));
        h * hd + b * 2 + a
    })
}

impl LinearLayer for QLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let k = *dims.last().unwrap_or(&0);
        if k != self.in_f {
            bail!(
                "quantized linear: input has {k} features, the layer takes {}",
                self.in_f
            );
        }
        let m = x.elem_count() / k.max(1);
        let x2 = x.reshape((m, k))?;
        let t = self.q.dtype();
        let path = match self.path {
            QPath::Auto if Self::prefers_int8(t, m) => QPath::Int8,
            QPath::Auto => QPath::Tiled,
            p => p,
        };
        let y = match path {
            QPath::Int8 if crate::qdot::supports(t) => self.int8(&x2)?,
            QPath::Tiled => self.tiled(&x2)?,
            _ => self.mm.forward(&x2.contiguous()?)?,
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut od = dims;
        *od.last_mut().unwrap() = self.out_f;
        y.reshape(od)
    }
    fn in_features(&self) -> usize {
        self.in_f
    }
    fn out_features(&self) -> usize {
        self.out_f
    }
    fn num_params(&self) -> usize {
        self.out_f * self.in_f + self.bias.as_ref().map_or(0, |b| b.elem_count())
    }
    fn storage_bytes(&self) -> usize {
        QLinear::storage_bytes(self)
    }
    fn weight(&self) -> Result<Tensor> {
        self.q.dequantize(&Device::Cpu)
    }
    fn bias(&self) -> Option<Tensor> {
        self.bias.clone()
    }
    fn kind(&self) -> String {
        format!("gguf-{}", type_name(self.q.dtype()).to_lowercase())
    }
    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        self.q.embedding(ids)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}
