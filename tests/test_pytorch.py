"""onnxprune.pytorch: dependency groups, the weight-criterion pruners, masks in every form, export_model,
speedup and rounds — each checked against the PyTorch model itself or an independently built one."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
import torch
from torch.nn.utils import prune as torch_prune

from onnxprune import OnnxPruneError, ParityError
from onnxprune.cli import main
from onnxprune.models import ZOO, build, example_input
from onnxprune.models.masks import conv_linear_weight_count
from onnxprune.pytorch import (FPGMPruner, L1FilterPruner, L2FilterPruner, LevelPruner, current_masks,
                               dependency_groups, export_onnx, prune_in_rounds, speedup)
from onnxprune.simplify import simplify

from .zoo_util import assert_matches_torch, layer_weight_count, run_ort

CONVS_AND_LINEARS = [{"sparsity": 0.5, "op_types": ["Conv2d", "Linear"]}]


def torch_out(model, x) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(x).numpy()


def pruned_channels(pruner, group) -> int:
    return int(pruner.already_pruned(group, current_masks(pruner.bound_model)).sum())


# --- dependency groups ---------------------------------------------------------------------------

def expected_weight_count(model, zeroed) -> int:
    """Conv/Linear weight elements left once the slices of the `zeroed` channels are removed:
    per weight, the kept entries along each axis multiplied (an entry goes with its row or column)."""
    dropped: dict[tuple[str, int], set[int]] = {}
    for ch in zeroed:
        for s in ch.slices:
            if s.param == "weight":
                dropped.setdefault((s.module, s.axis), set()).update(s.indices)
    total = 0
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            shape = list(m.weight.shape)
            for axis in (0, 1):
                shape[axis] -= len(dropped.get((name, axis), ()))
            total += int(np.prod(shape))
    return total


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zeroing_a_groups_channels_in_every_producer_lets_simplify_remove_exactly_them(name):
    """Every other free channel of every group: its producers' rows zeroed (weights only, biases
    kept), exported and simplified: exactly the slices dependency_groups listed disappear, and the
    result computes what the PyTorch model computes."""
    model, x = build(name), example_input(name)
    groups = dependency_groups(model, x)
    zeroed = []
    with torch.no_grad():
        for g in groups:
            if "several axes" in g.unmovable:  # through a channel shuffle only box-shaped removals go
                continue
            for i in g.free[::2]:
                zeroed.append(g.channels[i])
                for s in g.channels[i].producers:
                    getattr(model.get_submodule(s.module), s.param).index_fill_(s.axis, torch.tensor(s.indices), 0.0)
    assert zeroed or name == "shufflenet_v2"
    small, _ = simplify(export_onnx(model, x, "torchscript"), align=1)
    assert_matches_torch(run_ort(small, x.numpy()), torch_out(model, x), rel=1e-4)
    assert layer_weight_count(small) == expected_weight_count(model, zeroed)


def test_plan_lists_every_coupled_slice_like_torch_pruning():
    model, x = build("resnet18"), example_input("resnet18")
    plan = dependency_groups(model, x).plan(model.stem[0][0], [1, 3])
    text = str(plan)
    for line in ("stem.0.0.weight[axis 0: [1, 3]]", "stem.0.1.running_var[axis 0: [1, 3]]",
                 "layers.0.0.conv2.0.weight[axis 0: [1, 3]]", "layers.0.1.conv1.0.weight[axis 1: [1, 3]]",
                 "layers.1.0.downsample.0.weight[axis 1: [1, 3]]", "layers.1.0.conv1.0.weight[axis 1: [1, 3]]"):
        assert line in text, (line, text)
    assert len(plan.channels) == 2 and not any(c.pinned for c in plan.channels)


def test_groups_of_a_model_with_pruning_hooks_equal_those_of_the_dense_model():
    model, x = build("mobilenet_v2"), example_input("mobilenet_v2")
    dense = dependency_groups(model, x)
    torch_prune.l1_unstructured(model.features[1].conv[0][0], "weight", amount=0.3)
    masked = dependency_groups(model, x)
    assert [(g.layers, [c.slices for c in g.channels]) for g in dense] == \
           [(g.layers, [c.slices for c in g.channels]) for g in masked]


# --- pruners ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "resnext", "densenet"])
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_l1_at_half_gives_the_half_width_model(name, exporter):
    model, x = build(name), example_input(name)
    L1FilterPruner(model, CONVS_AND_LINEARS, dummy_input=x).compress()
    small, report = speedup(model, x, exporter=exporter, align=1)
    assert report.torch_parity.passed
    assert_matches_torch(run_ort(small, x.numpy()), torch_out(model, x), rel=1e-4)
    assert layer_weight_count(small) == conv_linear_weight_count(build(name, width=ZOO[name].width / 2))


@pytest.mark.parametrize("cls", [L1FilterPruner, L2FilterPruner, FPGMPruner])
def test_every_group_reaches_its_sparsity_and_pinned_channels_stay(cls):
    model, x = build("resnet18"), example_input("resnet18")
    config = [{"sparsity": 0.3, "op_types": ["Conv2d", "Linear"]},
              {"sparse_ratio": 0.7, "op_names": ["layers.1.0.conv1.0", "layers.2.1.conv1.0"]}]
    pruner = cls(model, config, dummy_input=x)
    pruner.compress()
    masks = current_masks(model)
    for g in pruner.groups:
        asked = 0.7 if g.layers in (["layers.1.0.conv1.0"], ["layers.2.1.conv1.0"]) else 0.3
        assert pruned_channels(pruner, g) == min(int(asked * g.size + 1e-9), len(g.free)), g.layers
        for c in g.channels:
            if c.pinned:  # the classifier's outputs are a graph output
                assert all(masks.get(f"{s.module}.{s.param}") is None or
                           bool(masks[f"{s.module}.{s.param}"].index_select(s.axis, torch.tensor(s.indices)).all())
                           for s in c.producers)
    assert any(c.pinned for g in pruner.groups for c in g.channels)


def test_l1_prunes_the_filters_of_smallest_norm():
    model, x = build("vgg11_bn"), example_input("vgg11_bn")
    conv = model.features[0][0]
    norms = conv.weight.detach().abs().sum(dim=(1, 2, 3))
    L1FilterPruner(model, [{"sparsity": 0.25, "op_names": ["features.0.0"]}], dummy_input=x).compress()
    masked = ~current_masks(model)["features.0.0.weight"].reshape(conv.weight.shape[0], -1).all(dim=1)
    assert set(torch.nonzero(masked).flatten().tolist()) == set(torch.argsort(norms)[: int(0.25 * len(norms))].tolist())


def test_level_pruner_masks_the_smallest_weights():
    model = build("resnet18")
    LevelPruner(model, [{"sparsity": 0.8, "op_types": ["default"]}]).compress()
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            w, mask = m.weight_orig.detach().abs(), m.weight_mask.bool()
            assert int((~mask).sum()) == round(0.8 * w.numel())
            assert w[~mask].max() <= w[mask].min()


def test_masks_hold_through_optimizer_steps_and_prune_remove_makes_them_permanent():
    model, x = build("resnet18"), example_input("resnet18")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)  # made before compress
    L1FilterPruner(model, CONVS_AND_LINEARS, dummy_input=x).compress()
    masks = current_masks(model)
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(4, 3, 32, 32)).square().mean().backward()
        optimizer.step()
    model.eval()(x)  # the pruning hooks recompute every weight
    assert torch_prune.is_pruned(model)
    for name, mask in masks.items():
        module = model.get_submodule(name.rsplit(".", 1)[0])
        assert torch.all(module.weight[~mask] == 0), name
        assert not torch.equal(module.weight_orig[mask], module.weight_orig[mask] * 0)  # it did train
    for module in model.modules():
        if hasattr(module, "weight_mask"):
            torch_prune.remove(module, "weight")
    assert not torch_prune.is_pruned(model)
    assert all(torch.all(model.get_submodule(n.rsplit(".", 1)[0]).weight[~m] == 0) for n, m in masks.items())


def test_export_model_files_load_back(tmp_path):
    model, x = build("mobilenet_v2"), example_input("mobilenet_v2")
    pruner = L1FilterPruner(model, CONVS_AND_LINEARS, dummy_input=x)
    pruner.compress()
    pruner.export_model(tmp_path / "m.pth", tmp_path / "mask.pth", onnx_path=tmp_path / "m.onnx", dummy_input=x)
    fresh = build("mobilenet_v2", seed=7)
    fresh.load_state_dict(torch.load(tmp_path / "m.pth"))  # plain parameter names
    assert np.array_equal(torch_out(fresh, x), torch_out(model, x))
    nni = torch.load(tmp_path / "mask.pth")
    assert set(nni) == {n.rsplit(".", 1)[0] for n in current_masks(model)}
    assert all(set(v) == {"weight"} for v in nni.values())
    assert_matches_torch(run_ort(onnx.load(tmp_path / "m.onnx"), x.numpy()), torch_out(model, x), rel=1e-4)


def test_export_model_refuses_colliding_paths(tmp_path):
    model, x = build("resnet18"), example_input("resnet18")
    pruner = L1FilterPruner(model, CONVS_AND_LINEARS, dummy_input=x)
    pruner.compress()
    with pytest.raises(OnnxPruneError, match="same file"):
        pruner.export_model(tmp_path / "m.pth", tmp_path / "m.pth")
    assert list(tmp_path.iterdir()) == []


def test_masks_from_torch_prune_nni_and_channel_choices_give_the_same_onnx():
    """The same channels pruned four ways: our pruner, torch.nn.utils.prune buffers, NNI's masks
    dict passed to speedup, and Torch-Pruning-style (module, output channel indices)."""
    model, x = build("resnet18"), example_input("resnet18")
    ours = build("resnet18")
    pruner = L1FilterPruner(ours, CONVS_AND_LINEARS, dummy_input=x)
    pruner.compress()
    masks = current_masks(ours)
    reference, _ = speedup(ours, x, exporter="torchscript")

    torch_pruned = build("resnet18")
    for name, mask in masks.items():
        torch_prune.custom_from_mask(torch_pruned.get_submodule(name.rsplit(".", 1)[0]), "weight", mask)
    nni = {name.rsplit(".", 1)[0]: {"weight": mask.float()} for name, mask in masks.items()}
    first = pruner.groups.groups[0]
    pruned_rows = [i for i, c in enumerate(first.channels) if pruner.already_pruned(first, masks)[i]]
    stem_rows = [c.producers[0].indices[0] for i, c in enumerate(first.channels) if i in pruned_rows]
    choices = [(model.stem[0][0], stem_rows)]
    results = [speedup(torch_pruned, x, exporter="torchscript")[0], speedup(model, x, masks=nni, exporter="torchscript")[0]]
    for small in results:
        assert layer_weight_count(small) == layer_weight_count(reference)
        assert np.array_equal(run_ort(small, x.numpy()), run_ort(reference, x.numpy()))
    by_choice, _ = speedup(model, x, masks=choices, exporter="torchscript", align=1)
    stem_only = {k: v for k, v in masks.items() if any(k.startswith(layer) for layer in first.layers)}
    by_masks, _ = speedup(model, x, masks=stem_only, exporter="torchscript", align=1)
    assert layer_weight_count(by_choice) == layer_weight_count(by_masks) < layer_weight_count(speedup(model, x, align=1)[0])


def test_prune_cli_takes_nni_mask_files(tmp_path, capsys):
    model, x = build("resnet18"), example_input("resnet18")
    pruner = L1FilterPruner(model, CONVS_AND_LINEARS, dummy_input=x)
    pruner.compress()
    pruner.export_model(tmp_path / "m.pth", tmp_path / "mask.pth")
    onnx.save(export_onnx(build("resnet18"), x, "torchscript"), tmp_path / "dense.onnx")
    assert main(["prune", str(tmp_path / "dense.onnx"), str(tmp_path / "p.onnx"), "--masks", str(tmp_path / "mask.pth"),
                 "--simplify"]) == 0, capsys.readouterr().err
    small, _ = speedup(model, x, exporter="torchscript")
    assert layer_weight_count(onnx.load(tmp_path / "p.onnx")) == layer_weight_count(small)


def test_speedup_is_an_error_when_the_result_differs_from_pytorch(monkeypatch):
    """speedup's own gate against PyTorch: a simplify that returned a wrong model must not pass."""
    simplify_module = sys.modules["onnxprune.simplify"]  # the package attribute is the function
    real = simplify_module.simplify

    def wrong(model, **kwargs):
        small, report = real(model, **kwargs)
        w = next(t for t in small.graph.initializer if len(t.dims) == 4)
        arr = onnx.numpy_helper.to_array(w) * 1.5
        w.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), w.name))
        return small, report

    monkeypatch.setattr(simplify_module, "simplify", wrong)
    model, x = build("resnet18"), example_input("resnet18")
    with pytest.raises(ParityError, match="differs from the PyTorch model"):
        speedup(model, x, exporter="torchscript")


def test_rounds_prune_a_growing_fraction_and_keep_what_was_pruned():
    model, x = build("resnet18"), example_input("resnet18")
    pruner = L1FilterPruner(model, [{"sparsity": 0.6, "op_types": ["Conv2d"]}], dummy_input=x)
    seen = []

    def finetune(m, r):
        seen.append(r)
        with torch.no_grad():  # perturb the weights: a later round must not revive a pruned channel
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.1)

    results = prune_in_rounds(pruner, 3, finetune, evaluator=lambda m: 1.0, progress=False)
    assert seen == [1, 2, 3] and [r.fraction for r in results] == [1 / 3, 2 / 3, 1.0]
    for g in pruner.groups:
        if g.free and g.layers[0] in pruner.selected:
            assert pruned_channels(pruner, g) == min(int(0.6 * g.size + 1e-9), len(g.free))


def test_rounds_are_monotonic():
    model, x = build("mobilenet_v2"), example_input("mobilenet_v2")
    pruner = FPGMPruner(model, [{"sparsity": 0.6, "op_types": ["Conv2d"]}], dummy_input=x)
    previous = {}
    for r in (1, 2, 3):
        pruner.update_mask(schedule=lambda s, f=r / 3: s * f)
        now = current_masks(model)
        for name, mask in previous.items():
            assert not bool((~mask & now[name]).any()), f"{name}: a pruned weight came back in round {r}"
        previous = now


@pytest.mark.parametrize("config,word", [
    ([{"sparsity": 0.5}], "needs op_types or op_names"),
    ([{"sparsity": 1.5, "op_types": ["Conv2d"]}], "sparsity must be in [0, 1)"),
    ([{"op_types": ["Conv2d"]}], "needs sparsity"),
    ([{"sparsity": 0.5, "op_types": ["Conv2d"], "bogus": 1}], "unknown key(s) bogus"),
    ([{"sparsity": 0.5, "op_names": ["no.such.layer"]}], "no module named 'no.such.layer'"),
    ([{"sparsity": 0.5, "op_types": ["BatchNorm2d"]}], "cannot prune BatchNorm2d"),
    ([], "non-empty list"),
])
def test_bad_config_entries_are_named(config, word):
    model, x = build("resnet18"), example_input("resnet18")
    with pytest.raises(OnnxPruneError) as e:
        L1FilterPruner(model, config, dummy_input=x)
    assert word in str(e.value) and ("entry 1" in str(e.value) or not config)


def test_dependency_aware_pruning_needs_a_dummy_input():
    with pytest.raises(OnnxPruneError, match="dummy_input"):
        L1FilterPruner(build("resnet18"), CONVS_AND_LINEARS)
    pruner = L1FilterPruner(build("resnet18"), CONVS_AND_LINEARS, dependency_aware=False)  # NNI's default mode
    pruner.compress()
    assert all(len(g.layers) == 1 for g in pruner.groups)


def test_importing_without_torch_says_how_to_install():
    code = textwrap.dedent("""
        import sys
        class NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "torch":
                    raise ImportError("no torch here")
        sys.meta_path.insert(0, NoTorch())
        try:
            import onnxprune.pytorch
        except ImportError as e:
            print(e)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "onnxprune.pytorch needs PyTorch: pip install 'onnxprune[torch]'" in out.stdout, out.stderr


class ConvsWithBias(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(y.mean(dim=(2, 3)))


@pytest.mark.parametrize("prune_bias", [False, True])
def test_pruned_filters_keep_their_bias_unless_asked(prune_bias):
    torch.manual_seed(0)
    model, x = ConvsWithBias(), torch.randn(1, 3, 8, 8)
    L1FilterPruner(model, [{"sparsity": 0.5, "op_names": ["conv1"]}], dummy_input=x, prune_bias=prune_bias).compress()
    masks = current_masks(model)
    rows = ~masks["conv1.weight"].reshape(8, -1).any(dim=1)
    assert int(rows.sum()) == 4
    if prune_bias:
        assert torch.equal(masks["conv1.bias"], ~rows)
    else:
        assert "conv1.bias" not in masks
    small, _ = speedup(model, x, exporter="torchscript", align=1)  # either way the channels go, exactly
    assert_matches_torch(run_ort(small, x.numpy()), torch_out(model, x), rel=1e-4)
    assert layer_weight_count(small) == 4 * 27 + 8 * 4 * 9 + 8 * 4


@pytest.mark.parametrize("name", ["vit", "bert", "gpt", "llama"])
def test_mlp_neurons_and_heads_of_transformers_prune_in_pytorch_to_the_half_model(name):
    """The MLP hidden width is a group (LLaMA's gate and up projections together), and so are the
    heads of each attention (the q, k, v projections together; a LLaMA k / v head with its query
    heads): L1 at 0.5 on every Linear leaves exactly the weights of the model built with half the
    MLP and half the heads; the residual width stays (pinned)."""
    from onnxprune.models.transformers import HEADS, TRANSFORMERS

    spec = TRANSFORMERS[name]
    model, x = spec.build(), spec.example_input()
    pruner = L1FilterPruner(model, [{"sparsity": 0.5, "op_types": ["Linear"]}], dummy_input=x)
    pruner.compress()
    mlp = ("gate", "up") if name == "llama" else ("fc1",)
    attn = {"vit": ("qkv",), "gpt": ("qkv",), "bert": ("q", "k", "v"), "llama": ("q", "k", "v")}[name]
    assert {tuple(g.layers) for g in pruner.groups if g.free} == {
        tuple(f"blocks.{i}.{part}.{p}" for p in layers) for i in range(2) for part, layers in (("mlp", mlp), ("attn", attn))}
    assert {tuple(g.layers) for g in pruner.groups if g.heads} == {tuple(f"blocks.{i}.attn.{p}" for p in attn) for i in range(2)}
    small, report = speedup(model, x, exporter="torchscript", align=1)
    assert report.torch_parity.passed
    assert layer_weight_count(small) == conv_linear_weight_count(spec.build(mlp=spec.mlp // 2, heads=HEADS // 2))
