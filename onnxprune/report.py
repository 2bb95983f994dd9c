"""Before/after statistics, per-layer channel counts and the channel-class summary; text and JSON."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx

from .graph import default_opset, static_shapes, tensor_payload, weightless
from .channels.linear import border_convs
from .layers import io_channels, is_linear
from .layers import macs as layer_macs


@dataclass
class ModelStats:
    ops: dict[str, int]
    params: int
    macs: int
    size_bytes: int
    opset: int
    layers: dict[str, tuple[int, int]]  # layer name -> (in channels, out channels)
    border_maps: int = 0  # one-channel convs over a ones image (channels/linear.py): not layers

    @classmethod
    def of(cls, model: onnx.ModelProto, shapes: dict | None = None) -> "ModelStats":
        """Statistics of a model whose weights may be external (their data is never read);
        `shapes`: its static shapes when already inferred (a Graph's `known_shapes`)."""
        shapes = shapes if shapes is not None else static_shapes(weightless(model))
        params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
        ops = Counter(n.op_type for n in model.graph.node)
        border, constant = {n.output[0] for n in border_convs(model)}, _constant_tensors(model)
        macs, layers = total_macs(model.graph.node, shapes, constant), {}
        for n, w in _layer_weights(model.graph.node, shapes, constant):
            if n.output[0] not in border:  # (a border map's MACs count: it is computed)
                layers[n.name] = io_channels(n, list(w))
        return cls(dict(sorted(ops.items())), params, macs, model_bytes(model), default_opset(model), layers,
                   len(border))


def total_macs(nodes, shapes: dict, constant) -> int:
    """MACs per input item of the linear layers with constant weights whose shapes are known."""
    return sum(layer_macs(n, shapes, list(w)) for n, w in _layer_weights(nodes, shapes, constant))


def _layer_weights(nodes, shapes: dict, constant):
    for n in nodes:
        w = shapes.get(n.input[1]) if len(n.input) > 1 and n.input[1] in constant else None
        if is_linear(n) and w is not None and all(d is not None for d in w):
            yield n, w


def model_bytes(model: onnx.ModelProto) -> int:
    """The model's size: tensor data (inside the proto or external) plus the nodes' protos. Summed
    per part: sizing the whole message costs as much as serializing it (and fails over 2 GB)."""
    nodes = sum(n.ByteSize() for n in model.graph.node if not any(a.HasField("t") or a.tensors for a in n.attribute))
    return tensor_payload(model, external=True) + nodes


def _constant_tensors(model: onnx.ModelProto) -> set[str]:
    """Initializers, Constant nodes and what nodes compute from them alone: a weight exported behind
    a Transpose or as a Constant node (TorchScript without constant folding) is still a layer's weight."""
    const = {t.name for t in model.graph.initializer}
    for n in model.graph.node:  # topological order
        if n.op_type == "Constant" or (n.input and all(i in const for i in n.input if i)
                                       and n.op_type not in ("RandomNormalLike", "RandomUniformLike")):
            const.update(o for o in n.output if o)
    return const


@dataclass
class Report:
    before: ModelStats
    after: ModelStats
    seconds: float
    events: list
    classes: dict = field(default_factory=dict)
    parity: object = None

    @classmethod
    def build(cls, original, result, events, seconds, classes) -> "Report":
        return cls(ModelStats.of(original), ModelStats.of(result), seconds, list(events), classes)

    def changed_layers(self) -> list[tuple[str, tuple[int, int], tuple[int, int] | None]]:
        rows = []
        for name, io in self.before.layers.items():
            new = self.after.layers.get(name)
            if new != io:
                rows.append((name, io, new))
        return rows

    def table(self, verbose: bool = False) -> str:
        b, a = self.before, self.after
        ops = sorted(set(b.ops) | set(a.ops))

        def ratio(x, y):
            return f"{y / x:.2f}x" if x else "-"

        rows = [
            ("nodes", sum(b.ops.values()), sum(a.ops.values())),
            ("parameters", b.params, a.params),
            ("MACs", b.macs, a.macs),
            ("file size (bytes)", b.size_bytes, a.size_bytes),
            ("opset", b.opset, a.opset),
        ]
        lines = [f"{'':28}{'before':>14}{'after':>14}{'ratio':>9}"]
        for label, x, y in rows:
            lines.append(f"{label:28}{x:>14,}{y:>14,}{ratio(x, y) if label != 'opset' else '':>9}")
        for op in ops:
            x, y = b.ops.get(op, 0), a.ops.get(op, 0)
            if verbose or x != y:
                lines.append(f"  {op:26}{x:>14}{y:>14}")
        lines.append(f"{'time (s)':28}{self.seconds:>28.2f}")
        counts = Counter(e.what for e in self.events)
        lines.append(
            f"BN folded: {counts.get('fold_bn', 0)}   constants absorbed into: {counts.get('absorb', 0)} layer(s)   "
            f"layers shrunk: {len(self.changed_layers())}"
        )
        hosted = counts.get("host", 0)
        if hosted or a.border_maps:
            lines.append(f"border maps: {hosted} carried by kept dead channels, {a.border_maps} as one-channel convs "
                         "over a ones image")
        spared = {e.where: e.detail for e in self.events if e.what == "spare"}
        if spared:
            lines.append(f"dead channels kept in {len(spared)} tensor(s): " + "; ".join(sorted(set(spared.values()))))
        if self.classes:
            c = self.classes
            lines.append(f"channel classes: {c['total']} ({', '.join(f'{k} {v}' for k, v in c['by_kind'].items())})")
            for reason, n in c.get("blocked", {}).items():
                lines.append(f"  kept ({n}): {reason}")
        if verbose:
            lines.append("channels per layer (in, out): before -> after")
            for name, old, new in self.changed_layers():
                lines.append(f"  {name:40} {old} -> {new if new else 'removed'}")
            if self.classes:
                for reason, n in self.classes.get("pinned", {}).items():
                    lines.append(f"  pinned ({n}): {reason}")
        if self.parity is not None:
            lines.append(f"parity (onnxruntime, atol {self.parity.atol:g}, rtol {self.parity.rtol:g}, {self.parity.batches} batches): "
                         + ("PASS" if self.parity.passed else "FAIL"))
            lines.extend("  " + line for line in self.parity.lines())
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {
            "before": self.before.__dict__, "after": self.after.__dict__, "seconds": self.seconds,
            "layers_changed": [{"name": n, "before": list(o), "after": list(a) if a else None} for n, o, a in self.changed_layers()],
            "events": [e.__dict__ for e in self.events],
            "classes": self.classes,
            "parity": self.parity.as_dict() if self.parity is not None else None,
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2, default=lambda o: list(o) if isinstance(o, tuple) else str(o))


def channel_summary(cg) -> dict:
    """Count a channel graph's classes by verdict and group the pin / keep reasons (for reports
    and inspect)."""
    from .channels.verdict import BLOCKED, PINNED, judge

    by_kind, pinned, blocked = Counter(), Counter(), Counter()
    for cls in cg.classes().values():
        v = judge(cls, cg)
        by_kind[v.kind] += 1
        if v.kind == PINNED:
            pinned[v.reason] += 1
        elif v.kind == BLOCKED:
            blocked[v.reason] += 1
    return {
        "total": sum(by_kind.values()),
        "by_kind": dict(by_kind.most_common()),
        "pinned": dict(pinned.most_common()),
        "blocked": dict(blocked.most_common(10)),
    }
