"""Property test of the refusal logic (onnxprune.files.FilePlan) against a physical oracle.

Each example builds a small tree — files, a symlink, a hard link, a symlinked folder, a model whose
external data lives under a generated name — and picks paths spelled in generated ways (plain,
`./`, `sub/../`, through the folder link). The oracle is what a naive writer would do: write a
marker through each output path (and through the `.data` file a large model puts next to it) and
look whether any input file's bytes changed, or whether a later output clobbered an earlier one.
FilePlan must refuse exactly when that happens.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnxprune.errors import OnnxPruneError
from onnxprune.files import EXTERNAL_DATA_SUFFIX, FilePlan

EXAMPLES = int(os.environ.get("ONNXPRUNE_FUZZ_EXAMPLES", 150))

# entries of the tree; "new*" do not exist until something writes them
EXISTING = ["a.onnx", "b.npz", "sub/c.onnx", "ln.onnx", "hard.onnx", "dlink/c.onnx"]
ANYWHERE = EXISTING + ["new.onnx", "sub/new.onnx", "dlink/new.onnx", "new.onnx.data", "a.onnx.data"]
SPELLINGS = ["{}", "./{}", "sub/../{}", "dlink/../{}"]
DATA_NAMES = ["weights.bin", "sub/w.bin", "new.onnx.data", "a.onnx.data", "b.npz"]


def build_tree(root: Path, data_name: str) -> None:
    (root / "sub").mkdir()
    w = np.arange(8, dtype=np.float32).reshape(2, 4)
    g = onnx.helper.make_graph([onnx.helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                               [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2])],
                               [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])],
                               [onnx.numpy_helper.from_array(w, "w")])
    model = onnx.helper.make_model(g, ir_version=10)
    (root / "b.npz").write_bytes(b"b")
    (root / "sub" / "c.onnx").write_bytes(b"c")
    if Path(data_name).parent != Path("."):
        (root / Path(data_name).parent).mkdir(exist_ok=True)
    onnx.save_model(model, root / "model.onnx", save_as_external_data=True, location=data_name, size_threshold=0)
    (root / "a.onnx").write_bytes(b"a")
    (root / "ln.onnx").symlink_to("a.onnx")
    os.link(root / "sub" / "c.onnx", root / "hard.onnx")
    (root / "dlink").symlink_to("sub", target_is_directory=True)


def spelled(root: Path, entry: str, spelling: str) -> Path:
    return root / spelling.format(entry)


def contents(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file() and not p.is_symlink()}


def naive_writes_destroy(root: Path, reads: list[Path], writes: list[tuple[Path, bool]]) -> bool:
    """Write a marker through every output (and its external data for models); True if a read
    file's bytes changed or an output no longer holds its own marker."""
    before = {p: p.read_bytes() for p in reads}
    written = []
    for i, (path, is_model) in enumerate(writes):
        targets = [path] + ([path.with_name(path.name + EXTERNAL_DATA_SUFFIX)] if is_model else [])
        for t in targets:
            t.parent.mkdir(parents=True, exist_ok=True)
            marker = f"write {i} {t.name}".encode()
            t.write_bytes(marker)
            written.append((t, marker))
    changed_reads = any(p.read_bytes() != b for p, b in before.items())
    clobbered = any(t.read_bytes() != m for t, m in written)
    return changed_reads or clobbered


paths = st.tuples(st.sampled_from(ANYWHERE), st.sampled_from(SPELLINGS))


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data_name=st.sampled_from(DATA_NAMES),
       extra_read=st.tuples(st.sampled_from(EXISTING), st.sampled_from(SPELLINGS)),
       outputs=st.lists(st.tuples(paths, st.booleans()), min_size=1, max_size=3))
def test_plan_refuses_exactly_when_a_naive_writer_destroys_something(data_name, extra_read, outputs):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_tree(root, data_name)
        model, extra = root / "model.onnx", spelled(root, *extra_read)
        plan = FilePlan().read_model(model).read(extra, "an extra input")
        writes = []
        for (entry, spelling), is_model in outputs:
            path = spelled(root, entry, spelling)
            (plan.write_model if is_model else plan.write)(path, f"output {entry}")
            writes.append((path, is_model))
        try:
            plan.check()
            refused = False
        except OnnxPruneError:
            refused = True
        reads = [model, root / data_name, extra]
        assert refused == naive_writes_destroy(root, reads, writes), (data_name, extra_read, outputs)
