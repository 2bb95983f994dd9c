"""Exporting zoo models and checking them against PyTorch."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch

from .onnx_builders import weight_count

EXPORTS = ("ts_folded", "ts_bn", "dynamo")


def export(model: torch.nn.Module, x: torch.Tensor, mode: str) -> onnx.ModelProto:
    """ts_folded: TorchScript exporter, BN folded by torch; ts_bn: BN nodes kept; dynamo: torch.export."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if mode == "dynamo":
            prog = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
            return prog.model_proto
        buf = io.BytesIO()
        torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=17, do_constant_folding=(mode == "ts_folded"))
        return onnx.load_from_string(buf.getvalue())


def run_ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    if model.ir_version > 10:
        model.ir_version = 10
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def assert_matches_torch(got: np.ndarray, ref: np.ndarray, rel: float = 1e-4) -> None:
    """Max error relative to the output's scale: |got - ref| <= rel * max|ref|."""
    assert got.shape == ref.shape
    scale = float(np.abs(ref).max())
    err = float(np.abs(got - ref).max())
    assert err <= rel * scale, f"max abs error {err:.3g} > {rel:g} x max|ref| {scale:.3g}"


def layer_weight_count(model: onnx.ModelProto) -> int:
    """Elements of the weights of every Conv / ConvTranspose / Gemm / MatMul with constant weights
    (border maps' one-channel convs over a ones image excluded: not layers of the architecture)."""
    return weight_count(model)
