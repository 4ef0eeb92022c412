#!/usr/bin/env python3
"""Check that an HF directory written by `mpolm export --dense` (or `compress` + `export`) loads
in transformers and reproduces reference logits.

    python3 scripts/check_hf_export.py DIR tests/fixtures/smollm2-135m.json tests/fixtures/smollm2-135m_logits.safetensors

Prints max |Δlogit| per fixture prompt (transformers 5.24.0, torch 2.15.0 were used).
"""
import json, os, sys
os.environ["HF_HUB_OFFLINE"] = "1"
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

d, fx, lg = sys.argv[1:4]
torch.set_num_threads(2)
model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(d)
fixture = json.load(open(fx))
ref = load_file(lg)
worst = 0.0
with torch.no_grad():
    for i, p in enumerate(fixture["prompts"]):
        assert tok(p["text"]).input_ids == p["ids"], "tokenizer ids differ"
        out = model(torch.tensor([p["ids"]])).logits[0, -1]
        delta = (out - ref[f"logits.{i}"]).abs().max().item()
        worst = max(worst, delta)
        print(f"prompt {i}: max |dlogit| = {delta:.3e}")
print(json.dumps({"max_abs_dlogit": worst, "tokenizer_ids_match": True}))
