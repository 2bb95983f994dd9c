"""1×N block pruning while training, with the 1×N paper's filter rearrangement applied to the
PyTorch model itself (Lin et al., "1xN Pattern for Pruning Convolutional Neural Networks"; their
`--conv_type BlockL1Conv --rearrange`).

A 1×N block is N consecutive output channels × 1 input channel × the whole kernel of a group-1
Conv2d (of a Linear: N consecutive outputs × 1 input). The blocks with the smallest L1 norm are
masked (`onnxprune.pruning.block`, the same code as the ONNX side's `--granularity 1xN`), as
`torch.nn.utils.prune` buffers, so the model keeps training with them.

    pruner = BlockPruner(model, [{"sparsity": 0.7, "op_types": ["Conv2d"]}], n=4,
                         rearrange=True, dummy_input=x)
    model = pruner.compress()            # rearranged (exactly the same function), then masked
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)   # after compress()
    for epoch in range(epochs):
        train_one_epoch(model, optimizer)
        pruner.update_epoch(epoch)       # re-select the blocks from the dense weights

Re-selection: as in the paper, the blocks are chosen again from the *dense* weights
(`weight_orig`, which keeps the values of masked weights) every epoch, so a block masked earlier
comes back when it has grown more important than a kept one. The masks are therefore not
monotonic, unlike FilterPruner's schedules (which only ever add to their masks).

Rearrangement (`rearrange=True`): before the first mask, the output channels of every movable
channel group (see groups.py) that feeds a pruned layer are permuted by descending L1 norm of
their filters, summed over the group's producers, so that filters of similar norm share a block.
Every slice coupled to a channel moves with it (producer rows and biases, BN parameters and
statistics, depthwise filters, the readers' input columns, the H·W consecutive columns a channel
owns after a flatten, in their own order), so the model computes exactly the same function; this
is checked on `dummy_input`, and a model whose output changed is restored and refused. Groups
that a permutation would break (split, slice, shuffle, grouped convs, constants made in forward)
or with pinned channels stay in place; `rearrangement` and the summary say why.

The optimizer: rearranging moves parameter values, not the optimizer's per-parameter state
(momentum, Adam moments). Create the optimizer after `compress()`, or pass `optimizer=` and its
state tensors shaped like their parameter are permuted the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import checks
from ..errors import OnnxPruneError
from ..pruning.block import CRITERIA, block_prune_weights, block_scores
from .groups import Group, ParamSlice, dependency_groups
from .masks import pruning_hooks
from .pruner import GroupResult, Pruner, PruneSummary

# the model's output may move by float32 summation-order noise after a permutation, no more
REARRANGE_RTOL = 1e-5


@dataclass
class RearrangeResult:
    """What rearrangement did with one channel group."""
    layers: list[str]        # the group's producer modules
    moved: bool
    reason: str = ""         # why it stayed in place ("" when moved)


@dataclass
class BlockSummary(PruneSummary):
    """Per selected layer: its 1×N blocks, the sparsity asked, the blocks masked, notes."""
    n: int = 4

    def table(self) -> str:
        lines = [f"{self.pruner}: 1x{self.n} blocks masked in {sum(1 for r in self.rows if r.pruned)} of "
                 f"{len(self.rows)} selected layer(s)",
                 f"{'layer':44}{'blocks':>9}{'asked':>7}{'masked':>8}  note"]
        for r in self.rows:
            asked = f"{r.asked:.2f}" if r.asked is not None else "-"
            lines.append(f"{r.layers[0][-44:]:44}{r.channels:>9}{asked:>7}{r.pruned:>8}  {r.note}")
        return "\n".join(lines)

    __str__ = table


class BlockPruner(Pruner):
    """1×N block pruning of group-1 Conv2d and Linear layers (see the module docstring).

    n: the block height (consecutive output channels), any positive int (the paper uses 2 … 32).
    Layers whose output count is not a multiple of n and grouped / depthwise convs are skipped,
    with the reason in `summary`: a block is never split.
    rearrange: permute filters by descending L1 norm first (needs dummy_input to trace the
    channel dependencies). criterion: "l1" (smallest block L1 norms go) or "random" (a fixed,
    seeded choice per layer, so re-selection keeps it). reselect_every_epoch: `update_epoch`
    recomputes the masks from the dense weights (False: the masks of compress() stay).
    optimizer: its per-parameter state is permuted along with the parameters when rearranging.
    balanced: every block row (n output channels) loses the same number of blocks, its own
    weakest (row-balanced 1×N: what a BSR kernel with static loop bounds wants).
    """

    allowed_types = ("Conv2d", "Linear")

    def __init__(self, model, config_list, n: int = 4, rearrange: bool = False, dummy_input=None,
                 criterion: str = "l1", reselect_every_epoch: bool = True, optimizer=None,
                 balanced: bool = False):
        super().__init__(model, config_list, dummy_input)
        self.n = checks.positive_int(n, "n")
        if criterion not in CRITERIA:
            raise OnnxPruneError(f"criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
        if rearrange and dummy_input is None:
            raise OnnxPruneError("BlockPruner(rearrange=True) needs dummy_input to trace the model's channel "
                                 "dependencies")
        self.criterion, self.rearrange, self.optimizer = criterion, bool(rearrange), optimizer
        self.balanced = bool(balanced)
        self.reselect_every_epoch = bool(reselect_every_epoch)
        self.skipped = {name: why for name in self.selected if (why := ineligible(self.module(name), self.n))}
        self.rearrangement: list[RearrangeResult] = []
        self.rearranged = False
        self.epoch: int | None = None

    # --- lifecycle --------------------------------------------------------------------------
    def compress(self):
        """Rearrange (once, when asked), then compute and apply the block masks."""
        if self.rearrange:
            self.rearrange_filters()
        return super().compress()

    def rearrange_filters(self) -> list[RearrangeResult]:
        """Permute the filters feeding the pruned layers by descending L1 norm, in the model
        itself (once; compress() calls it when rearrange=True). Returns what each group did."""
        if self.dummy_input is None:
            raise OnnxPruneError("BlockPruner: rearranging filters needs dummy_input to trace the model's "
                                 "channel dependencies")
        if not self.rearranged:
            self.rearrangement = rearrange_model(self.bound_model, self.dummy_input, self.pruned_layers(),
                                                 self.optimizer)
            self.rearranged = True
        return self.rearrangement

    def update_epoch(self, epoch: int) -> dict:
        """Call once per epoch: re-selects the blocks from the dense weights (a masked block may
        come back) unless reselect_every_epoch=False. Returns the masks now in force."""
        self.epoch = epoch
        if self.reselect_every_epoch:
            return self.update_mask()
        return self.masks

    def pruned_layers(self) -> list[str]:
        """The selected layers that 1×N pruning applies to."""
        return [name for name in self.selected if name not in self.skipped]

    # --- masks ------------------------------------------------------------------------------
    def calc_masks(self, schedule=None, sparsities=None) -> dict:
        """Keep-masks of the pruned layers, from their dense weights. `schedule` maps a layer's
        configured sparsity to the one wanted now; `sparsities` (layer name -> sparsity) overrides."""
        import torch

        masks = {}
        self.summary = BlockSummary(type(self).__name__, n=self.n)
        notes = self.rearrange_notes()
        for index, (name, configured) in enumerate(self.selected.items()):
            module = self.module(name)
            if name in self.skipped:
                self.summary.rows.append(GroupResult([name], 0, 0, None, 0, f"skipped: {self.skipped[name]}"))
                continue
            target = schedule(configured) if schedule else configured
            if sparsities is not None and name in sparsities:
                target = sparsities[name]
            target = checks.sparsity(target, f"sparsity of {name}")
            dense = self.weight(name, dense=True)
            keep = block_prune_weights(dense, self.n, target, criterion=self.criterion,
                                       rng=np.random.default_rng(index), balanced=self.balanced)
            masks[f"{name}.weight"] = torch.from_numpy(keep).to(module.weight.device)
            kept = block_scores(keep.astype(np.float64), self.n) != 0
            self.summary.rows.append(GroupResult([name], int(kept.size), 0, target, int((~kept).sum()),
                                                 notes.get(name, "")))
        return masks

    def rearrange_notes(self) -> dict[str, str]:
        """Layer -> what rearrangement did with its filters (for the summary)."""
        if not self.rearranged:
            return {}
        moved = {layer for r in self.rearrangement if r.moved for layer in r.layers}
        kept = {layer: r.reason for r in self.rearrangement if not r.moved for layer in r.layers}
        notes = {}
        for layer in self.pruned_layers():
            if layer in moved:
                # a layer whose outputs a split divides between groups may be moved in one only
                notes[layer] = "rearranged" + (f" in part (rest kept: {kept[layer]})" if layer in kept else "")
            else:
                notes[layer] = f"not rearranged: {kept.get(layer, 'its outputs are in no channel group')}"
        return notes


def ineligible(module, n: int) -> str:
    """Why 1×N blocks do not apply to `module` ("" when they do)."""
    import torch

    if isinstance(module, torch.nn.Conv2d) and module.groups != 1:
        return "depthwise conv" if module.groups == module.in_channels else f"grouped conv (groups={module.groups})"
    c_out = module.weight.shape[0]
    if c_out % n:
        return f"{c_out} outputs are not a multiple of N={n}"
    return ""


# --- rearrangement ----------------------------------------------------------------------------

def rearrange_model(model, dummy_input, layers, optimizer=None) -> list[RearrangeResult]:
    """Permute, in `model` itself, the output channels of every movable group whose producers
    include one of `layers`, by descending L1 norm; checked to compute the same output on
    `dummy_input` (OnnxPruneError, with every tensor restored, if not)."""
    wanted = set(layers)
    results, moves = [], []
    for group in dependency_groups(model, dummy_input):
        if not wanted.intersection(group.layers):
            continue
        why = immovable_reason(model, group)
        order = None if why else descending_order(model, group)
        if order is not None and np.array_equal(order, np.arange(len(order))):
            why = "already in descending L1 order"
        results.append(RearrangeResult(list(group.layers), not why, why))
        if not why:
            moves.append((group, order))
    if moves:
        apply_checked(model, dummy_input, [gather for g, order in moves for gather in tensor_gathers(g, order)],
                      optimizer)
    return results


def immovable_reason(model, group: Group) -> str:
    """Why the group's channels must stay where they are ("" if they may move)."""
    if group.unmovable:
        return group.unmovable
    pinned = next((c.pinned for c in group.channels if c.pinned), "")
    if pinned:
        return f"pinned: {pinned}"
    if not all(c.producers for c in group.channels):
        return "a channel has no producer weights to rank it by"
    # a permutation swaps whole slices: every channel must own one of equal length in each tensor axis
    lengths: dict[tuple, list[int]] = {}
    for ch in group.channels:
        for key, idx in channel_slices(ch).items():
            lengths.setdefault(key, []).append(len(idx))
    for (module, param, axis), sizes in lengths.items():
        if len(set(sizes)) > 1 or len(sizes) != group.size:
            return f"channels own unequal slices of {module}.{param} (axis {axis})"
    return ""


def channel_slices(channel) -> dict[tuple[str, str, int], tuple[int, ...]]:
    """(module, param, axis) -> the channel's indices there, in their own order (a flatten's H·W
    consecutive features stay in order)."""
    out: dict[tuple[str, str, int], tuple[int, ...]] = {}
    for s in channel.slices:
        key = (s.module, s.param, s.axis)
        out[key] = out.get(key, ()) + tuple(s.indices)
    return out


def slot_order(group: Group) -> list[int]:
    """The group's channels in the order of their rows in its first producer (the positions a
    permutation reassigns)."""
    first = group.channels[0].producers[0]
    key = (first.module, first.param, first.axis)
    return sorted(range(group.size), key=lambda i: min(channel_slices(group.channels[i])[key]))


def filter_l1(model, s: ParamSlice) -> float:
    """L1 norm of the producer rows `s` (dense weights: a mask never hides what a filter is)."""
    from .masks import dense_weight

    module = model.get_submodule(s.module) if s.module else model
    w = dense_weight(module, s.param).double().cpu().numpy()
    return float(np.abs(np.take(w, list(s.indices), axis=s.axis)).sum())


def descending_order(model, group: Group) -> np.ndarray:
    """order[k]: which channel moves into the k-th slot (slots as in slot_order), by descending
    summed L1 norm of the channel's producer filters; ties keep their order."""
    slots = slot_order(group)
    norms = np.array([sum(filter_l1(model, s) for s in group.channels[i].producers) for i in slots])
    return np.argsort(-norms, kind="stable")


def tensor_gathers(group: Group, order: np.ndarray) -> list[tuple[str, str, int, list[int], list[int]]]:
    """(module, param, axis, destination indices, source indices) per coupled tensor axis: the
    channel at slot order[k] moves into slot k, each channel's indices as one block."""
    slots = slot_order(group)
    per_channel = [channel_slices(group.channels[i]) for i in slots]
    gathers = []
    for key in per_channel[0]:
        dst = [j for k in range(group.size) for j in per_channel[k][key]]
        src = [j for k in range(group.size) for j in per_channel[order[k]][key]]
        gathers.append((*key, dst, src))
    return gathers


def storage(module, param: str) -> list:
    """The tensors holding `module.param`: the value and mask of a pruning reparametrization,
    or the parameter / buffer itself."""
    if hasattr(module, param + "_orig"):
        return [getattr(module, param + "_orig"), getattr(module, param + "_mask")]
    return [getattr(module, param)]


def _gather(t, axis: int, dst: list[int], src: list[int]) -> None:
    import torch

    with torch.no_grad():
        moved = t.index_select(axis, torch.as_tensor(src, device=t.device))
        t.index_copy_(axis, torch.as_tensor(dst, device=t.device), moved)


def _state_tensors(optimizer, tensor) -> list:
    """The optimizer's per-parameter state shaped like the parameter (momentum, moments)."""
    if optimizer is None:
        return []
    state = optimizer.state.get(tensor, {})
    return [v for v in state.values() if hasattr(v, "shape") and tuple(v.shape) == tuple(tensor.shape)]


def apply_checked(model, dummy_input, gathers, optimizer=None) -> None:
    """Apply the gathers to the model (and optimizer state) and check the output on
    `dummy_input`; on any change beyond REARRANGE_RTOL × max|output| restore and raise."""
    targets = []
    for module_name, param, axis, dst, src in gathers:
        module = model.get_submodule(module_name) if module_name else model
        for t in storage(module, param):
            targets += [(t, axis, dst, src)] + [(s, axis, dst, src) for s in _state_tensors(optimizer, t)]
    backup = {id(t): (t, t.detach().clone()) for t, *_ in targets}
    before = model_outputs(model, dummy_input)
    try:
        for t, axis, dst, src in targets:
            _gather(t, axis, dst, src)
        refresh_pruned(model)
        after = model_outputs(model, dummy_input)
        error, scale = output_error(before, after)
    except Exception:
        _restore(model, backup)
        raise
    if not error <= REARRANGE_RTOL * scale:
        _restore(model, backup)
        raise OnnxPruneError(f"rearranging the filters changed the model's output (max error {error:.3g}, "
                             f"max |output| {scale:.3g}); the model was restored")


def _restore(model, backup) -> None:
    import torch

    with torch.no_grad():
        for t, saved in backup.values():
            t.copy_(saved)
    refresh_pruned(model)


def refresh_pruned(model) -> None:
    """Recompute `weight` of pruned modules from their permuted orig × mask (the hook does it
    before each forward; this keeps `module.weight` right in between)."""
    for module in model.modules():
        for hook in pruning_hooks(module):
            setattr(module, hook._tensor_name, hook.apply_mask(module))


def model_outputs(model, dummy_input) -> list:
    """The model's outputs on `dummy_input` in eval mode (no dropout, BN statistics untouched),
    as float64 tensors; every module's train/eval flag is restored."""
    import torch

    modes = {m: m.training for m in model.modules()}
    args = dummy_input if isinstance(dummy_input, (tuple, list)) else (dummy_input,)
    try:
        model.eval()
        with torch.no_grad():
            return [t.detach().double().cpu() for t in _flatten(model(*args))]
    finally:
        for m, training in modes.items():
            m.training = training


def _flatten(out) -> list:
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flatten(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _flatten(v)]
    return [out] if hasattr(out, "shape") else []


def output_error(before: list, after: list) -> tuple[float, float]:
    """(max abs difference, max |before|) over all outputs; a changed shape or a non-finite
    difference is an infinite error."""
    if len(before) != len(after) or any(a.shape != b.shape for a, b in zip(before, after)):
        return float("inf"), 1.0
    error, scale = 0.0, 0.0
    for a, b in zip(before, after):
        if a.numel():
            diff = (a - b).abs()
            error = max(error, float(diff.max()) if bool(diff.isfinite().all()) else float("inf"))
            scale = max(scale, float(a.abs().max()))
    return error, max(scale, 1e-30)


__all__ = ["BlockPruner", "BlockSummary", "RearrangeResult", "rearrange_model", "ineligible"]
