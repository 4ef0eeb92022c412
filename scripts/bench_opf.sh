#!/usr/bin/env bash
# OPF step time and peak RSS (issue #19, item 6): mpolm full fine-tuning vs mpolm OPF vs the
# PyTorch peer of the same over-parameterized layers (scripts/bench_torch_finetune.py --method
# opf: the matrices mpolm's run chose, exact chains over the same 1-padded sites, rebuilt every
# forward as the OPF code does) vs PyTorch full fine-tuning; same MiniLM, SST-2 sentences,
# batch and max length, in alternating rounds. Step times are the mean over steps 2… (step 1
# holds OPF's scoring and decomposition).
#   [ROUNDS=2] [SITES=11] [TOPN=4] [THREADS=1] [MPOLM_BIN=…] scripts/bench_opf.sh OUTDIR [limit] [batch]
set -euo pipefail
cd "$(dirname "$0")/.."
out=$1; limit=${2:-352}; batch=${3:-32}; threads=${THREADS:-1}; sites=${SITES:-11}; topn=${TOPN:-4}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/mpolm/target}"
bin="${MPOLM_BIN:-$CARGO_TARGET_DIR/release/mpolm}"
data=${MPOLM_DATA:-$(dirname "$0")/../data}/glue/SST-2/train.tsv
mkdir -p "$out"
"$bin" fetch minilm-l6 --report "$out/fetch.json" >/dev/null
model=$(python3 -c "import json,sys;print(json.load(open(sys.argv[1]))['path'])" "$out/fetch.json")
common=(--task sst2 --data "$data" --limit "$limit" --batch "$batch" --max-len 64 --warmup-ratio 0 --lr 1e-4)
opf=(--method opf --opf-select static --opf-score ablation --opf-top-n "$topn" --opf-sites "$sites")
row() { # name, finetune_log.json, /usr/bin/time file
  python3 - "$@" <<'PY'
import json, sys
name, log, tf = sys.argv[1:4]
steps = json.load(open(log))["steps"][1:]
rss = int(open(tf).read().split()[-1]) / 1024
print(json.dumps({"peer": "mpolm", "method": name, "steps": len(steps) + 1,
                  "step_secs_mean": sum(s["secs"] for s in steps) / len(steps),
                  "step_secs_min": min(s["secs"] for s in steps), "peak_rss_mib": rss}))
PY
}
for r in $(seq 1 "${ROUNDS:-2}"); do
  for m in full opf; do
    args=(--method full); [ $m = opf ] && args=("${opf[@]}")
    rm -rf "$out/$m-$r"
    /usr/bin/time -f "%M" -o "$out/$m-$r.time" "$bin" --threads "$threads" finetune minilm-l6 "${args[@]}" \
      "${common[@]}" --out "$out/$m-$r" >/dev/null 2>&1
    row "$m" "$out/$m-$r/finetune_log.json" "$out/$m-$r.time" | tee -a "$out/rows.jsonl"
    chosen=""
    [ $m = opf ] && chosen=$(python3 -c "import json,sys;print(','.join(n for r in json.load(open(sys.argv[1]))['hooks']['opf']['rounds'] for n in r['chosen']))" "$out/$m-$r/finetune_log.json")
    python3 scripts/bench_torch_finetune.py --model "$model" --data "$data" --method "$m" --limit "$limit" \
      --batch "$batch" --lr 1e-4 --threads "$threads" --opf-chosen "$chosen" --opf-sites "$sites" 2>/dev/null \
      | tail -1 | tee -a "$out/rows.jsonl"
  done
done
