"""README's "Prune while training" example runs as written (in a temporary folder)."""

import re
from pathlib import Path

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
