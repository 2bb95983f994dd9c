"""Interleaved timing of compiled TVM libraries and onnxruntime, in fresh processes.

Run as `python -m onnxprune.tvm_kernels.timing SPEC.json`: a process that has just tuned is a bad place to
time parallel kernels (idle meta_schedule/XGBoost threads steal the cores from the TVM thread
pool), so model_tune times in a child process and reads the JSON it prints.  On more than one
thread each engine gets its own child per round (time_isolated): a runtime's idle workers keep
spinning after a call and take a core from whichever engine runs next in the same process
(measured on 2 cores: onnxruntime 2.5 ms alone, 8.4-8.8 ms timed after a TVM library; TVM
1.0 ms alone, 1.6-2.1 ms after onnxruntime), so an interleaved 2-thread ratio was noise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np


def cpu_ticks(stat_path: str = "/proc/stat") -> tuple[int, int] | None:
    """(stolen, total) CPU ticks of all CPUs so far, from Linux's /proc/stat (steal: time a
    virtual CPU was runnable but the hypervisor ran something else); None where unreadable."""
    try:
        with open(stat_path) as f:
            fields = f.readline().split()
    except OSError:
        return None
    if len(fields) < 9 or fields[0] != "cpu":
        return None
    ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
    return ticks[7], sum(ticks)


def stolen_fraction(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """The share of CPU time the hypervisor took between two cpu_ticks() readings: on a
    shared VM, 2-thread times move with it (measured here: TVM 0.77 ms at ~0 %, 1.09 ms at
    9.7 %), so model_tune reports it next to its timings."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def _calls_per_round(run, budget_s: float) -> int:
    one = run(1)
    return int(min(100, max(1, budget_s / max(one, 1e-7))))


def time_interleaved(engines: dict, rounds: int, budget_s: float = 0.05) -> dict[str, list[float]]:
    """Per round, a few calls of each engine in turn, so load changes hit all of them alike.
    Returns per-call seconds (one entry per round) per engine."""
    for run in engines.values():  # warm up
        run(1)
    calls = {name: _calls_per_round(run, budget_s) for name, run in engines.items()}
    for name, run in engines.items():  # a round discarded: caches, page faults, thread pools
        run(calls[name])
    per_round = {name: [] for name in engines}
    for _ in range(rounds):
        for name, run in engines.items():
            per_round[name].append(run(calls[name]))
    return per_round


def _tvm_engine(path: str, inputs: list[np.ndarray], remote):
    import tvm
    from tvm import relax

    if remote is None:
        device, module = tvm.cpu(), tvm.runtime.load_module(path)
    else:
        remote.upload(path)
        device, module = remote.cpu(), remote.load_module(os.path.basename(path))
    vm = relax.VirtualMachine(module, device)
    args = [tvm.runtime.tensor(x, device) for x in inputs]
    return lambda n: float(vm.time_evaluator("main", device, number=n, repeat=1)(*args).mean)


def ort_session(model, threads: int):
    """An onnxruntime CPU session (default optimizations) on `threads` threads; `model` is a
    path or a ModelProto.  The one model_tune checks against and times against."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    source = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _ort_engine(onnx_path: str, feeds: dict, threads: int):
    session = ort_session(onnx_path, threads)

    def run(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            session.run(None, feeds)
        return (time.perf_counter() - t0) / n

    return run


def run_spec(spec: dict) -> dict[str, list[float]]:
    """spec: libraries {name: path}, onnx_path, inputs_npz, threads, rounds, rpc (or null)."""
    import tvm

    data = np.load(spec["inputs_npz"])
    feeds = {name: data[name] for name in data.files}
    remote = None
    if spec.get("rpc"):
        rpc = spec["rpc"]
        remote = tvm.rpc.connect_tracker(rpc["host"], rpc["port"]).request(
            rpc["key"], priority=1, session_timeout=rpc.get("session_timeout_s", 600))
    engines = {name: _tvm_engine(path, list(feeds.values()), remote)
               for name, path in spec["libraries"].items()}
    if spec.get("onnx_path"):
        engines["onnxruntime"] = _ort_engine(spec["onnx_path"], feeds, spec["threads"])
    return time_interleaved(engines, spec["rounds"])


def time_in_subprocess(spec: dict, spec_path: str, timeout_s: float = 1800) -> dict:
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    env = dict(os.environ, TVM_NUM_THREADS=str(spec["threads"]))
    proc = subprocess.run([sys.executable, "-m", "onnxprune.tvm_kernels.timing", spec_path], env=env,
                          capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"timing process failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def time_isolated(spec: dict, spec_path: str, timeout_s: float = 1800) -> dict:
    """time_in_subprocess's result, but each engine timed alone in a fresh process, one per
    engine per round, the engines taking turns round by round."""
    names = list(spec["libraries"]) + (["onnxruntime"] if spec.get("onnx_path") else [])
    per_round = {name: [] for name in names}
    for _ in range(spec["rounds"]):
        for name in names:
            alone = {**spec, "rounds": 1,
                     "libraries": {k: v for k, v in spec["libraries"].items() if k == name},
                     "onnx_path": spec["onnx_path"] if name == "onnxruntime" else None}
            per_round[name] += time_in_subprocess(alone, spec_path, timeout_s)[name]
    return per_round


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as f:
        spec = json.load(f)
    print(json.dumps(run_spec(spec)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
