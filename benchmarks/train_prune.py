"""Measured, never asserted: prune-while-training with onnxprune.pytorch on a real (small) task.

Data: scikit-learn's bundled digits (`onnxprune.models.digits.load_digits_32`: 8x8 upsampled to
3x32x32, stratified split `random_state=seed`, 1437 train / 360 test images; nothing downloaded),
random shifts and small affine warps during training.

For each model (a CIFAR-style ResNet-20 and MobileNetV2 at width 0.5):
1. train the dense model once (seeded; SGD + Nesterov momentum, linear warm-up then cosine);
2. for every method x sparsity: copy the dense model, prune it with the method, fine-tune it for
   the same budget of SGD steps (`--finetune-epochs` epochs' worth; steps a method spends training
   inside the pruner -- Taylor's gradient batches, Slim's sparsity training, ADMM's iterations --
   come out of that budget; iterative rounds split it), evaluate top-1 on the held-out split;
3. `onnxprune.pytorch.speedup(model, x)` (export, simplify, parity against PyTorch): MACs and
   parameters of the simplified model relative to the simplified dense model, onnxruntime latency
   of simplified vs dense (1 thread, batch 1, interleaved runs, medians), top-1 of the simplified
   model on onnxruntime, and the wall time of the method (prune + fine-tune).

Rows: dense; one-shot L1 without fine-tuning; L1 / L2 / FPGM filter pruning, LevelPruner
(unstructured: MACs unchanged in a dense ONNX model), the data-driven pruners and iterative rounds
where `onnxprune.pytorch` has them, and 1xN blocks (BlockPruner, N = 4 and 16, with and without
rearrangement; MACs unchanged in dense ONNX -- block sparsity is reported instead).

    python benchmarks/train_prune.py                                   # both models, everything
    python benchmarks/train_prune.py --models resnet20 --methods l1 fpgm --sparsities 0.5
    python benchmarks/train_prune.py --quick --out /tmp/tp             # smoke run, about a minute

Markdown on stdout, CSV and PNG (accuracy vs MACs) in `--out` (default benchmarks/results/).
Needs scikit-learn (the data) and matplotlib (the plot): `pip install -e ".[bench]"`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import inspect
import io
import logging
import math
import os
import shlex
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# On a shared 2-core machine, OpenMP threads that spin while waiting for a descheduled sibling made
# training steps 5x slower (measured: 2.3 s vs 0.44 s per ResNet-20 step under load): wait passively.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import onnxprune.pytorch as op  # noqa: E402
from onnxprune.models.digits import augment, load_digits_32  # noqa: E402
from onnxprune.models.mobilenet import mobilenet_v2  # noqa: E402
from onnxprune.models.resnet import resnet20  # noqa: E402
from onnxprune import simplify  # noqa: E402
from onnxprune.parity import session  # noqa: E402
from onnxprune.pytorch.masks import current_masks  # noqa: E402
from onnxprune.timing import time_models  # noqa: E402

SPARSITIES = (0.3, 0.5, 0.7)
MODELS = {  # name -> (factory, width)
    "resnet20": (resnet20, 1.0),
    "mobilenet_v2": (mobilenet_v2, 0.5),
}
QUICK_WIDTH = {"resnet20": 0.25, "mobilenet_v2": 0.25}
QUICK_METHODS = ("l1-oneshot", "l1", "level", "taylor", "slim", "rounds", "1x4r")   # --quick without --methods
CONVS = "Conv2d"


# --- the training recipe ------------------------------------------------------------------------

@dataclass
class Recipe:
    epochs: int = 30                 # dense training
    finetune_epochs: int = 6         # the budget after pruning, the same for every method
    batch: int = 64
    lr: float = 0.1                  # dense, peak (after warm-up), cosine to 0
    warmup_epochs: int = 2
    finetune_lr: float = 0.02        # fine-tuning, peak, cosine to 0 (no warm-up)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    augment: bool = True
    stat_batches: int = 20           # batches a data-driven criterion sees (Taylor, APoZ, mean activation)
    slim_epochs: int = 2             # Slim's sparsity training (of the fine-tune budget)
    admm_iterations: int = 3         # ADMM: iterations x 1 epoch (of the fine-tune budget)
    rounds: int = 3                  # iterative pruning: rounds splitting the fine-tune budget
    train_subset: int | None = None  # --quick: train on the first N training images only

    def describe(self) -> str:
        aug = "shift +-3 px, rotation +-10 deg, scale 0.9-1.1" if self.augment else "none"
        return (f"dense {self.epochs} epochs, SGD Nesterov momentum {self.momentum}, batch {self.batch}, lr {self.lr:g} "
                f"({self.warmup_epochs} warm-up epochs, then cosine to 0), weight decay {self.weight_decay:g}, "
                f"label smoothing {self.label_smoothing:g}, augmentation: {aug}; fine-tune budget "
                f"{self.finetune_epochs} epochs of SGD steps for every method, lr {self.finetune_lr:g} cosine to 0")


class Trainer:
    """Augmented mini-batches from a seeded generator, SGD steps counted (the budget)."""

    def __init__(self, data, recipe: Recipe, seed: int):
        self.x, self.y = data.x_train, data.y_train
        if recipe.train_subset:
            self.x, self.y = self.x[:recipe.train_subset], self.y[:recipe.train_subset]
        self.recipe, self.seed = recipe, seed
        self.steps_per_epoch = math.ceil(len(self.y) / recipe.batch)
        self.steps = 0                 # SGD steps taken through this trainer
        self.gen = torch.Generator().manual_seed(seed)
        self._order, self._pos = None, 0
        self.criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)

    def reseed(self, seed: int) -> None:
        """Every method sees the same sequence of batches."""
        self.gen = torch.Generator().manual_seed(seed)
        self._order, self._pos, self.steps = None, 0, 0

    def batch(self):
        if self._order is None or self._pos >= len(self._order):
            self._order, self._pos = torch.randperm(len(self.y), generator=self.gen), 0
        idx = self._order[self._pos:self._pos + self.recipe.batch]
        self._pos += self.recipe.batch
        xb = self.x[idx]
        if self.recipe.augment:
            xb = augment(xb, self.gen)
        return xb, self.y[idx]

    def optimizer(self, model, lr: float):
        r = self.recipe
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=r.momentum, nesterov=True, weight_decay=r.weight_decay)

    def step(self, model, opt, criterion=None, lr: float | None = None) -> float:
        if lr is not None:
            for g in opt.param_groups:
                g["lr"] = lr
        model.train()
        xb, yb = self.batch()
        opt.zero_grad(set_to_none=True)
        loss = (criterion or self.criterion)(model(xb), yb)
        loss.backward()
        opt.step()
        self.steps += 1
        return float(loss.detach())

    def run(self, model, steps: int, lr: float, warmup: int = 0, desc: str = "train", progress: bool = True,
            on_epoch=None) -> None:
        """`steps` SGD steps: linear warm-up over `warmup` steps, then cosine from `lr` to 0.
        `on_epoch(e)` is called before every epoch but the first (BlockPruner.update_epoch: the
        blocks are chosen again from the dense weights, and the last epoch trains under the final
        masks)."""
        if steps <= 0:
            return
        opt = self.optimizer(model, lr)
        bar = tqdm(range(steps), desc=desc, leave=False, disable=not progress, mininterval=2.0)
        for i in bar:
            if on_epoch is not None and i > 0 and i % self.steps_per_epoch == 0:
                on_epoch(i // self.steps_per_epoch)
            if i < warmup:
                cur = lr * (i + 1) / warmup
            else:
                cur = 0.5 * lr * (1 + math.cos(math.pi * (i - warmup) / max(steps - warmup, 1)))
            loss = self.step(model, opt, lr=cur)
            if i % 20 == 0:
                bar.set_postfix(loss=f"{loss:.3f}")
        model.eval()

    def epoch_trainer(self, lr: float):
        """NNI's `trainer(model, optimizer, criterion, epoch)`: one epoch of steps."""
        def trainer(model, optimizer=None, criterion=None, epoch=None, *args, **kwargs):
            opt = optimizer if optimizer is not None else self.optimizer(model, lr)
            for _ in range(self.steps_per_epoch):
                self.step(model, opt, criterion)
        return trainer


def train_dense(model, trainer: Trainer, progress: bool = True):
    r = trainer.recipe
    trainer.reseed(trainer.seed)
    trainer.run(model, r.epochs * trainer.steps_per_epoch, r.lr, r.warmup_epochs * trainer.steps_per_epoch,
                desc="dense", progress=progress)
    return model.eval()


@torch.no_grad()
def top1(model, x, y, batch: int = 256) -> float:
    model.eval()
    hits = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(y), batch))
    return hits / len(y)


def ort_top1(onnx_model, x, y) -> float:
    """Top-1 of an ONNX model (static batch 1) on onnxruntime, one image at a time."""
    sess = session(onnx_model, threads=1, optimize=True)
    name = sess.get_inputs()[0].name
    xs = x.numpy()
    pred = np.array([int(np.argmax(sess.run(None, {name: xs[i:i + 1]})[0])) for i in range(len(y))])
    return float((pred == y.numpy()).mean())


# --- methods ------------------------------------------------------------------------------------

@dataclass
class Method:
    key: str            # --methods name
    label: str          # table row
    kind: str           # oneshot | filter | level | data | slim | admm | rounds | block
    cls_name: str       # class in onnxprune.pytorch
    extra: dict = field(default_factory=dict)


METHODS = [
    Method("l1-oneshot", "L1 one-shot (no fine-tune)", "oneshot", "L1FilterPruner"),
    Method("l1", "L1FilterPruner", "filter", "L1FilterPruner"),
    Method("l2", "L2FilterPruner", "filter", "L2FilterPruner"),
    Method("fpgm", "FPGMPruner", "filter", "FPGMPruner"),
    Method("level", "LevelPruner (unstructured)", "level", "LevelPruner"),
    Method("taylor", "TaylorFOWeightFilterPruner", "data", "TaylorFOWeightFilterPruner"),
    Method("apoz", "ActivationAPoZRankFilterPruner", "data", "ActivationAPoZRankFilterPruner"),
    Method("mean", "ActivationMeanRankFilterPruner", "data", "ActivationMeanRankFilterPruner"),
    Method("slim", "SlimPruner (BatchNorm2d)", "slim", "SlimPruner"),
    Method("admm", "ADMMPruner", "admm", "ADMMPruner"),
    Method("rounds", "L1 in 3 rounds (prune_in_rounds)", "rounds", "L1FilterPruner"),
    Method("1x4", "1x4 blocks", "block", "BlockPruner", {"n": 4, "rearrange": False}),
    Method("1x4r", "1x4 blocks + rearrange", "block", "BlockPruner", {"n": 4, "rearrange": True}),
    Method("1x4b", "1x4 blocks, row-balanced", "block", "BlockPruner", {"n": 4, "rearrange": False, "balanced": True}),
    Method("1x16", "1x16 blocks", "block", "BlockPruner", {"n": 16, "rearrange": False}),
    Method("1x16r", "1x16 blocks + rearrange", "block", "BlockPruner", {"n": 16, "rearrange": True}),
]
BY_KEY = {m.key: m for m in METHODS}


def pruner_class(name: str):
    """The class from onnxprune.pytorch, or None when it is not there (yet)."""
    try:
        return getattr(op, name)
    except AttributeError:
        pass
    for sub in ("training", "block"):
        try:
            mod = __import__(f"onnxprune.pytorch.{sub}", fromlist=[name])
        except ImportError:
            continue
        if hasattr(mod, name):
            return getattr(mod, name)
    return None


def build_pruner(cls, available: dict):
    """Construct `cls` passing, by name, those of `available` its signature takes (NNI's argument
    names of v1 and v2 both appear in `available`); a required argument we cannot fill is an error."""
    sig = inspect.signature(cls)
    kwargs, missing = {}, []
    for name, p in sig.parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if name in available:
            kwargs[name] = available[name]
        elif p.default is inspect.Parameter.empty:
            missing.append(name)
    if missing:
        raise TypeError(f"{cls.__name__}{sig}: no value for {', '.join(missing)}")
    takes_kw = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    if takes_kw and issubclass(cls, op.FilterPruner) and "groups" in available:
        kwargs["groups"] = available["groups"]      # FilterPruner's own argument, through **kw
    return cls(**kwargs), sorted(kwargs)


@dataclass
class Context:
    name: str
    dense: nn.Module
    data: object
    trainer: Trainer
    x: torch.Tensor                  # dummy input, batch 1
    groups: object                   # dependency groups of the dense model (shared by the filter pruners)
    dense_onnx: object
    dense_stats: object
    dense_layer_params: int
    exporter: str
    runs: int
    seed: int
    progress: bool


def config_for(method: Method, sparsity: float) -> list[dict]:
    if method.kind == "slim":
        return [{"sparsity": sparsity, "op_types": ["BatchNorm2d"]}]
    return [{"sparsity": sparsity, "op_types": [CONVS]}]


def prune_and_finetune(ctx: Context, method: Method, sparsity: float) -> tuple[nn.Module, dict]:
    """The method on a copy of the dense model; returns the model (masks on) and notes."""
    r, tr = ctx.trainer.recipe, ctx.trainer
    model = copy.deepcopy(ctx.dense)
    tr.reseed(ctx.seed + 1)
    budget = r.finetune_epochs * tr.steps_per_epoch
    info = {"prune_steps": 0, "finetune_steps": 0, "note": ""}
    cls = pruner_class(method.cls_name)
    config = config_for(method, sparsity)
    available = {
        "model": model, "config_list": config, "dummy_input": ctx.x, "groups": ctx.groups,
        "criterion": tr.criterion, "trainer": tr.epoch_trainer(r.finetune_lr),
        "optimizer": tr.optimizer(model, r.finetune_lr), "traced_optimizer": tr.optimizer(model, r.finetune_lr),
        # data-driven criteria (NNI v2 / v1 names)
        "training_batches": r.stat_batches, "sparsifying_training_batches": r.stat_batches,
        # Slim's sparsity training, ADMM's iterations
        "training_epochs": r.slim_epochs if method.kind == "slim" else 1,
        "sparsifying_training_epochs": r.slim_epochs,
        "iterations": r.admm_iterations, "num_iterations": r.admm_iterations, "epochs_per_iteration": 1,
        "base_algo": "l1", "granularity": "coarse-grained",
        **method.extra,
    }
    if method.kind == "block":
        available["block_size"] = method.extra["n"]
    if method.kind not in ("data", "slim", "admm"):   # L1/L2/FPGM/Level/Block: no training inside
        for k in ("trainer", "optimizer", "traced_optimizer", "criterion"):
            available.pop(k)
    pruner, used = build_pruner(cls, available)
    if method.kind == "rounds":
        per_round = [budget // r.rounds + (1 if i < budget % r.rounds else 0) for i in range(r.rounds)]

        def finetuner(m, rnd):
            tr.run(m, per_round[rnd - 1], r.finetune_lr, desc=f"round {rnd}", progress=ctx.progress)

        op.prune_in_rounds(pruner, r.rounds, finetuner, progress=False)
        info["finetune_steps"] = tr.steps
        info["note"] = f"{r.rounds} rounds of {per_round[0]} steps"
        return model.eval(), info
    if method.kind in ("data", "slim", "admm") and "trainer" not in used:
        # hook-style pruner (statistics gathered while the user trains): train, then compress
        steps = {"data": r.stat_batches, "slim": r.slim_epochs * tr.steps_per_epoch,
                 "admm": r.admm_iterations * tr.steps_per_epoch}[method.kind]
        tr.run(model, steps, r.finetune_lr, desc="statistics", progress=ctx.progress)
        info["note"] = f"no trainer argument: {steps} plain steps before compress(); "
    out = pruner.compress()
    if isinstance(out, tuple):      # NNI v2 returns (model, masks)
        out = out[0]
    model = out if isinstance(out, nn.Module) else model
    info["prune_steps"] = tr.steps
    if method.kind != "oneshot":
        remaining = budget - tr.steps
        if remaining <= 0:
            info["note"] += "pruning used the whole budget; "
        on_epoch = getattr(pruner, "update_epoch", None) if method.kind == "block" else None
        tr.run(model, remaining, r.finetune_lr, desc="fine-tune", progress=ctx.progress, on_epoch=on_epoch)
        info["finetune_steps"] = tr.steps - info["prune_steps"]
    info["note"] = info["note"].rstrip("; ")
    return model.eval(), info


def block_sparsity(model, n: int) -> float | None:
    """Fraction of 1xN blocks (N consecutive output channels x 1 input channel x the kernel) that
    are all zero, over the masked group-1 convs whose output channels N divides."""
    zero = total = 0
    for name, mask in current_masks(model).items():
        module = model.get_submodule(name.rpartition(".")[0])
        if not name.endswith(".weight") or mask.ndim != 4 or getattr(module, "groups", 1) != 1 or mask.shape[0] % n:
            continue
        w = (module.weight_orig * mask).detach() if hasattr(module, "weight_orig") else module.weight.detach()
        blocks = w.reshape(w.shape[0] // n, n, w.shape[1], -1).abs().amax(dim=(1, 3))
        zero += int((blocks == 0).sum())
        total += blocks.numel()
    return zero / total if total else None


LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def layer_params(onnx_model) -> int:
    """Weights and biases of the Conv / Gemm / MatMul layers (not the other constants: simplify's
    border-correction maps for pruned channels' constants are counted apart)."""
    sizes = {t.name: int(np.prod(t.dims)) for t in onnx_model.graph.initializer}
    names = {i for n in onnx_model.graph.node if n.op_type in LAYERS for i in n.input if i in sizes}
    return sum(sizes[i] for i in names)


def weight_sparsity(model) -> float | None:
    masks = [m for k, m in current_masks(model).items() if m.ndim >= 2]
    total = sum(m.numel() for m in masks)
    return float(sum(int((~m).sum()) for m in masks) / total) if total else None


def measure(ctx: Context, method: Method, sparsity: float) -> dict:
    row = {"model": ctx.name, "method": method.label, "key": method.key, "sparsity": sparsity}
    t = time.perf_counter()
    try:
        model, info = prune_and_finetune(ctx, method, sparsity)
    except Exception as e:  # measured, never asserted: an error becomes a table cell
        row["error"] = f"prune/fine-tune: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        return row
    row["wall_s"] = time.perf_counter() - t
    row.update({k: v for k, v in info.items()})
    bad = [n for n, p in list(model.named_parameters()) + list(model.named_buffers())
           if p.is_floating_point() and not bool(torch.isfinite(p).all())]
    if bad:   # NaN propagates through the masks (NaN * 0) and parity (NaN == NaN counts as equal)
        row["error"] = f"training diverged: non-finite values in {len(bad)} tensor(s), e.g. {bad[0]}"
    row["top1"] = top1(model, ctx.data.x_test, ctx.data.y_test)
    row["weight_sparsity"] = weight_sparsity(model)
    if method.kind == "block":
        row["block_sparsity"] = block_sparsity(model, method.extra["n"])
    try:
        small, report = quiet(op.speedup, model, ctx.x, exporter=ctx.exporter)
    except Exception as e:
        row["error"] = f"speedup: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        return row
    after = report.simplify.after
    row["macs_ratio"] = after.macs / ctx.dense_stats.macs
    # speedup() keeps dead channels where that keeps a width a multiple of 8 (onnxruntime's blocked
    # kernels): what is timed. align=1 removes every dead channel: the MACs the pruning really saved.
    row["macs_ratio_align1"] = quiet(simplify, small, align=1)[1].after.macs / ctx.dense_stats.macs
    row["params_ratio"] = layer_params(small) / ctx.dense_layer_params
    row["extra_consts"] = after.params - layer_params(small)
    row["top1_ort"] = ort_top1(small, ctx.data.x_test, ctx.data.y_test)
    ms = time_models({"dense": ctx.dense_onnx, "pruned": small}, threads=1, runs=ctx.runs, warmup=10)
    row["dense_ms"], row["pruned_ms"] = ms["dense"], ms["pruned"]
    row["speedup"] = ms["dense"] / ms["pruned"]
    if abs(row["top1_ort"] - row["top1"]) > 1.5 / len(ctx.data.y_test):
        row["error"] = f"top-1 on onnxruntime {row['top1_ort']:.4f} != PyTorch {row['top1']:.4f}"
    return row


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# --- output -------------------------------------------------------------------------------------

def fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def markdown(name: str, dense_row: dict, rows: list[dict], sparsities, skipped: dict, recipe: Recipe) -> str:
    sp = " / ".join(f"{s:g}" for s in sparsities)
    by = {(r["key"], r["sparsity"]): r for r in rows}
    keys = list(dict.fromkeys(r["key"] for r in rows))
    d = dense_row["top1"]
    n_test = dense_row.get("n_test") or 360
    out = [f"### {name}: top-1 on the held-out digits split ({n_test} images; 1 image = {100 / n_test:.2f} points), "
           f"sparsity {sp}\n",
           f"Dense: top-1 {100 * d:.2f} % (onnxruntime {fmt(dense_row.get('top1_ort') and 100 * dense_row['top1_ort'], '.2f')} %), "
           f"{dense_row['macs'] / 1e6:.2f} M MACs, {dense_row['params'] / 1e3:.1f} k params, "
           f"{dense_row['dense_ms']:.3f} ms on onnxruntime (1 thread, batch 1), trained in {dense_row['wall_s']:.0f} s. "
           f"Fine-tune budget: {recipe.finetune_epochs} epochs of SGD steps for every method. MACs / params: the "
           "simplified model (speedup()'s default align=16: widths stay multiples of 16, or of 8 / 4 / 2 where "
           "they were, which onnxruntime's blocked kernels want; 'MACs align 1': every dead channel removed) relative to the "
           "simplified dense model (params: Conv/Gemm weights and biases; "
           "+consts: other constants simplify added -- the border maps of pruned channels' constants). Speedup: onnxruntime latency dense / simplified "
           "(1 thread, batch 1, interleaved runs, medians). Wall: prune + fine-tune, seconds.\n"]
    head = (["method"] + [f"top-1 @{s:g}" for s in sparsities] + [f"Δ vs dense ({sp})", f"MACs ({sp})", f"MACs align 1 ({sp})",
            f"params ({sp})", f"+consts k ({sp})", f"speedup ({sp})", f"wall s ({sp})"])
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
    out.append(f"| dense | " + " | ".join([f"{100 * d:.2f}"] * len(sparsities)) + " | - | 1.00 | 1.00 | 1.00 | 0 | 1.00x | - |")

    def cell(key, s, field_, spec, scale=1.0, suffix=""):
        r = by.get((key, s))
        if r is None:
            return "-"
        v = r.get(field_)
        if v is None:
            return "ERR" if r.get("error") else "-"
        return format(v * scale, spec) + suffix

    for key in keys:
        label = next(r["method"] for r in rows if r["key"] == key)
        tops = [cell(key, s, "top1", ".2f", 100) for s in sparsities]
        deltas = []
        for s in sparsities:
            r = by.get((key, s))
            deltas.append("-" if r is None or r.get("top1") is None else f"{100 * (r['top1'] - d):+.2f}")
        out.append(f"| {label} | " + " | ".join(tops) + " | " + " / ".join(deltas) + " | "
                   + " / ".join(cell(key, s, "macs_ratio", ".2f") for s in sparsities) + " | "
                   + " / ".join(cell(key, s, "macs_ratio_align1", ".2f") for s in sparsities) + " | "
                   + " / ".join(cell(key, s, "params_ratio", ".2f") for s in sparsities) + " | "
                   + " / ".join(cell(key, s, "extra_consts", ".1f", 1e-3) for s in sparsities) + " | "
                   + " / ".join(cell(key, s, "speedup", ".2f") for s in sparsities) + "x | "
                   + " / ".join(cell(key, s, "wall_s", ".0f") for s in sparsities) + " |")
    blocks = [k for k in keys if BY_KEY[k].kind == "block" and not BY_KEY[k].extra["rearrange"]
              and not BY_KEY[k].extra.get("balanced")]
    if blocks:
        out.append(f"\n1xN (the 1xN paper's comparison): top-1 plain / rearranged, and block sparsity of the pruned "
                   f"convs (fraction of all-zero 1xN blocks) plain / rearranged, sparsity {sp}. 1xN pruning leaves MACs "
                   "of a dense ONNX model unchanged, except for the rare channel all of whose blocks happen to be "
                   "masked (simplify removes it); the blocks need block-sparse kernels (model_tune).\n")
        out.append("| N | " + " | ".join(f"top-1 @{s:g} plain / rearr." for s in sparsities)
                   + f" | block sparsity ({sp}) plain | rearranged |")
        out.append("|---|" + "---:|" * (len(sparsities) + 2))
        for key in blocks:
            twin = key + "r"
            n = BY_KEY[key].extra["n"]
            tops = [f"{cell(key, s, 'top1', '.2f', 100)} / {cell(twin, s, 'top1', '.2f', 100)}" for s in sparsities]
            out.append(f"| {n} | " + " | ".join(tops) + " | "
                       + " / ".join(cell(key, s, "block_sparsity", ".3f") for s in sparsities) + " | "
                       + " / ".join(cell(twin, s, "block_sparsity", ".3f") for s in sparsities) + " |")
    level = [r for r in rows if BY_KEY[r["key"]].kind == "level" and r.get("weight_sparsity") is not None]
    if level:
        out.append("\nLevelPruner is unstructured: the zeros are single weights, so simplify removes no channel and "
                   "MACs stay those of the dense model (zero weights of the convs: "
                   + " / ".join(fmt(r["weight_sparsity"], ".3f") for r in level) + ").")
    notes = [r for r in rows if r.get("note")]
    if notes:
        out.append("\nNotes:\n")
        out += [f"- {r['method']} @ {r['sparsity']:g}: {r['note']}" for r in notes]
    errors = [r for r in rows if r.get("error")]
    if errors:
        out.append("\nErrors / mismatches:\n")
        out += [f"- {r['method']} @ {r['sparsity']:g}: {r['error']}" for r in errors]
    if skipped:
        out.append("\nSkipped (not importable from onnxprune.pytorch when this ran):\n")
        out += [f"- {label}: {why}" for label, why in skipped.items()]
    return "\n".join(out)


def bars(name: str, dense_row: dict, rows: list[dict]) -> str:
    """The team's bar: the best method within 1 point of dense at 50%, 3 points at 70% (filter methods)."""
    lines = []
    for s, tol in ((0.5, 1.0), (0.7, 3.0)):
        cands = [r for r in rows if r["sparsity"] == s and r.get("top1") is not None
                 and BY_KEY[r["key"]].kind not in ("level", "block", "oneshot")]
        if not cands:
            continue
        best = max(cands, key=lambda r: r["top1"])
        gap = 100 * (dense_row["top1"] - best["top1"])
        verdict = "met" if gap <= tol else f"NOT met (misses by {gap - tol:.2f} points)"
        lines.append(f"- {name} @ {s:g} filter sparsity: best {best['method']} {100 * best['top1']:.2f} %, "
                     f"{gap:+.2f} points below dense (bar: within {tol:g}): {verdict}")
    return "\n".join(lines)


CSV_FIELDS = ["model", "method", "key", "sparsity", "top1", "top1_ort", "macs_ratio", "macs_ratio_align1", "params_ratio", "extra_consts", "dense_ms",
              "pruned_ms", "speedup", "weight_sparsity", "block_sparsity", "prune_steps", "finetune_steps", "wall_s",
              "note", "error"]


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in CSV_FIELDS})


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    text = {"model", "method", "key", "note", "error"}
    for r in rows:
        for k, v in r.items():
            if k not in text:
                r[k] = float(v) if v not in (None, "") else None
    return rows


def plot(path: Path, dense_rows: dict, rows: list[dict]) -> None:
    """Top-1 vs MACs (align 1) per method, one subplot per model. Points far below the fine-tuned
    ones (one-shot pruning) sit on the lower edge as a down-triangle labelled with their value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dense_rows)
    colors = plt.get_cmap("tab20")
    order = {m.key: i for i, m in enumerate(METHODS)}
    fig, axes = plt.subplots(1, len(names), figsize=(6.5 * len(names) + 3, 5.2), squeeze=False)
    handles = {}
    for ax, name in zip(axes[0], names):
        mine = [r for r in rows if r["model"] == name and r.get("top1") is not None and r.get("macs_ratio_align1") is not None]
        dense_acc = 100 * dense_rows[name]["top1"]
        tuned = [100 * r["top1"] for r in mine if BY_KEY[r["key"]].kind != "oneshot"] + [dense_acc]
        lo = max(0.0, min(tuned) - 1.0)
        for key in dict.fromkeys(r["key"] for r in mine):
            m = BY_KEY[key]
            pts = sorted(((r["macs_ratio_align1"], 100 * r["top1"], r["sparsity"]) for r in mine if r["key"] == key),
                         reverse=True)
            style = ":" if m.kind in ("level", "block") else ("--" if m.kind == "oneshot" else "-")
            marker = "s" if m.kind == "block" else ("D" if m.kind == "level" else "o")
            color = colors(order[key] % 20)
            xs, ys = [p[0] for p in pts], [max(p[1], lo) for p in pts]
            (line,) = ax.plot(xs, ys, style, marker=marker, ms=4, color=color, label=m.label)
            handles.setdefault(m.label, line)
            for x_, y_, s_ in pts:
                if y_ < lo:
                    ax.plot([x_], [lo], "v", color=color, ms=8)
                    ax.annotate(f"{y_:.1f} % @{s_:g}", (x_, lo), textcoords="offset points", xytext=(4, 6),
                                fontsize=7, color=color)
        (star,) = ax.plot([1.0], [dense_acc], "k*", ms=12, label="dense")
        handles.setdefault("dense", star)
        ax.set_ylim(lo - 0.3, 100.3)
        ax.set_title(f"{name}: top-1 after pruning + fine-tuning (same budget)", fontsize=10)
        ax.set_xlabel("MACs of the simplified model (every dead channel removed) / dense")
        ax.set_ylabel("top-1 on held-out digits (%)")
        ax.grid(alpha=0.3)
    fig.legend(list(handles.values()), list(handles), loc="center right", fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1 - 2.6 / fig.get_figwidth(), 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- main ---------------------------------------------------------------------------------------

def run_model(name: str, width: float, args, recipe: Recipe, data, methods: list[Method], skipped: dict):
    factory, _ = MODELS[name]
    t = time.perf_counter()
    torch.manual_seed(args.seed)
    dense = factory(width=width, num_classes=10)
    trainer = Trainer(data, recipe, args.seed)
    train_dense(dense, trainer, progress=not args.no_progress)
    dense_s = time.perf_counter() - t
    x = data.x_test[:1].clone()
    dense_onnx, dense_report = quiet(op.speedup, dense, x, exporter=args.exporter)
    groups = quiet(op.dependency_groups, dense, x)
    stats = dense_report.simplify.after
    dense_ms = time_models({"dense": dense_onnx}, threads=1, runs=args.runs, warmup=10)["dense"]
    dense_row = {"model": name, "method": "dense", "key": "dense", "sparsity": 0.0,
                 "top1": top1(dense, data.x_test, data.y_test), "top1_ort": ort_top1(dense_onnx, data.x_test, data.y_test),
                 "macs_ratio": 1.0, "macs_ratio_align1": 1.0, "params_ratio": 1.0, "dense_ms": dense_ms, "pruned_ms": dense_ms, "speedup": 1.0,
                 "wall_s": dense_s, "n_test": len(data.y_test), "macs": stats.macs, "params": layer_params(dense_onnx), "extra_consts": 0,
                 "finetune_steps": recipe.epochs * trainer.steps_per_epoch}
    print(f"[{name}] width {width:g}: dense top-1 {100 * dense_row['top1']:.2f} % in {dense_s:.0f} s, "
          f"{stats.macs / 1e6:.2f} M MACs", file=sys.stderr, flush=True)
    ctx = Context(name, dense, data, trainer, x, groups, dense_onnx, stats, layer_params(dense_onnx), args.exporter, args.runs, args.seed,
                  not args.no_progress)
    rows = []
    jobs = [(m, s) for m in methods for s in args.sparsities]
    for m, s in tqdm(jobs, desc=name, disable=args.no_progress):
        row = measure(ctx, m, s)
        rows.append(row)
        msg = f"[{name}] {m.label} @ {s:g}: top-1 {fmt(row.get('top1') and 100 * row['top1'], '.2f')}"
        msg += f", MACs {fmt(row.get('macs_ratio'), '.2f')}, {fmt(row.get('wall_s'), '.0f')} s"
        print(msg + (f"  ERROR {row['error']}" if row.get("error") else ""), file=sys.stderr, flush=True)
    return dense_row, rows


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--epochs", type=int, help=f"dense training epochs (default {Recipe.epochs})")
    ap.add_argument("--finetune-epochs", type=int, help=f"fine-tune budget after pruning (default {Recipe.finetune_epochs})")
    ap.add_argument("--sparsities", type=float, nargs="+")
    ap.add_argument("--methods", nargs="+", choices=list(BY_KEY), help="default: all (those importable)")
    ap.add_argument("--seed", type=int, default=0, help="training seed and the split's random_state")
    ap.add_argument("--width", type=float, action="append", metavar="W",
                    help="width multiplier per model, in --models order (default: resnet20 1.0, mobilenet_v2 0.5)")
    ap.add_argument("--lr", type=float, help=f"dense peak learning rate (default {Recipe.lr})")
    ap.add_argument("--finetune-lr", type=float, help=f"fine-tune peak learning rate (default {Recipe.finetune_lr})")
    ap.add_argument("--batch", type=int, help=f"batch size (default {Recipe.batch})")
    ap.add_argument("--no-augment", action="store_true")
    ap.add_argument("--exporter", choices=("dynamo", "torchscript"), default=None,
                    help="speedup()'s exporter (default dynamo; --quick: torchscript)")
    ap.add_argument("--runs", type=int, help="interleaved timing runs per row (default 200; --quick 20)")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch training threads")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: tiny budget and widths, sparsity 0.5, a few methods (unless --methods)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="folder for the CSV and the PNG")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    ap.add_argument("--replot", type=Path, metavar="CSV", help="only redraw the PNG (into --out) from a CSV this wrote")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    start = time.perf_counter()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    if args.replot:
        rows = read_csv(args.replot)
        plot(args.out / "train_prune.png", {r["model"]: r for r in rows if r["key"] == "dense"},
             [r for r in rows if r["key"] != "dense"])
        print(f"PNG: {args.out / 'train_prune.png'}")
        return 0
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    recipe = Recipe()
    if args.quick:
        recipe = replace(recipe, epochs=3, finetune_epochs=1, warmup_epochs=0, train_subset=384, stat_batches=2,
                         slim_epochs=1, admm_iterations=1, rounds=2)
    over = {"epochs": args.epochs, "finetune_epochs": args.finetune_epochs, "lr": args.lr,
            "finetune_lr": args.finetune_lr, "batch": args.batch}
    recipe = replace(recipe, **{k: v for k, v in over.items() if v is not None})
    if args.no_augment:
        recipe = replace(recipe, augment=False)
    args.sparsities = args.sparsities or ([0.5] if args.quick else list(SPARSITIES))
    args.exporter = args.exporter or ("torchscript" if args.quick else "dynamo")
    args.runs = args.runs or (20 if args.quick else 200)
    widths = args.width or []
    if widths and len(widths) != len(args.models):
        sys.exit("--width: give one per model in --models")
    widths = widths or [QUICK_WIDTH[m] if args.quick else MODELS[m][1] for m in args.models]

    methods, skipped = [], {}
    for key in args.methods or (QUICK_METHODS if args.quick else list(BY_KEY)):
        m = BY_KEY[key]
        if pruner_class(m.cls_name) is None:
            skipped[m.label] = f"onnxprune.pytorch has no {m.cls_name} yet"
            print(f"note: skipping {m.label}: onnxprune.pytorch has no {m.cls_name} yet", file=sys.stderr)
            continue
        methods.append(m)

    data = load_digits_32(seed=args.seed)
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/train_prune.py", *argv])
    print(f"# onnxprune prune-while-training on digits 32x32 (sklearn), train {len(data.y_train)} / test "
          f"{len(data.y_test)}, seed {args.seed}\n")
    print(f"command: `{command}`\n")
    print(f"Recipe: {recipe.describe()}. Data-driven criteria see {recipe.stat_batches} batches; Slim trains "
          f"{recipe.slim_epochs} epochs with its regularizer, ADMM runs {recipe.admm_iterations} iterations of 1 epoch, "
          f"iterative pruning runs {recipe.rounds} rounds -- all inside the same fine-tune budget. Pruned: every Conv2d "
          "(dependency-aware channel groups; the classifier stays; SlimPruner: every BatchNorm2d).\n", flush=True)
    all_rows, dense_rows = [], {}
    for name, width in zip(args.models, widths):
        dense_row, rows = run_model(name, width, args, recipe, data, methods, skipped)
        dense_rows[name] = dense_row
        all_rows += [dense_row] + rows
        print(markdown(f"{name} (width {width:g})", dense_row, rows, args.sparsities, skipped, recipe))
        b = bars(name, dense_row, rows)
        if b:
            print("\nThe team's bar (best fine-tuned filter method within 1 point of dense at 0.5, 3 points at 0.7):\n")
            print(b)
        print(flush=True)
    out = args.out
    csv_path, png_path = out / "train_prune.csv", out / "train_prune.png"
    write_csv(csv_path, all_rows)
    try:
        plot(png_path, dense_rows, [r for r in all_rows if r["key"] != "dense"])
        print(f"PNG: {png_path}")
    except ImportError:
        print("PNG: skipped (matplotlib is not installed: pip install matplotlib)")
    print(f"CSV: {csv_path}")
    print(f"command: `{command}`")
    print(f"wall time: {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
