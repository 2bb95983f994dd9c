"""The Python API; mirrors the CLI (`onnxprune simplify | check | inspect`)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from .arrays import read_masks, write_npz
from .errors import ParityError
from .files import FilePlan, Outputs
from .options import PruneOptions, SimplifyOptions
from .graph import ModelFile, load_model, read_model, save_model, tensor_signature, write_model
from .parity import DEFAULT_ATOL, DEFAULT_RTOL, ParityReport, as_feeds, compare, default_inputs, feeds_for
from .report import ModelStats, Report, channel_summary
from .simplify import simplify, simplify_to


def _inputs(inputs, model, what: str = "inputs"):
    """Inputs as a list of feeds; a file is read against `model`'s signature (a ModelProto or a
    path, which is read, validated, without its external data, only then)."""
    if not _is_path(inputs):
        return as_feeds(inputs, None)
    return as_feeds(inputs, read_model(model) if _is_path(model) else model, what)


def _is_path(x) -> bool:
    return isinstance(x, (str, os.PathLike))


def simplify_file(src, dst, options: SimplifyOptions | None = None, *, progress=None, **kwargs) -> Report:
    """Simplify the model at `src` and write it atomically to `dst` (only if it passes the check);
    the options are `SimplifyOptions`' fields, as an object or keywords."""
    opts = SimplifyOptions.of(options, **kwargs)
    say = progress or (lambda msg: None)
    src = ModelFile(src)  # read and validated once: the plan and the pipeline share it
    FilePlan().read_model(src).read(opts.inputs, "the --inputs file").write_model(dst).check()
    t = time.perf_counter()
    report = simplify_to(src, dst, opts)
    say(f"simplified in {time.perf_counter() - t:.2f} s" + (", parity checked" if opts.check else " (parity check skipped)"))
    say(f"wrote {dst}")
    return report


def check(reference, candidate, *, inputs=None, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL,
          seed: int = 0) -> ParityReport:
    """Compare two models (paths or ModelProtos) on onnxruntime."""
    # files are validated here and run by onnxruntime from disk; protos are validated copies
    ref, cand = (read_model(m) if _is_path(m) else load_model(m) for m in (reference, candidate))
    feeds = _inputs(inputs, ref) or default_inputs(ref, seed)
    return compare(reference if _is_path(reference) else ref, candidate if _is_path(candidate) else cand,
                   inputs=feeds, atol=atol, rtol=rtol, seed=seed)


def prune_file(src, dst, options: PruneOptions | None = None, *, calib=None, masks=None, save_masks=None,
               simplify_after: bool | SimplifyOptions = False, progress=None, **kwargs):
    """`onnxprune prune`: prune the model at `src`, optionally simplify (`simplify_after`: True or
    the SimplifyOptions to use), write `dst` (and the masks) all or nothing; the options are
    `PruneOptions`' fields, as an object or keywords. Returns (PruneReport, simplify Report or None)."""
    from .pruning.prune import prune

    opts = PruneOptions.of(options, **kwargs)
    say = progress or (lambda msg: None)
    plan = FilePlan().read_model(src)
    plan.read(calib, "the --calib file").read(masks, "the --masks file").read(opts.config, "the --config file")
    if isinstance(simplify_after, SimplifyOptions):
        plan.read(simplify_after.inputs, "the --inputs file")
    plan.write_model(dst).write(save_masks, "the masks file (--save-masks)").check()
    model = load_model(src)
    if masks is not None and not isinstance(masks, dict):
        masks = read_masks(masks)
    result, report = prune(model, opts, calib=_inputs(calib, model, "calibration inputs"), masks=masks)
    say(f"pruned in {report.seconds:.2f} s")
    simplified = None
    if simplify_after:
        result, simplified = simplify(result, simplify_after if isinstance(simplify_after, SimplifyOptions) else None)
        parity = simplified.parity
        say("simplified; " + ("parity with the pruned model: " + ("PASS" if parity.passed else "FAIL")
                              if parity is not None else "parity check skipped"))
    with Outputs() as out:
        write_model(result, out.path(dst))
        if save_masks:
            write_npz(out.path(save_masks), report.masks)
    if save_masks:
        say(f"wrote masks to {save_masks}")
    say(f"wrote {dst}")
    return report, simplified


def sensitivity_file(src, calib, *, labels=None, csv=None, plot=None, progress=None, **options):
    """`onnxprune sensitivity`: prune each channel group of the model at `src` alone at each
    sparsity, take the metric over `calib` (and `labels`), write the CSV and the PNG plot (if given)
    all or nothing. `options`: `sensitivity.analyze_model`'s (sparsities, criterion, macs, and the
    PruneOptions fields prune_first, prune_last, group_reduce, seed). Returns the Analysis."""
    from . import sensitivity

    say = progress or (lambda msg: None)
    plan = FilePlan().read_model(src).read(calib, "the --calib file").read(labels, "the --labels file")
    plan.write(csv, "the CSV file (--csv)").write(plot, "the plot (--plot)").check()
    if plot is not None:
        sensitivity.require_matplotlib()  # before the work, not after it
    model = load_model(src)
    result = sensitivity.analyze_model(model, _inputs(calib, model, "calibration inputs"),
                                       labels=sensitivity.read_labels(labels) if _is_path(labels) else labels,
                                       **options)
    say(f"analysed {len(result.rows)} candidate(s) in {result.seconds:.1f} s")
    with Outputs() as out:
        if csv is not None:
            sensitivity.write_csv(result.rows, csv, outputs=out)
        if plot is not None:
            sensitivity.plot(result.rows, plot, result.metric_name, result.baseline, outputs=out)
    for path in (csv, plot):
        if path is not None:
            say(f"wrote {path}")
    return result


def rearrange(model, *, check: bool = True, inputs=None, atol: float = DEFAULT_ATOL,
              rtol: float = DEFAULT_RTOL, seed: int = 0):
    """Permute channels so that filters of similar L1 norm are neighbours (any 1xN block then groups
    similar filters); exact (parity-checked). Returns (ModelProto, number of layer groups permuted,
    ParityReport or None)."""
    from .passes.base import Context
    from .pipeline import REARRANGE_ONLY, prepare

    ctx = Context()
    g = prepare(model)  # a private copy: `model` itself is the reference
    feeds = feeds_for(inputs, g.signature(), seed, check)
    REARRANGE_ONLY(g, ctx)
    moved = sum(e.what == "permute" for e in ctx.events)
    result = g.to_model(copy=False)
    parity = None
    if check:
        parity = compare(model, result, inputs=feeds, atol=atol, rtol=rtol, seed=seed)
        if not parity.passed:
            raise ParityError("rearranged model differs from the input: " + "; ".join(parity.lines()))
    return result, moved, parity


def rearrange_file(src, dst, *, inputs=None, **options):
    """`onnxprune rearrange`: rearrange the model at `src` and write it atomically to `dst`."""
    src = ModelFile(src)
    FilePlan().read_model(src).read(inputs, "the --inputs file").write_model(dst).check()
    result, moved, parity = rearrange(src, inputs=inputs, **options)
    save_model(result, dst)
    return moved, parity


@dataclass
class Inspection:
    stats: ModelStats
    classes: dict
    io: dict  # "inputs" / "outputs" -> [{name, dtype, shape}]: the keys an --inputs .npz needs

    def text(self, verbose: bool = False) -> str:
        s = self.stats
        lines = [f"opset {s.opset}, {sum(s.ops.values())} nodes, {s.params:,} parameters, {s.macs:,} MACs, {s.size_bytes:,} bytes"]
        for kind in ("inputs", "outputs"):
            lines.append(f"{kind}:")
            lines.extend(f"  {t['name']:30} {t['dtype']:8} {t['shape']}" for t in self.io[kind])
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
        return {"stats": self.stats.__dict__, "classes": self.classes, **self.io}


def inspect(model, pins=()) -> Inspection:
    from .passes.base import Context
    from .pipeline import ANALYSIS, prepare

    g, stats = prepare(model, pins, stats=True)
    io = tensor_signature(g.signature())
    ANALYSIS(g, Context(pins=set(pins)))
    return Inspection(stats, channel_summary(g.channel_graph(pins)), io)


__all__ = ["simplify", "simplify_file", "check", "inspect", "prune_file", "rearrange", "rearrange_file"]
