"""Nothing lost: the files a command reads and writes.

Before any work, a command lists every file it reads (a model and each of its external-data
files, inputs, masks, configs) and every file it will write (a model and the external-data file
that may go next to it, masks, libraries, caches) in a `FilePlan`. `FilePlan.check` refuses
(exit 2, one line) when a write would land on a file that is read, or two writes on each other —
compared by resolved path and by inode, so symlinks, hard links and `a/../b` spellings are seen
through — and when a write cannot succeed: the path is a folder, a parent is a file, the folder
is not writable, the name is too long.

`Outputs` then writes them all or nothing: each output goes to a private temporary folder next
to its target, under its own final name (so the temporary name is never longer than the real
one, external data is written under the name the model refers to, and files get the normal
mode under the user's umask), and every file is renamed into place only once all writes have
succeeded; if any fails, nothing is left behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import OnnxPruneError

EXTERNAL_DATA_SUFFIX = ".data"  # a written model over 2 GB keeps its tensors in <name>.data
TEMP_PREFIX = ".onnxprune-"


# --- which files a model reads ---------------------------------------------------------------

def external_data_files(path: str | os.PathLike, model=None) -> list[Path]:
    """The external-data files a model file refers to, found without loading them (`model`: the
    file's proto when it has been read already)."""
    import onnx

    path = Path(path)
    if model is None:
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception:
            return []  # not a readable model: the loader says so later
    locations = set()
    for tensor in _tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            locations.update(e.value for e in tensor.external_data if e.key == "location")
    return sorted(path.parent / loc for loc in locations)


def _tensors(graph):
    """Every TensorProto of a graph: initializers, sparse ones, attribute tensors, subgraphs."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            if a.HasField("g"):
                yield from _tensors(a.g)
            for sub in a.graphs:
                yield from _tensors(sub)


# --- file identity ---------------------------------------------------------------------------

def _identity(path: Path) -> tuple[str, tuple[int, int] | None]:
    """(resolved path, (device, inode) if the file exists)."""
    real = os.path.realpath(path)
    try:
        st = os.stat(path)
    except OSError:
        return real, None
    return real, (st.st_dev, st.st_ino)


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when writing `a` would write `b`: same resolved path, or the same inode (hard link)."""
    (ra, ia), (rb, ib) = _identity(Path(a)), _identity(Path(b))
    return ra == rb or (ia is not None and ia == ib)


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def write_problem(path: Path) -> str | None:
    """Why writing `path` cannot work (None if it can): checked before any work is done."""
    if path.is_dir():
        return "is a folder"
    if path.name in ("", ".", ".."):
        return "names no file"
    ancestor, missing = path.parent, [path.name]
    while not ancestor.exists() and not ancestor.is_symlink():
        missing.append(ancestor.name)
        if ancestor.parent == ancestor:
            break
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{ancestor} is not a folder"
    limit = _name_max(ancestor)
    too_long = [m for m in missing if len(os.fsencode(m)) > limit]
    if too_long:
        return f"name too long ({len(os.fsencode(too_long[0]))} bytes; this file system allows {limit})"
    try:  # a real probe: os.access says yes to root on folders root cannot write either
        os.rmdir(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=ancestor))
    except OSError as e:
        return f"cannot write to folder {ancestor} ({e.strerror.lower() if e.strerror else e})"
    return None


# --- the plan --------------------------------------------------------------------------------

@dataclass
class FilePlan:
    """What one command reads and writes; `check()` before doing anything."""

    reads: list[tuple[str, Path]] = field(default_factory=list)    # (what, path)
    writes: list[tuple[str, Path]] = field(default_factory=list)

    def read(self, path, what: str) -> "FilePlan":
        if path is not None and not _is_in_memory(path):
            self.reads.append((what, Path(path)))
        return self

    def read_model(self, path, what: str = "the input model") -> "FilePlan":
        """A model file and every external-data file it refers to."""
        if path is None or _is_in_memory(path):
            return self
        self.read(path, what)
        # a ModelFile (graph.py) knows its external data from the proto it already read
        found = path.external_data_files() if hasattr(path, "external_data_files") else external_data_files(path)
        for data in found:
            self.read(data, f"the external data of {what} ({Path(path).name})")
        return self

    def write(self, path, what: str) -> "FilePlan":
        if path is not None:
            self.writes.append((what, Path(path)))
        return self

    def write_model(self, path, what: str = "the output model") -> "FilePlan":
        """A model file and the external-data file a large model puts next to it."""
        if path is None:
            return self
        path = Path(path)
        self.write(path, what)
        self.writes.append((f"the external data of {what}", path.with_name(path.name + EXTERNAL_DATA_SUFFIX)))
        return self

    def check(self) -> None:
        """Refuse (OnnxPruneError, exit 2) before any work if a write would destroy a read file,
        two writes collide, or a write cannot succeed."""
        for what, path in self.writes:
            for read_what, read_path in self.reads:
                if same_file(path, read_path):
                    raise OnnxPruneError(f"{what} {path} is {read_what} {read_path}: onnxprune never "
                                         "overwrites a file it reads; choose another output path")
        for i, (what, path) in enumerate(self.writes):
            for other_what, other in self.writes[i + 1:]:
                if same_file(path, other):
                    raise OnnxPruneError(f"{what} {path} and {other_what} {other} are the same file: "
                                         "choose different output paths")
        for what, path in self.writes:
            if what.startswith("the external data of"):
                continue  # written only for models over 2 GB; its folder is the model's
            problem = write_problem(path)
            if problem:
                raise OnnxPruneError(f"{what} {path}: {problem}")


def _is_in_memory(obj) -> bool:
    return not isinstance(obj, (str, os.PathLike))


# --- writing ---------------------------------------------------------------------------------

class Outputs:
    """All-or-nothing writing of several files.

        with Outputs() as out:
            save(model, out.path("small.onnx"))
            save(masks, out.path("masks.npz"))
        # both are in place now; if anything raised, neither is (and no temporary file remains)

    `path(target)` is a path with the target's own name inside a temporary folder next to it;
    every file a writer puts into that folder (a model's external data too) is moved into the
    target's folder on success."""

    def __init__(self):
        self._temp: dict[Path, Path] = {}   # target folder -> temporary folder inside it
        self._created: list[Path] = []      # folders made for the outputs, removed on failure
        self._targets: dict[str, str] = {}  # temporary path -> target, for error messages

    def path(self, target: str | os.PathLike) -> str:
        target = Path(target)
        folder = target.parent
        if folder not in self._temp:
            self._make_folder(folder)
            self._temp[folder] = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=folder))
        temp = str(self._temp[folder] / target.name)
        self._targets[temp] = str(target)
        return temp

    def _make_folder(self, folder: Path) -> None:
        missing = []
        while not folder.exists():
            missing.append(folder)
            folder = folder.parent
        for f in reversed(missing):
            f.mkdir()
            self._created.append(f)

    def commit(self) -> None:
        for folder, temp in self._temp.items():
            for f in sorted(temp.iterdir()):
                os.replace(f, folder / f.name)
            temp.rmdir()
        self._temp.clear()
        self._created.clear()

    def abort(self) -> None:
        for temp in self._temp.values():
            shutil.rmtree(temp, ignore_errors=True)
        self._temp.clear()
        for f in reversed(self._created):
            try:
                f.rmdir()
            except OSError:
                pass
        self._created.clear()

    def __enter__(self) -> "Outputs":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.commit()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()
            if isinstance(exc, OSError) and exc.filename in self._targets:
                exc.filename = self._targets[exc.filename]  # name the file the user asked for


__all__ = ["FilePlan", "Outputs", "external_data_files", "same_file", "write_problem"]
