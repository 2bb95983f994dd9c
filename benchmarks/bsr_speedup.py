"""BSR conv speedups, measured (never asserted).

(a) kernels: pointwise and 3x3 conv shapes of MobileNetV2 and ResNet-50 (224x224 input), 1xN
    random block sparsity s in {0.5, 0.7, 0.8, 0.9}, N in {1, 2, 4, 8, 16}: our BSR kernel (tile
    searched) vs the same dense conv tuned by meta_schedule in TVM and vs onnxruntime's conv,
    against the ideal 1/(1-s).
(c) depthwise: MobileNetV2's depthwise 3x3 convs (+ bias + ReLU6): our depthwise kernel vs
    onnxruntime's (which fuses the Clip too).
(b) e2e: MobileNetV2 from models/ (width 1.0, 224x224), 1x4 pruning at 0.5/0.7/0.9, through
    model_tune: sparse TVM vs dense TVM vs onnxruntime.

    python benchmarks/bsr_speedup.py kernels --dense-trials 48
    python benchmarks/bsr_speedup.py depthwise
    python benchmarks/bsr_speedup.py profile --sparsity 0.7    # after e2e: time per kernel
    BENCH_THREADS=2 python benchmarks/bsr_speedup.py scaling --sparsity 0.9  # per kernel: 1 vs 2 threads
    python benchmarks/bsr_speedup.py e2e --trials 300
    python benchmarks/bsr_speedup.py balanced                  # row-balanced 1x4: static vs indptr loop
    python benchmarks/bsr_speedup.py ab before.so after.so [W/mobilenet_v2.onnx]  # side by side
    BENCH_THREADS=2 python benchmarks/bsr_speedup.py ab --isolated W/mobilenet_v2.onnx a.so  # a process each
    python benchmarks/bsr_speedup.py plot

Results (JSON, tables, PNG) go to benchmarks/results/.  Timings: medians of rounds, interleaved in one
process (at 2+ threads e2e and `ab --isolated` take a fresh process per engine and round),
threads = physical cores for TVM and onnxruntime alike.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SPARSITIES = (0.5, 0.7, 0.8, 0.9)
BLOCK_ROWS = (1, 2, 4, 8, 16)
# name: (c_in, hw, c_out, k, stride)
SHAPES = {
    "mbv2 pw 24->144 @56": (24, 56, 144, 1, 1),
    "mbv2 pw 144->24 @56": (144, 56, 24, 1, 1),
    "mbv2 pw 96->576 @14": (96, 14, 576, 1, 1),
    "mbv2 pw 960->320 @7": (960, 7, 320, 1, 1),
    "r50 pw 64->256 @56": (64, 56, 256, 1, 1),
    "r50 pw 1024->256 @14": (1024, 14, 256, 1, 1),
    "r50 3x3 64->64 @56": (64, 56, 64, 3, 1),
    "r50 3x3 256->256 @14": (256, 14, 256, 3, 1),
}


def threads() -> int:
    """BENCH_THREADS, else the physical cores.  On a shared machine use 1: a TVM thread pool
    whose workers get descheduled by other processes collapses (10x swings measured)."""
    import psutil

    return int(os.environ.get("BENCH_THREADS", 0)) or psutil.cpu_count(logical=False) or 1


def target_dict() -> dict:
    """This CPU, as model_tune detects it."""
    from onnxprune.tvm_kernels.api import parse_target

    return parse_target(None)


def conv_spec(shape, bsr=4):
    from onnxprune.tvm_kernels.kernels import ConvSpec

    c_in, hw, c_out, k, stride = shape
    pad = (k // 2,) * 4
    return ConvSpec(1, c_in, hw, hw, c_out, (k, k), (stride, stride), pad, (1, 1), bsr, 1)


def dense_conv_module(spec):
    import tvm
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, spec.c_in, spec.height, spec.width), "float32"))
    w = relax.Var("w", relax.TensorType((spec.c_out, spec.c_in) + spec.kernel, "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.nn.conv2d(x, w, strides=spec.stride,
                                                  padding=spec.padding))
        bb.emit_func_output(y)
    return bb.get()


def onnx_conv(w: np.ndarray, spec):
    from onnx import TensorProto, helper, numpy_helper

    node = helper.make_node("Conv", ["x", "w"], ["y"], strides=list(spec.stride),
                            pads=list(spec.padding))
    graph = helper.make_graph(
        [node], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, spec.c_in, spec.height, spec.width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(spec.out_shape))],
        [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def tune_dense_convs(trials_per_shape: int, work_dir: str) -> None:
    """Child process: meta_schedule every dense conv shape, export one library per shape."""
    import tvm
    from onnxprune.tvm_kernels import tune

    target = tvm.target.Target(target_dict())
    prepared = {name: tune.prepare(dense_conv_module(conv_spec(s)), target)
                for name, s in SHAPES.items()}
    tasks = []
    for name, mod in prepared.items():
        tasks += tune.tunable_tasks(mod, target)
    from tvm.s_tir import meta_schedule as ms

    tune.light_tensor_intrin()
    contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
        tasks, work_dir, strategy=ms.search_strategy.EvolutionarySearch(population_size=256),
        seed=0)
    t0 = time.time()
    ms.tune_tasks(tasks=contexts, task_weights=weights, work_dir=work_dir,
                  max_trials_global=trials_per_shape * len(tasks), num_trials_per_iter=16,
                  builder=tune.make_builder(), runner=tune.make_runner(None),
                  database=tune.database(work_dir))
    print(f"dense tuning: {len(tasks)} tasks, {time.time() - t0:.0f}s", file=sys.stderr)
    for i, (name, mod) in enumerate(prepared.items()):
        tune.compile_module(mod, target, work_dir).export_library(
            os.path.join(work_dir, f"dense_{i}.so"))


def time_engines(engines: dict, rounds: int) -> dict[str, float]:
    from onnxprune.tvm_kernels.timing import time_interleaved

    per_round = time_interleaved(engines, rounds, budget_s=0.03)
    return {name: float(np.median(t)) * 1e3 for name, t in per_round.items()}


def run_kernels(args) -> None:
    """Parent: dense tuning in a child process (keeps this one clean for timing), then time."""
    from onnxprune.tvm_kernels.timing import ort_session

    work_dir = os.path.join(RESULTS, "kernels_work")
    os.makedirs(work_dir, exist_ok=True)
    if not all(os.path.exists(os.path.join(work_dir, f"dense_{i}.so")) for i in range(len(SHAPES))):
        subprocess.run([sys.executable, __file__, "_tune-dense", "--dense-trials",
                        str(args.dense_trials), "--work-dir", work_dir], check=True)
    os.environ["TVM_NUM_THREADS"] = str(threads())
    import tvm
    from tvm import relax

    from onnxprune.pruning import block_prune_weights
    from onnxprune.tvm_kernels import convert, kernels, tune

    target = tvm.target.Target(target_dict())
    results_path = os.path.join(RESULTS, "kernels.json")
    rows = []
    if os.path.exists(results_path):  # resume: keep what an interrupted run measured
        with open(results_path) as f:
            rows = json.load(f)
    done = {(r["shape"], r["n"], r["sparsity"]) for r in rows}
    rng = np.random.default_rng(0)
    for i, (name, shape) in enumerate(SHAPES.items()):
        dense_spec = conv_spec(shape)
        x = rng.standard_normal((1, dense_spec.c_in, dense_spec.height, dense_spec.width)
                                ).astype(np.float32)
        w_full = rng.standard_normal((dense_spec.c_out, dense_spec.c_in) + dense_spec.kernel
                                     ).astype(np.float32)
        dense_vm = relax.VirtualMachine(
            tvm.runtime.load_module(os.path.join(work_dir, f"dense_{i}.so")), tvm.cpu())
        xt, wt = tvm.runtime.tensor(x), tvm.runtime.tensor(w_full)
        session = ort_session(onnx_conv(w_full, dense_spec), threads())
        for n in BLOCK_ROWS:
            for s in SPARSITIES:
                if dense_spec.c_out % n or (name, n, s) in done:  # 1xN never splits a channel
                    continue
                spec = conv_spec(shape, bsr=n)
                mask = block_prune_weights(w_full, n, s, criterion="random", rng=rng)
                w = np.where(mask, w_full, 0).astype(np.float32)
                mod, layer = convert.single_conv_module(spec, w)
                with tune.Session() as sess:
                    tiles = tune.tune_tiles([layer], target, work_dir, sess)
                mod = convert.retile(mod, convert.ConversionReport([layer]), tiles)
                sparse_vm = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
                got = sparse_vm["main"](xt).numpy()
                ref = kernels.reference_conv2d(x, w, spec)
                err = float(np.abs(got - ref).max())
                ms_ = time_engines({
                    "bsr": lambda k: float(sparse_vm.time_evaluator("main", tvm.cpu(), number=k)(xt).mean),
                    "tvm_dense": lambda k: float(dense_vm.time_evaluator("main", tvm.cpu(), number=k)(xt, wt).mean),
                    "ort_dense": lambda k: _ort_time(session, x, k),
                }, args.rounds)
                row = dict(shape=name, n=n, sparsity=s, tile=tiles[layer.kernel_name].label,
                           max_abs_err=err, **{f"{k}_ms": v for k, v in ms_.items()})
                rows.append(row)
                print(f"{name:<22} N={n:<2} s={s:.1f} bsr {ms_['bsr']:.3f} ms  tvm dense "
                      f"{ms_['tvm_dense']:.3f}  ort {ms_['ort_dense']:.3f}  "
                      f"x{ms_['ort_dense'] / ms_['bsr']:.2f} vs ort (ideal {1 / (1 - s):.1f})",
                      flush=True)
                _save(results_path, rows)
    write_kernel_table(rows)


# channels, input size, stride of MobileNetV2's depthwise convs (224x224 input)
DEPTHWISE_SHAPES = ((32, 112, 1), (96, 112, 2), (144, 56, 1), (144, 56, 2), (192, 28, 1),
                    (192, 28, 2), (384, 14, 1), (576, 14, 1), (576, 14, 2), (960, 7, 1))


def run_depthwise(args) -> None:
    import math

    from onnx import TensorProto, helper, numpy_helper

    os.environ["TVM_NUM_THREADS"] = str(threads())
    import tvm

    from onnxprune.tvm_kernels import convert, kernels
    from onnxprune.tvm_kernels.timing import ort_session

    target = tvm.target.Target({**target_dict(), "num-cores": threads()})
    rng = np.random.default_rng(0)
    lines = [f"{threads()} thread(s); conv 3x3 pad 1 + bias + ReLU6, both engines",
             "| channels | input | stride | ours ms | ORT ms | ORT / ours |", "|---|---|---|---|---|---|"]
    total = {"ours": 0.0, "ort": 0.0}
    for c, hw, stride in DEPTHWISE_SHAPES:
        spec = kernels.ConvSpec(1, c, hw, hw, c, (3, 3), (stride, stride), (1, 1, 1, 1),
                                epilogue=kernels.Epilogue(0.0, 6.0))
        w = rng.standard_normal((c, 1, 3, 3)).astype(np.float32)
        b = rng.standard_normal(c).astype(np.float32)
        x = rng.standard_normal((1, c, hw, hw)).astype(np.float32)
        mod, _ = convert.single_conv_module(spec, w, b)
        vm = tvm.relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
        xt = tvm.runtime.tensor(x)
        nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], group=c, pads=[1] * 4,
                                  strides=[stride] * 2),
                 helper.make_node("Clip", ["c", "lo", "hi"], ["y"])]
        graph = helper.make_graph(
            nodes, "dw", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(spec.out_shape))],
            [numpy_helper.from_array(v, k) for k, v in
             (("w", w), ("b", b), ("lo", np.float32(0)), ("hi", np.float32(6)))])
        session = ort_session(helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), threads())
        ref = session.run(None, {"x": x})[0]
        assert math.isclose(float(np.abs(vm["main"](xt).numpy() - ref).max()), 0, abs_tol=1e-4)
        ms_ = time_engines({
            "ours": lambda k: float(vm.time_evaluator("main", tvm.cpu(), number=k)(xt).mean),
            "ort": lambda k: _ort_time(session, x, k),
        }, args.rounds)
        for k in total:
            total[k] += ms_[k]
        lines.append(f"| {c} | {hw}x{hw} | {stride} | {ms_['ours']:.3f} | {ms_['ort']:.3f} | "
                     f"{ms_['ort'] / ms_['ours']:.2f}x |")
        print(lines[-1], flush=True)
    lines.append(f"| all | | | {total['ours']:.3f} | {total['ort']:.3f} | "
                 f"{total['ort'] / total['ours']:.2f}x |")
    text = "\n".join(lines)
    with open(os.path.join(RESULTS, "depthwise.md"), "w") as f:
        f.write(text + "\n")
    print(text)


def _ort_time(session, x, k):
    t0 = time.perf_counter()
    for _ in range(k):
        session.run(None, {"x": x})
    return (time.perf_counter() - t0) / k


def _save(path, data):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def write_kernel_table(rows) -> str:
    lines = [f"{threads()} thread(s), BSR tile searched, TVM dense conv tuned by meta_schedule",
             "| shape | N | s | BSR ms | TVM dense ms | ORT dense ms | vs TVM dense | vs ORT | ideal |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['n']} | {r['sparsity']} | {r['bsr_ms']:.3f} | "
            f"{r['tvm_dense_ms']:.3f} | {r['ort_dense_ms']:.3f} | "
            f"{r['tvm_dense_ms'] / r['bsr_ms']:.2f}x | {r['ort_dense_ms'] / r['bsr_ms']:.2f}x | "
            f"{1 / (1 - r['sparsity']):.1f}x |")
    text = "\n".join(lines)
    with open(os.path.join(RESULTS, "kernels.md"), "w") as f:
        f.write(text + "\n")
    return text


def run_e2e(args) -> None:
    import torch

    import onnxprune.models as models
    from onnxprune.tvm_kernels import model_tune

    from onnxprune.models.mobilenet import V2_REAL_REPEATS, MobileNetV2

    work_dir = args.work_dir or os.path.join(RESULTS, "e2e_work")
    os.makedirs(work_dir, exist_ok=True)
    shape = (1, 3, args.resolution, args.resolution)
    onnx_path = os.path.join(work_dir, "mobilenet_v2.onnx")
    # the paper's network: real depth, 1000 classes (the zoo's test version is shallower)
    torch.manual_seed(0)
    model = MobileNetV2(args.width, 1000, V2_REAL_REPEATS).eval()
    torch.onnx.export(model, (torch.randn(shape),), onnx_path, dynamo=False, opset_version=17)
    suffix = f"_{threads()}t" + ("_balanced" if args.balanced else "")
    results_path = os.path.join(RESULTS, f"e2e{suffix}.json")
    rows = []
    if os.path.exists(results_path):  # keep the rows this run does not re-measure
        with open(results_path) as f:
            rows = [r for r in json.load(f) if r["sparsity"] not in args.sparsities]
    for i, s in enumerate(args.sparsities):
        # the dense remainder (stem, pooling, classifier) is the same at every sparsity: tune it
        # once, the later runs reuse the database of work_dir
        result = model_tune(onnx_path, 4, 1, s, prune=True, balanced=args.balanced,
                            trials=args.trials if i == 0 else 0,
                            target={**target_dict(), "num-cores": threads()}, work_dir=work_dir,
                            output=os.path.join(work_dir, f"mbv2_1x4_{s}.so"), rounds=args.rounds,
                            dense_baseline=not args.no_dense_baseline)
        print(result.table, flush=True)
        t = result.timings
        rows.append(dict(sparsity=s, converted=len(result.converted),
                         depthwise=len(result.depthwise), threads=threads(), balanced=args.balanced,
                         unread_planes=result.planes["unread"], constant_planes=result.planes["constant"],
                         sparse_tvm_ms=t["sparse TVM"].median_ms,
                         dense_tvm_ms=t["dense TVM"].median_ms if "dense TVM" in t else None,
                         ort_ms=t["onnxruntime"].median_ms, max_abs_err=result.parity_max_abs_err,
                         stolen=result.stolen, fork_join_us=result.fork_join_us))
        rows.sort(key=lambda r: r["sparsity"])
        _save(results_path, rows)
    with open(os.path.join(work_dir, "database_tuning_record.json")) as f:
        records = sum(1 for _ in f)
    lines = [f"MobileNetV2 (real depth, 1000 classes) width {args.width}, {shape}, 1x4"
             + (" row-balanced" if args.balanced else "") + ", "
             f"{threads()} threads; meta_schedule: {records} measured records in the work dir's "
             "database, shared by the dense remainder of every row and the dense-TVM baseline",
             "| sparsity | convs in BSR / depthwise kernel | planes unread / constant | sparse TVM ms "
             "| dense TVM ms | ORT ms | vs ORT | vs dense TVM | CPU stolen | cores apart |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        dense = r.get("dense_tvm_ms")
        lines.append(f"| {r['sparsity']} | {r['converted']} / {r['depthwise']} | "
                     f"{r.get('unread_planes', '-')} / {r.get('constant_planes', '-')} | "
                     f"{r['sparse_tvm_ms']:.3f} | "
                     + (f"{dense:.3f}" if dense else "-") + f" | {r['ort_ms']:.3f} | "
                     f"{r['ort_ms'] / r['sparse_tvm_ms']:.2f}x | "
                     + (f"{dense / r['sparse_tvm_ms']:.2f}x" if dense else "-") + " | "
                     + (f"{100 * r['stolen']:.1f} %" if r.get("stolen") is not None else "-") + " | "
                     + _apart_cell(r.get("fork_join_us")) + " |")
    with open(os.path.join(RESULTS, f"e2e{suffix}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def _apart_cell(readings) -> str:
    """'k / n' timing processes whose fork-join reading said the two cores shared no cache
    (timing.fork_join_us; '-' on one thread)."""
    from onnxprune.tvm_kernels.timing import apart_readings

    return f"{apart_readings(readings)} / {len(readings)}" if readings else "-"


BALANCED_SHAPES = ((24, 56, 144), (144, 56, 24), (96, 14, 576), (576, 14, 96), (960, 7, 320),
                   (320, 7, 1280))  # (c_in, hw, c_out) of MobileNetV2's 1x1 convs


def run_balanced(args) -> None:
    """1x4 at 0.7 / 0.9 on MobileNetV2's 1x1 shapes: layer-wide ranking (indptr loop) vs row-balanced
    weights with the indptr loop vs the same weights with the static loop; each variant with its
    best pixel tile, then timed interleaved."""
    os.environ["TVM_NUM_THREADS"] = str(threads())
    import tvm

    from onnxprune.pruning import block_prune_weights
    from onnxprune.tvm_kernels import kernels
    from onnxprune.tvm_kernels.bsr import conv_weight_as_matrix, dense_to_bsr

    target = tvm.target.Target({**target_dict(), "num-cores": threads()})
    rng = np.random.default_rng(0)
    lines = [f"{threads()} thread(s); ms, best tile each", "| s | conv | layer-wide | balanced, indptr loop "
             "| balanced, static loop | static / layer-wide |", "|---|---|---|---|---|---|"]
    for s in (0.7, 0.9):
        for c_in, hw, c_out in BALANCED_SHAPES:
            spec = kernels.ConvSpec(1, c_in, hw, hw, c_out, (1, 1))
            w = rng.standard_normal((c_out, c_in, 1, 1)).astype(np.float32)
            x = tvm.runtime.tensor(rng.standard_normal((1, c_in, hw, hw)).astype(np.float32))
            engines = {}
            for label, balanced, static in (("global", False, False), ("dyn", True, False),
                                            ("static", True, True)):
                m = np.where(block_prune_weights(w, 4, s, balanced=balanced), w, 0)
                a = kernels.kernel_arrays(dense_to_bsr(conv_weight_as_matrix(m), 4, 1), None)
                call = [x] + [tvm.runtime.tensor(v) for v in (a.indptr, a.indices, a.data, a.bias,
                                                              np.zeros(spec.out_shape, np.float32))]
                best = None
                for tile in kernels.tile_candidates(spec):
                    func = kernels.bsr_matmul_prim_func(spec, a.nnzb, tile, "k",
                                                        a.row_blocks if static else None)
                    lib = tvm.compile(func, target=target).jit()
                    t = lib.time_evaluator("k", tvm.cpu(), number=20, repeat=3)(*call).median
                    best = min(best or (t, lib), (t, lib), key=lambda b: b[0])
                engines[label] = (lambda lib, call: lambda k: float(
                    lib.time_evaluator("k", tvm.cpu(), number=k)(*call).mean))(best[1], call)
            ms_ = time_engines(engines, args.rounds)
            lines.append(f"| {s} | {c_in}->{c_out} @{hw} | {ms_['global']:.3f} | {ms_['dyn']:.3f} | "
                         f"{ms_['static']:.3f} | {ms_['global'] / ms_['static']:.2f}x |")
            print(lines[-1], flush=True)
    with open(os.path.join(RESULTS, "balanced.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def profile(args) -> None:
    """Where the time of e2e's sparse MobileNetV2 goes, kernel by kernel, inside whole-model
    runs of its exported library (the Relax VM's instrument hook; 0.27 has no profiler)."""
    import collections

    os.environ["TVM_NUM_THREADS"] = str(threads())
    import tvm
    from tvm import relax

    work_dir = args.work_dir or os.path.join(RESULTS, "e2e_work")
    vm = relax.VirtualMachine(tvm.runtime.load_module(
        os.path.join(work_dir, f"mbv2_1x4_{args.sparsity}.so")), tvm.cpu())
    x = tvm.runtime.tensor(np.random.default_rng(0).standard_normal(
        (1, 3, args.resolution, args.resolution)).astype(np.float32))
    for _ in range(5):
        vm["main"](x)
    spent, started = collections.defaultdict(float), {}

    def instrument(_func, name, before, _ret, *_args):
        now = time.perf_counter()
        if before:
            started[name] = now
        else:
            spent[name] += now - started[name]

    vm.set_instrument(instrument)
    runs, blocks = 30, 5  # medians over blocks: one block can catch the shared host's noise
    per_block, totals = [], []
    for _ in range(blocks):
        spent.clear()
        t0 = time.perf_counter()
        for _ in range(runs):
            vm["main"](x)
        totals.append((time.perf_counter() - t0) / runs * 1e3)
        per_block.append({name: seconds / runs * 1e3 for name, seconds in spent.items()})

    def kind_of(name):
        return next((k for k in ("expand_depthwise", "bsr_matmul", "im2col", "depthwise", "direct", "gemv")
                     if name.startswith(k)), "tvm" if name.startswith("fused") or
                    name in ("mean", "reshape") else "vm builtins")

    per_kind = collections.defaultdict(list)
    for block in per_block:
        kinds = collections.Counter()
        for name, ms in block.items():
            kinds[kind_of(name)] += ms
        for kind, ms in kinds.items():
            per_kind[kind].append(ms)
    median = {name: float(np.median([b.get(name, 0.0) for b in per_block])) for name in per_block[0]}
    for name, ms in sorted(median.items(), key=lambda kv: -kv[1])[:15]:
        print(f"{ms:8.3f} ms  {name}")
    kinds = {k: float(np.median(v)) for k, v in per_kind.items()}
    print(f"per run {float(np.median(totals)):.3f} ms (instrumented, median of {blocks} x {runs} runs); "
          "by kind (ms): " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])))


def _kernel_times(library: str, resolution: int, runs: int = 100) -> dict[str, float]:
    """Microseconds per call of each kernel of `library`, each timed alone in a loop on the
    arguments one whole-model run gave it (captured by the VM's instrument hook; no Python
    callback between the timed calls, unlike `profile`).  TVM_NUM_THREADS is the caller's."""
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.runtime.load_module(library), tvm.cpu())
    x = tvm.runtime.tensor(np.random.default_rng(0).standard_normal(
        (1, 3, resolution, resolution)).astype(np.float32))
    calls = []
    vm.set_instrument(lambda func, name, before, _ret, *a: calls.append((name, func, a)) if before else None)
    vm["main"](x)
    times = {}
    for i, (name, func, call_args) in enumerate(calls):
        if name.startswith("vm."):
            continue
        for _ in range(10):
            func(*call_args)
        blocks = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(runs):
                func(*call_args)
            blocks.append((time.perf_counter() - t0) / runs * 1e6)
        times[f"{i:03d} {name}"] = float(np.median(blocks))
    return times


def _kernel_times_child(args) -> None:
    print(json.dumps(_kernel_times(args.libs[0], args.resolution)))


def _kernel_times_in(library: str, n_threads: int, args, neighbour: bool = False) -> dict[str, float]:
    """_kernel_times in a fresh process on `n_threads` threads; with `neighbour`, while a
    second such process (1 thread) times the same kernels on the other core."""
    env = dict(os.environ, TVM_NUM_THREADS=str(n_threads))
    cmd = [sys.executable, __file__, "_kernel-times", library, "--resolution", str(args.resolution)]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for _ in range(2 if neighbour else 1)]
    outs = [proc.communicate()[0] for proc in procs]
    return json.loads(outs[0])


def scaling(args) -> None:
    """How each kernel of e2e's library scales from 1 to threads() threads, and how much a
    1-thread kernel slows down when the same kernel runs on the other core at the same time
    (the contention for the memory hierarchy that a second thread brings, measured apart from
    any parallel overhead).  The three modes take turns, `--rounds` times; medians."""
    import collections

    from tqdm import tqdm

    work_dir = args.work_dir or os.path.join(RESULTS, "e2e_work")
    library = os.path.join(work_dir, f"mbv2_1x4_{args.sparsity}.so")
    n = threads()
    modes = {"1t": (1, False), f"{n}t": (n, False), "1t+neighbour": (1, True)}
    runs = {mode: [] for mode in modes}
    for _ in tqdm(range(args.rounds), desc="rounds"):
        for mode, (t, neighbour) in modes.items():
            runs[mode].append(_kernel_times_in(library, t, args, neighbour))
    med = {mode: {k: float(np.median([r[k] for r in rs])) for k in rs[0]} for mode, rs in runs.items()}
    one, many, crowded = med["1t"], med[f"{n}t"], med["1t+neighbour"]
    kinds = collections.defaultdict(lambda: np.zeros(3))
    print(f"| kernel | 1 thread us | {n} threads us | scaling | 1 thread, neighbour busy us | slowdown |")
    print("|---|---|---|---|---|---|")
    for k in one:
        kinds[k.split()[1].rstrip("_0123456789")] += (one[k], many[k], crowded[k])
        print(f"| {k} | {one[k]:.1f} | {many[k]:.1f} | {one[k] / many[k]:.2f}x | {crowded[k]:.1f} "
              f"| {crowded[k] / one[k]:.2f}x |")
    print(f"\n| kind | 1 thread us | {n} threads us | scaling | 1 thread, neighbour busy us | slowdown |")
    print("|---|---|---|---|---|---|")
    for kind, (a, b, c) in sorted(kinds.items(), key=lambda kv: -kv[1][0]):
        print(f"| {kind} | {a:.0f} | {b:.0f} | {a / b:.2f}x | {c:.0f} | {c / a:.2f}x |")
    a, b, c = (sum(m.values()) for m in (one, many, crowded))
    print(f"| all | {a:.0f} | {b:.0f} | {a / b:.2f}x | {c:.0f} | {c / a:.2f}x |")
    out = os.path.join(RESULTS, f"scaling_{args.sparsity}_{n}t.json")
    with open(out + ".tmp", "w") as f:
        json.dump(med, f, indent=1)
    os.replace(out + ".tmp", out)
    print(out)


def _engine(path: str, x_np: np.ndarray):
    """(run(k) -> seconds per call, output): a library on the Relax VM, an .onnx on onnxruntime."""
    os.environ["TVM_NUM_THREADS"] = str(threads())
    if path.endswith(".onnx"):
        from onnxprune.tvm_kernels.timing import ort_session

        session = ort_session(path, threads())
        feeds = {session.get_inputs()[0].name: x_np}
        return (lambda k: _per_call(lambda: session.run(None, feeds), k)), None
    import tvm
    from tvm import relax

    vm, x = relax.VirtualMachine(tvm.runtime.load_module(path), tvm.cpu()), tvm.runtime.tensor(x_np)
    return (lambda k: float(vm.time_evaluator("main", tvm.cpu(), number=k)(x).mean)), vm["main"](x).numpy()


def _ab_input(args) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((1, 3, args.resolution, args.resolution)).astype(np.float32)


def ab(args) -> None:
    """Exported model libraries (e2e's .so files, say before and after a kernel change) timed
    side by side, same input, round by round: on a shared host the runs of one library ten
    minutes apart differed by 1.4x.  An .onnx among them runs on onnxruntime (e2e's work dir
    keeps its dense mobilenet_v2.onnx).  One process interleaves them; with `--isolated`
    each engine runs in a fresh process per round instead: at 2 threads one runtime's idle
    workers, still spinning, take a core from the other (measured: onnxruntime 2.5 ms alone,
    2.5-8.8 ms timed right after a TVM library; TVM 1.0 ms alone, 1.6-2.1 ms right after
    onnxruntime)."""
    from onnxprune.tvm_kernels.timing import cpu_ticks, stolen_fraction

    before = cpu_ticks()
    if args.isolated:
        ms_, note = _ab_isolated(args), "each engine in a fresh process per round"
    else:
        x_np = _ab_input(args)
        engines, outputs = {}, {}
        for path in args.libs:
            engines[path], out = _engine(path, x_np)
            if out is not None:
                outputs[path] = out
        first_out = next(iter(outputs.values()), None)
        spread = max((float(np.max(np.abs(o - first_out))) for o in outputs.values()), default=0.0)
        ms_ = time_engines(engines, args.rounds)
        note = f"interleaved; the libraries' outputs differ from each other's by at most {spread:.2e}"
    first = ms_[args.libs[0]]
    for path in args.libs:
        print(f"{ms_[path]:8.3f} ms  {first / ms_[path]:5.2f}x vs the first  {path}")
    stolen = stolen_fraction(before, cpu_ticks())
    print(f"{threads()} thread(s), medians of {args.rounds} rounds, {note}"
          + (f"; {100 * stolen:.1f} % of CPU time stolen by the hypervisor" if stolen is not None else ""))


def _ab_isolated(args) -> dict[str, float]:
    """model_tune's timing at 2+ threads (timing.time_isolated): a fresh process per engine
    per round, the engines taking turns."""
    import tempfile

    from onnxprune.tvm_kernels.api import fork_join_line
    from onnxprune.tvm_kernels.timing import FORK_JOIN, time_isolated

    models = [p for p in args.libs if p.endswith(".onnx")]
    if len(models) > 1:
        sys.exit("ab --isolated: at most one .onnx")
    with tempfile.TemporaryDirectory() as tmp:
        inputs = os.path.join(tmp, "inputs.npz")
        name = "x"
        if models:
            import onnx

            name = onnx.load(models[0], load_external_data=False).graph.input[0].name
        np.savez(inputs, **{name: _ab_input(args)})
        spec = {"libraries": {p: p for p in args.libs if not p.endswith(".onnx")},
                "onnx_path": models[0] if models else None, "threads": threads(),
                "inputs_npz": inputs, "rounds": args.rounds, "rpc": None}
        per_round = time_isolated(spec, os.path.join(tmp, "spec.json"))
    readings = per_round.pop(FORK_JOIN, [])
    if readings:
        print(fork_join_line(readings))
        _print_by_placement(per_round, readings)
    per_round = {(models[0] if name == "onnxruntime" else name): t for name, t in per_round.items()}
    return {path: float(np.median(t)) * 1e3 for path, t in per_round.items()}


def _print_by_placement(per_round: dict[str, list[float]], readings: list[float]) -> None:
    """Each engine's median over the rounds whose timing process found the two cores sharing a
    cache, and over those that found them apart (time_isolated's readings come one per child,
    the engines taking turns in per_round's order)."""
    from onnxprune.tvm_kernels.timing import apart_flags

    flags = apart_flags(readings)
    for k, (name, times) in enumerate(per_round.items()):
        mine = flags[k::len(per_round)]
        cells = []
        for label, apart in (("cores together", False), ("apart", True)):
            sel = [t for t, a in zip(times, mine) if a == apart]
            cells.append(f"{label} {np.median(sel) * 1e3:.3f} ms ({len(sel)})" if sel else f"{label} -")
        print(f"  {', '.join(cells)}  {name}")


def _per_call(call, k: int) -> float:
    t0 = time.perf_counter()
    for _ in range(k):
        call()
    return (time.perf_counter() - t0) / k


def plot(_args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(os.path.join(RESULTS, "kernels.json")) as f:
        rows = json.load(f)
    import glob

    e2e = {}  # e2e_<threads>t[_balanced].json: one curve each
    for path in sorted(glob.glob(os.path.join(RESULTS, "e2e_*.json"))):
        with open(path) as f:
            e2e[os.path.basename(path)[4:-5]] = json.load(f)
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    panels = len(shapes) + (1 if e2e else 0)
    cols = 3
    fig, axes = plt.subplots((panels + cols - 1) // cols, cols, figsize=(5 * cols, 3.8 * ((panels + cols - 1) // cols)),
                             squeeze=False)
    ideal_s = np.linspace(0.45, 0.92, 50)
    for ax, shape in zip(axes.flat, shapes):
        for n in BLOCK_ROWS:
            pts = [(r["sparsity"], min(r["ort_dense_ms"], r["tvm_dense_ms"]) / r["bsr_ms"])
                   for r in rows if r["shape"] == shape and r["n"] == n]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"N={n}")
        ax.plot(ideal_s, 1 / (1 - ideal_s), "k--", label="ideal 1/(1-s)")
        ax.set_title(shape, fontsize=9)
        ax.set_xlabel("block sparsity")
        ax.set_ylabel("speedup vs best dense")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    if e2e:
        ax = axes.flat[len(shapes)]
        for label, runs in e2e.items():
            ax.plot([r["sparsity"] for r in runs], [r["ort_ms"] / r["sparse_tvm_ms"] for r in runs],
                    marker="o", label=f"vs ORT, {label.replace('_', ' ')}")
        ax.plot(ideal_s, 1 / (1 - ideal_s), "k--", label="ideal")
        ax.set_title("MobileNetV2 1x4 end to end", fontsize=9)
        ax.set_xlabel("sparsity")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[panels:]:
        ax.axis("off")
    fig.tight_layout()
    path = os.path.join(RESULTS, "bsr_speedup.png")
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    print(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["kernels", "depthwise", "e2e", "profile", "ab", "plot", "balanced",
                                    "scaling", "_tune-dense", "_kernel-times"])
    p.add_argument("libs", nargs="*", help="ab: exported model libraries (and .onnx models, on onnxruntime) to time side by side")
    p.add_argument("--sparsity", type=float, default=0.7, help="profile: which e2e model")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7, 0.9],
                   help="e2e: rows to (re)measure; other rows of e2e_<threads>t.json are kept")
    p.add_argument("--dense-trials", type=int, default=48, help="meta_schedule trials per dense conv")
    p.add_argument("--trials", type=int, default=300, help="e2e meta_schedule trials")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--work-dir", default=None)
    p.add_argument("--balanced", action="store_true", help="e2e: row-balanced 1x4 pruning")
    p.add_argument("--isolated", action="store_true",
                   help="ab: each engine in a fresh process per round (fair at 2+ threads: no idle "
                        "spinning workers of the other runtime)")
    p.add_argument("--no-dense-baseline", action="store_true",
                   help="e2e: skip tuning and timing the dense TVM model")
    args = p.parse_intermixed_args(argv)
    os.makedirs(RESULTS, exist_ok=True)
    if args.what == "_tune-dense":
        tune_dense_convs(args.dense_trials, args.work_dir)
    elif args.what == "kernels":
        run_kernels(args)
    elif args.what == "depthwise":
        run_depthwise(args)
    elif args.what == "profile":
        profile(args)
    elif args.what == "scaling":
        scaling(args)
    elif args.what == "_kernel-times":
        _kernel_times_child(args)
    elif args.what == "e2e":
        run_e2e(args)
    elif args.what == "balanced":
        run_balanced(args)
    elif args.what == "ab":
        if len(args.libs) < 2:
            p.error("ab needs two or more libraries")
        ab(args)
    else:
        plot(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
