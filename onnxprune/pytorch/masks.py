"""Masks on PyTorch modules, in the forms users have them.

Ours live as `torch.nn.utils.prune` reparametrizations (`weight_orig` x `weight_mask`, a forward
pre-hook recomputing `weight`), so users' code keeps working, optimizer steps cannot revive a
masked weight, and `prune.remove` makes them permanent. Accepted from elsewhere:
- `torch.nn.utils.prune` buffers already on the model;
- NNI's masks dict `{module_name or module: {"weight": mask, "bias": mask}}` (the `.pth`
  `export_model(mask_path=...)` writes; float 0/1 or bool);
- a flat `{"conv1.weight": mask}` keyed by parameter name;
- Torch-Pruning-style pruning choices: a list of `(module, output channel indices)`, expanded
  through the dependency groups to every producer of those channels.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import OnnxPruneError


def _prune():
    from torch.nn.utils import prune

    return prune


def pruning_hooks(module):
    prune = _prune()
    return [h for h in module._forward_pre_hooks.values() if isinstance(h, prune.BasePruningMethod)]


def apply_mask(module, param: str, mask) -> None:
    """Make `module.<param>` masked by `mask` (keep = True), replacing any mask it had."""
    import torch

    prune = _prune()
    mask = torch.as_tensor(mask).to(dtype=getattr(module, param).dtype, device=getattr(module, param).device)
    if hasattr(module, param + "_mask"):
        with torch.no_grad():
            getattr(module, param + "_mask").copy_(mask)
        for hook in pruning_hooks(module):
            if hook._tensor_name == param:
                setattr(module, param, hook.apply_mask(module))
    else:
        prune.custom_from_mask(module, param, mask)


def apply_masks(model, masks: dict) -> None:
    """`masks`: parameter name ("layer1.0.conv1.weight") -> keep mask."""
    for name, mask in masks.items():
        module, param = _split(model, name)
        apply_mask(module, param, mask)


def current_masks(model) -> dict:
    """The torch.nn.utils.prune masks on `model`: parameter name -> bool mask."""
    out = {}
    for mname, module in model.named_modules():
        for hook in pruning_hooks(module):
            mask = getattr(module, hook._tensor_name + "_mask")
            out[f"{mname}.{hook._tensor_name}" if mname else hook._tensor_name] = mask.detach().bool().clone()
    return out


def effective_weight(module, param: str = "weight"):
    """The weight the module computes with (masked), as a detached tensor."""
    if hasattr(module, param + "_orig"):
        return (getattr(module, param + "_orig") * getattr(module, param + "_mask")).detach()
    return getattr(module, param).detach()


def dense_weight(module, param: str = "weight"):
    """The weight without its mask (what a mask re-selection scores)."""
    return getattr(module, param + "_orig", getattr(module, param)).detach()


def make_permanent(model) -> None:
    """`prune.remove` on every reparametrization: the masked weights become plain parameters."""
    prune = _prune()
    for module in model.modules():
        for hook in pruning_hooks(module):
            prune.remove(module, hook._tensor_name)


def deep_copy(model):
    """copy.deepcopy that works on pruned models too: the `weight` a pruning hook computed is not
    a graph leaf, which deepcopy refuses; the hook recomputes it before every forward, so a
    detached copy of it in its place changes nothing."""
    import copy

    for module in model.modules():
        for hook in pruning_hooks(module):
            setattr(module, hook._tensor_name, getattr(module, hook._tensor_name).detach())
    return copy.deepcopy(model)


def baked_copy(model):
    """A deep copy with every mask made permanent (exporters see plain weights)."""
    clone = deep_copy(model)
    make_permanent(clone)
    return clone


def to_nni(model, masks: dict) -> dict:
    """NNI's format: {module_name: {"weight": float mask, "bias": float mask}}."""
    out: dict[str, dict] = {}
    for name, mask in masks.items():
        mname, _, param = name.rpartition(".")
        module = model.get_submodule(mname) if mname else model
        out.setdefault(mname, {})[param] = mask.to(getattr(module, param).dtype).cpu()
    return out


def normalize_masks(model, source, groups=None) -> dict:
    """Masks in any accepted form -> {parameter name: bool mask} (see the module docstring)."""
    import torch

    if isinstance(source, (str, Path)):
        try:
            source = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as e:
            raise OnnxPruneError(f"masks {source}: cannot read ({str(e).splitlines()[0][:200]})") from None
    if isinstance(source, (list, tuple)):
        return _from_choices(model, source, groups)
    if not isinstance(source, dict):
        raise OnnxPruneError(f"masks: expected a dict or a list of (module, indices), got {type(source).__name__}")
    names = {id(m): n for n, m in model.named_modules()}
    out = {}
    for key, value in source.items():
        if isinstance(key, torch.nn.Module):
            if id(key) not in names:
                raise OnnxPruneError("masks: a module key is not part of the model")
            key = names[id(key)]
        if isinstance(value, dict):  # NNI: {module: {"weight": m, "bias": m}}
            for param, m in value.items():
                if m is not None:
                    out[f"{key}.{param}" if key else param] = _bool_mask(model, f"{key}.{param}" if key else param, m)
        else:
            out[key] = _bool_mask(model, key, value)
    return out


def _bool_mask(model, name: str, mask):
    import torch

    module, param = _split(model, name)
    shape = tuple(getattr(module, param).shape)
    mask = torch.as_tensor(mask)
    if tuple(mask.shape) != shape:
        raise OnnxPruneError(f"masks: {name} has shape {list(shape)}, its mask {list(mask.shape)}")
    return mask != 0


def _from_choices(model, choices, groups) -> dict:
    """[(module, output channel indices)] -> masks zeroing those channels in every producer."""
    import torch

    if groups is None:
        raise OnnxPruneError("masks given as (module, indices) need the dependency groups (pass dummy_input)")
    masks: dict[str, torch.Tensor] = {}
    for module, idxs in choices:
        plan = groups.plan(module, idxs)
        for ch in plan.channels:
            if ch.pinned:
                raise OnnxPruneError(f"masks: channel of {plan.layer} is pinned ({ch.pinned})")
            for s in ch.producers:
                mod = model.get_submodule(s.module) if s.module else model
                name = f"{s.module}.{s.param}" if s.module else s.param
                m = masks.setdefault(name, torch.ones(getattr(mod, s.param).shape, dtype=torch.bool))
                m.index_fill_(s.axis, torch.tensor(s.indices), False)
    return masks


def _split(model, name: str):
    mname, _, param = name.rpartition(".")
    try:
        module = model.get_submodule(mname) if mname else model
    except AttributeError:
        raise OnnxPruneError(f"masks: the model has no module {mname!r} (for {name})") from None
    if not hasattr(module, param):
        raise OnnxPruneError(f"masks: {mname or 'the model'} has no parameter {param!r}")
    return module, param
