"""What a pruned candidate costs: MACs and parameters counted from the channel groups (what
`simplify` leaves once the pruned channels are removed), and onnxruntime latency measured on the
simplified model itself.

Counting. A channel of a group is *pruned* when the masks zero every producer row of it (as the
filter pruners leave it: its bias stays and `simplify` folds the constant into the next layers).
Removing it deletes every slice of its class — producer rows, consumer columns, depthwise filters,
the mapped columns of a flatten → Linear. Each Conv / ConvTranspose / Linear then costs
(weight entries left) × (positions it is applied at): output positions for Conv and Linear, input
positions for ConvTranspose, summed over every call (a module called twice counts twice) — the
count `onnxprune inspect` makes of the simplified model (tests compare the two). A full conv with
zero padding that reads a pruned channel's constant also pays its *border map* — the constant's
contribution is missing where the padding replaces it, which simplify computes as a one-channel
conv over a ones image: (kept output channels) × (kernel) × (positions) more (counted even when the
constant happens to be 0, which needs no map). Not counted: channels a shuffle reshape ties to a
channel of another group go only together, so pruning one of them alone saves nothing. Searches
steer by the count and report what `speedup` leaves (`best["simplified_macs"]`). Unstructured zeros
(LevelPruner) change neither count: a dense runtime computes them.

Latency. `measure_latency` exports the masked model, simplifies it (parity-checked against PyTorch,
see speedup.py) and times it on onnxruntime; results are cached by *architecture* — the number of
channels each group keeps — since which channels are kept does not change the cost.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .groups import DependencyGroups
from .pruner import WEIGHTED, FilterPruner


@dataclass
class _Layer:
    shape: tuple[int, ...]       # weight shape
    positions: int               # per call, summed over calls
    transposed: bool             # ConvTranspose: weight [in, out / groups, k...]
    padded: bool = False         # a full (groups = 1) Conv with zero padding: pruned inputs leave a border map


@dataclass
class Resources:
    """Counts MACs / parameters of `model` on `dummy_input` (as the export of that input counts them) for any choice of pruned
    channels per group; built once per search (`Resources.of(model, dummy_input, groups)`)."""

    groups: DependencyGroups
    layers: dict[str, _Layer]
    dense_macs: int = 0
    dense_params: int = 0
    _cut: dict = field(default_factory=dict, repr=False)  # (gi, ci) -> [(module, axis, indices)]

    @classmethod
    def of(cls, model, dummy_input, groups: DependencyGroups) -> Resources:
        layers = _layer_positions(model, dummy_input)
        r = cls(groups, layers)
        for gi, g in enumerate(groups):
            for ci, ch in enumerate(g.channels):
                r._cut[gi, ci] = [(s.module, s.axis, s.indices) for s in ch.slices
                                  if s.param == "weight" and s.module in layers]
        r.dense_macs, r.dense_params = r.count({})
        return r

    def count(self, pruned: dict[int, list[int]]) -> tuple[int, int]:
        """(MACs, weight entries of the Conv / Linear layers) with channels `pruned[gi]` of each group removed."""
        gone: dict[str, list[set[int]]] = {}
        for gi, channels in pruned.items():
            for ci in channels:
                for module, axis, indices in self._cut[gi, ci]:
                    gone.setdefault(module, [set(), set()])[min(axis, 1)].update(indices)
        macs = params = 0
        for name, layer in self.layers.items():
            rows, cols = gone.get(name, (set(), set()))
            kept_rows, kept_cols = layer.shape[0] - len(rows), layer.shape[1] - len(cols)
            entries = kept_rows * kept_cols * int(np.prod(layer.shape[2:], dtype=np.int64))
            macs += entries * layer.positions
            params += entries
            if layer.padded and cols and kept_rows:   # the border map: one input channel, the same kernel
                macs += kept_rows * int(np.prod(layer.shape[2:], dtype=np.int64)) * layer.positions
        return macs, params

    def macs(self, pruned) -> int:
        return self.count(pruned)[0]

    def at(self, sparsities: dict[int, float]) -> tuple[int, int]:
        """(MACs, params) when group gi loses `sparsities[gi]` of its channels (the free ones first;
        which channels does not change the count within a group of uniform channels)."""
        return self.count({gi: self.groups.groups[gi].free[:self.groups.groups[gi].pruned_count(s)]
                           for gi, s in sparsities.items()})

    def of_model(self, model) -> tuple[int, int]:
        """(MACs, params) of `model` as its current masks prune it."""
        return self.count(pruned_channels(model, self.groups))


def pruned_channels(model, groups: DependencyGroups) -> dict[int, list[int]]:
    """group index -> the channels the model's masks prune (every producer row zeroed)."""
    from .masks import current_masks

    existing = current_masks(model)
    out = {}
    for gi, g in enumerate(groups):
        done = np.flatnonzero(FilterPruner.already_pruned(g, existing)).tolist()
        if done:
            out[gi] = done
    return out


def architecture(model, groups: DependencyGroups) -> tuple[int, ...]:
    """Channels kept per group: what the simplified model's shapes depend on."""
    pruned = pruned_channels(model, groups)
    return tuple(g.size - len(pruned.get(gi, ())) for gi, g in enumerate(groups))


def _layer_positions(model, dummy_input) -> dict[str, _Layer]:
    """Weight shape and positions per call of every Conv / ConvTranspose / Linear, from one forward."""
    import torch

    from .export import as_args

    layers: dict[str, _Layer] = {}
    handles = []

    def hook(name, transposed):
        def record(module, args, out):
            x = args[0] if transposed else out
            # Linear: every leading position; Conv: the batch and the spatial positions
            dims = x.shape[:-1] if isinstance(module, torch.nn.Linear) else (x.shape[0],) + tuple(x.shape[2:])
            w = module.weight
            padded = (isinstance(module, torch.nn.modules.conv._ConvNd) and not transposed and module.groups == 1
                      and (module.padding == "same" or any(p > 0 for p in module.padding)))
            layer = layers.setdefault(name, _Layer(tuple(w.shape), 0, transposed, padded))
            layer.positions += int(np.prod(dims, dtype=np.int64))
        return record

    for name, m in model.named_modules():
        if type(m).__name__ in WEIGHTED:
            transposed = isinstance(m, torch.nn.modules.conv._ConvTransposeNd)
            handles.append(m.register_forward_hook(hook(name, transposed)))
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(*as_args(dummy_input))   # eval: BatchNorm takes a batch of one, and its statistics stay
    finally:
        model.train(training)
        for h in handles:
            h.remove()
    return layers


class LatencyCache:
    """Measured onnxruntime latency (ms) of simplified candidates, by architecture. The first model
    measured (a search's dense model) is the reference; every later candidate is timed interleaved
    with it, run by run, and costs reference_ms × the median per-run ratio — machine drift during a
    long search hits both alike and cancels (medians of separate runs wandered by more than a
    search step on a shared machine)."""

    def __init__(self, dummy_input, groups: DependencyGroups, threads: int = 1, runs: int = 20,
                 exporter: str = "torchscript"):
        self.dummy_input, self.groups, self.threads, self.runs, self.exporter = dummy_input, groups, threads, runs, exporter
        self.measured: dict[tuple[int, ...], float] = {}
        self.reference = None

    def __call__(self, model) -> float:
        from ..timing import time_models

        key = architecture(model, self.groups)
        if key not in self.measured:
            small = simplified(model, self.dummy_input, self.exporter)
            if self.reference is None:
                self.reference = small
                self.measured[key] = time_models({"reference": small}, threads=self.threads, runs=self.runs)["reference"]
                self.reference_ms = self.measured[key]
            else:
                t = time_models({"reference": self.reference, "candidate": small}, threads=self.threads,
                                runs=self.runs, samples=True)
                ratio = float(np.median(np.array(t["candidate"]) / np.array(t["reference"])))
                self.measured[key] = self.reference_ms * ratio
        return self.measured[key]


def simplified(model, dummy_input, exporter: str = "torchscript"):
    """The masked model exported, simplified and checked against PyTorch (`speedup`)."""
    from .speedup import speedup

    return speedup(model, dummy_input, exporter=exporter, batches=1)[0]


def measure_latency(model, dummy_input, threads: int = 1, runs: int = 20, exporter: str = "torchscript") -> float:
    """Median onnxruntime latency (ms) of `model` exported, simplified and checked by `speedup`."""
    from ..timing import time_models

    return time_models({"candidate": simplified(model, dummy_input, exporter)}, threads=threads, runs=runs)["candidate"]


__all__ = ["Resources", "LatencyCache", "measure_latency", "pruned_channels", "architecture"]
