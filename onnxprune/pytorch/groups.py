"""Channel dependency groups of a PyTorch module, read off onnxprune's channel graph.

Torch-Pruning's `DependencyGraph` idea on our ONNX channel graph: export the module once, build
the channel classes (`onnxprune.channels`: residual adds, concats, depthwise convs, flatten →
Linear, grouped convs ... each a rule), and map every initializer axis that carries channels back
to a module parameter. A *group* is a bucket of the ONNX pruner: the channel classes produced by
the same set of layers (e.g. every conv writing a ResNet stage's residual stream), pruned at one
ratio; each of its *channels* lists every (module, parameter, axis, indices) slice that lives or
dies with it — producer rows, biases, BN parameters, depthwise filters, consumer columns — and
whether it is pinned (and why).

How parameters are found in the export: the exporters rename, fold and de-duplicate tensors (the
TorchScript exporter shares equal-valued tensors between modules, the dynamo exporter folds BN
into the conv before it), so the module is exported from a copy whose parameters and buffers all
hold distinct random values; every initializer is then matched to the parameter with exactly
its bytes (or those of its transpose: a Linear exported as MatMul). The copy has any
`torch.nn.utils.prune` reparametrization removed, so pruned models analyse like dense ones.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass, field

import numpy as np
import onnx

from ..channels.attention import head_roots
from ..channels.verdict import PINNED, judge
from ..errors import OnnxPruneError
from ..graph import Graph, attrs
from ..pipeline import cleaned_graph
from ..passes.rearrange import immovable
from ..pruning.groups import buckets
from .masks import baked_copy


@dataclass(frozen=True)
class ParamSlice:
    """Entries `indices` along `axis` of the parameter (or buffer) `module.param`."""
    module: str
    param: str
    axis: int
    indices: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"{self.module}.{self.param}" if self.module else self.param

    def __str__(self) -> str:
        return f"{self.name}[axis {self.axis}: {list(self.indices)}]"


@dataclass
class Channel:
    """One channel class: every slice that lives or dies with it."""
    producers: list[ParamSlice]          # producer weight rows (what pruning zeroes)
    slices: list[ParamSlice]             # every slice of the class, producers included
    pinned: str = ""                     # why it must stay ("" if it may be pruned)


@dataclass
class Group:
    """Channels produced by the same layers, pruned at one ratio (a bucket of the ONNX pruner)."""
    layers: list[str]                    # producer modules, graph order
    channels: list[Channel]
    unmovable: str = ""                  # why its channels cannot be permuted ("" if they can)
    heads: bool = False                  # its channels are attention heads (q, k, v rows of each head)

    @property
    def size(self) -> int:
        return len(self.channels)

    @property
    def free(self) -> list[int]:
        """Indices of the channels that may be pruned."""
        return [i for i, c in enumerate(self.channels) if not c.pinned]

    def asked(self, sparsity: float) -> int:
        """How many channels `sparsity` asks of the group."""
        return int(sparsity * self.size + 1e-9)

    def pruned_count(self, sparsity: float) -> int:
        """How many it loses: what is asked, as far as the free channels allow."""
        return min(self.asked(sparsity), len(self.free))


@dataclass
class Plan:
    """What pruning some output channels of one layer touches (Torch-Pruning's pruning plan)."""
    layer: str
    idxs: list[int]
    channels: list[Channel]

    def slices(self) -> list[ParamSlice]:
        merged: dict[tuple[str, str, int], list[int]] = {}
        for ch in self.channels:
            for s in ch.slices:
                merged.setdefault((s.module, s.param, s.axis), []).extend(s.indices)
        return [ParamSlice(m, p, a, tuple(sorted(set(i)))) for (m, p, a), i in merged.items()]

    def __str__(self) -> str:
        pinned = sorted({c.pinned for c in self.channels if c.pinned})
        lines = [f"pruning plan: {self.layer} output channels {self.idxs} ({len(self.channels)} coupled channel(s))"]
        lines += [f"  {s}" for s in self.slices()]
        lines += [f"  pinned: {why}" for why in pinned]
        return "\n".join(lines)


@dataclass
class DependencyGroups:
    groups: list[Group]
    unmapped: dict[str, str] = field(default_factory=dict)   # initializer -> why it has no parameter

    def __iter__(self):
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def group_of(self, layer: str) -> Group:
        for g in self.groups:
            if layer in g.layers:
                return g
        raise OnnxPruneError(f"{layer} produces no prunable channel group (not a Conv/Linear, or its outputs are not tracked)")

    def plan(self, layer, idxs) -> Plan:
        """Every slice coupled to output channels `idxs` of `layer` (a module or its name)."""
        name = layer if isinstance(layer, str) else self._names.get(id(layer))
        if name is None:
            raise OnnxPruneError("plan: that module is not part of the analysed model")
        g = self.group_of(name)
        wanted = set(int(i) for i in idxs)
        chosen = [ch for ch in g.channels if any(s.module == name and wanted & set(s.indices) for s in ch.producers)]
        return Plan(name, sorted(wanted), chosen)

    _names: dict = field(default_factory=dict, repr=False)    # id(module) -> name


# --- analysis --------------------------------------------------------------------------------

def dependency_groups(model, dummy_input) -> DependencyGroups:
    """The channel groups of `model` for `dummy_input` (a tensor or a tuple of tensors)."""
    import torch

    probe, names = _probe_copy(model)
    args = dummy_input if isinstance(dummy_input, tuple) else (dummy_input,)
    # cleanup folds the exporter's Transpose of a Linear weight: match after it
    g = cleaned_graph(_export_for_analysis(probe, args))
    owner = _owners(probe, g.inits)
    cg = g.channel_graph()
    roots = cg.roots()
    classes = cg.classes()
    heads = head_roots(cg)
    slices_of: dict[int, list[ParamSlice]] = {}
    unmapped: dict[str, str] = {}
    for init, axis, slots in initializer_axes(g, cg):
        if init not in owner:
            unmapped[init] = "not a parameter or buffer of the module (a constant made in forward)"
            continue
        (module, param), transposed = owner[init]
        by_class: dict[int, list[int]] = {}
        for index, slot in enumerate(slots.tolist()):
            if slot >= 0:
                by_class.setdefault(int(roots[slot]), []).append(index)
        for root, indices in by_class.items():
            slices_of.setdefault(root, []).append(
                ParamSlice(module, param, (1 - axis) if transposed else axis, tuple(indices)))
    groups = []
    weight_of = {n.name: n.input[1] for n in g.nodes if len(n.input) > 1}
    for b in buckets(g, cg):
        layer_of = {name: owner.get(weight_of[name]) for name in b.layers}
        if any(v is None for v in layer_of.values()):
            missing = next(n for n, v in layer_of.items() if v is None)
            reason = f"{missing}: its weights are not a module parameter"
        else:
            reason = ""
        modules = [layer_of[n][0][0] if layer_of[n] else n for n in b.layers]
        channels = []
        for root in b.classes:
            slices = slices_of.get(root, [])
            producers = [s for s in slices if s.module in modules and s.param == "weight" and _is_output_axis(s, probe)]
            pinned = reason or (judge(classes[root], cg).reason if judge(classes[root], cg).kind == PINNED else "")
            channels.append(Channel(producers, slices, pinned))
        why = immovable(b, g, cg, roots) or _unmapped_constant(b, g, cg, roots, owner)
        groups.append(Group(modules, channels, why, heads=bool(b.classes) and set(b.classes) <= heads))
    result = DependencyGroups(groups, unmapped)
    result._names = {id(m): n for n, m in model.named_modules()}
    return result


def _is_output_axis(s: ParamSlice, model) -> bool:
    """Is `s` along the output-channel axis of its module's weight (rows of Conv / Linear,
    columns of ConvTranspose)?"""
    import torch

    module = model.get_submodule(s.module) if s.module else model
    if isinstance(module, torch.nn.modules.conv._ConvTransposeNd):
        return s.axis == 1
    return s.axis == 0


def _probe_copy(model):
    """A copy without pruning reparametrizations whose float tensors all hold distinct values."""
    import torch

    probe = baked_copy(model)
    gen = torch.Generator().manual_seed(12345)
    with torch.no_grad():
        for _, t in list(probe.named_parameters()) + list(probe.named_buffers()):
            if t.is_floating_point():
                t.copy_(0.5 + torch.rand(t.shape, generator=gen, dtype=torch.float64).to(t.dtype))
    return probe.eval(), {id(m): n for n, m in probe.named_modules()}


def _export_for_analysis(probe, args) -> onnx.ModelProto:
    """TorchScript export without constant folding: every parameter stays an initializer."""
    import torch

    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(probe, args, buf, dynamo=False, opset_version=17, do_constant_folding=False)
    except Exception as e:
        raise OnnxPruneError(f"cannot export the model to analyse its channels: {str(e).splitlines()[0][:300]}") from None
    return onnx.load_from_string(buf.getvalue())


def _digest(a: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(a).tobytes() + str(a.shape).encode()).hexdigest()


def _owners(probe, inits: dict[str, np.ndarray]) -> dict[str, tuple[tuple[str, str], bool]]:
    """Initializer name -> ((module, parameter), transposed), matched by exact values."""
    by_value: dict[str, tuple[str, bool]] = {}
    for name, t in list(probe.named_parameters()) + list(probe.named_buffers()):
        if not t.is_floating_point():
            continue
        a = t.detach().cpu().numpy()
        by_value[_digest(a)] = (name, False)
        if a.ndim == 2:
            by_value.setdefault(_digest(a.T), (name, True))
    owner = {}
    for init, value in inits.items():
        hit = by_value.get(_digest(value))
        if hit is not None:
            name, transposed = hit
            module, _, param = name.rpartition(".")
            owner[init] = ((module, param), transposed)
    return owner


def _unmapped_constant(b, g, cg, roots, owner) -> str:
    """A per-channel constant that is not a module parameter would not move with a permutation."""
    members = set(b.classes)
    for init, axis, slots in initializer_axes(g, cg):
        if init in owner:
            continue
        hit = [s for s in slots.tolist() if s >= 0 and int(roots[s]) in members]
        if hit and np.ptp(g.inits[init]) != 0:
            return f"constant {init} (not a module parameter) carries these channels"
    return ""


# --- which initializer axes carry which channel slots ---------------------------------------------

def initializer_axes(g: Graph, cg) -> list[tuple[str, int, np.ndarray]]:
    """(initializer, axis, global slot id per index along the axis; -1 where untracked) for every
    constant operand axis that carries channels: layer weights (rows and columns) and biases,
    normalization parameters, per-channel constants of elementwise ops."""
    out = []
    for node in g.nodes:
        rule = _AXES.get(node.op_type)
        if rule is not None:
            out.extend((i, a, s) for i, a, s in rule(node, g, cg) if i and g.is_const(i))
    return out


def _slots(sp, size: int) -> np.ndarray | None:
    return sp.slots if sp is not None and len(sp.axes) == 1 and sp.size == size else None


def _conv_axes(node, g, cg):
    w = g.inits.get(node.input[1])
    if w is None:
        return []
    group = int(attrs(node).get("group", 1))
    sp_out, sp_in = cg.space(node.output[0]), cg.space(node.input[0])
    out = []
    rows = _slots(sp_out, w.shape[0])
    if rows is not None:
        out.append((node.input[1], 0, rows))
        if len(node.input) > 2:
            out.append((node.input[2], 0, rows))
    c_in_g = w.shape[1]
    cols = _slots(sp_in, group * c_in_g)
    if cols is not None and (group == 1 or c_in_g > 1):  # depthwise: no input columns (out[c] = in[c])
        out.append((node.input[1], 1, cols.reshape(group, c_in_g)[0]))  # grouped: group-local index
    return out


def _conv_transpose_axes(node, g, cg):
    w = g.inits.get(node.input[1])
    if w is None or int(attrs(node).get("group", 1)) != 1:
        return []
    out = []
    cols = _slots(cg.space(node.output[0]), w.shape[1])
    if cols is not None:
        out.append((node.input[1], 1, cols))
        if len(node.input) > 2:
            out.append((node.input[2], 0, cols))
    rows = _slots(cg.space(node.input[0]), w.shape[0])
    if rows is not None:
        out.append((node.input[1], 0, rows))
    return out


def _gemm_axes(node, g, cg):
    return _matrix_axes(node, g, cg, trans_b=bool(int(attrs(node).get("transB", 0))), bias=True)


def _matmul_axes(node, g, cg):
    return _matrix_axes(node, g, cg, trans_b=False, bias=False)


def _matrix_axes(node, g, cg, trans_b: bool, bias: bool):
    """A [.., F] @ W (W [F, K], or [K, F] with trans_b) + C: W's K axis carries the output channels
    (and a 1-D C with them), its F axis the input's."""
    w = g.inits.get(node.input[1])
    if w is None or w.ndim != 2:
        return []
    out_axis, in_axis = (0, 1) if trans_b else (1, 0)
    out = []
    cols = _slots(cg.space(node.output[0]), w.shape[out_axis])
    if cols is not None:
        out.append((node.input[1], out_axis, cols))
        c = g.inits.get(node.input[2]) if bias and len(node.input) > 2 else None
        if c is not None and c.ndim == 1 and c.size == w.shape[out_axis]:
            out.append((node.input[2], 0, cols))
    rows = _slots(cg.space(node.input[0]), w.shape[in_axis])
    if rows is not None:
        out.append((node.input[1], in_axis, rows))
    return out


def _norm_axes(node, g, cg):
    sp = cg.space(node.input[0])
    if sp is None or sp.axes != (1,):
        return []
    return [(p, 0, sp.slots) for p in node.input[1:] if p in g.inits and g.inits[p].size == sp.size]


def _elementwise_axes(node, g, cg):
    sp = cg.space(node.output[0])
    rank = cg.rank(node.output[0])
    if sp is None or len(sp.axes) != 1 or rank is None:
        return []
    out = []
    for name in node.input:
        c = g.inits.get(name)
        if c is None or c.size != sp.size:
            continue
        axis = sp.axes[0] - (rank - c.ndim)
        if 0 <= axis < c.ndim and c.shape[axis] == sp.size:
            out.append((name, axis, sp.slots))
    return out


_AXES = {"Conv": _conv_axes, "ConvTranspose": _conv_transpose_axes, "Gemm": _gemm_axes, "MatMul": _matmul_axes,
         "BatchNormalization": _norm_axes, "InstanceNormalization": _norm_axes}
for _op in ("Add", "Sub", "Mul", "Div", "PRelu", "Max", "Min"):
    _AXES[_op] = _elementwise_axes
