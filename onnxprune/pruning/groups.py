"""Prunable channel groups, read off the channel dependency graph.

A filter cannot be pruned on its own when its channel is coupled to others (a residual add
joins the outputs of several convs; a depthwise conv carries its input channel through). The
unit of structured pruning is therefore a channel *class*, and classes produced by the same set
of layers form a *bucket* pruned at one ratio (e.g. every conv writing a ResNet stage's residual
stream). Zeroing a class means zeroing its filter in every producer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from ..channels.core import ChannelGraph
from ..channels.verdict import PINNED, judge
from ..graph import Graph
from ..layers import filters as layer_filters
from ..layers import is_linear

def group_label(layers, sep: str = "") -> str:
    """A group's first layer, "+k" when k more layers are coupled with it (the reports' label)."""
    return layers[0] + (f"{sep}+{len(layers) - 1}" if len(layers) > 1 else "")


def filters(g: Graph, node: onnx.NodeProto) -> np.ndarray:
    """The layer's weights with one output channel per row: [C_out, ...] (a view, not a copy)."""
    return layer_filters(g.inits[node.input[1]], node)


def layers(g: Graph) -> list[onnx.NodeProto]:
    """Linear layers with constant weights, in graph order."""
    return [n for n in g.nodes if is_linear(n) and g.is_const(n.input[1])]


@dataclass
class Bucket:
    layers: tuple[str, ...]                                  # producer layers, graph order
    classes: list[int] = field(default_factory=list)         # class roots
    rows: dict[str, list[list[int]]] = field(default_factory=dict)  # layer -> its rows of each class
    # (one row per class, except grouped convs: a class is one group-local index in every group)
    pinned: dict[int, str] = field(default_factory=dict)     # class root -> why it cannot go

    @property
    def size(self) -> int:
        return len(self.classes)


def buckets(g: Graph, cg: ChannelGraph) -> list[Bucket]:
    roots = cg.roots()
    classes = cg.classes()
    producers: dict[int, list[tuple[str, int]]] = {}
    order = []
    for node in layers(g):
        sp = cg.space(node.output[0])
        if sp is None:
            continue
        order.append(node.name)
        for row in range(sp.size):
            producers.setdefault(int(roots[sp.base + row]), []).append((node.name, row))
    by_layers: dict[tuple[str, ...], Bucket] = {}
    for root, prods in producers.items():
        names = tuple(sorted({n for n, _ in prods}, key=order.index))
        b = by_layers.setdefault(names, Bucket(names))
        b.classes.append(root)
        for name in names:
            b.rows.setdefault(name, []).append([row for n, row in prods if n == name])
        verdict = judge(classes[root], cg)
        if verdict.kind == PINNED:
            b.pinned[root] = verdict.reason
    for b in by_layers.values():  # classes in the order of the first layer's rows
        first = np.argsort([r[0] for r in b.rows[b.layers[0]]], kind="stable")
        b.classes = [b.classes[i] for i in first]
        b.rows = {k: [v[i] for i in first] for k, v in b.rows.items()}
    return sorted(by_layers.values(), key=lambda b: order.index(b.layers[0]))
