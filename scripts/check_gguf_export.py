#!/usr/bin/env python3
"""Manual check of `mpolm export --gguf` against the `gguf` Python package (not run in CI).

Exports a GGUF-sourced model (default smollm2-135m) at the given types with the mpolm binary,
then with gguf.GGUFReader:
  * compares the metadata keys and value types with the source GGUF (keys only in one of them
    are listed; general.file_type must name the requested type);
  * checks tensor names, shapes and the per-type counts;
  * dequantizes tensors with gguf.quants and compares them with the source's dequantized
    values (both are in llama.cpp's q/k row order), reporting the relative RMS error;
  * where gguf-py has a reference quantizer (q8_0, q4_0, q5_0), quantizes the source values
    itself and reports the fraction of blocks that are byte-identical to ours.

    python3 scripts/check_gguf_export.py [--model smollm2-135m] [--types q8_0,q4_k_m]
        [--mpolm target/release/mpolm] [--out /tmp/gguf-check]
"""

import argparse
import os
import shutil
import subprocess
import sys
import time

import numpy as np

try:
    import gguf
    from gguf import quants
except ImportError:
    sys.exit("needs the gguf package: pip install gguf")

FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "q2_k": 10, "q4_k_m": 15, "q6_k": 18}


def fields(r):
    out = {}
    for k, f in r.fields.items():
        if k.startswith("GGUF."):
            continue
        out[k] = [gguf.GGUFValueType(t).name for t in f.types]
    return out


def value(r, k):
    f = r.fields[k]
    return f.contents() if hasattr(f, "contents") else f.parts[f.data[0]]


def deq(t):
    a = quants.dequantize(t.data, t.tensor_type)
    return np.asarray(a, dtype=np.float32).reshape([int(x) for x in reversed(t.shape)])


def rel_rms(a, b):
    return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(a**2)))


def resolve_source(mpolm, model):
    if os.path.isfile(model):
        return model
    out = subprocess.run([mpolm, "fetch", model], check=True, capture_output=True, text=True)
    path = out.stdout.strip().split(" -> ")[-1].rsplit(" (", 1)[0]
    if os.path.isdir(path):
        path = [os.path.join(path, f) for f in os.listdir(path) if f.endswith(".gguf")][0]
    return path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--types", default="q8_0,q4_k_m")
    ap.add_argument("--mpolm", default=os.path.join(
        os.environ.get("CARGO_TARGET_DIR", "target"), "release", "mpolm"))
    ap.add_argument("--out", default="/tmp/gguf-check")
    ap.add_argument("--tensors", default="token_embd.weight,blk.0.attn_q.weight,"
                    "blk.0.attn_k.weight,blk.0.attn_v.weight,blk.4.ffn_down.weight,blk.5.ffn_up.weight")
    a = ap.parse_args()

    src_path = resolve_source(a.mpolm, a.model)
    src = gguf.GGUFReader(src_path)
    src_fields = fields(src)
    src_t = {t.name: t for t in src.tensors}
    print(f"source {src_path}: {len(src.tensors)} tensors, {len(src_fields)} KVs")
    shutil.rmtree(a.out, ignore_errors=True)
    os.makedirs(a.out)
    failures = 0
    for ty in a.types.split(","):
        out = os.path.join(a.out, f"{a.model}-{ty}.gguf")
        t0 = time.time()
        p = subprocess.run([a.mpolm, "export", a.model, "--gguf", "--type", ty, "--out", out,
                            "--report", out + ".json"], capture_output=True, text=True)
        secs = time.time() - t0
        if p.returncode != 0:
            print(p.stdout[-2000:], p.stderr[-2000:])
            sys.exit(f"export {ty} failed")
        size = os.path.getsize(out)
        r = gguf.GGUFReader(out)
        f = fields(r)
        print(f"\n== {ty}: {size / 2**20:.1f} MiB, {secs:.1f} s, {len(r.tensors)} tensors, "
              f"{size * 8 / sum(int(np.prod(t.shape)) for t in r.tensors):.2f} bpw")
        missing = sorted(set(src_fields) - set(f))
        extra = sorted(set(f) - set(src_fields))
        mistyped = sorted(k for k in set(f) & set(src_fields) if f[k] != src_fields[k])
        print(f"  metadata: {len(set(f) & set(src_fields))} keys shared, missing {missing}, "
              f"extra {extra}, type mismatches {mistyped}")
        failures += len(missing) + len(mistyped)
        ft = int(value(r, "general.file_type"))
        if ft != FILE_TYPES[ty]:
            print(f"  FAIL general.file_type {ft} != {FILE_TYPES[ty]}")
            failures += 1
        for k in ("general.architecture", "tokenizer.ggml.pre", "tokenizer.ggml.model"):
            if value(r, k) != value(src, k):
                print(f"  FAIL {k}: {value(r, k)} != {value(src, k)}")
                failures += 1
        names = {t.name for t in r.tensors}
        if names != set(src_t):
            print(f"  FAIL tensor names differ: only source {sorted(set(src_t) - names)[:5]}, "
                  f"only export {sorted(names - set(src_t))[:5]}")
            failures += 1
        counts = {}
        for t in r.tensors:
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
            if list(t.shape) != list(src_t[t.name].shape):
                print(f"  FAIL {t.name} shape {list(t.shape)} != {list(src_t[t.name].shape)}")
                failures += 1
        print(f"  types: {counts}")
        if int(value(src, "general.file_type")) == FILE_TYPES[ty]:
            # The source was made by llama-quantize with this recipe: types must agree.
            diff = [(t.name, src_t[t.name].tensor_type.name, t.tensor_type.name)
                    for t in r.tensors if t.tensor_type != src_t[t.name].tensor_type]
            print(f"  same recipe as the source: {len(r.tensors) - len(diff)}/{len(r.tensors)} "
                  f"tensor types equal llama-quantize's {diff[:5]}")
            failures += len(diff)
        rt = {t.name: t for t in r.tensors}
        for name in a.tensors.split(","):
            if name not in rt:
                continue
            t, s = rt[name], src_t[name]
            ours, ref = deq(t), deq(s)
            line = f"  {name:24s} {t.tensor_type.name:5s} rel RMS vs source {rel_rms(ref, ours):.4f}"
            if t.tensor_type.name in ("Q8_0", "Q4_0", "Q5_0"):
                theirs = quants.quantize(ref, t.tensor_type)
                mine = np.asarray(t.data).reshape(theirs.shape)
                bsize, tsize = gguf.GGML_QUANT_SIZES[t.tensor_type]
                a1 = mine.reshape(-1, tsize)
                a2 = np.asarray(theirs).reshape(-1, tsize)
                same = float(np.mean(np.all(a1 == a2, axis=1)))
                line += f", blocks identical to gguf.quants.quantize {100 * same:.2f}%"
                if same < 0.99:
                    failures += 1
                    line += "  FAIL"
            print(line)
    print("\nOK" if failures == 0 else f"\n{failures} problem(s)")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
