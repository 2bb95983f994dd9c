"""Sensitivity of a PyTorch model's channel groups, and NNI's SensitivityPruner on top of it.

`sensitivity_analysis` prunes each searched group alone (base algorithm l1 / l2 / fpgm) at each
sparsity — on top of what the model's masks already prune — and evaluates the result: the metric
per group and sparsity, as rows `onnxprune.sensitivity` tabulates, writes as CSV and plots (one
curve per group). The candidates are independent: they run through `executor`, and land in
`experiment_data_dir` (resumable).

`SensitivityPruner` (NNI's names): iterations of analysis → per-group threshold (the largest
sparsity whose metric stays within `acc_drop_threshold` of the unpruned model's) → the thresholds,
scaled by one factor so that the model sheds `sparsity_per_iteration` more of the dense resource
(MACs by default) → prune, `finetuner(model)` → again, until the budget (1 − sparsity) × dense is met.
"""

from __future__ import annotations

from .. import checks
from ..errors import OnnxPruneError
from ..sensitivity import SensitivityRow
from .annealing import rescale
from .search import Candidate, SearchPruner, seed_everything, state_of, task_seed

SPARSITIES = tuple(round(0.1 * k, 1) for k in range(1, 10))


def with_sparsity(config_list, value: float) -> list[dict]:
    """The config with `sparsity` = value on every entry that selects layers without giving one."""
    keys = ("sparsity", "sparse_ratio", "sparsity_per_layer")
    return [e | {"sparsity": value} if isinstance(e, dict) and not e.get("exclude") and not any(k in e for k in keys)
            else e for e in config_list]


def analysis_candidates(space, current: dict[int, float], sparsities, stage: str) -> list[tuple[int, Candidate]]:
    """(group, candidate): each searched group alone at each sparsity above what it already has."""
    out = []
    for gi in space.searched:
        for s in sorted({space.clip(s, gi) for s in sparsities}):
            if s > current[gi] + 1e-12:
                out.append((gi, Candidate(f"{stage}: {space.label(gi)} at {s:g}", current | {gi: s})))
    return out


class SensitivityAnalysis(SearchPruner):
    """The analysis alone: `run()` -> (rows, baseline metric); nothing is left on the model."""

    name = "sensitivity"

    def __init__(self, model, evaluator, dummy_input, config_list=None, sparsities=SPARSITIES, base_algo="l1",
                 experiment_data_dir=None, executor=None, seed=0, progress=True, threads=None, finetuner=None):
        config_list = with_sparsity(config_list or [{"op_types": ["default"]}], 0.5)
        self.sparsities = tuple(checks.sparsity(s, "sparsities") for s in sparsities)
        super().__init__(model, config_list, evaluator, dummy_input, base_algo=base_algo, finetuner=finetuner,
                         experiment_data_dir=experiment_data_dir, executor=executor, seed=seed, threads=threads,
                         max_sparsity=max(self.sparsities), progress=progress,
                         args={"sparsities": list(self.sparsities)})

    def run(self, stage: str = "analysis") -> tuple[list[SensitivityRow], float]:
        current = self.space.current(self.bound_model)
        base = self.evaluation.run(self.bound_model, [Candidate(f"{stage}: baseline", current)], desc="baseline")[0]
        pairs = analysis_candidates(self.space, current, self.sparsities, stage)
        records = self.evaluation.run(self.bound_model, [c for _, c in pairs], desc="sensitivity")
        rows = [SensitivityRow(self.space.label(gi), list(self.space.groups.groups[gi].layers), c.sparsities[gi],
                               r["metric"], r["macs"]) for (gi, c), r in zip(pairs, records)]
        return rows, base["metric"]

    def search(self) -> None:
        self.rows, self.baseline = self.run()


def sensitivity_analysis(model, evaluator, dummy_input, config_list=None, sparsities=SPARSITIES, base_algo="l1",
                         experiment_data_dir=None, executor=None, seed=0, progress=True, csv=None, plot=None,
                         metric_name="metric") -> tuple[list[SensitivityRow], float]:
    """Rows (group, layers, sparsity, metric, MACs) and the unpruned metric; `csv` / `plot` write
    them (see onnxprune.sensitivity)."""
    from .. import sensitivity as report

    rows, baseline = SensitivityAnalysis(model, evaluator, dummy_input, config_list, sparsities, base_algo,
                                         experiment_data_dir, executor, seed, progress).run()
    if csv is not None:
        report.write_csv(rows, csv)
    if plot is not None:
        report.plot(rows, plot, metric_name, baseline)
    return rows, baseline


def threshold_sparsities(rows: list[SensitivityRow], baseline: float, drop: float) -> dict[str, float]:
    """Per group: the largest analysed sparsity whose metric is within `drop` of the baseline (0: none)."""
    out = {r.group: 0.0 for r in rows}
    for r in rows:
        if r.metric >= baseline - drop and r.sparsity > out[r.group]:
            out[r.group] = r.sparsity
    return out


class SensitivityPruner(SensitivityAnalysis):
    """NNI's SensitivityPruner(model, config_list, evaluator, finetuner=None, base_algo="l1",
    sparsity_proportion_calc=None, sparsity_per_iteration=0.1, acc_drop_threshold=0.05,
    checkpoint_dir=None), plus `dummy_input`, `executor`, `experiment_data_dir` (checkpoint_dir is
    NNI's name for it), `seed`. `sparsity_proportion_calc(rows, baseline, threshold)` may replace the
    thresholds (group label -> proportion). `self.iterations`: per iteration the sparsities, metric, cost."""

    name = "sensitivity_pruner"
    counted_only = True    # the thresholds are scaled to the budget by bisection

    def __init__(self, model, config_list, evaluator, finetuner=None, base_algo="l1", sparsity_proportion_calc=None,
                 sparsity_per_iteration=0.1, acc_drop_threshold=0.05, checkpoint_dir=None, *, dummy_input=None,
                 sparsities=SPARSITIES, experiment_data_dir=None, executor=None, seed=0, progress=True, threads=None,
                 resource="macs"):
        self.step = checks.sparsity(sparsity_per_iteration, "sparsity_per_iteration")
        self.drop = checks.tolerance(acc_drop_threshold, "acc_drop_threshold")
        self.proportion = sparsity_proportion_calc or threshold_sparsities
        SearchPruner.__init__(self, model, config_list, evaluator, dummy_input, base_algo=base_algo, resource=resource,
                              experiment_data_dir=experiment_data_dir or checkpoint_dir, executor=executor, seed=seed,
                              threads=threads, progress=progress,
                              args={"sparsities": list(sparsities), "sparsity_per_iteration": self.step,
                                    "acc_drop_threshold": self.drop})
        self.sparsities = tuple(checks.sparsity(s, "sparsities") for s in sparsities)
        self.finetuner = finetuner
        self.iterations: list[dict] = []

    def search(self) -> None:
        space, model = self.space, self.bound_model
        cost = space.counted_cost
        dense = cost({})
        budget = (1.0 - space.sparsity) * dense
        current = space.current(model)
        baseline = None
        iteration = 0
        while cost(current) > budget * (1 + 1e-9):
            key = f"iteration {iteration} done"
            done = self.log.get(key, keep_state=True)
            if done is not None:       # resumed: this iteration's pruning and fine-tuning are logged
                chosen, baseline = {int(k): v for k, v in done["group_sparsities"].items()}, done["baseline"]
                self.apply(chosen, done["state"])
            else:
                rows, metric = self.run(f"iteration {iteration}")
                baseline = metric if baseline is None else baseline       # the unpruned model's metric
                proportion = self.proportion(rows, baseline, self.drop)
                relative = {gi: max(proportion.get(space.label(gi), 0.0), 1e-3) for gi in space.searched}
                target = max(cost(current) - self.step * dense, budget)
                chosen = rescale(cost, relative, lambda v, gi: space.clip(v, gi, current[gi]), target)
                if chosen is None:
                    raise OnnxPruneError(f"SensitivityPruner: {space.resource} {target:.6g} cannot be met with at "
                                         f"most {space.max_sparsity:.0%} of each group pruned")
                self.apply(chosen)
                if self.finetuner is not None:
                    seed_everything(task_seed(self.seed, key))
                    self.finetuner(model)
                self.log.put(key, {"key": key, "group_sparsities": {str(k): v for k, v in chosen.items()},
                                   "baseline": baseline},
                             state_of(model))
            current = space.current(model)
            self.iterations.append({"iteration": iteration, "sparsities": space.named(current), **space.counted(current)})
            iteration += 1
        final = float(self.evaluation.evaluator(model))
        self.evaluation.best = {"sparsities": space.named(current), **space.counted(current), "metric": final}


__all__ = ["sensitivity_analysis", "SensitivityAnalysis", "SensitivityPruner", "threshold_sparsities", "with_sparsity"]
