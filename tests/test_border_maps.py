"""Border maps: what constant channels read by a zero-padded conv add near the border.

A constant channel c_j read through W[:, j] by a padded conv adds c_j·W[:, j] inside and less at the
border, where the padding reads 0. simplify writes the whole effect as one Conv with the kernel
K = sum_j c_j W[:, j] over a ones image made at run time (channels/linear.py says why), or, with
border_maps="constant", as a constant map. These tests check the kernel against the formula, the
graph shapes onnxruntime needs to fuse it, and the function against the unmodified model.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxprune import OnnxPruneError, simplify
from .onnx_builders import (GraphBuilder, assert_same_function, border_convs, exact_counts, inits_of, node_by_name,
                            ones_images, weight_count)

ATOL, RTOL = 1e-5, 1e-4
EXACT = exact_counts()


def simplified(model, **options):
    out, report = simplify(model, atol=ATOL, rtol=RTOL, **{**EXACT, **options})
    assert_same_function(model, out, atol=ATOL, rtol=RTOL)
    return out, report


def border_kernels(model) -> list[np.ndarray]:
    inits, ones = inits_of(model), ones_images(model)
    return [inits[n.input[1]] for n in model.graph.node if n.op_type == "Conv" and n.input[0] in ones]


def two_convs(biases, zeroed, *, hw=(7, 7), k=3, seed=0, **geometry):
    """c1 (1×1, these biases) → Relu → c2 (k×k, padded by `geometry`, default pads 1), c1's rows
    `zeroed` zeroed: those channels carry relu(bias)."""
    b = GraphBuilder(3, *hw, seed=seed)
    b.conv(len(biases), 1, name="c1", b=np.asarray(biases, np.float32))
    b.act("Relu")
    b.conv(4, k, name="c2", **({"pads": 1} | geometry))
    for row in zeroed:
        b.zero_filter("c1", row)
    return b


@pytest.mark.parametrize("biases,zeroed", [
    ([0.5, 1.5, -0.3, 0.8, 0.2], [1]),                   # one constant
    ([0.5, 1.5, 2.0, -0.8, 0.7, 0.3], [1, 2, 4]),        # several into one kernel
    ([0.5, -1.5, 0.9, 1e-30, 0.3], [1, 3]),              # a negative (relu: 0, adds nothing) and a tiny one
])
def test_the_border_kernel_is_the_sum_of_the_constant_columns(biases, zeroed):
    b = two_convs(biases, zeroed)
    w2 = b.inits[b.layers["c2"]["weight"]].astype(np.float64)
    out, rep = simplified(b.model())
    assert rep.after.layers["c2"][0] == len(biases) - len(zeroed)
    constants = {j: max(biases[j], 0.0) for j in zeroed}
    kernels = border_kernels(out)
    if not any(constants.values()):
        assert kernels == []
        return
    assert len(kernels) == 1 and kernels[0].shape == (4, 1, 3, 3)
    assert rep.after.border_maps == 1 and set(rep.after.layers) == {"c1", "c2"}  # (not a layer)
    expected = sum(c * w2[:, j] for j, c in constants.items())
    np.testing.assert_allclose(kernels[0][:, 0], expected, rtol=1e-6, atol=1e-37)
    assert not any(t.dims[-2:] == [7, 7] for t in out.graph.initializer), "no constant map"


def test_all_constants_zero_need_no_map():
    out, rep = simplified(two_convs([0.5, -1.5, -0.2, 0.3], [1, 2]).model())
    assert rep.after.layers["c2"][0] == 2
    assert border_convs(out) == 0 and not ones_images(out)


@pytest.mark.parametrize("pads,stride,dilation,hw", [
    ((0, 1, 1, 0), 2, 1, (9, 5)),      # asymmetric pads, stride 2, odd sizes
    ((2, 0, 1, 2), 2, 1, (7, 7)),
    ((1, 2, 0, 1), 1, 2, (9, 5)),      # dilation
    ((2, 2, 2, 2), 2, 2, (7, 11)),
])
def test_the_border_conv_has_the_layers_geometry(pads, stride, dilation, hw):
    b = two_convs([0.9, 0.4, 1.1, 0.6, 0.8], [0, 3], hw=hw, pads=pads, stride=stride, dilation=dilation)
    out, rep = simplified(b.model())
    assert rep.after.layers["c2"][0] == 3
    (border,) = [n for n in out.graph.node if n.op_type == "Conv" and n.input[0] in ones_images(out)]
    c2 = node_by_name(out, "c2")
    geometry = ("pads", "strides", "dilations", "kernel_shape")
    assert {a.name: a for a in border.attribute if a.name in geometry} == \
           {a.name: a for a in c2.attribute if a.name in geometry}


def test_one_ones_image_per_size_and_one_map_per_layer():
    b = GraphBuilder(3, 8, 8, seed=5)
    b.conv(6, 1, name="c1", b=np.full(6, 0.6, np.float32))
    b.act("Relu")
    b.conv(6, 3, pads=1, name="c2", b=np.full(6, 0.7, np.float32))
    b.act("Relu")
    b.conv(4, 3, pads=1, name="c3")
    b.zero_filter("c1", 2)
    b.zero_filter("c2", 4)
    out, rep = simplified(b.model())
    assert rep.after.layers["c2"] == (5, 5) and rep.after.layers["c3"] == (5, 4)
    assert len(ones_images(out)) == 1 and border_convs(out) == 2


def test_a_residual_add_takes_the_map_so_both_adds_fuse():
    """conv2 + map + identity is written conv2 + (map + identity): each Add then feeds on one conv
    (onnxruntime fuses an Add into the conv that produces one operand, once per conv)."""
    b = GraphBuilder(4, 7, 7, seed=6)
    x = b.conv(6, 1, name="c0")
    h = b.act("Relu")
    b.conv(6, 3, pads=1, name="c1", b=np.full(6, 0.8, np.float32))
    b.act("Relu")
    y = b.conv(6, 3, pads=1, name="c2")
    b.add(y, h)
    b.act("Relu")
    b.conv(3, 1, name="head", x=b.cur)
    b.zero_filter("c1", 1)
    out, _ = simplified(b.model(), pins=["c0_out", "c2_out"])  # (c1's channel alone goes)
    c2 = node_by_name(out, "c2")
    (residual,) = [n for n in out.graph.node if c2.output[0] in n.input]
    assert residual.op_type == "Add"
    other = next(i for i in residual.input if i != c2.output[0])
    producer = next(n for n in out.graph.node if other in n.output)
    assert producer.op_type == "Add" and len(border_convs_feeding(out, producer)) == 1


def border_convs_feeding(model, node) -> list:
    ones = ones_images(model)
    return [n for n in model.graph.node if n.op_type == "Conv" and n.input[0] in ones and n.output[0] in node.input]


def test_constant_mode_adds_a_constant_map():
    m = two_convs([0.5, 1.5, 0.9, 0.8, 0.2], [1, 2]).model()
    runtime, _ = simplified(m)
    constant, _ = simplified(m, border_maps="constant")
    assert border_convs(constant) == 0 and not any(n.op_type == "RandomUniform" for n in constant.graph.node)
    maps = [t for t in constant.graph.initializer if list(t.dims) == [1, 4, 7, 7]]
    assert len(maps) == 1
    assert weight_count(constant) == weight_count(runtime)


def test_simplifying_the_result_again_changes_nothing():
    m = two_convs([0.5, 1.5, 0.9, 0.8, 0.2], [1, 2]).model()
    once, _ = simplified(m)
    twice, _ = simplified(once)
    assert border_convs(twice) == border_convs(once) == 1
    assert weight_count(twice) == weight_count(once)
    assert_same_function(m, twice, atol=ATOL, rtol=RTOL)


def test_border_maps_option_is_checked():
    with pytest.raises(OnnxPruneError, match="--border-maps must be one of runtime, constant"):
        simplify(onnx.ModelProto(), border_maps="bogus")


# --- hosted by a dead channel kept for alignment (passes/host_border_maps.py) ------------------

def test_a_dead_channel_kept_for_alignment_carries_the_map():
    """8 channels, 3 dead (relu(bias) 0.9, 1.7, 0.4), --align 2: one dead channel stays, the one with
    the largest constant (1.7); its column becomes K / 1.7, so the layer's own zero padding makes
    the whole border map: no map conv, no ones image."""
    biases = [0.3, 0.9, 0.5, -0.2, 1.7, 0.8, 0.4, 0.6]
    b = two_convs(biases, [1, 4, 6], hw=(7, 9))
    w2 = b.inits[b.layers["c2"]["weight"]].astype(np.float64)
    out, rep = simplified(b.model(), align=2)
    assert rep.after.layers["c2"][0] == 6 and border_convs(out) == 0 and not ones_images(out)
    w = inits_of(out)[node_by_name(out, "c2").input[1]]
    kept = [0, 2, 3, 4, 5, 7]  # slot order: the live channels and the spared 4
    np.testing.assert_array_equal(w[:, [0, 1, 2, 4, 5]], w2[:, [0, 2, 3, 5, 7]].astype(np.float32))
    K = sum(max(biases[j], 0) * w2[:, j] for j in (1, 4, 6))
    np.testing.assert_allclose(w[:, kept.index(4)], K / 1.7, rtol=1e-6)
    assert "border maps: 1 carried by kept dead channels, 0 as one-channel convs" in rep.table()
    assert rep.classes["by_kind"]["hosting border maps"] == 1


def test_a_kept_channel_with_constant_zero_does_not_host():
    """Two dead channels kept (--align 4): relu(-0.6) = 0 cannot carry anything; relu(1.2) does."""
    biases = [0.3, -0.6, 0.5, 1.2, 0.8, 0.4, 0.6, 0.2]
    b = two_convs(biases, [1, 3], hw=(6, 6))
    w2 = b.inits[b.layers["c2"]["weight"]].astype(np.float64)
    out, rep = simplified(b.model(), align=4)
    assert rep.after.layers["c2"][0] == 8 and border_convs(out) == 0
    w = inits_of(out)[node_by_name(out, "c2").input[1]]
    assert not np.any(w[:, 1])                                    # the zero constant: still unread
    np.testing.assert_allclose(w[:, 3], w2[:, 3], rtol=1e-6)      # 1.2 hosts its own map: K / c = W[:, 3]


def test_a_hosted_map_is_exact_at_any_size():
    """Symbolic H×W: hosted, there is no shape computation left at all."""
    b = two_convs([0.3, 0.9, 0.5, -0.2, 1.7, 0.8, 0.4, 0.6], [1, 4, 6], hw=(7, 7))
    m = b.model(dynamic_hw=True)
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((1, 3, 7, 7)).astype(np.float32)}]
    out, rep = simplify(m, inputs=feeds, align=2, atol=ATOL, rtol=RTOL)
    assert border_convs(out) == 0 and not any(n.op_type in ("Shape", "ConstantOfShape") for n in out.graph.node)
    assert rep.after.layers["c2"][0] == 6
    for size in ((5, 9), (12, 4), (7, 7)):
        f = {"x": rng.standard_normal((1, 3, *size)).astype(np.float32)}
        np.testing.assert_allclose(run_ort(out, f), run_ort(m, f), atol=ATOL, rtol=RTOL)


def test_a_reassociated_map_is_hosted_too():
    b = GraphBuilder(4, 7, 7, seed=6)
    b.conv(8, 1, name="c0")
    h = b.act("Relu")
    b.conv(8, 3, pads=1, name="c1", b=np.array([0.8, 0.5, 0.9, 0.3, 0.7, 0.6, 0.4, 0.2], np.float32))
    b.act("Relu")
    y = b.conv(8, 3, pads=1, name="c2")
    b.add(y, h)
    b.act("Relu")
    b.conv(3, 1, name="head")
    b.zero_filter("c1", 1)
    b.zero_filter("c1", 5)
    out, rep = simplified(b.model(), align=4, pins=["c0_out", "c2_out"])
    assert rep.after.layers["c2"][0] == 8 and border_convs(out) == 0
    assert [n.op_type for n in out.graph.node].count("Add") == 1


def run_ort(model, feeds):
    from .onnx_builders import run
    return run(model, feeds)[0]


# --- maps made by a depthwise conv or a padded average, read by a pointwise layer ---------------

def depthwise_block(act, *, stride=1, hw=(9, 9), dw_bias=0.5, seed=1):
    """c1 (1×1) → Relu → depthwise 3×3 (pad 1) → act → proj (1×1); two of c1's rows zeroed: the
    depthwise turns their constants into maps (the border sees zero padding)."""
    b = GraphBuilder(4, *hw, seed=seed)
    b.conv(8, 1, name="c1", b=np.array([0.9, 0.4, 1.3, 0.7, 0.2, 0.8, 1.1, 0.6], np.float32))
    b.act("Relu")
    b.depthwise(3, pads=1, stride=stride, name="dw", b=np.full(8, dw_bias, np.float32))
    if act == "SiLU":
        sig = b.act("Sigmoid", x=b.layers["dw"]["output"])
        b.mul(b.layers["dw"]["output"], sig)
    elif act:
        b.act(act)
    b.conv(5, 1, name="proj")
    b.zero_filter("c1", 2)
    b.zero_filter("c1", 6)
    return b


@pytest.mark.parametrize("act,dw_bias", [(None, 0.5), ("Relu", 0.5), ("Relu", -0.3), ("Clip", 0.5), ("SiLU", 0.1),
                                         ("HardSwish", 0.2)])
def test_a_depthwise_map_read_by_a_pointwise_layer_is_a_fitted_border_conv(act, dw_bias):
    """Whatever the activation after the depthwise (a ReLU that clips part of the map too), each
    map is a function of which depthwise taps are inside: a 3×3 conv over ones, fitted, replaces
    the constant map — checked against the unmodified model."""
    out, rep = simplified(depthwise_block(act, dw_bias=dw_bias).model())
    assert rep.after.layers["proj"][0] == 6 and rep.after.layers["dw"] == (6, 6)
    assert not any(list(t.dims) == [1, 5, 9, 9] for t in out.graph.initializer), "no constant map"
    (border,) = [n for n in out.graph.node if n.op_type == "Conv" and n.input[0] in ones_images(out)]
    assert [a.ints for a in border.attribute if a.name == "kernel_shape"] == [[3, 3]]


def test_a_strided_depthwise_map_on_an_odd_size():
    out, rep = simplified(depthwise_block("Relu", stride=2, hw=(9, 7)).model())
    assert rep.after.layers["proj"][0] == 6 and border_convs(out) == 1


def test_a_padded_average_read_by_a_pointwise_layer():
    """AveragePool counting its zero pads (Inception's pool branch): constant c becomes c·(inside / 9)."""
    b = GraphBuilder(3, 8, 8, seed=7)
    b.conv(6, 1, name="c1", b=np.full(6, 0.7, np.float32))
    b.act("Relu")
    b.pool("AveragePool", 3, stride=1, pads=1, count_include_pad=1)
    b.conv(4, 1, name="proj")
    b.zero_filter("c1", 3)
    out, rep = simplified(b.model())
    assert rep.after.layers["proj"][0] == 5 and border_convs(out) == 1


def test_a_map_that_no_border_conv_makes_stays_a_constant_map():
    """A constant channel times a spatially varying constant is a map, but not a function of which
    taps are inside: the fit is refused and a constant map is added (exactly)."""
    b = GraphBuilder(3, 8, 8, seed=8)
    b.conv(6, 1, name="c1", b=np.full(6, 0.7, np.float32))
    b.act("Relu")
    b.depthwise(3, pads=1, name="dw")
    texture = b.init("texture", np.random.default_rng(3).uniform(0.5, 1.5, (1, 6, 8, 8)).astype(np.float32))
    b.op("Mul", [b.cur, texture], b.shape)
    b.conv(4, 1, name="proj")
    b.zero_filter("c1", 3)
    out, rep = simplified(b.model())
    assert rep.after.layers["proj"][0] == 5 and border_convs(out) == 0
    assert any(list(t.dims) == [1, 4, 8, 8] for t in out.graph.initializer)


# --- grouped layers: a conv over ones only where onnxruntime blocks the layer -------------------

@pytest.mark.parametrize("width,group,blocked", [(32, 2, True), (24, 3, False), (32, 4, False)])
def test_a_grouped_layer_keeps_a_run_time_map_only_where_it_is_blocked(width, group, blocked):
    """Blocked (NCHWc) only when the width and every group's input and output widths are multiples
    of 16: 32 in 2 groups is (16 per group); 24 in 3 groups and 32 in 4 (8 per group) are not, and
    their maps become constants."""
    b = GraphBuilder(3, 8, 8, seed=9)
    b.conv(width + group, 1, name="c1", b=np.full(width + group, 0.6, np.float32))
    b.act("Relu")
    b.conv(width, 3, pads=1, group=group, name="c2")
    for grp in range(group):  # one dead channel per group, at the same local index (grouped removal)
        b.zero_filter("c1", grp * (width // group + 1))
    out, rep = simplified(b.model())
    assert rep.after.layers["c2"] == (width, width)
    assert border_convs(out) == (1 if blocked else 0)
    assert any(list(t.dims) == [1, width, 8, 8] for t in out.graph.initializer) != blocked


def test_constants_found_in_later_rounds_extend_the_layers_one_map():
    """Regression (fuzz): a padded layer whose inputs become constant over several rounds got a
    second border conv reassociated into the first's Add, and hosting one left the other's Adds
    stale (a crash). Now a layer has one map per geometry, its kernels summed, and the host pass
    finds each map afresh."""
    b = GraphBuilder(2, 5, 5, seed=0)
    b.conv(2, 1, name="c1", bias=False, weight=np.array([[0.0, 0.0], [0.453, 0.074]], np.float32).reshape(2, 2, 1, 1))
    bn = b.bn(gamma=np.array([1.313, 0.0], np.float32), name="bn")
    for key, value in (("beta", [0.474, -0.352]), ("mean", [-0.38, -0.187]), ("var", [0.504, 1.786])):
        b.inits[b.bns["bn"][key]] = np.array(value, np.float32)
    first, second = b.split([1, 1], x=bn)
    c10 = b.conv(1, 1, x=first, name="c10", weight=np.full((1, 1, 1, 1), -0.219, np.float32), b=[-0.623])
    joined = b.concat([second, c10])
    c14 = b.conv(1, 1, x=joined, name="c14", bias=False)
    c16 = b.conv(1, 3, pads=1, x=joined, name="c16", bias=False)
    b.concat([c14, c16, joined])
    b.global_avg_pool()
    b.flatten()
    b.gemm(4, bias=False)
    for align in (1, 2, 16):
        out, _ = simplify(b.model(), align=align, atol=ATOL, rtol=RTOL)
        assert_same_function(b.model(), out, atol=ATOL, rtol=RTOL)
        assert border_convs(out) <= 1


def test_a_layer_without_a_kernel_shape_attribute_hosts_its_map():
    """kernel_shape is optional in ONNX (the weights give it): the host pass reads the kernel size
    from the weights, not from the attribute."""
    b = two_convs([0.3, 0.9, 0.5, -0.2, 1.7, 0.8, 0.4, 0.6], [1, 4, 6], hw=(7, 9))
    m = b.model()
    for n in m.graph.node:
        kept = [a for a in n.attribute if a.name != "kernel_shape"]
        del n.attribute[:]
        n.attribute.extend(kept)
    out, rep = simplified(m, align=2)
    assert rep.after.layers["c2"][0] == 6 and border_convs(out) == 0
