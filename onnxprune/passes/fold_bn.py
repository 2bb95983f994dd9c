"""Fold BatchNormalization into the Conv, ConvTranspose, Gemm or MatMul before it.

y = γ·(x − μ)/√(σ² + ε) + β = s·x + t with s = γ/√(σ² + ε), t = β − s·μ. With x = W·a + b the
layer becomes (s·W)·a + (s·b + t). Computed in float64, written back in the weights' dtype.
Folded only when that is safe: constant weights that no other node reads (or a private copy),
the layer's output read by the BN alone, and no optional BN outputs in use.
"""

from __future__ import annotations

import numpy as np
from onnx import helper

from ..graph import Graph, attrs, set_attr
from .base import Context

PASS = "fold_bn"


def bn_scale_shift(g: Graph, bn) -> tuple[np.ndarray, np.ndarray] | None:
    params = [g.const(n) for n in bn.input[1:5]]
    if any(p is None for p in params):
        return None
    gamma, beta, mean, var = (p.astype(np.float64).reshape(-1) for p in params)
    eps = float(attrs(bn).get("epsilon", 1e-5))
    s = gamma / np.sqrt(var + eps)
    return s, beta - s * mean


def fold_bn(g: Graph, ctx: Context) -> bool:
    changed = False
    producers = g.producers()
    for bn in g.nodes:
        if bn.op_type != "BatchNormalization" or attrs(bn).get("training_mode", 0):
            continue
        if any(o and g.uses(o) for o in bn.output[1:]):
            continue
        layer = producers.get(bn.input[0])
        if layer is None or bn.input[0] in g.output_names or g.uses(bn.input[0]) != 1:
            continue
        st = bn_scale_shift(g, bn)
        if st is None:
            continue
        fold = FOLDERS.get(layer.op_type)
        last = fold(g, layer, bn, *st) if fold else None
        if last is None:
            continue
        # the folded layer (or the Add that replaces the BN) now writes the BN's output
        g.remove_node(bn)
        g.set_output(last, 0, bn.output[0])
        ctx.log(PASS, "fold_bn", bn.name or bn.output[0], f"into {layer.op_type} {layer.name}")
        changed = True
    return changed


def _weights(g: Graph, layer, index: int = 1) -> np.ndarray | None:
    if len(layer.input) <= index or not g.is_const(layer.input[index]):
        return None
    if layer.input[index] in g.input_names:
        return None
    return g.inits[layer.input[index]]


def _bias(g: Graph, layer, n_out: int, index: int = 2) -> np.ndarray | None:
    """The layer's bias as float64 [n_out] (zeros if absent); None if it is not a constant vector."""
    if len(layer.input) <= index or not layer.input[index]:
        return np.zeros(n_out)
    b = g.const(layer.input[index])
    if b is None or layer.input[index] in g.input_names:
        return None
    b = b.astype(np.float64)
    if b.size == 1:
        return np.full(n_out, float(b.reshape(())))
    return b.reshape(-1) if b.size == n_out else None


def fold_conv(g: Graph, conv, bn, s, t):
    w = _weights(g, conv)
    if w is None or w.shape[0] != s.size:
        return None
    b = _bias(g, conv, s.size)
    if b is None:
        return None
    w64 = w.astype(np.float64) * s.reshape((-1,) + (1,) * (w.ndim - 1))
    g.set_input_const(conv, 1, w64.astype(w.dtype))
    g.set_input_const(conv, 2, (s * b + t).astype(w.dtype), base=f"{conv.name or conv.output[0]}_bias")
    return conv


def fold_conv_transpose(g: Graph, conv, bn, s, t):
    w = _weights(g, conv)
    if w is None:
        return None
    groups = int(attrs(conv).get("group", 1))
    c_in, c_out_g = w.shape[0], w.shape[1]
    if c_out_g * groups != s.size:
        return None
    b = _bias(g, conv, s.size)
    if b is None:
        return None
    # W is [C_in, C_out/g, k...]; output channel o = group·(C_out/g) + j lives at W[group rows, j]
    wg = w.astype(np.float64).reshape((groups, c_in // groups, c_out_g) + w.shape[2:])
    wg = wg * s.reshape((groups, 1, c_out_g) + (1,) * (w.ndim - 2))
    g.set_input_const(conv, 1, wg.reshape(w.shape).astype(w.dtype))
    g.set_input_const(conv, 2, (s * b + t).astype(w.dtype), base=f"{conv.name or conv.output[0]}_bias")
    return conv


def fold_gemm(g: Graph, gemm, bn, s, t):
    a = attrs(gemm)
    w = _weights(g, gemm)
    if w is None or w.ndim != 2:
        return None
    trans_b = int(a.get("transB", 0))
    n_out = w.shape[0] if trans_b else w.shape[1]
    if n_out != s.size:
        return None
    c = _bias(g, gemm, n_out)
    if c is None:
        return None
    alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
    w64 = w.astype(np.float64) * (s[:, None] if trans_b else s[None, :]) * alpha
    g.set_input_const(gemm, 1, w64.astype(w.dtype))
    g.set_input_const(gemm, 2, (s * beta * c + t).astype(w.dtype), base=f"{gemm.name or gemm.output[0]}_bias")
    set_attr(gemm, "alpha", 1.0)
    set_attr(gemm, "beta", 1.0)
    return gemm


def fold_matmul(g: Graph, mm, bn, s, t):
    """MatMul has no bias input: scale W's columns and turn the BN into an Add of t."""
    w = _weights(g, mm)
    if w is None or w.ndim != 2 or w.shape[1] != s.size:
        return None
    g.set_input_const(mm, 1, (w.astype(np.float64) * s[None, :]).astype(w.dtype))
    shift = g.fresh_name(f"{mm.name or mm.output[0]}_bn_shift")
    g.inits[shift] = t.astype(w.dtype)
    mid = g.fresh_name(f"{mm.output[0]}_scaled")
    add = helper.make_node("Add", [mid, shift], [bn.output[0]], name=g.fresh_name(f"{bn.name or 'bn'}_shift"))
    g.set_output(mm, 0, mid)
    g.insert_after(mm, [add])
    return add


FOLDERS = {
    "Conv": fold_conv,
    "ConvTranspose": fold_conv_transpose,
    "Gemm": fold_gemm,
    "MatMul": fold_matmul,
}
