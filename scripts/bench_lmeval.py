#!/usr/bin/env python3
"""mpolm eval vs lm-evaluation-harness (0.4.x) + transformers on CPU: same model, tasks, subset.

  prepare  --data data --work DIR [--wikitext-lines N]
      DIR/mmlu/<subject>_{test,dev}.jsonl   MMLU CSVs in cais/mmlu's columns, for scripts/lmeval_tasks/*.yaml
      DIR/wikitext2/test.{txt,jsonl}        the first N lines of wikitext2/test.txt (one document)
      DIR/gsm8k/test.jsonl                  GSM8K's test split, for local_gsm8k_cot.yaml
      DIR/mpolm-data/{mmlu,wikitext2,gsm8k} a --data-dir for mpolm eval seeing the same bytes
  lmeval   --work DIR --model HF_DIR --tasks local_mmlu_x,... [--shots K] [--limit N] [--batch B]
           [--threads T] [--max-length L] --out OUT.json
      Loads lm-eval's `hf` model once (timed apart), then times simple_evaluate alone; writes results,
      timings and per-document predictions / log-likelihoods.
  prepare-zeroshot --data DATA --work DIR [--limit N]
      DIR/zeroshot/<task>.jsonl             the zero-shot suite's source files under DATA (mpolm's --data-dir
                                            layout, data/ZEROSHOT_SOURCES.md) as the HF rows lm-eval loads, for
                                            scripts/lmeval_tasks/local_<task>.yaml (tasks whose files are missing
                                            are skipped)
  lmeval ... --separately                   one simple_evaluate per task, each timed (timings.per_task_seconds)
  compare  --mpolm REPORT.json (mpolm eval --log-samples) --lmeval OUT.json
      Per-subject accuracy on both sides, documents whose prediction differs, largest log-likelihood gap;
      perplexities and their relative difference; for GSM8K, identical generations and extracted answers.

No hub access: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are set, the tasks read local files only.
"""

import argparse
import csv
import json
import math
import os
import sys
import time
from pathlib import Path

TASK_DIR = Path(__file__).resolve().parent / "lmeval_tasks"
LETTERS = "ABCD"
ZEROSHOT = ["arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq", "openbookqa", "lambada_openai"]


def prepare(a):
    data, work = Path(a.data), Path(a.work)
    (work / "mmlu").mkdir(parents=True, exist_ok=True)
    (work / "wikitext2").mkdir(parents=True, exist_ok=True)
    subjects = sorted(
        p.stem[len("local_mmlu_") :] for p in TASK_DIR.glob("local_mmlu_*.yaml")
    )
    for s in subjects:
        for split in ("test", "dev"):
            src = data / "mmlu" / split / f"{s}_{split}.csv"
            with open(src, newline="", encoding="utf-8") as f, open(
                work / "mmlu" / f"{s}_{split}.jsonl", "w", encoding="utf-8"
            ) as out:
                for row in csv.reader(f):
                    q, *choices, ans = row
                    doc = {"question": q, "subject": s, "choices": choices, "answer": LETTERS.index(ans.strip())}
                    out.write(json.dumps(doc, ensure_ascii=False) + "\n")
    lines = (data / "wikitext2" / "test.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    page = "".join(lines[: a.wikitext_lines])
    (work / "wikitext2" / "test.txt").write_text(page, encoding="utf-8")
    (work / "wikitext2" / "test.jsonl").write_text(json.dumps({"page": page}) + "\n", encoding="utf-8")
    (work / "gsm8k").mkdir(parents=True, exist_ok=True)
    (work / "gsm8k" / "test.jsonl").write_bytes((data / "gsm8k" / "test.jsonl").read_bytes())
    md = work / "mpolm-data"
    (md / "wikitext2").mkdir(parents=True, exist_ok=True)
    if not (md / "gsm8k").exists():
        (md / "gsm8k").symlink_to((work / "gsm8k").resolve())
    (md / "wikitext2" / "test.txt").write_text(page, encoding="utf-8")
    if not (md / "mmlu").exists():
        (md / "mmlu").symlink_to((data / "mmlu").resolve())
    print(f"{len(subjects)} MMLU subjects, wikitext2 page of {a.wikitext_lines} lines / {len(page.encode())} bytes -> {work}")


def prepare_zeroshot(a):
    sys.path.insert(0, str(TASK_DIR))
    import zeroshot_hf

    for t in zeroshot_hf.TASKS:
        missing = [f for f in zeroshot_hf.FILES[t][0] if not (Path(a.data) / f).exists()]
        if missing:
            print(f"{t:15s} skipped: {', '.join(missing)} not in {a.data}")
            continue
        n = zeroshot_hf.write(t, a.data, a.work, a.limit)
        print(f"{t:15s} {n} documents -> {Path(a.work) / 'zeroshot' / (t + '.jsonl')}")


def run_lmeval(a):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(a.threads)
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    os.chdir(a.work)  # the task YAMLs name their data files relative to the work dir
    t0 = time.perf_counter()
    kw = {"pretrained": a.model, "dtype": "float32", "device": "cpu", "batch_size": a.batch}
    if a.max_length:
        kw["max_length"] = a.max_length
    lm = HFLM(**kw)
    load_s = time.perf_counter() - t0
    tm = TaskManager(include_path=str(TASK_DIR), include_defaults=False)
    tasks = a.tasks.split(",")
    def evaluate(ts):
        return lm_eval.simple_evaluate(
            model=lm,
            tasks=ts,
            num_fewshot=a.shots,
            limit=a.limit,
            batch_size=a.batch,
            task_manager=tm,
            bootstrap_iters=0,
            log_samples=True,
        )

    per_task = {}
    t1 = time.perf_counter()
    if a.separately:
        res = {"results": {}, "samples": {}, "n-samples": {}}
        for t in tasks:
            t2 = time.perf_counter()
            r = evaluate([t])
            per_task[t] = time.perf_counter() - t2
            for k in res:
                res[k].update(r.get(k) or {})
    else:
        res = evaluate(tasks)
    eval_s = time.perf_counter() - t1
    samples = {}
    for t, ss in res["samples"].items():
        rows = []
        for s in ss:
            first = s["resps"][0][0] if s["resps"] else None
            if isinstance(first, str):  # generate_until: one generation, one entry per filter
                rows.append({"doc_id": s["doc_id"], "target": s["target"], "filter": s.get("filter"),
                             "response": first, "filtered": s["filtered_resps"][0],
                             "exact_match": s.get("exact_match")})
                continue
            lls = [float(r[0][0]) if isinstance(r[0], (list, tuple)) else float(r[0]) for r in s["resps"]]
            greedy = [bool(r[0][1]) if isinstance(r[0], (list, tuple)) and len(r[0]) > 1 else None for r in s["resps"]]
            rows.append({"doc_id": s["doc_id"], "target": s["target"], "loglikelihoods": lls, "greedy": greedy,
                         "arguments": [list(x) for x in s.get("arguments", [])]})
        samples[t] = rows
    out = {
        "lm_eval_version": lm_eval.__version__,
        "torch_version": torch.__version__,
        "threads": a.threads,
        "batch": a.batch,
        "shots": a.shots,
        "limit": a.limit,
        "results": res["results"],
        "n-samples": res.get("n-samples"),
        "timings": {"model_load_seconds": load_s, "evaluate_seconds": eval_s, "per_task_seconds": per_task},
        "samples": samples,
    }
    Path(a.out).write_text(json.dumps(out, indent=1, default=str))
    n = sum(len(v) for v in samples.values())
    print(f"lm-eval: load {load_s:.1f} s, evaluate {eval_s:.1f} s, {n} documents, {n / eval_s:.2f} items/s")
    for t, r in res["results"].items():
        print(t, {k: v for k, v in r.items() if isinstance(v, float)})


def compare_zeroshot(m, l):
    """Per task: documents, acc (and acc_norm) of both tools, identical predictions, largest log-likelihood gap,
    items/s; LAMBADA: perplexity, acc and identical greedy flags."""
    by_task = {}
    for v in m.get("samples", {}).values():
        for s in v:
            if isinstance(s, dict) and s.get("task") in ZEROSHOT:
                by_task.setdefault(s["task"], []).append(s)
    secs = {}
    for v in m["configs"].values():
        secs.update(v.get("seconds_per_task") or {})
    lsecs = l["timings"].get("per_task_seconds") or {}
    rows = []
    for task, ms in by_task.items():
        lt = f"local_{task}"
        if lt not in l["samples"]:
            print(f"{task}: not in the lm-eval run")
            continue
        ls = {r["doc_id"]: r for r in l["samples"][lt]}
        if len(ls) != len(ms):
            sys.exit(f"{task}: mpolm has {len(ms)} documents, lm-eval {len(ls)}")
        same = same_norm = macc = lacc = macc_n = lacc_n = 0
        worst = 0.0
        for x in ms:
            y = ls[x["doc"]]
            if y.get("arguments") and [list(p) for p in x["requests"]] != y["arguments"]:
                sys.exit(f"{task} doc {x['doc']}: requests differ\n  mpolm   {x['requests']}\n  lm-eval {y['arguments']}")
            mll, lll = x["loglikelihoods"], y["loglikelihoods"]
            worst = max(worst, max(abs(p - q) for p, q in zip(mll, lll)))
            if task == "lambada_openai":
                same += x["greedy"] == y["greedy"][0]
                macc += x["greedy"]
                lacc += bool(y["greedy"][0])
                continue
            lens = [len(c[1][1:]) if task != "winogrande" else 1 for c in x["requests"]]
            mp = max(range(len(mll)), key=lambda i: (mll[i], -i))
            lp = max(range(len(lll)), key=lambda i: (lll[i], -i))
            mn = max(range(len(mll)), key=lambda i: (mll[i] / lens[i], -i))
            ln = max(range(len(lll)), key=lambda i: (lll[i] / lens[i], -i))
            same += mp == lp
            same_norm += mn == ln
            macc += mp == x["gold"]
            lacc += lp == x["gold"]
            macc_n += mn == x["gold"]
            lacc_n += ln == x["gold"]
        n = len(ms)
        mr, lr = m["results"][task], l["results"][lt]
        ms_, ls_ = secs.get(task), lsecs.get(lt)
        speed = (f", items/s mpolm {n / ms_:.2f} lm-eval {n / ls_:.3f} ({ls_ / ms_:.1f}x)" if ms_ and ls_ else "")
        if task == "lambada_openai":
            print(f"{task:15s} n={n:3d} ppl mpolm {mr['perplexity,none']:.4f} lm-eval {lr['perplexity,none']:.4f}, "
                  f"acc {macc / n:.4f} / {lacc / n:.4f}, identical greedy flags {same}/{n}, max |dll| {worst:.1e}{speed}")
        else:
            norm = (f", acc_norm {macc_n / n:.4f} / {lacc_n / n:.4f} (report {mr.get('acc_norm,none', float('nan')):.4f} / "
                    f"{lr.get('acc_norm,none', float('nan')):.4f}), identical norm predictions {same_norm}/{n}"
                    if "acc_norm,none" in lr else "")
            print(f"{task:15s} n={n:3d} acc mpolm {macc / n:.4f} lm-eval {lacc / n:.4f} (report {mr['acc,none']:.4f} / "
                  f"{lr['acc,none']:.4f}), identical predictions {same}/{n}{norm}, max |dll| {worst:.1e}{speed}")


def compare(a):
    m = json.loads(Path(a.mpolm).read_text())
    l = json.loads(Path(a.lmeval).read_text())
    if any(k.startswith("local_") and k[6:] in ZEROSHOT for k in l["samples"]):
        compare_zeroshot(m, l)
    if "mmlu" in m.get("samples", {}):
        by_subj = {}
        for s in m["samples"]["mmlu"]:
            by_subj.setdefault(s["subject"], []).append(s)
        tot = [0, 0, 0, 0]
        worst = 0.0
        for subj, ms in sorted(by_subj.items()):
            ls = sorted(l["samples"][f"local_mmlu_{subj}"], key=lambda r: r["doc_id"])
            if len(ls) != len(ms):
                sys.exit(f"{subj}: mpolm has {len(ms)} documents, lm-eval {len(ls)}")
            diff = 0
            macc = lacc = 0
            for x, y in zip(ms, ls):
                mp = max(range(4), key=lambda i: x["loglikelihoods"][i])
                lp = max(range(4), key=lambda i: y["loglikelihoods"][i])
                gold = LETTERS.index(x["gold"])
                if gold != y["target"]:
                    sys.exit(f"{subj}: gold answers differ (document order?)")
                macc += mp == gold
                lacc += lp == gold
                diff += mp != lp
                worst = max(worst, max(abs(p - q) for p, q in zip(x["loglikelihoods"], y["loglikelihoods"])))
            n = len(ms)
            print(f"{subj:24s} n={n:3d} acc mpolm {macc / n:.4f} lm-eval {lacc / n:.4f}, different predictions {diff}")
            for i, v in enumerate((n, macc, lacc, diff)):
                tot[i] += v
        n = tot[0]
        print(f"{'overall':24s} n={n:3d} acc mpolm {tot[1] / n:.4f} lm-eval {tot[2] / n:.4f}, "
              f"different predictions {tot[3]}, max |ll gap| {worst:.2e}")
    if "gsm8k" in m.get("samples", {}):
        ms = sorted(m["samples"]["gsm8k"], key=lambda r: r["doc"])
        ls = l["samples"]["local_gsm8k_cot"]
        by = {}
        for r in ls:
            by.setdefault(r["filter"], {})[r["doc_id"]] = r
        strict, flex = by["strict-match"], by["flexible-extract"]
        same_text = same_strip = same_s = same_f = 0
        for x in ms:
            y = strict[x["doc"]]
            if str(x["target"]) != str(y["target"]):
                sys.exit(f"gsm8k doc {x['doc']}: targets differ (document order?)")
            same_text += x["response"] == y["response"]
            same_strip += x["response"].strip() == y["response"].strip()
            same_s += x["strict"] == strict[x["doc"]]["filtered"]
            same_f += x["flexible"] == flex[x["doc"]]["filtered"]
            if x["response"].strip() != y["response"].strip():
                print(f"doc {x['doc']} differs:\n  mpolm   {x['response'][:200]!r}\n  lm-eval {y['response'][:200]!r}")
        n = len(ms)
        print(f"gsm8k n={n}: identical generations {same_text} (after strip {same_strip}), "
              f"strict answers equal {same_s}, flexible answers equal {same_f}")
        mr, lr = m["results"]["gsm8k"], l["results"]["local_gsm8k_cot"]
        for f in ("strict-match", "flexible-extract"):
            print(f"exact_match,{f:17s} mpolm {mr[f'exact_match,{f}']:.4f} lm-eval {lr[f'exact_match,{f}']:.4f}")
    if "wikitext2" in m["results"]:
        mr, lr = m["results"]["wikitext2"], l["results"]["local_wikitext2"]
        for k in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
            mv = next(v for kk, v in mr.items() if kk.startswith(k + ","))
            lv = lr[f"{k},none"]
            print(f"{k:16s} mpolm {mv:.6f} lm-eval {lv:.6f} rel diff {abs(mv - lv) / lv:.2e}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("prepare")
    q.add_argument("--data", default=os.environ.get("MPOLM_DATA", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data")))
    q.add_argument("--work", required=True)
    q.add_argument("--wikitext-lines", type=int, default=60)
    q = sub.add_parser("prepare-zeroshot")
    q.add_argument("--data", required=True)
    q.add_argument("--work", required=True)
    q.add_argument("--limit", type=int)
    q = sub.add_parser("lmeval")
    q.add_argument("--work", required=True)
    q.add_argument("--model", required=True)
    q.add_argument("--tasks", required=True)
    q.add_argument("--shots", type=int, default=0)
    q.add_argument("--limit", type=int)
    q.add_argument("--batch", type=int, default=1)
    q.add_argument("--threads", type=int, default=2)
    q.add_argument("--max-length", type=int)
    q.add_argument("--separately", action="store_true")
    q.add_argument("--out", required=True)
    q = sub.add_parser("compare")
    q.add_argument("--mpolm", required=True)
    q.add_argument("--lmeval", required=True)
    a = p.parse_args()
    {"prepare": prepare, "prepare-zeroshot": prepare_zeroshot, "lmeval": run_lmeval, "compare": compare}[a.cmd](a)


if __name__ == "__main__":
    main()
