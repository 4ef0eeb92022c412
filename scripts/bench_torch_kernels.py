#!/usr/bin/env python3
"""Issue #8 peer baseline in PyTorch (CPU, f32): the GEMM shapes of crates/models/examples/bench_kernels.rs
and the MLP step of crates/methods/examples/bench_mlp_step.rs.

    python3 scripts/bench_torch_kernels.py [gemm|mlp|all] [--reps N] [--threads 2]

GEMM: y[m, n] = x[m, k] @ W[n, k].T (F.linear), best of N, GFLOP/s = 2mkn / t; m = 1 rows cycle over
copies of W (>= 128 MB in all) so the weight comes from memory as in decode, like the Rust bench.
MLP: 768 -> 3072 (GELU, erf) -> 768 with biases, 32*128 rows, loss = mean(y^2): forward, backward, one
torch.optim.AdamW step (foreach), and forward+backward with W1 frozen.
"""
import argparse
import time

import torch
import torch.nn.functional as F

SHAPES = [
    (4096, 768, 3072),
    (4096, 3072, 768),
    (2048, 576, 1536),
    (2048, 384, 1536),
    (128, 576, 1536),
    (128, 1536, 576),
    (128, 576, 192),
    (16, 576, 1536),
    (16, 1536, 576),
    (1, 576, 1536),
    (1, 576, 49152),
    (1, 1536, 576),
    (1, 576, 192),
]


def best(reps, f):
    f()
    b = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f()
        b = min(b, time.perf_counter() - t)
    return b


def gemm(reps):
    print(f"GEMM GFLOP/s (best of {reps}, {torch.get_num_threads()} threads)")
    print(f"{'m×k×n':>20} {'torch':>10}")
    with torch.no_grad():
        for m, k, n in SHAPES:
            x = torch.randn(m, k)
            if m == 1:
                copies = max(1, (128 << 20) // (4 * n * k))
                ws = [torch.randn(n, k) for _ in range(copies)]
                it = [0]

                def f():
                    F.linear(x, ws[it[0] % copies])
                    it[0] += 1

                r = reps * 10
            else:
                w = torch.randn(n, k)

                def f():
                    F.linear(x, w)

                r = reps
            t = best(r, f)
            print(f"{f'{m}×{k}×{n}':>20} {2 * m * k * n / t / 1e9:>10.1f}")
        m, k, n = 4096, 768, 3072
        x, w, g = torch.randn(m, k), torch.randn(n, k), torch.randn(m, n)
        fl = 2 * m * k * n / 1e9
        print(f"{'grad_x g·W':>20} {fl / best(reps, lambda: g @ w):>10.1f}")
        print(f"{'grad_W gᵀ·x':>20} {fl / best(reps, lambda: g.t() @ x):>10.1f}")


def mlp(reps):
    rows, d, h = 32 * 128, 768, 3072
    x = torch.randn(rows, d)
    w1 = (torch.randn(h, d) * 0.03).requires_grad_()
    b1 = torch.zeros(h, requires_grad=True)
    w2 = (torch.randn(d, h) * 0.03).requires_grad_()
    b2 = torch.zeros(d, requires_grad=True)
    opt = torch.optim.AdamW([w1, b1, w2, b2], lr=1e-3, weight_decay=0.01)

    def fwd(w1_):
        return F.linear(F.gelu(F.linear(x, w1_, b1)), w2, b2).pow(2).mean()

    def zero():
        for p in (w1, b1, w2, b2):
            p.grad = None

    t_f = best(reps, lambda: fwd(w1))

    def fb():
        zero()
        fwd(w1).backward()

    # backward alone: forward outside the timed region
    tb = float("inf")
    for _ in range(reps + 1):
        zero()
        loss = fwd(w1)
        t = time.perf_counter()
        loss.backward()
        tb = min(tb, time.perf_counter() - t)
    fb()
    t_o = best(reps, opt.step)

    def step():
        fb()
        opt.step()

    t_s = best(reps, step)
    w1c = w1.detach()

    def frozen():
        zero()
        fwd(w1c).backward()

    t_fr = best(reps, frozen)
    print(f"MLP {d}→{h}→{d} (GELU erf), {rows} rows, ms (best of {reps})")
    print(f"{'path':>10} {'forward':>10} {'backward':>10} {'AdamW':>10} {'step':>10} {'frozen W1 f+b':>14}")
    print(f"{'torch':>10} {t_f * 1e3:>10.0f} {tb * 1e3:>10.0f} {t_o * 1e3:>10.0f} {t_s * 1e3:>10.0f} {t_fr * 1e3:>14.0f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", nargs="?", default="all", choices=["gemm", "mlp", "all"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}")
    if a.what in ("gemm", "all"):
        gemm(a.reps)
    if a.what in ("mlp", "all"):
        mlp(min(a.reps, 3))


if __name__ == "__main__":
    main()
