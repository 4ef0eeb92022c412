#!/usr/bin/env python3
"""PyTorch side of mpolm's CPU generation speed benchmark.

Loads a GGUF causal LM through transformers (dequantized to f32), builds a
deterministic prompt of exactly --prompt-tokens tokens (a fixed English paragraph
repeated and truncated at the id level), then measures on CPU:
  * prefill tok/s : one forward over the whole prompt (use_cache=True), after a
                    warm-up, median of 3 runs;
  * decode tok/s  : greedy decoding with a KV cache in a manual loop (one token per
                    forward, past_key_values reused), timing only the --new-tokens
                    decode steps (prefill excluded), median of 3 runs;
  * peak RSS      : resource.getrusage(RUSAGE_SELF).ru_maxrss at the end.

Pinned versions used: torch 2.15.0, transformers 5.24.0, accelerate 1.15.0,
gguf 0.19.0, numpy 2.4.6, safetensors 0.8.0.

Run:
    python3 scripts/bench_torch_generate.py \
        --gguf-dir $MPOLM_CACHE/pkgs/smollm2-135m \
        --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf \
        --threads 2 --prompt-tokens 128 --new-tokens 64 --json bench_torch.json
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import inspect
import json
import resource
import statistics
import sys
import time

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench_prompt import prompt_ids


def build_prompt_ids(tok, n):
    return prompt_ids(lambda text: tok(text, add_special_tokens=False).input_ids, n)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf-dir", required=True)
    ap.add_argument("--gguf-file", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None, help="write results here")
    ap.add_argument("--int8-dynamic", action="store_true",
                    help="PyTorch's own 8-bit CPU path: torch.ao.quantization.quantize_dynamic on every "
                         "nn.Linear (int8 weights, activations quantized per call; the peer for quantized decode)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(args.gguf_dir, gguf_file=args.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(args.gguf_dir, gguf_file=args.gguf_file, dtype=torch.float32)
    model.eval()
    if args.int8_dynamic:
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    load_s = time.perf_counter() - t0

    ids = build_prompt_ids(tok, args.prompt_tokens)
    assert len(ids) == args.prompt_tokens
    x = torch.tensor([ids], dtype=torch.long)

    def prefill():
        return model(input_ids=x, use_cache=True)

    # transformers >= 5.x renamed past_key_values -> cache (kwarg and output field).
    fwd_params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in fwd_params else "past_key_values"

    def get_cache(out):
        return getattr(out, cache_kw)

    def decode(out):
        past = get_cache(out)
        nxt = out.logits[:, -1, :].argmax(-1, keepdim=True)
        produced = [nxt.item()]
        t = time.perf_counter()
        for _ in range(args.new_tokens - 1):
            out = model(input_ids=nxt, use_cache=True, **{cache_kw: past})
            past = get_cache(out)
            nxt = out.logits[:, -1, :].argmax(-1, keepdim=True)
            produced.append(nxt.item())
        dt = time.perf_counter() - t
        # args.new_tokens tokens produced; the first came from prefill, so
        # new_tokens - 1 decode forwards were timed.
        return produced, dt

    with torch.inference_mode():
        # warm-up
        out = prefill()
        decode(out)

        prefill_times, decode_rates, produced = [], [], None
        for _ in range(args.repeats):
            t = time.perf_counter()
            out = prefill()
            prefill_times.append(time.perf_counter() - t)
            toks, dt = decode(out)
            decode_rates.append((args.new_tokens - 1) / dt)
            if produced is None:
                produced = toks
            assert produced == toks, "non-deterministic greedy decode"

    res = {
        "model": args.gguf_file + (" int8-dynamic" if args.int8_dynamic else ""),
        "prefill_tok_s": args.prompt_tokens / statistics.median(prefill_times),
        "decode_tok_s": statistics.median(decode_rates),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "threads": args.threads,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "load_s": load_s,
        "cpu_load_avg_1m_at_end": os.getloadavg()[0],
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "python": sys.version.split()[0],
        "greedy_ids": produced,
    }
    summary = {k: v for k, v in res.items() if k != "greedy_ids"}
    print(json.dumps(summary, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
