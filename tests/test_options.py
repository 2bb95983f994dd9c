"""Options as data: the CLI is generated from SimplifyOptions / PruneOptions, validated once, and
its choices come from the registries."""

from __future__ import annotations

from dataclasses import fields

import onnx
import pytest
from onnx import numpy_helper

from onnxprune import OnnxPruneError
from onnxprune.cli import build_parser, main
from onnxprune.options import PruneOptions, SimplifyOptions
from onnxprune.pruning import criteria

from .test_file_safety import small_model


def parse(*argv):
    return build_parser().parse_args(["simplify", "m.onnx", *argv])


def test_the_simplify_flags_are_the_options_fields_with_their_defaults():
    assert SimplifyOptions.from_args(parse()) == SimplifyOptions()
    args = parse("--align", "4", "--no-fold-bn", "--no-remove", "--pin", "a", "--pin", "b", "--atol", "0.1",
                 "--rtol", "0", "--seed", "3", "--no-check", "--inputs", "x.npz", "--no-propagate")
    assert SimplifyOptions.from_args(args) == SimplifyOptions(
        align=4, fold_bn=False, remove=False, pins=("a", "b"), atol=0.1, rtol=0.0, seed=3, check=False,
        inputs="x.npz", propagate=False)
    help_text = build_parser()._subparsers._group_actions[0].choices["simplify"].format_help()
    for f in fields(SimplifyOptions):
        assert f.metadata["flag"] in help_text


def test_prune_takes_every_simplify_option_and_shares_the_seed():
    args = build_parser().parse_args(["prune", "m.onnx", "--sparsity", "0.5", "--simplify", "--align", "1",
                                      "--no-fold-bn", "--seed", "7"])
    assert PruneOptions.from_args(args) == PruneOptions(sparsity=0.5, seed=7)
    assert SimplifyOptions.from_args(args) == SimplifyOptions(align=1, fold_bn=False, seed=7)


def test_validated_once_with_the_flag_in_the_message():
    with pytest.raises(OnnxPruneError, match="--align must be a positive integer"):
        SimplifyOptions(align=0)
    with pytest.raises(OnnxPruneError, match="--atol must be a finite number"):
        SimplifyOptions.of(None, atol=float("nan"))
    with pytest.raises(OnnxPruneError, match="--criterion must be one of"):
        PruneOptions(criterion="nope")
    with pytest.raises(OnnxPruneError, match="does not go with granularity filter"):
        PruneOptions(criterion="level", granularity="filter")
    with pytest.raises(TypeError, match="unknown SimplifyOptions field"):
        SimplifyOptions.of(None, allign=1)
    assert PruneOptions(criterion="level").chosen_granularity == "weight"
    assert PruneOptions.of(None, criterion="level").chosen_granularity == "weight"
    assert SimplifyOptions(pins="x").pins == ("x",)


def test_choices_come_from_the_registry(monkeypatch):
    monkeypatch.setattr(criteria, "CRITERIA", criteria.CRITERIA + ("newcrit",))
    monkeypatch.setitem(criteria.FOR_GRANULARITY, "filter", criteria.STRUCTURED + ("newcrit",))
    args = build_parser().parse_args(["prune", "m.onnx", "--sparsity", "0.5", "--criterion", "newcrit"])
    assert PruneOptions.from_args(args).criterion == "newcrit"
    monkeypatch.undo()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["prune", "m.onnx", "--criterion", "newcrit"])


def conv_widths(path):
    m = onnx.load(path)
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    return [inits[n.input[1]].shape[0] for n in m.graph.node if n.op_type == "Conv"], [n.op_type for n in m.graph.node]


def test_prune_simplify_applies_the_simplify_options(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    onnx.save(small_model(), src)
    base = ["prune", src, "--sparsity", "0.625", "--prune-first", "--simplify"]
    assert main([str(a) for a in base + ["-o", tmp_path / "a8.onnx"]]) == 0
    assert main([str(a) for a in base + ["-o", tmp_path / "a1.onnx", "--align", "1", "--no-fold-bn"]]) == 0
    capsys.readouterr()
    widths8, ops8 = conv_widths(tmp_path / "a8.onnx")
    widths1, ops1 = conv_widths(tmp_path / "a1.onnx")
    assert widths8[0] == 4 and widths1[0] == 3   # the default align keeps an 8-wide layer a multiple of 4
    assert "BatchNormalization" not in ops8 and "BatchNormalization" in ops1
