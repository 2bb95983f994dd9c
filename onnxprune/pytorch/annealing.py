"""Simulated annealing over the per-group sparsities (the AutoCompress paper's guided search, Liu et
al. 2020) and AutoCompress itself (rounds of annealing + ADMM), with NNI's names and arguments.

A candidate is a sparsity per searched group. The search keeps them *guided*: the values are
sorted and handed out by size, so larger groups (more weight entries per layer) prune more, and then scaled
by one factor — found by bisection on the counted MACs / weights — so that the candidate just
meets the budget. At temperature T each step perturbs the current candidate by
uniform(−m, m)·T/T0 per group (m = `perturbation_magnitude`), re-sorts, re-scales and evaluates it;
a better one is taken, a worse one with probability exp(−|Δmetric| / T); T falls by
`cool_down_rate` until `stop_temperature`. `candidates_per_temperature` > 1 evaluates several
perturbations per step (through `executor`) and keeps the best of them. Every random number is
drawn here, in order, from one generator seeded by `seed`.

AutoCompress: `num_iterations` rounds; round i anneals to the budget (1 − S)^((i+1)/n) of the dense
resource (S the config's sparsity), starting from what earlier rounds pruned, then trains with ADMM
towards the chosen sparsities (`admm_num_iterations` × `admm_epochs_per_iteration` epochs of the
user's `trainer`) and masks; `speedup` then exports, simplifies and checks the round's model (its
MACs on onnxruntime are what the round reports; the PyTorch model keeps its masks — onnxprune
rewrites the ONNX model, not the module).
"""

from __future__ import annotations

import math

import numpy as np

from .. import checks
from ..errors import OnnxPruneError
from .search import Candidate, SearchPruner, seed_everything, state_of, task_seed
from .training import ADMMPruner


def by_size(values: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """`values` re-ordered so that the largest value goes to the largest size (ties: first first)."""
    out = np.empty_like(values)
    out[np.argsort(sizes, kind="stable")] = np.sort(values, kind="stable")
    return out


def rescale(cost, relative: dict[int, float], clip, budget: float, steps: int = 50) -> dict[int, float] | None:
    """The candidate {gi: clip(α·r, gi)} with the smallest α whose cost is within `budget`, or None
    when even the largest α does not meet it. `cost(sparsities)` must fall as α grows."""
    def at(alpha: float) -> dict[int, float]:
        return {gi: clip(alpha * r, gi) for gi, r in relative.items()}

    positive = [r for r in relative.values() if r > 0]
    hi = (1.0 / min(positive)) if positive else 1.0
    if cost(at(hi)) > budget:
        return None
    lo = 0.0
    if cost(at(lo)) <= budget:
        return at(lo)
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if cost(at(mid)) <= budget else (mid, hi)
    return at(hi)


def layer_size(space, gi: int) -> float:
    """A group's size for "larger layers prune more": the mean weight count of its producer layers.
    (Not the sum: a residual stream's group couples many layers and would always prune hardest,
    though it is the most sensitive group of a ResNet.)"""
    layers = space.resources.layers
    sizes = [int(np.prod(layers[name].shape)) for name in space.groups.groups[gi].layers if name in layers]
    return float(np.mean(sizes)) if sizes else 0.0


class SimulatedAnnealingPruner(SearchPruner):
    """NNI's SimulatedAnnealingPruner(model, config_list, evaluator, optimize_mode, base_algo,
    start_temperature, stop_temperature, cool_down_rate, perturbation_magnitude, experiment_data_dir),
    plus `dummy_input`, `resource` ("macs" or "params"), `executor`, `seed`,
    `candidates_per_temperature` and `finetuner` (run on every candidate before `evaluator`)."""

    name = "simulated_annealing"
    counted_only = True    # every candidate is scaled to the budget by bisection

    def __init__(self, model, config_list, evaluator, optimize_mode="maximize", base_algo="l1", start_temperature=100,
                 stop_temperature=20, cool_down_rate=0.9, perturbation_magnitude=0.35, experiment_data_dir=None, *,
                 dummy_input=None, resource="macs", executor=None, seed=0, candidates_per_temperature=1,
                 finetuner=None, max_sparsity=0.9, progress=True, threads=None, args=None):
        self.t0 = checks.positive_number(start_temperature, "start_temperature")
        self.t_stop = checks.positive_number(stop_temperature, "stop_temperature")
        self.cool = float(cool_down_rate)
        if not 0 < self.cool < 1:
            raise OnnxPruneError(f"cool_down_rate must be in (0, 1), got {cool_down_rate!r}")
        self.magnitude = checks.positive_number(perturbation_magnitude, "perturbation_magnitude")
        self.per_step = checks.positive_int(candidates_per_temperature, "candidates_per_temperature")
        sa_args = {"start_temperature": self.t0, "stop_temperature": self.t_stop, "cool_down_rate": self.cool,
                   "perturbation_magnitude": self.magnitude, "candidates_per_temperature": self.per_step}
        super().__init__(model, config_list, evaluator, dummy_input, base_algo=base_algo, resource=resource,
                         finetuner=finetuner, optimize_mode=optimize_mode, experiment_data_dir=experiment_data_dir,
                         executor=executor, seed=seed, threads=threads, max_sparsity=max_sparsity, progress=progress,
                         args=sa_args | (args or {}))
        self.rng = np.random.default_rng(self.seed)
        self.sizes = np.array([layer_size(self.space, gi) for gi in self.space.searched], dtype=np.float64)

    def search(self) -> None:
        best = self.anneal(self.space.budget(self.bound_model), self.space.current(self.bound_model), "")
        self.apply(best)

    # --- the annealing ----------------------------------------------------------------------
    def guided(self, values: np.ndarray, floors: dict[int, float], budget: float) -> dict[int, float] | None:
        """Sorted by size, scaled to just meet the budget, never below what is already pruned."""
        relative = dict(zip(self.space.searched, by_size(np.clip(values, 0, None), self.sizes).tolist()))
        return rescale(self.space.counted_cost, relative,
                       lambda v, gi: self.space.clip(v, gi, floors.get(gi, 0.0)), budget)

    def anneal(self, budget: float, floors: dict[int, float], prefix: str) -> dict[int, float]:
        """The best candidate within `budget` the annealing finds (its record: `self.best`)."""
        from tqdm.auto import tqdm

        start = self.guided(self.rng.uniform(0, 1, len(self.space.searched)), floors, budget)
        if start is None:
            raise OnnxPruneError(f"the budget ({self.space.resource} ≤ {budget:.6g}) cannot be met with at most "
                                 f"{self.space.max_sparsity:.0%} of each group pruned")
        maximize = self.evaluation.maximize
        current = self.evaluation.run(self.bound_model, [Candidate(f"{prefix}start", start)], desc="start")[0]
        current_s, best_s, best = start, start, current
        temperatures = []
        t = self.t0
        while t > self.t_stop:
            temperatures.append(t)
            t *= self.cool
        for step, t in enumerate(tqdm(temperatures, desc=f"{prefix}annealing", disable=not self.evaluation.progress)):
            magnitude = self.magnitude * t / self.t0
            values = np.array([current_s[gi] for gi in self.space.searched])
            proposals = [self.guided(values + self.rng.uniform(-magnitude, magnitude, len(values)), floors, budget)
                         for _ in range(self.per_step)]
            proposals = [p for p in proposals if p is not None]
            if not proposals:
                continue
            records = self.evaluation.run(self.bound_model, [Candidate(f"{prefix}T={t:.4g} #{k}", p)
                                                             for k, p in enumerate(proposals)], desc=f"T={t:.3g}")
            k = self.evaluation.best_index(records)
            record, sparsities = records[k], proposals[k]
            delta = record["metric"] - current["metric"]
            accept = (delta > 0 if maximize else delta < 0) or self.rng.uniform(0, 1) < math.exp(-abs(delta) / t)
            if accept:
                current, current_s = record, sparsities
            if self.evaluation.better(record["metric"], best["metric"]):
                best, best_s = record, sparsities
        self.evaluation.best = {k: v for k, v in best.items() if k != "state"}
        return best_s


class _ADMMTowards(ADMMPruner):
    """ADMM whose projection and final masks use per-group sparsities (the annealing's)."""

    def __init__(self, *args, group_sparsities: dict[int, float], **kwargs):
        self.group_sparsities = dict(group_sparsities)
        super().__init__(*args, **kwargs)

    def calc_masks(self, schedule=None, sparsities=None) -> dict:
        return super().calc_masks(schedule, self.group_sparsities if sparsities is None else sparsities)


class AutoCompressPruner(SimulatedAnnealingPruner):
    """NNI's AutoCompressPruner(model, config_list, trainer, evaluator, dummy_input, criterion,
    num_iterations, optimize_mode, base_algo, start_temperature, stop_temperature, cool_down_rate,
    perturbation_magnitude, admm_num_iterations, admm_epochs_per_iteration, row, experiment_data_dir):
    see the module docstring. `trainer(model, optimizer, criterion, epoch)` as ADMMPruner calls it.
    `self.rounds`: per round the budget, the sparsities, the metric after ADMM and the simplified
    model's MACs. A resumed run reloads every finished round's weights from experiment_data_dir."""

    name = "auto_compress"

    def __init__(self, model, config_list, trainer, evaluator, dummy_input, criterion=None, num_iterations=3,
                 optimize_mode="maximize", base_algo="l1", start_temperature=100, stop_temperature=20,
                 cool_down_rate=0.9, perturbation_magnitude=0.35, admm_num_iterations=30, admm_epochs_per_iteration=5,
                 row=1e-4, experiment_data_dir=None, *, resource="macs", executor=None, seed=0,
                 candidates_per_temperature=1, max_sparsity=0.9, progress=True, threads=None):
        self.trainer, self.criterion = trainer, criterion
        self.num_iterations = checks.positive_int(num_iterations, "num_iterations")
        self.admm = {"num_iterations": checks.positive_int(admm_num_iterations, "admm_num_iterations"),
                     "epochs_per_iteration": checks.positive_int(admm_epochs_per_iteration, "admm_epochs_per_iteration"),
                     "row": row}
        super().__init__(model, config_list, evaluator, optimize_mode, base_algo, start_temperature, stop_temperature,
                         cool_down_rate, perturbation_magnitude, experiment_data_dir, dummy_input=dummy_input,
                         resource=resource, executor=executor, seed=seed,
                         candidates_per_temperature=candidates_per_temperature, max_sparsity=max_sparsity,
                         progress=progress, threads=threads,
                         args={"num_iterations": self.num_iterations} | {f"admm_{k}": v for k, v in self.admm.items()})
        self.rounds: list[dict] = []

    def search(self) -> None:
        from .speedup import speedup

        space, model = self.space, self.bound_model
        dense = space.counted_cost({})
        floors = space.current(model)
        for i in range(self.num_iterations):
            budget = dense * (1.0 - space.sparsity) ** ((i + 1) / self.num_iterations)
            key = f"round {i}"
            done = self.log.get(key, keep_state=True)
            if done is not None:          # resumed: this round's annealing and ADMM are logged
                self.rng = np.random.default_rng(done["rng"])
                floors = {int(k): v for k, v in done["group_sparsities"].items()}
                self.apply(floors, done["state"])
                self.rounds.append({k: v for k, v in done.items() if k not in ("state", "rng")})
                continue
            chosen = self.anneal(budget, floors, f"round {i}: ")
            admm = _ADMMTowards(model, [{"sparsity": 0.0, "op_names": space.layers}], self.trainer, self.criterion,
                                base_algo=space.base_algo, groups=space.groups, group_sparsities=chosen, **self.admm)
            seed_everything(task_seed(self.seed, key))
            admm.compress()
            metric = float(self.evaluation.evaluator(model))
            _, report = speedup(model, self.dummy_input, exporter="torchscript", batches=1, align=1)
            record = {"round": i, "budget": budget, "sparsities": space.named(chosen), "metric": metric,
                      **space.counted(chosen), "simplified_macs": report.simplify.after.macs,
                      "group_sparsities": {str(k): v for k, v in chosen.items()}}
            self.log.put(key, record | {"key": key, "rng": int(self.rng.integers(2**63))},
                         state_of(model))
            self.rng = np.random.default_rng(self.log.records[key]["rng"])
            self.rounds.append(record)
            floors = chosen
        self.evaluation.best = self.rounds[-1]


__all__ = ["SimulatedAnnealingPruner", "AutoCompressPruner", "by_size", "rescale"]
