"""Tuning and timing: meta_schedule for the dense remainder, our own search for BSR tiles,
locally or on a device registered with a TVM RPC tracker."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax
from tvm.s_tir import meta_schedule as ms

from . import kernels
from .convert import SparseConvLayer


@dataclass(frozen=True)
class RPCTarget:
    """A device registered under `key` with the tracker at host:port."""

    host: str
    port: int
    key: str
    session_timeout_s: int = 600

    @classmethod
    def parse(cls, tracker: str, key: str) -> RPCTarget:
        host, _, port = tracker.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--rpc-tracker must be HOST:PORT, got {tracker!r}")
        return cls(host, int(port), key)

    def session(self):
        tracker = tvm.rpc.connect_tracker(self.host, self.port)
        return tracker.request(self.key, priority=1, session_timeout=self.session_timeout_s)


def light_tensor_intrin() -> None:
    """meta_schedule imports `tvm.s_tir.tensor_intrin`, whose __init__ registers the CUDA, ROCm,
    Hexagon, RISC-V... intrinsics too: ~50 s on this machine, per process.  CPU schedule rules
    only need the x86/ARM ones, so register the package without its __init__ and import those."""
    import importlib
    import sys
    import types

    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        return
    import tvm.s_tir

    package = types.ModuleType(name)
    package.__path__ = [os.path.join(os.path.dirname(tvm.s_tir.__file__), "tensor_intrin")]
    sys.modules[name] = package
    for sub in ("x86", "arm_cpu"):
        setattr(package, sub, importlib.import_module(f"{name}.{sub}"))


def fast_build(mod: tvm.IRModule, target, _params=None):
    """meta_schedule's default build minus `import tvm.s_tir.tensor_intrin` (~40 s per fresh
    worker here, which made every candidate time out); CPU schedules do not need it."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target)


def make_builder(timeout_s: float = 120.0) -> ms.builder.LocalBuilder:
    return ms.builder.LocalBuilder(f_build=fast_build, timeout_sec=timeout_s)


def make_runner(rpc: RPCTarget | None):
    evaluator = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=50)
    if rpc is None:
        return ms.runner.LocalRunner(timeout_sec=60, evaluator_config=evaluator)
    config = ms.runner.RPCConfig(
        tracker_host=rpc.host, tracker_port=rpc.port, tracker_key=rpc.key,
        session_timeout_sec=120,
    )
    return ms.runner.RPCRunner(config, evaluator, max_workers=1)


def database(work_dir: str) -> ms.database.JSONDatabase:
    os.makedirs(work_dir, exist_ok=True)
    return ms.database.JSONDatabase(work_dir=work_dir)


def prepare(mod: tvm.IRModule, target) -> tvm.IRModule:
    """Legalize and fuse into TIR, once: meta_schedule extracts its tasks from the result and
    apply_tuning / build take it as it is, so the database keys match."""
    from tvm.relax import pipeline

    passes = [
        *pipeline.library_dispatch_passes(target),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]
    with target, tvm.transform.PassContext(opt_level=3):
        return tvm.transform.Sequential(passes)(mod)


def tunable_tasks(prepared: tvm.IRModule, target):
    """Tasks of `prepared` minus our hand-scheduled kernels (tuned by tune_tiles)."""
    tasks = ms.relax_integration.extract_tasks(prepared, target)
    return [t for t in tasks
            if not t.dispatched[0]["main"].attrs.get("tirx.is_scheduled", False)]


def _drop_unnamed_log_handlers() -> None:
    """meta_schedule rebuilds its logging config from the names of the handlers already on its
    logger and crashes on an unnamed one (seen when a test harness attached one)."""
    import logging

    ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
    for handler in list(ms_logger.handlers):
        if handler.get_name() is None:
            ms_logger.removeHandler(handler)


def tune_remainder(prepared, target, work_dir: str, trials: int, rpc: RPCTarget | None = None,
                   seed: int = 0) -> int:
    """meta_schedule over the dense TIR tasks of a prepared module; records go to (and are
    reused from) the JSON database in `work_dir`.  Returns the number of tasks tuned."""
    if trials <= 0:  # extracting the tasks runs passes over the whole module: skip it
        return 0
    tasks = tunable_tasks(prepared, target)
    if not tasks:
        return 0
    light_tensor_intrin()
    _drop_unnamed_log_handlers()
    # tiny budgets: random traces, no cost model (seeding the evolutionary population costs
    # ~half a minute per task on 2 cores); real budgets: evolutionary search + XGBoost
    per_task = trials / len(tasks)
    small = per_task < 2
    strategy = ("replay-trace" if small else ms.search_strategy.EvolutionarySearch(
        population_size=128 if per_task < 32 else 512))
    contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
        tasks, work_dir, strategy=strategy, seed=seed)
    ms.tune_tasks(
        tasks=contexts, task_weights=weights, work_dir=work_dir, max_trials_global=trials,
        # small rounds so that every task gets measured before the budget runs out
        num_trials_per_iter=int(min(64, max(4, per_task // 2), trials)),
        builder=make_builder(), runner=make_runner(rpc), database=database(work_dir),
        cost_model="random" if small else "xgb",
    )
    return len(tasks)


def apply_tuning(prepared: tvm.IRModule, target, work_dir: str) -> tuple[tvm.IRModule, list[str]]:
    """The schedules of work_dir's database applied to a prepared module, and the names of the
    TIR functions that found none (they keep TVM's default, unscheduled code)."""
    with target, database(work_dir), tvm.transform.PassContext(opt_level=3):
        mod = relax.transform.MetaScheduleApplyDatabase()(prepared)
    untuned = sorted(gv.name_hint for gv, func in mod.functions.items()
                     if isinstance(func, tvm.tirx.PrimFunc)
                     and not func.attrs.get("tirx.is_scheduled", False))
    return mod, untuned


def build(mod: tvm.IRModule, target):
    """Lower and build a prepared, scheduled module.  Not meta_schedule's compile_relax: that
    legalizes and fuses again, which changed the fused functions that carry constants (a conv
    with its bias, a classifier) so that their tuning records no longer matched and they ran
    unscheduled (a MobileNetV2 stem 2.5x and its classifier 6x slower than tuned)."""
    t = relax.transform
    # what compile_relax runs after its fusion for a CPU target (the generic CPU backend has no
    # dataflow_lower_passes / finalize_passes of its own in 0.27)
    lower = tvm.transform.Sequential([
        t.RewriteDataflowReshape(), t.ToNonDataflow(), t.RemovePurityChecking(),
        t.CallTIRRewrite(), t.StaticPlanBlockMemory(), t.LowerAllocTensor(),
        t.KillAfterLastUse(), t.LowerRuntimeBuiltin(), t.ComputePrimValue(), t.VMShapeLower(),
        t.AttachGlobalSymbol(),
    ])
    with contextlib.redirect_stdout(None), target, tvm.transform.PassContext(opt_level=3):
        return relax.build(mod, target=target, relax_pipeline=lower)


def compile_module(prepared, target, work_dir: str):
    """Build with the tuned schedules of `work_dir` applied (untuned tasks get the default)."""
    return build(apply_tuning(prepared, target, work_dir)[0], target)


# ---------------------------------------------------------------------------- timing

@contextlib.contextmanager
def quiet_native_stderr():
    """Silence TVM's C++ log lines (one 'Scope Saving' warning per kernel on export)."""
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def export_atomically(executable, path: str) -> str:
    from onnxprune.graph import atomic_path

    with atomic_path(path) as tmp, \
            quiet_native_stderr():
        executable.export_library(tmp)
    return path


class Session:
    """Where modules run: this process, or a remote device through the tracker."""

    def __init__(self, rpc: RPCTarget | None = None):
        self.rpc = rpc
        self.remote = rpc.session() if rpc else None
        self.device = self.remote.cpu() if self.remote else tvm.cpu()
        self._tmp = tempfile.TemporaryDirectory()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """Hand the device back to the tracker: meta_schedule's runner queues for it too."""
        import gc

        self.remote = None
        self.device = None
        gc.collect()
        self._tmp.cleanup()

    def load(self, executable, name: str):
        """A callable handle on `executable` (a relax Executable or a TIR module) here."""
        if self.remote is None:
            return executable
        path = os.path.join(self._tmp.name, name + ".so")
        with quiet_native_stderr():
            executable.export_library(path)
        self.remote.upload(path)
        return self.remote.load_module(name + ".so")

    def tensor(self, array: np.ndarray):
        return tvm.runtime.tensor(array, self.device)

    def vm(self, executable, name: str):
        return relax.VirtualMachine(self.load(executable, name), self.device)


def time_function(module, func_name: str, args, device, number: int, repeat: int = 1,
                  cache_flush_bytes: int = 0):
    """Per-call seconds, each entry an average over `number` calls (the device's caches
    flushed of `cache_flush_bytes` before each entry when it is not 0)."""
    evaluator = module.time_evaluator(func_name, device, number=number, repeat=repeat,
                                      cache_flush_bytes=cache_flush_bytes)
    return list(evaluator(*args).results)


# ---------------------------------------------------------------------------- BSR tiles

# Tiles are timed one call at a time after flushing this much from the caches: in the model a
# kernel's weights and indices arrive cold (the layers before it evicted them), and hot-cache
# timing picked tiles that lose there (28 of MobileNetV2's 34 tiles changed, 2.2 % faster at
# 2 threads). Part of the cache key, so tiles measured the old way are measured again.
TILE_TIMING = dict(number=1, repeat=15, cache_flush_bytes=4 << 20)


def _layer_key(layer: SparseConvLayer, target) -> str:
    h = hashlib.sha1()
    h.update(repr((layer.spec, str(target), TILE_TIMING)).encode())
    h.update(layer.arrays.indptr.tobytes())
    h.update(layer.arrays.indices.tobytes())
    if layer.pooled is not None:
        h.update(b"mean")
    if layer.depthwise is not None:  # measured as the fused kernel: its planes count too
        h.update(b"grid")  # since its sparse conv writes the depthwise grids in place
        h.update(repr(layer.depthwise.spec).encode())
        h.update(layer.depthwise.mode.tobytes())
    return h.hexdigest()


def _load_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _save_json(path: str, data: dict) -> None:
    from onnxprune.graph import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)


def measure_tile(layer: SparseConvLayer, tile: kernels.BSRTile, target, session: Session) -> float:
    """Median seconds of the layer's kernel (a fused expand + depthwise one included) with
    `tile`, on its real index arrays, from cold caches (TILE_TIMING)."""
    # a unique name per upload: a remote dlopen of a reused path returns the stale library
    lib = session.load(tvm.compile(layer.prim_func(tile), target=target),
                       f"{layer.kernel_name}_{tile.label.replace('/', '_')}_{os.getpid()}")
    rng = np.random.default_rng(0)
    spec = layer.spec
    residual = [np.zeros(spec.out_shape, np.float32)] if spec.epilogue.residual else []
    args = [session.tensor(v) for v in (
        rng.standard_normal(spec.matmul_input_shape).astype(np.float32), *layer.constant_args(),
        *residual, np.zeros(layer.out_shape, np.float32))]
    module = lib if session.remote else lib.jit()
    return float(np.median(time_function(module, layer.kernel_name, args, session.device, **TILE_TIMING)))


def tune_tiles(layers: list[SparseConvLayer], target, work_dir: str, session: Session,
               log=lambda msg: None) -> dict[str, kernels.BSRTile]:
    """Measure every candidate pixel tile of every layer, keep the fastest; cached per
    (shape, sparsity pattern, target) in work_dir/bsr_tiles.json."""
    os.makedirs(work_dir, exist_ok=True)
    cache_path = os.path.join(work_dir, "bsr_tiles.json")
    cache = _load_json(cache_path)
    chosen = {}
    for i, layer in enumerate(layers):
        key = _layer_key(layer, target)
        entry = cache.get(key)
        if not (isinstance(entry, list) and len(entry) == 3):  # absent, or an older format
            rows_outer = layer.depthwise is not None or layer.pooled is not None
            times = {c: measure_tile(layer, c, target, session)
                     for c in kernels.tile_candidates(layer.spec, fused=rows_outer)}
            best = min(times, key=times.get)
            cache[key] = [best.pixels, best.rows_inner, best.packed]
            log(f"  {layer.kernel_name} {layer.spec.c_out}x{layer.spec.num_cols} "
                f"sparsity {layer.weight.sparsity:.2f}: "
                + ", ".join(f"{c.label} {t * 1e3:.3f}ms" for c, t in times.items()))
            _save_json(cache_path, cache)
        pixels, rows_inner, packed = cache[key]
        chosen[layer.kernel_name] = kernels.BSRTile(int(pixels), bool(rows_inner), bool(packed))
    return chosen
