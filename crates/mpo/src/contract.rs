//! Contraction: cores back to the matrix, and an input batch through the cores.
//!
//! Rebuilding W contracts the sites left of a split site into one block [L, d] and the sites
//! right of it into [d', R], then multiplies block · core · block. The split and the order of
//! the two products are chosen by flop count; the blocks' rows/columns are reordered to
//! "all row factors, then all column factors" before the last product so that the final
//! un-interleaving is a 6-axis permutation with long contiguous runs.
//!
//! Applying the MPO to x[N, J] without forming W sweeps the sites left to right. The state is
//! kept as (j_k…j_n, N, i_1…i_{k−1}, d_{k−1}); one step rotates j_k to the end (a transpose)
//! and multiplies by core k reshaped to [(d_{k−1}, j_k), (i_k, d_k)], which yields
//! (j_{k+1}…j_n, N, i_1…i_k, d_k): every step is one large GEMM and no other reshuffle.

use crate::error::Result;
use crate::linalg::{gemm, gemm_into, gemm_strided_rhs, PANEL};
use crate::mpo::Mpo;
use crate::permute::{interleave_map, permute_into, zeroed};
use crate::scalar::Scalar;
use crate::shapes::MpoShape;
use candle_core::{Device, Tensor};

/// A candle tensor with the given data and shape.
pub fn tensor_from<T: Scalar>(
    data: &[T],
    shape: &[usize],
    device: &Device,
) -> candle_core::Result<Tensor> {
    Tensor::from_slice(data, shape, device)
}

/// Row/column prefix products and site-group index helpers shared by both backends.
struct Plan {
    split: usize,
    /// contract (block_left · core) first instead of (core · block_right)
    left_first: bool,
}

fn plan(shape: &MpoShape, bonds: &[usize]) -> Plan {
    let m = shape.local_dims();
    let n = m.len();
    let mut lefts = vec![1f64; n + 1];
    for k in 0..n {
        lefts[k + 1] = lefts[k] * m[k] as f64;
    }
    let total = lefts[n];
    let d: Vec<f64> = bonds.iter().map(|&x| x as f64).collect();
    let mut best = (f64::INFINITY, 0, true);
    for s in 0..n {
        // left block: Σ_{k<s-1} L_{k+1}·d_{k+1}·m_{k+1}·d_{k+2}
        let mut cost = 0.0;
        for k in 1..s {
            cost += lefts[k] * d[k] * m[k] as f64 * d[k + 1];
        }
        for k in s + 1..n - 1 {
            cost += d[k] * m[k] as f64 * d[k + 1] * (total / lefts[k + 1]);
        }
        let (a, b, ms) = (lefts[s], total / lefts[s + 1], m[s] as f64);
        // The two blocks are reordered element by element afterwards: count that memory
        // traffic too (a few multiply-adds' worth per element), which breaks flop ties in
        // favour of the split with the smaller blocks.
        cost += 4.0 * (a * d[s] + d[s + 1] * b);
        let right_first = d[s] * ms * d[s + 1] * b + a * d[s] * ms * b;
        let left_first = a * d[s] * ms * d[s + 1] + a * ms * d[s + 1] * b;
        for (c, lf) in [(right_first, false), (left_first, true)] {
            if cost + c < best.0 {
                best = (cost + c, s, lf);
            }
        }
    }
    Plan {
        split: best.1,
        left_first: best.2,
    }
}

/// Estimated multiply-adds of rebuilding W from cores with these bonds.
pub fn rebuild_flops(shape: &MpoShape, bonds: &[usize]) -> f64 {
    let m = shape.local_dims();
    let n = m.len();
    let p = plan(shape, bonds);
    let mut lefts = vec![1f64; n + 1];
    for k in 0..n {
        lefts[k + 1] = lefts[k] * m[k] as f64;
    }
    let total = lefts[n];
    let d: Vec<f64> = bonds.iter().map(|&x| x as f64).collect();
    let s = p.split;
    let mut cost = 0.0;
    for k in 1..s {
        cost += lefts[k] * d[k] * m[k] as f64 * d[k + 1];
    }
    for k in s + 1..n - 1 {
        cost += d[k] * m[k] as f64 * d[k + 1] * (total / lefts[k + 1]);
    }
    let (a, b, ms) = (lefts[s], total / lefts[s + 1], m[s] as f64);
    cost + if p.left_first {
        a * d[s] * ms * d[s + 1] + a * ms * d[s + 1] * b
    } else {
        d[s] * ms * d[s + 1] * b + a * d[s] * ms * b
    }
}

/// Estimated multiply-adds of applying the MPO to `batch` input rows core by core.
pub fn apply_flops(shape: &MpoShape, bonds: &[usize], batch: usize) -> f64 {
    let n = shape.n();
    let (rf, cf) = (&shape.row_factors, &shape.col_factors);
    let mut cost = 0.0;
    for k in 0..n {
        let done: f64 = rf[..k].iter().map(|&x| x as f64).product();
        let todo: f64 = cf[k + 1..].iter().map(|&x| x as f64).product();
        cost +=
            batch as f64 * done * todo * (bonds[k] * cf[k]) as f64 * (rf[k] * bonds[k + 1]) as f64;
    }
    cost
}

/// Where the entries of X = [(ar, ac), (i_s, j_s), (br, bc)] go in the row-major matrix
/// W[(ar, i_s, br), (ac, j_s, bc)].
struct Scatter {
    ac: usize,
    rs: usize,
    cs: usize,
    br: usize,
    bc: usize,
    ms: usize,
    b: usize,
    cols: usize,
}

impl Scatter {
    /// Writes the panel X[a0..a0+na, m0..m0+nm, :] (row-major in `panel`) into `out`, one
    /// contiguous run of `bc` entries at a time.
    fn put<T: Copy>(&self, panel: &[T], a0: usize, na: usize, m0: usize, nm: usize, out: &mut [T]) {
        debug_assert_eq!(panel.len(), na * nm * self.b);
        debug_assert!(a0 + na <= out.len() / (self.ms * self.b) && m0 + nm <= self.ms);
        for al in 0..na {
            let (ar, ac) = ((a0 + al) / self.ac, (a0 + al) % self.ac);
            for ml in 0..nm {
                let (i, j) = ((m0 + ml) / self.cs, (m0 + ml) % self.cs);
                let src = &panel[(al * nm + ml) * self.b..(al * nm + ml + 1) * self.b];
                let col = (ac * self.cs + j) * self.bc;
                for (r, run) in src.chunks_exact(self.bc).enumerate() {
                    let row = (ar * self.rs + i) * self.br + r;
                    out[row * self.cols + col..row * self.cols + col + self.bc]
                        .copy_from_slice(run);
                }
            }
        }
    }
}

impl<T: Scalar> Mpo<T> {
    /// The padded matrix (rows × cols of the factor products), row-major.
    pub fn to_padded_matrix(&self) -> Vec<T> {
        self.padded_matrix_in_panels(PANEL)
    }

    /// [`Self::to_padded_matrix`] with the last product formed in panels of about `panel`
    /// entries (a parameter so that tests can force many ragged panels on small shapes).
    fn padded_matrix_in_panels(&self, panel: usize) -> Vec<T> {
        let shape = self.shape();
        let (rf, cf) = (&self.row_factors, &self.col_factors);
        let m = shape.local_dims();
        let n = self.n();
        let d = &self.bond_dims;
        let p = plan(&shape, d);
        let s = p.split;
        // Left block [L_s, d_s] in interleaved row order.
        let mut lb = vec![T::of(1.0)];
        let mut l = 1;
        for k in 0..s {
            lb = gemm(&lb, false, &self.cores[k], false, l, d[k], m[k] * d[k + 1]);
            l *= m[k];
        }
        // Right block [d_{s+1}, R_{s+1}].
        let mut rb = vec![T::of(1.0)];
        let mut r = 1;
        for k in (s + 1..n).rev() {
            rb = gemm(&self.cores[k], false, &rb, false, d[k] * m[k], d[k + 1], r);
            r *= m[k];
        }
        // Reorder to block order: rows of lb, columns of rb.
        let lmap = interleave_map(&rf[..s], &cf[..s]);
        let mut lb_blk = vec![T::of(0.0); lb.len()];
        for (blk, &i) in lmap.iter().enumerate() {
            lb_blk[blk * d[s]..(blk + 1) * d[s]].copy_from_slice(&lb[i * d[s]..(i + 1) * d[s]]);
        }
        let rmap = interleave_map(&rf[s + 1..], &cf[s + 1..]);
        let ds1 = d[s + 1];
        let mut rb_blk = vec![T::of(0.0); rb.len()];
        for row in 0..ds1 {
            for (blk, &i) in rmap.iter().enumerate() {
                rb_blk[row * r + blk] = rb[row * r + i];
            }
        }
        let (a, b, ms) = (l, r, m[s]);
        let (ac, bc) = (
            cf[..s].iter().product::<usize>(),
            cf[s + 1..].iter().product::<usize>(),
        );
        let sc = Scatter {
            ac,
            rs: rf[s],
            cs: cf[s],
            br: b / bc,
            bc,
            ms,
            b,
            cols: ac * cf[s] * bc,
        };
        // From two panels on, the last product X = [a, ms, b] = [(ar, ac), (i_s, j_s), (br, bc)]
        // is formed in panels of whole a-rows or (i_s, j_s)-groups that are scattered straight into W's
        // (ar, i_s, br) × (ac, j_s, bc) layout while still in cache: no X buffer and no separate
        // permutation pass over W.
        let mut out = zeroed(a * ms * b);
        if a * ms * b < 2 * panel {
            // Small: the intermediate lives in `out`, X gets a fresh (allocator-recycled)
            // buffer, then one permutation pass.
            let x = if p.left_first {
                let t = &mut out[..a * ms * ds1];
                gemm_into(&lb_blk, false, &self.cores[s], false, a, d[s], ms * ds1, t);
                gemm(t, false, &rb_blk, false, a * ms, ds1, b)
            } else {
                let t = &mut out[..d[s] * ms * b];
                gemm_into(&self.cores[s], false, &rb_blk, false, d[s] * ms, ds1, b, t);
                gemm(&lb_blk, false, t, false, a, d[s], ms * b)
            };
            let br = b / bc;
            permute_into(
                &x,
                &[a / ac, ac, rf[s], cf[s], br, bc],
                &[0, 2, 4, 1, 3, 5],
                &mut out,
            );
            return out;
        }
        if p.left_first {
            // T = lb · core = [a·ms, ds1], then X rows (a-row by a-row) = T · rb.
            let t = gemm(&lb_blk, false, &self.cores[s], false, a, d[s], ms * ds1);
            let h = (panel / (ms * b).max(1)).clamp(1, a.max(1));
            let mut tmp = vec![T::of(0.0); h * ms * b];
            let mut a0 = 0;
            while a0 < a {
                let ha = h.min(a - a0);
                let rows = &t[a0 * ms * ds1..(a0 + ha) * ms * ds1];
                gemm_into(
                    rows,
                    false,
                    &rb_blk,
                    false,
                    ha * ms,
                    ds1,
                    b,
                    &mut tmp[..ha * ms * b],
                );
                sc.put(&tmp[..ha * ms * b], a0, ha, 0, ms, &mut out);
                a0 += ha;
            }
        } else {
            // T = core · rb = [d_s, ms·b], then X columns ((i_s, j_s)-group by group) = lb · T.
            let t = gemm(&self.cores[s], false, &rb_blk, false, d[s] * ms, ds1, b);
            let g = (panel / (a * b).max(1)).clamp(1, ms.max(1));
            let mut tmp = vec![T::of(0.0); a * g * b];
            let mut m0 = 0;
            while m0 < ms {
                let gm = g.min(ms - m0);
                gemm_strided_rhs(
                    &lb_blk,
                    &t,
                    m0 * b,
                    a,
                    d[s],
                    gm * b,
                    ms * b,
                    &mut tmp[..a * gm * b],
                );
                sc.put(&tmp[..a * gm * b], 0, a, m0, gm, &mut out);
                m0 += gm;
            }
        }
        out
    }

    /// The reconstructed matrix Ŵ (orig_rows × orig_cols), row-major, padding removed.
    pub fn to_matrix(&self) -> Result<Vec<T>> {
        let full = self.to_padded_matrix();
        let shape = self.shape();
        if !shape.is_padded() {
            return Ok(full);
        }
        let c = shape.cols();
        let mut out = Vec::with_capacity(self.orig_rows * self.orig_cols);
        for i in 0..self.orig_rows {
            out.extend_from_slice(&full[i * c..i * c + self.orig_cols]);
        }
        Ok(out)
    }
}

fn check_cores(cores: &[Tensor], shape: &MpoShape) -> candle_core::Result<Vec<usize>> {
    if cores.len() != shape.n() {
        candle_core::bail!("{} cores for an MPO with {} sites", cores.len(), shape.n());
    }
    let mut bonds = vec![1usize];
    for (k, c) in cores.iter().enumerate() {
        let dims = c.dims();
        if dims.len() != 4
            || dims[0] != *bonds.last().unwrap()
            || dims[1] != shape.row_factors[k]
            || dims[2] != shape.col_factors[k]
        {
            candle_core::bail!(
                "core {k} has shape {dims:?}, which does not chain with the factor shape"
            );
        }
        bonds.push(dims[3]);
    }
    if *bonds.last().unwrap() != 1 {
        candle_core::bail!("last bond must be 1");
    }
    Ok(bonds)
}

/// Differentiable rebuild of W[orig_rows, orig_cols] from cores [d_{k−1}, i_k, j_k, d_k].
pub fn dense_from_cores(cores: &[Tensor], shape: &MpoShape) -> candle_core::Result<Tensor> {
    dense_from_cores_with(cores, shape, &|a, b| a.matmul(b))
}

/// [`dense_from_cores`] with every product a·b of 2-D tensors done by `mm`. Training passes a
/// product whose backward differentiates only tracked inputs: a frozen core (MPOP's central
/// tensor) then costs no gradient GEMM, where candle's matmul computes both sides' gradients.
pub fn dense_from_cores_with(
    cores: &[Tensor],
    shape: &MpoShape,
    mm: &dyn Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    let d = check_cores(cores, shape)?;
    let (rf, cf) = (&shape.row_factors, &shape.col_factors);
    let m = shape.local_dims();
    let n = shape.n();
    let p = plan(shape, &d);
    let s = p.split;
    let dev = cores[0].device();
    let dt = cores[0].dtype();
    // Left block as [i_1, j_1, …, i_{s}, j_{s}, d_s] → block order [i…, j…, d_s].
    let mut lb = Tensor::ones((1, 1), dt, dev)?;
    let mut l = 1;
    for k in 0..s {
        lb = mm(&lb, &cores[k].reshape((d[k], m[k] * d[k + 1]))?)?;
        l *= m[k];
        lb = lb.reshape((l, d[k + 1]))?;
    }
    if s > 1 {
        let mut dims: Vec<usize> = (0..s).flat_map(|k| [rf[k], cf[k]]).collect();
        dims.push(d[s]);
        let mut perm: Vec<usize> = (0..s).map(|k| 2 * k).collect();
        perm.extend((0..s).map(|k| 2 * k + 1));
        perm.push(2 * s);
        lb = lb
            .reshape(dims)?
            .permute(perm)?
            .contiguous()?
            .reshape((l, d[s]))?;
    }
    let mut rb = Tensor::ones((1, 1), dt, dev)?;
    let mut r = 1;
    for k in (s + 1..n).rev() {
        rb = mm(&cores[k].reshape((d[k] * m[k], d[k + 1]))?, &rb)?;
        r *= m[k];
        rb = rb.reshape((d[k], r))?;
    }
    if n - s - 1 > 1 {
        let g = n - s - 1;
        let mut dims = vec![d[s + 1]];
        dims.extend((s + 1..n).flat_map(|k| [rf[k], cf[k]]));
        let mut perm = vec![0];
        perm.extend((0..g).map(|k| 1 + 2 * k));
        perm.extend((0..g).map(|k| 2 + 2 * k));
        rb = rb
            .reshape(dims)?
            .permute(perm)?
            .contiguous()?
            .reshape((d[s + 1], r))?;
    }
    let (a, b, ms, ds1) = (l, r, m[s], d[s + 1]);
    let x = if p.left_first {
        let t = mm(&lb, &cores[s].reshape((d[s], ms * ds1))?)?;
        mm(&t.reshape((a * ms, ds1))?, &rb)?
    } else {
        let t = mm(&cores[s].reshape((d[s] * ms, ds1))?, &rb)?;
        mm(&lb, &t.reshape((d[s], ms * b))?)?
    };
    let (ar, ac): (usize, usize) = (rf[..s].iter().product(), cf[..s].iter().product());
    let (br, bc): (usize, usize) = (rf[s + 1..].iter().product(), cf[s + 1..].iter().product());
    let w = x
        .reshape(vec![ar, ac, rf[s], cf[s], br, bc])?
        .permute(vec![0, 2, 4, 1, 3, 5])?
        .contiguous()?
        .reshape((shape.rows(), shape.cols()))?;
    let w = if shape.orig_rows < shape.rows() {
        w.narrow(0, 0, shape.orig_rows)?
    } else {
        w
    };
    let w = if shape.orig_cols < shape.cols() {
        w.narrow(1, 0, shape.orig_cols)?.contiguous()?
    } else {
        w
    };
    Ok(w)
}

/// Differentiable y = x·Wᵀ for x[…, orig_cols] without forming W (see module docs).
pub fn apply_cores(x: &Tensor, cores: &[Tensor], shape: &MpoShape) -> candle_core::Result<Tensor> {
    let d = check_cores(cores, shape)?;
    let (rf, cf) = (&shape.row_factors, &shape.col_factors);
    let n = shape.n();
    let dims = x.dims().to_vec();
    let Some((&last, lead)) = dims.split_last() else {
        candle_core::bail!("MPO input must have at least one dimension");
    };
    if last != shape.orig_cols {
        candle_core::bail!(
            "MPO input has {last} features, the layer expects {}",
            shape.orig_cols
        );
    }
    let batch: usize = lead.iter().product();
    let mut x2 = x.reshape((batch, last))?;
    if shape.cols() > last {
        x2 = x2.pad_with_zeros(1, 0, shape.cols() - last)?;
    }
    // state (j_1…j_n, N, d_0 = 1)
    let mut state = x2.t()?.contiguous()?;
    let mut total = batch * shape.cols();
    for k in 0..n {
        let rest = total / cf[k];
        let rot = state.reshape((cf[k], rest))?.t()?.contiguous()?; // (rest, j_k)
        let rows = rest / d[k];
        let core = cores[k]
            .permute((0, 2, 1, 3))?
            .reshape((d[k] * cf[k], rf[k] * d[k + 1]))?;
        state = rot.reshape((rows, d[k] * cf[k]))?.matmul(&core)?;
        total = rows * rf[k] * d[k + 1];
    }
    let y = state.reshape((batch, shape.rows()))?;
    let y = if shape.orig_rows < shape.rows() {
        y.narrow(1, 0, shape.orig_rows)?.contiguous()?
    } else {
        y
    };
    let mut out_dims = lead.to_vec();
    out_dims.push(shape.orig_rows);
    y.reshape(out_dims)
}

/// Differentiable row lookup W[ids, :] without forming W: each core is indexed by the id's
/// digit for that site, then the per-token chains are contracted with batched products.
pub fn embed_cores(
    ids: &Tensor,
    cores: &[Tensor],
    shape: &MpoShape,
) -> candle_core::Result<Tensor> {
    let d = check_cores(cores, shape)?;
    let (rf, cf) = (&shape.row_factors, &shape.col_factors);
    let n = shape.n();
    let id_dims = ids.dims().to_vec();
    let flat: Vec<u32> = ids
        .flatten_all()?
        .to_dtype(candle_core::DType::U32)?
        .to_vec1()?;
    let count = flat.len();
    if let Some(bad) = flat.iter().find(|&&i| i as usize >= shape.orig_rows) {
        candle_core::bail!(
            "token id {bad} out of range for an embedding with {} rows",
            shape.orig_rows
        );
    }
    let dev = cores[0].device();
    // digits[k][t] = i_k of token t (i_1 most significant)
    let mut digits = vec![vec![0u32; count]; n];
    for (t, &id) in flat.iter().enumerate() {
        let mut rem = id as usize;
        for k in (0..n).rev() {
            digits[k][t] = (rem % rf[k]) as u32;
            rem /= rf[k];
        }
    }
    let mut state: Option<Tensor> = None; // [count, J_{≤k}, d_k]
    let mut jdone = 1;
    for k in 0..n {
        let idx = Tensor::from_vec(digits[k].clone(), count, dev)?;
        let ck = cores[k]
            .permute((1, 0, 2, 3))?
            .reshape((rf[k], d[k] * cf[k] * d[k + 1]))?;
        let sel = ck.index_select(&idx, 0)?; // [count, d_k·j_k·d_{k+1}]
        state = Some(match state {
            None => sel.reshape((count, cf[k], d[k + 1]))?,
            Some(s) => {
                let sel = sel.reshape((count, d[k], cf[k] * d[k + 1]))?;
                s.matmul(&sel)?.reshape((count, jdone * cf[k], d[k + 1]))?
            }
        });
        jdone *= cf[k];
    }
    let e = state.unwrap().reshape((count, shape.cols()))?;
    let e = if shape.orig_cols < shape.cols() {
        e.narrow(1, 0, shape.orig_cols)?.contiguous()?
    } else {
        e
    };
    let mut out_dims = id_dims;
    out_dims.push(shape.orig_cols);
    e.reshape(out_dims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decompose::DecomposeOptions;
    use crate::truncate::Truncation;

    /// The panelled rebuild with its permutation fused in must equal candle's independent
    /// reshape/permute rebuild for both product orders and any panel size (1 entry: one a-row
    /// or one (i_s, j_s) group per panel; 300: several per panel where they fit, the last panel
    /// ragged).
    #[test]
    fn panelled_rebuild_matches_candle_on_both_orders() {
        let mut seen = [false; 2];
        for (rows, cols, n) in [
            (72usize, 60usize, 3usize),
            (96, 40, 4),
            (40, 96, 4),
            (30, 30, 2),
        ] {
            let shape = MpoShape::auto(rows, cols, n).unwrap();
            let w = crate::bench::gaussian_matrix(rows, cols, 9);
            let full = Mpo::decompose(&w, &shape).unwrap();
            let dmax = *full.bonds().iter().max().unwrap();
            for per_bond in [None, Some(vec![dmax; n - 1]), Some(vec![2; n - 1])]
                .into_iter()
                .chain((0..n - 1).map(|k| {
                    // one bond cut hard, the others full: moves the split / order around
                    let mut v = full.bonds()[1..n].to_vec();
                    v[k] = 1;
                    Some(v)
                }))
            {
                let m = match per_bond {
                    None => full.clone(),
                    Some(v) => Mpo::decompose_with(
                        &w,
                        &shape,
                        &DecomposeOptions::truncated(Truncation::PerBond(v)),
                    )
                    .unwrap(),
                };
                seen[plan(&shape, m.bonds()).left_first as usize] = true;
                let dev = Device::Cpu;
                let cores: Vec<Tensor> = (0..n)
                    .map(|k| {
                        let (l, r) = (m.bonds()[k], m.bonds()[k + 1]);
                        tensor_from(
                            &m.cores[k],
                            &[l, shape.row_factors[k], shape.col_factors[k], r],
                            &dev,
                        )
                        .unwrap()
                    })
                    .collect();
                let want: Vec<f64> = dense_from_cores(&cores, &shape)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                // 1 and 300: the fused path; PANEL: these small shapes take the permute path
                for panel in [1, 300, PANEL] {
                    let got = m.padded_matrix_in_panels(panel);
                    let got: Vec<f64> = if shape.is_padded() {
                        (0..rows)
                            .flat_map(|i| got[i * shape.cols()..i * shape.cols() + cols].to_vec())
                            .collect()
                    } else {
                        got
                    };
                    assert_eq!(got.len(), want.len());
                    for (g, x) in got.iter().zip(&want) {
                        assert!(
                            (g - x).abs() < 1e-12 * (1.0 + x.abs()),
                            "{rows}x{cols} panel {panel}: {g} vs {x}"
                        );
                    }
                }
            }
        }
        assert!(
            seen[0] && seen[1],
            "both product orders must be exercised: {seen:?}"
        );
    }
}
