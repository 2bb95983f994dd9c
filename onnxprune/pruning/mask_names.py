"""Masks made elsewhere, keyed by the names their tool knows, matched to the model's initializers.

PyTorch names a weight `layer1.0.conv1.weight`; the TorchScript exporter with constant folding
(its default) renames it `onnx::Conv_123` (BN folded into it, so the values differ too), while
`do_constant_folding=False` and `dynamo=True` keep parameter names. A key is matched, in order:
1. by name: the initializer itself, or `<key>.weight`, or the key without a `_mask` suffix;
2. by shape, where that is unambiguous: the only layer weight of the mask's shape (or of its
   transpose: a Linear's weight exported as a MatMul's [in, out] matrix) not yet matched;
3. by shape and zeros: of several such weights, the only one that is zero wherever the mask is
   (the model was exported from the masked PyTorch model).
Anything else is refused with the reason and the way to get matching names.
"""

from __future__ import annotations

import numpy as np

from ..errors import OnnxPruneError
from ..graph import Graph
from .groups import layers

HOW = ("export with torch.onnx.export(..., do_constant_folding=False) or dynamo=True to keep PyTorch "
       "parameter names (the default constant folding renames weights to onnx::Conv_N)")


def match_masks(g: Graph, masks: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(initializer name -> keep mask in the initializer's layout, initializer name -> how matched)."""
    matched: dict[str, np.ndarray] = {}
    how: dict[str, str] = {}
    rest = {}
    for key, mask in masks.items():
        name = _by_name(g, key)
        if name is None:
            rest[key] = np.asarray(mask)
            continue
        _take(matched, how, name, np.asarray(mask), key, "by name", g)
    pool = [n.input[1] for n in layers(g) if n.input[1] not in matched]
    progress = True
    while rest and progress:
        progress = False
        for key, mask in list(rest.items()):
            found = _by_shape(g, mask, pool)
            if found is None:
                continue
            name, transposed, rule = found
            _take(matched, how, name, mask.T if transposed else mask, key, rule + (" (transposed)" if transposed else ""), g)
            pool.remove(name)
            del rest[key]
            progress = True
    if rest:
        key, mask = next(iter(rest.items()))
        same = [n for n in pool if g.inits[n].shape in (mask.shape, mask.T.shape)]
        if not matched:
            raise OnnxPruneError(f"masks: no key names an initializer of the model (e.g. {key}; the model has "
                                 f"{_examples(g)}) and {len(same)} layer weights have the shape "
                                 f"{list(mask.shape)}: {HOW}")
        raise OnnxPruneError(f"masks: {key} {list(mask.shape)} names no initializer and {len(same)} unmatched "
                             f"layer weights have its shape: {HOW}")
    return matched, how


def _by_name(g: Graph, key: str) -> str | None:
    for name in (key, f"{key}.weight", key.removesuffix("_mask")):
        if g.is_const(name):
            return name
    return None


def _by_shape(g: Graph, mask: np.ndarray, pool: list[str]) -> tuple[str, bool, str] | None:
    fits = [(n, g.inits[n].shape != mask.shape) for n in pool
            if g.inits[n].shape == mask.shape or (mask.ndim == 2 and g.inits[n].shape == mask.T.shape)]
    if len(fits) == 1:
        return fits[0] + ("by shape",)
    zeros = [(n, t) for n, t in fits if not np.any((mask.T if t else mask) == 0) or
             np.all(g.inits[n][(mask.T if t else mask) == 0] == 0)]
    if len(zeros) == 1 and np.any(mask == 0):
        return zeros[0] + ("by shape and zeros",)
    return None


def _take(matched, how, name, mask, key, rule, g) -> None:
    w = g.inits[name]
    if mask.shape != w.shape:
        raise OnnxPruneError(f"masks: {key} has shape {list(mask.shape)}, the initializer {name} {list(w.shape)}")
    if name in matched:
        raise OnnxPruneError(f"masks: {key} and another key both name {name}")
    matched[name] = mask.astype(bool)
    how[name] = "" if key == name else f"mask {key} matched {rule}"


def _examples(g: Graph) -> str:
    names = [n.input[1] for n in layers(g)][:2]
    return ", ".join(names) if names else "no prunable layer"
