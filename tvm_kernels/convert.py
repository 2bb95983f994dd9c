"""ONNX -> Relax, with every eligible Conv replaced by our kernels.

BSR: 2-D NCHW conv, groups = 1, constant float32 weight whose (C_out, C_in*kh*kw) matrix tiles
into (bsr x bsc) blocks and has at least `sparsity` block sparsity.
Depthwise: groups = C_in = C_out, constant float32 weight (any sparsity: it is the dense
remainder that meta_schedule tunes worst).
Each kernel swallows the chain that follows its conv when every intermediate result has no
other user: + constant bias, + a residual tensor of the same shape (a constant one too: a border
map from simplify), then any run of ReLU / Clip / max / min with constants (ReLU6 = max 0, min 6).
A matmul of a few rows by a constant (K, N) float32 matrix, + a constant bias (a classifier),
runs on our GEMV kernel (kernels.gemv_prim_func).
Direct: groups = 1, at most kernels.DIRECT_MAX_CIN input channels, not 1x1, dense or not (a
stem: its im2col cost more than the matmul it fed).
Depthwise planes get a mode (kernels.COMPUTE): unread where the output's one reader is a BSR conv
with no non-zero weight for that channel, a constant map where a fused expand row is all zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from . import kernels
from .bsr import BSRMatrix, block_sparsity, can_block, conv_weight_as_matrix, dense_to_bsr

CONV2D = tvm.ir.Op.get("relax.nn.conv2d")
ADD = tvm.ir.Op.get("relax.add")
RELU = tvm.ir.Op.get("relax.nn.relu")
MAXIMUM = tvm.ir.Op.get("relax.maximum")
MINIMUM = tvm.ir.Op.get("relax.minimum")
CLIP = tvm.ir.Op.get("relax.clip")
CALL_TIR = tvm.ir.Op.get("relax.call_tir")
MATMUL = tvm.ir.Op.get("relax.matmul")
MEAN = tvm.ir.Op.get("relax.mean")
SPARSITY_EPS = 1e-9


@dataclass
class DepthwiseLayer:
    spec: kernels.ConvSpec
    weight: np.ndarray  # (C, kh, kw)
    bias: np.ndarray  # (C,)
    kernel_name: str
    mode: np.ndarray  # int32 (C,): kernels.COMPUTE, kernels.UNREAD, or the index of its constant plane
    consts: np.ndarray  # float32 (max(1, K), OH, OW): the constant planes

    def prim_func(self) -> tvm.tirx.PrimFunc:
        return kernels.depthwise_prim_func(self.spec, self.kernel_name, len(self.consts))

    def constant_args(self) -> list[np.ndarray]:
        return [self.weight, self.bias, self.mode, self.consts]

    @property
    def counts(self) -> dict[str, int]:
        return {"computed": int(np.sum(self.mode == kernels.COMPUTE)),
                "unread": int(np.sum(self.mode == kernels.UNREAD)),
                "constant": int(np.sum(self.mode >= 0))}


def depthwise_layer(spec: kernels.ConvSpec, weight, bias, name: str, unread=None,
                    constant_inputs=None) -> DepthwiseLayer:
    """A depthwise layer with its weight as (C, kh, kw), a zero bias when there is none (the
    kernel always adds one, as kernel_arrays does for BSR) and a mode per plane: `unread`
    (bool per channel) planes are not computed, a plane whose input is the constant
    `constant_inputs[c]` is copied from its precomputed output map."""
    c = spec.c_out
    bias = np.zeros(c, np.float32) if bias is None else np.asarray(bias, np.float32).reshape(c)
    weight = np.asarray(weight, np.float32).reshape(c, *spec.kernel)
    mode = np.full(c, kernels.COMPUTE, np.int32)
    if unread is not None:
        mode[np.asarray(unread, bool)] = kernels.UNREAD
    constant = {ch: v for ch, v in (constant_inputs or {}).items() if mode[ch] == kernels.COMPUTE}
    consts = constant_planes(spec, weight, bias, constant)
    mode[sorted(constant)] = np.arange(len(constant), dtype=np.int32)
    return DepthwiseLayer(spec, weight, bias, name, mode, consts)


def constant_planes(spec: kernels.ConvSpec, weight, bias, constant: dict) -> np.ndarray:
    """(K, OH, OW): the output plane of each channel c of `constant` (in channel order) whose
    input plane is the constant constant[c], zero padding and epilogue included (no residual:
    a residual is not constant). One zero plane when there is none."""
    if not constant:
        return np.zeros((1, spec.out_h, spec.out_w), np.float32)
    assert not spec.epilogue.residual, "a plane with a residual is not constant"
    channels = sorted(constant)
    k = len(channels)
    values = np.asarray([constant[ch] for ch in channels], np.float32)
    x = np.broadcast_to(values[None, :, None, None], (1, k, spec.height, spec.width))
    sub = kernels.ConvSpec(**{**spec.__dict__, "batch": 1, "c_in": k, "c_out": k})
    return kernels.reference_conv2d(x, weight[channels][:, None], sub, bias[channels], groups=k)[0]


@dataclass
class DirectConvLayer:
    """A dense conv of few input channels on kernels.direct_prim_func."""

    spec: kernels.ConvSpec
    weight: np.ndarray  # (C_out, C_in, kh, kw)
    bias: np.ndarray  # (C_out,)
    kernel_name: str

    def prim_func(self) -> tvm.tirx.PrimFunc:
        return kernels.direct_prim_func(self.spec, self.kernel_name)

    def constant_args(self) -> list[np.ndarray]:
        return [self.weight, self.bias]


def direct_layer(spec: kernels.ConvSpec, weight, bias, name: str) -> DirectConvLayer:
    bias = np.zeros(spec.c_out, np.float32) if bias is None else np.asarray(bias, np.float32).reshape(-1)
    return DirectConvLayer(spec, np.asarray(weight, np.float32), bias, name)


@dataclass
class SparseConvLayer:
    """One converted conv: its spec, its constant arrays, and the name of its matmul kernel."""

    spec: kernels.ConvSpec
    weight: BSRMatrix
    arrays: kernels.KernelArrays
    kernel_name: str
    tile: kernels.BSRTile
    depthwise: DepthwiseLayer | None = None  # the depthwise conv computed in the same kernel
    threads: int = 1  # the parallel loop's block rows are split in contiguous ranges balanced for this many threads
    pooled: tuple[int, ...] | None = None  # the kernel takes the global mean: its output shape

    def row_costs(self) -> np.ndarray:
        """FMAs per block row: its sparse conv (none if no plane of it is computed) and its
        computed depthwise planes."""
        spec, dw = self.spec, self.depthwise
        blocks = np.diff(self.arrays.indptr) * spec.bsr * spec.bsc
        if dw is None:
            return blocks * spec.num_pixels
        computed = (dw.mode == kernels.COMPUTE).reshape(-1, spec.bsr).sum(axis=1)
        span = spec.height * spec.width
        kh, kw = dw.spec.kernel
        return (computed > 0) * blocks * span + computed * dw.spec.out_h * dw.spec.out_w * kh * kw

    def prim_func(self, tile: kernels.BSRTile | None = None) -> tvm.tirx.PrimFunc:
        """Its kernel, with its own tile or `tile`."""
        a, tile = self.arrays, tile or self.tile
        if self.depthwise is None:
            return kernels.bsr_matmul_prim_func(self.spec, a.nnzb, tile, self.kernel_name,
                                                a.row_blocks, self.pooled, self.threads)
        return kernels.expand_depthwise_prim_func(self.spec, self.depthwise.spec, a.nnzb,
                                                  tile, self.kernel_name,
                                                  len(self.depthwise.consts), a.row_blocks,
                                                  self.threads)

    def constant_args(self) -> list[np.ndarray]:
        """The kernel's arguments after its input (and before a residual): index arrays, weights."""
        a = self.arrays
        args = [a.indptr, a.indices, a.data, a.bias]
        dw = self.depthwise
        if dw is not None:
            live_rows = np.any((dw.mode == kernels.COMPUTE).reshape(-1, self.spec.bsr), axis=1)
            costs = np.tile(self.row_costs(), self.spec.batch)  # per (image, block row)
            args += [dw.weight, dw.bias, dw.mode, dw.consts, live_rows.astype(np.int32),
                     kernels.balanced_bounds(costs, kernels.fused_parts(len(costs), self.threads))]
        return args

    @property
    def out_shape(self) -> tuple[int, ...]:
        if self.pooled is not None:
            return self.pooled
        return self.spec.out_shape if self.depthwise is None else self.depthwise.spec.out_shape


@dataclass
class GemvLayer:
    """x (M, K) @ weight (K, N) + bias on kernels.gemv_prim_func."""

    rows: int
    weight: np.ndarray  # (K, N)
    bias: np.ndarray  # (N,)
    kernel_name: str

    def prim_func(self) -> tvm.tirx.PrimFunc:
        k, n = self.weight.shape
        return kernels.gemv_prim_func(self.rows, k, n, self.kernel_name)

    def constant_args(self) -> list[np.ndarray]:
        return [kernels.gemv_blocks(self.weight), self.bias]


@dataclass
class ConversionReport:
    converted: list[SparseConvLayer] = field(default_factory=list)
    depthwise: list[DepthwiseLayer] = field(default_factory=list)
    gemv: list[GemvLayer] = field(default_factory=list)
    direct: list[DirectConvLayer] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (conv shape, reason)


@dataclass
class FusedMatmul:
    """matmul(x, constant W) [+ constant bias]: what the GEMV kernel computes."""

    x: relax.Expr
    weight: np.ndarray  # (K, N)
    bias: np.ndarray | None
    swallowed: list = field(default_factory=list)
    kind: str = "gemv"


@dataclass
class FusedConv:
    """conv2d [+ constant bias] [+ residual] [clamp]: the chain one kernel computes."""

    conv: relax.Call
    kind: str  # "bsr" | "depthwise" | "direct"
    spec: kernels.ConvSpec
    weight: np.ndarray  # BSR: the (C_out, C_in*kh*kw) matrix; depthwise: (C, kh, kw); direct: OIHW
    bias: np.ndarray | None = None
    residual: relax.Expr | None = None
    swallowed: list = field(default_factory=list)  # intermediate vars the kernel replaces
    expand: FusedConv | None = None  # depthwise only: the 1x1 BSR conv feeding it, fused in
    unread: np.ndarray | None = None  # depthwise only: bool per channel its one BSR reader never reads
    pooled: tuple[int, ...] | None = None  # BSR only: the global mean over pixels that follows, fused in


def import_onnx(model: onnx.ModelProto) -> tvm.IRModule:
    """ONNX -> Relax with weights as constants and constant subexpressions folded."""
    from tvm.relax.frontend.onnx import from_onnx

    mod = from_onnx(model, keep_params_in_input=False)
    return relax.transform.FoldConstant()(mod)


def static_shape(expr) -> tuple[int, ...] | None:
    sinfo = expr.ty
    if not isinstance(sinfo, relax.TensorType) or sinfo.shape is None:
        return None
    try:
        return tuple(int(d) for d in sinfo.shape.values)
    except (TypeError, AttributeError):
        return None


def constant_value(expr) -> np.ndarray | None:
    if isinstance(expr, tvm.ir.expr.GenericConst) and isinstance(expr.value, tvm.runtime.Tensor):
        return expr.value.numpy()
    return None


def _conv_spec(call: relax.Call, x_shape, w: np.ndarray, bsr: int, bsc: int) -> kernels.ConvSpec:
    attrs = call.attrs
    pad = [int(p) for p in attrs.padding]
    return kernels.ConvSpec(
        batch=x_shape[0], c_in=x_shape[1], height=x_shape[2], width=x_shape[3], c_out=w.shape[0],
        kernel=(w.shape[2], w.shape[3]),
        stride=tuple(int(s) for s in attrs.strides),
        padding=(pad[0], pad[1], pad[2], pad[3]),
        dilation=tuple(int(d) for d in attrs.dilation),
        bsr=bsr, bsc=bsc,
    )


def conv_kind_or_reason(call: relax.Call, bsr: int, bsc: int, sparsity: float):
    """(kind, ConvSpec, weight) for a conv2d call one of our kernels computes, else (None, reason).
    kind "bsr": weight is the (C_out, C_in*kh*kw) matrix; "depthwise": weight is (C, kh, kw);
    "direct" (few input channels): weight is as given, (C_out, C_in, kh, kw)."""
    attrs = call.attrs
    w = constant_value(call.args[1])
    x_shape = static_shape(call.args[0])
    if w is None:
        return None, "weight is not a constant"
    if x_shape is None or len(x_shape) != 4:
        return None, "input shape is not static 4-D"
    if attrs.data_layout != "NCHW" or attrs.kernel_layout != "OIHW" or w.dtype != np.float32:
        return None, "not NCHW/OIHW float32"
    groups = int(attrs.groups)
    spec = _conv_spec(call, x_shape, w, bsr, bsc)
    if groups != 1:
        if not (groups == spec.c_in == spec.c_out and w.shape[1] == 1):
            return None, "grouped conv (neither groups = 1 nor depthwise)"
        why = kernels.depthwise_supported(spec)
        if why:
            return None, f"depthwise conv: {why}"
        return ("depthwise", spec, w.reshape(w.shape[0], w.shape[2], w.shape[3])), ""
    if not kernels.direct_supported(spec):
        return ("direct", spec, w), ""
    mat = conv_weight_as_matrix(w)
    if not can_block(mat.shape, bsr, bsc):
        return None, f"matrix {mat.shape} not divisible into {bsr}x{bsc} blocks"
    achieved = block_sparsity(mat, bsr, bsc)
    if achieved < sparsity - SPARSITY_EPS:
        return None, f"block sparsity {achieved:.3f} < {sparsity}"
    return ("bsr", spec, mat), ""


def emit_sparse_conv(bb: relax.BlockBuilder, x, layer: SparseConvLayer, residual=None):
    """Emit im2col (when needed) + bsr_matmul (+ the fused depthwise conv) for one conv;
    returns the NCHW output."""
    spec, arrays = layer.spec, layer.arrays
    if spec.needs_im2col:
        # one global symbol per layer: two convs of different shapes must not both be "im2col"
        name = layer.kernel_name.replace("bsr_matmul", "im2col")
        im2col = bb.add_func(kernels.im2col_prim_func(spec, name), name)
        x = bb.emit(relax.call_tir(im2col, [x], relax.TensorType(spec.col_shape, "float32")))
    kernel = bb.add_func(layer.prim_func(), layer.kernel_name)
    args = [x] + [relax.const(a) for a in layer.constant_args()]
    if residual is not None:
        args.append(residual)
    return relax.call_tir(kernel, args, relax.TensorType(layer.out_shape, "float32"))


def emit_dense_conv(bb: relax.BlockBuilder, x, layer: DepthwiseLayer | DirectConvLayer, residual=None):
    """A depthwise or direct conv: its kernel on x, its constants (and the residual)."""
    func = bb.add_func(layer.prim_func(), layer.kernel_name)
    args = [x] + [relax.const(a) for a in layer.constant_args()]
    if residual is not None:
        args.append(residual)
    return relax.call_tir(func, args, relax.TensorType(layer.spec.out_shape, "float32"))


def _bindings_and_uses(func: relax.Function):
    values, uses = {}, {}

    def count(expr):
        for v in relax.analysis.free_vars(expr):
            uses[v] = uses.get(v, 0) + 1

    for block in func.body.blocks:
        for binding in block.bindings:
            if isinstance(binding, relax.VarBinding):
                values[binding.var] = binding.value
            count(binding.value)
    count(func.body.body)
    return values, uses


def _buffer_stores(stmt):
    """The BufferStores under a TIR statement (loops, blocks, sequences; TVM 0.27 exposes no
    TIR visitor to Python)."""
    if isinstance(stmt, tvm.tirx.BufferStore):
        yield stmt
    for child in ("block", "body"):
        if hasattr(stmt, child):
            yield from _buffer_stores(getattr(stmt, child))
    for part in getattr(stmt, "seq", ()):
        yield from _buffer_stores(part)


def _clamp_kind(mod: tvm.IRModule, gvar) -> str | None:
    """'max' / 'min' if the PrimFunc `gvar` is one elementwise T.max / T.min store (what the
    ONNX frontend emits for Clip via emit_te), else None."""
    func = mod[gvar] if isinstance(gvar, relax.GlobalVar) and gvar in mod.get_global_vars() \
        else None
    if not isinstance(func, tvm.tirx.PrimFunc):
        return None
    stores = list(_buffer_stores(func.body))
    if len(stores) != 1:
        return None
    return {tvm.tirx.Max: "max", tvm.tirx.Min: "min"}.get(type(stores[0].value))


def _scalar(expr) -> float | None:
    value = constant_value(expr)
    if value is not None and value.size == 1 and value.dtype == np.float32:
        return float(value.reshape(()))
    number = getattr(expr, "value", None)  # relax.clip's bounds: IntImm / FloatImm
    if isinstance(number, (int, float)) and not isinstance(number, bool):
        return float(number)
    return None


class FusionPlanner:
    """Finds, over a function's bindings, the longest conv chain each kernel can compute."""

    def __init__(self, mod, func, bsr, bsc, sparsity, report):
        self.mod, self.report = mod, report
        self.bsr, self.bsc, self.sparsity = bsr, bsc, sparsity
        self.values, self.uses = _bindings_and_uses(func)
        self.checked = {}  # conv call -> (kind, spec, weight) or None

    def plan(self) -> dict:
        """{top call: FusedConv}: each chain at its outermost binding only."""
        tops = {}
        for var, value in self.values.items():  # in binding order: inner chains come first
            fused = self.match(value) or self.match_matmul(value)
            if fused:
                for inner in fused.swallowed:
                    tops.pop(inner, None)
                tops[var] = fused
        for var, fused in list(tops.items()):
            expand = self._fusable_expand(fused, tops)
            if expand is not None:
                del tops[fused.conv.args[0]]
                fused.expand = expand
        for var, value in self.values.items():
            fused = self._poolable(value, tops)
            if fused is not None:
                del tops[value.args[0]]
                fused.pooled = static_shape(value)
                tops[var] = fused
        self._mark_unread(tops)
        return {self.values[var]: fused for var, fused in tops.items()}

    def _mark_unread(self, tops: dict) -> None:
        """A depthwise output whose one reader is a BSR conv: the channels that conv's matrix
        has no non-zero entry for are never read, so their planes need not be computed."""
        chains = [f for f in tops.values() if f.kind != "gemv"]
        chains += [f.expand for f in chains if f.expand is not None]
        for var, fused in tops.items():
            if fused.kind != "depthwise" or not self._single_use(var):
                continue
            reader = next((r for r in chains if r.kind == "bsr" and r.conv.args[0].same_as(var)),
                          None)
            if reader is not None:
                cols = reader.weight.reshape(reader.weight.shape[0], fused.spec.c_out, -1)
                fused.unread = ~np.any(cols != 0, axis=(0, 2))

    def _fusable_expand(self, fused: FusedConv, tops: dict) -> FusedConv | None:
        """The BSR chain whose result only this depthwise conv reads, if one kernel can do both."""
        if fused.kind != "depthwise":
            return None
        source = fused.conv.args[0]
        expand = tops.get(source)
        if expand is None or expand.kind != "bsr" or not self._single_use(source):
            return None
        return expand if kernels.can_fuse_expand_depthwise(expand.spec, fused.spec) else None

    def _poolable(self, value, tops: dict) -> FusedConv | None:
        """The BSR chain without residual whose result only `value`, a mean over its pixels
        (GlobalAveragePool), reads."""
        if not (isinstance(value, relax.Call) and value.op == MEAN and self._single_use(value.args[0])):
            return None
        fused = tops.get(value.args[0])
        if fused is None or fused.kind != "bsr" or fused.residual is not None:
            return None
        rank = len(fused.spec.out_shape)
        axes = sorted(int(a) % rank for a in (value.attrs.axis or []))
        return fused if axes == [2, 3] and static_shape(value) is not None else None

    def _value(self, expr):
        return self.values.get(expr, expr) if isinstance(expr, relax.Var) else expr

    def _single_use(self, expr) -> bool:
        return isinstance(expr, relax.Var) and self.uses.get(expr, 0) == 1

    def _conv(self, expr):
        call = self._value(expr)
        if not (isinstance(call, relax.Call) and call.op == CONV2D):
            return None
        if call not in self.checked:  # keyed by object identity
            found, reason = conv_kind_or_reason(call, self.bsr, self.bsc, self.sparsity)
            if found is None:
                self.report.skipped.append((str(static_shape(call.args[1])), reason))
            self.checked[call] = found
        return self.checked[call]

    def _clamp_step(self, call):
        """(argument, [(op, constant), ...]) if call is max/min/ReLU/Clip of a tensor with
        constants (Clip is a max then a min), else None."""
        if not isinstance(call, relax.Call):
            return None
        if call.op == RELU:
            return call.args[0], [("max", 0.0)]
        if call.op == CLIP:
            lo, hi = _scalar(call.args[1]), _scalar(call.args[2])
            return (call.args[0], [("max", lo), ("min", hi)]) if None not in (lo, hi) else None
        if call.op in (MAXIMUM, MINIMUM):
            op, args = ("max" if call.op == MAXIMUM else "min"), list(call.args)
        elif call.op == CALL_TIR and len(call.args[1].fields) == 2:
            op, args = _clamp_kind(self.mod, call.args[0]), list(call.args[1].fields)
        else:
            return None
        if op is None:
            return None
        for tensor, const in (args, args[::-1]):
            value = _scalar(const)
            if value is not None and static_shape(tensor) is not None:
                return tensor, [(op, value)]
        return None

    def _conv_bias(self, expr, swallowed):
        """(conv call, found, bias) for conv or add(conv, constant per-channel bias)."""
        call = self._value(expr)
        conv = self._conv(call)
        if conv:
            return call, conv, None
        found = self._plus_constant(call, self._conv, lambda conv, bias: bias.ndim in (3, 4) and
                                    bias.shape[-3] == bias.size == conv[1].c_out)
        if found is None:
            return None
        a, conv, bias = found
        swallowed.append(a)
        return self._value(a), conv, bias.reshape(-1)

    def _plus_constant(self, call, inner, fits):
        """(a, inner(a), b) for add(a, b) or add(b, a) with `a` single-use, inner(a) found and
        b a constant that fits(inner(a), b): a bias to swallow."""
        if not (isinstance(call, relax.Call) and call.op == ADD):
            return None
        for a, b in (call.args, call.args[::-1]):
            found, bias = (inner(a) if self._single_use(a) else None), constant_value(b)
            if found and bias is not None and fits(found, bias):
                return a, found, bias
        return None

    def _matmul(self, expr):
        """(x, W) for matmul(x, constant W) with x (M, K) static, 1 <= M <= GEMV_MAX_ROWS, and W
        (K, N) float32."""
        call = self._value(expr)
        if not (isinstance(call, relax.Call) and call.op == MATMUL):
            return None
        x_shape, w = static_shape(call.args[0]), constant_value(call.args[1])
        if x_shape is None or len(x_shape) != 2 or not 1 <= x_shape[0] <= kernels.GEMV_MAX_ROWS \
                or w is None or w.ndim != 2 or w.dtype != np.float32:
            return None
        return call.args[0], w

    def match_matmul(self, value) -> FusedMatmul | None:
        found = self._matmul(value)
        if found is not None:
            return FusedMatmul(*found, None)
        found = self._plus_constant(value, self._matmul, lambda mm, bias: bias.ndim >= 1 and
                                    bias.size == mm[1].shape[1] == bias.shape[-1])
        if found is None:
            return None
        a, (x, w), bias = found
        return FusedMatmul(x, w, bias.reshape(-1).astype(np.float32), [a])

    def match(self, value) -> FusedConv | None:
        swallowed, clamps, node = [], [], value
        while (step := self._clamp_step(node)) is not None:
            arg, ops = step
            if not self._single_use(arg):
                return None
            swallowed.append(arg)
            clamps[:0] = ops  # innermost first
            node = self._value(arg)
        residual = None
        found = self._conv_bias(node, swallowed)
        if found is None and isinstance(node, relax.Call) and node.op == ADD:
            for a, b in (node.args, node.args[::-1]):  # b may be a constant: a border map
                if self._single_use(a) and static_shape(a) == static_shape(b):
                    found = self._conv_bias(a, swallowed)
                    if found:
                        swallowed.append(a)
                        residual = b
                        break
        if found is None:
            return None
        conv, (kind, spec, weight), bias = found
        low, high = -math.inf, math.inf
        for op, c in clamps:  # clamp(x, lo, hi) then max/min with c is again a clamp
            low, high = (max(low, c), max(high, c)) if op == "max" else (min(low, c), min(high, c))
        epilogue = kernels.Epilogue(low, high, residual is not None)
        spec = kernels.ConvSpec(**{**spec.__dict__, "epilogue": epilogue})
        return FusedConv(conv, kind, spec, weight, bias, residual, swallowed)


def expand_constants(expand: FusedConv | None) -> dict[int, float]:
    """{channel: value}: the expanded channels whose weight row is all zero carry the constant
    epilogue(bias) (a fused expand has no residual)."""
    if expand is None:
        return {}
    bias = np.zeros(expand.spec.c_out) if expand.bias is None else expand.bias
    ep = expand.spec.epilogue
    return {int(c): float(np.clip(bias[c], ep.low, ep.high))
            for c in np.flatnonzero(~np.any(expand.weight != 0, axis=1))}


@mutator
class _FuseConvs(PyExprMutator):
    def __init__(self, mod, plan, report, threads):
        super().__init__(mod)
        self.plan, self.report, self.threads = plan, report, threads

    def visit_call_(self, call):
        fused = self.plan.get(call)
        if fused is None:
            return super().visit_call_(call)
        index = (len(self.report.converted) + len(self.report.depthwise) + len(self.report.gemv)
                 + len(self.report.direct))
        if fused.kind == "gemv":
            return self._gemv(fused, f"gemv_{index}")
        residual = self.visit_expr(fused.residual) if fused.residual is not None else None
        if fused.kind == "direct":
            layer = direct_layer(fused.spec, fused.weight, fused.bias, f"direct_{index}")
            self.report.direct.append(layer)
            return emit_dense_conv(self.builder_, self.visit_expr(fused.conv.args[0]), layer, residual)
        if fused.kind == "bsr":
            kind = "bsr_matmul" if fused.pooled is None else "bsr_matmul_mean"
            layer = self._sparse_layer(fused, f"{kind}_{index}")
            return emit_sparse_conv(self.builder_, self.visit_expr(fused.conv.args[0]), layer,
                                    residual)
        depthwise = depthwise_layer(fused.spec, fused.weight, fused.bias, f"depthwise_{index}",
                                    fused.unread, expand_constants(fused.expand))
        self.report.depthwise.append(depthwise)
        if fused.expand is None:
            return emit_dense_conv(self.builder_, self.visit_expr(fused.conv.args[0]),
                                   depthwise, residual)
        layer = self._sparse_layer(fused.expand, f"expand_depthwise_{index}", depthwise)
        return emit_sparse_conv(self.builder_, self.visit_expr(fused.expand.conv.args[0]), layer)

    def _gemv(self, fused: FusedMatmul, name: str):
        k, n = fused.weight.shape
        bias = np.zeros(n, np.float32) if fused.bias is None else fused.bias
        layer = GemvLayer(static_shape(fused.x)[0], fused.weight, bias, name)
        self.report.gemv.append(layer)
        func = self.builder_.add_func(layer.prim_func(), name)
        args = [self.visit_expr(fused.x)] + [relax.const(a) for a in layer.constant_args()]
        return relax.call_tir(func, args, relax.TensorType((layer.rows, n), "float32"))

    def _sparse_layer(self, fused: FusedConv, name: str, depthwise=None) -> SparseConvLayer:
        weight = dense_to_bsr(fused.weight, fused.spec.bsr, fused.spec.bsc)
        arrays = kernels.kernel_arrays(weight, fused.bias)
        # the default tile until tune.tune_tiles measures the candidates and retile swaps it
        layer = SparseConvLayer(fused.spec, weight, arrays, name, kernels.default_tile(fused.spec),
                                depthwise, self.threads, fused.pooled)
        self.report.converted.append(layer)
        return layer


def convert_to_bsr(
    mod: tvm.IRModule, bsr: int, bsc: int, sparsity: float, threads: int = 1
) -> tuple[tvm.IRModule, ConversionReport]:
    """Replace eligible convs of `mod["main"]` (and what follows them) by our kernels, their
    parallel loops balanced for `threads`."""
    func = mod["main"]
    report = ConversionReport()
    plan = FusionPlanner(mod, func, bsr, bsc, sparsity, report).plan()
    rewriter = _FuseConvs(mod, plan, report, threads)
    new_func = rewriter.visit_expr(func)
    new_mod = rewriter.builder_.get()
    new_mod["main"] = new_func
    new_mod = relax.transform.DeadCodeElimination(["main"])(new_mod)
    report.skipped = sorted(set(report.skipped))
    return new_mod, report


def retile(mod: tvm.IRModule, report: ConversionReport, tiles: dict[str, kernels.BSRTile]):
    """Swap the pixel tile of the named BSR kernels (the signature does not change)."""
    mod = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
    for layer in report.converted:
        if layer.kernel_name in tiles:
            layer.tile = tiles[layer.kernel_name]
            mod[mod.get_global_var(layer.kernel_name)] = layer.prim_func()
    return mod


def single_conv_module(spec: kernels.ConvSpec, w: np.ndarray, bias=None, tile=None, direct=False,
                       threads: int = 1):
    """A Relax module `main(x[, residual])` computing one conv with our kernel (depthwise when
    w is (C, 1, kh, kw) with C = spec.c_in = spec.c_out > 1, the direct kernel with `direct`,
    else BSR, its parallel loop split for `threads`); for kernel tests and benchmarks."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((spec.batch, spec.c_in, spec.height, spec.width),
                                        "float32"))
    params = [x]
    if spec.epilogue.residual:
        params.append(relax.Var("residual", relax.TensorType(spec.out_shape, "float32")))
    emit = emit_dense_conv
    if w.shape[1] == 1 and spec.c_in == spec.c_out > 1:
        layer = depthwise_layer(spec, w, bias, "depthwise_0")
    elif direct:
        layer = direct_layer(spec, w, bias, "direct_0")
    else:
        weight = dense_to_bsr(conv_weight_as_matrix(w), spec.bsr, spec.bsc)
        arrays = kernels.kernel_arrays(weight, bias)
        layer = SparseConvLayer(spec, weight, arrays, "bsr_matmul_0",
                                tile or kernels.default_tile(spec), threads=threads)
        emit = emit_sparse_conv
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(emit(bb, x, layer, params[1] if len(params) > 1 else None))
        bb.emit_func_output(out)
    return bb.get(), layer
