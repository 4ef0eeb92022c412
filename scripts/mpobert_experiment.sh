#!/usr/bin/env bash
# MPOBERT (issue #21) reduced experiment: build MPOBERT-6/12 (shared centrals, adapter r=8) from
# minilm-l6, give each model (and dense MiniLM-6) the same short masked-LM budget on WikiText-2
# valid (test held out for the MLM eval), then the same SST-2 fine-tuning, scored on the full dev
# set. `stability` instead runs the L = 24 MLM loss curves with scaled vs copy initialisation.
#   [STEPS=40] [MLM_BATCH=8] [LIMIT=1024] [MPOLM_BIN=…] scripts/mpobert_experiment.sh OUTDIR main|sst|stability [seed]
set -euo pipefail
cd "$(dirname "$0")/.."
out=$1; what=$2; seed=${3:-1}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/mpolm/target}"
bin=(${MPOLM_BIN:-$CARGO_TARGET_DIR/release/mpolm} --threads 1)
data=${MPOLM_DATA:-data}
steps=${STEPS:-40}
mkdir -p "$out"
build() { # name depth init
  [ -d "$out/$1" ] || "${bin[@]}" mpobert minilm-l6 --share all --depth "$2" --init "$3" \
    --adapter-rank 8 --central-from joint --out "$out/$1" --report "$out/$1.json" >"$out/$1.log" 2>&1
}
mlm() { # name model
  [ -f "$out/mlm-$1.json" ] || "${bin[@]}" finetune "$2" --task mlm --method full --lr 1e-4 \
    --data "$data/wikitext2/valid.txt" --eval-data "$data/wikitext2/test.txt" --eval-limit 32 \
    --max-steps "$steps" --batch "${MLM_BATCH:-8}" --max-len 64 --warmup-ratio 0.06 --seed "$seed" \
    --out "$out/mlm-$1" --report "$out/mlm-$1.json" >"$out/mlm-$1.log" 2>&1
}
sst() { # name
  [ -f "$out/sst-$1.json" ] || "${bin[@]}" finetune "$out/mlm-$1" --task sst2 --method full --lr 1e-4 \
    --data "$data/glue/SST-2" --limit "${LIMIT:-1024}" --epochs 1 --batch 32 --max-len 64 \
    --warmup-ratio 0.06 --group-by-length --seed "$seed" --out "$out/sst-$1" --report "$out/sst-$1.json" >"$out/sst-$1.log" 2>&1
}
case $what in
  main)
    build mb6 6 scaled; build mb12 12 scaled
    mlm dense minilm-l6; mlm mb6 "$out/mb6"; mlm mb12 "$out/mb12"
    for m in dense mb6 mb12; do sst $m; done ;;
  sst) # the SST-2 step alone, for models whose MLM run is done
    for m in ${NAMES:-dense mb6 mb12}; do sst $m; done ;;
  stability)
    build mb24s 24 scaled; build mb24c 24 copy
    mlm mb24s "$out/mb24s"; mlm mb24c "$out/mb24c" ;;
esac
