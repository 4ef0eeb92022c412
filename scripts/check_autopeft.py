#!/usr/bin/env python3
"""Manual check (not CI): PEFT's AutoPeftModelForCausalLM resolves the base of an adapter mpolm
wrote (its `base_model_name_or_path`) and generates the same greedy tokens as `mpolm generate`.

Made with: python 3, torch 2.15.0, transformers 5.24.0, peft 0.21.2. Run from the repository root:

    B=$CARGO_TARGET_DIR/release/mpolm
    $B export smollm2-135m --dense --out /tmp/ap/hf
    $B finetune /tmp/ap/hf --task lm --method lora --data data/wikitext2/valid.txt --limit 16 \
        --max-steps 3 --batch 2 --max-len 64 --lr 1e-2 --out /tmp/ap/adapter
    $B generate /tmp/ap/adapter --prompt "The capital of France is" --max-new-tokens 12 --report /tmp/ap/g.json
    python3 scripts/check_autopeft.py /tmp/ap/adapter /tmp/ap/g.json

Exit code 1 when the tokens differ or the adapter does not change the logits.
"""
import json
import sys

import torch
from peft import AutoPeftModelForCausalLM

torch.set_num_threads(1)
m = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1], torch_dtype=torch.float32)
m.eval()
g = json.load(open(sys.argv[2]))["generate"]
ids = torch.tensor([g["prompt_ids"]])
with torch.no_grad():
    out = m.generate(input_ids=ids, max_new_tokens=len(g["output_ids"]), do_sample=False)
    a = m(ids).logits
    with m.disable_adapter():
        b = m(ids).logits
new = out[0, ids.shape[1]:].tolist()
delta = (a - b).abs().max().item()
print("base :", m.peft_config["default"].base_model_name_or_path)
print("peft :", new)
print("mpolm:", g["output_ids"])
print("max |adapter - base| logit:", delta)
ok = new == g["output_ids"] and delta > 0
print("MATCH" if ok else "DIFFER")
sys.exit(0 if ok else 1)
