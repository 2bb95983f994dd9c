"""Measured, never asserted: what `onnxprune simplify` costs next to a plain load + save of the same file.

Every measurement runs in a fresh process, paired with a load + save of the same file (`onnx.load`
+ `onnx.save`, external data where the file has it); rounds interleave the two and the table gives
medians. Each child times its own work after its imports (`simplify_file`, parity check included),
and its peak RSS (VmHWM) is given above that of a child that only imports the same modules.

    python benchmarks/tool_cost.py zoo              # every zoo model at full width, 224x224 (ResNet-50, DenseNet-121 at real depth)
    python benchmarks/tool_cost.py chain            # residual chains of 100 ... 3200 blocks: log-log slope
    python benchmarks/tool_cost.py big --gb 3 10    # models over 2 GB (external data), built and deleted
    python benchmarks/tool_cost.py profile --model resnet50   # cProfile of one simplify, top functions

Models are built with 50 % of every layer's filters zeroed at random (weights only, biases kept).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

# Each child times its own work after its imports (interpreter start-up is not the tool's cost)
# and prints the seconds and its peak RSS (VmHWM: wait4's ru_maxrss would include the parent's RSS
# at fork on Linux), minus that of a child that only imports.
PEAK = """
def peak_rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
"""
LOAD_SAVE = PEAK + """
import sys, time, onnx
from pathlib import Path
import onnxruntime
src, dst = sys.argv[1], sys.argv[2]
t = time.perf_counter()
m = onnx.load(src)
if any(t.data_location == onnx.TensorProto.EXTERNAL for t in onnx.load(src, load_external_data=False).graph.initializer):
    onnx.save_model(m, dst, save_as_external_data=True, all_tensors_to_one_file=True, location=Path(dst).name + ".data")
else:
    onnx.save(m, dst)
print(time.perf_counter() - t, peak_rss())
"""
SIMPLIFY = PEAK + """
import sys, time
from onnxprune.api import simplify_file
t = time.perf_counter()
simplify_file(sys.argv[1], sys.argv[2], **eval(sys.argv[3]))
print(time.perf_counter() - t, peak_rss())
"""
IMPORTS_ONLY = PEAK + "import onnx, onnxruntime, numpy, onnxprune.api; print(0.0, peak_rss())"


def run_measured(argv: list[str]) -> tuple[float, float]:
    """(the seconds the child printed, peak RSS in bytes) of a child process."""
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} ... failed:\n{proc.stderr[-2000:]}")
    seconds, rss = proc.stdout.strip().splitlines()[-1].split()
    return float(seconds), float(rss)


def idle_rss() -> float:
    return run_measured([sys.executable, "-c", IMPORTS_ONLY])[1]


def paired(model: Path, rounds: int, options: dict | None = None) -> dict:
    """Interleaved rounds of load+save and simplify (with its parity check) on the same file."""
    out = Path(tempfile.mkdtemp(prefix="tool_cost_", dir=model.parent))
    idle = idle_rss()
    try:
        base, simp, base_rss, simp_rss = [], [], [], []
        for r in range(rounds):
            s, rss = run_measured([sys.executable, "-c", LOAD_SAVE, str(model), str(out / f"copy{r}.onnx")])
            base.append(s)
            base_rss.append(rss - idle)
            s, rss = run_measured([sys.executable, "-c", SIMPLIFY, str(model), str(out / f"small{r}.onnx"),
                                   repr(options or {})])
            simp.append(s)
            simp_rss.append(rss - idle)
            for f in out.iterdir():
                f.unlink()
        return {"load_save_s": statistics.median(base), "simplify_s": statistics.median(simp),
                "ratio": statistics.median(simp) / statistics.median(base),
                "load_save_rss": max(base_rss), "simplify_rss": max(simp_rss)}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def file_size(model: Path) -> int:
    data = [p for p in model.parent.iterdir() if p.name.startswith(model.name) and p != model]
    return model.stat().st_size + sum(p.stat().st_size for p in data)


# --- models ------------------------------------------------------------------------------------

def export_zoo(name: str, folder: Path) -> Path:
    import io
    import warnings

    import onnx
    import torch

    from onnxprune.models import build
    from onnxprune.models.masks import zero_random_filters
    from onnxprune.models.resnet import Bottleneck, ResNet

    if name == "resnet50":  # the real depth: (3, 4, 6, 3) bottlenecks, 25.6 M parameters
        model = ResNet(Bottleneck, (3, 4, 6, 3), 1.0, 1000).eval()
    elif name == "densenet121":  # the real depth: (6, 12, 24, 16) dense layers, 8 M parameters
        from onnxprune.models.densenet import DenseNet

        model = DenseNet((6, 12, 24, 16), 1.0, 1000).eval()
    else:
        model = build(name, width=1.0, num_classes=1000)
    zero_random_filters(model, 0.5, seed=0)
    x = torch.randn(1, 3, 224, 224)
    try:
        with torch.no_grad():
            model.eval()(x)
    except RuntimeError:  # VGG / AlexNet flatten a fixed-size map into their classifier
        from onnxprune.models import ZOO

        x = torch.randn(ZOO[name].input_shape)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (x,), buf, dynamo=False, opset_version=17)
    path = folder / f"{name}.onnx"
    onnx.save(onnx.load_from_string(buf.getvalue()), path)
    return path


def residual_chain(blocks: int, path: Path, channels: int = 16, seed: int = 0) -> Path:
    """x -> blocks x (Conv3x3-BN-Relu-Conv3x3-BN + x, Relu) -> GlobalAveragePool, half the filters zeroed."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    cur = "x"

    def conv(x, i):
        w = rng.standard_normal((channels, channels, 3, 3)).astype(np.float32) * 0.1
        w[rng.permutation(channels)[: channels // 2]] = 0
        b = rng.standard_normal(channels).astype(np.float32) * 0.1
        inits.extend([numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")])
        nodes.append(helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1], name=f"conv{i}"))
        return f"c{i}"

    for k in range(blocks):
        h = conv(cur, 2 * k)
        nodes.append(helper.make_node("Relu", [h], [f"r{k}"], name=f"relu{k}"))
        h = conv(f"r{k}", 2 * k + 1)
        nodes.append(helper.make_node("Add", [h, cur], [f"a{k}"], name=f"add{k}"))
        nodes.append(helper.make_node("Relu", [f"a{k}"], [f"o{k}"], name=f"out{k}"))
        cur = f"o{k}"
    nodes.append(helper.make_node("GlobalAveragePool", [cur], ["y"], name="pool"))
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, 1, 1])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), path)
    return path


def big_mlp(gb: float, path: Path, width: int = 4096, seed: int = 0) -> Path:
    """A chain of MatMul + Add + Relu layers [width x width] fp32 totalling about `gb` GB, written
    layer by layer straight into one external-data file (never the whole model in memory); half
    of every layer's output columns zeroed."""
    import onnx
    from onnx import TensorProto, helper

    layers = max(1, int(round(gb * 2**30 / (width * width * 4))))
    rng = np.random.default_rng(seed)
    data = path.with_name(path.name + ".data")
    nodes, inits = [], []
    cur, offset = "x", 0
    with open(data, "wb") as f:
        for i in range(layers):
            w = (rng.standard_normal((width, width), dtype=np.float32) * (1.0 / np.sqrt(width))).astype(np.float32)
            w[:, rng.permutation(width)[: width // 2]] = 0
            b = (rng.standard_normal(width, dtype=np.float32) * 0.1).astype(np.float32)
            for name, arr in ((f"w{i}", w), (f"b{i}", b)):
                raw = arr.tobytes()
                f.write(raw)
                t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=arr.shape)
                t.data_location = TensorProto.EXTERNAL
                for key, value in (("location", data.name), ("offset", str(offset)), ("length", str(len(raw)))):
                    t.external_data.add(key=key, value=value)
                inits.append(t)
                offset += len(raw)
            nodes += [helper.make_node("MatMul", [cur, f"w{i}"], [f"m{i}"], name=f"matmul{i}"),
                      helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"], name=f"add{i}"),
                      helper.make_node("Relu", [f"a{i}"], [f"h{i}"], name=f"relu{i}")]
            cur = f"h{i}"
    g = helper.make_graph(nodes, "big_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
                          [helper.make_tensor_value_info(cur, TensorProto.FLOAT, [1, width])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), path)
    return path


# --- commands ----------------------------------------------------------------------------------

def cmd_zoo(args) -> list[dict]:
    from onnxprune.models import ZOO

    rows = []
    with tempfile.TemporaryDirectory(prefix="tool_cost_zoo_") as tmp:
        for name in args.models or ["resnet50", "densenet121"] + [n for n in ZOO if n != "resnet50"]:
            path = export_zoo(name, Path(tmp))
            row = {"model": name, "size_mb": file_size(path) / 1e6, **paired(path, args.rounds)}
            rows.append(row)
            print(_row(row), flush=True)
            path.unlink()
    return rows


def cmd_chain(args) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="tool_cost_chain_") as tmp:
        for n in args.blocks:
            path = residual_chain(n, Path(tmp) / f"chain{n}.onnx")
            row = {"model": f"chain {n} blocks", "blocks": n, "size_mb": file_size(path) / 1e6, **paired(path, args.rounds)}
            rows.append(row)
            print(_row(row), flush=True)
    x = np.log([r["blocks"] for r in rows])
    y = np.log([r["simplify_s"] for r in rows])
    slope = float(np.polyfit(x, y, 1)[0]) if len(rows) > 1 else float("nan")
    print(f"log-log slope of simplify time vs blocks: {slope:.3f}")
    return rows


def cmd_big(args) -> list[dict]:
    rows = []
    for gb in args.gb:
        tmp = Path(tempfile.mkdtemp(prefix="tool_cost_big_", dir=args.dir))
        try:
            path = big_mlp(gb, tmp / "big.onnx")
            row = {"model": f"MLP {gb:g} GB (external data)", "size_mb": file_size(path) / 1e6,
                   **paired(path, args.rounds)}
            rows.append(row)
            print(_row(row), flush=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return rows


def cmd_profile(args) -> None:
    import cProfile
    import pstats

    with tempfile.TemporaryDirectory(prefix="tool_cost_prof_") as tmp:
        path = export_zoo(args.model, Path(tmp))
        from onnxprune.api import simplify_file

        prof = cProfile.Profile()
        prof.enable()
        simplify_file(path, Path(tmp) / "small.onnx")
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(args.top)


HEADER = ("| model | size MB | load+save s | simplify s | ratio | peak RSS above idle / size: load+save | simplify |\n"
          "|---|---:|---:|---:|---:|---:|---:|")


def _row(r: dict) -> str:
    size = r["size_mb"] * 1e6
    return (f"| {r['model']} | {r['size_mb']:.1f} | {r['load_save_s']:.2f} | {r['simplify_s']:.2f} | "
            f"{r['ratio']:.1f}x | {r['load_save_rss'] / size:.1f} | {r['simplify_rss'] / size:.1f} |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    z = sub.add_parser("zoo")
    z.add_argument("--models", nargs="*")
    c = sub.add_parser("chain")
    c.add_argument("--blocks", type=int, nargs="*", default=[100, 200, 400, 800, 1600, 3200])
    b = sub.add_parser("big")
    b.add_argument("--gb", type=float, nargs="*", default=[3, 10])
    b.add_argument("--dir", default=None, help="where to build the models (default: the temp folder)")
    p = sub.add_parser("profile")
    p.add_argument("--model", default="resnet50")
    p.add_argument("--top", type=int, default=40)
    for s in (z, c, b):
        s.add_argument("--rounds", type=int, default=3)
        s.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = ap.parse_args(argv)
    if args.what == "profile":
        return cmd_profile(args)
    print(f"command: python benchmarks/tool_cost.py {' '.join(argv or sys.argv[1:])}")
    print(HEADER, flush=True)
    rows = {"zoo": cmd_zoo, "chain": cmd_chain, "big": cmd_big}[args.what](args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
