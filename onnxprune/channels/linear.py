"""Linear layers: Conv (plain, depthwise, grouped), ConvTranspose, Gemm, MatMul.

Their outputs open a new channel space owned by the weight rows; their inputs are consumed
through weight columns (a `ReadBlock` of reads per input). A known constant input channel c with value v
contributes W[:, c]·v everywhere — except where zero padding replaces it by 0 at the border, so
for padded k×k convs the exact contribution is a map: the layer's geometry applied to an image of
ones with the kernel K = sum_c v_c W[:, c] (`Conv.constant_kernel`).

That map is written as a one-input-channel Conv of K over a ones image made at run time
(`Sign(RandomUniform(1, 2))`, exactly 1; from the input's shape where it is symbolic), added to the
layer's output, and reassociated into a residual Add that follows. Why not a constant: onnxruntime's
NCHWc transformer keeps a tensor in its blocked layout only through ops whose inputs are all NCHWc
outputs, so an Add of a constant map makes it reorder the tensor out and back and leaves the Add and
the activation unfused (ResNet-18: 35 reorders instead of 1, 0.80–0.86 of the speed of the same
architecture built small); a conv's output is NCHWc and its Add fuses into the conv (a random op is
never constant-folded). Maps a pointwise layer reads that a depthwise conv or a padded average made
become such a conv too, its kernel fitted (`fitted_border`). Where a dead channel kept for --align
can carry the map, passes/host_border_maps.py moves it there. Measured in
`benchmarks/simplify_speedup.py native`; `--border-maps constant` (passes/border_maps.py) folds them
into constant maps for runtimes that prefer those."""

from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper

from ..graph import attrs, default_opset, set_attr
from ..layers import all_zero, input_axis, output_axis
from .core import ReadBlock
from .attention import ActivationProduct
from .registry import Rule, register_rule, rule_for
from .rules import Elementwise, evaluate

_REF_OPSET = [helper.make_opsetid("", 17)]


def _bias(g, node, n_out, index=2) -> np.ndarray:
    if len(node.input) > index and node.input[index]:
        return np.broadcast_to(g.inits[node.input[index]].astype(np.float64).reshape(-1), (n_out,)).copy()
    return np.zeros(n_out)


def _write_bias(g, node, bias64: np.ndarray, dtype, index=2) -> None:
    g.set_input_const(node, index, bias64.astype(dtype), base=f"{node.name or node.output[0]}_bias")


ONES_LOW, ONES_HIGH = 1.0, 2.0  # Sign of a sample of [1, 2) is exactly 1


def ones_image(g, node, dtype) -> str:
    """A [1, 1, *spatial] tensor of ones at the size of `node`'s input, computed at run time: one
    random unit, Expand-ed once per size (a [1, 1, H, W] random sample costs ~5 µs per size on
    onnxruntime; an Expand of one element well under one), or made from the input's shape where
    that is symbolic."""
    x = node.input[0]
    spatial = tuple(g.shapes[x][2:])
    tensor_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    if any(d is None for d in spatial):
        return _ones_like_input(g, node, x, tensor_type)
    name = "border_ones_" + "x".join(map(str, spatial))
    if is_ones(g.producer, name):
        return name
    unit = "border_one_" + str(tensor_type)
    if not is_ones(g.producer, unit):
        unit, random = g.fresh_name(unit), g.fresh_name(unit + "_random")
        g.insert_after(None, [
            helper.make_node("RandomUniform", [], [random], name=random, low=ONES_LOW, high=ONES_HIGH,
                             shape=[1] * (2 + len(spatial)), dtype=tensor_type),
            helper.make_node("Sign", [random], [unit], name=unit)])
    name, shape = g.fresh_name(name), g.fresh_name(name + "_shape")
    g.inits[shape] = np.array([1, 1, *spatial], np.int64)
    g.insert_after(g.producer(unit), [helper.make_node("Expand", [unit, shape], [name], name=name)])
    return name


def border_convs(model) -> list:
    """The border maps' convs in a ModelProto: Convs over a ones image (either kind above)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    return [n for n in model.graph.node if n.op_type == "Conv" and is_ones(producer.get, n.input[0])]


def is_ones(producer, name: str) -> bool:
    """`name` is a ones image: Sign(RandomUniform(low > 0)) (all ones, whatever the sample), an
    Expand of one, or ConstantOfShape(value 1). `producer`: tensor name -> node or None."""
    n = producer(name)
    if n is None:
        return False
    if n.op_type == "ConstantOfShape":
        value = next((a.t for a in n.attribute if a.name == "value"), None)
        return value is not None and bool(np.all(numpy_helper.to_array(value) == 1))
    if n.op_type == "Expand":
        return is_ones(producer, n.input[0])
    if n.op_type != "Sign":
        return False
    random = producer(n.input[0])
    return random is not None and random.op_type == "RandomUniform" and float(attrs(random).get("low", 0.0)) > 0


def _ones_like_input(g, node, x: str, tensor_type) -> str:
    """ConstantOfShape([1, 1] + Shape(x, start=2)): exact at whatever size the input has (Shape
    reads no channel from there: layout.ShapeOf)."""
    base = f"border_ones_of_{x}"
    spatial, dims, ones, lead = (g.fresh_name(f"{base}_{part}") for part in ("spatial", "dims", "ones", "lead"))
    g.inits[lead] = np.array([1, 1], np.int64)
    g.insert_after(g.producer(x), [
        helper.make_node("Shape", [x], [spatial], name=spatial, start=2),
        helper.make_node("Concat", [lead, spatial], [dims], name=dims, axis=0),
        helper.make_node("ConstantOfShape", [dims], [ones], name=ones,
                         value=helper.make_tensor("one", tensor_type, [1], [1]))])
    return ones


def _insert_border_map(g, node, kernel: np.ndarray, dtype, geometry=None) -> None:
    """out = layer(x) + Conv(ones, kernel) (the geometry of the layer, or of the `geometry` node whose
    input size the ones image takes: see `fitted_border`; one input channel); where `out`
    only feeds an Add of a tensor r made by a node: out + r = layer(x) + (Conv(ones, kernel) + r),
    so that onnxruntime fuses both Adds into the two convs (for grouped layers it may not block,
    passes/border_maps.py makes the map a constant once the final widths are known)."""
    out, geometry = node.output[0], geometry or node
    ones = ones_image(g, geometry, dtype)
    conv = {k: v for k, v in attrs(geometry).items() if k in WINDOW}
    conv["kernel_shape"] = list(kernel.shape[1:])
    existing = _border_of(g, node, ones, conv)
    if existing is not None:  # a later round's constants: one map per layer, kernels summed
        g.set_input_const(existing, 1, g.inits[existing.input[1]] + kernel[:, None].astype(dtype))
        return
    weights = g.fresh_name(f"{node.name or out}_border_kernel")
    g.inits[weights] = kernel[:, None].astype(dtype)
    mid, border = g.fresh_name(f"{out}_before_border"), g.fresh_name(f"{node.name or out}_border_map")
    g.set_output(node, 0, mid)
    add = helper.make_node("Add", [mid, border], [out], name=g.fresh_name(f"{node.name or out}_border_add"))
    g.insert_after(node, [helper.make_node("Conv", [ones, weights], [border], name=border, **conv), add])
    users = g.consumers().get(out, [])
    if len(users) != 1 or users[0].op_type != "Add" or out in g.output_names:
        return
    residual = users[0]
    if len(set(residual.input)) != 2:
        return
    k = list(residual.input).index(out)
    other = residual.input[1 - k]
    if not g.producer(other):  # a constant or graph input would not be in onnxruntime's blocked layout
        return
    g.set_input(add, 0, border)
    g.set_input(add, 1, other)
    g.set_input(residual, 1 - k, mid)


WINDOW = ("pads", "strides", "dilations", "auto_pad")  # the geometry a border conv copies


def _border_of(g, node, ones: str, conv: dict):
    """The border conv over `ones` with this geometry already added to `node`'s output (directly,
    or reassociated into the residual Add that follows), or None."""
    users = g.consumers().get(node.output[0], [])
    if len(users) != 1 or users[0].op_type != "Add" or g.uses(node.output[0]) != 1:
        return None
    operands = [i for i in users[0].input if i != node.output[0]]
    inner = g.producer(operands[0]) if len(operands) == 1 else None
    if inner is not None and inner.op_type == "Add" and g.uses(operands[0]) == 1:
        operands = list(inner.input)  # layer + (border + r)
    for name in operands:
        b = g.producer(name)
        if b is not None and b.op_type == "Conv" and b.input[0] == ones and g.uses(name) == 1 and \
                {k: v for k, v in attrs(b).items() if k in WINDOW or k == "kernel_shape"} == conv:
            return b
    return None


def fitted_border(g, cg, node, items, target: np.ndarray):
    """The maps a pointwise layer reads, as a border conv: a map made by a per-channel windowed op
    G (a depthwise Conv, an AveragePool over zero padding) and elementwise ops after it is, at each
    position, a function of which of G's taps fall inside the image; a Conv of a ones image with
    G's geometry adds, at each position, the sum of its kernel over those taps. Fitting that kernel
    (least squares, one column per tap, plus the bias) to the layer's contribution `target` and
    accepting it only where it reproduces `target` to float32 rounding writes the map as a conv over
    ones — whatever activation came after G (a clipped ReLU6 too). Returns (G, kernel [C_out, k...],
    bias [C_out]) or None (then a constant map is added)."""
    slots = [k for k, v in items if not np.isscalar(v)]
    source = _window_source(g, cg, node.input[0], slots)
    if source is None:
        return None
    taps = tuple(g.inits[source.input[1]].shape[2:]) if source.op_type == "Conv" else tuple(attrs(source)["kernel_shape"])
    spatial = tuple(cg.shape(source.input[0])[2:])
    n = int(np.prod(taps))
    conv = helper.make_node("Conv", ["x", "w"], ["y"], **{k: v for k, v in attrs(source).items() if k in WINDOW},
                            kernel_shape=list(taps))
    seen = evaluate(conv, {"x": np.ones((1, 1) + spatial), "w": np.eye(n).reshape((n, 1) + taps)}, _REF_OPSET)[0]
    if seen.shape[2:] != target.shape[2:]:
        return None
    design = np.hstack([seen.reshape(n, -1).T, np.ones((seen[0, 0].size, 1))])  # [positions, taps + bias]
    solution = np.linalg.lstsq(design, target.reshape(target.shape[1], -1).T, rcond=None)[0]
    # (the maps were evaluated in float32 where a pool ran on onnxruntime: agree to float32 rounding)
    if not np.allclose(design @ solution, target.reshape(target.shape[1], -1).T, rtol=1e-6,
                       atol=1e-6 * np.abs(target).max()):
        return None
    return source, solution[:-1].T.reshape((target.shape[1],) + taps), solution[-1]


def _window_source(g, cg, x: str, slots: list[int]):
    """Walking back from x through elementwise ops (SiLU's x·sigmoid(x) included; operands that are
    uniform constants on these slots, like an SE gate of dead channels, are not followed): the one
    padded per-channel windowed op that made the slots' maps (a depthwise Conv, an AveragePool), or None."""
    found, stack, seen = [], [x], set()
    while stack:
        name = stack.pop()
        p = g.producer(name)
        if name in seen:
            continue
        seen.add(name)
        if p is None or cg.space(name) is None:
            return None
        a = attrs(p)
        if p.op_type == "Conv" and g.is_const(p.input[1]):
            wd = g.inits[p.input[1]]
            if not (wd.ndim == 4 and wd.shape[1] == 1 and int(a.get("group", 1)) > 1 and Conv.padded(p, wd)):
                return None  # (not depthwise: it mixes channels)
            found.append(p)
        elif p.op_type == "AveragePool" and not int(a.get("ceil_mode", 0)) and len(a.get("kernel_shape", [])) == 2:
            found.append(p)
        elif isinstance(rule_for(p), Elementwise):
            stack.extend(i for i in p.input if i and not g.is_const(i) and not _uniform_on(cg, i, slots))
        else:
            return None
    return found[0] if len({id(f) for f in found}) == 1 else None


def _uniform_on(cg, name: str, slots: list[int]) -> bool:
    values, sp = cg.values.get(name), cg.space(name)
    return values is not None and sp is not None and sp.size == values.size and bool(np.all(np.isfinite(values[slots])))


def _insert_bias_map(g, node, bias_map: np.ndarray) -> None:
    """out = layer(x) + map: the exact border correction of padded convolutions."""
    out = node.output[0]
    mid = g.fresh_name(f"{out}_before_border_correction")
    name = g.fresh_name(f"{node.name or out}_border_correction")
    g.inits[name] = bias_map
    g.set_output(node, 0, mid)
    g.insert_after(node, [helper.make_node("Add", [mid, name], [out], name=name)])


def _uniform_or_map(contribution: np.ndarray):
    """[1, C, *spatial] -> (per-channel vector, None) if uniform, else (None, map)."""
    flat = contribution.reshape(contribution.shape[1], -1)
    if np.all(flat.max(axis=1) == flat.min(axis=1)):
        return flat[:, 0].copy(), None
    return None, contribution


def _spatial_static(cg, name) -> bool:
    shape = cg.shape(name)
    return shape is not None and all(d is not None for d in shape[2:])


def _open_layer(rule: Rule, node, cg, out_axes: tuple[int, ...], in_axes: tuple[int, ...]) -> bool:
    """A layer's output opens a new channel space; its input must carry channels on `in_axes`."""
    if cg.new_space(node.output[0], out_axes) is None:
        rule.pin_through(node, cg, f"{node.op_type} {node.name}: unknown output shape")
        return False
    sp_in = cg.space(node.input[0])
    if sp_in is not None and sp_in.axes != in_axes:
        cg.pin_space(sp_in, f"{node.op_type} {node.name}: input channels not on axis {in_axes[0]}")
    return True


class Conv(Rule):
    @staticmethod
    def geometry(g, node):
        w = g.inits[node.input[1]]
        group = int(attrs(node).get("group", 1))
        c_out, c_in_g = w.shape[0], w.shape[1]
        return w, group, c_out // group, c_in_g  # weights, groups, outputs per group, inputs per group

    @staticmethod
    def padded(node, w) -> bool:
        a = attrs(node)
        if all(k == 1 for k in w.shape[2:]):
            return False
        if a.get("auto_pad", b"NOTSET") in (b"SAME_UPPER", b"SAME_LOWER", "SAME_UPPER", "SAME_LOWER"):
            return True
        return any(p != 0 for p in a.get("pads", []))

    def couple(self, node, cg):
        g = cg.g
        if not g.is_const(node.input[1]) or (len(node.input) > 2 and node.input[2] and not g.is_const(node.input[2])):
            return self.pin_through(node, cg, f"Conv {node.name}: weights are not constant initializers "
                                    "(or are graph inputs too, which callers may override)")
        w, group, m, c_in_g = self.geometry(g, node)
        if not _open_layer(self, node, cg, (1,), (1,)):
            return
        sp_out, sp_in = cg.space(node.output[0]), cg.space(node.input[0])
        sp_in = sp_in if sp_in is not None and sp_in.axes == (1,) else None
        if group == 1:
            return
        if c_in_g == 1:  # depthwise: channel c and its m outputs live or die together
            if sp_in is None:
                return cg.pin_space(sp_out, f"Conv {node.name}: depthwise over channels that cannot be tracked")
            cg.unite(np.repeat(sp_in.slots, m), sp_out.slots)
            return
        # grouped: every group shares the weight's column j and row j — remove by group-local index
        for base, per_group in ((sp_in, c_in_g), (sp_out, m)):
            if base is None:
                continue
            local = base.slots.reshape(group, per_group)
            for j in range(per_group):
                cg.unite(local[:, j], np.full(group, local[0, j]))

    def values(self, node, cg):
        sp_out = cg.space(node.output[0])
        if sp_out is None or not cg.g.is_const(node.input[1]):
            return
        w, group, m, c_in_g = self.geometry(cg.g, node)
        b = _bias(cg.g, node, w.shape[0])
        row_zero = all_zero(w, 0)
        vals = np.where(row_zero, b, np.nan)
        cg.values[node.output[0]] = vals
        x = node.input[0]
        if c_in_g == 1 and group > 1 and cg.space(x) is not None:
            known = np.repeat(cg.known(x), m) & ~row_zero
            if known.any():
                try:  # depthwise over known channels: run it (padding turns constants into maps)
                    cg.store(node.output[0], self.run_depthwise(node, cg, known, b), known | row_zero)
                except Exception:
                    pass

    def run_depthwise(self, node, cg, known_out, bias) -> np.ndarray:
        w, group, m, _ = self.geometry(cg.g, node)
        x = node.input[0]
        groups = np.flatnonzero(known_out.reshape(group, m).any(axis=1))
        rows = (groups[:, None] * m + np.arange(m)).reshape(-1)
        a = dict(attrs(node), group=len(groups))
        conv = helper.make_node("Conv", ["x", "w"], ["y"], **a)
        xs = cg.full_values(x)[:, groups]
        res = evaluate(conv, {"x": xs, "w": w[rows].astype(np.float64)}, _REF_OPSET)[0]
        out = np.zeros((1, w.shape[0]) + res.shape[2:])
        out[0, rows] = res[0]
        return out + bias.reshape((1, -1) + (1,) * (out.ndim - 2))

    def reads(self, node, cg):
        sp_in = cg.space(node.input[0])
        if sp_in is None or cg.space(node.output[0]) is None or not cg.g.is_const(node.input[1]):
            return []
        w, group, m, c_in_g = self.geometry(cg.g, node)
        if sp_in.axes != (1,) or sp_in.size != group * c_in_g:
            return []
        if group > 1 and c_in_g == 1:
            return []  # depthwise: inside the class, not a read
        col_zero = all_zero(w.reshape(group, m, c_in_g, -1), (0, 2)).reshape(-1)
        exact_anywhere = not self.padded(node, w) or _spatial_static(cg, node.input[0]) or default_opset(cg.g.model) >= 15
        return _reads(node, cg, col_zero, exact_anywhere,  # padded: a border map, made at run time
                      "zero-padded conv with dynamic spatial size (below opset 15: no Shape start)")

    def absorb(self, node, g, cg, items):
        w, group, m, c_in_g = self.geometry(g, node)
        w_new = w.copy()
        for k, _ in items:
            grp, j = divmod(k, c_in_g)
            w_new[grp * m:(grp + 1) * m, j] = 0
        g.set_input_const(node, 1, w_new)
        items = _nonzero(items)  # a constant 0 contributes nothing, padded or not
        if not items:
            return
        scalars = all(np.isscalar(v) for _, v in items)
        if not self.padded(node, w) and scalars:
            vec, bias_map = self.constant_kernel(w, group, items).reshape(w.shape[0], -1).sum(axis=1), None
        elif not _spatial_static(cg, node.input[0]):  # (scalars: maps exist only at static sizes)
            return _insert_border_map(g, node, self.constant_kernel(w, group, items), w.dtype)
        else:
            vec, bias_map = _uniform_or_map(self.contribution(node, cg, w, items))
        runtime = bias_map is not None and default_opset(g.model) >= 9  # (Sign: opset 9)
        if runtime and scalars:  # (grouped layers too: passes/border_maps.py decides at the end)
            return _insert_border_map(g, node, self.constant_kernel(w, group, items), w.dtype)
        if runtime and w.shape[2:] == (1,) * (w.ndim - 2) and all(s == 1 for s in attrs(node).get("strides", [1])):
            fitted = fitted_border(g, cg, node, items, bias_map)
            if fitted is not None:
                source, kernel, bias = fitted
                _write_bias(g, node, _bias(g, node, w.shape[0]) + bias, w.dtype)
                return _insert_border_map(g, node, kernel, w.dtype, geometry=source)
        _add_contribution(g, node, vec, bias_map, w.dtype)

    @staticmethod
    def constant_kernel(w, group, items) -> np.ndarray:
        """sum_j c_j W[o, j] per output row o over its own group's absorbed inputs j (float64,
        [C_out, k...]): what scalar constants c_j add is this kernel applied to an image of ones."""
        c_in_g, m = w.shape[1], w.shape[0] // group
        kernel = np.zeros((w.shape[0],) + w.shape[2:])
        for k, v in items:
            grp, j = divmod(k, c_in_g)
            kernel[grp * m:(grp + 1) * m] += v * w[grp * m:(grp + 1) * m, j].astype(np.float64)
        return kernel

    @staticmethod
    def contribution(node, cg, w, items) -> np.ndarray:
        """Exactly what the absorbed input channels add to the output: the conv run on them alone."""
        x = node.input[0]
        group = int(attrs(node).get("group", 1))
        spatial = tuple(cg.shape(x)[2:])
        cols = [k for k, _ in items]
        if all(np.isscalar(v) for _, v in items):  # one input channel of ones, whatever the groups
            conv = helper.make_node("Conv", ["x", "w"], ["y"], **{**attrs(node), "group": 1})
            kernel = Conv.constant_kernel(w, group, items)[:, None]
            return evaluate(conv, {"x": np.ones((1, 1) + spatial), "w": kernel}, _REF_OPSET)[0]
        if group == 1:  # only the absorbed columns matter
            xs = np.zeros((1, len(cols)) + spatial)
            ws = w[:, cols].astype(np.float64)
            for i, (_, v) in enumerate(items):
                xs[0, i] = v if np.isscalar(v) else v[0]
        else:
            c_in_g = w.shape[1]
            m = w.shape[0] // group
            xs = np.zeros((1, group * c_in_g) + spatial)
            ws = np.zeros(w.shape)
            for k, v in items:
                grp, j = divmod(k, c_in_g)
                xs[0, k] = v if np.isscalar(v) else v[0]
                ws[grp * m:(grp + 1) * m, j] = w[grp * m:(grp + 1) * m, j]
        conv = helper.make_node("Conv", ["x", "w"], ["y"], **attrs(node))
        return evaluate(conv, {"x": xs, "w": ws}, _REF_OPSET)[0]

    def rewrite(self, node, g, cg, keep):
        w, group, m, c_in_g = self.geometry(g, node)
        ko, ki = keep.get(node.output[0]), keep.get(node.input[0])
        if ko is None and ki is None:
            return
        b = _bias(g, node, w.shape[0]) if len(node.input) > 2 and node.input[2] else None
        if ko is not None and b is not None:
            b = b[ko]
        cols = None
        if ki is not None:
            if group == 1:
                cols = ki
            elif c_in_g == 1:
                set_attr(node, "group", len(ki))
            else:
                cols = ki[ki < c_in_g]
        w = _take(w, {0: ko, 1: cols})
        g.set_input_const(node, 1, w)
        if b is not None:
            _write_bias(g, node, b, w.dtype)


def _reads(node, cg, zero, exact_anywhere: bool, why_not: str, maps_ok: bool = True) -> list[ReadBlock]:
    """The reads of the layer's input slots; `zero`: its weight column is all zero. A known
    constant is absorbable when it is 0 or the layer adds it the same everywhere (`exact_anywhere`);
    a map only where the layer can add maps (`maps_ok`)."""
    x = node.input[0]
    values, maps = cg.values[x], cg.maps.get(x, {})
    known = ~np.isnan(values)
    absorbable = known & ((values == 0) | exact_anywhere)
    why = np.where(known, why_not, "").astype(object)
    if maps:
        on_map = np.fromiter(maps, np.int64)
        absorbable[on_map], why[on_map] = maps_ok, f"{node.op_type} cannot absorb an input-independent map"
    why[absorbable] = ""
    return [ReadBlock(node.name, x, np.asarray(zero, bool), absorbable, why)]


def _nonzero(items):
    return [(k, v) for k, v in items if not (np.isscalar(v) and v == 0)]


def _add_contribution(g, node, vec, bias_map, dtype) -> None:
    if vec is not None:
        n_out = len(vec)
        _write_bias(g, node, _bias(g, node, n_out) + vec, dtype)
    else:
        _insert_bias_map(g, node, bias_map.astype(dtype))


class ConvTranspose(Rule):
    """Group-1 ConvTranspose: W is [C_in, C_out, k...]; rows read inputs, columns own outputs."""

    def couple(self, node, cg):
        g = cg.g
        ok = g.is_const(node.input[1]) and (len(node.input) < 3 or not node.input[2] or g.is_const(node.input[2]))
        if not ok or int(attrs(node).get("group", 1)) != 1:
            return self.pin_through(node, cg, f"ConvTranspose {node.name}: grouped or non-constant weights")
        _open_layer(self, node, cg, (1,), (1,))

    def values(self, node, cg):
        if cg.space(node.output[0]) is None:
            return
        w = cg.g.inits[node.input[1]]
        col_zero = all_zero(w, 1)
        cg.values[node.output[0]] = np.where(col_zero, _bias(cg.g, node, w.shape[1]), np.nan)

    def reads(self, node, cg):
        sp_in = cg.space(node.input[0])
        if sp_in is None or cg.space(node.output[0]) is None:  # no output space: weights not constant
            return []
        w = cg.g.inits[node.input[1]]
        if sp_in.axes != (1,) or sp_in.size != w.shape[0]:
            return []
        return _reads(node, cg, all_zero(w, 0), _spatial_static(cg, node.input[0]), "ConvTranspose with dynamic spatial size")

    def absorb(self, node, g, cg, items):
        w = g.inits[node.input[1]]
        w_new = w.copy()
        w_new[[k for k, _ in items]] = 0
        g.set_input_const(node, 1, w_new)
        items = _nonzero(items)
        if not items:
            return
        cols = [k for k, _ in items]
        xs = np.zeros((1, len(cols)) + tuple(cg.shape(node.input[0])[2:]))
        for i, (_, v) in enumerate(items):
            xs[0, i] = v if np.isscalar(v) else v[0]
        convt = helper.make_node("ConvTranspose", ["x", "w"], ["y"], **attrs(node))
        vec, bias_map = _uniform_or_map(evaluate(convt, {"x": xs, "w": w[cols].astype(np.float64)}, _REF_OPSET)[0])
        _add_contribution(g, node, vec, bias_map, w.dtype)

    def rewrite(self, node, g, cg, keep):
        ko, ki = keep.get(node.output[0]), keep.get(node.input[0])
        if ko is None and ki is None:
            return
        w = g.inits[node.input[1]]
        b = _bias(g, node, w.shape[1]) if len(node.input) > 2 and node.input[2] else None
        if ko is not None and b is not None:
            b = b[ko]
        w = _take(w, {0: ki, 1: ko})
        g.set_input_const(node, 1, w)
        if b is not None:
            _write_bias(g, node, b, w.dtype)


class Gemm(Rule):
    """Y = alpha·A·op(B) + beta·C with A [N, F] carrying channels on axis 1."""

    @staticmethod
    def weights_in_out(g, node) -> np.ndarray:
        b = g.inits[node.input[1]]
        return b.T if int(attrs(node).get("transB", 0)) else b  # [F_in, F_out] view

    def couple(self, node, cg):
        g = cg.g
        a = attrs(node)
        ok = g.is_const(node.input[1]) and g.inits[node.input[1]].ndim == 2
        ok &= len(node.input) < 3 or not node.input[2] or g.is_const(node.input[2])
        if not ok or int(a.get("transA", 0)) or g.is_const(node.input[0]):
            return self.pin_through(node, cg, f"Gemm {node.name}: transposed A or non-constant weights")
        _open_layer(self, node, cg, (1,), (1,))

    def values(self, node, cg):
        if cg.space(node.output[0]) is None:
            return
        w = self.weights_in_out(cg.g, node)
        beta = float(attrs(node).get("beta", 1.0))
        col_zero = all_zero(w, 1)
        cg.values[node.output[0]] = np.where(col_zero, beta * _bias(cg.g, node, w.shape[1]), np.nan)

    def reads(self, node, cg):
        sp_in = cg.space(node.input[0])
        if sp_in is None or cg.space(node.output[0]) is None:  # no output space: weights not constant
            return []
        w = self.weights_in_out(cg.g, node)
        if sp_in.axes != (1,) or sp_in.size != w.shape[0]:
            return []
        return _reads(node, cg, all_zero(w, 0), True, "", maps_ok=False)

    def absorb(self, node, g, cg, items):
        a = attrs(node)
        b = g.inits[node.input[1]]
        alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
        b_new, vec = _zero_inputs(b, input_axis(node), items)
        c = _bias(g, node, b.shape[output_axis(node)])
        if beta == 0:
            c, beta = np.zeros_like(c), 1.0
            set_attr(node, "beta", 1.0)
        g.set_input_const(node, 1, b_new)
        _write_bias(g, node, c + alpha * vec / beta, b.dtype)

    def rewrite(self, node, g, cg, keep):
        ko, ki = keep.get(node.output[0]), keep.get(node.input[0])
        if ko is None and ki is None:
            return
        if ko is not None:
            c = g.const(node.input[2]) if len(node.input) > 2 else None
            if c is not None and c.size == g.inits[node.input[1]].shape[output_axis(node)] > 1:  # a scalar C broadcasts: leave it
                g.set_input_const(node, 2, c.reshape(-1)[ko])
        g.set_input_const(node, 1, _take(g.inits[node.input[1]], {output_axis(node): ko, input_axis(node): ki}))


class MatMul(Rule):
    """A [..., F] @ W [F, K] with a constant 2-D W: channels on A's last axis. A product of two
    activations is an ActivationProduct."""

    @staticmethod
    def linear(node, cg) -> bool:
        a, w = node.input
        return not cg.g.is_const(a) and cg.g.is_const(w) and cg.g.inits[w].ndim == 2

    def couple(self, node, cg):
        if not any(n in cg.g.inits for n in node.input):  # two computed tensors (an overridable initializer is a weight)
            return ActivationProduct.couple(node, cg)
        rank = cg.rank(node.input[0])
        if not self.linear(node, cg) or rank is None:
            return self.pin_through(node, cg, f"MatMul {node.name}: not activations × constant matrix")
        _open_layer(self, node, cg, (rank - 1,), (rank - 1,))

    def values(self, node, cg):
        if not any(n in cg.g.inits for n in node.input):
            return ActivationProduct.values(node, cg)
        if cg.space(node.output[0]) is None or not self.linear(node, cg):
            return
        w = cg.g.inits[node.input[1]]
        cg.values[node.output[0]] = np.where(all_zero(w, 1), 0.0, np.nan)

    def reads(self, node, cg):
        a = node.input[0]
        sp_in = cg.space(a)
        if sp_in is None or cg.space(node.output[0]) is None or not self.linear(node, cg):
            return []
        w = cg.g.inits[node.input[1]]
        if sp_in.axes != (cg.rank(a) - 1,) or sp_in.size != w.shape[0]:
            return []
        return _reads(node, cg, all_zero(w, 0), True, "", maps_ok=False)

    def absorb(self, node, g, cg, items):
        w = g.inits[node.input[1]]
        w_new, vec = _zero_inputs(w, 0, items)
        g.set_input_const(node, 1, w_new)
        if not vec.any():  # constant zeros (silu(0)·up, an all-zero embedding column) add nothing
            return
        out = node.output[0]
        users = g.consumers().get(out, [])
        if len(users) == 1 and users[0].op_type == "Add" and out not in g.output_names:
            add = users[0]
            i = 1 - list(add.input).index(out)
            c = g.const(add.input[i])
            if c is not None and c.size == w.shape[1] and c.shape[-1] == w.shape[1]:
                g.set_input_const(add, i, (c.astype(np.float64) + vec.reshape(c.shape)).astype(c.dtype))
                return
        mid = g.fresh_name(f"{out}_before_bias")
        name = g.fresh_name(f"{node.name or out}_absorbed_bias")
        g.inits[name] = vec.astype(w.dtype)
        g.set_output(node, 0, mid)
        g.insert_after(node, [helper.make_node("Add", [mid, name], [out], name=name)])

    def rewrite(self, node, g, cg, keep):
        ko, ki = keep.get(node.output[0]), keep.get(node.input[0])
        if (ko is None and ki is None) or not self.linear(node, cg):
            return
        g.set_input_const(node, 1, _take(g.inits[node.input[1]], {0: ki, 1: ko}))


def _take(w: np.ndarray, index: dict[int, np.ndarray | None]) -> np.ndarray:
    """`w` keeping only the given indices along some axes (None: all), in one contiguous copy."""
    picks = [index.get(a, index.get(a - w.ndim)) for a in range(w.ndim)]
    if all(p is None for p in picks):
        return w
    return np.ascontiguousarray(w[np.ix_(*[np.arange(n) if p is None else p for n, p in zip(w.shape, picks)])])


def _zero_inputs(w: np.ndarray, axis: int, items) -> tuple[np.ndarray, np.ndarray]:
    """Zero the input channels `items` ((index, scalar constant) pairs) along `axis` of a 2-D
    weight; returns the new weight and what the constants contributed, sum_k c_k w[k] (float64)."""
    cols = np.array([k for k, _ in items], np.int64)
    vals = np.array([v for _, v in items], np.float64)
    vec = np.tensordot(vals, np.take(w, cols, axis=axis).astype(np.float64), axes=([0], [axis]))
    w_new = w.copy()
    w_new[(slice(None),) * (axis % w.ndim) + (cols,)] = 0
    return w_new, vec


register_rule("Conv", Conv(), permute=True)
register_rule("ConvTranspose", ConvTranspose(), permute=True)
register_rule("Gemm", Gemm(), permute=True)
register_rule("MatMul", MatMul(), permute=True)
