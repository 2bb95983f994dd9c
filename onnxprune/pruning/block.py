"""1xN block pruning of convolution weights.

A 1xN block is N consecutive output channels x 1 input channel x the whole
kh x kw kernel.  Zeroing whole blocks lets a block-sparse (BSR) kernel keep the N
output channels of a block in registers and skip the zero blocks entirely.

Row-balanced (`balanced=True`): every block row (N output channels) loses the same number of
blocks, its own weakest, so every row keeps the same count: a BSR kernel can then use static loop
bounds and split its rows evenly across threads. The price is the global ranking: a row of strong
filters loses as many blocks as a row of weak ones (its accuracy cost is measured in
benchmarks/prune_accuracy.py).
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
    balanced: bool = False,
) -> np.ndarray:
    """Boolean keep-mask (same shape as `w`) that zeroes a `sparsity` fraction of 1xN blocks.

    `w` is a conv weight (C_out, C_in, kh, kw) or a matrix (C_out, C_in); C_out % n must be 0.
    criterion "l1" drops the blocks with the lowest L1 norm, "random" drops random blocks; ranked
    over the whole layer, or with `balanced` within each block row, the same number per row.
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
    # stable sorts: ties broken by position, so the result is deterministic
    if balanced:
        keep_blocks = np.ones(scores.shape, dtype=bool)
        weakest = np.argsort(scores, axis=1, kind="stable")[:, :blocks_to_prune(scores.shape[1], sparsity)]
        np.put_along_axis(keep_blocks, weakest, False, axis=1)
    else:
        keep_blocks = np.ones(scores.size, dtype=bool)
        keep_blocks[np.argsort(scores, axis=None, kind="stable")[:blocks_to_prune(scores.size, sparsity)]] = False
        keep_blocks = keep_blocks.reshape(scores.shape)
    mask = np.repeat(keep_blocks, n, axis=0)  # (C_out, C_in)
    return np.broadcast_to(mask.reshape(mask.shape + (1,) * (w.ndim - 2)), w.shape).copy()


def block_sparsity(w: np.ndarray, n: int) -> float:
    """Fraction of 1xN blocks of `w` that are entirely zero."""
    return float((block_scores(w, n) == 0).mean())
