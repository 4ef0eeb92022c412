#!/usr/bin/env python3
"""Write the tiny PEFT LoRA fixtures that crates/methods/tests/lora.rs checks mpolm against.

Made with: python 3, torch 2.15.0, transformers 5.24.0, peft 0.21.2, tokenizers (bundled
with transformers). Run from the repository root:

    python3 -m pip install peft        # once
    python3 scripts/make_peft_fixture.py

Writes crates/methods/tests/fixtures/peft/ (about 100 KB):

  llama/base/      tiny random LlamaForCausalLM (hidden 16, 2 layers, GQA 2/1 heads, vocab 64,
                   tied embeddings): config.json, model.safetensors, tokenizer.json
  llama/adapter/   PEFT LoRA (r 4, alpha 12, all 7 projections, init_lora_weights=False so A
                   and B are random and nonzero), as PeftModel.save_pretrained writes it
  llama/logits.json  {"input_ids": [[…]], "shape": [1, T, V], "logits": [flat f32]} of the
                   PEFT model (eval mode, no merging)
  bert/base/       tiny random bare BertModel (no "bert." prefix, like sentence-transformers;
                   hidden 16, 2 layers, pooler), no classifier
  bert/adapter/    PEFT LoRA on BertForSequenceClassification (3 labels; query, value; r 2,
                   alpha 4) with the classifier saved as modules_to_save
  bert/logits.json classification logits [1, 3]

Everything is seeded, but regenerating may still change the numbers across versions; the
Rust test only compares against whatever these files hold.
"""

import json
import os
import shutil

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "crates", "methods", "tests", "fixtures", "peft")
VOCAB = 64
IDS = [[3, 17, 42, 5, 63, 8, 21]]


def tokenizer(dir_):
    vocab = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2}
    for i in range(3, VOCAB):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(os.path.join(dir_, "tokenizer.json"))


def dump(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)


def logits_json(ids, logits):
    return {
        "input_ids": ids,
        "shape": list(logits.shape),
        "logits": [float(f"{v:.8g}") for v in logits.flatten().tolist()],
    }


def llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    )
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger than the 0.02 default init, so the LoRA and layers matter
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    base = os.path.join(OUT, "llama", "base")
    m.save_pretrained(base, safe_serialization=True)
    tokenizer(base)
    lcfg = LoraConfig(
        r=4, lora_alpha=12, lora_dropout=0.0, task_type="CAUSAL_LM", init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    p = get_peft_model(m, lcfg).eval()
    adir = os.path.join(OUT, "llama", "adapter")
    p.save_pretrained(adir)
    # Score what a fresh PeftModel.from_pretrained gives, i.e. what the files hold.
    fresh = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base).eval(), adir).eval()
    with torch.no_grad():
        lg = fresh(input_ids=torch.tensor(IDS)).logits
        lg0 = LlamaForCausalLM.from_pretrained(base).eval()(input_ids=torch.tensor(IDS)).logits
    print("llama: max |logits(peft) - logits(base)| =", (lg - lg0).abs().max().item())
    dump(os.path.join(OUT, "llama", "logits.json"), logits_json(IDS, lg))


def bert():
    torch.manual_seed(1)
    cfg = BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32, num_labels=3,
    )
    m = BertForSequenceClassification(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    base = os.path.join(OUT, "bert", "base")
    m.bert.save_pretrained(base, safe_serialization=True)  # bare BertModel: no "bert." prefix
    tokenizer(base)
    lcfg = LoraConfig(
        r=2, lora_alpha=4, lora_dropout=0.0, task_type="SEQ_CLS", init_lora_weights=False,
        target_modules=["query", "value"],
    )
    p = get_peft_model(m, lcfg).eval()
    adir = os.path.join(OUT, "bert", "adapter")
    p.save_pretrained(adir)
    fresh = PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(base, num_labels=3).eval(), adir).eval()
    with torch.no_grad():
        lg = fresh(input_ids=torch.tensor(IDS)).logits
        lg_mem = p(input_ids=torch.tensor(IDS)).logits
    print("bert: max |fresh - in-memory| =", (lg - lg_mem).abs().max().item())
    dump(os.path.join(OUT, "bert", "logits.json"), logits_json(IDS, lg))


def main():
    if os.path.exists(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    llama()
    bert()
    for d, _, fs in os.walk(OUT):  # PEFT writes a model card we do not need
        for f in fs:
            if f == "README.md":
                os.remove(os.path.join(d, f))
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(OUT) for f in fs)
    print(f"wrote {OUT} ({total / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
