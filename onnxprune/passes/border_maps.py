"""--border-maps constant: the run-time ones images of the border maps become constants, so that
cleanup folds each map's Conv into a constant that is added to the layer's output.

For runtimes that prefer a constant operand to a small conv; onnxruntime does not (see
channels/linear.py: a constant operand breaks its NCHWc layout)."""

from __future__ import annotations

import numpy as np

from ..channels.linear import is_ones
from ..graph import Graph
from .base import Context

PASS = "border_maps"


def constant_border_maps(g: Graph, ctx: Context) -> bool:
    images = [n for n in g.nodes if n.op_type == "Expand" and is_ones(g.producer, n.output[0])
              and all(d is not None for d in g.shapes.get(n.output[0]) or (None,))]
    for expand in images:
        name = expand.output[0]
        dtype = g.inits[g.consumers()[name][0].input[1]].dtype if g.consumers().get(name) else np.float32
        g.remove_node(expand)
        g.inits[name] = np.ones(g.shapes[name], dtype)
        ctx.log(PASS, "constant", name, "border maps folded into constants")
    return bool(images)
