"""Host each border map in a dead channel that stays anyway: no map conv, no Add, exact at any size.

A border map is Conv(ones, K) with a layer's geometry, added to that layer's output
(channels/linear.py). If the layer's input still has a channel h that carries a known non-zero
constant c_h and that the layer does not read (a dead channel kept for --align, or one that could
not go), then giving the layer the column K / c_h for h adds c_h·conv_pad(1, K / c_h) =
conv_pad(1, K): the same map, made by the layer's own zero padding. The map conv, its ones image
and the Add go; the spared channel, computed anyway, now does the work. Runs once, after the
shrink fixed point (a channel that hosts is read again, so it cannot also be judged removable).
"""

from __future__ import annotations

import numpy as np

from ..graph import Graph
from ..layers import all_zero
from .base import Context
from .border_maps import Site, border_site

PASS = "host_border_maps"


def host_border_maps(g: Graph, ctx: Context) -> bool:
    cg = None
    hosted = False
    for node in g.nodes:
        site = border_site(g, node)  # (found afresh: hosting one map rewires the Adds of the next)
        if site is None:
            continue
        if cg is None:
            cg = g.channel_graph(ctx.pins)  # (hosting changes no channel's value)
        host = _host(g, cg, site.layer)
        if host is None:
            continue
        h, c = host
        w = g.inits[site.layer.input[1]]
        column = (g.inits[site.border.input[1]][:, 0].astype(np.float64) / c).astype(w.dtype)
        if not np.all(np.isfinite(column)):
            continue
        w = w.copy()
        w[:, h] += column  # (zero unless this pass already made h carry another of the layer's maps)
        g.set_input_const(site.layer, 1, w)
        _drop(g, site)
        ctx.log(PASS, "host", site.layer.name, f"border map carried by dead channel {h} of {site.layer.input[0]} "
                f"(constant {c:.4g})")
        hosted = True
    return hosted


def _host(g: Graph, cg, layer) -> tuple[int, float] | None:
    """The layer's unread input channel with the largest known non-zero constant, or None."""
    x = layer.input[0]
    sp = cg.space(x)
    if sp is None or sp.axes != (1,):
        return None
    values = cg.values[x]
    unread = all_zero(g.inits[layer.input[1]], 1)  # per input channel: its column is all zero
    candidates = np.flatnonzero(np.isfinite(values) & (values != 0) & unread)
    if not candidates.size:
        return None
    h = int(candidates[np.argmax(np.abs(values[candidates]))])
    return h, float(values[h])


def _drop(g: Graph, site: Site) -> None:
    """Remove the border conv and its Add: the layer's output (or r) takes the Add's place."""
    kept = next(i for i in site.add.input if i != site.border.output[0])
    g.remove_node(site.add)
    g.remove_node(site.border)
    if site.outer is None:
        g.set_output(site.layer, 0, site.add.output[0])  # the layer writes what the Add wrote
    else:
        g.set_input(site.outer, list(site.outer.input).index(site.add.output[0]), kept)
