#!/usr/bin/env python3
"""Check that the dense model `mpolm finetune --method opf --task sst2` wrote loads in transformers as a
BertForSequenceClassification of the base model's size, and that its dev accuracy there equals the accuracy
mpolm logged for the last evaluation (computed while the chains were still in place, before contraction).

    python3 scripts/check_opf_export.py OUT_DIR data/glue/SST-2/dev.tsv [MAX_LEN=64]

(transformers 5.24.0, torch 2.15.0 were used.)
"""
import csv, json, os, sys
os.environ["HF_HUB_OFFLINE"] = "1"
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

d, dev = sys.argv[1:3]
max_len = int(sys.argv[3]) if len(sys.argv) > 3 else 64
torch.set_num_threads(1)
model, info = AutoModelForSequenceClassification.from_pretrained(d, dtype=torch.float32, output_loading_info=True)
model.eval()
missing = [k for k in info["missing_keys"]]
unexpected = [k for k in info["unexpected_keys"]]
tok = AutoTokenizer.from_pretrained(d)
rows = list(csv.DictReader(open(dev), delimiter="\t", quoting=csv.QUOTE_NONE))
correct = 0
with torch.no_grad():
    for i in range(0, len(rows), 64):
        chunk = rows[i : i + 64]
        enc = tok([r["sentence"] for r in chunk], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        pred = model(**enc).logits.argmax(-1)
        correct += sum(int(p) == int(r["label"]) for p, r in zip(pred.tolist(), chunk))
log = json.load(open(os.path.join(d, "finetune_log.json")))
logged = log["evals"][-1]["value"]
opf = log.get("hooks", {}).get("opf", {})
params = sum(p.numel() for p in model.parameters())
print(json.dumps({
    "missing_keys": missing, "unexpected_keys": unexpected,
    "transformers_params": params, "mpolm_deploy_params": opf.get("deploy_params"),
    "mpolm_train_params": opf.get("train_params"),
    "transformers_dev_accuracy": correct / len(rows), "mpolm_logged_accuracy": logged,
    "examples": len(rows),
}, indent=1))
