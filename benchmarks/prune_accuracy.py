"""Measured, never asserted: one-shot accuracy of onnxprune's pruning methods on a real, small task.

A small CNN is trained (seeded, CPU, a few seconds) on scikit-learn's bundled digits data set
(`sklearn.datasets.load_digits`: 1797 8x8 grayscale digits that ship with the package; nothing is
downloaded), exported to ONNX (BN folded), then pruned one-shot (no fine-tuning) at sparsity
0.5 / 0.7 / 0.9 with: weight (level) pruning, dependency-aware filter pruning (L1, FPGM) and 1xN
blocks for N = 2, 4, 8, 16, 32 without and with channel rearrangement, and row-balanced (`--balanced`:
the same number of blocks pruned in every block row, what model_tune's static-bound BSR kernel
wants) - the shape of Table 1 of the
1xN paper (Lin et al., "1xN Pattern for Pruning Convolutional Neural Networks"). Top-1 accuracy is
measured with onnxruntime on the held-out split (stratified, `random_state=0`).

Every pruned model is also simplified (`onnxprune.simplify`, parity-checked): the table gives its
MACs relative to the dense model, and for the filter rows simplify's onnxruntime latency speedup
over the pruned-but-not-simplified model (1 thread, interleaved runs, medians). For the 1xN rows
the fraction of the pruned layers' L1 weight mass that survives is printed with and without
rearrangement.

    python benchmarks/prune_accuracy.py                  # markdown on stdout, CSV in benchmarks/results/
    python benchmarks/prune_accuracy.py --epochs 30 --seed 1 --prune-first
    python benchmarks/prune_accuracy.py --sparsities 0.1 0.2 0.3   # the less destructive range

Needs scikit-learn (for the data set only).
"""

from __future__ import annotations

import argparse
import csv
import os
import shlex
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from onnxprune import prune, simplify  # noqa: E402
from onnxprune import rearrange as rearrange_model  # noqa: E402
from onnxprune.timing import time_models  # noqa: E402

SPARSITIES = (0.5, 0.7, 0.9)
BLOCK_NS = (2, 4, 8, 16, 32)


# --- data and model -----------------------------------------------------------------------------

def load_data(seed_split: int = 0):
    """Digits as float32 [N, 1, 8, 8], standardised with the training split's mean and std."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:  # pragma: no cover - a hint, not a fallback
        sys.exit("this benchmark needs scikit-learn (pip install scikit-learn) for its bundled digits data set")
    digits = load_digits()
    x = digits.images.astype(np.float32)[:, None]          # [1797, 1, 8, 8], values 0..16
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=seed_split, stratify=y)
    mean, std = float(x_tr.mean()), float(x_tr.std())
    return (x_tr - mean) / std, y_tr, (x_te - mean) / std, y_te


class SmallCNN(nn.Module):
    """Every channel count a multiple of 32, so that every 1xN block height up to 32 applies."""

    def __init__(self, classes: int = 10):
        super().__init__()

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(
            *block(1, 32), *block(32, 64), nn.MaxPool2d(2),
            *block(64, 64), *block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.classifier = nn.Linear(128, classes)

    def forward(self, x):
        return self.classifier(self.features(x))


def train(x_tr, y_tr, epochs: int, seed: int, batch: int = 64, lr: float = 2e-3) -> SmallCNN:
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    model = SmallCNN()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(epochs, 1))
    xs, ys = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    gen = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(xs), generator=gen)
        for i in range(0, len(xs), batch):
            idx = order[i:i + batch]
            opt.zero_grad()
            loss_fn(model(xs[idx]), ys[idx]).backward()
            opt.step()
        sched.step()
    return model.eval()


def export(model: nn.Module) -> onnx.ModelProto:
    """Static batch 1 (simplify and the timing need static shapes); BN is folded by the exporter."""
    x = torch.zeros(1, 1, 8, 8)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(tmp) / "digits_cnn.onnx"
        torch.onnx.export(model.eval(), (x,), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"])
        return onnx.load(str(path))


# --- measurements -------------------------------------------------------------------------------

def accuracy(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 on onnxruntime, one sample at a time (the model has a static batch of 1)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    pred = np.array([int(np.argmax(sess.run(None, {name: x[i:i + 1]})[0])) for i in range(len(x))])
    return float((pred == y).mean())


def weight_sums(model: onnx.ModelProto, names) -> dict[str, float]:
    inits = {t.name: t for t in model.graph.initializer}
    return {k: float(np.abs(onnx.numpy_helper.to_array(inits[k])).sum()) for k in names if k in inits}


def pruned_weight_names(report) -> list[str]:
    return [k for k, m in report.masks.items() if m.ndim >= 2]


def achieved_sparsity(report) -> float:
    """Fraction of zeroed weights over the layers that were pruned (biases not counted)."""
    masks = [report.masks[k] for k in pruned_weight_names(report)]
    total = sum(m.size for m in masks)
    return float(sum((~m.astype(bool)).sum() for m in masks) / total) if total else 0.0


def mass_kept(pruned: onnx.ModelProto, reference: onnx.ModelProto, report) -> float:
    """sum |w| surviving / sum |w| before, over the pruned layers' weights."""
    names = pruned_weight_names(report)
    after, before = weight_sums(pruned, names), weight_sums(reference, names)
    if set(after) != set(names) or set(before) != set(names):
        return float("nan")
    return sum(after.values()) / sum(before.values())


def methods(prune_first: bool):
    """(label, group, prune kwargs); group decides what else is measured."""
    rows = [("level (weight)", "level", dict(criterion="level")),
            ("filter L1", "filter", dict(criterion="l1")),
            ("filter FPGM", "filter", dict(criterion="fpgm"))]
    for n in BLOCK_NS:
        rows.append((f"1x{n}", "1xN", dict(criterion="l1", granularity="1xN", n=n)))
        rows.append((f"1x{n} + rearrange", "1xN", dict(criterion="l1", granularity="1xN", n=n, rearrange=True)))
        rows.append((f"1x{n} balanced", "1xN", dict(criterion="l1", granularity="1xN", n=n, balanced=True)))
    if prune_first:
        rows += [(f"{label} [all layers]", group, kw | dict(prune_first=True, prune_last=True))
                 for label, group, kw in list(rows)]
    return rows


def measure(dense, x_te, y_te, label, group, kw, sparsity, runs, references) -> dict:
    row = {"method": label, "group": group, "sparsity": sparsity, "accuracy": None, "achieved": None,
           "macs_ratio": None, "pruned_ms": None, "simplified_ms": None, "speedup": None, "mass_kept": None,
           "error": ""}
    try:
        pruned, report = prune(dense, sparsity=sparsity, **kw)
    except Exception as e:  # measured, never asserted: an error becomes a table cell
        row["error"] = f"prune: {type(e).__name__}: {e}"
        return row
    row["accuracy"] = accuracy(pruned, x_te, y_te)
    row["achieved"] = achieved_sparsity(report)
    if group == "1xN":
        n, rearranged = kw["n"], kw.get("rearrange", False)
        if rearranged not in references.setdefault(n, {}):
            references[n][rearranged] = rearrange_model(dense)[0] if rearranged else dense
        row["mass_kept"] = mass_kept(pruned, references[n][rearranged], report)
    try:
        small, sreport = simplify(pruned)
    except Exception as e:
        row["error"] = f"simplify: {type(e).__name__}: {e}"
        return row
    row["macs_ratio"] = sreport.after.macs / sreport.before.macs
    if group == "filter":
        small_acc = accuracy(small, x_te, y_te)
        if small_acc != row["accuracy"]:
            row["error"] = f"simplified accuracy {small_acc:.4f} != pruned {row['accuracy']:.4f}"
        ms = time_models({"pruned": pruned, "simplified": small}, threads=1, runs=runs, warmup=20)
        row["pruned_ms"], row["simplified_ms"] = ms["pruned"], ms["simplified"]
        row["speedup"] = ms["pruned"] / ms["simplified"]
    return row


# --- output -------------------------------------------------------------------------------------

def fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None or (isinstance(value, float) and np.isnan(value)) else format(value, spec)


def print_tables(dense_acc: float, dense_macs: int, dense_ms: float, rows: list[dict], prune_first: bool) -> None:
    by = {(r["method"], r["sparsity"]): r for r in rows}
    labels = list(dict.fromkeys(r["method"] for r in rows))
    groups = {r["method"]: r["group"] for r in rows}
    sparsities = list(dict.fromkeys(r["sparsity"] for r in rows))
    sp = " / ".join(f"{s:g}" for s in sparsities)

    def cells(label, key, spec):
        out = []
        for s in sparsities:
            r = by[(label, s)]
            out.append("ERR" if r["error"] and r[key] is None else fmt(r[key], spec))
        return " / ".join(out)

    print(f"### Top-1 accuracy on the held-out digits split, one-shot (no fine-tuning), sparsity {sp}\n")
    scope = ("every Conv/Gemm except the first conv and the classifier (prune_first=False, prune_last=False)"
             + ("; rows marked [all layers]: every Conv/Gemm (prune_first=True, prune_last=True)" if prune_first else ""))
    print(f"Pruned: {scope}. Accuracy in %. MACs: after simplify, relative to dense. Speedup: simplified vs "
          "pruned-but-not-simplified on onnxruntime, 1 thread, batch 1, interleaved runs, medians (filter rows "
          "only).\n")
    head = ["method"] + [f"acc @{s:g}" for s in sparsities] + [f"MACs ({sp})", f"speedup ({sp})"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
    print("| dense baseline | " + " | ".join([f"{100 * dense_acc:.2f}"] * len(sparsities)) + " | 1.00 | - |")
    for label in labels:
        accs = []
        for s in sparsities:
            r = by[(label, s)]
            accs.append("ERR" if r["accuracy"] is None else f"{100 * r['accuracy']:.2f}")
        speed = cells(label, "speedup", ".2f") + "x" if groups[label] == "filter" else "-"
        print(f"| {label} | " + " | ".join(accs) + f" | {cells(label, 'macs_ratio', '.2f')} | {speed} |")
    print(f"\nDense: {dense_macs / 1e6:.2f} M MACs, {dense_ms:.3f} ms on onnxruntime (1 thread, batch 1).")

    print(f"\n### Achieved sparsity of the pruned layers' weights ({sp})\n")
    print("| method | zero weights |")
    print("|---|---:|")
    for label in labels:
        print(f"| {label} | {cells(label, 'achieved', '.3f')} |")

    filt = [label for label in labels if groups[label] == "filter"]
    if filt:
        print(f"\n### Filter rows: onnxruntime latency, ms (pruned -> simplified), sparsity {sp}\n")
        print("| method | " + " | ".join(f"@{s:g}" for s in sparsities) + " |")
        print("|---|" + "---:|" * len(sparsities))
        for label in filt:
            c = [f"{fmt(by[(label, s)]['pruned_ms'], '.3f')} -> {fmt(by[(label, s)]['simplified_ms'], '.3f')}"
                 for s in sparsities]
            print(f"| {label} | " + " | ".join(c) + " |")

    blocks = [label for label in labels if groups[label] == "1xN" and "rearrange" not in label]
    if blocks:
        print(f"\n### 1xN: fraction of the pruned layers' L1 weight mass kept, plain vs rearranged ({sp})\n")
        print("| method | plain | rearranged | rearranged >= plain | acc rearranged - plain (pp) |")
        print("|---|---:|---:|---|---:|")
        for label in blocks:
            twin = label.replace(label.split(" [")[0], label.split(" [")[0] + " + rearrange")
            if (twin, sparsities[0]) not in by:
                continue
            plain = [by[(label, s)]["mass_kept"] for s in sparsities]
            rearr = [by[(twin, s)]["mass_kept"] for s in sparsities]
            ok = ["-" if a is None or b is None else ("yes" if b >= a - 1e-12 else "NO")
                  for a, b in zip(plain, rearr)]
            dacc = [by[(twin, s)]["accuracy"] - by[(label, s)]["accuracy"]
                    if by[(twin, s)]["accuracy"] is not None and by[(label, s)]["accuracy"] is not None else None
                    for s in sparsities]
            print(f"| {label} | " + " / ".join(fmt(v, ".4f") for v in plain) + " | "
                  + " / ".join(fmt(v, ".4f") for v in rearr) + " | " + " / ".join(ok) + " | "
                  + " / ".join(fmt(None if d is None else 100 * d, "+.2f") for d in dacc) + " |")

    errors = [r for r in rows if r["error"]]
    if errors:
        print("\n### Errors / mismatches\n")
        for r in errors:
            print(f"- {r['method']} @ {r['sparsity']:g}: {r['error']}")


def write_csv(path: Path, dense_acc: float, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = ["method", "group", "sparsity", "accuracy", "achieved", "macs_ratio", "pruned_ms", "simplified_ms",
              "speedup", "mass_kept", "error"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerow({"method": "dense baseline", "group": "dense", "sparsity": 0.0, "accuracy": dense_acc,
                    "achieved": 0.0, "macs_ratio": 1.0})
        for r in rows:
            w.writerow({k: r[k] for k in fields})


def main(argv=None) -> None:
    start = time.perf_counter()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--sparsities", type=float, nargs="+", default=list(SPARSITIES))
    ap.add_argument("--seed", type=int, default=0, help="training seed (the split is always random_state=0)")
    ap.add_argument("--runs", type=int, default=200, help="interleaved timing runs per filter row (after 20 warm-up runs)")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch training threads")
    ap.add_argument("--prune-first", action="store_true",
                    help="also rows that prune the first conv and the classifier (prune_first/prune_last)")
    ap.add_argument("--csv", type=Path, default=ROOT / "benchmarks" / "results" / "prune_accuracy.csv")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    x_tr, y_tr, x_te, y_te = load_data()
    t = time.perf_counter()
    model = train(x_tr, y_tr, args.epochs, args.seed)
    train_s = time.perf_counter() - t
    with torch.no_grad():
        torch_acc = float((model(torch.from_numpy(x_te)).argmax(1).numpy() == y_te).mean())
    dense = export(model)
    dense_acc = accuracy(dense, x_te, y_te)
    _, dense_report = simplify(dense)
    dense_ms = time_models({"dense": dense}, threads=1, runs=args.runs, warmup=20)["dense"]
    ops = ", ".join(f"{k} x{v}" for k, v in dense_report.before.ops.items())
    print(f"# onnxprune one-shot pruning accuracy: digits (sklearn, 8x8), train {len(y_tr)} / test {len(y_te)}, "
          f"{args.epochs} epochs Adam, seed {args.seed}, trained in {train_s:.1f} s; dense test top-1 "
          f"{dense_acc:.2%} on onnxruntime ({torch_acc:.2%} in PyTorch); exported ONNX: {ops}\n")

    rows, references = [], {}
    for label, group, kw in methods(args.prune_first):
        for s in args.sparsities:
            rows.append(measure(dense, x_te, y_te, label, group, kw, s, args.runs, references))
    print_tables(dense_acc, dense_report.before.macs, dense_ms, rows, args.prune_first)
    write_csv(args.csv, dense_acc, rows)
    print(f"\nCSV: {args.csv}")
    print(f"command: python {' '.join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])}")
    print(f"wall time: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
