"""BSR conv kernels against numpy and onnxruntime: shapes, strides, paddings, dilations,
sparsities (0, 0.5, 0.9, 1.0, empty and full block rows), block shapes, bias and ReLU."""

import numpy as np
import pytest

from tvm_kernels.bsr import bsr_to_dense, block_sparsity, conv_weight_as_matrix, dense_to_bsr

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402

from tvm_kernels import convert, kernels  # noqa: E402

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


def run_conv(spec, w, bias, x, tile=None):
    mod, _ = convert.single_conv_module(spec, w, bias, tile)
    vm = relax.VirtualMachine(tvm.compile(mod, target=tvm.target.Target(TARGET)), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


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
@pytest.mark.parametrize("bias_relu", [(False, False), (True, True)], ids=["plain", "bias_relu"])
def test_bsr_conv_matches_numpy(case, bias_relu):
    c_in, h, w_, c_out, k, s, p, d, bsr, bsc, sparsity, batch = case
    has_bias, relu = bias_relu
    spec = kernels.ConvSpec(batch, c_in, h, w_, c_out, k, s, p, d, bsr, bsc, relu=relu)
    rng = np.random.default_rng(abs(hash(case)) % 2**32)
    w = sparse_weight(rng, spec, sparsity)
    bias = rng.standard_normal(c_out).astype(np.float32) if has_bias else None
    x = rng.standard_normal((batch, c_in, h, w_)).astype(np.float32)
    out = run_conv(spec, w, bias, x)
    assert out.shape == spec.out_shape
    np.testing.assert_allclose(out, kernels.reference_conv2d(x, w, spec, bias), rtol=RTOL, atol=ATOL)


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
    assert layer.spec.relu == relu  # ReLU fused into the kernel epilogue
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
