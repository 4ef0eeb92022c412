#!/usr/bin/env bash
# CaliSr on SST-2 (issue #22, item 5) with the protocol of scripts/sst2_experiment.sh (MiniLM-L6,
# first LIMIT training sentences, one epoch, batch 32, max length 64, length-grouped batches, 6%
# warmup, full dev set): MPOP (mpo-aux, --mpo-lr 2e-4 as chosen there) + CaliSr-D / CaliSr-S,
# LoRA + CaliSr-S, and the paper's Table 5 check: one switch of the whole model at a fixed 0% /
# 40% / 80% of the steps. CONFIGS picks a subset (names below); EVERY, PROBES and DELTA set the
# probe schedule (defaults 10, 3, 0.5); FFT_LR is the learning rate of LoRA's base weights while
# they are fully tuned (default 1e-4, the full fine-tuning rate of the protocol), MPO_FFT_LR that
# of the MPO central cores while they are (default 5e-5, the best mpo-central rate of the grid in
# RESULTS.md; at --mpo-lr 2e-4 the full phase collapses the model to the majority class).
#   [CONFIGS="mpo-aux mpo-d mpo-s lora-s mpo-fix0 mpo-fix40 mpo-fix80"] [MPOLM_BIN=…]
#   scripts/calisr_experiment.sh OUTDIR [limit] [epochs] [seeds...]
set -euo pipefail
cd "$(dirname "$0")/.."
out=$1; limit=${2:-8192}; epochs=${3:-1}; shift 3 || true
seeds=${*:-"1 2 3"}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/mpolm/target}"
bin="${MPOLM_BIN:-$CARGO_TARGET_DIR/release/mpolm}"
data=${MPOLM_DATA:-$(dirname "$0")/../data}/glue/SST-2
mkdir -p "$out"
[ -d "$out/mpo-full" ] || "$bin" compress minilm-l6 --matrices encoder,pooler --out "$out/mpo-full" >/dev/null
common=(--task sst2 --data "$data" --limit "$limit" --epochs "$epochs" --batch 32 --max-len 64 --warmup-ratio 0.06 --group-by-length)
probe=(--calisr-every "${EVERY:-10}" --calisr-probes "${PROBES:-3}" --calisr-delta "${DELTA:-0.5}")
mpo=("$out/mpo-full" --method mpo-aux --lr 1e-4 --mpo-lr 2e-4)
mpo_fft=(--calisr-fft-lr "${MPO_FFT_LR:-5e-5}")
for seed in $seeds; do
  for c in ${CONFIGS:-mpo-aux mpo-d mpo-s lora-s mpo-fix0 mpo-fix40 mpo-fix80}; do
    run="$out/$c-s$seed"
    [ -f "$run.json" ] && continue
    case $c in
      mpo-aux) args=("${mpo[@]}") ;;
      mpo-d) args=("${mpo[@]}" --calisr d "${probe[@]}" "${mpo_fft[@]}") ;;
      mpo-s) args=("${mpo[@]}" --calisr s "${probe[@]}" "${mpo_fft[@]}") ;;
      lora-s) args=(minilm-l6 --method lora --lr 2e-3 --lora-r 8 --lora-alpha 16 --calisr s "${probe[@]}" --calisr-fft-lr "${FFT_LR:-1e-4}") ;;
      mpo-fix*) args=("${mpo[@]}" --calisr d "${probe[@]}" "${mpo_fft[@]}" --calisr-switch-at "$(python3 -c "print(${c#mpo-fix}/100)")") ;;
      *) echo "unknown config $c" >&2; exit 2 ;;
    esac
    rm -rf "$run"
    "$bin" --threads "${THREADS:-1}" finetune "${args[@]}" "${common[@]}" --seed "$seed" --out "$run" --report "$run.json" >"$run.log" 2>&1
    rm -f "$run"/model.safetensors "$run"/adapter_model.safetensors
  done
done
python3 - "$out" <<'PY'
import json, sys, glob, statistics as st, collections
rows = collections.defaultdict(list)
for f in sorted(glob.glob(sys.argv[1] + "/*-s*.json")):
    name = f.rsplit("/", 1)[1].rsplit("-s", 1)[0]
    r = json.load(open(f)); res = r["result"]; cal = r.get("calisr", {})
    rows[name].append((res["eval"]["value"] * 100, res["tuned_params"], res["train_secs"], cal.get("switched", {})))
print("| run | dev acc % (mean ± sd) | per seed | switch steps (per seed) | #tuned at end | train s/run |")
print("|---|---|---|---|---|---|")
for m, v in rows.items():
    acc = [x[0] for x in v]
    sd = st.stdev(acc) if len(acc) > 1 else 0.0
    sw = "; ".join(", ".join(f"{k} {s}" for k, s in x[3].items()) or "none" for x in v)
    print(f"| {m} | {st.mean(acc):.2f} ± {sd:.2f} | {', '.join(f'{a:.2f}' for a in acc)} | {sw} | {v[0][1]/1e6:.2f}M | {st.mean(x[2] for x in v):.0f} |")
PY
