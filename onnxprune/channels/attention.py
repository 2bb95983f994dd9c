"""Attention: the product of two activations (Q·Kᵀ, attn·V) and the Softmax between them.

A MatMul A [..., M, K] @ B [..., K, N] of two computed tensors has no weights to cut, but its axes
say how channels move through it. Per axis of an operand, a channel factor is
  batch       (the heads of [B, h, N, d]): shared by A, B and the output, one head of each together;
  contracted  (A's last axis, B's second to last: the d of Q·Kᵀ): summed away;
  row / col   (A's M axis, B's N axis: the d of attn·V): passes to the output's row / column.
Where the product has batch factors, every slot of one batch entry — the head's q and k features,
its scores, its attention weights, its v features and its output features — is one class: a head
lives or goes whole, so the reshapes around it stay boxes and the contraction (which reads q and k
with each other, not through weights) never loses a term that is still read. Without batch factors
a contracted channel is pinned (it is read by the other activation), row and column channels pass
through slot for slot.

Values. attn·V with attn a Softmax over its last axis: every row of attn sums to one, so a v
channel that is an input-independent constant c gives an output channel that is c, whatever the
scores (a head whose V rows are zero carries its V bias, which the output projection absorbs). That
is what makes a head removable: Q = K = 0 alone leaves the mean of V, which depends on the input, and
the head stays. (A row whose scores are all -inf is NaN in the model and c after absorption: no
exporter's mask leaves a query without a key.)

Softmax normalizes each row over its axis: channels on other axes pass through (each head on its
own); channels on the normalized axis all enter every sum and are pinned.
"""

from __future__ import annotations

import numpy as np

from ..graph import attrs, default_opset
from .registry import Rule, register_rule
from .rules import factor_keys, unite_along

BATCH, CONTRACTED, ROW, COL = "batch", "contracted", "row", "col"


def product_reason(node, what: str) -> str:
    return f"MatMul {node.name}: product of two activations {what}"


def axis_role(operand: int, axis: int, rank: int, out_rank: int) -> tuple[str, int | None]:
    """(role, output axis) of an axis of operand 0 (A) or 1 (B) of a MatMul."""
    if axis == rank - 1 - operand:
        return CONTRACTED, None
    if operand == 0 and axis == rank - 2:
        return ROW, out_rank - 2
    if operand == 1 and axis == rank - 1:
        return COL, out_rank - 1
    return BATCH, axis + out_rank - rank


class ActivationProduct:
    """The channel rule of a MatMul whose operands are both computed (see the module docstring)."""

    @staticmethod
    def factors(node, cg, operand: int) -> list[tuple[str, int | None, int]] | None:
        """Per channel factor of the operand's space: (role, output axis, size); None: no space."""
        name = node.input[operand]
        sp = cg.space(name)
        if sp is None:
            return None
        rank, out_rank = cg.rank(name), cg.rank(node.output[0])
        return [axis_role(operand, a, rank, out_rank) + (d,) for a, d in zip(sp.axes, sp.dims)]

    @classmethod
    def plan(cls, node, cg):
        """(output axes, the batch axes that make one class, operands broadcast over the heads) of
        the product's channels, or the reason it is pinned. A tracked operand with extent 1 on every
        head axis (the one k / v head of multi-query attention) meets every head: its own channels
        stay (pinned), the heads of the other still go whole. One with extent 1 on some head axes
        only (k [B, kv, 1, N, d] against q [B, kv, r, N, d]: grouped-query attention without the
        repeat) makes a class of all that share its heads (a k / v head with its r query heads)."""
        out_rank = cg.rank(node.output[0])
        ranks = [cg.rank(n) for n in node.input]
        if out_rank is None or None in ranks or min(ranks) < 2:
            return "unknown or 1-D operand shapes"
        facs = [cls.factors(node, cg, i) for i in (0, 1)]
        batch = {}  # (a head axis of size 1 is no head axis: it broadcasts)
        for f in facs:
            for role, axis, d in f or ():
                if role == BATCH and d > 1 and batch.setdefault(axis, d) != d:
                    return "with different head counts"
        owns = [{a for r, a, d in f if r == BATCH and d > 1} if f is not None else set() for f in facs]
        broadcast = []
        for i, (f, own) in enumerate(zip(facs, owns)):
            shape = cg.shape(node.input[i])
            extents = [shape[a - out_rank + len(shape)] if a - out_rank + len(shape) >= 0 else 1 for a in batch]
            if any(e != 1 for a, e in zip(batch, extents) if a not in own):
                return f"where {node.input[i]} has a head axis whose channels are not tracked"
            if f is not None and not own and batch:
                broadcast.append(i)
        facs = [None if i in broadcast else f for i, f in enumerate(facs)]
        contracted = [[d for r, _, d in f if r == CONTRACTED] if f is not None else [] for f in facs]
        if contracted[0] != contracted[1] and not broadcast:
            return "contracting channels against untracked data"
        if any(contracted) and not batch:
            return "contracting channels of both (no head axis to keep them with)"
        rows = [a for f in facs if f is not None for r, a, _ in f if r in (ROW, COL)]
        if not batch and len(rows) > 1:
            return "with channels on both the rows and the columns"
        grouping = set(batch).intersection(*(own for f, own in zip(facs, owns) if f is not None))
        if batch and not grouping:
            return "with heads on different axes"
        return tuple(sorted(set(batch) | set(rows))), tuple(sorted(grouping)), broadcast

    @classmethod
    def couple(cls, node, cg):
        if cg.space(node.input[0]) is None and cg.space(node.input[1]) is None:
            return
        plan = cls.plan(node, cg)
        sp_out = cg.new_space(node.output[0], plan[0]) if not isinstance(plan, str) and plan[0] else None
        if sp_out is None:
            reason = product_reason(node, plan if isinstance(plan, str) else "with dynamic head axes")
            for name in node.input:
                cg.pin_tensor(name, reason)
            return
        out_rank = cg.rank(node.output[0])
        head_slot = unite_along(cg, sp_out, [a not in plan[1] for a in sp_out.axes])  # one class per head
        for i, name in enumerate(node.input):
            sp = cg.space(name)
            if sp is None:
                continue
            if i in plan[2]:
                cg.pin_space(sp, product_reason(node, f"where {name} is shared by every head (broadcast): its width stays"))
                continue
            shift = out_rank - cg.rank(name)
            if plan[1]:  # every slot with an output slot of its head
                cg.unite(sp.slots, head_slot[factor_keys(sp.dims, [a + shift in plan[1] for a in sp.axes])])
            else:  # a row (A) or column (B) factor alone: slot for slot
                cg.unite(sp.slots, sp_out.slots)

    @staticmethod
    def values(node, cg):
        """attn·V: constant v channels stay constant (attn rows sum to one); zero stays zero. Only
        where the output's channels are v's own (v has the heads and passes its columns; attn has
        nothing but the heads)."""
        out = node.output[0]
        sp_out, sp_v = cg.space(out), cg.space(node.input[1])
        if sp_out is None or sp_v is None:
            return
        facs = ActivationProduct.factors(node, cg, 1)
        if (any(r in (CONTRACTED, ROW) for r, _, _ in facs) or not {a for _, a, _ in facs} <= set(sp_out.axes)
                or cg.space(node.input[0]) is not None and any(r != BATCH for r, _, _ in ActivationProduct.factors(node, cg, 0))):
            return
        # each output slot reads the v slot with its indices on v's axes (v may broadcast over some heads)
        idx = dict(zip(sp_out.axes, np.unravel_index(np.arange(sp_out.size), sp_out.dims)))
        v_slot = np.ravel_multi_index(tuple(idx[a] for _, a, _ in facs), sp_v.dims)
        v = cg.values[node.input[1]][v_slot]
        cg.values[out] = np.where(v == 0, 0.0, v) if row_stochastic(node.input[0], cg) else np.where(v == 0, 0.0, np.nan)


def head_roots(cg) -> set[int]:
    """The class roots of attention heads: the classes of a product's output slots over head axes."""
    roots = cg.roots()
    heads = set()
    for node in cg.nodes.values():
        if node.op_type == "MatMul" and not any(n in cg.g.inits for n in node.input):
            sp = cg.space(node.output[0])
            if sp is not None and any(axis_role(0, a, cg.rank(node.output[0]), cg.rank(node.output[0]))[0] == BATCH
                                      for a in sp.axes):
                heads |= set(roots[sp.slots].tolist())
    return heads


def softmax_axes(node, rank: int, opset: int) -> set[int]:
    axis = int(attrs(node).get("axis", -1 if opset >= 13 else 1))
    axis = axis + rank if axis < 0 else axis
    return {axis} if opset >= 13 else set(range(axis, rank))


def row_stochastic(name: str, cg) -> bool:
    """`name` is a Softmax over its last axis alone: every row sums to one."""
    node = cg.g.producer(name)
    rank = cg.rank(name)
    return (node is not None and node.op_type == "Softmax" and rank is not None
            and softmax_axes(node, rank, default_opset(cg.g.model)) == {rank - 1})


class Softmax(Rule):
    """Softmax / LogSoftmax: each row normalized over `axis` (from `axis` on before opset 13)."""

    def couple(self, node, cg):
        x = node.input[0]
        sp, rank = cg.space(x), cg.rank(x)
        if sp is None or rank is None:
            return
        if softmax_axes(node, rank, default_opset(cg.g.model)) & set(sp.axes):
            return self.pin_through(node, cg, f"{node.op_type} {node.name}: normalizes over the channel axis "
                                              "(every channel enters each sum): its width stays")
        cg.same_space(x, node.output[0])


register_rule(["Softmax", "LogSoftmax"], Softmax(), permute=True)
