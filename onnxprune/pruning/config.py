"""NNI-style config lists: which layers are pruned, at which sparsity.

    - sparsity: 0.5            # every entry may also say sparsity_per_layer
      op_types: [Conv]         # ONNX op types (Conv2d / Linear are accepted as aliases)
    - sparsity: 0.3
      op_names: [/layer4/layer4.1/conv2/Conv]
    - exclude: true
      op_names: [/fc/Gemm]

Entries apply in order, later ones override earlier ones; an entry with both op_types and
op_names matches the layers that satisfy both. The first conv and the classifier are left
alone unless prune_first / prune_last.
"""

from __future__ import annotations

from pathlib import Path

from .. import checks
from ..errors import OnnxPruneError
from ..layers import LINEAR_OPS

KEYS = {"sparsity", "sparsity_per_layer", "op_types", "op_names", "exclude"}
ALIASES = {"Conv2d": ["Conv"], "Conv1d": ["Conv"], "Linear": ["Gemm", "MatMul"], "ConvTranspose2d": ["ConvTranspose"],
           "default": list(LINEAR_OPS)}


def load_config(source) -> list[dict]:
    if isinstance(source, (list, tuple)):
        return [dict(e) for e in source]
    path = Path(source)
    if not path.is_file():
        raise OnnxPruneError(f"config {path}: no such file")
    import yaml

    try:
        data = yaml.safe_load(path.read_text())  # JSON is YAML too
    except Exception as e:
        raise OnnxPruneError(f"config {path}: not valid YAML/JSON ({str(e).splitlines()[0]})") from None
    if isinstance(data, dict) and "config_list" in data:
        data = data["config_list"]
    if not isinstance(data, list):
        raise OnnxPruneError(f"config {path}: expected a list of entries (or a mapping with config_list)")
    return data


def check_sparsity(value, where: str) -> float:
    return checks.sparsity(value, f"{where}: sparsity")


def resolve(config: list[dict], layers: list, prune_first: bool = False, prune_last: bool = False
            ) -> tuple[dict[str, float], dict[str, str]]:
    """(layer name -> sparsity, layer name -> why it is left alone) for the given layer nodes."""
    names = {n.name for n in layers}
    sparsity: dict[str, float] = {}
    skipped: dict[str, str] = {}
    for i, entry in enumerate(config):
        where = f"config entry {i + 1}"
        if not isinstance(entry, dict):
            raise OnnxPruneError(f"{where}: expected a mapping, got {entry!r}")
        unknown = set(entry) - KEYS
        if unknown:
            raise OnnxPruneError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(KEYS))}")
        types = _op_types(entry.get("op_types"), where)
        op_names = entry.get("op_names")
        if op_names is not None:
            missing = [n for n in op_names if n not in names]
            if missing:
                raise OnnxPruneError(f"{where}: no prunable layer named {', '.join(map(str, missing[:3]))} "
                                     f"(see `onnxprune inspect -v` for layer names)")
        if types is None and op_names is None:
            raise OnnxPruneError(f"{where}: needs op_types or op_names")
        chosen = [n for n in layers if (types is None or n.op_type in types) and (op_names is None or n.name in op_names)]
        if entry.get("exclude"):
            for n in chosen:
                sparsity.pop(n.name, None)
                skipped[n.name] = "excluded by the config"
            continue
        value = entry.get("sparsity", entry.get("sparsity_per_layer"))
        if value is None:
            raise OnnxPruneError(f"{where}: needs sparsity (or exclude: true)")
        s = check_sparsity(value, where)
        for n in chosen:
            sparsity[n.name] = s
            skipped.pop(n.name, None)
    if layers and not prune_first and layers[0].name in sparsity:
        del sparsity[layers[0].name]
        skipped[layers[0].name] = "first layer kept (use --prune-first)"
    if len(layers) > 1 and not prune_last and layers[-1].name in sparsity:
        del sparsity[layers[-1].name]
        skipped[layers[-1].name] = "classifier kept (use --prune-last)"
    return sparsity, skipped


def _op_types(types, where: str) -> set[str] | None:
    if types is None:
        return None
    if isinstance(types, str):
        types = [types]
    out = set()
    for t in types:
        if t in ALIASES:
            out.update(ALIASES[t])
        elif t in LINEAR_OPS:
            out.add(t)
        else:
            raise OnnxPruneError(f"{where}: op type {t!r} cannot be pruned ({', '.join(LINEAR_OPS)})")
    return out


def default_config(sparsity: float) -> list[dict]:
    return [{"sparsity": sparsity, "op_types": ["default"]}]
