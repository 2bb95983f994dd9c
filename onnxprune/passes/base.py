"""What every pass shares: its context (options, pins, the event log). The runner is in
onnxprune.pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field


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
    border_maps: str = "runtime"  # or "constant": how border maps are written (passes/border_maps.py)
    rounds: dict[str, int] = field(default_factory=dict)  # fixed point name -> rounds it took

    def log(self, pass_name: str, what: str, where: str, detail: str = "") -> None:
        self.events.append(Event(pass_name, what, where, detail))
