"""Making zeros: importance criteria, channel groups, config lists, and the prune entry point."""

from .block import block_prune_weights, block_sparsity

__all__ = ["block_prune_weights", "block_sparsity"]
