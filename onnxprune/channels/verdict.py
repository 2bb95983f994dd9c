"""What can be done with a channel class: remove it, absorb its constant first, or nothing (and why)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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


KINDS = (UNREAD, ABSORB, PINNED, BLOCKED, LIVE)


def judge(cls: ChannelClass, cg: ChannelGraph) -> Verdict:
    if cls.verdict is None:
        cls.verdict = _judge(cls, cg)
    return cls.verdict


def roots_of_kind(cg: ChannelGraph, kind: str) -> list[int]:
    """The roots of every class with this verdict (what the passes ask), in one vector pass."""
    roots = cg.roots()
    code = kinds(cg)
    return np.flatnonzero((code == KINDS.index(kind)) & (roots == np.arange(roots.size))).tolist()


def kinds(cg: ChannelGraph) -> np.ndarray:
    """Per slot, the verdict of its class (valid at class roots) as an index into KINDS: the rules
    of `_judge`, for every class at once."""
    def compute():
        roots = cg.roots()
        live, first_stuck = cg.read_counts()
        code = np.full(cg.n_slots, KINDS.index(LIVE))
        code[first_stuck < 0] = KINDS.index(ABSORB)
        code[(first_stuck >= 0) & cg.constant_roots()] = KINDS.index(BLOCKED)
        code[live == 0] = KINDS.index(UNREAD)
        if cg.pin_reasons:
            code[roots[np.fromiter(cg.pin_reasons, np.int64)]] = KINDS.index(PINNED)
        return code
    return cg.derived("kinds", compute)


def _judge(cls: ChannelClass, cg: ChannelGraph) -> Verdict:
    kind = KINDS[kinds(cg)[cls.root]]
    if kind == PINNED:
        return Verdict(PINNED, sorted(cls.pins)[0])
    if kind != BLOCKED:
        return Verdict(kind)
    r = cg.read_at(int(cg.read_counts()[1][cls.root]))
    why = r.why_not or (f"its constant meets input-dependent data (a residual add with a live branch, an SE gate ...) "
                        f"before {r.node} reads {r.tensor}")
    return Verdict(BLOCKED, why)
