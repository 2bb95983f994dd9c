"""The channel dependency graph: every channel slot (tensor, index) is a node of a union-find.

A tensor's channels live on one or more contiguous axes (usually axis 1; a channel shuffle's
[N, g, C/g, H, W] spreads them over two). Op rules (see `rules.py`) give each output tensor its
space, unite the slots that must live or die together, pin the ones that must not be touched,
compute which slots carry an input-independent constant, and list the *reads*: the places where
a linear layer (Conv, Gemm, MatMul ...) consumes a slot through one weight column.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx

from ..graph import Graph
from .registry import rule_for


@dataclass(frozen=True)
class Space:
    axes: tuple[int, ...]  # contiguous axes of the tensor that carry its channels
    dims: tuple[int, ...]  # their sizes; slots are numbered in row-major order over them
    base: int              # id of the first slot

    @property
    def size(self) -> int:
        return math.prod(self.dims)

    @property
    def slots(self) -> np.ndarray:
        return np.arange(self.base, self.base + self.size)


@dataclass
class Read:
    """A linear layer reading one slot of a tensor through its own weights."""
    node: str          # node name
    tensor: str
    index: int         # slot index within the tensor's space
    zero: bool         # the weights that read it are all exactly zero
    absorbable: bool   # its value is a known constant whose contribution can be folded exactly
    why_not: str = ""  # when a known constant is not absorbable


@dataclass
class ReadBlock:
    """The reads of one linear layer's input, as arrays over the slots of `tensor`'s space (what a
    rule's `reads` returns: one block per read input, not one object per slot)."""
    node: str
    tensor: str
    zero: np.ndarray        # bool per slot
    absorbable: np.ndarray  # bool per slot
    why_not: np.ndarray     # str per slot ("" where absorbable or not a known constant)

    def read(self, k: int) -> Read:
        return Read(self.node, self.tensor, k, bool(self.zero[k]), bool(self.absorbable[k]), str(self.why_not[k]))


@dataclass
class ChannelClass:
    root: int
    slots: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    pins: set[str] = field(default_factory=set)
    verdict: object = None  # verdict.judge's answer, once asked


class ChannelGraph:
    def __init__(self, g: Graph):
        self.g = g
        self.shapes = g.shapes
        self.spaces: dict[str, Space] = {}
        self.n_slots = 0
        self._parent = np.zeros(0, np.int64)  # every slot's class root, as of the last _resolve
        self._edges: list[tuple[np.ndarray, np.ndarray]] = []  # unions not yet resolved
        self._derived: dict = {}              # what `derived` computed, and for how many reads
        self.pin_reasons: dict[int, str] = {}
        # per slot: a uniform constant (values, NaN = unknown) or an input-independent but
        # non-uniform map over the other axes (maps: tensor -> slot -> array of rest_shape)
        self.values: dict[str, np.ndarray] = {}
        self.maps: dict[str, dict[int, np.ndarray]] = {}
        self.read_blocks: list[ReadBlock] = []
        self.nodes: dict[str, onnx.NodeProto] = {}

    # --- spaces ----------------------------------------------------------------------
    def shape(self, name: str) -> tuple | None:
        return self.shapes.get(name)

    def rank(self, name: str) -> int | None:
        s = self.shape(name)
        return None if s is None else len(s)

    def space(self, name: str) -> Space | None:
        return self.spaces.get(name) if name else None

    def new_space(self, name: str, axes: tuple[int, ...]) -> Space | None:
        shape = self.shape(name)
        if shape is None or not axes or max(axes) >= len(shape) or min(axes) < 0:
            return None
        dims = tuple(shape[a] for a in axes)
        if any(d is None or d <= 0 for d in dims):
            return None
        sp = Space(tuple(axes), dims, self.n_slots)
        n = sp.size
        self.n_slots += n
        self._derived.clear()
        self.spaces[name] = sp
        self.values[name] = np.full(n, np.nan)
        return sp

    def same_space(self, src: str, dst: str, axes: tuple[int, ...] | None = None) -> Space | None:
        """Give `dst` a space slot-for-slot equal to `src`'s (on `axes`, default the same axes)."""
        sp = self.space(src)
        if sp is None:
            return None
        out = self.new_space(dst, axes if axes is not None else sp.axes)
        if out is None or out.size != sp.size:
            reason = f"{dst}: channel layout not understood"
            self.pin_space(sp, reason)
            return self.pin_space(out, reason)
        self.unite(sp.slots, out.slots)
        return out

    # --- union-find ------------------------------------------------------------------
    # Rules unite whole spaces at a time; the unions are collected and resolved in bulk with
    # numpy (hook larger roots onto smaller ones, then shortcut every path), so the cost is a few
    # vector passes over the edges instead of a Python loop per slot. A class's root is its
    # smallest slot id.
    def find(self, a: int) -> int:
        return int(self._resolve()[a])

    def unite(self, a, b) -> None:
        a, b = np.asarray(a, np.int64).ravel(), np.asarray(b, np.int64).ravel()
        if a.size:
            self._edges.append((a, b))
            self._derived.clear()

    def _resolve(self) -> np.ndarray:
        parent = self._parent
        if parent.size < self.n_slots:
            parent = np.concatenate([parent, np.arange(parent.size, self.n_slots, dtype=np.int64)])
        if self._edges:
            a = np.concatenate([e[0] for e in self._edges])
            b = np.concatenate([e[1] for e in self._edges])
            self._edges = []
            while True:
                ra, rb = parent[a], parent[b]
                differ = ra != rb
                if not differ.any():
                    break
                lo, hi = np.minimum(ra[differ], rb[differ]), np.maximum(ra[differ], rb[differ])
                np.minimum.at(parent, hi, lo)  # hi are roots: they now point at a smaller root
                while True:
                    jumped = parent[parent]
                    if np.array_equal(jumped, parent):
                        break
                    parent = jumped
        self._parent = parent
        return parent

    def pin(self, slots, reason: str) -> None:
        self._derived.clear()
        for s in np.asarray(slots).ravel().tolist():
            self.pin_reasons.setdefault(s, reason)

    def pin_space(self, sp: Space | None, reason: str):
        if sp is not None:
            self.pin(sp.slots, reason)
        return sp

    def pin_tensor(self, name: str, reason: str) -> None:
        self.pin_space(self.space(name), reason)

    # --- what is derived from the finished graph ------------------------------------
    def derived(self, key: str, compute):
        """`compute()`, once: classes, the read table, the verdicts ... are asked after the build
        (values are final then); a new space, union, pin or read block drops them all."""
        if self._derived.get("reads") != len(self.read_blocks):
            self._derived = {"reads": len(self.read_blocks)}
        if key not in self._derived:
            self._derived[key] = compute()
        return self._derived[key]

    # --- classes ---------------------------------------------------------------------
    def roots(self) -> np.ndarray:
        return self._resolve().copy()

    def classes(self) -> dict[int, ChannelClass]:
        """Root -> class."""
        return self.derived("classes", self._classes)

    def _classes(self) -> dict[int, ChannelClass]:
        roots = self._resolve()
        order = np.argsort(roots, kind="stable")
        starts = np.flatnonzero(np.r_[True, roots[order][1:] != roots[order][:-1]]) if order.size else order
        ends = np.r_[starts[1:], order.size].astype(np.int64)
        out = {root: ChannelClass(root, order[s:e])
               for root, s, e in zip(roots[order[starts]].tolist(), starts.tolist(), ends.tolist())}
        for slot, reason in self.pin_reasons.items():
            out[int(roots[slot])].pins.add(reason)
        return out

    # --- reads -----------------------------------------------------------------------
    def read_table(self):
        """Every read as parallel arrays (global slot, block, index in the tensor, zero,
        absorbable), in build order."""
        return self.derived("read table", self._read_table)

    def _read_table(self):
        blocks = self.read_blocks
        if not blocks:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, bool), np.zeros(0, bool)
        return (np.concatenate([self.spaces[b.tensor].base + np.arange(b.zero.size) for b in blocks]),
                np.concatenate([np.full(b.zero.size, i) for i, b in enumerate(blocks)]),
                np.concatenate([np.arange(b.zero.size) for b in blocks]),
                np.concatenate([b.zero for b in blocks]).astype(bool),
                np.concatenate([b.absorbable for b in blocks]).astype(bool))

    def read_at(self, i: int) -> Read:
        _, block, index, _, _ = self.read_table()
        return self.read_blocks[int(block[i])].read(int(index[i]))

    @property
    def reads(self) -> list[Read]:
        """Every read as a Read (materialized: for the few callers that want them one by one)."""
        return [self.read_at(i) for i in range(self.read_table()[0].size)]

    def read_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """Per class root: how many of its reads have non-zero weights, and the number of the first
        of those that cannot absorb its value (-1: none; `read_at` gives it). What the verdict asks,
        for every class in one vector pass."""
        return self.derived("read counts", self._read_counts)

    def _read_counts(self):
        slot, _, _, zero, absorbable = self.read_table()
        r = self._resolve()[slot]
        live = np.bincount(r[~zero], minlength=self.n_slots)
        stuck = np.flatnonzero(~zero & ~absorbable)
        first = np.full(self.n_slots, slot.size)
        np.minimum.at(first, r[stuck], stuck)
        first[first == slot.size] = -1
        return live, first

    def known_slots(self) -> np.ndarray:
        """Per slot: does it carry an input-independent value (a constant or a map)?"""
        def compute():
            known = np.zeros(self.n_slots, bool)
            for name, sp in self.spaces.items():
                known[sp.base: sp.base + sp.size] = self.known(name)
            return known
        return self.derived("known slots", compute)

    def constant_roots(self) -> np.ndarray:
        """Per class root: does any slot of the class carry an input-independent value?"""
        return self.derived("constant roots", lambda: np.bincount(
            self._resolve(), weights=self.known_slots(), minlength=self.n_slots) > 0)

    # --- known values ----------------------------------------------------------------
    def known(self, name: str) -> np.ndarray:
        k = ~np.isnan(self.values[name])
        for slot in self.maps.get(name, {}):
            k[slot] = True
        return k

    def value(self, name: str, k: int):
        """A float (uniform constant), an array (input-independent map) or None (unknown)."""
        m = self.maps.get(name, {}).get(k)
        if m is not None:
            return m
        v = self.values[name][k]
        return None if np.isnan(v) else float(v)

    def rest_shape(self, name: str) -> tuple | None:
        """Shape of one channel's values at batch 1: the tensor's shape without its channel axes."""
        sp, shape = self.space(name), self.shape(name)
        rest = tuple(1 if i == 0 else d for i, d in enumerate(shape) if i not in sp.axes)
        return None if any(d is None for d in rest) else rest

    def full_values(self, name: str) -> np.ndarray | None:
        """The tensor at batch 1 with every known slot filled in (unknown slots 0)."""
        sp, rest = self.space(name), self.rest_shape(name)
        if rest is None:
            return None
        arr = np.zeros((sp.size,) + rest)
        v = self.values[name]
        arr[~np.isnan(v)] = v[~np.isnan(v)].reshape((-1,) + (1,) * len(rest))
        for k, m in self.maps.get(name, {}).items():
            arr[k] = m
        arr = arr.reshape(sp.dims + rest)
        return np.moveaxis(arr, tuple(range(len(sp.axes))), sp.axes)

    def store(self, name: str, result: np.ndarray, known: np.ndarray) -> None:
        """Record an evaluated batch-1 tensor: uniform channels as constants, the others as maps."""
        sp = self.space(name)
        per = np.moveaxis(np.asarray(result, np.float64), sp.axes, tuple(range(len(sp.axes)))).reshape(sp.size, -1)
        lo, hi = per.min(axis=1), per.max(axis=1)
        uniform = lo == hi
        self.values[name] = np.where(known & uniform, lo, np.nan)
        rest = self.rest_shape(name)
        self.maps[name] = {int(k): per[k].reshape(rest) for k in np.flatnonzero(known & ~uniform)}

    def take(self, src: str, dst: str, index: np.ndarray) -> None:
        """dst slot i carries src slot index[i] (layout ops that keep the other axes as they are)."""
        self.values[dst] = self.values[src][index]
        src_maps = self.maps.get(src, {})
        if src_maps:
            self.maps[dst] = {i: src_maps[int(k)] for i, k in enumerate(index) if int(k) in src_maps}


def build_channel_graph(g: Graph, pins: set[str] | frozenset = frozenset()) -> ChannelGraph:
    cg = ChannelGraph(g)
    # graph inputs get no channel space: any op that would couple channels with them pins its side
    nodes = g.nodes
    for node in nodes:
        cg.nodes[node.name] = node
        rule_for(node).couple(node, cg)
    for name in g.output_names:
        cg.pin_tensor(name, f"graph output {name}")
    for name in pins:
        cg.pin_tensor(name, f"pinned by user ({name})")
    for node in nodes:
        rule_for(node).values(node, cg)
    for node in nodes:
        cg.read_blocks.extend(rule_for(node).reads(node, cg))
    return cg
