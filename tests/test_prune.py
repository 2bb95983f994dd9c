"""onnxprune prune: criteria against hand-computed values, exact per-layer sparsity on the zoo,
dependency-aware pruning + simplify = the half-width model, rearrange parity, bad configs."""

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from onnxprune.models import ZOO, build, example_input
from onnxprune.models.masks import conv_linear_weight_count
from onnxprune import OnnxPruneError, prune, rearrange, simplify
from onnxprune.cli import main
from onnxprune.parity import compare
from onnxprune.pruning import criteria
from onnxprune.pruning.block import block_scores

from .zoo_util import export, layer_weight_count

CI_MODELS = ["resnet18", "mobilenet_v2", "densenet", "resnext", "googlenet", "efficientnet_b0"]


def zoo_params(names=None):
    for name in ZOO:
        marks = [] if names is None or name in names else [pytest.mark.slow]
        yield pytest.param(name, marks=marks, id=name)


# --- criteria against small hand-computed examples ------------------------------------------

W = np.array([[1.0, -2.0], [0.0, 3.0], [-1.0, -1.0]])  # three filters of two weights


def test_l1_l2_by_hand():
    np.testing.assert_allclose(criteria.l1(W), [3.0, 3.0, 2.0])
    np.testing.assert_allclose(criteria.l2(W), [np.sqrt(5), 3.0, np.sqrt(2)])


def test_fpgm_by_hand():
    # distances: d01 = |(1,-5)| = √26, d02 = |(2,-1)| = √5, d12 = |(1,4)| = √17
    d01, d02, d12 = np.sqrt(26), np.sqrt(5), np.sqrt(17)
    np.testing.assert_allclose(criteria.fpgm(W), [d01 + d02, d01 + d12, d02 + d12])
    # sums: 7.34, 9.22, 6.36 — filter 2 is nearest the others (the geometric median): it goes first
    assert criteria.lowest(criteria.fpgm(W), 1)[0] == 2


def test_apoz_and_mean_activation_by_hand():
    act = np.array([[[0.0, 1.0], [2.0, 2.0]], [[0.0, 0.0], [4.0, 0.0]]])  # [N=2, C=2, L=2]
    np.testing.assert_allclose(criteria.apoz(act, axis=1), [1 - 3 / 4, 1 - 1 / 4])
    np.testing.assert_allclose(criteria.mean_activation(act, axis=1), [0.25, 2.0])


def test_level_mask_exact_count():
    w = np.random.default_rng(0).standard_normal((8, 4, 3, 3))
    keep = criteria.level_mask(w, 0.7)
    assert (~keep).sum() == round(0.7 * w.size)
    assert np.abs(w[~keep]).max() <= np.abs(w[keep]).min()


def test_group_reduce():
    a, b = np.array([1.0, 4.0]), np.array([3.0, 2.0])
    assert list(criteria.reduce([a, b], "sum")) == [4.0, 6.0]
    assert list(criteria.reduce([a, b], "mean")) == [2.0, 3.0]
    assert list(criteria.reduce([a, b], "max")) == [3.0, 4.0]


# --- the zoo ----------------------------------------------------------------------------------

def onnx_model(name):
    return export(build(name), example_input(name), "ts_folded")


@pytest.mark.filterwarnings("ignore:no calibration inputs")
@pytest.mark.parametrize("criterion", ["l1", "l2", "fpgm", "random", "apoz", "mean_activation"])
@pytest.mark.parametrize("name", list(zoo_params(["resnet18", "mobilenet_v2"])))
def test_filter_sparsity_per_layer_is_as_requested(name, criterion):
    pruned, report = prune(onnx_model(name), criterion=criterion, sparsity=0.5, calib=None)
    for r in report.layers:
        if r.requested is None or "pinned" in r.note:
            continue
        n_out = r.shape[1] if r.op == "ConvTranspose" else r.shape[0]
        assert abs(r.achieved - r.requested) <= 1.0 / n_out + 1e-9, r


@pytest.mark.parametrize("name", list(zoo_params(CI_MODELS)))
def test_pruning_every_bucket_in_half_and_simplifying_gives_the_half_width_model(name):
    """Dependency-aware: half of every coupled channel group zeroed in all its producers; simplify
    removes them everywhere, and what is left has exactly the weights of the half-width model."""
    if name == "shufflenet_v2":
        pytest.skip("halves picked by importance are not the half model's layout after a shuffle")
    model = onnx_model(name)
    pruned, report = prune(model, criterion="l1", sparsity=0.5, prune_first=True)
    small, srep = simplify(pruned, align=1)
    assert srep.parity.passed
    assert layer_weight_count(small) == conv_linear_weight_count(build(name, width=ZOO[name].width / 2))


@pytest.mark.parametrize("name", list(zoo_params(CI_MODELS + ["shufflenet_v2", "squeezenet", "inception"])))
def test_rearrange_is_exact(name):
    model = onnx_model(name)
    out, moved, parity = rearrange(model)
    assert moved > 0 and parity.passed
    rep = compare(model, out, atol=1e-5, rtol=1e-4)
    assert rep.passed


@pytest.mark.parametrize("n", [2, 4, 8])
def test_rearranged_1xn_keeps_at_least_as_much_block_mass(n):
    model = onnx_model("resnet18")
    kept = {}
    for flag in (False, True):
        pruned, report = prune(model, criterion="l1", granularity="1xN", n=n, sparsity=0.7, rearrange=flag)
        g = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
        kept[flag] = sum(np.abs(g[name]).sum() for name in report.masks)
        for r in report.layers:
            if r.requested is not None:
                assert abs(r.achieved - r.requested) <= n / r.shape[0] / r.shape[1] + 0.01, r
    assert kept[True] >= kept[False] * (1 - 1e-6)


def test_level_sparsity_exact():
    pruned, report = prune(onnx_model("vgg11_bn"), criterion="level", sparsity=0.8)
    for r in report.layers:
        if r.requested is not None:
            assert abs(r.achieved - 0.8) <= 1 / np.prod(r.shape)


def test_1xn_skips_what_it_cannot_block():
    pruned, report = prune(onnx_model("mobilenet_v2"), criterion="l1", granularity="1xN", n=4, sparsity=0.5)
    notes = {r.note for r in report.layers}
    assert any("depthwise" in note for note in notes)


def test_config_list_per_layer(tmp_path):
    model = onnx_model("resnet18")
    names = [n.name for n in model.graph.node if n.op_type == "Conv"]
    config = tmp_path / "prune.yaml"
    config.write_text(f"- sparsity: 0.25\n  op_types: [Conv]\n- sparsity: 0.75\n  op_names: ['{names[1]}']\n"
                      f"- exclude: true\n  op_names: ['{names[3]}']\n")
    pruned, report = prune(model, criterion="l1", config=str(config))
    by_name = {r.name: r for r in report.layers}
    assert by_name[names[1]].requested == 0.75 and abs(by_name[names[1]].achieved - 0.75) < 1e-9
    assert by_name[names[3]].requested is None and by_name[names[3]].achieved == 0
    assert by_name[names[0]].requested is None  # the first layer is left alone by default


@pytest.mark.parametrize("config,message", [
    ([{"sparsity": 0.5, "op_names": ["no_such_layer"]}], "no prunable layer named"),
    ([{"sparsity": 1.5, "op_types": ["Conv"]}], "[0, 1)"),
    ([{"sparsity": 0.5, "op_types": ["Softmax"]}], "cannot be pruned"),
    ([{"sparsity": 0.5, "op_types": ["Conv"], "typo": 1}], "unknown key"),
    ([{"op_types": ["Conv"]}], "needs sparsity"),
])
def test_bad_configs(config, message):
    with pytest.raises(OnnxPruneError, match=message.replace("[", r"\[").replace(")", r"\)")):
        prune(onnx_model("resnet18"), criterion="l1", config=config)


def test_bad_arguments():
    model = onnx_model("resnet18")
    with pytest.raises(OnnxPruneError, match=r"\[0, 1\)"):
        prune(model, criterion="l1", sparsity=1.0)
    with pytest.raises(OnnxPruneError, match="N=7"):
        prune(model, criterion="l1", granularity="1xN", n=7, sparsity=0.5)
    with pytest.raises(OnnxPruneError, match="does not go with"):
        prune(model, criterion="level", granularity="filter", sparsity=0.5)


def test_apoz_prefers_dead_channels():
    """A channel that ReLU always zeroes has APoZ 1: it is pruned first, whatever its weight norm."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((4, 3, 1, 1)).astype(np.float32) * 0.1
    w1[2] = np.abs(w1[2]) * 100  # the biggest filter ...
    b1 = np.zeros(4, np.float32)
    b1[2] = -1e4                  # ... is always negative before the ReLU
    w2 = rng.standard_normal((5, 4, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="c1"), helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="c2"), helper.make_node("Relu", ["c2"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, 4, 4])],
                          [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"))])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    calib = [{"x": np.abs(rng.standard_normal((1, 3, 4, 4))).astype(np.float32)} for _ in range(3)]
    config = [{"sparsity": 0.25, "op_names": ["c1"]}]
    for criterion, dropped in (("apoz", 2), ("l1", None)):
        pruned, report = prune(model, criterion=criterion, config=config, prune_first=True, calib=calib)
        w = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}["w1"]
        zero = [i for i in range(4) if not w[i].any()]
        assert len(zero) == 1
        if dropped is not None:
            assert zero == [dropped]
        else:
            assert zero != [2]


def test_cli_prune_simplify_and_masks_round_trip(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    onnx.save(onnx_model("resnet18"), src)
    out, masks = tmp_path / "p.onnx", tmp_path / "masks.npz"
    assert main(["prune", str(src), "-o", str(out), "--criterion", "fpgm", "--sparsity", "0.5", "--simplify",
                 "--save-masks", str(masks)]) == 0
    again = tmp_path / "again.onnx"
    assert main(["prune", str(src), "-o", str(again), "--masks", str(masks)]) == 0
    assert main(["check", str(again), str(out)]) == 0  # simplify(prune(m)) == m with the masks applied
    capsys.readouterr()
    assert main(["prune", str(src), "-o", str(tmp_path / "x.onnx")]) == 2
    assert "--sparsity" in capsys.readouterr().err
    assert main(["rearrange", str(src), "-o", str(tmp_path / "r.onnx")]) == 0
    assert "PASS" in capsys.readouterr().out
