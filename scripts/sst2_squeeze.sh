#!/usr/bin/env bash
# MPOP dimension squeezing vs direct truncation on SST-2 (issue #5, item 4): tune a lossless MPO
# of the encoder (mpo-aux), squeeze it toward --target-params with auxiliary-only recovery, then
# build a directly truncated MPO with the same parameter count and give it the same number of
# auxiliary-only steps. Both are scored on the full dev set with `mpolm eval --task sst2`.
# Knobs (env): BATCH (16), MATRICES (encoder,pooler; "all" = every matrix and the embedding),
# MPO_LR (5e-4), DELTA (0.1), CUT (0.05), RECOVER (8), ITERS (12), EVAL_LIMIT (200), GROUP (0;
# 1 = --group-by-length), HELDOUT (0; N > 0 = the squeeze's Δ check uses the N training sentences
# after the first `limit` instead of the first EVAL_LIMIT dev sentences, so the dev set only
# scores), MPOLM_BIN.
#   scripts/sst2_squeeze.sh OUTDIR [limit] [target] [seed]
set -euo pipefail
cd "$(dirname "$0")/.."
out=$1; limit=${2:-1024}; target=${3:-0.6}; seed=${4:-1}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/mpolm/target}"
bin="${MPOLM_BIN:-$CARGO_TARGET_DIR/release/mpolm}"
data=${MPOLM_DATA:-$(dirname "$0")/../data}/glue/SST-2
b=${BATCH:-16}
mats=(--matrices "${MATRICES:-encoder,pooler}")
[ "${MATRICES:-}" = all ] && mats=()
mkdir -p "$out"
[ -d "$out/mpo-full" ] || "$bin" compress minilm-l6 "${mats[@]}" --out "$out/mpo-full" >/dev/null
tune=(--task sst2 --data "$data" --limit "$limit" --batch "$b" --max-len 64 --lr 1e-4 --mpo-lr "${MPO_LR:-5e-4}"
  --seed "$seed" --eval-limit "${EVAL_LIMIT:-200}")
[ "${GROUP:-0}" = 1 ] && tune+=(--group-by-length)
if [ "${HELDOUT:-0}" -gt 0 ]; then
  sed -n "1p;$((limit + 2)),$((limit + 1 + HELDOUT))p" "$data/train.tsv" >"$out/heldout.tsv"
  tune+=(--eval-data "$out/heldout.tsv")
fi
if [ ! -f "$out/squeeze.json" ]; then
  rm -rf "$out/squeeze"
  "$bin" finetune "$out/mpo-full" --method mpo-aux "${tune[@]}" --squeeze --target-params "$target" \
    --delta "${DELTA:-0.1}" --cut-fraction "${CUT:-0.05}" --recover-steps "${RECOVER:-8}" --max-iters "${ITERS:-12}" --out "$out/squeeze" --report "$out/squeeze.json" >"$out/squeeze.log" 2>&1
fi
read -r final steps < <(python3 - "$out/squeeze/finetune_log.json" <<'PY'
import json, sys
l = json.load(open(sys.argv[1]))
print(l["squeeze"]["final_params"], len(l["steps"]))
PY
)
# Per-matrix ratio that lands the directly truncated model on the same total.
ratio=$(python3 - "$out/mpo-full" "$final" <<'PY'
import json, sys
man = json.load(open(sys.argv[1] + "/mpo_manifest.json"))["layers"]
dense = sum(l["orig_rows"] * l["orig_cols"] for l in man.values())
total = 22713986  # minilm-l6 with a 2-label head
print(max(0.01, (int(sys.argv[2]) - (total - dense)) / dense))
PY
)
if [ ! -f "$out/direct.json" ]; then
  rm -rf "$out/direct-ck" "$out/direct"
  "$bin" compress minilm-l6 "${mats[@]}" --params-ratio "$ratio" --out "$out/direct-ck" >/dev/null
  "$bin" finetune "$out/direct-ck" --method mpo-aux "${tune[@]}" --epochs 100 --max-steps "$steps" \
    --out "$out/direct" --report "$out/direct.json" >"$out/direct.log" 2>&1
fi
for k in squeeze direct; do
  [ -f "$out/eval-$k.json" ] || "$bin" eval "$out/$k" --task sst2 --report "$out/eval-$k.json" >/dev/null 2>&1
done
python3 - "$out" <<'PY'
import json, sys
o = sys.argv[1]
print("| model | total params | ratio to dense | steps | dev acc % (872) |")
print("|---|---|---|---|---|")
for k in ("squeeze", "direct"):
    r = json.load(open(f"{o}/{k}.json"))["result"]; e = json.load(open(f"{o}/eval-{k}.json"))
    r["steps"] = len(json.load(open(f"{o}/{k}/finetune_log.json"))["steps"])  # squeezing's recoveries too
    acc = e["results"]["sst2"]["acc,none"] * 100
    print(f"| {k} | {r['total_params']/1e6:.2f}M | {r['total_params']/22713986:.3f} | {r['steps']} | {acc:.2f} |")
PY
