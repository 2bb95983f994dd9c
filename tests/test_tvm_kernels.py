"""BSR and depthwise conv kernels against numpy and onnxruntime: shapes, strides, paddings,
dilations, sparsities (0, 0.5, 0.9, 1.0, empty and full block rows), block shapes, and the fused
epilogue (bias, residual add, ReLU / ReLU6 / Clip) found in ONNX graphs."""

import dataclasses
import math

import numpy as np
import onnx
import pytest

from onnxprune.tvm_kernels.bsr import bsr_to_dense, block_sparsity, conv_weight_as_matrix, dense_to_bsr

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402

from onnxprune.tvm_kernels import convert, kernels  # noqa: E402

pytestmark = pytest.mark.tvm
TARGET = {"kind": "llvm", "num-cores": 2}
RTOL, ATOL = 1e-4, 1e-4  # float32 sums of a few hundred products


def sparse_weight(rng, spec, sparsity):
    """Random conv weight with `sparsity` of its (bsr x bsc) matrix blocks zeroed."""
    w = rng.standard_normal((spec.c_out, spec.c_in) + spec.kernel).astype(np.float32)
    mat = conv_weight_as_matrix(w).reshape(spec.c_out // spec.bsr, spec.bsr,
                                           spec.num_cols // spec.bsc, spec.bsc)
    drop = rng.random((mat.shape[0], mat.shape[2])) < sparsity
    mat[drop[:, None, :, None].repeat(spec.bsr, 1).repeat(spec.bsc, 3)] = 0
    return mat.reshape(w.shape)


def run_conv(spec, w, bias, x, tile=None, residual=None, direct=False, threads=1):
    mod, _ = convert.single_conv_module(spec, w, bias, tile, direct, threads)
    vm = relax.VirtualMachine(tvm.compile(mod, target=tvm.target.Target(TARGET)), tvm.cpu())
    args = [x] if residual is None else [x, residual]
    return vm["main"](*[tvm.runtime.tensor(a) for a in args]).numpy()


# (bias, epilogue): plain conv; bias + ReLU; bias + residual + ReLU6; residual + Clip(-1, 0.5)
EPILOGUES = {
    "plain": (False, kernels.Epilogue()),
    "bias_relu": (True, kernels.Epilogue(0.0, math.inf)),
    "bias_res_relu6": (True, kernels.Epilogue(0.0, 6.0, residual=True)),
    "res_clip": (False, kernels.Epilogue(-1.0, 0.5, residual=True)),
}


def check_against_numpy(spec, w, has_bias, rng, groups=1, tile=None, direct=False, threads=1):
    bias = rng.standard_normal(spec.c_out).astype(np.float32) if has_bias else None
    x = rng.standard_normal((spec.batch, spec.c_in, spec.height, spec.width)).astype(np.float32)
    residual = (rng.standard_normal(spec.out_shape).astype(np.float32)
                if spec.epilogue.residual else None)
    out = run_conv(spec, w, bias, x, tile, residual, direct, threads)
    assert out.shape == spec.out_shape
    ref = kernels.reference_conv2d(x, w, spec, bias, residual, groups)
    np.testing.assert_allclose(out, ref, rtol=RTOL, atol=ATOL)


def test_bsr_roundtrip_and_sparsity():
    rng = np.random.default_rng(0)
    spec = kernels.ConvSpec(1, 6, 4, 4, 8, (3, 3), bsr=4, bsc=2)
    w = sparse_weight(rng, spec, 0.6)
    mat = conv_weight_as_matrix(w)
    m = dense_to_bsr(mat, 4, 2)
    assert np.array_equal(bsr_to_dense(m), mat)
    assert m.sparsity == pytest.approx(block_sparsity(mat, 4, 2))
    assert m.indptr[-1] == m.nnzb and np.all(np.diff(m.indptr) >= 0)


CASES = [
    # (c_in, h, w, c_out, kernel, stride, padding, dilation, bsr, bsc, sparsity, batch)
    (16, 8, 8, 16, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 4, 1, 0.0, 1),
    (16, 7, 9, 32, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 4, 1, 0.5, 2),
    (24, 5, 5, 16, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 8, 1, 0.9, 1),
    (16, 6, 6, 16, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 16, 1, 1.0, 1),
    (8, 9, 9, 12, (1, 1), (2, 2), (0, 0, 0, 0), (1, 1), 2, 1, 0.5, 1),
    (8, 10, 10, 16, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 4, 1, 0.5, 1),
    (8, 11, 9, 16, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 4, 1, 0.9, 1),
    (6, 12, 12, 8, (3, 3), (1, 2), (2, 0, 1, 3), (2, 2), 1, 1, 0.5, 1),
    (4, 9, 9, 8, (5, 5), (1, 1), (2, 2, 2, 2), (1, 1), 8, 4, 0.5, 1),
    (3, 8, 8, 4, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 2, 3, 0.0, 2),
    (16, 4, 4, 32, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 4, 1, 1.0, 1),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[4][0]}x{c[4][1]}s{c[5][0]}-{c[8]}x{c[9]}-{c[10]}")
@pytest.mark.parametrize("epilogue", ["plain", "bias_relu", "bias_res_relu6"])
def test_bsr_conv_matches_numpy(case, epilogue):
    c_in, h, w_, c_out, k, s, p, d, bsr, bsc, sparsity, batch = case
    has_bias, ep = EPILOGUES[epilogue]
    spec = kernels.ConvSpec(batch, c_in, h, w_, c_out, k, s, p, d, bsr, bsc, epilogue=ep)
    rng = np.random.default_rng(abs(hash(case)) % 2**32)
    check_against_numpy(spec, sparse_weight(rng, spec, sparsity), has_bias, rng)


DEPTHWISE_CASES = [
    # (channels, h, w, kernel, stride, padding, dilation, batch)
    (8, 12, 12, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),
    (6, 11, 10, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 2),  # odd height, even width
    (4, 9, 70, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),  # rows wider than one vector (+ tail)
    (5, 14, 66, (5, 5), (2, 2), (2, 2, 2, 2), (1, 1), 1),
    (3, 8, 9, (3, 3), (1, 3), (0, 2, 1, 0), (1, 1), 1),  # asymmetric pads; width 9 / stride 3
    (4, 10, 8, (3, 3), (1, 1), (2, 1, 2, 1), (2, 1), 1),  # dilated rows
    (16, 7, 7, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),  # small stride-1 planes: computed flat
    (3, 9, 13, (5, 5), (1, 1), (2, 1, 2, 3), (1, 1), 2),  # flat, asymmetric pads, 5x5
    (2, 6, 6, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1),
    (3, 3, 40, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),  # fewer output rows than a row group
]


@pytest.mark.parametrize("case", DEPTHWISE_CASES,
                         ids=lambda c: f"c{c[0]}-{c[1]}x{c[2]}-k{c[3][0]}s{c[4][1]}")
@pytest.mark.parametrize("epilogue", sorted(EPILOGUES))
def test_depthwise_conv_matches_numpy(case, epilogue):
    c, h, w_, k, s, p, d, batch = case
    has_bias, ep = EPILOGUES[epilogue]
    spec = kernels.ConvSpec(batch, c, h, w_, c, k, s, p, d, epilogue=ep)
    assert kernels.depthwise_supported(spec) == ""
    rng = np.random.default_rng(abs(hash(case)) % 2**32)
    w = rng.standard_normal((c, 1) + k).astype(np.float32)
    check_against_numpy(spec, w, has_bias, rng, groups=c)


DIRECT_CASES = [
    # (c_in, h, w, c_out, kernel, stride, padding, dilation, batch)
    (3, 30, 34, 32, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1),  # a stem: 8 channels per tile, 2 segments + tail
    (1, 9, 9, 12, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 2),  # 4 per tile, rows narrower than a vector
    (4, 11, 12, 6, (5, 5), (2, 2), (2, 1, 2, 2), (1, 1), 1),  # 2 per tile, asymmetric pads, odd rows
    (2, 7, 16, 5, (3, 3), (1, 1), (0, 0, 0, 0), (2, 1), 1),  # 1 per tile, dilated rows, no pads
    (3, 1, 20, 8, (1, 3), (1, 1), (0, 1, 0, 1), (1, 1), 1),  # one output row
]


@pytest.mark.parametrize("case", DIRECT_CASES, ids=lambda c: f"c{c[0]}-{c[3]}-k{c[4][0]}s{c[5][0]}-{c[1]}x{c[2]}")
@pytest.mark.parametrize("epilogue", sorted(EPILOGUES))
def test_direct_conv_matches_numpy(case, epilogue):
    """The direct kernel (few input channels, dense) on every channel-tile width (8, 4, 2, 1),
    strides, pads, dilated rows, rows under a vector, one output row, batch 2, every epilogue."""
    c_in, h, w_, c_out, k, s, p, d, batch = case
    has_bias, ep = EPILOGUES[epilogue]
    spec = kernels.ConvSpec(batch, c_in, h, w_, c_out, k, s, p, d, epilogue=ep)
    assert kernels.direct_supported(spec) == ""
    rng = np.random.default_rng(abs(hash(case)) % 2**32)
    w = rng.standard_normal((c_out, c_in) + k).astype(np.float32)
    check_against_numpy(spec, w, has_bias, rng, direct=True)


@pytest.mark.parametrize("case", [CASES[1], CASES[6], CASES[8]], ids=["1x1-batch2", "3x3s2-im2col", "5x5-8x4"])
@pytest.mark.parametrize("epilogue", ["bias_relu", "res_clip"])
@pytest.mark.parametrize("threads", [1, 3])
def test_packed_tiles_match_numpy(case, epilogue, threads):
    """Packed tiles copy each pixel tile's input contiguous and run every block row on it; the
    tail tile (P not a multiple of the width) overlaps its neighbour, stored twice alike.  With
    3 threads the tiles run in 3 parts, each reusing its pack buffer."""
    c_in, h, w_, c_out, k, s, p, d, bsr, bsc, sparsity, batch = case
    has_bias, ep = EPILOGUES[epilogue]
    spec = kernels.ConvSpec(batch, c_in, h, w_, c_out, k, s, p, d, bsr, bsc, epilogue=ep)
    rng = np.random.default_rng(7)
    packed = [t for t in kernels.tile_candidates(spec) if t.packed]
    assert packed and any(spec.num_pixels % t.pixels for t in packed)
    w = sparse_weight(rng, spec, sparsity)
    for tile in packed:
        check_against_numpy(spec, w, has_bias, rng, tile=tile, threads=threads)
    assert not any(t.packed for t in kernels.tile_candidates(spec, packed=False))


def test_empty_and_fully_dense_block_rows_every_tile():
    """Block rows alternate empty / fully dense; every pixel tile width (and its tail) checked."""
    rng = np.random.default_rng(1)
    spec = kernels.ConvSpec(1, 12, 7, 7, 16, (1, 1), bsr=4)
    w = rng.standard_normal((16, 12, 1, 1)).astype(np.float32)
    w[0:4] = 0
    w[8:12] = 0
    x = rng.standard_normal((1, 12, 7, 7)).astype(np.float32)
    ref = kernels.reference_conv2d(x, w, spec)
    for tile in kernels.tile_candidates(spec):
        np.testing.assert_allclose(run_conv(spec, w, None, x, tile), ref, rtol=RTOL, atol=ATOL)


def _workspace_allocs(prim_func) -> int:
    """TVMBackendAllocWorkspace calls in the compiled kernel's LLVM IR (each one per iteration
    of the loop that holds it)."""
    src = tvm.compile(prim_func, target=tvm.target.Target(TARGET)).mod.inspect_source("ll")
    return src.count("load ptr, ptr @__TVMBackendAllocWorkspace")


@pytest.mark.parametrize("bsr", [4, 8])
def test_wide_tiles_split_their_accumulators_and_match_numpy(bsr):
    """A bsr x width accumulator of 1 KB or more is split by rows into 2 or 4 buffers under
    1 KB (TVM's stack limit), so no tile allocates a workspace; every tile width (1, 2 and 4
    groups at bsr 4; 1, 2, 4 at bsr 8), each loop order, the tail tile and the residual
    epilogue against numpy."""
    rng = np.random.default_rng(bsr)
    ep = EPILOGUES["bias_res_relu6"][1]
    spec = kernels.ConvSpec(1, 8, 12, 12, 16, (1, 1), bsr=bsr, epilogue=ep)
    w = sparse_weight(rng, spec, 0.3)
    tiles = kernels.tile_candidates(spec)
    groups = {kernels._row_groups(bsr, t.pixels) for t in tiles}
    assert groups == {1, 2, 4}
    nnzb = int(dense_to_bsr(conv_weight_as_matrix(w), bsr, 1).nnzb)
    for tile in tiles:
        check_against_numpy(spec, w, True, rng, tile=tile)
        if not tile.packed:  # (a packed tile's pack buffer is one workspace per part)
            assert _workspace_allocs(kernels.bsr_matmul_prim_func(spec, nnzb, tile)) == 0, tile


def test_unsupported_depthwise_is_explained():
    spec = kernels.ConvSpec(1, 4, 9, 9, 4, (3, 3), (2, 2), (1, 1, 1, 1))
    assert "multiple of stride" in kernels.depthwise_supported(spec)
    spec = kernels.ConvSpec(1, 4, 9, 8, 4, (3, 3), (1, 1), (1, 1, 1, 1), (1, 2))
    assert "dilated" in kernels.depthwise_supported(spec)


def _conv_model(w, bias, stride, pads, dilation, relu):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(w, "w")]
    inputs = ["x", "w"]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, "b"))
        inputs.append("b")
    nodes = [helper.make_node("Conv", inputs, ["c"], strides=list(stride), pads=list(pads),
                              dilations=list(dilation))]
    out = "c"
    if relu:
        nodes.append(helper.make_node("Relu", ["c"], ["r"]))
        out = "r"
    graph = helper.make_graph(
        nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, w.shape[1], 10, 10])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


@pytest.mark.parametrize("bias,relu", [(False, False), (True, False), (False, True), (True, True)])
def test_onnx_conv_converted_and_matches_onnxruntime(bias, relu):
    import onnxruntime as ort

    rng = np.random.default_rng(7)
    spec = kernels.ConvSpec(1, 8, 10, 10, 16, (3, 3), bsr=4)
    w = sparse_weight(rng, spec, 0.7)
    b = rng.standard_normal(16).astype(np.float32) if bias else None
    model = _conv_model(w, b, (2, 2), (1, 0, 1, 2), (1, 1), relu)
    mod, report = convert.convert_to_bsr(convert.import_onnx(model), 4, 1, 0.5)
    assert len(report.converted) == 1 and not report.skipped
    layer = report.converted[0]
    # ReLU fused into the kernel epilogue
    assert layer.spec.epilogue == kernels.Epilogue(0.0 if relu else -math.inf, math.inf)
    assert not np.any(layer.arrays.bias) == (not bias)
    x = rng.standard_normal((1, 8, 10, 10)).astype(np.float32)
    vm = relax.VirtualMachine(tvm.compile(mod, target=tvm.target.Target(TARGET)), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x)).numpy()
    ref = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(out, ref, rtol=RTOL, atol=ATOL)


def test_convs_below_threshold_stay_dense():
    rng = np.random.default_rng(8)
    spec = kernels.ConvSpec(1, 8, 10, 10, 16, (3, 3), bsr=4)
    model = _conv_model(sparse_weight(rng, spec, 0.2), None, (1, 1), (1, 1, 1, 1), (1, 1), False)
    mod, report = convert.convert_to_bsr(convert.import_onnx(model), 4, 1, 0.7)
    assert not report.converted and len(report.skipped) == 1
    assert "block sparsity" in report.skipped[0][1]


# ---------------------------------------------------------------------------- fused chains

def _onnx(nodes, inits, x_shape, outputs):
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    # typed outputs (shapes inferred): a valid model for onnxprune's passes too
    return onnx.shape_inference.infer_shapes(model)


def _called(mod) -> list[str]:
    """Names of the TIR functions `main` calls, in order."""
    names = []
    for block in mod["main"].body.blocks:
        for binding in block.bindings:
            value = binding.value
            if isinstance(value, relax.Call) and value.op == tvm.ir.Op.get("relax.call_tir"):
                names.append(value.args[0].name_hint)
    return names


def _matches_onnxruntime(model, mod, x):
    import onnxruntime as ort

    vm = relax.VirtualMachine(tvm.compile(mod, target=tvm.target.Target(TARGET)), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x))
    outs = [out] if isinstance(out, tvm.runtime.Tensor) else list(out)
    refs = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})
    for o, r in zip(outs, refs):
        np.testing.assert_allclose(o.numpy(), r, rtol=RTOL, atol=ATOL)


def _sparse(rng, shape, sparsity=0.6, bsr=4):
    spec = kernels.ConvSpec(1, shape[1], 1, 1, shape[0], shape[2:], bsr=bsr)
    return sparse_weight(rng, spec, sparsity)


def test_inverted_residual_block_is_two_fused_kernels():
    """MobileNetV2 block: 1x1 expand + ReLU6, depthwise 3x3 + ReLU6 in one kernel (the expanded
    tensor never reaches memory), then 1x1 project + residual."""
    from onnx import helper

    rng = np.random.default_rng(11)
    inits = {"we": _sparse(rng, (32, 8, 1, 1)), "be": rng.standard_normal(32),
             "wd": rng.standard_normal((32, 1, 3, 3)), "bd": rng.standard_normal(32),
             "wp": _sparse(rng, (8, 32, 1, 1)), "bp": rng.standard_normal(8),
             "lo": np.array(0.0), "hi": np.array(6.0)}
    nodes = [
        helper.make_node("Conv", ["x", "we", "be"], ["e"]),
        helper.make_node("Clip", ["e", "lo", "hi"], ["e6"]),
        helper.make_node("Conv", ["e6", "wd", "bd"], ["d"], group=32, pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["d", "lo", "hi"], ["d6"]),
        helper.make_node("Conv", ["d6", "wp", "bp"], ["p"]),
        helper.make_node("Add", ["p", "x"], ["y"]),
    ]
    model = _onnx(nodes, inits, (1, 8, 12, 12), ["y"])
    mod, report = convert.convert_to_bsr(convert.import_onnx(model), 4, 1, 0.5)
    expand, project = report.converted
    (depthwise,) = report.depthwise
    assert expand.spec.epilogue == kernels.Epilogue(0.0, 6.0)
    assert depthwise.spec.epilogue == kernels.Epilogue(0.0, 6.0)
    assert project.spec.epilogue == kernels.Epilogue(residual=True)
    assert expand.depthwise is depthwise and project.depthwise is None
    assert _called(mod) == ["expand_depthwise_0", "bsr_matmul_2"]  # nothing else left
    _matches_onnxruntime(model, mod, rng.standard_normal((1, 8, 12, 12)).astype(np.float32))


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("threads", [1, 3])
def test_expand_depthwise_fusion_matches_onnxruntime_for_every_tile(stride, threads):
    """The fused kernel (odd sizes, every pixel tile incl. overlapping tails; its block rows in
    1 or 3 parts, each reusing its scratch grids) against ORT; and no fusion where the expanded
    tensor has a second reader."""
    from onnx import helper

    rng = np.random.default_rng(15 + stride)
    inits = {"we": _sparse(rng, (16, 5, 1, 1)), "be": rng.standard_normal(16),
             "wd": rng.standard_normal((16, 1, 3, 3)), "bd": rng.standard_normal(16),
             "lo": np.array(0.0), "hi": np.array(6.0)}
    nodes = [helper.make_node("Conv", ["x", "we", "be"], ["e"]),
             helper.make_node("Clip", ["e", "lo", "hi"], ["e6"]),
             helper.make_node("Conv", ["e6", "wd", "bd"], ["y"], group=16, pads=[1, 1, 1, 1],
                              strides=[stride, stride])]
    x = rng.standard_normal((2, 5, 9, 10)).astype(np.float32)
    model = _onnx(nodes, inits, x.shape, ["y"])
    dense = convert.import_onnx(model)
    mod, report = convert.convert_to_bsr(dense, 4, 1, 0.5, threads)
    (layer,) = report.converted
    assert layer.depthwise is not None and _called(mod) == ["expand_depthwise_0"]
    for tile in kernels.tile_candidates(layer.spec, fused=True):
        _matches_onnxruntime(model, convert.retile(mod, report, {layer.kernel_name: tile}), x)

    two_readers = _onnx(nodes, inits, x.shape, ["y", "e6"])
    mod, report = convert.convert_to_bsr(convert.import_onnx(two_readers), 4, 1, 0.5)
    assert [layer.depthwise for layer in report.converted] == [None]
    assert len(_called(mod)) == 2
    _matches_onnxruntime(two_readers, mod, x)


@pytest.mark.parametrize("case", [c for c in DEPTHWISE_CASES if c[0] > 2],
                         ids=lambda c: f"{c[1]}x{c[2]}-k{c[3][0]}s{c[4][1]}d{c[6][0]}")
def test_fused_kernel_writes_every_depthwise_layout_in_place(case):
    """The fused kernel's sparse conv writes straight into the depthwise scratch grids: every
    depthwise layout (strides, asymmetric pads, dilated rows, 5x5, the flat small planes, fewer
    rows than a row group, batch 2), narrowest and widest pixel tile, against numpy; planes
    marked unread stay unwritten (NaN), a block row all zero skips its conv."""
    _, h, w_, k, s, p, d, batch = case
    c_in, c_mid = 3, 8
    expand = kernels.ConvSpec(batch, c_in, h, w_, c_mid, (1, 1), bsr=4, bsc=1,
                              epilogue=kernels.Epilogue(0.0, 6.0))
    dw_spec = kernels.ConvSpec(batch, c_mid, h, w_, c_mid, k, s, p, d,
                               epilogue=kernels.Epilogue(0.0, 6.0))
    rng = np.random.default_rng(abs(hash(case)) % 2**32)
    we = rng.standard_normal((c_mid, c_in, 1, 1)).astype(np.float32)
    be = rng.standard_normal(c_mid).astype(np.float32)
    weight = dense_to_bsr(conv_weight_as_matrix(we), 4, 1)
    wd = rng.standard_normal((c_mid, 1) + k).astype(np.float32)
    unread = [1, 4, 5, 6, 7]  # block row 1 is all unread: no conv for it
    dw = convert.depthwise_layer(dw_spec, wd, rng.standard_normal(c_mid), "dw",
                                 unread=np.isin(np.arange(c_mid), unread))
    x = rng.standard_normal((batch, c_in, h, w_)).astype(np.float32)
    e6 = kernels.reference_conv2d(x, we, expand, be)
    ref = kernels.reference_conv2d(e6, wd, dw_spec, dw.bias, groups=c_mid)
    sizes = kernels.tile_candidates(expand, fused=True)
    for tile in (sizes[0], sizes[-1]):
        layer = convert.SparseConvLayer(expand, weight, kernels.kernel_arrays(weight, be),
                                        "fused", tile, dw)
        *args, live_rows, bounds = layer.constant_args()
        assert list(live_rows) == [1, 0] and list(bounds) == [0, batch * 2]  # (image, block row) items
        y = _run_alone(layer, [x, *args, live_rows, bounds])
        assert np.isnan(y[:, unread]).all()
        np.testing.assert_allclose(y[:, [0, 2, 3]], ref[:, [0, 2, 3]], rtol=RTOL, atol=ATOL)


def test_balanced_bounds_are_the_best_contiguous_split():
    """Contiguous ranges (each part writes its own stretch of the output) whose largest load is
    the least possible, checked against every split by brute force."""
    from itertools import combinations_with_replacement

    def best(costs, parts):
        n = len(costs)
        return min(max(sum(costs[a:b]) for a, b in zip((0, *cut), (*cut, n)))
                   for cut in combinations_with_replacement(range(n + 1), parts - 1))

    assert list(kernels.balanced_bounds([10, 10, 10, 10, 1, 1, 1, 1], 2)) == [0, 2, 8]
    assert list(kernels.balanced_bounds([5] * 8, 1)) == [0, 8]
    assert list(kernels.balanced_bounds([3, 1, 2], 5)) == [0, 1, 3, 3, 3, 3]  # fewer items than parts
    assert list(kernels.balanced_bounds([0, 0, 0], 2)) == [0, 3, 3]
    rng = np.random.default_rng(0)
    for parts in (2, 3, 4):
        for _ in range(20):
            costs = [int(c) for c in rng.integers(0, 100, int(rng.integers(1, 11))) ** 2]
            bounds = kernels.balanced_bounds(costs, parts)
            assert len(bounds) == parts + 1 and bounds[0] == 0 and bounds[-1] == len(costs)
            assert all(np.diff(bounds) >= 0)
            loads = [sum(costs[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
            assert max(loads) == best(costs, parts)


def test_a_stem_conv_runs_direct_with_its_bias_and_clip():
    """A 3-channel 3x3 stride-2 stem (+ bias + ReLU6), dense or block-sparse, goes to the direct
    kernel (not im2col + BSR), against onnxruntime; 8 input channels stay with BSR."""
    from onnx import helper

    rng = np.random.default_rng(21)
    for c_in, sparse, expected in ((3, False, "direct_0"), (3, True, "direct_0"), (8, True, "bsr_matmul_0")):
        w = _sparse(rng, (16, c_in, 3, 3)) if sparse else rng.standard_normal((16, c_in, 3, 3))
        inits = {"w": w, "b": rng.standard_normal(16), "lo": np.array(0.0), "hi": np.array(6.0)}
        nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
                 helper.make_node("Clip", ["c", "lo", "hi"], ["y"])]
        model = _onnx(nodes, inits, (1, c_in, 18, 22), ["y"])
        mod, report = convert.convert_to_bsr(convert.import_onnx(model), 4, 1, 0.5)
        assert _called(mod)[-1] == expected and len(report.direct) == (c_in == 3)
        if c_in == 3:
            assert report.direct[0].spec.epilogue == kernels.Epilogue(0.0, 6.0)
        _matches_onnxruntime(model, mod, rng.standard_normal((1, c_in, 18, 22)).astype(np.float32))


def test_resnet_tail_relu_of_residual_sum_is_fused():
    from onnx import helper

    rng = np.random.default_rng(12)
    inits = {"w": _sparse(rng, (8, 8, 3, 3)), "b": rng.standard_normal(8)}
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["x", "c"], ["s"]),  # residual on the left this time
             helper.make_node("Relu", ["s"], ["y"])]
    model = _onnx(nodes, inits, (2, 8, 6, 6), ["y"])
    mod, report = convert.convert_to_bsr(convert.import_onnx(model), 4, 1, 0.5)
    (layer,) = report.converted
    assert layer.spec.epilogue == kernels.Epilogue(0.0, math.inf, residual=True)
    assert _called(mod) == ["im2col_0", "bsr_matmul_0"]
    _matches_onnxruntime(model, mod, rng.standard_normal((2, 8, 6, 6)).astype(np.float32))


def test_chain_stops_where_an_intermediate_has_another_user():
    """The conv result is also a graph output: ReLU cannot be fused, and the output keeps the
    pre-ReLU values."""
    from onnx import helper

    rng = np.random.default_rng(13)
    inits = {"w": _sparse(rng, (8, 4, 1, 1)), "b": rng.standard_normal(8)}
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"]),
             helper.make_node("Relu", ["c"], ["r"])]
    model = _onnx(nodes, inits, (1, 4, 5, 5), ["c", "r"])
    mod, report = convert.convert_to_bsr(convert.import_onnx(model), 4, 1, 0.5)
    (layer,) = report.converted
    assert layer.spec.epilogue == kernels.Epilogue()
    assert layer.arrays.bias.any()  # the bias add has a single user: still fused
    _matches_onnxruntime(model, mod, rng.standard_normal((1, 4, 5, 5)).astype(np.float32))


def test_min_before_max_and_a_lone_depthwise_conv():
    """Clip(max only) then ReLU composes to one clamp; a depthwise conv without bias."""
    from onnx import helper

    rng = np.random.default_rng(14)
    inits = {"wd": rng.standard_normal((6, 1, 3, 3)), "hi": np.float32(0.7)}
    nodes = [helper.make_node("Conv", ["x", "wd"], ["d"], group=6, strides=[2, 2],
                              pads=[1, 1, 1, 1]),
             helper.make_node("Clip", ["d", "", "hi"], ["m"]),
             helper.make_node("Relu", ["m"], ["y"])]
    model = _onnx(nodes, inits, (1, 6, 9, 10), ["y"])
    mod, report = convert.convert_to_bsr(convert.import_onnx(model), 4, 1, 0.5)
    (layer,) = report.depthwise
    assert layer.spec.epilogue == kernels.Epilogue(0.0, float(np.float32(0.7)))
    assert _called(mod) == ["depthwise_0"]
    _matches_onnxruntime(model, mod, rng.standard_normal((1, 6, 9, 10)).astype(np.float32))


def test_relax_clip_with_prim_bounds_after_a_conv():
    """HardSigmoid imports as relax.clip(a*x + b, 0, 1) with IntImm bounds (MobileNetV3 crashed
    the planner): not a fusable chain, the conv alone is converted, parity holds."""
    from onnx import helper

    rng = np.random.default_rng(16)
    inits = {"w": _sparse(rng, (8, 4, 1, 1)), "b": rng.standard_normal(8)}
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"]),
             helper.make_node("HardSigmoid", ["c"], ["y"])]
    model = _onnx(nodes, inits, (1, 4, 6, 6), ["y"])
    mod, report = convert.convert_to_bsr(convert.import_onnx(model), 4, 1, 0.0)
    (layer,) = report.converted
    assert layer.spec.epilogue == kernels.Epilogue() and layer.arrays.bias.any()
    _matches_onnxruntime(model, mod, rng.standard_normal((1, 4, 6, 6)).astype(np.float32))


# ------------------------------------------------------------------ constant and unread planes

def _inverted_residual(we, wp, rng, residual_of_depthwise=False):
    """x (8 ch) -> 1x1 expand we (+ bias, ReLU6) -> depthwise 3x3 pad 1 (+ bias, ReLU6) -> 1x1
    project wp (+ bias) + x, or + the depthwise output itself (wp square) when
    `residual_of_depthwise`: then every depthwise plane has a second reader."""
    from onnx import helper

    c = we.shape[0]
    inits = {"we": we, "be": rng.uniform(0.5, 2.0, c),  # constant channels carry a non-zero value
             "wd": rng.standard_normal((c, 1, 3, 3)), "bd": rng.standard_normal(c),
             "wp": wp, "bp": rng.standard_normal(wp.shape[0]),
             "lo": np.array(0.0), "hi": np.array(6.0)}
    nodes = [
        helper.make_node("Conv", ["x", "we", "be"], ["e"]),
        helper.make_node("Clip", ["e", "lo", "hi"], ["e6"]),
        helper.make_node("Conv", ["e6", "wd", "bd"], ["d"], group=c, pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["d", "lo", "hi"], ["d6"]),
        helper.make_node("Conv", ["d6", "wp", "bp"], ["p"]),
        helper.make_node("Add", ["p", "d6" if residual_of_depthwise else "x"], ["y"]),
    ]
    return _onnx(nodes, inits, (1, we.shape[1], 10, 10), ["y"])


def _run_alone(layer, args):
    """Call one converted kernel by itself; the output buffer starts as NaN, so a plane the
    kernel does not write stays NaN."""
    func = layer.prim_func()
    lib = tvm.compile(tvm.IRModule({layer.kernel_name: func}), target=tvm.target.Target(TARGET))
    out_shape = (getattr(layer, "depthwise", None) or layer).spec.out_shape
    y = tvm.runtime.tensor(np.full(out_shape, np.nan, np.float32))
    lib[layer.kernel_name](*[tvm.runtime.tensor(np.asarray(a)) for a in args], y)
    return y.numpy()


def test_constant_and_unread_planes_of_the_fused_kernel():
    """Expand rows all zero (a whole block row, channels 4-7, and row 9 alone) carry the constant
    ReLU6(bias): their depthwise planes are copied from maps made at conversion time, zero padding
    included; the projection never reads channels 0-2, 5 and 20: those planes are not computed,
    and block row 1 (all constant or unread) skips its sparse conv. Exact against onnxruntime."""
    rng = np.random.default_rng(21)
    we = rng.standard_normal((32, 8, 1, 1))  # dense but for the zero rows: 1/8 block sparse
    we[4:8] = 0
    we[9] = 0
    wp = rng.standard_normal((8, 32, 1, 1))
    wp[:, [0, 1, 2, 5, 20]] = 0
    model = _inverted_residual(we, wp, rng)
    mod, report = convert.convert_to_bsr(convert.import_onnx(model), 4, 1, 0.1)
    expand, _project = report.converted
    dw = expand.depthwise
    unread, constant = [0, 1, 2, 5, 20], [4, 6, 7, 9]
    assert list(np.flatnonzero(dw.mode == kernels.UNREAD)) == unread
    assert list(np.flatnonzero(dw.mode >= 0)) == constant
    assert dw.counts == {"computed": 32 - 9, "unread": 5, "constant": 4}
    x = rng.standard_normal((1, 8, 10, 10)).astype(np.float32)
    _matches_onnxruntime(model, mod, x)
    _matches_onnxruntime(model, convert.convert_to_bsr(convert.import_onnx(model), 4, 1, 0.1, threads=3)[0], x)

    # the kernel alone: unread planes untouched, constant planes the maps of numpy's conv
    a = expand.arrays
    live_rows = np.any((dw.mode == kernels.COMPUTE).reshape(-1, 4), axis=1).astype(np.int32)
    assert list(live_rows) == [1, 0, 1, 1, 1, 1, 1, 1]
    # block rows in 3 ranges balanced by cost (row 1 costs nothing: it has no conv)
    bounds = kernels.balanced_bounds(expand.row_costs(), 3)
    assert bounds[0] == 0 and bounds[-1] == 8 and len(set(bounds)) == 4
    expand3 = dataclasses.replace(expand, threads=3)
    y = _run_alone(expand3, [x, a.indptr, a.indices, a.data, a.bias, dw.weight, dw.bias,
                             dw.mode, dw.consts, live_rows, bounds])
    e6 = kernels.reference_conv2d(x, we.astype(np.float32), expand.spec, a.bias)
    ref = kernels.reference_conv2d(e6, dw.weight[:, None], dw.spec, dw.bias, groups=32)
    assert np.isnan(y[:, unread]).all()
    written = [c for c in range(32) if c not in unread]
    np.testing.assert_allclose(y[:, written], ref[:, written], rtol=RTOL, atol=ATOL)
    border, inside = y[0, 4, 0, 0], y[0, 4, 5, 5]
    assert border != inside  # the constant plane really is a map (padding), not one value


def test_every_expand_row_zero_and_an_unread_lone_depthwise():
    """An all-zero expand (no block at all): every plane a constant map; and a lone depthwise
    conv whose projection skips channels: those planes are not computed. Both exact."""
    from onnx import helper

    rng = np.random.default_rng(22)
    wp = _sparse(rng, (8, 16, 1, 1), 0.3)
    model = _inverted_residual(np.zeros((16, 8, 1, 1)), wp, rng)
    mod, report = convert.convert_to_bsr(convert.import_onnx(model), 4, 1, 0.2)
    dw = report.converted[0].depthwise
    assert report.converted[0].weight.nnzb == 0
    read = np.any(wp != 0, axis=(0, 2, 3))
    assert dw.counts == {"computed": 0, "unread": int((~read).sum()), "constant": int(read.sum())}
    _matches_onnxruntime(model, mod, rng.standard_normal((1, 8, 10, 10)).astype(np.float32))

    wp = rng.standard_normal((8, 12, 1, 1))
    wp[:, [1, 7]] = 0
    inits = {"wd": rng.standard_normal((12, 1, 3, 3)), "wp": wp}
    nodes = [helper.make_node("Conv", ["x", "wd"], ["d"], group=12, pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["d"], ["r"]),
             helper.make_node("Conv", ["r", "wp"], ["y"])]
    lone = _onnx(nodes, inits, (1, 12, 7, 7), ["y"])
    mod, report = convert.convert_to_bsr(convert.import_onnx(lone), 4, 1, 0.1)
    (dw,) = report.depthwise
    assert list(np.flatnonzero(dw.mode == kernels.UNREAD)) == [1, 7]
    x = rng.standard_normal((1, 12, 7, 7)).astype(np.float32)
    _matches_onnxruntime(lone, mod, x)
    y = _run_alone(dw, [x, dw.weight, dw.bias, dw.mode, dw.consts])
    assert np.isnan(y[:, [1, 7]]).all() and not np.isnan(np.delete(y, [1, 7], axis=1)).any()


def test_a_residual_reading_channels_the_projection_skips():
    """The depthwise output is also the residual of the projection: the channels the projection's
    matrix does not read are read by the add, so every plane is computed (or copied), none left."""
    rng = np.random.default_rng(23)
    we = rng.standard_normal((16, 8, 1, 1))
    we[12:16] = 0  # constant block row: copied, still written
    wp = rng.standard_normal((16, 16, 1, 1))
    wp[:, [2, 3, 13]] = 0  # the projection skips these, the residual reads them
    model = _inverted_residual(we, wp, rng, residual_of_depthwise=True)
    mod, report = convert.convert_to_bsr(convert.import_onnx(model), 4, 1, 0.1)
    dw = report.depthwise[0]
    assert dw.counts == {"computed": 12, "unread": 0, "constant": 4}
    _matches_onnxruntime(model, mod, rng.standard_normal((1, 8, 10, 10)).astype(np.float32))


def test_exact_simplify_first_turns_constant_planes_into_unread_ones():
    """model_tune runs onnxprune's simplify (channels kept) before converting: the constant
    channels fold into the projection's bias plus a border map (their ReLU6(bias) > 0 meets the
    depthwise conv's zero padding), the map rides in the projection kernel as a constant residual
    next to the real one, and the depthwise planes become unread. Exact against the model as given."""
    from onnxprune.tvm_kernels.api import Progress, exact_simplify

    rng = np.random.default_rng(21)
    we = rng.standard_normal((32, 8, 1, 1))
    we[4:8] = 0
    we[9] = 0
    wp = rng.standard_normal((8, 32, 1, 1))
    wp[:, [0, 1, 2, 5, 20]] = 0
    model = _inverted_residual(we, wp, rng)
    simplified = exact_simplify(model, Progress(enabled=False))
    assert "Add" in [n.op_type for n in simplified.graph.node[5:]]  # the border map and the residual
    mod, report = convert.convert_to_bsr(convert.import_onnx(simplified), 4, 1, 0.1)
    assert report.depthwise[0].counts == {"computed": 23, "unread": 9, "constant": 0}
    assert _called(mod) == ["expand_depthwise_0", "bsr_matmul_2"]
    _matches_onnxruntime(model, mod, rng.standard_normal((1, 8, 10, 10)).astype(np.float32))


@pytest.mark.parametrize("epilogue", ["bias_relu", "bias_res_relu6"])
def test_row_balanced_weights_take_the_static_bound_kernel(epilogue):
    """Row-balanced 1x4 pruning leaves every block row the same block count: the kernel's block
    loop then has static bounds. Exact against numpy for every tile; an unbalanced matrix keeps
    the indptr loop."""
    from onnxprune.pruning import block_prune_weights

    rng = np.random.default_rng(31)
    has_bias, ep = EPILOGUES[epilogue]
    spec = kernels.ConvSpec(1, 24, 9, 9, 16, (3, 3), padding=(1, 1, 1, 1), bsr=4, epilogue=ep)
    w = rng.standard_normal((16, 24, 3, 3)).astype(np.float32)
    w = np.where(block_prune_weights(w, 4, 0.7, balanced=True), w, 0)
    arrays = kernels.kernel_arrays(dense_to_bsr(conv_weight_as_matrix(w), 4, 1), None)
    assert arrays.row_blocks == (24 - int(np.ceil(0.7 * 24 - 1e-9))) * 9  # a pruned block spans k x k columns
    for tile in kernels.tile_candidates(spec):
        check_against_numpy(spec, w, has_bias, rng, tile=tile)
    w[0:4, arrays.indices[0] // 9] = 0.0  # block row 0 loses one kept channel: unbalanced
    unbalanced = kernels.kernel_arrays(dense_to_bsr(conv_weight_as_matrix(w), 4, 1), None)
    assert unbalanced.row_blocks is None
    check_against_numpy(spec, w, has_bias, rng)


@pytest.mark.parametrize("rows", [1, 6])
@pytest.mark.parametrize("n", [1000, 70, 10])
def test_classifier_matmul_runs_on_the_gemv_kernel(rows, n):
    """Gemm (transB, bias) and MatMul + Add of a few rows by a constant matrix: our GEMV kernel,
    blocks of 64 outputs (the last overlapping) and row groups of 4 (the last overlapping),
    against onnxruntime; a matmul whose product has a second reader keeps its add separate."""
    from onnx import helper

    rng = np.random.default_rng(31 + n + rows)
    k = 96
    inits = {"w": rng.standard_normal((n, k)), "b": rng.standard_normal(n),
             "wt": rng.standard_normal((k, n)), "c": rng.standard_normal(n)}
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["g"], transB=1),
             helper.make_node("Relu", ["g"], ["r"]),
             helper.make_node("MatMul", ["x", "wt"], ["m"]),
             helper.make_node("Add", ["m", "c"], ["y"])]
    x = rng.standard_normal((rows, k)).astype(np.float32)
    model = _onnx(nodes, inits, x.shape, ["r", "y"])
    mod, report = convert.convert_to_bsr(convert.import_onnx(model), 4, 1, 0.5)
    assert [(g.rows, g.weight.shape) for g in report.gemv] == [(rows, (k, n))] * 2
    assert sum(name.startswith("gemv_") for name in _called(mod)) == 2
    _matches_onnxruntime(model, mod, x)

    # the product also read elsewhere: the matmul alone on the kernel, the add left to TVM
    both = _onnx(nodes[2:], inits, x.shape, ["y", "m"])
    mod, report = convert.convert_to_bsr(convert.import_onnx(both), 4, 1, 0.5)
    assert len(report.gemv) == 1 and not report.gemv[0].bias.any()
    _matches_onnxruntime(both, mod, x)


def test_a_scalar_added_to_a_one_output_matmul_is_not_its_bias():
    """x @ (K, 1) + a scalar constant: the scalar is no (N,) bias (a 0-d array has no last
    axis); the matmul runs on the GEMV kernel, the add stays with TVM."""
    from onnx import helper

    rng = np.random.default_rng(34)
    model = _onnx([helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "c"], ["y"])],
                  {"w": rng.standard_normal((8, 1)), "c": np.array(0.5)}, (2, 8), ["y"])
    mod, report = convert.convert_to_bsr(convert.import_onnx(model), 4, 1, 0.5)
    assert len(report.gemv) == 1 and not report.gemv[0].bias.any()
    _matches_onnxruntime(model, mod, rng.standard_normal((2, 8)).astype(np.float32))


def test_a_matmul_of_many_rows_stays_with_tvm():
    """More than GEMV_MAX_ROWS rows is a GEMM: left to TVM's matmul."""
    from onnx import helper

    rng = np.random.default_rng(33)
    rows = kernels.GEMV_MAX_ROWS + 1
    model = _onnx([helper.make_node("MatMul", ["x", "w"], ["y"])], {"w": rng.standard_normal((8, 12))},
                  (rows, 8), ["y"])
    mod, report = convert.convert_to_bsr(convert.import_onnx(model), 4, 1, 0.5)
    assert not report.gemv and not any(name.startswith("gemv") for name in _called(mod))
    _matches_onnxruntime(model, mod, rng.standard_normal((rows, 8)).astype(np.float32))


# ---------------------------------------------------------------------------- conv + global mean

POOLS = {  # how a model spells the global mean over pixels: op, attributes, the shape it keeps
    "gap": ("GlobalAveragePool", {}, (2, 16, 1, 1)),
    "reducemean": ("ReduceMean", {"axes": [-2, -1], "keepdims": 0}, (2, 16)),
}


@pytest.mark.parametrize("pool", sorted(POOLS))
@pytest.mark.parametrize("k", [1, 3])
def test_conv_then_global_mean_is_one_kernel_for_every_tile(pool, k):
    """conv (+ bias + Clip) then GlobalAveragePool / ReduceMean over H, W: one kernel whose
    output is the mean (49 pixels: every tile width has an overlapping tail, which must not be
    counted twice), against onnxruntime."""
    from onnx import helper

    rng = np.random.default_rng(40 + k)
    inits = {"w": _sparse(rng, (16, 6, k, k)), "b": rng.standard_normal(16),
             "lo": np.array(0.0), "hi": np.array(6.0)}
    op, attrs, shape = POOLS[pool]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[k // 2] * 4),
             helper.make_node("Clip", ["c", "lo", "hi"], ["c6"]),
             helper.make_node(op, ["c6"], ["y"], **attrs)]
    x = rng.standard_normal((2, 6, 7, 7)).astype(np.float32)
    model = _onnx(nodes, inits, x.shape, ["y"])
    mod, report = convert.convert_to_bsr(convert.import_onnx(model), 4, 1, 0.5)
    (layer,) = report.converted
    assert layer.pooled == layer.out_shape == shape
    from onnxprune.tvm_kernels.api import describe_layer
    assert describe_layer(layer).endswith("+clip(0, 6), +global mean")
    assert _called(mod) == (["im2col_mean_0"] if k == 3 else []) + ["bsr_matmul_mean_0"]
    tiles = kernels.tile_candidates(layer.spec, fused=True)
    assert [t.pixels for t in tiles] == [8, 16, 32] and not any(t.packed for t in tiles)
    for tile in tiles:
        _matches_onnxruntime(model, convert.retile(mod, report, {layer.kernel_name: tile}), x)


def test_global_mean_stays_separate_where_the_kernel_cannot_take_it():
    """A conv output with a second reader, a residual chain, and a mean over channels keep
    their mean in TVM (and still match onnxruntime)."""
    from onnx import helper

    rng = np.random.default_rng(44)
    inits = {"w": _sparse(rng, (8, 8, 1, 1)), "b": rng.standard_normal(8)}
    conv = helper.make_node("Conv", ["x", "w", "b"], ["c"])
    cases = {
        "second reader": ([conv, helper.make_node("GlobalAveragePool", ["c"], ["y"])], ["y", "c"]),
        "residual": ([conv, helper.make_node("Add", ["c", "x"], ["s"]),
                      helper.make_node("GlobalAveragePool", ["s"], ["y"])], ["y"]),
        "over channels": ([conv, helper.make_node("ReduceMean", ["c"], ["y"], axes=[1])], ["y"]),
    }
    x = rng.standard_normal((1, 8, 5, 5)).astype(np.float32)
    for name, (nodes, outputs) in cases.items():
        model = _onnx(nodes, inits, x.shape, outputs)
        mod, report = convert.convert_to_bsr(convert.import_onnx(model), 4, 1, 0.5)
        (layer,) = report.converted
        assert layer.pooled is None and layer.out_shape == (1, 8, 5, 5), name
        assert _called(mod) == ["bsr_matmul_0"] and "R.mean(" in mod["main"].script(), name
        _matches_onnxruntime(model, mod, x)
