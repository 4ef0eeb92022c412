#!/usr/bin/env python3
"""llama.cpp (through llama-cpp-python) on a GGUF file, measured the way mpolm measures itself,
so `scripts/bench_llamacpp.sh` can put the two side by side (issue #6 item 7).

* speed: the prompt of `mpolm bench generate` (the same paragraph, repeated, cut to
  --prompt-tokens ids, no special tokens), one prefill, then --new-tokens greedy tokens one
  at a time through the KV cache; median over --repeats after a warm-up. Wall clock around
  llama.cpp's eval calls, like mpolm's timer around its forward calls.
* perplexity: WikiText-2 test with mpolm's rolling windows (`eval::lm::rolling_rows`): the
  text tokenised once without special tokens, the BOS (else EOS) id prepended, the first
  window predicts --max-length tokens, later ones --stride new tokens each with the preceding
  tokens as context; the first --windows windows are scored (mpolm `--limit`). Each window is
  evaluated from an empty cache with logits for every position (`logits_all=True`).

Prints one JSON object (and writes it to --json).
"""

import argparse
import json
import math
import statistics
import sys
import time

import numpy as np

import bench_prompt

def tokenize(llm, text):
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)


def prompt_ids(llm, n):
    return bench_prompt.prompt_ids(lambda text: tokenize(llm, text), n)


def rolling_rows(tokens, prefix, max_length, stride):
    """Port of mpolm's eval::lm::rolling_rows: (input ids, target ids) per window."""
    s = [prefix] + list(tokens)
    n = len(tokens)
    rows = []
    t0 = 1
    while t0 <= n:
        t1 = min(max_length + 1, n + 1) if t0 == 1 else min(t0 + stride, n + 1)
        i0 = max(t1 - 1 - max_length, 0)
        rows.append((s[i0 : t1 - 1], s[t0:t1], t0 - 1 - i0))
        t0 = t1
    return rows


def last_logits(llm):
    """Logits of the last evaluated token (llama-cpp-python 0.3 copies none without logits_all)."""
    import llama_cpp

    ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))


def bench_speed(llm, prompt_tokens, new_tokens, repeats):
    ids = prompt_ids(llm, prompt_tokens)

    def run():
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        prefill = time.perf_counter() - t
        nxt = int(np.argmax(last_logits(llm)))
        out = [nxt]
        t = time.perf_counter()
        for _ in range(1, new_tokens):
            llm.eval([nxt])
            nxt = int(np.argmax(last_logits(llm)))
            out.append(nxt)
        return prefill, time.perf_counter() - t, out

    run()  # warm-up
    pre, dec, outs = [], [], []
    for _ in range(repeats):
        p, d, o = run()
        pre.append(p)
        dec.append((new_tokens - 1) / d)
        outs.append(o)
    return {
        "prefill_tok_s": prompt_tokens / statistics.median(pre),
        "decode_tok_s": statistics.median(dec),
        "prompt_ids_head": ids[:8],
        "greedy_ids": outs[0],
        "deterministic": all(o == outs[0] for o in outs),
    }


def perplexity(llm, text, max_length, stride, windows):
    tokens = tokenize(llm, text)
    prefix = llm.token_bos()
    if prefix is None or prefix < 0:
        prefix = llm.token_eos()
    rows = rolling_rows(tokens, prefix, max_length, stride)
    n_windows = len(rows)
    rows = rows[:windows] if windows else rows
    ll = 0.0
    scored = 0
    t = time.perf_counter()
    for inp, tgt, first in rows:
        llm.reset()
        llm.eval(inp)
        logits = np.asarray(llm.scores[: len(inp)], dtype=np.float64)
        # Position p predicts input[p + 1]; the targets start at position `first`.
        sel = logits[first : first + len(tgt)]
        m = sel.max(axis=1, keepdims=True)
        lse = (m[:, 0] + np.log(np.exp(sel - m).sum(axis=1)))
        ll += float((sel[np.arange(len(tgt)), tgt] - lse).sum())
        scored += len(tgt)
    secs = time.perf_counter() - t
    return {
        "token_perplexity": math.exp(-ll / scored),
        "loglikelihood": ll,
        "tokens": scored,
        "text_tokens": len(tokens),
        "windows": n_windows,
        "windows_scored": len(rows),
        "prefix_token": prefix,
        "seconds": secs,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="GGUF file")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--wikitext", help="WikiText-2 test.txt (perplexity is skipped without it)")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--stride", type=int, default=None)
    ap.add_argument("--windows", type=int, default=0, help="score the first N windows (0 = all)")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--json")
    a = ap.parse_args()

    import llama_cpp

    res = {"model": a.model, "llama_cpp_python": llama_cpp.__version__, "threads": a.threads}
    if not a.skip_speed:
        llm = llama_cpp.Llama(
            model_path=a.model,
            n_ctx=a.prompt_tokens + a.new_tokens + 8,
            n_batch=512,
            n_threads=a.threads,
            n_threads_batch=a.threads,
            logits_all=False,
            verbose=False,
        )
        res["speed"] = bench_speed(llm, a.prompt_tokens, a.new_tokens, a.repeats)
        del llm
    if a.wikitext:
        llm = llama_cpp.Llama(
            model_path=a.model,
            n_ctx=a.max_length,
            n_batch=a.max_length,
            n_ubatch=a.max_length,
            n_threads=a.threads,
            n_threads_batch=a.threads,
            logits_all=True,
            verbose=False,
        )
        with open(a.wikitext, encoding="utf-8") as f:
            text = f.read()
        res["wikitext2"] = perplexity(llm, text, a.max_length, a.stride or a.max_length, a.windows)
    out = json.dumps(res, indent=1)
    print(out)
    if a.json:
        with open(a.json, "w") as f:
            f.write(out + "\n")


if __name__ == "__main__":
    sys.exit(main())
