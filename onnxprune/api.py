"""The Python API; mirrors the CLI (`onnxprune simplify | check | inspect`)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .errors import OnnxPruneError, ParityError
from .graph import atomic_path, load_model, save_model
from .parity import DEFAULT_ATOL, DEFAULT_RTOL, ParityReport, compare, load_inputs
from .report import ModelStats, Report, channel_summary
from .simplify import simplify


def _inputs(inputs, model):
    if inputs is None or isinstance(inputs, list):
        return inputs
    if isinstance(inputs, dict):
        return [inputs]
    return load_inputs(inputs, model)


def simplify_file(src, dst, *, check: bool = True, inputs=None, progress=None, **options) -> Report:
    """Simplify the model at `src` and write it atomically to `dst` (only if it passes the check)."""
    say = progress or (lambda msg: None)
    _refuse_same(src, dst)
    model = load_model(src)
    say(f"loaded {src}: {len(model.graph.node)} nodes")
    t = time.perf_counter()
    result, report = simplify(model, check=check, inputs=_inputs(inputs, model), **options)
    say(f"simplified in {time.perf_counter() - t:.2f} s" + (", parity checked" if check else " (parity check skipped)"))
    save_model(result, dst)
    say(f"wrote {dst}")
    return report


def check(reference, candidate, *, inputs=None, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL,
          seed: int = 0) -> ParityReport:
    """Compare two models (paths or ModelProtos) on onnxruntime."""
    ref, cand = load_model(reference), load_model(candidate)
    return compare(ref, cand, inputs=_inputs(inputs, ref), atol=atol, rtol=rtol, seed=seed)


def prune_file(src, dst, *, calib=None, masks=None, save_masks=None, simplify_after: bool = False,
               progress=None, **options):
    """`onnxprune prune`: prune the model at `src`, optionally simplify, write `dst` atomically.
    Returns (PruneReport, simplify Report or None)."""
    from .pruning.prune import prune

    say = progress or (lambda msg: None)
    _refuse_same(src, dst)
    model = load_model(src)
    if masks is not None and not isinstance(masks, dict):
        masks = _load_npz(masks, "masks")
    result, report = prune(model, calib=_inputs(calib, model), masks=masks, **options)
    say(f"pruned in {report.seconds:.2f} s")
    simplified = None
    if simplify_after:
        result, simplified = simplify(result)
        say(f"simplified; parity with the pruned model: {'PASS' if simplified.parity.passed else 'FAIL'}")
    save_model(result, dst)
    if save_masks:
        _save_npz(save_masks, report.masks)
        say(f"wrote masks to {save_masks}")
    say(f"wrote {dst}")
    return report, simplified


def rearrange(model, *, n: int = 4, check: bool = True, inputs=None, atol: float = DEFAULT_ATOL,
              rtol: float = DEFAULT_RTOL, seed: int = 0):
    """Permute channels so that 1xN blocks group filters of similar norm; exact (parity-checked).
    Returns (ModelProto, number of layers permuted, ParityReport or None)."""
    from .passes.base import Context
    from .passes.cleanup import cleaned_graph
    from .passes.rearrange import rearrange_graph

    original = load_model(model)
    ctx = Context()
    g = cleaned_graph(original, ctx)
    moved = rearrange_graph(g, n, ctx)
    result = g.to_model()
    parity = None
    if check:
        parity = compare(original, result, inputs=_inputs(inputs, original), atol=atol, rtol=rtol, seed=seed)
        if not parity.passed:
            raise ParityError("rearranged model differs from the input: " + "; ".join(parity.lines()))
    return result, moved, parity


def rearrange_file(src, dst, **options):
    """`onnxprune rearrange`: rearrange the model at `src` and write it atomically to `dst`."""
    _refuse_same(src, dst)
    result, moved, parity = rearrange(src, **options)
    save_model(result, dst)
    return moved, parity


def _refuse_same(src, dst) -> None:
    if Path(dst).resolve() == Path(src).resolve():
        raise OnnxPruneError(f"output {dst} is the input: the input file is never modified, choose another -o")


def _load_npz(path, what: str) -> dict:
    import numpy as np

    try:
        return dict(np.load(path))
    except Exception as e:
        raise OnnxPruneError(f"{what} {path}: cannot read ({str(e).splitlines()[0][:200]})") from None


def _save_npz(path, arrays: dict) -> None:
    import numpy as np

    with atomic_path(path, suffix=".npz") as tmp:
        np.savez_compressed(tmp, **arrays)


@dataclass
class Inspection:
    stats: ModelStats
    classes: dict

    def text(self, verbose: bool = False) -> str:
        s = self.stats
        lines = [f"opset {s.opset}, {sum(s.ops.values())} nodes, {s.params:,} parameters, {s.macs:,} MACs, {s.size_bytes:,} bytes"]
        lines.append("ops: " + ", ".join(f"{k} {v}" for k, v in s.ops.items()))
        c = self.classes
        lines.append(f"channel classes: {c['total']} ({', '.join(f'{k} {v}' for k, v in c['by_kind'].items())})")
        lines.extend(f"  pinned ({n}): {r}" for r, n in c["pinned"].items())
        ready = c["by_kind"].get("unread", 0) + c["by_kind"].get("absorb", 0)
        if ready:
            lines.append(f"  removable now ({ready}): dead or constant channels; `onnxprune simplify` removes them "
                         "(--align 1 removes every one)")
        lines.extend(f"  kept ({n}): {r}" for r, n in c["blocked"].items())
        if verbose:
            lines.append("layers (in, out channels):")
            lines.extend(f"  {name:40} {io}" for name, io in s.layers.items())
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"stats": self.stats.__dict__, "classes": self.classes}


def inspect(model, pins=()) -> Inspection:
    from .passes.cleanup import cleaned_graph

    m = load_model(model)
    return Inspection(ModelStats.of(m), channel_summary(cleaned_graph(m).to_model(), pins))


__all__ = ["simplify", "simplify_file", "check", "inspect", "prune_file", "rearrange", "rearrange_file"]
