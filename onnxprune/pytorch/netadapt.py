"""NetAdapt (Yang et al. 2018), with NNI's names and arguments — and the resource a user deploys.

Each iteration asks the model to shed `sparsity_per_iteration` of the dense model's resource. For
every searched group it finds the fewest more channels whose removal meets that step (bisection
over the channel count: counted MACs / weights, or *measured onnxruntime latency of the simplified
candidate* with `resource="latency"` — export → simplify → time, cached by architecture), makes
that candidate with the base algorithm, fine-tunes it briefly (`short_term_fine_tuner(model)`) and
evaluates it. The best candidate — its masks and its fine-tuned weights — becomes the model of the
next iteration, until the budget `(1 − sparsity) × dense resource` is met. When no group alone can
shed the step (latency often falls in steps: a width reaching a multiple of onnxruntime's block),
the step is halved, up to 4 times, and stays smaller for the rest of the search. The candidates of one
iteration are independent: they run through `executor`.

    pruner = NetAdaptPruner(model, [{"sparsity": 0.5, "op_types": ["Conv2d"]}], short_term_fine_tuner=finetune,
                            evaluator=accuracy, dummy_input=x, resource="latency")
    model = pruner.compress()
"""

from __future__ import annotations

import warnings

from .. import checks
from ..errors import OnnxPruneError
from .search import Candidate, SearchPruner

HALVINGS = 4   # the step may shrink to 1/16 before a search stops short of its budget


def fewest_channels(cost, size: int, start: int, stop: int, target: float) -> int | None:
    """The smallest count n in (start, stop] with cost(n) ≤ target (cost falls as n grows), or None.
    Bisection: log2(stop − start) evaluations of `cost`."""
    if stop <= start or cost(stop) > target:
        return None
    lo, hi = start, stop          # cost(hi) ≤ target; counts ≤ lo are not known to be
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if cost(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi


class NetAdaptPruner(SearchPruner):
    """NNI's NetAdaptPruner(model, config_list, short_term_fine_tuner, evaluator, optimize_mode,
    base_algo, sparsity_per_iteration, experiment_data_dir), plus `dummy_input` (the groups and the
    MACs are traced from it), `resource` ("macs", "params" or "latency": ms on onnxruntime at
    `latency_threads`), `executor`, `seed`. `self.iterations` lists each iteration's chosen record."""

    name = "netadapt"

    def __init__(self, model, config_list, short_term_fine_tuner, evaluator, optimize_mode="maximize", base_algo="l1",
                 sparsity_per_iteration=0.05, experiment_data_dir=None, *, dummy_input=None, resource="macs",
                 executor=None, seed=0, latency_threads=1, max_sparsity=0.9, progress=True, threads=None):
        self.step = checks.sparsity(sparsity_per_iteration, "sparsity_per_iteration")
        if self.step <= 0:
            raise OnnxPruneError("sparsity_per_iteration must be > 0")
        super().__init__(model, config_list, evaluator, dummy_input, base_algo=base_algo, resource=resource,
                         finetuner=short_term_fine_tuner, optimize_mode=optimize_mode,
                         experiment_data_dir=experiment_data_dir, executor=executor, seed=seed, threads=threads,
                         max_sparsity=max_sparsity, progress=progress, latency_threads=latency_threads,
                         args={"sparsity_per_iteration": self.step})
        self.iterations: list[dict] = []
        self.stopped_short: dict | None = None     # cost, budget, dense: when no step could be met

    def search(self) -> None:
        from tqdm.auto import tqdm

        space, model = self.space, self.bound_model
        current = space.current(model)
        dense = space.cost({}, model)
        budget, step = (1.0 - space.sparsity) * dense, self.step * dense
        now = dense
        bar = tqdm(total=round(dense - budget, 6), desc=f"NetAdapt ({space.resource})", disable=not self.evaluation.progress)
        iteration = 0
        while now > budget * (1 + 1e-9):
            target = max(now - step, budget)
            candidates = self.candidates(iteration, current, target)
            for _ in range(HALVINGS):       # no group can shed the step alone: a smaller step, from now on
                if candidates:
                    break
                step /= 2
                target = max(now - step, budget)
                candidates = self.candidates(iteration, current, target)
            if not candidates:
                warnings.warn(f"NetAdapt: no group can meet {space.resource} {target:.6g} "
                              f"(now {now:.6g}, budget {budget:.6g}); stopping", stacklevel=2)
                self.stopped_short = {"cost": now, "budget": budget, "dense": dense}
                break
            records = self.evaluation.run(model, candidates, keep_state=True, desc=f"iteration {iteration}",
                                          extra=self.measured)
            chosen = self.evaluation.best_index(records)
            current = candidates[chosen].sparsities
            self.apply(current, records[chosen]["state"])
            cost = space.cost(current, model)
            self.iterations.append({k: v for k, v in records[chosen].items() if k != "state"} | {"cost": cost})
            bar.update(round(now - cost, 6))
            bar.set_postfix(metric=f"{records[chosen]['metric']:.4g}", cost=f"{cost:.4g}")
            now, iteration = cost, iteration + 1
        bar.close()
        self.evaluation.best = self.iterations[-1] if self.iterations else None

    def candidates(self, iteration: int, current: dict[int, float], target: float) -> list[Candidate]:
        """One per group that can meet `target` alone: the fewest more channels that do."""
        space, out = self.space, []
        for gi in space.searched:
            size = space.size(gi)
            have = round(current[gi] * size)
            most = int(space.clip(1.0, gi) * size + 1e-9)

            def cost(n, gi=gi):
                return space.cost(current | {gi: n / size}, self.bound_model)

            n = fewest_channels(cost, size, have, most, target)
            if n is not None:
                out.append(Candidate(f"iteration {iteration}: {space.label(gi)}", current | {gi: n / size}))
        return out

    def measured(self, candidate: Candidate) -> dict:
        """Latency runs: the measured ms of the candidate (already cached by the count search)."""
        if self.space.resource != "latency":
            return {}
        return {"latency_ms": round(self.space.cost(candidate.sparsities, self.bound_model), 4)}


__all__ = ["NetAdaptPruner", "fewest_channels"]
