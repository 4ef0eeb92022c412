#!/usr/bin/env bash
# Quantization table of issue #6 item 6 for one causal model: bits × {RTN, GPTQ} with WikiText-2
# perplexity (RESULTS.md protocol: first 8 disjoint 512-token windows of the test split), model size,
# peak RSS, decode tok/s, and MMLU / GSM8K subsets on the checkpoints named in EVAL.
#   [GROUP=128] [BITS="8 4 3 2"] [METHODS="rtn gptq"] [NSAMPLES=16] [SEQLEN=512] [PPL_WINDOWS=8]
#   [EVAL="f32 gptq8 gptq4 rtn4 gptq3 gptq2"] [MMLU_LIMIT=3] [MMLU_SHOTS=0] [GSM_LIMIT=20] [GSM_BATCH=8]
#   [THREADS=2] [MPOLM_BIN=…] scripts/quant_table.sh MODEL OUTDIR
# Every step is skipped when its report exists, so an interrupted run resumes. The table is printed by
# scripts/quant_table.py OUTDIR.
set -euo pipefail
cd "$(dirname "$0")/.."
model=$1; out=$2
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/mpolm/target}"
bin="${MPOLM_BIN:-$CARGO_TARGET_DIR/release/mpolm}"
threads=${THREADS:-2}
mkdir -p "$out"
common=(--threads "$threads" --ppl-windows "${PPL_WINDOWS:-8}" --ppl-window 512)

step() { # name, then the command; its stdout+stderr go to OUT/name.log
  local name=$1; shift
  echo "$(date +%T) $name" >&2
  "$@" >"$out/$name.log" 2>&1
}

methods=${METHODS:-rtn gptq}; widths=${BITS:-8 4 3 2}
names=(); for m in $methods; do for b in $widths; do names+=("$m$b"); done; done

[ -f "$out/f32.json" ] || step f32 "$bin" quantize "$model" --method none "${common[@]}" --report "$out/f32.json"
for method in $methods; do
  for bits in $widths; do
    name=$method$bits
    [ -f "$out/$name.json" ] && continue
    rm -rf "$out/$name"
    args=("$model" --method "$method" --bits "$bits" --group-size "${GROUP:-128}" --out "$out/$name")
    [ "$method" = gptq ] && args+=(--nsamples "${NSAMPLES:-16}" --seqlen "${SEQLEN:-512}")
    step "$name" /usr/bin/time -v "$bin" quantize "${args[@]}" "${common[@]}" --report "$out/$name.json"
  done
done

# Decode speed of each checkpoint (the f32 model for "f32"): 128-token prompt, 64 new tokens.
for name in f32 "${names[@]}"; do
  [ -f "$out/bench-$name.json" ] && continue
  src="$out/$name"; [ "$name" = f32 ] && src=$model
  step "bench-$name" "$bin" bench generate "$src" --threads "$threads" --prompt-tokens 128 --new-tokens 64 \
    --report "$out/bench-$name.json"
done

for name in ${EVAL:-f32 gptq8 gptq4 rtn4 gptq3 gptq2}; do
  src="$out/$name"; [ "$name" = f32 ] && src=$model
  [ -f "$out/mmlu-$name.json" ] || step "mmlu-$name" "$bin" eval "$src" --threads "$threads" --task mmlu \
    --shots "${MMLU_SHOTS:-0}" --limit "${MMLU_LIMIT:-3}" --report "$out/mmlu-$name.json"
  [ -f "$out/gsm8k-$name.json" ] || step "gsm8k-$name" "$bin" eval "$src" --threads "$threads" --task gsm8k \
    --limit "${GSM_LIMIT:-20}" --batch "${GSM_BATCH:-8}" --report "$out/gsm8k-$name.json"
done
python3 scripts/quant_table.py "$out"
