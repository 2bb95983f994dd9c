"""Rearrange: permute each layer's output channels by descending L1 norm, so that filters of
similar norm are neighbours and any block of N consecutive filters groups similar ones (the 1×N
paper's rearrangement; the order is the same for every N) — a real permutation of the graph, not
just a mask computed in sorted order.

The permutation is one of channel *classes*: every slot coupled to a layer's outputs (BN, the
activations, depthwise convs, the readers' input columns, concat offsets, flatten→Gemm columns)
moves with it, so the rearranged model computes exactly the input's function, and its 1×N
blocks are contiguous in memory, ready for BSR. Channels coupled across several layers (a
residual stream) get one shared order from their summed norms. Buckets that touch an op whose
channel bookkeeping a permutation would break (split, slice, shuffle, gather, grouped convs)
or that are pinned are left in place.
"""

from __future__ import annotations

import numpy as np

from ..channels.core import ChannelGraph
from ..channels.registry import capabilities, rule_for
from ..graph import Graph, attrs
from ..pruning.criteria import l1
from ..pruning.groups import Bucket, buckets, filters, layers
from .base import Context

PASS = "rearrange"


def rearrange_graph(g: Graph, ctx: Context) -> int:
    """Permute every movable bucket by descending L1 norm; returns how many were permuted."""
    cg = g.channel_graph(ctx.pins)
    roots = cg.roots()
    nodes = {node.name: node for node in layers(g)}
    order: dict[int, tuple[int, int]] = {}  # class root -> (bucket, new rank within the bucket)
    moved = 0
    for b in buckets(g, cg):
        why = immovable(b, g, cg, roots)
        if why:
            ctx.log(PASS, "keep", ",".join(b.layers), why)
            continue
        norms = sum(np.array([l1(filters(g, nodes[name]))[r].sum() for r in b.rows[name]]) for name in b.layers)
        ranks = np.argsort(-norms, kind="stable")
        if np.array_equal(ranks, np.arange(b.size)):
            continue
        for pos, i in enumerate(ranks):
            order[b.classes[i]] = (moved, pos)
        moved += 1
        ctx.log(PASS, "permute", ",".join(b.layers), f"{b.size} channels")
    if not order:
        return 0
    perms = _tensor_permutations(cg, roots, order)
    for node in g.nodes:
        rule_for(node).rewrite(node, g, cg, perms)
    return moved


def immovable(b: Bucket, g: Graph, cg: ChannelGraph, roots) -> str:
    if b.pinned:
        return "pinned: " + next(iter(b.pinned.values()))
    if any(len(r) != 1 for rows in b.rows.values() for r in rows):
        return "grouped conv channels"
    members = set(b.classes)
    producers, consumers = g.producers(), g.consumers()
    for name, sp in cg.spaces.items():
        if not members.intersection(roots[sp.base: sp.base + sp.size].tolist()):
            continue
        if len(sp.axes) != 1:
            return f"{name}: channels split over several axes (shuffle)"
        for node in [producers.get(name)] + consumers.get(name, []):
            if node is None:
                continue
            if "permute" not in capabilities(node):  # its rewrite is not a plain gather of channels
                return f"{node.op_type} {node.name} reads or writes these channels"
            if node.op_type == "Conv" and 1 < int(attrs(node).get("group", 1)) and g.inits[node.input[1]].shape[1] > 1:
                return f"grouped conv {node.name}"
    return ""


def _tensor_permutations(cg: ChannelGraph, roots, order: dict[int, tuple[int, int]]) -> dict[str, np.ndarray]:
    """For every tensor holding moved classes: its new slot order (a permutation of its slots).
    Each bucket's slots are reordered among the positions they hold (a concat holds several
    buckets side by side); a class's slots stay together (one slot, or a flatten's H·W features)."""
    perms = {}
    for name, sp in cg.spaces.items():
        r = roots[sp.base: sp.base + sp.size].tolist()
        keys = [order.get(x) for x in r]
        if all(k is None for k in keys):
            continue
        index = np.arange(sp.size)
        for bucket in {k[0] for k in keys if k is not None}:
            pos = np.array([i for i, k in enumerate(keys) if k is not None and k[0] == bucket])
            index[pos] = pos[np.argsort([keys[i][1] for i in pos], kind="stable")]
        perms[name] = index
    return perms
