//! Factor shapes of an MPO: how the rows I and columns J of a stored weight W[I, J] are split
//! into n local dimensions each, zero-padding when a size has no usable factorization, the
//! full (exact) bond dimensions and parameter counts that follow from the factors, an
//! automatic balanced factorization, and the shapes used in the papers' code as presets.
//!
//! Convention (methods.md §0): W is the stored torch weight [out, in]; `row_factors` split
//! `out` (i_1 most significant), `col_factors` split `in`.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// Row/column factor lists of equal length n, plus the matrix size before padding.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MpoShape {
    /// i_1..i_n; their product is the padded row count.
    pub row_factors: Vec<usize>,
    /// j_1..j_n; their product is the padded column count.
    pub col_factors: Vec<usize>,
    /// Row count of the original matrix (≤ padded rows); extra rows are zero padding.
    pub orig_rows: usize,
    /// Column count of the original matrix (≤ padded columns).
    pub orig_cols: usize,
}

impl MpoShape {
    /// A shape for an `orig_rows × orig_cols` matrix zero-padded to the factor products.
    pub fn new(
        row_factors: Vec<usize>,
        col_factors: Vec<usize>,
        orig_rows: usize,
        orig_cols: usize,
    ) -> Result<Self> {
        let s = Self {
            row_factors,
            col_factors,
            orig_rows,
            orig_cols,
        };
        s.validate()?;
        Ok(s)
    }

    /// A shape whose matrix size is exactly the factor products (no padding).
    pub fn exact(row_factors: Vec<usize>, col_factors: Vec<usize>) -> Result<Self> {
        let (r, c) = (product(&row_factors), product(&col_factors));
        Self::new(row_factors, col_factors, r, c)
    }

    /// Checks equal lengths, positive factors and that the padded size covers the original.
    pub fn validate(&self) -> Result<()> {
        let n = self.row_factors.len();
        if n == 0 || n != self.col_factors.len() {
            return Err(Error::Shape(format!(
                "row factors {:?} and column factors {:?} must be non-empty and of equal length",
                self.row_factors, self.col_factors
            )));
        }
        if self
            .row_factors
            .iter()
            .chain(&self.col_factors)
            .any(|&f| f == 0)
        {
            return Err(Error::Shape(format!(
                "factors must be ≥ 1: rows {:?}, cols {:?}",
                self.row_factors, self.col_factors
            )));
        }
        if self.orig_rows == 0 || self.orig_cols == 0 {
            return Err(Error::Shape("matrix dimensions must be positive".into()));
        }
        let (r, c) = (self.rows(), self.cols());
        if r < self.orig_rows || c < self.orig_cols {
            return Err(Error::Shape(format!(
                "factors {:?}×{:?} give {r}×{c}, smaller than the {}×{} matrix",
                self.row_factors, self.col_factors, self.orig_rows, self.orig_cols
            )));
        }
        Ok(())
    }

    /// Number of sites (tensors) n.
    pub fn n(&self) -> usize {
        self.row_factors.len()
    }

    /// Padded row count ∏ i_k.
    pub fn rows(&self) -> usize {
        product(&self.row_factors)
    }

    /// Padded column count ∏ j_k.
    pub fn cols(&self) -> usize {
        product(&self.col_factors)
    }

    /// Whether rows or columns are zero-padded.
    pub fn is_padded(&self) -> bool {
        self.rows() != self.orig_rows || self.cols() != self.orig_cols
    }

    /// Local dimensions m_k = i_k · j_k of the interleaved tensor.
    pub fn local_dims(&self) -> Vec<usize> {
        self.row_factors
            .iter()
            .zip(&self.col_factors)
            .map(|(a, b)| a * b)
            .collect()
    }

    /// Exact bond dimensions d_0..d_n (length n+1, d_0 = d_n = 1):
    /// d_k = min(∏_{m≤k} i_m j_m, ∏_{m>k} i_m j_m). With these the MPO represents W exactly.
    pub fn full_bonds(&self) -> Vec<usize> {
        let m = self.local_dims();
        let n = m.len();
        let mut left = vec![1usize; n + 1];
        for k in 0..n {
            left[k + 1] = left[k].saturating_mul(m[k]);
        }
        let total = left[n];
        (0..=n).map(|k| left[k].min(total / left[k])).collect()
    }

    /// Bond dimensions d_0..d_n with every interior bond capped at `max_bond` (the papers'
    /// single `trunc_num`).
    pub fn capped_bonds(&self, max_bond: usize) -> Vec<usize> {
        let mut b = self.full_bonds();
        let n = b.len() - 1;
        for d in &mut b[1..n] {
            *d = (*d).min(max_bond.max(1));
        }
        b
    }

    /// Checks a bond list d_0..d_n against this shape: length n+1, boundary 1s, and
    /// 1 ≤ d_k ≤ the exact bond.
    pub fn check_bonds(&self, bonds: &[usize]) -> Result<()> {
        let full = self.full_bonds();
        if bonds.len() != full.len() {
            return Err(Error::Bonds(format!(
                "expected {} bond dimensions d_0..d_n, got {}",
                full.len(),
                bonds.len()
            )));
        }
        if bonds[0] != 1 || bonds[bonds.len() - 1] != 1 {
            return Err(Error::Bonds(format!(
                "boundary bonds must be 1, got {bonds:?}"
            )));
        }
        for (k, (&d, &f)) in bonds.iter().zip(&full).enumerate() {
            if d == 0 || d > f {
                return Err(Error::Bonds(format!(
                    "bond {k} is {d}, must lie in 1..={f} (exact bonds {full:?})"
                )));
            }
        }
        Ok(())
    }

    /// Parameter count Σ_k d_{k-1} i_k j_k d_k for the given bonds d_0..d_n.
    pub fn params_for(&self, bonds: &[usize]) -> usize {
        self.local_dims()
            .iter()
            .enumerate()
            .map(|(k, m)| bonds[k] * m * bonds[k + 1])
            .sum()
    }

    /// Parameter count of the exact (untruncated) MPO.
    pub fn full_params(&self) -> usize {
        self.params_for(&self.full_bonds())
    }

    /// The exact MPO's parameters over the dense matrix's (OPF's per-matrix factor).
    pub fn full_ratio(&self) -> f64 {
        self.full_params() as f64 / self.dense_params().max(1) as f64
    }

    /// Parameters of the original dense matrix (before padding).
    pub fn dense_params(&self) -> usize {
        self.orig_rows * self.orig_cols
    }

    /// Index of the central tensor, n // 2 (0-based). The rest are auxiliary tensors.
    pub fn central_index(&self) -> usize {
        self.n() / 2
    }

    /// Shape of core k: [d_{k-1}, i_k, j_k, d_k] for the given bonds.
    pub fn core_shape(&self, bonds: &[usize], k: usize) -> [usize; 4] {
        [
            bonds[k],
            self.row_factors[k],
            self.col_factors[k],
            bonds[k + 1],
        ]
    }

    /// The shape of Wᵀ (rows and columns swapped), e.g. FFN-out from FFN-in.
    pub fn transposed(&self) -> Self {
        Self {
            row_factors: self.col_factors.clone(),
            col_factors: self.row_factors.clone(),
            orig_rows: self.orig_cols,
            orig_cols: self.orig_rows,
        }
    }

    /// Largest uniform cap D whose MPO has at most `budget` parameters (at least 1).
    pub fn max_bond_for_params(&self, budget: usize) -> usize {
        let full = self.full_bonds();
        let top = full.iter().copied().max().unwrap_or(1);
        // params(D) is non-decreasing in D, so bisect.
        let (mut lo, mut hi) = (1usize, top);
        if self.params_for(&self.capped_bonds(top)) <= budget {
            return top;
        }
        while hi - lo > 1 {
            let mid = (lo + hi) / 2;
            if self.params_for(&self.capped_bonds(mid)) <= budget {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        lo
    }

    /// Automatic balanced shape for an I×J matrix with n sites: each size is split into n
    /// factors as even as possible (zero-padding it to a nearby 2·3·5-smooth size when it has
    /// no such split), then the factors are ordered to minimise the exact MPO's parameter count
    /// (ties: lexicographically smallest lists). 768×768, n = 5 gives the MPOP "balanced" shape.
    pub fn auto(rows: usize, cols: usize, n: usize) -> Result<Self> {
        if n == 0 || rows == 0 || cols == 0 {
            return Err(Error::Shape(format!(
                "auto factorization needs n, I, J ≥ 1 (got n={n}, {rows}×{cols})"
            )));
        }
        let (_, rf) = factor_or_pad(rows, n);
        let (_, cf) = factor_or_pad(cols, n);
        let (rf, cf) = best_arrangement(&rf, &cf);
        Self::new(rf, cf, rows, cols)
    }

    /// OPF's long 1-padded chain: `n - len` ones are inserted after the first factor of each
    /// list, e.g. ([64, 48], [32, 24], 11) → [64, 1×9, 48] × [32, 1×9, 24].
    pub fn one_padded_chain(rows: &[usize], cols: &[usize], n: usize) -> Result<Self> {
        let pad = |f: &[usize]| -> Result<Vec<usize>> {
            if f.is_empty() || f.len() > n {
                return Err(Error::Shape(format!("cannot stretch {f:?} to {n} sites")));
            }
            let mut v = vec![f[0]];
            v.extend(std::iter::repeat_n(1, n - f.len()));
            v.extend_from_slice(&f[1..]);
            Ok(v)
        };
        Self::exact(pad(rows)?, pad(cols)?)
    }

    /// OPF's chain for a `rows × cols` matrix over `sites` sites (methods.md §3): each size is
    /// split into two factors by [`opf_split`], and for `sites > 2` the chain is stretched with
    /// 1s between them ([`MpoShape::one_padded_chain`]); `sites == 2` is OPF-SVD. BERT-base
    /// 3072×768 over 11 sites gives the paper's [64,1×9,48] × [32,1×9,24].
    pub fn opf_chain(rows: usize, cols: usize, sites: usize) -> Result<Self> {
        if !(2..=OPF_MAX_SITES).contains(&sites) {
            return Err(Error::Shape(format!(
                "an OPF chain needs 2..={OPF_MAX_SITES} sites, got {sites}"
            )));
        }
        let split = |d: usize| -> Result<[usize; 2]> {
            match opf_split(d) {
                Some((a, b)) => Ok([a, b]),
                None => Err(Error::Shape(format!(
                    "{d} has no split into two factors > 1, so no OPF chain factors the {rows}×{cols} matrix"
                ))),
            }
        };
        Self::one_padded_chain(&split(rows)?, &split(cols)?, sites)
    }

    /// Shape from the per-dimension factor table of the papers' code when both sizes are listed
    /// for this n (see [`table_factors`]), otherwise [`MpoShape::auto`].
    pub fn from_table_or_auto(rows: usize, cols: usize, n: usize) -> Result<Self> {
        match (table_factors(rows, n), table_factors(cols, n)) {
            (Some(r), Some(c)) => Self::exact(r, c),
            _ => Self::auto(rows, cols, n),
        }
    }
}

fn product(f: &[usize]) -> usize {
    f.iter().product()
}

/// Longest OPF chain accepted: every inner site holds a d×d matrix, so the chain's size grows
/// linearly with the sites (the released code's longest has 15).
pub const OPF_MAX_SITES: usize = 64;

/// OPF's two-factor split of a size: the smallest divisor a ≥ √d and b = d / a (3072 → 64·48,
/// 768 → 32·24, 1024 → 32·32, the paper's factors). `None` when d has no divisor between 1 and
/// d (a prime, or d < 4): the chain would then not factor that side.
pub fn opf_split(d: usize) -> Option<(usize, usize)> {
    if d < 4 {
        return None;
    }
    let mut a = (d as f64).sqrt().floor() as usize;
    while a * a < d {
        a += 1;
    }
    while a < d && d % a != 0 {
        a += 1;
    }
    (a < d).then(|| (a, d / a))
}

/// The most even split of `value` into exactly n factors (1s allowed), sorted ascending:
/// minimises the largest factor, then the sum of squares. Exhaustive over multiplicative
/// partitions, which stay small for the sizes of interest.
pub fn balanced_factors(value: usize, n: usize) -> Vec<usize> {
    assert!(value >= 1 && n >= 1);
    let mut best: Option<(usize, usize, Vec<usize>)> = None;
    let mut cur = Vec::with_capacity(n);
    fn rec(
        rem: usize,
        slots: usize,
        min_f: usize,
        cur: &mut Vec<usize>,
        best: &mut Option<(usize, usize, Vec<usize>)>,
    ) {
        if slots == 1 {
            if rem < min_f {
                return;
            }
            cur.push(rem);
            let mx = rem;
            let ss: usize = cur.iter().map(|f| f * f).sum();
            let better = match best {
                None => true,
                Some((bm, bs, _)) => (mx, ss) < (*bm, *bs),
            };
            if better {
                *best = Some((mx, ss, cur.clone()));
            }
            cur.pop();
            return;
        }
        // Factors are non-decreasing, so the current one satisfies f^slots ≤ rem; the largest
        // factor is at least the final remainder, so stop once f alone exceeds the best max.
        let mut f = min_f;
        while pow_le(f, slots, rem) {
            #[allow(clippy::manual_is_multiple_of)] // is_multiple_of needs Rust 1.87; MSRV is 1.85
            if rem % f == 0 {
                if let Some((bm, _, _)) = best {
                    if f > *bm {
                        break;
                    }
                }
                cur.push(f);
                rec(rem / f, slots - 1, f, cur, best);
                cur.pop();
            }
            f += 1;
        }
    }
    rec(value, n, 1, &mut cur, &mut best);
    best.expect("value always splits as 1·…·1·value").2
}

fn pow_le(f: usize, e: usize, bound: usize) -> bool {
    let mut acc: usize = 1;
    for _ in 0..e {
        acc = match acc.checked_mul(f) {
            Some(a) if a <= bound => a,
            _ => return false,
        };
    }
    true
}

/// Largest factor accepted before a size counts as "non-factorable" and gets padded.
fn factor_limit(value: usize, n: usize) -> usize {
    let root = (value as f64).powf(1.0 / n as f64).ceil() as usize;
    (2 * root).max(16)
}

#[allow(clippy::manual_is_multiple_of)] // is_multiple_of needs Rust 1.87; MSRV is 1.85
fn is_smooth_235(mut v: usize) -> bool {
    for p in [2, 3, 5] {
        while v % p == 0 {
            v /= p;
        }
    }
    v == 1
}

/// Splits `value` into n balanced factors, padding it first when its balanced split has a
/// factor above the limit (a large prime, e.g. BERT's 30522 = 2·3·5087). The padded size is
/// the smallest 2·3·5-smooth size ≥ value whose balanced split fits the limit (30522 → 30720,
/// the size used by the papers' code). Returns (padded size, ascending factors).
pub fn factor_or_pad(value: usize, n: usize) -> (usize, Vec<usize>) {
    let limit = factor_limit(value, n);
    let f = balanced_factors(value, n);
    if *f.last().unwrap() <= limit {
        return (value, f);
    }
    let mut p = value + 1;
    loop {
        if is_smooth_235(p) {
            let f = balanced_factors(p, n);
            if *f.last().unwrap() <= limit {
                return (p, f);
            }
        }
        p += 1;
    }
}

/// Distinct permutations of a multiset (input sorted ascending), in lexicographic order.
fn distinct_permutations(sorted: &[usize], cap: usize) -> Option<Vec<Vec<usize>>> {
    let mut out = Vec::new();
    let mut v = sorted.to_vec();
    loop {
        out.push(v.clone());
        if out.len() > cap {
            return None;
        }
        // next lexicographic permutation
        let n = v.len();
        let Some(i) = (0..n.saturating_sub(1)).rev().find(|&i| v[i] < v[i + 1]) else {
            return Some(out);
        };
        let j = (i + 1..n).rev().find(|&j| v[j] > v[i]).unwrap();
        v.swap(i, j);
        v[i + 1..].reverse();
    }
}

fn params_of(rows: &[usize], cols: &[usize]) -> usize {
    MpoShape {
        row_factors: rows.to_vec(),
        col_factors: cols.to_vec(),
        orig_rows: 1,
        orig_cols: 1,
    }
    .full_params()
}

/// Orders the two factor multisets to minimise the exact parameter count. Exhaustive when the
/// number of arrangements is small (always for n ≤ 5), else swap-based hill climbing.
fn best_arrangement(rows: &[usize], cols: &[usize]) -> (Vec<usize>, Vec<usize>) {
    const CAP: usize = 4096;
    let mut rs = rows.to_vec();
    let mut cs = cols.to_vec();
    rs.sort_unstable();
    cs.sort_unstable();
    if let (Some(rp), Some(cp)) = (
        distinct_permutations(&rs, CAP),
        distinct_permutations(&cs, CAP),
    ) {
        if rp.len() * cp.len() <= 200_000 {
            let mut best: Option<(usize, Vec<usize>, Vec<usize>)> = None;
            for r in &rp {
                for c in &cp {
                    let p = params_of(r, c);
                    if best.as_ref().is_none_or(|(bp, _, _)| p < *bp) {
                        best = Some((p, r.clone(), c.clone()));
                    }
                }
            }
            let (_, r, c) = best.unwrap();
            return (r, c);
        }
    }
    // Hill climbing from a symmetric start: large row factors first, large column factors last.
    let mut r = rs.clone();
    r.reverse();
    let mut c = cs;
    let mut best = params_of(&r, &c);
    loop {
        let mut improved = false;
        for which in 0..2 {
            let n = r.len();
            for a in 0..n {
                for b in a + 1..n {
                    let v = if which == 0 { &mut r } else { &mut c };
                    if v[a] == v[b] {
                        continue;
                    }
                    v.swap(a, b);
                    let p = params_of(&r, &c);
                    if p < best {
                        best = p;
                        improved = true;
                    } else {
                        let v = if which == 0 { &mut r } else { &mut c };
                        v.swap(a, b);
                    }
                }
            }
        }
        if !improved {
            return (r, c);
        }
    }
}

/// Per-dimension factor lists used by the papers' code (MPOBERT json, ALBERT/BERT/T5 configs):
/// `table_factors(768, 5) = [4,4,4,4,3]`, n ∈ {2,3,5,7,9} for 768, {2,3,5} for 3072.
pub fn table_factors(dim: usize, n: usize) -> Option<Vec<usize>> {
    let v: &[usize] = match (dim, n) {
        (768, 2) => &[32, 24],
        (768, 3) => &[8, 12, 8],
        (768, 5) => &[4, 4, 4, 4, 3],
        (768, 7) => &[2, 2, 4, 4, 3, 2, 2],
        (768, 9) => &[2, 2, 2, 2, 3, 2, 2, 2, 2],
        (3072, 2) => &[64, 48],
        (3072, 3) => &[12, 16, 16],
        (3072, 5) => &[4, 4, 8, 6, 4],
        (1024, 5) => &[4, 4, 4, 4, 4],
        (2048, 5) => &[4, 4, 8, 4, 4],
        (4096, 5) => &[4, 4, 8, 8, 4],
        (2304, 5) => &[4, 4, 8, 6, 3],
        (50400, 5) => &[5, 10, 14, 12, 6],
        (128, 5) => &[2, 2, 4, 4, 2],
        (30000, 5) => &[5, 10, 10, 10, 6],
        (30720, 5) => &[6, 8, 10, 8, 8],
        (32768, 5) => &[8, 8, 8, 8, 8],
        _ => return None,
    };
    Some(v.to_vec())
}

/// A named shape from the papers' code (methods.md §0 table and OPF chains).
#[derive(Clone, Debug)]
pub struct Preset {
    pub name: &'static str,
    pub description: &'static str,
    pub shape: MpoShape,
}

fn ones(k: usize) -> Vec<usize> {
    vec![1; k]
}

fn chain(first: usize, inner_ones: usize, rest: &[usize]) -> Vec<usize> {
    let mut v = vec![first];
    v.extend(ones(inner_ones));
    v.extend_from_slice(rest);
    v
}

/// All named presets. Shapes follow the stored-weight convention (rows = out_features).
pub fn presets() -> Vec<Preset> {
    let ex = |r: Vec<usize>, c: Vec<usize>| MpoShape::exact(r, c).expect("preset is valid");
    let pad = |r: Vec<usize>, c: Vec<usize>, or: usize, oc: usize| {
        MpoShape::new(r, c, or, oc).expect("preset is valid")
    };
    let p = |name, description, shape| Preset {
        name,
        description,
        shape,
    };
    vec![
        p(
            "balanced-768x768",
            "MPOP appendix balanced attention: bonds 12,192,192,12, 663,840 params",
            ex(vec![3, 4, 4, 4, 4], vec![4, 4, 4, 4, 3]),
        ),
        p(
            "albert-768x768",
            "ALBERT default / MPOBERT \"768\":\"5\": bonds 16,256,144,9, 676,433 params",
            ex(vec![4, 4, 4, 4, 3], vec![4, 4, 4, 4, 3]),
        ),
        p(
            "ffn-in-3072x768",
            "ALBERT/T5-base FFN-in (stored 3072×768): bonds 12,192,384,16, 2,544,016 params",
            ex(vec![4, 4, 8, 6, 4], vec![3, 4, 4, 4, 4]),
        ),
        p(
            "ffn-out-768x3072",
            "FFN-out, the transpose of ffn-in-3072x768",
            ex(vec![3, 4, 4, 4, 4], vec![4, 4, 8, 6, 4]),
        ),
        p(
            "bert-ffn-in-3072x768",
            "BERT FFN-in in the MPOE BERT code",
            ex(vec![8, 4, 4, 4, 6], vec![3, 4, 4, 4, 4]),
        ),
        p(
            "bert-ffn-out-768x3072",
            "BERT FFN-out, transpose of bert-ffn-in-3072x768",
            ex(vec![3, 4, 4, 4, 4], vec![8, 4, 4, 4, 6]),
        ),
        p(
            "albert-emb-30000x128",
            "ALBERT word embedding: bonds 10,200,480,12, 4.11M params",
            ex(vec![5, 10, 10, 10, 6], vec![2, 2, 4, 4, 2]),
        ),
        p(
            "bert-emb-30522x768",
            "BERT word embedding, vocab zero-padded 30522 → 30720",
            pad(vec![6, 8, 10, 8, 8], vec![4, 4, 4, 4, 3], 30522, 768),
        ),
        p(
            "t5-emb-32128x768",
            "T5-base embedding / tied LM head, padded 32128 → 32768",
            pad(vec![8, 8, 8, 8, 8], vec![3, 4, 4, 4, 4], 32128, 768),
        ),
        p(
            "t5-emb-32128x1024",
            "T5-large embedding / tied LM head, padded 32128 → 32768",
            pad(vec![8, 8, 8, 8, 8], vec![4, 4, 4, 4, 4], 32128, 1024),
        ),
        p(
            "gpt2-c-attn-2304x768",
            "GPT-2 c_attn (MPOBERT json 2304)",
            ex(vec![4, 4, 8, 6, 3], vec![4, 4, 4, 4, 3]),
        ),
        p(
            "mpobert-1024x1024",
            "MPOBERT json 1024, n = 5",
            ex(vec![4; 5], vec![4; 5]),
        ),
        p(
            "mpobert-4096x1024",
            "MPOBERT json 4096×1024 FFN-in, n = 5",
            ex(vec![4, 4, 8, 8, 4], vec![4, 4, 4, 4, 4]),
        ),
        p(
            "mpobert-2048x2048",
            "MPOBERT json 2048, n = 5",
            ex(vec![4, 4, 8, 4, 4], vec![4, 4, 8, 4, 4]),
        ),
        p(
            "mpobert-50400x768",
            "MPOBERT json 50400 (vocab) × 768, n = 5",
            ex(vec![5, 10, 14, 12, 6], vec![4, 4, 4, 4, 3]),
        ),
        p(
            "mpobert-768x768-n2",
            "MPOBERT json 768, n = 2",
            ex(vec![32, 24], vec![32, 24]),
        ),
        p(
            "mpobert-768x768-n3",
            "MPOBERT json 768, n = 3",
            ex(vec![8, 12, 8], vec![8, 12, 8]),
        ),
        p(
            "mpobert-768x768-n7",
            "MPOBERT json 768, n = 7",
            ex(vec![2, 2, 4, 4, 3, 2, 2], vec![2, 2, 4, 4, 3, 2, 2]),
        ),
        p(
            "mpobert-768x768-n9",
            "MPOBERT json 768, n = 9",
            ex(
                vec![2, 2, 2, 2, 3, 2, 2, 2, 2],
                vec![2, 2, 2, 2, 3, 2, 2, 2, 2],
            ),
        ),
        p(
            "mpobert-3072x768-n2",
            "MPOBERT json 3072×768, n = 2",
            ex(vec![64, 48], vec![32, 24]),
        ),
        p(
            "mpobert-3072x768-n3",
            "MPOBERT json 3072×768, n = 3",
            ex(vec![12, 16, 16], vec![8, 12, 8]),
        ),
        p(
            "opf-bert-base-ffn-3072x768",
            "OPF BERT-base FFN, 11 sites: all bonds 1152, 15.63M params (6.6×)",
            ex(chain(64, 9, &[48]), chain(32, 9, &[24])),
        ),
        p(
            "opf-bert-base-attn-768x768",
            "OPF BERT-base attention, 11 sites: all bonds 576, 3.91M params",
            ex(chain(32, 9, &[24]), chain(32, 9, &[24])),
        ),
        p(
            "opf-bert-large-ffn-4096x1024",
            "OPF BERT-large FFN, 11 sites",
            ex(chain(64, 9, &[64]), chain(32, 9, &[32])),
        ),
        p(
            "opf-bert-small-ffn-2048x512",
            "OPF BERT-small/medium FFN as in the code ([32,1…1,2,32])",
            ex(chain(32, 8, &[2, 32]), chain(32, 9, &[16])),
        ),
        p(
            "opf-svd-3072x768",
            "OPF-SVD variant, n = 2",
            ex(vec![64, 48], vec![32, 24]),
        ),
        p(
            "opf-15site-768x768",
            "OPF released code 15-site chain [32,1×13,24] (8.9×)",
            ex(chain(32, 13, &[24]), chain(32, 13, &[24])),
        ),
        p(
            "opf-15site-3072x768",
            "OPF released code 15-site FFN chain [64,1×13,48] × [32,1×13,24]",
            ex(chain(64, 13, &[48]), chain(32, 13, &[24])),
        ),
        p(
            "opf-svd-768x768",
            "OPF-SVD attention, n = 2",
            ex(vec![32, 24], vec![32, 24]),
        ),
        p(
            "opf-minilm-attn-384x384",
            "OPF 11-site chain for MiniLM attention: [24,1×9,16] × [24,1×9,16], bonds 256",
            ex(chain(24, 9, &[16]), chain(24, 9, &[16])),
        ),
        p(
            "opf-minilm-ffn-in-1536x384",
            "OPF 11-site chain for MiniLM FFN-in: [48,1×9,32] × [24,1×9,16], bonds 512",
            ex(chain(48, 9, &[32]), chain(24, 9, &[16])),
        ),
        p(
            "opf-smollm2-attn-576x576",
            "OPF 11-site chain for SmolLM2 q/o: [24,1×9,24] × [24,1×9,24], bonds 576",
            ex(chain(24, 9, &[24]), chain(24, 9, &[24])),
        ),
        p(
            "opf-smollm2-ffn-in-1536x576",
            "OPF 11-site chain for SmolLM2 gate/up: [48,1×9,32] × [24,1×9,24], bonds 768",
            ex(chain(48, 9, &[32]), chain(24, 9, &[24])),
        ),
        p(
            "opf-qwen-attn-896x896",
            "OPF 11-site chain for Qwen2.5-0.5B q/o: [32,1×9,28] × [32,1×9,28], bonds 784",
            ex(chain(32, 9, &[28]), chain(32, 9, &[28])),
        ),
        p(
            "opf-qwen-ffn-in-4864x896",
            "OPF 11-site chain for Qwen2.5-0.5B gate/up: [76,1×9,64] × [32,1×9,28], bonds 1792",
            ex(chain(76, 9, &[64]), chain(32, 9, &[28])),
        ),
        p(
            "opf-bart-768x768",
            "OPF BART 7-site config (1.25×)",
            ex(vec![3, 4, 1, 1, 4, 4, 4], vec![4, 4, 1, 1, 4, 4, 3]),
        ),
    ]
}

/// Looks a preset up by name.
pub fn preset(name: &str) -> Result<MpoShape> {
    let all = presets();
    all.iter()
        .find(|p| p.name == name)
        .map(|p| p.shape.clone())
        .ok_or_else(|| Error::UnknownPreset {
            name: name.to_string(),
            known: all.iter().map(|p| p.name).collect::<Vec<_>>().join(", "),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balanced_splits() {
        assert_eq!(balanced_factors(576, 5), vec![3, 3, 4, 4, 4]);
        assert_eq!(balanced_factors(768, 5), vec![3, 4, 4, 4, 4]);
        assert_eq!(balanced_factors(1536, 5), vec![4, 4, 4, 4, 6]);
        assert_eq!(balanced_factors(49152, 5), vec![8, 8, 8, 8, 12]);
        assert_eq!(balanced_factors(7, 3), vec![1, 1, 7]);
        assert_eq!(balanced_factors(1, 4), vec![1, 1, 1, 1]);
    }

    #[test]
    fn padding_matches_papers() {
        assert_eq!(factor_or_pad(30522, 5).0, 30720);
        assert_eq!(factor_or_pad(768, 5).0, 768);
        let s = MpoShape::auto(30522, 768, 5).unwrap();
        assert_eq!(s.rows(), 30720);
        assert_eq!(s.orig_rows, 30522);
        assert!(s.is_padded());
    }

    #[test]
    fn auto_768_is_the_balanced_preset() {
        let s = MpoShape::auto(768, 768, 5).unwrap();
        assert_eq!(s, preset("balanced-768x768").unwrap());
        assert_eq!(s.full_params(), 663_840);
    }

    #[test]
    fn one_padded_chain_matches_opf() {
        let s = MpoShape::one_padded_chain(&[64, 48], &[32, 24], 11).unwrap();
        assert_eq!(s, preset("opf-bert-base-ffn-3072x768").unwrap());
        assert_eq!(s.full_params(), 15_630_336);
        assert!(s.full_bonds()[1..11].iter().all(|&d| d == 1152));
    }

    #[test]
    fn presets_cover_their_sizes() {
        for p in presets() {
            p.shape.validate().unwrap();
        }
        assert!(preset("nope").is_err());
    }

    #[test]
    fn max_bond_for_params_is_tight() {
        let s = preset("balanced-768x768").unwrap();
        let d = s.max_bond_for_params(589_824 / 2);
        assert!(s.params_for(&s.capped_bonds(d)) <= 589_824 / 2);
        assert!(s.params_for(&s.capped_bonds(d + 1)) > 589_824 / 2);
    }
}
