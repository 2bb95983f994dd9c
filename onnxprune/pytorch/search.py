"""What every sparsity search shares: the space (which channel groups, at which sparsity), the
evaluation of candidates through any `concurrent.futures.Executor`, and the experiment log.

A *candidate* is a sparsity per searched group. Evaluating it is a picklable task — a copy of the
model (masks included), the groups, the base algorithm's name, the sparsities, the user's
evaluator / fine-tuner and a seed — run by `evaluate_task` wherever the executor puts it: in this
process (`executor=None`), a process pool, a Dask or Ray cluster. The task seeds torch and runs at a
fixed number of threads, and the search draws every random number in this process, so a search
gives the same candidates, metrics and best result whatever the executor. The evaluator and
fine-tuner must be picklable themselves: module-level functions or objects holding data (e.g. the
validation tensors), not closures over CUDA tensors.

    log = ExperimentLog(experiment_data_dir, "netadapt", args)   # JSON lines, one per candidate
    results = evaluate(space, model, candidates, evaluator, executor=pool, log=log)

The log is also the resume: a search that is run again with the same `experiment_data_dir` and the
same arguments replays the same candidates, takes the results already logged and evaluates only
the rest (a search that keeps a candidate's fine-tuned weights stores them next to the log).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import checks
from ..errors import OnnxPruneError
from .config import resolve
from ..pruning.groups import group_label
from .groups import DependencyGroups, dependency_groups
from .pruner import WEIGHTED, FPGMPruner, L1FilterPruner, L2FilterPruner
from .resources import LatencyCache, Resources

BASE_ALGOS = {"l1": L1FilterPruner, "l2": L2FilterPruner, "fpgm": FPGMPruner}
RESOURCES = ("macs", "params", "latency")


class SearchSpace:
    """The groups a search may prune (every layer of the group selected by `config_list`, at
    least one free channel) and the budget: the config's `sparsity` is the fraction of the dense
    model's `resource` to remove (MACs, weight entries of Conv / Linear layers, or measured
    latency of the simplified model)."""

    def __init__(self, model, config_list, dummy_input, base_algo: str = "l1", resource: str = "macs",
                 groups: DependencyGroups | None = None, max_sparsity: float = 0.9, latency_threads: int = 1):
        if base_algo not in BASE_ALGOS:
            raise OnnxPruneError(f"base_algo must be one of {', '.join(BASE_ALGOS)} (channel pruning: level pruning "
                                 f"changes neither MACs nor latency of a dense model), got {base_algo!r}")
        if resource not in RESOURCES:
            raise OnnxPruneError(f"resource must be one of {', '.join(RESOURCES)}, got {resource!r}")
        if dummy_input is None:
            raise OnnxPruneError("a search needs dummy_input to trace the channel groups and count MACs")
        self.base_algo, self.resource = base_algo, resource
        self.max_sparsity = checks.sparsity(max_sparsity, "max_sparsity")
        selected = resolve(model, config_list, (), WEIGHTED)
        values = {s for s in selected.values()}
        if len(values) != 1:
            raise OnnxPruneError("a search takes one overall sparsity (the fraction of the resource to remove); the "
                                 f"config list gives {sorted(values)}")
        self.sparsity = values.pop()
        self.groups = groups if groups is not None else dependency_groups(model, dummy_input)
        self.searched = [gi for gi, g in enumerate(self.groups)
                         if g.free and all(layer in selected for layer in g.layers)]
        if not self.searched:
            raise OnnxPruneError("the config list selects no channel group that may be pruned (all pinned or coupled "
                                 "with layers it leaves out)")
        self.layers = sorted({layer for gi in self.searched for layer in self.groups.groups[gi].layers})
        self.resources = Resources.of(model, dummy_input, self.groups)
        self.latency = LatencyCache(dummy_input, self.groups, latency_threads) if resource == "latency" else None

    # --- costs ----------------------------------------------------------------------------
    def counted(self, sparsities: dict[int, float]) -> dict[str, int]:
        macs, params = self.resources.at(sparsities)
        return {"macs": macs, "params": params}

    def counted_cost(self, sparsities: dict[int, float]) -> float:
        """The counted resource (macs or params) of a candidate: what bisections steer by."""
        return float(self.counted(sparsities)[self.resource])

    def cost(self, sparsities: dict[int, float], model) -> float:
        """The resource of `model` pruned (further) to `sparsities`: counted, or measured on the
        simplified model (latency, cached by architecture)."""
        if self.resource == "latency":
            return self.latency(self.masked(model, sparsities))
        return self.counted_cost(sparsities)

    def budget(self, model) -> float:
        """The most the result may cost: (1 − sparsity) × the dense model's resource."""
        return (1.0 - self.sparsity) * self.cost({}, model)

    def current(self, model) -> dict[int, float]:
        """The sparsity the model's masks already give each searched group (a search only adds to it)."""
        from .resources import pruned_channels

        done = pruned_channels(model, self.groups)
        return {gi: len(done.get(gi, ())) / self.size(gi) for gi in self.searched}

    # --- candidates -----------------------------------------------------------------------
    def label(self, gi: int) -> str:
        return group_label(self.groups.groups[gi].layers, " ")

    def size(self, gi: int) -> int:
        return self.groups.groups[gi].size

    def clip(self, sparsity: float, gi: int, floor: float = 0.0) -> float:
        """Within [floor, max_sparsity] and what the group's free channels allow."""
        g = self.groups.groups[gi]
        return float(max(min(sparsity, self.max_sparsity, len(g.free) / g.size), floor))

    def pruner(self, model):
        return base_pruner(self.base_algo, model, self.layers, self.groups)

    def masked(self, model, sparsities: dict[int, float]):
        """A copy of `model` with the base pruner's masks at `sparsities` (adding to its own)."""
        from .masks import deep_copy

        clone = deep_copy(model)
        self.pruner(clone).update_mask(sparsities=dict(sparsities))
        return clone

    def channels(self, sparsities: dict[int, float]) -> dict[int, int]:
        return {gi: self.groups.groups[gi].pruned_count(s) for gi, s in sparsities.items()}

    def named(self, sparsities: dict[int, float]) -> dict[str, float]:
        return {self.label(gi): round(float(s), 6) for gi, s in sorted(sparsities.items())}


def base_pruner(base_algo: str, model, layers: list[str], groups: DependencyGroups):
    """The base pruner on `model` with every searched layer selected (the sparsities come per call)."""
    return BASE_ALGOS[base_algo](model, [{"sparsity": 0.0, "op_names": layers}], groups=groups)


# --- evaluation ---------------------------------------------------------------------------

@dataclass
class Task:
    """Everything one candidate's evaluation needs; picklable."""
    key: str
    model: object                     # a copy, masks included
    space_groups: DependencyGroups
    layers: list[str]
    base_algo: str
    sparsities: dict[int, float]
    evaluator: object
    finetuner: object = None
    seed: int = 0
    threads: int = 1
    keep_state: bool = False


def seed_everything(seed: int) -> None:
    """torch, numpy and random seeded: a user's fine-tuner that shuffles does so the same everywhere."""
    import random

    import numpy as np
    import torch

    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def evaluate_task(task: Task) -> dict:
    """Prune the copy to the candidate's sparsities, fine-tune it (if asked), evaluate it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(task.threads)
    start = time.perf_counter()
    try:
        seed_everything(task.seed)
        model = task.model
        base_pruner(task.base_algo, model, task.layers, task.space_groups).update_mask(sparsities=dict(task.sparsities))
        if task.finetuner is not None:
            task.finetuner(model)
        metric = float(task.evaluator(model))
        state = state_of(model) if task.keep_state else None
    finally:
        torch.set_num_threads(before)
    return {"metric": metric, "seconds": time.perf_counter() - start, "state": state}


def state_of(model) -> dict:
    """A CPU copy of the state dict (masks included): what a log stores and a resumed search loads."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def task_seed(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:4], "little")


@dataclass
class Candidate:
    stage: str                        # where in the search (e.g. "iteration 3", "T=81.0 #2")
    sparsities: dict[int, float]

    @property
    def key(self) -> str:
        return json.dumps([self.stage, {str(k): round(float(v), 6) for k, v in sorted(self.sparsities.items())}])


class ExperimentLog:
    """JSON lines in `directory/<name>.jsonl`: a header with the search's arguments, then one
    record per evaluated candidate (its sparsities by group, metric, MACs, params, latency, time).
    Opening an existing log resumes it: records already there are reused, a truncated last line
    (an interrupted write) is dropped; a log written with other arguments is an error."""

    def __init__(self, directory, name: str, args: dict):
        self.records: dict[str, dict] = {}
        self.path = None
        if directory is None:
            return
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / f"{name}.jsonl"
        header = {"search": name, "args": args}
        if self.path.exists():
            lines = self.path.read_text().splitlines()
            first = _parse(lines[0]) if lines else None
            if first is not None and first.get("args") != json.loads(json.dumps(args, default=str)):
                raise OnnxPruneError(f"{self.path} holds a search run with other arguments ({first.get('args')}); "
                                     "resume with the same ones or give another experiment_data_dir")
            for line in lines[1:]:
                rec = _parse(line)
                if rec is not None and "key" in rec:
                    self.records[rec["key"]] = rec
            good = [ln for ln in lines if _parse(ln) is not None]
            if first is None:
                good = [json.dumps(header, default=str)]
            self.path.write_text("".join(ln + "\n" for ln in good))
        else:
            self._append(header)

    def _append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def state_path(self, key: str) -> Path:
        return self.dir / f"state-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"

    def get(self, key: str, keep_state: bool) -> dict | None:
        rec = self.records.get(key)
        if rec is None or not keep_state:
            return rec
        path = self.state_path(key)
        if not path.exists():
            return None
        import torch

        return rec | {"state": torch.load(path, map_location="cpu", weights_only=True)}

    def put(self, key: str, record: dict, state=None) -> None:
        self.records[key] = record
        if self.path is None:
            return
        if state is not None:
            import torch

            from ..files import Outputs

            with Outputs() as out:
                torch.save(state, out.path(self.state_path(key)))
        self._append(record)


def _parse(line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


@dataclass
class Evaluation:
    """Runs candidates (of one search) and keeps the best; `maximize` says which way is better."""
    space: SearchSpace
    evaluator: object
    finetuner: object = None
    executor: object = None
    log: ExperimentLog = None
    seed: int = 0
    threads: int | None = None
    maximize: bool = True
    progress: bool = True
    best: dict | None = None
    history: list[dict] = field(default_factory=list)

    def __post_init__(self):
        if self.threads is None:
            import torch

            self.threads = torch.get_num_threads()
        if self.log is None:
            self.log = ExperimentLog(None, "", {})
        refuse_forking_pool(self.executor)

    def better(self, a: float, b: float) -> bool:
        return a > b if self.maximize else a < b

    def best_index(self, records: list[dict]) -> int:
        """The record with the best metric (the first of equals)."""
        return max(range(len(records)), key=lambda i: (records[i]["metric"] if self.maximize else -records[i]["metric"], -i))

    def run(self, model, candidates: list[Candidate], keep_state: bool = False, desc: str = "candidates",
            extra=None) -> list[dict]:
        """Evaluate `candidates` on copies of `model`; results in candidate order. `extra(candidate)`
        adds fields measured here (e.g. latency) to each record."""
        from tqdm.auto import tqdm

        from .masks import deep_copy

        results: list[dict | None] = [self.log.get(c.key, keep_state) for c in candidates]
        todo = [i for i, r in enumerate(results) if r is None]
        tasks = {i: Task(candidates[i].key, deep_copy(model), self.space.groups, self.space.layers, self.space.base_algo,
                         candidates[i].sparsities, self.evaluator, self.finetuner, task_seed(self.seed, candidates[i].key),
                         self.threads, keep_state) for i in todo}
        bar = tqdm(total=len(candidates), desc=desc, disable=not self.progress, leave=False, initial=len(candidates) - len(todo))
        try:
            for i, out in self._map(tasks):
                c = candidates[i]
                record = {"key": c.key, "stage": c.stage, "sparsities": self.space.named(c.sparsities),
                          "channels": {self.space.label(gi): n for gi, n in sorted(self.space.channels(c.sparsities).items())},
                          **self.space.counted(c.sparsities), "metric": out["metric"], "seconds": round(out["seconds"], 3)}
                if extra is not None:
                    record.update(extra(c))
                self.log.put(c.key, record, out["state"])
                results[i] = record | {"state": out["state"]}
                bar.update(1)
                done = [r for r in results if r is not None]
                bar.set_postfix(best=f"{done[self.best_index(done)]['metric']:.4g}")
        finally:
            bar.close()
        for r in results:   # in candidate order, not completion order: the same best whatever the executor
            self._note(r)
        return results

    def _note(self, record: dict) -> None:
        if self.best is None or self.better(record["metric"], self.best["metric"]):
            self.best = {k: v for k, v in record.items() if k != "state"}

    def _map(self, tasks: dict[int, Task]):
        """(index, result) as they finish; serial without an executor."""
        if self.executor is None:
            for i, t in tasks.items():
                yield i, evaluate_task(t)
            return
        futures = {self.executor.submit(evaluate_task, t): i for i, t in tasks.items()}
        for f in _completed(futures):
            yield futures[f], f.result()


class SearchPruner:
    """What NNI's search pruners share: `compress()` runs the search and leaves the best candidate's
    masks on the model; `best` is its log record, `history` every record in order;
    `export_model` / `get_pruned_weights` as every pruner has them. Subclasses implement `search()`."""

    name = "search"
    counted_only = False   # True: steers by a resource counted for every candidate (not measured latency)

    def __init__(self, model, config_list, evaluator, dummy_input, *, base_algo: str = "l1", resource: str = "macs",
                 finetuner=None, optimize_mode: str = "maximize", experiment_data_dir=None, executor=None, seed: int = 0,
                 threads: int | None = None, max_sparsity: float = 0.9, progress: bool = True, latency_threads: int = 1,
                 args: dict | None = None):
        if self.counted_only and resource == "latency":
            raise OnnxPruneError(f"{type(self).__name__}: resource must be macs or params (it steers by a resource "
                                 f"counted for every candidate; NetAdaptPruner measures latency), got {resource!r}")
        if optimize_mode not in ("maximize", "minimize"):
            raise OnnxPruneError(f"optimize_mode must be maximize or minimize, got {optimize_mode!r}")
        if not callable(evaluator):
            raise OnnxPruneError(f"{type(self).__name__}: evaluator must be a callable evaluator(model) -> float")
        self.bound_model, self.config_list, self.dummy_input = model, config_list, dummy_input
        self.space = SearchSpace(model, config_list, dummy_input, base_algo, resource, max_sparsity=max_sparsity,
                                 latency_threads=latency_threads)
        self.seed = checks.seed(seed, "seed")
        logged = {"config_list": config_list, "base_algo": base_algo, "resource": resource, "seed": seed,
                  "max_sparsity": max_sparsity, "optimize_mode": optimize_mode, "latency_threads": latency_threads} | (args or {})
        self.log = ExperimentLog(experiment_data_dir, self.name, json.loads(json.dumps(logged, default=str)))
        self.evaluation = Evaluation(self.space, evaluator, finetuner, executor, self.log, self.seed, threads,
                                     optimize_mode == "maximize", progress)

    @property
    def best(self) -> dict | None:
        return self.evaluation.best

    def compress(self):
        """Search, leave the best candidate's masks on the model, and check it: `speedup` exports,
        simplifies (align 1) and proves the result equal to the model; `best["simplified_macs"]`
        is what that model costs (the counted MACs leave out border maps, see resources.py)."""
        from .speedup import speedup

        self.search()
        _, self.speedup_report = speedup(self.bound_model, self.dummy_input, exporter="torchscript", batches=1, align=1)
        if self.best is not None:
            self.best["simplified_macs"] = self.speedup_report.simplify.after.macs
        return self.bound_model

    def search(self) -> None:
        raise NotImplementedError

    def apply(self, sparsities: dict[int, float], state=None) -> None:
        """Put a candidate on the model: the base pruner's masks at `sparsities` (the same masks the
        candidate's evaluation made), then its fine-tuned weights if given."""
        self.space.pruner(self.bound_model).update_mask(sparsities=dict(sparsities))
        if state is not None:
            self.bound_model.load_state_dict(state)

    def get_pruned_weights(self) -> dict[str, float]:
        return self.space.pruner(self.bound_model).get_pruned_weights()

    def export_model(self, *args, **kwargs) -> None:
        pruner = self.space.pruner(self.bound_model)
        pruner.dummy_input = self.dummy_input
        pruner.export_model(*args, **kwargs)


def refuse_forking_pool(executor) -> None:
    """A process pool that forks hangs its workers once torch's thread pool has run in this process
    (every search has: the groups are traced first) — measured here, a plain conv deadlocks."""
    from concurrent.futures import ProcessPoolExecutor

    context = getattr(executor, "_mp_context", None)
    if isinstance(executor, ProcessPoolExecutor) and context is not None and context.get_start_method() == "fork":
        raise OnnxPruneError("a ProcessPoolExecutor that forks deadlocks in torch's thread pool: use "
                             "ProcessPoolExecutor(mp_context=multiprocessing.get_context('spawn'))")


def _completed(futures: dict):
    """concurrent.futures' as_completed, or Dask's for the futures of a distributed.Client (they
    are not concurrent.futures.Future objects; those of client.get_executor() are)."""
    from concurrent.futures import Future, as_completed

    if all(isinstance(f, Future) for f in futures):
        return as_completed(futures)
    from distributed import as_completed as dask_completed

    return dask_completed(list(futures))


__all__ = ["SearchPruner", "SearchSpace", "Candidate", "Evaluation", "ExperimentLog", "Task", "evaluate_task", "BASE_ALGOS", "RESOURCES"]
