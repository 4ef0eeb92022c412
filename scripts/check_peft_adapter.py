#!/usr/bin/env python3
"""Manual check (not CI): PEFT loads the LoRA adapters mpolm's `lora::save_peft` writes and
reproduces mpolm's logits.

Made with: python 3, torch 2.15.0, transformers 5.24.0, peft 0.21.2. Run from the repository root:

    export CARGO_TARGET_DIR=$MPOLM_CACHE/target
    MPOLM_LORA_EXPORT=/tmp/lora_export \
        cargo test --release -p mpolm-methods --test lora export_adapters_for_peft_check
    python3 scripts/check_peft_adapter.py /tmp/lora_export

For each of llama (CAUSAL_LM) and bert (SEQ_CLS, classifier as modules_to_save) it loads the
fixture base model from crates/methods/tests/fixtures/peft/<arch>/base, applies the adapter in
EXPORT/<arch>/ with PeftModel.from_pretrained, runs the input ids stored in
EXPORT/<arch>/ours_logits.json and prints max |Δ| against mpolm's logits there. Exit code 1
when any max |Δ| exceeds 1e-4.
"""

import json
import os
import sys

import torch
from peft import PeftModel
from transformers import BertForSequenceClassification, LlamaForCausalLM

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FIX = os.path.join(ROOT, "crates", "methods", "tests", "fixtures", "peft")
TOL = 1e-4


def check(export, arch):
    adir = os.path.join(export, arch)
    ours = json.load(open(os.path.join(adir, "ours_logits.json")))
    ids = torch.tensor(ours["input_ids"])
    want = torch.tensor(ours["logits"]).reshape(ours["shape"])
    base_dir = os.path.join(FIX, arch, "base")
    if arch == "llama":
        base = LlamaForCausalLM.from_pretrained(base_dir)
    else:
        base = BertForSequenceClassification.from_pretrained(base_dir, num_labels=want.shape[-1])
    model = PeftModel.from_pretrained(base.eval(), adir).eval()
    with torch.no_grad():
        got = model(input_ids=ids).logits
        base_only = base(input_ids=ids).logits if arch == "llama" else None
    d = (got - want).abs().max().item()
    extra = ""
    if base_only is not None:
        with torch.no_grad():
            with model.disable_adapter():
                b = model(input_ids=ids).logits
        extra = f" (without the adapter: {(b - want).abs().max().item():.3e})"
    print(f"{arch}: PEFT vs mpolm max |Δlogits| = {d:.3e}{extra}")
    return d


def main():
    export = sys.argv[1] if len(sys.argv) > 1 else "/tmp/lora_export"
    worst = max(check(export, a) for a in ("llama", "bert"))
    sys.exit(0 if worst <= TOL else 1)


if __name__ == "__main__":
    main()
