#!/usr/bin/env python3
"""Markdown tables from the reports of scripts/quant_table.sh OUTDIR (issue #6 item 6)."""
import json
import math
import os
import re
import sys


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def find(d, key):
    """First value of `key` anywhere in a nested report (reports wrap results differently)."""
    if isinstance(d, dict):
        if key in d:
            return d[key]
        for v in d.values():
            r = find(v, key)
            if r is not None:
                return r
    elif isinstance(d, list):
        for v in d:
            r = find(v, key)
            if r is not None:
                return r
    return None


def cpu_secs(log):
    """User + system CPU seconds from /usr/bin/time -v in a step log (robust to pauses, unlike wall time)."""
    try:
        text = open(log).read()
    except FileNotFoundError:
        return None
    u = re.search(r"User time \(seconds\): ([\d.]+)", text)
    s = re.search(r"System time \(seconds\): ([\d.]+)", text)
    return float(u.group(1)) + float(s.group(1)) if u and s else None


def fmt(x, spec):
    return "–" if x is None else format(x, spec)


def main(out):
    names = ["f32"] + [f"{m}{b}" for m in ("rtn", "gptq") for b in (8, 4, 3, 2)]
    print("| bits | method | WikiText-2 ppl | total bits (Mbit) | bits/param | files (MiB) | quantize peak RSS (MiB) "
          "| quantize CPU s (user+sys) | decode tok/s | prefill tok/s | decode peak RSS (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        r = load(f"{out}/{name}.json")
        if r is None:
            continue
        s = r["model_summary"]
        b = load(f"{out}/bench-{name}.json")
        method, bits = ("-", "32 (f32)") if name == "f32" else (name.rstrip("0123456789").upper(),
                                                                 name.lstrip("rtngpq"))
        print(f"| {bits} | {method} | {s['perplexity']['ppl']:.3f} | {s['total_bits'] / 1e6:.1f} "
              f"| {s['bits_per_param']:.2f} | {s['file_bytes'] / 2**20:.1f} | {s['peak_rss_mib']:.0f} "
              f"| {fmt(cpu_secs(f'{out}/{name}.log'), '.0f')} "
              f"| {fmt(find(b, 'decode_tok_s'), '.1f')} | {fmt(find(b, 'prefill_tok_s'), '.1f')} "
              f"| {fmt(find(b, 'peak_rss_mb'), '.0f')} |")

    rows = [n for n in names if os.path.exists(f"{out}/mmlu-{n}.json") or os.path.exists(f"{out}/gsm8k-{n}.json")]
    if not rows:
        return
    print()
    print("| model | MMLU acc % (n) | GSM8K strict % | GSM8K flexible % (n) | MMLU s | GSM8K s |")
    print("|---|---|---|---|---|---|")
    for name in rows:
        mm = load(f"{out}/mmlu-{name}.json")
        gs = load(f"{out}/gsm8k-{name}.json")
        cell = ["–"] * 5
        if mm:
            acc = mm["results"]["mmlu"]["acc,none"]
            n = sum(v["effective"] for k, v in mm["n-samples"].items() if k.startswith("mmlu_"))
            cell[0] = f"{100 * acc:.1f} ± {100 * math.sqrt(acc * (1 - acc) / max(n, 1)):.1f} ({n})"
            cell[3] = f"{mm['timings']['total_seconds']:.0f}"
        if gs:
            g = gs["results"]["gsm8k"]
            n = gs["n-samples"]["gsm8k"]["effective"]
            cell[1] = f"{100 * g['exact_match,strict-match']:.1f}"
            cell[2] = f"{100 * g['exact_match,flexible-extract']:.1f} ({n})"
            cell[4] = f"{gs['timings']['total_seconds']:.0f}"
        print(f"| {name} | " + " | ".join(cell) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
