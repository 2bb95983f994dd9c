"""What every pass shares: its context (options, pins, the event log) and the fixed-point runner."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..graph import Graph


@dataclass
class Event:
    pass_name: str
    what: str       # short machine key: "fold_bn", "absorb", "remove", "pin", ...
    where: str      # node or tensor name
    detail: str = ""


@dataclass
class Context:
    pins: set[str] = field(default_factory=set)        # tensor names the user pinned
    events: list[Event] = field(default_factory=list)
    align: int = 1  # keep layer widths multiples of this (spare dead channels): fast kernels like it

    def log(self, pass_name: str, what: str, where: str, detail: str = "") -> None:
        self.events.append(Event(pass_name, what, where, detail))


# A pass edits the Graph in place and says whether it changed anything.
Pass = Callable[[Graph, Context], bool]


def run_to_fixed_point(passes: list[Pass], g: Graph, ctx: Context, max_rounds: int = 100) -> int:
    """Run the passes in order until a round changes nothing; returns the number of rounds."""
    for rounds in range(1, max_rounds + 1):
        changed = False
        for p in passes:
            changed |= bool(p(g, ctx))
        if not changed:
            return rounds
    return max_rounds
