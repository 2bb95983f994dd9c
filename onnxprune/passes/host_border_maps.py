"""Host each border map in a dead channel that stays anyway: no map conv, no Add, exact at any size.

A border map is Conv(ones, K) with a layer's geometry, added to that layer's output
(channels/linear.py). If the layer's input still has a channel h that carries a known non-zero
constant c_h and that the layer does not read (a dead channel kept for --align, or one that could
not go), then giving the layer the column K / c_h for h adds c_h·conv_pad(1, K / c_h) =
conv_pad(1, K): the same map, made by the layer's own zero padding. The map conv, its ones image
and the Add go; the spared channel, computed anyway, now does the work. Runs once, after the
shrink fixed point (a channel that hosts is read again, so it cannot also be judged removable).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ..channels.linear import is_ones
from ..graph import Graph, attrs
from ..layers import all_zero
from .base import Context

PASS = "host_border_maps"
GEOMETRY = ("pads", "strides", "dilations", "auto_pad", "kernel_shape")


@dataclass
class Site:
    border: onnx.NodeProto  # Conv(ones, K)
    add: onnx.NodeProto     # layer + border, or border + r (reassociated into the residual `outer`)
    layer: onnx.NodeProto   # the conv whose geometry the map has
    outer: onnx.NodeProto | None = None  # layer + (border + r)


def host_border_maps(g: Graph, ctx: Context) -> bool:
    sites = [s for s in map(lambda n: _site(g, n), g.nodes) if s is not None]
    if not sites:
        return False
    cg = g.channel_graph(ctx.pins)
    hosted = False
    for site in sites:
        host = _host(g, cg, site.layer)
        if host is None:
            continue
        h, c = host
        w = g.inits[site.layer.input[1]]
        column = (g.inits[site.border.input[1]][:, 0].astype(np.float64) / c).astype(w.dtype)
        if not np.all(np.isfinite(column)):
            continue
        w = w.copy()
        w[:, h] = column
        g.set_input_const(site.layer, 1, w)
        _drop(g, site)
        ctx.log(PASS, "host", site.layer.name, f"border map carried by dead channel {h} of {site.layer.input[0]} "
                f"(constant {c:.4g})")
        hosted = True
    return hosted


def _site(g: Graph, node) -> Site | None:
    """`node` as a border conv added to a layer's output (directly, or reassociated into a residual)."""
    users = g.consumers().get(node.output[0], [])
    if node.op_type != "Conv" or not is_ones(g.producer, node.input[0]) or len(users) != 1 or g.uses(node.output[0]) != 1:
        return None
    (add,) = users
    if add.op_type != "Add" or len(set(add.input)) != 2:
        return None
    other = next(i for i in add.input if i != node.output[0])
    layer = _layer_of(g, node, other)
    if layer is not None:
        return Site(node, add, layer)
    users = g.consumers().get(add.output[0], [])
    if len(users) != 1 or g.uses(add.output[0]) != 1 or users[0].op_type != "Add" or len(set(users[0].input)) != 2:
        return None
    outer = users[0]
    layer = _layer_of(g, node, next(i for i in outer.input if i != add.output[0]))
    return Site(node, add, layer, outer) if layer is not None else None


def _layer_of(g: Graph, border, name: str):
    """The group-1 Conv writing `name` (read once) with the border conv's geometry, or None."""
    layer = g.producer(name)
    if layer is None or layer.op_type != "Conv" or g.uses(name) != 1 or int(attrs(layer).get("group", 1)) != 1:
        return None
    if not g.is_const(layer.input[1]) or is_ones(g.producer, layer.input[0]):
        return None
    a, b = attrs(layer), attrs(border)
    if any(a.get(k) != b.get(k) for k in GEOMETRY):
        return None
    if g.inits[layer.input[1]].shape[2:] != g.inits[border.input[1]].shape[2:]:
        return None
    shape, ones = g.shapes.get(layer.input[0]), g.shapes.get(border.input[0])
    if shape is None or ones is None or shape[2:] != ones[2:]:
        return None
    if any(d is None for d in shape[2:]) and not _ones_of(g, border.input[0], layer.input[0]):
        return None
    return layer


def _ones_of(g: Graph, ones: str, x: str) -> bool:
    """`ones` is ConstantOfShape(Concat([1, 1], Shape(x, start=2))): the size of x, whatever it is."""
    c = g.producer(ones)
    concat = g.producer(c.input[0]) if c is not None and c.op_type == "ConstantOfShape" else None
    if concat is None or concat.op_type != "Concat" or len(concat.input) != 2:
        return False
    shape = g.producer(concat.input[1])
    return (shape is not None and shape.op_type == "Shape" and shape.input[0] == x
            and int(attrs(shape).get("start", 0)) == 2 and "end" not in attrs(shape)
            and np.array_equal(g.const(concat.input[0]), [1, 1]))


def _host(g: Graph, cg, layer) -> tuple[int, float] | None:
    """The layer's unread input channel with the largest known non-zero constant, or None."""
    x = layer.input[0]
    sp = cg.space(x)
    if sp is None or sp.axes != (1,):
        return None
    values = cg.values[x]
    unread = all_zero(g.inits[layer.input[1]], 1)  # per input channel: its column is all zero
    candidates = np.flatnonzero(np.isfinite(values) & (values != 0) & unread)
    if not candidates.size:
        return None
    h = int(candidates[np.argmax(np.abs(values[candidates]))])
    return h, float(values[h])


def _drop(g: Graph, site: Site) -> None:
    """Remove the border conv and its Add: the layer's output (or r) takes the Add's place."""
    kept = next(i for i in site.add.input if i != site.border.output[0])
    g.remove_node(site.add)
    g.remove_node(site.border)
    if site.outer is None:
        g.set_output(site.layer, 0, site.add.output[0])  # the layer writes what the Add wrote
    else:
        g.set_input(site.outer, list(site.outer.input).index(site.add.output[0]), kept)
