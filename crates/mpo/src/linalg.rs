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
