#!/usr/bin/env bash
# MPOP-style SST-2 comparison on the BERT encoder (issue #5, item 4): full fine-tuning vs LoRA
# r=8 vs MPO auxiliary-only vs MPO central-only, several seeds, scored on the full dev set.
# MPO methods start from a lossless (full-bond) MPO of every encoder matrix and the pooler.
# Batches group sentences of similar length (--group-by-length) unless GROUP=0. METHODS picks a
# subset; MPO_LR sets --mpo-lr of the MPO methods (default 5e-4). OPF (issue #19) as METHODS
# opf-svd (2-site chains), opf-static (11-site, zero-ablation scores), opf-dynamic (11-site,
# Taylor scores, OPF_PER_ROUND per group every run/rounds steps): OPF_N matrices per module
# group (default 4 of MiniLM's 6 layers, as the paper's 8 of BERT-base's 12), lr 1e-4 for all.
#   [BATCH=32] [GROUP=1] [METHODS="full lora mpo-aux mpo-central"] [MPO_LR=5e-4] [MPOLM_BIN=…]
#   [OPF_N=4] [OPF_PER_ROUND=1] [THREADS=…] [TIME_V=1]
#   scripts/sst2_experiment.sh OUTDIR [limit] [epochs] [seeds...]
set -euo pipefail
cd "$(dirname "$0")/.."
out=$1; limit=${2:-8192}; epochs=${3:-1}; shift 3 || true
seeds=${*:-"1 2 3"}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/mpolm/target}"
bin="${MPOLM_BIN:-$CARGO_TARGET_DIR/release/mpolm}"
data=${MPOLM_DATA:-$(dirname "$0")/../data}/glue/SST-2
mkdir -p "$out"
threads=(); [ -z "${THREADS:-}" ] || threads=(--threads "$THREADS")
opf=(--method opf --lr 1e-4 --opf-top-n "${OPF_N:-4}")
need_mpo=0; for m in ${METHODS:-full lora mpo-aux mpo-central}; do case $m in mpo-*) need_mpo=1 ;; esac; done
[ "$need_mpo" = 0 ] || [ -d "$out/mpo-full" ] || "$bin" compress minilm-l6 --matrices encoder,pooler --out "$out/mpo-full" >/dev/null
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
      opf-svd) args=(minilm-l6 "${opf[@]}" --opf-select static --opf-score ablation --opf-sites 2) ;;
      opf-static) args=(minilm-l6 "${opf[@]}" --opf-select static --opf-score ablation --opf-sites 11) ;;
      opf-dynamic) args=(minilm-l6 "${opf[@]}" --opf-select dynamic --opf-score taylor --opf-sites 11 --opf-per-round "${OPF_PER_ROUND:-1}") ;;
    esac
    rm -rf "$run"
    # TIME_V=1: peak RSS and times from /usr/bin/time -v at the end of the run's log.
    ${TIME_V:+/usr/bin/time -v} "$bin" "${threads[@]}" finetune "${args[@]}" "${common[@]}" --seed "$seed" --out "$run" --report "$run.json" >"$run.log" 2>&1
    rm -f "$run"/model.safetensors "$run"/adapter_model.safetensors
  done
done
python3 - "$out" <<'PY'
import json, sys, glob, statistics as st, collections
rows = collections.defaultdict(list)
for f in sorted(glob.glob(sys.argv[1] + "/*-s*.json")):
    r = json.load(open(f)); res = r["result"]; m = r["options"]["method"]
    if m == "opf":
        o = r["options"]["opf"]
        m = "opf-svd" if o["sites"] == 2 else "opf-" + o["select"]
    rows[m].append((res["eval"]["value"] * 100, res["tuned_params"], res["total_params"], res["train_secs"]))
print("| method | dev acc % (mean ± sd) | seeds | #tuned | #total | wall s/run |")
print("|---|---|---|---|---|---|")
for m in ["full", "lora", "mpo-aux", "mpo-central", "opf-svd", "opf-static", "opf-dynamic"]:
    v = rows.get(m)
    if not v: continue
    acc = [x[0] for x in v]
    sd = st.stdev(acc) if len(acc) > 1 else 0.0
    print(f"| {m} | {st.mean(acc):.2f} ± {sd:.2f} | {len(v)} | {v[0][1]/1e6:.2f}M | {v[0][2]/1e6:.2f}M | {st.mean(x[3] for x in v):.0f} |")
PY
