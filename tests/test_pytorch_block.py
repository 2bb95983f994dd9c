"""BlockPruner: 1×N block masks while training, re-selection from the dense weights, and filter
rearrangement in the PyTorch model itself (exactly the same function)."""

import copy
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from onnxprune.errors import OnnxPruneError  # noqa: E402
from onnxprune.models import build, example_input  # noqa: E402
from onnxprune.parity import run, session  # noqa: E402
from onnxprune.pruning.block import blocks_to_prune  # noqa: E402
from onnxprune.pytorch import BlockPruner, dependency_groups, export_onnx, speedup  # noqa: E402
from onnxprune.pytorch import block as block_mod  # noqa: E402
from onnxprune.pytorch.masks import dense_weight, effective_weight  # noqa: E402

N = 4
CONFIG = [{"sparsity": 0.5, "op_types": ["Conv2d", "Linear"]}]


def zero_blocks(mask: np.ndarray, n: int = N) -> np.ndarray:
    """(C_out // n, C_in) bool: which 1×n blocks of `mask` (or a weight) are entirely zero."""
    m = np.asarray(mask) != 0
    return ~m.reshape(m.shape[0] // n, n, m.shape[1], -1).any(axis=(1, 3))


def eligible(module) -> bool:
    if isinstance(module, torch.nn.Conv2d):
        return module.groups == 1 and module.out_channels % N == 0
    return isinstance(module, torch.nn.Linear) and module.out_features % N == 0


def outputs(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x).double()


def rel_error(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def producer_l1(model, ch) -> float:
    w = {s.module: dense_weight(model.get_submodule(s.module)).double() for s in ch.producers}
    return sum(float(w[s.module].index_select(s.axis, torch.tensor(s.indices)).abs().sum()) for s in ch.producers)


def row_norms(module) -> torch.Tensor:
    """L1 norm per output row: unchanged by a permutation of the input columns."""
    w = effective_weight(module).double()
    return w.abs().flatten(1).sum(1)


def l1_kept(model, layers) -> float:
    kept = total = 0.0
    for name in layers:
        m = model.get_submodule(name)
        w = m.weight_orig.detach().double().abs()
        kept += float((w * m.weight_mask).sum())
        total += float(w.sum())
    return kept / total


# --- masks ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_exact_block_counts_and_training_keeps_zeros(name):
    torch.manual_seed(0)
    model, x = build(name), example_input(name)
    original = copy.deepcopy(model)
    pruner = BlockPruner(model, CONFIG, n=N)
    pruner.compress()
    modules = dict(model.named_modules())
    pruned = [n for n in pruner.selected if eligible(modules[n])]
    skipped = [n for n in pruner.selected if not eligible(modules[n])]
    assert pruned and skipped and sorted(pruner.pruned_layers()) == sorted(pruned)
    for layer in pruned:
        mask = modules[layer].weight_mask.numpy()
        blocks = zero_blocks(mask)
        assert blocks.sum() == blocks_to_prune(blocks.size, 0.5), layer
        assert set(np.unique(mask.reshape(mask.shape[0] // N, N, mask.shape[1], -1).sum(axis=(1, 3)))) <= {
            0, N * int(np.prod(mask.shape[2:]))}, f"{layer}: a block is partly masked"
    notes = {r.layers[0]: r.note for r in pruner.summary.rows}
    for layer in skipped:  # untouched: no mask, same weights, and the summary says why
        assert not hasattr(modules[layer], "weight_mask")
        assert torch.equal(modules[layer].weight, original.get_submodule(layer).weight)
        assert notes[layer].startswith("skipped: ")

    masks = {layer: modules[layer].weight_mask.bool().clone() for layer in pruned}
    before = {layer: modules[layer].weight_orig.detach().clone() for layer in pruned}
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    model.train()
    for _ in range(3):
        batch = torch.randn((4,) + tuple(x.shape[1:]))
        loss = torch.nn.functional.cross_entropy(model(batch), torch.randint(0, 10, (4,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model(torch.randn((2,) + tuple(x.shape[1:])))  # the pruning hooks recompute `weight` here
    for layer in pruned:
        w = modules[layer].weight.detach()
        assert torch.count_nonzero(w[~masks[layer]]) == 0, layer
    assert any(not torch.equal(modules[layer].weight_orig, before[layer]) for layer in pruned)  # it trained


def test_row_balanced_blocks_while_training():
    """balanced=True: every block row of every pruned layer keeps the same block count, also after
    update_epoch re-selects from the dense weights."""
    torch.manual_seed(0)
    model = build("resnet18")
    pruner = BlockPruner(model, [{"sparsity": 0.7, "op_types": ["Conv2d"]}], n=N, balanced=True)
    pruner.compress()
    for epoch in (0, 1):
        for layer in pruner.pruned_layers():
            kept = ~zero_blocks(model.get_submodule(layer).weight_mask.numpy())
            c_in = kept.shape[1]
            assert kept.sum(axis=1).tolist() == [c_in - blocks_to_prune(c_in, 0.7)] * kept.shape[0], layer
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        pruner.update_epoch(epoch + 1)


def test_linear_and_grouped_layers():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, groups=2),
                                torch.nn.Conv2d(8, 8, 3, groups=8), torch.nn.Flatten(), torch.nn.Linear(8 * 2 * 2, 12),
                                torch.nn.Linear(12, 6))
    pruner = BlockPruner(model, [{"sparsity": 0.5, "op_types": ["Conv2d", "Linear"]}], n=N)
    pruner.compress()
    notes = {r.layers[0]: r.note for r in pruner.summary.rows}
    assert notes["2"] == "skipped: grouped conv (groups=2)"
    assert notes["3"] == "skipped: depthwise conv"
    assert notes["6"] == "skipped: 6 outputs are not a multiple of N=4"
    for layer in ("0", "5"):
        blocks = zero_blocks(model.get_submodule(layer).weight_mask.numpy())
        assert blocks.sum() == blocks_to_prune(blocks.size, 0.5)
    assert "1x4 blocks masked in 2 of 5" in pruner.summary.table()


def test_bad_arguments():
    model = build("resnet18")
    for kwargs, words in [({"n": 0}, "n must be a positive integer"), ({"n": "four"}, "n must be an integer"),
                          ({"criterion": "l2"}, "criterion must be one of"),
                          ({"rearrange": True}, "needs dummy_input")]:
        with pytest.raises(OnnxPruneError, match=words):
            BlockPruner(model, CONFIG, **kwargs)
    with pytest.raises(OnnxPruneError, match="cannot prune BatchNorm2d"):
        BlockPruner(model, [{"sparsity": 0.5, "op_types": ["BatchNorm2d"]}])


# --- re-selection -------------------------------------------------------------------------------

def test_update_epoch_reselects_from_dense_weights():
    torch.manual_seed(0)
    model = build("resnet18")
    layer = "layers.1.0.conv1.0"
    pruner = BlockPruner(model, CONFIG, n=N)
    pruner.compress()
    conv = model.get_submodule(layer)
    masked = np.argwhere(zero_blocks(conv.weight_mask.numpy()))
    row, col = masked[0]
    with torch.no_grad():  # the masked block grows in the dense weights (as training may make it)
        conv.weight_orig[row * N:(row + 1) * N, col] *= 1000
    frozen = BlockPruner(build("resnet18"), CONFIG, n=N, reselect_every_epoch=False)
    assert frozen.update_epoch(0) is frozen.masks
    pruner.update_epoch(1)
    blocks = zero_blocks(conv.weight_mask.numpy())
    assert not blocks[row, col], "the grown block came back"
    assert blocks.sum() == blocks_to_prune(blocks.size, 0.5)  # another block went in its place
    assert pruner.epoch == 1
    w = conv.weight_orig.detach()[row * N:(row + 1) * N, col]
    model(example_input("resnet18"))
    assert torch.equal(conv.weight.detach()[row * N:(row + 1) * N, col], w)


# --- rearrangement ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rearranged_resnet18():
    """resnet18 rearranged (outputs before / after), then 1×4-pruned at 0.7."""
    torch.manual_seed(0)
    x = example_input("resnet18")
    model = build("resnet18")
    original = copy.deepcopy(model)
    config = [{"sparsity": 0.7, "op_types": ["Conv2d", "Linear"]}]
    pruner = BlockPruner(model, config, n=N, rearrange=True, dummy_input=x)
    results = pruner.rearrange_filters()
    rearranged_out = outputs(model, x)
    groups = dependency_groups(model, x)
    pruner.compress()
    return SimpleNamespace(model=model, original=original, x=x, pruner=pruner, results=results, groups=groups,
                           rearranged_out=rearranged_out, config=config)


def test_rearranged_model_computes_the_same_function(rearranged_resnet18):
    r = rearranged_resnet18
    assert rel_error(r.rearranged_out, outputs(r.original, r.x)) <= 1e-5
    moved = [res for res in r.results if res.moved]
    assert len(moved) >= 10
    assert not torch.equal(r.model.get_submodule("stem.0.0").weight_orig, r.original.get_submodule("stem.0.0").weight)
    assert "rearranged" in {row.note for row in r.pruner.summary.rows}


def test_rearranged_groups_have_descending_filter_norms(rearranged_resnet18):
    r = rearranged_resnet18
    moved = {tuple(res.layers) for res in r.results if res.moved}
    checked = 0
    for group in r.groups:
        if tuple(group.layers) not in moved:
            continue
        first = group.channels[0].producers[0].module
        position = [next(s.indices[0] for s in ch.producers if s.module == first) for ch in group.channels]
        norms = np.array([producer_l1(r.model, ch) for ch in group.channels])[np.argsort(position)]
        assert np.all(np.diff(norms) <= 1e-9 * norms.max()), group.layers
        checked += 1
    assert checked == len(moved)


def test_rearrangement_keeps_more_l1_mass(rearranged_resnet18):
    r = rearranged_resnet18
    plain_model = build("resnet18")
    plain = BlockPruner(plain_model, r.config, n=N)
    plain.compress()
    layers = r.pruner.pruned_layers()
    assert layers == plain.pruned_layers()
    assert l1_kept(r.model, layers) >= l1_kept(plain_model, layers)


def test_rearranged_export_has_the_masks_block_sparsity(rearranged_resnet18):
    r = rearranged_resnet18
    proto = export_onnx(r.model, r.x, "torchscript")
    inits = {i.name: i for i in proto.graph.initializer}
    from onnx import numpy_helper

    for layer in r.pruner.pruned_layers():
        w = numpy_helper.to_array(inits[f"{layer}.weight"])
        mask = r.model.get_submodule(layer).weight_mask.numpy()
        assert np.array_equal(zero_blocks(w), zero_blocks(mask)), layer


def test_flatten_columns_move_as_blocks():
    """vgg11_bn flattens a 2×2 map: a channel owns 4 consecutive Linear inputs, moved together."""
    torch.manual_seed(0)
    x = example_input("vgg11_bn")
    model = build("vgg11_bn")
    original = copy.deepcopy(model)
    pruner = BlockPruner(model, [{"sparsity": 0.5, "op_names": ["features.11.0"]}], n=N, rearrange=True,
                         dummy_input=x)
    (result,) = pruner.rearrange_filters()
    assert result.moved and result.layers == ["features.11.0"]
    assert rel_error(outputs(model, x), outputs(original, x)) <= 1e-5
    old_rows, new_rows = original.get_submodule("features.11.0").weight, model.get_submodule("features.11.0").weight
    old_cols, new_cols = original.classifier[1].weight, model.classifier[1].weight
    hw = old_cols.shape[1] // old_rows.shape[0]
    assert hw == 4
    for p in range(new_rows.shape[0]):
        q = next(q for q in range(old_rows.shape[0]) if torch.equal(new_rows[p], old_rows[q]))
        assert torch.equal(new_cols[:, p * hw:(p + 1) * hw], old_cols[:, q * hw:(q + 1) * hw])
    assert not torch.equal(new_rows, old_rows)


def test_shuffle_groups_stay_in_place():
    torch.manual_seed(0)
    x = example_input("shufflenet_v2")
    model = build("shufflenet_v2")
    original = copy.deepcopy(model)
    pruner = BlockPruner(model, CONFIG, n=N, rearrange=True, dummy_input=x)
    results = pruner.rearrange_filters()
    assert rel_error(outputs(model, x), outputs(original, x)) <= 1e-5
    kept = [res for res in results if not res.moved]
    assert kept and all("shuffle" in res.reason for res in kept)
    assert any(res.moved for res in results)
    moved_layers = {layer for res in results if res.moved for layer in res.layers}
    kept_only = {layer for res in kept for layer in res.layers} - moved_layers
    assert kept_only
    for layer in kept_only:  # rows did not move (row norms are blind to permuted input columns)
        assert torch.equal(row_norms(model.get_submodule(layer)), row_norms(original.get_submodule(layer))), layer
    pruner.compress()
    notes = {row.layers[0]: row.note for row in pruner.summary.rows}
    for layer in kept_only & set(pruner.pruned_layers()):
        assert notes[layer].startswith("not rearranged: ") and "shuffle" in notes[layer]


def test_failed_rearrangement_restores_the_model(monkeypatch):
    torch.manual_seed(0)
    x = example_input("resnet18")
    model = build("resnet18")
    state = copy.deepcopy(model.state_dict())
    real = block_mod.tensor_gathers

    def forget_readers(group, order):  # a broken permutation: the readers' columns stay put
        return [g for g in real(group, order) if g[2] == 0]

    monkeypatch.setattr(block_mod, "tensor_gathers", forget_readers)
    pruner = BlockPruner(model, CONFIG, n=N, rearrange=True, dummy_input=x)
    with pytest.raises(OnnxPruneError, match="changed the model's output.*restored"):
        pruner.compress()
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert not pruner.rearranged and not hasattr(model.stem[0][0], "weight_mask")


def test_optimizer_state_is_permuted_with_the_parameters():
    torch.manual_seed(0)
    x = example_input("resnet18")
    model = build("resnet18")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():  # momentum equal to the parameter: a permutation keeps them equal
        opt.state[p]["momentum_buffer"] = p.detach().clone()
    pruner = BlockPruner(model, CONFIG, n=N, rearrange=True, dummy_input=x, optimizer=opt)
    pruner.rearrange_filters()
    assert any(r.moved for r in pruner.rearrangement)
    for p in model.parameters():
        assert torch.equal(opt.state[p]["momentum_buffer"], p.detach())


# --- speedup ------------------------------------------------------------------------------------

def dead_outputs(model, groups) -> dict[str, int]:
    """Per producer: output channels 1×N masks killed wholly (every producer row zero, or every
    Conv/Linear column reading it zero): the only ones `simplify` may remove."""
    def zero(s):
        w = effective_weight(model.get_submodule(s.module))
        return not bool(w.index_select(s.axis, torch.tensor(s.indices)).any())

    dead: dict[str, int] = {}
    for group in groups:
        for ch in group.channels:
            readers = [s for s in ch.slices if s.param == "weight" and s.axis == 1
                       and isinstance(model.get_submodule(s.module), (torch.nn.Conv2d, torch.nn.Linear))]
            if all(zero(s) for s in ch.producers) or (readers and all(zero(s) for s in readers)):
                for s in ch.producers:
                    dead[s.module] = dead.get(s.module, 0) + len(s.indices)
    return dead


def test_speedup_of_block_pruned_model():
    torch.manual_seed(0)
    x = example_input("resnet18")
    model = build("resnet18")
    BlockPruner(model, CONFIG, n=N).compress()
    dense = export_onnx(model, x, "torchscript")
    module_of = {n.name: n.input[1][: -len(".weight")] for n in dense.graph.node if n.op_type == "Conv"}
    small, _ = speedup(model, x, exporter="torchscript", align=1)
    got = run(session(small), {small.graph.input[0].name: x.numpy()})[0]
    assert rel_error(torch.from_numpy(got).double(), outputs(model, x)) <= 1e-4
    # 1×N zeros are not structured: a Conv keeps every output channel but those the masks
    # happened to kill wholly (with align=1 nothing is kept for alignment)
    dead = dead_outputs(model, dependency_groups(model, x))
    inits = {i.name: i for i in small.graph.initializer}
    convs = [n for n in small.graph.node if n.op_type == "Conv"]
    assert len(convs) == len(module_of)
    for node in convs:
        layer = module_of[node.name]
        assert inits[node.input[1]].dims[0] == model.get_submodule(layer).out_channels - dead.get(layer, 0), layer
