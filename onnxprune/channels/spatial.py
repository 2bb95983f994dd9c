"""Ops that work on each channel on its own over the other axes: pooling, spatial reductions,
Pad and Resize. out[c] ≡ in[c]; a constant channel stays constant unless padding or a border
average can change it."""

from __future__ import annotations

import numpy as np

from ..graph import attrs, default_opset
from .registry import Rule, register_rule
from .rules import evaluate

POOLS = "MaxPool AveragePool GlobalAveragePool GlobalMaxPool LpPool GlobalLpPool".split()
REDUCES = "ReduceMean ReduceMax ReduceMin ReduceSum ReduceL1 ReduceL2 ReduceLogSumExp ReduceProd ReduceSumSquare".split()
CONSTANT_PRESERVING = {"MaxPool", "GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceMax", "ReduceMin", "Resize", "Upsample"}
# (AveragePool with padding, Pad with another fill value, ReduceSum ... are evaluated instead)


def _plain_average(node) -> bool:
    """An AveragePool that averages input elements only (no zero padding counted in): a constant
    stays that constant at any input size."""
    if node.op_type != "AveragePool":
        return False
    a = attrs(node)
    if int(a.get("count_include_pad", 0)) == 0:
        return True
    unpadded = a.get("auto_pad", b"NOTSET") in (b"NOTSET", b"VALID", "NOTSET", "VALID") and not any(a.get("pads", []))
    return unpadded and not int(a.get("ceil_mode", 0))


class Spatial(Rule):
    def out_axes(self, node, cg):
        """The output's channel axes, or a reason string why the op touches the channels."""
        x = node.input[0]
        sp, rank = cg.space(x), cg.rank(x)
        op = node.op_type
        if op in POOLS:
            return sp.axes if sp.axes == (1,) else "pools over the channel axis"
        if op in REDUCES:
            axes, keepdims = self.reduce_axes(node, cg)
            if axes is None or any(a in sp.axes for a in axes):
                return ("reduces over the channel axis: every channel enters the result (the statistics of "
                        "an RMSNorm / LayerNorm, a mean over channels ...), so the width stays")
            return tuple(a - (0 if keepdims else sum(1 for r in axes if r < a)) for a in sp.axes)
        if op == "Pad":
            pads = self.pads(node, cg)
            if pads is None or any(pads[a] or pads[a + rank] for a in sp.axes):
                return "pads the channel axis"
            return sp.axes
        if op in ("Resize", "Upsample"):
            if len(node.input) > 3 and node.input[3] and not cg.g.is_const(node.input[3]):
                return "output sizes computed at run time (they would keep the old channel count)"
            in_shape, out_shape = cg.shape(x), cg.shape(node.output[0])
            if out_shape is None or any(in_shape[a] != out_shape[a] for a in sp.axes):
                return "resizes the channel axis"
            return sp.axes
        return "unknown"

    @staticmethod
    def reduce_axes(node, cg):
        rank = cg.rank(node.input[0])
        a = attrs(node)
        keepdims = int(a.get("keepdims", 1))
        if "axes" in a:
            axes = list(a["axes"])
        elif len(node.input) > 1 and node.input[1]:
            c = cg.g.const(node.input[1])
            if c is None:
                return None, keepdims
            axes = [int(v) for v in c.reshape(-1)]
        else:
            axes = [] if int(a.get("noop_with_empty_axes", 0)) else list(range(rank))
        return [v + rank if v < 0 else v for v in axes], keepdims

    @staticmethod
    def pads(node, cg):
        rank = cg.rank(node.input[0])
        if default_opset(cg.g.model) < 11:
            return list(attrs(node).get("pads", [0] * 2 * rank))
        p = cg.g.const(node.input[1]) if len(node.input) > 1 else None
        if p is None:
            return None
        p = [int(v) for v in p]
        if len(node.input) > 3 and node.input[3]:  # opset 18 axes: expand to full pads
            axes = cg.g.const(node.input[3])
            if axes is None:
                return None
            full = [0] * 2 * rank
            n = len(axes)
            for k, ax in enumerate(int(v) + rank if v < 0 else int(v) for v in axes):
                full[ax], full[ax + rank] = p[k], p[k + n]
            return full
        return p

    def couple(self, node, cg):
        x = node.input[0]
        if cg.space(x) is None:
            return
        self.pin_extra_inputs(node, cg, 1)
        if node.op_type == "MaxPool" and len(node.output) > 1 and node.output[1] and cg.g.uses(node.output[1]):
            return self.pin_through(node, cg, f"MaxPool {node.name}: flat indices output in use")
        axes = self.out_axes(node, cg)
        if isinstance(axes, str):
            return self.pin_through(node, cg, f"{node.op_type} {node.name}: {axes}")
        cg.same_space(x, node.output[0], axes)

    def values(self, node, cg):
        out, x = node.output[0], node.input[0]
        if cg.space(out) is None or cg.space(x) is None:
            return
        known = cg.known(x)
        cg.values[out] = np.full(known.size, np.nan)
        if not known.any():
            return
        crop = attrs(node).get("coordinate_transformation_mode") in (b"tf_crop_and_resize", "tf_crop_and_resize")
        if (node.op_type in CONSTANT_PRESERVING or _plain_average(node)) and not cg.maps.get(x) and not crop:
            cg.values[out] = cg.values[x].copy()  # max / mean / resampling of a constant is that constant
            return
        try:  # padding, border averages and maps: run the op on the known channels
            cg.store(out, self.run_on(node, cg, known), known)
        except Exception:
            cg.values[out], cg.maps[out] = np.full(known.size, np.nan), {}

    @staticmethod
    def run_on(node, cg, known) -> np.ndarray:
        """The op's output at batch 1 for the known channels (the others zero): it works on each
        channel on its own, so only the known ones are evaluated."""
        x, out = node.input[0], node.output[0]
        sp = cg.space(x)
        full = cg.full_values(x)
        axis = sp.axes[0]
        idx = np.flatnonzero(known)
        feeds = {x: np.take(full, idx, axis=axis).astype(np.float32)}
        for name in node.input[1:]:
            if name:
                feeds[name] = cg.g.inits[name]
        if node.op_type == "Resize" and len(node.input) > 3 and node.input[3]:
            sizes = feeds[node.input[3]].copy()
            sizes[axis] = len(idx)
            feeds[node.input[3]] = sizes
        res = evaluate(node, feeds, cg.g.model.opset_import)[0]
        shape = list(res.shape)
        shape[cg.space(out).axes[0]] = sp.size
        result = np.zeros(shape)
        index = [slice(None)] * len(shape)
        index[cg.space(out).axes[0]] = idx
        result[tuple(index)] = res
        return result

    def rewrite(self, node, g, cg, keep):
        x = node.input[0]
        if node.op_type != "Resize" or x not in keep or len(node.input) < 4 or not node.input[3]:
            return
        sizes = g.inits[node.input[3]].copy()
        (axis,) = cg.space(x).axes
        sizes[axis] = len(keep[x])
        g.set_input_const(node, 3, sizes)


# (their rewrite gathers channels: any permutation goes through the ones `rearrange` was tested on)
PERMUTABLE = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceMax", "Pad", "Resize"}
for op in POOLS + REDUCES + ["Pad", "Resize", "Upsample"]:
    register_rule(op, Spatial(), permute=op in PERMUTABLE)
