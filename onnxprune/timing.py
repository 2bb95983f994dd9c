"""Latency of ONNX models on onnxruntime, measured side by side: the runs of all models are
interleaved so that machine noise hits them alike; medians are reported."""

from __future__ import annotations

import time

import numpy as np
import onnx

from .parity import random_inputs, session


def time_models(models: dict[str, onnx.ModelProto], threads: int = 1, runs: int = 30, warmup: int = 3,
                seed: int = 0) -> dict[str, float]:
    """label -> median latency in milliseconds (graph optimizations on, as users run them)."""
    sessions = {k: session(m, threads=threads, optimize=True) for k, m in models.items()}
    feeds = random_inputs(next(iter(models.values())), seed)
    samples: dict[str, list[float]] = {k: [] for k in models}
    for i in range(warmup + runs):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, feeds)
            if i >= warmup:
                samples[k].append((time.perf_counter() - t) * 1e3)
    return {k: float(np.median(v)) for k, v in samples.items()}
