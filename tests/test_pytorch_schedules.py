"""Pruning schedules on PyTorch modules (onnxprune.pytorch.schedules): AGP's cubic ramp against
hand-computed values, and the masks it makes while a model trains."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from onnxprune.errors import OnnxPruneError
from onnxprune.pytorch import AGPPruner, agp_sparsity, speedup

from .zoo_util import layer_weight_count


@pytest.mark.parametrize("epoch,frequency,expected", [
    (0, 1, 0.0),
    (3, 1, 0.8 - 0.8 * (1 - 3 / 9) ** 3),   # span (10 - 0 - 1) // 1 · 1 = 9
    (9, 1, 0.8), (12, 1, 0.8),
    (3, 2, 0.8 - 0.8 * (1 - 2 / 8) ** 3),   # span (9 // 2) · 2 = 8; epoch 3 keeps epoch 2's sparsity
    (8, 2, 0.8),
])
def test_agp_cubic_schedule_by_hand(epoch, frequency, expected):
    assert agp_sparsity(epoch, 0.0, 0.8, start_epoch=0, end_epoch=10, frequency=frequency) == pytest.approx(expected, abs=1e-12)


def test_agp_before_start_and_degenerate_spans():
    assert agp_sparsity(1, 0.1, 0.5, start_epoch=2, end_epoch=6) == 0.0
    assert agp_sparsity(2, 0.1, 0.5, start_epoch=2, end_epoch=6) == pytest.approx(0.1)
    assert agp_sparsity(0, 0.0, 0.5, start_epoch=3, end_epoch=3) == 0.5   # end <= start: the final sparsity
    assert agp_sparsity(0, 0.6, 0.5, start_epoch=0, end_epoch=5) == 0.5   # initial >= final


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def train_epoch(model, optimizer, steps=3):
    for _ in range(steps):
        x = torch.randn(4, 8)
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_agp_level_masks_follow_the_schedule_through_optimizer_steps():
    """Level pruning at final 0.75 over epochs 0..4: after each epoch's steps the fraction of masked
    weights of every pruned layer is round(s_t · size) / size, and what was masked stays masked."""
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    config = [{"initial_sparsity": 0.0, "final_sparsity": 0.75, "start_epoch": 0, "end_epoch": 5,
               "frequency": 1, "op_types": ["Linear"]}]
    pruner = AGPPruner(model, config, optimizer, pruning_algorithm="level")
    pruner.compress()
    previous = None
    for epoch in range(6):
        pruner.update_epoch(epoch)
        train_epoch(model, optimizer)
        target = agp_sparsity(epoch, 0.0, 0.75, 0, 5, 1)
        masks = {n: b for n, b in model.named_buffers() if n.endswith("weight_mask")}
        assert len(masks) == 3
        for name, m in masks.items():
            assert (~m.bool()).sum().item() == round(target * m.numel()), (epoch, name)
        if previous is not None:
            for name, m in masks.items():
                assert not (m.bool() & ~previous[name]).any()  # nothing masked comes back
        previous = {n: m.bool().clone() for n, m in masks.items()}


def test_agp_l1_filters_then_speedup_removes_them():
    """AGP over L1 filter pruning on the hidden layers: at the end half of each hidden layer's
    filters are masked, and speedup removes them (parity with the masked PyTorch model)."""
    model = mlp(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(2, 8)
    config = [{"final_sparsity": 0.5, "start_epoch": 0, "end_epoch": 4, "op_names": ["0", "2"]}]
    pruner = AGPPruner(model, config, optimizer, pruning_algorithm="l1", dummy_input=x)
    pruner.compress()
    for epoch in range(5):
        pruner.update_epoch(epoch)
        train_epoch(model, optimizer)
    assert [r.pruned for r in pruner.summary.rows if r.asked is not None] == [8, 8]
    small, report = speedup(model.eval(), x, align=1)
    assert report.torch_parity.passed
    assert layer_weight_count(small) == 8 * 8 + 8 * 8 + 8 * 4  # the MLP with 8-wide hidden layers


def test_agp_refuses_unknown_algorithms():
    model = mlp()
    with pytest.raises(OnnxPruneError, match="pruning_algorithm"):
        AGPPruner(model, [{"sparsity": 0.5, "op_types": ["Linear"]}], torch.optim.SGD(model.parameters(), lr=0.1),
                  pruning_algorithm="magic")


def test_lottery_ticket_rounds_prune_the_survivors_and_reset_to_theta0_bit_exactly():
    """P = 0.8 over n = 3 rounds: round k masks round((1 − 0.2^(k/3)) · size) weights of every layer
    (each round 1 − 0.2^(1/3) of the survivors), never reviving one; after each round's start the
    surviving weights, the biases, the optimizer's momentum and the lr schedule are those at
    construction, bit for bit."""
    from onnxprune.pytorch import LotteryTicketPruner, lottery_sparsity

    assert lottery_sparsity(1, 0.8, 3) == pytest.approx(1 - 0.2 ** (1 / 3))
    assert lottery_sparsity(3, 0.8, 3) == pytest.approx(0.8)
    model = mlp(2)
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    pruner = LotteryTicketPruner(model, [{"prune_iterations": 3, "sparsity": 0.8, "op_types": ["Linear"]}],
                                 optimizer, scheduler)
    pruner.compress()
    assert list(pruner.get_prune_iterations()) == [0, 1, 2, 3]
    previous = None
    for k in pruner.get_prune_iterations():
        pruner.prune_iteration_start()
        masks = {n: b.bool().clone() for n, b in model.named_buffers() if n.endswith("weight_mask")}
        if k == 0:
            assert not masks
        else:
            for name, m in masks.items():
                assert (~m).sum().item() == round(lottery_sparsity(k, 0.8, 3) * m.numel()), (k, name)
                assert torch.equal(getattr(model, name.split(".")[0]).weight_orig, theta0[name.replace("_mask", "")])
                if previous:
                    assert not (m & ~previous[name]).any()
            for name in ("0.bias", "2.bias", "4.bias"):
                assert torch.equal(model.state_dict()[name], theta0[name])
            assert not optimizer.state and scheduler.last_epoch == 0 and optimizer.param_groups[0]["lr"] == 0.1
            previous = masks
        train_epoch(model, optimizer)
        scheduler.step()


def independent_first_scores(algorithm, model, optimizer):
    """What the first update ranks on, recorded by the test's own hooks (registered after the
    pruner's: the deep copies it traces would carry them and run them on their probe values): the
    first batch's activations read by layer 2 (apoz / mean), or (g·w)² of layer 0 before step 1."""
    seen = {}

    def reads(_m, args):
        if "x" not in seen and model.training:
            seen["x"] = args[0].detach().clone()

    def grads(*_):
        if "g" not in seen:
            w = model[0].weight_orig if hasattr(model[0], "weight_orig") else model[0].weight
            seen["g"] = ((w.grad * model[0].weight) ** 2).sum(1).detach().clone()

    handles = [model[2].register_forward_pre_hook(reads), optimizer.register_step_pre_hook(grads)]

    def scores():
        for h in handles:
            h.remove()
        if algorithm == "taylorfo":
            return seen["g"]
        x = seen["x"]
        return (x > 0).float().mean(0) if algorithm == "apoz" else x.mean(0)   # 1 - APoZ, mean
    return scores


@pytest.mark.parametrize("algorithm", ["taylorfo", "apoz", "mean_activation"])
def test_agp_ranks_on_the_users_own_training_for_data_driven_algorithms(algorithm):
    """The first update (at the first optimizer step) prunes the channels the statistics of that
    first batch rank lowest; later epochs follow the cubic ramp and never revive a channel."""
    torch.manual_seed(3)
    model = mlp(2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    config = [{"initial_sparsity": 0.25, "final_sparsity": 0.5, "start_epoch": 0, "end_epoch": 4, "op_names": ["0", "2"]}]
    pruner = AGPPruner(model, config, optimizer, pruning_algorithm=algorithm, dummy_input=torch.randn(2, 8),
                       criterion=nn.MSELoss())
    scores = independent_first_scores(algorithm, model, optimizer)
    pruner.compress()
    assert not any(n.endswith("_mask") for n, _ in model.named_buffers())     # nothing ranked yet
    model.train()
    previous = None
    for epoch in range(5):
        pruner.update_epoch(epoch)
        train_epoch(model, optimizer)
        rows = (~model[0].weight_mask.bool()).all(1)
        assert int(rows.sum()) == int(agp_sparsity(epoch, 0.25, 0.5, 0, 4, 1) * 16 + 1e-9)
        if epoch == 0:   # the 4 pruned rank lowest (ties either way)
            first = scores()
            assert first[rows].max() <= first[~rows].min()
            assert first[rows].max() < first[~rows].max()
        if previous is not None:
            assert not (previous & ~rows).any()
        previous = rows.clone()
    pruner.remove_hook()


def test_agp_slim_prunes_the_smallest_batchnorm_scales():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.9, -0.1, 0.5, 0.05, -0.7, 0.3, 0.2, 1.0]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    config = [{"final_sparsity": 0.5, "start_epoch": 0, "end_epoch": 1, "op_types": ["BatchNorm2d"]}]
    AGPPruner(model, config, optimizer, pruning_algorithm="slim", dummy_input=torch.randn(1, 3, 8, 8)).compress()
    assert torch.nonzero(~model[1].weight_mask.bool()).flatten().tolist() == [1, 3, 5, 6]   # |γ| 0.1 0.05 0.3 0.2
