"""Cleanup: Constant nodes to initializers, Identity/Dropout removal, constant folding of
initializer-only subgraphs, dead nodes and unused initializers."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..graph import Graph, _subgraph_inputs, attrs, static_shapes
from .base import Context

PASS = "cleanup"
NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
FOLD_LIMIT = 1 << 22  # don't materialize constant outputs above 4M elements


def cleanup(g: Graph, ctx: Context) -> bool:
    changed = constants_to_initializers(g)
    changed |= remove_identities(g, ctx)
    if changed:  # shape inference sees through the folded constants now
        g.invalidate_shapes()
    changed |= fold_static_shapes(g, ctx)
    changed |= fold_constants(g, ctx)
    changed |= copy_batch_dims(g, ctx)
    changed |= remove_dead_nodes(g)
    g.topo_sort()
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
            g.set_output(producer, list(producer.output).index(src), dst)
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
    changed = _fold_static_shape_dims(g, ctx, targets)
    for node in targets:
        shape = g.shapes.get(node.input[0])
        if shape is None or any(d is None for d in shape) or node.output[0] in g.output_names:
            continue
        if node.op_type == "Size":
            value = np.array(int(np.prod(shape, dtype=np.int64)), dtype=np.int64)
        else:
            a = attrs(node)
            value = np.array(shape[a.get("start", 0): a.get("end", len(shape))], dtype=np.int64)
        g.inits[node.output[0]] = value
        g.remove_node(node)
        ctx.log(PASS, "fold", node.name or node.op_type, node.op_type)
        changed = True
    return changed


def _fold_static_shape_dims(g: Graph, ctx: Context, shape_nodes) -> bool:
    """Gather(Shape(S), k) is a constant when S's dim k is static, even if its batch dim is not."""
    shapes = {n.output[0]: n.input[0] for n in shape_nodes if n.op_type == "Shape" and not attrs(n).get("start", 0)}
    changed = False
    for node in g.nodes:
        if node.op_type != "Gather" or node.input[0] not in shapes or int(attrs(node).get("axis", 0)) != 0:
            continue
        index, dims = g.const(node.input[1]), g.shapes.get(shapes[node.input[0]])
        if index is None or dims is None or node.output[0] in g.output_names:
            continue
        picked = np.take(np.array([-1 if d is None else d for d in dims], np.int64), index)
        if np.any(picked < 0):
            continue
        g.inits[node.output[0]] = picked
        g.remove_node(node)
        ctx.log(PASS, "fold", node.name or node.op_type, "static dim of a shape")
        changed = True
    return changed


def copy_batch_dims(g: Graph, ctx: Context) -> bool:
    """Reshape(D, Concat(dim i of Shape(S), constants ...)) with a symbolic batch — how exporters write
    x.view(x.size(0), ...) — becomes Reshape(D, [0, constants ...]): 0 copies D's own dim i, which is
    the same dim when D is S or shape inference gives both the same symbol. Expand likewise, with 1
    (keep D's own dim) for the entries that repeat D's dims (x[:, :, None].expand(b, h, rep, n, d) of
    the GQA repeat). A Reshape may infer one dim that is none of D's (-1). The shape is then constant
    and the channels can be tracked."""
    producers = g.producers()
    targets = [(n, _shape_pieces(g, producers, n.input[1])) for n in g.nodes if n.op_type in ("Reshape", "Expand")
               and not g.is_const(n.input[1]) and not int(attrs(n).get("allowzero", 0))]
    targets = [(n, parts) for n, parts in targets if parts is not None]
    if not targets:
        return False
    symbolic = static_shapes(g.weightless(), symbolic=True)
    changed = False
    for node, parts in targets:
        data, pieces = node.input[0], []
        # an Expand's shape aligns with the data's trailing axes
        shift = len(parts) - len(symbolic.get(data, ())) if node.op_type == "Expand" else 0
        # a Reshape may leave one dim to be inferred (-1): the sequence length moved to another axis
        infer = node.op_type == "Reshape" and -1 not in parts
        for part in parts:
            if isinstance(part, int):
                pieces.append(part)
            elif _same_dim(symbolic, data, len(pieces) - shift, *part):
                pieces.append(0 if node.op_type == "Reshape" else 1)
            elif infer:
                pieces.append(-1)
                infer = False
            else:
                break
        else:
            g.set_input_const(node, 1, np.array(pieces, np.int64), base=f"{node.name}_shape")
            ctx.log(PASS, "fold", node.name, f"{node.op_type.lower()} shape with a copied batch dim")
            changed = True
    return changed


def _shape_pieces(g: Graph, producers, name: str) -> list | None:
    """A shape tensor built from pieces: each entry an int or (S, k) for dim k of Shape(S); None if
    it is not. Looks through Concat, a Reshape to [-1], and torch's expand idiom
    Where(Equal(s, -1), 1, s) (s itself when no entry of s is -1, as no dim of a Shape is)."""
    node = producers.get(name)
    if node is None:
        return None
    if node.op_type == "Reshape" and g.const(node.input[1]) is not None and g.const(node.input[1]).tolist() == [-1]:
        return _shape_pieces(g, producers, node.input[0])
    if node.op_type == "Where":
        equal, s = producers.get(node.input[0]), node.input[2]
        ones = g.const(node.input[1])
        if (equal is None or equal.op_type != "Equal" or list(equal.input) != [s, equal.input[1]]
                or g.const(equal.input[1]) is None or not np.all(g.const(equal.input[1]) == -1)
                or ones is None or not np.all(ones == 1)):
            return None
        pieces = _shape_pieces(g, producers, s)
        return pieces if pieces is not None and -1 not in pieces else None
    if node.op_type != "Concat":
        return None
    pieces = []
    for part in node.input:
        value = g.const(part)
        if value is not None and value.ndim <= 1:
            pieces.extend(int(v) for v in value.reshape(-1))
            continue
        source = _shape_dim(g, producers, part)
        if source is None:
            return None
        pieces.append(source)
    return pieces


def _shape_dim(g: Graph, producers, name: str):
    """(S, k) if `name` is the 1-element tensor [dim k of Shape(S)] (Gather of a Shape, or a Shape
    from k to k + 1), else None."""
    node = producers.get(name)
    if node is not None and node.op_type == "Shape":
        a = attrs(node)
        start = int(a.get("start", 0))
        return (node.input[0], start) if start >= 0 and int(a.get("end", start)) == start + 1 else None
    if node is not None and node.op_type == "Unsqueeze":
        node = producers.get(node.input[0])
    if node is None or node.op_type != "Gather" or int(attrs(node).get("axis", 0)) != 0:
        return None
    index, shape = g.const(node.input[1]), producers.get(node.input[0])
    if index is None or index.size != 1 or shape is None or shape.op_type != "Shape" or attrs(shape).get("start", 0):
        return None
    return shape.input[0], int(index.reshape(()))


def _same_dim(shapes, a: str, i: int, b: str, k: int) -> bool:
    if a == b and i == k:
        return True
    sa, sb = shapes.get(a), shapes.get(b)
    if sa is None or sb is None or not 0 <= i < len(sa) or k >= len(sb):
        return False
    return sa[i] is not None and sa[i] == sb[k]


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

