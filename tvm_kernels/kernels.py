"""TensorIR kernels for block-sparse (BSR) and depthwise 2-D convolution, NCHW, float32.

conv(x, W) = W_mat @ im2col(x), with W_mat = W.reshape(C_out, C_in*kh*kw) stored as BSR.
Kernels:
  * im2col: (N, C_in, H, W) -> (N, C_in*kh*kw, OH*OW); skipped for 1x1/stride-1/no-pad convs,
    where the input itself, viewed flat, is that matrix.
  * bsr_matmul: y[n, :, p] = W_bsr @ col[n, :, p] (+ epilogue), written as a scheduled
    template the way fast CPU sparse kernels are built: parallel over (batch, block row, pixel
    tile), the bsr output channels of a block x `pixels` accumulators held in registers,
    vectorized over pixels, looping only over the non-zero blocks of the row (CSR indptr),
    so the time tracks the number of non-zero blocks.  Its knobs are `BSRTile.pixels` and the
    loop order (block rows inner keeps a pixel tile of the input in L1 while every block row
    reads it; packed also copies that tile contiguous first, as dense GEMMs do).
  * depthwise: one channel plane per parallel iteration, copied into a zero-margined scratch
    buffer (columns de-interleaved by stride phase with a vector shuffle, so strided taps are
    contiguous loads), then K*K vector FMAs per tile of 4 output rows x 8 columns (independent
    chains sharing loads); small stride-1 planes (rows under
    16 wide: 14x14, 7x7) are computed flat on the scratch's row pitch instead, in full vectors.
    A plane nobody reads is skipped, a plane of a constant input copied (`COMPUTE`).  No knob.
  * expand_depthwise: a 1x1 bsr_matmul whose only reader is a depthwise conv, both in one
    kernel; per block row the expanded planes stay in an L2-sized buffer (computing them in
    bands of rows, each convolved while in L1, measured 4-6 % slower on MobileNetV2: Zen 5).
  * direct: a dense conv of few input channels (a stem) on the depthwise grid, 8 output
    channels sharing each input load.
All end in the same fused epilogue (`Epilogue`): + bias, + residual tensor, clamp (ReLU,
ReLU6, Clip), so a MobileNet/ResNet block's adds and activations cost no extra pass over memory.
The kernels are marked `tirx.is_scheduled`: meta_schedule leaves them alone and we tune the
knob ourselves (tune.py), measuring with the real index arrays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm.script import tirx as T

from .bsr import BSRMatrix

# Register tiles (acc) are declared in the default "global" scope, not "local": on the CPU,
# TVM puts only global allocations under 1 KB on the stack (which LLVM promotes to registers)
# and turns a "local" one into a TVMBackendAllocWorkspace call per tile, its accumulators
# then living in memory: 1.1-1.3x slower kernels on MobileNetV2's shapes (Zen 5).



@dataclass(frozen=True)
class Epilogue:
    """y = clamp(acc + bias[c] (+ residual), low, high), applied as the kernel stores."""

    low: float = -math.inf
    high: float = math.inf
    residual: bool = False

    def apply(self, acc, bias, residual=None):
        """The TIR expression (called at TVMScript parse time; no op for an infinite bound)."""
        value = acc + bias
        if residual is not None:
            value = value + residual
        if self.low > -math.inf:
            value = T.max(value, T.float32(self.low))
        if self.high < math.inf:
            value = T.min(value, T.float32(self.high))
        return value

    def describe(self) -> str:
        parts = ["+residual"] if self.residual else []
        if (self.low, self.high) == (0.0, math.inf):
            parts.append("+relu")
        elif self.low > -math.inf or self.high < math.inf:
            parts.append(f"+clip({self.low:g}, {self.high:g})")
        return ", ".join(parts)


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
    epilogue: Epilogue = field(default_factory=Epilogue)

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

    @property
    def matmul_input_shape(self) -> tuple[int, ...]:
        """What bsr_matmul reads: im2col's output, or (1x1, stride 1, no pad) x itself."""
        if self.needs_im2col:
            return self.col_shape
        return (self.batch, self.c_in, self.height, self.width)


@dataclass(frozen=True)
class BSRTile:
    """Schedule knobs of bsr_matmul: output pixels per register tile (vector width multiple),
    and the loop order: block rows outside pixel tiles (the default), block rows inside them
    (`rows_inner`), or block rows inside with each pixel tile's input first copied contiguous
    (`packed`, as dense GEMMs pack their panels: the non-zero blocks of a row read scattered
    input rows P floats apart, and measured 1.2-3x slower from there than from the packed copy)."""

    pixels: int = 32
    rows_inner: bool = False
    packed: bool = False

    @property
    def label(self) -> str:
        return f"{self.pixels}px" + ("/packed" if self.packed else "/rows-inner" if self.rows_inner else "")


def tile_candidates(spec: ConvSpec, packed: bool = True, fused: bool = False) -> list[BSRTile]:
    """Pixel tiles worth measuring: powers of two whose accumulator (bsr x pixels) fits the
    vector registers, in each loop order (`packed` ones up to 32 pixels: wider packed tiles
    measured slower everywhere).  (Tiles of 49 or 98 pixels measured 10x slower: odd vector
    widths.)  A `fused` kernel (expand + depthwise, or conv + mean) runs its block rows
    outermost and has no packed order: only its tile width is a choice."""
    sizes = [p for p in (8, 16, 32, 64, 128) if spec.bsr * p <= 512 and p <= max(8, spec.num_pixels)]
    if fused:
        return [BSRTile(p) for p in sizes or [8]]
    tiles = [BSRTile(p, inner) for p in sizes or [8] for inner in (False, True)]
    return tiles + [BSRTile(p, packed=True) for p in sizes or [8] if packed and p <= 32]


def default_tile(spec: ConvSpec) -> BSRTile:
    return BSRTile(max(8, min(64, 256 // spec.bsr, 1 << (spec.num_pixels.bit_length() - 1))))


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

    @property
    def row_blocks(self) -> int | None:
        """Blocks per block row when every row holds the same number (> 0), else None."""
        counts = np.diff(self.indptr)
        return int(counts[0]) if counts.size and counts[0] > 0 and np.all(counts == counts[0]) else None


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


def _lanes(width: int) -> int:
    """Vector length for a tile `width` pixels wide: its largest power-of-two divisor, at most 16.
    LLVM splits a power-of-two vector into machine registers cleanly; a <24 x float> it
    scalarizes (measured 10x slower), so 24 pixels run as 3 x 8 lanes."""
    return min(16, width & -width)


STACK_BYTES = 1024  # TVM's kMaxStackAlloca: a buffer of this size or more is a workspace call


def _row_groups(rows: int, width: int) -> int:
    """Into how many accumulator buffers (at most 4) a tile of `rows` x `width` floats splits so
    that each stays under STACK_BYTES (on the stack, in registers); 1 where no split fits."""
    return next((g for g in (1, 2, 4) if rows % g == 0 and rows // g * width * 4 < STACK_BYTES), 1)


def _group_shape(rows: int, width: int, group: int) -> tuple[int, int]:
    """The shape of accumulator buffer `group` of a rows x width tile: (1, 1) where unused, so
    that an unsplittable tile of 1 KB or more costs one workspace call, not four."""
    groups = _row_groups(rows, width)
    return (rows // groups, width) if group < groups else (1, 1)


def _bsr_tile_macro(spec: ConvSpec, row_blocks: int | None = None):
    """The register tile of bsr_matmul: `width` pixels from t_p0 of the `bsr` output channels of
    block row t_br, read from xb[t_n, :, x_p0 + v] (x_p0 = t_p0 but in a packed tile), stored
    (through the epilogue) at yb[y_n, y_c0 + r, t_p0 + v]. With
    `row_blocks` (every block row holds that many blocks: row-balanced pruning) the block loop
    has static bounds and indptr is not read.  The bsr x width accumulators are split by rows
    into _row_groups buffers (a 4 x 64 tile is 1 KB: one workspace call per tile, and LLVM kept
    it in memory), each input load still feeding every row's FMA."""
    BSR, BSC = spec.bsr, spec.bsc
    ep = spec.epilogue
    RES = ep.residual
    STATIC = row_blocks is not None
    RB = row_blocks or 0

    @T.macro
    def accumulate_rows(xb, ind, wd, acc, t_n, t_p0, width, b, j, r0, rows):
        for r in T.unroll(rows):
            for u in T.unroll(width // _lanes(width)):
                for v in T.vectorized(_lanes(width)):
                    acc[r, u * _lanes(width) + v] = acc[r, u * _lanes(width) + v] + wd[b, r0 + r, j] * xb[
                        t_n, ind[b] * BSC + j, t_p0 + u * _lanes(width) + v]

    @T.macro
    def accumulate(xb, ind, wd, a0, a1, a2, a3, t_n, t_p0, width, b):
        groups = T.meta_var(_row_groups(BSR, width))
        rows = T.meta_var(BSR // _row_groups(BSR, width))
        for j in T.unroll(BSC):
            accumulate_rows(xb, ind, wd, a0, t_n, t_p0, width, b, j, 0, rows)
            if groups > 1:
                accumulate_rows(xb, ind, wd, a1, t_n, t_p0, width, b, j, rows, rows)
            if groups > 2:
                accumulate_rows(xb, ind, wd, a2, t_n, t_p0, width, b, j, 2 * rows, rows)
                accumulate_rows(xb, ind, wd, a3, t_n, t_p0, width, b, j, 3 * rows, rows)

    @T.macro
    def zero(acc, rows, width):
        for r in T.unroll(rows):
            for v in T.vectorized(width):
                acc[r, v] = T.float32(0)

    @T.macro
    def store(acc, bb, rb, yb, t_br, t_p0, width, y_n, y_c0, r0, rows):
        for r in T.unroll(rows):
            for v in T.vectorized(width):
                if RES:
                    yb[y_n, y_c0 + r0 + r, t_p0 + v] = ep.apply(
                        acc[r, v], bb[t_br * BSR + r0 + r], rb[y_n, y_c0 + r0 + r, t_p0 + v])
                else:
                    yb[y_n, y_c0 + r0 + r, t_p0 + v] = ep.apply(acc[r, v], bb[t_br * BSR + r0 + r])

    @T.macro
    def pixel_tile(xb, ip, ind, wd, bb, rb, yb, t_n, t_br, t_p0, width, y_n, y_c0, x_p0):
        groups = T.meta_var(_row_groups(BSR, width))
        rows = T.meta_var(BSR // _row_groups(BSR, width))
        a0 = T.decl_buffer((rows, width), "float32")
        a1 = T.decl_buffer(_group_shape(BSR, width, 1), "float32")  # (1, 1) where unused
        a2 = T.decl_buffer(_group_shape(BSR, width, 2), "float32")
        a3 = T.decl_buffer(_group_shape(BSR, width, 3), "float32")
        zero(a0, rows, width)
        if groups > 1:
            zero(a1, rows, width)
        if groups > 2:
            zero(a2, rows, width)
            zero(a3, rows, width)
        if STATIC:
            for k in range(RB):
                accumulate(xb, ind, wd, a0, a1, a2, a3, t_n, x_p0, width, t_br * RB + k)
        else:
            for b in range(ip[t_br], ip[t_br + 1]):
                accumulate(xb, ind, wd, a0, a1, a2, a3, t_n, x_p0, width, b)
        store(a0, bb, rb, yb, t_br, t_p0, width, y_n, y_c0, 0, rows)
        if groups > 1:
            store(a1, bb, rb, yb, t_br, t_p0, width, y_n, y_c0, rows, rows)
        if groups > 2:
            store(a2, bb, rb, yb, t_br, t_p0, width, y_n, y_c0, 2 * rows, rows)
            store(a3, bb, rb, yb, t_br, t_p0, width, y_n, y_c0, 3 * rows, rows)

    return pixel_tile


def _parts(n: int, threads: int) -> tuple[int, int]:
    """(parts, chunk): n iterations as TVM's parallel loop splits them over `threads`, in
    contiguous chunks of ceil(n / threads); a kernel that loops over the parts itself can
    allocate its scratch once per part instead of once per iteration.  (Loop over range(chunk)
    with a bound check: a loop over range(part * chunk, min(n, ...)) computed wrong results
    for every part but the first in TVM 0.27.)"""
    chunk = -(-n // max(1, threads))
    return -(-n // chunk), chunk


def _pixel_tiles(length: int, pixels: int) -> tuple[int, int, int]:
    """(tile width, full tiles, tail) over `length` pixels in tiles of `pixels`: the last
    length % width pixels are one more full-width tile ending at `length`, overlapping the
    previous one (its pixels are recomputed and stored again with the same values).  A narrow
    tail tile would re-read every block for a few pixels in an odd vector width.  The same
    rule splits the GEMV's outputs into weight blocks."""
    width = min(pixels, length)
    return width, length // width, length % width


def bsr_matmul_prim_func(
    spec: ConvSpec, nnzb: int, tile: BSRTile, name: str = "bsr_matmul",
    row_blocks: int | None = None, pooled: tuple[int, ...] | None = None, threads: int = 1,
) -> tvm.tirx.PrimFunc:
    """y[n, co, p] = epilogue(sum_b data[b, co % bsr, j] * col[n, indices[b]*bsc + j, p], bias[co]).
    Its tensors are NCHW (x or im2col's output in, y and the residual out), viewed flat as
    (n, channel, pixel) inside: no reshape copies around the call.  With `pooled` (the shape of
    the global mean, (N, C_out, 1, 1) or (N, C_out)) y is the mean of that over the pixels:
    the conv's output never reaches memory (no residual then, and block rows run outermost).
    A packed tile's pixel tiles run in `threads` parts, each packing into one buffer allocated
    once (see expand_depthwise_prim_func)."""
    N, K, P, COUT = spec.batch, spec.num_cols, spec.num_pixels, spec.c_out
    BSR, BSC = spec.bsr, spec.bsc
    NBR = COUT // BSR
    NNZ = max(1, nnzb)
    NT, NTILES, TAIL = _pixel_tiles(spec.num_pixels, tile.pixels)
    ROWS_INNER = tile.rows_inner
    PACKED = tile.packed
    NTA = NTILES + (1 if TAIL else 0)
    L = _lanes(NT)
    RES = spec.epilogue.residual
    pixel_tile = _bsr_tile_macro(spec, row_blocks)
    PARTS, CHUNK = _parts(N * NTA, threads)
    POOLED = pooled is not None
    assert not (POOLED and RES) and (not POOLED or int(np.prod(pooled)) == N * COUT), (spec, pooled)

    @T.macro
    def mean_tiles(col, indptr, indices, data, bias, y):
        """The global mean: each block row runs its pixel tiles and adds each to L vector lanes
        per channel (the overlapping tail tile's recomputed pixels masked out by a select:
        if_then_else measured 1.9x slower), summed across lanes at the end; no per-row buffer
        (1 KB or more is a workspace call per iteration).  MobileNetV2's last 1x1 conv (320 ->
        1280 at 7x7, 90 %) measured 19.7 us, against 22 us as a plain bsr_matmul plus the mean."""
        for it in T.parallel(N * NBR):
            n = T.meta_var(it // NBR)
            br = T.meta_var(it % NBR)
            lanes = T.decl_buffer((BSR, L), "float32")
            for r in T.unroll(BSR):
                for v in T.vectorized(L):
                    lanes[r, v] = T.float32(0)
            for t in range(NTA):
                p0 = T.meta_var(T.min(t * NT, P - NT))
                tile_out = T.decl_buffer((1, BSR, NT), "float32")
                pixel_tile(col, indptr, indices, data, bias, tile_out, tile_out, n, br, 0, NT, 0, 0, p0)
                for r in T.unroll(BSR):
                    for u in T.unroll(NT // L):
                        for v in T.vectorized(L):
                            lanes[r, v] = lanes[r, v] + T.Select(
                                p0 + u * L + v >= t * NT, tile_out[0, r, u * L + v], T.float32(0))
            for r in T.unroll(BSR):
                total = T.decl_buffer((1,), "float32")
                total[0] = T.float32(0)
                for v in T.unroll(L):
                    total[0] = total[0] + lanes[r, v]
                y[n, br * BSR + r] = total[0] / T.float32(P)

    @T.macro
    def all_tiles(col, indptr, indices, data, bias, res, y):
        if PACKED:  # per pixel tile: its K x NT input block copied contiguous, then every block row
            for part in T.parallel(PARTS):
                pack = T.decl_buffer((1, K, NT), "float32")
                for i in range(CHUNK):
                    it = T.meta_var(part * CHUNK + i)
                    n = T.meta_var(it // NTA)
                    p0 = T.meta_var(T.min(it % NTA * NT, P - NT))
                    if it < N * NTA:
                        for k in range(K):
                            for u in T.unroll(NT // L):
                                for v in T.vectorized(L):
                                    pack[0, k, u * L + v] = col[n, k, p0 + u * L + v]
                        for br in range(NBR):
                            pixel_tile(pack, indptr, indices, data, bias, res, y, 0, br, p0, NT, n,
                                       br * BSR, 0)
        else:  # the tail tile in the same parallel loop: one region, split evenly
            for it in T.parallel(N * NBR * NTA):
                n = T.meta_var(it // (NBR * NTA))
                br = T.meta_var(it % NBR if ROWS_INNER else it // NTA % NBR)
                p0 = T.meta_var(T.min((it // NBR if ROWS_INNER else it) % NTA * NT, P - NT))
                pixel_tile(col, indptr, indices, data, bias, res, y, n, br, p0, NT, n, br * BSR, p0)

    IN, OUT = spec.matmul_input_shape, pooled or spec.out_shape

    @T.prim_func(s_tir=True)
    def bsr_matmul(
        x: T.Buffer(IN, "float32"),
        indptr: T.Buffer((NBR + 1,), "int32"),
        indices: T.Buffer((NNZ,), "int32"),
        data: T.Buffer((NNZ, BSR, BSC), "float32"),
        bias: T.Buffer((COUT,), "float32"),
        y: T.Buffer(OUT, "float32"),
    ):
        with T.sblock("root"):
            col = T.decl_buffer((N, K, P), "float32", data=x.data)
            if POOLED:
                mean_tiles(col, indptr, indices, data, bias, T.decl_buffer((N, COUT), "float32", data=y.data))
            else:
                y_flat = T.decl_buffer((N, COUT, P), "float32", data=y.data)
                all_tiles(col, indptr, indices, data, bias, y_flat, y_flat)

    @T.prim_func(s_tir=True)
    def bsr_matmul_residual(
        x: T.Buffer(IN, "float32"),
        indptr: T.Buffer((NBR + 1,), "int32"),
        indices: T.Buffer((NNZ,), "int32"),
        data: T.Buffer((NNZ, BSR, BSC), "float32"),
        bias: T.Buffer((COUT,), "float32"),
        res: T.Buffer(OUT, "float32"),
        y: T.Buffer(OUT, "float32"),
    ):
        with T.sblock("root"):
            col = T.decl_buffer((N, K, P), "float32", data=x.data)
            res_flat = T.decl_buffer((N, COUT, P), "float32", data=res.data)
            y_flat = T.decl_buffer((N, COUT, P), "float32", data=y.data)
            all_tiles(col, indptr, indices, data, bias, res_flat, y_flat)

    return _scheduled(bsr_matmul_residual if RES else bsr_matmul, name)


def depthwise_supported(spec: ConvSpec) -> str:
    """'' if depthwise_prim_func handles `spec` (groups = C_in = C_out), else why not."""
    if spec.width % spec.stride[1]:
        return f"width {spec.width} not a multiple of stride {spec.stride[1]}"
    if spec.dilation[1] != 1:
        return "dilated columns"
    return ""


@dataclass(frozen=True)
class _PlaneKernel:
    """A depthwise plane's TIR macros over a scratch buffer xs of shape (planes, length), one
    zero-margined plane per row s of it.

    Grid layout: source column m*S + q of source row i sits at flat position
    ((PT + i) * S + q) * MW + ML + m of its scratch row; the margins around are zero.  Output
    column v, tap kw reads source column v*S + kw - PL = (v + d)*S + q with q = (kw - PL) mod S,
    d = (kw - PL) div S: a contiguous run of MW-pitched grid row (oh*SH + kh*DH) * S + q.
    A source plane's interior rows [first, first + span) hold its pixels (and the margin
    columns between them): a pointwise conv computed over that range in the grid's order from a
    grid-laid-out input writes the plane in place (expand_depthwise_prim_func does)."""

    zero_margins: object  # (xs, s): zero every position the source pixels do not fill
    fill: object  # (x, xs, s, x_n, x_c): the plane x[x_n, x_c] into scratch row s, margins zeroed
    compute: object  # (xs, s, w, bias, res, y, n, c): y[n, c] from scratch row s, epilogue applied
    length: int  # floats per scratch row
    first: int  # flat position of grid row PT (the first source row)
    span: int  # flat length of the source rows, margin columns included
    tap: object  # (oh, kh, kw): where tap (kh, kw) of output row oh, column 0, reads


def _depthwise_plane(spec: ConvSpec) -> _PlaneKernel:
    H, W = spec.height, spec.width
    KH, KW = spec.kernel
    S, SH = spec.stride[1], spec.stride[0]
    PT, PL = spec.padding[0], spec.padding[1]
    DH = spec.dilation[0]
    OH, OW = spec.out_h, spec.out_w
    WQ = W // S
    taps = [((kw - PL) % S, (kw - PL) // S) for kw in range(KW)]
    ML = max(0, -min(d for _, d in taps))
    MW = max(ML + WQ, max(ML + d + OW for _, d in taps))
    HP = max(PT + H, (OH - 1) * SH + (KH - 1) * DH + 1)
    GRID = HP * S * MW
    ep = spec.epilogue
    RES = ep.residual
    # copy chunks of LANES scratch columns; output tiles of ROWS rows x SEG_LANES columns, so
    # ROWS independent FMA chains share their input rows' loads (1 row x 16 columns was bound
    # by the FMA latency of two chains: 4 x 8 measured 1.1-1.2x faster on 28-112-wide planes)
    LANES = 16
    SEG_LANES = 8
    ROWS = min(OH, 4)
    NCOPY, COPY_TAIL = WQ // LANES, WQ % LANES
    SEG_WIDTH = min(SEG_LANES, OW)
    NSEG, SEG_TAIL = OW // SEG_WIDTH, OW % SEG_WIDTH
    NGROUPS = (OH + ROWS - 1) // ROWS
    # Small stride-1 planes (7x7, 14x14): rows shorter than a vector waste lanes (a 7-wide row is
    # a 4 + 2 + 1 split of every operation). There the output is computed on the grid's row
    # pitch MW, flat: output p = oh * MW + ow reads scratch p + kh * MW + kw + (ML - PL), one
    # contiguous run per tap, in full vectors; the MW - OW extra columns per row are computed
    # and dropped.
    FLAT = S == 1 and SH == 1 and DH == 1 and OW < LANES
    # 32 or 64 accumulator lanes (independent FMA chains), the one computing fewer outputs, the
    # wider on a tie: a 7x7 plane (63 on its pitch) is one 64-lane segment, 0.91x the time of
    # two 32-lane ones; a 14x14 (224) is 7 x 32 (64 lanes, 256 outputs: 1.1x slower)
    FLAT_LANES = min((64, 32), key=lambda lanes: -(-OH * MW // lanes) * lanes)
    NFLAT = (OH * MW + FLAT_LANES - 1) // FLAT_LANES
    SHIFT = ML - PL
    # the last flat vector reads past the grid by up to FLAT_LANES + KW: zeros
    LENGTH = (GRID + FLAT_LANES + KW + LANES - 1) // LANES * LANES if FLAT else GRID

    def tap(oh, kh, kw):
        """Where in a scratch row tap (kh, kw) of output row oh, column 0, reads (see _PlaneKernel)."""
        return ((oh * SH + kh * DH) * S + (kw - PL) % S) * MW + ML + (kw - PL) // S

    @T.macro
    def zero_run(xs, s, start, length):
        for chunk in range(length // LANES):
            for v in T.vectorized(LANES):
                xs[s, start + chunk * LANES + v] = T.float32(0)
        for j in range(length // LANES * LANES, length):
            xs[s, start + j] = T.float32(0)

    @T.macro
    def zero_margins(xs, s):
        """Zero what the source pixels leave unwritten: the rows above and below them, the
        columns left and right of them, the flat tail (zeroing the whole grid cost as much as
        the copy on wide planes)."""
        zero_run(xs, s, 0, PT * S * MW)
        for i in range(H):
            for q in range(S):
                for j in range(ML):
                    xs[s, ((PT + i) * S + q) * MW + j] = T.float32(0)
                for j in range(ML + WQ, MW):
                    xs[s, ((PT + i) * S + q) * MW + j] = T.float32(0)
        zero_run(xs, s, (PT + H) * S * MW, LENGTH - (PT + H) * S * MW)

    @T.macro
    def copy_columns(x, xs, s, x_n, x_c, i, q, m0, width):
        if width == 1:  # a Ramp needs two lanes
            xs[s, ((PT + i) * S + q) * MW + ML + m0] = x[x_n, x_c, i, m0 * S + q]
        else:
            xs[s, T.Ramp(((PT + i) * S + q) * MW + ML + m0, 1, width)] = T.Shuffle(
                [x[x_n, x_c, i, T.Ramp(m0 * S, 1, width * S)]], [q + S * m for m in range(width)])

    @T.macro
    def copy_plane(x, xs, s, x_n, x_c):
        for i in range(H):
            for q in T.unroll(S):
                for chunk in range(NCOPY):
                    copy_columns(x, xs, s, x_n, x_c, i, q, chunk * LANES, LANES)
                if COPY_TAIL > 0:
                    copy_columns(x, xs, s, x_n, x_c, i, q, NCOPY * LANES, COPY_TAIL)

    @T.macro
    def fill(x, xs, s, x_n, x_c):
        if FLAT:  # a few vectors: zeroing all of it beats zeroing the margins one by one
            zero_run(xs, s, 0, LENGTH)
        else:
            zero_margins(xs, s)
        copy_plane(x, xs, s, x_n, x_c)

    @T.macro
    def row_segment(xs, s, w, bias, res, y, n, c, oh0, v0, width):
        """Output rows oh0 .. oh0 + ROWS - 1, columns v0 .. v0 + width - 1: ROWS x width
        accumulators (independent FMA chains; adjacent rows share their input rows' loads)."""
        acc = T.decl_buffer((ROWS, width), "float32")
        for rr in T.unroll(ROWS):
            for v in T.vectorized(width):
                acc[rr, v] = T.float32(0)
        for kh in T.unroll(KH):
            for kw in T.unroll(KW):
                for rr in T.unroll(ROWS):
                    for v in T.vectorized(width):
                        acc[rr, v] = acc[rr, v] + w[c, kh, kw] * xs[s, tap(oh0 + rr, kh, kw) + v0 + v]
        for rr in T.unroll(ROWS):
            for v in T.vectorized(width):
                if RES:
                    y[n, c, oh0 + rr, v0 + v] = ep.apply(acc[rr, v], bias[c], res[n, c, oh0 + rr, v0 + v])
                else:
                    y[n, c, oh0 + rr, v0 + v] = ep.apply(acc[rr, v], bias[c])

    @T.macro
    def compute_rows(xs, s, w, bias, res, y, n, c):
        for g in range(NGROUPS):  # the last group ends at OH, overlapping as segments do
            for seg in range(NSEG):
                row_segment(xs, s, w, bias, res, y, n, c, T.min(g * ROWS, OH - ROWS),
                            seg * SEG_WIDTH, SEG_WIDTH)
            if SEG_TAIL > 0:  # overlapping the previous segment, as bsr_matmul's tail
                row_segment(xs, s, w, bias, res, y, n, c, T.min(g * ROWS, OH - ROWS),
                            OW - SEG_WIDTH, SEG_WIDTH)

    @T.macro
    def compute_flat(xs, s, w, bias, res, y, n, c):
        flat = T.decl_buffer((NFLAT * FLAT_LANES,), "float32")
        for seg in range(NFLAT):
            acc = T.decl_buffer((FLAT_LANES,), "float32")
            for v in T.vectorized(FLAT_LANES):
                acc[v] = T.float32(0)
            for kh in T.unroll(KH):
                for kw in T.unroll(KW):
                    for v in T.vectorized(FLAT_LANES):
                        acc[v] = acc[v] + w[c, kh, kw] * xs[
                            s, seg * FLAT_LANES + v + kh * MW + kw + SHIFT]
            for v in T.vectorized(FLAT_LANES):
                flat[seg * FLAT_LANES + v] = acc[v]
        for oh in range(OH):
            for v in T.vectorized(OW):
                if RES:
                    y[n, c, oh, v] = ep.apply(flat[oh * MW + v], bias[c], res[n, c, oh, v])
                else:
                    y[n, c, oh, v] = ep.apply(flat[oh * MW + v], bias[c])

    return _PlaneKernel(zero_margins, fill, compute_flat if FLAT else compute_rows,
                        LENGTH, PT * S * MW, H * S * MW, tap)


# What a depthwise kernel does with each channel plane (its int32 `mode` array): compute it, leave
# it unwritten (its only reader, a BSR conv, has no non-zero block in that channel), or, for
# k >= 0, copy constant plane k (its input is a constant, so its output is an input-independent
# map, computed at conversion time with the zero padding included).
COMPUTE, UNREAD = -1, -2


def _constant_plane_macro(spec: ConvSpec):
    OH, OW = spec.out_h, spec.out_w

    @T.macro
    def constant_plane(mode, consts, y, n, c):
        for oh in range(OH):
            for v in T.vectorized(OW):
                y[n, c, oh, v] = consts[mode[c], oh, v]

    return constant_plane


def depthwise_prim_func(spec: ConvSpec, name: str = "depthwise", n_consts: int = 1) -> tvm.tirx.PrimFunc:
    """y[n, c] = epilogue(conv2d(x[n, c], w[c]) + bias[c]) for every plane (n, c) whose mode
    asks for it (see COMPUTE); `n_consts` constant planes (at least one: TIR dislikes 0-size)."""
    N, C, H, W = spec.batch, spec.c_in, spec.height, spec.width
    KH, KW = spec.kernel
    OH, OW = spec.out_h, spec.out_w
    K = max(1, n_consts)
    RES = spec.epilogue.residual
    pk = _depthwise_plane(spec)
    constant_plane = _constant_plane_macro(spec)

    @T.macro
    def planes(x, w, bias, mode, consts, res, y):
        with T.sblock("root"):
            for it in T.parallel(N * C):
                xs = T.decl_buffer((1, pk.length), "float32")
                if mode[it % C] == COMPUTE:
                    pk.fill(x, xs, 0, it // C, it % C)
                    pk.compute(xs, 0, w, bias, res, y, it // C, it % C)
                elif mode[it % C] >= 0:
                    constant_plane(mode, consts, y, it // C, it % C)

    @T.prim_func(s_tir=True)
    def depthwise(x: T.Buffer((N, C, H, W), "float32"), w: T.Buffer((C, KH, KW), "float32"),
                  bias: T.Buffer((C,), "float32"), mode: T.Buffer((C,), "int32"),
                  consts: T.Buffer((K, OH, OW), "float32"), y: T.Buffer((N, C, OH, OW), "float32")):
        planes(x, w, bias, mode, consts, y, y)

    @T.prim_func(s_tir=True)
    def depthwise_residual(
        x: T.Buffer((N, C, H, W), "float32"), w: T.Buffer((C, KH, KW), "float32"),
        bias: T.Buffer((C,), "float32"), mode: T.Buffer((C,), "int32"),
        consts: T.Buffer((K, OH, OW), "float32"), res: T.Buffer((N, C, OH, OW), "float32"),
        y: T.Buffer((N, C, OH, OW), "float32"),
    ):
        planes(x, w, bias, mode, consts, res, y)

    return _scheduled(depthwise_residual if RES else depthwise, name)


def can_fuse_expand_depthwise(expand: ConvSpec, depthwise: ConvSpec) -> bool:
    """A 1x1 BSR conv whose only reader is a depthwise conv: one kernel computes both."""
    return (not expand.needs_im2col and not expand.epilogue.residual
            and not depthwise.epilogue.residual and expand.out_shape ==
            (depthwise.batch, depthwise.c_in, depthwise.height, depthwise.width))


def expand_depthwise_prim_func(expand: ConvSpec, depthwise: ConvSpec, nnzb: int, tile: BSRTile,
                               name: str = "expand_depthwise", n_consts: int = 1,
                               row_blocks: int | None = None, threads: int = 1) -> tvm.tirx.PrimFunc:
    """depthwise(epilogue(W_bsr @ x)) without the expanded tensor ever reaching memory: per
    block row (bsr expanded channels), the sparse conv writes its planes straight into their
    depthwise scratch grids (_PlaneKernel's layout), and the depthwise conv of each is taken
    from there (MobileNetV2's expanded tensors are its largest; writing and re-reading them
    cost more than the sparse conv itself, and copying each plane into its zero-margined
    scratch a quarter of the depthwise time).  The input is first laid out in the same grid,
    so that the 1x1 conv, pointwise, computes the grid in place: over the source rows, margin
    columns included (then re-zeroed).  Planes go by `mode` as in depthwise_prim_func; a block
    row whose `live_rows` entry is 0 (no plane of it computed) skips its sparse conv too.
    The block rows run in `threads` parts, part p the block rows [bounds[p], bounds[p+1])
    (balanced_bounds), each part with its scratch grids allocated once: a buffer of 1 KB or more
    inside a parallel loop is a TVM workspace call per iteration (measured ~25 ns, 3552 of them
    per MobileNetV2 inference at 90 %).  The ranges are contiguous so that the parts write
    disjoint stretches of y: a 7x7 plane is 196 bytes, and block rows interleaved between the
    parts made both cores write the cache lines where their planes meet (an interleaved order
    balanced by cost measured 52 us at 2 threads against 38 us contiguous, 7x7 x 960)."""
    N, CIN, H, W = expand.batch, expand.c_in, expand.height, expand.width
    CMID, BSR, BSC = expand.c_out, expand.bsr, expand.bsc
    NBR, NNZ = CMID // BSR, max(1, nnzb)
    KH, KW = depthwise.kernel
    OH, OW = depthwise.out_h, depthwise.out_w
    K = max(1, n_consts)
    pk = _depthwise_plane(depthwise)
    L, FIRST, SPAN = pk.length, pk.first, pk.span
    NT, NTILES, TAIL = _pixel_tiles(SPAN, tile.pixels)
    NTA = NTILES + (1 if TAIL else 0)  # the last tile ends at the span's end
    pixel_tile = _bsr_tile_macro(expand, row_blocks)
    constant_plane = _constant_plane_macro(depthwise)
    PARTS = fused_parts(N * NBR, threads)

    @T.macro
    def block_row(grid, indptr, indices, data, bias, w, dw_bias, mode, consts, live_rows, y, n, br,
                  mid, xs):
        """Block row br of image n: its sparse conv into its planes' scratch grids (mid, xs:
        one buffer, two views), then their depthwise convs."""
        if live_rows[br] != 0:
            for t in range(NTA):
                p0 = T.meta_var(FIRST + T.min(t * NT, SPAN - NT))
                pixel_tile(grid, indptr, indices, data, bias, mid, mid, n, br, p0, NT, 0, 0, p0)
        for r in range(BSR):
            if mode[br * BSR + r] == COMPUTE:
                pk.zero_margins(xs, r)
                pk.compute(xs, r, w, dw_bias, y, y, n, br * BSR + r)
            elif mode[br * BSR + r] >= 0:
                constant_plane(mode, consts, y, n, br * BSR + r)

    @T.prim_func(s_tir=True)
    def expand_depthwise(
        x: T.Buffer((N, CIN, H, W), "float32"),
        indptr: T.Buffer((NBR + 1,), "int32"),
        indices: T.Buffer((NNZ,), "int32"),
        data: T.Buffer((NNZ, BSR, BSC), "float32"),
        bias: T.Buffer((CMID,), "float32"),
        w: T.Buffer((CMID, KH, KW), "float32"),
        dw_bias: T.Buffer((CMID,), "float32"),
        mode: T.Buffer((CMID,), "int32"),
        consts: T.Buffer((K, OH, OW), "float32"),
        live_rows: T.Buffer((NBR,), "int32"),
        bounds: T.Buffer((PARTS + 1,), "int32"),
        y: T.Buffer((N, CMID, OH, OW), "float32"),
    ):
        with T.sblock("root"):
            grid = T.decl_buffer((N * CIN, L), "float32")
            for it in T.parallel(N * CIN):
                pk.fill(x, grid, it, it // CIN, it % CIN)
            grid_in = T.decl_buffer((N, CIN, L), "float32", data=grid.data)
            for part in T.parallel(PARTS):
                xs = T.decl_buffer((BSR, L), "float32")
                mid = T.decl_buffer((1, BSR, L), "float32", data=xs.data)
                for i in range(N * NBR):  # a fixed range: see _parts on computed loop bounds
                    it = T.meta_var(bounds[part] + i)
                    if it < bounds[part + 1]:
                        block_row(grid_in, indptr, indices, data, bias, w, dw_bias, mode, consts,
                                  live_rows, y, it // NBR, it % NBR, mid, xs)

    return _scheduled(expand_depthwise, name)


def fused_parts(items: int, threads: int) -> int:
    """How many parts expand_depthwise_prim_func runs its `items` (image, block row) pairs in:
    its `bounds` argument has this many ranges."""
    return max(1, min(threads, items))


def balanced_bounds(costs, parts: int) -> np.ndarray:
    """bounds[0] = 0 <= ... <= bounds[parts] = len(costs): `parts` contiguous ranges of the
    items whose largest total cost is the least possible (binary search on that total, each
    range filled greedily up to it); ranges beyond the items are empty."""
    costs = np.asarray(costs, np.int64)
    parts = max(1, parts)

    def ranges(limit: int) -> list[int]:
        bounds, load = [0], 0
        for i, c in enumerate(costs):
            if load + c > limit:
                bounds.append(i)
                load = 0
            load += c
        return bounds

    lo, hi = int(costs.max(initial=0)), int(costs.sum())
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if len(ranges(mid)) <= parts else (mid + 1, hi)
    bounds = ranges(lo)
    return np.asarray(bounds + [len(costs)] * (parts + 1 - len(bounds)), np.int32)


DIRECT_MAX_CIN = 4  # an RGB(A) stem; beyond, im2col + a matmul reuses each input load better


def direct_supported(spec: ConvSpec) -> str:
    """'' if direct_prim_func handles `spec` (groups = 1, few input channels), else why not."""
    if spec.c_in > DIRECT_MAX_CIN:
        return f"{spec.c_in} input channels (the direct kernel takes up to {DIRECT_MAX_CIN})"
    if spec.kernel == (1, 1):
        return "a 1x1 conv (a matmul: the BSR kernel's)"
    return depthwise_supported(spec)


def direct_prim_func(spec: ConvSpec, name: str = "direct") -> tvm.tirx.PrimFunc:
    """y = epilogue(conv2d(x, w) + bias), groups = 1, dense, for a conv of few input channels
    (a CNN's stem: 3 -> 32, 3x3 stride 2 at 224x224).  Each input plane is laid out once in the
    depthwise kernel's zero-margined grid (stride phases de-interleaved, so every tap of a
    vector of outputs is one contiguous load); then a register tile of CO output channels x ROWS
    output rows x 16 columns accumulates over (input channel, kh, kw), each input load shared
    by CO channels' FMAs.  There im2col (C_in*kh*kw rows of every output pixel, gathered
    scalar) took longer than the matmul it fed."""
    N, CIN, H, W, COUT = spec.batch, spec.c_in, spec.height, spec.width, spec.c_out
    KH, KW = spec.kernel
    OH, OW = spec.out_h, spec.out_w
    ep = spec.epilogue
    RES = ep.residual
    pk = _depthwise_plane(spec)
    CO = next(c for c in (8, 4, 2, 1) if COUT % c == 0)  # 8 x 2 x 16: 16 accumulators
    NCO = COUT // CO
    ROWS = min(OH, 2)
    NGROUPS = (OH + ROWS - 1) // ROWS
    SEG = min(16, OW)
    NSEG, SEG_TAIL = OW // SEG, OW % SEG

    # two accumulator tiles of CO/2 channels: one of 8 x 2 x 16 floats is 1 KB, which TVM turns
    # into a workspace call per segment and LLVM then keeps in memory
    COG = min(CO, 4)
    TWO = CO > COG

    @T.macro
    def fma(acc, grid, w, n, ci, c0, oh0, v0, kh, kw, rr):
        for co in T.unroll(COG):
            for v in T.vectorized(SEG):
                acc[co, rr, v] = acc[co, rr, v] + w[c0 + co, ci, kh, kw] * grid[
                    n, ci, pk.tap(oh0 + rr, kh, kw) + v0 + v]

    @T.macro
    def store(acc, bias, res, y, n, c0, oh0, v0):
        for co in T.unroll(COG):
            for rr in T.unroll(ROWS):
                for v in T.vectorized(SEG):
                    if RES:
                        y[n, c0 + co, oh0 + rr, v0 + v] = ep.apply(
                            acc[co, rr, v], bias[c0 + co], res[n, c0 + co, oh0 + rr, v0 + v])
                    else:
                        y[n, c0 + co, oh0 + rr, v0 + v] = ep.apply(acc[co, rr, v], bias[c0 + co])

    @T.macro
    def segment(grid, w, bias, res, y, n, co0, oh0, v0):
        lo = T.decl_buffer((COG, ROWS, SEG), "float32")
        hi = T.decl_buffer((COG, ROWS, SEG), "float32")  # unused unless TWO
        for co in T.unroll(COG):
            for rr in T.unroll(ROWS):
                for v in T.vectorized(SEG):
                    lo[co, rr, v] = T.float32(0)
                    if TWO:
                        hi[co, rr, v] = T.float32(0)
        for ci in range(CIN):
            for kh in T.unroll(KH):
                for kw in T.unroll(KW):
                    for rr in T.unroll(ROWS):  # each input load shared by both tiles' FMAs
                        fma(lo, grid, w, n, ci, co0, oh0, v0, kh, kw, rr)
                        if TWO:
                            fma(hi, grid, w, n, ci, co0 + COG, oh0, v0, kh, kw, rr)
        store(lo, bias, res, y, n, co0, oh0, v0)
        if TWO:
            store(hi, bias, res, y, n, co0 + COG, oh0, v0)

    @T.macro
    def body(x, w, bias, res, y):
        with T.sblock("root"):
            flat = T.decl_buffer((N * CIN, pk.length), "float32")
            for it in T.parallel(N * CIN):
                pk.fill(x, flat, it, it // CIN, it % CIN)
            grid = T.decl_buffer((N, CIN, pk.length), "float32", data=flat.data)
            # row groups outside channel groups: the CO-channel tiles of one row group share its
            # input rows while they are in L1
            for it in T.parallel(N * NGROUPS * NCO):
                for seg in range(NSEG):
                    segment(grid, w, bias, res, y, it // (NGROUPS * NCO), it % NCO * CO,
                            T.min(it // NCO % NGROUPS * ROWS, OH - ROWS), seg * SEG)
                if SEG_TAIL > 0:  # overlapping the previous segment, as elsewhere
                    segment(grid, w, bias, res, y, it // (NGROUPS * NCO), it % NCO * CO,
                            T.min(it // NCO % NGROUPS * ROWS, OH - ROWS), OW - SEG)

    @T.prim_func(s_tir=True)
    def direct(x: T.Buffer((N, CIN, H, W), "float32"), w: T.Buffer((COUT, CIN, KH, KW), "float32"),
               bias: T.Buffer((COUT,), "float32"), y: T.Buffer((N, COUT, OH, OW), "float32")):
        body(x, w, bias, y, y)

    @T.prim_func(s_tir=True)
    def direct_residual(
        x: T.Buffer((N, CIN, H, W), "float32"), w: T.Buffer((COUT, CIN, KH, KW), "float32"),
        bias: T.Buffer((COUT,), "float32"), res: T.Buffer((N, COUT, OH, OW), "float32"),
        y: T.Buffer((N, COUT, OH, OW), "float32"),
    ):
        body(x, w, bias, res, y)

    return _scheduled(direct_residual if RES else direct, name)


GEMV_BLOCK = 64  # outputs per register tile: 4 AVX-512 / 8 AVX2 independent accumulators
GEMV_ROWS = 4  # input rows sharing each weight load
# more rows make it a GEMM, re-reading the weight every GEMV_ROWS rows: TVM's tiled matmul it is
GEMV_MAX_ROWS = 16


def gemv_block_starts(n: int) -> list[int]:
    """First output column of each weight block: GEMV_BLOCK apart, the last one ending at n
    (overlapping its neighbour, as _pixel_tiles' tail)."""
    width, full, tail = _pixel_tiles(n, GEMV_BLOCK)
    return [min(b * width, n - width) for b in range(full + (1 if tail else 0))]


def gemv_blocks(w: np.ndarray) -> np.ndarray:
    """The (K, N) weight of x @ W as (blocks, K, width) contiguous blocks (gemv_prim_func's
    layout): each block's weights are one sequential stream."""
    width = min(GEMV_BLOCK, w.shape[1])
    return np.ascontiguousarray(np.stack([w[:, s:s + width] for s in gemv_block_starts(w.shape[1])]),
                                np.float32)


def gemv_prim_func(m: int, k: int, n: int, name: str = "gemv") -> tvm.tirx.PrimFunc:
    """y[i, j] = sum_k x[i, k] * W[k, j] + bias[j] for the few rows of a classifier
    (x @ W + b with a constant W): the weight is the whole cost, read once per group of
    GEMV_ROWS rows from its blocked copy (gemv_blocks), a block's outputs in registers
    (TVM's tuned matmul of MobileNetV2's 1280 x 1000 classifier ran at a third of the rate)."""
    NBW = min(GEMV_BLOCK, n)
    NB = len(gemv_block_starts(n))
    MR = min(m, GEMV_ROWS)
    NG = -(-m // MR)  # row groups, the last one ending at m
    L = _lanes(NBW)

    @T.prim_func(s_tir=True)
    def gemv(x: T.Buffer((m, k), "float32"), wb: T.Buffer((NB, k, NBW), "float32"),
             bias: T.Buffer((n,), "float32"), y: T.Buffer((m, n), "float32")):
        with T.sblock("root"):
            for it in T.parallel(NG * NB):
                acc = T.decl_buffer((MR, NBW), "float32")
                for r in T.unroll(MR):
                    for v in T.vectorized(NBW):
                        acc[r, v] = T.float32(0)
                for kk in range(k):
                    for r in T.unroll(MR):
                        for u in T.unroll(NBW // L):
                            for v in T.vectorized(L):
                                acc[r, u * L + v] = acc[r, u * L + v] + x[
                                    T.min(it // NB * MR, m - MR) + r, kk] * wb[it % NB, kk, u * L + v]
                for r in T.unroll(MR):
                    for v in T.vectorized(NBW):
                        y[T.min(it // NB * MR, m - MR) + r, T.min(it % NB * NBW, n - NBW) + v] = (
                            acc[r, v] + bias[T.min(it % NB * NBW, n - NBW) + v])

    return _scheduled(gemv, name)


def reference_conv2d(x: np.ndarray, w: np.ndarray, spec: ConvSpec, bias=None,
                     residual=None, groups: int = 1) -> np.ndarray:
    """Plain numpy conv (float64 accumulation) + epilogue, used to check the kernels.
    groups = C_in = C_out with w (C, 1, kh, kw) is a depthwise conv."""
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
            if groups == 1:
                out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j].astype(np.float64))
            else:
                out += patch * w[:, 0, i, j].astype(np.float64).reshape(1, -1, 1, 1)
    if bias is not None:
        out += np.asarray(bias, np.float64).reshape(1, -1, 1, 1)
    if residual is not None:
        out += residual
    out = np.clip(out, spec.epilogue.low, spec.epilogue.high)
    return out.astype(np.float32)
