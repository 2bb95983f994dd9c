"""Passes as objects, and the one runner every command uses.

A `Pass` has a name, a function `(graph, ctx) -> changed` and the conditions it leaves behind
(`ensures`); `FixedPoint` repeats passes until a round changes nothing and raises if that does not
happen within `max_rounds` (a pass pair undoing each other is a bug, not a result). The runner
owns the caches: when a pass reports a change it calls `Graph.changed()`, which drops the inferred
shapes and the channel graph, so no pass clears them by hand. Errors are wrapped with the pass and
the round: an OnnxPruneError stays one (bad input, exit 2), anything else is a PassFailure (a bug,
exit 3) chained to the original.

With ONNXPRUNE_CHECK_PASSES=1 (the test suite sets it) every change is followed by a check of
the conditions the pass declares: a pass that leaves the graph unsorted or reading a tensor
nobody produces fails at that pass, not three passes later.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

from .errors import OnnxPruneError
from .graph import Graph, ModelFile, check_pins, load_model, name_nodes, read_model
from .passes.base import Context
from .passes.border_maps import place_border_maps
from .passes.cleanup import cleanup
from .passes.fold_bn import fold_bn
from .passes.host_border_maps import host_border_maps
from .passes.propagate_constants import propagate_constants
from .passes.rearrange import rearrange_graph
from .passes.remove_channels import remove_channels
from .report import ModelStats

SORTED = "topologically sorted"
DEFINED = "every input defined"


class PassFailure(RuntimeError):
    """A pass raised something other than OnnxPruneError: an onnxprune bug."""


@dataclass(frozen=True)
class Pass:
    name: str
    run: Callable[[Graph, Context], bool]
    ensures: frozenset = frozenset({SORTED, DEFINED})

    def __call__(self, g: Graph, ctx: Context, round_: int | None = None) -> bool:
        where = self.name + (f" (round {round_})" if round_ else "")
        try:
            changed = bool(self.run(g, ctx))
        except OnnxPruneError as e:
            raise type(e)(f"{where}: {e}") from None
        except Exception as e:
            raise PassFailure(f"pass {where} failed: {type(e).__name__}: {e}") from e
        if changed:
            g.changed()
            if os.environ.get("ONNXPRUNE_CHECK_PASSES"):
                broken = [c for c in sorted(self.ensures) if not CONDITIONS[c](g)]
                if broken:
                    raise PassFailure(f"pass {where} left the graph not {', '.join(broken)}")
        return changed


@dataclass(frozen=True)
class FixedPoint:
    """Run `passes` in order until a whole round changes nothing."""
    name: str
    passes: tuple[Pass, ...]
    max_rounds: int = 50

    def __call__(self, g: Graph, ctx: Context, round_: int | None = None) -> bool:
        changed_any = False
        limit = max(self.max_rounds, len(g.nodes))  # a cascade of constants advances a layer per round
        for r in range(1, limit + 1):
            changed = False
            for p in self.passes:
                changed |= p(g, ctx, r)
            if not changed:
                ctx.rounds[self.name] = r
                return changed_any
            changed_any = True
        raise PassFailure(f"{self.name} did not reach a fixed point in {limit} rounds "
                          f"({', '.join(p.name for p in self.passes)} keep changing the graph)")


@dataclass(frozen=True)
class Pipeline:
    """A named sequence of passes and fixed points."""
    name: str
    steps: tuple = field(default_factory=tuple)

    def __call__(self, g: Graph, ctx: Context) -> bool:
        changed = False
        for step in self.steps:
            changed |= step(g, ctx)
        return changed


def is_sorted(g: Graph) -> bool:
    seen = set(g.input_names) | set(g.inits) | {""}
    for n in g.nodes:
        if any(i not in seen for i in n.input):
            return False
        seen.update(n.output)
    return True


def inputs_defined(g: Graph) -> bool:
    known = set(g.input_names) | set(g.inits) | set(g.producers()) | {""}
    return all(i in known for n in g.nodes for i in n.input) and all(o in known for o in g.output_names)


CONDITIONS = {SORTED: is_sorted, DEFINED: inputs_defined}


# --- the passes and the named pipelines ------------------------------------------------------

CLEANUP = Pass("cleanup", cleanup)
FOLD_BN = Pass("fold_bn", fold_bn)
PROPAGATE = Pass("propagate_constants", propagate_constants)
REMOVE = Pass("remove_channels", remove_channels)
PLACE_BORDERS = Pass("border_maps", place_border_maps)
HOST = Pass("host_border_maps", host_border_maps)
REARRANGE = Pass("rearrange", rearrange_graph)


def simplify_pipeline(fold_bn: bool = True, propagate: bool = True, remove: bool = True) -> Pipeline:
    """cleanup → fold BN → (propagate constants → remove dead channels → cleanup) to a fixed point
    → border maps hosted by kept dead channels, the rest placed (constants where a conv over ones
    would not pay) → cleanup."""
    shrink = (PROPAGATE,) * propagate + (REMOVE,) * remove
    borders = (HOST, PLACE_BORDERS, CLEANUP) if propagate else ()
    return Pipeline("simplify", (CLEANUP,) + (FOLD_BN,) * fold_bn
                    + ((FixedPoint("shrink", shrink + (CLEANUP,)),) if shrink else ()) + borders)


ANALYSIS = Pipeline("analysis", (CLEANUP,))               # what inspect, prune and the PyTorch groups read
REARRANGE_ONLY = Pipeline("rearrange", (CLEANUP, REARRANGE))


def prepare(model, pins=(), stats: bool = False):
    """The first steps of every command: read once (a path: validated, external data mapped
    lazily; a ModelProto: validated and copied), check the pins, name the nodes. With `stats`,
    returns (Graph, ModelStats of the input) instead of the Graph."""
    if isinstance(model, ModelFile):
        proto, base_dir = model.take(), model.base_dir
    elif isinstance(model, (str, os.PathLike)):
        proto, base_dir = read_model(model), os.path.dirname(os.path.abspath(model))
    else:
        proto, base_dir = load_model(model), None
    check_pins(proto.graph, pins)
    before = ModelStats.of(proto) if stats else None
    try:
        g = Graph(proto, base_dir=base_dir)
    except OnnxPruneError as e:  # a weight that cannot be read: say which file
        raise OnnxPruneError(f"{os.fspath(model)}: {e}" if isinstance(model, (str, os.PathLike)) else str(e)) from None
    name_nodes(g)
    return (g, before) if stats else g


def cleaned_graph(model, ctx: Context | None = None, pins=()) -> Graph:
    """A working Graph over a private copy of `model` (path or ModelProto), cleaned up: Constant
    nodes and Identities would otherwise hide the structure the channel graph reads."""
    g = prepare(model, pins)
    ANALYSIS(g, ctx or Context(pins=set(pins)))
    return g
