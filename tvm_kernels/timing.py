"""Interleaved timing of compiled TVM libraries and onnxruntime, in fresh processes.

Run as `python -m onnxprune.tvm_kernels.timing SPEC.json`: a process that has just tuned is a bad place to
time parallel kernels (idle meta_schedule/XGBoost threads steal the cores from the TVM thread
pool), so model_tune times in a child process and reads the JSON it prints.  On more than one
thread each engine gets its own child per round (time_isolated): a runtime's idle workers keep
spinning after a call and take a core from whichever engine runs next in the same process
(measured on 2 cores: onnxruntime 2.5 ms alone, 8.4-8.8 ms timed after a TVM library; TVM
1.0 ms alone, 1.6-2.1 ms after onnxruntime), so an interleaved 2-thread ratio was noise.
On more than one local thread each child also takes a fork_join_us reading after it has timed:
on a cloud VM it says whether the two cores shared a cache at the time, the largest cause of
2-thread variation measured here (2.6x for our library, 1.8x for onnxruntime).
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


# run_spec's and time_isolated's key for the fork_join_us readings, next to the engines' times
FORK_JOIN = "fork-join us"
APART = 1.6  # a reading this many times the fastest of a run: the two cores were apart then


def fork_join_us(regions: int = 2000, number: int = 5) -> float:
    """Microseconds per 2-thread TVM parallel region whose two halves each read what the other
    wrote in the region before: the price of a cross-core handshake, which every parallel
    kernel pays and the activations passed between kernels pay again.  On a 2-vCPU cloud VM it
    says where the hypervisor has put the vCPUs, which it changes every few seconds: measured on
    a Zen 4 VM, 0.76-1.0 us while they shared an L3 (a cache-line round trip between them
    55 ns) and 1.8-2.1 us while they did not (350 ns); the same sparse MobileNetV2 library ran
    1.6 ms and 4.2 ms at 2 threads in those two states, onnxruntime 5.0 and 8.3-9.4 ms."""
    import tvm

    lib = fork_join_library(regions)
    a = tvm.runtime.tensor(np.zeros((regions + 1, 2, 16), np.float32))
    lib["main"](a)  # warm: the thread pool starts
    return float(lib.mod.time_evaluator("main", tvm.cpu(), number=number, repeat=1)(a).mean) / regions * 1e6


def fork_join_library(regions: int):
    """fork_join_us's kernel: a[r + 1, t] = a[r, 1 - t] + 1 for r < regions, t in parallel
    (one cache line per half, so the halves share nothing but the handshake and that value)."""
    import tvm
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def fork_join(a: T.Buffer((regions + 1, 2, 16), "float32")):
        for r in range(regions):
            for t in T.parallel(2):
                a[r + 1, t, 0] = a[r, 1 - t, 0] + T.float32(1)

    return tvm.compile(tvm.IRModule({"main": fork_join}), target="llvm")


def apart_flags(readings: list[float]) -> list[bool]:
    """For each fork_join_us reading of one run: were the two cores apart then (APART times the
    fastest reading or more)?"""
    return [r >= APART * min(readings) for r in readings] if readings else []


def apart_readings(readings: list[float]) -> int:
    """How many fork_join_us readings of one run say the two cores were apart."""
    return sum(apart_flags(readings))


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
    per_round = time_interleaved(engines, spec["rounds"])
    # after the engines, not before: TVM's workers spin a while after a call and would slow
    # onnxruntime's (measured 4.3 -> 14 ms)
    if spec["threads"] > 1 and remote is None:
        per_round[FORK_JOIN] = [fork_join_us()]
    return per_round


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
            for key, times in time_in_subprocess(alone, spec_path, timeout_s).items():
                per_round.setdefault(key, []).extend(times)  # FORK_JOIN: one reading per child
    return per_round


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as f:
        spec = json.load(f)
    print(json.dumps(run_spec(spec)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
