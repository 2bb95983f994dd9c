"""The parity checker: run two models on onnxruntime (all graph optimizations off) with the same
inputs and compare outputs polygraphy-style — an element fails only if it exceeds both atol and
rtol·|reference| — and, so that tiny outputs are not waved through by atol, the largest error must
also stay below rtol × the output's largest magnitude (or atol/100)."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from . import checks
from .arrays import read_arrays
from .errors import OnnxPruneError
from .graph import fits_in_protobuf, save_model, serialize

DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-3


@dataclass
class OutputDiff:
    name: str
    shape: tuple
    max_abs: float
    max_rel: float
    atol_needed: float   # the smallest atol that passes at the given rtol
    passed: bool
    top1: float | None = None  # agreement of argmax over the last axis, for [N, classes] outputs
    nonfinite: int = 0         # NaN / inf in the reference (equal NaNs pass: the same function, but say so)


@dataclass
class ParityReport:
    atol: float
    rtol: float
    batches: int
    outputs: list[OutputDiff] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    def lines(self) -> list[str]:
        out = []
        for o in self.outputs:
            top1 = f"  top-1 agree {o.top1:.1%}" if o.top1 is not None else ""
            top1 += f"  ({o.nonfinite} NaN/inf values in the reference)" if o.nonfinite else ""
            verdict = "ok" if o.passed else "FAIL"
            out.append(
                f"{verdict:4} {o.name} {list(o.shape)}: max abs {o.max_abs:.3g}, max rel {o.max_rel:.3g}; "
                f"passes at rtol {self.rtol:g} with atol >= {o.atol_needed:.3g}{top1}"
            )
        return out

    def as_dict(self) -> dict:
        return {
            "passed": self.passed, "atol": self.atol, "rtol": self.rtol, "batches": self.batches,
            "outputs": [o.__dict__ | {"shape": list(o.shape)} for o in self.outputs],
        }


def session(model, threads: int = 1, optimize: bool = False, spinning: bool = True):
    """An onnxruntime CPU session for a ModelProto or a model file (read by onnxruntime itself,
    external data included: nothing is serialized here); threads=0: onnxruntime's default (every
    physical core). `spinning=False`: idle intra-op workers sleep instead of spinning (sessions
    timed in turn must not burn the cores the running one needs)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    try:
        if isinstance(model, (str, os.PathLike)):
            return ort.InferenceSession(os.fspath(model), so, providers=["CPUExecutionProvider"])
        if not fits_in_protobuf(model):  # over 2 GB: onnxruntime reads it from disk
            with tempfile.TemporaryDirectory() as tmp:
                save_model(model, Path(tmp) / "model.onnx")
                return ort.InferenceSession(str(Path(tmp) / "model.onnx"), so, providers=["CPUExecutionProvider"])
        return ort.InferenceSession(serialize(model), so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise OnnxPruneError(f"onnxruntime cannot load the model: {str(e).splitlines()[0][:300]}") from None


def as_feeds(inputs, model, what: str = "inputs") -> list[dict] | None:
    """Inputs as a list of feeds: None (random ones later), a list of feeds, one feed dict, or an
    .npz/.npy path read against `model`'s inputs."""
    if inputs is None or isinstance(inputs, list):
        return inputs
    if isinstance(inputs, dict):
        return [inputs]
    return load_inputs(inputs, model, what)


def default_inputs(model: onnx.ModelProto, seed: int = 0, batches: int = 2) -> list[dict[str, np.ndarray]]:
    """The seeded random batches the parity check uses when it is given no inputs."""
    return [random_inputs(model, checks.seed(seed) + b) for b in range(batches)]


def feeds_for(inputs, signature: onnx.ModelProto, seed: int = 0, check: bool = True) -> list[dict] | None:
    """What a command's parity check runs on: the given inputs (a file is read against
    `signature`, a Graph's `signature()`, even when nothing is checked) or, when checking, the
    seeded random batches; made once, before the passes, so the check never reads the input again."""
    feeds = as_feeds(inputs, signature, "the --inputs file")
    return default_inputs(signature, seed) if feeds is None and check else feeds


def signature_of(model) -> onnx.ModelProto:
    """A model to read inputs and outputs from: the proto itself, or a file's proto without its
    external data."""
    if isinstance(model, (str, os.PathLike)):
        return onnx.load(os.fspath(model), load_external_data=False)
    return model


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def random_inputs(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs for every graph input (0-d tensors, float, integer and bool alike); a dynamic
    leading (batch) dim becomes 1."""
    rng = np.random.default_rng(checks.seed(seed))
    return {vi.name: _random_tensor(vi, rng) for vi in graph_inputs(model)}


def _random_tensor(vi: onnx.ValueInfoProto, rng: np.random.Generator) -> np.ndarray:
    t = vi.type.tensor_type
    if not vi.type.HasField("tensor_type"):
        raise OnnxPruneError(f"input {vi.name} is not a tensor (a sequence or map): give real inputs with --inputs file.npz")
    shape = []
    for k, d in enumerate(t.shape.dim):
        if d.HasField("dim_value"):
            shape.append(d.dim_value)
        elif k == 0:
            shape.append(1)
        else:
            raise OnnxPruneError(
                f"input {vi.name} has a dynamic dim {d.dim_param or '?'} at axis {k}: give real inputs with --inputs file.npz"
            )
    dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
    if dtype.kind == "f":
        return np.asarray(rng.standard_normal(shape)).astype(dtype)
    if dtype.kind in "iu":
        return np.asarray(rng.integers(0, 10, shape)).astype(dtype)
    if dtype.kind == "b":
        return np.asarray(rng.random(shape) < 0.5)
    raise OnnxPruneError(f"input {vi.name}: cannot make random data of type {dtype}: give real inputs with --inputs file.npz")


def load_inputs(path: str | Path, model: onnx.ModelProto, what: str = "inputs") -> list[dict[str, np.ndarray]]:
    """Inputs from an .npz keyed by input name (an .npy for a single-input model); a leading extra
    axis means several batches."""
    inputs = graph_inputs(model)
    names = [vi.name for vi in inputs]
    data = read_arrays(path, what)
    if isinstance(data, np.ndarray):
        if len(names) != 1:
            raise OnnxPruneError(f"{what} {path}: an .npy holds one array but the model has {len(names)} inputs "
                                 f"({', '.join(names)}): give an .npz keyed by input name")
        data = {names[0]: data}
    missing = [n for n in names if n not in data]
    if missing:
        raise OnnxPruneError(f"{what} {path}: no array for input(s) {', '.join(missing)} (has {', '.join(data) or 'nothing'}; "
                             "`onnxprune inspect` lists the inputs)")
    ranks = {vi.name: len(vi.type.tensor_type.shape.dim) for vi in inputs}
    first = names[0]
    if data[first].ndim == ranks[first] + 1:
        return [{n: data[n][b] for n in names} for b in range(data[first].shape[0])]
    return [{n: data[n] for n in names}]


def run(sess, feeds) -> list[np.ndarray]:
    try:
        return sess.run(None, feeds)
    except Exception as e:
        raise OnnxPruneError(f"onnxruntime failed to run the model: {str(e).splitlines()[0][:300]}") from None


def compare(reference, candidate, inputs: list[dict] | None = None,
            atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL, seed: int = 0, batches: int = 2) -> ParityReport:
    """Run both models (ModelProtos or files) on the same inputs, one session at a time."""
    atol, rtol = checks.tolerance(atol, "atol"), checks.tolerance(rtol, "rtol")
    if inputs is None:
        inputs = default_inputs(signature_of(reference), seed, batches)
    names, ref_out = _outputs(reference, inputs)
    cand_names, cand_out = _outputs(candidate, inputs)
    if names != cand_names:
        raise OnnxPruneError(f"the two models have different outputs: {names} vs {cand_names}")
    report = ParityReport(atol, rtol, len(inputs))
    for k, name in enumerate(names):
        a = np.concatenate([np.asarray(r[k], np.float64).reshape(1, -1) for r in cand_out], axis=1)
        b = np.concatenate([np.asarray(r[k], np.float64).reshape(1, -1) for r in ref_out], axis=1)
        report.outputs.append(diff(name, np.shape(ref_out[0][k]), a, b, atol, rtol, [(c[k], r[k]) for c, r in zip(cand_out, ref_out)]))
    return report


def _outputs(model, inputs) -> tuple[list[str], list[list[np.ndarray]]]:
    # every core (threads=0): the check runs on the user's clock. Both models run alike; a few
    # kernels (pooling) split their sums over threads, a rounding-level difference the tolerances cover
    sess = session(model, threads=0)
    return [o.name for o in sess.get_outputs()], [run(sess, f) for f in inputs]


def diff(name, shape, a, b, atol, rtol, pairs=()) -> OutputDiff:
    if a.shape != b.shape:
        return OutputDiff(name, shape, float("inf"), float("inf"), float("inf"), False)
    err = np.abs(a - b)
    same_nonfinite = (np.isnan(a) & np.isnan(b)) | (np.isinf(b) & (a == b))
    err = np.where(same_nonfinite, 0.0, err)
    scale = np.abs(b)
    rel = err / np.maximum(scale, np.finfo(np.float64).tiny)
    over_rtol = err > rtol * scale
    atol_needed = float(err[over_rtol].max()) if over_rtol.any() else 0.0
    # atol alone cannot see a wrong result whose outputs are all tiny: the largest error must also
    # stay within rtol of the output's own scale
    scale_limit = max(rtol * float(scale.max(initial=0)), atol * 1e-2)
    passed = not bool(np.any(np.isnan(err)) or np.any((err > atol) & over_rtol) or err.max(initial=0) > scale_limit)
    top1 = None
    if len(shape) == 2 and shape[1] > 1:
        agree = [np.mean(np.argmax(c, axis=1) == np.argmax(r, axis=1)) for c, r in pairs]
        top1 = float(np.mean(agree)) if agree else None
    nonfinite = int((~np.isfinite(b)).sum())
    return OutputDiff(name, tuple(shape), float(err.max(initial=0)), float(rel.max(initial=0)), atol_needed, passed, top1,
                      nonfinite)
