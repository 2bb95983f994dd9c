"""model_tune as a Python API: prune (optional) -> Relax -> BSR convs -> tune -> compile ->
parity vs onnxruntime -> interleaved timing -> exported library."""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import onnx

from .timing import APART, FORK_JOIN, apart_readings  # numpy only: no TVM import at load


class InputError(ValueError):
    """Bad user input (file, target, numbers): reported as one line, exit code 2."""


class ParityError(RuntimeError):
    """The compiled sparse model does not compute what onnxruntime computes."""


@dataclass
class Timing:
    name: str
    median_ms: float
    mean_ms: float
    std_ms: float


@dataclass
class ModelTuneResult:
    library_path: str
    target: str
    converted: list[str]  # one line per conv in BSR
    depthwise: list[str]  # one line per depthwise conv on our kernel
    skipped: list[str]  # one line per conv left dense, with the reason
    pruned: list[str]  # per-conv pruning report (empty without --prune)
    parity_max_abs_err: float
    timings: dict[str, Timing] = field(default_factory=dict)
    # depthwise planes of all layers by what the kernels do with them: computed / unread / constant
    planes: dict[str, int] = field(default_factory=dict)
    gemv: list[str] = field(default_factory=list)  # one line per matmul on our GEMV kernel
    direct: list[str] = field(default_factory=list)  # one line per conv on our direct kernel (a stem)
    table: str = ""
    # share of this host's CPU time taken by the hypervisor while timing (None: unknown, or RPC)
    stolen: float | None = None
    # timing.fork_join_us readings, one per timing process (2+ local threads only)
    fork_join_us: list[float] = field(default_factory=list)


class Progress:
    def __init__(self, stream=None, enabled: bool = True):
        self.stream, self.enabled, self.start = stream, enabled, time.perf_counter()

    def log(self, message: str) -> None:
        if self.enabled:
            print(f"[{time.perf_counter() - self.start:7.1f}s] {message}",
                  file=self.stream or sys.stderr, flush=True)

    @contextmanager
    def step(self, what: str):
        t0 = time.perf_counter()
        self.log(f"{what} ...")
        yield
        self.log(f"{what}: done in {time.perf_counter() - t0:.1f}s")


# ---------------------------------------------------------------------------- inputs

def parse_target(target: str | dict | None) -> dict:
    """TVM's JSON dict form; None detects the host CPU."""
    import tvm

    if target is None:
        return {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(),
                "num-cores": _physical_cores()}
    if isinstance(target, str):
        try:
            target = json.loads(target)
        except json.JSONDecodeError as e:
            raise InputError(f"--target is not valid JSON: {e}") from None
    if not isinstance(target, dict) or "kind" not in target:
        raise InputError('--target must be a JSON object with a "kind", e.g. {"kind":"llvm"}')
    try:
        tvm.target.Target(target)
    except Exception as e:  # TVM raises various types for bad attributes
        raise InputError(f"--target rejected by TVM: {str(e).splitlines()[-1]}") from None
    if target["kind"] == "llvm" and "num-cores" not in target:
        # meta_schedule needs it, and it sets the thread count for TVM and onnxruntime alike
        target = {**target, "num-cores": _physical_cores()}
    return target


CPU_KEYS = ("mcpu", "mattr", "mtriple")


def fill_host_cpu(target: dict, remote: bool) -> tuple[dict, str | None]:
    """An llvm target that names no CPU compiles generic x86-64 code: measured, the same model then
    ran at 0.49x / 0.76x of onnxruntime at 70 / 90 % block sparsity. On this host, fill in the
    detected CPU (and say so); for a device behind the RPC tracker the host's CPU is not the
    device's, so only warn before the tuning budget is spent. Returns (target, message or None)."""
    import tvm

    if target.get("kind") != "llvm" or any(k in target for k in CPU_KEYS):
        return target, None
    if remote:
        return target, ("warning: the target names no CPU (mcpu / mattr / mtriple): TVM compiles generic code for "
                        "the device, measured up to 2x slower; add the device's \"mcpu\" to --target")
    cpu = tvm.target.codegen.llvm_get_system_cpu()
    return {**target, "mcpu": cpu}, (f"the target names no CPU: compiling for this host's {cpu!r} "
                                     "(generic code was measured up to 2x slower; give \"mcpu\" to choose)")


def num_cores_warning(target: str | dict | None, remote: bool) -> str | None:
    """For the target as given (already valid: parse_target fills in this host's core count
    when it names none): the fused and packed kernels split their work in `num-cores` parts,
    which for a device behind the RPC tracker may be too few."""
    given = json.loads(target) if isinstance(target, str) else target or {}
    if not remote or "num-cores" in given:
        return None
    return (f"warning: the target names no num-cores: the kernels split their work for this host's "
            f"{_physical_cores()} cores; add the device's \"num-cores\" to --target")


def _physical_cores() -> int:
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def load_onnx(path: str) -> onnx.ModelProto:
    from onnxprune.errors import OnnxPruneError
    from onnxprune.graph import load_model

    if not os.path.isfile(path):
        raise InputError(f"no such file: {path}")
    try:
        model = load_model(path)
    except OnnxPruneError as e:
        raise InputError(str(e)) from None
    if not any(n.op_type == "Conv" for n in model.graph.node):
        raise InputError(f"{path} has no Conv node: nothing to make block-sparse")
    return model


LIBRARY_SUFFIXES = (".so", ".tar", ".dylib", ".dll")


def plan_files(onnx_path, work_dir, library, prune, dense_baseline):
    """What model_tune reads and writes, checked before any work (onnxprune.files)."""
    from onnxprune.files import FilePlan

    if os.path.exists(work_dir) and not os.path.isdir(work_dir):
        raise InputError(f"--work-dir {work_dir} is a file, not a folder")
    plan = FilePlan().read_model(onnx_path).write(library, "the compiled library (--output)")
    # the tuning files are updated in place by design (the next run reuses them)
    written = ["bsr_tiles.json", "database_workload.json", "database_tuning_record.json"]
    written += ["model_dense.so"] if dense_baseline else []
    for name in written:
        plan.write(os.path.join(work_dir, name), f"the tuning file {name} in --work-dir")
    if prune:
        plan.write_model(os.path.join(work_dir, "pruned.onnx"), "the pruned model in --work-dir")
    return plan


def check_numbers(bsr: int, bsc: int, sparsity: float, trials: int) -> None:
    if bsr < 1 or bsc < 1:
        raise InputError(f"block shape must be positive, got {bsr}x{bsc}")
    if not 0.0 <= sparsity < 1.0:
        raise InputError(f"sparsity must be in [0, 1), got {sparsity}")
    if trials < 0:
        raise InputError(f"--trials must be >= 0, got {trials}")


# ---------------------------------------------------------------------------- checks

def max_abs_error(outputs, references) -> float:
    return max(float(np.max(np.abs(o - r))) if o.size else 0.0
               for o, r in zip(outputs, references))


def check_parity(outputs, references, rtol=1e-3, atol=1e-4) -> float:
    """|out - ref| <= atol*max|ref| + rtol*|ref| element-wise, else ParityError."""
    if len(outputs) != len(references):
        raise ParityError(f"{len(outputs)} outputs vs {len(references)} from onnxruntime")
    for i, (o, r) in enumerate(zip(outputs, references)):
        if o.shape != r.shape:
            raise ParityError(f"output {i}: shape {o.shape} vs onnxruntime {r.shape}")
        scale = max(1.0, float(np.max(np.abs(r)))) if r.size else 1.0
        bad = np.abs(o - r) > atol * scale + rtol * np.abs(r)
        if np.any(bad) or not np.all(np.isfinite(o)):
            raise ParityError(
                f"output {i}: {int(bad.sum())} of {r.size} values differ from onnxruntime "
                f"(max abs error {float(np.max(np.abs(o - r))):.3g}, scale {scale:.3g})")
    return max_abs_error(outputs, references)


def _as_list(value) -> list[np.ndarray]:
    import tvm

    if isinstance(value, tvm.runtime.Tensor):
        return [value.numpy()]
    return [v.numpy() for v in value]


# ---------------------------------------------------------------------------- pipeline

def model_tune(
    onnx_path: str,
    bsr: int = 4,
    bsc: int = 1,
    sparsity: float = 0.7,
    *,
    prune: bool = False,
    balanced: bool = False,
    trials: int = 256,
    target: str | dict | None = None,
    work_dir: str = "tuned",
    output: str | None = None,
    rpc_tracker: str | None = None,
    rpc_key: str | None = None,
    dense_baseline: bool = True,
    rounds: int = 15,
    verbose: bool = True,
) -> ModelTuneResult:
    check_numbers(bsr, bsc, sparsity, trials)
    library = output or os.path.join(work_dir, "model_bsr.so")
    plan_files(onnx_path, work_dir, library, prune, dense_baseline).check()
    if not str(library).endswith(LIBRARY_SUFFIXES):
        raise InputError(f"--output {library}: a library name ends with one of {', '.join(LIBRARY_SUFFIXES)}")
    model = load_onnx(onnx_path)
    if balanced and not prune:
        raise InputError("--balanced is a way of pruning: give --prune too")
    if bool(rpc_tracker) != bool(rpc_key):
        raise InputError("--rpc-tracker and --rpc-key go together")
    target_dict, cpu_note = fill_host_cpu(parse_target(target), remote=bool(rpc_tracker))
    threads = int(target_dict.get("num-cores", os.cpu_count() or 1))
    # the TVM thread pool reads this when it starts; same thread count as onnxruntime
    os.environ.setdefault("TVM_NUM_THREADS", str(threads))

    import tvm
    from onnxprune.errors import OnnxPruneError
    from onnxprune.graph import save_model
    from onnxprune.parity import random_inputs
    from onnxprune.pruning.prune import prune as prune_model

    from . import convert, timing, tune
    from .timing import ort_session

    progress = Progress(enabled=verbose)
    tvm_target = tvm.target.Target(target_dict)
    try:
        rpc = tune.RPCTarget.parse(rpc_tracker, rpc_key) if rpc_tracker else None
    except ValueError as e:
        raise InputError(str(e)) from None
    for note in (cpu_note, num_cores_warning(target, bool(rpc_tracker))):  # once the input is valid
        if note is not None:
            progress.log(note)
            if rpc_tracker:
                warnings.warn(note, stacklevel=2)
    os.makedirs(work_dir, exist_ok=True)
    pruned_lines = []

    if prune:
        with progress.step(f"1x{bsr} block pruning at sparsity {sparsity}" + (", row-balanced" if balanced else "")):
            try:
                model, pruning = prune_model(model, criterion="l1", granularity="1xN", n=bsr, sparsity=sparsity,
                                             balanced=balanced)
            except OnnxPruneError as e:
                raise InputError(str(e)) from None
            pruned_lines = [f"{r.name} {r.shape}: "
                            + (f"pruned to {r.achieved:.3f}" if r.requested is not None else f"kept ({r.note})")
                            for r in pruning.layers]
            save_model(model, os.path.join(work_dir, "pruned.onnx"))
    tvm_model = exact_simplify(model, progress)
    with progress.step("importing ONNX into Relax"):
        try:
            dense_mod = convert.import_onnx(tvm_model)
        except Exception as e:  # unsupported op, dynamic shape...
            last = (str(e).strip().splitlines() or [""])[-1]
            raise InputError(f"TVM cannot import {onnx_path}: {last}") from None
    with progress.step(f"replacing convs with >= {sparsity} {bsr}x{bsc} block sparsity by BSR"):
        sparse_mod, report = convert.convert_to_bsr(dense_mod, bsr, bsc, sparsity, threads)
    progress.log(f"  {len(report.converted)} convs in BSR, {len(report.depthwise)} depthwise convs "
                 f"on our kernel, {len(report.direct)} convs of few input channels on our direct "
                 f"kernel, {len(report.gemv)} matmuls on our GEMV kernel, "
                 f"{len(report.skipped)} convs left to TVM")
    if not report.converted:
        progress.log(f"  warning: no conv has {sparsity} block sparsity in {bsr}x{bsc} blocks "
                     "(prune first with --prune?): the model runs dense")
    where = f" on {rpc.key}@{rpc.host}:{rpc.port}" if rpc else ""
    with progress.step(f"tuning BSR tiles of {len(report.converted)} kernels{where}"):
        with tune.Session(rpc) as session:
            tiles = tune.tune_tiles(report.converted, tvm_target, work_dir, session, progress.log)
        sparse_mod = convert.retile(sparse_mod, report, tiles)
    with progress.step("legalizing and fusing the Relax graphs"):
        sparse_mod = tune.prepare(sparse_mod, tvm_target)
        dense_mod = tune.prepare(dense_mod, tvm_target) if dense_baseline else None
    with progress.step(f"meta_schedule on the dense remainder ({trials} trials)"):
        tune.tune_remainder(sparse_mod, tvm_target, work_dir, trials, rpc)
    if dense_baseline:
        with progress.step(f"meta_schedule on the dense model, baseline ({trials} trials)"):
            tune.tune_remainder(dense_mod, tvm_target, work_dir, trials, rpc)
    with progress.step("compiling"):
        sparse_mod, untuned = tune.apply_tuning(sparse_mod, tvm_target, work_dir)
        if untuned:
            progress.log(f"  {len(untuned)} TVM functions have no tuning record in {work_dir} "
                         f"and run TVM's default schedule (raise --trials): {', '.join(untuned)}")
        sparse_ex = tune.build(sparse_mod, tvm_target)
        dense_ex = tune.compile_module(dense_mod, tvm_target, work_dir) if dense_baseline else None

    feeds = random_inputs(model, seed=0)  # onnxprune's rule: a dynamic batch dim is 1
    with progress.step(f"checking parity against onnxruntime{where}"):
        references = ort_session(model, threads).run(None, feeds)
        max_err = parity_on_device(rpc, sparse_ex, feeds, references)
        if dense_ex is not None:
            parity_on_device(rpc, dense_ex, feeds, references)
    progress.log(f"  sparse TVM matches onnxruntime, max abs error {max_err:.2e}")

    with progress.step(f"exporting {library}"):
        tune.export_atomically(sparse_ex, library)
        libraries = {"sparse TVM": library}
        if dense_ex is not None:
            libraries["dense TVM"] = tune.export_atomically(
                dense_ex, os.path.join(work_dir, "model_dense.so"))
    with progress.step(f"timing, {rounds} rounds, {threads} threads, "
                       + ("interleaved (TVM on the RPC device, onnxruntime here)" if rpc else
                          "each engine in its own process, taking turns" if threads > 1 else
                          "interleaved in one process")):
        before = timing.cpu_ticks()
        timings, fork_join = time_models(model, feeds, libraries, work_dir, threads, rounds, rpc)
        stolen = None if rpc else timing.stolen_fraction(before, timing.cpu_ticks())

    result = ModelTuneResult(
        library_path=library, target=json.dumps(target_dict),
        converted=[describe_layer(layer) for layer in report.converted],
        depthwise=[describe_layer(layer) for layer in report.depthwise],
        skipped=[f"{shape}: {reason}" for shape, reason in report.skipped],
        pruned=pruned_lines, parity_max_abs_err=max_err, timings=timings,
        planes={k: sum(layer.counts[k] for layer in report.depthwise)
                for k in ("computed", "unread", "constant")},
        gemv=[describe_layer(layer) for layer in report.gemv],
        direct=[describe_layer(layer) for layer in report.direct], stolen=stolen,
        fork_join_us=fork_join,
    )
    result.table = format_table(result, where=f"{rpc.key} via RPC" if rpc else "local")
    return result


def exact_simplify(model: onnx.ModelProto, progress: Progress) -> onnx.ModelProto:
    """onnxprune's exact simplify with every channel kept: BatchNormalization folded into the conv
    before it (in TVM it is one more pass over memory and breaks the epilogue fusion) and
    constant channels (a block row pruned whole) folded into the layers that read them, border
    maps as constants (the kernels take them as a residual), checked on onnxruntime.

    Dead channels are not removed: taking one channel out of a 1xN-blocked conv shifts its later
    rows across block boundaries (measured on MobileNetV2 at 0.9 block sparsity: 0.73-0.85 left
    with align 4, no longer divisible into 1x4 blocks with align 1). The kernels skip them
    instead (kernels.UNREAD). onnxruntime keeps timing (and checking against) the model as given."""
    from onnxprune.errors import OnnxPruneError, ParityError
    from onnxprune.simplify import simplify

    with progress.step("folding BatchNormalization and constant channels (onnxprune simplify, "
                       "no channel removed)"):
        try:
            simplified, report = simplify(model, align=1, remove=False, border_maps="constant")
        except (OnnxPruneError, ParityError) as e:  # exact or not at all: TVM gets the model as given
            progress.log(f"  simplify refused ({str(e).splitlines()[0]}): converting the model as given")
            return model
    folded = sum(e.pass_name == "propagate_constants" for e in report.events)
    progress.log(f"  constants folded at {folded} layer(s), parity on onnxruntime held")
    return simplified


def parity_on_device(rpc, executable, feeds, references) -> float:
    """Run `executable` where it will be deployed (here or over RPC) and compare; the session
    and its remote tensors die with this frame, handing the device back."""
    from . import tune

    with tune.Session(rpc) as session:
        inputs = [session.tensor(v) for v in feeds.values()]
        outputs = _as_list(session.vm(executable, f"parity_{os.getpid()}_{id(executable)}")
                           ["main"](*inputs))
        del inputs
    return check_parity(outputs, references)


def describe_layer(layer) -> str:
    from . import convert

    if isinstance(layer, convert.GemvLayer):
        k, n = layer.weight.shape
        return f"{layer.kernel_name}: ({layer.rows}, {k}) @ ({k}, {n}) + bias, dense"
    s = layer.spec
    conv = (f"{s.c_in}->{s.c_out} {s.kernel[0]}x{s.kernel[1]} stride {s.stride[0]} "
            f"@{s.height}x{s.width}")
    if isinstance(layer, convert.DirectConvLayer):
        kernel = "direct, dense"
    elif isinstance(layer, convert.DepthwiseLayer):
        counts = layer.counts
        kernel = "depthwise" + ("" if counts["computed"] == s.c_out else
                                ", planes " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    else:
        kernel = f"block sparsity {layer.weight.sparsity:.3f}, tile {layer.tile.label}"
    extras = [s.epilogue.describe()]
    if getattr(layer, "depthwise", None) is not None:
        extras.append(f"fused with {layer.depthwise.kernel_name}")
    if getattr(layer, "pooled", None) is not None:
        extras.append("+global mean")
    return f"{layer.kernel_name}: {conv}, {kernel}" + "".join(f", {e}" for e in extras if e)


def time_models(model, feeds, libraries, work_dir, threads, rounds,
                rpc) -> tuple[dict[str, Timing], list[float]]:
    """Interleaved medians of the libraries and onnxruntime, timed in a fresh process (on more
    than one local thread, a fresh process per engine and round: see timing), and the
    timing.fork_join_us readings taken on the way."""
    import tempfile
    from dataclasses import asdict

    from .timing import time_in_subprocess, time_isolated

    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        onnx_path = os.path.join(tmp, "model.onnx")
        onnx.save(model, onnx_path)
        np.savez(os.path.join(tmp, "inputs.npz"), **feeds)
        spec = {"libraries": libraries, "onnx_path": onnx_path, "threads": threads,
                "inputs_npz": os.path.join(tmp, "inputs.npz"), "rounds": rounds,
                "rpc": asdict(rpc) if rpc else None}
        timer = time_isolated if threads > 1 and rpc is None else time_in_subprocess
        per_round = timer(spec, os.path.join(tmp, "spec.json"))
    fork_join = per_round.pop(FORK_JOIN, [])
    return {name: Timing(name, float(np.median(t)) * 1e3, float(np.mean(t)) * 1e3,
                         float(np.std(t)) * 1e3) for name, t in per_round.items()}, fork_join


def fork_join_line(readings: list[float]) -> str:
    """The table's line on the timing.fork_join_us readings ('' without any)."""
    if not readings:
        return ""
    apart = apart_readings(readings)
    return (f"host: 2-thread fork-join {np.median(readings):.2f} us median ({min(readings):.2f}-"
            f"{max(readings):.2f} over {len(readings)} timing processes)"
            + (f"; {apart} of them at {APART}x the fastest or more: the two cores did not share a "
               "cache part of the time, and 2-thread times move with that (medians of many rounds)"
               if apart else ""))


STOLEN_WARNING = 0.02  # from this share of stolen CPU time on, the table says the host was busy


def format_table(result: ModelTuneResult, where: str) -> str:
    t = result.timings
    ort_ms = t["onnxruntime"].median_ms
    lines = [f"target {result.target} ({where}); onnxruntime on this host",
             f"{'engine':<14}{'median ms':>11}{'mean ms':>10}{'std ms':>9}{'vs ORT':>9}"]
    for timing in t.values():
        lines.append(f"{timing.name:<14}{timing.median_ms:>11.3f}{timing.mean_ms:>10.3f}"
                     f"{timing.std_ms:>9.3f}{ort_ms / timing.median_ms:>8.2f}x")
    if "dense TVM" in t:
        lines.append(f"sparse TVM speedup over dense TVM: "
                     f"{t['dense TVM'].median_ms / t['sparse TVM'].median_ms:.2f}x")
    if result.stolen is not None:
        lines.append(f"host: {100 * result.stolen:.1f} % of CPU time stolen by the hypervisor while "
                     "timing" + (" (a busy shared VM: trust the ratios more than the times)"
                                 if result.stolen >= STOLEN_WARNING else ""))
    if result.fork_join_us:
        lines.append(fork_join_line(result.fork_join_us))
    lines.append(f"parity vs onnxruntime: max abs error {result.parity_max_abs_err:.2e}")
    lines.append(f"library: {result.library_path}")
    s = t["sparse TVM"]
    lines.append(f"Mean inference time (std dev): {s.mean_ms:.2f} ms ({s.std_ms:.2f} ms)")
    return "\n".join(lines)
