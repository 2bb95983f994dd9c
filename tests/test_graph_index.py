"""The Graph's use-def index against the index rebuilt from scratch, after random edit sequences.

Every edit the passes make goes through Graph methods; if one of them forgot to update the index,
some later `producer`/`consumers` answer would be stale and a rewrite would read the wrong node.
The oracle is a fresh Graph of the written-back model, which indexes by scanning."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from onnxprune.errors import OnnxPruneError
from onnxprune.graph import Graph


def _chain_model(n: int) -> onnx.ModelProto:
    nodes = [helper.make_node("Relu", [f"t{k}"], [f"t{k + 1}"], name=f"n{k}") for k in range(n)]
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("t0", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info(f"t{n}", TensorProto.FLOAT, [1, 4])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _index_of(g: Graph):
    producers = {k: v.name for k, v in g.producers().items()}
    consumers = {k: sorted(n.name for n in v) for k, v in g.consumers().items() if v}
    return producers, consumers


def _apply(g: Graph, edits) -> None:
    counter = 0
    for kind, a, b in edits:
        nodes = g.nodes
        names = sorted(g.producers()) + ["t0"]
        node = nodes[a % len(nodes)]
        if kind == "set_input":
            g.set_input(node, 0, names[b % len(names)])
        elif kind == "set_output" and node.output[0] not in g.output_names:
            counter += 1
            g.set_output(node, 0, f"renamed{counter}")
        elif kind == "insert":
            counter += 1
            g.insert_after(node, [helper.make_node("Neg", [node.output[0]], [f"ins{counter}"], name=f"ins{counter}")])
        elif kind == "remove" and len(nodes) > 1 and node.output[0] not in g.output_names:
            g.remove_node(node)
        elif kind == "rename":
            g.rename_input_everywhere(node.output[0], "t0")
        elif kind == "const":
            g.set_input_const(node, 0, np.ones((1, 4), np.float32))


EDITS = st.lists(st.tuples(st.sampled_from(["set_input", "set_output", "insert", "remove", "rename", "const"]),
                           st.integers(0, 50), st.integers(0, 50)), max_size=25)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 8), edits=EDITS)
def test_index_equals_rebuilt_index(n, edits):
    g = Graph(_chain_model(n))
    _apply(g, edits)
    live = _index_of(g)
    rebuilt = _index_of(Graph(g.to_model()))
    # to_model drops unused initializers, which the live index never listed as produced: equal
    assert live == rebuilt
    assert [x.name for x in g.nodes] == [x.name for x in Graph(g.to_model()).nodes]


def test_insert_after_keeps_order_and_uses():
    g = Graph(_chain_model(3))
    first = g.nodes[0]
    g.insert_after(first, [helper.make_node("Neg", ["t1"], ["x"], name="neg")])
    assert [n.name for n in g.nodes] == ["n0", "neg", "n1", "n2"]
    assert g.uses("t1") == 2 and g.producer("x").name == "neg"
    g.remove_node(g.producer("x"))
    assert g.uses("t1") == 1 and g.producer("x") is None
    assert [n.name for n in g.nodes] == ["n0", "n1", "n2"]


def test_to_model_leaves_the_live_nodes_live():
    # a pass that holds a node across to_model() (prune's activation statistics do) must still edit the graph
    g = Graph(_chain_model(2))
    node = g.nodes[1]
    g.to_model()
    g.set_input(node, 0, "t0")
    assert g.to_model().graph.node[1].input[0] == "t0"


def test_signature_lists_real_inputs_only():
    model = _chain_model(1)
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.ones((1, 4), np.float32), "default"))
    model.graph.input.append(helper.make_tensor_value_info("default", TensorProto.FLOAT, [1, 4]))
    model.graph.node[0].op_type = "Add"
    model.graph.node[0].input.append("default")
    g = Graph(model)
    assert [i.name for i in g.signature().graph.input] == ["t0"]
    assert [o.name for o in g.signature().graph.output] == ["t1"]


def test_topo_sort_is_stable_and_linear_on_reversed_chains():
    model = _chain_model(3000)
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))
    g = Graph(model)
    g.topo_sort()
    assert [n.name for n in g.nodes] == [f"n{k}" for k in range(3000)]


def test_topo_sort_refuses_cycles():
    model = _chain_model(2)
    model.graph.node[0].input[0] = "t2"  # n0 reads n1's output: a cycle
    g = Graph(model)
    with pytest.raises(OnnxPruneError, match="cycle"):
        g.topo_sort()
