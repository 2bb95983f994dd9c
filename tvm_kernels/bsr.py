"""Dense <-> block-sparse-row (BSR) conversion of conv weights. Pure numpy.

A conv weight (C_out, C_in, kh, kw) is seen as the matrix (C_out, C_in*kh*kw); its
(bsr x bsc) blocks are the BSR blocks: bsr consecutive output channels x bsc consecutive
columns (input positions).  Block rows are stored CSR-style: row `r` owns blocks
indptr[r]:indptr[r+1], block `b` sits in block column indices[b] and holds data[b].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BSRMatrix:
    shape: tuple[int, int]  # dense (rows, cols)
    block: tuple[int, int]  # (bsr, bsc)
    indptr: np.ndarray  # int32 (rows // bsr + 1,)
    indices: np.ndarray  # int32 (nnzb,)
    data: np.ndarray  # float32 (nnzb, bsr, bsc)

    @property
    def nnzb(self) -> int:
        return int(self.indices.shape[0])

    @property
    def num_blocks(self) -> int:
        return (self.shape[0] // self.block[0]) * (self.shape[1] // self.block[1])

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnzb / self.num_blocks


def conv_weight_as_matrix(w: np.ndarray) -> np.ndarray:
    """(C_out, C_in, kh, kw) -> (C_out, C_in*kh*kw), columns ordered (c, kh, kw) like im2col."""
    return w.reshape(w.shape[0], -1)


def can_block(shape: tuple[int, int], bsr: int, bsc: int) -> bool:
    return bsr >= 1 and bsc >= 1 and shape[0] % bsr == 0 and shape[1] % bsc == 0


def _blocks(mat: np.ndarray, bsr: int, bsc: int) -> np.ndarray:
    """(rows, cols) -> (rows//bsr, cols//bsc, bsr, bsc)."""
    rows, cols = mat.shape
    if not can_block(mat.shape, bsr, bsc):
        raise ValueError(f"matrix {mat.shape} cannot be tiled by {bsr}x{bsc} blocks")
    return mat.reshape(rows // bsr, bsr, cols // bsc, bsc).transpose(0, 2, 1, 3)


def block_sparsity(mat: np.ndarray, bsr: int, bsc: int) -> float:
    """Fraction of (bsr x bsc) blocks of `mat` that are entirely zero."""
    nonzero = np.any(_blocks(mat, bsr, bsc) != 0, axis=(2, 3))
    return 1.0 - float(nonzero.mean())


def dense_to_bsr(mat: np.ndarray, bsr: int, bsc: int) -> BSRMatrix:
    blocks = _blocks(np.asarray(mat, dtype=np.float32), bsr, bsc)
    nonzero = np.any(blocks != 0, axis=(2, 3))
    block_rows, block_cols = np.nonzero(nonzero)  # row-major order: CSR order
    indptr = np.zeros(blocks.shape[0] + 1, dtype=np.int32)
    np.cumsum(nonzero.sum(axis=1), out=indptr[1:])
    return BSRMatrix(
        shape=tuple(mat.shape),
        block=(bsr, bsc),
        indptr=indptr,
        indices=block_cols.astype(np.int32),
        data=np.ascontiguousarray(blocks[block_rows, block_cols], dtype=np.float32),
    )


def bsr_to_dense(m: BSRMatrix) -> np.ndarray:
    bsr, bsc = m.block
    out = np.zeros((m.shape[0] // bsr, m.shape[1] // bsc, bsr, bsc), dtype=np.float32)
    rows = np.repeat(np.arange(len(m.indptr) - 1), np.diff(m.indptr))
    out[rows, m.indices] = m.data
    return out.transpose(0, 2, 1, 3).reshape(m.shape)
