"""onnxprune.pytorch.training: the data-driven and training-time pruners (APoZ, mean activation,
Taylor FO, Slim, ADMM), each checked against statistics computed by hand in the test, then on a
small CNN end to end: sparsity per group, masks through optimizer steps, speedup parity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from onnxprune import OnnxPruneError
from onnxprune.pytorch import (ActivationAPoZRankFilterPruner, ActivationMeanRankFilterPruner, ADMMPruner,
                               SlimPruner, TaylorFOWeightFilterPruner, current_masks, speedup)

from onnxprune.pytorch.masks import deep_copy
from onnxprune.pytorch.training import trainable

from .zoo_util import assert_matches_torch, layer_weight_count, run_ort


def rows_zero(w: torch.Tensor) -> list[int]:
    """Indices of the all-zero output rows of a weight."""
    return [i for i in range(w.shape[0]) if not bool(w[i].detach().ne(0).any())]


def sgd_trainer(batches, loss_fn=None, log=None):
    """An NNI trainer over fixed batches; `log` records each finished step."""
    def trainer(model, optimizer, criterion, epoch):
        model.train()
        for x, y in batches:
            optimizer.zero_grad()
            out = model(x)
            loss = loss_fn(out) if loss_fn else criterion(out, y)
            loss.backward()
            optimizer.step()
            if log is not None:
                log.append(epoch)
    return trainer


# --- Taylor FO: (g·w)² by hand --------------------------------------------------------------------

class MLP(nn.Module):
    def __init__(self, widths=(5, 6, 3)):
        super().__init__()
        self.fc = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.fc):
            x = layer(x)
            if i < len(self.fc) - 1:
                x = torch.relu(x)
        return x


def mlp_batches(n=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 5, generator=gen), torch.randint(0, 3, (4,), generator=gen)) for _ in range(n)]


def hand_taylor(model, batches, steps, layers, lr):
    """Σ over the first `steps` batches of Σ_row (dL/dw · w)², with SGD steps in between, on a copy."""
    m = deep_copy(model)
    opt = torch.optim.SGD(m.parameters(), lr=lr)
    total = {name: np.zeros(m.get_submodule(name).weight.shape[0]) for name in layers}
    for x, y in batches[:steps]:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(m(x), y)
        for name in layers:
            w = m.get_submodule(name).weight
            (g,) = torch.autograd.grad(loss, w, retain_graph=True)
            total[name] += (g.double() * w.detach().double()).pow(2).sum(dim=1).numpy()
        loss.backward()
        opt.step()
    return total, m


@pytest.mark.parametrize("premasked", [False, True])
def test_taylor_accumulates_g_times_w_squared_over_exactly_n_steps_and_masks_the_lowest(premasked):
    torch.manual_seed(0)
    model = MLP()
    if premasked:  # under a torch.nn.utils.prune mask the gradient lives on weight_orig
        keep = torch.ones(6, 5)
        keep[0, :3] = 0
        torch_prune.custom_from_mask(model.fc[0], "weight", keep)
    batches = mlp_batches(3)
    expected, stepped = hand_taylor(model, batches, 2, ["fc.0"], lr=0.1)
    log = []
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = TaylorFOWeightFilterPruner(model, [{"sparsity": 0.5, "op_names": ["fc.0"]}], opt,
                                        sgd_trainer(batches, log=log), nn.CrossEntropyLoss(),
                                        sparsifying_training_batches=2, dummy_input=batches[0][0])
    pruner.compress()
    assert log == [0, 0], "the trainer is stopped before step 3"
    assert pruner.steps_seen == 2
    np.testing.assert_allclose(pruner.contributions["fc.0"], expected["fc.0"], rtol=1e-6)
    # the model had exactly two steps: its dense weights are the hand copy's
    torch.testing.assert_close(trainable(model.fc[0]).detach(), trainable(stepped.fc[0]).detach(), rtol=0, atol=0)
    lowest = sorted(np.argsort(expected["fc.0"], kind="stable")[:3].tolist())
    model(batches[0][0])
    assert rows_zero(model.fc[0].weight) == lowest
    assert pruner.summary.rows[0].pruned == 3
    assert "TaylorFOWeightFilterPruner" in pruner.summary.table()


def test_taylor_global_sort_ranks_l2_normalized_scores_of_all_groups_at_one_threshold():
    torch.manual_seed(3)
    model = MLP((5, 6, 8, 3))
    batches = mlp_batches(2, seed=4)
    expected, _ = hand_taylor(model, batches, 2, ["fc.0", "fc.1"], lr=0.05)

    def lowest_seven(scores):                  # int(0.5 * 6 + 0.5 * 8) = 7 channels in all
        ranked = sorted((float(s), name, i) for name, v in scores.items() for i, s in enumerate(v))
        chosen = {"fc.0": [], "fc.1": []}
        for _, name, i in ranked[:7]:
            chosen[name].append(i)
        return chosen

    wanted = lowest_seven({k: v / np.sqrt((v ** 2).sum()) for k, v in expected.items()})
    # this case tells the rules apart: raw scores would take 3 + 4, and so would per-group ratios
    assert (len(wanted["fc.0"]), len(wanted["fc.1"])) == (2, 5)
    assert len(lowest_seven(expected)["fc.0"]) == 3
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    pruner = TaylorFOWeightFilterPruner(model, [{"sparsity": 0.5, "op_names": ["fc.0", "fc.1"]}], opt,
                                        sgd_trainer(batches), nn.CrossEntropyLoss(), sparsifying_training_batches=2,
                                        dummy_input=batches[0][0], global_sort=True)
    pruner.compress()
    model(batches[0][0])
    assert rows_zero(model.fc[0].weight) == sorted(wanted["fc.0"])
    assert rows_zero(model.fc[1].weight) == sorted(wanted["fc.1"])


# --- activation statistics on known activations -----------------------------------------------------

class KnownActivations(nn.Module):
    """conv1 (1×1) → ReLU → a reader: conv2 (1×1) or flatten → Linear. conv1's channels:
    0 always zero, 1 = relu(x0 − 1), 2 = x0 + x1 + x2 (> 0), 3 = relu(1.2 − x0)."""

    def __init__(self, reader: str):
        super().__init__()
        self.reader = reader
        self.conv1 = nn.Conv2d(3, 4, 1)
        self.conv2 = nn.Conv2d(4, 2, 1)
        self.fc = nn.Linear(4 * 2 * 2, 2)
        with torch.no_grad():
            self.conv1.weight.copy_(torch.tensor([[0.0, 0, 0], [1, 0, 0], [1, 1, 1], [-1, 0, 0]]).view(4, 3, 1, 1))
            self.conv1.bias.copy_(torch.tensor([-1.0, -1.0, 0.0, 1.2]))

    def forward(self, x):
        a = torch.relu(self.conv1(x))
        if self.reader == "conv":
            return self.conv2(a).mean(dim=(2, 3))
        return self.fc(a.flatten(1))


def known_activation(x: torch.Tensor) -> np.ndarray:
    """conv1's channels after ReLU, by the formulas in KnownActivations' docstring."""
    x = x.double().numpy()
    zero = np.zeros_like(x[:, 0])
    return np.stack([zero, np.maximum(x[:, 0] - 1, 0), x.sum(axis=1), np.maximum(1.2 - x[:, 0], 0)], axis=1)


def positive_batches(n):
    gen = torch.Generator().manual_seed(7)
    return [(0.5 + torch.rand(3, 3, 2, 2, generator=gen), None) for _ in range(n)]


def forward_only_trainer(batches, log):
    """No optimizer (NNI allows None); an eval-mode pass first, which must be neither counted nor recorded."""
    def trainer(model, optimizer, criterion, epoch):
        model.eval()
        model(-torch.ones(3, 3, 2, 2))   # all of conv1's channels but 2 and 3 would read zeros
        model.train()
        for x, _ in batches:
            model(x)
            log.append(epoch)
    return trainer


@pytest.mark.parametrize("reader", ["conv", "linear_after_flatten", "none_known"])
@pytest.mark.parametrize("cls,statistic", [(ActivationAPoZRankFilterPruner, "apoz"),
                                           (ActivationMeanRankFilterPruner, "mean")])
def test_activation_statistics_are_what_the_consumers_read_over_the_first_n_batches(cls, statistic, reader):
    # none_known: dependency_aware=False knows no consumer; NNI's way, relu(conv1's output), gives the same values
    model = KnownActivations("conv" if reader == "none_known" else reader)
    batches = positive_batches(3)
    act = np.concatenate([known_activation(x) for x, _ in batches[:2]])
    per_channel = np.moveaxis(act, 1, 0).reshape(4, -1)
    expected = 1 - (per_channel == 0).mean(axis=1) if statistic == "apoz" else per_channel.mean(axis=1)
    assert expected[1] != expected[3]
    log = []
    pruner = cls(model, [{"sparsity": 0.5, "op_names": ["conv1"]}], trainer=forward_only_trainer(batches, log),
                 statistics_batch_num=2, dummy_input=batches[0][0], dependency_aware=reader != "none_known")
    pruner.compress()
    assert log == [0, 0] and pruner.batches_seen == 2
    gi = next(i for i, g in enumerate(pruner.groups) if g.layers == ["conv1"])
    got = [pruner.channel_statistic(gi, c) for c in range(4)]
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-12)
    lowest = sorted(np.argsort(expected, kind="stable")[:2].tolist())
    assert 0 in lowest
    assert rows_zero(model.conv1.weight) == lowest
    assert "conv1.bias" not in current_masks(model), "biases stay (prune_bias=False)"


class GroupedReader(nn.Module):
    """conv1's output channels are constants 1, 2, 3, 4 (zero weights, biases); conv2 (groups=2)
    reads them by group-local index, so channels {0, 2} and {1, 3} are one class each."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 1)
        self.conv2 = nn.Conv2d(4, 4, 1, groups=2)
        self.fc = nn.Linear(4, 2)
        with torch.no_grad():
            self.conv1.weight.zero_()
            self.conv1.bias.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))

    def forward(self, x):
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean(dim=(2, 3)))


def test_a_grouped_conv_reader_counts_the_channel_in_every_group():
    model, x = GroupedReader(), torch.randn(2, 3, 4, 4)
    pruner = ActivationMeanRankFilterPruner(model, [{"sparsity": 0.5, "op_names": ["conv1"]}],
                                            trainer=lambda m, *a: m.train()(x), dummy_input=x)
    pruner.compress()
    gi = next(i for i, g in enumerate(pruner.groups) if g.layers == ["conv1"])
    assert [pruner.channel_statistic(gi, c) for c in range(2)] == [(1 + 3) / 2, (2 + 4) / 2]
    assert (~current_masks(model)["conv1.weight"]).flatten(1).all(dim=1).tolist() == [True, False, True, False]


# --- Slim: the L1 subgradient on γ ------------------------------------------------------------

class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


def test_slim_shrinks_gamma_by_lr_scale_sign_per_step_and_speedup_removes_the_smallest():
    torch.manual_seed(0)
    model = BNNet()
    gammas = {"bn1": [0.5, -0.05, 0.3, 0.02], "bn2": [-0.04, 0.7, 0.03, -0.6]}
    with torch.no_grad():
        for name, g in gammas.items():
            model.get_submodule(name).weight.copy_(torch.tensor(g))
    x = torch.randn(2, 3, 6, 6)
    batches = [(x, None), (x, None)]
    lr, scale, epochs = 0.1, 0.01, 3
    expected = {}
    for name, g in gammas.items():   # what SGD does to γ with only the penalty's gradient, in float32
        gamma = torch.tensor(g)
        for _ in range(epochs * len(batches)):
            gamma = gamma - lr * (torch.zeros(4) + scale * torch.sign(gamma))
        expected[name] = gamma
    log = []
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    pruner = SlimPruner(model, [{"sparsity": 0.5, "op_types": ["BatchNorm2d"]}], opt,
                        sgd_trainer(batches, loss_fn=lambda out: 0.0 * out.sum(), log=log), None,
                        sparsifying_training_epochs=epochs, scale=scale, dummy_input=x)
    pruner.compress()
    assert log == [0, 0, 1, 1, 2, 2]
    for name in gammas:
        torch.testing.assert_close(model.get_submodule(name).weight_orig.detach(), expected[name], rtol=0, atol=1e-7)
    masks = current_masks(model)
    assert masks["bn1.weight"].tolist() == [True, False, True, False]
    assert masks["bn2.weight"].tolist() == [False, True, False, True]
    assert "bn1.bias" not in masks and "conv1.weight" not in masks, "only γ is masked by default"
    ref = model.eval()(x).detach().numpy()
    small, report = speedup(model, x, align=1)
    assert_matches_torch(run_ort(small, x.numpy()), ref)
    # conv1 3→2 (3×3), conv2 2→2 (1×1), fc reads 2: the two removed channels of each BN go everywhere
    assert layer_weight_count(small) == 2 * 3 * 9 + 2 * 2 + 10 * 2
    assert report.simplify.after.macs == 2 * (36 * (2 * 3 * 9 + 2 * 2) + 10 * 2)   # batch 2, 6×6 pixels


def test_slim_prune_bias_masks_beta_and_refuses_conv_op_types():
    torch.manual_seed(0)
    model, x = BNNet(), torch.randn(1, 3, 6, 6)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = SlimPruner(model, [{"sparsity": 0.5, "op_names": ["bn1"]}], opt, lambda *a: None, None,
                        sparsifying_training_epochs=0, dummy_input=x, prune_bias=True)
    pruner.compress()
    masks = current_masks(model)
    assert masks["bn1.bias"].tolist() == masks["bn1.weight"].tolist()
    assert int((~masks["bn1.weight"]).sum()) == 2 and "bn2.weight" not in masks
    with pytest.raises(OnnxPruneError, match="cannot prune Conv2d"):
        SlimPruner(model, [{"sparsity": 0.5, "op_types": ["Conv2d"]}], opt, lambda *a: None, None, dummy_input=x)


# --- ADMM ---------------------------------------------------------------------------------------

class SmallCNN(nn.Module):
    """A residual pair (conv1 + conv2 write one stream), a strided conv, flatten → Linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 6, 3, padding=1, stride=2)
        self.bn3 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 4 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(x + self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.fc(x.flatten(1))


def cnn_batches(n=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 8, 8, generator=gen), torch.randint(0, 10, (4,), generator=gen)) for _ in range(n)]


CONV_HALF = [{"sparsity": 0.5, "op_types": ["Conv2d"]}]


def test_admm_z_reaches_the_target_sparsity_and_the_step_pulls_w_towards_z_minus_u():
    torch.manual_seed(0)
    model, batches = SmallCNN(), cnn_batches(2)
    calls, pulls = [], []

    def trainer(model, optimizer, criterion, epoch):
        assert isinstance(optimizer, torch.optim.Adam) and optimizer.defaults["lr"] == 1e-3
        assert optimizer.defaults["weight_decay"] == 5e-5
        calls.append(epoch)
        if len(calls) == 2:   # iteration 2 (Z projected once): a step without gradients moves W by the pull alone
            w = model.conv3.weight.detach().clone()
            z, u = pruner.Z["conv3.weight"].clone(), pruner.U["conv3.weight"].clone()
            optimizer.zero_grad(set_to_none=True)
            optimizer.step()
            pulls.append((w, model.conv3.weight.detach().clone(), w - 1e-2 * (w - z + u)))
        sgd_trainer(batches)(model, optimizer, criterion, epoch)

    pruner = ADMMPruner(model, CONV_HALF, trainer, num_iterations=2, epochs=1, row=1e-2, dummy_input=batches[0][0])
    pruner.compress()
    assert calls == [0, 0], "one epoch per iteration, numbered within the iteration"
    before, got, want = pulls[0]
    assert float((want - before).abs().max()) > 1e-6, "W + U differs from its projection Z after iteration 1"
    torch.testing.assert_close(got, want, rtol=0, atol=1e-7)
    zero = {k: rows_zero(z) for k, z in pruner.Z.items()}
    assert len(zero["conv1.weight"]) == 4 and zero["conv1.weight"] == zero["conv2.weight"], "one residual group"
    assert len(zero["conv3.weight"]) == 3
    for name in ("conv1", "conv2", "conv3"):
        assert len(rows_zero(model.get_submodule(name).weight)) == len(zero[f"{name}.weight"])


def test_admm_level_projects_single_weights():
    torch.manual_seed(0)
    model, batches = SmallCNN(), cnn_batches(2)
    pruner = ADMMPruner(model, [{"sparsity": 0.75, "op_names": ["conv2", "fc"]}], sgd_trainer(batches),
                        num_iterations=2, epochs_per_iteration=1, base_algo="level")
    pruner.compress()
    for name in ("conv2.weight", "fc.weight"):
        z = pruner.Z[name]
        assert int((z == 0).sum()) == round(0.75 * z.numel())
        assert int((~current_masks(model)[name]).sum()) == round(0.75 * z.numel())
    assert "ADMMPruner" in pruner.summary.table()


# --- every pruner on a small CNN ------------------------------------------------------------------

def make_pruner(kind, model, batches, x):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss, train = nn.CrossEntropyLoss(), sgd_trainer(batches)
    config = [{"sparsity": 0.5, "op_types": ["Conv2d", "Linear"]}]   # fc is pinned (graph output)
    if kind == "slim":
        return SlimPruner(model, [{"sparsity": 0.5, "op_types": ["BatchNorm2d"]}], opt, train, loss,
                          sparsifying_training_epochs=1, dummy_input=x)
    if kind == "admm":
        return ADMMPruner(model, config, train, loss, num_iterations=1, epochs_per_iteration=1, dummy_input=x)
    cls = {"apoz": ActivationAPoZRankFilterPruner, "mean": ActivationMeanRankFilterPruner,
           "taylor": TaylorFOWeightFilterPruner}[kind]
    return cls(model, config, opt, train, loss, sparsifying_training_batches=2, dummy_input=x)


@pytest.mark.parametrize("kind", ["apoz", "mean", "taylor", "slim", "admm"])
def test_each_pruner_on_a_small_cnn_masks_hold_and_speedup_matches(kind):
    torch.manual_seed(0)
    model, batches = SmallCNN(), cnn_batches(3)
    x = batches[0][0][:1]
    pruner = make_pruner(kind, model, batches, x)
    pruner.compress()
    rows = {r.layers[0]: r for r in pruner.summary.rows}
    for first, size in (("conv1", 8), ("conv3", 6)):
        assert rows[first].channels == size and abs(rows[first].pruned - 0.5 * size) <= 1
    assert rows["fc"].pruned == 0 and rows["fc"].pinned == 10
    masks = current_masks(model)
    assert masks and not any(name.startswith("fc.") for name in masks), "pinned channels are never masked"
    sgd_trainer(cnn_batches(2, seed=5))(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), 1)
    model(x)
    for name, keep in masks.items():
        module, _, param = name.rpartition(".")
        assert bool((getattr(model.get_submodule(module), param)[~keep] == 0).all()), f"{name} revived by a step"
    model.eval()
    ref = model(x).detach().numpy()
    small, report = speedup(model, x, align=1)
    assert_matches_torch(run_ort(small, x.numpy()), ref)
    assert report.simplify.after.macs < report.simplify.before.macs
    assert pruner.summary.table().startswith(type(pruner).__name__)


# --- arguments ----------------------------------------------------------------------------------

def test_bad_arguments_are_one_line_errors():
    model, x = SmallCNN(), torch.randn(1, 3, 8, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(OnnxPruneError, match="needs trainer"):
        ActivationAPoZRankFilterPruner(model, CONV_HALF, opt, dummy_input=x)
    with pytest.raises(OnnxPruneError, match="needs optimizer"):
        TaylorFOWeightFilterPruner(model, CONV_HALF, None, lambda *a: None, None, dummy_input=x)
    with pytest.raises(OnnxPruneError, match="base_algo"):
        ADMMPruner(model, CONV_HALF, lambda *a: None, base_algo="l0", dummy_input=x)
    with pytest.raises(OnnxPruneError, match="one of epochs_per_iteration"):
        ADMMPruner(model, CONV_HALF, lambda *a: None, training_epochs=2, epochs=3, dummy_input=x)
    with pytest.raises(OnnxPruneError, match="not both"):
        TaylorFOWeightFilterPruner(model, CONV_HALF, opt, lambda *a: None, None, sparsifying_training_batches=2,
                                   statistics_batch_num=3, dummy_input=x)
    with pytest.raises(OnnxPruneError, match="no optimizer step"):
        TaylorFOWeightFilterPruner(model, CONV_HALF, opt, lambda *a: None, None, dummy_input=x).compress()
    with pytest.raises(OnnxPruneError, match="training mode"):
        ActivationMeanRankFilterPruner(model.eval(), CONV_HALF, opt, lambda m, *a: m(x), dummy_input=x).compress()
    assert current_masks(model) == {}
