#!/usr/bin/env bash
# MPOP-style SST-2 comparison on the BERT encoder (issue #5, item 4): full fine-tuning vs LoRA
# r=8 vs MPO auxiliary-only vs MPO central-only, several seeds, scored on the full dev set.
# MPO methods start from a lossless (full-bond) MPO of every encoder matrix and the pooler.
# Batches group sentences of similar length (--group-by-length) unless GROUP=0. METHODS picks a
# subset; MPO_LR sets --mpo-lr of the MPO methods (default 5e-4).
#   [BATCH=32] [GROUP=1] [METHODS="full lora mpo-aux mpo-central"] [MPO_LR=5e-4] [MPOLM_BIN=…]
#   scripts/sst2_experiment.sh OUTDIR [limit] [epochs] [seeds...]
set -euo pipefail
cd "$(dirname "$0")/.."
out=$1; limit=${2:-8192}; epochs=${3:-1}; shift 3 || true
seeds=${*:-"1 2 3"}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/mpolm/target}"
bin="${MPOLM_BIN:-$CARGO_TARGET_DIR/release/mpolm}"
data=${MPOLM_DATA:-$(dirname "$0")/../data}/glue/SST-2
mkdir -p "$out"
[ -d "$out/mpo-full" ] || "$bin" compress minilm-l6 --matrices encoder,pooler --out "$out/mpo-full" >/dev/null
common=(--task sst2 --data "$data" --limit "$limit" --epochs "$epochs" --batch "${BATCH:-32}" --max-len 64 --warmup-ratio 0.06)
[ "${GROUP:-1}" = 0 ] || common+=(--group-by-length)
for seed in $seeds; do
  for method in ${METHODS:-full lora mpo-aux mpo-central}; do
    run="$out/$method-s$seed"
    [ -f "$run.json" ] && continue
    case $method in
      full) args=(minilm-l6 --method full --lr 1e-4) ;;
      lora) args=(minilm-l6 --method lora --lr 2e-3 --lora-r 8 --lora-alpha 16) ;;
      mpo-aux) args=("$out/mpo-full" --method mpo-aux --lr 1e-4 --mpo-lr "${MPO_LR:-5e-4}") ;;
      mpo-central) args=("$out/mpo-full" --method mpo-central --lr 1e-4 --mpo-lr "${MPO_LR:-5e-4}") ;;
    esac
    rm -rf "$run"
    "$bin" finetune "${args[@]}" "${common[@]}" --seed "$seed" --out "$run" --report "$run.json" >"$run.log" 2>&1
    rm -f "$run"/model.safetensors "$run"/adapter_model.safetensors
  done
done
python3 - "$out" <<'PY'
import json, sys, glob, statistics as st, collections
rows = collections.defaultdict(list)
for f in sorted(glob.glob(sys.argv[1] + "/*-s*.json")):
    r = json.load(open(f)); res = r["result"]; m = r["options"]["method"]
    rows[m].append((res["eval"]["value"] * 100, res["tuned_params"], res["total_params"], res["train_secs"]))
print("| method | dev acc % (mean ± sd) | seeds | #tuned | #total | wall s/run |")
print("|---|---|---|---|---|---|")
for m in ["full", "lora", "mpo-aux", "mpo-central"]:
    v = rows.get(m)
    if not v: continue
    acc = [x[0] for x in v]
    sd = st.stdev(acc) if len(acc) > 1 else 0.0
    print(f"| {m} | {st.mean(acc):.2f} ± {sd:.2f} | {len(v)} | {v[0][1]/1e6:.2f}M | {v[0][2]/1e6:.2f}M | {st.mean(x[3] for x in v):.0f} |")
PY
