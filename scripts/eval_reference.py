#!/usr/bin/env python3
"""PyTorch/transformers reference for `mpolm eval` (issue #7): the same prompts, the same
log-likelihood encoding (lm-evaluation-harness's `_encode_pair`, rolling windows) and the same
answer extraction, on a subset, so the two can be compared number by number.

Tasks (each optional, all on the smollm2-135m GGUF loaded as f32):
    wikitext2  first --wt-windows rolling windows of --max-length tokens over
               wikitext2/test.txt (BOS/EOS prefix token, stride = max length)
    mmlu       --mmlu-subjects, first --limit test questions each, --shots dev shots
    gsm8k      first --gsm8k-limit test problems, 8-shot CoT, greedy, stop strings
    sst2       first --limit dev sentences, 0-shot prompt

Then `--compare RUST_REPORT.json` (an `mpolm eval … --log-samples --report` file of the
same subset) prints metric differences, per-document log-likelihood differences and
prediction disagreements.

Run (≈3–4 min on 2 cores):
    python3 scripts/eval_reference.py --tasks wikitext2,mmlu,gsm8k --out /tmp/ref.json
    mpolm eval smollm2-135m --task wikitext2 --limit 4 --max-length 1024 --log-samples --report /tmp/rust_wt.json
    python3 scripts/eval_reference.py --compare /tmp/rust_wt.json --ref /tmp/ref.json

Versions as scripts/make_fixtures.py (torch 2.15.0 CPU, transformers 5.24.0, gguf 0.19.0).
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import csv
import json
import math
import re
import sys
import time

GGUF = os.path.join(os.environ.get("MPOLM_CACHE", os.path.expanduser("~/.cache/mpolm")), "models", "smollm2-135m", "model.gguf")

MMLU_CATEGORY = {  # lm-eval's grouping, only for the subjects used here
    "abstract_algebra": "stem", "anatomy": "stem", "astronomy": "stem", "high_school_biology": "stem",
    "business_ethics": "other", "marketing": "other", "philosophy": "humanities",
    "world_religions": "humanities", "sociology": "social_sciences", "high_school_geography": "social_sciences",
}

GSM8K_EXEMPLARS = [
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have been 21 - 15 = 6. The answer is 6."),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5."),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, they had 74 - 35 = 39. The answer is 39."),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. The answer is 8."),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. The answer is 9."),
    ("There were nine computers in the server room. Five more computers were installed each day, from monday to thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 computers were added. 9 + 20 is 29. The answer is 29."),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, he had 35 - 2 = 33 golf balls. The answer is 33."),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars left. 23 - 15 is 8. The answer is 8."),
]
GSM8K_UNTIL = ["Q:", "</s>", "<|im_end|>"]  # lm-eval gsm8k-cot.yaml v3.0


def load_model(path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, name = os.path.split(path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    model.eval()
    return tok, model


class Ref:
    def __init__(self, tok, model, max_length):
        self.tok, self.model, self.max_length = tok, model, max_length
        bos = tok.bos_token_id
        self.prefix = bos if bos is not None else tok.eos_token_id

    def enc(self, s):
        return self.tok.encode(s, add_special_tokens=False)

    def encode_pair(self, context, continuation):
        """lm-eval's HFLM._encode_pair (and the empty-context rule of loglikelihood)."""
        if context == "":
            return [self.prefix], self.enc(continuation)
        n = len(context) - len(context.rstrip())
        if n > 0:
            continuation = context[-n:] + continuation
            context = context[:-n]
        whole = self.enc(context + continuation)
        ctx = self.enc(context)
        return ctx, whole[len(ctx):]

    def logprobs(self, inp):
        """log-softmax over the vocabulary at every position of `inp` (float64)."""
        import torch

        with torch.no_grad():
            logits = self.model(torch.tensor([inp])).logits[0].double()
        return torch.log_softmax(logits, dim=-1)

    def score(self, inp, targets):
        lp = self.logprobs(inp)
        start = len(inp) - len(targets)
        return float(sum(lp[start + k, t] for k, t in enumerate(targets)))


def rolling_rows(tokens, prefix, max_length, stride):
    s = [prefix] + tokens
    n = len(tokens)
    rows, t0 = [], 1
    while t0 <= n:
        t1 = min(max_length + 1, n + 1) if t0 == 1 else min(t0 + stride, n + 1)
        i0 = max(0, t1 - 1 - max_length)
        rows.append((s[i0:t1 - 1], s[t0:t1]))
        t0 = t1
    return rows


def task_wikitext2(ref, args):
    text = open(os.path.join(args.data_dir, "wikitext2", "test.txt"), encoding="utf-8").read()
    toks = ref.enc(text)
    rows = rolling_rows(toks, ref.prefix, ref.max_length, ref.max_length)
    n_windows = len(rows)
    rows = rows[: args.wt_windows]
    lls = [ref.score(i, t) for i, t in rows]
    ll = sum(lls)
    m = sum(len(t) for _, t in rows)
    covered = text if m == len(toks) else ref.tok.decode(toks[:m])
    words = len(re.split(r"\s+", covered))
    nbytes = len(covered.encode("utf-8"))
    res = {"word_perplexity,none": math.exp(-ll / words), "byte_perplexity,none": math.exp(-ll / nbytes),
           "bits_per_byte,none": -ll / nbytes / math.log(2), "token_perplexity,none": math.exp(-ll / m)}
    info = {"windows": n_windows, "windows_scored": len(rows), "tokens": m, "words": words, "bytes": nbytes,
            "loglikelihood": ll, "window_loglikelihoods": lls}
    return {"wikitext2": res}, info


def read_mmlu(data_dir, subject, split):
    with open(os.path.join(data_dir, "mmlu", split, f"{subject}_{split}.csv"), newline="", encoding="utf-8") as f:
        return [r for r in csv.reader(f)]


def mmlu_text(r):
    return f"{r[0].strip()}\nA. {r[1]}\nB. {r[2]}\nC. {r[3]}\nD. {r[4]}\nAnswer:"


def task_mmlu(ref, args):
    results, samples, allc = {}, [], []
    cats = {}
    for subject in args.mmlu_subjects.split(","):
        shots = read_mmlu(args.data_dir, subject, "dev")[: args.shots]
        docs = read_mmlu(args.data_dir, subject, "test")[: args.limit]
        desc = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        prefix = desc + "".join(mmlu_text(s) + " " + s[5].strip() + "\n\n" for s in shots)
        correct = []
        for r in docs:
            ctx = prefix + mmlu_text(r)
            encs = [ref.encode_pair(ctx, " " + l) for l in "ABCD"]
            if all(len(c) == 1 for _, c in encs) and all(e[0] == encs[0][0] for e in encs):
                lp = ref.logprobs(encs[0][0][-(ref.max_length):])  # one forward serves the 4 one-token choices
                ll = [float(lp[-1, c[0]]) for _, c in encs]
            else:
                ll = []
                for cx, c in encs:
                    full = (cx + c)[-(ref.max_length + 1):]
                    ll.append(ref.score(full[:-1], c))
            pred = max(range(4), key=lambda i: (ll[i], -i))
            ok = float(pred == "ABCD".index(r[5].strip()))
            correct.append(ok)
            samples.append({"subject": subject, "loglikelihoods": ll, "pred": "ABCD"[pred]})
        results[f"mmlu_{subject}"] = {"acc,none": sum(correct) / len(correct)}
        cats.setdefault(MMLU_CATEGORY.get(subject, "other"), []).extend(correct)
        allc.extend(correct)
    for c, v in cats.items():
        results[f"mmlu_{c}"] = {"acc,none": sum(v) / len(v)}
    results["mmlu"] = {"acc,none": sum(allc) / len(allc)}
    return results, {"samples": samples}


def gsm8k_normalize(s):
    for p in [",", r"\$", r"(?s).*#### ", r"\.$"]:
        s = re.sub(p, "", s)
    return s.lower()


def gsm8k_extract(resp):
    m = re.findall(r"The answer is (\-?[0-9\.\,]+).", resp)
    strict = m[0].strip() if m else "[invalid]"
    m = re.findall(r"(-?[$0-9.,]{2,})|(-?[0-9]+)", resp)
    if m:
        g = [x for x in m[-1] if x]
        flex = g[0].strip() if g else "[invalid]"
    else:
        flex = "[invalid]"
    return strict, flex


def greedy_until(ref, ids, until, max_new):
    """KV-cached greedy decoding; stops at EOS or when the decoded text contains a stop string."""
    import torch

    out, past = [], None
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(max_new):
            o = ref.model(x, past_key_values=past, use_cache=True)
            past = o.past_key_values
            nxt = int(torch.argmax(o.logits[0, -1]))
            if nxt == ref.tok.eos_token_id:
                break
            out.append(nxt)
            text = ref.tok.decode(out, skip_special_tokens=False)
            if any(u in text for u in until):
                break
            x = torch.tensor([[nxt]])
    text = ref.tok.decode(out, skip_special_tokens=False)
    for u in until:
        text = text.split(u)[0]
    return text


def task_gsm8k(ref, args):
    rows = [json.loads(l) for l in open(os.path.join(args.data_dir, "gsm8k", "test.jsonl"), encoding="utf-8")][: args.gsm8k_limit]
    prefix = "".join(f"Q: {q}\nA: {a}\n\n" for q, a in GSM8K_EXEMPLARS)
    until = GSM8K_UNTIL + [ref.tok.decode([ref.tok.eos_token_id], skip_special_tokens=False)]
    strict, flex, samples = [], [], []
    for r in rows:
        resp = greedy_until(ref, ref.enc(prefix + f"Q: {r['question']}\nA:"), until, args.max_gen_tokens)
        gold = r["answer"].split("####")[-1].strip()
        s, f = gsm8k_extract(resp)
        strict.append(float(gsm8k_normalize(s) == gsm8k_normalize(gold)))
        flex.append(float(gsm8k_normalize(f) == gsm8k_normalize(gold)))
        samples.append({"response": resp, "strict": s, "flexible": f, "target": gold})
        print(f"  gsm8k {len(samples)}/{len(rows)}", file=sys.stderr)
    res = {"exact_match,strict-match": sum(strict) / len(strict), "exact_match,flexible-extract": sum(flex) / len(flex)}
    return {"gsm8k": res}, {"samples": samples}


def task_sst2(ref, args):
    path = os.path.join(args.data_dir, "glue", "SST-2", "dev.tsv")
    lines = open(path, encoding="utf-8").read().split("\n")[1:]
    rows = [l.split("\t") for l in lines if l][: args.limit]
    acc, samples = [], []
    for sent, label in rows:
        ctx = f"{sent}\nQuestion: Is this sentence positive or negative?\nAnswer:"
        ll = []
        for c in [" negative", " positive"]:
            cx, ce = ref.encode_pair(ctx, c)
            full = (cx + ce)[-(ref.max_length + 1):]
            ll.append(ref.score(full[:-1], ce))
        pred = 1 if ll[1] > ll[0] else 0
        acc.append(float(pred == int(label)))
        samples.append({"loglikelihoods": ll, "pred": pred})
    return {"sst2": {"acc,none": sum(acc) / len(acc)}}, {"samples": samples}


def compare(rust_path, ref_path):
    rust = json.load(open(rust_path))
    ref = json.load(open(ref_path))
    print(f"{'task':<28} {'metric':<30} {'mpolm':>12} {'torch':>12} {'diff':>10}")
    for task, metrics in ref["results"].items():
        if task not in rust.get("results", {}):
            continue
        for k, v in metrics.items():
            r = rust["results"][task].get(k)
            if not isinstance(r, (int, float)):
                continue
            rel = f"{100 * (r - v) / v:+.3f}%" if "perplexity" in k or "bits" in k else f"{100 * (r - v):+.2f}pt"
            print(f"{task:<28} {k:<30} {r:>12.5f} {v:>12.5f} {rel:>10}")
    rs = rust.get("samples", {})
    if "mmlu" in rs and "mmlu" in ref["info"]:
        # Align documents by subject (mpolm orders subjects canonically).
        by = lambda xs: {sub: [x for x in xs if x["subject"] == sub] for sub in sorted({x["subject"] for x in xs})}
        ra, rb = by(rs["mmlu"]), by(ref["info"]["mmlu"]["samples"])
        a = [x for sub in sorted(ra) for x in ra[sub]]
        b = [x for sub in sorted(ra) for x in rb.get(sub, [])]
        if len(a) == len(b):
            d = max(abs(x - y) for s, t in zip(a, b) for x, y in zip(s["loglikelihoods"], t["loglikelihoods"]))
            dis = sum(s["pred"] != t["pred"] for s, t in zip(a, b))
            print(f"mmlu: {len(a)} docs, max |Δ loglik| {d:.2e}, prediction disagreements {dis}")
    if "sst2" in rs and "sst2" in ref["info"]:
        a, b = rs["sst2"], ref["info"]["sst2"]["samples"]
        d = max(abs(x - y) for s, t in zip(a, b) for x, y in zip(s["loglikelihoods"], t["loglikelihoods"]))
        print(f"sst2: {len(a)} docs, max |Δ loglik| {d:.2e}, disagreements {sum(s['pred'] != t['pred'] for s, t in zip(a, b))}")
    if "gsm8k" in rs and "gsm8k" in ref["info"]:
        a, b = rs["gsm8k"], ref["info"]["gsm8k"]["samples"]
        same = sum(s["response"] == t["response"] for s, t in zip(a, b))
        print(f"gsm8k: {same}/{min(len(a), len(b))} identical greedy responses")
    if "wikitext2" in ref["info"] and "wikitext2" in rust.get("configs", {}):
        r, t = rust["configs"]["wikitext2"], ref["info"]["wikitext2"]
        print(f"wikitext2: tokens {r['tokens']} vs {t['tokens']}, words {r['words']} vs {t['words']}, "
              f"bytes {r['bytes']} vs {t['bytes']}, loglik {r['loglikelihood']:.3f} vs {t['loglikelihood']:.3f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default=GGUF)
    ap.add_argument("--data-dir", default=os.environ.get("MPOLM_DATA", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data")))
    ap.add_argument("--tasks", default="wikitext2,mmlu,gsm8k")
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--wt-windows", type=int, default=4)
    ap.add_argument("--mmlu-subjects", default="abstract_algebra,anatomy,marketing,philosophy")
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--limit", type=int, default=10)
    ap.add_argument("--gsm8k-limit", type=int, default=10)
    ap.add_argument("--max-gen-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="eval_reference.json")
    ap.add_argument("--compare", help="an mpolm eval --report JSON to compare with --ref")
    ap.add_argument("--ref", help="this script's earlier --out JSON (for --compare)")
    args = ap.parse_args()
    if args.compare:
        compare(args.compare, args.ref or args.out)
        return
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    tok, model = load_model(args.gguf)
    ref = Ref(tok, model, args.max_length)
    out = {"results": {}, "info": {}, "timings": {},
           "config": {**vars(args), "torch": torch.__version__, "transformers": transformers.__version__}}
    for t in args.tasks.split(","):
        t0 = time.time()
        res, info = {"wikitext2": task_wikitext2, "mmlu": task_mmlu, "gsm8k": task_gsm8k, "sst2": task_sst2}[t](ref, args)
        out["results"].update(res)
        out["info"][t] = info
        out["timings"][t] = time.time() - t0
        print(f"{t}: {json.dumps(res)} ({out['timings'][t]:.1f} s)", file=sys.stderr)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"written {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
