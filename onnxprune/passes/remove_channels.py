"""Remove dead channels: every class that no layer reads with a non-zero weight and that nothing
pins disappears from all its slots at once — producer rows, consumer columns, BN parameters,
per-channel constants, split sizes, reshape shapes, flatten→Gemm columns, depthwise groups."""

from __future__ import annotations

import math

import numpy as np

from ..channels.core import ChannelGraph
from ..channels.registry import rule_for
from ..channels.rules import NonRectangular, new_dims
from ..channels.verdict import UNREAD, roots_of_kind
from ..graph import Graph
from ..layers import is_linear
from .base import Context

PASS = "remove_channels"


def remove_channels(g: Graph, ctx: Context) -> bool:
    cg = g.channel_graph(ctx.pins)
    doomed = set(roots_of_kind(cg, UNREAD))
    layer_outputs = {n.output[0] for n in g.nodes if is_linear(n)}
    keep = _keep_lists(cg, doomed, ctx, layer_outputs)
    if not keep:
        return False
    for node in g.nodes:
        rule_for(node).rewrite(node, g, cg, keep)
    producers = g.producers()
    for name, kept in keep.items():
        producer = producers.get(name)
        if producer is not None and is_linear(producer) and name == producer.output[0]:
            ctx.log(PASS, "remove", producer.name, f"{cg.spaces[name].size - len(kept)} of {cg.spaces[name].size} output channels")
    return True


def layer_align(align: int, width: int) -> int:
    """What --align asks of a layer `width` wide: the largest divisor of `align` that the width is a
    multiple of (24 under 16: 8), and at most half the width (16 under 16: 8), so that alignment
    alone never keeps a half-pruned layer whole."""
    a = math.gcd(align, width)
    while a > 1 and 2 * a > width:
        a = math.gcd(a // 2, width)
    return a


def _host_score(cg: ChannelGraph, roots: np.ndarray) -> np.ndarray:
    """Per class root: the smallest |constant| it carries over the tensors it spans (0 where it is
    not a known non-zero constant everywhere). A dead channel kept for alignment with a score > 0
    can carry the border maps of the layers that read it (host_border_maps), the larger the better."""
    values = np.full(cg.n_slots, np.nan)
    for name, sp in cg.spaces.items():
        values[sp.base: sp.base + sp.size] = cg.values[name]
    magnitude = np.where(np.isfinite(values), np.abs(values), 0.0)
    score = np.full(cg.n_slots, np.inf)
    np.minimum.at(score, roots, magnitude)
    return score


def _keep_lists(cg: ChannelGraph, doomed: set[int], ctx: Context, layer_outputs=frozenset()) -> dict[str, np.ndarray]:
    """Slots to keep per tensor; spares the classes whose removal is impossible to express
    (a tensor left with no channel, a split channel range that would not stay a box) and, with
    ctx.align > 1, enough dead channels to keep each layer's width a multiple of `layer_align`."""
    roots = cg.roots()
    host_score = _host_score(cg, roots)
    while doomed:
        dead = np.isin(roots, np.fromiter(doomed, np.int64))
        spared = set()
        keep = {}
        for name, sp in cg.spaces.items():
            d = dead[sp.base: sp.base + sp.size]
            if not d.any():
                continue
            kept = np.flatnonzero(~d)
            if kept.size == 0:
                spared.add(int(roots[sp.base]))  # keep one channel: an empty tensor is not a layer
                ctx.log(PASS, "spare", name, "last channel kept")
                continue
            try:
                new_dims(sp, kept)
            except NonRectangular:
                spared |= {int(r) for r in roots[sp.base: sp.base + sp.size][d]}
                ctx.log(PASS, "spare", name, "removal would break a split channel range (shuffle)")
                continue
            align = layer_align(ctx.align, sp.size)
            short = -kept.size % align
            if name in layer_outputs and short:
                dead_roots = roots[sp.base: sp.base + sp.size][d]
                first = np.argsort(-host_score[dead_roots], kind="stable")[:short]  # the best hosts first
                spared |= {int(r) for r in dead_roots[first]}
                ctx.log(PASS, "spare", name, f"kept to stay a multiple of {align} (--align {ctx.align})")
                continue
            keep[name] = kept
        if not spared:
            return keep
        doomed -= spared
    return {}
