"""Load, save and edit ONNX models: a thin mutable view over a ModelProto.

Initializers live as numpy arrays in `Graph.inits` while passes run; `Graph.to_model()`
writes them back. Nodes are the ModelProto's own NodeProtos, edited in place.
"""

from __future__ import annotations

import contextlib
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import OnnxPruneError
from .files import EXTERNAL_DATA_SUFFIX, Outputs

# onnxruntime 1.2x/1.3x accepts IR versions up to 10.
MAX_IR_VERSION = 10
PROTOBUF_LIMIT = 2**31 - 1
SUPPORTED_OPSET = (7, 23)


def load_model(src: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """A private copy of the model, external data loaded; bad input raises OnnxPruneError."""
    if isinstance(src, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(src)
        return _validated(model, "model")
    path = Path(src)
    if not path.exists():
        raise OnnxPruneError(f"{path}: no such file")
    if not path.is_file():
        raise OnnxPruneError(f"{path}: not a file")
    try:
        model = onnx.load(str(path), load_external_data=True)
    except Exception as e:  # protobuf raises DecodeError and friends
        raise OnnxPruneError(f"{path}: not a readable ONNX model ({_first_line(e)})") from None
    return _validated(model, str(path), checkable=str(path))


def _validated(model: onnx.ModelProto, what: str, checkable=None) -> onnx.ModelProto:
    if not model.graph.node:
        raise OnnxPruneError(f"{what}: not an ONNX model (empty graph)")
    try:  # the checker takes a path for models over 2 GB (external data)
        onnx.checker.check_model(checkable if checkable and model.ByteSize() > PROTOBUF_LIMIT else model, full_check=False)
    except Exception as e:
        raise OnnxPruneError(f"{what}: invalid ONNX model ({_first_line(e)})") from None
    opset = default_opset(model)
    if not SUPPORTED_OPSET[0] <= opset <= SUPPORTED_OPSET[1]:
        raise OnnxPruneError(
            f"{what}: opset {opset} is outside the supported range "
            f"{SUPPORTED_OPSET[0]}..{SUPPORTED_OPSET[1]}"
        )
    return model


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def check_pins(graph: onnx.GraphProto, pins) -> None:
    """--pin names tensors of the model as given: an unknown name is an error in every command."""
    names = {n for node in graph.node for n in list(node.input) + list(node.output)}
    names |= {i.name for i in graph.input} | {t.name for t in graph.initializer}
    unknown = sorted(set(pins) - names)
    if unknown:
        raise OnnxPruneError(f"--pin: no tensor named {', '.join(unknown)} in the model "
                             "(`onnxprune inspect` lists the inputs and outputs; Netron shows every tensor)")


def tensor_signature(model: onnx.ModelProto) -> dict[str, list[dict]]:
    """Graph inputs (initializers excluded) and outputs: name, element type, shape (a name for a
    symbolic dim, '?' for an unknown one)."""
    inits = {t.name for t in model.graph.initializer}

    def describe(vi):
        t = vi.type.tensor_type
        dtype = onnx.TensorProto.DataType.Name(t.elem_type).lower() if vi.type.HasField("tensor_type") else "non-tensor"
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim] \
            if t.HasField("shape") else "unknown"
        return {"name": vi.name, "dtype": dtype, "shape": shape}

    return {"inputs": [describe(i) for i in model.graph.input if i.name not in inits],
            "outputs": [describe(o) for o in model.graph.output]}


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 0


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """A temporary path with `path`'s own name to write one file to: moved onto `path` when the
    block succeeds, removed when it fails, so nobody ever reads a half-written file (see
    files.Outputs for several files at once)."""
    with Outputs() as out:
        yield out.path(path)


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write atomically; models over 2 GB go to external data (<name>.data next to it)."""
    with Outputs() as out:
        write_model(model, out.path(path))


def write_model(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write a model to `path` (not atomically: give it an `Outputs` path)."""
    path = Path(path)
    model = _with_supported_ir(model)
    if model.ByteSize() > PROTOBUF_LIMIT - 2**20:  # onnx moves the tensors out of the proto it saves: save a copy
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        onnx.save_model(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + EXTERNAL_DATA_SUFFIX, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def _with_supported_ir(model: onnx.ModelProto) -> onnx.ModelProto:
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION
    return model


def serialize(model: onnx.ModelProto) -> bytes:
    return _with_supported_ir(model).SerializeToString()


def static_shapes(model: onnx.ModelProto, symbolic: bool = False) -> dict[str, tuple]:
    """Tensor name -> shape tuple (None for a dynamic dim) after ONNX shape inference; with
    `symbolic`, a dynamic dim is its dim_param name where inference knows one (else None)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:
        inferred = model
    shapes: dict[str, tuple] = {}
    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        t = vi.type.tensor_type
        if not t.HasField("shape"):
            continue
        shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) if symbolic else None
                                for d in t.shape.dim)
    for init in g.initializer:
        shapes[init.name] = tuple(init.dims)
    return shapes


def elem_types(model: onnx.ModelProto) -> dict[str, int]:
    g = model.graph
    types = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        types[vi.name] = vi.type.tensor_type.elem_type
    for init in g.initializer:
        types[init.name] = init.data_type
    return types


def attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(name, value))


class Graph:
    """Mutable working view of a model for the passes."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.g = model.graph
        self.inits: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in self.g.initializer}
        self.input_names = [i.name for i in self.g.input if i.name not in self.inits]
        # an initializer also listed as a graph input is only a default the caller may override:
        # never treat it as a constant we can fold or reshape
        self.overridable = {i.name for i in self.g.input if i.name in self.inits}
        self.output_names = [o.name for o in self.g.output]
        self._names = {n for node in self.g.node for n in list(node.input) + list(node.output)} | set(self.inits)
        self._shapes: dict[str, tuple] | None = None

    # --- structure -------------------------------------------------------------------
    @property
    def nodes(self) -> list[onnx.NodeProto]:
        return list(self.g.node)

    def producers(self) -> dict[str, onnx.NodeProto]:
        return {o: n for n in self.g.node for o in n.output if o}

    def consumers(self) -> dict[str, list[onnx.NodeProto]]:
        users = defaultdict(list)
        for n in self.g.node:
            for i in n.input:
                if i:
                    users[i].append(n)
        return users

    def uses(self, name: str) -> int:
        count = sum(1 for n in self.g.node for i in n.input if i == name)
        return count + (name in self.output_names)

    @property
    def shapes(self) -> dict[str, tuple]:
        if self._shapes is None:
            self._shapes = static_shapes(self.to_model(copy=False))
        return self._shapes

    def invalidate_shapes(self) -> None:
        self._shapes = None
        del self.g.value_info[:]

    def fresh_name(self, base: str) -> str:
        name, i = base, 0
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        return name

    # --- constants -------------------------------------------------------------------
    def const(self, name: str) -> np.ndarray | None:
        return self.inits.get(name) if self.is_const(name) else None

    def is_const(self, name: str) -> bool:
        return bool(name) and name in self.inits and name not in self.overridable

    def set_input_const(self, node: onnx.NodeProto, index: int, value: np.ndarray, base: str | None = None) -> None:
        """Give `node` input `index` the constant `value`, without touching other users of the old one."""
        old = node.input[index] if index < len(node.input) else ""
        if old and old in self.inits and self.uses(old) == 1 and old not in self.output_names:
            self.inits[old] = value
            return
        name = self.fresh_name(base or (old or f"{node.name or node.op_type}_in{index}"))
        self.inits[name] = value
        while len(node.input) <= index:
            node.input.append("")
        node.input[index] = name

    # --- editing ---------------------------------------------------------------------
    def insert_after(self, node: onnx.NodeProto, new_nodes: list[onnx.NodeProto]) -> None:
        nodes = list(self.g.node)
        at = nodes.index(node) + 1
        for k, n in enumerate(new_nodes):
            self.g.node.insert(at + k, n)

    def remove_node(self, node: onnx.NodeProto) -> None:
        self.g.node.remove(node)

    def rename_input_everywhere(self, old: str, new: str) -> None:
        for n in self.g.node:
            for k, i in enumerate(n.input):
                if i == old:
                    n.input[k] = new

    def to_model(self, copy: bool = True) -> onnx.ModelProto:
        """Write initializers back (dropping unused ones) and return the ModelProto."""
        used = {i for n in self.g.node for i in n.input} | set(self.output_names)
        used |= {i for n in self.g.node for i in _subgraph_inputs(n)}
        dtypes = {t.name: t.data_type for t in self.g.initializer}
        del self.g.initializer[:]
        for name, arr in self.inits.items():
            if name in used:
                t = numpy_helper.from_array(np.asarray(arr, order="C"), name)  # keeps 0-d scalars 0-d
                if name in dtypes and t.data_type != dtypes[name]:
                    raise AssertionError(f"initializer {name} changed dtype")
                self.g.initializer.append(t)
        # graph inputs that were initializers and are gone now
        keep_inputs = [i for i in self.g.input if i.name not in self.inits or i.name in used]
        if len(keep_inputs) != len(self.g.input):
            del self.g.input[:]
            self.g.input.extend(keep_inputs)
        if copy:
            out = onnx.ModelProto()
            out.CopyFrom(self.model)
            return out
        return self.model


def _subgraph_inputs(node: onnx.NodeProto):
    """Names read by subgraphs (If/Loop/Scan bodies) so their outer constants are kept."""
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for sub in graphs:
            for n in sub.node:
                yield from n.input
                yield from _subgraph_inputs(n)


def name_nodes(g: "Graph") -> None:
    """Passes refer to nodes by name: make every name present and unique."""
    seen = set()
    for i, node in enumerate(g.g.node):
        if not node.name or node.name in seen:
            node.name = g.fresh_name(f"{node.op_type}_{i}")
        seen.add(node.name)


def topo_sort(g: onnx.GraphProto, constants=()) -> None:
    """Sort nodes topologically in place (ONNX requires it; passes that insert nodes rely on it)."""
    nodes = list(g.node)
    produced = _all_outputs(nodes)
    available = {i.name for i in g.input} | {t.name for t in g.initializer} | set(constants) | {""}
    done: list[onnx.NodeProto] = []
    pending = nodes
    while pending:
        progress = False
        rest = []
        for n in pending:
            outer = set(_subgraph_inputs(n))
            if all(i in available for i in n.input) and all(i in available or i not in produced for i in outer):
                done.append(n)
                available.update(n.output)
                progress = True
            else:
                rest.append(n)
        if not progress:
            raise OnnxPruneError("graph has a cycle or reads a tensor nobody produces: " + rest[0].name)
        pending = rest
    del g.node[:]
    g.node.extend(done)


def _all_outputs(nodes):
    return {o for n in nodes for o in n.output}
