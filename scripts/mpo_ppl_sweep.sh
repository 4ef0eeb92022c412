#!/usr/bin/env bash
# WikiText-2 perplexity of smollm2-135m after MPO compression (no fine-tuning) at several
# parameter ratios of every attention/FFN matrix (embedding kept dense).
#   scripts/mpo_ppl_sweep.sh [windows] [max_length] [ratios...]
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/mpolm/target}"
bin="$CARGO_TARGET_DIR/release/mpolm"
win=${1:-8}; len=${2:-512}; shift 2 || true
ratios=${*:-"0.9 0.75 0.5"}
out=$(mktemp -d)
"$bin" eval smollm2-135m --task wikitext2 --limit "$win" --max-length "$len" --report "$out/base.json" >/dev/null
printf "%-8s %-12s %-14s %s\n" ratio params word_ppl token_ppl
python3 - "$out/base.json" dense <<'PY'
import json,sys; r=json.load(open(sys.argv[1])); t=r["results"]["wikitext2"]
print(f"{'1.0':8} {'dense':12} {t['word_perplexity,none']:<14.3f} {t.get('token_perplexity,none', float('nan')):.3f}")
PY
for r in $ratios; do
  "$bin" compress smollm2-135m --params-ratio "$r" --matrices proj --out "$out/ck$r" --report "$out/c$r.json" >/dev/null 2>&1
  "$bin" eval "$out/ck$r" --task wikitext2 --limit "$win" --max-length "$len" --report "$out/e$r.json" >/dev/null
  python3 - "$out/e$r.json" "$out/c$r.json" "$r" <<'PY'
import json,sys; r=json.load(open(sys.argv[1])); c=json.load(open(sys.argv[2])); t=r["results"]["wikitext2"]
p=c["total_params_after"]/c["total_params_before"]
print(f"{sys.argv[3]:8} {p:<12.3f} {t['word_perplexity,none']:<14.3f} {t.get('token_perplexity,none', float('nan')):.3f}")
PY
  rm -rf "$out/ck$r"
done
