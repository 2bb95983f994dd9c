"""The channel graph (`core`), its rules (`registry`, and the families that register their ops:
`rules`, `linear`, `attention`, `layout`, `spatial`) and what can be done with a class (`verdict`).

Importing the package registers every built-in rule; `register_rule` adds users' own."""

from . import attention, layout, linear, rules, spatial  # noqa: F401  (each registers its ops)
from .registry import CAPABILITIES, Rule, capabilities, register_rule, registered_ops, rule_for, unregister_rule
from .rules import Elementwise

__all__ = ["CAPABILITIES", "Elementwise", "Rule", "capabilities", "register_rule", "registered_ops", "rule_for",
           "unregister_rule"]
