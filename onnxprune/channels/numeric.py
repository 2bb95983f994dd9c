"""Exact numpy versions of the ops the channel graph evaluates most: convolutions of constant
channels, max and average pools, and the common elementwise ops, on float inputs.

The ONNX reference evaluator builds a model and an evaluator for every call and convolves with a
Python loop over output positions: that was most of a small model's `simplify` time. These compute
the same function in the caller's precision (float64 for the constants of the channel graph) —
a conv sums its taps in another order, a difference at the last bit of float64 — and return None
for anything they do not cover, which then goes to the reference evaluator (`rules.evaluate`).
"""

from __future__ import annotations

import numpy as np
import onnx

from ..graph import attrs

_UNARY = {
    "Relu": lambda x: np.maximum(x, 0).astype(x.dtype),
    "Neg": np.negative,
    "Abs": np.abs,
    "Identity": lambda x: x,
    "Sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)),
    "Tanh": np.tanh,
}
_NARY = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide,
         "Max": np.maximum, "Min": np.minimum}
_VARIADIC = {"Max", "Min"}


def run(node: onnx.NodeProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray] | None:
    """The node's outputs, or None when this module does not cover it."""
    names = [n for n in node.input if n]
    if (len(names) != len(node.input) and node.op_type != "Clip") or not node.input[0] or any(n not in feeds for n in names):
        return None
    xs = [np.asarray(feeds[n]) for n in names]
    if any(x.dtype.kind != "f" for x in xs) or len([o for o in node.output if o]) != 1:
        return None
    op = node.op_type
    if op in _UNARY and len(xs) == 1 and not node.attribute:
        with np.errstate(over="ignore"):
            return [np.asarray(_UNARY[op](xs[0]))]
    if op in _NARY and not node.attribute and (len(xs) == 2 or (op in _VARIADIC and xs)):
        out = xs[0]
        with np.errstate(divide="ignore", invalid="ignore"):
            for x in xs[1:]:
                out = _NARY[op](out, x)
        return [np.asarray(out)]
    if op == "Clip" and not node.attribute:  # opset 11+: min and max are optional inputs
        return [clip(node, feeds)]
    if op in ("MaxPool", "AveragePool") and len(xs) == 1:
        y = pool(node, xs[0])
        return None if y is None else [y]
    if op == "Conv" and len(xs) in (2, 3):
        y = conv(node, *xs[:2])
        if y is not None and len(xs) == 3:
            y = y + xs[2].reshape((1, -1) + (1,) * (y.ndim - 2))
        return None if y is None else [y]
    return None


def _window_geometry(a: dict, k: tuple, spatial_rank: int):
    """(strides, dilations, pads) of a Conv/pool node with explicit or VALID padding; None for
    auto_pad SAME_* (left to the reference evaluator)."""
    mode = a.get("auto_pad", b"NOTSET")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode not in ("NOTSET", "VALID"):
        return None
    d = spatial_rank
    pads = list(a.get("pads", [0] * 2 * d)) if mode == "NOTSET" else [0] * 2 * d
    return list(a.get("strides", [1] * d)), list(a.get("dilations", [1] * d)), pads


def _taps(xp: np.ndarray, k, strides, dilations, out_spatial):
    """The input seen by each kernel tap: one strided view of the padded input per tap."""
    for tap in np.ndindex(*k):
        yield tap, xp[(Ellipsis,) + tuple(slice(t * dl, t * dl + s * (o - 1) + 1, s)
                                         for t, dl, s, o in zip(tap, dilations, strides, out_spatial))]


def pool(node: onnx.NodeProto, x: np.ndarray) -> np.ndarray | None:
    """ONNX MaxPool / AveragePool (floor mode, explicit or VALID pads, strides, dilations,
    count_include_pad) as one max / add per kernel tap; None for what it does not cover."""
    a = attrs(node)
    k = tuple(a.get("kernel_shape", ()))
    if not k or int(a.get("ceil_mode", 0)) or len([o for o in node.output if o]) != 1:
        return None
    geometry = _window_geometry(a, k, len(k))
    if geometry is None:
        return None
    strides, dilations, pads = geometry
    d = len(k)
    maximum = node.op_type == "MaxPool"
    width = [(0, 0)] * (x.ndim - d) + [(pads[i], pads[i + d]) for i in range(d)]
    xp = np.pad(x.astype(np.float64), width, constant_values=-np.inf if maximum else 0.0)
    out_spatial = [(xp.shape[x.ndim - d + i] - dilations[i] * (k[i] - 1) - 1) // strides[i] + 1 for i in range(d)]
    if any(o <= 0 for o in out_spatial):
        return None
    acc = None
    for _, window in _taps(xp, k, strides, dilations, out_spatial):
        acc = window.copy() if acc is None else (np.maximum(acc, window) if maximum else acc + window)
    if not maximum:
        if int(a.get("count_include_pad", 0)) or not any(pads):
            acc = acc / np.prod(k)
        else:  # divide by the taps that fall inside the input, position by position
            inside = np.pad(np.ones(x.shape[x.ndim - d:]), width[x.ndim - d:])
            count = sum(w for _, w in _taps(inside, k, strides, dilations, out_spatial))
            acc = acc / count
    return acc.astype(x.dtype)


def conv(node: onnx.NodeProto, x: np.ndarray, w: np.ndarray) -> np.ndarray | None:
    """ONNX Conv (explicit or VALID padding, any strides, dilations and groups, any spatial rank)
    as one multiply-add per kernel tap over the zero-padded input; None for auto_pad SAME_*."""
    a = attrs(node)
    k = w.shape[2:]
    d = len(k)
    geometry = _window_geometry(a, k, d)
    if geometry is None or ("kernel_shape" in a and tuple(a["kernel_shape"]) != tuple(k)):
        return None
    strides, dilations, pads = geometry
    group = int(a.get("group", 1))
    n, c = x.shape[:2]
    m, c_per_group = w.shape[:2]
    if c != group * c_per_group or m % group:
        return None
    xp = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + d]) for i in range(d)])
    out_spatial = [(xp.shape[2 + i] - dilations[i] * (k[i] - 1) - 1) // strides[i] + 1 for i in range(d)]
    if any(s <= 0 for s in out_spatial):
        return None
    xg = xp.reshape((n, group, c_per_group) + xp.shape[2:])
    wg = w.reshape((group, m // group, c_per_group) + tuple(k))
    positions = int(np.prod(out_spatial))
    out = np.zeros((n, group, m // group, positions), np.result_type(x, w))
    for tap, window in _taps(xg, k, strides, dilations, out_spatial):  # [g, o, c] @ [n, g, c, positions] (BLAS)
        out += np.matmul(wg[(Ellipsis,) + tap], window.reshape(n, group, c_per_group, positions))
    return out.reshape((n, m) + tuple(out_spatial))


def clip(node: onnx.NodeProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """min(max(x, lo), hi), as ONNX defines it (hi wins where lo > hi); a missing bound is none."""
    x = np.asarray(feeds[node.input[0]])
    lo = feeds[node.input[1]] if len(node.input) > 1 and node.input[1] else None
    hi = feeds[node.input[2]] if len(node.input) > 2 and node.input[2] else None
    y = x if lo is None else np.maximum(x, lo)
    return np.asarray(y if hi is None else np.minimum(y, hi)).astype(x.dtype)
