"""Cleanup: Constant nodes to initializers, Identity/Dropout removal, constant folding of
initializer-only subgraphs, dead nodes and unused initializers."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..graph import Graph, _subgraph_inputs, topo_sort
from .base import Context

PASS = "cleanup"
NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
FOLD_LIMIT = 1 << 22  # don't materialize constant outputs above 4M elements


def cleanup(g: Graph, ctx: Context) -> bool:
    changed = constants_to_initializers(g)
    changed |= remove_identities(g, ctx)
    changed |= fold_static_shapes(g, ctx)
    changed |= fold_constants(g, ctx)
    changed |= remove_dead_nodes(g)
    topo_sort(g.g, g.inits)
    return changed


def constants_to_initializers(g: Graph) -> bool:
    changed = False
    for node in g.nodes:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output[0] not in g.output_names:
            a = node.attribute[0]
            if a.name == "value":
                value = numpy_helper.to_array(a.t)
            elif a.name in ("value_float", "value_int"):
                value = np.array(helper.get_attribute_value(a), dtype=np.float32 if a.name == "value_float" else np.int64)
            elif a.name in ("value_floats", "value_ints"):
                value = np.array(helper.get_attribute_value(a), dtype=np.float32 if a.name == "value_floats" else np.int64)
            else:  # sparse or string constants: leave them
                continue
            g.inits[node.output[0]] = value
            g.remove_node(node)
            changed = True
    return changed


def remove_identities(g: Graph, ctx: Context) -> bool:
    """Identity and inference-mode Dropout pass their input through: drop them."""
    changed = False
    for node in g.nodes:
        is_dropout = node.op_type == "Dropout" and not (len(node.output) > 1 and node.output[1] and g.uses(node.output[1]))
        if node.op_type != "Identity" and not is_dropout:
            continue
        if is_dropout and len(node.input) > 2 and node.input[2]:
            mode = g.const(node.input[2])
            if mode is None or bool(mode):  # training_mode on (or unknown): not an identity
                continue
        src, dst = node.input[0], node.output[0]
        if dst in g.output_names:
            producer = g.producers().get(src)
            # keep graph I/O names: rename the producer's output to the graph output's name instead
            if producer is None or src in g.output_names:
                continue
            producer.output[list(producer.output).index(src)] = dst
            g.rename_input_everywhere(src, dst)
        else:
            g.rename_input_everywhere(dst, src)
        g.remove_node(node)
        ctx.log(PASS, "remove", node.name or node.op_type, node.op_type)
        changed = True
    return changed


def fold_static_shapes(g: Graph, ctx: Context) -> bool:
    """Shape / Size of a tensor whose shape is fully static is a constant (exporters emit them
    for x.view(x.size(0), ...)); folding them lets the reshapes they feed be understood."""
    targets = [n for n in g.nodes if n.op_type in ("Shape", "Size") and n.domain in ("", "ai.onnx")]
    if not targets:
        return False
    g.invalidate_shapes()
    changed = False
    for node in targets:
        shape = g.shapes.get(node.input[0])
        if shape is None or any(d is None for d in shape) or node.output[0] in g.output_names:
            continue
        if node.op_type == "Size":
            value = np.array(int(np.prod(shape, dtype=np.int64)), dtype=np.int64)
        else:
            a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
            value = np.array(shape[a.get("start", 0): a.get("end", len(shape))], dtype=np.int64)
        g.inits[node.output[0]] = value
        g.remove_node(node)
        ctx.log(PASS, "fold", node.name or node.op_type, node.op_type)
        changed = True
    return changed


def fold_constants(g: Graph, ctx: Context) -> bool:
    """Evaluate nodes whose inputs are all initializers (shape arithmetic, weight transposes ...)."""
    from onnx.reference import ReferenceEvaluator

    changed = False
    for node in g.nodes:
        if node.op_type in NONDETERMINISTIC or node.domain not in ("", "ai.onnx") or not node.input:
            continue
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            continue
        if not all(i == "" or g.is_const(i) for i in node.input):
            continue
        if any(o in g.output_names for o in node.output):
            continue
        feeds = {i: g.inits[i] for i in node.input if i}
        try:
            inputs = [helper.make_tensor_value_info(i, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for i, v in feeds.items()]
            outputs = [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in node.output if o]
            tiny = helper.make_model(helper.make_graph([node], "fold", inputs, outputs), opset_imports=g.model.opset_import)
            results = ReferenceEvaluator(tiny).run(None, feeds)
        except Exception:
            continue  # the reference evaluator cannot do it: leave the node alone
        if sum(np.asarray(r).size for r in results) > FOLD_LIMIT:
            continue
        for o, r in zip([o for o in node.output if o], results):
            g.inits[o] = np.asarray(r)
        g.remove_node(node)
        ctx.log(PASS, "fold", node.name or node.op_type, node.op_type)
        changed = True
    return changed


def remove_dead_nodes(g: Graph) -> bool:
    """Drop nodes that no graph output depends on."""
    producers = g.producers()
    live: set[int] = set()
    stack = list(g.output_names)
    seen = set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        node = producers.get(name)
        if node is not None and id(node) not in live:
            live.add(id(node))
            stack.extend(i for i in node.input if i)
            stack.extend(_subgraph_inputs(node))
    dead = [n for n in g.nodes if id(n) not in live]
    for n in dead:
        g.remove_node(n)
    return bool(dead)

