#!/usr/bin/env python3
"""PyTorch CPU GPTQ baseline for `mpolm quantize --method gptq` (issue #6).

The algorithm is AutoGPTQ's (v0.7, auto_gptq/quantization/gptq.py `GPTQ.add_batch` /
`fasterquant`, quantizer.py `Quantizer`, modeling/_base.py `quantize`) rewritten without the
package (it needs a CUDA build): Hessian H = 2/N Σ x xᵀ accumulated per calibration sample,
dead columns zeroed, optional act-order, damping `damp` × mean diagonal, chol → cholesky_inverse
→ upper chol, blocks of 128 columns with the lazy update W[:, i2:] -= Err1 · Hinv[i1:i2, i2:],
per-output-row min-max grid per group, layers processed in order on the outputs of the already
quantized earlier layers, and (AutoGPTQ's default true_sequential) inside a layer the subsets
[k, v, q] → [o] → [up, gate] → [down] each calibrated after the previous subset is quantized.
Weights are replaced by their dequantised values (fake quantization), as AutoGPTQ does before
packing.

--variant autogptq (default) is AutoGPTQ exactly: f32 scales, unclamped zeros, round half to
even, and the group parameters of a group starting inside a block taken from W before that
block's in-block updates (AutoGPTQ reads W, not the working copy W1).
--variant mpolm is the grid mpolm implements (crates/methods/src/quant/gptq.rs): scales rounded
to f16, asymmetric zeros clamped to [1, 2^bits − 1] (AutoGPTQ's v1 storage of zero − 1), round
half away from zero, group parameters from the updated working copy; with --no-true-sequential
its calibration (one pass per layer) is mpolm's too.

Calibration windows are mpolm's (`calib::calibration_samples`): the text tokenised without
special tokens, `nsamples` windows of `seqlen` tokens at starts drawn by the same xorshift64
from `seed`. Perplexity is mpolm's protocol (`quant::perplexity`): the first K non-overlapping
512-token windows of the evaluation text, each scored alone.

Usage (the model is a dense HF directory, e.g. from `mpolm export smollm2-135m --dense --out DIR`):
    python3 scripts/gptq_torch.py DIR --bits 4 --group-size 64 --nsamples 16 --seqlen 512 \
        --threads 2 --ppl-windows 8 [--act-order] [--sym] [--no-true-sequential] [--variant mpolm]
    python3 scripts/gptq_torch.py --fixture tests/fixtures/quant/gptq_reference.json  # for the Rust tests
Prints one JSON line with the quantization wall time and the perplexity.
"""
import argparse
import json
import math
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch

WIKITEXT2 = os.path.join(os.environ.get("MPOLM_DATA", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data")), "wikitext2")


def round_half_away(x):
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


class Quantizer:
    """AutoGPTQ's Quantizer (perchannel, mse off) with the optional mpolm grid."""

    def __init__(self, bits, sym, variant):
        self.maxq = float(2**bits - 1)
        self.sym = sym
        self.mpolm = variant == "mpolm"

    def find_params(self, x):
        tmp = torch.zeros(x.shape[0], dtype=x.dtype)
        xmin = torch.minimum(x.min(1)[0], tmp)
        xmax = torch.maximum(x.max(1)[0], tmp)
        if self.sym:
            xmax = torch.maximum(torch.abs(xmin), xmax)
            neg = xmin < 0
            if torch.any(neg):
                xmin[neg] = -xmax[neg]
        both = (xmin == 0) & (xmax == 0)
        xmin[both] = -1
        xmax[both] = +1
        scale = (xmax - xmin) / self.maxq
        if self.mpolm:
            scale = scale.half().to(x.dtype)
            scale[scale == 0] = torch.tensor(6.1e-5).half().to(x.dtype)
        if self.sym:
            zero = torch.full_like(scale, (self.maxq + 1) / 2)
        else:
            zero = self.round(-xmin / scale)
            if self.mpolm:
                zero = zero.clamp(1, self.maxq)
        self.scale = scale.reshape(-1, 1)
        self.zero = zero.reshape(-1, 1)

    def round(self, x):
        return round_half_away(x) if self.mpolm else torch.round(x)

    def quantize(self, x):
        q = torch.clamp(self.round(x / self.scale) + self.zero, 0, self.maxq)
        return self.scale * (q - self.zero), q


class GPTQ:
    def __init__(self, weight, dtype=torch.float32):
        self.W0 = weight
        self.dtype = dtype  # AutoGPTQ: float32; the fixture uses float64
        self.columns = weight.shape[1]
        self.H = torch.zeros((self.columns, self.columns), dtype=dtype)
        self.nsamples = 0

    def add_batch(self, inp):
        if len(inp.shape) == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        inp = inp.reshape((-1, inp.shape[-1])).t()
        self.H *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        inp = math.sqrt(2 / self.nsamples) * inp.to(self.dtype)
        self.H += inp.matmul(inp.t())

    def fasterquant(self, quantizer, blocksize=128, percdamp=0.01, group_size=-1, actorder=False):
        W = self.W0.clone().to(self.dtype)
        if group_size == -1:
            quantizer.find_params(W)
        H = self.H
        del self.H
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        if actorder:
            perm = torch.argsort(torch.diag(H), descending=True)
            W = W[:, perm]
            H = H[perm][:, perm]
            invperm = torch.argsort(perm)
        Q = torch.zeros_like(W)
        Qint = torch.zeros_like(W)
        Losses = torch.zeros_like(W)
        damp = percdamp * torch.mean(torch.diag(H))
        diag = torch.arange(self.columns)
        H[diag, diag] += damp
        H = torch.linalg.cholesky(H)
        H = torch.cholesky_inverse(H)
        H = torch.linalg.cholesky(H, upper=True)
        Hinv = H
        scales, zeros = [], []
        for i1 in range(0, self.columns, blocksize):
            i2 = min(i1 + blocksize, self.columns)
            count = i2 - i1
            W1 = W[:, i1:i2].clone()
            Q1 = torch.zeros_like(W1)
            Qi1 = torch.zeros_like(W1)
            Err1 = torch.zeros_like(W1)
            Losses1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            for i in range(count):
                w = W1[:, i]
                d = Hinv1[i, i]
                if group_size != -1 and (i1 + i) % group_size == 0:
                    if quantizer.mpolm:
                        # The working copy: earlier in-block updates included.
                        grp = torch.cat([W1[:, i:], W[:, i2:]], 1)[:, :group_size]
                    else:
                        grp = W[:, (i1 + i):(i1 + i + group_size)]
                    quantizer.find_params(grp)
                    scales.append(quantizer.scale)
                    zeros.append(quantizer.zero)
                q, qi = quantizer.quantize(w.unsqueeze(1))
                q, qi = q.flatten(), qi.flatten()
                Q1[:, i] = q
                Qi1[:, i] = qi
                Losses1[:, i] = (w - q) ** 2 / d**2
                err1 = (w - q) / d
                W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
                Err1[:, i] = err1
            Q[:, i1:i2] = Q1
            Qint[:, i1:i2] = Qi1
            Losses[:, i1:i2] = Losses1 / 2
            W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
        if not scales:
            scales, zeros = [quantizer.scale], [quantizer.zero]
        gs = group_size if group_size != -1 else self.columns
        g_idx = torch.tensor([i // gs for i in range(self.columns)], dtype=torch.int32)
        if actorder:
            Q, Qint, g_idx = Q[:, invperm], Qint[:, invperm], g_idx[invperm]
        return Q, Qint, torch.cat(scales, 1), torch.cat(zeros, 1), g_idx, Losses.sum().item()


SUBSETS = [
    ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"],
    ["self_attn.o_proj"],
    ["mlp.up_proj", "mlp.gate_proj"],
    ["mlp.down_proj"],
]


def calibration_windows(ids, nsamples, seqlen, seed):
    """mpolm's calib::calibration_samples: xorshift64 window starts."""
    m = (1 << 64) - 1
    s = ((seed * 6364136223846793005 + 1442695040888963407) & m) | 1
    out = []
    for _ in range(nsamples):
        s ^= (s << 13) & m
        s ^= s >> 7
        s ^= (s << 17) & m
        start = s % (len(ids) - seqlen)
        out.append(ids[start:start + seqlen])
    return out


def layer_out(r):
    return r[0] if isinstance(r, (tuple, list)) else r


@torch.no_grad()
def quantize_model(model, windows, a):
    layers = model.model.layers
    cache = {"inps": [], "kw": None}

    class Catcher(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x, *args, **kw):
            cache["inps"].append(x)
            cache["kw"] = kw
            raise ValueError

    layers[0] = Catcher(layers[0])
    for w in windows:
        try:
            model(torch.tensor([w]))
        except ValueError:
            pass
    layers[0] = layers[0].m
    kw = {k: v for k, v in cache["kw"].items() if k not in ("past_key_values", "past_key_value", "use_cache")}
    kw["use_cache"] = False
    inps = cache["inps"]
    subsets = SUBSETS if a.true_sequential else [sum(SUBSETS, [])]
    losses = {}
    for li, layer in enumerate(layers):
        mods = dict(layer.named_modules())
        for names in subsets:
            g = {n: GPTQ(mods[n].weight.data) for n in names}
            hooks = [mods[n].register_forward_hook(lambda mod, inp, out, n=n: g[n].add_batch(inp[0].data))
                     for n in names]
            for x in inps:
                layer(x, **kw)
            for h in hooks:
                h.remove()
            for n in names:
                q = Quantizer(a.bits, a.sym, a.variant)
                Q, *_, loss = g[n].fasterquant(q, a.blocksize, a.damp, a.group_size, a.act_order)
                mods[n].weight.data = Q.to(mods[n].weight.dtype)
                losses[f"model.layers.{li}.{n}"] = loss
                del g[n]
        inps = [layer_out(layer(x, **kw)) for x in inps]
    return losses


@torch.no_grad()
def perplexity(model, ids, windows, window=512):
    k = min(windows, len(ids) // window)
    nll, n = 0.0, 0
    for w in range(k):
        chunk = torch.tensor([ids[w * window:(w + 1) * window]])
        lsm = torch.log_softmax(model(chunk).logits[0].float(), -1)
        nll -= lsm[torch.arange(window - 1), chunk[0, 1:]].double().sum().item()
        n += window - 1
    return math.exp(nll / n), k


def fixture(path):
    """Small known-answer case for the Rust GPTQ (mpolm variant): random correlated inputs."""
    g = torch.Generator().manual_seed(0)
    n, out, tokens = 96, 32, 192
    mix = torch.randn(n, n, generator=g) / math.sqrt(n) + torch.eye(n)
    # Rounded so the JSON stays small and the f32 values mpolm reads are (nearly) these.
    x = torch.round((torch.randn(tokens, n, generator=g) @ mix) * 1e3) / 1e3
    x[:, 5] = 0  # a dead input column
    w = torch.round(torch.randn(out, n, generator=g) * 1e4) / 1e5
    cases = []
    for bits, gs, act, sym, block in [(4, 32, False, False, 32), (3, 16, True, False, 32),
                                      (2, -1, False, False, 64), (4, 32, True, True, 32),
                                      (8, 48, False, False, 48)]:
        gp = GPTQ(w.double(), torch.float64)
        gp.add_batch(x.double().unsqueeze(1))  # N = tokens, as mpolm normalises
        q = Quantizer(bits, sym, "mpolm")
        Q, Qint, sc, zr, g_idx, loss = gp.fasterquant(q, block, 0.01, gs, act)
        cases.append({"bits": bits, "group_size": gs, "act_order": act, "sym": sym, "block": block,
                      "q": Qint.t().int().flatten().tolist(),  # [in, out] like mpolm
                      "scales": sc.t().flatten().float().tolist(), "zeros": zr.t().int().flatten().tolist(),
                      "g_idx": g_idx.tolist(), "loss": loss})
    json.dump({"generator": "scripts/gptq_torch.py --fixture", "torch": torch.__version__,
               "n": n, "out": out, "tokens": tokens,
               # Short decimals that parse to exactly the f32 values used.
               "x": [round(v, 3) for v in x.flatten().tolist()],
               "w": [round(v, 5) for v in w.flatten().tolist()], "cases": cases}, open(path, "w"))
    print(f"wrote {path}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--act-order", action="store_true")
    p.add_argument("--sym", action="store_true")
    p.add_argument("--damp", type=float, default=0.01)
    p.add_argument("--blocksize", type=int, default=128)
    p.add_argument("--calib", default=f"{WIKITEXT2}/valid.txt")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ppl-windows", type=int, default=0)
    p.add_argument("--ppl-data", default=f"{WIKITEXT2}/test.txt")
    p.add_argument("--no-true-sequential", dest="true_sequential", action="store_false")
    p.add_argument("--variant", choices=["autogptq", "mpolm"], default="autogptq")
    p.add_argument("--fixture")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.fixture:
        return fixture(a.fixture)
    if not a.model:
        sys.exit("error: MODEL (a dense HF directory) is required")
    if a.bits not in (2, 3, 4, 8):
        sys.exit(f"error: --bits must be 2, 3, 4 or 8, got {a.bits}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(a.model)
    ids = tok(open(a.calib).read(), add_special_tokens=False).input_ids
    windows = calibration_windows(ids, a.nsamples, a.seqlen, a.seed)
    t0 = time.time()
    losses = quantize_model(model, windows, a)
    secs = time.time() - t0
    res = {"method": "gptq-torch", "variant": a.variant, "bits": a.bits, "group_size": a.group_size,
           "act_order": a.act_order, "sym": a.sym, "damp": a.damp, "true_sequential": a.true_sequential,
           "nsamples": a.nsamples, "seqlen": a.seqlen, "threads": a.threads,
           "calib_first_ids": [w[:8] for w in windows[:4]],
           "quantize_secs": secs, "torch": torch.__version__,
           "largest_losses": sorted(losses.items(), key=lambda kv: -kv[1])[:5]}
    if a.ppl_windows:
        ids = tok(open(a.ppl_data).read(), add_special_tokens=False).input_ids
        ppl, k = perplexity(model, ids, a.ppl_windows)
        res["perplexity"] = {"ppl": ppl, "windows": k, "window": 512}
    print(json.dumps(res))


if __name__ == "__main__":
    main()
