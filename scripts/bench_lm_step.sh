#!/usr/bin/env bash
# One causal-LM fine-tuning step (SmolLM2-135M, batch 4 x 256 tokens) of mpolm vs PyTorch (+ PEFT)
# in one run: step time and peak RSS (issue #8, item 4). Needs torch, transformers and peft in
# python3 for the peer only. mpo-aux is MPOP's auxiliary-only tuning of a lossless MPO of every
# attention/FFN matrix; both tools load the same `mpolm compress` checkpoint (the peer's MPO
# layers are scripts/torch_mpo.py).
#   [METHODS="lora full mpo-aux"] scripts/bench_lm_step.sh [steps] [threads]
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-6}; threads=${2:-2}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/mpolm/target}"
bin=${MPOLM_BIN:-}
if [ -z "$bin" ]; then cargo build --release -q; bin="$CARGO_TARGET_DIR/release/mpolm"; fi
data=${MPOLM_DATA:-$(dirname "$0")/../data}/wikitext2/valid.txt
out=$(mktemp -d)
"$bin" export smollm2-135m --dense --out "$out/hf" >/dev/null
for method in ${METHODS:-lora full mpo-aux}; do
  model=smollm2-135m
  if [ "$method" = mpo-aux ]; then
    [ -d "$out/mpo" ] || "$bin" compress smollm2-135m --matrices self_attn,mlp --out "$out/mpo" >/dev/null
    model="$out/mpo"
  fi
  RAYON_NUM_THREADS=$threads /usr/bin/time -f "%M" -o "$out/$method.time" "$bin" finetune "$model" \
    --task lm --data "$data" --method "$method" --limit $((steps * 4)) --eval-limit 4 --batch 4 \
    --max-len 256 --warmup-ratio 0 --out "$out/$method" >/dev/null 2>&1
  python3 - "$method" "$out/$method/finetune_log.json" "$out/$method.time" <<'PY'
import json, sys
name, log, tf = sys.argv[1:4]
steps = json.load(open(log))["steps"][1:]
rss = int(open(tf).read().split()[-1]) / 1024
print(json.dumps({"peer": "mpolm", "task": "lm", "method": name,
                  "step_secs_mean": sum(s["secs"] for s in steps) / len(steps),
                  "step_secs_min": min(s["secs"] for s in steps), "peak_rss_mib": rss}))
PY
  peer_mpo=()
  [ "$method" = mpo-aux ] && peer_mpo=(--mpo "$out/mpo")
  python3 scripts/bench_torch_lm_step.py --model "$out/hf" --data "$data" --method "$method" \
    --steps "$steps" --batch 4 --max-len 256 --threads "$threads" "${peer_mpo[@]}"
done
rm -rf "$out"
