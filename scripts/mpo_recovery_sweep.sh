#!/usr/bin/env bash
# WikiText-2 perplexity of smollm2-135m vs MPO parameter ratio, right after compression and after a
# short auxiliary-only recovery (MPOP's lightweight fine-tuning) on the WikiText-2 *validation* text
# (evaluation is on the test split). Writes a table and an SVG plot.
#   scripts/mpo_recovery_sweep.sh OUTDIR [steps] [windows] [ratios...]
set -euo pipefail
cd "$(dirname "$0")/.."
out=$1; steps=${2:-20}; win=${3:-8}; shift 3 || true
ratios=${*:-"0.9 0.75 0.5"}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/mpolm/target}"
bin="$CARGO_TARGET_DIR/release/mpolm"
data=${MPOLM_DATA:-$(dirname "$0")/../data}/wikitext2
mkdir -p "$out"
ev() { "$bin" eval "$1" --task wikitext2 --limit "$win" --max-length 512 --report "$2" >/dev/null 2>&1; }
[ -f "$out/dense.json" ] || ev smollm2-135m "$out/dense.json"
for r in $ratios; do
  ck="$out/ck$r"; ft="$out/ft$r"
  [ -d "$ck" ] || "$bin" compress smollm2-135m --params-ratio "$r" --matrices proj --out "$ck" --report "$out/c$r.json" >/dev/null 2>&1
  [ -f "$out/e$r.json" ] || ev "$ck" "$out/e$r.json"
  if [ ! -f "$out/f$r.json" ]; then
    rm -rf "$ft"
    "$bin" finetune "$ck" --task lm --data "$data/valid.txt" --method mpo-aux --lr 1e-4 --mpo-lr 1e-3 \
      --max-steps "$steps" --batch 4 --max-len 256 --eval-limit 8 --warmup-ratio 0.1 --out "$ft" --report "$out/t$r.json" >"$out/t$r.log" 2>&1
    ev "$ft" "$out/f$r.json"
  fi
done
python3 - "$out" $ratios <<'PY'
import json, sys
out, ratios = sys.argv[1], sys.argv[2:]
ppl = lambda f: json.load(open(f))["results"]["wikitext2"]["word_perplexity,none"]
dense = ppl(f"{out}/dense.json")
rows = []
for r in ratios:
    c = json.load(open(f"{out}/c{r}.json")); t = json.load(open(f"{out}/t{r}.json"))["result"]
    rows.append((float(r), c["total_params_after"] / c["total_params_before"], ppl(f"{out}/e{r}.json"), ppl(f"{out}/f{r}.json"), t["steps"], t["tuned_params"], t["train_secs"]))
print(f"| params ratio per matrix | total / dense | word ppl, no FT | word ppl, after aux-only recovery | steps | #tuned | train s |")
print("|---|---|---|---|---|---|---|")
print(f"| dense | 1.000 | {dense:.2f} | – | – | – | – |")
for r, p, a, b, s, n, secs in rows:
    print(f"| {r} | {p:.3f} | {a:.4g} | {b:.4g} | {s} | {n/1e6:.2f}M | {secs:.0f} |")
# SVG: log10 word perplexity vs total-parameter ratio.
import math
W, H, L, B = 560, 360, 70, 50
xs = [p for _, p, *_ in rows] + [1.0]
ys = [math.log10(v) for _, _, a, b, *_ in rows for v in (a, b)] + [math.log10(dense)]
x0, x1 = min(xs) - 0.05, 1.02
y0, y1 = 0, max(ys) + 0.5
X = lambda x: L + (x - x0) / (x1 - x0) * (W - L - 20)
Y = lambda y: H - B - (y - y0) / (y1 - y0) * (H - B - 20)
svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
       f'<rect width="{W}" height="{H}" fill="white"/>',
       f'<line x1="{L}" y1="{H-B}" x2="{W-20}" y2="{H-B}" stroke="black"/><line x1="{L}" y1="20" x2="{L}" y2="{H-B}" stroke="black"/>']
for k in range(int(y1) + 1):
    svg.append(f'<text x="{L-8}" y="{Y(k)+4}" text-anchor="end">1e{k}</text><line x1="{L}" y1="{Y(k)}" x2="{W-20}" y2="{Y(k)}" stroke="#ddd"/>')
for x in sorted(set(round(v, 2) for v in xs)):
    svg.append(f'<text x="{X(x)}" y="{H-B+16}" text-anchor="middle">{x:.2f}</text>')
svg.append(f'<text x="{(W+L)/2}" y="{H-10}" text-anchor="middle">total parameters / dense</text>')
svg.append(f'<text x="16" y="{H/2}" transform="rotate(-90 16 {H/2})" text-anchor="middle">WikiText-2 word perplexity (log)</text>')
for idx, color, name in ((2, "#c0392b", "MPO, no fine-tuning"), (3, "#2471a3", "after aux-only recovery")):
    pts = sorted((p, math.log10(row[idx])) for row in rows for p in [row[1]]) + [(1.0, math.log10(dense))]
    svg.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{" ".join(f"{X(a):.1f},{Y(b):.1f}" for a, b in pts)}"/>')
    svg += [f'<circle cx="{X(a):.1f}" cy="{Y(b):.1f}" r="3" fill="{color}"/>' for a, b in pts]
    ly = 30 + 16 * (idx - 2)
    svg.append(f'<line x1="{W-210}" y1="{ly}" x2="{W-190}" y2="{ly}" stroke="{color}" stroke-width="2"/><text x="{W-185}" y="{ly+4}">{name}</text>')
svg.append("</svg>")
open(f"{out}/ppl_vs_ratio.svg", "w").write("\n".join(svg))
print(f"plot: {out}/ppl_vs_ratio.svg")
PY
