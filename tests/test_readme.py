"""README's examples run as written (in a temporary folder)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_prune_while_training_example_runs(tmp_path, monkeypatch, capsys):
    text = README.read_text()
    section = text[text.index("## Prune while training"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "parity vs PyTorch" in out and "PASS" in out and "pruning plan" in out
    assert {p.name for p in tmp_path.iterdir()} == {"m.pth", "mask.pth", "m.onnx", "small.onnx"}


def test_your_own_ops_example_registers_the_rule():
    from onnx import helper

    from onnxprune.channels import capabilities, unregister_rule

    text = README.read_text()
    section = text[text.index("### Your own ops"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    node = helper.make_node("ScaledGelu", ["x"], ["y"], domain="com.example")
    assert capabilities(node) == set()
    try:
        exec(compile(code, "README.md", "exec"), {})
        assert capabilities(node) == {"couple", "values", "rewrite", "permute"}
    finally:
        unregister_rule("ScaledGelu", domain="com.example")


@pytest.mark.slow   # ~1 min (NetAdapt measures latency); CI runs the small version in test_pytorch_search.py
def test_schedules_and_search_example_runs(tmp_path, monkeypatch):
    text = README.read_text()
    section = text[text.index("## Schedules and search"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    import json

    import onnxprune.pytorch as op

    header, *records = [json.loads(line) for line in (tmp_path / "runs" / "netadapt" / "netadapt.jsonl").read_text().splitlines()]
    assert header["args"]["resource"] == "latency" and records and all(r["latency_ms"] > 0 for r in records)
    assert (tmp_path / "sens.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "sens.csv").exists()
    for name in ("net", "sa", "amc"):
        pruner = scope[name]
        assert pruner.speedup_report.torch_parity.passed
        assert pruner.best["simplified_macs"] < pruner.space.resources.dense_macs
    resources = op.Resources.of(scope["model"], scope["x"], scope["sa"].space.groups)
    assert resources.of_model(scope["sa"].bound_model)[0] <= 0.5 * resources.dense_macs
