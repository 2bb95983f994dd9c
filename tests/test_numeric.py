"""channels/numeric computes what the ONNX reference evaluator (pools: onnxruntime) computes, on
the cases it covers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from onnx import helper
from onnx.reference import ReferenceEvaluator

from onnxprune.channels import numeric

OPSET = [helper.make_opsetid("", 17)]


def reference(node, feeds):
    from onnx import TensorProto

    inputs = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for k, v in feeds.items()]
    outputs = [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in node.output]
    model = helper.make_model(helper.make_graph([node], "t", inputs, outputs), opset_imports=OPSET)
    return ReferenceEvaluator(model).run(None, feeds)


CONVS = list(itertools.product(
    [(1, 6, 9), (1, 6, 7, 8), (2, 6, 5, 6, 7)],   # 1-D, 2-D, 3-D inputs (batch 1 and 2)
    [1, 2, 6],                                   # groups: plain, grouped, depthwise
    [1, 2],                                      # stride
    [1, 2],                                      # dilation
    ["zero", "asymmetric", "valid"],             # padding
))


@pytest.mark.parametrize("shape,group,stride,dilation,padding", CONVS)
def test_conv_matches_the_reference_evaluator(shape, group, stride, dilation, padding):
    rng = np.random.default_rng(len(shape) * 100 + group * 10 + stride + dilation)
    d = len(shape) - 2
    x = rng.standard_normal(shape)
    w = rng.standard_normal((4 * (group if group > 1 else 1) if group != 6 else 6, shape[1] // group) + (3,) * d)
    kwargs = {"strides": [stride] * d, "dilations": [dilation] * d, "group": group}
    if padding == "zero":
        kwargs["pads"] = [1] * 2 * d
    elif padding == "asymmetric":
        kwargs["pads"] = [0] * d + [2] * d
    else:
        kwargs["auto_pad"] = "VALID"
    node = helper.make_node("Conv", ["x", "w"], ["y"], **kwargs)
    got = numeric.conv(node, x, w)
    want = reference(node, {"x": x, "w": w})[0]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_conv_with_bias_through_run_and_same_padding_is_left_to_the_reference():
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((1, 3, 5, 5)), rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1])
    np.testing.assert_allclose(numeric.run(node, {"x": x, "w": w, "b": b})[0],
                               reference(node, {"x": x, "w": w, "b": b})[0], rtol=1e-12, atol=1e-12)
    same = helper.make_node("Conv", ["x", "w"], ["y"], auto_pad="SAME_UPPER")
    assert numeric.run(same, {"x": x, "w": w}) is None


@pytest.mark.parametrize("op", ["Relu", "Neg", "Abs", "Identity", "Sigmoid", "Tanh", "Add", "Sub", "Mul", "Div", "Max", "Min"])
def test_elementwise_matches_the_reference_evaluator(op):
    rng = np.random.default_rng(1)
    feeds = {"a": rng.standard_normal((1, 4, 3, 3)) * 5, "b": rng.standard_normal((4, 1, 1)) + 3}
    names = ["a"] if op in numeric._UNARY else ["a", "b"]
    node = helper.make_node(op, names, ["y"])
    feeds = {n: feeds[n] for n in names}
    got = numeric.run(node, feeds)[0]
    want = reference(node, feeds)[0]
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=1e-14, atol=1e-300)


@pytest.mark.parametrize("bounds", [("lo", "hi"), ("lo", ""), ("", "hi"), ("hi", "lo")])
def test_clip_matches_the_reference_evaluator(bounds):
    feeds = {"x": np.linspace(-8, 8, 24).reshape(1, 2, 3, 4), "lo": np.array(-1.5), "hi": np.array(6.0)}
    node = helper.make_node("Clip", ["x", *bounds], ["y"])
    used = {n: feeds[n] for n in ("x", *bounds) if n}
    got, want = numeric.run(node, used)[0], reference(node, used)[0]
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


def test_what_it_does_not_cover_is_left_to_the_reference():
    f = {"a": np.arange(4.0).reshape(1, 4), "i": np.arange(4).reshape(1, 4)}
    assert numeric.run(helper.make_node("Div", ["i", "i"], ["y"]), f) is None            # integer division
    assert numeric.run(helper.make_node("LeakyRelu", ["a"], ["y"], alpha=0.1), f) is None  # not in the table
    assert numeric.run(helper.make_node("Relu", ["missing"], ["y"]), f) is None


POOLS = list(itertools.product(
    ["MaxPool", "AveragePool"],
    [(1, 3, 9), (1, 3, 7, 8), (2, 2, 5, 6, 7)],
    [2, 3],                                            # kernel
    [1, 2],                                            # stride
    ["none", "symmetric", "asymmetric", "valid"],
    [0, 1],                                            # count_include_pad (AveragePool)
))


@pytest.mark.parametrize("op,shape,kernel,stride,padding,include_pad", POOLS)
def test_pools_match_the_reference_evaluator(op, shape, kernel, stride, padding, include_pad):
    if op == "MaxPool" and include_pad:
        pytest.skip("count_include_pad is an AveragePool attribute")
    d = len(shape) - 2
    x = np.random.default_rng(kernel * 10 + stride).standard_normal(shape).astype(np.float32)
    kwargs = {"kernel_shape": [kernel] * d, "strides": [stride] * d}
    if padding == "symmetric":
        kwargs["pads"] = [1] * 2 * d
    elif padding == "asymmetric":
        kwargs["pads"] = [0] * d + [1] * d
    elif padding == "valid":
        kwargs["auto_pad"] = "VALID"
    if op == "AveragePool":
        kwargs["count_include_pad"] = include_pad
    node = helper.make_node(op, ["x"], ["y"], **kwargs)
    got, want = numeric.run(node, {"x": x})[0], onnxruntime_run(node, x)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def onnxruntime_run(node, x):
    """Pools against onnxruntime (what the parity check runs; the reference evaluator's MaxPool
    mis-sizes asymmetric and some symmetric pads)."""
    from onnx import TensorProto

    from onnxprune.parity import run, session

    model = helper.make_model(helper.make_graph(
        [node], "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]), opset_imports=OPSET, ir_version=10)
    return run(session(model), {"x": x})[0]


def test_pools_it_does_not_cover_are_left_to_the_reference():
    x = {"x": np.zeros((1, 2, 5, 5), np.float32)}
    assert numeric.run(helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], ceil_mode=1), x) is None
    assert numeric.run(helper.make_node("MaxPool", ["x"], ["y", "i"], kernel_shape=[2, 2]), x) is None
    assert numeric.run(helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], auto_pad="SAME_UPPER"), x) is None
