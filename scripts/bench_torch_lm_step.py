#!/usr/bin/env python3
"""PyTorch (+ PEFT) peer for one causal-LM fine-tuning step of `mpolm finetune --task lm` (issue #8,
item 4: SmolLM2-135M, batch 4 x 256 tokens).

mpo-aux: the same model with every matrix of an `mpolm compress` checkpoint (--mpo DIR) rebuilt
from its cores each step (scripts/torch_mpo.py), auxiliary cores and norms trained.

Same model (an HF dir written by `mpolm export smollm2-135m --dense --out DIR`), same text cut into
blocks of --max-len tokens with the same tokenizer, batch, AdamW and LoRA settings (PEFT defaults:
q_proj, v_proj, r=8, alpha=16, no dropout), loss = mean next-token cross-entropy. Dropout is 0
in SmolLM2's config, so both sides do the same arithmetic.

    python3 scripts/bench_torch_lm_step.py --model DIR --data data/wikitext2/valid.txt \
        --method lora --steps 6 --batch 4 --max-len 256 --threads 2

Prints one JSON line: mean and min step time (s) over the steps after the first, peak RSS (MiB).
Versions used for BENCHMARKS.md: torch 2.15.0, transformers 5.24.0, peft 0.21.2.
"""
import argparse
import json
import resource
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--method", choices=["full", "lora", "mpo-aux"], default="lora")
    ap.add_argument("--mpo", help="mpo-aux: the MPO checkpoint of `mpolm compress` (see torch_mpo.py)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lora-r", type=int, default=8)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(a.model)
    text = open(a.data, encoding="utf-8").read()
    ids = tok(text[: 200 * a.batch * a.max_len * (a.steps + 1)])["input_ids"]
    n = a.batch * a.max_len
    blocks = [ids[i : i + a.max_len] for i in range(0, len(ids) - a.max_len, a.max_len)]
    if len(blocks) < a.batch * a.steps:
        raise SystemExit(f"{a.data}: only {len(blocks)} blocks of {a.max_len} tokens")
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    if a.method == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=a.lora_r, lora_alpha=2 * a.lora_r, lora_dropout=0.0,
                         target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        model = get_peft_model(model, cfg)
    elif a.method == "mpo-aux":
        # MPOP's lightweight tuning: auxiliary cores and the non-decomposed small tensors (norms)
        # train; central cores and the dense matrices left as they were (embedding/head) do not.
        from torch_mpo import freeze_central, load_mpo

        if not a.mpo:
            raise SystemExit("--method mpo-aux needs --mpo DIR (an `mpolm compress` checkpoint)")
        load_mpo(model, a.mpo)
        for mod in model.modules():
            if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)):
                for p in mod.parameters(recurse=False):
                    if p.dim() == 2:
                        p.requires_grad_(False)
        freeze_central(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.01)
    times = []
    for s in range(a.steps):
        x = torch.tensor(blocks[s * a.batch : (s + 1) * a.batch])
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    steady = times[1:]
    print(json.dumps({
        "peer": {"lora": "pytorch+peft", "mpo-aux": "pytorch+mpo"}.get(a.method, "pytorch"),
        "task": "lm", "method": a.method, "steps": a.steps, "tokens_per_step": n,
        "step_secs_mean": sum(steady) / len(steady), "step_secs_min": min(steady),
        "tuned_params": sum(p.numel() for p in params), "peak_rss_mib": rss,
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
