"""Parity PyTorch <-> onnxruntime for the simplified zoo models, under random and group-consistent masks."""

import numpy as np
import pytest
import torch

from onnxprune.models import ZOO, build, example_input
from onnxprune.models.masks import conv_linear_weight_count, zero_random_filters, zero_upper_half
from onnxprune import simplify

from .zoo_util import assert_matches_torch, export, layer_weight_count, run_ort

@pytest.mark.parametrize("name,mode", [(n, m) for n in ZOO for m in ("ts_folded", "ts_bn", "dynamo")])
def test_random_half_of_filters_zeroed(name, mode):
    """50% of every layer's filters zeroed at random (weights only): exact, and MACs drop."""
    model = build(name)
    zero_random_filters(model, 0.5, seed=1)
    x = example_input(name)
    with torch.no_grad():
        ref = model(x).numpy()
    small, report = simplify(export(model, x, mode))
    assert_matches_torch(run_ort(small, x.numpy()), ref, rel=1e-4)
    assert report.after.macs < report.before.macs


@pytest.mark.parametrize("name,mode", [(n, m) for n in ZOO for m in ("ts_folded", "ts_bn")])
def test_group_consistent_masks_give_the_half_width_model(name, mode):
    """Zeroing the upper half of every class (all its producers) removes exactly those channels:
    the Conv/Gemm weight count equals that of the independently built half-width model."""
    model = build(name)
    zero_upper_half(model)
    x = example_input(name)
    with torch.no_grad():
        ref = model(x).numpy()
    small, report = simplify(export(model, x, mode), align=1)
    assert_matches_torch(run_ort(small, x.numpy()), ref, rel=1e-4)
    half = build(name, width=ZOO[name].width / 2)
    assert layer_weight_count(small) == conv_linear_weight_count(half)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_unpruned_model_only_loses_batchnorm(name):
    """Nothing zeroed: simplify folds BN and must not change any layer's channels."""
    model = build(name)
    x = example_input(name)
    small, report = simplify(export(model, x, "ts_bn"))
    assert report.changed_layers() == []
    assert "BatchNormalization" not in report.after.ops
    with torch.no_grad():
        assert_matches_torch(run_ort(small, x.numpy()), model(x).numpy(), rel=1e-4)


def export_dynamic_batch(model, x):
    import io
    import warnings

    import onnx

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=17, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    return onnx.load_from_string(buf.getvalue())


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "vgg11_bn", "shufflenet_v2"])
def test_dynamic_batch_export(name):
    """Exports with a symbolic batch axis: simplified the same way, any batch size works, and
    MACs are reported per input item."""
    model = build(name)
    zero_random_filters(model, 0.5, seed=2)
    x = example_input(name)
    small, report = simplify(export_dynamic_batch(model, x))
    assert 0 < report.after.macs < report.before.macs
    batch = torch.cat([x, 2 * x, -x])
    with torch.no_grad():
        assert_matches_torch(run_ort(small, batch.numpy()), model(batch).numpy(), rel=1e-4)


def test_dynamic_batch_channel_shuffle_is_removed_through():
    """x.view(x.size(0), g, c // g, h, w) with a symbolic batch: the shape is computed at run time,
    but its batch piece is the reshaped tensor's own dim 0; cleanup writes it as 0 (copy) and the
    shuffle's channels are tracked: the half mask gives exactly the half-width model."""
    model = build("shufflenet_v2")
    zero_upper_half(model)
    x = example_input("shufflenet_v2")
    small, report = simplify(export_dynamic_batch(model, x), align=1)
    assert layer_weight_count(small) == conv_linear_weight_count(build("shufflenet_v2", width=ZOO["shufflenet_v2"].width / 2))
    batch = torch.cat([x, -x])
    with torch.no_grad():
        assert_matches_torch(run_ort(small, batch.numpy()), model(batch).numpy(), rel=1e-4)


def export_dynamic_size(model, x):
    import io
    import warnings

    import onnx

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=17, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}, "y": {0: "n"}})
    return onnx.load_from_string(buf.getvalue())


@pytest.mark.parametrize("name", ["resnet18", "densenet"])
def test_symbolic_image_size_removes_constant_channels_exactly_at_any_size(name):
    """An export with a symbolic H×W: the constant channels read by padded convs go too (their
    border maps are made from the input's shape at run time), and the result matches PyTorch at
    sizes the parity check never saw."""
    model = build(name)
    zero_upper_half(model)
    x = example_input(name)
    small, _ = simplify(export_dynamic_size(model, x), align=1, inputs=[{"x": x.numpy()}])
    assert layer_weight_count(small) == conv_linear_weight_count(build(name, width=ZOO[name].width / 2))
    for size in ((x.shape[2] + 8, x.shape[3] + 8), (x.shape[2] + 5, x.shape[3] - 3), (x.shape[2] * 2, x.shape[3])):
        other = torch.randn(2, x.shape[1], *size, generator=torch.Generator().manual_seed(sum(size)))
        with torch.no_grad():
            assert_matches_torch(run_ort(small, other.numpy()), model(other).numpy(), rel=1e-4)
