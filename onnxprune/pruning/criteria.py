"""Importance criteria: small pure functions over weights and activations. Higher = more important."""

from __future__ import annotations

import numpy as np

STRUCTURED = ("l1", "l2", "fpgm", "random", "apoz", "mean_activation")
DATA_DRIVEN = ("apoz", "mean_activation")
REDUCE = ("sum", "mean", "max")
# the registries `PruneOptions` (and so the CLI) take their choices from
FOR_GRANULARITY = {"filter": STRUCTURED, "head": ("l1", "l2", "random") + DATA_DRIVEN, "weight": ("level",),
                   "1xN": ("l1", "random")}
CRITERIA = STRUCTURED + ("level",)


def rows(w: np.ndarray) -> np.ndarray:
    """A layer's filters as rows: [C_out, everything else] in float64."""
    return w.reshape(w.shape[0], -1).astype(np.float64)


def l1(w: np.ndarray) -> np.ndarray:
    return np.abs(rows(w)).sum(axis=1)


def l2(w: np.ndarray) -> np.ndarray:
    return np.sqrt((rows(w) ** 2).sum(axis=1))


def fpgm(w: np.ndarray) -> np.ndarray:
    """Filter Pruning via Geometric Median (He et al. 2019): a filter close to the geometric
    median of its layer is replaceable by the others. Its score is the sum of its Euclidean
    distances to all filters of the layer; the smallest sums go first."""
    r = rows(w)
    sq = (r ** 2).sum(axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * r @ r.T, 0.0)
    return np.sqrt(d2).sum(axis=1)


def apoz(act: np.ndarray, axis: int = 1) -> np.ndarray:
    """Average Percentage of Zeros per channel (Hu et al. 2016); returned as 1 − APoZ so that,
    like every criterion here, higher means more important."""
    moved = np.moveaxis(act, axis, 0).reshape(act.shape[axis], -1)
    return 1.0 - (moved == 0).mean(axis=1)


def mean_activation(act: np.ndarray, axis: int = 1) -> np.ndarray:
    """Mean activation per channel (Molchanov et al. 2017, as NNI's ActivationMeanRankPruner)."""
    moved = np.moveaxis(act, axis, 0).reshape(act.shape[axis], -1)
    return moved.astype(np.float64).mean(axis=1)


WEIGHT_CRITERIA = {"l1": l1, "l2": l2, "fpgm": fpgm}
ACTIVATION_CRITERIA = {"apoz": apoz, "mean_activation": mean_activation}


def reduce(scores: list[np.ndarray], how: str) -> np.ndarray:
    """Combine the per-producer scores of coupled channels (e.g. every conv feeding a residual add)."""
    stacked = np.stack(scores)
    if how == "sum":
        return stacked.sum(axis=0)
    if how == "mean":
        return stacked.mean(axis=0)
    if how == "max":
        return stacked.max(axis=0)
    raise ValueError(f"group reduce must be one of {REDUCE}, got {how!r}")


def level_mask(w: np.ndarray, sparsity: float) -> np.ndarray:
    """Unstructured magnitude pruning: keep-mask zeroing exactly round(sparsity · size) weights
    of smallest |w| (ties broken by position, so it is deterministic)."""
    k = int(round(sparsity * w.size))
    keep = np.ones(w.size, bool)
    keep[np.argsort(np.abs(w).reshape(-1), kind="stable")[:k]] = False
    return keep.reshape(w.shape)


def weight_set(criterion: str, parts: list[np.ndarray]) -> float:
    """l1 or l2 of a set of weights taken together (a head's q, k, v rows and output columns)."""
    flat = np.concatenate([np.asarray(p, np.float64).reshape(-1) for p in parts])
    return float(np.abs(flat).sum()) if criterion == "l1" else float(np.sqrt((flat ** 2).sum()))


def lowest(scores: np.ndarray, count: int) -> np.ndarray:
    """Indices of the `count` lowest scores (stable: ties go to the earlier index)."""
    return np.argsort(scores, kind="stable")[:count]
