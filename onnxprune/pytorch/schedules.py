"""Pruning schedules that drive a pruner while the model trains (NNI's names and arguments).

AGP (Zhu & Gupta 2017, "To prune, or not to prune"): the sparsity ramps from `initial_sparsity` to
`final_sparsity` along a cubic,

    s_t = s_f + (s_i − s_f) · (1 − (t − t0) / (n·Δt))³,

with t the epoch, t0 = `start_epoch`, Δt = `frequency` and n·Δt = ((end_epoch − start_epoch − 1) // Δt)·Δt
(the last update epoch, as NNI counts it); the masks change only at t0, t0 + Δt, … and stay at s_f
from the last update on. `pruner.update_epoch(epoch)` sets t; a hook on `optimizer.step()` recomputes
the masks when the sparsity due at t is not yet applied. What the schedule prunes stays pruned.

    pruner = AGPPruner(model, config_list, optimizer, pruning_algorithm="l1", dummy_input=x)
    pruner.compress()

The data-driven algorithms rank on the user's own training: `taylorfo` on Σ (g·w)² over every
optimizer step since the last update, `apoz` / `mean_activation` on the activations of every
training-mode forward since then (their hooks stay on while the pruner lives; the statistics
restart after each update, so the first update waits for the first step of training), `slim` on
|γ| of the BatchNorm layers the config selects (no sparsity training: train with an L1 penalty on γ
yourself, or use SlimPruner first).
    for epoch in range(10):
        pruner.update_epoch(epoch)
        train_one_epoch(model, optimizer)   # the first optimizer.step() of the epoch updates the masks
"""

from __future__ import annotations

import math

from .. import checks
from ..errors import OnnxPruneError
from .pruner import FPGMPruner, L1FilterPruner, L2FilterPruner, LevelPruner, Pruner
from .training import ActivationAPoZRankFilterPruner, ActivationMeanRankFilterPruner, SlimPruner, TaylorFOWeightFilterPruner

SCHEDULE_KEYS = ("initial_sparsity", "final_sparsity", "start_epoch", "end_epoch", "frequency")
BASE_PRUNERS = {"level": LevelPruner, "l1": L1FilterPruner, "l2": L2FilterPruner, "fpgm": FPGMPruner,
                "slim": SlimPruner, "taylorfo": TaylorFOWeightFilterPruner, "apoz": ActivationAPoZRankFilterPruner,
                "mean_activation": ActivationMeanRankFilterPruner}
# ranked on what the user's own training does between two updates (the hooks stay on)
FROM_TRAINING = {"taylorfo", "apoz", "mean_activation"}


class ScheduledPruner:
    """What a schedule shares with the pruner it drives (`self.base`): its summary, the weights it
    masked, NNI's export."""

    base: Pruner

    @property
    def summary(self):
        return self.base.summary

    def get_pruned_weights(self) -> dict[str, float]:
        return self.base.get_pruned_weights()

    def export_model(self, *args, **kwargs) -> None:
        self.base.export_model(*args, **kwargs)


def agp_sparsity(epoch: int, initial: float, final: float, start_epoch: int = 0, end_epoch: int = 1,
                 frequency: int = 1) -> float:
    """The sparsity AGP asks at `epoch` (see the module docstring)."""
    if end_epoch <= start_epoch or initial >= final:
        return final
    if epoch < start_epoch:
        return 0.0
    span = ((end_epoch - start_epoch - 1) // frequency) * frequency
    if span <= 0:
        return final
    t = min(((epoch - start_epoch) // frequency) * frequency, span)  # the last update epoch so far
    return final + (initial - final) * (1.0 - t / span) ** 3


class AGPPruner(ScheduledPruner):
    """NNI's AGPPruner(model, config_list, optimizer, pruning_algorithm=...): the base pruner
    (`level`, `l1`, `l2`, `fpgm`, `slim`, `taylorfo`, `apoz`, `mean_activation`) on the same modules, its sparsity scheduled by AGP. The config
    entries give `sparsity` or `final_sparsity` per module; `initial_sparsity`, `start_epoch`,
    `end_epoch` and `frequency` (NNI's defaults 0, 0, 1, 1) are the first entry's that has them."""

    def __init__(self, model, config_list, optimizer, pruning_algorithm: str = "level", dummy_input=None,
                 criterion=None, **kwargs):
        if pruning_algorithm not in BASE_PRUNERS:
            raise OnnxPruneError(f"AGPPruner: pruning_algorithm must be one of {', '.join(BASE_PRUNERS)}, "
                                 f"got {pruning_algorithm!r}")
        self.schedule = {"initial_sparsity": 0.0, "start_epoch": 0, "end_epoch": 1, "frequency": 1}
        for key in SCHEDULE_KEYS[:1] + SCHEDULE_KEYS[2:]:
            value = next((e[key] for e in config_list if isinstance(e, dict) and key in e), None)
            if value is not None:
                self.schedule[key] = value
        checks.sparsity(self.schedule["initial_sparsity"], "initial_sparsity")
        self.schedule["frequency"] = checks.positive_int(self.schedule["frequency"], "frequency")
        base_list = [{("sparsity" if k == "final_sparsity" else k): v for k, v in e.items() if k not in SCHEDULE_KEYS
                      or k == "final_sparsity"} if isinstance(e, dict) else e for e in config_list]
        self.algorithm = pruning_algorithm
        self.base: Pruner = _base_pruner(pruning_algorithm, model, base_list, optimizer, criterion, dummy_input, kwargs)
        self.bound_model, self.optimizer, self.epoch, self.applied = model, optimizer, 0, None
        self._hooks = self._collecting_hooks() + [optimizer.register_step_post_hook(lambda *_: self.step())]

    def _collecting_hooks(self) -> list:
        """The data-driven base pruners' statistics hooks, on for good (never stopping the training)."""
        if self.algorithm not in FROM_TRAINING:
            return []
        self.base.batches = math.inf
        if self.algorithm == "taylorfo":
            return [self.optimizer.register_step_pre_hook(self.base._before_step)]
        return self.base._install_hooks()

    def _restart_statistics(self) -> None:
        if self.algorithm == "taylorfo":
            self.base.contributions, self.base.steps_seen = {}, 0
        elif self.algorithm in FROM_TRAINING:
            self.base.batches_seen = 0
            for tap in self.base.taps.values():
                tap.reset()

    def sparsity_now(self, final: float) -> float:
        s = self.schedule
        return agp_sparsity(self.epoch, s["initial_sparsity"], final, s["start_epoch"], s["end_epoch"], s["frequency"])

    def update_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def step(self) -> None:
        """After an optimizer step: apply the sparsity due now, if it is not applied yet."""
        due = self.sparsity_now(1.0), self.epoch >= self.schedule["start_epoch"]
        if due != self.applied:
            self.base.update_mask(schedule=self.sparsity_now)
            self._restart_statistics()
            self.applied = due

    def compress(self):
        """The first masks now — after the first optimizer step for the algorithms that rank on training."""
        if self.algorithm not in FROM_TRAINING:
            self.step()
        return self.bound_model

    def remove_hook(self) -> None:
        for h in self._hooks:
            h.remove()


def _base_pruner(algorithm, model, config_list, optimizer, criterion, dummy_input, kwargs) -> Pruner:
    cls = BASE_PRUNERS[algorithm]
    if cls is LevelPruner:
        return cls(model, config_list)
    if algorithm == "slim":
        return cls(model, config_list, optimizer, _no_trainer, criterion, sparsifying_training_epochs=0,
                   dummy_input=dummy_input, **kwargs)
    if algorithm in FROM_TRAINING:
        return cls(model, config_list, optimizer, trainer=_no_trainer, criterion=criterion, dummy_input=dummy_input, **kwargs)
    return cls(model, config_list, dummy_input=dummy_input, **kwargs)


def _no_trainer(*_args):
    """AGP's base pruners never train themselves: the statistics come from the user's training."""
    raise OnnxPruneError("AGPPruner's base pruner was asked to train; train the model yourself between update_epoch calls")


def lottery_sparsity(iteration: int, final: float, iterations: int) -> float:
    """Lottery Ticket's sparsity after `iteration` of `iterations` rounds: each round prunes
    1 − (1 − P)^(1/n) of the weights that survived the round before, so 1 − (1 − P)^(k/n) in all."""
    return 1.0 - (1.0 - final) ** (iteration / iterations)


class LotteryTicketPruner(ScheduledPruner):
    """NNI's LotteryTicketPruner(model, config_list, optimizer, lr_scheduler=None, reset_weights=True)
    (Frankle & Carbin 2019): `prune_iterations` (in the config) rounds of level pruning.
    `get_prune_iterations()` is range(prune_iterations + 1): round 0 trains the dense model; each
    `prune_iteration_start()` after it prunes `lottery_sparsity` of the weights and resets the surviving
    weights to their values θ0 at construction (bit for bit), the optimizer's state and the lr
    scheduler's. Train after each call."""

    def __init__(self, model, config_list, optimizer=None, lr_scheduler=None, reset_weights: bool = True):
        iterations = {e["prune_iterations"] for e in config_list if isinstance(e, dict) and "prune_iterations" in e}
        if len(iterations) != 1:
            raise OnnxPruneError("LotteryTicketPruner: give one prune_iterations in the config list")
        self.prune_iterations = checks.positive_int(iterations.pop(), "prune_iterations")
        base_list = [{k: v for k, v in e.items() if k != "prune_iterations"} if isinstance(e, dict) else e
                     for e in config_list]
        self.base = LevelPruner(model, base_list)
        self.bound_model, self.optimizer, self.lr_scheduler, self.reset_weights = model, optimizer, lr_scheduler, reset_weights
        self.theta0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.optimizer_state = _copy_state(optimizer.state_dict()) if optimizer is not None else None
        self.scheduler_state = _copy_state(lr_scheduler.state_dict()) if lr_scheduler is not None else None
        self.iteration = None

    def compress(self):
        return self.bound_model

    def get_prune_iterations(self) -> range:
        return range(self.prune_iterations + 1)

    def prune_iteration_start(self) -> None:
        self.iteration = 0 if self.iteration is None else self.iteration + 1
        if self.iteration == 0:
            return
        if self.iteration > self.prune_iterations:
            raise OnnxPruneError(f"LotteryTicketPruner: only {self.prune_iterations} prune iterations")
        k, n = self.iteration, self.prune_iterations
        self.base.update_mask(schedule=lambda final: lottery_sparsity(k, final, n))
        if self.reset_weights:
            self._reset()

    def _reset(self) -> None:
        import torch

        with torch.no_grad():
            for name, value in self.bound_model.state_dict(keep_vars=True).items():
                key = name[: -len("_orig")] if name.endswith("_orig") else name
                if not name.endswith("_mask") and key in self.theta0:
                    value.copy_(self.theta0[key])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(_copy_state(self.optimizer_state))
        if self.lr_scheduler is not None:
            self.lr_scheduler.load_state_dict(_copy_state(self.scheduler_state))


def _copy_state(state):
    import copy

    return copy.deepcopy(state)


__all__ = ["AGPPruner", "LotteryTicketPruner", "agp_sparsity", "lottery_sparsity"]
