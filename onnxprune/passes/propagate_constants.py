"""Propagate constant channels into the layers that read them.

A channel whose producers are all zero filters (or BN with γ = 0 ...) carries a known constant v
(the bias, pushed through BN, activations, residual adds ...). Each layer that reads it adds its
exact contribution W[:, c]·v to its bias — or, for zero-padded k×k convs, the exact border-aware
map — and zeroes column c. The function is unchanged and the channel becomes unread, so
remove_channels can drop it. Done only for classes whose every reader can absorb exactly.
"""

from __future__ import annotations

from collections import defaultdict

from ..channels.registry import rule_for
from ..channels.verdict import ABSORB, roots_of_kind
from ..graph import Graph
from .base import Context

PASS = "propagate_constants"


def propagate_constants(g: Graph, ctx: Context) -> bool:
    cg = g.channel_graph(ctx.pins)
    items = defaultdict(list)
    for root in roots_of_kind(cg, ABSORB):
        for r in cg.reads_of(root):
            if not r.zero:
                items[r.node].append((r.index, cg.value(r.tensor, r.index)))
    for name, absorbed in items.items():
        node = cg.nodes[name]
        rule_for(node).absorb(node, g, cg, sorted(absorbed, key=lambda kv: kv[0]))
        ctx.log(PASS, "absorb", name, f"{len(absorbed)} constant input channel(s) folded into the bias")
    return bool(items)
