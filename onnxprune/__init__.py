"""onnxprune: turn a pruned ONNX model into one that is really smaller and faster, and provably
computes the same function."""

from .api import check, inspect, prune_file, rearrange, rearrange_file, simplify, simplify_file
from .errors import OnnxPruneError, ParityError
from .pruning.prune import prune

__all__ = ["simplify", "simplify_file", "check", "inspect", "prune", "prune_file", "rearrange", "rearrange_file",
           "OnnxPruneError", "ParityError"]
__version__ = "0.1.0"
