"""1xN block pruning: masks, model-level pruning and what is skipped."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune import prune
from onnxprune.pruning import block_prune_weights, block_sparsity


@pytest.mark.parametrize("n", [1, 2, 4, 8])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_mask_zeroes_whole_blocks_at_requested_sparsity(n, sparsity):
    rng = np.random.default_rng(n)
    w = rng.standard_normal((16, 6, 3, 3)).astype(np.float32)
    mask = block_prune_weights(w, n, sparsity)
    assert mask.shape == w.shape and mask.dtype == bool
    blocks = mask.reshape(16 // n, n, 6, 9)
    # a block is kept or dropped as a whole
    assert np.all(blocks.all(axis=(1, 3)) == blocks.any(axis=(1, 3)))
    dropped = 1 - blocks.any(axis=(1, 3)).mean()
    num_blocks = 16 // n * 6
    assert dropped == pytest.approx(np.ceil(sparsity * num_blocks - 1e-9) / num_blocks)
    assert dropped >= sparsity - 1e-9
    assert block_sparsity(np.where(mask, w, 0), n) == pytest.approx(dropped)


def test_l1_criterion_drops_the_smallest_blocks():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 10, 1, 1)).astype(np.float32)
    mask = block_prune_weights(w, 4, 0.5)
    norms = np.abs(w.reshape(2, 4, 10)).sum(axis=1)
    kept = mask.reshape(2, 4, 10)[:, 0, :]
    assert norms[~kept].max() <= norms[kept].min()


def test_random_criterion_is_reproducible_with_rng():
    w = np.ones((8, 8, 3, 3), np.float32)
    a = block_prune_weights(w, 2, 0.5, criterion="random", rng=np.random.default_rng(3))
    b = block_prune_weights(w, 2, 0.5, criterion="random", rng=np.random.default_rng(3))
    assert np.array_equal(a, b)


@pytest.mark.parametrize("bad", [dict(n=3), dict(sparsity=1.0), dict(sparsity=-0.1),
                                 dict(criterion="l2")])
def test_bad_arguments_raise(bad):
    args = dict(n=4, sparsity=0.5, criterion="l1") | bad
    with pytest.raises(ValueError):
        block_prune_weights(np.ones((8, 4, 1, 1), np.float32), args["n"], args["sparsity"],
                            criterion=args["criterion"])


def _conv(name, x, w, group=1, pads=1):
    return helper.make_node("Conv", [x, w], [name], name=name, group=group,
                            pads=[pads] * 4, kernel_shape=[3 if pads else 1] * 2)


def _model():
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w0"),
        numpy_helper.from_array(rng.standard_normal((8, 1, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal((16, 8, 1, 1)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.standard_normal((6, 16, 3, 3)).astype(np.float32), "w3"),
    ]
    nodes = [_conv("c0", "x", "w0"), _conv("c1", "c0", "w1", group=8),
             _conv("c2", "c1", "w2", pads=0), _conv("c3", "c2", "w3")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("c3", TensorProto.FLOAT, [1, 6, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def test_1xn_prunes_eligible_convs_and_reports_the_rest():
    model = _model()
    pruned, report = prune(model, criterion="l1", granularity="1xN", n=4, sparsity=0.75, prune_last=True)
    by_node = {r.name: r for r in report.layers}
    assert by_node["c0"].requested is None and "first" in by_node["c0"].note
    assert by_node["c1"].requested is None and "depthwise" in by_node["c1"].note
    assert by_node["c3"].requested is None and "multiple" in by_node["c3"].note
    assert by_node["c2"].requested == 0.75 and by_node["c2"].achieved == pytest.approx(0.75)
    weights = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    originals = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for name in ("w0", "w1", "w3"):
        assert np.array_equal(weights[name], originals[name])
    assert block_sparsity(weights["w2"], 4) == pytest.approx(0.75)
    # the input model is left alone, the output still runs
    assert block_sparsity(originals["w2"], 4) == 0
    onnx.checker.check_model(pruned)
    out = ort.InferenceSession(pruned.SerializeToString()).run(
        None, {"x": np.ones((1, 3, 8, 8), np.float32)})[0]
    assert out.shape == (1, 6, 8, 8)


def test_1xn_can_include_the_first_conv():
    _, report = prune(_model(), criterion="l1", granularity="1xN", n=4, sparsity=0.5, prune_first=True)
    assert {r.name: r.requested for r in report.layers}["c0"] == 0.5


def test_1xn_never_zeroes_a_whole_layer():
    """A layer with a single block keeps it: an all-zero layer is a constant, not a pruned layer."""
    w = np.random.default_rng(0).standard_normal((4, 1, 3, 3))
    assert block_prune_weights(w, 4, 0.9).any()


@pytest.mark.parametrize("n, sparsity", [(1, 0.5), (4, 0.3), (4, 0.7), (8, 0.9)])
def test_row_balanced_blocks_prune_each_row_alike_and_its_weakest(n, sparsity):
    """Every block row loses ceil(sparsity * C_in) blocks, its own lowest L1 norms (rows scaled
    10x apart, so a layer-wide ranking would empty the weak rows instead)."""
    rng = np.random.default_rng(7)
    w = rng.standard_normal((32, 12, 3, 3)).astype(np.float32)
    w *= (10.0 ** (np.arange(32) // n % 3)).reshape(-1, 1, 1, 1).astype(np.float32)
    mask = block_prune_weights(w, n, sparsity, balanced=True)
    kept = mask.reshape(32 // n, n, 12, 9).any(axis=(1, 3))  # (block rows, C_in)
    per_row = kept.sum(axis=1)
    assert per_row.tolist() == [12 - int(np.ceil(sparsity * 12 - 1e-9))] * (32 // n)
    norms = np.abs(w.reshape(32 // n, n, 12, 9)).sum(axis=(1, 3))
    for row in range(32 // n):
        assert norms[row][~kept[row]].max() <= norms[row][kept[row]].min()
    unbalanced = block_prune_weights(w, n, sparsity).reshape(32 // n, n, 12, 9).any(axis=(1, 3))
    assert len(set(unbalanced.sum(axis=1).tolist())) > 1  # the global ranking is not balanced here


def test_balanced_model_pruning_and_its_refusal_outside_1xn():
    from onnxprune.errors import OnnxPruneError

    pruned, _ = prune(_model(), granularity="1xN", n=4, sparsity=0.5, balanced=True)
    w2 = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}["w2"]
    assert (w2.reshape(4, 4, 8) != 0).any(axis=1).sum(axis=1).tolist() == [4, 4, 4, 4]
    with pytest.raises(OnnxPruneError, match="--balanced applies to 1xN"):
        prune(_model(), sparsity=0.5, granularity="filter", balanced=True)
