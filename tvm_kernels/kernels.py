"""TensorIR kernels for block-sparse (BSR) 2-D convolution, NCHW, float32.

conv(x, W) = W_mat @ im2col(x), with W_mat = W.reshape(C_out, C_in*kh*kw) stored as BSR.
Two kernels:
  * im2col: (N, C_in, H, W) -> (N, C_in*kh*kw, OH*OW); skipped for 1x1/stride-1/no-pad convs,
    where the input itself, reshaped, is that matrix.
  * bsr_matmul: y[n, :, p] = W_bsr @ col[n, :, p] (+ bias, ReLU), written as a scheduled
    template the way fast CPU sparse kernels are built: parallel over (batch, block row, pixel
    tile), the bsr output channels of a block x `pixels` accumulators held in registers,
    vectorized over pixels, looping only over the non-zero blocks of the row (CSR indptr),
    so the time tracks the number of non-zero blocks.  Its knob is `BSRTile.pixels`.
The kernels are marked `tirx.is_scheduled`: meta_schedule leaves them alone and we tune the
knob ourselves (tune.py), measuring with the real index arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm.script import tirx as T

from .bsr import BSRMatrix


@dataclass(frozen=True)
class ConvSpec:
    batch: int
    c_in: int
    height: int
    width: int
    c_out: int
    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, bottom, right
    dilation: tuple[int, int] = (1, 1)
    bsr: int = 4
    bsc: int = 1
    relu: bool = False

    @property
    def out_h(self) -> int:
        span = self.dilation[0] * (self.kernel[0] - 1) + 1
        return (self.height + self.padding[0] + self.padding[2] - span) // self.stride[0] + 1

    @property
    def out_w(self) -> int:
        span = self.dilation[1] * (self.kernel[1] - 1) + 1
        return (self.width + self.padding[1] + self.padding[3] - span) // self.stride[1] + 1

    @property
    def num_pixels(self) -> int:
        return self.out_h * self.out_w

    @property
    def num_cols(self) -> int:
        return self.c_in * self.kernel[0] * self.kernel[1]

    @property
    def needs_im2col(self) -> bool:
        return not (
            self.kernel == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0, 0, 0)
        )

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.c_out, self.out_h, self.out_w)

    @property
    def col_shape(self) -> tuple[int, int, int]:
        return (self.batch, self.num_cols, self.num_pixels)

    def flops_dense(self) -> int:
        return 2 * self.batch * self.c_out * self.num_cols * self.num_pixels


@dataclass(frozen=True)
class BSRTile:
    """Schedule knob of bsr_matmul: output pixels per register tile (vector width multiple)."""

    pixels: int = 32


def tile_candidates(spec: ConvSpec) -> list[BSRTile]:
    """Pixel tiles worth measuring: the accumulator (bsr x pixels) must fit the vector registers."""
    sizes = [p for p in (8, 16, 32, 64, 128) if spec.bsr * p <= 512 and p <= max(8, spec.num_pixels)]
    return [BSRTile(p) for p in sizes] or [BSRTile(8)]


def default_tile(spec: ConvSpec) -> BSRTile:
    return BSRTile(max(8, min(64, 256 // spec.bsr, spec.num_pixels)))


@dataclass(frozen=True)
class KernelArrays:
    """The constant arguments of bsr_matmul (padded to at least one block: TIR dislikes 0-size)."""

    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    bias: np.ndarray

    @property
    def nnzb(self) -> int:
        return int(self.indices.shape[0])


def kernel_arrays(m: BSRMatrix, bias: np.ndarray | None) -> KernelArrays:
    indices, data = m.indices, m.data
    if m.nnzb == 0:  # an all-zero weight: one dummy block that no row points to
        indices = np.zeros(1, np.int32)
        data = np.zeros((1,) + m.block, np.float32)
    if bias is None:
        bias = np.zeros(m.shape[0], np.float32)
    return KernelArrays(
        m.indptr.astype(np.int32), indices.astype(np.int32), data.astype(np.float32),
        np.asarray(bias, np.float32).reshape(m.shape[0]),
    )


def _scheduled(func: tvm.tirx.PrimFunc, name: str) -> tvm.tirx.PrimFunc:
    return func.with_attr({"global_symbol": name, "tirx.is_scheduled": True, "tirx.noalias": True})


def im2col_prim_func(spec: ConvSpec, name: str = "im2col") -> tvm.tirx.PrimFunc:
    N, C, H, W = spec.batch, spec.c_in, spec.height, spec.width
    KH, KW = spec.kernel
    SH, SW = spec.stride
    PT, PL = spec.padding[0], spec.padding[1]
    DH, DW = spec.dilation
    OH, OW = spec.out_h, spec.out_w
    K, P = spec.num_cols, spec.num_pixels

    @T.prim_func(s_tir=True)
    def im2col(x: T.Buffer((N, C, H, W), "float32"), col: T.Buffer((N, K, P), "float32")):
        with T.sblock("root"):
            for row in T.parallel(N * K):
                for oh in range(OH):
                    for ow in range(OW):
                        ih = oh * SH - PT + (row % K) // KW % KH * DH
                        iw = ow * SW - PL + row % KW * DW
                        col[row // K, row % K, oh * OW + ow] = T.if_then_else(
                            0 <= ih and ih < H and 0 <= iw and iw < W,
                            x[row // K, row % K // (KH * KW), ih, iw],
                            T.float32(0),
                        )

    return _scheduled(im2col, name)


def bsr_matmul_prim_func(
    spec: ConvSpec, nnzb: int, tile: BSRTile, name: str = "bsr_matmul"
) -> tvm.tirx.PrimFunc:
    """y[n, co, p] = act(sum_b data[b, co % bsr, j] * col[n, indices[b]*bsc + j, p] + bias[co])."""
    N, K, P, COUT = spec.batch, spec.num_cols, spec.num_pixels, spec.c_out
    BSR, BSC = spec.bsr, spec.bsc
    NBR = COUT // BSR
    NNZ = max(1, nnzb)
    NT = min(tile.pixels, P)
    NTILES = P // NT
    TAIL = P - NTILES * NT
    # ReLU as max(v, LOW); LOW = lowest float when there is no ReLU
    LOW = 0.0 if spec.relu else float(np.finfo(np.float32).min)

    @T.macro
    def pixel_tile(xb, ip, ind, wd, bb, yb, t_n, t_br, t_p0, width):
        acc = T.decl_buffer((BSR, width), "float32", scope="local")
        for r in T.unroll(BSR):
            for v in T.vectorized(width):
                acc[r, v] = T.float32(0)
        for b in range(ip[t_br], ip[t_br + 1]):
            for j in T.unroll(BSC):
                for r in T.unroll(BSR):
                    for v in T.vectorized(width):
                        acc[r, v] = acc[r, v] + wd[b, r, j] * xb[t_n, ind[b] * BSC + j, t_p0 + v]
        for r in T.unroll(BSR):
            for v in T.vectorized(width):
                yb[t_n, t_br * BSR + r, t_p0 + v] = T.max(
                    acc[r, v] + bb[t_br * BSR + r], T.float32(LOW)
                )

    @T.prim_func(s_tir=True)
    def bsr_matmul(
        col: T.Buffer((N, K, P), "float32"),
        indptr: T.Buffer((NBR + 1,), "int32"),
        indices: T.Buffer((NNZ,), "int32"),
        data: T.Buffer((NNZ, BSR, BSC), "float32"),
        bias: T.Buffer((COUT,), "float32"),
        y: T.Buffer((N, COUT, P), "float32"),
    ):
        with T.sblock("root"):
            for it in T.parallel(N * NBR * NTILES):
                pixel_tile(col, indptr, indices, data, bias, y,
                           it // (NBR * NTILES), it // NTILES % NBR, it % NTILES * NT, NT)
            if TAIL > 0:
                for it in T.parallel(N * NBR):
                    pixel_tile(col, indptr, indices, data, bias, y,
                               it // NBR, it % NBR, NTILES * NT, TAIL)

    return _scheduled(bsr_matmul, name)


def reference_conv2d(x: np.ndarray, w: np.ndarray, spec: ConvSpec, bias=None) -> np.ndarray:
    """Plain numpy conv (float64 accumulation) used to check the kernels."""
    N, C, H, W = x.shape
    pt, pl, pb, pr = spec.padding
    xp = np.zeros((N, C, H + pt + pb, W + pl + pr), np.float64)
    xp[:, :, pt:pt + H, pl:pl + W] = x
    out = np.zeros(spec.out_shape, np.float64)
    sh, sw = spec.stride
    dh, dw = spec.dilation
    for i in range(spec.kernel[0]):
        for j in range(spec.kernel[1]):
            patch = xp[:, :, i * dh: i * dh + sh * (spec.out_h - 1) + 1: sh,
                       j * dw: j * dw + sw * (spec.out_w - 1) + 1: sw]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j].astype(np.float64))
    if bias is not None:
        out += np.asarray(bias, np.float64).reshape(1, -1, 1, 1)
    if spec.relu:
        out = np.maximum(out, 0)
    return out.astype(np.float32)
