"""Transformers (ViT, BERT-, GPT-, LLaMA-style; models/transformers.py) through both exporters, at a
fixed and at a symbolic sequence length (ViT: batch): zeroed MLP neurons and zeroed attention heads
are removed exactly — the result has the linear layers of the same architecture built with fewer
neurons and fewer heads, the reshapes name the new head count, and onnxruntime's output equals the
PyTorch model's. Hand-built graphs check each attention rule, and its traps, on its own."""

from __future__ import annotations

import io
import warnings
from collections import Counter
from functools import lru_cache

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from onnxprune import prune, simplify
from onnxprune.cli import main
from onnxprune.graph import static_shapes
from onnxprune.models.masks import conv_linear_weight_count
from onnxprune.models.transformers import HEADS, SEQ, TRANSFORMERS, mlps, zero_head_contributions, zero_mlp_neurons

from .zoo_util import assert_matches_torch, layer_weight_count

EXPORTERS = ("torchscript", "dynamo")
CASES = [(name, exporter) for name in TRANSFORMERS for exporter in EXPORTERS]
NORM = ("statistics over the hidden axis", "reduces over the channel axis")  # LayerNormalization, RMSNorm


def export(model: nn.Module, inputs: tuple, exporter: str, dynamic: bool = False) -> onnx.ModelProto:
    """`dynamic`: the sequence axis of token inputs (the batch axis of images) is symbolic."""
    axis = 0 if inputs[0].dtype.is_floating_point else 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            shapes = tuple({axis: torch.export.Dim("n", min=2, max=SEQ)} for _ in inputs) if dynamic else None
            return torch.onnx.export(model, inputs, dynamo=True, verbose=False, dynamic_shapes=shapes).model_proto
        names = [f"input{i}" for i in range(len(inputs))]
        buf = io.BytesIO()
        torch.onnx.export(model, inputs, buf, dynamo=False, opset_version=17, do_constant_folding=False,
                          input_names=names, dynamic_axes={n: {axis: "n"} for n in names} if dynamic else None)
        return onnx.load_from_string(buf.getvalue())


def feeds(model: onnx.ModelProto, inputs: tuple) -> dict:
    return {i.name: t.numpy() for i, t in zip(model.graph.input, inputs)}


def run_all(model: onnx.ModelProto, inputs: tuple) -> np.ndarray:
    """The first output on onnxruntime (optimizations off), every graph input fed by name."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    model.ir_version = min(model.ir_version, 10)
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    assert len(names) == len(inputs)
    return sess.run(None, {n: t.numpy() for n, t in zip(names, inputs)})[0]


def torch_output(model: nn.Module, inputs: tuple) -> np.ndarray:
    with torch.no_grad():
        return model(*inputs).numpy()


def linear_shapes(model: onnx.ModelProto) -> Counter:
    """(in, out) features of every MatMul / Gemm whose weight matrix is an initializer."""
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    shapes = Counter()
    for n in model.graph.node:
        if n.op_type in ("MatMul", "Gemm") and n.input[1] in inits and len(inits[n.input[1]]) == 2:
            rows, cols = inits[n.input[1]]
            trans_b = n.op_type == "Gemm" and any(a.name == "transB" and a.i for a in n.attribute)
            shapes[(cols, rows) if trans_b else (rows, cols)] += 1
    return shapes


def torch_linear_shapes(model: nn.Module) -> Counter:
    return Counter((m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear))


def attention_heads(model: onnx.ModelProto) -> list[int]:
    """The head count of every attention: axis 1 of each Softmax's scores [B, h, N, N], as shape
    inference on the rewritten model finds it (so from the rewritten reshapes)."""
    shapes = static_shapes(model)
    return [shapes[n.input[0]][1] for n in model.graph.node if n.op_type == "Softmax"]


@lru_cache(maxsize=None)
def dense_export(name: str, exporter: str) -> bytes:
    spec = TRANSFORMERS[name]
    return export(spec.build(), spec.example_input(), exporter).SerializeToString()


def example(name: str, dynamic: bool) -> tuple:
    """The example inputs; with a symbolic batch (the image models), two images, so that the batch is not 1."""
    spec = TRANSFORMERS[name]
    inputs = spec.example_input()
    if dynamic and inputs[0].dtype.is_floating_point:
        inputs = (torch.cat([inputs[0], spec.example_input(seed=1)[0]]),)
    return inputs


# Swin at a symbolic batch: its attention mask splits the [B·nW, h, N, N] scores into [B, nW, h, N, N];
# with B unknown nothing proves which axis the heads land on, so they stay (test below)
MATRIX = [(name, exporter, dynamic) for name, exporter in CASES for dynamic in (False, True)
          if not (name == "swin" and dynamic)]


@pytest.mark.parametrize("part", ["values", "outputs"])
@pytest.mark.parametrize("name,exporter,dynamic", MATRIX)
def test_half_of_the_heads_and_neurons_are_removed(name, exporter, dynamic, part):
    """Half of every attention's heads made dead — their v rows zeroed (biases kept: each such head
    outputs its v bias, which the output projection absorbs) or their output columns — and half of
    every MLP's neurons (GELU of a bias; silu(0)·0 = 0): what remains has exactly the linear layers
    of the architecture built with half the heads and half the MLP width, and its reshapes name the
    new head count. In LLaMA whole groups go: a k / v head with both of its query heads."""
    spec = TRANSFORMERS[name]
    model = spec.build()
    dead = zero_head_contributions(model, 0.5, seed=1, part=part)
    assert dead == len(mlps(model)) * HEADS // 2
    zero_mlp_neurons(model, 0.5, seed=1)
    inputs = example(name, dynamic)
    onnx_model = export(model, inputs, exporter, dynamic)
    small, report = simplify(onnx_model, align=1, inputs=[feeds(onnx_model, inputs)])
    assert_matches_torch(run_all(small, inputs), torch_output(model, inputs), rel=1e-4)
    smaller = spec.build(heads=HEADS // 2, mlp=spec.mlp // 2)
    assert linear_shapes(small) == torch_linear_shapes(smaller)
    assert layer_weight_count(small) == conv_linear_weight_count(smaller)
    assert attention_heads(small) == [HEADS // 2] * len(mlps(model))
    if not dynamic:  # (symbolic: a position table sliced to the sequence length pins it first)
        # the residual stream stays for its own reason: LayerNorm / RMSNorm statistics over the hidden axis
        assert any(why in reason and reason.endswith("width stays") for reason in report.classes["pinned"] for why in NORM)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_swin_at_a_symbolic_batch_keeps_its_heads_exactly(exporter):
    """The window split of a dynamic batch cannot be followed: heads stay (MLP neurons still go),
    the result is exact and the report says which reshape holds them."""
    spec = TRANSFORMERS["swin"]
    model = spec.build()
    zero_head_contributions(model, 0.5, seed=1)
    zero_mlp_neurons(model, 0.5, seed=1)
    inputs = example("swin", True)
    onnx_model = export(model, inputs, exporter, True)
    small, report = simplify(onnx_model, align=1, inputs=[feeds(onnx_model, inputs)])
    assert_matches_torch(run_all(small, inputs), torch_output(model, inputs), rel=1e-4)
    assert attention_heads(small) == [HEADS] * 2
    assert linear_shapes(small) == torch_linear_shapes(spec.build(mlp=spec.mlp // 2))
    assert any("Reshape" in r and "moves the channels in a way not understood" in r for r in report.classes["pinned"])


@pytest.mark.parametrize("name,exporter", CASES)
def test_zeroed_query_and_key_alone_keep_every_head(name, exporter):
    """The q and k rows of a head zeroed (biases kept) make its scores a constant per head and its
    attention uniform: the head then outputs the mean of v over the tokens, which depends on the
    input. Nothing may go; the result is exact."""
    spec = TRANSFORMERS[name]
    model = spec.build()
    with torch.no_grad():
        for attn in (m for m in model.modules() if hasattr(m, "head_rows")):
            for lin, start, size in attn.head_rows(0)[:2]:
                lin.weight[start: start + size] = 0
    inputs = spec.example_input()
    small, _ = simplify(export(model, inputs, exporter), align=1)
    assert_matches_torch(run_all(small, inputs), torch_output(model, inputs), rel=1e-4)
    assert linear_shapes(small) == torch_linear_shapes(model)


def test_a_kv_head_with_one_live_query_head_stays():
    """GQA: the output columns of query head 0 zeroed, but head 1 reads the same k / v head: the
    k / v head, and with it both query heads (the repeat cannot drop one copy), stay."""
    spec = TRANSFORMERS["llama"]
    model = spec.build()
    with torch.no_grad():
        for attn in (m for m in model.modules() if hasattr(m, "head_rows")):
            for lin, start, size in attn.output_columns(0):
                lin.weight[:, start: start + size] = 0
    inputs = spec.example_input()
    small, _ = simplify(export(model, inputs, "dynamo"), align=1)
    assert_matches_torch(run_all(small, inputs), torch_output(model, inputs), rel=1e-4)
    assert linear_shapes(small) == torch_linear_shapes(model)


@pytest.mark.parametrize("name,exporter", CASES)
def test_cli_prune_inspect_simplify(name, exporter, tmp_path, capsys):
    spec = TRANSFORMERS[name]
    src, pruned, small = tmp_path / "m.onnx", tmp_path / "p.onnx", tmp_path / "s.onnx"
    src.write_bytes(dense_export(name, exporter))
    inputs = spec.example_input()
    expected_shape = torch_output(spec.build(), inputs).shape

    assert main(["prune", str(src), "-o", str(pruned), "--sparsity", "0.5"]) == 0
    out = run_all(onnx.load(str(pruned)), inputs)
    assert out.shape == expected_shape and np.isfinite(out).all()

    capsys.readouterr()
    assert main(["inspect", str(src)]) == 0
    out = " ".join(capsys.readouterr().out.split())  # (the table wraps long reasons)
    assert any(why in out for why in NORM)

    assert main(["simplify", str(src), "-o", str(small)]) == 0
    assert small.exists()
    assert main(["simplify", str(pruned), "-o", str(tmp_path / "ps.onnx")]) == 0


# --- the rules on small hand-built graphs: removal through what the transformers only pin --------

def hand_model(nodes, inputs: dict, output: tuple, inits: dict) -> onnx.ModelProto:
    """inputs: name -> (elem type, shape); output: (name, shape); inits: name -> array."""
    graph = onnx.helper.make_graph(
        nodes, "g", [onnx.helper.make_tensor_value_info(k, t, s) for k, (t, s) in inputs.items()],
        [onnx.helper.make_tensor_value_info(output[0], onnx.TensorProto.FLOAT, output[1])],
        initializer=[onnx.numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=10)


def node(op, inputs, output, **attributes):
    return onnx.helper.make_node(op, inputs, [output], name=output, **attributes)


def const_input(model: onnx.ModelProto, node_name: str, index: int = 1) -> np.ndarray:
    """A node's constant input (weights, a shape, indices ...)."""
    n = next(n for n in model.graph.node if n.name == node_name)
    return onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == n.input[index]))


def same_outputs(a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict) -> None:
    got, ref = run_feeds(b, feeds), run_feeds(a, feeds)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def run_feeds(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.fixture
def randn():
    """Seeded N(0, 1) float32 arrays, the same in every test whatever ran before."""
    rng = np.random.default_rng(7)
    return lambda *shape: rng.standard_normal(shape).astype(np.float32)


def test_embedding_column_of_zeros_is_removed_from_the_table(randn):
    """An embedding lookup is a linear layer of one-hot ids: an all-zero column embeds every token
    as 0, the MatMul reading it absorbs nothing, and the column goes from the table."""
    table = randn(12, 6)
    table[:, 2] = 0
    m = hand_model([node("Gather", ["table", "ids"], "emb"), node("MatMul", ["emb", "w"], "y")],
                   {"ids": (onnx.TensorProto.INT64, [1, 4])}, ("y", [1, 4, 5]), {"table": table, "w": randn(6, 5)})
    small, _ = simplify(m, align=1)
    assert (const_input(small, "emb", 0).shape, const_input(small, "y").shape) == ((12, 5), (5, 5))
    same_outputs(m, small, {"ids": np.array([[0, 3, 11, 3]], np.int64)})


def test_class_token_concat_is_cut_with_its_channels(randn):
    """A constant joined along the token axis (ViT's class token) is a per-channel parameter: when a
    channel goes (nobody reads it), its class-token entry goes with it."""
    w = randn(6, 5)
    w[2] = 0
    m = hand_model([node("Conv", ["x", "wc", "bc"], "conv"), node("Reshape", ["conv", "flat"], "tokens_t"),
                    node("Transpose", ["tokens_t"], "tokens", perm=[0, 2, 1]),
                    node("Concat", ["cls", "tokens"], "seq", axis=1), node("MatMul", ["seq", "w"], "y")],
                   {"x": (onnx.TensorProto.FLOAT, [1, 3, 4, 4])}, ("y", [1, 17, 5]),
                   {"wc": randn(6, 3, 1, 1), "bc": randn(6), "flat": np.array([1, 6, 16], np.int64),
                    "cls": randn(1, 1, 6), "w": w})
    small, _ = simplify(m, align=1)
    shapes = [const_input(small, "conv").shape, const_input(small, "seq", 0).shape, const_input(small, "y").shape]
    assert shapes == [(5, 3, 1, 1), (1, 1, 5), (5, 5)]
    same_outputs(m, small, {"x": randn(1, 3, 4, 4)})


def test_a_head_of_zeros_goes_through_a_transposed_per_head_constant(randn):
    """[B, N, h·d] -> [B, h, N, d]: heads and features on axes 1 and 3. A whole head of constant zeros
    is removed through a per-(head, feature) constant on those axes, which is cut to the heads kept."""
    w1 = randn(12, 12)
    w1[:, 4:8] = 0  # head 1 of 3 (d = 4)
    m = hand_model([node("MatMul", ["x", "w1"], "proj"), node("Reshape", ["proj", "split"], "heads"),
                    node("Transpose", ["heads"], "bhnd", perm=[0, 2, 1, 3]), node("Mul", ["bhnd", "k"], "scaled"),
                    node("Transpose", ["scaled"], "bnhd", perm=[0, 2, 1, 3]), node("Reshape", ["bnhd", "merge"], "merged"),
                    node("MatMul", ["merged", "w2"], "y")],
                   {"x": (onnx.TensorProto.FLOAT, [1, 8, 12])}, ("y", [1, 8, 5]),
                   {"w1": w1, "split": np.array([1, 8, 3, 4], np.int64), "k": randn(1, 3, 1, 4),
                    "merge": np.array([1, 8, 12], np.int64), "w2": randn(12, 5)})
    small, _ = simplify(m, align=1)
    shapes = [const_input(small, "proj").shape, const_input(small, "scaled").shape, const_input(small, "y").shape]
    assert shapes == [(12, 8), (1, 2, 1, 4), (8, 5)]
    assert const_input(small, "heads").tolist() == [1, 8, 2, 4]
    same_outputs(m, small, {"x": randn(1, 8, 12)})


def test_unused_part_of_a_fused_projection_goes_and_the_scalar_gather_follows(randn):
    """qkv [B, N, 2·h·d] -> [2, B, h, N, d], part = qkv[1]: the other part is read by nobody, so its
    rows go and the scalar index into that factor becomes 0."""
    m = hand_model([node("MatMul", ["x", "w1"], "qkv"), node("Reshape", ["qkv", "split"], "parts"),
                    node("Transpose", ["parts"], "pbhnd", perm=[2, 0, 3, 1, 4]), node("Gather", ["pbhnd", "one"], "part", axis=0),
                    node("Transpose", ["part"], "bnhd", perm=[0, 2, 1, 3]), node("Reshape", ["bnhd", "merge"], "merged"),
                    node("MatMul", ["merged", "w2"], "y")],
                   {"x": (onnx.TensorProto.FLOAT, [1, 8, 12])}, ("y", [1, 8, 5]),
                   {"w1": randn(12, 24), "split": np.array([1, 8, 2, 3, 4], np.int64), "one": np.array(1, np.int64),
                    "merge": np.array([1, 8, 12], np.int64), "w2": randn(12, 5)})
    small, _ = simplify(m, align=1)
    assert const_input(small, "qkv").shape == (12, 12)
    assert int(const_input(small, "part")) == 0
    same_outputs(m, small, {"x": randn(1, 8, 12)})


@pytest.mark.parametrize("layer", ["Gemm", "MatMul", "ConvTranspose"])
def test_layer_with_weights_computed_at_run_time_pins_instead_of_crashing(layer, randn):
    """Regression: Gemm / ConvTranspose .reads looked the weights up as an initializer before checking
    they were one (KeyError, exit 3); weights scaled by an input statistic are not constant, so the
    channels they read stay, exactly."""
    wc = randn(4, 3, 1, 1)
    wc[1] = 0
    nodes = [node("Conv", ["x", "wc", "bc"], "conv"), node("ReduceMean", ["x"], "scale", keepdims=1)]
    inits = {"wc": wc, "bc": randn(4)}
    if layer == "ConvTranspose":
        nodes += [node("Mul", ["w0", "scale"], "w"), node("ConvTranspose", ["conv", "w"], "y", kernel_shape=[2, 2], strides=[2, 2])]
        inits["w0"], out = randn(4, 2, 2, 2), [1, 2, 8, 8]
    else:
        nodes += [node("GlobalAveragePool", ["conv"], "pooled"), node("Flatten", ["pooled"], "flat"),
                  node("Reshape", ["scale", "two_d"], "scale2"), node("Mul", ["w0", "scale2"], "w"), node(layer, ["flat", "w"], "y")]
        inits.update(w0=randn(4, 5), two_d=np.array([1, 1], np.int64))
        out = [1, 5]
    m = hand_model(nodes, {"x": (onnx.TensorProto.FLOAT, [1, 3, 4, 4])}, ("y", out), inits)
    small, report = simplify(m, align=1)
    assert report.after.layers["conv"] == (3, 4)
    same_outputs(m, small, {"x": randn(1, 3, 4, 4)})


# --- pruning heads: onnxprune prune --granularity head ------------------------------------------

def kept_heads(small: onnx.ModelProto, proj: nn.Linear, heads: int) -> list[int]:
    """Which heads the output projection still reads: its remaining input rows, matched against the
    PyTorch projection's column blocks (one per head)."""
    d = proj.in_features // heads
    blocks = [proj.weight[:, h * d:(h + 1) * d].detach().numpy().T for h in range(heads)]
    for init in small.graph.initializer:
        w = onnx.numpy_helper.to_array(init)
        if w.ndim == 2 and w.shape[1] == proj.out_features and w.shape[0] % d == 0 and w.shape[0] < proj.in_features:
            found = [next((h for h, blk in enumerate(blocks) if np.array_equal(w[i:i + d], blk)), None)
                     for i in range(0, w.shape[0], d)]
            if None not in found:
                return found
    raise AssertionError("no pruned output projection found")


@pytest.mark.parametrize("criterion", ["l1", "l2"])
def test_prune_heads_scores_each_head_over_qkv_rows_and_output_columns(criterion, tmp_path):
    """--granularity head zeroes, in every attention, the half of its heads with the smallest l1 / l2
    norm over all their weights (q, k, v rows and output projection columns, computed here from the
    PyTorch model); simplify then removes exactly those, and the result equals the pruned model."""
    spec = TRANSFORMERS["vit"]
    model = spec.build()
    with torch.no_grad():  # make the choice depend on the output columns too: head 3's are tiny
        for attn in (m for m in model.modules() if hasattr(m, "head_rows")):
            attn.proj.weight[:, 3 * 8: 4 * 8] *= 1e-3
    inputs = spec.example_input()
    src = tmp_path / "vit.onnx"
    onnx.save(export(model, inputs, "dynamo"), str(src))
    pruned, report = prune(str(src), granularity="head", criterion=criterion, sparsity=0.5, prune_first=True)
    small, _ = simplify(pruned, align=1)
    np.testing.assert_allclose(run_all(small, inputs), run_all(pruned, inputs), rtol=1e-4, atol=1e-5)
    assert attention_heads(small) == [HEADS // 2] * len(mlps(model))
    for attn in (m for m in model.modules() if hasattr(m, "head_rows")):
        parts = lambda h: [attn.qkv.weight[start: start + size] for _, start, size in attn.head_rows(h)] + \
            [attn.proj.weight[:, h * 8:(h + 1) * 8]]
        norm = (lambda ws: sum(float(w.abs().sum()) for w in ws)) if criterion == "l1" else \
            (lambda ws: sum(float((w.double() ** 2).sum()) for w in ws) ** 0.5)
        scores = [norm(parts(h)) for h in range(HEADS)]
        assert sorted(kept_heads(small, attn.proj, HEADS)) == sorted(np.argsort(scores)[HEADS // 2:].tolist())
    assert any("attention head(s) zeroed" in r.note for r in report.layers)


@pytest.mark.parametrize("name", list(TRANSFORMERS))
def test_cli_prune_granularity_head_then_simplify(name, tmp_path):
    """From the command line, on every transformer: half the heads and half the MLP neurons zeroed,
    then removed; the simplified model equals the pruned one and has half the heads."""
    spec = TRANSFORMERS[name]
    src, pruned, small = tmp_path / "m.onnx", tmp_path / "p.onnx", tmp_path / "s.onnx"
    src.write_bytes(dense_export(name, "dynamo"))
    inputs = spec.example_input()
    assert main(["prune", str(src), "-o", str(pruned), "--granularity", "head", "--sparsity", "0.5",
                 "--prune-first"]) == 0
    assert main(["simplify", str(pruned), "-o", str(small), "--align", "1"]) == 0
    pruned_model, small_model = onnx.load(str(pruned)), onnx.load(str(small))
    assert_matches_torch(run_all(small_model, inputs), run_all(pruned_model, inputs), rel=1e-4)
    assert attention_heads(small_model) == [HEADS // 2] * len(mlps(spec.build()))


# --- the attention rules on hand-built blocks ---------------------------------------------------

def attention_block(randn, *, heads=3, d=4, n=5, dim=6, normalize="Softmax", kv_heads=None, bias_table=False,
                    mask_input=False, where_mask=False, dead_values=(), softmax_axis=-1):
    """x [1, n, dim] -> q, k, v projections -> [1, h, n, d] -> softmax(q·kᵀ/√d [+ bias]) · v -> out
    projection. `kv_heads=1`: one k / v head broadcast to every query head (multi-query attention);
    `bias_table`: a constant relative-position bias [1, h, n, n]; `mask_input`: a [1, 1, 1, n] mask
    bias fed as a graph input; `where_mask`: a causal Where(mask, -1e4, scores); `dead_values`: heads whose v weight rows are zero (biases kept);
    `normalize`: the op that turns scores into weights (Sigmoid is not row-stochastic)."""
    kv = heads if kv_heads is None else kv_heads
    wv = randn(dim, kv * d)
    for h in dead_values:
        wv[:, h * d:(h + 1) * d] = 0
    inits = {"wq": randn(dim, heads * d), "wk": randn(dim, kv * d), "wv": wv, "bv": randn(kv * d),
             "wo": randn(heads * d, dim), "q_shape": np.array([1, n, heads, d], np.int64),
             "kv_shape": np.array([1, n, kv, d], np.int64), "merge": np.array([1, n, heads * d], np.int64),
             "scale": np.array(1 / np.sqrt(d), np.float32)}
    nodes = [node("MatMul", ["x", "wq"], "q0"), node("Reshape", ["q0", "q_shape"], "q1"),
             node("Transpose", ["q1"], "q", perm=[0, 2, 1, 3]),
             node("MatMul", ["x", "wk"], "k0"), node("Reshape", ["k0", "kv_shape"], "k1"),
             node("Transpose", ["k1"], "kt", perm=[0, 2, 3, 1]),
             node("MatMul", ["x", "wv"], "v0"), node("Add", ["v0", "bv"], "v0b"), node("Reshape", ["v0b", "kv_shape"], "v1"),
             node("Transpose", ["v1"], "v", perm=[0, 2, 1, 3]),
             node("MatMul", ["q", "kt"], "qk"), node("Mul", ["qk", "scale"], "scores")]
    inputs = {"x": (onnx.TensorProto.FLOAT, [1, n, dim])}
    last = "scores"
    if bias_table:
        inits["table"] = randn(1, heads, n, n)
        nodes.append(node("Add", [last, "table"], "biased"))
        last = "biased"
    if where_mask:
        inits.update(causal=np.triu(np.ones((n, n), bool), 1), fill=np.array(-1e4, np.float32))
        nodes.append(node("Where", ["causal", "fill", last], "filled"))
        last = "filled"
    if mask_input:
        inputs["mask"] = (onnx.TensorProto.FLOAT, [1, 1, 1, n])
        nodes.append(node("Add", [last, "mask"], "masked"))
        last = "masked"
    nodes.append(node(normalize, [last], "attn", **({"axis": softmax_axis} if normalize == "Softmax" else {})))
    nodes += [node("MatMul", ["attn", "v"], "ctx"), node("Transpose", ["ctx"], "ctx_t", perm=[0, 2, 1, 3]),
              node("Reshape", ["ctx_t", "merge"], "merged"), node("MatMul", ["merged", "wo"], "y")]
    return hand_model(nodes, inputs, ("y", [1, n, dim]), inits)


def block_feeds(randn, m):
    return {i.name: randn(*[d.dim_value for d in i.type.tensor_type.shape.dim]) for i in m.graph.input}


def test_dead_value_heads_go_with_their_relative_position_bias(randn):
    """Heads 0 and 2 of 3 output their v bias: they go — q, k, v columns, output rows — and the
    constant [1, h, n, n] bias table added to the scores is cut to the head kept."""
    m = attention_block(randn, bias_table=True, dead_values=(0, 2))
    small, _ = simplify(m, align=1)
    assert [const_input(small, k).shape for k in ("q0", "k0", "v0", "y")] == [(6, 4), (6, 4), (6, 4), (4, 6)]
    assert const_input(small, "biased").shape == (1, 1, 5, 5)
    assert const_input(small, "q1").tolist() == [1, 5, 1, 4]
    same_outputs(m, small, block_feeds(randn, m))


@pytest.mark.parametrize("mask", ["mask_input", "where_mask"])
def test_masks_broadcast_over_heads_do_not_hold_them(mask, randn):
    """A [1, 1, 1, n] mask bias fed as an input, or masked_fill as Where(causal, -1e4, scores) (which
    pinned every head once: op not understood): the dead head goes."""
    m = attention_block(randn, dead_values=(1,), **{mask: True})
    small, _ = simplify(m, align=1)
    assert const_input(small, "y").shape == (8, 6)
    same_outputs(m, small, block_feeds(randn, m))


def test_weights_that_are_not_a_softmax_keep_the_head(randn):
    """sigmoid(scores) rows do not sum to one: a constant v then gives c · Σ attn, which depends on
    the input. The head must stay."""
    m = attention_block(randn, normalize="Sigmoid", dead_values=(1,))
    small, _ = simplify(m, align=1)
    assert const_input(small, "y").shape == (12, 6)
    same_outputs(m, small, block_feeds(randn, m))


def test_softmax_over_the_head_axis_keeps_every_head(randn):
    """A softmax that normalizes over the heads mixes them: none can go alone."""
    m = attention_block(randn, softmax_axis=1, dead_values=(1,))
    small, report = simplify(m, align=1)
    assert const_input(small, "y").shape == (12, 6)
    assert any("normalizes over the channel axis" in r for r in report.classes["pinned"])
    same_outputs(m, small, block_feeds(randn, m))


def test_multi_query_attention_drops_query_heads_and_keeps_the_shared_kv_head(randn):
    """One k / v head broadcast to every query head: whole query heads still go when their output
    columns are zero; the shared k and v stay as wide as they are (every head reads them)."""
    m = attention_block(randn, kv_heads=1)
    wo = next(t for t in m.graph.initializer if t.name == "wo")
    w = onnx.numpy_helper.to_array(wo).copy()
    w[4:8] = 0  # head 1's output rows
    wo.CopyFrom(onnx.numpy_helper.from_array(w, "wo"))
    small, report = simplify(m, align=1)
    assert [const_input(small, k).shape for k in ("q0", "k0", "v0", "y")] == [(6, 8), (6, 4), (6, 4), (8, 6)]
    assert any("shared by every head" in r for r in report.classes["pinned"])
    same_outputs(m, small, block_feeds(randn, m))


@pytest.mark.parametrize("name", list(TRANSFORMERS))
def test_head_pruner_masks_whole_heads_and_speedup_removes_them(name):
    """onnxprune.pytorch.HeadPruner: heads found from the graph, the half with the smallest l2 over
    their q, k, v rows and output columns masked; speedup removes them (and proves the result equal
    to the masked PyTorch model): the architecture built with half the heads, MLP untouched."""
    from onnxprune.pytorch import HeadPruner, speedup

    spec = TRANSFORMERS[name]
    model = spec.build()
    inputs = spec.example_input()
    pruner = HeadPruner(model, [{"sparsity": 0.5, "op_types": ["Linear"]}], dummy_input=inputs)
    pruner.compress()
    assert sum(r.pruned for r in pruner.summary.rows) == len(mlps(model)) * (HEADS // 2 if name != "llama" else 1)
    small, _ = speedup(model, inputs, align=1)
    assert attention_heads(small) == [HEADS // 2] * len(mlps(model))
    assert linear_shapes(small) == torch_linear_shapes(spec.build(heads=HEADS // 2))


# regressions found by the attention fuzz (tests/test_fuzz.py)

def test_broadcast_kv_head_as_many_features_as_heads_keeps_v_constants_on_v(randn):
    """Multi-query attention, v constant (its bias), h == d: the output of attn · v has only the
    query heads as channels (v is broadcast); v's per-feature constants were put on the head axis
    (a wrong result: parity failed)."""
    m = attention_block(randn, heads=4, d=4, kv_heads=1, dead_values=(0,))
    small, _ = simplify(m, align=1)
    same_outputs(m, small, block_feeds(randn, m))


def test_per_head_table_sliced_to_a_symbolic_length_is_cut_with_its_heads(randn):
    """ALiBi: a [1, h, M, M] table sliced to the sequence length at run time, added to the scores
    twice (two readers of one Slice): a dead head goes, and each reader gets the table of the heads
    kept (it pinned every head: the slice was not tracked)."""
    h, d, dim, big = 2, 2, 4, 8
    wv = randn(dim, h * d)
    wv[:, d:] = 0
    inits = {"wq": randn(dim, h * d), "wk": randn(dim, h * d), "wv": wv, "bv": randn(h * d), "wo": randn(h * d, dim),
             "split": np.array([0, 0, h, d], np.int64), "merge": np.array([0, 0, h * d], np.int64),
             "table": randn(1, h, big, big), "one": np.array([1], np.int64), "two": np.array([2], np.int64),
             "zero": np.array([0], np.int64), "zeros": np.array([0, 0], np.int64), "axes": np.array([2, 3], np.int64)}
    nodes = [node("Shape", ["x"], "shape"), node("Slice", ["shape", "one", "two", "zero"], "n"),
             node("Concat", ["n", "n"], "ends", axis=0), node("Slice", ["table", "zeros", "ends", "axes"], "alibi")]
    for p in "qkv":
        nodes += [node("MatMul", ["x", f"w{p}"], f"{p}0")]
        nodes += [node("Add", ["v0", "bv"], "v0b")] if p == "v" else []
        nodes += [node("Reshape", ["v0b" if p == "v" else f"{p}0", "split"], f"{p}1"),
                  node("Transpose", [f"{p}1"], f"{p}h", perm=[0, 2, 1, 3])]
    nodes += [node("Transpose", ["kh"], "kt", perm=[0, 1, 3, 2]), node("MatMul", ["qh", "kt"], "scores"),
              node("Add", ["scores", "alibi"], "biased"), node("Add", ["biased", "alibi"], "biased2"),
              node("Softmax", ["biased2"], "attn", axis=-1), node("MatMul", ["attn", "vh"], "ctx"),
              node("Transpose", ["ctx"], "ctx_t", perm=[0, 2, 1, 3]), node("Reshape", ["ctx_t", "merge"], "merged"),
              node("MatMul", ["merged", "wo"], "y")]
    graph = onnx.helper.make_graph(
        nodes, "alibi", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, "N", dim])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, "N", dim])],
        initializer=[onnx.numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    m = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=10)
    inputs = [{"x": randn(1, n, dim)} for n in (5, 3)]
    small, _ = simplify(m, align=1, inputs=inputs)
    assert const_input(small, "y").shape == (d, dim)
    tables = [onnx.numpy_helper.to_array(t).shape for t in small.graph.initializer if t.dims[:2] == [1, 1] and len(t.dims) == 4]
    assert tables == [(1, 1, big, big)] * len(tables) and len(tables) >= 1
    for feeds in inputs:
        same_outputs(m, small, feeds)
