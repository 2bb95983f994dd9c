from .block import LayerPruneInfo, block_prune_weights, block_sparsity, prune_1xn

__all__ = ["LayerPruneInfo", "block_prune_weights", "block_sparsity", "prune_1xn"]
