#!/usr/bin/env python3
"""Reference requests and metrics of the zero-shot suite from lm-evaluation-harness itself.

  python3 scripts/make_zeroshot_fixture.py [--data tests/fixtures/zeroshot/data]
                                           [--out tests/fixtures/zeroshot/lmeval.json]

Reads the hand-written items in the datasets' source formats under --data (the layout mpolm's
`--data-dir` uses), converts them to the HF rows lm-eval loads (scripts/lmeval_tasks/zeroshot_hf.py),
runs lm-eval's own task code (scripts/lmeval_tasks/local_<task>.yaml: the 0.4.x task configs with
local data) and writes, per task and document:
  - "requests": the (context, continuation) pairs of lm-eval's Instances (build_all_requests), in order;
  - "gold": lm-eval's gold index (doc_to_target, or doc_to_text for WinoGrande's multiple inputs);
  - "lls" / "greedy": made-up log-likelihoods and greedy flags, one per request, and
    "process_results": what lm-eval's process_results returns for them;
and per task "aggregated": lm-eval's aggregation of those results (mean, perplexity).
crates/eval/tests/zeroshot.rs compares mpolm's requests and metrics with this file.
No hub access: everything is read from local files.
"""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

TASK_DIR = Path(__file__).resolve().parent / "lmeval_tasks"
sys.path.insert(0, str(TASK_DIR))
import zeroshot_hf  # noqa: E402


def made_up(d, i, cont):
    """Log-likelihoods varied enough that acc and acc_norm pick different choices on some documents."""
    return -(1 + (7 * d + 3 * i) % 5) * 0.9 - 0.11 * len(cont), (d + i) % 2 == 0


def main():
    root = Path(__file__).resolve().parent.parent
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(root / "tests/fixtures/zeroshot/data"))
    p.add_argument("--out", default=str(root / "tests/fixtures/zeroshot/lmeval.json"))
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets
    import lm_eval
    from lm_eval.tasks import TaskManager, get_task_dict

    data, out = Path(a.data).resolve(), Path(a.out).resolve()
    work = tempfile.mkdtemp(prefix="zeroshot-fixture-")
    for t in zeroshot_hf.TASKS:
        zeroshot_hf.write(t, data, work)
    os.chdir(work)  # the local task YAMLs name their data relative to the working directory
    tm = TaskManager(include_path=str(TASK_DIR), include_defaults=False)
    tasks = get_task_dict([f"local_{t}" for t in zeroshot_hf.TASKS], tm)
    res = {"lm_eval_version": lm_eval.__version__, "datasets_version": datasets.__version__, "tasks": {}}
    for t in zeroshot_hf.TASKS:
        task = tasks[f"local_{t}"]
        task.build_all_requests(rank=0, world_size=1)
        by_doc = {}
        for inst in task.instances:
            by_doc.setdefault(inst.doc_id, []).append(inst)
        docs = list(task.eval_docs)
        rows, per_metric = [], {}
        for d, doc in enumerate(docs):
            insts = sorted(by_doc[d], key=lambda x: x.idx)
            reqs = [list(x.arguments) for x in insts]
            if task.OUTPUT_TYPE == "multiple_choice":
                gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
            else:
                gold = 0
            made = [made_up(d, i, c) for i, (_, c) in enumerate(reqs)]
            pr = task.process_results(doc, made)
            for k, v in pr.items():
                per_metric.setdefault(k, []).append(v)
            rows.append({"requests": reqs, "gold": int(gold), "lls": [m[0] for m in made],
                         "greedy": [m[1] for m in made], "process_results": {k: float(v) for k, v in pr.items()}})
        agg = {k: float(task.aggregation()[k](v)) for k, v in per_metric.items()}
        res["tasks"][t] = {"docs": rows, "aggregated": agg}
        print(f"{t}: {len(rows)} documents, {sum(len(r['requests']) for r in rows)} requests, {agg}")
    out.write_text(json.dumps(res, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
