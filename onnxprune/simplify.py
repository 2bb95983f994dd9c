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

from .errors import ParityError
from .files import Outputs
from .graph import ModelFile, write_graph
from .options import SimplifyOptions
from .parity import compare, feeds_for
from .passes.base import Context
from .pipeline import Pipeline, prepare, simplify_pipeline
from .report import ModelStats, Report, channel_summary, total_macs


def simplify(model, options: SimplifyOptions | None = None, **kwargs) -> tuple[onnx.ModelProto, Report]:
    """Simplify a pruned model (a path or a ModelProto; never modified). The options are the
    fields of `SimplifyOptions` (the flags of `onnxprune simplify`), as an object or keywords.

    `align`: dead channels are spared so that layer widths stay multiples of it where they were
    (onnxruntime's blocked conv kernels are much faster then); align=1 removes every dead channel.
    Returns the new model and a Report. With `check` (the default) the result is compared with
    the input on onnxruntime and ParityError (carrying the report) is raised if they differ."""
    opts = SimplifyOptions.of(options, **kwargs)
    g, report, feeds = _run(model, opts)
    result = g.to_model(copy=False)
    report.after = ModelStats.of(result, g.known_shapes())  # (the last round changed nothing)
    if opts.check:
        _gate(report, model, result, feeds, opts)
    return result, report


def simplify_to(src, dst, options: SimplifyOptions | None = None, **kwargs) -> Report:
    """Simplify the model file `src` into `dst`, written atomically and only if it passes the check."""
    opts = SimplifyOptions.of(options, **kwargs)
    src = src if isinstance(src, ModelFile) else os.fspath(src)  # a ModelFile's proto is not read again
    g, report, feeds = _run(src, opts)
    with Outputs() as out:
        path = out.path(dst)
        write_graph(g, path, release=True)
        report.after = ModelStats.of(g.model, g.known_shapes())
        del g  # onnxruntime reads both models from disk now
        if opts.check:
            _gate(report, os.fspath(src), path, feeds, opts)
    return report


def _run(model, opts: SimplifyOptions):
    """prepare → pipeline → report, and the parity feeds (parity.feeds_for)."""
    ctx = Context(pins=set(opts.pins), align=opts.align, border_maps=opts.border_maps)
    start = time.perf_counter()
    g, before = prepare(model, opts.pins, stats=True)
    feeds = feeds_for(opts.inputs, g.signature(), opts.seed, opts.check)
    pipeline = simplify_pipeline(opts.fold_bn, opts.propagate, opts.remove)
    cleanup, rest = pipeline.steps[0], Pipeline(pipeline.name, pipeline.steps[1:])
    cleanup(g, ctx)  # the input's MACs are counted on the shapes its first cleanup infers
    before.macs = max(before.macs, total_macs(g.nodes, g.shapes, set(g.inits)))
    rest(g, ctx)
    classes = channel_summary(g.channel_graph(ctx.pins))
    if opts.propagate and "absorb" in classes["by_kind"]:
        # after the fixed point, the only classes left that could absorb are the hosts of border maps
        classes["by_kind"]["hosting border maps"] = classes["by_kind"].pop("absorb")
    seconds = time.perf_counter() - start
    return g, Report(before, before, seconds, list(ctx.events), classes), feeds


def _gate(report: Report, reference, candidate, inputs, opts: SimplifyOptions) -> None:
    report.parity = compare(reference, candidate, inputs=inputs, atol=opts.atol, rtol=opts.rtol, seed=opts.seed)
    if not report.parity.passed:
        err = ParityError("simplified model differs from the input: " + "; ".join(
            line for line in report.parity.lines() if line.startswith("FAIL")))
        err.report, err.model = report, candidate if isinstance(candidate, onnx.ModelProto) else None
        raise err
