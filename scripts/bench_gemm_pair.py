#!/usr/bin/env python3
"""GEMM GFLOP/s, or the MLP training step, of mpolm and PyTorch in alternating rounds (issue #8
item 4).

    python3 scripts/bench_gemm_pair.py [--what gemm|mlp] [--rounds 3] [--threads 2] [--bin PATH]

This VM's speed drifts by up to 30% within minutes (other tenants), so one run of each tool at
different times says little about their ratio. This script runs `bench_kernels gemm` (every mpolm
variant, interleaved per repetition) and `bench_torch_kernels.py gemm` in turns, ROUNDS times each,
and reports the best GFLOP/s of every column over all rounds, with mpolm / torch ratios.
Build the example first: cargo build --release -p mpolm-models --example bench_kernels.

--what mlp does the same with `bench_mlp_step` (cargo build --release -p mpolm-methods --example
bench_mlp_step) and `bench_torch_kernels.py mlp`, keeping each column's fastest time (ms).
"""
import argparse
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def table(text):
    """{shape: {column: GFLOP/s}} from either tool's output."""
    rows, cols = {}, None
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] == "m×k×n":
            cols = parts[1:]
            continue
        if not cols or not parts:
            continue
        m = re.match(r"^\s*(\S+(?: \S+)?)\s+([\d.]+(?:\s+[\d.]+)*)\s*$", line)
        if not m:
            continue
        name, vals = m.group(1), [float(v) for v in m.group(2).split()]
        if name.startswith("grad"):
            # Backward rows print the candle column and the linear() column only.
            rows[name] = {"candle": vals[0], "linear()": vals[-1]} if len(vals) > 1 else {cols[0]: vals[0]}
        else:
            rows[name] = dict(zip(cols, vals))
    return rows


MLP_COLS = ["forward", "backward", "AdamW", "step", "frozen W1 f+b"]


def mlp_rows(text):
    """{path: {column: ms}} from either tool's MLP table."""
    rows = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 1 + len(MLP_COLS) and parts[0] in ("candle", "mpolm", "torch"):
            rows[parts[0]] = dict(zip(MLP_COLS, map(float, parts[1:])))
    return rows


def mlp_pair(a, env, target):
    bin_ = a.bin or os.path.join(target, "release/examples/bench_mlp_step")
    best = {}
    for r in range(a.rounds):
        for cmd in ([bin_], [sys.executable, os.path.join(HERE, "bench_torch_kernels.py"), "mlp",
                             "--threads", str(a.threads)]):
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            for path, cols in mlp_rows(out).items():
                b = best.setdefault(path, {})
                for c, v in cols.items():
                    b[c] = min(b.get(c, float("inf")), v)
        print(f"round {r + 1}/{a.rounds} done", file=sys.stderr)
    print(f"MLP step ms, best of {a.rounds} alternating rounds, {a.threads} threads")
    print("| path | " + " | ".join(MLP_COLS) + " |")
    print("|---|" + "---|" * len(MLP_COLS))
    for path, v in best.items():
        print(f"| {path} | " + " | ".join(f"{v[c]:.0f}" for c in MLP_COLS) + " |")
    if "mpolm" in best and "torch" in best:
        print("| mpolm / torch | " + " | ".join(f"{best['mpolm'][c] / best['torch'][c]:.2f}×"
                                             for c in MLP_COLS) + " |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--what", choices=["gemm", "mlp"], default="gemm")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    target = os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/mpolm/target"))
    ap.add_argument("--bin", help="the benchmark binary (default: the example under the target dir)")
    a = ap.parse_args()
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
    if a.what == "mlp":
        return mlp_pair(a, env, target)
    a.bin = a.bin or os.path.join(target, "release/examples/bench_kernels")
    best = {}
    for r in range(a.rounds):
        for cmd in ([a.bin, "gemm"], [sys.executable, os.path.join(HERE, "bench_torch_kernels.py"), "gemm",
                                     "--threads", str(a.threads)]):
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            for shape, cols in table(out).items():
                for c, v in cols.items():
                    b = best.setdefault(shape, {})
                    b[c] = max(b.get(c, 0.0), v)
        print(f"round {r + 1}/{a.rounds} done", file=sys.stderr)
    cols = [c for c in ("candle", "gemm", "faer", "linear()", "torch")
            if any(c in v for v in best.values())]
    print(f"GEMM GFLOP/s, best of {a.rounds} alternating rounds, {a.threads} threads")
    print("| m×k×n | " + " | ".join(cols) + " | linear() / torch |")
    print("|---|" + "---|" * (len(cols) + 1))
    for shape, v in best.items():
        if shape.startswith("1×"):
            continue  # decode shapes: memory-bound, see the decode benchmarks
        ratio = v["linear()"] / v["torch"] if "torch" in v and "linear()" in v else None
        cells = " | ".join(f"{v[c]:.1f}" if c in v else "" for c in cols)
        print(f"| {shape} | {cells} | " + (f"{ratio:.2f}× |" if ratio else " |"))


if __name__ == "__main__":
    main()
