"""The command line: exit codes, one-line errors, the input never modified, atomic outputs."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from onnxprune.models import build, example_input
from onnxprune.models.masks import zero_random_filters
from onnxprune.cli import main

from .zoo_util import export


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    model = build("resnet18")
    zero_random_filters(model, 0.5, seed=3)
    path = tmp_path_factory.mktemp("cli") / "pruned.onnx"
    onnx.save(export(model, example_input("resnet18"), "ts_bn"), path)
    return path


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_simplify_writes_default_output_and_leaves_input_alone(pruned, capsys):
    before = digest(pruned)
    code, out, err = run(["simplify", pruned], capsys)
    assert code == 0, err
    result = pruned.with_name("pruned.simplified.onnx")
    assert result.exists()
    assert digest(pruned) == before
    assert "parity" in out and "PASS" in out
    assert not [p for p in pruned.parent.iterdir() if p.name.endswith(".tmp")]  # no temp files left
    code, out, _ = run(["check", pruned, result], capsys)
    assert code == 0 and "PASS" in out


def test_simplify_json_and_verbose(pruned, tmp_path, capsys):
    code, out, _ = run(["simplify", pruned, "-o", tmp_path / "s.onnx", "--json"], capsys)
    assert code == 0
    rep = json.loads(out)
    assert rep["parity"]["passed"] and rep["after"]["macs"] < rep["before"]["macs"]
    code, out, _ = run(["simplify", pruned, "-o", tmp_path / "v.onnx", "-v"], capsys)
    assert code == 0 and "channels per layer" in out


def test_refuses_to_overwrite_input(pruned, capsys):
    before = digest(pruned)
    code, _, err = run(["simplify", pruned, "-o", pruned], capsys)
    assert code == 2 and "never overwrites" in err
    assert digest(pruned) == before


def test_check_fails_with_exit_1_on_different_models(pruned, tmp_path, capsys):
    model = onnx.load(pruned)
    conv_w = next(n.input[1] for n in model.graph.node if n.op_type == "Conv")
    for init in model.graph.initializer:
        if init.name == conv_w:
            arr = onnx.numpy_helper.to_array(init).copy()
            arr += 0.5
            init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    other = tmp_path / "other.onnx"
    onnx.save(model, other)
    code, out, _ = run(["check", pruned, other], capsys)
    assert code == 1 and "FAIL" in out


@pytest.mark.parametrize("content,message", [
    (None, "no such file"),
    (b"", "not"),
    (b"this is not a protobuf at all \x00\xff" * 10, "not"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, content, message):
    path = tmp_path / "bad.onnx"
    if content is not None:
        path.write_bytes(content)
    code, out, err = run(["simplify", path], capsys)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_truncated_model(pruned, tmp_path, capsys):
    data = open(pruned, "rb").read()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    code, _, err = run(["inspect", path], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1


def _model_with_weight(tensor: onnx.TensorProto) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 4, 4])
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "g", [x], [y], [tensor])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


@pytest.mark.parametrize("defect,message", [
    ("short raw data", "1020 bytes of data for dims [16, 16, 1, 1] (1024 expected)"),
    ("short typed data", "data does not match dims [16, 16, 1, 1]"),
    ("undefined type", "unsupported data type 0"),
])
def test_malformed_weights_are_one_line_exit_2(tmp_path, capsys, defect, message):
    """The checker runs on a weightless view of the model; the weights it does not see are checked
    on their own, and a defect in them is a bad-input error, never a crash in a pass."""
    w = onnx.numpy_helper.from_array(np.ones((16, 16, 1, 1), np.float32), "w")
    if defect == "short raw data":
        w.raw_data = w.raw_data[:-4]
    elif defect == "short typed data":
        w = helper.make_tensor("w", TensorProto.FLOAT, [16, 16, 1, 1], np.ones(256, np.float32).tolist())
        del w.float_data[-1]
    else:
        w.data_type = TensorProto.UNDEFINED
    path = tmp_path / "bad_weights.onnx"
    onnx.save(_model_with_weight(w), path)
    for argv in (["simplify", path, "-o", tmp_path / "out.onnx"], ["inspect", path]):
        code, out, err = run(argv, capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out.onnx").exists()
    good = onnx.numpy_helper.from_array(np.ones((16, 16, 1, 1), np.float32), "w")
    onnx.save(_model_with_weight(good), path)
    assert run(["simplify", path, "-o", tmp_path / "out.onnx"], capsys)[0] == 0


def test_dynamic_spatial_input_needs_inputs(tmp_path, capsys):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "H", "W"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, "H", "W"])
    w = onnx.numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "w")
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "g", [x], [y], [w])
    path = tmp_path / "dyn.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), path)
    code, _, err = run(["simplify", path], capsys)
    assert code == 2 and "--inputs" in err
    np.savez(tmp_path / "in.npz", x=np.random.rand(1, 3, 5, 7).astype(np.float32))
    code, _, err = run(["simplify", path, "--inputs", tmp_path / "in.npz", "-o", tmp_path / "out.onnx"], capsys)
    assert code == 0, err


def test_unsupported_opset(tmp_path, capsys):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    path = tmp_path / "old.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 6)], ir_version=3), path)
    code, _, err = run(["simplify", path], capsys)
    assert code == 2 and "opset" in err


def test_unknown_pin_is_an_error(pruned, tmp_path, capsys):
    code, _, err = run(["simplify", pruned, "-o", tmp_path / "x.onnx", "--pin", "no_such_tensor"], capsys)
    assert code == 2 and "no_such_tensor" in err


def test_inspect_reports_pins(pruned, capsys):
    code, out, _ = run(["inspect", pruned], capsys)
    assert code == 0 and "MACs" in out and "graph output" in out


def test_external_data_model_is_read(tmp_path, capsys):
    """Models saved with external data load (the data file travels with the .onnx)."""
    model = build("mobilenet_v2")
    zero_random_filters(model, 0.5, seed=0)
    m = export(model, example_input("mobilenet_v2"), "ts_bn")
    path = tmp_path / "ext.onnx"
    onnx.save_model(m, path, save_as_external_data=True, all_tensors_to_one_file=True, location="ext.onnx.data", size_threshold=0)
    code, out, err = run(["simplify", path, "-o", tmp_path / "small.onnx"], capsys)
    assert code == 0, err


def test_console_script_and_help():
    """The installed entry point works and --help explains the commands."""
    out = subprocess.run([sys.executable, "-m", "onnxprune.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for word in ("demo", "simplify", "check", "inspect"):
        assert word in out.stdout
    out = subprocess.run([sys.executable, "-m", "onnxprune.cli", "simplify", "--help"], capture_output=True, text=True)
    assert "--no-check" in out.stdout and "--pin" in out.stdout and "--align" in out.stdout


def test_demo_runs_end_to_end(capsys):
    code, out, _ = run(["demo", "--model", "resnet18", "--scale", "1"], capsys)
    assert code == 0
    assert "simplified" in out and "PASS" in out
