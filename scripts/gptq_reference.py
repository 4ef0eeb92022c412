#!/usr/bin/env python3
"""Known-answer fixture for mpolm's AutoGPTQ v1 and GPTQModel v2 packing (crates/methods/tests/quant.rs).

The packing loops below are AutoGPTQ's QuantLinear.pack (auto_gptq/nn_modules/qlinear/
qlinear_cuda_old.py, v0.7) copied with numpy only: qweight int32 [in*bits/32, out] packs
consecutive input rows low bits first (3 bits: 32 values over 3 words), qzeros int32
[groups, out*bits/32] packs zero-1 along the output axis the same way. GPTQModel's gptq_v2
checkpoint format packs the same way but stores the zero itself (its v1 -> v2 conversion adds 1
to every stored zero), written here as qzeros_v2, with extra v2-only cases whose zeros include 0. A small fixed integer
matrix per bit width is packed and the int32 arrays, plus the dequantised weight
W[i, j] = scales[g_idx[i], j] * (q[i, j] - (qzeros[g_idx[i], j] + 1)), are written to
tests/fixtures/quant/pack_reference.json.

Usage: python3 scripts/gptq_reference.py [OUT_JSON]   (numpy only)
"""
import json
import sys

import numpy as np


def pack_qweight(intweight, bits):
    # intweight: uint32 [in, out]
    intweight = intweight.astype(np.uint32)
    qweight = np.zeros((intweight.shape[0] // 32 * bits, intweight.shape[1]), dtype=np.uint32)
    i = 0
    row = 0
    while row < qweight.shape[0]:
        if bits in [2, 4, 8]:
            for j in range(i, i + (32 // bits)):
                qweight[row] |= intweight[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
        elif bits == 3:
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i))
            i += 10
            qweight[row] |= intweight[i] << 30
            row += 1
            qweight[row] |= (intweight[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 1)
            i += 10
            qweight[row] |= intweight[i] << 31
            row += 1
            qweight[row] |= (intweight[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
        else:
            raise NotImplementedError("Only 2,3,4,8 bits are supported.")
    return qweight.astype(np.int32)


def pack_qzeros(zeros, bits, stored_offset=-1):
    # zeros: true zero points [groups, out]; AutoGPTQ v1 stores zero - 1 (stored_offset -1),
    # GPTQModel's gptq_v2 the zero itself (stored_offset 0)
    zeros = (zeros + stored_offset).astype(np.uint32)
    qzeros = np.zeros((zeros.shape[0], zeros.shape[1] // 32 * bits), dtype=np.uint32)
    i = 0
    col = 0
    while col < qzeros.shape[1]:
        if bits in [2, 4, 8]:
            for j in range(i, i + (32 // bits)):
                qzeros[:, col] |= zeros[:, j] << (bits * (j - i))
            i += 32 // bits
            col += 1
        elif bits == 3:
            for j in range(i, i + 10):
                qzeros[:, col] |= zeros[:, j] << (3 * (j - i))
            i += 10
            qzeros[:, col] |= zeros[:, i] << 30
            col += 1
            qzeros[:, col] |= (zeros[:, i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                qzeros[:, col] |= zeros[:, j] << (3 * (j - i) + 1)
            i += 10
            qzeros[:, col] |= zeros[:, i] << 31
            col += 1
            qzeros[:, col] |= (zeros[:, i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                qzeros[:, col] |= zeros[:, j] << (3 * (j - i) + 2)
            i += 10
            col += 1
        else:
            raise NotImplementedError("Only 2,3,4,8 bits are supported.")
    return qzeros.astype(np.int32)


def case(bits, n_in=64, n_out=64, group=16, zero_from=1):
    maxq = 2**bits - 1
    i = np.arange(n_in)[:, None]
    j = np.arange(n_out)[None, :]
    q = ((i * 7 + j * 3 + i * j) % (maxq + 1)).astype(np.uint32)
    groups = n_in // group
    g = np.arange(groups)[:, None]
    # zero_from 1: zeros 1..maxq, representable in v1 and v2; zero_from 0: 0..maxq-1, where a
    # zero of 0 exists only in v2 (v1 would store -1, which reads back as 2^bits)
    zeros = (zero_from + (g * 5 + j * 11) % maxq).astype(np.uint32)
    scales = ((1 + (g * 3 + j) % 7) / 64.0).astype(np.float16)  # exact in f16
    g_idx = (np.arange(n_in) // group).astype(np.int32)
    qweight = pack_qweight(q, bits)
    qzeros = pack_qzeros(zeros.astype(np.int64), bits) if zero_from == 1 else None
    qzeros_v2 = pack_qzeros(zeros.astype(np.int64), bits, stored_offset=0)
    w = scales[g_idx].astype(np.float32) * (q.astype(np.float32) - zeros[g_idx].astype(np.float32))
    return {
        "bits": bits, "in": n_in, "out": n_out, "group_size": group,
        "q": q.tolist(), "zeros": zeros.tolist(), "scales": scales.astype(np.float32).tolist(),
        "g_idx": g_idx.tolist(), "qweight": qweight.tolist(),
        "qzeros": None if qzeros is None else qzeros.tolist(), "qzeros_v2": qzeros_v2.tolist(),
        "dequant": w.tolist(),
    }


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/quant/pack_reference.json"
    data = {"source": "scripts/gptq_reference.py (AutoGPTQ v0.7 QuantLinear.pack loops, numpy " + np.__version__ + ")",
            "cases": [case(b) for b in (2, 3, 4, 8)],
            # gptq_v2 only (GPTQModel's checkpoint_format: qzeros hold the zero itself): zeros
            # that include 0, which v1 cannot store
            "v2_cases": [case(b, zero_from=0) for b in (2, 3, 4, 8)]}
    with open(out, "w") as f:
        json.dump(data, f, separators=(",", ":"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
