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
