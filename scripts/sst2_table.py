#!/usr/bin/env python3
"""Tables for RESULTS.md from `scripts/sst2_experiment.sh` runs (issue #5, item 4).

    python3 scripts/sst2_table.py MAIN_DIR [GRID_DIR]

MAIN_DIR holds METHOD-sSEED.json reports (the chosen learning rates); GRID_DIR (optional)
holds one sub-folder per --mpo-lr with the seed-1 runs of the learning-rate grid.
"""
import glob
import json
import os
import statistics as st
import sys
from collections import defaultdict


def load(path):
    r = json.load(open(path))
    o, res = r["options"], r["result"]
    return {
        "method": o["method"],
        "seed": o["seed"],
        "mpo_lr": o.get("mpo_lr"),
        "lr": o["lr"],
        "acc": res["eval"]["value"] * 100,
        "tuned": res["tuned_params"],
        "total": res["total_params"],
        "secs": res["train_secs"],
    }


def main():
    main_dir = sys.argv[1]
    rows = defaultdict(list)
    for f in sorted(glob.glob(os.path.join(main_dir, "*-s*.json"))):
        r = load(f)
        rows[r["method"]].append(r)
    print("| method | lr (MPO cores) | dev acc % (mean ± sd) | per seed | #tuned | #total | train s/run |")
    print("|---|---|---|---|---|---|---|")
    for m in ["full", "lora", "mpo-aux", "mpo-central"]:
        v = sorted(rows.get(m, []), key=lambda r: r["seed"])
        if not v:
            continue
        acc = [r["acc"] for r in v]
        sd = st.stdev(acc) if len(acc) > 1 else 0.0
        lr = f"{v[0]['lr']:g}" + (f" ({v[0]['mpo_lr']:g})" if v[0]["mpo_lr"] else "")
        per = ", ".join(f"{a:.2f}" for a in acc)
        print(f"| {m} | {lr} | {st.mean(acc):.2f} ± {sd:.2f} | {per} | {v[0]['tuned']/1e6:.2f}M "
              f"| {v[0]['total']/1e6:.2f}M | {st.mean(r['secs'] for r in v):.0f} |")
    if len(sys.argv) > 2:
        grid = defaultdict(dict)
        for f in glob.glob(os.path.join(sys.argv[2], "*", "*-s1.json")):
            r = load(f)
            grid[r["method"]][r["mpo_lr"]] = r["acc"]
        lrs = sorted({lr for g in grid.values() for lr in g})
        print()
        print("| method, seed 1 | " + " | ".join(f"--mpo-lr {lr:g}" for lr in lrs) + " |")
        print("|---|" + "---|" * len(lrs))
        for m in sorted(grid):
            print(f"| {m} | " + " | ".join(f"{grid[m][lr]:.2f}" if lr in grid[m] else "–" for lr in lrs) + " |")


if __name__ == "__main__":
    main()
