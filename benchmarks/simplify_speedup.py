"""Measured, never asserted: what simplify buys on onnxruntime for every zoo model.

For each model at `--scale` (width and input size times the test size) with 50% of every layer's
filters zeroed at random: ORT latency (batch 1; 1 thread and all threads; runs of all variants
interleaved; medians) of the dense, the masked and the simplified model (--align 8, the default,
and --align 1), the MAC-ratio ideal speedup, and simplify's own wall time.

    python benchmarks/simplify_speedup.py                 # all models, markdown table on stdout
    python benchmarks/simplify_speedup.py --models resnet18 mobilenet_v2 --runs 50
    python benchmarks/simplify_speedup.py align --aligns 1 4 8 16   # what --align buys, per model

`align`: the simplified model at each --align, timed side by side (1 thread and all threads), as a
ratio to --align 1 (> 1: the spared dead channels pay for themselves), with the channels spared.

    python benchmarks/simplify_speedup.py native          # against the natively small model

`native`: the physical limit of structured pruning. The upper half of every class is zeroed (all its
producers, biases kept: `zero_upper_half`), simplified with --align 1 (the default here: no dead
channel spared, so the weights can match) and each --border-maps, and timed side by side with the same
architecture built at half width (identical Conv/Gemm weight counts, checked, border maps' one-channel
convs aside); the ratio is the native model's latency over ours (1.0: as fast as the small model),
with the border maps, Adds and weights each has and the NCHWc reorders onnxruntime inserts (a
constant operand of a binary op on a conv output leaves its NCHWc layout: where ours has more, the
layout broke).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np


from onnxprune.models import ZOO  # noqa: E402
from onnxprune.models.masks import zero_random_filters  # noqa: E402
from onnxprune.demo import export, scaled_model  # noqa: E402
from onnxprune.channels.linear import border_convs  # noqa: E402
from onnxprune.simplify import simplify  # noqa: E402
from onnxprune.timing import time_models  # noqa: E402


def measure(name: str, scale: float, sparsity: float, runs: int, threads_all: int) -> dict:
    model, x = scaled_model(name, scale, seed=0)
    dense = export(model, x)
    zero_random_filters(model, sparsity, seed=0)
    masked = export(model, x)
    t = time.perf_counter()
    small, report = simplify(masked)
    seconds = time.perf_counter() - t
    small1, report1 = simplify(masked, align=1)
    variants = {"dense": dense, "masked": masked, "simplified": small, "align1": small1}
    row = {"model": name, "input": "x".join(map(str, x.shape[1:])), "simplify_s": seconds,
           "ideal": report.before.macs / max(report.after.macs, 1),
           "ideal1": report1.before.macs / max(report1.after.macs, 1)}
    for threads in (1, threads_all):
        ms = time_models(variants, threads=threads, runs=runs)
        for k, v in ms.items():
            row[f"{k}_{threads}t"] = v
    return row


def measure_align(name: str, scale: float, sparsity: float, runs: int, aligns: list[int], threads_all: int) -> dict:
    model, x = scaled_model(name, scale, seed=0)
    zero_random_filters(model, sparsity, seed=0)
    masked = export(model, x)
    variants, spared = {}, {}
    for a in aligns:
        small, report = simplify(masked, align=a)
        variants[a] = small
        spared[a] = sum(e.what == "spare" for e in report.events)
    row = {"model": name, "spared": spared}
    for threads in (1, threads_all):
        row[threads] = time_models(variants, threads=threads, runs=runs)
    return row


def align_main(args) -> None:
    threads_all = os.cpu_count() or 1
    aligns = args.aligns
    print(f"# --align on onnxruntime: {args.sparsity:.0%} random filters zeroed, scale {args.scale}, {args.runs} "
          f"interleaved runs, medians; speed relative to --align {aligns[0]} (> 1: faster); T = {threads_all} threads\n")
    cols = " | ".join(f"align {a} 1t | {threads_all}t" for a in aligns[1:])
    print(f"| model | align {aligns[0]} ms 1t | {threads_all}t | {cols} | layers spared per align |")
    print("|---|---:|---:|" + "---:|---:|" * (len(aligns) - 1) + "---|")
    gains = {a: [] for a in aligns[1:]}
    for name in args.models:
        r = measure_align(name, args.scale, args.sparsity, args.runs, aligns, threads_all)
        base = {t: r[t][aligns[0]] for t in (1, threads_all)}
        cells = []
        for a in aligns[1:]:
            g1, gt = base[1] / r[1][a], base[threads_all] / r[threads_all][a]
            gains[a].append((g1, gt))
            cells.append(f"{g1:.2f}x | {gt:.2f}x")
        spared = " / ".join(str(r["spared"][a]) for a in aligns)
        print(f"| {name} | {base[1]:.2f} | {base[threads_all]:.2f} | {' | '.join(cells)} | {spared} |", flush=True)
    geo = " | ".join(f"{np.exp(np.mean(np.log([g[0] for g in v]))):.3f}x | {np.exp(np.mean(np.log([g[1] for g in v]))):.3f}x"
                     for v in gains.values())
    print(f"| geometric mean | | | {geo} | |")


def layer_weights(model) -> int:
    """Conv / Gemm weight elements, the border maps' one-channel convs over a ones image excluded."""
    inits = {t.name: t for t in model.graph.initializer}
    border = {n.output[0] for n in border_convs(model)}
    return sum(int(np.prod(inits[n.input[1]].dims)) for n in model.graph.node
               if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and len(n.input) > 1 and n.input[1] in inits
               and n.output[0] not in border)


def optimized_ops(model) -> dict[str, int]:
    """Op counts of the graph onnxruntime runs (ORT_ENABLE_ALL, 1 thread): the NCHWc reorders and the
    Adds / Relus left unfused show where the layout or the fusions broke."""
    import tempfile
    from collections import Counter

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads, so.log_severity_level = 1, 3
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return dict(Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node))


NATIVE_VARIANTS = ("runtime", "constant")  # --border-maps


def measure_native(name: str, scale: float, runs: int, threads_all: int, align: int) -> dict:
    from onnxprune.models import build
    from onnxprune.models.masks import zero_upper_half

    model, x = scaled_model(name, scale, seed=0)
    zero_upper_half(model)
    masked = export(model, x)
    models = {"native": export(build(name, width=ZOO[name].width * scale / 2, seed=0), x, fold=True)}
    for v in NATIVE_VARIANTS:
        models[v] = simplify(masked, align=align, border_maps=v)[0]
    row = {"model": name, "input": "x".join(map(str, x.shape[1:])),
           "weights": {k: layer_weights(m) for k, m in models.items()},
           "borders": len(border_convs(models["runtime"])),
           "adds": {k: sum(n.op_type == "Add" for n in m.graph.node) for k, m in models.items()},
           "reorders": {k: sum(v for op, v in optimized_ops(m).items() if op.startswith("Reorder")) for k, m in models.items()}}
    for threads in (1, threads_all):
        times = time_models(models, threads=threads, runs=runs, samples=True)
        row[threads] = {k: float(np.median(v)) for k, v in times.items()}
        # the median of per-run ratios: run i of every variant is timed back to back
        row[threads]["ratio"] = {v: float(np.median(np.array(times["native"]) / np.array(times[v]))) for v in NATIVE_VARIANTS}
    return row


def native_main(args) -> None:
    t_all = os.cpu_count() or 1
    print(f"# simplified vs natively small: upper half of every class zeroed, --align {args.align}, scale {args.scale}, "
          f"{args.runs} interleaved runs; ratio = median over runs of native ms / simplified ms (--border-maps "
          f"runtime, the default | constant); T = {t_all} threads\n")
    print(f"| model | input | native ms 1t | ratio 1t | ratio {t_all}t | border maps | Adds ours / native | "
          "ORT NCHWc reorders (runtime, constant / native) | weights ours / native |")
    print("|---|---|---:|---:|---:|---:|---|---|---|")
    ratios = {(t, v): [] for t in (1, t_all) for v in NATIVE_VARIANTS}
    for name in args.models:
        r = measure_native(name, args.scale, args.runs, t_all, args.align)
        w = r["weights"]
        same = all(w[v] == w["native"] for v in NATIVE_VARIANTS)
        cells = []
        for t in (1, t_all):
            pair = []
            for v in NATIVE_VARIANTS:
                ratio = r[t]["ratio"][v]
                if same:
                    ratios[(t, v)].append(ratio)
                pair.append(f"{ratio:.3f}")
            cells.append(" \\| ".join(pair))
        weights = "equal" if same else f"{w['runtime']:,} / {w['native']:,} (not compared)"
        reorders = f"{r['reorders']['runtime']}, {r['reorders']['constant']} / {r['reorders']['native']}"
        print(f"| {name} | {r['input']} | {r[1]['native']:.2f} | {cells[0]} | {cells[1]} | {r['borders']} | "
              f"{r['adds']['runtime']} / {r['adds']['native']} | {reorders} | {weights} |", flush=True)
    geo = [" \\| ".join(f"{np.exp(np.mean(np.log(ratios[(t, v)]))):.3f}" if ratios[(t, v)] else "-" for v in NATIVE_VARIANTS)
           for t in (1, t_all)]
    print(f"| geometric mean (equal weights) | | | {geo[0]} | {geo[1]} | | | | |")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["native"]:
        ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        ap.add_argument("what")
        ap.add_argument("--models", nargs="*", default=list(ZOO))
        ap.add_argument("--scale", type=float, default=4)
        ap.add_argument("--runs", type=int, default=30)
        ap.add_argument("--align", type=int, default=1)
        return native_main(ap.parse_args(argv))
    if argv[:1] == ["align"]:
        ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        ap.add_argument("what")
        ap.add_argument("--models", nargs="*", default=list(ZOO))
        ap.add_argument("--aligns", type=int, nargs="+", default=[1, 4, 8, 16])
        ap.add_argument("--scale", type=float, default=4)
        ap.add_argument("--sparsity", type=float, default=0.5)
        ap.add_argument("--runs", type=int, default=30)
        return align_main(ap.parse_args(argv))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=list(ZOO))
    ap.add_argument("--scale", type=float, default=4)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args(argv)
    threads_all = os.cpu_count() or 1
    print(f"# simplify speedup on onnxruntime: {args.sparsity:.0%} random filters zeroed, scale {args.scale}, "
          f"{args.runs} interleaved runs, medians; T = {threads_all} threads\n")
    print("| model | input | masked ms (1t) | simplified ms (1t) | speedup 1t | speedup align1 1t | speedup Tt | "
          "MAC ideal (align 8 / 1) | simplify s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        r = measure(name, args.scale, args.sparsity, args.runs, threads_all)
        t = threads_all
        print(f"| {name} | {r['input']} | {r['masked_1t']:.2f} | {r['simplified_1t']:.2f} | "
              f"{r['masked_1t'] / r['simplified_1t']:.2f}x | {r['masked_1t'] / r['align1_1t']:.2f}x | "
              f"{r[f'masked_{t}t'] / r[f'simplified_{t}t']:.2f}x | {r['ideal']:.2f}x / {r['ideal1']:.2f}x | "
              f"{r['simplify_s']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
