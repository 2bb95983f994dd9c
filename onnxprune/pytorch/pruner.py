"""Pruners on PyTorch modules with NNI's names and arguments, dependency-aware through the channel graph.

A pruner = a criterion (scores per channel of a group) + when it runs (`compress`, `update_mask`,
training hooks in the subclasses that need gradients or activations). Masks are
`torch.nn.utils.prune` buffers (see masks.py), so the model keeps training with them.

    pruner = L1FilterPruner(model, config_list, dummy_input=x)   # dependency-aware by default
    model = pruner.compress()                                     # masks applied
    ... train as usual ...
    pruner.export_model("m.pth", "mask.pth", onnx_path="m.onnx", dummy_input=x)

Filter pruners score and mask whole channel groups (every producer of a coupled channel at
once; see groups.py), never a pinned channel. A pruned filter keeps its bias by default
(`prune_bias=False`): its channel then carries a constant that `simplify` folds exactly into
the next layers, which keeps far more accuracy than zeroing it too.

Schedules (AGP, Lottery Ticket, NetAdapt ...) drive `update_mask(schedule=...)`: `schedule` maps a
group's configured sparsity to the sparsity wanted now (the default is the identity), and
`sparsities=` overrides the configured ones per group.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .. import checks
from ..errors import OnnxPruneError
from ..pruning import criteria
from ..pruning.groups import group_label
from .config import resolve
from .groups import Channel, DependencyGroups, Group, ParamSlice, dependency_groups
from .masks import apply_masks, current_masks, dense_weight, effective_weight, to_nni

WEIGHTED = ("Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "Linear")


@dataclass
class GroupResult:
    layers: list[str]
    channels: int
    pinned: int
    asked: float | None      # None: left alone (note says why)
    pruned: int
    note: str = ""


@dataclass
class PruneSummary:
    pruner: str
    rows: list[GroupResult] = field(default_factory=list)

    def table(self) -> str:
        lines = [f"{self.pruner}: {sum(1 for r in self.rows if r.pruned)} of {len(self.rows)} channel group(s) pruned",
                 f"{'group (first layer, +coupled)':44}{'channels':>9}{'pinned':>7}{'asked':>7}{'pruned':>8}  note"]
        for r in self.rows:
            label = group_label(r.layers, " ")
            asked = f"{r.asked:.2f}" if r.asked is not None else "-"
            lines.append(f"{label[-44:]:44}{r.channels:>9}{r.pinned:>7}{asked:>7}{r.pruned:>8}  {r.note}")
        return "\n".join(lines)

    __str__ = table


class Pruner:
    """What every pruner shares: the config, the masks, export_model."""

    allowed_types: tuple[str, ...] = WEIGHTED
    extra_keys: tuple[str, ...] = ()

    def __init__(self, model, config_list, dummy_input=None):
        self.bound_model = model
        self.config_list = config_list
        self.dummy_input = dummy_input
        self.selected = resolve(model, config_list, self.extra_keys, self.allowed_types)
        if not self.selected:
            raise OnnxPruneError(f"config_list selects no module this pruner can prune ({', '.join(self.allowed_types)})")
        self.masks: dict = {}
        self.summary = PruneSummary(type(self).__name__)

    # --- the NNI lifecycle ----------------------------------------------------------------
    def compress(self):
        """Compute the masks and apply them; returns the model (still trainable)."""
        self.update_mask()
        return self.bound_model

    def update_mask(self, schedule=None, sparsities=None) -> dict:
        """Recompute the masks now (from the current weights / statistics) and apply them."""
        masks = self.calc_masks(schedule=schedule, sparsities=sparsities)
        apply_masks(self.bound_model, masks)
        self.masks = {k: v.clone() for k, v in masks.items()}
        return masks

    def calc_masks(self, schedule=None, sparsities=None) -> dict:
        raise NotImplementedError

    def get_pruned_weights(self) -> dict[str, float]:
        """Parameter name -> fraction of weights masked (NNI prints these)."""
        return {k: float((~m).float().mean()) for k, m in current_masks(self.bound_model).items()}

    def export_model(self, model_path, mask_path=None, onnx_path=None, input_shape=None, device=None,
                     dummy_input=None, opset_version=None, exporter: str = "dynamo") -> None:
        """NNI's export: the state_dict with masks applied (plain parameter names), NNI's masks
        dict and an ONNX export, all written atomically together."""
        import torch

        from ..files import FilePlan, Outputs
        from ..graph import write_model
        from .export import export_onnx

        plan = FilePlan().write(model_path, "the model file (model_path)").write(mask_path, "the masks file (mask_path)")
        plan.write_model(onnx_path, "the ONNX file (onnx_path)").check()
        if onnx_path is not None:
            x = dummy_input if dummy_input is not None else self.dummy_input
            if x is None and input_shape is not None:
                x = torch.randn(*input_shape, device=device)
            if x is None:
                raise OnnxPruneError("export_model(onnx_path=...) needs dummy_input (or input_shape)")
            proto = export_onnx(self.bound_model, x, exporter, opset_version)
        with Outputs() as out:
            torch.save(masked_state_dict(self.bound_model), out.path(model_path))
            if mask_path is not None:
                torch.save(to_nni(self.bound_model, current_masks(self.bound_model)), out.path(mask_path))
            if onnx_path is not None:
                write_model(proto, out.path(onnx_path))

    # --- helpers for subclasses -----------------------------------------------------------
    def module(self, name: str):
        return self.bound_model.get_submodule(name) if name else self.bound_model

    def weight(self, name: str, dense: bool = False):
        """The named module's weight as float64 numpy (masked, or `dense` without its mask)."""
        m = self.module(name)
        w = dense_weight(m) if dense else effective_weight(m)
        return w.cpu().double().numpy()


def masked_state_dict(model) -> dict:
    """state_dict with `weight_orig` x `weight_mask` stored as plain `weight` (as NNI exports)."""
    sd = model.state_dict()
    out = {}
    for k, v in sd.items():
        if k.endswith("_orig"):
            base = k[: -len("_orig")]
            out[base] = v * sd[base + "_mask"]
        elif k.endswith("_mask") and k[: -len("_mask")] + "_orig" in sd:
            continue
        else:
            out[k] = v
    return out


class FilterPruner(Pruner):
    """Structured pruning of channel groups. Subclasses give `channel_scores(group)` (higher =
    more important); this class chooses the lowest-scoring free channels of every group at the
    group's sparsity and masks them in every producer."""

    def __init__(self, model, config_list, dummy_input=None, dependency_aware: bool = True,
                 prune_bias: bool = False, group_reduce: str = "sum", groups: DependencyGroups | None = None):
        super().__init__(model, config_list, dummy_input)
        if group_reduce not in criteria.REDUCE:
            raise OnnxPruneError(f"group_reduce must be one of {', '.join(criteria.REDUCE)}, got {group_reduce!r}")
        self.prune_bias, self.group_reduce, self.dependency_aware = prune_bias, group_reduce, dependency_aware
        if groups is not None:
            self.groups = groups
        elif dependency_aware:
            if dummy_input is None:
                raise OnnxPruneError(f"{type(self).__name__}: dependency-aware pruning needs dummy_input to trace the "
                                     "model's channel dependencies (or pass dependency_aware=False)")
            self.groups = dependency_groups(model, dummy_input)
        else:
            self.groups = DependencyGroups([_layer_group(model, n) for n in self.selected])

    def group_sparsity(self, group: Group) -> tuple[float | None, str]:
        """Coupled layers share one ratio: the smallest asked; none if any of them is left alone."""
        for layer in group.layers:
            if layer not in self.selected:
                return None, f"coupled with {layer}, not selected" if len(group.layers) > 1 else "not selected"
        return min(self.selected[layer] for layer in group.layers), ""

    def channel_scores(self, group: Group) -> np.ndarray:
        raise NotImplementedError

    def calc_masks(self, schedule=None, sparsities=None) -> dict:
        import torch

        masks = {}
        existing = current_masks(self.bound_model)
        self.summary = PruneSummary(type(self).__name__)
        for gi, group in enumerate(self.groups):
            asked, note = self.group_sparsity(group)
            if sparsities is not None and gi in sparsities:
                asked, note = sparsities[gi], ""
            free = group.free
            row = GroupResult(group.layers, group.size, group.size - len(free), asked, 0, note)
            self.summary.rows.append(row)
            if asked is None or not free:
                row.note = row.note or (group.channels[0].pinned if group.channels else "")
                continue
            target = checks.sparsity(schedule(asked) if schedule else asked, "scheduled sparsity")
            count = group.pruned_count(target)
            if count < group.asked(target):
                row.note = f"{group.size - len(free)} channel(s) pinned"
            if count == 0:
                continue
            scores = np.asarray(self.channel_scores(group), dtype=np.float64).copy()
            scores[self.already_pruned(group, existing)] = -np.inf  # schedules only ever add to the masks
            chosen = np.array(free)[criteria.lowest(scores[free], count)]
            row.pruned = len(chosen)
            for ci in chosen:
                self.mask_channel(masks, group.channels[ci], torch)
        return masks

    @staticmethod
    def already_pruned(group: Group, existing: dict) -> np.ndarray:
        """Channels every producer row of which the current masks zero."""
        def masked(s: ParamSlice) -> bool:
            m = existing.get(f"{s.module}.{s.param}" if s.module else s.param)
            return m is not None and not bool(m.index_select(s.axis, _index(s.indices)).any())
        return np.array([bool(ch.producers) and all(masked(s) for s in ch.producers) for ch in group.channels], bool)

    def mask_channel(self, masks, channel: Channel, torch) -> None:
        """Mask one chosen channel: its producer rows (and biases with prune_bias). Subclasses that
        prune elsewhere (Slim: the BN scale) override this."""
        for s in channel.producers:
            self.zero_slice(masks, s, torch)
            if self.prune_bias and getattr(self.module(s.module), "bias", None) is not None:
                self.zero_slice(masks, ParamSlice(s.module, "bias", 0, s.indices), torch)

    def zero_slice(self, masks, s: ParamSlice, torch) -> None:
        name = f"{s.module}.{s.param}" if s.module else s.param
        if name not in masks:
            shape = getattr(self.module(s.module), s.param).shape
            masks[name] = torch.ones(shape, dtype=torch.bool)
        masks[name].index_fill_(s.axis, _index(s.indices), False)

    # --- criteria helpers ----------------------------------------------------------------
    def producer_rows(self, group: Group, dense: bool = False):
        """Per producer module: its weight with output channels as rows (float64 numpy)."""
        out = {}
        for layer in group.layers:
            w = self.weight(layer, dense)
            axis = next((s.axis for ch in group.channels for s in ch.producers if s.module == layer), 0)
            out[layer] = np.moveaxis(w, axis, 0)
        return out

    def reduce_per_channel(self, group: Group, per_row: dict) -> np.ndarray:
        """Per-producer row scores -> one score per channel (a channel may own several rows of a
        producer: grouped convs), combined over producers by `group_reduce`."""
        per_layer = []
        for layer, scores in per_row.items():
            per_layer.append(np.array([sum(scores[i] for s in ch.producers if s.module == layer for i in s.indices)
                                       for ch in group.channels]))
        return criteria.reduce(per_layer, self.group_reduce)


def _index(indices):
    import torch

    return torch.tensor(indices, dtype=torch.long)


def _layer_group(model, name: str) -> Group:
    """dependency_aware=False: one module alone, one channel per output row (NNI's default mode);
    nothing is known of its couplings, so it is never permuted."""
    import torch

    module = model.get_submodule(name)
    axis = 1 if isinstance(module, torch.nn.modules.conv._ConvTransposeNd) else 0
    channels = [Channel([ParamSlice(name, "weight", axis, (i,))], [ParamSlice(name, "weight", axis, (i,))])
                for i in range(module.weight.shape[axis])]
    return Group([name], channels, "dependency_aware=False: couplings unknown")


class WeightNormPruner(FilterPruner):
    """Filter pruners scored by their weights alone (L1, L2, FPGM)."""

    criterion = "l1"

    def channel_scores(self, group: Group) -> np.ndarray:
        fn = criteria.WEIGHT_CRITERIA[self.criterion]
        return self.reduce_per_channel(group, {k: fn(w) for k, w in self.producer_rows(group).items()})


class L1FilterPruner(WeightNormPruner):
    """Filters with the smallest L1 norm go first (Li et al., "Pruning Filters for Efficient ConvNets")."""
    criterion = "l1"


class L2FilterPruner(WeightNormPruner):
    """Filters with the smallest L2 norm go first."""
    criterion = "l2"


class FPGMPruner(WeightNormPruner):
    """Filters nearest the geometric median of their layer go first (He et al., FPGM)."""
    criterion = "fpgm"


class HeadPruner(FilterPruner):
    """Whole attention heads, found from the graph (no `num_heads` to declare): each head is scored
    by the l1 / l2 norm of all its weights taken together — its q, k, v rows and its output
    projection's columns — and the lowest go, in every group of heads at its configured sparsity
    (in grouped-query attention a k / v head and its query heads are one unit). Other groups (MLP
    neurons) are left to the filter pruners. The q, k, v rows are masked; biases stay, so a pruned
    head outputs its v bias, which `speedup` folds into the output projection before removing it."""

    def __init__(self, model, config_list, dummy_input=None, criterion: str = "l2", **kwargs):
        if criterion not in ("l1", "l2"):
            raise OnnxPruneError(f"HeadPruner: criterion must be l1 or l2, got {criterion!r}")
        self.criterion = criterion
        super().__init__(model, config_list, dummy_input, **kwargs)

    def group_sparsity(self, group: Group) -> tuple[float | None, str]:
        if not group.heads:
            return None, "not attention heads"
        return super().group_sparsity(group)

    def channel_scores(self, group: Group) -> np.ndarray:
        weights = {}
        def part(s: ParamSlice):
            if s.name not in weights:
                weights[s.name] = self.weight(s.module)
            return np.take(weights[s.name], list(s.indices), axis=s.axis)
        return np.array([criteria.weight_set(self.criterion, [part(s) for s in ch.slices if s.param == "weight"])
                         for ch in group.channels])


class LevelPruner(Pruner):
    """Unstructured: the smallest-magnitude weights of every selected module (no groups needed)."""

    def __init__(self, model, config_list, dummy_input=None):
        super().__init__(model, config_list, dummy_input)

    def calc_masks(self, schedule=None, sparsities=None) -> dict:
        import torch

        masks = {}
        self.summary = PruneSummary(type(self).__name__)
        for name, sparsity in self.selected.items():
            target = checks.sparsity(schedule(sparsity) if schedule else sparsity, "scheduled sparsity")
            if sparsities is not None and name in sparsities:
                target = sparsities[name]
            keep = criteria.level_mask(self.weight(name), target)
            masks[f"{name}.weight"] = torch.from_numpy(keep)
            n = int(keep.size)
            self.summary.rows.append(GroupResult([name], n, 0, target, n - int(keep.sum()), "weights"))
        return masks


__all__ = ["Pruner", "FilterPruner", "HeadPruner", "L1FilterPruner", "L2FilterPruner", "FPGMPruner", "LevelPruner",
           "masked_state_dict", "PruneSummary"]
