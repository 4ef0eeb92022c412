#!/usr/bin/env bash
# Fine-tuning step time and peak RSS of mpolm vs PyTorch (+ PEFT) on the same encoder, the same
# SST-2 sentences, batch and max length, in one run (issue #5, item 5). Needs torch,
# transformers and peft in python3 for the peer only.
#   scripts/bench_finetune.sh [limit] [batch] [threads]
set -euo pipefail
cd "$(dirname "$0")/.."
limit=${1:-320}; batch=${2:-32}; threads=${3:-2}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/mpolm/target}"
bin=${MPOLM_BIN:-}
if [ -z "$bin" ]; then cargo build --release -q; bin="$CARGO_TARGET_DIR/release/mpolm"; fi
data=${MPOLM_DATA:-$(dirname "$0")/../data}/glue/SST-2
out=$(mktemp -d)
"$bin" fetch minilm-l6 --report "$out/fetch.json" >/dev/null
model=$(python3 -c "import json,sys;print(json.load(open(sys.argv[1]))['path'])" "$out/fetch.json")
row() { # name, log json, time file
  python3 - "$@" <<'PY'
import json, sys
name, log, tf = sys.argv[1:4]
steps = json.load(open(log))["steps"][1:]
rss = int(open(tf).read().split()[-1]) / 1024
m = sum(s["secs"] for s in steps) / len(steps)
print(json.dumps({"peer": "mpolm", "method": name, "step_secs_mean": m, "step_secs_min": min(s["secs"] for s in steps), "peak_rss_mib": rss}))
PY
}
# mpo-aux: both tools load the same full-bond MPO checkpoint (the peer's layers: scripts/torch_mpo.py).
"$bin" compress minilm-l6 --out "$out/mpo" >/dev/null
for method in ${METHODS:-lora mpo-aux full}; do
  src=minilm-l6
  [ "$method" = mpo-aux ] && src="$out/mpo"
  RAYON_NUM_THREADS=$threads /usr/bin/time -f "%M" -o "$out/$method.time" "$bin" finetune "$src" --task sst2 \
    --data "$data/train.tsv" --method "$method" --limit "$limit" --batch "$batch" --max-len 64 \
    --warmup-ratio 0 --out "$out/$method" >/dev/null 2>&1
  row "$method" "$out/$method/finetune_log.json" "$out/$method.time"
  python3 scripts/bench_torch_finetune.py --model "$model" --data "$data/train.tsv" --method "$method" \
    --limit "$limit" --batch "$batch" --threads "$threads" --mpo "$out/mpo"
done
