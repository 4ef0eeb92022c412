#!/usr/bin/env bash
# One round of mpolm eval vs lm-evaluation-harness on the same subsets, alternating the tools.
# Usage: scripts/bench_lmeval.sh ROUND [MPOLM_BIN] [HF_DIR] [WORK]
#   HF_DIR: `mpolm export smollm2-135m --dense --out HF_DIR`; WORK: `scripts/bench_lmeval.py prepare --work WORK`
#   (stage zs: `scripts/bench_lmeval.py prepare-zeroshot --data ZS_DATA --work WORK`).
# Both tools: 2 threads, batch 1 (GSM8K: GSM_BATCH), f32. Logs and reports in WORK/round<ROUND>/.
# Needs lm_eval 0.4.13 (pip install --no-deps lm_eval==0.4.13, then its small deps: datasets evaluate jinja2
# pytablewriter rouge-score sacrebleu scikit-learn sqlitedict dill word2number more_itertools; torch untouched).
set -uo pipefail
STAGES=${STAGES:-mmlu0 mmlu5 wiki gsm}  # subset of: mmlu0 mmlu5 wiki gsm zs
ZS_TASKS=${ZS_TASKS:-arc_easy,piqa,winogrande,boolq,lambada_openai}  # zero-shot suite tasks whose files WORK/zeroshot has
ZS_LIMIT=${ZS_LIMIT:-50}    # documents per zero-shot task
ZS_DATA=${ZS_DATA:-}        # mpolm --data-dir holding the suite's source files (prepare-zeroshot --data)
GSM_LIMIT=${GSM_LIMIT:-10}  # GSM8K documents (8-shot chain of thought, greedy, up to 256 new tokens)
GSM_BATCH=${GSM_BATCH:-1}   # generations decoded together, the same for both tools
on() { [[ " $STAGES " == *" $1 "* ]]; }
R=${1:?round}; BIN=${2:-mpolm}; HF=${3:-/tmp/lmeval-smollm2-hf}; WORK=${4:-/tmp/lmeval-work}
D=$(cd "$(dirname "$0")" && pwd); O=$WORK/round$R; mkdir -p "$O"
export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
MMLU0=high_school_geography,world_religions,astronomy,business_ethics
MMLU5=abstract_algebra,anatomy,marketing,philosophy
pre() { echo "$1: $(date -u +%T) $(uptime | sed 's/.*load/load/')" | tee -a "$O/load.txt"; }
tasks() { local p=$1; shift; echo "$1" | tr , '\n' | sed "s/^/$p/" | paste -sd, -; }

if on mmlu0; then
pre mpolm_mmlu0
"$BIN" eval smollm2-135m --task "$(tasks mmlu_ $MMLU0)" --limit 25 --batch 1 --threads 2 \
  --data-dir "$WORK/mpolm-data" --log-samples --report "$O/mpolm_mmlu0.json" > "$O/mpolm_mmlu0.log" 2>&1
pre lmeval_mmlu0
python3 "$D/bench_lmeval.py" lmeval --work "$WORK" --model "$HF" --tasks "$(tasks local_mmlu_ $MMLU0)" \
  --limit 25 --batch 1 --threads 2 --out "$O/lmeval_mmlu0.json" > "$O/lmeval_mmlu0.log" 2>&1
fi
if on mmlu5; then
pre mpolm_mmlu5
"$BIN" eval smollm2-135m --task "$(tasks mmlu_ $MMLU5)" --shots 5 --limit 10 --batch 1 --threads 2 \
  --data-dir "$WORK/mpolm-data" --log-samples --report "$O/mpolm_mmlu5.json" > "$O/mpolm_mmlu5.log" 2>&1
pre lmeval_mmlu5
python3 "$D/bench_lmeval.py" lmeval --work "$WORK" --model "$HF" --tasks "$(tasks local_mmlu_ $MMLU5)" \
  --shots 5 --limit 10 --batch 1 --threads 2 --out "$O/lmeval_mmlu5.json" > "$O/lmeval_mmlu5.log" 2>&1
fi
if on wiki; then
pre mpolm_wiki
"$BIN" eval smollm2-135m --task wikitext2 --max-length 2048 --batch 1 --threads 2 \
  --data-dir "$WORK/mpolm-data" --report "$O/mpolm_wiki.json" > "$O/mpolm_wiki.log" 2>&1
pre lmeval_wiki
python3 "$D/bench_lmeval.py" lmeval --work "$WORK" --model "$HF" --tasks local_wikitext2 --max-length 2048 \
  --batch 1 --threads 2 --out "$O/lmeval_wiki.json" > "$O/lmeval_wiki.log" 2>&1
fi
if on gsm; then
pre mpolm_gsm
"$BIN" eval smollm2-135m --task gsm8k --limit "$GSM_LIMIT" --batch "$GSM_BATCH" --threads 2 \
  --data-dir "$WORK/mpolm-data" --log-samples --report "$O/mpolm_gsm.json" > "$O/mpolm_gsm.log" 2>&1
pre lmeval_gsm
python3 "$D/bench_lmeval.py" lmeval --work "$WORK" --model "$HF" --tasks local_gsm8k_cot --shots 8 \
  --limit "$GSM_LIMIT" --batch "$GSM_BATCH" --threads 2 --out "$O/lmeval_gsm.json" > "$O/lmeval_gsm.log" 2>&1
fi
if on zs; then
pre mpolm_zs
"$BIN" eval smollm2-135m --task "$ZS_TASKS" --limit "$ZS_LIMIT" --batch 1 --threads 2 \
  --data-dir "${ZS_DATA:?set ZS_DATA}" --log-samples --report "$O/mpolm_zs.json" > "$O/mpolm_zs.log" 2>&1
pre lmeval_zs
python3 "$D/bench_lmeval.py" lmeval --work "$WORK" --model "$HF" --tasks "$(tasks local_ "$ZS_TASKS")" --separately \
  --limit "$ZS_LIMIT" --batch 1 --threads 2 --out "$O/lmeval_zs.json" > "$O/lmeval_zs.log" 2>&1
fi
pre done
for t in $STAGES; do
  echo "== $t"; python3 "$D/bench_lmeval.py" compare --mpolm "$O/mpolm_$t.json" --lmeval "$O/lmeval_$t.json"
done | tee "$O/compare.txt"
