"""The rule registry: users describe their own ops, rules declare what they can do."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from onnxprune.channels import Elementwise, Rule, capabilities, register_rule, unregister_rule
from onnxprune.parity import compare

DOMAIN = "com.example"


def model_with_custom_op() -> onnx.ModelProto:
    """conv1 (8 filters) -> com.example.MyRelu (a model-local function: onnxruntime runs it) ->
    conv2, which reads channels 0..3 of conv1 with all-zero weights: those four are dead."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    w2 = rng.standard_normal((5, 8, 1, 1)).astype(np.float32)
    w2[:, :4] = 0
    body = helper.make_node("Relu", ["X"], ["Y"])
    fn = helper.make_function(DOMAIN, "MyRelu", ["X"], ["Y"], [body], [helper.make_opsetid("", 17)])
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("MyRelu", ["a"], ["r"], domain=DOMAIN, name="my_relu"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2")]
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b1"),
             numpy_helper.from_array(w2, "w2")]
    g = helper.make_graph(nodes, "custom", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, 6, 6])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)],
                          functions=[fn], ir_version=10)
    onnx.checker.check_model(m)
    return m


@pytest.fixture
def my_relu_rule():
    register_rule("MyRelu", Elementwise(data_inputs=1), domain=DOMAIN)
    yield
    unregister_rule("MyRelu", domain=DOMAIN)


def weights(model, name):
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def conv_weights(model):
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    return [weights(model, n.input[1]).shape for n in convs]


def test_an_unknown_custom_op_pins_its_channels():
    m = model_with_custom_op()
    out, report = onnxprune.simplify(m, align=1)
    assert conv_weights(out) == [(8, 3, 3, 3), (5, 8, 1, 1)]
    assert report.parity.passed
    assert any("MyRelu my_relu: op not understood" in r for r in onnxprune.inspect(m).classes["pinned"])


def test_a_registered_custom_op_lets_dead_channels_go_exactly(my_relu_rule):
    m = model_with_custom_op()
    out, report = onnxprune.simplify(m, align=1)
    assert conv_weights(out) == [(4, 3, 3, 3), (5, 4, 1, 1)]
    assert report.parity.passed
    assert compare(m, out).passed  # an independent run of both on onnxruntime
    assert any(n.domain == DOMAIN for n in out.graph.node)


def test_rules_declare_what_they_can_do():
    conv = helper.make_node("Conv", ["x", "w"], ["y"])
    assert capabilities(conv) == {"couple", "values", "reads", "absorb", "rewrite", "permute"}
    assert capabilities(helper.make_node("Split", ["x"], ["a", "b"])) == {"couple", "values", "rewrite"}
    assert capabilities(helper.make_node("MyRelu", ["x"], ["y"], domain=DOMAIN)) == set()
    assert Rule().can == frozenset()


def test_register_rule_refuses_what_cannot_work():
    class ReadsOnly(Rule):
        def reads(self, node, cg):
            return []

    with pytest.raises(TypeError, match="not a onnxprune.channels.Rule"):
        register_rule("X", object(), domain=DOMAIN)
    with pytest.raises(TypeError, match="cannot absorb"):
        register_rule("X", ReadsOnly(), domain=DOMAIN)
    assert capabilities(helper.make_node("X", ["x"], ["y"], domain=DOMAIN)) == set()


def test_register_rule_as_a_class_decorator():
    @register_rule("Passthrough", domain=DOMAIN, permute=True)
    class Passthrough(Elementwise):
        pass

    try:
        assert capabilities(helper.make_node("Passthrough", ["x"], ["y"], domain=DOMAIN)) == {
            "couple", "values", "rewrite", "permute"}
    finally:
        unregister_rule("Passthrough", domain=DOMAIN)
