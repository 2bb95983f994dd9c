"""Nothing lost: every command that writes refuses, before any work, to destroy a file it was given
or to write where it cannot; it leaves no stray file behind; outputs are atomic, all or nothing,
with the normal mode under the umask. Each bad case is built here and checked for exit code,
a one-line message, the input files' bytes unchanged and the folder's files unchanged."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxprune.cli import main as onnxprune_main
from onnxprune.tvm_kernels.cli import main as model_tune_main

from .onnx_builders import GraphBuilder


def small_model(seed: int = 0) -> onnx.ModelProto:
    """Conv-BN-ReLU-Conv-ReLU-pool-Gemm, every other filter of the first conv zeroed."""
    b = GraphBuilder(3, 8, 8, seed=seed)
    first = b.conv(8, 3, pads=1)
    b.bn()
    b.act("Relu")
    b.conv(8, 1)
    b.act("Relu")
    b.global_avg_pool()
    b.flatten()
    b.gemm(4)
    for row in range(0, 8, 2):
        b.zero_filter(next(n for n, layer in b.layers.items() if layer["output"] == first), row)
    return b.model()


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (links as their target text) with a digest of its bytes."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(folder))] = "-> " + os.readlink(p)
        elif p.is_file():
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_dir():
            out[str(p.relative_to(folder)) + "/"] = "dir"
    return out


@pytest.fixture
def work(tmp_path):
    """A folder with a model, the same model with external data, masks, inputs and a config."""
    model = small_model()
    onnx.save(model, tmp_path / "m.onnx")
    onnx.save_model(model, tmp_path / "ext.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    x = model.graph.input[0]
    shape = [d.dim_value for d in x.type.tensor_type.shape.dim]
    np.savez(tmp_path / "in.npz", **{x.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)})
    w = next(n.input[1] for n in model.graph.node if n.op_type == "Conv")
    dims = next(t.dims for t in model.graph.initializer if t.name == w)
    np.savez(tmp_path / "masks.npz", **{w: np.ones(dims, bool)})
    (tmp_path / "cfg.yaml").write_text("- sparsity: 0.5\n  op_types: [Conv]\n")
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "sub").mkdir()
    return tmp_path


def unwritable_folder(tmp: Path) -> Path:
    """A folder this process cannot write to: root ignores permission bits, /sys it cannot write."""
    if os.geteuid() == 0:
        return Path("/sys")
    ro = tmp / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    return ro


def run_cli(main, argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# case -> (the output spelled from the work folder and the input's name, a word the message must contain)
COLLISIONS = {
    "same path": (lambda w, src: w / src, "never overwrites"),
    "dot-dot spelling": (lambda w, src: w / "sub" / ".." / src, "never overwrites"),
    "symlink to the input": (lambda w, src: _link(w, "ln" + Path(src).suffix, src, symbolic=True), "never overwrites"),
    "hard link to the input": (lambda w, src: _link(w, "hard" + Path(src).suffix, src, symbolic=False), "never overwrites"),
    "is a folder": (lambda w, src: w / "sub", "is a folder"),
    "parent is a file": (lambda w, src: w / "afile" / ("out" + Path(src).suffix), "not a folder"),
    "name too long": (lambda w, src: w / ("n" * 256 + Path(src).suffix), "name too long"),
    "unwritable folder": (lambda w, src: unwritable_folder(w) / ("out" + Path(src).suffix), "cannot write to folder"),
}


def _link(folder: Path, name: str, target: str, symbolic: bool) -> Path:
    link = folder / name
    if symbolic:
        link.symlink_to(target)
    else:
        os.link(folder / target, link)
    return link


WRITERS = {
    "simplify": lambda src, out: ["simplify", src, "-o", out],
    "simplify positional": lambda src, out: ["simplify", src, out],
    "prune": lambda src, out: ["prune", src, "-o", out, "--sparsity", "0.5"],
    "rearrange": lambda src, out: ["rearrange", src, "-o", out],
}


@pytest.mark.parametrize("case", sorted(COLLISIONS))
@pytest.mark.parametrize("command", sorted(WRITERS))
def test_bad_output_paths_are_refused_before_any_work(work, capsys, command, case):
    spell, word = COLLISIONS[case]
    out = spell(work, "m.onnx")
    before = snapshot(work)
    code, _, err = run_cli(onnxprune_main, WRITERS[command](work / "m.onnx", out), capsys)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and word in err, err
    assert snapshot(work) == before


@pytest.mark.parametrize("case", sorted(COLLISIONS))
def test_model_tune_refuses_bad_library_paths(work, capsys, case):
    """model_tune's library: the same refusals (the input is named .so so that the library-suffix
    check does not answer first)."""
    os.replace(work / "m.onnx", work / "m.so")
    spell, word = COLLISIONS[case]
    out = spell(work, "m.so")
    before = snapshot(work)
    code, _, err = run_cli(model_tune_main, ["--onnx_path", work / "m.so", "--output", out, "--trials", "0",
                                             "--work-dir", work / "tuned"], capsys)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and word in err, err
    assert snapshot(work) == before


def test_external_data_of_the_input_is_never_overwritten(work, capsys):
    before = snapshot(work)
    for argv in (["simplify", work / "ext.onnx", "-o", work / "weights.bin"],
                 ["prune", work / "ext.onnx", "-o", work / "weights.bin", "--sparsity", "0.5"],
                 ["rearrange", work / "ext.onnx", work / "weights.bin"]):
        code, _, err = run_cli(onnxprune_main, argv, capsys)
        assert code == 2 and "external data of the input model" in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(work) == before


def test_output_whose_external_data_would_land_on_an_input_file(work, capsys):
    """`-o weights` would put a large model's tensors in weights.data: the input's data file there."""
    model = small_model()
    onnx.save_model(model, work / "e2.onnx", save_as_external_data=True, location="out.onnx.data", size_threshold=0)
    before = snapshot(work)
    code, _, err = run_cli(onnxprune_main, ["simplify", work / "e2.onnx", "-o", work / "out.onnx"], capsys)
    assert code == 2 and "external data" in err, err
    assert snapshot(work) == before


@pytest.mark.parametrize("masks_at", ["input model", "output model", "masks read", "calib read", "config read", "folder"])
def test_prune_save_masks_collisions(work, capsys, masks_at):
    target = {"input model": work / "m.onnx", "output model": work / "p.onnx", "masks read": work / "masks.npz",
              "calib read": work / "in.npz", "config read": work / "cfg.yaml", "folder": work / "sub"}[masks_at]
    argv = ["prune", work / "m.onnx", "-o", work / "p.onnx", "--save-masks", target]
    argv += {"masks read": ["--masks", work / "masks.npz"],
             "calib read": ["--criterion", "apoz", "--calib", work / "in.npz", "--sparsity", "0.5"],
             "config read": ["--config", work / "cfg.yaml"]}.get(masks_at, ["--sparsity", "0.5"])
    before = snapshot(work)
    code, _, err = run_cli(onnxprune_main, argv, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert snapshot(work) == before  # in particular: no pruned model written before the masks failed


def test_inputs_file_cannot_be_the_output(work, capsys):
    before = snapshot(work)
    code, _, err = run_cli(onnxprune_main, ["simplify", work / "m.onnx", "-o", work / "in.npz", "--inputs", work / "in.npz"], capsys)
    assert code == 2 and "--inputs" in err, err
    assert snapshot(work) == before


def test_model_tune_never_overwrites_its_input_with_the_pruned_model(work, capsys):
    (work / "tuned").mkdir()
    os.replace(work / "m.onnx", work / "tuned" / "pruned.onnx")
    before = snapshot(work)
    code, _, err = run_cli(model_tune_main, ["--onnx_path", work / "tuned" / "pruned.onnx", "--prune", "--trials", "0",
                                             "--work-dir", work / "tuned"], capsys)
    assert code == 2 and "never overwrites" in err, err
    assert snapshot(work) == before


def test_a_failed_second_write_leaves_nothing(work, capsys, monkeypatch):
    """prune writes the model and the masks together: if the masks cannot be written, neither is."""
    import onnxprune.api as api

    def broken(path, arrays):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(api, "write_npz", broken)
    before = snapshot(work)
    code, _, err = run_cli(onnxprune_main, ["prune", work / "m.onnx", "-o", work / "p.onnx", "--sparsity", "0.5",
                                            "--save-masks", work / "new" / "masks.npz"], capsys)
    errors = [line for line in err.splitlines() if not line.startswith("[onnxprune]")]  # progress lines aside
    assert code == 2 and errors == [f"onnxprune prune: error: cannot read or write {work / 'new' / 'masks.npz'}: "
                                    "No space left on device"], err
    assert snapshot(work) == before  # no model, no masks, no temporary folder, no created folder


def test_longest_valid_names_work(work, capsys):
    name = "l" * 250 + ".onnx"  # 255 bytes: the most a file name may have here
    code, _, err = run_cli(onnxprune_main, ["simplify", work / "m.onnx", "-o", work / name], capsys)
    assert code == 0, err
    assert (work / name).is_file() and onnx.load(work / name).graph.node
    masks = "k" * 251 + ".npz"
    code, _, err = run_cli(onnxprune_main, ["prune", work / "m.onnx", work / ("p" * 250 + ".onnx"), "--sparsity", "0.5",
                                            "--save-masks", work / masks], capsys)
    assert code == 0, err
    assert set(np.load(work / masks).files)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_get_the_normal_mode_under_the_umask(work, capsys, umask):
    old = os.umask(umask)
    try:
        code, _, err = run_cli(onnxprune_main, ["prune", work / "m.onnx", "-o", work / "p.onnx", "--sparsity", "0.5",
                                                "--save-masks", work / "k.npz"], capsys)
        assert code == 0, err
        code, _, err = run_cli(onnxprune_main, ["simplify", work / "m.onnx", work / "s.onnx"], capsys)
        assert code == 0, err
    finally:
        os.umask(old)
    for name in ("p.onnx", "k.npz", "s.onnx"):
        assert (work / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_existing_outputs_are_replaced_atomically(work, capsys):
    (work / "s.onnx").write_bytes(b"old")
    code, _, err = run_cli(onnxprune_main, ["simplify", work / "m.onnx", work / "s.onnx"], capsys)
    assert code == 0, err
    assert onnx.load(work / "s.onnx").graph.node
    assert not [p for p in work.iterdir() if p.name.startswith(".onnxprune-")]


def test_two_different_outputs_are_refused(work, capsys):
    code, _, err = run_cli(onnxprune_main, ["simplify", work / "m.onnx", work / "a.onnx", "-o", work / "b.onnx"], capsys)
    assert code == 2 and "two outputs" in err


def test_demo_out_folder_that_is_a_file(work, capsys):
    before = snapshot(work)
    code, _, err = run_cli(onnxprune_main, ["demo", "--model", "resnet18", "--scale", "1", "--out", work / "afile"], capsys)
    assert code == 2 and "not a folder" in err, err
    assert snapshot(work) == before
