"""Tests for the ``models`` zoo: shapes, determinism, even widths, the half-width
property, and ONNX export (TorchScript and dynamo exporters) checked with ORT."""

from __future__ import annotations

import copy
import os
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from onnxprune.models import ZOO, build, example_input, randomize_bn
from onnxprune.models.common import SqueezeExcite
from onnxprune.models.shufflenet import ShuffleNetV2

NAMES = list(ZOO)
# An odd class count can never collide with the (even) internal channel counts,
# so it identifies the output layer unambiguously.
ODD_CLASSES = 7
# dynamo export takes seconds per model: only these run by default.
DYNAMO_FAST = ("alexnet", "resnext", "shufflenet_v2")

slow = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("ONNXPRUNE_SLOW") != "1", reason="slow: set ONNXPRUNE_SLOW=1"),
]


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """These models are tiny: intra-op threads only add contention on shared CPUs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _layers(model: nn.Module) -> list[nn.Conv2d | nn.Linear]:
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _io(layer: nn.Conv2d | nn.Linear) -> tuple[int, int, int]:
    """(in channels, out channels, groups)."""
    if isinstance(layer, nn.Conv2d):
        return layer.in_channels, layer.out_channels, layer.groups
    return layer.in_features, layer.out_features, 1


def _is_depthwise(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Conv2d) and layer.groups > 1 and layer.groups == layer.in_channels == layer.out_channels


def _is_grouped(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Conv2d) and layer.groups > 1 and not _is_depthwise(layer)


def _surviving_weights(layer: nn.Conv2d | nn.Linear, is_output: bool) -> tuple[int, tuple[int, ...]]:
    """Weight elements left when the layer keeps only the lower half of its
    outputs and of its inputs (per group for grouped convs; depthwise convs keep
    the lower half of their channels), except the 3 image channels and the class
    outputs.  Returns (count, expected weight shape of the half-width layer)."""
    cin, cout, groups = _io(layer)
    w = layer.weight
    out_idx = torch.arange(cout)
    in_idx = torch.arange(w.shape[1])  # inputs per group
    if is_output:
        keep_out = torch.ones(cout, dtype=torch.bool)
    elif _is_grouped(layer):
        per_group = cout // groups
        keep_out = out_idx % per_group < per_group // 2
    else:  # dense or depthwise: lower half of the channels
        keep_out = out_idx < cout // 2
    if cin == 3 or _is_depthwise(layer):
        keep_in = torch.ones(w.shape[1], dtype=torch.bool)
    else:
        keep_in = in_idx < w.shape[1] // 2
    mask = keep_out[:, None] & keep_in[None, :]
    count = int(mask.sum()) * int(np.prod(w.shape[2:], dtype=np.int64))
    shape = (int(keep_out.sum()), int(keep_in.sum()), *w.shape[2:])
    return count, shape


def _ort_run(path: str, x: torch.Tensor) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def _check_export(name: str, tmp_path, **export_kwargs) -> None:
    model, x = build(name), example_input(name)
    with torch.no_grad():
        expected = model(x).numpy()
    path = str(tmp_path / f"{name}.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), path, **export_kwargs)
    got = _ort_run(path, x)
    assert got.shape == expected.shape
    tol = 1e-4 + 1e-4 * float(np.abs(expected).max())
    err = float(np.abs(got - expected).max())
    assert err <= tol, f"{name}: max |ORT - torch| = {err:.3g} > {tol:.3g}"


# --------------------------------------------------------------------------- registry / forward


def test_zoo_keys() -> None:
    assert set(ZOO) == {
        "resnet18", "resnet50", "vgg11_bn", "alexnet", "squeezenet", "mobilenet_v1", "mobilenet_v2",
        "mobilenet_v3", "mnasnet", "efficientnet_b0", "googlenet", "inception", "densenet",
        "shufflenet_v2", "resnext", "wide_resnet", "regnet",
    }
    for name, spec in ZOO.items():
        assert spec.name == name


@pytest.mark.parametrize("name", NAMES)
def test_build_forward_deterministic(name: str) -> None:
    spec = ZOO[name]
    model = build(name)
    assert not any(m.training for m in model.modules()), "model must be in eval mode"
    x = example_input(name)
    assert x.shape == spec.input_shape
    assert torch.equal(x, example_input(name))
    with torch.no_grad():
        y = model(x)
        assert y.shape == (1, 10)
        assert torch.isfinite(y).all()
        assert torch.equal(y, build(name, seed=0)(x)), "same seed must give the same model"
        assert not torch.allclose(y, build(name, seed=1)(x)), "another seed must give another model"
        # the output really depends on the input
        y2 = model(example_input(name, seed=1))
        assert (y - y2).abs().max() > 1e-2 * y.abs().max()


def test_randomize_bn() -> None:
    model = build("resnet18")
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns
    for bn in bns:
        assert bn.running_var.min() >= 0.5 and bn.running_var.max() <= 2.0
        assert bn.weight.min() >= 0.5 and bn.weight.max() <= 1.5
        assert bn.running_mean.abs().max() > 0 and bn.bias.abs().max() > 0
    other = ZOO["resnet18"].build(width=ZOO["resnet18"].width)
    randomize_bn(other, 0)
    for a, b in zip(bns, (m for m in other.modules() if isinstance(m, nn.BatchNorm2d))):
        assert torch.equal(a.running_mean, b.running_mean) and torch.equal(a.running_var, b.running_var)


# --------------------------------------------------------------------------- widths


@pytest.mark.parametrize("name", NAMES)
def test_channel_counts_even_at_default_width(name: str) -> None:
    spec = ZOO[name]
    layers = _layers(spec.build(width=spec.width, num_classes=ODD_CLASSES))
    outputs = [layer for layer in layers if _io(layer)[1] == ODD_CLASSES]
    assert outputs == [layers[-1]], "exactly one output layer, the last conv/linear"
    for layer in layers:
        cin, cout, groups = _io(layer)
        assert cin == 3 or cin % 2 == 0, f"{layer}: odd input channels"
        assert layer is layers[-1] or cout % 2 == 0, f"{layer}: odd output channels"
        if _is_grouped(layer):
            assert (cin // groups) % 2 == 0 and (cout // groups) % 2 == 0, f"{layer}: odd channels per group"
    assert spec.grouped == any(_is_grouped(layer) for layer in layers)


@pytest.mark.parametrize("name", NAMES)
def test_half_width_is_lower_half(name: str) -> None:
    """build(width/2) has exactly the weights that survive when every conv/linear
    of the default-width model keeps the lower half of its outputs and inputs."""
    spec = ZOO[name]
    full = _layers(spec.build(width=spec.width, num_classes=ODD_CLASSES))
    half_model = spec.build(width=spec.width / 2, num_classes=ODD_CLASSES)
    half = _layers(half_model)
    assert len(full) == len(half)
    surviving = 0
    for i, (f, h) in enumerate(zip(full, half)):
        assert type(f) is type(h)
        count, shape = _surviving_weights(f, is_output=i == len(full) - 1)
        surviving += count
        assert tuple(h.weight.shape) == shape, f"layer {i}: {f} -> {h}"
        if isinstance(f, nn.Conv2d):
            assert (h.kernel_size, h.stride, h.padding) == (f.kernel_size, f.stride, f.padding)
            assert h.groups == (f.groups // 2 if _is_depthwise(f) else f.groups)
    assert surviving == sum(h.weight.numel() for h in half)
    with torch.no_grad():
        assert half_model(example_input(name)).shape == (1, ODD_CLASSES)


# --------------------------------------------------------------------------- half-width sub-network


def _halving_groups(model: nn.Module) -> dict[int, int]:
    """For every conv/linear but the output layer: in how many groups it halves
    its outputs when the model is cut down to the half-width model.

    * dense layers: 1 (the upper half goes);
    * grouped convs and the layers that feed them: the conv's groups (the upper
      half within each group goes, as groups stay fixed);
    * an SE gate's fc2: like the layer producing the gated tensor;
    * ShuffleNetV2: branch outputs are interleaved by the shuffle and re-split by
      the next unit's chunk, so each stride-1 unit doubles the block size of the
      surviving pattern.  With m stride-1 units in a stage, the stride-2 unit's
      branch outputs are halved in 2**m groups and the i-th stride-1 unit's in
      2**(m - i); the stage then ends with its lower half surviving.
    """
    layers = _layers(model)
    groups_of: dict[int, int] = {}
    for layer, nxt in zip(layers, layers[1:]):
        if _is_grouped(layer):
            groups_of[id(layer)] = layer.groups
        elif _is_grouped(nxt) and nxt.in_channels == _io(layer)[1]:
            groups_of[id(layer)] = nxt.groups
        else:
            groups_of[id(layer)] = 1
    for se in model.modules():
        if isinstance(se, SqueezeExcite):
            groups_of[id(se.fc2)] = groups_of[id(layers[layers.index(se.fc1) - 1])]
    if isinstance(model, ShuffleNetV2):
        for stage in model.stages:
            m = len(stage) - 1
            groups_of[id(stage[0].branch1[1][0])] = 2**m
            for i, unit in enumerate(stage):
                groups_of[id(unit.branch2[2][0])] = 2 ** (m - i)
    return groups_of


def _never_dying(module: nn.Module) -> None:
    """Replace activations by identities and hard-sigmoid gates by sigmoids, so
    that nothing is ever 'dead' (exactly 0 / constant for every input): a channel
    is then input-independent only if it is structurally so."""
    for key, child in module.named_children():
        if isinstance(child, (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.SiLU)):
            setattr(module, key, nn.Identity())
        elif isinstance(child, nn.Hardsigmoid):
            setattr(module, key, nn.Sigmoid())
        else:
            _never_dying(child)


def _live_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Indices of the input channels (features, for a Linear) of every conv,
    linear and BatchNorm that vary with the input, by module name."""
    probe = copy.deepcopy(model)
    _never_dying(probe)
    inputs: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_hook(lambda mod, args, out, name=name: inputs.__setitem__(name, args[0]))
        for name, m in probe.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d))
    ]
    with torch.no_grad():
        probe(x)
    for h in hooks:
        h.remove()
    live = {}
    for name, a in inputs.items():
        assert torch.isfinite(a).all()
        varies = (a != a[:1]).transpose(0, 1).reshape(a.shape[1], -1).any(dim=1)
        live[name] = torch.nonzero(varies).flatten()
    return live


def _cut_to_half(name: str) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """Zero, in the default-width model, the channels the half-width model does
    not have; copy what survives into a half-width model.

    Returns (zeroed full model, half-width model, inputs).  Both models compute
    the same function iff the half-width model really is a sub-network."""
    spec = ZOO[name]
    full = build(name)
    x = torch.cat([example_input(name, seed) for seed in range(4)])
    layers = _layers(full)
    groups_of = _halving_groups(full)
    kept: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for layer in layers:
            cout = _io(layer)[1]
            if layer is layers[-1]:
                kept[id(layer)] = torch.arange(cout)
                continue
            per_group = cout // groups_of[id(layer)]
            keep = torch.arange(cout) % per_group < per_group // 2
            kept[id(layer)] = torch.nonzero(keep).flatten()
            layer.weight[~keep] = 0
            if layer.bias is not None:
                layer.bias[~keep] = 0
    live = _live_inputs(full, x)

    half = spec.build(width=spec.width / 2).eval()
    full_mods = [(n, m) for n, m in full.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d))]
    half_mods = [m for m in half.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d))]
    assert len(full_mods) == len(half_mods)
    with torch.no_grad():
        for (mod_name, f), h in zip(full_mods, half_mods):
            cols = live[mod_name]
            if isinstance(f, nn.BatchNorm2d):
                # a BN whose input channel is dead only adds a constant: zero it
                dead = torch.ones(f.num_features, dtype=torch.bool)
                dead[cols] = False
                f.weight[dead] = 0
                f.bias[dead] = 0
                for attr in ("weight", "bias", "running_mean", "running_var"):
                    getattr(h, attr).copy_(getattr(f, attr)[cols])
                continue
            cin, _, groups = _io(f)
            rows = kept[id(f)]
            if cin == 3:
                assert len(cols) == 3
            elif _is_depthwise(f):
                assert cols.tolist() == rows.tolist(), f"{mod_name}: depthwise conv keeps other channels"
            elif _is_grouped(f):
                per_group = cin // groups
                local = [cols[(cols >= g * per_group) & (cols < (g + 1) * per_group)] - g * per_group
                         for g in range(groups)]
                assert all(len(c) == per_group // 2 for c in local), f"{mod_name}: live inputs per group"
            else:
                assert len(cols) == cin // 2, f"{mod_name}: {len(cols)} live inputs of {cin}"
            w = f.weight[rows]
            if _is_grouped(f):
                out_per_group = _io(f)[1] // groups
                w = torch.stack([w[i][local[int(r) // out_per_group]] for i, r in enumerate(rows)])
            elif not _is_depthwise(f):
                w = w[:, cols]
            h.weight.copy_(w)
            if f.bias is not None:
                h.bias.copy_(f.bias[rows])
    return full, half, x


@pytest.mark.parametrize("name", NAMES)
def test_zeroed_full_model_is_the_half_model(name: str) -> None:
    """At the default width, zeroing the upper half of every conv/linear output
    (per :func:`_halving_groups`) leaves exactly half of every layer's inputs
    live, and the zeroed model computes the same function as the half-width
    model holding the surviving weights."""
    full, half, x = _cut_to_half(name)
    with torch.no_grad():
        y_full, y_half = full(x), half(x)
    torch.testing.assert_close(y_half, y_full, rtol=1e-4, atol=1e-4 * float(y_full.abs().max()))


# --------------------------------------------------------------------------- ONNX export


@pytest.mark.parametrize("name", NAMES)
def test_export_torchscript(name: str, tmp_path) -> None:
    _check_export(name, tmp_path, dynamo=False, opset_version=17)


@pytest.mark.parametrize("name", NAMES)
def test_export_torchscript_no_constant_folding(name: str, tmp_path) -> None:
    _check_export(name, tmp_path, dynamo=False, opset_version=17, do_constant_folding=False)


@pytest.mark.parametrize(
    "name", [n if n in DYNAMO_FAST else pytest.param(n, marks=slow) for n in NAMES]
)
def test_export_dynamo(name: str, tmp_path) -> None:
    _check_export(name, tmp_path, dynamo=True)
