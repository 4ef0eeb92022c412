"""PyTorch peer of mpolm's MPO layers, for benchmarks only (issue #8, item 4: the mpo-aux step).

Loads an MPO checkpoint written by `mpolm compress … --out DIR` (model.safetensors with
`<module>.mpo.core_<k>` tensors, mpo_manifest.json) into a transformers model: each listed Linear
or Embedding becomes a module that rebuilds its weight from the cores on every forward and then
calls F.linear / F.embedding, as the MPOP papers' PyTorch code does. The rebuild contracts the
sites left of a split site into one block and those right of it into another, choosing the split
and the order of the last two products by multiply-adds (the same cost model as mpolm's
`mpo::dense_from_cores`), then un-interleaves the row and column factors once.

`freeze_central(model)` leaves only the auxiliary cores trainable (MPOP's lightweight tuning).
"""
import json
import math
import os

import torch
import torch.nn.functional as F
from safetensors.torch import load_file


def _plan(m, d):
    n = len(m)
    lefts = [1]
    for x in m:
        lefts.append(lefts[-1] * x)
    total = lefts[n]
    best = (math.inf, 0, True)
    for s in range(n):
        cost = sum(lefts[k] * d[k] * m[k] * d[k + 1] for k in range(1, s))
        cost += sum(d[k] * m[k] * d[k + 1] * (total // lefts[k + 1]) for k in range(s + 1, n - 1))
        a, b, ms = lefts[s], total // lefts[s + 1], m[s]
        right_first = d[s] * ms * d[s + 1] * b + a * d[s] * ms * b
        left_first = a * d[s] * ms * d[s + 1] + a * ms * d[s + 1] * b
        for c, lf in ((right_first, False), (left_first, True)):
            if cost + c < best[0]:
                best = (cost + c, s, lf)
    return best[1], best[2]


def rebuild(cores, rf, cf, rows, cols):
    """W[rows, cols] from cores [d_{k-1}, i_k, j_k, d_k] (differentiable)."""
    n = len(cores)
    m = [rf[k] * cf[k] for k in range(n)]
    d = [c.shape[0] for c in cores] + [1]
    s, left_first = _plan(m, d)
    one = cores[0].new_ones(1, 1)
    lb, l = one, 1
    for k in range(s):
        lb = (lb @ cores[k].reshape(d[k], m[k] * d[k + 1])).reshape(l * m[k], d[k + 1])
        l *= m[k]
    rb, r = one, 1
    for k in range(n - 1, s, -1):
        rb = (cores[k].reshape(d[k] * m[k], d[k + 1]) @ rb).reshape(d[k], m[k] * r)
        r *= m[k]
    c = cores[s]
    if left_first:
        x = (lb @ c.reshape(d[s], m[s] * d[s + 1])).reshape(l * m[s], d[s + 1]) @ rb
    else:
        x = lb @ (c.reshape(d[s] * m[s], d[s + 1]) @ rb).reshape(d[s], m[s] * r)
    dims = [f for k in range(n) for f in (rf[k], cf[k])]
    perm = list(range(0, 2 * n, 2)) + list(range(1, 2 * n, 2))
    w = x.reshape(dims).permute(perm).reshape(math.prod(rf), math.prod(cf))
    return w[:rows, :cols]


class MpoWeight(torch.nn.Module):
    def __init__(self, man, cores):
        super().__init__()
        self.rf, self.cf = man["row_factors"], man["col_factors"]
        self.rows, self.cols = man["orig_rows"], man["orig_cols"]
        self.cores = torch.nn.ParameterList([torch.nn.Parameter(c) for c in cores])

    def weight(self):
        return rebuild(list(self.cores), self.rf, self.cf, self.rows, self.cols)


class MpoLinear(MpoWeight):
    def __init__(self, man, cores, bias):
        super().__init__(man, cores)
        self.bias = bias

    def forward(self, x):
        return F.linear(x, self.weight(), self.bias)


class MpoEmbedding(MpoWeight):
    def __init__(self, man, cores, padding_idx):
        super().__init__(man, cores)
        self.padding_idx = padding_idx

    def forward(self, ids):
        return F.embedding(ids, self.weight(), self.padding_idx)


def load_mpo(model, ckpt):
    """Swap every layer named in ckpt's manifest into `model` (names matched as suffixes of the
    model's module names, so a `bert.` prefix is fine). Returns the number of layers swapped."""
    man = json.load(open(os.path.join(ckpt, "mpo_manifest.json")))["layers"]
    tensors = load_file(os.path.join(ckpt, "model.safetensors"))
    modules = dict(model.named_modules())
    swapped = 0
    for name, lm in man.items():
        full = next((k for k in modules if k == name or k.endswith("." + name)), None)
        if full is None:
            raise SystemExit(f"{ckpt}: the model has no module '{name}'")
        old = modules[full]
        cores = [tensors[f"{name}.mpo.core_{k}"].float() for k in range(len(lm["core_shapes"]))]
        if isinstance(old, torch.nn.Embedding):
            new = MpoEmbedding(lm, cores, old.padding_idx)
        else:
            new = MpoLinear(lm, cores, old.bias)
        parent, _, attr = full.rpartition(".")
        setattr(modules[parent] if parent else model, attr, new)
        swapped += 1
    return swapped


def freeze_central(model):
    for mod in model.modules():
        if isinstance(mod, MpoWeight):
            mod.cores[len(mod.cores) // 2].requires_grad_(False)


def opf_split(d):
    """`mpo::shapes::opf_split`: the most even split of d into two factors > 1."""
    if d < 4:
        return None
    a = math.isqrt(d)
    while a * a < d:
        a += 1
    while a < d and d % a:
        a += 1
    return (a, d // a) if a < d else None


def one_padded(f, n):
    return [f[0]] + [1] * (n - len(f)) + list(f[1:])


def tt_svd(w, rf, cf):
    """Exact (untruncated) cores [d_{k-1}, i_k, j_k, d_k] of w over the factors rf × cf, in float64."""
    import numpy as np

    n = len(rf)
    t = np.asarray(w, dtype=np.float64).reshape(list(rf) + list(cf))
    t = t.transpose([x for k in range(n) for x in (k, n + k)])
    cores, d, rest = [], 1, t.reshape(-1)
    for k in range(n - 1):
        m = rest.reshape(d * rf[k] * cf[k], -1)
        u, s, vt = np.linalg.svd(m, full_matrices=False)
        cores.append(u.reshape(d, rf[k], cf[k], -1))
        d = u.shape[1]
        rest = s[:, None] * vt
    cores.append(rest.reshape(d, rf[-1], cf[-1], 1))
    return [torch.tensor(c, dtype=torch.float32) for c in cores]


def opf_chains(model, names, sites):
    """Replace each named Linear by its exact OPF chain (trainable cores, rebuilt every forward)."""
    modules = dict(model.named_modules())
    for name in names:
        full = next((k for k in modules if k == name or k.endswith("." + name)), None)
        if full is None:
            raise SystemExit(f"the model has no module '{name}'")
        old = modules[full]
        rows, cols = old.weight.shape
        rf, cf = one_padded(opf_split(rows), sites), one_padded(opf_split(cols), sites)
        man = {"row_factors": rf, "col_factors": cf, "orig_rows": rows, "orig_cols": cols}
        cores = tt_svd(old.weight.detach().numpy(), rf, cf)
        new = MpoLinear(man, cores, old.bias)
        with torch.no_grad():
            assert torch.allclose(new.weight(), old.weight, atol=1e-4), name
        parent, _, attr = full.rpartition(".")
        setattr(modules[parent] if parent else model, attr, new)
