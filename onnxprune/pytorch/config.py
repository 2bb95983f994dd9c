"""NNI config lists for PyTorch modules: which modules are pruned, at which sparsity.

    config_list = [{"sparsity": 0.5, "op_types": ["Conv2d"]},        # NNI 3: "sparse_ratio"
                   {"sparsity": 0.7, "op_names": ["layer4.1.conv2"]},
                   {"exclude": True, "op_names": ["conv1"]}]

`op_types` are PyTorch class names ("default": every Conv / ConvTranspose / Linear);
`op_names` are module names. Entries apply in order, later ones override earlier ones; an entry
with both op_types and op_names matches the modules satisfying both. A bad entry is an error
naming the entry.
"""

from __future__ import annotations

from .. import checks
from ..errors import OnnxPruneError

KEYS = {"sparsity", "sparse_ratio", "sparsity_per_layer", "op_types", "op_names", "exclude"}
DEFAULT_TYPES = ("Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "Linear")


def resolve(model, config_list, extra_keys=(), allowed_types=None) -> dict[str, float]:
    """module name -> sparsity for the modules the config selects.

    `allowed_types`: the PyTorch class names this pruner can prune (others named in op_types
    are an error); `extra_keys`: keys a pruner adds (e.g. prune_iterations)."""
    if not isinstance(config_list, (list, tuple)) or not config_list:
        raise OnnxPruneError("config_list must be a non-empty list of dicts, e.g. [{'sparsity': 0.5, 'op_types': ['Conv2d']}]")
    modules = dict(model.named_modules())
    chosen: dict[str, float] = {}
    for i, entry in enumerate(config_list):
        where = f"config_list entry {i + 1} ({entry!r})"
        if not isinstance(entry, dict):
            raise OnnxPruneError(f"{where}: expected a dict")
        unknown = set(entry) - KEYS - set(extra_keys)
        if unknown:
            raise OnnxPruneError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; allowed: "
                                 f"{', '.join(sorted(KEYS | set(extra_keys)))}")
        types = _types(entry.get("op_types"), where, allowed_types)
        names = entry.get("op_names")
        if names is not None:
            if isinstance(names, str):
                names = [names]
            missing = [n for n in names if n not in modules]
            if missing:
                raise OnnxPruneError(f"{where}: the model has no module named {', '.join(map(repr, missing[:3]))}")
        if types is None and names is None:
            raise OnnxPruneError(f"{where}: needs op_types or op_names")
        hits = [n for n, m in modules.items() if n and (types is None or type(m).__name__ in types)
                and (names is None or n in names)]
        if entry.get("exclude"):
            for n in hits:
                chosen.pop(n, None)
            continue
        value = next((entry[k] for k in ("sparsity", "sparse_ratio", "sparsity_per_layer") if k in entry), None)
        if value is None:
            raise OnnxPruneError(f"{where}: needs sparsity (or sparse_ratio, or exclude: True)")
        s = checks.sparsity(value, f"{where}: sparsity")
        if allowed_types is not None:
            hits = [n for n in hits if type(modules[n]).__name__ in allowed_types]
        for n in hits:
            chosen[n] = s
    return chosen


def _types(types, where: str, allowed) -> set[str] | None:
    if types is None:
        return None
    if isinstance(types, str):
        types = [types]
    out = set()
    for t in types:
        if t == "default":
            out.update(allowed if allowed is not None else DEFAULT_TYPES)
        elif allowed is not None and t not in allowed:
            raise OnnxPruneError(f"{where}: this pruner cannot prune {t} modules (it prunes {', '.join(sorted(allowed))})")
        else:
            out.add(t)
    return out
