"""Measured, never asserted: pruning schedules and sparsity searches against one-shot pruning, at a
MAC budget, on the prune-while-training benchmark's data and model (train_prune.py: digits 3x32x32,
ResNet-20, the same dense training recipe).

Every method starts from the same trained dense model and ends with the same MAC budget (the
config's sparsity = the fraction of the dense model's counted MACs to remove) and the same
fine-tuning budget (`--finetune-epochs` epochs of SGD steps after pruning; what a schedule trains
while it prunes — AGP's ramp, Lottery's rounds, AutoCompress's ADMM — comes out of it). Searches
score candidates on a validation split carved from the training images (never the test split) and
spend extra time doing so: that is the "search s" column.

Rows: one-shot L1 at the uniform per-group sparsity that meets the budget; AGP (L1, cubic ramp over
the fine-tuning epochs); Lottery Ticket (2 rounds, rewinding to the dense weights); Sensitivity;
NetAdapt (MAC budget); Simulated Annealing; AutoCompress (2 rounds of annealing + 1 ADMM epoch);
AMC (when onnxprune.pytorch has it). And the latency question: NetAdapt told to remove
`--sparsities` of the *measured latency* of the simplified model vs NetAdapt at the same MAC budget.

For each: top-1 on the test split, MACs of the simplified model (align 1) / dense, onnxruntime
latency of the simplified model (speedup's default align, 1 thread, batch 1, interleaved with the
dense model, medians) / dense, search and total wall time.

    python benchmarks/schedules.py                       # ResNet-20, 50% and 70% MAC budgets
    python benchmarks/schedules.py --quick --out /tmp/s  # smoke run, a few minutes

Markdown on stdout; CSV and PNG (top-1 vs latency ratio) in `--out` (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import onnxprune.pytorch as op  # noqa: E402
from onnxprune.models.digits import augment, load_digits_32  # noqa: E402
from onnxprune.pytorch.annealing import rescale  # noqa: E402
from onnxprune.pytorch.search import SearchSpace  # noqa: E402
from onnxprune.timing import time_models  # noqa: E402
from train_prune import MODELS, QUICK_WIDTH, ROOT, Recipe, Trainer, quiet, top1, train_dense  # noqa: E402

METHODS = ("oneshot", "agp", "lottery", "sensitivity", "netadapt", "annealing", "autocompress", "amc", "netadapt-latency")
CONFIG = "Conv2d"


# --- picklable evaluation pieces (module level: a spawned worker imports them) --------------------

class ValAccuracy:
    """Top-1 on the validation split: what the searches maximize."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __call__(self, model) -> float:
        return top1(model, self.x, self.y)


class ShortTerm:
    """NetAdapt's short-term fine-tuning / the sensitivity pruner's: `steps` SGD steps on augmented
    training batches (the search seeds torch before each call)."""

    def __init__(self, x, y, steps: int, lr: float, batch: int = 64):
        self.x, self.y, self.steps, self.lr, self.batch = x, y, steps, lr, batch

    def __call__(self, model) -> None:
        opt = torch.optim.SGD(model.parameters(), lr=self.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
        loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
        model.train()
        for _ in range(self.steps):
            idx = torch.randint(0, len(self.y), (self.batch,))
            opt.zero_grad(set_to_none=True)
            loss_fn(model(augment(self.x[idx], None)), self.y[idx]).backward()
            opt.step()
        model.eval()


# --- methods ----------------------------------------------------------------------------------

def uniform_sparsity(model, x, groups, budget: float) -> float:
    """The one per-group sparsity whose counted MACs just meet the budget (what one-shot uses)."""
    space = SearchSpace(model, [{"sparsity": budget, "op_types": [CONFIG]}], x, groups=groups)
    cost = lambda s: float(space.counted(s)["macs"])  # noqa: E731
    chosen = rescale(cost, {gi: 1.0 for gi in space.searched}, lambda v, gi: space.clip(v, gi), (1 - budget) * cost({}))
    return max(chosen.values())


def run_method(name, ctx, budget):
    """The method on a copy of the dense model: (model with masks, search seconds, note)."""
    r, tr, x = ctx["recipe"], ctx["trainer"], ctx["x"]
    model = copy.deepcopy(ctx["dense"])
    tr.reseed(ctx["seed"] + 1)
    steps = r.finetune_epochs * tr.steps_per_epoch
    config = [{"sparsity": budget, "op_types": [CONFIG]}]
    val, short = ctx["val"], ctx["short"]
    common = {"dummy_input": x, "progress": False, "executor": ctx["executor"], "seed": ctx["seed"]}
    t = time.perf_counter()
    note = ""
    if name in ("oneshot", "agp", "lottery"):
        s = ctx["uniform"][budget]
        per_layer = [{"sparsity": s, "op_types": [CONFIG]}]
        if name == "oneshot":
            op.L1FilterPruner(model, per_layer, dummy_input=x, groups=ctx["groups"]).compress()
            search = time.perf_counter() - t
            tr.run(model, steps, r.finetune_lr, desc="fine-tune", progress=False)
            return model, search, f"uniform sparsity {s:.3f}"
        if name == "agp":
            opt = tr.optimizer(model, r.finetune_lr)
            epochs = r.finetune_epochs
            agp = op.AGPPruner(model, [{"final_sparsity": s, "start_epoch": 0, "end_epoch": max(epochs - 1, 1),
                                        "op_types": [CONFIG]}], opt, pruning_algorithm="l1", dummy_input=x,
                               groups=ctx["groups"])
            agp.compress()
            for epoch in range(epochs):
                agp.update_epoch(epoch)
                for _ in range(tr.steps_per_epoch):
                    lr = 0.5 * r.finetune_lr * (1 + math.cos(math.pi * tr.steps / steps))
                    tr.step(model, opt, lr=lr)
            agp.remove_hook()
            return model.eval(), 0.0, f"ramp to {s:.3f} over {epochs} epochs"
        lt = op.LotteryTicketPruner(model, [{"sparsity": s, "prune_iterations": 2, "op_types": [CONFIG]}])
        rounds = list(lt.get_prune_iterations())
        for k in rounds:
            lt.prune_iteration_start()
            tr.run(model, steps // len(rounds), r.finetune_lr, desc=f"round {k}", progress=False)
        return model.eval(), 0.0, "level pruning: MACs unchanged in a dense runtime"
    if name == "sensitivity":
        p = op.SensitivityPruner(model, config, val, finetuner=short, sparsity_per_iteration=0.25,
                                 sparsities=(0.25, 0.5, 0.75), **common)
    elif name == "netadapt":
        p = op.NetAdaptPruner(model, config, short, val, sparsity_per_iteration=0.1, **common)
    elif name == "netadapt-latency":
        p = op.NetAdaptPruner(model, config, short, val, sparsity_per_iteration=0.1, resource="latency", **common)
    elif name == "annealing":
        p = op.SimulatedAnnealingPruner(model, config, val, candidates_per_temperature=2, **common)
    elif name == "autocompress":
        p = op.AutoCompressPruner(model, config, tr.epoch_trainer(r.finetune_lr), val, x, num_iterations=2,
                                  admm_num_iterations=1, admm_epochs_per_iteration=1, cool_down_rate=0.8,
                                  **{k: v for k, v in common.items() if k != "dummy_input"})
    elif name == "amc":
        if not hasattr(op, "AMCPruner"):
            return None, 0.0, "not available"
        p = op.AMCPruner(model, [{"op_types": [CONFIG]}], val, flops_ratio=1 - budget, warmup=ctx["amc"][0],
                         train_episode=ctx["amc"][1], **common)
    quiet(p.compress)
    search = time.perf_counter() - t
    trained = tr.steps
    tr.run(model, steps - trained, r.finetune_lr, desc="fine-tune", progress=False)
    if trained:
        note = f"{trained} of the fine-tuning steps inside the search"
    kept = len(getattr(p, "iterations", ())) * short.steps if name.startswith(("netadapt", "sensitivity")) else 0
    if kept:   # the accepted candidates' short-term fine-tuning stays on the model: training beyond the budget
        note = f"+{kept} short-term steps on the kept candidates"
    short_of = getattr(p, "stopped_short", None)
    if short_of:
        note += (f"; stopped at {short_of['cost'] / short_of['dense']:.2f} of the dense {p.space.resource} "
                 f"(budget {short_of['budget'] / short_of['dense']:.2f}): no group could shed a step")
    return model.eval(), search, note


def measure(name, ctx, budget) -> dict:
    row = {"method": name, "budget": budget}
    t = time.perf_counter()
    try:
        model, search_s, note = run_method(name, ctx, budget)
    except Exception as e:   # measured, never asserted: an error is a table cell
        return row | {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
    if model is None:
        return row | {"error": note}
    row |= {"wall_s": time.perf_counter() - t, "search_s": search_s, "note": note,
            "top1": top1(model, ctx["data"].x_test, ctx["data"].y_test)}
    small, report = quiet(op.speedup, model, ctx["x"], exporter="torchscript")
    _, exact = quiet(op.speedup, model, ctx["x"], exporter="torchscript", align=1)
    row["macs_ratio"] = exact.simplify.after.macs / ctx["dense_macs"]
    ms = time_models({"dense": ctx["dense_onnx"], "pruned": small}, threads=1, runs=ctx["runs"], warmup=10)
    row["latency_ratio"] = ms["pruned"] / ms["dense"]
    row["dense_ms"], row["pruned_ms"] = ms["dense"], ms["pruned"]
    return row


# --- output -------------------------------------------------------------------------------------

def fmt(v, spec, missing="-"):
    return missing if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def markdown(dense_row, rows, recipe, args) -> str:
    out = [f"ResNet-20 (width {args.width:g}) on digits: dense top-1 {100 * dense_row['top1']:.2f} %, "
           f"{dense_row['macs'] / 1e6:.2f} M MACs, {dense_row['ms']:.3f} ms on onnxruntime (1 thread). Fine-tune "
           f"budget {recipe.finetune_epochs} epochs for every method; searches score on {args.val} validation images.",
           "", "| budget | method | top-1 % | MACs / dense | latency / dense | search s | total s | note |",
           "|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['budget']:.0%} | {r['method']} | - | - | - | - | - | {r['error']} |")
            continue
        out.append(f"| {r['budget']:.0%} | {r['method']} | {100 * r['top1']:.2f} | {r['macs_ratio']:.3f} | "
                   f"{r['latency_ratio']:.3f} | {fmt(r['search_s'], '.0f')} | {r['wall_s']:.0f} | {r.get('note', '')} |")
    return "\n".join(out)


def plot(path: Path, dense_row, rows) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in METHODS:
        pts = [(r["latency_ratio"], 100 * r["top1"]) for r in rows if r["method"] == name and "error" not in r]
        if pts:
            ax.plot(*zip(*sorted(pts)), "o-", label=name)
    ax.axhline(100 * dense_row["top1"], color="grey", ls="--", lw=1, label="dense")
    ax.set_xlabel("onnxruntime latency of the simplified model / dense")
    ax.set_ylabel("top-1 % (test split)")
    ax.set_title("Schedules and searches at 50 % / 70 % MAC budgets (ResNet-20, digits)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7], help="MAC budgets (fraction removed)")
    ap.add_argument("--width", type=float, default=None, help="ResNet-20 width (default 1.0; --quick 0.25)")
    ap.add_argument("--epochs", type=int, help="dense training epochs")
    ap.add_argument("--finetune-epochs", type=int)
    ap.add_argument("--val", type=int, default=300, help="training images held out for the searches' evaluator")
    ap.add_argument("--workers", type=int, default=0, help="a spawned process pool of N workers for the searches")
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    recipe = Recipe()
    if args.quick:
        recipe = replace(recipe, epochs=3, finetune_epochs=1, warmup_epochs=0, train_subset=384)
        args.runs, args.val = 20, 100
    recipe = replace(recipe, **{k: v for k, v in {"epochs": args.epochs, "finetune_epochs": args.finetune_epochs}.items()
                                if v is not None})
    args.width = args.width or (QUICK_WIDTH["resnet20"] if args.quick else MODELS["resnet20"][1])
    data = load_digits_32(seed=args.seed)
    xv, yv = data.x_train[-args.val:], data.y_train[-args.val:]
    data = data._replace(x_train=data.x_train[:-args.val], y_train=data.y_train[:-args.val])
    torch.manual_seed(args.seed)
    dense = MODELS["resnet20"][0](width=args.width, num_classes=10)
    trainer = Trainer(data, recipe, args.seed)
    t = time.perf_counter()
    train_dense(dense, trainer, progress=True)
    print(f"dense trained in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    x = data.x_test[:1].clone()
    dense_onnx, _ = quiet(op.speedup, dense, x, exporter="torchscript")
    _, exact = quiet(op.speedup, dense, x, exporter="torchscript", align=1)
    groups = quiet(op.dependency_groups, dense, x)
    executor = None
    if args.workers:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        executor = ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn"))
    ctx = {"dense": dense, "recipe": recipe, "trainer": trainer, "x": x, "groups": groups, "seed": args.seed,
           "data": data, "val": ValAccuracy(xv, yv), "executor": executor, "runs": args.runs,
           "short": ShortTerm(data.x_train, data.y_train, 2 if args.quick else 20, recipe.finetune_lr),
           "dense_onnx": dense_onnx, "dense_macs": exact.simplify.after.macs,
           "uniform": {b: uniform_sparsity(dense, x, groups, b) for b in args.sparsities},
           "amc": (3, 6) if args.quick else (20, 60)}
    dense_ms = time_models({"dense": dense_onnx}, threads=1, runs=args.runs, warmup=10)["dense"]
    dense_row = {"top1": top1(dense, data.x_test, data.y_test), "macs": exact.simplify.after.macs, "ms": dense_ms}
    rows = []
    for budget in args.sparsities:
        for name in tqdm(args.methods, desc=f"budget {budget:.0%}"):
            row = measure(name, ctx, budget)
            rows.append(row)
            print(f"{name} @ {budget:.0%}: top-1 {fmt(row.get('top1') and 100 * row['top1'], '.2f')} "
                  f"MACs {fmt(row.get('macs_ratio'), '.3f')} latency {fmt(row.get('latency_ratio'), '.3f')} "
                  f"{row.get('error', '')}", file=sys.stderr, flush=True)
    if executor is not None:
        executor.shutdown()
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "schedules.csv", "w", newline="") as f:
        keys = sorted({k for r in rows for k in r})
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    plot(args.out / "schedules.png", dense_row, rows)
    print(markdown(dense_row, rows, recipe, args))
    print(f"\nCSV: {args.out / 'schedules.csv'}  PNG: {args.out / 'schedules.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
