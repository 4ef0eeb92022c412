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
    let l = cholesky(&hp, n).ok_or_else(|| {
        Error::Msg("Hessian is not positive definite even after damping; raise --damp".into())
    })?;
    let li = lower_inverse(&l, n);
    // H⁻¹ = L⁻ᵀ L⁻¹: with C = (L⁻¹)ᵀ (rows contiguous), H⁻¹[a][b] = Σ_{k ≥ max(a,b)} C[a][k]·C[b][k].
    let c = super::pack::transpose(&li, n, n);
    let mut hinv = vec![0f64; n * n];
    hinv.par_chunks_mut(n).enumerate().for_each(|(a, row)| {
        let ca = &c[a * n..(a + 1) * n];
        for b in 0..n {
            let k0 = a.max(b);
            let cb = &c[b * n..(b + 1) * n];
            row[b] = ca[k0..].iter().zip(&cb[k0..]).map(|(x, y)| x * y).sum();
        }
    });
    let l2 = cholesky(&hinv, n).ok_or_else(|| {
        Error::Msg("inverse Hessian lost positive definiteness; raise --damp".into())
    })?;
    let mut u = vec![0f32; n * n];
    for a in 0..n {
        for b in 0..=a {
            u[b * n + a] = l2[a * n + b] as f32;
        }
    }
    Ok(Prepared {
        n,
        perm,
        dead,
        hinv: u,
    })
}

fn cholesky(a: &[f64], n: usize) -> Option<Vec<f64>> {
    let mut l = vec![0f64; n * n];
    for j in 0..n {
        let mut d = a[j * n + j];
        for k in 0..j {
            d -= l[j * n + k] * l[j * n + k];
        }
        if d <= 0.0 || !d.is_finite() {
            return None;
        }
        let d = d.sqrt();
        l[j * n + j] = d;
        let (head, tail) = l.split_at_mut((j + 1) * n);
        let lj = &head[j * n..j * n + j];
        tail.par_chunks_mut(n).enumerate().for_each(|(off, row)| {
            let i = j + 1 + off;
            let mut s = a[i * n + j];
            for k in 0..j {
                s -= row[k] * lj[k];
            }
            row[j] = s / d;
        });
    }
    Some(l)
}

/// Inverse of a lower-triangular matrix (column by column, in parallel).
fn lower_inverse(l: &[f64], n: usize) -> Vec<f64> {
    // Column c of L⁻¹ solves L x = e_c; compute as rows of the transpose, then transpose.
    let cols: Vec<Vec<f64>> = (0..n)
        .into_par_iter()
        .map(|c| {
            let mut x = vec![0f64; n];
            x[c] = 1.0 / l[c * n + c];
            for i in c + 1..n {
                let mut s = 0.0;
                for k in c..i {
                    s += l[i * n + k] * x[k];
                }
                x[i] = -s / l[i * n + i];
            }
            x
        })
        .collect();
    let mut out = vec![0f64; n * n];
    for (c, x) in cols.iter().enumerate() {
        for i in c..n {
            out[i * n + c] = x[i];
        }
    }
    out
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
    let maxq = ((1u32 << g.bits) - 1) as f32;
    // Permuted working copy W [out, n].
    let mut wp = vec![0f32; out_f * n];
    for j in 0..out_f {
        for k in 0..n {
            let c = p.perm[k];
            wp[j * n + k] = if p.dead[c] { 0.0 } else { w[j * in_f + c] };
        }
    }
    let mut qp = vec![0u32; out_f * n];
    let mut scales = vec![0f32; groups * out_f];
    let mut zeros = vec![0u32; groups * out_f];
    let mut cur_s = vec![0f32; out_f];
    let mut cur_z = vec![0f32; out_f];
    if g.group_size == 0 {
        for j in 0..out_f {
            let (s, z) = find_params(wp[j * n..(j + 1) * n].iter().copied(), g);
            cur_s[j] = s;
            cur_z[j] = z;
            scales[j] = s;
            zeros[j] = z as u32;
        }
    }
    let hinv = &p.hinv;
    let mut loss = 0f64;
    let mut i1 = 0;
    while i1 < n {
        let i2 = (i1 + block).min(n);
        let cnt = i2 - i1;
        let mut err = vec![0f32; out_f * cnt];
        for i in i1..i2 {
            if g.group_size != 0 && i % gs == 0 {
                let gi = i / gs;
                let hi = (i + gs).min(n);
                for j in 0..out_f {
                    let (s, z) = find_params(wp[j * n + i..j * n + hi].iter().copied(), g);
                    cur_s[j] = s;
                    cur_z[j] = z;
                    scales[gi * out_f + j] = s;
                    zeros[gi * out_f + j] = z as u32;
                }
            }
            let d = hinv[i * n + i];
            let hrow = &hinv[i * n + i..i * n + i2];
            let (cs, cz) = (&cur_s, &cur_z);
            let l: f64 = wp
                .par_chunks_mut(n)
                .zip(qp.par_chunks_mut(n))
                .zip(err.par_chunks_mut(cnt))
                .enumerate()
                .map(|(j, ((wr, qr), er))| {
                    let x = wr[i];
                    let (q, dq) = quant1(x, cs[j], cz[j], maxq);
                    qr[i] = q;
                    let e = (x - dq) / d;
                    er[i - i1] = e;
                    for (k, h) in hrow.iter().enumerate() {
                        wr[i + k] -= e * h;
                    }
                    ((x - dq) as f64).powi(2) / (d as f64).powi(2) / 2.0
                })
                .sum();
            loss += l;
        }
        if i2 < n {
            wp.par_chunks_mut(n)
                .zip(err.par_chunks(cnt))
                .for_each(|(wr, er)| {
                    for (k, &e) in er.iter().enumerate() {
                        if e == 0.0 {
                            continue;
                        }
                        let hr = &hinv[(i1 + k) * n + i2..(i1 + k + 1) * n];
                        for (wv, h) in wr[i2..].iter_mut().zip(hr) {
                            *wv -= e * h;
                        }
                    }
                });
        }
        i1 = i2;
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
    pub fn finish(&self) -> Vec<f64> {
        let c = 2.0 / self.count.max(1) as f64;
        self.sum.iter().map(|v| v * c).collect()
    }
}
