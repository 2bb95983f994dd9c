"""Op rules for the channel graph: elementwise ops and norms, and the helpers every family uses.

Each rule answers up to five questions about a node (`registry.CAPABILITIES`):
  couple   which channel space each output has, which slots are united, which are pinned;
  values   which output slots carry a known, input-independent constant (NaN: unknown);
  reads    where a linear layer reads a slot through one weight column (Conv, Gemm, MatMul);
  absorb   (linear layers) fold known constant inputs into the bias;
  rewrite  how the node's parameters change when the slots not in `keep` disappear.
The families register their ops in `registry`; anything not there pins every channel it touches.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from ..graph import Graph, attrs
from . import numeric
from .core import ChannelGraph, Space
from .registry import Rule, pin_all, register_rule, rule_for  # noqa: F401  (rule_for: re-exported)


class NonRectangular(Exception):
    """Removing these slots would leave a multi-axis channel range that is not a box."""


# --- helpers shared by the rules ----------------------------------------------------------

def kept_box(space: Space, keep: np.ndarray) -> list[np.ndarray]:
    """Per channel factor of `space`, the indices kept along it once only `keep` (flat slot indices)
    remains; raises NonRectangular when the kept slots are not the product of those (not a box)."""
    if len(space.dims) == 1:
        return [np.asarray(keep, np.int64)]
    mask = np.zeros(space.size, bool)
    mask[keep] = True
    mask = mask.reshape(space.dims)
    kept_per_axis = [mask.any(axis=tuple(j for j in range(mask.ndim) if j != i)) for i in range(mask.ndim)]
    box = np.ones((), bool)
    for k in kept_per_axis:
        box = np.multiply.outer(box, k)
    if not np.array_equal(box, mask):
        raise NonRectangular(str(space.dims))
    return [np.flatnonzero(k) for k in kept_per_axis]


def new_dims(space: Space, keep: np.ndarray) -> tuple[int, ...]:
    """Sizes of the channel axes once only `keep` (flat slot indices) remains."""
    return tuple(k.size for k in kept_box(space, keep))


def factor_slots(dims: tuple[int, ...], j: int, start: int, stop: int, step: int = 1) -> np.ndarray:
    """The flat slots (row-major over `dims`) whose index along factor j is in range(start, stop,
    step), in that order: the part of a channel range that a slice, split or concat along that factor
    moves."""
    return np.arange(int(np.prod(dims, dtype=np.int64))).reshape(dims).take(np.arange(start, stop, step), axis=j).ravel()


def take_channels(arr: np.ndarray, axes: tuple[int, ...], space: Space, keep: np.ndarray) -> np.ndarray:
    """Keep the slots `keep` of `arr`, whose axes `axes` (not necessarily adjacent: heads and
    features after a transpose) hold the channel range of `space`."""
    n = len(axes)
    first = np.moveaxis(arr, axes, tuple(range(n)))  # channel axes in front, in slot order
    kept = np.take(first.reshape((-1,) + first.shape[n:]), keep, axis=0)
    return np.moveaxis(kept.reshape(new_dims(space, keep) + first.shape[n:]), tuple(range(n)), axes)


def cut_operand(c: np.ndarray, out_rank: int, space: Space, keep: np.ndarray) -> np.ndarray:
    """A constant operand broadcast against an output whose channels are `space`, cut to the slots
    `keep`: along each channel factor where it has the factor's extent; where it has extent 1 (or
    does not reach the axis) it broadcasts along that factor and stays (a rotary table [N, d] over
    heads × d keeps its d when whole heads go)."""
    shift = out_rank - c.ndim
    for a, d, kept in zip(space.axes, space.dims, kept_box(space, keep)):
        if a - shift >= 0 and c.shape[a - shift] == d and kept.size < d:
            c = np.take(c, kept, axis=a - shift)
    return np.ascontiguousarray(c)


def per_factor(extents: tuple, dims: tuple) -> bool:
    """A constant operand's extents along the channel factors: each the factor's size or 1."""
    return all(e in (1, d) for e, d in zip(extents, dims))


def sliced_table(cg: ChannelGraph, name: str, out_axes: tuple[int, ...], out_rank: int):
    """The Slice node if `name` is a constant table sliced at run time along axes that carry no
    channel (a position or ALiBi table cut to the sequence length, cos[:n]), else None: along the
    channel axes it is a per-channel constant, which the rewrite cuts in the table itself."""
    node = cg.g.producer(name)
    if node is None or node.op_type != "Slice" or not cg.g.is_const(node.input[0]) or len(node.input) < 4:
        return None
    axes = cg.g.const(node.input[3]) if node.input[3] else None
    rank = cg.g.inits[node.input[0]].ndim
    if axes is None or rank > out_rank:
        return None
    sliced = {int(a) % rank + out_rank - rank for a in axes.reshape(-1)}
    return node if not sliced & set(out_axes) else None


def cut_sliced_table(g: Graph, user: onnx.NodeProto, index: int, slice_node: onnx.NodeProto, table: np.ndarray) -> None:
    """Give `user` input `index` the slice of `table` (the cut table) that `slice_node` took of the
    old one: in place when nothing else reads that slice, else through a copy of the Slice."""
    if table.shape == g.inits[slice_node.input[0]].shape:
        return
    if g.uses(slice_node.output[0]) > 1 or slice_node.output[0] in g.output_names:
        out = g.fresh_name(f"{slice_node.output[0]}_cut")
        copy = helper.make_node("Slice", list(slice_node.input), [out], name=out)
        g.insert_after(slice_node, [copy])
        g.set_input(user, index, out)
        slice_node = copy
    g.set_input_const(slice_node, 0, table)


def factor_keys(dims: tuple[int, ...], chosen: list[bool]) -> np.ndarray:
    """Per slot (row-major over `dims`), its index over the `chosen` factors alone."""
    idx = np.unravel_index(np.arange(int(np.prod(dims, dtype=np.int64))), dims)
    key = np.zeros(idx[0].size, np.int64)
    for i, d, c in zip(idx, dims, chosen):
        if c:
            key = key * d + i
    return key


def unite_along(cg: ChannelGraph, space: Space, whole: list[bool]) -> np.ndarray:
    """Unite the slots of `space` that differ only along the factors marked `whole`: those factors
    are then never cut, only the others. What an operand computed at run time asks that varies along
    some factors and broadcasts along the others (a rotary table [N, d] sliced to the sequence
    length, against heads × d: it cannot be cut, so whole heads go or none). Returns, per key over
    the other factors, one slot of its class."""
    key = factor_keys(space.dims, [not w for w in whole])
    first = np.zeros(int(key.max()) + 1, np.int64)
    first[key] = space.slots
    cg.unite(space.slots, first[key])
    return first


def contiguous(space: Space) -> bool:
    return space.axes == tuple(range(space.axes[0], space.axes[-1] + 1))


def aligned_axes(space_axes: tuple[int, ...], out_rank: int, in_rank: int) -> tuple[int, ...] | None:
    """The axes of a broadcast operand of rank `in_rank` that line up with `space_axes` of the output
    (None if the operand does not reach all of them)."""
    shift = out_rank - in_rank
    axes = tuple(a - shift for a in space_axes)
    return axes if min(axes) >= 0 else None


def operand_extents(space_axes: tuple[int, ...], out_rank: int, shape) -> tuple:
    """A broadcast operand's extent along each channel axis of the output: 1 where its rank does not
    reach that axis (numpy broadcasting aligns trailing axes)."""
    shift = out_rank - len(shape)
    return tuple(shape[a - shift] if a - shift >= 0 else 1 for a in space_axes)


def channel_vector_shape(rank: int, space: Space) -> tuple[int, ...]:
    shape = [1] * rank
    for a, d in zip(space.axes, space.dims):
        shape[a] = d
    return tuple(shape)


def per_channel_values(result: np.ndarray, space: Space) -> np.ndarray:
    """Collapse an evaluated output to one value per slot; NaN where it is not uniform."""
    if tuple(result.shape[a] for a in space.axes) != space.dims:
        return np.full(space.size, np.nan)
    moved = np.moveaxis(result, space.axes, tuple(range(len(space.axes)))).reshape(space.size, -1)
    lo, hi = moved.min(axis=1), moved.max(axis=1)
    return np.where(lo == hi, lo, np.nan).astype(np.float64)


def _varies_off_channels(c: np.ndarray, axes: tuple[int, ...], out_rank: int) -> bool:
    """A constant operand with extent > 1 on an axis other than the channel axes (e.g. a bias map)."""
    shift = out_rank - c.ndim
    return any(d > 1 and (i + shift) not in axes for i, d in enumerate(c.shape))


# the reference evaluator pools element by element in Python (12 s of Inception-v3's 14): the
# pools `numeric` does not cover (ceil mode, SAME padding, LpPool) run on onnxruntime when their
# inputs are float32, which both evaluate in the same precision
ON_ONNXRUNTIME = {"AveragePool", "MaxPool", "LpPool"}


def evaluate(node: onnx.NodeProto, feeds: dict[str, np.ndarray], opsets) -> list[np.ndarray]:
    """Run one node: with numpy where `numeric` covers it (convs, common elementwise ops), the ops
    above on onnxruntime, anything else with the ONNX reference evaluator (numpy, exact ONNX
    semantics; float64 where the caller feeds float64)."""
    fast = numeric.run(node, feeds)
    if fast is not None:
        return fast
    from onnx.reference import ReferenceEvaluator  # (importing it costs 0.1 s: only when needed)

    inputs = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for k, v in feeds.items()]
    outputs = [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in node.output if o]
    tiny = helper.make_model(helper.make_graph([node], "eval", inputs, outputs), opset_imports=opsets)
    if node.op_type in ON_ONNXRUNTIME and all(v.dtype == np.float32 for v in feeds.values()):
        from ..parity import run, session

        tiny.ir_version = min(tiny.ir_version, 10)
        del tiny.graph.output[:]
        tiny.graph.output.extend(helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in node.output[:1])
        return [np.asarray(r) for r in run(session(tiny), feeds)]
    return [np.asarray(r) for r in ReferenceEvaluator(tiny).run(None, feeds)]


def float_dtype(g: Graph, node: onnx.NodeProto) -> np.dtype:
    for i in node.input:
        c = g.const(i)
        if c is not None and c.dtype.kind == "f":
            return c.dtype
    return np.dtype(np.float32)


# --- the rules -----------------------------------------------------------------------------

class Elementwise(Rule):
    """Unary and broadcasting n-ary elementwise ops: out[c] ≡ in[c] for every operand that has the
    channel axes; constant operands are per-channel parameters or broadcasts."""

    def __init__(self, data_inputs: int | None = None):
        self.data_inputs = data_inputs  # None: all inputs are data (Add, Mul ...); Clip: 1

    def operands(self, node):
        names = list(node.input) if self.data_inputs is None else list(node.input[: self.data_inputs])
        return [n for n in names if n]

    def couple(self, node, cg):
        out = node.output[0]
        out_rank = cg.rank(out)
        if self.data_inputs is not None:
            self.pin_extra_inputs(node, cg, self.data_inputs)
        for extra in node.output[1:]:
            if extra and cg.g.uses(extra):
                return self.pin_through(node, cg, f"{node.op_type} {node.name}: second output in use")
        operands = [n for n in self.operands(node) if not cg.g.is_const(n)]
        if out_rank is None:
            return self.pin_through(node, cg, f"{node.op_type} {node.name}: unknown output shape")
        out_shape = cg.shape(out)
        ref = None
        for n in operands:
            sp = cg.space(n)
            if sp is None:
                continue
            axes = tuple(a + out_rank - cg.rank(n) for a in sp.axes)
            if all(out_shape[a] == d for a, d in zip(axes, sp.dims)):
                ref = axes
                break
        if ref is None:
            return self.pin_through(node, cg, f"{node.op_type} {node.name}: no operand carries the channels")
        sp_out = cg.new_space(out, ref)
        if sp_out is None:
            return self.pin_through(node, cg, f"{node.op_type} {node.name}: dynamic channel dim")
        for n in self.operands(node):
            shape = cg.g.inits[n].shape if cg.g.is_const(n) else cg.shape(n)  # (a constant knows its own)
            axes = aligned_axes(ref, out_rank, len(shape)) if shape is not None else None
            extents = operand_extents(ref, out_rank, shape) if shape is not None else None
            if extents is not None and all(d == 1 for d in extents):
                continue  # broadcast along the channels (a scalar, x / 6, a [1, 1, H, W] map ...): no coupling
            sp = cg.space(n)
            if cg.g.is_const(n):
                if not per_factor(extents, sp_out.dims):
                    cg.pin_space(sp_out, f"{node.op_type} {node.name}: constant operand shape not per-channel")
                continue
            if sp is not None and sp.axes == axes and sp.dims == sp_out.dims:
                cg.unite(sp.slots, sp_out.slots)
            elif sp is None and extents is not None and per_factor(extents, sp_out.dims) and sliced_table(cg, n, ref, out_rank):
                continue  # a constant table sliced to the sequence length: cut with the channels (rewrite)
            elif sp is None and extents is not None and per_factor(extents, sp_out.dims) and 1 in extents:
                unite_along(cg, sp_out, [e != 1 for e in extents])
            else:
                reason = (f"{node.op_type} {node.name}: operand {n} is not tracked (a graph input, an unknown op's output ...)"
                          if sp is None else f"{node.op_type} {node.name}: operand {n} carries its channels differently")
                cg.pin_space(sp_out, reason)
                cg.pin_space(sp, reason)

    def coupled(self, node, cg, name) -> bool:
        sp, out = cg.space(name), cg.space(node.output[0])
        if sp is None or out is None or sp.dims != out.dims:
            return False
        return cg.find(sp.base) == cg.find(out.base)

    def values(self, node, cg):
        out = node.output[0]
        if cg.space(out) is None:
            return
        coupled = [n for n in node.input if n and not cg.g.is_const(n) and self.coupled(node, cg, n)]
        known = np.ones(cg.space(out).size, bool)
        zero = np.zeros_like(known)
        for n in coupled:
            known &= cg.known(n)
            zero |= cg.values[n] == 0
        if any(n and not cg.g.is_const(n) and n not in coupled for n in node.input):
            known[:] = False  # data broadcast along the channels: unknown per channel
        cg.values[out] = np.full(known.size, np.nan)
        if known.any():
            try:
                self.evaluate_known(node, cg, coupled, known)
            except Exception:
                cg.values[out], cg.maps[out] = np.full(known.size, np.nan), {}
        if node.op_type == "Mul":  # 0 · anything finite = 0
            cg.values[out] = np.where(zero, 0.0, cg.values[out])
            for k in np.flatnonzero(zero):
                cg.maps.get(out, {}).pop(int(k), None)

    def evaluate_known(self, node, cg, coupled, known) -> None:
        """Run the node on the known values: one value per channel when all are uniform, else at
        full spatial size (maps, or a constant operand that varies over the other axes)."""
        out = node.output[0]
        sp_out = cg.space(out)
        dtype = float_dtype(cg.g, node)
        full = any(cg.maps.get(n) for n in coupled) or any(
            cg.g.is_const(n) and _varies_off_channels(cg.g.inits[n], sp_out.axes, cg.rank(out)) for n in node.input)
        feeds = {}
        for n in node.input:
            if not n:
                continue
            if cg.g.is_const(n):
                feeds[n] = cg.g.inits[n]
            elif full:
                feeds[n] = cg.full_values(n).astype(dtype)
            else:
                feeds[n] = np.nan_to_num(cg.values[n]).astype(dtype).reshape(channel_vector_shape(cg.rank(n), cg.space(n)))
        res = evaluate(node, feeds, cg.g.model.opset_import)[0].astype(np.float64)
        if full:
            cg.store(out, res, known)
        else:
            cg.values[out] = np.where(known, per_channel_values(res, sp_out), np.nan)

    def rewrite(self, node, g, cg, keep):
        out = node.output[0]
        sp = cg.space(out)
        if out not in keep or sp is None:
            return
        out_rank = cg.rank(out)
        for i, n in enumerate(node.input):
            if not g.is_const(n) or (self.data_inputs is not None and i >= self.data_inputs):
                continue
            c = g.inits[n]
            cut = cut_operand(c, out_rank, sp, keep[out])
            if cut.shape != c.shape:
                g.set_input_const(node, i, cut)
        for i, n in enumerate(node.input[: self.data_inputs]):
            table = sliced_table(cg, n, sp.axes, out_rank) if n and not g.is_const(n) and cg.space(n) is None else None
            if table is not None:
                cut_sliced_table(g, node, i, table, cut_operand(g.inits[table.input[0]], out_rank, sp, keep[out]))


class BatchNorm(Rule):
    """BatchNormalization / InstanceNormalization: out[c] ≡ in[c] ≡ param[c] on axis 1."""

    def couple(self, node, cg):
        x = node.input[0]
        sp = cg.space(x)
        self.pin_extra_inputs(node, cg, 1)
        if any(not cg.g.is_const(p) for p in node.input[1:]) or any(o and cg.g.uses(o) for o in node.output[1:]):
            return self.pin_through(node, cg, f"{node.op_type} {node.name}: non-constant parameters or extra outputs")
        if sp is None or sp.axes != (1,):
            return self.pin_through(node, cg, f"{node.op_type} {node.name}: input channels not on axis 1")
        cg.same_space(x, node.output[0])

    def values(self, node, cg):
        out = node.output[0]
        if cg.space(out) is None:
            return
        x = node.input[0]
        params = [cg.g.inits[p].astype(np.float64).reshape(-1) for p in node.input[1:]]
        eps = float(attrs(node).get("epsilon", 1e-5))
        v = cg.values[x]
        if node.op_type == "BatchNormalization":
            gamma, beta, mean, var = params
            scale = gamma / np.sqrt(var + eps)
            cg.values[out] = np.where(gamma == 0, beta, scale * (v - mean) + beta)
            cg.maps[out] = {k: scale[k] * (m - mean[k]) + beta[k] for k, m in cg.maps.get(x, {}).items() if gamma[k] != 0}
        else:  # InstanceNormalization normalizes each channel over its own values
            gamma, beta = params
            cg.values[out] = np.where(np.isnan(v), np.nan, beta)
            cg.maps[out] = {k: gamma[k] * (m - m.mean()) / np.sqrt(m.var() + eps) + beta[k] for k, m in cg.maps.get(x, {}).items()}

    def rewrite(self, node, g, cg, keep):
        k = keep.get(node.input[0])
        if k is None:
            return
        for i in range(1, len(node.input)):
            g.set_input_const(node, i, g.inits[node.input[i]].reshape(-1)[k])


class LayerNorm(Rule):
    """LayerNormalization, RMSNormalization: statistics over the axes from `axis` on. Channels on those
    axes all enter every mean and variance, so none can go without changing the others: the width
    stays (pinned, with that reason). Channels on the other axes are normalized each on their own."""

    def couple(self, node, cg):
        x, out = node.input[0], node.output[0]
        sp, rank = cg.space(x), cg.rank(x)
        self.pin_extra_inputs(node, cg, 1)
        if any(o and cg.g.uses(o) for o in node.output[1:]):
            return self.pin_through(node, cg, f"{node.op_type} {node.name}: mean / inverse std outputs in use")
        if sp is None or rank is None:
            return
        axis = int(attrs(node).get("axis", -1))
        axis = axis + rank if axis < 0 else axis
        cg.same_space(x, out)
        if max(sp.axes) >= axis:
            reason = (f"{node.op_type} {node.name}: statistics over the hidden axis (every channel enters the "
                      "mean and variance): its width stays")
            cg.pin_space(sp, reason)
            cg.pin_tensor(out, reason)


UNARY = """Relu LeakyRelu Sigmoid HardSigmoid HardSwish Tanh Erf Softplus Softsign Mish Elu Selu Celu Gelu
Exp Log Abs Neg Sqrt Reciprocal Floor Ceil Round Sign Sin Cos Identity Cast ThresholdedRelu Shrink""".split()
BINARY = "Add Sub Mul Div Max Min Sum Mean Pow PRelu".split()

register_rule(UNARY + ["Clip", "Dropout"], Elementwise(data_inputs=1), permute=True)
register_rule(BINARY + ["Where"], Elementwise(), permute=True)  # (Where: a mask broadcast along the channels)
register_rule(["BatchNormalization", "InstanceNormalization"], BatchNorm(), permute=True)
register_rule(["LayerNormalization", "RMSNormalization"], LayerNorm())
