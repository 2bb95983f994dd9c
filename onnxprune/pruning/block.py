"""1xN block pruning of convolution weights.

A 1xN block is N consecutive output channels x 1 input channel x the whole
kh x kw kernel.  Zeroing whole blocks lets a block-sparse (BSR) kernel keep the N
output channels of a block in registers and skip the zero blocks entirely.
"""

from __future__ import annotations

import numpy as np

CRITERIA = ("l1", "random")


def _check_args(n: int, sparsity: float, criterion: str) -> None:
    if n < 1:
        raise ValueError(f"block size N must be >= 1, got {n}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")


def block_scores(w: np.ndarray, n: int) -> np.ndarray:
    """L1 norm of every 1xN block: shape (C_out // n, C_in)."""
    c_out, c_in = w.shape[0], w.shape[1]
    blocks = np.abs(w.reshape(c_out // n, n, c_in, -1))
    return blocks.sum(axis=(1, 3))


def blocks_to_prune(num_blocks: int, sparsity: float) -> int:
    # ceil, so that the achieved block sparsity is never below the request; but a layer keeps at
    # least one block (an all-zero layer is a constant, not a pruned layer)
    return min(max(num_blocks - 1, 0), int(np.ceil(sparsity * num_blocks - 1e-9)))


def block_prune_weights(
    w: np.ndarray,
    n: int,
    sparsity: float,
    *,
    criterion: str = "l1",
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Boolean keep-mask (same shape as `w`) that zeroes a `sparsity` fraction of 1xN blocks.

    `w` is a conv weight (C_out, C_in, kh, kw) or a matrix (C_out, C_in); C_out % n must be 0.
    criterion "l1" drops the blocks with the lowest L1 norm, "random" drops random blocks.
    """
    _check_args(n, sparsity, criterion)
    if w.ndim < 2:
        raise ValueError(f"weight must be at least 2-D, got shape {w.shape}")
    if w.shape[0] % n:
        raise ValueError(f"C_out={w.shape[0]} is not a multiple of N={n}")
    scores = block_scores(w, n)
    if criterion == "random":
        rng = rng if rng is not None else np.random.default_rng()
        scores = rng.random(scores.shape)
    num_pruned = blocks_to_prune(scores.size, sparsity)
    keep_blocks = np.ones(scores.size, dtype=bool)
    # stable sort: ties broken by position, so the result is deterministic
    keep_blocks[np.argsort(scores, axis=None, kind="stable")[:num_pruned]] = False
    keep_blocks = keep_blocks.reshape(scores.shape)
    mask = np.repeat(keep_blocks, n, axis=0)  # (C_out, C_in)
    return np.broadcast_to(mask.reshape(mask.shape + (1,) * (w.ndim - 2)), w.shape).copy()


def block_sparsity(w: np.ndarray, n: int) -> float:
    """Fraction of 1xN blocks of `w` that are entirely zero."""
    return float((block_scores(w, n) == 0).mean())
