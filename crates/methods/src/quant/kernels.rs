//! Int8 dot-product matmul for GPTQ layers (issues #8 item 3, #6 item 3).
//!
//! At load the AutoGPTQ tensors are repacked once into [`QKernel`]: per output row, the input
//! columns reordered so that every group is contiguous (act-order g_idx included; the activation
//! columns are gathered with the same permutation), cut into blocks of 32, the codes of a row
//! stored as bytes (8 bits, offset by −128 so they are int8), nibbles (4 and 3 bits) or bit
//! pairs (2 bits), `cpb` blocks sharing one 32-byte chunk (block `s` of a chunk in bits
//! `s·8/cpb …`), plus f32 scale and zero per (row, group). Nothing f32 of the size of the
//! weight is kept; the packed AutoGPTQ qweight is dropped (rebuilt on demand for saving).
//!
//! * Decode (few rows): each activation row is quantized per block of 32 to two int8 digits,
//!   v = 256·hi + lo with hi = round(x/dx) (Q8_0-style symmetric, dx = amax/127) and lo the
//!   rounded residual in units of dx/256, so x̂ = (dx/256)·v carries ~15 bits. One int8 digit
//!   (what llama.cpp's Q8 blocks keep) cost SmolLM2-135M 0.9% perplexity at 4 bits, nearly all
//!   of it in down_proj, whose SiLU·up inputs are heavy-tailed; the second digit costs one more
//!   maddubs/madd per block and makes the activation error negligible. Per-group sums
//!   Σ (dx/256)·Σv apply the zero points afterwards:
//!   y_j = Σ_b d_j,g(b)·(dx_b/256)·Σ_t q_t·v_t − Σ_g d_j,g·z_j,g·XS_g. The integer dots run on
//!   AVX2 `maddubs`/`madd` (u8×i8; for 8 bits the abs/sign trick keeps every i16 pair sum below
//!   32767; hi's pair sums are scaled by 256 in the i32 `madd`), rayon over output rows. The
//!   result is exactly the f32 product of the dequantized weight with x̂, up to f32 rounding.
//! * Batch (many rows): a tile of weight rows is dequantized to f32 and multiplied with the f32
//!   GEMM of `models::kernels` (exact activations; only one tile per thread exists at a time).
//! * The scalar kernel follows the AVX2 lane structure (lane l of a block holds the integer sum of
//!   columns 4l…4l+3, 8 f32 lane accumulators, the same horizontal-sum tree), so it gives
//!   bit-identical results; it is also the fallback on CPUs without AVX2.

use rayon::prelude::*;

/// `models::simd!` with this module's own condition (which honours MPOLM_QKERNEL=scalar).
macro_rules! simd {
    ($body:expr) => {
        models::simd!(if avx2(); $body)
    };
}

/// Activation block: the unit of int8 quantization and of one weight scale lookup.
pub const BLOCK: usize = 32;

/// A QuantLinear's weights in the kernel layout (see the module docs).
#[derive(Debug)]
pub struct QKernel {
    pub bits: u32,
    /// Input features.
    pub k: usize,
    /// Output features.
    pub n: usize,
    /// Blocks per 32-byte chunk: 1 (8 bits), 2 (3 and 4 bits), 4 (2 bits).
    cpb: usize,
    /// Chunks per row.
    nch: usize,
    /// Real blocks per row (k / 32); blocks nb..nch·cpb are zero padding.
    nb: usize,
    /// Nonempty groups, in ascending g_idx order.
    ng: usize,
    /// [n, nch·32]
    codes: Vec<u8>,
    /// [n, ng] scale and zero point (for 8 bits, zero − 128 to match the int8 codes).
    d: Vec<f32>,
    z: Vec<f32>,
    /// Group (0..ng) of each block, [nch·cpb] (padding blocks: 0).
    gblk: Vec<u32>,
    /// Block range [start, end) of each group.
    grange: Vec<(usize, usize)>,
    /// Kernel column p holds input column perm[p]; None when the order is the identity.
    perm: Option<Vec<u32>>,
}

impl QKernel {
    /// Bytes this layout holds in memory.
    pub fn heap_bytes(&self) -> usize {
        self.codes.len()
            + 4 * (self.d.len() + self.z.len() + self.gblk.len())
            + std::mem::size_of::<(usize, usize)>() * self.grange.len()
            + self.perm.as_ref().map_or(0, |p| 4 * p.len())
    }

    /// Repack; `code(i, j)` is the integer code of input i, output j; `scales`/`zeros` are
    /// [groups, n] (zeros as the true zero point, AutoGPTQ's stored value + 1). None when the
    /// layout does not fit blocks of 32 (a group whose size is not a multiple of 32): such
    /// layers keep the dequantize path.
    pub fn new(
        bits: u32,
        k: usize,
        n: usize,
        qweight: &[u32],
        scales: &[f32],
        zeros: &[f32],
        g_idx: &[u32],
    ) -> Option<QKernel> {
        if k == 0 || n == 0 || k % BLOCK != 0 || !matches!(bits, 2 | 3 | 4 | 8) {
            return None;
        }
        let groups = scales.len() / n;
        if groups == 0 || zeros.len() != scales.len() || g_idx.len() != k {
            return None;
        }
        let mut count = vec![0usize; groups];
        for &g in g_idx {
            *count.get_mut(g as usize)? += 1;
        }
        if count.iter().any(|&c| c % BLOCK != 0) {
            return None;
        }
        // Stable sort of the columns by group: contiguous groups, original order inside each.
        let mut perm: Vec<u32> = (0..k as u32).collect();
        perm.sort_by_key(|&i| g_idx[i as usize]);
        let identity = perm.iter().enumerate().all(|(p, &i)| p == i as usize);
        let gid: Vec<usize> = (0..groups).filter(|&g| count[g] > 0).collect();
        let ng = gid.len();
        let cpb = match bits {
            8 => 1,
            2 => 4,
            _ => 2,
        };
        let nb = k / BLOCK;
        let nch = nb.div_ceil(cpb);
        let mut gblk = vec![0u32; nch * cpb];
        let mut grange = Vec::with_capacity(ng);
        let mut b0 = 0;
        for (c, &g) in gid.iter().enumerate() {
            let nbg = count[g] / BLOCK;
            gblk[b0..b0 + nbg].fill(c as u32);
            grange.push((b0, b0 + nbg));
            b0 += nbg;
        }
        let mut pos = vec![0usize; k]; // input column → kernel column
        for (p, &i) in perm.iter().enumerate() {
            pos[i as usize] = p;
        }
        let rb = nch * BLOCK; // bytes per row
        let sub_bits = 8 / cpb;
        let off: u32 = if bits == 8 { 128 } else { 0 };
        let mut codes = vec![0u8; n * rb];
        // Tiles of output rows: qweight rows are read contiguously over j, the tile's bytes
        // are written per row.
        const TJ: usize = 64;
        codes
            .par_chunks_mut(TJ * rb)
            .enumerate()
            .for_each(|(t, out)| {
                let j0 = t * TJ;
                let tj = out.len() / rb;
                let b = bits as usize;
                let mask = (1u64 << b) - 1;
                for i in 0..k {
                    let bit = i * b;
                    let (r, s) = (bit / 32, bit % 32);
                    let p = pos[i];
                    let (blk, tpos) = (p / BLOCK, p % BLOCK);
                    let (ch, sub) = (blk / cpb, blk % cpb);
                    let byte = ch * BLOCK + tpos;
                    let w0 = &qweight[r * n + j0..r * n + j0 + tj];
                    let w1 = if s + b > 32 {
                        Some(&qweight[(r + 1) * n + j0..(r + 1) * n + j0 + tj])
                    } else {
                        None
                    };
                    for jj in 0..tj {
                        let mut v = (w0[jj] as u64) >> s;
                        if let Some(w1) = w1 {
                            v |= (w1[jj] as u64) << (32 - s);
                        }
                        let q = ((v & mask) as u32).wrapping_sub(off) as u8;
                        out[jj * rb + byte] |= q << (sub * sub_bits);
                    }
                }
            });
        let mut d = vec![0f32; n * ng];
        let mut z = vec![0f32; n * ng];
        for j in 0..n {
            for (c, &g) in gid.iter().enumerate() {
                d[j * ng + c] = scales[g * n + j];
                z[j * ng + c] = zeros[g * n + j] - off as f32;
            }
        }
        Some(QKernel {
            bits,
            k,
            n,
            cpb,
            nch,
            nb,
            ng,
            codes,
            d,
            z,
            gblk,
            grange,
            perm: (!identity).then_some(perm),
        })
    }

    /// Bytes held (codes, scales, zeros, tables).
    pub fn bytes(&self) -> usize {
        self.codes.len()
            + 4 * (self.d.len() + self.z.len() + self.gblk.len())
            + self.perm.as_ref().map_or(0, |p| 4 * p.len())
    }

    /// Integer code of kernel column p in output row j (8 bits: still offset by −128).
    #[inline]
    fn raw(&self, j: usize, p: usize) -> u8 {
        let (blk, t) = (p / BLOCK, p % BLOCK);
        let (ch, sub) = (blk / self.cpb, blk % self.cpb);
        let sb = 8 / self.cpb;
        let v = self.codes[j * self.nch * BLOCK + ch * BLOCK + t] >> (sub * sb);
        if sb == 8 {
            v
        } else {
            v & ((1u8 << sb) - 1)
        }
    }

    /// Codes [k, n] in the original input order (what AutoGPTQ's qweight packs).
    pub fn codes_in_out(&self) -> Vec<u32> {
        let off: u32 = if self.bits == 8 { 128 } else { 0 };
        let mut out = vec![0u32; self.k * self.n];
        for p in 0..self.k {
            let i = self.col(p);
            for j in 0..self.n {
                out[i * self.n + j] = (self.raw(j, p) as u32).wrapping_add(off) & 0xff;
            }
        }
        out
    }

    #[inline]
    fn col(&self, p: usize) -> usize {
        self.perm.as_ref().map_or(p, |v| v[p] as usize)
    }

    /// Dequantized row j in kernel column order: d·(q − z), the same f32 operations as the
    /// AutoGPTQ-layout dequantization (so the values are bit-identical).
    pub fn dequant_row_perm(&self, j: usize, out: &mut [f32]) {
        let ng = self.ng;
        let rb = self.nch * BLOCK;
        let row = &self.codes[j * rb..(j + 1) * rb];
        let sb = 8 / self.cpb;
        let mask: u8 = if sb == 8 { 0xff } else { (1u8 << sb) - 1 };
        // The batch path dequantizes every weight once per forward: vectorised 8-wide.
        simd!({
            for b in 0..self.nb {
                let g = self.gblk[b] as usize;
                let (dd, zz) = (self.d[j * ng + g], self.z[j * ng + g]);
                let (ch, sub) = (b / self.cpb, b % self.cpb);
                let src: &[u8; BLOCK] = row[ch * BLOCK..ch * BLOCK + BLOCK].try_into().unwrap();
                let dst: &mut [f32; BLOCK] =
                    (&mut out[b * BLOCK..b * BLOCK + BLOCK]).try_into().unwrap();
                if sb == 8 {
                    for t in 0..BLOCK {
                        dst[t] = dd * ((src[t] as i8) as f32 - zz);
                    }
                } else {
                    let sh = (sub * sb) as u32;
                    for t in 0..BLOCK {
                        dst[t] = dd * (((src[t] >> sh) & mask) as f32 - zz);
                    }
                }
            }
        })
    }

    /// The dequantized weight [n, k] in the original input order.
    pub fn dequant_rows(&self) -> Vec<f32> {
        let k = self.k;
        let mut w = vec![0f32; self.n * k];
        w.par_chunks_mut(k).enumerate().for_each(|(j, row)| {
            let mut tmp = vec![0f32; k];
            self.dequant_row_perm(j, &mut tmp);
            for (p, &v) in tmp.iter().enumerate() {
                row[self.col(p)] = v;
            }
        });
        w
    }

    /// The activations the int8 kernel multiplies, dx·(256·hi + lo), [m, k] in the original column order.
    pub fn dequant_act(&self, a: &QAct) -> Vec<f32> {
        let kp = a.dequant(self.k);
        let mut out = vec![0f32; a.m * self.k];
        for r in 0..a.m {
            for p in 0..self.k {
                out[r * self.k + self.col(p)] = kp[r * self.k + p];
            }
        }
        out
    }

    /// Whether input columns are reordered (act-order g_idx).
    pub fn permuted(&self) -> bool {
        self.perm.is_some()
    }

    /// x [m, k] (original column order) → [m, k] in kernel column order.
    fn permute_rows(&self, x: &[f32], m: usize) -> Option<Vec<f32>> {
        let perm = self.perm.as_ref()?;
        let k = self.k;
        let mut xp = vec![0f32; m * k];
        for r in 0..m {
            let (src, dst) = (&x[r * k..(r + 1) * k], &mut xp[r * k..(r + 1) * k]);
            for (d, &i) in dst.iter_mut().zip(perm) {
                *d = src[i as usize];
            }
        }
        Some(xp)
    }

    /// Quantize m activation rows (original column order) to int8 blocks.
    pub fn quantize_act(&self, x: &[f32], m: usize) -> QAct {
        let k = self.k;
        assert_eq!(x.len(), m * k);
        let xp = self.permute_rows(x, m);
        let xs: &[f32] = xp.as_deref().unwrap_or(x);
        let nbp = self.nch * self.cpb;
        let mut a = QAct {
            m,
            nbp,
            xq: vec![0i8; m * nbp * BLOCK],
            xl: vec![0i8; m * nbp * BLOCK],
            dx: vec![0f32; m * nbp],
            gsum: vec![0f32; m * self.ng],
        };
        let ng = self.ng;
        for r in 0..m {
            let xr = &xs[r * k..(r + 1) * k];
            let xq = &mut a.xq[r * nbp * BLOCK..(r + 1) * nbp * BLOCK];
            let xl = &mut a.xl[r * nbp * BLOCK..(r + 1) * nbp * BLOCK];
            let dx = &mut a.dx[r * nbp..(r + 1) * nbp];
            let mut isum = vec![0i32; self.nb];
            simd!({
                for b in 0..self.nb {
                    let src = &xr[b * BLOCK..(b + 1) * BLOCK];
                    let amax = src.iter().fold(0f32, |m, v| m.max(v.abs()));
                    // t = x in units of dx/256; hi = its top digit, lo the remainder.
                    let id = if amax > 0.0 {
                        127.0 * 256.0 / amax
                    } else {
                        0.0
                    };
                    let dh = &mut xq[b * BLOCK..(b + 1) * BLOCK];
                    let dl = &mut xl[b * BLOCK..(b + 1) * BLOCK];
                    let mut s = 0i32;
                    for t in 0..BLOCK {
                        let v = src[t] * id;
                        let hi = (v * (1.0 / 256.0)).round_ties_even().clamp(-127.0, 127.0);
                        let lo = (v - 256.0 * hi).round_ties_even().clamp(-127.0, 127.0);
                        dh[t] = hi as i8;
                        dl[t] = lo as i8;
                        s += 256 * hi as i32 + lo as i32;
                    }
                    dx[b] = amax / (127.0 * 256.0);
                    isum[b] = s;
                }
            });
            let gs = &mut a.gsum[r * ng..(r + 1) * ng];
            for (g, &(b0, b1)) in self.grange.iter().enumerate() {
                let mut s = 0f32;
                for b in b0..b1 {
                    s += dx[b] * isum[b] as f32;
                }
                gs[g] = s;
            }
        }
        a
    }

    /// y [m, n] = dequant(x̂) · Wᵀ with the int8 kernel (AVX2 when available).
    pub fn matmul_int8(&self, x: &[f32], m: usize, y: &mut [f32]) {
        let a = self.quantize_act(x, m);
        self.matmul_q(&a, y, avx2());
    }

    /// The int8 product on quantized activations; `simd = false` forces the scalar kernel.
    pub fn matmul_q(&self, a: &QAct, y: &mut [f32], simd: bool) {
        let (m, n) = (a.m, self.n);
        assert_eq!(y.len(), m * n);
        // Several chunks per thread so a slow (shared) core does not hold the rest back.
        let nt = rayon::current_num_threads().max(1);
        let chunk = if n * self.k * m < 1 << 15 {
            n
        } else {
            n.div_ceil(nt * 4).max(16)
        };
        let mut yt = vec![0f32; n * m]; // [n, m]: each chunk of output rows is contiguous
        yt.par_chunks_mut(chunk * m)
            .enumerate()
            .for_each(|(c, yc)| {
                let j0 = c * chunk;
                let mut buf = [0f32; 4];
                for (jj, yj) in yc.chunks_exact_mut(m).enumerate() {
                    let j = j0 + jj;
                    let mut r = 0;
                    while r < m {
                        let rr = (m - r).min(4);
                        self.dot(j, a, r, rr, &mut buf, simd);
                        yj[r..r + rr].copy_from_slice(&buf[..rr]);
                        r += rr;
                    }
                }
            });
        if m == 1 {
            y.copy_from_slice(&yt);
        } else {
            for j in 0..n {
                for r in 0..m {
                    y[r * n + j] = yt[j * m + r];
                }
            }
        }
    }

    /// Output row j against activation rows r0..r0+rr (rr ≤ 4) into out[..rr].
    fn dot(&self, j: usize, a: &QAct, r0: usize, rr: usize, out: &mut [f32; 4], simd: bool) {
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: `simd` is only true when AVX2 was detected; all offsets stay inside the
            // row's chunk bytes and the activation rows (sizes fixed by new/quantize_act).
            unsafe {
                match (rr, self.cpb) {
                    (1, 1) => self.dot_avx2::<1, 1>(j, a, r0, out),
                    (2, 1) => self.dot_avx2::<2, 1>(j, a, r0, out),
                    (3, 1) => self.dot_avx2::<3, 1>(j, a, r0, out),
                    (4, 1) => self.dot_avx2::<4, 1>(j, a, r0, out),
                    (1, 2) => self.dot_avx2::<1, 2>(j, a, r0, out),
                    (2, 2) => self.dot_avx2::<2, 2>(j, a, r0, out),
                    (3, 2) => self.dot_avx2::<3, 2>(j, a, r0, out),
                    (4, 2) => self.dot_avx2::<4, 2>(j, a, r0, out),
                    (1, _) => self.dot_avx2::<1, 4>(j, a, r0, out),
                    (2, _) => self.dot_avx2::<2, 4>(j, a, r0, out),
                    (3, _) => self.dot_avx2::<3, 4>(j, a, r0, out),
                    _ => self.dot_avx2::<4, 4>(j, a, r0, out),
                }
            }
            return;
        }
        let _ = simd;
        for (r, o) in out.iter_mut().enumerate().take(rr) {
            *o = self.dot_scalar(j, a, r0 + r);
        }
    }

    /// Σ_g d·z·XS_g: the zero-point part of output j for activation row r (same order in
    /// every kernel).
    #[inline]
    fn zero_term(&self, j: usize, a: &QAct, r: usize) -> f32 {
        let ng = self.ng;
        let (d, z) = (&self.d[j * ng..(j + 1) * ng], &self.z[j * ng..(j + 1) * ng]);
        let gs = &a.gsum[r * ng..(r + 1) * ng];
        let mut s = 0f32;
        for g in 0..ng {
            s += (d[g] * z[g]) * gs[g];
        }
        s
    }

    /// Scalar kernel with the AVX2 lane structure (bit-identical results).
    pub fn dot_scalar(&self, j: usize, a: &QAct, r: usize) -> f32 {
        let rb = self.nch * BLOCK;
        let row = &self.codes[j * rb..(j + 1) * rb];
        let sb = 8 / self.cpb;
        let ng = self.ng;
        let nbp = a.nbp;
        let xq = &a.xq[r * nbp * BLOCK..(r + 1) * nbp * BLOCK];
        let xl = &a.xl[r * nbp * BLOCK..(r + 1) * nbp * BLOCK];
        let dx = &a.dx[r * nbp..(r + 1) * nbp];
        let mut acc = [0f32; 8];
        for b in 0..nbp {
            let (ch, sub) = (b / self.cpb, b % self.cpb);
            let src = &row[ch * BLOCK..ch * BLOCK + BLOCK];
            let xb = &xq[b * BLOCK..(b + 1) * BLOCK];
            let lb = &xl[b * BLOCK..(b + 1) * BLOCK];
            let ddx = self.d[j * ng + self.gblk[b] as usize] * dx[b];
            for (l, al) in acc.iter_mut().enumerate() {
                let mut s = 0i32;
                for t in 4 * l..4 * l + 4 {
                    let q = if sb == 8 {
                        (src[t] as i8) as i32
                    } else {
                        ((src[t] >> (sub * sb)) & ((1u8 << sb) - 1)) as i32
                    };
                    s += q * (256 * xb[t] as i32 + lb[t] as i32);
                }
                *al += ddx * s as f32;
            }
        }
        let t = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
        t - self.zero_term(j, a, r)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_avx2<const R: usize, const CPB: usize>(
        &self,
        j: usize,
        a: &QAct,
        r0: usize,
        out: &mut [f32; 4],
    ) {
        use std::arch::x86_64::*;
        let rb = self.nch * BLOCK;
        let row = self.codes.as_ptr().add(j * rb);
        let dj = self.d.as_ptr().add(j * self.ng);
        let nbp = a.nbp;
        let gblk = self.gblk.as_ptr();
        let mut xq = [std::ptr::null::<i8>(); R];
        let mut xl = [std::ptr::null::<i8>(); R];
        let mut dx = [std::ptr::null::<f32>(); R];
        for r in 0..R {
            xq[r] = a.xq.as_ptr().add((r0 + r) * nbp * BLOCK);
            xl[r] = a.xl.as_ptr().add((r0 + r) * nbp * BLOCK);
            dx[r] = a.dx.as_ptr().add((r0 + r) * nbp);
        }
        let mut acc = [_mm256_setzero_ps(); R];
        let ones = _mm256_set1_epi16(1);
        let s256 = _mm256_set1_epi16(256);
        let mask = _mm256_set1_epi8(if CPB == 2 { 0x0f } else { 0x03 });
        for ch in 0..self.nch {
            let v = _mm256_loadu_si256(row.add(ch * BLOCK) as *const __m256i);
            for sub in 0..CPB {
                let b = ch * CPB + sub;
                let d = *dj.add(*gblk.add(b) as usize);
                if CPB == 1 {
                    // Signed codes: |w| as the unsigned operand, x carrying w's sign.
                    let aw = _mm256_sign_epi8(v, v);
                    for r in 0..R {
                        let x = _mm256_loadu_si256(xq[r].add(b * BLOCK) as *const __m256i);
                        let l = _mm256_loadu_si256(xl[r].add(b * BLOCK) as *const __m256i);
                        let ph = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(x, v));
                        let pl = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(l, v));
                        let p = _mm256_add_epi32(
                            _mm256_madd_epi16(ph, s256),
                            _mm256_madd_epi16(pl, ones),
                        );
                        let s =
                            _mm256_mul_ps(_mm256_set1_ps(d * *dx[r].add(b)), _mm256_cvtepi32_ps(p));
                        acc[r] = _mm256_add_ps(acc[r], s);
                    }
                } else {
                    // Block `sub` of the chunk sits in bits sub·(8/CPB)…; CPB and sub are
                    // compile-time after unrolling, so this folds to one shift.
                    let w = match (CPB, sub) {
                        (_, 0) => v,
                        (2, _) | (4, 2) => _mm256_srli_epi16::<4>(v),
                        (4, 1) => _mm256_srli_epi16::<2>(v),
                        _ => _mm256_srli_epi16::<6>(v),
                    };
                    let w = _mm256_and_si256(w, mask);
                    for r in 0..R {
                        let x = _mm256_loadu_si256(xq[r].add(b * BLOCK) as *const __m256i);
                        let l = _mm256_loadu_si256(xl[r].add(b * BLOCK) as *const __m256i);
                        let p = _mm256_add_epi32(
                            _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), s256),
                            _mm256_madd_epi16(_mm256_maddubs_epi16(w, l), ones),
                        );
                        let s =
                            _mm256_mul_ps(_mm256_set1_ps(d * *dx[r].add(b)), _mm256_cvtepi32_ps(p));
                        acc[r] = _mm256_add_ps(acc[r], s);
                    }
                }
            }
        }
        for r in 0..R {
            out[r] = hsum(acc[r]) - self.zero_term(j, a, r0 + r);
        }
    }

    /// y [m, n] = x · Wᵀ with f32 activations for a batch: the whole layer dequantized into one
    /// transient f32 buffer and one GEMM when that buffer is at most `WHOLE_LAYER_ELEMS`,
    /// otherwise [`Self::matmul_tiles`].
    pub fn matmul_batch(&self, x: &[f32], m: usize, y: &mut [f32]) -> candle_core::Result<()> {
        if self.n * self.k <= WHOLE_LAYER_ELEMS {
            self.matmul_dequantized(x, m, y)
        } else {
            self.matmul_tiles(x, m, y)
        }
    }

    /// y [m, n] = x · Wᵀ through a transient f32 copy of the whole layer and one GEMM (faer's,
    /// threaded inside). Against [`Self::matmul_tiles`] this packs x once instead of once per
    /// 64-row tile (15% of a GPTQ prefill went to the `gemm` crate's packing) and runs the
    /// full-size GEMM; the dequantization is the same O(n·k).
    pub fn matmul_dequantized(
        &self,
        x: &[f32],
        m: usize,
        y: &mut [f32],
    ) -> candle_core::Result<()> {
        use models::kernels::{gemm_into, Backend, View};
        let (k, n) = (self.k, self.n);
        assert_eq!(y.len(), m * n);
        let xp = self.permute_rows(x, m);
        let xs: &[f32] = xp.as_deref().unwrap_or(x);
        let mut w = vec![0f32; n * k];
        w.par_chunks_mut(k.max(1))
            .enumerate()
            .for_each(|(j, row)| self.dequant_row_perm(j, row));
        let a = View {
            data: xs,
            rows: m,
            cols: k,
            rs: k,
            cs: 1,
        };
        // Wᵀ without a copy: element (i, j) = w[j·k + i].
        let b = View {
            data: &w,
            rows: k,
            cols: n,
            rs: 1,
            cs: k,
        };
        gemm_into(y, a, b, false, Backend::Auto)
    }

    /// y [m, n] = x · Wᵀ with f32 activations: tiles of weight rows dequantized to f32 and
    /// multiplied with the dense GEMM (one tile per worker alive at a time), for layers too
    /// large to dequantize whole.
    pub fn matmul_tiles(&self, x: &[f32], m: usize, y: &mut [f32]) -> candle_core::Result<()> {
        use models::kernels::{gemm_into, Backend, View};
        let (k, n) = (self.k, self.n);
        assert_eq!(y.len(), m * n);
        let xp = self.permute_rows(x, m);
        let xs: &[f32] = xp.as_deref().unwrap_or(x);
        let xt = View {
            data: xs,
            rows: m,
            cols: k,
            rs: k,
            cs: 1,
        }
        .t();
        let tn = TILE_ROWS.min(n);
        let mut yt = vec![0f32; n * m]; // [n, m]
        yt.par_chunks_mut(tn * m).enumerate().try_for_each_init(
            Vec::new,
            |wbuf: &mut Vec<f32>, (t, yc)| {
                let j0 = t * tn;
                let rows = yc.len() / m;
                wbuf.resize(rows * k, 0.0);
                for jj in 0..rows {
                    self.dequant_row_perm(j0 + jj, &mut wbuf[jj * k..(jj + 1) * k]);
                }
                let w = View {
                    data: wbuf,
                    rows,
                    cols: k,
                    rs: k,
                    cs: 1,
                };
                gemm_into(yc, w, xt, false, Backend::Gemm)
            },
        )?;
        transpose_into(&yt, n, m, y);
        Ok(())
    }

    /// gx [m, k] = g [m, n] · W (the input gradient), tile by tile over weight rows.
    pub fn matmul_t_tiles(&self, g: &[f32], m: usize, gx: &mut [f32]) -> candle_core::Result<()> {
        let (k, n) = (self.k, self.n);
        assert_eq!(g.len(), m * n);
        assert_eq!(gx.len(), m * k);
        let gp = models::kernels::tiled_g_w(g, (m, k, n), TILE_ROWS, |j0, w| {
            w.par_chunks_mut(k)
                .enumerate()
                .for_each(|(jj, w)| self.dequant_row_perm(j0 + jj, w));
            Ok(())
        })?;
        match &self.perm {
            None => gx.copy_from_slice(&gp),
            Some(perm) => {
                for r in 0..m {
                    for (p, &i) in perm.iter().enumerate() {
                        gx[r * k + i as usize] = gp[r * k + p];
                    }
                }
            }
        }
        Ok(())
    }
}

/// Weight rows per dequantized tile in the batch path (64 rows × 1536 f32 = 384 KiB, about
/// the per-core L2 of this machine).
const TILE_ROWS: usize = 64;

/// Largest layer the batch path dequantizes whole: 2^23 weights, a 32 MiB transient buffer
/// (every projection of a 0.5B model; a vocab-sized head takes the tiles).
const WHOLE_LAYER_ELEMS: usize = 1 << 23;

fn transpose_into(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    if cols == 1 || rows == 1 {
        dst.copy_from_slice(src);
        return;
    }
    for i in 0..rows {
        for j in 0..cols {
            dst[j * rows + i] = src[i * cols + j];
        }
    }
}

/// Activation rows quantized for [`QKernel`]: int8 blocks of 32 in kernel column order
/// (padding blocks zero) as two digits hi, lo (x̂ = dx·(256·hi + lo)), the per-block unit dx
/// (amax/(127·256)), and per-group Σ dx·Σ(256·hi + lo).
#[derive(Debug, Clone)]
pub struct QAct {
    pub m: usize,
    /// Blocks per row, padding included.
    pub nbp: usize,
    pub xq: Vec<i8>,
    pub xl: Vec<i8>,
    pub dx: Vec<f32>,
    pub gsum: Vec<f32>,
}

impl QAct {
    /// The dequantized activations dx·(256·hi + lo), [m, k'] in kernel column order (k' = real blocks·32).
    pub fn dequant(&self, k: usize) -> Vec<f32> {
        let mut out = vec![0f32; self.m * k];
        for r in 0..self.m {
            for p in 0..k {
                let e = r * self.nbp * BLOCK + p;
                let v = 256 * self.xq[e] as i32 + self.xl[e] as i32;
                out[r * k + p] = self.dx[r * self.nbp + p / BLOCK] * v as f32;
            }
        }
        out
    }
}

#[cfg(target_arch = "x86_64")]
use models::simd::hsum256 as hsum;

/// Whether the AVX2 kernel runs here (`MPOLM_QKERNEL=scalar` forces the portable one).
pub fn avx2() -> bool {
    static F: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *F.get_or_init(|| {
        if std::env::var("MPOLM_QKERNEL").is_ok_and(|v| v == "scalar") {
            return false;
        }
        #[cfg(target_arch = "x86_64")]
        {
            is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}
