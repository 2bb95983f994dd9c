"""Validation of the numbers users give, shared by the CLI (where flags are parsed) and the Python
API (where they are received): one rule per kind of value, one message, OnnxPruneError (exit 2)."""

from __future__ import annotations

import math

from .errors import OnnxPruneError


def tolerance(value, name: str) -> float:
    """atol / rtol: finite and >= 0 (NaN compares false with everything and would pass any model)."""
    v = _number(value, name)
    if not math.isfinite(v) or v < 0:
        raise OnnxPruneError(f"{name} must be a finite number >= 0, got {value}")
    return v


def positive_int(value, name: str) -> int:
    v = _integer(value, name)
    if v < 1:
        raise OnnxPruneError(f"{name} must be a positive integer, got {value}")
    return v


def non_negative_int(value, name: str) -> int:
    v = _integer(value, name)
    if v < 0:
        raise OnnxPruneError(f"{name} must be an integer >= 0, got {value}")
    return v


def seed(value, name: str = "seed") -> int:
    """numpy's generators take seeds >= 0."""
    return non_negative_int(value, name)


def sparsity(value, name: str = "sparsity") -> float:
    v = _number(value, name)
    if not 0 <= v < 1:  # also refuses NaN
        raise OnnxPruneError(f"{name} must be in [0, 1), got {value}")
    return v


def positive_number(value, name: str) -> float:
    v = _number(value, name)
    if not math.isfinite(v) or v <= 0:
        raise OnnxPruneError(f"{name} must be a finite number > 0, got {value}")
    return v


def _number(value, name: str) -> float:
    if isinstance(value, bool):
        raise OnnxPruneError(f"{name} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise OnnxPruneError(f"{name} must be a number, got {value!r}") from None


def _integer(value, name: str) -> int:
    if isinstance(value, bool):
        raise OnnxPruneError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    try:
        if isinstance(value, str):
            return int(value.strip())
        f = float(value)
    except (TypeError, ValueError):
        raise OnnxPruneError(f"{name} must be an integer, got {value!r}") from None
    if not f.is_integer():
        raise OnnxPruneError(f"{name} must be an integer, got {value!r}")
    return int(f)
