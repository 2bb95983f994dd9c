"""Latency of ONNX models on onnxruntime, measured side by side: the runs of all models are
interleaved so that machine noise hits them alike; medians are reported."""

from __future__ import annotations

import time

import numpy as np
import onnx

from .parity import random_inputs, session


def time_models(models: dict[str, onnx.ModelProto], threads: int = 1, runs: int = 30, warmup: int = 3,
                seed: int = 0, samples: bool = False) -> dict:
    """label -> median latency in milliseconds (graph optimizations on, as users run them); with
    `samples`, label -> every run's latency, in run order (run i of each model was timed back to
    back, so per-run ratios cancel the machine's drift)."""
    # (spinning off: with several threads, the idle workers of the sessions not running spin and
    # steal the cores of the one that is — 2-thread runs were 3x slower than 1-thread ones)
    sessions = {k: session(m, threads=threads, optimize=True, spinning=threads == 1) for k, m in models.items()}
    feeds = random_inputs(next(iter(models.values())), seed)
    times: dict[str, list[float]] = {k: [] for k in models}
    for i in range(warmup + runs):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, feeds)
            if i >= warmup:
                times[k].append((time.perf_counter() - t) * 1e3)
    return times if samples else {k: float(np.median(v)) for k, v in times.items()}
