"""Where each border map (channels/linear.py) ends up, once the shrink fixed point is done: the
border maps of grouped layers that onnxruntime will not block, and with --border-maps constant all
of them, become constants — their ones image is made a constant and cleanup folds the map's Conv
into a constant added to the layer's output.

onnxruntime blocks (NCHWc) a grouped conv only when its width and every group's input and output
width are multiples of its block (16 channels on AVX-512): a blocked map added to an unblocked conv
costs reorders (RegNet, 24-wide groups: 33 reorders against 27 with constant maps), while blocked
grouped layers fuse the map like any other (ResNeXt past its first stage: 4 reorders against 11).
Also here: `border_site`, which finds the layer a border map belongs to (host_border_maps uses it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ..channels.linear import WINDOW, is_ones
from ..graph import Graph, attrs
from .base import Context

PASS = "border_maps"
BLOCK = 16  # onnxruntime's NCHWc block on AVX-512 (8 on AVX2: a multiple of 16 suits both)


@dataclass
class Site:
    border: onnx.NodeProto  # Conv(ones, K)
    add: onnx.NodeProto     # layer + border, or border + r (reassociated into the residual `outer`)
    layer: onnx.NodeProto   # the conv whose geometry the map has
    outer: onnx.NodeProto | None = None  # layer + (border + r)


def place_border_maps(g: Graph, ctx: Context) -> bool:
    placed = False
    for node in g.nodes:
        if node.op_type != "Conv" or not is_ones(g.producer, node.input[0]):
            continue
        shape = g.shapes.get(node.input[0])
        if shape is None or any(d is None for d in shape):
            continue  # (a symbolic size: the map can only be made at run time)
        site = border_site(g, node, grouped=True)
        grouped = site is not None and int(attrs(site.layer).get("group", 1)) > 1
        if ctx.border_maps == "constant" or (grouped and not _blocked(g, site.layer)):
            g.set_input_const(node, 0, np.ones(shape, g.inits[node.input[1]].dtype), base=f"{node.name}_ones")
            ctx.log(PASS, "constant", node.name, "border map folded into a constant")
            placed = True
    return placed


def _blocked(g: Graph, layer) -> bool:
    w = g.inits[layer.input[1]]
    group = int(attrs(layer).get("group", 1))
    return w.shape[0] % BLOCK == 0 and (w.shape[0] // group) % BLOCK == 0 and w.shape[1] % BLOCK == 0


def border_site(g: Graph, node, grouped: bool = False) -> Site | None:
    """`node` as a border conv added to the output of a layer with its geometry (directly, or
    reassociated into a residual); group-1 layers only unless `grouped`."""
    users = g.consumers().get(node.output[0], [])
    if node.op_type != "Conv" or not is_ones(g.producer, node.input[0]) or len(users) != 1 or g.uses(node.output[0]) != 1:
        return None
    (add,) = users
    if add.op_type != "Add" or len(set(add.input)) != 2:
        return None
    other = next(i for i in add.input if i != node.output[0])
    layer = _layer_of(g, node, other, grouped)
    if layer is not None:
        return Site(node, add, layer)
    users = g.consumers().get(add.output[0], [])
    if len(users) != 1 or g.uses(add.output[0]) != 1 or users[0].op_type != "Add" or len(set(users[0].input)) != 2:
        return None
    outer = users[0]
    layer = _layer_of(g, node, next(i for i in outer.input if i != add.output[0]), grouped)
    return Site(node, add, layer, outer) if layer is not None else None


def _layer_of(g: Graph, border, name: str, grouped: bool):
    """The Conv writing `name` (read once) with the border conv's geometry, or None."""
    layer = g.producer(name)
    if layer is None or layer.op_type != "Conv" or g.uses(name) != 1 or (int(attrs(layer).get("group", 1)) != 1
                                                                          and not grouped):
        return None
    if not g.is_const(layer.input[1]) or is_ones(g.producer, layer.input[0]):
        return None
    a, b = attrs(layer), attrs(border)
    if any(a.get(k) != b.get(k) for k in WINDOW) or g.inits[layer.input[1]].shape[2:] != g.inits[border.input[1]].shape[2:]:
        return None  # (the kernel size from the weights: a layer may omit kernel_shape)
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
