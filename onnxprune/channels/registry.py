"""Which rule describes an op: a registry keyed by (domain, op type), and the `Rule` base class.

The rule families — `rules` (elementwise ops, norms), `linear`, `layout`, `spatial` — register
their ops when the package is imported (`channels/__init__.py`); nothing here imports them, so
there is no cycle. Users describe their own ops (a custom domain, a fused kernel) the same way:

    from onnxprune.channels import Elementwise, register_rule
    register_rule("ScaledGelu", Elementwise(data_inputs=1), domain="com.example", permute=True)

An op without a rule pins every channel it touches: never guess.

What a rule can do is declared, not duck-typed: `Rule.can` lists the capabilities whose method
the rule's class implements, and `permute` (its rewrite is a plain gather of channels, valid for
any permutation: `onnxprune rearrange` may move channels through it) is declared at registration.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ..graph import _subgraph_inputs

# couple: the output spaces, which slots are united, which pinned; values: which output slots
# carry an input-independent constant; reads: where a linear layer reads a slot through one weight
# column; absorb: fold known constant inputs into the bias; rewrite: drop (or reorder) the slots
# not in `keep` from the node's parameters (what removal and rearrangement run)
CAPABILITIES = ("couple", "values", "reads", "absorb", "rewrite")


class Rule:
    """The default rule (an op not understood): pin everything, compute nothing."""

    def couple(self, node: onnx.NodeProto, cg) -> None:
        self.pin_through(node, cg, f"{node.op_type} {node.name}: op not understood")

    def values(self, node: onnx.NodeProto, cg) -> None:
        pass

    def reads(self, node: onnx.NodeProto, cg) -> list:
        """`core.ReadBlock`s: where this layer reads input slots through its own weights."""
        return []

    def absorb(self, node: onnx.NodeProto, g, cg, items: list) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot absorb constants")

    def rewrite(self, node: onnx.NodeProto, g, cg, keep: dict[str, np.ndarray]) -> None:
        pass

    @property
    def can(self) -> frozenset[str]:
        """The capabilities this rule's class implements (beyond the default's)."""
        return frozenset(c for c in CAPABILITIES if getattr(type(self), c) is not getattr(Rule, c))

    @staticmethod
    def pin_through(node: onnx.NodeProto, cg, reason: str) -> None:
        """Pin every input; the outputs carry no channel space (which axis holds channels there is
        not known), so any op that would couple channels with them pins its side too."""
        pin_all(node, cg, reason)

    @staticmethod
    def pin_extra_inputs(node: onnx.NodeProto, cg, data_inputs: int) -> None:
        """Inputs past the data inputs (shapes, scales, weights ...) must not carry channels."""
        for name in node.input[data_inputs:]:
            if cg.space(name) is not None:
                cg.pin_tensor(name, f"{node.op_type} {node.name}: reads channels as a parameter")


def pin_all(node: onnx.NodeProto, cg, reason: str, names=None) -> None:
    for name in names if names is not None else list(node.input) + list(_subgraph_inputs(node)):
        cg.pin_tensor(name, reason)


@dataclass(frozen=True)
class Registration:
    rule: Rule
    permute: bool = False


DEFAULT = Rule()
_REGISTRY: dict[tuple[str, str], Registration] = {}


def _domain(domain: str) -> str:
    return "" if domain in ("", "ai.onnx") else domain


def register_rule(op_types, rule: Rule | None = None, *, domain: str = "", permute: bool = False):
    """Describe `op_types` (a name or several) of `domain` with `rule`, replacing any rule they had.
    Without `rule`, a decorator for a Rule subclass (registered with an instance of it)."""
    ops = [op_types] if isinstance(op_types, str) else list(op_types)
    if rule is None:
        def decorate(cls):
            register_rule(ops, cls(), domain=domain, permute=permute)
            return cls
        return decorate
    if not isinstance(rule, Rule):
        raise TypeError(f"register_rule: {rule!r} is not a onnxprune.channels.Rule")
    if "reads" in rule.can and "absorb" not in rule.can:
        raise TypeError(f"register_rule: {type(rule).__name__} lists reads but cannot absorb them")
    for op in ops:
        _REGISTRY[(_domain(domain), op)] = Registration(rule, permute)
    return rule


def unregister_rule(op_types, *, domain: str = "") -> None:
    for op in [op_types] if isinstance(op_types, str) else op_types:
        _REGISTRY.pop((_domain(domain), op), None)


def _registration(node: onnx.NodeProto) -> Registration | None:
    return _REGISTRY.get((_domain(node.domain), node.op_type))


def rule_for(node: onnx.NodeProto) -> Rule:
    reg = _registration(node)
    return reg.rule if reg is not None else DEFAULT


def capabilities(node: onnx.NodeProto) -> frozenset[str]:
    reg = _registration(node)
    if reg is None:
        return frozenset()
    return reg.rule.can | ({"permute"} if reg.permute else set())


def registered_ops(domain: str = "") -> list[str]:
    return sorted(op for d, op in _REGISTRY if d == _domain(domain))
