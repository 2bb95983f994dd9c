"""Multi-head attention blocks built by hand as ONNX (opset 17, float32, batch 1), for the fuzzer.

`AttentionSpec` says how a block is written (fused or separate q/k/v projections, biases, scale,
mask, rotary, grouped-query attention, residual, symbolic token count ...); `HeadZeros` says which
weight entries are zeroed, per head and head feature (biases are always kept); `build_attention`
returns the ONNX model and, per layer, the names of its projection nodes. `dead_heads` computes, for
one layer, which query heads provably contribute an input-independent constant to the output
projection — and so must go:

  * a query head i is dead when its output-projection rows (torch: columns) are all zero, or when
    the v head it reads (kv_of(i)) has all of its v weight columns (torch: rows) zero (the head
    then outputs its v bias, whatever the attention, because each attention row sums to one; not
    under the traps: a Softmax over another axis, attention scaled after the Softmax, constant
    prefix values);
  * in grouped-query attention a k / v head, and with it its query heads, goes only when *every*
    query head of its group is dead;
  * q / k zeroed alone never kill a head (uniform attention outputs the mean of v: input-dependent);
    with v zeroed as well they do, even where the attention rows do not sum to one (a constant
    attention times constant values).

Weight layout is ONNX MatMul's [in, out]: a head's q / k / v features are *columns* of the q / k / v
weights, a head's output features are *rows* of the output projection's weight.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 10
INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class AttentionSpec:
    tokens: int = 5                 # N (the fixed one; with `symbolic`, the size of the example input)
    hidden: int = 8
    heads: int = 2                  # h (query heads)
    head_dim: int = 4               # d
    kv_heads: int | None = None     # GQA: k / v heads (h // ratio); None: = heads
    layers: int = 1
    qkv: str = "separate"           # "separate" | "fused" (one MatMul, Reshape [B,N,3,h,d], Gather) | "split"
                                    # (Split of [B,N,(h+2kv)·d]) | "neox" (Reshape [B,N,h,3·d], Split of d)
    q_bias: bool = True
    k_bias: bool = True
    v_bias: bool = True
    o_bias: bool = True
    scale: str = "Div"              # "Mul" | "Div" (the scores by a scalar) | "qk" (q and k each · d^-1/4)
                                    # | "q" (q · d^-1/2)
    scale_rank: int = 0             # the scalar constant's rank (0, 1 or 4)
    mask: str | None = None         # added to the scores: None | "causal" [N,N] | "causal4" [1,1,N,N] | "key" [1,1,1,N]
                                    # | "where" (Where(causal bool [N,N], scores, mask_value))
    mask_value: float = -1e4
    tables: str = "exact"           # mask / rotary tables: "exact" [N, ...] or "sliced" from a longer table
    softmax_axis: int = -1          # -1 or 3 (the last axis); 2: a trap (columns sum to one, not rows)
    post_softmax: bool = False      # trap: attention · a non-uniform [N,N] constant (rows no longer sum to 1)
    rotary: bool = False            # q, k · cos + rotate_half(q, k) · sin (d even)
    rotary_axis: int = -1           # the axis the rotate_half Slices / Concat name (-1 or 3)
    rotary_halves: str = "const"    # rotate_half's halves: "const" Slices [0:d/2], [d/2:d]; "negative"
                                    # [0:-d/2], [-d/2:]; "computed" ends from Shape(x)[-1] // 2 (as
                                    # torch exports x[..., : x.shape[-1] // 2]); "split" (Split in 2);
                                    # "interleaved" (GPT-J: Slices step 2, stacked, Reshape to d)
    residual: bool = False
    residual_first: bool = True     # Add(x, o) or Add(o, x)
    reshape: str = "explicit"       # "explicit" [1,N,h,d] | "zero" [0,0,h,d] | "minus1" [1,-1,h,d] |
                                    # "computed" Concat(B, N from Shape(layer input), [h], [d]) (torchscript;
                                    # the GQA Expand's shape through torch's Where(Equal(s, -1), 1, s))
    gqa_expand: str = "full"        # Expand's shape: "full" [1,kv,r,N,d] | "ones" [1,1,r,1,1]
    gqa_tile: bool = False          # the repeat as a tile (Unsqueeze axis 1, Expand [1,r,kv,N,d]):
                                    # query head i reads k / v head i % kv, not i // r
    mqa_broadcast: bool = False     # one k / v head (kv = 1) broadcast by the MatMuls, not repeated
    gqa_5d: bool = False            # GQA without the repeat: q [1,kv,r,N,d] against k / v [1,kv,1,N,d]
    k_direct: bool = False          # Kᵀ by one Transpose (0,2,3,1) of [1,N,h,d] (no rotary, no GQA)
    fused_parts: str = "gather"     # fused: "gather" (Gather 0/1/2) | "split" (Split axis 0 + Squeeze)
    merge_last: bool = False        # the merge Reshape writes its last dim as -1
    pre_norm: bool = False          # LayerNormalization over the hidden axis before the projections
    prefix: int = 0                 # P constant k / v tokens before the computed ones (Concat on the
                                    # token axis: learned prefixes, a constant cache). Trap: v zeroed is
                                    # no longer constant over the keys, the head stays
    head_bias: bool = False         # a per-head constant [1,h,N,P+N] added to the scores (ALiBi)
    head_scale: bool = False        # the scores · a per-head constant [1,h,1,1] (a learned temperature)
    bmm3: bool = False              # attention as 3-D batched products: [h, N, d] (older exporters)
    attn_output: bool = False       # the attention probabilities are a graph output too (pinned)
    identities: bool = False        # Identity nodes between the pieces (what some exporters leave)
    symbolic: bool = False          # the token axis of the input is named "N"

    @property
    def kv(self) -> int:
        return self.kv_heads or self.heads

    @property
    def ratio(self) -> int:
        return self.heads // self.kv

    def kv_of(self, i: int) -> int:
        """The k / v head query head i reads."""
        return i % self.kv if self.gqa_tile else i // self.ratio

    def group(self, g: int) -> list[int]:
        """The query heads that read k / v head g."""
        return [i for i in range(self.heads) if self.kv_of(i) == g]

    @property
    def max_tokens(self) -> int:
        """The length of "sliced" tables (and of every table with a symbolic N)."""
        return self.tokens + 4

    def check(self) -> None:
        assert self.heads % self.kv == 0
        assert self.qkv not in ("fused", "neox") or self.kv == self.heads, "fused qkv needs as many k/v as q heads"
        assert not self.rotary or self.head_dim % 2 == 0
        assert not self.symbolic or self.reshape != "explicit"
        assert not self.symbolic or self.gqa_expand == "ones" or self.reshape == "computed"
        assert not self.mqa_broadcast or self.kv == 1
        assert not self.gqa_5d or (self.ratio > 1 and not self.gqa_tile and not self.bmm3 and not self.mqa_broadcast)
        assert not (self.merge_last and self.reshape in ("minus1", "computed"))
        assert not self.prefix or not self.k_direct
        assert not self.bmm3 or (self.mask in (None, "causal", "where") and not self.mqa_broadcast)
        assert not self.k_direct or (self.qkv in ("separate", "split") and not self.rotary and self.ratio == 1)


@dataclass
class HeadZeros:
    """Zeroed weight entries of one layer: head -> the set of its zeroed features (0 .. d-1).
    q, o: query heads; k, v: k / v heads."""
    q: dict = field(default_factory=dict)
    k: dict = field(default_factory=dict)
    v: dict = field(default_factory=dict)
    o: dict = field(default_factory=dict)


@dataclass
class LayerNames:
    """Node names of one layer's projections (MatMuls with constant weights, as the report keys them)."""
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None          # fused / split: the one projection
    o: str = ""


def v_zeros(spec: AttentionSpec, zeros: HeadZeros) -> dict:
    """The zeroed v features that make a head's output features constant: all of them where every
    attention row sums to one; under the traps (post-softmax scaling, Softmax over the query axis)
    only where v is 0 itself (no v bias), which stays 0 whatever multiplies it; with a constant
    prefix of other values, none."""
    if spec.prefix:  # the prefix's values are other constants: v is not constant over the keys
        return {}
    rows_sum_to_one = not spec.post_softmax and spec.softmax_axis in (-1, 3)
    return zeros.v if rows_sum_to_one or not spec.v_bias else {}


def constant_attention(spec: AttentionSpec, zeros: HeadZeros, i: int) -> bool:
    """Query head i's attention weights are input-independent: q = 0 (weights zero, no bias), or
    k = 0 (and no constant prefix keys), or both q and k constants (weights zero, any biases)."""
    full, g = set(range(spec.head_dim)), spec.kv_of(i)
    q0, k0 = zeros.q.get(i, set()) >= full, zeros.k.get(g, set()) >= full
    return (q0 and not spec.q_bias) or (k0 and not spec.k_bias and not spec.prefix) or (q0 and k0)


def constant_features(spec: AttentionSpec, zeros: HeadZeros, i: int) -> set[int]:
    """The output features of query head i that are input-independent: its v head's zeroed
    features where the attention rows sum to one (v_zeros), any zeroed v feature where the attention
    itself is constant (then the head's output is a constant mix of constants)."""
    g = spec.kv_of(i)
    if constant_attention(spec, zeros, i):
        return set(zeros.v.get(g, set()))
    return set(v_zeros(spec, zeros).get(g, set()))


def dead_heads(spec: AttentionSpec, zeros: HeadZeros) -> set[int]:
    """The query heads that must go (see the module docstring): whole groups only; a head is dead
    when all of its output rows are zero or all of its output features are constant."""
    full = set(range(spec.head_dim))

    def dead_q(i):
        return zeros.o.get(i, set()) >= full or constant_features(spec, zeros, i) >= full

    dead = set()
    for g in range(spec.kv):
        group = spec.group(g)
        if all(dead_q(i) for i in group):
            dead.update(group)
    return dead


def covered_heads(spec: AttentionSpec, zeros: HeadZeros) -> set[int]:
    """Query heads whose every feature is constant or unread (output row zero), in any mix:
    provably input-independent too, a superset of the whole-head rule's victims."""
    return {i for i in range(spec.heads)
            if all(f in zeros.o.get(i, ()) or f in constant_features(spec, zeros, i) for f in range(spec.head_dim))}


class _Graph:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, np.ndarray] = {}
        self._count = 0

    def fresh(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}_{self._count}"

    def const(self, prefix: str, array) -> str:
        name = self.fresh(prefix)
        self.inits[name] = np.asarray(array)
        return name

    def ints(self, prefix: str, values) -> str:
        return self.const(prefix, np.array(values, np.int64))

    def op(self, op_type: str, inputs, name: str | None = None, n_out: int = 1, **attributes):
        name = name or self.fresh(op_type.lower())
        outs = [name] if n_out == 1 else [f"{name}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=name, **attributes))
        return outs[0] if n_out == 1 else outs

    def randn(self, *shape, scale=1.0) -> np.ndarray:
        return (self.rng.standard_normal(shape) * scale).astype(np.float32)


def _reshape_shape(spec: AttentionSpec, dims: list[int]) -> list[int]:
    """[1, N, *rest] as the spec writes reshape targets: explicit / 0-copies / -1 for N."""
    rest = dims[2:]
    if spec.reshape == "zero":
        return [0, 0] + rest
    if spec.reshape == "minus1":
        return [1, -1] + rest
    return [1, spec.tokens] + rest


class _Block:
    """One spec's graph, layer by layer."""

    def __init__(self, spec: AttentionSpec, seed: int):
        spec.check()
        self.s = spec
        self.g = _Graph(seed)
        self._n1 = None  # symbolic / sliced tables: [N] (1-D) read from the input's shape
        self.extra_outputs: list[str] = []

    # --- tables sized to the sequence ---------------------------------------------------------------
    def n1(self, x: str) -> str:
        if self._n1 is None:
            g = self.g
            shape = g.op("Shape", [x], name="tokens_shape")
            self._n1 = g.op("Slice", [shape, g.ints("s1", [1]), g.ints("e2", [2]), g.ints("a0", [0])], name="tokens_n")
        return self._n1

    def table(self, x: str, prefix: str, full: np.ndarray, axes: list[int], offsets=None) -> str:
        """`full` (built for max_tokens + offset along each of `axes`) as the model sees it for N
        tokens: N + offset along each axis (the key axis of a block with a prefix: P + N)."""
        s, g = self.s, self.g
        offsets = offsets or [0] * len(axes)
        if s.tables == "exact" and not s.symbolic:
            idx = [slice(None)] * full.ndim
            for a, off in zip(axes, offsets):
                idx[a] = slice(0, s.tokens + off)
            return g.const(prefix, np.ascontiguousarray(full[tuple(idx)]))
        n = self.n1(x)
        ends = [n if not off else g.op("Add", [n, g.ints("offset", [off])]) for off in offsets]
        ends = ends[0] if len(ends) == 1 else g.op("Concat", ends, axis=0)
        return g.op("Slice", [g.const(prefix, full), g.ints("zeros", [0] * len(axes)), ends, g.ints("axes", axes)])

    def key_table(self, x: str, prefix: str, full: np.ndarray) -> str:
        """A [..., N, P+N] table over (query, key), built for max_tokens."""
        return self.table(x, prefix, full, [full.ndim - 2, full.ndim - 1], [0, self.s.prefix])

    def id(self, t: str) -> str:
        return self.g.op("Identity", [t]) if self.s.identities and self.g.rng.random() < 0.3 else t

    def mask(self, x: str) -> str | None:
        s = self.s
        m, p = s.max_tokens, s.prefix
        if s.mask in ("causal", "causal4"):  # query i sees the prefix and keys up to itself
            full = np.triu(np.full((m, p + m), s.mask_value, np.float32), p + 1)
            return self.key_table(x, "causal_mask", full.reshape(1, 1, m, p + m) if s.mask == "causal4" else full)
        if s.mask == "where":  # a boolean "may attend" table: Where(keep, scores, mask_value)
            return self.key_table(x, "causal_keep", np.tril(np.ones((m, p + m), bool), p))
        if s.mask == "key":
            keep = self.g.rng.random(p + m) < 0.6
            keep[0] = True  # every query keeps a key (an all-masked row is not a softmax any exporter writes)
            full = np.where(keep, 0.0, s.mask_value).astype(np.float32).reshape(1, 1, 1, p + m)
            return self.table(x, "key_mask", full, [3], [p])
        return None

    # --- pieces ---------------------------------------------------------------------------------------
    def scalar(self, prefix: str, value: float) -> str:
        """A scalar constant of rank scale_rank (0, 1 or up to 4: broadcast along every axis; at
        most 3 in 3-D attention, which it must not turn into 4-D)."""
        rank = min(self.s.scale_rank, 3) if self.s.bmm3 else self.s.scale_rank
        return self.g.const(prefix, np.full((1,) * rank, value, np.float32))

    def dim(self, axis: int, plus: int = 0) -> str:
        """[dim `axis` of the layer's input (+ plus)], from its Shape, as torchscript writes it."""
        g = self.g
        shape = g.op("Shape", [self.src])
        one = g.op("Unsqueeze", [g.op("Gather", [shape, g.const("axis", np.array(axis, np.int64))], axis=0),
                                 g.ints("axes", [0])])
        return g.op("Add", [one, g.ints("plus", [plus])]) if plus else one

    def target(self, dims: list) -> str:
        """A reshape / expand target [1, N, *rest]: "B", "N", "K" (N + prefix) are symbolic entries
        (computed from the layer input's shape when reshape == "computed", else as the spec writes)."""
        s, g = self.s, self.g
        if s.reshape == "computed":
            sym = {"B": lambda: self.dim(0), "N": lambda: self.dim(1), "K": lambda: self.dim(1, s.prefix)}
            return g.op("Concat", [sym[v]() if isinstance(v, str) else g.ints("dim", [v]) for v in dims], axis=0)
        if dims[:2] == ["B", "N"]:
            return g.ints("shape", _reshape_shape(s, [1, 0] + dims[2:]))
        n = s.tokens + s.prefix
        explicit = [{"B": 1, "K": n, "N": s.tokens}.get(v, v) if isinstance(v, str) else v for v in dims]
        if s.reshape == "explicit":
            return g.ints("shape", explicit)
        return g.ints("shape", [0 if v == "B" else -1 if v in ("K", "N") else v for v in dims])

    def heads_first(self, t: str, heads: int, perm=(0, 2, 1, 3)) -> str:
        """[1, N, heads·d] -> [1, heads, N, d] (perm (0,2,3,1): [1, heads, d, N])."""
        g, d = self.g, self.s.head_dim
        r = g.op("Reshape", [t, self.target(["B", "N", heads, d])])
        return g.op("Transpose", [r], perm=list(perm))

    def rotate(self, t: str, cos: str, sin: str) -> str:
        """t · cos + rotate_half(t) · sin, rotate_half(t) = [-t2, t1] (interleaved: [-t1, t0, -t3, t2 ...])."""
        g, d, ax, how = self.g, self.s.head_dim, self.s.rotary_axis, self.s.rotary_halves
        h = d // 2
        if how == "interleaved":
            even, odd = (g.op("Slice", [t, g.ints("st", [start]), g.ints("en", [INT64_MAX]), g.ints("ax", [ax]),
                                        g.ints("step", [2])]) for start in (0, 1))
            pair = [g.op("Unsqueeze", [p, g.ints("axes", [-1])]) for p in (g.op("Neg", [odd]), even)]
            rot = g.op("Reshape", [g.op("Concat", pair, axis=-1), g.ints("shape", [0, 0, 0, d])])
        else:
            if how == "split":
                a, b = g.op("Split", [t, g.ints("halves", [h, h])], n_out=2, axis=ax)
            else:
                if how == "computed":
                    last = g.op("Gather", [g.op("Shape", [t]), g.const("last", np.array(-1, np.int64))], axis=0)
                    half = g.op("Unsqueeze", [g.op("Div", [last, g.const("two", np.array(2, np.int64))]),
                                              g.ints("axes", [0])])
                    mid = [half, half]
                elif how == "negative":
                    mid = [g.ints("en", [-h]), g.ints("st", [-h])]
                else:
                    mid = [g.ints("en", [h]), g.ints("st", [h])]
                end = g.ints("en", [INT64_MAX if g.rng.random() < 0.5 else d])
                a = g.op("Slice", [t, g.ints("st", [0]), mid[0], g.ints("ax", [ax])])
                b = g.op("Slice", [t, mid[1], end, g.ints("ax", [ax])])
            rot = g.op("Concat", [g.op("Neg", [b]), a], axis=ax)
        return g.op("Add", [g.op("Mul", [t, cos]), g.op("Mul", [rot, sin])])

    def repeat(self, t: str) -> str:
        """[1, kv, N, d] -> [1, h, N, d], each k / v head `ratio` times (the GQA repeat)."""
        s, g = self.s, self.g
        if s.ratio == 1 or s.mqa_broadcast:
            return t
        if s.gqa_5d:
            return g.op("Unsqueeze", [t, g.ints("axes", [2])])
        u = g.op("Unsqueeze", [t, g.ints("axes", [1 if s.gqa_tile else 2])])
        if s.gqa_tile:
            shape = ["B", s.ratio, s.kv, "K", s.head_dim] if s.gqa_expand == "full" else [1, s.ratio, 1, 1, 1]
        else:
            shape = ["B", s.kv, s.ratio, "K", s.head_dim] if s.gqa_expand == "full" else [1, 1, s.ratio, 1, 1]
        if s.reshape == "computed" and s.gqa_expand == "full":  # torch: Where(Equal(s, -1), 1, s)
            t5 = self.target(shape)
            minus = g.op("Equal", [t5, g.ints("minus1", [-1] * 5)])
            shape_t = g.op("Where", [minus, g.ints("ones", [1] * 5), t5])
        else:
            shape_t = g.ints("expand", [1 if v == "B" else s.prefix + s.tokens if v == "K" else v for v in shape])
        e = g.op("Expand", [u, shape_t])
        return g.op("Reshape", [e, self.target(["B", s.heads, "K", s.head_dim])])

    def linear(self, x: str, w: np.ndarray, b: np.ndarray | None, name: str) -> str:
        g = self.g
        y = g.op("MatMul", [x, g.const(name + "_W", w)], name=name)
        return g.op("Add", [y, g.const(name + "_B", b)]) if b is not None else y

    # --- one layer -----------------------------------------------------------------------------------
    def layer(self, x: str, li: int, zeros: HeadZeros, cos: str | None, sin: str | None, mask: str | None):
        s, g = self.s, self.g
        hid, h, kv, d = s.hidden, s.heads, s.kv, s.head_dim
        names = LayerNames(o=f"L{li}_o")
        block_input = self.src = x
        if s.pre_norm:
            x = g.op("LayerNormalization", [x, g.const("ln_g", g.randn(hid)), g.const("ln_b", g.randn(hid, scale=0.5))],
                     axis=-1, epsilon=1e-5)
        wq, wk, wv = (g.randn(hid, n * d, scale=1 / np.sqrt(hid)) for n in (h, kv, kv))
        bq, bk, bv = (g.randn(n * d, scale=0.5) for n in (h, kv, kv))
        wo, bo = g.randn(h * d, hid, scale=1 / np.sqrt(h * d)), g.randn(hid, scale=0.5)
        for w, per_head in ((wq, zeros.q), (wk, zeros.k), (wv, zeros.v)):
            for head, feats in per_head.items():
                for f in feats:
                    w[:, head * d + f] = 0
        for head, feats in zeros.o.items():
            for f in feats:
                wo[head * d + f, :] = 0

        if s.qkv == "separate":
            names.q, names.k, names.v = f"L{li}_q", f"L{li}_k", f"L{li}_v"
            q = self.heads_first(self.linear(x, wq, bq if s.q_bias else None, names.q), h)
            k = self.heads_first(self.linear(x, wk, bk if s.k_bias else None, names.k), kv,
                                 (0, 2, 3, 1) if s.k_direct else (0, 2, 1, 3))
            v = self.heads_first(self.linear(x, wv, bv if s.v_bias else None, names.v), kv)
        else:
            names.qkv = f"L{li}_qkv"
            bias = s.q_bias or s.k_bias or s.v_bias
            b = np.concatenate([bq if s.q_bias else 0 * bq, bk if s.k_bias else 0 * bk, bv if s.v_bias else 0 * bv])
            w = np.concatenate([wq, wk, wv], axis=1)
            if s.qkv == "neox":  # columns per head: [q_h, k_h, v_h], each d wide
                order = np.array([part * h * d + head * d + f
                                  for head in range(h) for part in range(3) for f in range(d)])
                w, b = w[:, order], b[order]
            qkv = self.linear(x, w, b if bias else None, names.qkv)
            if s.qkv == "neox":  # [1, N, h, 3·d] -> q, k, v [1, N, h, d] (Split or Slices) -> [1, h, N, d]
                r = g.op("Reshape", [qkv, self.target(["B", "N", h, 3 * d])])
                if s.fused_parts == "gather":
                    parts = [g.op("Slice", [r, g.ints("st", [i * d]), g.ints("en", [(i + 1) * d]), g.ints("ax", [-1])])
                             for i in range(3)]
                else:
                    parts = g.op("Split", [r, g.ints("thirds", [d, d, d])], n_out=3, axis=3)
                q, k, v = (g.op("Transpose", [p], perm=[0, 2, 1, 3]) for p in parts)
            elif s.qkv == "fused":  # [1, N, 3, h, d] -> [3, 1, h, N, d] -> Gather 0 / 1 / 2
                r = g.op("Reshape", [qkv, self.target(["B", "N", 3, h, d])])
                t = g.op("Transpose", [r], perm=[2, 0, 3, 1, 4])
                if s.fused_parts == "gather":
                    q, k, v = (g.op("Gather", [t, g.const("part", np.array(i, np.int64))], axis=0) for i in range(3))
                else:
                    parts = g.op("Split", [t, g.ints("ones", [1, 1, 1])], n_out=3, axis=0)
                    q, k, v = (g.op("Squeeze", [p, g.ints("axes", [0])]) for p in parts)
            else:  # "split": [1, N, (h + 2·kv)·d] split on the last axis
                parts = g.op("Split", [qkv, g.ints("sizes", [h * d, kv * d, kv * d])], n_out=3,
                             axis=-1 if g.rng.random() < 0.5 else 2)
                k_perm = (0, 2, 3, 1) if s.k_direct else (0, 2, 1, 3)
                q, k, v = (self.heads_first(p, n, perm) for p, n, perm in
                           zip(parts, (h, kv, kv), ((0, 2, 1, 3), k_perm, (0, 2, 1, 3))))
        if s.rotary:
            q, k = self.rotate(q, cos, sin), self.rotate(k, cos, sin)
        if s.prefix:  # constant keys / values before the computed ones (per k / v head)
            pk, pv = g.randn(1, kv, s.prefix, d), g.randn(1, kv, s.prefix, d)
            k = g.op("Concat", [g.const("prefix_k", pk), k], axis=2)
            v = g.op("Concat", [g.const("prefix_v", pv), v], axis=2)
        q, k, v = self.id(q), self.id(k), self.id(v)
        k, v = self.repeat(k), self.repeat(v)
        if s.scale == "qk":
            c = self.scalar("qk_scale", d ** -0.25)
            q, k = g.op("Mul", [q, c]), g.op("Mul", [k, c])
        elif s.scale == "q":
            q = g.op("Mul", [q, self.scalar("q_scale", d ** -0.5)])
        if s.gqa_5d:
            q = g.op("Reshape", [q, self.target(["B", kv, s.ratio, "N", d])])
            kt = g.op("Transpose", [k], perm=[0, 1, 2, 4, 3])
        else:
            kt = k if s.k_direct else g.op("Transpose", [k], perm=[0, 1, 3, 2])
        if s.bmm3:  # [1, h, N, d] -> [h, N, d] (k: [h, d, P+N])
            q = g.op("Reshape", [q, g.ints("shape", [h, -1, d])])
            kt = g.op("Reshape", [kt, g.ints("shape", [h, d, -1])])
            v = g.op("Reshape", [v, g.ints("shape", [h, -1, d])])
        scores = self.id(g.op("MatMul", [q, kt], name=f"L{li}_scores"))
        if s.scale == "Mul":
            scores = g.op("Mul", [scores, self.scalar("scale", 1 / np.sqrt(d))])
        elif s.scale == "Div":
            scores = g.op("Div", [scores, self.scalar("scale", np.sqrt(d))])
        if s.head_scale:
            shape = (h, 1, 1) if s.bmm3 else (1, kv, s.ratio, 1, 1) if s.gqa_5d else (1, h, 1, 1)
            scores = g.op("Mul", [scores, g.const("head_scale", g.rng.uniform(0.5, 2.0, shape).astype(np.float32))])
        if s.head_bias:  # ALiBi: -slope_h · |i - j|, j over the prefix and the keys
            m = s.max_tokens
            dist = np.abs(np.arange(m)[:, None] + s.prefix - np.arange(s.prefix + m)[None, :])
            slopes = 2.0 ** -(np.arange(1, h + 1) * 8 / h)
            full = (-slopes[:, None, None] * dist).astype(np.float32)
            if s.gqa_5d:
                full = full.reshape(1, kv, s.ratio, *full.shape[1:])
            scores = g.op("Add", [scores, self.key_table(x, "alibi", full if s.bmm3 or s.gqa_5d else full[None])])
        if s.mask == "where":
            scores = g.op("Where", [mask, scores, self.g.const("masked", np.array(s.mask_value, np.float32))])
        elif mask is not None:
            scores = g.op("Add", [scores, mask])
        # (the same axes at rank 3 / 5)
        axis = {-1: -1, 3: 2, 2: 1}[s.softmax_axis] if s.bmm3 else {-1: -1, 3: 4, 2: 3}[s.softmax_axis] if s.gqa_5d \
            else s.softmax_axis
        attn = g.op("Softmax", [scores], axis=axis, name=f"L{li}_softmax")
        if s.post_softmax:
            post = g.rng.uniform(0.5, 1.5, (s.max_tokens, s.prefix + s.max_tokens)).astype(np.float32)
            attn = g.op("Mul", [attn, self.key_table(x, "post", post)])
        if s.attn_output:
            self.extra_outputs.append(attn)
        ctx = g.op("MatMul", [self.id(attn), v], name=f"L{li}_context")
        if s.bmm3:
            ctx = g.op("Reshape", [ctx, g.ints("shape", [1, h, -1, d])])
        if s.gqa_5d:
            ctx = g.op("Reshape", [ctx, self.target(["B", h, "N", d])])
        ctx = g.op("Transpose", [ctx], perm=[0, 2, 1, 3])
        merged = g.op("Reshape", [ctx, self.target(["B", "N", -1 if s.merge_last else h * d])])
        out = self.linear(merged, wo, bo if s.o_bias else None, names.o)
        if s.residual:
            out = g.op("Add", [block_input, out] if s.residual_first else [out, block_input])
        return out, names

    def build(self, zeros: list[HeadZeros]) -> tuple[onnx.ModelProto, list[LayerNames]]:
        s, g = self.s, self.g
        x = "x"
        cos = sin = None
        if s.rotary:
            pos = np.arange(s.max_tokens)[:, None] * (1.0 / 10000 ** (np.arange(s.head_dim // 2) * 2 / s.head_dim))
            ang = np.repeat(pos, 2, axis=1) if s.rotary_halves == "interleaved" else np.concatenate([pos, pos], axis=1)
            cos = self.table(x, "cos", np.cos(ang).astype(np.float32), [0])
            sin = self.table(x, "sin", np.sin(ang).astype(np.float32), [0])
        mask = self.mask(x)
        names = []
        for li in range(s.layers):
            x, n = self.layer(x, li, zeros[li], cos, sin, mask)
            names.append(n)
        n_dim = "N" if s.symbolic else s.tokens
        keys = s.prefix + s.tokens if not s.symbolic else "K"
        attn_shape = ([s.heads, n_dim, keys] if s.bmm3 else [1, s.kv, s.ratio, n_dim, keys] if s.gqa_5d
                      else [1, s.heads, n_dim, keys])
        graph = helper.make_graph(
            g.nodes, "attention", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n_dim, s.hidden])],
            [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, n_dim, s.hidden])]
            + [helper.make_tensor_value_info(a, TensorProto.FLOAT, attn_shape) for a in self.extra_outputs],
            initializer=[numpy_helper.from_array(np.array(v, order="C"), k) for k, v in g.inits.items()])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
        onnx.checker.check_model(model, full_check=True)
        return model, names


def build_attention(spec: AttentionSpec, zeros: list[HeadZeros] | None = None, seed: int = 0):
    """(model, per layer LayerNames). `zeros`: one HeadZeros per layer (default: nothing zeroed)."""
    zeros = zeros if zeros is not None else [HeadZeros() for _ in range(spec.layers)]
    assert len(zeros) == spec.layers
    return _Block(spec, seed).build(zeros)


def expected_widths(spec: AttentionSpec, dead: set[int]) -> dict[str, tuple[int, int]]:
    """Per projection kind, the (in, out) features left when exactly the query heads `dead` (whole
    groups) go: q / o lose d per dead query head, k / v d per dead group."""
    d, hid = spec.head_dim, spec.hidden
    h_left = spec.heads - len(dead)
    kv_left = spec.kv - len(dead) // spec.ratio
    return {"o": (h_left * d, hid), "q": (hid, h_left * d), "k": (hid, kv_left * d), "v": (hid, kv_left * d),
            "qkv": (hid, (h_left + 2 * kv_left) * d)}


def feeds(spec: AttentionSpec, tokens: int, seed: int, scale: float = 1.5) -> dict[str, np.ndarray]:
    """A random input of `tokens` tokens (scaled like the conv fuzz's parity inputs)."""
    rng = np.random.default_rng(seed)
    return {"x": (rng.standard_normal((1, tokens, spec.hidden)) * scale).astype(np.float32)}
