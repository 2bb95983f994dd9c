"""Propagate constant channels into the layers that read them.

A channel whose producers are all zero filters (or BN with γ = 0 ...) carries a known constant v
(the bias, pushed through BN, activations, residual adds ...). Each layer that reads it adds its
exact contribution W[:, c]·v to its bias — or, for zero-padded k×k convs, the exact border-aware
map — and zeroes column c. The function is unchanged and the channel becomes unread, so
remove_channels can drop it. Done only for classes whose every reader can absorb exactly.
"""

from __future__ import annotations

import numpy as np

from ..channels.registry import rule_for
from ..channels.verdict import ABSORB, roots_of_kind
from ..graph import Graph
from .base import Context

PASS = "propagate_constants"


def propagate_constants(g: Graph, ctx: Context) -> bool:
    cg = g.channel_graph(ctx.pins)
    items = absorb_items(cg, roots_of_kind(cg, ABSORB))
    for name, absorbed in items.items():
        node = cg.nodes[name]
        rule_for(node).absorb(node, g, cg, absorbed)
        ctx.log(PASS, "absorb", name, f"{len(absorbed)} constant input channel(s) folded into the bias")
    if items:
        g.topo_sort()  # a border map reassociated into a residual Add reads a tensor made later
    return bool(items)


def absorb_items(cg, roots) -> dict[str, list]:
    """Layer name -> [(input slot, its constant or map)] of the reads with non-zero weights of
    these classes, in slot order (one vector pass over the reads, not one object per read)."""
    slot, block, index, zero, _ = cg.read_table()
    chosen = np.isin(cg.roots()[slot], np.asarray(roots, np.int64)) & ~zero
    items = {}
    for b in np.unique(block[chosen]).tolist():
        blk = cg.read_blocks[b]
        items[blk.node] = [(k, cg.value(blk.tensor, k)) for k in np.sort(index[chosen & (block == b)]).tolist()]
    return items
