"""PyTorch → ONNX with either exporter, quietly, from a copy whose masks are made permanent."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

import onnx

from ..errors import OnnxPruneError
from .masks import baked_copy

EXPORTERS = ("dynamo", "torchscript")


@contextlib.contextmanager
def _quiet_logger(name: str):
    """The dynamo exporter logs a warning per torchvision op it cannot register: noise here."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def as_args(dummy_input) -> tuple:
    return tuple(dummy_input) if isinstance(dummy_input, (tuple, list)) else (dummy_input,)


def export_onnx(model, dummy_input, exporter: str = "dynamo", opset: int | None = None) -> onnx.ModelProto:
    """The model (eval mode, masks baked in) as an ONNX ModelProto. `exporter`: "dynamo"
    (torch.export, the default) or "torchscript" (do_constant_folding=False keeps names)."""
    import torch

    if exporter not in EXPORTERS:
        raise OnnxPruneError(f"exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    clone = baked_copy(model).eval()
    args = as_args(dummy_input)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _quiet_logger("torch.onnx"):
            warnings.simplefilter("ignore")
            if exporter == "dynamo":
                kwargs = {"opset_version": opset} if opset else {}
                return torch.onnx.export(clone, args, dynamo=True, verbose=False, **kwargs).model_proto
            buf = io.BytesIO()
            torch.onnx.export(clone, args, buf, dynamo=False, opset_version=opset or 17, do_constant_folding=False)
            return onnx.load_from_string(buf.getvalue())
    except OnnxPruneError:
        raise
    except Exception as e:
        raise OnnxPruneError(f"the {exporter} exporter failed: {str(e).strip().splitlines()[0][:300]}") from None
