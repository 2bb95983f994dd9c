"""One hand-built graph per channel coupling kind and per pin reason.

Each case zeroes a filter (or a whole channel class), runs `simplify` (with align=1: every dead
channel must go), checks the exact channel counts / weights afterwards and that the result computes
the same function as the *unmodified* input on onnxruntime (fresh inputs, independent of simplify's
own parity check). At the end: regression tests for the bugs these tests and the fuzzer found.
Graphs are built with tests/onnx_builders.GraphBuilder.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxprune import OnnxPruneError, simplify
from .onnx_builders import (GraphBuilder, assert_same_function, exact_counts, inits_of, layer_weights,
                           node_by_name, random_feeds, run, weight_count)

ATOL, RTOL = 1e-5, 1e-4
EXACT = exact_counts()  # these tests assert exact channel counts: every dead channel must go


def simplified(model: onnx.ModelProto, **options):
    """simplify + an independent parity check against the unmodified model."""
    before = onnx.ModelProto()
    before.CopyFrom(model)
    out, report = simplify(model, atol=ATOL, rtol=RTOL, **{**EXACT, **options})
    assert model == before, "simplify modified its input"
    assert_same_function(model, out, atol=ATOL, rtol=RTOL)
    assert weight_count(out) <= weight_count(model)
    return out, report


def io(report, layer):
    return report.after.layers[layer]


def pinned_reasons(report) -> str:
    return " | ".join(report.classes.get("pinned", {}))


def attrs_of(model, name):
    return {a.name: helper.get_attribute_value(a) for a in node_by_name(model, name).attribute}


# --- conv → conv --------------------------------------------------------------------------------

def test_conv_relu_conv_1x1_absorbs_bias_and_drops_one_column():
    b = GraphBuilder(4, 6, 6, seed=1)
    b.conv(6, 3, pads=1, name="c1", b=np.array([0.3, -0.2, 0.7, 0.1, 0.5, -0.4], np.float32))
    b.act("Relu")
    b.conv(5, 1, name="c2")
    b.zero_filter("c1", 2)
    m = b.model()
    w2, b2 = b.inits[b.layers["c2"]["weight"]], b.inits[b.layers["c2"]["bias"]]
    out, rep = simplified(m)
    assert io(rep, "c1") == (4, 5)
    assert io(rep, "c2") == (5, 5)
    inits = inits_of(out)
    c2 = node_by_name(out, "c2")
    np.testing.assert_array_equal(inits[c2.input[1]], np.delete(w2, 2, axis=1))
    expected_bias = b2.astype(np.float64) + w2[:, 2, 0, 0].astype(np.float64) * 0.7  # relu(0.7)
    np.testing.assert_allclose(inits[c2.input[2]], expected_bias, rtol=1e-6, atol=1e-6)
    assert rep.changed_layers() == [("c1", (4, 6), (4, 5)), ("c2", (6, 5), (5, 5))]


@pytest.mark.parametrize("hw", [(7, 7), (9, 5), (5, 9)])
@pytest.mark.parametrize("act", [None, "Relu", "Sigmoid", "HardSwish"])
def test_padded_3x3_reader_border_correction(hw, act):
    """A constant channel read by a zero-padded 3×3 conv: the border sees 0, not the constant.
    With a static spatial size the exact correction map makes the channel removable."""
    b = GraphBuilder(3, *hw, seed=2)
    b.conv(5, 1, name="c1", b=np.array([0.5, 1.5, -0.3, 0.8, 0.2], np.float32))
    if act:
        b.act(act)
    b.conv(4, 3, pads=1, name="c2")
    b.zero_filter("c1", 1)
    m = b.model()
    out, rep = simplified(m)
    assert io(rep, "c1") == (3, 4)
    assert io(rep, "c2") == (4, 4)


@pytest.mark.parametrize("pads,stride,dilation,hw", [
    ((0, 1, 1, 0), 2, 1, (9, 5)),
    ((2, 0, 1, 2), 2, 1, (7, 7)),
    ((1, 2, 0, 1), 1, 2, (9, 5)),
    ((2, 2, 2, 2), 2, 2, (7, 11)),
])
def test_padded_reader_stride_asymmetric_pads(pads, stride, dilation, hw):
    b = GraphBuilder(3, *hw, seed=3)
    b.conv(6, 3, pads=1, name="c1", b=np.full(6, 0.9, np.float32))
    b.act("Relu")
    b.conv(4, 3, pads=pads, stride=stride, dilation=dilation, name="c2")
    b.zero_filter("c1", 4)
    m = b.model()
    out, rep = simplified(m)
    assert io(rep, "c1") == (3, 5)
    assert io(rep, "c2") == (5, 4)


def test_padded_reader_dynamic_spatial_size_removes_the_channel_exactly_at_any_size():
    """Without a static spatial size the border map is made from the input's shape at run time: the
    channel goes, and the result is exact at sizes the parity check never saw."""
    b = GraphBuilder(3, 7, 7, seed=4)
    b.conv(5, 1, name="c1", b=np.full(5, 0.7, np.float32))
    b.act("Relu")
    b.conv(4, 3, pads=1, name="c2")
    b.zero_filter("c1", 0)
    m = b.model(dynamic_hw=True)
    feeds = [random_feeds(b.model(), 5), {"x": np.random.default_rng(6).standard_normal((1, 3, 9, 5)).astype(np.float32)}]
    out, rep = simplify(m, inputs=feeds, atol=ATOL, rtol=RTOL, **EXACT)
    assert io(rep, "c1") == (3, 4)
    assert any(n.op_type == "ConstantOfShape" for n in out.graph.node)
    for f in feeds + [{"x": np.random.default_rng(7).standard_normal((1, 3, 4, 12)).astype(np.float32)}]:
        np.testing.assert_allclose(run(out, f)[0], run(m, f)[0], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("k,stride,pads", [(2, 2, 0), (3, 2, 1), (3, 1, (1, 0, 0, 1))])
def test_conv_transpose_reader(k, stride, pads):
    b = GraphBuilder(3, 5, 7, seed=5)
    b.conv(5, 1, name="c1", b=np.full(5, 0.6, np.float32))
    b.act("Relu")
    b.conv_transpose(4, k, stride=stride, pads=pads, name="up")
    b.zero_filter("c1", 3)
    m = b.model()
    out, rep = simplified(m)
    assert io(rep, "c1") == (3, 4)
    assert io(rep, "up") == (4, 4)


@pytest.mark.parametrize("auto_pad,stride", [("SAME_UPPER", 1), ("SAME_UPPER", 2), ("SAME_LOWER", 2)])
def test_auto_pad_reader(auto_pad, stride):
    b = GraphBuilder(3, 7, 6, seed=30)
    b.conv(5, 1, name="c1", b=np.full(5, 0.8, np.float32))
    b.act("Relu")
    b.conv(4, 3, stride=stride, auto_pad=auto_pad, name="c2")
    b.zero_filter("c1", 2)
    out, rep = simplified(b.model())
    assert io(rep, "c1") == (3, 4)
    assert io(rep, "c2") == (4, 4)


@pytest.mark.parametrize("kind,count_include_pad,removable", [
    ("MaxPool", 0, True), ("AveragePool", 0, True), ("AveragePool", 1, None)])
def test_padded_pool_between(kind, count_include_pad, removable):
    """Max pooling pads with −inf and averaging without the pad count keep a constant constant;
    averaging the zero pads in makes it an input-independent *map*: exact either way (removed
    through an exact bias map, or kept). removable=None: either is allowed."""
    b = GraphBuilder(3, 7, 7, seed=31)
    b.conv(5, 1, name="c1", b=np.full(5, 0.8, np.float32))
    b.act("Relu")
    b.pool(kind, 3, stride=2, pads=(1, 1, 0, 1), count_include_pad=count_include_pad)
    b.conv(4, 1, name="c2")
    b.zero_filter("c1", 2)
    out, rep = simplified(b.model())
    assert io(rep, "c2") in ([(4, 4)] if removable else [(4, 4), (5, 4)])


# --- residual add -------------------------------------------------------------------------------

def _residual(seed=6):
    b = GraphBuilder(3, 7, 7, seed=seed)
    t = b.conv(6, 1, name="c0")
    t = b.act("Relu")
    b.conv(4, 3, pads=1, name="c1")
    b.act("Relu")
    r = b.conv(6, 1, name="c2")
    b.add(t, r)
    b.act("Relu")
    b.conv(5, 1, name="c3")
    return b


def test_residual_one_producer_zeroed_keeps_channel():
    b = _residual()
    b.zero_filter("c2", 3)
    out, rep = simplified(b.model())
    assert io(rep, "c0") == (3, 6)
    assert io(rep, "c2") == (4, 6)
    assert io(rep, "c3") == (6, 5)


def test_residual_all_producers_zeroed_removes_everywhere():
    b = _residual()
    b.zero_filter("c0", 3)
    b.zero_filter("c2", 3)
    out, rep = simplified(b.model())
    assert io(rep, "c0") == (3, 5)
    assert io(rep, "c1") == (5, 4)   # c1 read the constant through a padded 3×3: border-corrected
    assert io(rep, "c2") == (4, 5)
    assert io(rep, "c3") == (5, 5)


def test_residual_zero_class_via_builder_producers():
    b = _residual(seed=7)
    add_out = [n.output[0] for n in b.nodes if n.op_type == "Add"][0]
    assert b.zero_class(add_out, 1)
    out, rep = simplified(b.model())
    assert io(rep, "c3") == (5, 5)


# --- concat / split / slice -------------------------------------------------------------------

def test_concat_offset_of_removed_channel():
    b = GraphBuilder(3, 5, 5, seed=8)
    x = b.cur
    a = b.conv(3, 1, name="c1", x=x)
    c = b.conv(4, 1, name="c2", x=x, b=np.array([0.1, 0.8, -0.5, 0.3], np.float32))
    b.concat([a, c])
    b.act("Relu")
    b.conv(5, 1, name="c3")
    b.zero_filter("c2", 1)  # concat channel 3 + 1 = 4
    m = b.model()
    w3, b3 = b.inits[b.layers["c3"]["weight"]].copy(), b.inits[b.layers["c3"]["bias"]].copy()
    out, rep = simplified(m)
    assert io(rep, "c1") == (3, 3)
    assert io(rep, "c2") == (3, 3)
    assert io(rep, "c3") == (6, 5)
    c3 = node_by_name(out, "c3")
    inits = inits_of(out)
    np.testing.assert_array_equal(inits[c3.input[1]], np.delete(w3, 4, axis=1))
    np.testing.assert_allclose(inits[c3.input[2]], b3 + w3[:, 4, 0, 0] * 0.8, rtol=1e-6, atol=1e-6)


def test_concat_class_zeroed_in_first_branch():
    b = GraphBuilder(3, 5, 7, seed=9)
    x = b.cur
    a = b.conv(3, 3, pads=1, name="c1", x=x)
    c = b.conv(4, 1, name="c2", x=x)
    b.concat([a, c])
    b.act("LeakyRelu")
    b.conv(5, 3, pads=1, name="c3")
    b.zero_filter("c1", 0)
    b.zero_filter("c2", 3)
    out, rep = simplified(b.model())
    assert io(rep, "c1") == (3, 2)
    assert io(rep, "c2") == (3, 3)
    assert io(rep, "c3") == (5, 5)


def test_split_sizes_input_on_channel_axis():
    b = GraphBuilder(3, 5, 5, seed=10)
    b.conv(6, 1, name="c1", b=np.full(6, 0.4, np.float32))
    b.act("Relu")
    p, q = b.split([2, 4])
    pa = b.conv(3, 1, name="ca", x=p)
    qa = b.conv(3, 3, pads=1, name="cb", x=q)
    b.concat([pa, qa])
    b.zero_filter("c1", 3)  # second part, local index 1
    out, rep = simplified(b.model())
    assert io(rep, "c1") == (3, 5)
    assert io(rep, "ca") == (2, 3)
    assert io(rep, "cb") == (3, 3)
    split = [n for n in out.graph.node if n.op_type == "Split"][0]
    assert inits_of(out)[split.input[1]].tolist() == [2, 3]


def test_split_unused_output_channels_are_removed():
    """A Split output nobody reads: its channels are unread and go."""
    b = GraphBuilder(3, 5, 5, seed=11)
    b.conv(6, 1, name="c1")
    b.act("Relu")
    p, _ = b.split([4, 2])
    b.conv(3, 1, name="c2", x=p)
    out, rep = simplified(b.model())
    # at least one of the unread channels goes; the "no empty tensor" rule may spare one of them
    assert io(rep, "c1") in ((3, 4), (3, 5))
    assert io(rep, "c2") == (4, 3)


def test_slice_on_channel_axis():
    b = GraphBuilder(3, 5, 5, seed=12)
    b.conv(6, 1, name="c1", b=np.full(6, 0.4, np.float32))
    b.act("Relu")
    b.slice_channels(1, 5)   # channels 1..4; 0 and 5 are never read
    b.conv(3, 1, name="c2")
    b.zero_filter("c1", 2)
    out, rep = simplified(b.model())
    assert io(rep, "c1") == (3, 3)   # keeps 1, 3, 4
    assert io(rep, "c2") == (3, 3)


@pytest.mark.parametrize("start,end,axis,zero,expected", [
    (1, 5, 1, 2, 3),                    # channels 1..4 read; 0 and 5 unread; 2 zeroed
    (-4, 2**63 - 1, 1, 3, 3),           # channels 2..5; 0, 1 unread; 3 zeroed
    (0, -1, -3, 0, 4),                  # channels 0..4 on axis -3; 5 unread; 0 zeroed
])
def test_slice_variants(start, end, axis, zero, expected):
    b = GraphBuilder(3, 5, 5, seed=32)
    b.conv(6, 1, name="c1", b=np.full(6, 0.4, np.float32))
    b.act("Relu")
    b.slice_channels(start, end, axis=axis)
    b.conv(3, 3, pads=1, name="c2")
    b.zero_filter("c1", zero)
    out, rep = simplified(b.model())
    assert io(rep, "c1") == (3, expected)
    assert io(rep, "c2") == (expected, 3)


# --- depthwise / grouped --------------------------------------------------------------------------

def _depthwise(seed=13):
    b = GraphBuilder(3, 7, 7, seed=seed)
    b.conv(6, 1, name="expand", b=np.full(6, 0.5, np.float32))
    b.act("Relu")
    b.depthwise(3, pads=1, name="dw")
    b.act("Relu")
    b.conv(4, 1, name="project")
    return b


def test_depthwise_expand_and_dw_zeroed_removed():
    b = _depthwise()
    b.zero_filter("expand", 2)
    b.zero_filter("dw", 2)
    out, rep = simplified(b.model())
    assert io(rep, "expand") == (3, 5)
    assert io(rep, "dw") == (5, 5)
    assert attrs_of(out, "dw")["group"] == 5
    assert io(rep, "project") == (5, 4)


def test_depthwise_dw_zeroed_alone_removed():
    """A zero dw filter makes the channel constant (its bias) whatever the expand conv computes."""
    b = _depthwise()
    b.zero_filter("dw", 4)
    out, rep = simplified(b.model())
    assert io(rep, "dw") == (5, 5)
    assert io(rep, "project") == (5, 4)


def test_depthwise_expand_zeroed_alone_padded_dw_exact():
    """Constant 0.5 into a zero-padded dw 3×3: not constant at the border (an input-independent map).
    Exact either way: kept, or removed through exact border maps."""
    b = _depthwise()
    b.zero_filter("expand", 1)
    out, rep = simplified(b.model())
    assert io(rep, "dw") in ((6, 6), (5, 5))


def test_depthwise_channel_multiplier():
    b = GraphBuilder(3, 6, 6, seed=33)
    b.conv(6, 1, name="expand")
    b.act("Relu")
    b.depthwise(3, multiplier=2, pads=1, name="dw")     # 6 → 12, group 6
    b.act("Relu")
    b.conv(4, 1, name="project")
    b.zero_filter("expand", 2)
    b.zero_filter("dw", 4)
    b.zero_filter("dw", 5)                              # both outputs of channel 2
    out, rep = simplified(b.model())
    assert io(rep, "expand") == (3, 5)
    assert layer_weights(out)["dw"].shape == (10, 1, 3, 3)
    assert attrs_of(out, "dw")["group"] == 5
    assert io(rep, "project") == (10, 4)


def _grouped(seed=14):
    b = GraphBuilder(3, 6, 6, seed=seed)
    b.conv(8, 1, name="c1", b=np.full(8, 0.5, np.float32))
    b.act("Relu")
    b.conv(6, 3, pads=1, group=2, name="g")
    b.act("Relu")
    b.conv(4, 1, name="c3")
    return b


def test_grouped_same_local_index_in_both_groups_removed():
    b = _grouped()
    b.zero_filter("c1", 1)
    b.zero_filter("c1", 5)
    out, rep = simplified(b.model())
    assert io(rep, "c1") == (3, 6)
    assert layer_weights(out)["g"].shape == (6, 3, 3, 3)
    assert attrs_of(out, "g")["group"] == 2


def test_grouped_local_index_in_one_group_only_kept():
    b = _grouped()
    b.zero_filter("c1", 1)
    out, rep = simplified(b.model())
    assert io(rep, "c1") == (3, 8)
    assert layer_weights(out)["g"].shape == (6, 4, 3, 3)


def test_grouped_output_rows_same_local_index_removed():
    b = _grouped()
    b.zero_filter("g", 0)
    b.zero_filter("g", 3)
    out, rep = simplified(b.model())
    assert layer_weights(out)["g"].shape == (4, 4, 3, 3)
    assert io(rep, "c3") == (4, 4)


# --- flatten → gemm ---------------------------------------------------------------------------------

@pytest.mark.parametrize("trans_b", [True, False])
def test_flatten_gemm_drops_hw_columns(trans_b):
    b = GraphBuilder(3, 5, 5, seed=15)
    b.conv(4, 3, pads=1, name="c1", b=np.array([0.2, 0.9, -0.1, 0.3], np.float32))
    b.act("Relu")
    b.flatten()
    b.gemm(3, trans_b=trans_b, name="fc")
    b.zero_filter("c1", 1)
    m = b.model()
    w = b.inits[b.layers["fc"]["weight"]]
    w_in_out = w.T if trans_b else w        # [F_in, F_out]
    out, rep = simplified(m)
    assert io(rep, "c1") == (3, 3)
    fc_w = layer_weights(out)["fc"]
    expected = np.delete(w_in_out, np.arange(25, 50), axis=0)
    assert fc_w.shape == ((3, 75) if trans_b else (75, 3))
    np.testing.assert_array_equal(fc_w.T if trans_b else fc_w, expected)
    assert io(rep, "fc") == (75, 3)


def test_gap_flatten_gemm_drops_one_column():
    b = GraphBuilder(3, 7, 5, seed=16)
    b.conv(4, 3, pads=1, name="c1")
    b.act("Relu")
    b.global_avg_pool()
    b.flatten()
    b.gemm(3, name="fc")
    b.zero_filter("c1", 2)
    out, rep = simplified(b.model())
    assert io(rep, "fc") == (3, 3)


def test_gemm_gemm_feature_removed():
    b = GraphBuilder(3, 5, 5, seed=34)
    b.conv(4, 1, name="c1")
    b.global_avg_pool()
    b.flatten()
    b.gemm(8, name="fc1")
    b.act("Relu")
    b.gemm(3, trans_b=False, name="fc2")
    b.zero_filter("fc1", 5)
    out, rep = simplified(b.model())
    assert io(rep, "fc1") == (4, 7)
    assert io(rep, "fc2") == (7, 3)


def test_flatten_matmul_drops_rows():
    b = GraphBuilder(3, 4, 4, seed=35)
    b.conv(3, 1, name="c1", b=np.array([0.2, 0.5, 0.7], np.float32))
    b.act("Relu")
    f = b.flatten()
    w = b.init("mm_W", b._randn(48, 5, scale=0.2))
    bias = b.init("mm_B", b._randn(5))
    mm = b.op("MatMul", [f, w], (1, 5), name="mm")
    b.op("Add", [mm, bias], (1, 5))
    b.zero_filter("c1", 0)
    m = b.model()
    out, rep = simplified(m)
    assert io(rep, "c1") == (3, 2)
    assert layer_weights(out)["mm"].shape == (32, 5)


# --- channel shuffle --------------------------------------------------------------------------------

def _shuffle(seed=17):
    b = GraphBuilder(3, 5, 5, seed=seed)
    b.conv(6, 1, name="c1", b=np.full(6, 0.3, np.float32))
    b.act("Relu")
    b.shuffle(2)
    b.conv(4, 3, pads=1, name="c2")
    return b


def test_shuffle_live_classes_stay_exact():
    b = _shuffle()
    out, rep = simplified(b.model())
    assert io(rep, "c1") == (3, 6)


def test_shuffle_single_constant_channel_keeps_parity():
    """Removing one channel of a 2×3 shuffle would not leave a box: it may stay, but exactly."""
    b = _shuffle()
    b.zero_filter("c1", 4)
    out, rep = simplified(b.model())
    assert io(rep, "c2")[0] in (5, 6)


def test_shuffle_same_local_index_in_both_groups_removed():
    b = _shuffle()
    b.zero_filter("c1", 2)
    b.zero_filter("c1", 5)
    out, rep = simplified(b.model())
    assert io(rep, "c1") == (3, 4)
    assert io(rep, "c2") == (4, 4)
    shapes = sorted(inits_of(out)[n.input[1]].tolist() for n in out.graph.node if n.op_type == "Reshape")
    assert shapes == [[1, 2, 2, 5, 5], [1, 4, 5, 5]]


def test_shuffle_zero_class_after_shuffle():
    b = _shuffle(seed=18)
    shuffled = b.layers["c2"]["input"]
    assert b.zero_class(shuffled, 1)  # = c1 row 3
    assert not np.any(b.inits[b.layers["c1"]["weight"]][3])
    simplified(b.model())


# --- SE gate ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("bias,kept", [(0.6, True), (-0.6, False)])
def test_se_gate(bias, kept):
    """Feature channel constant c: c·gate is input dependent (kept) unless c = 0 (removable)."""
    b = GraphBuilder(3, 5, 5, seed=19)
    b.conv(6, 1, name="c1", b=np.full(6, bias, np.float32))
    b.act("Relu")
    b.se(3)
    b.conv(4, 1, name="c2")
    b.zero_filter("c1", 2)
    out, rep = simplified(b.model())
    assert io(rep, "c1") == ((3, 6) if kept else (3, 5))
    assert io(rep, "c2") == ((6, 4) if kept else (5, 4))
    if kept:
        assert rep.classes["by_kind"].get("blocked", 0) >= 1


def test_se_gate_zeroed_expand_row_exact():
    b = GraphBuilder(3, 5, 5, seed=20)
    b.conv(6, 3, pads=1, name="c1")
    b.act("Relu")
    b.se(3, name="se")
    b.conv(4, 1, name="c2")
    expand = [k for k in b.layers if k.startswith("se_expand")][0]
    b.zero_filter(expand, 1)   # gate channel 1 = sigmoid(bias): a per-channel scale
    simplified(b.model())


# --- BN ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fold_bn", [True, False])
def test_bn_gamma_zero_removes_channel(fold_bn):
    b = GraphBuilder(3, 5, 5, seed=21)
    b.conv(5, 3, pads=1, name="c1")
    b.bn(name="bn1")
    b.act("Relu")
    b.conv(4, 3, pads=1, name="c2")
    b.zero_gamma("bn1", 1)
    out, rep = simplified(b.model(), fold_bn=fold_bn)
    assert io(rep, "c1") == (3, 4)
    assert io(rep, "c2") == (4, 4)


def test_bn_after_relu_gamma_zero_removes_channel():
    """An unfoldable BN (after a Relu) with γ = 0: its output is β, whatever comes in."""
    b = GraphBuilder(3, 5, 5, seed=22)
    b.conv(5, 1, name="c1")
    b.act("Relu")
    b.bn(name="bn1")
    b.conv(4, 3, pads=1, name="c2")
    b.zero_gamma("bn1", 3)
    out, rep = simplified(b.model())
    assert io(rep, "c1") == (3, 4)
    assert io(rep, "c2") == (4, 4)
    bn = [n for n in out.graph.node if n.op_type == "BatchNormalization"][0]
    assert inits_of(out)[bn.input[1]].shape == (4,)


@pytest.mark.skipif(not EXACT, reason="simplify has no align option")
def test_align_keeps_widths_multiples():
    """Default align=8: a layer 8 wide stays 8 wide (exactly); align=1 drops the dead channel."""
    b = GraphBuilder(3, 5, 5, seed=53)
    b.conv(8, 1, name="c1", b=np.full(8, 0.5, np.float32))
    b.act("Relu")
    b.conv(6, 3, pads=1, name="c2")
    b.zero_filter("c1", 5)
    m = b.model()
    _, rep = simplified(m, align=8)
    assert io(rep, "c1") == (3, 8)
    _, rep = simplified(m, align=1)
    assert io(rep, "c1") == (3, 7)


# --- pins -------------------------------------------------------------------------------------------------

def test_graph_output_channels_never_removed():
    b = GraphBuilder(3, 5, 5, seed=23)
    b.conv(4, 1, name="c1")
    b.act("Relu")
    b.conv(5, 3, pads=1, name="c2")
    b.zero_filter("c2", 3)
    out, rep = simplified(b.model())
    assert io(rep, "c2") == (4, 5)
    assert any(r.startswith("graph output") for r in rep.classes["pinned"])


def test_gemm_output_with_zero_row_kept():
    b = GraphBuilder(3, 5, 5, seed=24)
    b.conv(4, 1, name="c1")
    b.global_avg_pool()
    b.flatten()
    b.gemm(6, name="fc")
    b.zero_filter("fc", 2)
    out, rep = simplified(b.model())
    assert io(rep, "fc") == (4, 6)


def test_user_pin_keeps_class():
    b = GraphBuilder(3, 5, 5, seed=25)
    b.conv(6, 1, name="c1", b=np.full(6, 0.5, np.float32))
    r = b.act("Relu")
    b.conv(4, 1, name="c2")
    b.zero_filter("c1", 2)
    m = b.model()
    out, rep = simplified(m, pins=[r])
    assert io(rep, "c1") == (3, 6)
    assert any("pinned by user" in k and r in k for k in rep.classes["pinned"]), rep.classes
    _, rep2 = simplified(m)
    assert io(rep2, "c1") == (3, 5)


def _pin_case(op_builder, seed=26, dynamic_batch=False):
    b = GraphBuilder(3, 5, 5, seed=seed)
    b.conv(6, 1, name="c1", b=np.full(6, 0.5, np.float32))
    b.act("Relu")
    op_builder(b)
    b.conv(4, 1, name="c2")
    b.zero_filter("c1", 2)
    out, rep = simplified(b.model(dynamic_batch=dynamic_batch))
    assert io(rep, "c1") == (3, 6)
    assert io(rep, "c2") == (6, 4)
    return rep


def test_softmax_on_channel_axis_pins():
    rep = _pin_case(lambda b: b.op("Softmax", [b.cur], b.shape, axis=1))
    assert "Softmax" in pinned_reasons(rep)


def test_lrn_pins():
    rep = _pin_case(lambda b: b.op("LRN", [b.cur], b.shape, size=3))
    assert "LRN" in pinned_reasons(rep)


def test_shape_reshape_computed_pins():
    """Reshape to a shape computed at run time (Shape of a tensor with a symbolic batch: not foldable)."""
    def build(b):
        x = b.cur
        shp = b.op("Shape", [x], (4,))
        b.op("Reshape", [x, shp], b.shapes[x])

    rep = _pin_case(build, dynamic_batch=True)
    # pinned by the Reshape ("shape is computed at run time") or already by the Shape op reading it
    assert "Reshape" in pinned_reasons(rep) or "Shape" in pinned_reasons(rep), rep.classes


def test_shape_of_static_tensor_folds_and_does_not_pin():
    """With a fully static shape, Shape → Reshape is a constant reshape: the channel can go."""
    b = GraphBuilder(3, 5, 5, seed=26)
    b.conv(6, 1, name="c1", b=np.full(6, 0.5, np.float32))
    x = b.act("Relu")
    shp = b.op("Shape", [x], (4,))
    b.op("Reshape", [x, shp], b.shapes[x])
    b.conv(4, 1, name="c2")
    b.zero_filter("c1", 2)
    out, rep = simplified(b.model())
    assert io(rep, "c2") == (5, 4)


def test_reduce_over_channel_axis_pins():
    def build(b):
        x = b.cur
        m = b.op("ReduceMean", [x], (1, 1) + b.shapes[x][2:], axes=[1], keepdims=1)
        b.op("Mul", [x, m], b.shapes[x])

    rep = _pin_case(build)
    assert "reduces over the channel axis" in pinned_reasons(rep)


def test_unknown_op_pins_only_its_own_classes():
    """A pin is local: the zeroed filter of a layer *after* the Softmax is still removed."""
    b = GraphBuilder(3, 5, 5, seed=27)
    b.conv(6, 1, name="c1")
    b.op("Softmax", [b.cur], b.shape, axis=1)
    b.conv(5, 1, name="c2", b=np.full(5, 0.5, np.float32))
    b.act("Relu")
    b.conv(4, 1, name="c3")
    b.zero_filter("c2", 0)
    out, rep = simplified(b.model())
    assert io(rep, "c1") == (3, 6)
    assert io(rep, "c2") == (6, 4)
    assert io(rep, "c3") == (4, 4)


# --- more layouts and per-channel parameters ------------------------------------------------------

def test_nhwc_transpose_matmul_reader():
    """1×1 conv written as Transpose → MatMul over the last axis → Add → Transpose back (ConvNeXt style)."""
    b = GraphBuilder(3, 5, 5, seed=40)
    b.conv(6, 3, pads=1, name="c1", b=np.full(6, 0.4, np.float32))
    x = b.act("Relu")
    t = b.op("Transpose", [x], (1, 5, 5, 6), perm=[0, 2, 3, 1])
    w = b.init("mm_W", b._randn(6, 4, scale=0.4))
    bias = b.init("mm_B", b._randn(4))
    mm = b.op("MatMul", [t, w], (1, 5, 5, 4), name="mm")
    a = b.op("Add", [mm, bias], (1, 5, 5, 4))
    b.op("Transpose", [a], (1, 4, 5, 5), perm=[0, 3, 1, 2])
    b.conv(3, 1, name="c2")
    b.zero_filter("c1", 4)
    out, rep = simplified(b.model())
    assert io(rep, "c1") == (3, 5)
    assert layer_weights(out)["mm"].shape == (5, 4)


def test_gather_channel_selection_with_duplicates():
    b = GraphBuilder(3, 5, 5, seed=41)
    b.conv(6, 1, name="c1", b=np.full(6, 0.4, np.float32))
    x = b.act("Relu")
    idx = b.init("gather_idx", np.array([5, 0, 2, 2], np.int64))
    b.op("Gather", [x, idx], (1, 4, 5, 5), axis=1)
    b.conv(3, 3, pads=1, name="c2")
    b.zero_filter("c1", 2)        # read twice through the duplicate index
    out, rep = simplified(b.model())
    assert io(rep, "c1") == (3, 2)  # 1, 3, 4 never selected; 2 constant
    assert io(rep, "c2") == (2, 3)


def test_resize_keeps_a_constant_constant():
    b = GraphBuilder(3, 4, 5, seed=42)
    b.conv(5, 1, name="c1", b=np.full(5, 0.4, np.float32))
    x = b.act("Relu")
    scales = b.init("scales", np.array([1, 1, 2, 2], np.float32))
    b.op("Resize", [x, "", scales], (1, 5, 8, 10), mode="nearest")
    b.conv(3, 3, pads=1, name="c2")
    b.zero_filter("c1", 1)
    out, rep = simplified(b.model())
    assert io(rep, "c2") == (4, 3)


@pytest.mark.parametrize("mode,removable", [("constant", None), ("reflect", True), ("edge", True)])
def test_pad_op_between(mode, removable):
    """Zero padding turns a constant 0.4 channel into an input-independent map (kept, or removed
    through an exact map: removable=None allows either); reflect/edge keep it constant."""
    b = GraphBuilder(3, 5, 5, seed=43)
    b.conv(5, 1, name="c1", b=np.full(5, 0.4, np.float32))
    x = b.act("Relu")
    pads = b.init("pads", np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64))
    b.op("Pad", [x, pads], (1, 5, 8, 8), mode=mode)
    b.conv(3, 3, name="c2")
    b.zero_filter("c1", 3)
    out, rep = simplified(b.model())
    assert io(rep, "c2") in ([(4, 3)] if removable else [(4, 3), (5, 3)])


def test_per_channel_constants_are_sliced():
    """Add [C,1,1], Mul [1,C,1,1], PRelu slope [C,1,1]: per-channel parameters lose the removed entry."""
    b = GraphBuilder(3, 5, 5, seed=44)
    b.conv(6, 3, pads=1, name="c1")
    shift = b.init("shift", b._randn(6, 1, 1))
    x = b.op("Add", [b.cur, shift], b.shape)
    scale = b.init("scale", b._randn(1, 6, 1, 1))
    x = b.op("Mul", [x, scale], b.shape)
    slope = b.init("slope", np.abs(b._randn(6, 1, 1)) * 0.2)
    b.op("PRelu", [x, slope], b.shape)
    b.conv(4, 3, pads=1, name="c2")
    b.zero_filter("c1", 5)
    out, rep = simplified(b.model())
    assert io(rep, "c1") == (3, 5)
    assert io(rep, "c2") == (5, 4)
    shapes = sorted(v.shape for k, v in inits_of(out).items() if v.size == 5 and v.ndim >= 3)
    assert shapes == [(1, 5, 1, 1), (5, 1, 1), (5, 1, 1)]


def test_shared_weight_initializer():
    """Two convs tied to one weight initializer: removal gives each its own copy, exactly."""
    b = GraphBuilder(3, 5, 5, seed=45)
    x = b.cur
    a = b.conv(4, 1, name="ca", x=x)
    shared = b.layers["ca"]["weight"]
    c = b.conv(4, 1, name="cb", x=x)
    b.nodes[-1].input[1] = shared
    b.layers["cb"]["weight"] = shared
    b.concat([a, c])
    b.act("Relu")
    b.conv(3, 1, name="c2")
    b.zero_filter("ca", 1)           # zeroes row 1 of both convs
    out, rep = simplified(b.model())
    assert io(rep, "ca") == (3, 3) and io(rep, "cb") == (3, 3)
    assert io(rep, "c2") == (6, 3)


def test_three_way_sum_residual():
    b = GraphBuilder(3, 5, 5, seed=46)
    x = b.cur
    outs = [b.conv(5, k, pads=k // 2, name=f"c{k}", x=x) for k in (1, 3, 5)]
    b.op("Sum", outs, b.shapes[outs[0]])
    b.act("Relu")
    b.conv(3, 1, name="c2")
    for k in (1, 3, 5):
        b.zero_filter(f"c{k}", 2)
    out, rep = simplified(b.model())
    assert io(rep, "c1") == (3, 4) and io(rep, "c3") == (3, 4) and io(rep, "c5") == (3, 4)
    assert io(rep, "c2") == (4, 3)


def test_gap_squeeze_gemm():
    b = GraphBuilder(3, 5, 5, seed=47)
    b.conv(4, 3, pads=1, name="c1")
    b.act("Relu")
    b.global_avg_pool()
    axes = b.init("axes", np.array([2, 3], np.int64))
    b.op("Squeeze", [b.cur, axes], (1, 4))
    b.gemm(3, name="fc")
    b.zero_filter("c1", 0)
    out, rep = simplified(b.model())
    assert io(rep, "fc") == (3, 3)


@pytest.mark.parametrize("shape", [[1, -1], [0, -1], [-1, 48], [1, 48]])
def test_reshape_flatten_gemm_variants(shape):
    """Exporters write flatten as Reshape with -1 / 0 entries: the shape constant must follow."""
    b = GraphBuilder(3, 4, 4, seed=48)
    b.conv(3, 3, pads=1, name="c1", b=np.array([0.3, 0.6, 0.2], np.float32))
    b.act("Relu")
    s = b.init("flat_shape", np.array(shape, np.int64))
    b.op("Reshape", [b.cur, s], (1, 48))
    b.gemm(5, name="fc")
    b.zero_filter("c1", 1)
    out, rep = simplified(b.model())
    assert io(rep, "c1") == (3, 2)
    assert io(rep, "fc") == (32, 5)


# --- regressions: bugs these tests found (since fixed) ---------------------------------------------

# Regression (found here, since fixed): run_to_fixed_point stops after max_rounds=8; a cascade of constant
# channels through more than 8 layers is left half simplified (exact, but k8..k11 keep their dead
# channels)
def test_long_constant_cascade_reaches_the_fixed_point():
    b = GraphBuilder(2, 5, 5, seed=50)
    b.conv(2, 1, name="c0")
    b.zero_filter("c0", 0)
    b.zero_filter("c0", 1)     # c0's output is constant: every layer after it computes a constant
    for i in range(12):
        b.act("Relu")
        b.conv(2, 1, name=f"k{i}")
    out, rep = simplified(b.model())
    for i in range(11):
        assert io(rep, f"k{i}")[1] == 1, (f"k{i}", io(rep, f"k{i}"))


# Regression (found here, since fixed): a channel that is constant 0 (zero filter without bias, or Relu of a
# negative bias) read by a zero-padded Conv / a ConvTranspose whose input H×W is dynamic: the read is
# judged absorbable (v == 0 is exact anywhere) but absorb() builds the border map from the static
# spatial shape and crashes on None (channels/linear.py)
@pytest.mark.parametrize("reader", ["conv3x3", "conv_transpose"])
@pytest.mark.parametrize("source", ["no_bias", "relu_negative_bias"])
def test_zero_constant_into_padded_reader_dynamic_spatial(reader, source):
    b = GraphBuilder(2, 5, 5, seed=51)
    if source == "no_bias":
        b.conv(3, 1, bias=False, name="c1")
    else:
        b.conv(3, 1, b=np.full(3, -0.5, np.float32), name="c1")
        b.act("Relu")
    if reader == "conv3x3":
        b.conv(2, 3, pads=1, name="r")
    else:
        b.conv_transpose(2, 3, stride=2, pads=1, name="r")
    b.zero_filter("c1", 0)
    m = b.model(dynamic_hw=True)
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((1, 2) + hw).astype(np.float32)} for hw in ((5, 5), (6, 9))]
    out, rep = simplify(m, inputs=feeds, atol=ATOL, rtol=RTOL, **EXACT)
    assert io(rep, "c1") == (2, 2)
    assert io(rep, "r")[0] == 2
    for f in feeds + [{"x": rng.standard_normal((1, 2, 7, 4)).astype(np.float32)}]:
        np.testing.assert_allclose(run(out, f)[0], run(m, f)[0], atol=ATOL, rtol=RTOL)


# Regression (found here, since fixed): Resize is treated as constant-preserving (CONSTANT_PRESERVING in
# channels/spatial.py), but coordinate_transformation_mode=tf_crop_and_resize samples outside the ROI
# get extrapolation_value (0): the constant channel is not constant there, yet it is absorbed into
# c2's bias and removed -> ParityError
def test_resize_crop_and_resize_extrapolation_is_not_constant():
    b = GraphBuilder(3, 4, 4, seed=52)
    b.conv(4, 1, name="c1", b=np.full(4, 0.5, np.float32))
    x = b.act("Relu")
    roi = b.init("roi", np.array([0, 0, -0.5, -0.5, 1, 1, 1.5, 1.5], np.float32))
    scales = b.init("scales", np.array([1, 1, 2, 2], np.float32))
    b.op("Resize", [x, roi, scales], (1, 4, 8, 8), mode="linear",
         coordinate_transformation_mode="tf_crop_and_resize", extrapolation_value=0.0)
    b.conv(3, 1, name="c2")
    b.zero_filter("c1", 1)
    simplified(b.model())


# Regression (found here, since fixed): with an initializer also listed as a graph input (torch.onnx
# keep_initializers_as_inputs=True, IR<4-style models) simplify shrank the initializer but left the
# graph input's declared shape: onnxruntime refused the result ('Shape of initializer c1_W_1 does not
# match'). Such initializers are overridable defaults, not constants: the layers keep them as they are.
@pytest.mark.parametrize("listed", ["all", "c1_weight", "none"])
def test_initializers_listed_as_graph_inputs(listed):
    b = GraphBuilder(3, 5, 5, seed=1)
    b.conv(4, 1, name="c1")
    b.act("Relu")
    b.conv(2, 1, name="c2")
    b.zero_filter("c1", 1)
    names = {"all": sorted(b.inits), "c1_weight": [b.layers["c1"]["weight"]], "none": []}[listed]
    out, rep = simplified(b.model(inits_as_inputs=names))
    assert io(rep, "c1") == ((3, 4) if names else (3, 3))
    kept_inputs = {i.name for i in out.graph.input}
    assert set(names) <= kept_inputs


# Regression (found here, since fixed): a constant operand of rank < 3 ('x * 0.5', 'x / 6' as exported: shape
# [], [1] or [1,1]) broadcasts along the channels, but Elementwise.couple finds no aligned channel
# axis for it and pins the whole tensor ('constant operand shape not per-channel'): the dead channel
# is kept
@pytest.mark.parametrize("op", ["Mul", "Div", "Add"])
@pytest.mark.parametrize("shape", [(), (1,), (1, 1)])
def test_scalar_constant_operand_does_not_pin(op, shape):
    b = GraphBuilder(3, 5, 5, seed=54)
    b.conv(6, 1, name="c1", b=np.full(6, 0.5, np.float32))
    b.act("Relu")
    b.op(op, [b.cur, b.init("k", np.full(shape, 2.0, np.float32))], b.shape)
    b.conv(3, 3, pads=1, name="c2")
    b.zero_filter("c1", 1)
    out, rep = simplified(b.model())
    assert io(rep, "c1") == (3, 5)


def test_rank3_or_rank4_scalar_constant_operand():
    """The same with [1,1,1] / [1,1,1,1] constants works: the channel goes."""
    for shape in [(1, 1, 1), (1, 1, 1, 1)]:
        b = GraphBuilder(3, 5, 5, seed=54)
        b.conv(6, 1, name="c1", b=np.full(6, 0.5, np.float32))
        b.act("Relu")
        b.op("Mul", [b.cur, b.init("k", np.full(shape, 2.0, np.float32))], b.shape)
        b.conv(3, 3, pads=1, name="c2")
        b.zero_filter("c1", 1)
        out, rep = simplified(b.model())
        assert io(rep, "c1") == (3, 5)


# Regression (found here, since fixed): an unknown op on a channels-last tensor (ConvNeXt-style NHWC
# LayerNormalization / Softmax) gets a pinned space on axis 1 (= H) from Rule.pin_through; the
# Transpose back to NCHW moves it to axis 2 and Conv.reads (or Flatten's Reshape.values) indexes that
# H-sized value array with C channels -> IndexError while building the channel graph, even with
# nothing pruned
@pytest.mark.parametrize("reader", ["conv", "gap_flatten_gemm", "concat"])
@pytest.mark.parametrize("op", ["Softmax", "LayerNormalization"])
def test_unknown_op_on_channels_last_then_conv(op, reader):
    b = GraphBuilder(3, 5, 5, seed=55)
    b.conv(6, 1, name="c1")
    b.op("Transpose", [b.cur], (1, 5, 5, 6), perm=[0, 2, 3, 1])
    if op == "Softmax":
        b.op("Softmax", [b.cur], (1, 5, 5, 6), axis=-1)
    else:
        b.op("LayerNormalization", [b.cur, b.init("ln_g", np.ones(6, np.float32)),
                                    b.init("ln_b", np.zeros(6, np.float32))], (1, 5, 5, 6), axis=-1)
    t = b.op("Transpose", [b.cur], (1, 6, 5, 5), perm=[0, 3, 1, 2])
    expected_in = 6
    if reader == "gap_flatten_gemm":  # the crash then moves to Reshape.values (Flatten)
        b.global_avg_pool()
        b.flatten()
    elif reader == "concat":  # ... or to Concat.values (ValueError: stacks value arrays of different sizes)
        b.concat([b.conv(2, 1, name="side", x=t), t])
        expected_in = 8
    (b.gemm if reader == "gap_flatten_gemm" else b.conv)(3, name="c2")
    out, rep = simplified(b.model())
    assert io(rep, "c2") == (expected_in, 3)
    assert op in pinned_reasons(rep)


# Regression (found here, since fixed): wrong result: same wrong-axis pin as above — the NHWC
# LayerNormalization output, transposed back, carries a space on H; the SE gate's Mul takes H as its
# channel axis, the gate [N,C,1,1] looks broadcast along it, so the gate conv's output channels count
# as unread and are removed (gate becomes [N,1,1,1]) -> ParityError with nothing pruned
@pytest.mark.parametrize("c,hw", [(2, 5), (4, 5), (3, 3)])
def test_channels_last_layernorm_then_se_gate(c, hw):
    b = GraphBuilder(c, hw, hw, seed=56)
    b.op("Transpose", [b.cur], (1, hw, hw, c), perm=[0, 2, 3, 1])
    b.op("LayerNormalization", [b.cur, b.init("ln_g", np.ones(c, np.float32)),
                                b.init("ln_b", np.zeros(c, np.float32))], (1, hw, hw, c), axis=-1)
    t = b.op("Transpose", [b.cur], (1, c, hw, hw), perm=[0, 3, 1, 2])
    b.global_avg_pool()
    b.conv(c, 1, name="gate_conv")
    gate = b.act("Sigmoid")
    b.mul(t, gate)
    out, rep = simplified(b.model())
    assert io(rep, "gate_conv") == (c, c)


# Regression (found here, since fixed): reshape_channel_map is ambiguous for a 1-channel tensor (size-1
# dims): through Reshape / Unsqueeze+Squeeze (or a 2-channel shuffle after one channel was removed)
# the channel space lands on the H axis; a Concat then takes that axis for its channel range and
# Concat.values np.stack()s value arrays of different sizes -> ValueError (same root cause as the GAP
# -> Flatten TypeError in test_fuzz.test_regression_flatten_...)
@pytest.mark.parametrize("path", ["reshape_5d_and_back", "unsqueeze_squeeze", "shuffle_after_removal"])
def test_single_channel_reshape_then_concat(path):
    b = GraphBuilder(3, 5, 5, seed=57)
    if path == "shuffle_after_removal":
        b.conv(2, 1, bias=False, name="c1")
        b.zero_filter("c1", 0)            # removed in round 1: the shuffle is then [1,1,1,5,5]
        t = b.shuffle(2)
    else:
        x = b.conv(1, 1, name="c1")
        if path == "reshape_5d_and_back":
            t = b.op("Reshape", [x, b.init("s5", np.array([1, 1, 1, 5, 5], np.int64))], (1, 1, 1, 5, 5))
            t = b.op("Reshape", [t, b.init("s4", np.array([1, 1, 5, 5], np.int64))], (1, 1, 5, 5))
        else:
            t = b.op("Unsqueeze", [x, b.init("ax", np.array([2], np.int64))], (1, 1, 1, 5, 5))
            t = b.op("Squeeze", [t, b.init("ax2", np.array([2], np.int64))], (1, 1, 5, 5))
    b.concat([t, b.conv(2, 1, name="side", x=t)])
    b.conv(3, 1, name="c2")
    out, rep = simplified(b.model())
    assert io(rep, "c2")[0] == 3


@pytest.mark.parametrize("listed_as_inputs", [False, True])
def test_scalar_initializers_keep_rank_0(listed_as_inputs):
    b = GraphBuilder(3, 5, 5, seed=58)
    b.conv(4, 1, name="c1")
    b.act("Clip")
    b.op("Mul", [b.cur, b.init("half", np.array(0.5, np.float32))], b.shape)
    b.conv(2, 1, name="c2")
    scalars = sorted(k for k, v in b.inits.items() if v.ndim == 0)
    m = b.model(inits_as_inputs=scalars if listed_as_inputs else ())
    out, rep = simplified(m)
    dims = {t.name: list(t.dims) for t in out.graph.initializer}
    assert all(dims[k] == [] for k in scalars if k in dims), dims
