"""The data-driven and training-time pruners of NNI 2.x, dependency-aware through `FilterPruner`.

    pruner = TaylorFOWeightFilterPruner(model, config_list, optimizer, trainer, criterion,
                                        sparsifying_training_batches=8, dummy_input=x)
    model = pruner.compress()          # runs the user's trainer, then masks whole channel groups

`trainer(model, optimizer, criterion, epoch)` is the user's NNI callback (called positionally);
`criterion` is handed to it untouched. What each pruner learns from training:

- ActivationAPoZRankFilterPruner / ActivationMeanRankFilterPruner: the activations every
  *consumer* of a channel reads (forward pre-hooks on the layers whose weight columns read the
  group's channels), over the first N training-mode forward passes of the model;
- TaylorFOWeightFilterPruner: Σ (g·w)² over each producer row, over the first N optimizer steps;
- SlimPruner: an L1 penalty on BatchNorm γ during training, then the smallest |γ| go;
- ADMMPruner: ADMM (Zhang et al. 2018) pulling the weights towards their pruned projection.

Stopping after N batches: a private exception (`_EnoughBatches`) raised from our hook just before
batch N+1 (a forward pre-hook on the model, or an optimizer step pre-hook) ends the trainer; the
pruner catches it. The model has then seen exactly N batches. Optimizer hooks use
`Optimizer.register_step_pre_hook` (what patching `optimizer.step` does, but also under a wrapped
or scheduler-patched step) and are removed afterwards.
"""

from __future__ import annotations

import numpy as np

from .. import checks
from ..errors import OnnxPruneError
from ..pruning import criteria
from .groups import Channel, DependencyGroups, Group, ParamSlice
from .masks import current_masks, effective_weight
from .pruner import FilterPruner, LevelPruner

BATCHNORM = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d")
ACTIVATIONS = {"relu": lambda t: t.clamp(min=0), "relu6": lambda t: t.clamp(0, 6)}


class _EnoughBatches(Exception):
    """Raised from our hooks before batch N+1: ends the user's trainer after exactly N batches."""


# --- small helpers ----------------------------------------------------------------------------

def trainable(module, param: str = "weight"):
    """The tensor the optimizer updates: `weight_orig` under a torch.nn.utils.prune mask."""
    return getattr(module, param + "_orig") if hasattr(module, param + "_orig") else getattr(module, param)


def param_name(module_name: str, param: str) -> str:
    return f"{module_name}.{param}" if module_name else param


def require_trainer(trainer, pruner: str):
    if trainer is None or not callable(trainer):
        raise OnnxPruneError(f"{pruner} needs trainer(model, optimizer, criterion, epoch): it learns from training")
    return trainer


def require_optimizer(optimizer, pruner: str):
    import torch

    if not isinstance(optimizer, torch.optim.Optimizer):
        raise OnnxPruneError(f"{pruner} needs optimizer (a torch.optim.Optimizer over the model's parameters), "
                             f"got {type(optimizer).__name__}")
    return optimizer


def batch_count(new_name_value, old_name_value, pruner: str) -> int:
    """N from `sparsifying_training_batches` (NNI 2) or `statistics_batch_num` (NNI 1)."""
    if old_name_value is not None and new_name_value not in (1, old_name_value):
        raise OnnxPruneError(f"{pruner}: give sparsifying_training_batches or statistics_batch_num, not both")
    value = old_name_value if old_name_value is not None else new_name_value
    return checks.positive_int(value, "sparsifying_training_batches")


def run_until_stopped(trainer, model, optimizer, criterion, epoch: int = 0) -> bool:
    """Run one epoch of the user's trainer; True if our hooks stopped it after N batches."""
    try:
        trainer(model, optimizer, criterion, epoch)
    except _EnoughBatches:
        return True
    return False


def row_scores(w, g, axis: int):
    """Σ (g·w)² over each slice along `axis` (a layer's output channels), as float64 numpy."""
    prod = (w.detach().double() * g.detach().double()).pow(2)
    return prod.movedim(axis, 0).reshape(prod.shape[axis], -1).sum(dim=1).cpu().numpy()


def l2_normalized(scores: np.ndarray) -> np.ndarray:
    """Molchanov et al. 2017 (§2.3): layer-wise L2 normalization makes scores of different
    layers comparable for one global ranking."""
    norm = float(np.sqrt((scores ** 2).sum()))
    return scores / norm if norm > 0 else scores


def global_counts(candidates: list[tuple[float, int, int]], total: int, caps: dict[int, int]) -> dict[int, int]:
    """How many channels each group loses under one global threshold: the `total` lowest
    (score, group, channel) candidates, skipping a group once it reaches its cap."""
    counts = {gi: 0 for gi in caps}
    taken = 0
    for _, gi, _ in sorted(candidates):
        if taken == total:
            break
        if counts[gi] < caps[gi]:
            counts[gi] += 1
            taken += 1
    return counts


# --- activation statistics --------------------------------------------------------------------

def _train_then_mask(pruner, handles: list, seen, nothing: str):
    """Run the pruner's trainer (epoch 0) with the collecting hooks `handles` installed, remove
    them, refuse when `seen()` counted nothing (the message says what was missing), then mask."""
    try:
        run_until_stopped(pruner.trainer, pruner.bound_model, pruner.optimizer, pruner.criterion, 0)
    finally:
        for h in handles:
            h.remove()
    if seen() == 0:
        raise OnnxPruneError(f"{type(pruner).__name__}: {nothing}")
    pruner.update_mask()
    return pruner.bound_model


class _Tap:
    """One module's activations that carry channels of a group: its input (a consumer reading
    weight columns) or its output (a producer, when no layer reads the channel), with the tensor
    axis of the channels; per position along that axis, the zeros and the sum seen so far."""

    def __init__(self, module: str, where: str, axis: int):
        self.module, self.where, self.axis = module, where, axis
        self.reset()

    def reset(self) -> None:
        self.zeros = self.total = None   # per position, accumulated over the recorded batches
        self.per_position = 0            # elements seen per position

    def record(self, x) -> None:
        import torch

        x = x.detach()
        axis = self.axis % x.dim()
        dims = [d for d in range(x.dim()) if d != axis]
        # the statistics of criteria.apoz / criteria.mean_activation, accumulated as counts
        zeros = (x == 0).sum(dim=dims).double() if dims else (x == 0).double()
        total = x.sum(dim=dims, dtype=torch.float64) if dims else x.double()
        self.zeros = zeros if self.zeros is None else self.zeros + zeros
        self.total = total if self.total is None else self.total + total
        self.per_position += x.numel() // x.shape[axis]

    def statistic(self, positions, kind: str) -> float:
        """Over the elements at `positions`: 1 − fraction of zeros ("apoz"), or the mean."""
        idx = list(positions)
        count = self.per_position * len(idx)
        if kind == "apoz":
            return 1.0 - float(self.zeros[idx].sum()) / count
        return float(self.total[idx].sum()) / count


def read_positions(module, s: ParamSlice) -> tuple[str, int, tuple[int, ...]] | None:
    """(where, tensor axis, positions) a weight slice reads, or None if `s` reads nothing: weight
    columns of a Conv (grouped: the group-local index, in every group), input features of a
    Linear (a channel after flatten owns several), input rows of a ConvTranspose."""
    import torch

    if s.param != "weight":
        return None
    if isinstance(module, torch.nn.modules.conv._ConvTransposeNd):
        return ("input", 1, s.indices) if s.axis == 0 else None
    if isinstance(module, torch.nn.modules.conv._ConvNd):
        if s.axis != 1:
            return None
        per_group = module.weight.shape[1]
        return "input", 1, tuple(g * per_group + i for g in range(module.groups) for i in s.indices)
    if isinstance(module, torch.nn.Linear):
        return ("input", -1, s.indices) if s.axis == 1 else None
    return None


def output_positions(module, s: ParamSlice) -> tuple[str, int, tuple[int, ...]]:
    import torch

    return "output", (-1 if isinstance(module, torch.nn.Linear) else 1), s.indices


class _ActivationRankPruner(FilterPruner):
    """Shared by the APoZ and mean-activation pruners: hooks, the stop after N batches, scores."""

    statistic = "apoz"

    def __init__(self, model, config_list, optimizer=None, trainer=None, criterion=None,
                 sparsifying_training_batches=1, statistics_batch_num=None, dummy_input=None,
                 dependency_aware=True, activation="relu", **kw):
        name = type(self).__name__
        self.trainer = require_trainer(trainer, name)
        self.optimizer, self.criterion = optimizer, criterion
        self.batches = batch_count(sparsifying_training_batches, statistics_batch_num, name)
        if activation not in ACTIVATIONS:
            raise OnnxPruneError(f"{name}: activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        self.activation = activation
        super().__init__(model, config_list, dummy_input, dependency_aware, **kw)
        self.taps: dict[tuple[str, str], _Tap] = {}
        self.reads = [[self._taps_of(ch) for ch in g.channels] for g in self.groups]
        self.batches_seen = 0

    def _taps_of(self, channel: Channel) -> list[tuple[_Tap, tuple[int, ...]]]:
        """(tap, positions) for each layer reading the channel; its producers' outputs if none."""
        producers = set(channel.producers)
        found = [(s, read_positions(self.module(s.module), s)) for s in channel.slices if s not in producers]
        found = [(s, r) for s, r in found if r is not None]
        if not found:
            found = [(s, output_positions(self.module(s.module), s)) for s in channel.producers]
        out = []
        for s, (where, axis, positions) in found:
            tap = self.taps.setdefault((s.module, where), _Tap(s.module, where, axis))
            out.append((tap, positions))
        return out

    def compress(self):
        """Run the trainer (epoch 0) with the hooks collecting over the first N forward passes of
        the model in training mode (eval-mode passes are neither counted nor recorded); the
        (N+1)-th training-mode pass stops the trainer. Then mask. Returns the model."""
        return _train_then_mask(self, self._install_hooks(), lambda: self.batches_seen,
                                "the trainer ran no forward pass of the model in training mode "
                                "(call model.train() in it), so there are no activations to rank")

    def _install_hooks(self) -> list:
        model = self.bound_model
        self.batches_seen = 0
        activation = ACTIVATIONS[self.activation]
        for tap in self.taps.values():
            tap.reset()

        def count(_module, _args):
            if model.training:
                if self.batches_seen == self.batches:
                    raise _EnoughBatches
                self.batches_seen += 1

        def recording(tap: _Tap):
            def on_input(_module, args):
                if model.training:
                    tap.record(args[0])

            def on_output(_module, _args, out):   # a producer's output: NNI's activation first
                if model.training:
                    tap.record(activation(out))
            return on_input if tap.where == "input" else on_output

        handles = [model.register_forward_pre_hook(count)]
        for (name, where), tap in self.taps.items():
            module = self.module(name)
            hook = recording(tap)
            register = module.register_forward_pre_hook if where == "input" else module.register_forward_hook
            handles.append(register(hook))
        return handles

    def channel_scores(self, group: Group) -> np.ndarray:
        gi = next(i for i, g in enumerate(self.groups.groups) if g is group)
        return np.array([self.channel_statistic(gi, ci) for ci in range(group.size)])

    def channel_statistic(self, gi: int, ci: int) -> float:
        """The channel's statistic: 1 − APoZ or the mean activation, averaged over its readers."""
        values = [tap.statistic(positions, self.statistic) for tap, positions in self.reads[gi][ci] if tap.per_position]
        if not values:
            layer = self.groups.groups[gi].layers[0]
            raise OnnxPruneError(f"{type(self).__name__}: no activation of {layer}'s channels was recorded "
                                 "(are its consumers used in forward?)")
        return float(np.mean(values))


class ActivationAPoZRankFilterPruner(_ActivationRankPruner):
    """Channels whose consumers read the most zeros go first (Hu et al. 2016, "Network Trimming").

    NNI 2.x arguments: optimizer (handed to the trainer), trainer (required), criterion (handed to
    the trainer), sparsifying_training_batches (NNI 1: statistics_batch_num), dummy_input,
    dependency_aware, activation. The statistics are taken on what the consumers really read
    (after whatever BN and activation the model applies): the inputs of every layer whose weight
    columns read the channel. Only a channel no layer reads that way (every channel with
    dependency_aware=False, where nothing is known of the consumers) is measured, as NNI does,
    on its producers' outputs passed through `activation` ("relu" or "relu6"). Scores are
    1 − APoZ (higher = more important, as `criteria.apoz`), averaged over a channel's readers; a
    channel after flatten counts all its features. `**kw`: FilterPruner's prune_bias, group_reduce.

    Departure from NNI 2.x: NNI trains a whole epoch and records the first N batches; this stops
    the trainer after N batches (NNI 3's training_steps), so collecting costs N batches."""

    statistic = "apoz"


class ActivationMeanRankFilterPruner(_ActivationRankPruner):
    """Channels whose consumers read the smallest mean activation go first (Molchanov et al. 2017).
    Same arguments and collection as ActivationAPoZRankFilterPruner."""

    statistic = "mean_activation"


# --- Taylor first order -------------------------------------------------------------------------

class TaylorFOWeightFilterPruner(FilterPruner):
    """Filters with the smallest first-order Taylor importance go first (Molchanov et al. 2019):
    Σ over a filter's weights of (g·w)², accumulated before each of the first N optimizer steps of
    the trainer (g: the gradient the step is about to apply, on `weight_orig` under a mask); a
    channel sums over its producers' rows (`group_reduce`).

    NNI 2.x arguments: optimizer, trainer, criterion (handed to the trainer),
    sparsifying_training_batches (N optimizer steps; NNI 1: statistics_batch_num), dummy_input,
    dependency_aware, global_sort (one ranking over every group's L2-normalized scores; each
    group then loses its share of Σ sparsity × channels, never its last channel). `**kw`:
    FilterPruner's prune_bias, group_reduce.

    The trainer is stopped before step N+1 (the model has had exactly N steps), as NNI 3's
    training_steps; NNI 2.x finished the epoch."""

    def __init__(self, model, config_list, optimizer, trainer, criterion, sparsifying_training_batches=1,
                 dummy_input=None, dependency_aware=True, global_sort=False, statistics_batch_num=None, **kw):
        name = type(self).__name__
        self.trainer = require_trainer(trainer, name)
        self.optimizer = require_optimizer(optimizer, name)
        self.criterion = criterion
        self.batches = batch_count(sparsifying_training_batches, statistics_batch_num, name)
        self.global_sort = bool(global_sort)
        super().__init__(model, config_list, dummy_input, dependency_aware, **kw)
        self.row_axis = {s.module: s.axis for g in self.groups for ch in g.channels for s in ch.producers
                         if s.module in self.selected}
        self.contributions: dict[str, np.ndarray] = {}   # producer module -> Σ (g·w)² per output row
        self.steps_seen = 0

    def compress(self):
        """Run the trainer (epoch 0) for N optimizer steps while accumulating, then mask."""
        self.contributions = {}
        self.steps_seen = 0
        return _train_then_mask(self, [self.optimizer.register_step_pre_hook(self._before_step)],
                                lambda: self.steps_seen, "the trainer made no optimizer step, so there are no gradients to rank")

    def _before_step(self, _optimizer, _args, _kwargs):
        if self.steps_seen == self.batches:
            raise _EnoughBatches
        self.steps_seen += 1
        for name, axis in self.row_axis.items():
            module = self.module(name)
            g = trainable(module).grad
            if g is None:
                continue
            scores = row_scores(effective_weight(module), g, axis)
            self.contributions[name] = self.contributions.get(name, 0) + scores

    def channel_scores(self, group: Group) -> np.ndarray:
        per_row = {}
        for layer in group.layers:
            rows = trainable(self.module(layer)).shape[self.row_axis.get(layer, 0)]
            per_row[layer] = self.contributions.get(layer, np.zeros(rows))   # no gradient reached it
        return self.reduce_per_channel(group, per_row)

    def calc_masks(self, schedule=None, sparsities=None) -> dict:
        if self.global_sort and sparsities is None:
            sparsities, schedule = self.global_sparsities(schedule), None
        return super().calc_masks(schedule=schedule, sparsities=sparsities)

    def global_sparsities(self, schedule=None) -> dict[int, float]:
        """Group index -> sparsity under one threshold over every group's normalized scores."""
        existing = current_masks(self.bound_model)
        candidates, caps, total = [], {}, 0.0
        for gi, group in enumerate(self.groups):
            asked, _ = self.group_sparsity(group)
            free = group.free
            if asked is None or not free:
                continue
            target = checks.sparsity(schedule(asked) if schedule else asked, "scheduled sparsity")
            total += target * group.size
            caps[gi] = min(len(free), group.size - 1)   # a layer keeps at least one channel
            scores = l2_normalized(np.asarray(self.channel_scores(group), dtype=np.float64))
            scores[self.already_pruned(group, existing)] = -np.inf
            candidates += [(float(scores[ci]), gi, ci) for ci in free]
        counts = global_counts(candidates, int(total + 1e-9), caps)
        return {gi: n / self.groups.groups[gi].size for gi, n in counts.items()}


# --- Network Slimming -------------------------------------------------------------------------

class SlimPruner(FilterPruner):
    """Network Slimming (Liu et al. 2017): train with an L1 penalty on BatchNorm γ, then mask the
    channels of smallest |γ|.

    NNI 2.x arguments: config op_types among BatchNorm1d/2d/3d; optimizer, trainer, criterion
    (handed to the trainer); sparsifying_training_epochs (the trainer runs that many epochs with
    scale·sign(γ) added to every selected γ.grad before each step; 0: prune on the γ as they are);
    scale; dummy_input, dependency_aware. `**kw`: prune_bias (also mask β; by default β stays and
    the channel carries the constant β, which `simplify` absorbs exactly), group_reduce (over the
    group's BN layers, default sum of |γ|).

    A group's sparsity is that of its BN layers (the smallest; none if one is not selected), and
    what is masked is γ of every BN of the channel, so a channel removed by `speedup` is a channel
    whose BN outputs a constant. Departure from NNI 1 (and NNI 2's mode='global'): the ratio is
    per group, not one threshold over all BN layers."""

    allowed_types = BATCHNORM

    def __init__(self, model, config_list, optimizer, trainer, criterion, sparsifying_training_epochs=10,
                 scale=1e-4, dummy_input=None, dependency_aware=True, **kw):
        name = type(self).__name__
        self.trainer = require_trainer(trainer, name)
        self.optimizer = require_optimizer(optimizer, name)
        self.criterion = criterion
        self.epochs = checks.non_negative_int(sparsifying_training_epochs, "sparsifying_training_epochs")
        self.scale = checks.tolerance(scale, "scale")
        super().__init__(model, config_list, dummy_input, dependency_aware, **kw)
        for bn in self.selected:
            if getattr(self.module(bn), "weight", None) is None:
                raise OnnxPruneError(f"{name}: {bn} has no γ to prune (BatchNorm with affine=False)")

    def compress(self):
        """Sparsity training (the trainer for `sparsifying_training_epochs` epochs, the L1
        subgradient on γ added before every step), then mask. Returns the model."""
        handle = self.optimizer.register_step_pre_hook(self._add_l1_subgradient)
        try:
            for epoch in range(self.epochs):
                self.trainer(self.bound_model, self.optimizer, self.criterion, epoch)
        finally:
            handle.remove()
        self.update_mask()
        return self.bound_model

    def _add_l1_subgradient(self, _optimizer, _args, _kwargs):
        import torch

        with torch.no_grad():
            for bn in self.selected:
                gamma = trainable(self.module(bn))
                penalty = self.scale * torch.sign(gamma)
                if gamma.grad is None:   # a γ the loss does not reach still gets its penalty
                    gamma.grad = penalty.clone()
                else:
                    gamma.grad.add_(penalty)

    def bn_slices(self, channel: Channel) -> list[ParamSlice]:
        import torch

        return [s for s in channel.slices if s.param == "weight"
                and isinstance(self.module(s.module), torch.nn.modules.batchnorm._BatchNorm)]

    def group_bns(self, group: Group) -> list[str]:
        return list(dict.fromkeys(s.module for ch in group.channels for s in self.bn_slices(ch)))

    def group_sparsity(self, group: Group) -> tuple[float | None, str]:
        bns = self.group_bns(group)
        if not bns:
            return None, "no BatchNorm"
        left_alone = [bn for bn in bns if bn not in self.selected]
        if left_alone:
            return None, f"BatchNorm {left_alone[0]} not selected"
        return min(self.selected[bn] for bn in bns), ""

    def channel_scores(self, group: Group) -> np.ndarray:
        per_bn = []
        for bn in self.group_bns(group):
            gamma = np.abs(self.weight(bn))
            per_bn.append(np.array([sum(float(gamma[i]) for s in self.bn_slices(ch) if s.module == bn
                                        for i in s.indices) for ch in group.channels]))
        return criteria.reduce(per_bn, self.group_reduce)

    def already_pruned(self, group: Group, existing: dict) -> np.ndarray:
        def masked(s: ParamSlice) -> bool:
            m = existing.get(param_name(s.module, s.param))
            return m is not None and not bool(m[list(s.indices)].any())
        return np.array([bool(self.bn_slices(ch)) and all(masked(s) for s in self.bn_slices(ch))
                         for ch in group.channels], bool)

    def mask_channel(self, masks, channel: Channel, torch) -> None:
        for s in self.bn_slices(channel):
            self.zero_slice(masks, s, torch)
            if self.prune_bias and getattr(self.module(s.module), "bias", None) is not None:
                self.zero_slice(masks, ParamSlice(s.module, "bias", 0, s.indices), torch)


# --- ADMM -------------------------------------------------------------------------------------

ADMM_BASE = ("l1", "l2", "fpgm", "level")


class ADMMPruner(FilterPruner):
    """ADMM pruning (Zhang et al. 2018, "A Systematic DNN Weight Pruning Framework using ADMM"), as
    NNI implements it. Z = W, U = 0; each of `num_iterations` iterations trains
    `epochs_per_iteration` epochs with Adam (lr 1e-3, weight_decay 5e-5; the pruner makes it and
    hands it to the trainer), every step preceded by W -= row·(W − Z + U) on the selected weights;
    then Z = projection(W + U) (the base algorithm's mask at the configured sparsity: l1 / l2 /
    fpgm dependency-aware channel groups, or level for single weights) and U = U + W − Z. Finally
    the base algorithm masks the trained weights. `Z` and `U`: parameter name -> tensor.

    NNI 2.x arguments: trainer (required), criterion (handed to the trainer; default
    torch.nn.CrossEntropyLoss()), num_iterations, epochs_per_iteration (NNI 1: training_epochs;
    `epochs` too), row, base_algo, dummy_input, dependency_aware. The trainer gets the epoch within
    the iteration, as in NNI. The pull W -= row·(W − Z + U) is the gradient of NNI's augmented
    Lagrangian term row/2·‖W − Z + U‖², applied as its own step (not through Adam's scaling)."""

    def __init__(self, model, config_list, trainer, criterion=None, num_iterations=30, epochs_per_iteration=5,
                 row=1e-4, base_algo="l1", dummy_input=None, dependency_aware=True, training_epochs=None,
                 epochs=None, **kw):
        import torch

        name = type(self).__name__
        self.trainer = require_trainer(trainer, name)
        self.criterion = criterion if criterion is not None else torch.nn.CrossEntropyLoss()
        self.iterations = checks.positive_int(num_iterations, "num_iterations")
        self.epochs = checks.positive_int(_epochs_per_iteration(epochs_per_iteration, training_epochs, epochs),
                                          "epochs_per_iteration")
        self.row = checks.tolerance(row, "row")
        if base_algo not in ADMM_BASE:
            raise OnnxPruneError(f"{name}: base_algo must be one of {', '.join(ADMM_BASE)}, got {base_algo!r}")
        self.base_algo = base_algo
        if base_algo == "level":   # single weights: no channel groups needed
            kw["groups"] = DependencyGroups([])
        super().__init__(model, config_list, dummy_input, dependency_aware, **kw)
        self._scoring: dict[str, np.ndarray] | None = None
        self.Z: dict = {}
        self.U: dict = {}

    def channel_scores(self, group: Group) -> np.ndarray:
        fn = criteria.WEIGHT_CRITERIA[self.base_algo]
        return self.reduce_per_channel(group, {k: fn(w) for k, w in self.producer_rows(group).items()})

    def weight(self, name: str, dense: bool = False):
        """The weights the masks are chosen on: W + U during the projection, else the model's."""
        if self._scoring is not None and name in self._scoring:
            return self._scoring[name]
        return super().weight(name, dense)

    def compress(self):
        """The ADMM iterations (the trainer runs `epochs_per_iteration` epochs in each, with the
        pruner's Adam), then the base algorithm's masks on the trained weights. Returns the model."""
        import torch

        params = {param_name(n, "weight"): trainable(self.module(n)) for n in self.selected}
        self.Z = {k: p.detach().clone() for k, p in params.items()}
        self.U = {k: torch.zeros_like(p) for k, p in params.items()}
        optimizer = torch.optim.Adam(self.bound_model.parameters(), lr=1e-3, weight_decay=5e-5)

        def pull_towards_z(_optimizer, _args, _kwargs):
            with torch.no_grad():
                for k, p in params.items():
                    p.sub_(self.row * (p - self.Z[k] + self.U[k]))

        handle = optimizer.register_step_pre_hook(pull_towards_z)
        try:
            for _ in range(self.iterations):
                for epoch in range(self.epochs):
                    self.trainer(self.bound_model, optimizer, self.criterion, epoch)
                with torch.no_grad():
                    self.Z = self.project({k: p.detach() + self.U[k] for k, p in params.items()})
                    self.U = {k: self.U[k] + p.detach() - self.Z[k] for k, p in params.items()}
        finally:
            handle.remove()
        self.update_mask()
        return self.bound_model

    def project(self, values: dict) -> dict:
        """Euclidean projection onto the pruned set: `values` with the base algorithm's mask
        (chosen on `values` themselves) applied."""
        self._scoring = {k.rpartition(".")[0]: v.cpu().double().numpy() for k, v in values.items()}
        try:
            masks = self.calc_masks()
        finally:
            self._scoring = None
        return {k: v * masks[k].to(v.device, v.dtype) if k in masks else v.clone() for k, v in values.items()}

    def calc_masks(self, schedule=None, sparsities=None) -> dict:
        if self.base_algo == "level":   # LevelPruner's rule, on our `weight()` (W + U while projecting)
            return LevelPruner.calc_masks(self, schedule=schedule, sparsities=sparsities)
        return super().calc_masks(schedule=schedule, sparsities=sparsities)


def _epochs_per_iteration(epochs_per_iteration, training_epochs, epochs) -> int:
    """NNI 2's epochs_per_iteration, NNI 1's training_epochs, or epochs: one of them."""
    given = [v for v in (training_epochs, epochs) if v is not None]
    if len(set(given)) > 1 or (given and epochs_per_iteration not in (5, given[0])):
        raise OnnxPruneError("ADMMPruner: give one of epochs_per_iteration, training_epochs, epochs")
    return given[0] if given else epochs_per_iteration


__all__ = ["ActivationAPoZRankFilterPruner", "ActivationMeanRankFilterPruner", "TaylorFOWeightFilterPruner",
           "SlimPruner", "ADMMPruner"]
