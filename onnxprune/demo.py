"""`onnxprune demo`: the whole job on an embedded model, no files needed."""

from __future__ import annotations

import io
import time
import warnings
from pathlib import Path

import numpy as np
import onnx

from . import checks
from .errors import OnnxPruneError, require_torch
from .files import FilePlan, Outputs
from .graph import write_model
from .parity import session
from .report import ModelStats
from .simplify import simplify
from .timing import time_models


LABELS = ("dense", "masked", "simplified")


def list_models() -> list[str]:
    require_torch("the demo's model zoo")
    from onnxprune.models import ZOO

    return [f"{k:16} input {list(s.input_shape)}" for k, s in ZOO.items()]


def export(model, x, fold: bool = False) -> onnx.ModelProto:
    """TorchScript-based export; fold=False keeps the BatchNormalization nodes."""
    import torch

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=17, do_constant_folding=fold,
                          input_names=["input"], output_names=["logits"])
    return onnx.load_from_string(buf.getvalue())


def scaled_model(name: str, scale: float, seed: int):
    """The zoo model `scale` times wider, on a `scale` times larger input where it accepts one
    (models that flatten a fixed-size map into a Linear keep their input size)."""
    import torch

    from onnxprune.models import ZOO, build, example_input

    spec = ZOO[name]
    model = build(name, width=spec.width * scale, seed=seed)
    x = example_input(name, seed)
    big = torch.nn.functional.interpolate(x, scale_factor=scale) if scale != 1 else x
    try:
        with torch.no_grad():
            model(big)
        return model, big
    except RuntimeError:
        return model, x


def run_demo(name: str = "mobilenet_v2", sparsity: float = 0.5, seed: int = 0, threads: int = 1,
             out_dir: str | None = None, progress=None, scale: float = 4) -> str:
    torch = require_torch("onnxprune demo")
    from onnxprune.models import ZOO
    from onnxprune.models.masks import zero_random_filters

    say = progress or (lambda msg: None)
    if name not in ZOO:
        raise OnnxPruneError(f"unknown model {name!r}; choose one of: {', '.join(ZOO)}")
    checks.sparsity(sparsity, "sparsity")
    outputs = {label: Path(out_dir) / f"{name}.{label}.onnx" for label in LABELS} if out_dir else {}
    plan = FilePlan()
    for label, path in outputs.items():
        plan.write_model(path, f"the {label} model")
    plan.check()
    t0 = time.perf_counter()
    model, x = scaled_model(name, scale, seed)
    dense = export(model, x)
    n = zero_random_filters(model, sparsity, seed)
    say(f"{name}: zeroed {n} filters ({sparsity:.0%} of every layer but the classifier), exported to ONNX")
    masked = export(model, x)
    with torch.no_grad():
        reference = model(x).numpy()
    small, report = simplify(masked)
    say(f"simplified in {report.seconds:.2f} s; parity with the masked model: PASS")
    got = session(small).run(None, {"input": x.numpy()})[0]
    torch_err = float(np.abs(got - reference).max() / max(np.abs(reference).max(), 1e-12))
    say(f"timing on onnxruntime ({threads} thread(s), interleaved runs, medians)")
    ms = time_models({"dense": dense, "masked": masked, "simplified": small}, threads=threads)
    with Outputs() as out:
        for label, m in (("dense", dense), ("masked", masked), ("simplified", small)):
            if label in outputs:
                write_model(m, out.path(outputs[label]))
    stats = {"dense": ModelStats.of(dense), "masked": ModelStats.of(masked), "simplified": report.after}
    lines = [f"onnxprune demo: {name}, input {list(x.shape)}, {sparsity:.0%} of filters zeroed at random (seed {seed})", ""]
    lines.append(f"{'model':12}{'params':>12}{'MACs':>14}{'latency ms':>12}{'speedup':>9}")
    for label in LABELS:
        s = stats[label]
        lines.append(f"{label:12}{s.params:>12,}{s.macs:>14,}{ms[label]:>12.3f}{ms['masked'] / ms[label]:>8.2f}x")
    ideal = stats["masked"].macs / max(stats["simplified"].macs, 1)
    lines.append("")
    lines.append(f"MAC ratio (ideal speedup) {ideal:.2f}x; layers shrunk {len(report.changed_layers())}; "
                 f"parity vs PyTorch: max rel error {torch_err:.2e}; vs the masked model: "
                 f"{'PASS' if report.parity.passed else 'FAIL'}")
    lines.append(f"total {time.perf_counter() - t0:.1f} s" + (f"; models written to {out_dir}" if out_dir else ""))
    lines.append("")
    lines.append(report.table())
    return "\n".join(lines)


__all__ = ["run_demo", "list_models"]
