"""Build small NCHW float32 ONNX graphs by hand, for the coupling tests and the fuzzer.

`GraphBuilder` tracks the current tensor, the shape of every tensor it made and, per channel,
which filters *produce* it (weight initializer, row) — so a test can zero "all producers of a
channel class" (both sides of a residual add, a concat slot, a channel after a shuffle ...).
Producer tracking is a test-side heuristic: None means "not a plain function of filters"
(graph input, SE-gated channel, padded average ...), and such channels are never zeroed as a class.

Every method returns the name of the tensor it wrote and makes it the current one (`cur`).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxprune.channels import linear

OPSET = 17
IR_VERSION = 10  # onnxruntime refuses the IR version onnx.helper writes by default
LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def conv_out(size: int, k: int, stride: int, dilation: int, pad_begin: int, pad_end: int) -> int:
    return (size + pad_begin + pad_end - dilation * (k - 1) - 1) // stride + 1


def _pads4(pads) -> list[int]:
    """0 / int / (ph, pw) / (top, left, bottom, right) -> ONNX 4-entry pads."""
    if isinstance(pads, int):
        return [pads] * 4
    pads = list(pads)
    if len(pads) == 2:
        return [pads[0], pads[1], pads[0], pads[1]]
    assert len(pads) == 4
    return pads


class GraphBuilder:
    def __init__(self, channels: int, height: int, width: int, *, seed: int = 0, input_name: str = "x"):
        self.rng = np.random.default_rng(seed)
        self.input_name = input_name
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, np.ndarray] = {}
        self.shapes: dict[str, tuple[int, ...]] = {input_name: (1, channels, height, width)}
        # tensor -> per channel: list of (weight init, row) whose zeroing makes it constant, or None
        self.producers: dict[str, list] = {input_name: [None] * channels}
        self.layers: dict[str, dict] = {}  # node name -> {"op", "weight", "bias", "input", "output"}
        self.bns: dict[str, dict] = {}     # node name -> {"gamma", ...}
        self.cur = input_name
        self._count = 0

    # --- bookkeeping -----------------------------------------------------------------------
    def fresh(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}{self._count}"

    def init(self, prefix: str, array) -> str:
        name = self.fresh(prefix + "_")
        self.inits[name] = np.asarray(array)
        return name

    @property
    def shape(self) -> tuple[int, ...]:
        return self.shapes[self.cur]

    @property
    def c(self) -> int:
        return self.shapes[self.cur][1]

    @property
    def hw(self) -> tuple[int, int]:
        s = self.shapes[self.cur]
        return s[2], s[3]

    def _emit(self, op, inputs, shape, producers=None, name=None, outputs=None, **attributes) -> str:
        name = name or self.fresh(op.lower())
        out = (outputs or [name + "_out"])[0]
        self.nodes.append(helper.make_node(op, list(inputs), outputs or [out], name=name, **attributes))
        self.shapes[out] = tuple(int(d) for d in shape)
        if len(shape) >= 2:
            self.producers[out] = producers if producers is not None else [None] * shape[1]
        self.cur = out
        return out

    def _randn(self, *shape, scale=1.0) -> np.ndarray:
        return (self.rng.standard_normal(shape) * scale).astype(np.float32)

    # --- linear layers ---------------------------------------------------------------------
    def conv(self, out_ch: int, k: int = 1, *, stride: int = 1, dilation: int = 1, pads=0, group: int = 1,
             bias: bool = True, x: str | None = None, name: str | None = None, weight=None, b=None,
             auto_pad: str | None = None) -> str:
        """Conv; `auto_pad` ("SAME_UPPER" / "SAME_LOWER") replaces explicit pads."""
        x = x or self.cur
        n, c, h, w = self.shapes[x]
        p = _pads4(pads)
        assert c % group == 0 and out_ch % group == 0, (c, out_ch, group)
        oh = conv_out(h, k, stride, dilation, p[0], p[2])
        ow = conv_out(w, k, stride, dilation, p[1], p[3])
        geometry = {"pads": p}
        if auto_pad:
            oh, ow, geometry = -(-h // stride), -(-w // stride), {"auto_pad": auto_pad}
        assert oh >= 1 and ow >= 1, (h, w, k, stride, dilation, p)
        cin_g = c // group
        if weight is None:
            weight = self._randn(out_ch, cin_g, k, k, scale=1.0 / np.sqrt(cin_g * k * k))
        weight = np.asarray(weight, np.float32)
        assert weight.shape == (out_ch, cin_g, k, k), weight.shape
        name = name or self.fresh("conv")
        w_name = self.init(name + "_W", weight)
        inputs = [x, w_name]
        b_name = None
        if bias:
            b = self._randn(out_ch, scale=0.5) if b is None else np.asarray(b, np.float32)
            b_name = self.init(name + "_B", b)
            inputs.append(b_name)
        out = self._emit("Conv", inputs, (n, out_ch, oh, ow), [[(w_name, r)] for r in range(out_ch)], name=name,
                         kernel_shape=[k, k], strides=[stride, stride], dilations=[dilation, dilation],
                         group=group, **geometry)
        self.layers[name] = {"op": "Conv", "weight": w_name, "bias": b_name, "input": x, "output": out}
        return out

    def depthwise(self, k: int = 3, *, multiplier: int = 1, **kw) -> str:
        """group = C_in, C_out = multiplier · C_in."""
        c = self.shapes[kw.get("x") or self.cur][1]
        return self.conv(c * multiplier, k, group=c, **kw)

    def conv_transpose(self, out_ch: int, k: int = 2, *, stride: int = 2, pads=0, bias: bool = True,
                       x: str | None = None, name: str | None = None) -> str:
        x = x or self.cur
        n, c, h, w = self.shapes[x]
        p = _pads4(pads)
        oh = (h - 1) * stride + k - p[0] - p[2]
        ow = (w - 1) * stride + k - p[1] - p[3]
        name = name or self.fresh("convt")
        w_name = self.init(name + "_W", self._randn(c, out_ch, k, k, scale=1.0 / np.sqrt(c * k)))
        inputs = [x, w_name]
        b_name = None
        if bias:
            b_name = self.init(name + "_B", self._randn(out_ch, scale=0.5))
            inputs.append(b_name)
        out = self._emit("ConvTranspose", inputs, (n, out_ch, oh, ow), [[(w_name, ("col", r))] for r in range(out_ch)],
                         name=name, kernel_shape=[k, k], strides=[stride, stride], pads=p)
        self.layers[name] = {"op": "ConvTranspose", "weight": w_name, "bias": b_name, "input": x, "output": out}
        return out

    def gemm(self, out_features: int, *, trans_b: bool = True, bias: bool = True, x: str | None = None,
             name: str | None = None, alpha: float = 1.0, beta: float = 1.0) -> str:
        x = x or self.cur
        n, f = self.shapes[x]
        name = name or self.fresh("gemm")
        wt = self._randn(out_features, f, scale=1.0 / np.sqrt(f))
        w_name = self.init(name + "_W", wt if trans_b else np.ascontiguousarray(wt.T))
        inputs = [x, w_name]
        b_name = None
        if bias:
            b_name = self.init(name + "_B", self._randn(out_features, scale=0.5))
            inputs.append(b_name)
        extra = {k: v for k, v in (("alpha", alpha), ("beta", beta)) if v != 1.0}
        prods = [[(w_name, r)] for r in range(out_features)] if alpha != 0 else None
        out = self._emit("Gemm", inputs, (n, out_features), prods, name=name, transB=int(trans_b), **extra)
        self.layers[name] = {"op": "Gemm", "weight": w_name, "bias": b_name, "input": x, "output": out,
                             "trans_b": trans_b}
        return out

    # --- per-channel ops --------------------------------------------------------------------
    def bn(self, *, x: str | None = None, name: str | None = None, gamma=None) -> str:
        x = x or self.cur
        c = self.shapes[x][1]
        name = name or self.fresh("bn")
        g = self.rng.uniform(0.5, 1.5, c) * self.rng.choice([-1.0, 1.0], c) if gamma is None else gamma
        params = {
            "gamma": np.asarray(g, np.float32),
            "beta": self._randn(c, scale=0.5),
            "mean": self._randn(c, scale=0.3),
            "var": self.rng.uniform(0.5, 2.0, c).astype(np.float32),
        }
        names = {k: self.init(f"{name}_{k}", v) for k, v in params.items()}
        out = self._emit("BatchNormalization", [x] + [names[k] for k in ("gamma", "beta", "mean", "var")],
                         self.shapes[x], list(self.producers[x]), name=name, epsilon=1e-5)
        self.bns[name] = names
        return out

    def act(self, kind: str = "Relu", *, x: str | None = None) -> str:
        x = x or self.cur
        prods = list(self.producers[x])
        if kind == "Clip":
            lo, hi = self.init("clip_min", np.float32(0.0)), self.init("clip_max", np.float32(6.0))
            return self._emit("Clip", [x, lo, hi], self.shapes[x], prods)
        if kind == "LeakyRelu":
            return self._emit("LeakyRelu", [x], self.shapes[x], prods, alpha=0.1)
        return self._emit(kind, [x], self.shapes[x], prods)

    def add(self, a: str, b: str) -> str:
        assert self.shapes[a] == self.shapes[b], (self.shapes[a], self.shapes[b])
        prods = [None if pa is None or pb is None else pa + pb for pa, pb in zip(self.producers[a], self.producers[b])]
        return self._emit("Add", [a, b], self.shapes[a], prods)

    def mul(self, a: str, b: str) -> str:
        """Elementwise Mul with broadcasting (SE gate: [N,C,H,W] · [N,C,1,1]); channels become input-dependent."""
        shape = tuple(max(p, q) for p, q in zip(self.shapes[a], self.shapes[b]))
        return self._emit("Mul", [a, b], shape, None)

    # --- channel layout -----------------------------------------------------------------------
    def concat(self, names: list[str]) -> str:
        n, _, h, w = self.shapes[names[0]]
        prods = [p for t in names for p in self.producers[t]]
        return self._emit("Concat", names, (n, sum(self.shapes[t][1] for t in names), h, w), prods, axis=1)

    def split(self, sizes: list[int], *, x: str | None = None) -> list[str]:
        """Split on axis 1, opset-13+ style (sizes as an input); the current tensor becomes the first part."""
        x = x or self.cur
        n, c, h, w = self.shapes[x]
        assert sum(sizes) == c
        name = self.fresh("split")
        outs = [f"{name}_out{i}" for i in range(len(sizes))]
        s = self.init(name + "_sizes", np.array(sizes, np.int64))
        self.nodes.append(helper.make_node("Split", [x, s], outs, name=name, axis=1))
        offset = 0
        for o, k in zip(outs, sizes):
            self.shapes[o] = (n, k, h, w)
            self.producers[o] = self.producers[x][offset: offset + k]
            offset += k
        self.cur = outs[0]
        return outs

    def slice_channels(self, start: int, end: int, *, x: str | None = None, axis: int = 1) -> str:
        x = x or self.cur
        n, c, h, w = self.shapes[x]
        s = self.init("slice_starts", np.array([start], np.int64))
        e = self.init("slice_ends", np.array([end], np.int64))
        a = self.init("slice_axes", np.array([axis], np.int64))
        k = len(range(c)[slice(start, end)])
        return self._emit("Slice", [x, s, e, a], (n, k, h, w), self.producers[x][start:end])

    def shuffle(self, groups: int, *, x: str | None = None) -> str:
        """Channel shuffle: Reshape [N,g,C/g,H,W] → Transpose (0,2,1,3,4) → Reshape [N,C,H,W]."""
        x = x or self.cur
        n, c, h, w = self.shapes[x]
        assert c % groups == 0
        s5 = self.init("shuffle_shape5", np.array([n, groups, c // groups, h, w], np.int64))
        r1 = self._emit("Reshape", [x, s5], (n, groups, c // groups, h, w), None)
        t = self._emit("Transpose", [r1], (n, c // groups, groups, h, w), None, perm=[0, 2, 1, 3, 4])
        s4 = self.init("shuffle_shape4", np.array([n, c, h, w], np.int64))
        perm = np.arange(c).reshape(groups, c // groups).T.ravel()  # output channel j reads input perm[j]
        return self._emit("Reshape", [t, s4], (n, c, h, w), [self.producers[x][i] for i in perm])

    def se(self, hidden: int, *, x: str | None = None, name: str = "se") -> str:
        """Squeeze-and-excitation gate: GAP → 1×1 conv → Relu → 1×1 conv → Sigmoid → Mul."""
        x = x or self.cur
        c = self.shapes[x][1]
        self.global_avg_pool(x=x)
        self.conv(hidden, 1, name=self.fresh(name + "_reduce"))
        self.act("Relu")
        self.conv(c, 1, name=self.fresh(name + "_expand"))
        gate = self.act("Sigmoid")
        return self.mul(x, gate)

    # --- pooling, head ----------------------------------------------------------------------------
    def pool(self, kind: str = "MaxPool", k: int = 2, *, stride: int = 2, pads=0, count_include_pad: int = 0,
             x: str | None = None) -> str:
        x = x or self.cur
        n, c, h, w = self.shapes[x]
        p = _pads4(pads)
        oh, ow = conv_out(h, k, stride, 1, p[0], p[2]), conv_out(w, k, stride, 1, p[1], p[3])
        assert oh >= 1 and ow >= 1
        extra = {"count_include_pad": count_include_pad} if kind == "AveragePool" else {}
        changes_constants = kind == "AveragePool" and count_include_pad and any(p)
        prods = None if changes_constants else list(self.producers[x])
        return self._emit(kind, [x], (n, c, oh, ow), prods, kernel_shape=[k, k], strides=[stride, stride], pads=p,
                          **extra)

    def global_avg_pool(self, *, x: str | None = None) -> str:
        x = x or self.cur
        n, c = self.shapes[x][:2]
        return self._emit("GlobalAveragePool", [x], (n, c, 1, 1), list(self.producers[x]))

    def flatten(self, *, x: str | None = None) -> str:
        x = x or self.cur
        s = self.shapes[x]
        return self._emit("Flatten", [x], (s[0], int(np.prod(s[1:]))), None, axis=1)

    def op(self, op_type: str, inputs: list[str], shape, **attributes) -> str:
        """Any other op (its channels are not tracked)."""
        return self._emit(op_type, inputs, shape, None, **attributes)

    # --- pruning ----------------------------------------------------------------------------------
    def zero_filter(self, layer: str, row: int) -> None:
        """Zero one output filter of a layer (Conv row, Gemm output, ConvTranspose column); bias kept."""
        info = self.layers[layer]
        self._zero(info["weight"], row if info["op"] != "ConvTranspose" else ("col", row))

    def _zero(self, weight: str, row) -> None:
        w = self.inits[weight]
        if isinstance(row, tuple):  # ConvTranspose: output channel = column
            w[:, row[1]] = 0
        elif w.ndim == 2 and not self._gemm_trans_b(weight):
            w[:, row] = 0
        else:
            w[row] = 0

    def _gemm_trans_b(self, weight: str) -> bool:
        for info in self.layers.values():
            if info["weight"] == weight:
                return info.get("trans_b", True)
        return True

    def zero_class(self, tensor: str, channel: int) -> bool:
        """Zero every filter producing `channel` of `tensor`; False if that is not known."""
        prods = self.producers.get(tensor)
        if prods is None or prods[channel] is None:
            return False
        for weight, row in prods[channel]:
            self._zero(weight, row)
        return True

    def zero_gamma(self, bn: str, channel: int) -> None:
        self.inits[self.bns[bn]["gamma"]][channel] = 0.0

    # --- output --------------------------------------------------------------------------------------
    def model(self, outputs: list[str] | None = None, *, dynamic_batch: bool = False,
              dynamic_hw: bool = False, unnamed: bool = False, constant_nodes=(),
              inits_as_inputs=(), value_info: bool = False) -> onnx.ModelProto:
        """The ONNX model (opset 17, IR 10). Variants exporters produce: `dynamic_batch` makes axis 0
        of inputs/outputs symbolic, `dynamic_hw` the spatial axes (only for graphs whose ops work at
        any size); `unnamed` drops node names; `constant_nodes` (initializer names) become Constant
        nodes; `inits_as_inputs` are also listed as graph inputs (old exporters' overridable defaults);
        `value_info` records the inferred shapes of intermediate tensors, as exporters do."""
        outputs = outputs or [self.cur]
        inputs = [helper.make_tensor_value_info(self.input_name, TensorProto.FLOAT, self.shapes[self.input_name])]
        outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, self.shapes[o]) for o in outputs]
        constant_nodes = set(constant_nodes) - set(inits_as_inputs)
        inits = [numpy_helper.from_array(np.array(v, order="C"), k) for k, v in self.inits.items()
                 if k not in constant_nodes]
        nodes = [helper.make_node("Constant", [], [k], value=numpy_helper.from_array(np.array(v, order="C"), k))
                 for k, v in self.inits.items() if k in constant_nodes]
        for n in self.nodes:
            copy = onnx.NodeProto()
            copy.CopyFrom(n)
            if unnamed:
                copy.name = ""
            nodes.append(copy)
        for k in inits_as_inputs:
            v = self.inits[k]
            inputs.append(helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape))
        graph = helper.make_graph(nodes, "g", inputs, outs, initializer=inits)
        for k, vi in enumerate(list(graph.input[:1]) + list(graph.output)):
            dims = vi.type.tensor_type.shape.dim
            if dynamic_batch:
                dims[0].dim_param = "N"
            if dynamic_hw and len(dims) == 4:
                dims[2].dim_param, dims[3].dim_param = ("H", "W") if k == 0 else (f"H{k}", f"W{k}")
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
        if value_info:
            m = onnx.shape_inference.infer_shapes(m, strict_mode=True)
        onnx.checker.check_model(m)
        return m


def exact_counts() -> dict:
    """simplify options under which every dead channel goes (no width alignment), for tests that
    assert exact channel counts; empty where simplify has no such option."""
    from dataclasses import fields

    from onnxprune.options import SimplifyOptions
    return {"align": 1} if "align" in {f.name for f in fields(SimplifyOptions)} else {}


# --- running and measuring --------------------------------------------------------------------------

def ort_session(model: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def input_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    inits = {t.name for t in model.graph.initializer}
    return {i.name: tuple(d.dim_value if d.HasField("dim_value") else 1 for d in i.type.tensor_type.shape.dim)
            for i in model.graph.input if i.name not in inits}


def random_feeds(model: onnx.ModelProto, seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal(s) * scale).astype(np.float32) for k, s in input_shapes(model).items()}


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort_session(model).run(None, feeds)


def assert_same_function(reference: onnx.ModelProto, candidate: onnx.ModelProto, *, atol: float, rtol: float,
                         seeds=(101, 202), scale: float = 1.0) -> None:
    """Outputs of `candidate` equal those of `reference` on onnxruntime (shapes and values) on fresh inputs."""
    ref_s, cand_s = ort_session(reference), ort_session(candidate)
    assert [o.name for o in ref_s.get_outputs()] == [o.name for o in cand_s.get_outputs()]
    for seed in seeds:
        feeds = random_feeds(reference, seed, scale)
        for r, c, o in zip(ref_s.run(None, feeds), cand_s.run(None, feeds), ref_s.get_outputs()):
            assert r.shape == c.shape, f"output {o.name}: shape {c.shape} != {r.shape}"
            np.testing.assert_allclose(c, r, atol=atol, rtol=rtol, err_msg=f"output {o.name}, seed {seed}")


def inits_of(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def layer_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Node name -> weight array of every Conv / ConvTranspose / Gemm / MatMul with a constant weight."""
    inits = inits_of(model)
    return {n.name: inits[n.input[1]] for n in model.graph.node
            if n.op_type in LAYER_OPS and len(n.input) > 1 and n.input[1] in inits}


def weight_count(model: onnx.ModelProto) -> int:
    """Weight elements of all Conv / ConvTranspose / Gemm / MatMul layers (per node: names may be empty),
    not counting the border maps' one-channel convs over a ones image (they are not layers of the
    architecture; `border_convs` counts them)."""
    inits = {t.name: t for t in model.graph.initializer}
    border = {n.output[0] for n in linear.border_convs(model)}
    return sum(int(np.prod(inits[n.input[1]].dims)) for n in model.graph.node
               if n.op_type in LAYER_OPS and len(n.input) > 1 and n.input[1] in inits and n.output[0] not in border)


def ones_images(model: onnx.ModelProto) -> set[str]:
    """The ones images the border maps read."""
    return {n.input[0] for n in linear.border_convs(model)}


def border_convs(model: onnx.ModelProto) -> int:
    return len(linear.border_convs(model))


def node_by_name(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    for n in model.graph.node:
        if n.name == name:
            return n
    raise KeyError(name)
