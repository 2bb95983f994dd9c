"""Models with external data: read lazily (memory-mapped, copy-on-write), simplified, written with
external data when large, parity-checked from the files. The threshold for writing external data
is lowered so that CI takes the >2 GB code path with a model of a few kB; a real >2 GB model runs
with ONNXPRUNE_SLOW=1 (and in benchmarks/tool_cost.py big)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxprune.graph
from onnxprune.api import simplify_file
from onnxprune.graph import Graph, read_model

from .onnx_builders import GraphBuilder


def pruned_model(width: int = 32, zeroed: int = 16, size: int = 8) -> onnx.ModelProto:
    b = GraphBuilder(3, size, size, seed=1)
    b.conv(width, 3, pads=1, name="c1")
    b.act("Relu")
    b.conv(width, 3, pads=1, name="c2")
    b.act("Relu")
    b.global_avg_pool()
    b.flatten()
    b.gemm(10, name="fc")
    for row in range(zeroed):
        b.zero_filter("c1", 2 * row)
    return b.model()


def save_external(model: onnx.ModelProto, path: Path) -> None:
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".weights", size_threshold=0)


def ort_outputs(path: Path, x: np.ndarray) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def conv_rows(path: Path) -> dict[str, int]:
    m = onnx.load(str(path), load_external_data=False)
    dims = {t.name: list(t.dims) for t in m.graph.initializer}
    return {n.name: dims[n.input[1]][0] for n in m.graph.node if n.op_type in ("Conv", "Gemm")}


@pytest.mark.parametrize("external_out", [False, True], ids=["embedded output", "external output"])
def test_external_input_simplifies_exactly_and_stays_untouched(tmp_path, monkeypatch, external_out):
    src = tmp_path / "m.onnx"
    save_external(pruned_model(), src)
    weights_before = digest(tmp_path / "m.onnx.weights")
    if external_out:  # the path models over 2 GB take, with a model of a few kB
        monkeypatch.setattr(onnxprune.graph, "EXTERNAL_DATA_THRESHOLD", 0)
    dst = tmp_path / "out" / "small.onnx"
    report = simplify_file(src, dst, align=1)
    assert report.parity.passed
    assert (dst.parent / "small.onnx.data").exists() == external_out
    assert digest(tmp_path / "m.onnx.weights") == weights_before
    # 16 of c1's 32 filters were zero: c1 loses them, c2 keeps its rows; the reference is the input on ORT
    assert conv_rows(dst)["c1"] == 16 and conv_rows(dst)["c2"] == 32
    x = np.random.default_rng(5).standard_normal((1, 3, 8, 8)).astype(np.float32)
    for a, b in zip(ort_outputs(dst, x), ort_outputs(src, x)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    if external_out:
        onnx.checker.check_model(str(dst))
        m = onnx.load(str(dst), load_external_data=False)
        offsets = [int(e.value) for t in m.graph.initializer for e in t.external_data if e.key == "offset"]
        assert offsets and all(o % onnxprune.graph.EXTERNAL_ALIGN == 0 for o in offsets)


def test_external_tensors_are_mapped_copy_on_write(tmp_path):
    src = tmp_path / "m.onnx"
    save_external(pruned_model(), src)
    before = digest(tmp_path / "m.onnx.weights")
    g = Graph(read_model(src), base_dir=tmp_path)
    big = [a for a in g.inits.values() if a.nbytes >= 1024]
    assert big and all(isinstance(a.base, np.memmap) or isinstance(getattr(a.base, "base", None), np.memmap) for a in big)
    big[0][...] = 7.0  # a pass writing in place changes its own copy, never the input's file
    assert digest(tmp_path / "m.onnx.weights") == before
    reread = Graph(read_model(src), base_dir=tmp_path)
    name = next(k for k, a in g.inits.items() if a is big[0])
    assert not np.any(reread.inits[name] == 7.0)


def test_missing_external_data_is_a_one_line_error(tmp_path):
    src = tmp_path / "m.onnx"
    save_external(pruned_model(), src)
    (tmp_path / "m.onnx.weights").unlink()
    from onnxprune.cli import main

    assert main(["simplify", str(src), str(tmp_path / "o.onnx")]) == 2
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.slow
def test_a_model_over_2_gb_simplifies_and_is_written_with_external_data(tmp_path):
    # 34 1x1 convs of 4096 filters (64 MiB each): 2.2 GB of float32 weights, past protobuf's 2 GB
    b = GraphBuilder(64, 4, 4, seed=2)
    b.conv(4096, 1, name="wide")
    b.act("Relu")
    for k in range(33):
        b.conv(4096, 1, name=f"k{k}")
        b.act("Relu")
    b.global_avg_pool()
    b.flatten()
    for row in range(0, 4096, 2):
        b.zero_filter("wide", row)
    src = tmp_path / "big.onnx"
    save_external(b.model(), src)
    dst = tmp_path / "small.onnx"
    report = simplify_file(src, dst)
    assert report.parity.passed
    assert (tmp_path / "small.onnx.data").exists()
    assert conv_rows(dst)["wide"] == 2048
