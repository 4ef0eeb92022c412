#!/usr/bin/env python3
"""Manual check (not CI): transformers loads mpolm's GPTQ checkpoints in both checkpoint formats
(AutoGPTQ's v1 `gptq` and GPTQModel's `gptq_v2`) from their config.json `quantization_config`,
generates mpolm's greedy tokens, and gives identical logits for the two formats (so GPTQModel
reads v2's zero points as the zeros themselves and v1's as zero - 1, as mpolm writes them).

Made with: python 3, torch 2.15.0 (CPU), transformers 5.24.0, optimum 2.3.0, gptqmodel 7.7.0
(built with BUILD_CUDA_EXT=0). Run from the repository root:

    B=$CARGO_TARGET_DIR/release/mpolm
    $B quantize smollm2-135m --method rtn --bits 4 --out /tmp/gq/v1
    $B quantize smollm2-135m --method rtn --bits 4 --checkpoint-format gptq_v2 --out /tmp/gq/v2
    $B generate /tmp/gq/v1 --prompt "The capital of France is" --max-new-tokens 12 --report /tmp/gq/g.json
    python3 scripts/check_gptq_transformers.py /tmp/gq/v1 /tmp/gq/v2 /tmp/gq/g.json

Exit code 1 when the tokens or the two formats' logits differ.
"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM

torch.set_num_threads(1)
v1, v2, gj = sys.argv[1:4]
g = json.load(open(gj))["generate"]
prompt = torch.tensor([g["prompt_ids"]])
full = torch.tensor([g["prompt_ids"] + g["output_ids"]])
ok = True
logits = []
for d in (v1, v2):
    m = AutoModelForCausalLM.from_pretrained(d, device_map="cpu")
    m.eval()
    with torch.no_grad():
        out = m.generate(input_ids=prompt, max_new_tokens=len(g["output_ids"]), do_sample=False)
        logits.append(m(full).logits)
    new = out[0, prompt.shape[1]:].tolist()
    same = new == g["output_ids"]
    ok &= same
    print(f"{d}: {type(m.model.layers[0].self_attn.q_proj).__name__}, tokens {'MATCH' if same else 'DIFFER'}: {new}")
delta = (logits[0] - logits[1]).abs().max().item()
print("max |v1 - v2| logit:", delta)
ok &= delta == 0.0
sys.exit(0 if ok else 1)
