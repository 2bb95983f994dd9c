"""Exit codes and messages that mean what they say; inputs users actually have; a torch-free core.

0 ok, 1 parity failed, 2 bad input (one line), 3 a bug, 130 interrupted."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import onnxprune
from onnxprune import OnnxPruneError
from onnxprune.cli import main

from .onnx_builders import GraphBuilder
from .test_file_safety import small_model

ROOT = Path(__file__).resolve().parents[1]


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if not line.startswith("[onnxprune]")]


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(small_model(), path)
    return path


BAD_FLAGS = {
    "atol nan": (["check", "{m}", "{m}", "--atol", "nan"], "--atol"),
    "rtol nan": (["check", "{m}", "{m}", "--rtol", "nan"], "--rtol"),
    "atol negative": (["simplify", "{m}", "--atol", "-1"], "--atol"),
    "rtol inf": (["simplify", "{m}", "--rtol", "inf"], "--rtol"),
    "align 0": (["simplify", "{m}", "--align", "0"], "--align"),
    "seed -1": (["simplify", "{m}", "--seed", "-1"], "--seed"),
    "seed text": (["check", "{m}", "{m}", "--seed", "one"], "--seed"),
    "prune n 0": (["prune", "{m}", "--sparsity", "0.5", "--granularity", "1xN", "--n", "0"], "--n"),
    "prune sparsity 1": (["prune", "{m}", "--sparsity", "1"], "--sparsity"),
    "rearrange has no --n": (["rearrange", "{m}", "--n", "4"], "unrecognized"),
    "missing model": (["simplify"], "required"),
    "unknown command": (["nosuch"], "invalid choice"),
    "unknown flag": (["inspect", "{m}", "--bogus"], "unrecognized"),
    "demo threads 0": (["demo", "--threads", "0"], "--threads"),
    "demo scale 0": (["demo", "--scale", "0"], "--scale"),
}


@pytest.mark.parametrize("case", sorted(BAD_FLAGS))
def test_bad_flags_are_one_line_pointing_to_help(model_path, capsys, case):
    argv, word = BAD_FLAGS[case]
    code, out, err = run([a.format(m=model_path) for a in argv], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and word in lines[0] and "--help" in lines[0], err
    assert out == ""


def test_api_validates_tolerances_alignment_and_seeds(model_path):
    """NaN tolerances would make every comparison pass: the API refuses them too."""
    for kwargs in ({"atol": float("nan")}, {"rtol": float("nan")}, {"atol": -1.0}, {"seed": -1}):
        with pytest.raises(OnnxPruneError):
            onnxprune.check(model_path, model_path, **kwargs)
    with pytest.raises(OnnxPruneError, match="align"):
        onnxprune.simplify(model_path, align=0)


def test_unknown_pin_is_the_same_error_in_simplify_and_inspect(model_path, tmp_path, capsys):
    messages = []
    for argv in (["simplify", model_path, tmp_path / "o.onnx", "--pin", "nope"], ["inspect", model_path, "--pin", "nope"]):
        code, _, err = run(argv, capsys)
        assert code == 2
        messages.append(error_lines(err)[0].split(": error: ", 1)[1])
    assert messages[0] == messages[1] and "no tensor named nope" in messages[0]


def test_internal_errors_are_exit_3_and_one_line(model_path, tmp_path, capsys, monkeypatch):
    import onnxprune.api

    def bug(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(onnxprune.api, "simplify_to", bug)
    code, _, err = run(["simplify", model_path, tmp_path / "o.onnx"], capsys)
    assert code == 3
    lines = error_lines(err)
    assert len(lines) == 1 and "internal error: ZeroDivisionError" in lines[0] and "ONNXPRUNE_DEBUG" in lines[0]


def _closed_stdout(argv) -> subprocess.CompletedProcess:
    """Run the CLI with a reader that leaves at once, as `| head -0` does."""
    proc = subprocess.Popen([sys.executable, "-m", "onnxprune.cli", *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    return subprocess.CompletedProcess(argv, proc.wait(timeout=300), "", err)


def test_a_closed_pipe_ends_quietly_with_the_real_exit_code(model_path, tmp_path):
    r = _closed_stdout(["demo", "--list"])
    assert r.returncode == 0 and r.stderr == ""
    r = _closed_stdout(["simplify", model_path, tmp_path / "o.onnx"])
    assert r.returncode == 0 and "error" not in r.stderr, r.stderr  # not 1 ("parity failed"), not 3
    assert (tmp_path / "o.onnx").is_file()


def test_version_and_exit_codes_in_help(capsys):
    from onnxprune.tvm_kernels.cli import main as model_tune_main

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"onnxprune {onnxprune.__version__}"
    assert model_tune_main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"model_tune (onnxprune) {onnxprune.__version__}"
    for argv, prog in ((["--help"], main), (["simplify", "--help"], main), (["--help"], model_tune_main)):
        assert prog(argv) == 0
        text = " ".join(capsys.readouterr().out.split())
        for code in ("0 ok", "1 ", "2 bad input", "3 internal error", "130 interrupted"):
            assert code in text, (argv, code)
    readme = " ".join((ROOT / "README.md").read_text().split())
    for code in ("0 ok", "2 bad input", "3 internal error", "130 interrupted"):
        assert code in readme


# --- inputs users actually have -------------------------------------------------------------

def model_with_scalar_bool_and_int_inputs() -> onnx.ModelProto:
    """y = If(flag, x * s, x + float(k)): a 0-d float, a 0-d bool and an int64 input."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    then = helper.make_graph([helper.make_node("Mul", ["x", "s"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, 4])])
    other = helper.make_graph([helper.make_node("Cast", ["k"], ["kf"], to=TensorProto.FLOAT),
                               helper.make_node("Add", ["x", "kf"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, [1, 4])])
    g = helper.make_graph([helper.make_node("If", ["flag"], ["y"], then_branch=then, else_branch=other)], "g",
                          [x, helper.make_tensor_value_info("s", TensorProto.FLOAT, []),
                           helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
                           helper.make_tensor_value_info("k", TensorProto.INT64, [1, 4])], [y])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def test_random_inputs_cover_0d_bool_and_integer_inputs(tmp_path, capsys):
    path = tmp_path / "if.onnx"
    onnx.save(model_with_scalar_bool_and_int_inputs(), path)
    feeds = onnxprune.parity.random_inputs(onnx.load(path))
    assert feeds["s"].shape == () and feeds["flag"].shape == () and feeds["flag"].dtype == np.bool_
    assert feeds["k"].dtype == np.int64 and feeds["x"].dtype == np.float32
    code, out, err = run(["check", path, path], capsys)
    assert code == 0 and "PASS" in out, err
    code, _, err = run(["simplify", path, tmp_path / "o.onnx"], capsys)
    assert code == 0, err


def test_inputs_from_npy_npz_and_clear_errors_for_anything_else(model_path, tmp_path, capsys):
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    code, out, err = run(["check", model_path, model_path, "--inputs", tmp_path / "x.npy"], capsys)
    assert code == 0 and "1 batches" in out, err
    np.save(tmp_path / "xs.npy", np.stack([x, x, x]))  # a leading axis: three batches
    code, out, err = run(["check", model_path, model_path, "--inputs", tmp_path / "xs.npy"], capsys)
    assert code == 0 and "3 batches" in out, err
    torch.save({"x": torch.from_numpy(x)}, tmp_path / "x.pt")
    (tmp_path / "x.txt").write_text("1 2 3")
    np.savez(tmp_path / "wrong.npz", y=x)
    for path, word in ((tmp_path / "x.pt", "PyTorch file"), (tmp_path / "x.txt", "not an .npz or .npy"),
                       (tmp_path / "wrong.npz", "no array for input(s) x")):
        code, _, err = run(["check", model_path, model_path, "--inputs", path], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and word in err, err
    two = tmp_path / "if.onnx"
    onnx.save(model_with_scalar_bool_and_int_inputs(), two)
    code, _, err = run(["check", two, two, "--inputs", tmp_path / "x.npy"], capsys)
    assert code == 2 and "has 4 inputs" in err, err


def test_inspect_lists_inputs_and_outputs(tmp_path, capsys):
    path = tmp_path / "if.onnx"
    onnx.save(model_with_scalar_bool_and_int_inputs(), path)
    code, out, _ = run(["inspect", path], capsys)
    assert code == 0
    rows = {tuple(line.split(None, 2)) for line in out.splitlines() if line.startswith("  ")}
    assert {("x", "float", "[1, 4]"), ("s", "float", "[]"), ("flag", "bool", "[]"), ("k", "int64", "[1, 4]"),
            ("y", "float", "[1, 4]")} <= rows
    info = onnxprune.inspect(path).as_dict()
    assert [t["name"] for t in info["inputs"]] == ["x", "s", "flag", "k"] and info["outputs"][0]["shape"] == [1, 4]


# --- masks keyed by PyTorch names ---------------------------------------------------------------

class ThreeConvs(torch.nn.Module):
    """conv-BN-ReLU three times: constant folding folds each BN into its conv and renames the weight."""

    def __init__(self, same_shapes: bool):
        super().__init__()
        widths = [4, 8, 8, 8] if same_shapes else [4, 8, 6, 5]
        for i in range(3):
            setattr(self, f"conv{i + 1}", torch.nn.Conv2d(widths[i], widths[i + 1], 3, padding=1))
            setattr(self, f"bn{i + 1}", torch.nn.BatchNorm2d(widths[i + 1]))

    def forward(self, x):
        for i in range(1, 4):
            x = torch.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
        return x


def _export(module, folding: bool) -> onnx.ModelProto:
    import io
    import warnings

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.randn(1, 4, 6, 6),), buf, dynamo=False, opset_version=17,
                          do_constant_folding=folding)
    return onnx.load_from_string(buf.getvalue())


def _torch_masks(module, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"{name}.weight": rng.random(tuple(m.weight.shape)) < 0.5
            for name, m in module.named_modules() if isinstance(m, torch.nn.Conv2d)}


@pytest.mark.parametrize("same_shapes", [False, True])
def test_masks_keyed_by_pytorch_names_are_matched_to_renamed_weights(tmp_path, capsys, same_shapes):
    """The default TorchScript export renames weights (onnx::Conv_N): masks keyed by parameter
    name still land on the right weights — by shape when unique, else by shape and zeros (the
    model exported from the masked module)."""
    torch.manual_seed(0)
    module = ThreeConvs(same_shapes)
    masks = _torch_masks(module)
    with torch.no_grad():
        for name, m in module.named_modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.mul_(torch.from_numpy(masks[f"{name}.weight"]).float())
    folded = _export(module, folding=True)
    assert not {t.name for t in folded.graph.initializer} & set(masks)  # really renamed
    onnx.save(folded, tmp_path / "m.onnx")
    np.savez(tmp_path / "masks.npz", **masks)
    code, out, err = run(["prune", tmp_path / "m.onnx", tmp_path / "p.onnx", "--masks", tmp_path / "masks.npz"], capsys)
    assert code == 0, err
    pruned = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(tmp_path / "p.onnx").graph.initializer}
    convs = [n for n in onnx.load(tmp_path / "p.onnx").graph.node if n.op_type == "Conv"]
    for node, key in zip(convs, ["conv1.weight", "conv2.weight", "conv3.weight"]):
        w = pruned[node.input[1]]
        assert np.array_equal(w != 0, masks[key] & (w != 0)) and np.all(w[~masks[key]] == 0), key
        assert np.count_nonzero(w) == np.count_nonzero(masks[key])  # every kept weight is non-zero here
    assert ("by shape and zeros" if same_shapes else "by shape") in out


def test_masks_that_match_nothing_say_how_to_get_names(tmp_path, capsys):
    module = ThreeConvs(same_shapes=True)
    onnx.save(_export(module, folding=True), tmp_path / "m.onnx")
    np.savez(tmp_path / "masks.npz", **_torch_masks(module))  # dense model: zeros cannot disambiguate
    code, _, err = run(["prune", tmp_path / "m.onnx", tmp_path / "p.onnx", "--masks", tmp_path / "masks.npz"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "do_constant_folding=False" in err, err
    assert not (tmp_path / "p.onnx").exists()


def test_masks_match_by_name_with_parameter_names_kept(tmp_path, capsys):
    module = ThreeConvs(same_shapes=True)
    onnx.save(_export(module, folding=False), tmp_path / "m.onnx")
    masks = _torch_masks(module)
    np.savez(tmp_path / "masks.npz", **masks)
    code, _, err = run(["prune", tmp_path / "m.onnx", tmp_path / "p.onnx", "--masks", tmp_path / "masks.npz"], capsys)
    assert code == 0, err
    pruned = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(tmp_path / "p.onnx").graph.initializer}
    for key, mask in masks.items():
        assert np.array_equal(pruned[key] != 0, mask)


# --- packaging: a torch-free core, names that cannot collide --------------------------------------

NO_TORCH = textwrap.dedent("""
    import sys
    class NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "onnxscript", "torchvision"):
                raise ImportError("PyTorch is not installed here")
    sys.meta_path.insert(0, NoTorch())
    from onnxprune.cli import main
    code = main(sys.argv[1:])
    assert "torch" not in sys.modules
    sys.exit(code)
""")


def test_the_core_never_imports_torch(model_path, tmp_path):
    script = tmp_path / "no_torch.py"
    script.write_text(NO_TORCH)
    for argv in (["simplify", model_path, tmp_path / "s.onnx"], ["check", model_path, tmp_path / "s.onnx"],
                 ["inspect", model_path], ["prune", model_path, tmp_path / "p.onnx", "--sparsity", "0.5"],
                 ["rearrange", model_path, tmp_path / "r.onnx"]):
        r = subprocess.run([sys.executable, str(script), *map(str, argv)], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, (argv, r.stderr)
    r = subprocess.run([sys.executable, str(script), "demo"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "needs PyTorch: pip install 'onnxprune[torch]'" in r.stderr


def test_a_users_own_models_folder_does_not_shadow_the_zoo(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "__init__.py").write_text("raise ImportError('the user models package')\n")
    (tmp_path / "tvm_kernels").mkdir()
    (tmp_path / "tvm_kernels" / "__init__.py").write_text("raise ImportError('the user tvm_kernels')\n")
    r = subprocess.run([sys.executable, "-c", "from onnxprune.cli import main; import sys; sys.exit(main(['demo', '--list']))"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "resnet18" in r.stdout, r.stderr
    r = subprocess.run([sys.executable, "-c", "import onnxprune.tvm_kernels.cli"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr


def test_pyproject_keeps_torch_out_of_the_core_and_unpinned():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.lower().startswith(("torch", "onnxscript"))]
    torch_reqs = [d for extra in project["optional-dependencies"].values() for d in extra if d.startswith("torch")]
    assert torch_reqs and all("==" not in d for d in torch_reqs)


def test_inspect_lists_no_overridable_initializer_as_an_input():
    # an initializer also listed as a graph input (old exporters) has a default: it is not an input to feed
    b = GraphBuilder(3, 5, 5, seed=1)
    b.conv(4, 1, name="c1")
    model = b.model(inits_as_inputs=sorted(b.inits))
    info = onnxprune.inspect(model).as_dict()
    assert [t["name"] for t in info["inputs"]] == ["x"]
