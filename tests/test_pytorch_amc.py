"""AMCPruner (onnxprune.pytorch.amc): the resource-constrained action clipping against hand-counted
MACs, then DDPG searches on a tiny CNN — every episode inside the MAC budget (logged, re-counted
from the masks by hand, and the best one simplified), pinned channels never pruned, the same seed
giving the same episodes, and a resumed run replaying an interrupted one.

The CNN is built so that the analytic MAC count is exact: the only zero-padded conv reads the
image, so no pruned channel's constant meets a padded border (which would need a border map, a
little extra cost, see resources.py) and the simplified model costs exactly the counted MACs."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from onnxprune.errors import OnnxPruneError
from onnxprune.pytorch import speedup
from onnxprune.pytorch.amc import AMCPruner, amc_config, amc_reward, clip_preserve, truncated_normal

from .search_models import OutputMatch

# --- the clipping rule, by hand ----------------------------------------------------------------
# A toy: Linear 4 -> 8 -> 8 -> 2 at batch 1. Keeping k0 of fc1's and k1 of fc2's channels costs
# 4·k0 + k0·k1 + 2·k1 MACs (dense: 32 + 64 + 16 = 112).


def mlp_macs(k0: int, k1: int) -> int:
    return 4 * k0 + k0 * k1 + 2 * k1


def kept(a: float, size: int = 8) -> int:
    return math.ceil(a * size - 1e-9)


def test_clip_preserve_by_hand():
    """fc1 keeps 4 channels, fc2's action is clipped at budget 56: 16 + 6·k1 ≤ 56 allows k1 ≤ 6
    (AMC's continuous formula would allow (56 − 16) / 48 = 0.83, but 7 channels cost 58)."""
    def cost(a):
        return mlp_macs(4, kept(a))

    assert clip_preserve(1.0, cost, 56, 8, 0.25, 1.0) == 0.75
    assert clip_preserve(0.8, cost, 56, 8, 0.25, 1.0) == 0.75     # ⌈6.4⌉ = 7 channels: over
    assert clip_preserve(0.6, cost, 56, 8, 0.25, 1.0) == 0.6      # 5 channels, 46 MACs: kept as asked
    assert clip_preserve(0.1, cost, 56, 8, 0.25, 1.0) == 0.25     # raised to lbound
    assert clip_preserve(1.0, cost, 56, 8, 0.25, 0.5) == 0.5      # rbound
    assert clip_preserve(1.0, cost, 28, 8, 0.25, 1.0) == 0.25     # 16 + 12 = 28: the budget exactly
    assert clip_preserve(1.0, cost, 20, 8, 0.25, 1.0) == 0.25     # infeasible: lbound (refused up front)


class Constant:
    def __call__(self, model):
        return 0.5


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


def mlp_pruner(flops_ratio):
    return AMCPruner(mlp(), [{"op_types": ["Linear"]}], Constant(), dummy_input=torch.randn(1, 4), flops_ratio=flops_ratio,
                     lbound=0.25, warmup=1, train_episode=1, hidden1=4, hidden2=4, progress=False)


def test_environment_clips_each_step_so_the_episode_meets_the_budget():
    """On the MLP (fc2 at lbound 0.25 keeps 2 channels while fc1 is decided), by hand."""
    half = mlp_pruner(0.5)
    env = half.env
    assert half.space.resources.dense_macs == 112 and env.budget == 56 and env.order == [0, 1]
    cases = [((1.0, 1.0), (1.0, 0.25)),    # 6·k0 + 4 ≤ 56 lets fc1 keep all; then 32 + 10·k1 ≤ 56: k1 = 2
             ((0.5, 1.0), (0.5, 0.75)),    # 16 + 6·k1 ≤ 56: k1 = 6
             ((0.5, 0.6), (0.5, 0.6))]
    for asked, taken in cases:
        env.reset()
        assert tuple(env.step(a)[0] for a in asked) == taken
        assert env.cost(env.sparsities) == mlp_macs(kept(taken[0]), kept(taken[1])) <= 56
    env = mlp_pruner(0.25).env           # budget 28: 6·k0 + 4 ≤ 28 → k0 = 4, then 16 + 6·k1 ≤ 28 → k1 = 2
    env.reset()
    assert [env.step(1.0)[0], env.step(1.0)[0]] == [0.5, 0.25]
    assert env.cost(env.sparsities) == 28

    # the states: AMC's features, each in [0, 1]; the index runs 0 → 1, the previous action is the last taken
    env.reset()
    first = env.state()
    second = env.step(0.9)[1]
    assert first.shape == (env.states,) and ((0 <= first) & (first <= 1)).all() and ((0 <= second) & (second <= 1)).all()
    assert (first[0], second[0], first[-1], second[-1]) == (0.0, 1.0, 1.0, pytest.approx(0.5))


def test_infeasible_budget_and_bad_arguments_are_refused():
    with pytest.raises(OnnxPruneError, match="flops_ratio 0.1 cannot be met"):
        mlp_pruner(0.1)                       # both groups at lbound: 8 + 4 + 4 = 16 > 11.2
    with pytest.raises(OnnxPruneError, match="resource must be macs or params"):
        AMCPruner(mlp(), [{"op_types": ["Linear"]}], Constant(), dummy_input=torch.randn(1, 4), resource="latency")
    with pytest.raises(OnnxPruneError, match="leave the sparsity out"):
        amc_config([{"sparsity": 0.3, "op_types": ["Linear"]}], 0.5)
    with pytest.raises(OnnxPruneError, match="lbound"):
        AMCPruner(mlp(), [{"op_types": ["Linear"]}], Constant(), dummy_input=torch.randn(1, 4), lbound=0.0)
    assert amc_config([{"op_types": ["Conv2d"]}, {"exclude": True, "op_names": ["fc"]}, {"sparsity": 0.6, "op_names": ["c"]}],
                      0.4) == [{"op_types": ["Conv2d"], "sparsity": 0.6}, {"exclude": True, "op_names": ["fc"]},
                               {"sparsity": 0.6, "op_names": ["c"]}]


def test_rewards_and_noise():
    assert amc_reward("acc_reward", 0.75, 1000) == 0.75
    assert amc_reward("acc_flops_reward", 0.75, 1000) == pytest.approx(-0.25 * math.log(1000))
    draws = [truncated_normal(np.random.default_rng(3), 0.9, 0.5, 0.2, 1.0) for _ in range(2)]
    assert draws[0] == draws[1]
    rng = np.random.default_rng(0)
    samples = [truncated_normal(rng, 0.95, 0.5, 0.2, 1.0) for _ in range(200)]
    assert min(samples) >= 0.2 and max(samples) <= 1.0 and len(set(samples)) == 200


# --- searches on a tiny CNN ---------------------------------------------------------------------

class Net(nn.Module):
    """conv1 (pads the image only) → conv2 → conv3 + short (a residual add couples them) → conv4 →
    fc; a probe output a[:, :3] pins conv1's first three channels."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 12, 3), nn.BatchNorm2d(12)
        self.conv3, self.bn3 = nn.Conv2d(12, 16, 1), nn.BatchNorm2d(16)
        self.short, self.bns = nn.Conv2d(12, 16, 1), nn.BatchNorm2d(16)
        self.conv4, self.bn4 = nn.Conv2d(16, 16, 3, stride=2), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        a = torch.relu(self.bn1(self.conv1(x)))
        b = torch.relu(self.bn2(self.conv2(a)))
        c = torch.relu(self.bn3(self.conv3(b)) + self.bns(self.short(b)))
        d = torch.relu(self.bn4(self.conv4(c)))
        return self.fc(d.mean((2, 3))), a[:, :3]


PINNED = 3


def net() -> Net:
    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():
        model.conv1.weight[:PINNED] *= 0.01      # the smallest L1 norms: L1 would take them first were they free
        for bn in (model.bn1, model.bn2, model.bn3, model.bns, model.bn4):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 1.5)
    return model


def hand_macs(model) -> int:
    """The CNN's MACs from its masks, by its wiring (8×8 input: conv1 at 8×8, conv2/3/short at 6×6,
    conv4 at 2×2): each layer keeps the rows its mask leaves and the columns of its kept inputs."""
    def rows(name):
        mask = dict(model.named_buffers()).get(f"{name}.weight_mask")
        return model.get_submodule(name).weight.shape[0] if mask is None else int((mask.flatten(1) != 0).any(1).sum())

    k1, k2, k3, k4 = rows("conv1"), rows("conv2"), rows("conv3"), rows("conv4")
    assert rows("short") == k3
    return 9 * 3 * k1 * 64 + 9 * k1 * k2 * 36 + 2 * k2 * k3 * 36 + 9 * k3 * k4 * 4 + 10 * k4


class LoaderMatch:
    """NNI's AMC signature, evaluator(val_loader, model): minus the output MSE over the loader."""

    def __call__(self, val_loader, model) -> float:
        with torch.no_grad():
            return -float(sum((model(x)[0] - y).pow(2).mean() for x, y in val_loader))


X = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))
FLOPS_RATIO = 0.3          # tight: random preserve ratios in [0.2, 1] would keep about 0.36 of the MACs
SMALL = {"warmup": 3, "train_episode": 8, "hidden1": 16, "hidden2": 16, "bsize": 8, "rmsize": 20, "progress": False}


def search(evaluator=None, seed=0, directory=None, **kwargs):
    pruner = AMCPruner(net(), [{"op_types": ["Conv2d"]}], evaluator or OutputMatch(net(), n=16), dummy_input=X,
                       flops_ratio=FLOPS_RATIO, seed=seed, experiment_data_dir=directory, **(SMALL | kwargs))
    pruner.compress()
    return pruner


def records(pruner) -> list[dict]:
    return list(pruner.log.records.values())


def same(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "seconds"}       # the evaluation's wall time


@pytest.fixture(scope="module")
def run():
    return search()


def test_every_episode_stays_within_the_budget(run):
    """Logged and re-counted by hand from each episode's masks on a fresh copy; the clipping had to
    act (some action lowered) for this to say anything."""
    budget = FLOPS_RATIO * run.space.resources.dense_macs
    assert run.env.budget == pytest.approx(budget) and len(run.episodes) == 8 == len(records(run))
    assert any(t < p - 1e-12 for (taken, _, _), asked in zip(run.episodes, run.proposals) for t, p in zip(taken, asked))
    by_label = {run.space.label(gi): gi for gi in run.space.searched}
    for (actions, reward, macs), record in zip(run.episodes, records(run)):
        assert len(actions) == len(run.space.searched) and all(0.2 <= a <= 1.0 for a in actions)
        assert macs == record["macs"] <= budget and reward == record["metric"]
        copy = run.space.masked(net(), {by_label[lb]: n / run.space.size(by_label[lb]) for lb, n in record["channels"].items()})
        assert hand_macs(copy) == macs
    assert run.best["reward"] == max(r for _, r, _ in run.episodes)


def test_pinned_channels_are_never_pruned(run):
    pruned_conv1 = [r["channels"]["conv1"] for r in records(run)]
    assert max(pruned_conv1) > 0, "no episode pruned conv1: the check below would say nothing"
    assert max(pruned_conv1) <= 8 - PINNED
    mask = dict(run.bound_model.named_buffers()).get("conv1.weight_mask", torch.ones(8, 27)).flatten(1)
    assert mask[:PINNED].all()
    assert int((mask == 0).all(1).sum()) == run.best["channels"]["conv1"]


def test_speedup_of_the_result_is_exact_and_within_the_budget(run):
    """speedup raises unless the simplified model matches the masked PyTorch model; the CNN has no
    border maps, so the simplified model costs exactly the counted MACs."""
    _, report = speedup(run.bound_model, X, exporter="torchscript", align=1)
    assert report.torch_parity.passed
    assert report.simplify.after.macs == run.best["macs"] == hand_macs(run.bound_model) <= run.env.budget


def test_same_seed_same_episodes_and_best_another_seed_still_in_budget(run):
    again = search()
    assert again.episodes == run.episodes and same(again.best) == same(run.best)
    assert [same(r) for r in records(again)] == [same(r) for r in records(run)]
    # another seed, NNI's evaluator(val_loader, model) with the loader's first batch as dummy_input, AMC's FLOPs reward
    teacher = OutputMatch(net(), n=16)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(teacher.x, teacher.ref), batch_size=8)
    other = AMCPruner(net(), [{"op_types": ["Conv2d"]}], LoaderMatch(), loader, flops_ratio=FLOPS_RATIO, seed=1,
                      reward="acc_flops_reward", **SMALL)
    pickle.dumps(other.evaluation.evaluator)   # travels to executors
    other.compress()
    assert other.episodes != run.episodes and len(other.episodes) == 8
    for actions, reward, macs in other.episodes:
        assert macs <= other.env.budget
    metric = {r["macs"]: r["metric"] for r in records(other)}
    assert all(reward == pytest.approx(-(1 - metric[macs]) * math.log(macs)) for _, reward, macs in other.episodes)


def test_resume_after_an_interruption_replays_the_same_search(run, tmp_path):
    """Interrupted after 5 evaluations (the 3 warmup episodes and 2 of the agent's), the rerun with
    the same directory evaluates only the 3 missing episodes and ends where the uninterrupted run did."""
    with pytest.raises(KeyboardInterrupt):
        search(OutputMatch(net(), n=16, fail_after=5), directory=tmp_path)
    assert len((tmp_path / "amc.jsonl").read_text().splitlines()) == 1 + 5   # the header and the 5 records
    evaluator = OutputMatch(net(), n=16)
    resumed = search(evaluator, directory=tmp_path)
    assert evaluator.calls == 8 - 5
    assert resumed.episodes == run.episodes and same(resumed.best) == same(run.best)
