//! Round-to-nearest and GPTQ (Frantar et al. 2023) on one weight matrix W [out, in].
//!
//! The grid is GPTQ's per-output-row min-max quantizer over input groups (asymmetric by default,
//! `sym` puts the zero at 2^(bits−1)); scales are rounded to f16 before use so what is stored is
//! exactly what was optimised. AutoGPTQ's v1 format stores zero − 1 in `bits` bits, so an
//! asymmetric zero of 0 (a group with no negative weight) is raised to 1 to stay representable.

use super::{Error, Result};
use rayon::prelude::*;

#[derive(Debug, Clone, Copy)]
pub struct Grid {
    pub bits: u32,
    /// 0 = one group over all inputs.
    pub group_size: usize,
    pub sym: bool,
}

/// A quantized matrix, still unpacked.
#[derive(Debug, Clone)]
pub struct Quantized {
    pub in_f: usize,
    pub out_f: usize,
    /// Integer codes [in, out] (AutoGPTQ orientation).
    pub q: Vec<u32>,
    /// [groups, out], f16-exact.
    pub scales: Vec<f32>,
    /// True zero points [groups, out] (1 ..= 2^bits − 1 … 2^bits).
    pub zeros: Vec<u32>,
    /// Group of every input column [in].
    pub g_idx: Vec<u32>,
    /// GPTQ's loss Σ (w − q)² / [H⁻¹]_ii² / 2 (RTN: Σ (w − q)²).
    pub loss: f64,
}

impl Quantized {
    pub fn groups(&self) -> usize {
        self.scales.len() / self.out_f.max(1)
    }
    /// Dequantised W [out, in].
    pub fn dequant(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.in_f * self.out_f];
        for i in 0..self.in_f {
            let g = self.g_idx[i] as usize;
            for j in 0..self.out_f {
                let s = self.scales[g * self.out_f + j];
                let z = self.zeros[g * self.out_f + j] as f32;
                w[j * self.in_f + i] = s * (self.q[i * self.out_f + j] as f32 - z);
            }
        }
        w
    }
}

pub fn f16_round(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}

/// Scale and zero of one output row over a set of values (GPTQ's Quantizer.find_params).
fn find_params(vals: impl Iterator<Item = f32>, g: &Grid) -> (f32, f32) {
    let maxq = ((1u32 << g.bits) - 1) as f32;
    let (mut xmin, mut xmax) = (0f32, 0f32);
    for v in vals {
        xmin = xmin.min(v);
        xmax = xmax.max(v);
    }
    if g.sym {
        xmax = xmax.max(-xmin);
        if xmin < 0.0 {
            xmin = -xmax;
        }
    }
    if xmin == 0.0 && xmax == 0.0 {
        xmin = -1.0;
        xmax = 1.0;
    }
    let mut scale = f16_round((xmax - xmin) / maxq);
    if scale == 0.0 {
        scale = f16_round(f32::MIN_POSITIVE.max(6.1e-5));
    }
    let zero = if g.sym {
        (maxq + 1.0) / 2.0
    } else {
        (-xmin / scale).round().clamp(1.0, maxq)
    };
    (scale, zero)
}

#[inline]
fn quant1(x: f32, scale: f32, zero: f32, maxq: f32) -> (u32, f32) {
    let q = ((x / scale).round() + zero).clamp(0.0, maxq);
    (q as u32, scale * (q - zero))
}

fn check(w: &[f32], out_f: usize, in_f: usize, g: &Grid) -> Result<usize> {
    super::pack::check_bits(g.bits)?;
    if w.len() != out_f * in_f {
        return Err(Error::Msg(format!(
            "weight has {} values, expected {out_f}×{in_f}",
            w.len()
        )));
    }
    let gs = if g.group_size == 0 {
        in_f
    } else {
        g.group_size
    };
    if in_f % gs != 0 {
        return Err(Error::Msg(format!(
            "group size {gs} does not divide in_features {in_f}"
        )));
    }
    Ok(gs)
}

/// Round-to-nearest with the same grid.
pub fn rtn(w: &[f32], out_f: usize, in_f: usize, g: &Grid) -> Result<Quantized> {
    let gs = check(w, out_f, in_f, g)?;
    let groups = in_f / gs;
    let maxq = ((1u32 << g.bits) - 1) as f32;
    let mut scales = vec![0f32; groups * out_f];
    let mut zeros = vec![0u32; groups * out_f];
    let mut q = vec![0u32; in_f * out_f];
    let mut loss = 0f64;
    for j in 0..out_f {
        let row = &w[j * in_f..(j + 1) * in_f];
        for gi in 0..groups {
            let (s, z) = find_params(row[gi * gs..(gi + 1) * gs].iter().copied(), g);
            scales[gi * out_f + j] = s;
            zeros[gi * out_f + j] = z as u32;
            for i in gi * gs..(gi + 1) * gs {
                let (qi, d) = quant1(row[i], s, z, maxq);
                q[i * out_f + j] = qi;
                loss += ((row[i] - d) as f64).powi(2);
            }
        }
    }
    Ok(Quantized {
        in_f,
        out_f,
        q,
        scales,
        zeros,
        g_idx: (0..in_f).map(|i| (i / gs) as u32).collect(),
        loss,
    })
}

/// What GPTQ needs from a Hessian, computed once and shared by every layer reading the same
/// input (q/k/v, gate/up): the column order and the upper Cholesky factor of the damped inverse.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub n: usize,
    /// perm[k] = original column at position k.
    pub perm: Vec<usize>,
    /// Columns whose Hessian diagonal is 0 (never activated): their weights are zeroed.
    pub dead: Vec<bool>,
    /// Upper-triangular U with H⁻¹ = UᵀU, in permuted order, [n, n] row-major.
    pub hinv: Vec<f32>,
}

/// H [n, n] (= 2/N Σ x xᵀ), damping `damp` × mean diagonal, optional act-order.
pub fn prepare(h: &[f64], n: usize, damp: f64, act_order: bool) -> Result<Prepared> {
    if h.len() != n * n {
        return Err(Error::Msg(format!(
            "Hessian has {} entries, expected {n}²",
            h.len()
        )));
    }
    let mut h = h.to_vec();
    let mut dead = vec![false; n];
    for i in 0..n {
        if h[i * n + i] == 0.0 {
            dead[i] = true;
            h[i * n + i] = 1.0;
        }
    }
    let mut perm: Vec<usize> = (0..n).collect();
    if act_order {
        perm.sort_by(|&a, &b| {
            h[b * n + b]
                .partial_cmp(&h[a * n + a])
                .unwrap_or(std::cmp::Ordering::Equal)
        });
    }
    let mut hp = vec![0f64; n * n];
    for a in 0..n {
        for b in 0..n {
            hp[a * n + b] = h[perm[a] * n + perm[b]];
        }
    }
    let mean_diag = (0..n).map(|i| hp[i * n + i]).sum::<f64>() / n as f64;
    for i in 0..n {
        hp[i * n + i] += damp * mean_diag;
    }
    let hinv = inverse_upper_factor(&hp, n)?;
    Ok(Prepared {
        n,
        perm,
        dead,
        hinv,
    })
}

/// Upper U with H⁻¹ = UᵀU from one Cholesky and one triangular inverse (GPTQ computes
/// chol → cholesky_inverse → chol, three n³ steps). With J the reversal permutation, let
/// J H J = L Lᵀ; then H = V Vᵀ with V = J L J upper, so H⁻¹ = V⁻ᵀ V⁻¹ and U = V⁻¹ = J L⁻¹ J,
/// upper with a positive diagonal: the unique upper Cholesky factor of H⁻¹.
fn inverse_upper_factor(h: &[f64], n: usize) -> Result<Vec<f32>> {
    use faer::{Mat, MatRef, Side};
    let hv = MatRef::from_row_major_slice(h, n, n);
    let llt = hv.reverse_rows_and_cols().llt(Side::Lower).map_err(|_| {
        Error::option(
            "damp",
            "Hessian is not positive definite even after damping; raise `damp`",
        )
    })?;
    let mut li = Mat::<f64>::zeros(n, n);
    faer::linalg::triangular_inverse::invert_lower_triangular(
        li.as_mut(),
        llt.L(),
        faer::get_global_parallelism(),
    );
    let u = li.as_ref().reverse_rows_and_cols();
    let mut out = vec![0f32; n * n];
    for a in 0..n {
        for b in a..n {
            let v = u[(a, b)];
            if !v.is_finite() {
                return Err(Error::option(
                    "damp",
                    "inverse Hessian is not finite; raise `damp`",
                ));
            }
            out[a * n + b] = v as f32;
        }
    }
    Ok(out)
}

/// GPTQ with lazy block updates of `block` columns.
pub fn gptq(
    w: &[f32],
    out_f: usize,
    in_f: usize,
    g: &Grid,
    p: &Prepared,
    block: usize,
) -> Result<Quantized> {
    let gs = check(w, out_f, in_f, g)?;
    if p.n != in_f {
        return Err(Error::Msg(format!(
            "Hessian is {}×{0} but the layer has {in_f} inputs",
            p.n
        )));
    }
    let n = in_f;
    let groups = in_f / gs;
    let block = block.max(1);
    // Permuted working copy W [out, n].
    let mut wp = vec![0f32; out_f * n];
    for j in 0..out_f {
        for k in 0..n {
            let c = p.perm[k];
            wp[j * n + k] = if p.dead[c] { 0.0 } else { w[j * in_f + c] };
        }
    }
    let mut qp = vec![0u32; out_f * n];
    // Row-major [out, groups] while sweeping; transposed to AutoGPTQ's [groups, out] below.
    let mut srow = vec![0f32; out_f * groups];
    let mut zrow = vec![0u32; out_f * groups];
    // Every output row is quantized independently given H⁻¹, so rows are split into chunks
    // that each run the whole blocked sweep; the lazy update of a chunk is one sequential
    // GEMM, and rayon spreads the chunks over the threads.
    let threads = rayon::current_num_threads().max(1);
    let rows = out_f.div_ceil(4 * threads).clamp(1, 64);
    let hinv = faer::MatRef::from_row_major_slice(&p.hinv, n, n);
    let loss: f64 = wp
        .par_chunks_mut(rows * n)
        .zip(qp.par_chunks_mut(rows * n))
        .zip(srow.par_chunks_mut(rows * groups))
        .zip(zrow.par_chunks_mut(rows * groups))
        .map(|(((wc, qc), sc), zc)| sweep_rows(wc, qc, sc, zc, n, gs, g, &p.hinv, hinv, block))
        .sum();
    let mut scales = vec![0f32; groups * out_f];
    let mut zeros = vec![0u32; groups * out_f];
    for j in 0..out_f {
        for gi in 0..groups {
            scales[gi * out_f + j] = srow[j * groups + gi];
            zeros[gi * out_f + j] = zrow[j * groups + gi];
        }
    }
    // Back to the original column order, AutoGPTQ orientation [in, out].
    let mut q = vec![0u32; in_f * out_f];
    let mut g_idx = vec![0u32; in_f];
    for k in 0..n {
        let c = p.perm[k];
        g_idx[c] = (k / gs) as u32;
        for j in 0..out_f {
            q[c * out_f + j] = qp[j * n + k];
        }
    }
    Ok(Quantized {
        in_f,
        out_f,
        q,
        scales,
        zeros,
        g_idx,
        loss,
    })
}

/// GPTQ's blocked column sweep over a chunk of rows `w` [r, n] (permuted order): quantize
/// column i, spread its error over the rest of the block at once, and over the columns after
/// the block lazily as E·H⁻¹[block, after] (a GEMM). Returns the chunk's loss.
#[allow(clippy::too_many_arguments)]
fn sweep_rows(
    w: &mut [f32],
    q: &mut [u32],
    sc: &mut [f32],
    zc: &mut [u32],
    n: usize,
    gs: usize,
    g: &Grid,
    hinv: &[f32],
    hv: faer::MatRef<'_, f32>,
    block: usize,
) -> f64 {
    use faer::{Accum, MatMut, MatRef, Par};
    let r = w.len() / n;
    let groups = n / gs;
    let maxq = ((1u32 << g.bits) - 1) as f32;
    let mut cur_s = vec![0f32; r];
    let mut cur_z = vec![0f32; r];
    if g.group_size == 0 {
        for j in 0..r {
            let (s, z) = find_params(w[j * n..(j + 1) * n].iter().copied(), g);
            (cur_s[j], cur_z[j]) = (s, z);
            (sc[j], zc[j]) = (s, z as u32);
        }
    }
    let mut err = vec![0f32; r * block];
    let mut loss = 0f64;
    let mut i1 = 0;
    while i1 < n {
        let i2 = (i1 + block).min(n);
        let cnt = i2 - i1;
        for j in 0..r {
            let wr = &mut w[j * n..(j + 1) * n];
            let qr = &mut q[j * n..(j + 1) * n];
            let er = &mut err[j * cnt..(j + 1) * cnt];
            for i in i1..i2 {
                if g.group_size != 0 && i % gs == 0 {
                    let gi = i / gs;
                    let (s, z) = find_params(wr[i..(i + gs).min(n)].iter().copied(), g);
                    (cur_s[j], cur_z[j]) = (s, z);
                    (sc[j * groups + gi], zc[j * groups + gi]) = (s, z as u32);
                }
                let d = hinv[i * n + i];
                let x = wr[i];
                let (qi, dq) = quant1(x, cur_s[j], cur_z[j], maxq);
                qr[i] = qi;
                let e = (x - dq) / d;
                er[i - i1] = e;
                for (wv, h) in wr[i..i2].iter_mut().zip(&hinv[i * n + i..i * n + i2]) {
                    *wv -= e * h;
                }
                loss += ((x - dq) as f64).powi(2) / (d as f64).powi(2) / 2.0;
            }
        }
        if i2 < n {
            let dst = MatMut::from_row_major_slice_mut(w, r, n).submatrix_mut(0, i2, r, n - i2);
            let e = MatRef::from_row_major_slice(&err[..r * cnt], r, cnt);
            faer::linalg::matmul::matmul(
                dst,
                Accum::Add,
                e,
                hv.submatrix(i1, i2, cnt, n - i2),
                -1.0f32,
                Par::Seq,
            );
        }
        i1 = i2;
    }
    loss
}

/// Accumulator of 2/N Σ x xᵀ over calibration tokens.
#[derive(Debug)]
pub struct Hessian {
    pub n: usize,
    pub sum: Vec<f64>,
    pub count: usize,
}

impl Hessian {
    pub fn new(n: usize) -> Self {
        Hessian {
            n,
            sum: vec![0f64; n * n],
            count: 0,
        }
    }
    /// Add XᵀX (already computed, [n, n] f32) of `tokens` rows.
    pub fn add_xtx(&mut self, xtx: &[f32], tokens: usize) {
        for (s, v) in self.sum.iter_mut().zip(xtx) {
            *s += *v as f64;
        }
        self.count += tokens;
    }
    /// Add XᵀX of row-major activations X [tokens, n]: a rank-k update of the lower triangle
    /// only (half the flops of a full product; `finish` mirrors it).
    pub fn add_rows(&mut self, x: &[f32], tokens: usize) {
        use faer::linalg::matmul::triangular::{matmul, BlockStructure};
        use faer::{Accum, MatMut, MatRef, Par};
        let n = self.n;
        assert_eq!(x.len(), tokens * n, "activations are not [tokens, n]");
        let xv = MatRef::from_row_major_slice(x, tokens, n);
        let mut g = vec![0f32; n * n];
        matmul(
            MatMut::from_row_major_slice_mut(&mut g, n, n),
            BlockStructure::TriangularLower,
            Accum::Replace,
            xv.transpose(),
            BlockStructure::Rectangular,
            xv,
            BlockStructure::Rectangular,
            1.0f32,
            Par::rayon(0),
        );
        self.sum
            .par_chunks_mut(n)
            .zip(g.par_chunks(n))
            .enumerate()
            .for_each(|(a, (s, gr))| {
                for (sv, v) in s[..=a].iter_mut().zip(&gr[..=a]) {
                    *sv += *v as f64;
                }
            });
        self.count += tokens;
    }
    /// 2/N Σ x xᵀ, built from the lower triangle of the running sum.
    pub fn finish(&self) -> Vec<f64> {
        let (n, c) = (self.n, 2.0 / self.count.max(1) as f64);
        let mut h = vec![0f64; n * n];
        for a in 0..n {
            for b in 0..=a {
                let v = self.sum[a * n + b] * c;
                h[a * n + b] = v;
                h[b * n + a] = v;
            }
        }
        h
    }
}
