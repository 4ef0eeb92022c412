#!/usr/bin/env python3
"""Runs the Rust MPO benchmark (crates/mpo/examples/bench_mpo.rs) and the numpy seed reference
(scripts/mpo_reference.py) on the same SmolLM2-135M-shaped matrices and compares them:
bond dimensions, errors (must agree to 1e-6 relative; full-bond errors are both round-off),
and time ratios per matrix and for a whole model (30 layers × {q,k,v,o,gate,up,down} + the
tied embedding).

  python3 scripts/bench_mpo.py [--threads 1] [--rust-bin PATH] [--skip-embedding] [--reps 5]

Thread counts are pinned for both sides (RAYON_NUM_THREADS / OPENBLAS_NUM_THREADS etc.);
on a shared machine a single thread gives the most stable comparison.
"""

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# how many times each matrix occurs in SmolLM2-135M (30 layers; embedding tied with the head)
COUNTS = {"q_proj/o_proj": 60, "k_proj/v_proj": 60, "gate/up_proj": 60, "down_proj": 30, "embed_tokens": 1}


def run_rust(args, env):
    cmd = [args.rust_bin] if args.rust_bin else [
        "cargo", "run", "--release", "-q", "-p", "mpo", "--example", "bench_mpo", "--"]
    cmd += ["--reps", str(args.reps)]
    if args.skip_embedding:
        cmd.append("--skip-embedding")
    if args.no_forward:
        cmd.append("--no-forward")
    out = subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rust-bin", default=None)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--skip-embedding", action="store_true")
    ap.add_argument("--no-forward", action="store_true")
    ap.add_argument("--out", default=None, help="write the combined JSON here")
    args = ap.parse_args()
    env = dict(os.environ)
    for k in ("RAYON_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[k] = str(args.threads)
    rust = run_rust(args, env)
    shapes = os.path.join("/tmp", "mpo_bench_shapes_%d.json" % os.getpid())
    with open(shapes, "w") as f:
        json.dump(rust, f)
    ref_cmd = [sys.executable, os.path.join(HERE, "mpo_reference.py"), "--shapes", shapes, "--reps", str(args.reps)]
    ref = json.loads(subprocess.run(ref_cmd, env=env, check=True, capture_output=True, text=True).stdout)
    os.unlink(shapes)

    rows = []
    totals = {}
    for r, p in zip(rust["decompose"], ref["decompose"]):
        assert r["name"] == p["name"] and r["row_factors"] == p["row_factors"]
        count = next(c for k, c in COUNTS.items() if r["name"].startswith(k))
        for a, b in zip(r["results"], p["results"]):
            assert a["bonds"] == b["bonds"], (a["bonds"], b["bonds"])
            if a["setting"] == "full":
                agree = max(a["rel_error"], b["rel_error"]) < 1e-10
            else:
                agree = abs(a["rel_error"] - b["rel_error"]) <= 1e-6 * b["rel_error"]
            rows.append({
                "matrix": r["name"], "setting": a["setting"], "bonds": a["bonds"], "params": a["params"],
                "rel_error_rust": a["rel_error"], "rel_error_numpy": b["rel_error"], "errors_agree": agree,
                "rust_s": a["total_s"], "numpy_s": b["total_s"], "speedup": b["total_s"] / a["total_s"],
            })
            t = totals.setdefault(a["setting"], [0.0, 0.0])
            t[0] += count * a["total_s"]
            t[1] += count * b["total_s"]
    summary = {
        "threads": args.threads,
        "numpy": ref.get("numpy"),
        "per_matrix": rows,
        "whole_model": {k: {"rust_s": v[0], "numpy_s": v[1], "speedup": v[1] / v[0]} for k, v in totals.items()},
        "forward": rust.get("forward", []),
    }
    print("| matrix | setting | bonds | rel. error rust / numpy | rust s | numpy s | speedup |", file=sys.stderr)
    print("|---|---|---|---|---|---|---|", file=sys.stderr)
    for x in rows:
        print("| %s | %s | %s | %.3e / %.3e%s | %.4f | %.3f | %.1f× |" % (
            x["matrix"], x["setting"], x["bonds"][1:-1], x["rel_error_rust"], x["rel_error_numpy"],
            "" if x["errors_agree"] else " (DISAGREE)", x["rust_s"], x["numpy_s"], x["speedup"]), file=sys.stderr)
    for k, v in summary["whole_model"].items():
        print("whole model, %s: rust %.2f s, numpy %.1f s, %.1f×" % (k, v["rust_s"], v["numpy_s"], v["speedup"]),
              file=sys.stderr)
    for f in summary["forward"]:
        for x in f["results"]:
            print("forward %s batch %d %s: contract %.4f s, rebuild %.4f s, dense %.4f s (dense/contract %.3f)" % (
                f["name"], f["batch"], x["setting"], x["contract_s"], x["rebuild_s"], x["dense_s"],
                x["speedup_vs_dense"]), file=sys.stderr)
    text = json.dumps(summary, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)
    if not all(x["errors_agree"] for x in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
