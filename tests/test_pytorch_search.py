"""Sparsity searches (Sensitivity, NetAdapt, Simulated Annealing, AutoCompress): the MAC count they
steer by against simplify's, each search inside its budget and never touching a pinned channel,
the same result through every executor, and resume after an interruption."""

from __future__ import annotations

import copy
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
import torch

import onnxprune.pytorch as op
from onnxprune import OnnxPruneError
from onnxprune.channels.linear import border_convs
from onnxprune.models import build, example_input
from onnxprune.pytorch.annealing import by_size, rescale
from onnxprune.pytorch.netadapt import fewest_channels
from onnxprune.pytorch.resources import Resources, pruned_channels
from onnxprune.pytorch.search import Candidate, Evaluation, ExperimentLog, SearchSpace

from .search_models import OutputMatch, ShortFinetune, admm_trainer, tiny_net

X = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
CONFIG = [{"sparsity": 0.5, "op_types": ["Conv2d"]}]


def quiet(**kw):
    return {"progress": False} | kw


# --- the count ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mobilenet_v2", "resnext", "regnet"])
def test_counted_macs_equal_those_of_the_simplified_model(name):
    """Models where every pruned channel goes alone and no constant meets zero padding before a
    full conv: the count is exact (resources.py says where it is not)."""
    model, x = build(name).eval(), example_input(name)
    groups = op.dependency_groups(model, x)
    resources = Resources.of(model, x, groups)
    rng = np.random.default_rng(0)
    pruner = op.L1FilterPruner(model, [{"sparsity": 0.5, "op_types": ["Conv2d", "Linear"]}], groups=groups)
    pruner.update_mask(sparsities={gi: float(rng.uniform(0, 0.8)) for gi in range(len(groups))})
    _, report = op.speedup(model, x, exporter="torchscript", batches=1, align=1)
    assert resources.dense_macs == report.simplify.before.macs
    assert resources.of_model(model)[0] == report.simplify.after.macs < report.simplify.before.macs


@pytest.mark.parametrize("name", ["resnet18", "googlenet"])
def test_counted_macs_include_border_maps_so_a_budget_is_never_undercounted(name):
    """Pruned constants meeting zero-padded convs: simplify adds border maps; the count includes
    one per such conv (an upper bound: a constant that is 0 needs none)."""
    model, x = build(name).eval(), example_input(name)
    groups = op.dependency_groups(model, x)
    rng = np.random.default_rng(1)
    pruner = op.L1FilterPruner(model, [{"sparsity": 0.5, "op_types": ["Conv2d", "Linear"]}], groups=groups)
    pruner.update_mask(sparsities={gi: float(rng.uniform(0.1, 0.8)) for gi in range(len(groups))})
    small, report = op.speedup(model, x, exporter="torchscript", batches=1, align=1)
    assert border_convs(small)                                  # the case this is about
    counted = Resources.of(model, x, groups).of_model(model)[0]
    assert report.simplify.after.macs <= counted <= 1.05 * report.simplify.after.macs


def test_fewest_channels_bisects_to_the_smallest_count_meeting_the_target():
    costs = {n: 100 - 7 * n for n in range(0, 11)}
    seen = []

    def cost(n):
        seen.append(n)
        return costs[n]

    assert fewest_channels(cost, 10, 2, 10, 60) == 6           # 100 - 42 = 58 <= 60 < 65
    assert len(seen) <= 1 + int(np.ceil(np.log2(8)))
    assert fewest_channels(cost, 10, 2, 10, 20) is None         # even 10 channels cost 30
    assert fewest_channels(cost, 10, 10, 10, 99) is None        # nothing left to prune


def test_by_size_gives_the_largest_value_to_the_largest_group():
    assert by_size(np.array([0.1, 0.9, 0.5]), np.array([30.0, 10.0, 20.0])).tolist() == [0.9, 0.1, 0.5]


def test_rescale_finds_the_smallest_scale_that_meets_the_budget():
    cost = lambda s: 100 * (1 - s[0]) + 50 * (1 - s[1])  # noqa: E731
    clip = lambda v, gi: min(v, 0.9)  # noqa: E731
    got = rescale(cost, {0: 0.4, 1: 0.2}, clip, 100.0)
    assert cost(got) <= 100.0 < cost({0: got[0] * 0.999, 1: got[1] * 0.999})
    assert got[0] == pytest.approx(2 * got[1])                  # the proportions are kept
    assert rescale(cost, {0: 0.4, 1: 0.2}, clip, 10.0) is None  # 90% of each is not enough


# --- the searches ------------------------------------------------------------------------

def assert_within_budget_and_pinned_untouched(pruner, dense_model):
    model = pruner.bound_model
    space = pruner.space
    groups = space.groups
    resources = Resources.of(dense_model, X, groups)
    macs = resources.of_model(model)[0]
    assert macs <= 0.5 * resources.dense_macs
    masks = op.current_masks(model)
    for gi, channels in pruned_channels(model, groups).items():
        assert gi in space.searched
        assert all(not groups.groups[gi].channels[ci].pinned for ci in channels)
    pinned_rows = [(s.name, s.axis, i) for g in groups for ch in g.channels if ch.pinned for s in ch.producers
                   for i in s.indices]
    assert pinned_rows                                           # the model has pinned channels to check
    for name, axis, i in pinned_rows:
        if name in masks:
            assert masks[name].select(axis, i).all(), f"{name} row {i} of a pinned channel was pruned"
    # what compress checked: the simplified model equals the PyTorch one (speedup raises otherwise)
    assert pruner.speedup_report.torch_parity.passed
    assert pruner.best["simplified_macs"] == pruner.speedup_report.simplify.after.macs


def searches(evaluator, finetune):
    return {
        "sensitivity": lambda m: op.SensitivityPruner(m, CONFIG, evaluator, finetuner=finetune, dummy_input=X,
                                                      sparsity_per_iteration=0.25, sparsities=(0.2, 0.5, 0.8), **quiet()),
        "netadapt": lambda m: op.NetAdaptPruner(m, CONFIG, finetune, evaluator, dummy_input=X, sparsity_per_iteration=0.15,
                                                **quiet()),
        "annealing": lambda m: op.SimulatedAnnealingPruner(m, CONFIG, evaluator, dummy_input=X, cool_down_rate=0.6,
                                                           candidates_per_temperature=2, **quiet()),
        "autocompress": lambda m: op.AutoCompressPruner(m, CONFIG, admm_trainer, evaluator, X, num_iterations=2,
                                                        admm_num_iterations=1, admm_epochs_per_iteration=1,
                                                        cool_down_rate=0.5, **quiet()),
    }


@pytest.mark.parametrize("search", ["sensitivity", "netadapt", "annealing", "autocompress"])
def test_search_ends_inside_the_budget_and_never_prunes_a_pinned_channel(search):
    dense = tiny_net()
    evaluator = OutputMatch(dense)
    finetune = ShortFinetune(evaluator.x, evaluator.ref)
    model = copy.deepcopy(dense)
    pruner = searches(evaluator, finetune)[search](model)
    pruner.compress()
    assert_within_budget_and_pinned_untouched(pruner, dense)
    if search in ("annealing",):          # no fine-tuning: the best record's metric is the model's
        assert evaluator(model) == pytest.approx(pruner.best["metric"], rel=1e-6, abs=1e-9)


def test_netadapt_sheds_one_step_per_iteration_and_keeps_the_best_candidate():
    dense = tiny_net()
    evaluator = OutputMatch(dense)
    pruner = op.NetAdaptPruner(copy.deepcopy(dense), CONFIG, None, evaluator, dummy_input=X, sparsity_per_iteration=0.1,
                               **quiet())
    pruner.compress()
    dense_macs = pruner.space.counted({})["macs"]
    costs = [dense_macs] + [it["cost"] for it in pruner.iterations]
    budget = 0.5 * dense_macs
    for before, after in zip(costs, costs[1:]):
        assert after <= max(before - 0.1 * dense_macs, budget)  # a full step each time, or the budget
    assert costs[-1] <= budget < costs[-2]
    # each iteration kept its best candidate: no other logged candidate of that iteration scored higher
    by_stage = {}
    for rec in pruner.log.records.values():
        by_stage.setdefault(rec["stage"].split(":")[0], []).append(rec["metric"])
    for it in pruner.iterations:
        assert it["metric"] == max(by_stage[it["stage"].split(":")[0]])


def test_netadapt_halves_a_step_no_group_can_shed_alone():
    """c4 and c5 only, 12 % of the MACs in one step: neither group holds that much alone; the
    search halves the step and still reaches the budget (both groups pruned)."""
    dense = tiny_net()
    config = [{"sparsity": 0.12, "op_names": ["c4", "c5"]}]
    pruner = op.NetAdaptPruner(copy.deepcopy(dense), config, None, OutputMatch(dense), dummy_input=X,
                               sparsity_per_iteration=0.12, **quiet())
    space = pruner.space
    dense_macs = space.counted({})["macs"]
    alone = [space.counted({gi: space.clip(1.0, gi)})["macs"] for gi in space.searched]
    assert min(alone) > 0.88 * dense_macs                       # the premise: no group sheds 12 % alone
    pruner.compress()
    assert pruner.iterations[-1]["cost"] <= 0.88 * dense_macs
    assert all(n > 0 for n in pruner.iterations[-1]["channels"].values())


def test_sensitivity_rows_equal_an_independent_prune_of_each_group(tmp_path):
    dense = tiny_net()
    evaluator = OutputMatch(dense)
    rows, baseline = op.sensitivity_analysis(dense, evaluator, X, sparsities=(0.25, 0.5), progress=False,
                                             csv=tmp_path / "s.csv", plot=tmp_path / "s.png")
    assert baseline == 0.0                                     # the dense model matches itself
    groups = op.dependency_groups(dense, X)
    expected = 0
    for g in groups:
        if not g.free:
            continue
        for s in (0.25, 0.5):
            s_eff = min(s, len(g.free) / g.size)
            expected += 1
            row = next(r for r in rows if r.layers == g.layers and r.sparsity == pytest.approx(s_eff))
            model = copy.deepcopy(dense)
            op.L1FilterPruner(model, [{"sparsity": s_eff, "op_names": g.layers}], dummy_input=X).compress()
            assert row.metric == pytest.approx(evaluator(model), rel=1e-6, abs=1e-12)
    assert len(rows) == expected
    assert len((tmp_path / "s.csv").read_text().strip().splitlines()) == expected + 1
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_netadapt_with_measured_latency_logs_the_latency_of_every_candidate(tmp_path):
    dense = tiny_net()
    x = torch.randn(1, 3, 32, 32)
    evaluator = OutputMatch(dense)
    pruner = op.NetAdaptPruner(copy.deepcopy(dense), [{"sparsity": 0.3, "op_types": ["Conv2d"]}], None, evaluator,
                               dummy_input=x, resource="latency", sparsity_per_iteration=0.15,
                               experiment_data_dir=tmp_path, **quiet())
    pruner.compress()
    lines = [json.loads(ln) for ln in (tmp_path / "netadapt.jsonl").read_text().splitlines()]
    assert lines[0]["args"]["resource"] == "latency"
    records = lines[1:]
    assert records and all(r["latency_ms"] > 0 and {"macs", "params", "metric", "sparsities"} <= set(r) for r in records)
    # the search stops once its own measurement of the model meets the budget
    measured = pruner.space.latency.measured
    assert pruner.iterations[-1]["cost"] <= 0.7 * measured[tuple(g.size for g in pruner.space.groups)] * (1 + 1e-9)


# --- executors ---------------------------------------------------------------------------

def annealing_history(executor):
    dense = tiny_net()
    pruner = op.SimulatedAnnealingPruner(copy.deepcopy(dense), CONFIG, OutputMatch(dense), dummy_input=X,
                                         cool_down_rate=0.6, candidates_per_temperature=3, executor=executor, seed=3,
                                         threads=1, **quiet())
    pruner.search()
    records = sorted(pruner.log.records.values(), key=lambda r: r["key"])
    return [(r["key"], r["metric"], r["macs"]) for r in records], pruner.best["key"]


def test_every_executor_gives_the_same_search():
    serial = annealing_history(None)
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        assert annealing_history(pool) == serial
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=None,
                                  processes=True) as cluster, distributed.Client(cluster, timeout=60) as client:
        assert annealing_history(client) == serial
        assert annealing_history(client.get_executor()) == serial
    assert len(serial[0]) > 3


def test_a_forking_process_pool_is_refused_before_it_hangs():
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
        with pytest.raises(OnnxPruneError, match="spawn"):
            op.SimulatedAnnealingPruner(tiny_net(), CONFIG, OutputMatch(tiny_net()), dummy_input=X, executor=pool)


# --- resume --------------------------------------------------------------------------------

def test_an_interrupted_search_resumes_from_its_log(tmp_path):
    dense = tiny_net()

    def run(directory, evaluator):
        finetune = ShortFinetune(evaluator.x, evaluator.ref)
        pruner = op.NetAdaptPruner(copy.deepcopy(dense), CONFIG, finetune, evaluator, dummy_input=X,
                                   sparsity_per_iteration=0.1, experiment_data_dir=directory, **quiet())
        pruner.compress()
        return pruner

    whole = run(tmp_path / "whole", OutputMatch(dense))
    total = len(whole.log.records)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", OutputMatch(dense, fail_after=total // 2))
    with open(tmp_path / "cut" / "netadapt.jsonl", "a") as f:
        f.write('{"key": "half a line')                       # a write cut short
    resumed_evaluator = OutputMatch(dense)
    resumed = run(tmp_path / "cut", resumed_evaluator)
    assert resumed_evaluator.calls == total - total // 2        # only what the first run did not finish
    assert [it["metric"] for it in resumed.iterations] == [it["metric"] for it in whole.iterations]
    assert [it["sparsities"] for it in resumed.iterations] == [it["sparsities"] for it in whole.iterations]
    for k, v in whole.bound_model.state_dict().items():
        assert torch.equal(v, resumed.bound_model.state_dict()[k]), k


def test_a_log_of_other_arguments_is_not_resumed(tmp_path):
    ExperimentLog(tmp_path, "netadapt", {"a": 1})
    with pytest.raises(OnnxPruneError, match="other arguments"):
        ExperimentLog(tmp_path, "netadapt", {"a": 2})


def test_evaluation_records_what_each_candidate_costs():
    dense = tiny_net()
    space = SearchSpace(dense, CONFIG, X)
    out = Evaluation(space, OutputMatch(dense), progress=False).run(dense, [Candidate("a", {gi: 0.5 for gi in space.searched})])
    masked = space.masked(dense, {gi: 0.5 for gi in space.searched})
    assert out[0]["macs"] == Resources.of(dense, X, space.groups).of_model(masked)[0]
    assert out[0]["metric"] == pytest.approx(OutputMatch(dense)(masked), rel=1e-6)
    assert not op.current_masks(dense)                          # the candidate ran on a copy


@pytest.mark.parametrize("kwargs, word", [({"base_algo": "level"}, "base_algo"), ({"resource": "flops"}, "resource")])
def test_bad_search_arguments_are_named(kwargs, word):
    with pytest.raises(OnnxPruneError, match=word):
        op.NetAdaptPruner(tiny_net(), CONFIG, None, OutputMatch(tiny_net()), dummy_input=X, **kwargs)


def test_a_config_with_two_sparsities_is_refused():
    config = [{"sparsity": 0.5, "op_names": ["c1", "c3"]}, {"sparsity": 0.3, "op_names": ["c4"]}]
    with pytest.raises(OnnxPruneError, match="one overall sparsity"):
        op.SimulatedAnnealingPruner(tiny_net(), config, OutputMatch(tiny_net()), dummy_input=X)
