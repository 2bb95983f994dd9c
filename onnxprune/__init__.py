"""onnxprune: turn a pruned ONNX model into one that is really smaller and faster, and provably
computes the same function."""

from .api import check, inspect, simplify, simplify_file
from .errors import OnnxPruneError, ParityError

__all__ = ["simplify", "simplify_file", "check", "inspect", "OnnxPruneError", "ParityError"]
__version__ = "0.1.0"
