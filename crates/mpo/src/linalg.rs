//! Thin wrappers over faer for row-major buffers: the rest of the crate stores tensors as flat
//! row-major `Vec`s (the layout of torch/candle/numpy), and only these helpers touch faer views.

use crate::error::{Error, Result};
use crate::scalar::Scalar;
use faer::linalg::matmul::triangular::BlockStructure;
use faer::{Accum, MatMut, MatRef, Par, Side};

/// faer's global setting (default: rayon over all threads), so callers can pin it with
/// `faer::set_global_parallelism`; tiny products run sequentially to skip dispatch overhead.
fn par_for(work: usize) -> Par {
    if work < 1 << 18 {
        Par::Seq
    } else {
        faer::get_global_parallelism()
    }
}

/// Row-major view of a buffer.
pub fn view<R: Scalar>(a: &[R], rows: usize, cols: usize) -> MatRef<'_, R> {
    MatRef::from_row_major_slice(a, rows, cols)
}

/// C = op(A)·op(B) for row-major A, B; returns row-major C (m×n). `ta`/`tb` transpose the
/// stored matrices: A is stored k×m when `ta`, else m×k (same for B).
pub fn gemm<R: Scalar>(
    a: &[R],
    ta: bool,
    b: &[R],
    tb: bool,
    m: usize,
    k: usize,
    n: usize,
) -> Vec<R> {
    let mut c = crate::permute::zeroed(m * n);
    gemm_into(a, ta, b, tb, m, k, n, &mut c);
    c
}

/// Like [`gemm`], writing into `c`.
#[allow(clippy::too_many_arguments)]
pub fn gemm_into<R: Scalar>(
    a: &[R],
    ta: bool,
    b: &[R],
    tb: bool,
    m: usize,
    k: usize,
    n: usize,
    c: &mut [R],
) {
    assert_eq!(a.len(), m * k);
    assert_eq!(b.len(), k * n);
    assert_eq!(c.len(), m * n);
    let av = if ta {
        view(a, k, m).transpose()
    } else {
        view(a, m, k)
    };
    let bv = if tb {
        view(b, n, k).transpose()
    } else {
        view(b, k, n)
    };
    let cv = MatMut::from_row_major_slice_mut(c, m, n);
    faer::linalg::matmul::matmul(cv, Accum::Replace, av, bv, R::of(1.0), par_for(m * n * k));
}

/// Elements of one product panel (4 MiB of f64): small enough to stay in the L3 cache between
/// the GEMM that writes it and the copy that moves it, large enough that re-packing the
/// shared operand once per panel costs < 1% of the multiply-adds.
pub(crate) const PANEL: usize = 1 << 19;

/// C (m×n) = A (m×k) · B[:, c0..c0+n] where B is row-major with row stride `ldb`.
#[allow(clippy::too_many_arguments)]
pub fn gemm_strided_rhs<R: Scalar>(
    a: &[R],
    b: &[R],
    c0: usize,
    m: usize,
    k: usize,
    n: usize,
    ldb: usize,
    c: &mut [R],
) {
    assert!(a.len() == m * k && c.len() == m * n && c0 + n <= ldb && b.len() >= k * ldb);
    if m == 0 || n == 0 {
        return;
    }
    let bv = MatRef::from_row_major_slice_with_stride(&b[c0..], k, n, ldb);
    let cv = MatMut::from_row_major_slice_mut(c, m, n);
    faer::linalg::matmul::matmul(
        cv,
        Accum::Replace,
        view(a, m, k),
        bv,
        R::of(1.0),
        par_for(m * n * k),
    );
}

/// Makes `v` at least `len` long. Callers overwrite what they use, so old contents may stay.
pub(crate) fn grow<R: Scalar>(v: &mut Vec<R>, len: usize) {
    if v.len() < len {
        v.resize(len, R::of(0.0));
    }
}

/// In place: `buf[..m·n] = A·X` where X is `buf[..k·n]` (row-major k×n) and A is row-major m×k,
/// m ≤ k. Column j of the product depends only on column j of X and lands in one of X's first
/// m rows, so column panels can overwrite their own input: no second W-sized buffer (on a
/// 226 MB embedding, faulting one in costs ≈ 0.15 s).
/// `tmp` is scratch space, grown (never shrunk or cleared) as needed.
pub fn gemm_left_in_place<R: Scalar>(
    a: &[R],
    m: usize,
    k: usize,
    buf: &mut [R],
    n: usize,
    tmp: &mut Vec<R>,
) {
    assert!(m <= k && a.len() == m * k && buf.len() >= k * n);
    if m == 0 || n == 0 {
        return;
    }
    let w = (PANEL / m).max(256).min(n);
    grow(tmp, m * w);
    let av = view(a, m, k);
    let mut j0 = 0;
    while j0 < n {
        let wj = w.min(n - j0);
        {
            let xv = MatRef::from_row_major_slice_with_stride(&buf[j0..], k, wj, n);
            let tv = MatMut::from_row_major_slice_mut(&mut tmp[..m * wj], m, wj);
            faer::linalg::matmul::matmul(
                tv,
                Accum::Replace,
                av,
                xv,
                R::of(1.0),
                par_for(m * wj * k),
            );
        }
        for i in 0..m {
            buf[i * n + j0..i * n + j0 + wj].copy_from_slice(&tmp[i * wj..(i + 1) * wj]);
        }
        j0 += wj;
    }
}

/// In place: `buf[..m·n] = X·B` where X is `buf[..m·k]` (row-major m×k) and B is row-major k×n,
/// n ≤ k. Row panels go front to back: panel rows [r0, r1) land in `buf[r0·n..r1·n]`, which
/// only covers input rows < r1, all already consumed.
/// `tmp` as in [`gemm_left_in_place`].
pub fn gemm_right_in_place<R: Scalar>(
    buf: &mut [R],
    m: usize,
    k: usize,
    b: &[R],
    n: usize,
    tmp: &mut Vec<R>,
) {
    assert!(n <= k && b.len() == k * n && buf.len() >= m * k);
    if m == 0 || n == 0 {
        return;
    }
    let h = (PANEL / n).max(16).min(m);
    grow(tmp, h * n);
    let bv = view(b, k, n);
    let mut r0 = 0;
    while r0 < m {
        let hr = h.min(m - r0);
        {
            let xv = view(&buf[r0 * k..(r0 + hr) * k], hr, k);
            let tv = MatMut::from_row_major_slice_mut(&mut tmp[..hr * n], hr, n);
            faer::linalg::matmul::matmul(
                tv,
                Accum::Replace,
                xv,
                bv,
                R::of(1.0),
                par_for(hr * n * k),
            );
        }
        buf[r0 * n..(r0 + hr) * n].copy_from_slice(&tmp[..hr * n]);
        r0 += hr;
    }
}

/// Symmetric Gram matrix of a row-major `rows×cols` matrix A: A·Aᵀ (`rows_side`) or AᵀA.
/// Only one triangle is computed (half the flops), then mirrored.
pub fn gram<R: Scalar>(a: &[R], rows: usize, cols: usize, rows_side: bool) -> Vec<R> {
    let av = view(a, rows, cols);
    let (x, dim) = if rows_side {
        (av, rows)
    } else {
        (av.transpose(), cols)
    };
    let mut g = vec![R::of(0.0); dim * dim];
    {
        let gv = MatMut::from_row_major_slice_mut(&mut g, dim, dim);
        faer::linalg::matmul::triangular::matmul(
            gv,
            BlockStructure::TriangularLower,
            Accum::Replace,
            x,
            BlockStructure::Rectangular,
            x.transpose(),
            BlockStructure::Rectangular,
            R::of(1.0),
            par_for(dim * dim * if rows_side { cols } else { rows }),
        );
    }
    for i in 0..dim {
        for j in i + 1..dim {
            g[i * dim + j] = g[j * dim + i];
        }
    }
    g
}

/// Eigendecomposition of a symmetric row-major n×n matrix, eigenvalues in descending order.
/// Returns (eigenvalues, eigenvectors as the columns of a row-major n×n matrix).
pub fn eigh_desc<R: Scalar>(g: &[R], n: usize) -> Result<(Vec<f64>, Vec<R>)> {
    let evd =
        faer::linalg::solvers::SelfAdjointEigen::new(view(g, n, n), Side::Lower).map_err(|e| {
            Error::Linalg(format!(
                "symmetric eigendecomposition of a {n}×{n} Gram matrix: {e:?}"
            ))
        })?;
    let s = evd.S().column_vector();
    let u = evd.U();
    let vals: Vec<f64> = (0..n).rev().map(|i| s[i].f()).collect();
    let mut vecs = vec![R::of(0.0); n * n];
    for r in 0..n {
        for c in 0..n {
            vecs[r * n + c] = u[(r, n - 1 - c)];
        }
    }
    Ok((vals, vecs))
}

/// Thin SVD of a row-major `rows×cols` matrix: (U row-major rows×r, σ descending, Vᵀ
/// row-major r×cols), r = min(rows, cols).
pub fn thin_svd<R: Scalar>(
    a: &[R],
    rows: usize,
    cols: usize,
) -> Result<(Vec<R>, Vec<f64>, Vec<R>)> {
    let svd = view(a, rows, cols)
        .thin_svd()
        .map_err(|e| Error::Linalg(format!("thin SVD of a {rows}×{cols} matrix: {e:?}")))?;
    let r = rows.min(cols);
    let (u, v) = (svd.U(), svd.V());
    let s = svd.S().column_vector();
    let mut uo = vec![R::of(0.0); rows * r];
    for i in 0..rows {
        for j in 0..r {
            uo[i * r + j] = u[(i, j)];
        }
    }
    let mut vt = vec![R::of(0.0); r * cols];
    for j in 0..r {
        for i in 0..cols {
            vt[j * cols + i] = v[(i, j)];
        }
    }
    Ok((uo, (0..r).map(|i| s[i].f()).collect(), vt))
}

/// Thin QR of a row-major `rows×cols` matrix: (Q row-major rows×r, R row-major r×cols),
/// r = min(rows, cols).
pub fn thin_qr<R: Scalar>(a: &[R], rows: usize, cols: usize) -> (Vec<R>, Vec<R>) {
    let qr = view(a, rows, cols).qr();
    let q = qr.compute_thin_Q();
    let rr = qr.thin_R();
    let r = rows.min(cols);
    let mut qo = vec![R::of(0.0); rows * r];
    for i in 0..rows {
        for j in 0..r {
            qo[i * r + j] = q[(i, j)];
        }
    }
    let mut ro = vec![R::of(0.0); r * cols];
    for i in 0..r {
        for j in i..cols {
            ro[i * cols + j] = rr[(i, j)];
        }
    }
    (qo, ro)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemm_transposes() {
        // A 2×3, B 3×2
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0f64];
        let b = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0f64];
        assert_eq!(
            gemm(&a, false, &b, false, 2, 3, 2),
            vec![4.0, 5.0, 10.0, 11.0]
        );
        // Aᵀ·A (3×3) via stored A 2×3 transposed
        let g = gemm(&a, true, &a, false, 3, 2, 3);
        assert_eq!(g, gram(&a, 2, 3, false));
        assert_eq!(gemm(&a, false, &a, true, 2, 3, 2), gram(&a, 2, 3, true));
    }

    #[test]
    fn in_place_products_match_gemm() {
        // sizes around the panel width/height so that several panels (and a ragged last one)
        // are exercised, plus the single-panel case
        let lcg = |n: usize, seed: u64| -> Vec<f64> {
            let mut x = seed;
            (0..n)
                .map(|_| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (x >> 11) as f64 / (1u64 << 53) as f64 - 0.5
                })
                .collect()
        };
        // panels may block the sum differently from one big product: round-off only
        let close = |got: &[f64], want: &[f64], what: &str| {
            assert_eq!(got.len(), want.len());
            for (i, (g, w)) in got.iter().zip(want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-12 * (1.0 + w.abs()),
                    "{what} [{i}]: {g} vs {w}"
                );
            }
        };
        // left: A m×k times X k×n, m ≤ k (second case: 3 column panels, the last ragged)
        for (m, k, n) in [(3, 5, 7), (40, 50, PANEL / 40 * 2 + 300), (50, 50, 20)] {
            let a = lcg(m * k, 1);
            let x = lcg(k * n, 2);
            let want = gemm(&a, false, &x, false, m, k, n);
            let mut buf = x.clone();
            gemm_left_in_place(&a, m, k, &mut buf, n, &mut Vec::new());
            close(&buf[..m * n], &want, "left");
        }
        // right: X m×k times B k×n, n ≤ k (second case: 3 row panels, the last ragged)
        for (m, k, n) in [(7, 5, 3), (PANEL / 30 * 2 + 17, 37, 30), (20, 50, 50)] {
            let x = lcg(m * k, 3);
            let b = lcg(k * n, 4);
            let want = gemm(&x, false, &b, false, m, k, n);
            let mut buf = x.clone();
            gemm_right_in_place(&mut buf, m, k, &b, n, &mut Vec::new());
            close(&buf[..m * n], &want, "right");
        }
    }

    #[test]
    fn eigh_and_svd_agree() {
        let a: Vec<f64> = (0..12)
            .map(|i| ((i * 7 % 5) as f64) - 1.5 + 0.1 * i as f64)
            .collect();
        let (_, s, _) = thin_svd(&a, 3, 4).unwrap();
        let (ev, _) = eigh_desc(&gram(&a, 3, 4, true), 3).unwrap();
        for (x, y) in s.iter().zip(&ev) {
            assert!((x * x - y).abs() < 1e-10);
        }
        let (q, r) = thin_qr(&a, 4, 3);
        let back = gemm(&q, false, &r, false, 4, 3, 3);
        for (x, y) in back.iter().zip(&a) {
            assert!((x - y).abs() < 1e-12);
        }
    }
}
