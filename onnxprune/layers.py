"""One geometry per linear op (Conv, ConvTranspose, Gemm, MatMul with a constant weight): which
weight axis holds the output and the input channels, the filters view, channel counts and MACs.
Everything outside the channel rules that needs to know "what is a layer" asks here."""

from __future__ import annotations

import numpy as np
import onnx

from .graph import attrs

LINEAR_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def is_linear(node: onnx.NodeProto) -> bool:
    return node.op_type in LINEAR_OPS and node.domain in ("", "ai.onnx") and len(node.input) > 1


# (output axis, input axis) of each op's weight; Gemm's depend on transB
_WEIGHT_AXES = {"Conv": (0, 1), "ConvTranspose": (1, 0), "MatMul": (-1, -2)}


def _weight_axes(node: onnx.NodeProto) -> tuple[int, int]:
    if node.op_type == "Gemm":
        return (0, 1) if int(attrs(node).get("transB", 0)) else (1, 0)
    return _WEIGHT_AXES.get(node.op_type, (0, 1))


def output_axis(node: onnx.NodeProto) -> int:
    """The weight axis indexed by output channel (per group for grouped ConvTranspose)."""
    return _weight_axes(node)[0]


def input_axis(node: onnx.NodeProto) -> int:
    """The weight axis indexed by input channel (per group for grouped Conv)."""
    return _weight_axes(node)[1]


def filters(w: np.ndarray, node: onnx.NodeProto) -> np.ndarray:
    """The weights with one output channel per row: [C_out, ...] (a view, not a copy)."""
    return np.moveaxis(w, output_axis(node), 0)


def all_zero(w: np.ndarray, axes) -> np.ndarray:
    """Per index over `axes` (an int or a tuple): are all of `w`'s entries there exactly 0? (-0.0 is
    zero, NaN is not.) `w != 0` is a third of the cost of the |w|.max() it replaces, on every build."""
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    return ~np.any(w != 0, axis=tuple(i for i in range(w.ndim) if i not in axes))


def io_channels(node: onnx.NodeProto, w: tuple | list) -> tuple[int, int]:
    """(input channels, output channels) of the layer, groups included."""
    group = int(attrs(node).get("group", 1)) if node.op_type in ("Conv", "ConvTranspose") else 1
    out, inp = w[output_axis(node)], w[input_axis(node)]
    if node.op_type == "Conv":
        return inp * group, out
    if node.op_type == "ConvTranspose":
        return inp, out * group
    return inp, out


def macs(node: onnx.NodeProto, shapes: dict, w: tuple | list) -> int:
    """Multiply-accumulates per input item (a dynamic batch counts as 1); 0 when a shape is unknown."""
    if node.op_type == "ConvTranspose":  # every input element meets C_out/g · k... weights
        inp = _per_item(shapes.get(node.input[0]))
        return int(np.prod(inp)) * w[1] * int(np.prod(w[2:])) if _static(inp) else 0
    out = _per_item(shapes.get(node.output[0]))
    if not _static(out):
        return 0
    if node.op_type == "Conv":
        return int(np.prod(out)) * w[1] * int(np.prod(w[2:]))
    return int(np.prod(out)) * w[input_axis(node)]


def _per_item(shape):
    return None if shape is None else tuple(1 if d is None and i == 0 else d for i, d in enumerate(shape))


def _static(shape) -> bool:
    return shape is not None and all(d is not None for d in shape)
