"""Sensitivity analysis: how much each prunable channel group can lose on its own.

For every group the filter pruner prunes at one ratio (a *bucket* of `pruning.groups`: channels
coupled by a residual add, a depthwise conv or a concat, zeroed in every layer producing them) and
every sparsity s, a candidate prunes that group alone, and a metric is taken on onnxruntime over
calibration inputs: top-1 accuracy of the first output against labels, or, without labels, top-1
agreement with the dense model.

The candidates come from `pruning.prune` itself: one `prune --sparsity s` run per sparsity (the
same criterion, options, first-layer and classifier rules), of which each group's candidate keeps
the zeros in that group and nothing else. Which channels of a group go depends on that group
alone (its scores over its producers, its count), so these are the channels a config naming the
group's layers zeroes; `random` draws as that one run does. With `macs`, each candidate's MACs
are those `simplify --align 1` leaves once the group's dead channels are gone (a simplify per
candidate: several times the cost of the rest, hence off by default).

The rows, the text table, the CSV and the plot (`SensitivityRow`, `sensitivity_table`, `write_csv`,
`plot`) know nothing of ONNX: the PyTorch side reports its own analyses with them.
"""

from __future__ import annotations

import csv
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from . import checks
from .errors import OnnxPruneError
from .files import FilePlan, Outputs

SPARSITIES = tuple(round(0.1 * i, 1) for i in range(1, 10))
MATPLOTLIB_INSTALL = "pip install matplotlib (or pip install 'onnxprune[bench]')"
ACCURACY = "top-1 accuracy"
AGREEMENT = "top-1 agreement with the dense model"


# --- rows, table, CSV, plot: framework-free --------------------------------------------------

@dataclass
class SensitivityRow:
    group: str           # short label: the first layer, "+k" when k more layers are coupled to it
    layers: list[str]
    sparsity: float
    metric: float
    macs: int | None = None  # of the candidate once its dead channels are removed


def _by_group(rows) -> dict[tuple[str, tuple[str, ...]], dict[float, SensitivityRow]]:
    """Rows by (group, layers), in order of first appearance, then by sparsity."""
    out: dict[tuple[str, tuple[str, ...]], dict[float, SensitivityRow]] = {}
    for r in rows:
        out.setdefault((r.group, tuple(r.layers)), {})[float(r.sparsity)] = r
    return out


def _short_count(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def _fit(label: str, width: int) -> str:
    return label if len(label) <= width else "..." + label[-(width - 3):]


def sensitivity_table(rows, baseline: float, metric_name: str) -> str:
    """Groups × sparsities: the metric of each group pruned alone (and its MACs where known)."""
    groups = _by_group(rows)
    sparsities = sorted({float(r.sparsity) for r in rows})
    width = 40
    lines = [f"sensitivity: {metric_name}, dense {baseline:.4f}; {len(groups)} group(s) x {len(sparsities)} sparsities"]
    if not groups:
        return "\n".join(lines)

    def block(cell) -> list[str]:
        out = [f"{'group':{width}}" + "".join(f"{s:>8.2f}" for s in sparsities)]
        for (label, _), cells in groups.items():
            out.append(f"{_fit(label, width - 1):{width}}" + "".join(f"{cell(cells[s]) if s in cells else '-':>8}"
                                                             for s in sparsities))
        return out

    lines += block(lambda r: f"{r.metric:.4f}")
    if any(r.macs is not None for r in rows):
        lines.append("MACs once the group's pruned channels are removed:")
        lines += block(lambda r: _short_count(r.macs) if r.macs is not None else "-")
    return "\n".join(lines)


def _plan_write(path, what: str) -> None:
    FilePlan().write(path, what).check()


def write_csv(rows, path, *, outputs: Outputs | None = None) -> None:
    """One line per row: group, layers (joined by ';'), sparsity, metric, macs (empty if unknown).
    Written atomically; with `outputs` (an open `Outputs`) it is written into it instead, for the
    caller to commit together with its other files (and to have checked them with a FilePlan)."""
    if outputs is None:
        _plan_write(path, "the CSV file")
        with Outputs() as out:
            return write_csv(rows, path, outputs=out)
    with open(outputs.path(path), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["group", "layers", "sparsity", "metric", "macs"])
        for r in rows:
            w.writerow([r.group, ";".join(r.layers), f"{float(r.sparsity):g}", repr(float(r.metric)),
                        "" if r.macs is None else int(r.macs)])


def require_matplotlib():
    """matplotlib, or a one-line error saying how to install it (the core does not depend on it)."""
    try:
        import matplotlib
    except ImportError:
        raise OnnxPruneError(f"the plot needs matplotlib: {MATPLOTLIB_INSTALL}") from None
    return matplotlib


def plot(rows, path, metric_name: str, baseline: float | None = None, *, outputs: Outputs | None = None) -> None:
    """A PNG: one curve per group (metric against sparsity), the dense baseline dashed. Drawn on
    matplotlib's Agg canvas directly (no pyplot, no global backend switch); written atomically, or
    into `outputs` as `write_csv` is."""
    matplotlib = require_matplotlib()
    if outputs is None:
        _plan_write(path, "the plot")
        with Outputs() as out:
            return plot(rows, path, metric_name, baseline, outputs=out)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = _by_group(rows)
    fig = Figure(figsize=(9 if len(groups) > 12 else 7, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    palette = matplotlib.colormaps["tab10" if len(groups) <= 10 else "tab20"]
    for i, ((label, _), cells) in enumerate(groups.items()):
        xs = sorted(cells)
        ax.plot(xs, [cells[s].metric for s in xs], marker="o", markersize=3, linewidth=1, label=_fit(label, 40),
                color=palette(i % palette.N), linestyle=("-", ":", "-.")[i // palette.N % 3])
    if baseline is not None:
        ax.axhline(baseline, linestyle="--", color="black", linewidth=1, label=f"dense ({baseline:.3f})")
    ax.set_xlabel("sparsity of the group")
    ax.set_ylabel(metric_name)
    ax.set_title("sensitivity per group (each pruned alone)")
    ax.grid(True, alpha=0.3)
    if groups or baseline is not None:
        ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5), ncol=1 if len(groups) <= 24 else 2)
    fig.tight_layout()
    fig.savefig(outputs.path(path), format="png")


# --- the analysis (ONNX, onnxruntime) --------------------------------------------------------

def check_sparsities(value, name: str = "sparsities") -> tuple[float, ...]:
    """'0.1,0.3,0.5' or a sequence: each in [0, 1); sorted, without repeats, at least one."""
    parts = [p.strip() for p in value.split(",")] if isinstance(value, str) else list(value)
    if not parts or any(p == "" for p in parts):
        raise OnnxPruneError(f"{name} must be a comma-separated list of sparsities in [0, 1), got {value!r}")
    return tuple(sorted({checks.sparsity(p, name) for p in parts}))


@dataclass
class Group:
    """A prunable channel group (a bucket of `pruning.groups`) and whether it is analysed."""
    label: str
    layers: tuple[str, ...]
    channels: int
    free: int                 # channels not pinned
    skipped: str = ""         # why it is not analysed; "" when it is
    bucket: object = field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict:
        return {"group": self.label, "layers": list(self.layers), "channels": self.channels, "free": self.free,
                "skipped": self.skipped}


def _groups_of(g, prune_first: bool, prune_last: bool) -> list[Group]:
    from .channels.core import build_channel_graph
    from .pruning.config import default_config, resolve
    from .pruning.groups import buckets, group_label, layers

    # the layers `prune --sparsity` would select, and why the others stay (first layer, classifier)
    wanted, skipped = resolve(default_config(0.5), layers(g), prune_first, prune_last)
    out, seen = [], {}
    for b in buckets(g, build_channel_graph(g)):
        free = sum(root not in b.pinned for root in b.classes)
        label = group_label(b.layers)
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:  # two groups led by one layer with as many others: keep labels unique
            label += f"#{seen[label]}"
        culprit = next((name for name in b.layers if name not in wanted), None)
        if culprit is not None:
            why = skipped.get(culprit, "not selected")
            reason = why if culprit == b.layers[0] else f"coupled with {culprit}: {why}"
        elif not free:
            reason = f"all {b.size} channel(s) pinned: " + "; ".join(sorted(set(b.pinned.values())))
        else:
            reason = ""
        out.append(Group(label, b.layers, b.size, free, reason, b))
    return out


def groups(model, *, prune_first: bool = False, prune_last: bool = False) -> list[Group]:
    """Every channel group of `model` (path or ModelProto), analysed or not (`skipped` says why)."""
    from .pipeline import cleaned_graph

    return _groups_of(cleaned_graph(model), prune_first, prune_last)


def _options(criterion: str, prune_options: dict):
    from .options import PruneOptions
    from .pruning.criteria import FOR_GRANULARITY

    for key in ("sparsity", "config"):
        if prune_options.get(key) is not None:
            raise OnnxPruneError(f"the sensitivity analysis sets each group's sparsity itself: do not give {key}")
    opts = PruneOptions.of(criterion=criterion, **prune_options)
    if opts.chosen_granularity not in ("filter", "head") or opts.rearrange:
        raise OnnxPruneError(f"the sensitivity analysis prunes channel groups: criterion {criterion!r} / granularity "
                             f"{opts.chosen_granularity} is not structured (use {', '.join(FOR_GRANULARITY['filter'])})")
    return opts


def _weights(model, names=None) -> dict[str, tuple[int, np.ndarray]]:
    """Layer name -> (initializer index, weight) of a ModelProto's layers (those in `names`)."""
    from onnx import numpy_helper

    from .layers import is_linear

    index = {t.name: i for i, t in enumerate(model.graph.initializer)}
    out = {}
    for node in model.graph.node:
        if is_linear(node) and node.input[1] in index and (names is None or node.name in names):
            i = index[node.input[1]]
            out[node.name] = (i, numpy_helper.to_array(model.graph.initializer[i]))
    return out


@dataclass
class _Pruned:
    """One `prune` run at one sparsity over every selected layer: within a group, the channels it
    zeroes depend on that group alone (its scores, its count), so each group's candidate is this
    run's rows of that group over the dense weights."""
    model: object                             # the pruned ModelProto
    weights: dict[str, tuple[int, np.ndarray]]
    changed: set[str]                         # layers whose weights it changed


def _prune_all(dense, dense_weights, sparsity: float, opts, calib) -> _Pruned:
    from .pruning.prune import prune

    result, _ = prune(dense, opts, sparsity=checks.sparsity(sparsity), config=None, calib=calib)
    weights = _weights(result)
    changed = {name for name, (_, w) in weights.items() if not np.array_equal(w, dense_weights[name][1])}
    return _Pruned(result, weights, changed)


def _only(pruned: _Pruned, dense_weights, group: Group):
    """The pruned model with every change outside `group` undone: the dense model, the group pruned."""
    from onnx import numpy_helper

    from .layers import filters

    model = type(pruned.model)()
    model.CopyFrom(pruned.model)
    nodes = {n.name: n for n in model.graph.node if n.name in pruned.changed}
    zeroed = []
    for name in sorted(pruned.changed):
        i, w = pruned.weights[name]
        ref = dense_weights[name][1]
        mine = np.zeros(filters(w, nodes[name]).shape[0], bool)
        for rows in group.bucket.rows.get(name, []):
            mine[rows] = True
        new = ref.copy()
        filters(new, nodes[name])[mine] = filters(w, nodes[name])[mine]  # (filters is a view)
        init = model.graph.initializer[i]
        init.CopyFrom(numpy_helper.from_array(new, init.name))
        if mine.any():
            zeroed.append((name, tuple(np.flatnonzero(mine & _zero_rows(w, nodes[name])
                                                      & ~_zero_rows(ref, nodes[name])).tolist())))
    return model, tuple(zeroed)


def _zero_rows(w, node) -> np.ndarray:
    from .layers import all_zero, filters

    return all_zero(filters(w, node), 0)


def prune_group(model, group: Group, sparsity: float, *, calib=None, **prune_options):
    """`model` (the ModelProto or path `groups` read) with only `group` pruned at `sparsity`: the
    channels of the group that `pruning.prune` (`onnxprune prune --sparsity`, the same criterion
    and options) zeroes, and nothing else. For the deterministic criteria these are the channels a
    config naming the group's layers alone would zero; `random` draws as the run over every layer
    does. Returns the ModelProto."""
    from .pipeline import cleaned_graph

    opts = _options(prune_options.pop("criterion", "l1"), prune_options)
    model = cleaned_graph(model).to_model()  # named and cleaned as `groups` and `prune` see it
    dense = _weights(model)
    return _only(_prune_all(model, dense, sparsity, opts, calib), dense, group)[0]


def read_labels(path) -> np.ndarray:
    """Integer class labels from an .npy (or an .npz holding one array), flattened."""
    from .arrays import read_arrays

    data = read_arrays(path, "labels")
    if isinstance(data, dict):
        if len(data) != 1:
            raise OnnxPruneError(f"labels {path}: an .npz with {len(data)} arrays; give an .npy (or an .npz with "
                                 "one array) of integer class labels")
        data = next(iter(data.values()))
    return _as_labels(data, f"labels {path}")


def _as_labels(labels, what: str = "labels") -> np.ndarray:
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu":
        raise OnnxPruneError(f"{what}: expected integer class indices, got {labels.dtype}")
    return labels.reshape(-1)


def _predictions(model, calib: list[dict]) -> tuple[np.ndarray, tuple, str]:
    """Argmax over the last axis of the first output, for every calibration batch, concatenated;
    with the first batch's output shape and the output's name (for messages)."""
    from .parity import run, session

    sess = session(model)
    name = sess.get_outputs()[0].name
    preds, shape = [], None
    for feeds in calib:
        out = np.asarray(run(sess, feeds)[0])
        if out.ndim == 0 or out.shape[-1] < 2:
            raise OnnxPruneError(f"the first output {name} has shape {list(out.shape)}: top-1 needs a last axis of "
                                 "at least two classes")
        shape = shape or out.shape
        preds.append(np.argmax(out, axis=-1).reshape(-1))
    return np.concatenate(preds), tuple(shape), name


def _feeds(calib, signature):
    from .parity import as_feeds

    if calib is None:
        raise OnnxPruneError("the sensitivity analysis needs calibration inputs (--calib)")
    in_memory = isinstance(calib, (list, dict))
    feeds = as_feeds(calib, None if in_memory else signature, "calibration inputs")
    if not feeds:
        raise OnnxPruneError("calibration inputs: none given")
    return feeds


@dataclass
class Analysis:
    """What `analyze_model` found: the rows, the dense metric and every group (skipped ones say why)."""
    rows: list[SensitivityRow]
    baseline: float
    metric_name: str
    groups: list[Group]
    criterion: str
    dense_macs: int | None = None
    seconds: float = 0.0

    def table(self) -> str:
        lines = [sensitivity_table(self.rows, self.baseline, self.metric_name)]
        if self.dense_macs is not None:
            lines.append(f"dense MACs (after simplify --align 1): {self.dense_macs:,}")
        lines.append(f"criterion {self.criterion}, {len(self.rows)} candidate(s) in {self.seconds:.1f} s")
        lines += [f"  not analysed: {g.label} ({g.channels} channels): {g.skipped}" for g in self.groups if g.skipped]
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"metric": self.metric_name, "baseline": self.baseline, "criterion": self.criterion,
                "dense_macs": self.dense_macs, "seconds": self.seconds, "rows": [asdict(r) for r in self.rows],
                "groups": [g.as_dict() for g in self.groups]}


def analyze_model(model, calib, labels=None, sparsities=SPARSITIES, criterion: str = "l1", progress=None, *,
                  macs: bool = False, **prune_options) -> Analysis:
    """`analyze`, returning the whole `Analysis` (groups that were not analysed and why, dense MACs)."""
    from tqdm.auto import tqdm

    from .pipeline import cleaned_graph
    from .simplify import simplify

    start = time.perf_counter()
    opts = _options(criterion, prune_options)
    sparsities = check_sparsities(sparsities)
    g = cleaned_graph(model)
    feeds = _feeds(calib, g.signature())
    found = _groups_of(g, opts.prune_first, opts.prune_last)
    todo = [grp for grp in found if not grp.skipped]
    if not todo:
        why = "; ".join(sorted({grp.skipped for grp in found})) or "no Conv / Gemm / MatMul layer with constant weights"
        raise OnnxPruneError(f"no prunable channel group to analyse ({why})")
    clean = g.to_model()
    dense, shape, output = _predictions(clean, feeds)
    if labels is not None:
        labels = read_labels(labels) if not isinstance(labels, (np.ndarray, list, tuple)) else _as_labels(labels)
        if labels.size != dense.size:
            raise OnnxPruneError(f"labels: {labels.size} label(s), but the calibration inputs give {dense.size} "
                                 f"prediction(s) ({len(feeds)} batch(es) of {output} {list(shape)}): one label per item")
        classes = shape[-1]
        if labels.size and (labels.min() < 0 or labels.max() >= classes):
            raise OnnxPruneError(f"labels: class indices must be in [0, {classes}) ({output} has {classes} classes), "
                                 f"got {int(labels.min())}..{int(labels.max())}")
    truth = labels if labels is not None else dense
    baseline = float(np.mean(dense == truth))
    dense_macs = simplify(clean, check=False, align=1)[1].after.macs if macs else None
    dense_weights = _weights(clean)
    seen: dict[tuple, tuple[float, int | None]] = {}  # (group, channels zeroed) -> (metric, MACs)
    cells: dict[tuple[int, float], SensitivityRow] = {}
    disable = None if progress is None else not progress  # None: a bar on a terminal only (tqdm's rule)
    with tqdm(total=len(todo) * len(sparsities), desc="sensitivity", unit="candidate", disable=disable,
              leave=False) as bar:
        for s in sparsities:
            pruned = _prune_all(clean, dense_weights, s, opts, feeds)
            for k, grp in enumerate(todo):
                bar.set_postfix_str(f"sparsity {s:.2f}, group {k + 1}/{len(todo)}", refresh=False)
                cand, zeroed = _only(pruned, dense_weights, grp)
                key = (grp.label, zeroed)
                if key not in seen:
                    if not any(rows for _, rows in zeroed):  # nothing zeroed: the dense model
                        seen[key] = (baseline, dense_macs)
                    else:
                        metric = float(np.mean(_predictions(cand, feeds)[0] == truth))
                        seen[key] = (metric, simplify(cand, check=False, align=1)[1].after.macs if macs else None)
                cells[k, s] = SensitivityRow(grp.label, list(grp.layers), s, *seen[key])
                bar.update()
    rows = [cells[k, s] for k in range(len(todo)) for s in sparsities]
    metric_name = ACCURACY if labels is not None else AGREEMENT
    return Analysis(rows, baseline, metric_name, found, opts.criterion, dense_macs, time.perf_counter() - start)


def analyze(model, calib, labels=None, sparsities=SPARSITIES, criterion: str = "l1", progress=None,
            **prune_options) -> tuple[list[SensitivityRow], float]:
    """Prune each channel group alone at each sparsity and take the metric over `calib` (a list of
    feed dicts, one feed dict, or an .npz/.npy path as `prune --calib` reads it) on onnxruntime:
    top-1 accuracy of the first output against `labels` (integers, one per item: all batches'
    items in order), or top-1 agreement with the dense model without labels. Returns (rows, the
    dense model's metric). `prune_options`: `PruneOptions` fields (prune_first, prune_last,
    group_reduce, seed), and `macs=True` to record each candidate's MACs (a simplify each: several
    times the cost of the analysis).
    `progress`: a tqdm bar (None: on a terminal only)."""
    a = analyze_model(model, calib, labels, sparsities, criterion, progress, **prune_options)
    return a.rows, a.baseline


__all__ = ["SensitivityRow", "sensitivity_table", "write_csv", "plot", "analyze", "analyze_model", "groups",
           "prune_group", "read_labels", "Analysis", "Group", "SPARSITIES"]
