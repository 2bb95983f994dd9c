"""What can be done with a channel class: remove it, absorb its constant first, or nothing (and why)."""

from __future__ import annotations

from dataclasses import dataclass

from .core import ChannelClass, ChannelGraph

UNREAD = "unread"        # no layer reads it with a non-zero weight: remove it
ABSORB = "absorb"        # every non-zero read sees a known constant: fold it into the readers' biases
PINNED = "pinned"        # touches a graph input/output, an op we do not understand, a user pin ...
BLOCKED = "blocked"      # carries a constant somewhere, but a reader cannot absorb it exactly
LIVE = "live"            # an ordinary channel in use


@dataclass
class Verdict:
    kind: str
    reason: str = ""


def judge(cls: ChannelClass, cg: ChannelGraph) -> Verdict:
    if cls.verdict is None:
        cls.verdict = _judge(cls, cg)
    return cls.verdict


def _judge(cls: ChannelClass, cg: ChannelGraph) -> Verdict:
    if cls.pins:
        return Verdict(PINNED, sorted(cls.pins)[0])
    live = [r for r in cls.reads if not r.zero]
    if not live:
        return Verdict(UNREAD)
    stuck = [r for r in live if not r.absorbable]
    if not stuck:
        return Verdict(ABSORB)
    if not _has_constant(cls, cg):
        return Verdict(LIVE)
    r = stuck[0]
    why = r.why_not or (f"its constant meets input-dependent data (a residual add with a live branch, an SE gate ...) "
                        f"before {r.node} reads {r.tensor}")
    return Verdict(BLOCKED, why)


def _has_constant(cls: ChannelClass, cg: ChannelGraph) -> bool:
    return bool(cg.known_slots()[cls.slots].any())
