"""The zero-shot suite's source files (as their authors publish them, the layout mpolm reads from
its data folder) converted to the rows of the Hugging Face datasets that lm-evaluation-harness
0.4.x loads, so lm-eval's own task configs can run on the same documents from local JSONL files.

Each converter mirrors the public dataset builder of the HF dataset lm-eval names:
  arc_easy/arc_challenge  allenai/ai2_arc      id, question (= stem), choices {text, label}, answerKey
  openbookqa              openbookqa main      id, question_stem, choices {text, label}, answerKey
  hellaswag               Rowan/hellaswag      the authors' fields, label as a string
  piqa                    piqa                 goal, sol1, sol2, label (from valid-labels.lst)
  winogrande              winogrande_xl        sentence, option1, option2, answer
  boolq                   super_glue boolq     question, passage, idx, label (0 = False, 1 = True);
                                               the authors' format (title/answer) gets "title -- passage"
  lambada_openai          EleutherAI/lambada_openai default: text
"""

import json
from pathlib import Path

# task -> (files under the data folder, lm-eval split)
FILES = {
    "arc_easy": (["arc/ARC-Easy-Test.jsonl"], "test"),
    "arc_challenge": (["arc/ARC-Challenge-Test.jsonl"], "test"),
    "hellaswag": (["hellaswag/hellaswag_val.jsonl"], "validation"),
    "piqa": (["piqa/valid.jsonl", "piqa/valid-labels.lst"], "validation"),
    "winogrande": (["winogrande/dev.jsonl"], "validation"),
    "boolq": (["boolq/dev.jsonl"], "validation"),
    "openbookqa": (["openbookqa/test.jsonl"], "test"),
    "lambada_openai": (["lambada/lambada_test.jsonl"], "test"),
}
TASKS = list(FILES)


def _jsonl(p):
    with open(p, encoding="utf-8") as f:
        return [json.loads(l) for l in f if l.strip()]


def _choices(q):
    return {"text": [c["text"] for c in q["choices"]], "label": [c["label"] for c in q["choices"]]}


def rows(task, data):
    """HF-format rows of `task` read from the data folder `data`."""
    data = Path(data)
    src = [data / f for f in FILES[task][0]]
    if task in ("arc_easy", "arc_challenge"):
        return [{"id": d["id"], "question": d["question"]["stem"], "choices": _choices(d["question"]),
                 "answerKey": d["answerKey"]} for d in _jsonl(src[0])]
    if task == "openbookqa":
        return [{"id": d["id"], "question_stem": d["question"]["stem"], "choices": _choices(d["question"]),
                 "answerKey": d["answerKey"]} for d in _jsonl(src[0])]
    if task == "hellaswag":
        keys = ["ind", "activity_label", "ctx_a", "ctx_b", "ctx", "endings", "source_id", "split", "split_type"]
        return [dict({k: d.get(k) for k in keys}, label=str(d["label"])) for d in _jsonl(src[0])]
    if task == "piqa":
        labels = [l.strip() for l in open(src[1], encoding="utf-8") if l.strip()]
        docs = _jsonl(src[0])
        assert len(labels) == len(docs), "piqa: label count differs from question count"
        return [{"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": int(l)} for d, l in zip(docs, labels)]
    if task == "winogrande":
        return [{k: d[k] for k in ("sentence", "option1", "option2", "answer")} for d in _jsonl(src[0])]
    if task == "boolq":
        out = []
        for i, d in enumerate(_jsonl(src[0])):
            if "label" in d:
                out.append({"question": d["question"], "passage": d["passage"], "idx": d.get("idx", i),
                            "label": int(d["label"])})
            else:
                out.append({"question": d["question"], "passage": f"{d['title']} -- {d['passage']}", "idx": i,
                            "label": int(d["answer"])})
        return out
    if task == "lambada_openai":
        return [{"text": d["text"]} for d in _jsonl(src[0])]
    raise KeyError(task)


def write(task, data, out_dir, limit=None):
    """Write zeroshot/<task>.jsonl (the file local_<task>.yaml reads) under out_dir."""
    out = Path(out_dir) / "zeroshot" / f"{task}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    rs = rows(task, data)
    if limit is not None:
        rs = rs[:limit]
    with open(out, "w", encoding="utf-8") as f:
        for r in rs:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return len(rs)
