"""Arrays users give: `.npz` files keyed by name (inputs, calibration data, masks) and `.npy`
files for models with a single input. Recognized by content, not by name, so a PyTorch `.pt`
file (also a zip archive) gets a message that says what to do instead."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from .errors import OnnxPruneError

NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = b"PK\x03\x04"
HOW_TO = "write one with numpy.savez(path, name=array, ...)"


def read_arrays(path, what: str, allow_npy: bool = True) -> dict[str, np.ndarray] | np.ndarray:
    """An .npz as {name: array}, or (where `allow_npy`) an .npy as one array."""
    path = Path(path)
    head = head_of(path)
    if head.startswith(NPY_MAGIC):
        if not allow_npy:
            raise OnnxPruneError(f"{what} {path}: an .npy holds one unnamed array; this needs named arrays "
                                 f"in an .npz ({HOW_TO})")
        return _load(path, what)
    if head.startswith(ZIP_MAGIC):
        members = _members(path)
        if "data.pkl" in {m.rsplit("/", 1)[-1] for m in members}:
            raise OnnxPruneError(f"{what} {path}: a PyTorch file (torch.save), not numpy arrays; {HOW_TO} "
                                 "(tensor.numpy() for each tensor)")
        if not members or not all(m.endswith(".npy") for m in members):
            raise OnnxPruneError(f"{what} {path}: a zip archive but not an .npz of arrays; {HOW_TO}")
        data = _load(path, what)
        return {k: data[k] for k in data.files}
    expected = ".npz or .npy" if allow_npy else ".npz"
    raise OnnxPruneError(f"{what} {path}: not an {expected} file; {HOW_TO}")


def read_masks(path) -> dict[str, np.ndarray]:
    """Keep-masks from an .npz (keyed by initializer or parameter name) or from a PyTorch file:
    NNI's masks dict {module: {"weight": mask, "bias": mask}} (what export_model(mask_path=)
    writes) or a flat {"conv1.weight": mask}; the keys become parameter names."""
    path = Path(path)
    if not (head_of(path).startswith(ZIP_MAGIC) and "data.pkl" in {m.rsplit("/", 1)[-1] for m in _members(path)}):
        return read_arrays(path, "masks", allow_npy=False)
    from .errors import require_torch

    torch = require_torch(f"masks {path} (a PyTorch file)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise OnnxPruneError(f"masks {path}: cannot read ({str(e).splitlines()[0][:200]})") from None
    if not isinstance(data, dict):
        raise OnnxPruneError(f"masks {path}: expected a dict of masks, got {type(data).__name__}")
    flat = {}
    for key, value in data.items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for param, mask in items:
            if mask is not None:
                name = str(key) if param is None else (f"{key}.{param}" if key else param)
                flat[name] = np.asarray(torch.as_tensor(mask).cpu().numpy() != 0)
    return flat


def head_of(path: Path, n: int = 8) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError as e:
        raise OnnxPruneError(f"{path}: cannot read ({e.strerror or e})") from None


def _members(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as z:
            return z.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise OnnxPruneError(f"{path}: a damaged zip archive ({e})") from None


def _load(path: Path, what: str):
    try:
        return np.load(path, allow_pickle=False)
    except Exception as e:  # object arrays (pickles), truncated files
        text = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise OnnxPruneError(f"{what} {path}: cannot read ({text})") from None


def write_npz(path, arrays: dict[str, np.ndarray]) -> None:
    """Through a file object: numpy would append '.npz' to a name without it."""
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays)
