"""The simplify pipeline: cleanup → fold BN → (propagate constants → remove dead channels →
cleanup) to a fixed point → parity gate."""

from __future__ import annotations

import time

import onnx

from . import checks
from .errors import ParityError
from .graph import Graph, check_pins, load_model, name_nodes
from .parity import DEFAULT_ATOL, DEFAULT_RTOL, compare
from .passes.base import Context, run_to_fixed_point
from .passes.cleanup import cleanup
from .passes.fold_bn import fold_bn as fold_bn_pass
from .passes.propagate_constants import propagate_constants
from .passes.remove_channels import remove_channels
from .report import Report, channel_summary


def simplify(model, *, fold_bn: bool = True, propagate: bool = True, remove: bool = True,
             pins=(), check: bool = True, inputs: list[dict] | None = None,
             atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL, seed: int = 0,
             align: int = 8) -> tuple[onnx.ModelProto, Report]:
    """Simplify a pruned model (a path or a ModelProto; never modified).

    `align`: dead channels are spared so that layer widths stay multiples of it where they were
    (onnxruntime's blocked conv kernels are much faster then); align=1 removes every dead channel.
    Returns the new model and a Report. With `check` (the default) the result is compared with
    the input on onnxruntime and ParityError (carrying the report) is raised if they differ."""
    original = load_model(model)
    start = time.perf_counter()
    g = Graph(load_model(original))
    name_nodes(g)
    ctx = Context(pins=set(pins), align=checks.positive_int(align, "align"))
    check_pins(g.g, pins)
    cleanup(g, ctx)
    if fold_bn:
        fold_bn_pass(g, ctx)
    passes = ([propagate_constants] if propagate else []) + ([remove_channels] if remove else [])
    if passes:
        run_to_fixed_point(passes + [cleanup], g, ctx)
    result = g.to_model()
    del result.graph.value_info[:]
    seconds = time.perf_counter() - start
    report = Report.build(original, result, ctx.events, seconds, channel_summary(result, ctx.pins))
    if check:
        report.parity = compare(original, result, inputs=inputs, atol=atol, rtol=rtol, seed=seed)
        if not report.parity.passed:
            err = ParityError("simplified model differs from the input: " + "; ".join(
                line for line in report.parity.lines() if line.startswith("FAIL")))
            err.report, err.model = report, result
            raise err
    return result, report
