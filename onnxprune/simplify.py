"""The simplify command: prepare → the simplify pipeline (cleanup → fold BN → (propagate
constants → remove dead channels → cleanup) to a fixed point) → report → parity gate.

`simplify(model)` works in memory and returns a ModelProto. `simplify_to(src, dst)` is the path
route the CLI takes: the input's weights are memory-mapped, the result is serialized once (into
the output's temporary path, with external data when large), and onnxruntime compares the two
files from disk, one session at a time, so no step holds the model twice in memory."""

from __future__ import annotations

import os
import time

import onnx

from . import checks
from .errors import ParityError
from .files import Outputs
from .graph import write_graph
from .parity import DEFAULT_ATOL, DEFAULT_RTOL, compare, feeds_for
from .passes.base import Context
from .pipeline import prepare, simplify_pipeline
from .report import ModelStats, Report, channel_summary


def simplify(model, *, fold_bn: bool = True, propagate: bool = True, remove: bool = True,
             pins=(), check: bool = True, inputs: list[dict] | None = None,
             atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL, seed: int = 0,
             align: int = 8) -> tuple[onnx.ModelProto, Report]:
    """Simplify a pruned model (a path or a ModelProto; never modified).

    `align`: dead channels are spared so that layer widths stay multiples of it where they were
    (onnxruntime's blocked conv kernels are much faster then); align=1 removes every dead channel.
    Returns the new model and a Report. With `check` (the default) the result is compared with
    the input on onnxruntime and ParityError (carrying the report) is raised if they differ."""
    g, report, feeds = _run(model, fold_bn, propagate, remove, pins, align, check, inputs, seed)
    result = g.to_model(copy=False)
    report.after = ModelStats.of(result)
    if check:
        _gate(report, model, result, feeds, atol, rtol, seed)
    return result, report


def simplify_to(src, dst, *, check: bool = True, inputs=None,
                atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL, seed: int = 0,
                fold_bn: bool = True, propagate: bool = True, remove: bool = True, pins=(),
                align: int = 8) -> Report:
    """Simplify the model file `src` into `dst`, written atomically and only if it passes the check."""
    g, report, feeds = _run(os.fspath(src), fold_bn, propagate, remove, pins, align, check, inputs, seed)
    with Outputs() as out:
        path = out.path(dst)
        write_graph(g, path, release=True)
        report.after = ModelStats.of(g.model)
        del g  # onnxruntime reads both models from disk now
        if check:
            _gate(report, os.fspath(src), path, feeds, atol, rtol, seed)
    return report


def _run(model, fold_bn, propagate, remove, pins, align, check, inputs, seed):
    """prepare → pipeline → report, and the parity feeds (parity.feeds_for)."""
    ctx = Context(pins=set(pins), align=checks.positive_int(align, "align"))
    start = time.perf_counter()
    g, before = prepare(model, pins, stats=True)
    feeds = feeds_for(inputs, g.signature(), seed, check)
    simplify_pipeline(fold_bn, propagate, remove)(g, ctx)
    classes = channel_summary(g.channel_graph(ctx.pins))  # the last round's: nothing changed since
    seconds = time.perf_counter() - start
    return g, Report(before, before, seconds, list(ctx.events), classes), feeds


def _gate(report: Report, reference, candidate, inputs, atol, rtol, seed) -> None:
    report.parity = compare(reference, candidate, inputs=inputs, atol=atol, rtol=rtol, seed=seed)
    if not report.parity.passed:
        err = ParityError("simplified model differs from the input: " + "; ".join(
            line for line in report.parity.lines() if line.startswith("FAIL")))
        err.report, err.model = report, candidate if isinstance(candidate, onnx.ModelProto) else None
        raise err
