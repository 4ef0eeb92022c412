#!/usr/bin/env bash
# Issue #8 item 3: prefill/decode tok/s and peak RSS of smollm2-135m, f32 vs quantized checkpoints
# on the new kernels vs the legacy whole-layer dequantization (MPOLM_QMATMUL=legacy), interleaved
# (each round runs every configuration once, so machine noise hits them alike).
#   scripts/bench_qkernels.sh BIN GPTQ4_DIR RTN8_DIR [rounds] [prompt_tokens] [new_tokens] [repeats]
# The checkpoints come from, e.g.:
#   mpolm quantize smollm2-135m --method gptq --bits 4 --group-size 64 --act-order --nsamples 4 --seqlen 128 --out GPTQ4_DIR
#   mpolm quantize smollm2-135m --method rtn --bits 8 --group-size 64 --out RTN8_DIR
set -euo pipefail
bin=$1; q4=$2; q8=$3; rounds=${4:-2}; pt=${5:-128}; nt=${6:-16}; reps=${7:-2}
out=$(mktemp -d)
for r in $(seq 1 "$rounds"); do
  for cfg in f32 q4 q4-legacy q8 q8-legacy; do
    case $cfg in
      f32) model=smollm2-135m; env=auto ;;
      q4) model=$q4; env=auto ;;
      q4-legacy) model=$q4; env=legacy ;;
      q8) model=$q8; env=auto ;;
      q8-legacy) model=$q8; env=legacy ;;
    esac
    echo "round $r $cfg: $(uptime | sed 's/.*load/load/')"
    MPOLM_QMATMUL=$env RAYON_NUM_THREADS=2 "$bin" --threads 2 bench generate "$model" \
      --prompt-tokens "$pt" --new-tokens "$nt" --repeats "$reps" --report "$out/$cfg.$r.json" >/dev/null
    python3 -c "import json,sys; r=json.load(open(sys.argv[1]))['bench_generate']; print(f\"  prefill {r['prefill_tok_s']:.1f} tok/s, decode {r['decode_tok_s']:.2f} tok/s, peak RSS {r['peak_rss_mb']:.0f} MiB, load {r['load_s']:.2f}s, ids {r['greedy_ids'][:8]}\")" "$out/$cfg.$r.json"
  done
done
echo "reports in $out"
