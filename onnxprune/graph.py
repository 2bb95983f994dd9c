"""Load, save and edit ONNX models: a thin mutable view over a ModelProto.

Initializers live as numpy arrays in `Graph.inits` while passes run; `Graph.to_model()`
writes them back. Nodes are the ModelProto's own NodeProtos, edited in place.
"""

from __future__ import annotations

import contextlib
import heapq
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import OnnxPruneError
from .files import EXTERNAL_DATA_SUFFIX, Outputs, _tensors, external_data_files

# onnxruntime 1.2x/1.3x accepts IR versions up to 10.
MAX_IR_VERSION = 10
ARENA_COPY_BYTES = 16 << 20  # inline weights above this: Graph keeps a structural copy (see __init__)
PROTOBUF_LIMIT = 2**31 - 1
SUPPORTED_OPSET = (7, 23)


def load_model(src: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """A private copy of the model, external data loaded; bad input raises OnnxPruneError.
    (Commands that only stream a model's weights use `read_model` and a Graph instead.)"""
    if isinstance(src, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(src)
        return _validated(model, "model")
    model = read_model(src)
    if has_external_data(model):
        onnx.load_external_data_for_model(model, str(Path(src).parent))
    return model


def read_model(path: str | os.PathLike) -> onnx.ModelProto:
    """The model at `path`, validated (the checker reads a model with external data by path), its
    external tensors left on disk: `Graph(model, base_dir=path's folder)` maps them lazily."""
    path = Path(path)
    if not path.exists():
        raise OnnxPruneError(f"{path}: no such file")
    if not path.is_file():
        raise OnnxPruneError(f"{path}: not a file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError and friends
        raise OnnxPruneError(f"{path}: not a readable ONNX model ({_first_line(e)})") from None
    return _validated(model, str(path), by_path=has_external_data(model))


class ModelFile(os.PathLike):
    """A model file read and validated once (`read_model`), its external data left on disk.
    Commands plan their file safety from it (`external_data_files`) and hand its proto to a Graph
    (`take`) without parsing the file again; anywhere a path is expected, it is its path."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._proto: onnx.ModelProto | None = read_model(self.path)

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def base_dir(self) -> str:
        return os.path.dirname(os.path.abspath(self.path))

    def external_data_files(self) -> list[Path]:
        return external_data_files(self.path, self._proto)

    def take(self) -> onnx.ModelProto:
        """The proto, once (a Graph takes ownership of it); a later call reads the file again."""
        proto, self._proto = self._proto, None
        return proto if proto is not None else read_model(self.path)


def has_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def fits_in_protobuf(model: onnx.ModelProto) -> bool:
    """protobuf (upb) refuses to size or serialize a message over 2 GB: it raises. Sizing a
    message costs about as much as serializing it, so the tensors' payload decides first."""
    if tensor_payload(model) < PROTOBUF_LIMIT // 2:
        return True
    try:
        return model.ByteSize() <= PROTOBUF_LIMIT - 2**20
    except Exception:
        return False


def tensor_payload(model: onnx.ModelProto, external: bool = False) -> int:
    """Bytes of tensor data held inside the proto (initializers, Constant attributes, subgraphs),
    from dims and types, without sizing the message; with `external`, external data counts too."""
    return sum(tensor_nbytes(t) for t in _tensors(model.graph)
               if external or t.data_location != onnx.TensorProto.EXTERNAL)


def tensor_nbytes(t: onnx.TensorProto) -> int:
    """A tensor's data size: its external `length`, or dims × item size (strings: their lengths)."""
    length = next((e.value for e in t.external_data if e.key == "length"), None)
    if t.data_location == onnx.TensorProto.EXTERNAL and length is not None:
        return int(length)
    if t.data_type == onnx.TensorProto.STRING:
        return sum(len(s) for s in t.string_data)
    return int(np.prod(t.dims)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def _validated(model: onnx.ModelProto, what: str, by_path: bool = False) -> onnx.ModelProto:
    if not model.graph.node:
        raise OnnxPruneError(f"{what}: not an ONNX model (empty graph)")
    try:  # by path, the checker resolves external data itself; in memory it checks a weightless
        # view (serializing the whole model only to check it cost more than reading it) and the
        # weights it leaves out are checked here, more strictly than the checker would
        onnx.checker.check_model(what if by_path else _checkable_view(model), full_check=False)
    except Exception as e:
        raise OnnxPruneError(f"{what}: invalid ONNX model ({_first_line(e)})") from None
    for t in model.graph.initializer:  # (the size of each payload is checked when it is read: tensor_array)
        if not _type_known(t):
            raise OnnxPruneError(f"{what}: invalid ONNX model (initializer {t.name}: unsupported data type {t.data_type})")
    opset = default_opset(model)
    if not SUPPORTED_OPSET[0] <= opset <= SUPPORTED_OPSET[1]:
        raise OnnxPruneError(
            f"{what}: opset {opset} is outside the supported range "
            f"{SUPPORTED_OPSET[0]}..{SUPPORTED_OPSET[1]}"
        )
    return model


def _checkable_view(model: onnx.ModelProto) -> onnx.ModelProto:
    view = weightless(model)
    view.graph.sparse_initializer.extend(model.graph.sparse_initializer)
    return view


_PACKED_4BIT = {getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(onnx.TensorProto, n)}


def _type_known(t: onnx.TensorProto) -> bool:
    return t.data_type in onnx.TensorProto.DataType.values() and t.data_type != onnx.TensorProto.UNDEFINED


def _payload_problem(t: onnx.TensorProto) -> str:
    """Why a tensor's data is unreadable ("" if it is fine): an unknown type, or not exactly its
    dims' worth of data."""
    if not _type_known(t) or t.data_type == onnx.TensorProto.STRING:
        return f"unsupported data type {t.data_type}"
    n = int(np.prod(t.dims))
    if t.raw_data:
        expected = (n + 1) // 2 if t.data_type in _PACKED_4BIT else n * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        return "" if len(t.raw_data) == expected else f"{len(t.raw_data)} bytes of data for dims {list(t.dims)} ({expected} expected)"
    try:  # typed fields: the reader itself decides
        return "" if numpy_helper.to_array(t).size == n else f"data does not match dims {list(t.dims)}"
    except Exception as e:
        return f"data does not match dims {list(t.dims)} ({_first_line(e)})"


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
    if not fits_in_protobuf(model):  # onnx moves the tensors out of the proto it saves: save a copy
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        onnx.save_model(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + EXTERNAL_DATA_SUFFIX, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


# a model whose weights exceed this is written with external data (<name>.data); below it,
# one protobuf file. A module constant so that tests can take the external path with small models.
EXTERNAL_DATA_THRESHOLD = PROTOBUF_LIMIT - 2**26
EXTERNAL_MIN_BYTES = 1024   # smaller tensors stay inside the model file
EXTERNAL_ALIGN = 4096       # page-aligned offsets let onnxruntime map tensors instead of copying


def write_graph(g: "Graph", path: str | os.PathLike, release: bool = False) -> None:
    """Write the Graph's model to `path` (an `Outputs` path) with one serialization: weights over
    EXTERNAL_DATA_THRESHOLD are streamed tensor by tensor to `<name>.data`, never held as one
    message. `release` frees each array once it is in the proto (the Graph is spent then)."""
    path = Path(path)
    total = sum(int(a.nbytes) for a in g.inits.values())
    if total <= EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(_with_supported_ir(g.to_model(copy=False, release=release)), str(path))
        return
    data = path.with_name(path.name + EXTERNAL_DATA_SUFFIX)
    with open(data, "wb") as f:
        model = g.to_model(copy=False, external=_ExternalWriter(f, data.name), release=release)
    onnx.save_model(_with_supported_ir(model), str(path))


class _ExternalWriter:
    def __init__(self, f, location: str):
        self.f, self.location = f, location

    def tensor(self, name: str, arr: np.ndarray) -> onnx.TensorProto:
        arr = np.asarray(arr)
        if arr.nbytes < EXTERNAL_MIN_BYTES:
            return numpy_helper.from_array(np.asarray(arr, order="C"), name)
        offset = -self.f.tell() % EXTERNAL_ALIGN
        self.f.write(b"\0" * offset)
        offset = self.f.tell()
        for chunk in _chunks(np.ascontiguousarray(arr).reshape(-1)):
            self.f.write(chunk.astype(chunk.dtype.newbyteorder("<"), copy=False).tobytes())
        t = onnx.TensorProto()
        t.name, t.data_type = name, helper.np_dtype_to_tensor_dtype(arr.dtype)
        t.dims.extend(arr.shape)
        t.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(offset)), ("length", str(arr.nbytes))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        return t


def _chunks(flat: np.ndarray, size: int = 1 << 24):
    for start in range(0, flat.size, size):
        yield flat[start: start + size]


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
        if _refine_slices(inferred):
            inferred = onnx.shape_inference.infer_shapes(inferred, data_prop=True)
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


def _refine_slices(inferred: onnx.ModelProto) -> bool:
    """ONNX infers no dim of a Slice whose starts or ends are computed (a rotary table sliced to the
    sequence length: cos[:n]), not even those of the axes it does not slice. Write those into the
    Slice's value_info (the second inference keeps them and carries them on); True if any was."""
    g = inferred.graph
    init = {t.name: t for t in g.initializer}
    infos = {vi.name: vi for vi in list(g.input) + list(g.value_info)}
    changed = False
    for node in g.node:
        if node.op_type != "Slice" or len(node.input) < 4 or node.input[3] not in init:
            continue
        src, out = node.input[0], infos.get(node.output[0])
        dims = (list(init[src].dims) if src in init else [d.dim_value if d.HasField("dim_value") else None
                for d in infos[src].type.tensor_type.shape.dim] if src in infos else None)
        if dims is None or out is None or len(dims) != len(out.type.tensor_type.shape.dim):
            continue
        sliced = {int(a) % len(dims) for a in numpy_helper.to_array(init[node.input[3]]).reshape(-1)}
        for a, (d_in, d_out) in enumerate(zip(dims, out.type.tensor_type.shape.dim)):
            if a not in sliced and d_in is not None and not d_out.HasField("dim_value"):
                d_out.dim_value = d_in
                changed = True
    return changed


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
    """Mutable working view of a model for the passes, with a use–def index.

    Nodes are the model's NodeProtos, edited in place; `producer`/`consumers`/`uses` are O(1) and
    kept up to date by every edit made through this class (`set_input`, `set_output`,
    `insert_after`, `remove_node`, `rename_input_everywhere`, `set_input_const`). Inserts and
    removals are applied to the node order lazily, in one pass, the next time `nodes` is read, so
    a pass that edits node by node stays linear. Initializers live as numpy arrays in `inits`;
    `to_model()` writes everything back."""

    def __init__(self, model: onnx.ModelProto, base_dir: str | os.PathLike | None = None):
        """Takes ownership of `model`: its initializer protos are released once they are arrays
        (`to_model` writes them back), and its nodes are edited in place — or, when the weights
        were inline and large, those of a structural copy, so that the caller dropping `model`
        frees the memory its parse held. External tensors are
        memory-mapped copy-on-write from `base_dir` (the model file's folder), so a model over
        2 GB is never read whole: only the tensors a pass touches are paged in."""
        self.model = model
        self.g = model.graph
        self._init_dtypes = {t.name: t.data_type for t in self.g.initializer}
        self.inits: dict[str, np.ndarray] = {}
        inline = sum(tensor_nbytes(t) for t in self.g.initializer if t.data_location != onnx.TensorProto.EXTERNAL)
        while self.g.initializer:  # from the end: each proto is freed as soon as it is an array
            t = self.g.initializer[-1]
            self.inits[t.name] = tensor_array(t, base_dir)
            del self.g.initializer[-1]
        self.inits = dict(reversed(self.inits.items()))
        if inline > ARENA_COPY_BYTES:
            # upb frees nothing when elements are deleted: the parsed weights stay in the message's
            # arena until the message goes. A copy of what is left (nodes, inputs, outputs) lets
            # it go: ResNet-50's working set drops from twice its weights to once.
            structure = onnx.ModelProto()
            structure.CopyFrom(model)
            self.model, self.g = structure, structure.graph
        self.input_names = [i.name for i in self.g.input if i.name not in self.inits]
        # an initializer also listed as a graph input is only a default the caller may override:
        # never treat it as a constant we can fold or reshape
        self.overridable = {i.name for i in self.g.input if i.name in self.inits}
        self.output_names = [o.name for o in self.g.output]
        self._shapes: dict[str, tuple] | None = None
        self._channel_graphs: dict[frozenset, object] = {}
        self._load_nodes()

    # --- structure -------------------------------------------------------------------
    def _load_nodes(self) -> None:
        self._nodes: list[onnx.NodeProto] = list(self.g.node)
        self._after: dict[int, list[onnx.NodeProto]] = {}   # id(anchor) -> nodes to insert after it
        self._dropped: set[int] = set()                      # ids of nodes to drop
        self._producer: dict[str, onnx.NodeProto] = {}
        self._consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for n in self._nodes:
            self._index(n)
        self._names = set(self._producer) | set(self._consumers) | set(self.inits)

    def _index(self, n: onnx.NodeProto) -> None:
        for o in n.output:
            if o:
                self._producer[o] = n
        for i in n.input:
            if i:
                self._consumers[i].append(n)

    def _unindex(self, n: onnx.NodeProto) -> None:
        for o in n.output:
            if o and self._producer.get(o) is n:
                del self._producer[o]
        for i in n.input:
            if i:
                self._drop_use(i, n)

    def _drop_use(self, name: str, n: onnx.NodeProto) -> None:
        users = self._consumers.get(name, [])
        for k, u in enumerate(users):
            if u is n:
                del users[k]
                break

    @property
    def nodes(self) -> list[onnx.NodeProto]:
        """The nodes in graph order (a snapshot: editing while iterating over it is safe)."""
        self._flush()
        return list(self._nodes)

    def _flush(self) -> None:
        if not self._after and not self._dropped:
            return
        out: list[onnx.NodeProto] = []

        def place(n):
            if id(n) not in self._dropped:
                out.append(n)
            for m in self._after.pop(id(n), ()):
                place(m)

        for n in self._after.pop(id(None), []) + self._nodes:  # (None: insert at the front)
            place(n)
        self._nodes, self._dropped = out, set()

    def producer(self, name: str) -> onnx.NodeProto | None:
        return self._producer.get(name)

    def producers(self) -> dict[str, onnx.NodeProto]:
        """tensor -> the node writing it (the live index: read it, do not edit it)."""
        return self._producer

    def consumers(self) -> dict[str, list[onnx.NodeProto]]:
        """tensor -> the nodes reading it, once per input slot (the live index: read only)."""
        return self._consumers

    def uses(self, name: str) -> int:
        return len(self._consumers.get(name, ())) + (name in self.output_names)

    @property
    def shapes(self) -> dict[str, tuple]:
        """Static shapes from ONNX shape inference on a weightless view, computed once per change."""
        if self._shapes is None:
            self._shapes = static_shapes(self.weightless())
        return self._shapes

    def known_shapes(self) -> dict[str, tuple] | None:
        """The shapes if inferred since the last change (still valid after `to_model`), else None."""
        return self._shapes

    def invalidate_shapes(self) -> None:
        self._shapes = None
        del self.g.value_info[:]

    def changed(self) -> None:
        """The graph was edited: drop everything derived from it (the pipeline runner calls this
        when a pass reports a change; a pass never needs to)."""
        self.invalidate_shapes()
        self._channel_graphs.clear()

    def channel_graph(self, pins=frozenset()):
        """The channel graph of the graph as it is now, built once per change and shared by the
        passes of a round and the report."""
        from .channels.core import build_channel_graph

        key = frozenset(pins)
        if key not in self._channel_graphs:
            self._channel_graphs[key] = build_channel_graph(self, set(key))
        return self._channel_graphs[key]

    def signature(self) -> onnx.ModelProto:
        """The model's interface alone: its real inputs (initializers excluded, overridable ones
        too) and its outputs, no nodes, no weights. `graph_inputs` of a Graph's own model would
        list the initializers it holds as arrays; read inputs off this instead."""
        sig = onnx.ModelProto()
        sig.ir_version = self.model.ir_version
        sig.opset_import.extend(self.model.opset_import)
        real = set(self.input_names)
        sig.graph.input.extend(i for i in self.g.input if i.name in real)
        sig.graph.output.extend(self.g.output)
        return sig

    def weightless(self) -> onnx.ModelProto:
        """The graph with large initializers replaced by graph inputs of their type and shape:
        what shape inference needs (small ones keep their values: reshape shapes, slice bounds)."""
        self._flush()
        return _weightless(self.model, self._nodes, self.inits.items())

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
        self.set_input(node, index, name)

    # --- editing ---------------------------------------------------------------------
    def set_input(self, node: onnx.NodeProto, index: int, name: str) -> None:
        while len(node.input) <= index:
            node.input.append("")
        old = node.input[index]
        if old:
            self._drop_use(old, node)
        node.input[index] = name
        if name:
            self._consumers[name].append(node)
            self._names.add(name)

    def set_output(self, node: onnx.NodeProto, index: int, name: str) -> None:
        old = node.output[index]
        if old and self._producer.get(old) is node:
            del self._producer[old]
        node.output[index] = name
        if name:
            self._producer[name] = node
            self._names.add(name)

    def insert_after(self, node: onnx.NodeProto | None, new_nodes: list[onnx.NodeProto]) -> None:
        """Insert `new_nodes` after `node` (None: at the front of the graph, for nodes without inputs)."""
        self._after.setdefault(id(node), []).extend(new_nodes)
        for n in new_nodes:
            self._index(n)
            self._names.update(x for x in list(n.input) + list(n.output) if x)

    def remove_node(self, node: onnx.NodeProto) -> None:
        self._unindex(node)
        self._dropped.add(id(node))

    def rename_input_everywhere(self, old: str, new: str) -> None:
        for n in list(self._consumers.get(old, ())):
            for k, i in enumerate(n.input):
                if i == old:
                    self.set_input(n, k, new)

    def topo_sort(self) -> None:
        """Sort the nodes topologically (ONNX requires it; passes that insert nodes rely on it)."""
        self._nodes = _topological(self.nodes, {i.name for i in self.g.input} | set(self.inits) | {""})

    def to_model(self, copy: bool = True, external: "_ExternalWriter | None" = None,
                 release: bool = False) -> onnx.ModelProto:
        """The model with the current nodes and the used initializers. With `copy` (the default)
        a new ModelProto and the Graph is untouched: the node objects passes hold stay the live
        ones. Without, the Graph's own model is rewritten and handed over (its nodes are copies
        then: the last step of a command). `external` sends large tensors to its data file;
        `release` frees each array once it is in the proto."""
        nodes = self.nodes
        used = {i for n in nodes for i in n.input} | set(self.output_names)
        used |= {i for n in nodes for i in _subgraph_inputs(n)}
        if copy:  # cheap: the Graph's model holds no weights (they are in self.inits)
            model = onnx.ModelProto()
            model.CopyFrom(self.model)
        else:
            model = self.model
        g = model.graph
        del g.node[:]
        g.node.extend(nodes)
        del g.initializer[:]
        init_names = set(self.inits)
        for name in list(self.inits):
            arr = self.inits.pop(name) if release else self.inits[name]
            if name in used:
                t = external.tensor(name, arr) if external else numpy_helper.from_array(np.asarray(arr, order="C"), name)
                if name in self._init_dtypes and t.data_type != self._init_dtypes[name]:
                    raise AssertionError(f"initializer {name} changed dtype")
                g.initializer.append(t)
        # graph inputs that were initializers and are gone now
        keep_inputs = [i for i in g.input if i.name not in init_names or i.name in used]
        if len(keep_inputs) != len(g.input):
            del g.input[:]
            g.input.extend(keep_inputs)
        if not copy:
            self._load_nodes()  # the container holds copies now: index those
        return model


SMALL_CONSTANT = 64  # initializers up to this many elements keep their values in the weightless view


def weightless(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with its large initializers turned into typed graph inputs (see Graph.weightless);
    the tensors' data is never read, so this works on models with external data too."""
    def arrays():
        for t in model.graph.initializer:
            if int(np.prod(t.dims)) <= SMALL_CONSTANT and t.data_location != onnx.TensorProto.EXTERNAL:
                yield t.name, numpy_helper.to_array(t)
            else:
                yield t.name, _Placeholder(t)
    return _weightless(model, model.graph.node, arrays())


class _Placeholder:
    """A tensor's type and shape without its data."""
    def __init__(self, t: onnx.TensorProto):
        self.size, self.shape, self.elem_type = int(np.prod(t.dims)), tuple(t.dims), t.data_type


def _weightless(model, nodes, named_arrays) -> onnx.ModelProto:
    view = onnx.ModelProto()
    for field in ("ir_version", "producer_name", "domain", "model_version"):
        setattr(view, field, getattr(model, field))
    view.opset_import.extend(model.opset_import)
    view.functions.extend(model.functions)
    g = view.graph
    g.name = model.graph.name
    g.node.extend(nodes)
    g.input.extend(model.graph.input)
    g.output.extend(model.graph.output)
    g.value_info.extend(model.graph.value_info)
    listed = {i.name for i in model.graph.input}
    for name, arr in named_arrays:
        if arr.size <= SMALL_CONSTANT and isinstance(arr, np.ndarray):
            g.initializer.append(numpy_helper.from_array(np.asarray(arr, order="C"), name))
        elif name not in listed:
            elem = arr.elem_type if isinstance(arr, _Placeholder) else helper.np_dtype_to_tensor_dtype(arr.dtype)
            g.input.append(helper.make_tensor_value_info(name, elem, arr.shape))
    return view


def tensor_array(t: onnx.TensorProto, base_dir=None) -> np.ndarray:
    """The tensor as a numpy array; external data is memory-mapped copy-on-write (writes stay
    private to this process, the file is never changed)."""
    if t.data_location != onnx.TensorProto.EXTERNAL:
        # the payload's size is checked here, where it is read anyway (reading it once more only
        # to check it cost as much as the copy itself)
        try:
            arr = numpy_helper.to_array(t)
        except Exception as e:
            arr = e
        if isinstance(arr, Exception) or arr.size != int(np.prod(t.dims)):
            raise OnnxPruneError(f"invalid ONNX model (initializer {t.name}: {_payload_problem(t) or _first_line(arr)})")
        return arr
    info = {e.key: e.value for e in t.external_data}
    dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
    shape = tuple(t.dims)
    count = int(np.prod(shape))
    path = Path(base_dir or ".") / info["location"]
    if count == 0 or dtype.kind not in "fiub" or dtype.itemsize * count != int(info.get("length", dtype.itemsize * count)):
        return numpy_helper.to_array(t, str(base_dir or "."))
    try:
        return np.asarray(np.memmap(path, dtype=dtype, mode="c", offset=int(info.get("offset", 0)), shape=shape))
    except (OSError, ValueError) as e:
        raise OnnxPruneError(f"{path}: cannot read the external data of {t.name} ({_first_line(e)})") from None


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
    for i, node in enumerate(g.nodes):
        if not node.name or node.name in seen:
            node.name = g.fresh_name(f"{node.op_type}_{i}")
        seen.add(node.name)


def _topological(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """Kahn's algorithm, taking ready nodes in their current order (a sorted graph stays as it is)."""
    producer = {o: k for k, n in enumerate(nodes) for o in n.output if o}
    readers: dict[int, list[int]] = defaultdict(list)
    waiting = [0] * len(nodes)
    for k, n in enumerate(nodes):
        for name in {*n.input, *_subgraph_inputs(n)} - available:
            if name in producer and producer[name] != k:
                readers[producer[name]].append(k)
                waiting[k] += 1
            elif name not in producer and name in n.input:
                raise OnnxPruneError(f"node {n.name or n.op_type} reads {name}, which nobody produces")
    ready = [k for k, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    done: list[onnx.NodeProto] = []
    while ready:
        k = heapq.heappop(ready)
        done.append(nodes[k])
        for r in readers.pop(k, ()):
            waiting[r] -= 1
            if waiting[r] == 0:
                heapq.heappush(ready, r)
    if len(done) != len(nodes):
        stuck = next(n for k, n in enumerate(nodes) if waiting[k])
        raise OnnxPruneError("graph has a cycle: " + (stuck.name or stuck.op_type))
    return done
