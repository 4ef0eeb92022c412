#!/usr/bin/env python3
"""Reference numpy implementation of the seed MPO algorithm (methods.md §0), used as the
baseline for the Rust `mpo` crate's benchmark.

It follows the algorithm the papers' code uses, written from its description:
  1. reshape W[I, J] to [i_1..i_n, j_1..j_n], permute to (i_1, j_1, ..., i_n, j_n);
  2. left-to-right sweep of thin SVDs (np.linalg.svd, full_matrices=False) with untruncated
     bonds d_k = min(left, right): U becomes core k, diag(s)·Vt is carried on;
  3. canonical symmetric gauge: for each bond, a left factor (chain of SVDs from the left, each
     keeping diag(s)·Vt) and a right factor (chain from the right, keeping U·diag(s)); the SVD
     u·diag(lam)·v of their product gives the bond spectrum; p = right·vᵀ·lam^(-1/2) and
     q = lam^(-1/2)·uᵀ·left are absorbed into the neighbouring cores;
  4. truncation by one max bond: core k is sliced to [:d'_{k-1}, :, :, :d'_k];
  5. reconstruction: contract the cores, squeeze the boundary bonds, un-permute, reshape.

Matrices come from a counter-based splitmix64 → Box–Muller generator that mpo::bench
reproduces bit for bit (up to libm rounding), so errors can be compared with the Rust code.

Usage:
  python3 scripts/mpo_reference.py [--only SUBSTR] [--reps N] [--skip-embedding]
prints JSON with errors and seconds for each SmolLM2-135M matrix at full bond and at the
largest uniform bond whose parameter count is <= 50% of the dense matrix.
"""

import argparse
import json
import sys
import time

import numpy as np

MASK = np.uint64(0xFFFFFFFFFFFFFFFF)

# Shapes chosen by mpo::MpoShape::auto(rows, cols, 5) for the SmolLM2-135M matrices.
SMOLLM2 = [
    ("q_proj/o_proj 576x576", 576, 576, [3, 4, 4, 4, 3], [3, 4, 4, 4, 3]),
    ("k_proj/v_proj 192x576", 192, 576, [2, 3, 4, 4, 2], [3, 4, 4, 4, 3]),
    ("gate/up_proj 1536x576", 1536, 576, [4, 4, 6, 4, 4], [3, 4, 4, 4, 3]),
    ("down_proj 576x1536", 576, 1536, [3, 4, 4, 4, 3], [4, 4, 6, 4, 4]),
    ("embed_tokens 49152x576", 49152, 576, None, None),  # filled from the Rust output / below
]


def splitmix(seed, idx):
    """splitmix64 of (seed + (idx+1)·golden) for a uint64 index array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = np.uint64(seed) + (idx + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def gaussian_matrix(rows, cols, seed):
    """Same matrix as mpo::bench::gaussian_matrix."""
    e = np.arange(rows * cols, dtype=np.uint64)
    scale = 1.0 / float(1 << 53)
    u1 = (splitmix(seed, np.uint64(2) * e) >> np.uint64(11)).astype(np.float64) * scale
    u2 = (splitmix(seed, np.uint64(2) * e + np.uint64(1)) >> np.uint64(11)).astype(np.float64) * scale
    return (np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * np.pi * u2)).reshape(rows, cols)


class SeedMPO:
    """The seed algorithm for one factor shape (row factors split the stored rows = out)."""

    def __init__(self, row_factors, col_factors, max_bond=None):
        assert len(row_factors) == len(col_factors)
        self.rows = list(row_factors)
        self.cols = list(col_factors)
        self.n = len(self.rows)
        self.local = [a * b for a, b in zip(self.rows, self.cols)]
        self.full = self._bonds(None)
        self.kept = self._bonds(max_bond)

    def _bonds(self, cap):
        out = [1] * (self.n + 1)
        for k in range(1, self.n):
            left = int(np.prod(self.local[:k]))
            right = int(np.prod(self.local[k:]))
            out[k] = min(left, right) if cap is None else min(left, right, cap)
        return out

    def params(self, bonds):
        return sum(bonds[k] * self.local[k] * bonds[k + 1] for k in range(self.n))

    # step 1 + 2
    def sweep(self, w):
        t = w.reshape(self.rows + self.cols)
        order = [a for k in range(self.n) for a in (k, self.n + k)]
        res = np.transpose(t, order)
        cores = []
        for k in range(self.n - 1):
            res = res.reshape(self.full[k] * self.local[k], -1)
            u, s, vt = np.linalg.svd(res, full_matrices=False)
            cores.append(u.reshape(self.full[k], self.rows[k], self.cols[k], self.full[k + 1]))
            res = s[:, None] * vt
        cores.append(res.reshape(self.full[self.n - 1], self.rows[-1], self.cols[-1], 1))
        return cores

    # step 3: left and right canonical factors of every bond
    def left_factors(self, cores):
        left = [None] * (self.n + 1)
        _, s, vt = np.linalg.svd(cores[0].reshape(-1, cores[0].shape[3]), full_matrices=False)
        left[1] = s[:, None] * vt
        for k in range(1, self.n - 1):
            mat = np.tensordot(left[k], cores[k], axes=([1], [0]))
            _, s, vt = np.linalg.svd(mat.reshape(-1, mat.shape[-1]), full_matrices=False)
            left[k + 1] = s[:, None] * vt
        return left

    def right_factors(self, cores):
        right = [None] * (self.n + 1)
        last = cores[self.n - 1]
        u, s, _ = np.linalg.svd(last.reshape(last.shape[0], -1), full_matrices=False)
        right[self.n - 1] = u * s[None, :]
        for k in range(self.n - 2, 0, -1):
            mat = np.tensordot(cores[k], right[k + 1], axes=([3], [0]))
            u, s, _ = np.linalg.svd(mat.reshape(mat.shape[0], -1), full_matrices=False)
            right[k] = u * s[None, :]
        return right

    def gauge(self, cores):
        left = self.left_factors(cores)
        right = self.right_factors(cores)
        p = [None] * (self.n + 1)
        q = [None] * (self.n + 1)
        spectra = []
        for k in range(1, self.n):
            u, lam, v = np.linalg.svd(left[k] @ right[k])
            inv_sqrt = lam ** -0.5
            p[k] = (right[k] @ v.T) * inv_sqrt[None, :]
            q[k] = inv_sqrt[:, None] * (u.T @ left[k])
            spectra.append(lam)
        out = list(cores)
        out[0] = np.tensordot(out[0], p[1], axes=([3], [0]))
        out[-1] = np.tensordot(q[self.n - 1], out[-1], axes=([1], [0]))
        for k in range(1, self.n - 1):
            t = np.tensordot(q[k], out[k], axes=([1], [0]))
            out[k] = np.tensordot(t, p[k + 1], axes=([3], [0]))
        return out, spectra

    # step 4
    def truncate(self, cores):
        return [c[: self.kept[k], :, :, : self.kept[k + 1]] for k, c in enumerate(cores)]

    def decompose(self, w):
        cores = self.sweep(w)
        if self.n > 1:
            cores, spectra = self.gauge(cores)
        else:
            spectra = []
        return self.truncate(cores), spectra

    # step 5
    def reconstruct(self, cores):
        t = cores[0]
        for k in range(1, self.n):
            t = np.tensordot(t, cores[k], axes=([t.ndim - 1], [0]))
        t = t.reshape(t.shape[1:-1])
        order = [2 * k for k in range(self.n)] + [2 * k + 1 for k in range(self.n)]
        t = np.transpose(t, order)
        return t.reshape(int(np.prod(self.rows)), int(np.prod(self.cols)))


def max_bond_for_params(mpo, budget):
    """Largest uniform cap whose parameter count fits the budget (same rule as the Rust code)."""
    best = 1
    for d in range(1, max(mpo.full) + 1):
        if SeedMPO(mpo.rows, mpo.cols, d).params(SeedMPO(mpo.rows, mpo.cols, d).kept) <= budget:
            best = d
        else:
            break
    return best


def timed(reps, f):
    best, out = float("inf"), None
    for _ in range(max(reps, 1)):
        t = time.perf_counter()
        out = f()
        best = min(best, time.perf_counter() - t)
    return best, out


def bench_matrix(name, rows, cols, row_factors, col_factors, seed=42, budget=0.5, reps=3):
    w = gaussian_matrix(rows, cols, seed)
    norm = np.linalg.norm(w)
    full = SeedMPO(row_factors, col_factors)
    cap = max_bond_for_params(full, int(budget * rows * cols))
    results = []
    for setting, d in (("full", None), ("budget%d%%" % round(budget * 100), cap)):
        mpo = SeedMPO(row_factors, col_factors, d)
        td, (cores, spectra) = timed(reps, lambda: mpo.decompose(w))
        tr, what = timed(reps, lambda: mpo.reconstruct(cores))
        eps = [float(np.sqrt(np.sum(s[mpo.kept[k + 1]:] ** 2))) for k, s in enumerate(spectra)]
        results.append({
            "setting": setting,
            "max_bond": d,
            "bonds": mpo.kept,
            "params": int(sum(c.size for c in cores)),
            "rel_error": float(np.linalg.norm(what - w) / norm),
            "rel_bound": float(np.sqrt(sum(e * e for e in eps)) / norm),
            "decompose_s": td,
            "reconstruct_s": tr,
            "total_s": td + tr,
        })
    return {"name": name, "rows": rows, "cols": cols, "row_factors": list(row_factors),
            "col_factors": list(col_factors), "dtype": "f64", "implementation": "numpy seed",
            "results": results}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default=None)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--skip-embedding", action="store_true")
    ap.add_argument("--shapes", default=None,
                    help="JSON from bench_mpo (Rust): take names, sizes and factors from it")
    args = ap.parse_args(argv)
    cases = SMOLLM2
    if args.shapes:
        rust = json.load(open(args.shapes))
        cases = [(r["name"], r["rows"], r["cols"], r["row_factors"], r["col_factors"]) for r in rust["decompose"]]
    out = []
    for name, rows, cols, rf, cf in cases:
        if args.only and args.only not in name:
            continue
        if rows * cols > 10_000_000 and args.skip_embedding:
            continue
        if rf is None:
            rf, cf = [8, 8, 12, 8, 8], [3, 4, 4, 4, 3]  # = MpoShape::auto(49152, 576, 5)
        reps = min(args.reps, 1) if rows * cols > 10_000_000 else args.reps
        r = bench_matrix(name, rows, cols, rf, cf, reps=reps)
        print(name, json.dumps(r["results"]), file=sys.stderr)
        out.append(r)
    print(json.dumps({"numpy": np.__version__, "decompose": out}, indent=2))


if __name__ == "__main__":
    main()
