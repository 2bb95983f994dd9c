"""Iterative prune – fine-tune in rounds (Torch-Pruning's `--round 1..n` workflow).

Round r of n prunes every group to r/n of its configured sparsity — what earlier rounds pruned
stays pruned — then calls the user's fine-tuner, and records the evaluator's metric. The
schedules of the next layer (AGP's cubic ramp, Lottery Ticket's geometric one) are this loop
with another `schedule`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RoundResult:
    round: int
    fraction: float          # of the configured sparsity reached after this round
    metric: float | None     # evaluator(model) after fine-tuning, if an evaluator was given
    pruned_weights: dict     # parameter name -> fraction of weights masked


def prune_in_rounds(pruner, rounds: int, finetuner, evaluator=None, progress: bool = True) -> list[RoundResult]:
    """Prune with `pruner` in `rounds` equal steps, fine-tuning after each:
    `finetuner(model, round)` trains in place; `evaluator(model) -> float` is optional."""
    from tqdm.auto import tqdm

    from .. import checks

    rounds = checks.positive_int(rounds, "rounds")
    results = []
    for r in tqdm(range(1, rounds + 1), desc=f"{type(pruner).__name__} rounds", disable=not progress, leave=False):
        fraction = r / rounds
        pruner.update_mask(schedule=lambda s, f=fraction: s * f)
        finetuner(pruner.bound_model, r)
        metric = float(evaluator(pruner.bound_model)) if evaluator is not None else None
        results.append(RoundResult(r, fraction, metric, pruner.get_pruned_weights()))
    return results
