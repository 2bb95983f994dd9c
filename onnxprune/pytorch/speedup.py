"""`speedup`: from a pruned PyTorch model to a smaller ONNX model that provably computes what the
PyTorch model computes.

export (masks baked in, dynamo or TorchScript) → `onnxprune.simplify` (BN folded, constants of
pruned channels absorbed exactly, dead channels removed; parity-checked against the export) →
parity of the result on onnxruntime against the PyTorch model itself, on `dummy_input` and on
seeded random batches shaped like it. A mismatch is an error (ParityError), never a warning.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ParityError
from ..parity import DEFAULT_ATOL, DEFAULT_RTOL, ParityReport, diff, run, session
from .export import as_args, export_onnx
from .masks import apply_masks, baked_copy, make_permanent, normalize_masks


@dataclass
class SpeedupReport:
    simplify: object              # onnxprune.report.Report (before/after, channels, ORT parity vs the export)
    torch_parity: ParityReport    # the simplified model on onnxruntime vs the PyTorch model

    def table(self, verbose: bool = False) -> str:
        p = self.torch_parity
        lines = [self.simplify.table(verbose),
                 f"parity vs PyTorch (atol {p.atol:g}, rtol {p.rtol:g}, {p.batches} batches): {'PASS' if p.passed else 'FAIL'}"]
        return "\n".join(lines + ["  " + line for line in p.lines()])

    __str__ = table


def speedup(model, dummy_input, path=None, *, masks=None, exporter: str = "dynamo", align: int | None = None,
            batches: int = 2, seed: int = 0, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL,
            opset: int | None = None, progress=None):
    """Export `model` (with its torch.nn.utils.prune masks, or `masks` in any form masks.py
    accepts), simplify (`align`: simplify's, by default its default), and check the result against
    the PyTorch model. Writes `path` (atomically) when given. Returns (onnx.ModelProto, SpeedupReport)."""
    from ..files import FilePlan
    from ..graph import save_model
    from ..simplify import simplify

    say = progress or (lambda msg: None)
    if path is not None:
        FilePlan().write_model(path).check()
    source = baked_copy(model).eval()
    if masks is not None:
        from .groups import dependency_groups

        groups = dependency_groups(model, dummy_input) if isinstance(masks, (list, tuple)) else None
        apply_masks(source, normalize_masks(model, masks, groups))
        make_permanent(source)
    exported = export_onnx(source, dummy_input, exporter, opset)
    say(f"exported with the {exporter} exporter: {len(exported.graph.node)} nodes")
    options = {"align": align} if align is not None else {}
    small, report = simplify(exported, atol=atol, rtol=rtol, seed=seed, **options)
    say(f"simplified in {report.seconds:.2f} s: {report.before.macs:,} -> {report.after.macs:,} MACs")
    parity = torch_parity(source, small, dummy_input, batches, seed, atol, rtol)
    result = SpeedupReport(report, parity)
    if not parity.passed:
        err = ParityError("the simplified model differs from the PyTorch model: " + "; ".join(
            line for line in parity.lines() if line.startswith("FAIL")))
        err.report, err.model = result, small
        raise err
    if path is not None:
        save_model(small, path)
        say(f"wrote {path}")
    return small, result


def torch_parity(model, onnx_model, dummy_input, batches: int, seed: int, atol: float, rtol: float) -> ParityReport:
    """The ONNX model on onnxruntime against `model` on `dummy_input` and seeded batches like it."""
    import torch

    sess = session(onnx_model)
    names = [i.name for i in sess.get_inputs()]
    gen = torch.Generator().manual_seed(seed)
    feeds = [as_args(dummy_input)] + [tuple(_like(t, gen) for t in as_args(dummy_input)) for _ in range(batches - 1)]
    got, ref = [], []
    with torch.no_grad():
        for args in feeds:
            out = model(*args)
            ref.append([o.detach().cpu().numpy() for o in (out if isinstance(out, (tuple, list)) else (out,))])
            got.append(run(sess, {n: a.detach().cpu().numpy() for n, a in zip(names, args)}))
    report = ParityReport(atol, rtol, len(feeds))
    for k, o in enumerate(sess.get_outputs()):
        a = np.concatenate([np.asarray(g[k], np.float64).reshape(1, -1) for g in got], axis=1)
        b = np.concatenate([np.asarray(r[k], np.float64).reshape(1, -1) for r in ref], axis=1)
        report.outputs.append(diff(o.name, np.shape(ref[0][k]), a, b, atol, rtol, [(g[k], r[k]) for g, r in zip(got, ref)]))
    return report


def _like(t, gen):
    """A seeded tensor shaped like `t`: N(0, 1) for floats, ids in [0, max(t)] for integers."""
    import torch

    if t.is_floating_point():
        return torch.randn(t.shape, generator=gen, dtype=t.dtype)
    if t.dtype == torch.bool:
        return torch.rand(t.shape, generator=gen) < 0.5
    high = max(int(t.max()) + 1, 1) if t.numel() else 1
    return torch.randint(0, high, t.shape, generator=gen, dtype=t.dtype)
