#!/usr/bin/env bash
# Generation speed of mpolm vs PyTorch (transformers) on the same GGUF model, same prompt,
# same thread count, in one run; prints both and the ratios. Needs torch, transformers,
# gguf and accelerate in python3 (peer baseline only; the product never uses Python ML).
#   scripts/bench_generate.sh [alias] [threads] [prompt_tokens] [new_tokens]
set -euo pipefail
cd "$(dirname "$0")/.."
alias=${1:-smollm2-135m}; threads=${2:-2}; pt=${3:-128}; nt=${4:-64}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/mpolm/target}"
cargo build --release -q
bin="$CARGO_TARGET_DIR/release/mpolm"
out=$(mktemp -d)
gguf=$("$bin" fetch "$alias" --report "$out/fetch.json" >/dev/null && python3 -c "import json,sys;print(json.load(open(sys.argv[1]))['path'])" "$out/fetch.json")
RAYON_NUM_THREADS=$threads "$bin" bench generate "$alias" --threads "$threads" --prompt-tokens "$pt" --new-tokens "$nt" --report "$out/rust.json"
python3 scripts/bench_torch_generate.py --gguf-dir "$(dirname "$gguf")" --gguf-file "$(basename "$gguf")" \
  --threads "$threads" --prompt-tokens "$pt" --new-tokens "$nt" --json "$out/torch.json" >/dev/null
python3 - "$out/rust.json" "$out/torch.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["bench_generate"]; t = json.load(open(sys.argv[2]))
print(f"{'':10} {'prefill tok/s':>14} {'decode tok/s':>13} {'peak RSS MiB':>13}")
print(f"{'mpolm':10} {r['prefill_tok_s']:14.1f} {r['decode_tok_s']:13.2f} {r['peak_rss_mb']:13.0f}")
print(f"{'pytorch':10} {t['prefill_tok_s']:14.1f} {t['decode_tok_s']:13.2f} {t['peak_rss_mb']:13.0f}")
print(f"{'ratio':10} {r['prefill_tok_s']/t['prefill_tok_s']:13.2f}x {r['decode_tok_s']/t['decode_tok_s']:12.2f}x {r['peak_rss_mb']/t['peak_rss_mb']:12.2f}x")
print("same greedy tokens:", r["greedy_ids"] == t["greedy_ids"])
PY
