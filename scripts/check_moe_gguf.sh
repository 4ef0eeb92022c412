#!/usr/bin/env bash
# Manual check (not run in CI) that `mpolm export --gguf` of a mixture of experts is what
# llama.cpp computes (issue #20, item 3): SmolLM2-135M upcycled to E experts (top-2, every
# layer), made to differ by STEPS fine-tuning steps (a fresh upcycle's experts are identical
# copies, which would hide a wrong expert order or gate), exported as f32 GGUF in llama.cpp's
# expert layout, then WikiText-2 perplexity over the same rolling windows from mpolm (the MoE
# checkpoint itself) and from llama.cpp (llama-cpp-python, the exported file). Needs
# llama-cpp-python in python3.
#   [E=4] [STEPS=2] [WINDOWS=2] [MAXLEN=256] [THREADS=2] [MPOLM_BIN=…] scripts/check_moe_gguf.sh OUTDIR
set -euo pipefail
cd "$(dirname "$0")/.."
out=$1; e=${E:-4}; windows=${WINDOWS:-2}; maxlen=${MAXLEN:-256}; threads=${THREADS:-2}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/mpolm/target}"
bin="${MPOLM_BIN:-$CARGO_TARGET_DIR/release/mpolm}"
data=${MPOLM_DATA:-$(dirname "$0")/../data}/wikitext2
mkdir -p "$out"
[ -d "$out/up" ] || "$bin" upcycle smollm2-135m --experts "$e" --router top2 --out "$out/up" >/dev/null
[ -d "$out/ft" ] || "$bin" --threads "$threads" finetune "$out/up" --task lm --data "$data/valid.txt" \
  --method full --lr 1e-3 --warmup-steps 0 --batch 2 --max-len 64 --max-steps "${STEPS:-2}" --out "$out/ft" >/dev/null
rm -f "$out/moe.gguf"
"$bin" export "$out/ft" --gguf --type f32 --out "$out/moe.gguf" --report "$out/export.json" >/dev/null
"$bin" --threads "$threads" eval "$out/ft" --task wikitext2 --max-length "$maxlen" --limit "$windows" \
  --no-cache --report "$out/ppl-mpolm.json" >/dev/null
python3 scripts/bench_llamacpp.py "$out/moe.gguf" --threads "$threads" --skip-speed --wikitext "$data/test.txt" \
  --max-length "$maxlen" --windows "$windows" --json "$out/ppl-llama.json" >/dev/null
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
m = json.load(open(f"{out}/ppl-mpolm.json"))
l = json.load(open(f"{out}/ppl-llama.json"))
print(json.dumps({"mpolm": m.get("results", m), "llama_cpp": l.get("perplexity", l)}, indent=1)[:3000])
PY
