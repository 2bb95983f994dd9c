"""ONNX -> Relax, with every eligible Conv replaced by our BSR kernels.

Eligible: 2-D NCHW conv, groups = 1, constant float32 weight whose (C_out, C_in*kh*kw) matrix
tiles into (bsr x bsc) blocks and has at least `sparsity` block sparsity.  A following bias
add and ReLU are fused into the kernel epilogue when the conv result has no other user.
"""

from __future__ import annotations

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
SPARSITY_EPS = 1e-9


@dataclass
class SparseConvLayer:
    """One converted conv: its spec, its constant arrays, and the name of its matmul kernel."""

    spec: kernels.ConvSpec
    weight: BSRMatrix
    arrays: kernels.KernelArrays
    kernel_name: str
    tile: kernels.BSRTile


@dataclass
class ConversionReport:
    converted: list[SparseConvLayer] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (conv shape, reason)


def import_onnx(model: onnx.ModelProto) -> tvm.IRModule:
    """ONNX -> Relax with weights as constants and constant subexpressions folded."""
    from tvm.relax.frontend.onnx import from_onnx

    mod = from_onnx(model, keep_params_in_input=False)
    return relax.transform.FoldConstant()(mod)


def _static_shape(expr) -> tuple[int, ...] | None:
    sinfo = expr.ty
    if not isinstance(sinfo, relax.TensorType) or sinfo.shape is None:
        return None
    try:
        return tuple(int(d) for d in sinfo.shape.values)
    except (TypeError, AttributeError):
        return None


def _constant(expr) -> np.ndarray | None:
    if isinstance(expr, tvm.ir.expr.GenericConst) and isinstance(expr.value, tvm.runtime.Tensor):
        return expr.value.numpy()
    return None


def conv_spec_or_reason(call: relax.Call, bsr: int, bsc: int, sparsity: float):
    """(ConvSpec, weight matrix) for an eligible conv2d call, else (None, reason)."""
    attrs = call.attrs
    w = _constant(call.args[1])
    x_shape = _static_shape(call.args[0])
    if w is None:
        return None, "weight is not a constant"
    if x_shape is None or len(x_shape) != 4:
        return None, "input shape is not static 4-D"
    if int(attrs.groups) != 1:
        return None, "grouped/depthwise conv"
    if attrs.data_layout != "NCHW" or attrs.kernel_layout != "OIHW" or w.dtype != np.float32:
        return None, "not NCHW/OIHW float32"
    mat = conv_weight_as_matrix(w)
    if not can_block(mat.shape, bsr, bsc):
        return None, f"matrix {mat.shape} not divisible into {bsr}x{bsc} blocks"
    achieved = block_sparsity(mat, bsr, bsc)
    if achieved < sparsity - SPARSITY_EPS:
        return None, f"block sparsity {achieved:.3f} < {sparsity}"
    pad = [int(p) for p in attrs.padding]
    spec = kernels.ConvSpec(
        batch=x_shape[0], c_in=x_shape[1], height=x_shape[2], width=x_shape[3], c_out=w.shape[0],
        kernel=(w.shape[2], w.shape[3]),
        stride=tuple(int(s) for s in attrs.strides),
        padding=(pad[0], pad[1], pad[2], pad[3]),
        dilation=tuple(int(d) for d in attrs.dilation),
        bsr=bsr, bsc=bsc,
    )
    return (spec, mat), ""


def emit_sparse_conv(bb: relax.BlockBuilder, x, layer: SparseConvLayer) -> relax.Expr:
    """Emit im2col (when needed) + bsr_matmul + reshape for one conv; returns the NCHW output."""
    spec, arrays = layer.spec, layer.arrays
    if spec.needs_im2col:
        # one global symbol per layer: two convs of different shapes must not both be "im2col"
        name = layer.kernel_name.replace("bsr_matmul", "im2col")
        im2col = bb.add_func(kernels.im2col_prim_func(spec, name), name)
        col = bb.emit(relax.call_tir(im2col, [x], relax.TensorType(spec.col_shape, "float32")))
    else:
        col = bb.emit(relax.op.reshape(x, spec.col_shape))
    matmul = bb.add_func(
        kernels.bsr_matmul_prim_func(spec, arrays.nnzb, layer.tile, layer.kernel_name),
        layer.kernel_name,
    )
    consts = [relax.const(a) for a in (arrays.indptr, arrays.indices, arrays.data, arrays.bias)]
    out_flat = (spec.batch, spec.c_out, spec.num_pixels)
    y = bb.emit(relax.call_tir(matmul, [col, *consts], relax.TensorType(out_flat, "float32")))
    return relax.op.reshape(y, spec.out_shape)


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


@mutator
class _ConvToBSR(PyExprMutator):
    def __init__(self, mod, bsr, bsc, sparsity, values, uses, report, choose_tile):
        super().__init__(mod)
        self.bsr, self.bsc, self.sparsity = bsr, bsc, sparsity
        self.values, self.uses, self.report = values, uses, report
        self.choose_tile = choose_tile
        self.checked = {}  # conv call -> (spec, mat) or None

    def _eligible_conv(self, expr):
        call = self.values.get(expr) if isinstance(expr, relax.Var) else expr
        if not (isinstance(call, relax.Call) and call.op == CONV2D):
            return None
        if call in self.checked:  # keyed by object identity
            return self.checked[call]
        found, reason = conv_spec_or_reason(call, self.bsr, self.bsc, self.sparsity)
        if found is None:
            w_shape = _static_shape(call.args[1])
            self.report.skipped.append((str(w_shape), reason))
        self.checked[call] = (call, found) if found else None
        return self.checked[call]

    def _single_use(self, var) -> bool:
        return isinstance(var, relax.Var) and self.uses.get(var, 0) == 1

    def _bias_add(self, expr):
        """(conv call, bias) if expr is add(conv, const bias (1,C,1,1)) with conv used once."""
        call = self.values.get(expr) if isinstance(expr, relax.Var) else expr
        if not (isinstance(call, relax.Call) and call.op == ADD):
            return None
        for a, b in (call.args, call.args[::-1]):
            conv = self._eligible_conv(a) if self._single_use(a) else None
            bias = _constant(b)
            if conv and bias is not None and bias.size == conv[1][0].c_out and bias.ndim == 4 \
                    and bias.shape[1] == bias.size:
                return conv, bias.reshape(-1)
        return None

    def _replace(self, conv, bias, relu) -> relax.Expr:
        call, (spec, mat) = conv
        spec = kernels.ConvSpec(**{**spec.__dict__, "relu": relu})
        weight = dense_to_bsr(mat, self.bsr, self.bsc)
        arrays = kernels.kernel_arrays(weight, bias)
        name = f"bsr_matmul_{len(self.report.converted)}"
        layer = SparseConvLayer(spec, weight, arrays, name, self.choose_tile(spec, arrays))
        self.report.converted.append(layer)
        return emit_sparse_conv(self.builder_, self.visit_expr(call.args[0]), layer)

    def visit_call_(self, call):
        if call.op == RELU:
            arg = call.args[0]
            fused = self._bias_add(arg) if self._single_use(arg) else None
            if fused:
                return self._replace(fused[0], fused[1], relu=True)
            conv = self._eligible_conv(arg) if self._single_use(arg) else None
            if conv:
                return self._replace(conv, None, relu=True)
        fused = self._bias_add(call)
        if fused:
            return self._replace(fused[0], fused[1], relu=False)
        conv = self._eligible_conv(call)
        if conv:
            return self._replace(conv, None, relu=False)
        return super().visit_call_(call)


def convert_to_bsr(
    mod: tvm.IRModule, bsr: int, bsc: int, sparsity: float, choose_tile=None
) -> tuple[tvm.IRModule, ConversionReport]:
    """Replace eligible convs of `mod["main"]` by BSR kernels; dead dense convs are removed."""
    choose_tile = choose_tile or (lambda spec, arrays: kernels.default_tile(spec))
    func = mod["main"]
    values, uses = _bindings_and_uses(func)
    report = ConversionReport()
    rewriter = _ConvToBSR(mod, bsr, bsc, sparsity, values, uses, report, choose_tile)
    new_func = rewriter.visit_expr(func)
    new_mod = rewriter.builder_.get()
    new_mod["main"] = new_func
    new_mod = relax.transform.DeadCodeElimination(["main"])(new_mod)
    # a conv fused with its bias/ReLU was also converted alone on the way; drop those dead copies
    live = _called_functions(new_mod["main"])
    report.converted = [layer for layer in report.converted if layer.kernel_name in live]
    for gv in list(new_mod.get_global_vars()):
        if gv.name_hint != "main" and gv.name_hint not in live:
            del new_mod[gv]
    report.skipped = sorted(set(report.skipped))
    return new_mod, report


def _called_functions(func: relax.Function) -> set[str]:
    names = set()
    for block in func.body.blocks:
        for binding in block.bindings:
            value = binding.value
            if isinstance(value, relax.Call):
                names.update(a.name_hint for a in value.args if isinstance(a, relax.GlobalVar))
    return names


def retile(mod: tvm.IRModule, report: ConversionReport, tiles: dict[str, kernels.BSRTile]):
    """Swap the pixel tile of the named bsr_matmul kernels (the signature does not change)."""
    mod = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
    for layer in report.converted:
        if layer.kernel_name in tiles:
            layer.tile = tiles[layer.kernel_name]
            func = kernels.bsr_matmul_prim_func(layer.spec, layer.arrays.nnzb, layer.tile,
                                                layer.kernel_name)
            mod[mod.get_global_var(layer.kernel_name)] = func
    return mod


def single_conv_module(spec: kernels.ConvSpec, w: np.ndarray, bias=None, tile=None):
    """A Relax module `main(x)` computing one sparse conv; for kernel tests and benchmarks."""
    weight = dense_to_bsr(conv_weight_as_matrix(w), spec.bsr, spec.bsc)
    arrays = kernels.kernel_arrays(weight, bias)
    layer = SparseConvLayer(spec, weight, arrays, "bsr_matmul_0", tile or kernels.default_tile(spec))
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((spec.batch, spec.c_in, spec.height, spec.width),
                                              "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(emit_sparse_conv(bb, x, layer))
        bb.emit_func_output(out)
    return bb.get(), layer
