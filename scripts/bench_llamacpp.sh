#!/usr/bin/env bash
# mpolm (--gguf-weights quantized) vs llama.cpp (llama-cpp-python) on the same GGUF files:
# prefill/decode tok/s on the `mpolm bench generate` prompt, and WikiText-2 token perplexity
# on the same rolling windows (issue #6 item 7). Runs are interleaved file by file and round
# by round, because the machine is shared; every line of output carries the load average.
#   scripts/bench_llamacpp.sh [threads] [rounds] [ppl_windows] [max_length]
# Files: the smollm2-135m package's own Q4_1 GGUF and `mpolm export --gguf --type q8_0|q4_0`
# of it (written to $OUT, default /tmp/bench_llamacpp). MPOLM_BIN overrides the binary.
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-2}; rounds=${2:-2}; windows=${3:-4}; maxlen=${4:-512}
out=${OUT:-/tmp/bench_llamacpp}; mkdir -p "$out"
bin=${MPOLM_BIN:-${CARGO_TARGET_DIR:-$HOME/.cache/mpolm/target}/release/mpolm}
export MPOLM_DATA=${MPOLM_DATA:-$(cd "$(dirname "$0")/../data" && pwd)}
data=$MPOLM_DATA/wikitext2/test.txt
export RAYON_NUM_THREADS=$threads

"$bin" fetch smollm2-135m --report "$out/fetch.json" >/dev/null
q41=$(python3 -c "import json,sys;print(json.load(open(sys.argv[1]))['path'])" "$out/fetch.json")
for t in q8_0 q4_0; do
  [ -f "$out/smollm2-$t.gguf" ] || "$bin" export smollm2-135m --gguf --type $t --out "$out/smollm2-$t.gguf" >/dev/null
done
declare -A file=([q4_1]="$q41" [q8_0]="$out/smollm2-q8_0.gguf" [q4_0]="$out/smollm2-q4_0.gguf")
types="q4_1 q8_0 q4_0"

for r in $(seq 1 "$rounds"); do
  for t in $types; do
    echo "[$(uptime | sed 's/.*load average: //')] round $r $t: mpolm"
    "$bin" bench generate "${file[$t]}" --gguf-weights quantized --threads "$threads" \
      --report "$out/mpolm-$t-$r.json" 2>/dev/null
    echo "[$(uptime | sed 's/.*load average: //')] round $r $t: llama.cpp"
    python3 scripts/bench_llamacpp.py "${file[$t]}" --threads "$threads" --json "$out/llama-$t-$r.json" >/dev/null
  done
done
for t in $types; do
  # PPL_F32=1 also scores the same file dequantized to f32 (mpolm's batch path is the exact
  # product with the dequantized weights, so the two agree to f32 rounding).
  for w in quantized $([ "${PPL_F32:-0}" = 1 ] && echo f32); do
    echo "[$(uptime | sed 's/.*load average: //')] ppl $t: mpolm ($w)"
    "$bin" eval "${file[$t]}" --task wikitext2 --max-length "$maxlen" --limit "$windows" \
      --gguf-weights $w --threads "$threads" --report "$out/ppl-mpolm-$w-$t.json" 2>/dev/null | tail -2
  done
  echo "[$(uptime | sed 's/.*load average: //')] ppl $t: llama.cpp"
  python3 scripts/bench_llamacpp.py "${file[$t]}" --threads "$threads" --skip-speed --wikitext "$data" \
    --max-length "$maxlen" --windows "$windows" --json "$out/ppl-llama-$t.json" >/dev/null
done

python3 - "$out" "$rounds" $types <<'PY'
import json, os, statistics, sys
out, rounds, types = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
ld = lambda p: json.load(open(p))
print(f"{'file':6} {'mpolm prefill':>13} {'llama prefill':>13} {'mpolm decode':>12} {'llama decode':>12} {'decode ratio':>12}"
      f" {'ppl mpolm-q':>11} {'ppl mpolm-f32':>13} {'ppl llama':>9} {'ppl ratio':>9} {'RSS MiB':>7} {'weights MiB':>11} same-greedy")
for t in types:
    m = [ld(f"{out}/mpolm-{t}-{r}.json")["bench_generate"] for r in range(1, rounds + 1)]
    l = [ld(f"{out}/llama-{t}-{r}.json")["speed"] for r in range(1, rounds + 1)]
    med = lambda xs, k: statistics.median(x[k] for x in xs)
    pq = ld(f"{out}/ppl-mpolm-quantized-{t}.json")
    fpath = f"{out}/ppl-mpolm-f32-{t}.json"
    pf = ld(fpath) if os.path.exists(fpath) else None
    pl = ld(f"{out}/ppl-llama-{t}.json")["wikitext2"]
    tp = lambda p: p["results"]["wikitext2"]["token_perplexity,none"]
    qp, fp = tp(pq), (tp(pf) if pf else float("nan"))
    # Same windows on both sides: window count (from the whole text's token count), prefix
    # token and scored tokens must agree.
    c = pq["configs"]["wikitext2"]
    assert (c["windows"], c["prefix_token"], c["tokens"]) == (pl["windows"], pl["prefix_token"], pl["tokens"]), (c, pl)
    same = all(a["greedy_ids"] == b["greedy_ids"] for a, b in zip(m, l))
    print(f"{t:6} {med(m,'prefill_tok_s'):13.1f} {med(l,'prefill_tok_s'):13.1f} {med(m,'decode_tok_s'):12.1f} {med(l,'decode_tok_s'):12.1f}"
          f" {med(m,'decode_tok_s')/med(l,'decode_tok_s'):11.2f}x {qp:11.3f} {fp:13.3f} {pl['token_perplexity']:9.3f}"
          f" {qp/pl['token_perplexity']:8.3f}x {max(x['peak_rss_mb'] for x in m):7.0f} {m[0]['weight_bytes']/2**20:11.1f} {same}")
PY
