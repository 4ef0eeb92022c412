#!/usr/bin/env python3
"""PyTorch (+ PEFT) peer for `mpolm finetune` step time and peak RSS (issue #5, item 5).

Same model directory, same SST-2 sentences, batch, max length and padding rule (pad to the
longest sentence of the batch) as mpolm; AdamW with the same hyper-parameters; dropout set to 0
on both sides (mpolm's encoder has none), so both do the same arithmetic.

    python3 scripts/bench_torch_finetune.py --model ~/.cache/mpolm/models/minilm-l6 \
        --data data/glue/SST-2/train.tsv --method lora --limit 320 --batch 32 --threads 2

mpo-aux: every matrix of an `mpolm compress` checkpoint (--mpo DIR) rebuilt from its cores each
step (scripts/torch_mpo.py), central cores frozen.

opf (issue #19, item 6): the matrices mpolm's OPF run chose (--opf-chosen, comma-separated module
names from its report) replaced by their exact TT-SVD over the same 1-padded chain (--opf-sites;
split rule of `mpo::shapes::opf_split`), rebuilt every forward as in torch_mpo.py; every tensor,
chains included, trains.

Prints one JSON line: mean step time (s) over all steps after the first, peak RSS (MiB).
Versions used for BENCHMARKS.md: torch 2.15.0, transformers 5.24.0, peft 0.21.2.
"""
import argparse
import json
import resource
import time

import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--method", choices=["full", "lora", "mpo-aux", "opf"], default="lora")
    ap.add_argument("--mpo", help="mpo-aux: the MPO checkpoint of `mpolm compress` (see torch_mpo.py)")
    ap.add_argument("--limit", type=int, default=320)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--opf-chosen", default="", help="opf: comma-separated module names")
    ap.add_argument("--opf-sites", type=int, default=11)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    rows = []
    with open(a.data) as f:
        next(f)
        for line in f:
            s, l = line.rstrip("\n").split("\t")
            rows.append((s, int(l)))
            if len(rows) >= a.limit:
                break
    tok = AutoTokenizer.from_pretrained(a.model)
    cfg = BertConfig.from_pretrained(a.model, num_labels=2, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification.from_pretrained(a.model, config=cfg)
    if a.method == "lora":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=a.lora_r, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules=["query", "value"], task_type="SEQ_CLS"))
    elif a.method == "mpo-aux":
        # MPOP's lightweight tuning: auxiliary cores, biases, LayerNorms, the other embeddings
        # and the new head train; central cores do not.
        from torch_mpo import freeze_central, load_mpo

        if not a.mpo:
            raise SystemExit("--method mpo-aux needs --mpo DIR (an `mpolm compress` checkpoint)")
        load_mpo(model, a.mpo)
        freeze_central(model)
    elif a.method == "opf":
        from torch_mpo import opf_chains

        opf_chains(model, [n for n in a.opf_chosen.split(",") if n], a.opf_sites)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    times = []
    for i in range(0, len(rows), a.batch):
        chunk = rows[i:i + a.batch]
        enc = tok([s for s, _ in chunk], padding="longest", truncation=True, max_length=a.max_len,
                  return_tensors="pt")
        labels = torch.tensor([l for _, l in chunk])
        t0 = time.perf_counter()
        out = model(**enc, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    steady = times[1:] if len(times) > 1 else times
    print(json.dumps({
        "peer": {"lora": "pytorch+peft", "mpo-aux": "pytorch+mpo", "opf": "pytorch+opf"}.get(a.method, "pytorch"),
        "method": a.method,
        "steps": len(times),
        "step_secs_mean": sum(steady) / len(steady),
        "step_secs_min": min(steady),
        "tuned_params": sum(p.numel() for p in params),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
