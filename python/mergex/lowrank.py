"""Rank-r factors of a matrix ``D`` read in row blocks: an exact SVD when ``D`` fits the
memory it is given, else a randomized range finder with power iterations (Halko, Martinsson
and Tropp, 2011) over streamed passes. The arithmetic runs in f64, with numpy on the CPU
(single-threaded BLAS, so the result depends on nothing but the inputs, the seed and the row
blocks) or torch on a CUDA device (``torch.linalg``)."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Factors", "LinAlg", "Sketch", "exact_bytes", "factorize", "sketch_bytes"]

F64 = 8
# Bytes a row-block element costs while it is read: the two models' stored values (at most
# f64 each), their difference in f64, and a product's temporary.
ROW_ELEMENT = 4 * F64

# Reads rows [r0, r1) of D as an f64 array of shape (r1 - r0, cols).
RowReader = Callable[[int, int], np.ndarray]


@dataclass
class Factors:
    """``D ≈ B·A`` with ``B = U·S`` (rows by rank) and ``A = Vᵀ`` (rank by cols), in f32."""

    a: np.ndarray
    b: np.ndarray
    zero: bool = False
    """D is exactly zero (nothing to extract; ``a`` and ``b`` are empty)."""


ZERO = Factors(np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32), zero=True)


@dataclass(frozen=True)
class Sketch:
    """How a randomized factorization runs: sketch width (rank + oversampling), power
    iterations, and rows a block."""

    width: int
    power: int
    rows: int


def exact_bytes(rows: int, cols: int) -> int:
    """Memory of an exact SVD of a rows-by-cols f64 matrix: the matrix, a copy LAPACK
    factorizes, U, Vᵀ and its workspace."""
    m = min(rows, cols)
    return F64 * (2 * rows * cols + m * (rows + cols) + 5 * m * m)


def sketch_bytes(rows: int, cols: int, sketch: Sketch) -> int:
    """Memory of a randomized factorization: the test matrix, the range basis and its
    transpose pass (each with a QR copy), the small SVD, and one row block."""
    k = sketch.width
    return F64 * k * (3 * cols + 3 * rows + 5 * k) + ROW_ELEMENT * sketch.rows * cols


class LinAlg:
    """The f64 operations the factorization needs: numpy on the CPU, torch on a device."""

    def __init__(self, device: str = "cpu", use_torch: bool | None = None) -> None:
        self.device = device
        self.torch: Any = None
        if use_torch or (use_torch is None and device != "cpu"):
            import torch

            self.torch = torch

    def array(self, x: np.ndarray) -> Any:
        if self.torch is None:
            return x
        return self.torch.from_numpy(np.ascontiguousarray(x)).to(self.device)

    def numpy(self, x: Any) -> np.ndarray:
        if self.torch is None:
            return np.asarray(x)
        return np.asarray(x.cpu().numpy())

    def zeros(self, shape: tuple[int, int]) -> Any:
        if self.torch is None:
            return np.zeros(shape)
        return self.torch.zeros(shape, dtype=self.torch.float64, device=self.device)

    def qr(self, x: Any) -> Any:
        if self.torch is None:
            return np.linalg.qr(x, mode="reduced")[0]
        return self.torch.linalg.qr(x, mode="reduced")[0]

    def svd(self, x: Any) -> tuple[Any, Any, Any]:
        if self.torch is None:
            u, s, vt = np.linalg.svd(x, full_matrices=False)
            return u, s, vt
        u, s, vt = self.torch.linalg.svd(x, full_matrices=False)
        return u, s, vt


def gaussian(seed: int, name: str, cols: int, width: int) -> np.ndarray:
    """The Gaussian test matrix of tensor ``name``: the same for the same seed and name."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    return rng.standard_normal((cols, width))


def _blocks(rows: int, step: int) -> list[tuple[int, int]]:
    return [(r, min(rows, r + step)) for r in range(0, rows, max(1, step))]


def factorize(
    read: RowReader,
    shape: tuple[int, int],
    rank: int,
    la: LinAlg,
    sketch: Sketch | None,
    seed: int,
    name: str,
    block: int,
) -> Factors:
    """The rank-``rank`` factors of ``D`` (``shape``, read ``block`` rows at a time by
    ``read``, whose result is valid until its next call): exact when ``sketch`` is None,
    else randomized with it."""
    rows, cols = shape
    if sketch is None:
        d = np.empty(shape)
        for r0, r1 in _blocks(rows, block):
            d[r0:r1] = read(r0, r1)
        if not d.any():
            return ZERO
        u, s, vt = la.svd(la.array(d))
        del d
        return _factors(la, u, s, vt, rank)
    blocks = _blocks(rows, block)
    omega = la.array(gaussian(seed, name, cols, sketch.width))
    nonzero = False

    def times(x: Any) -> Any:
        """D·x, block by block (the rows of the result are each block's own product)."""
        nonlocal nonzero
        out = []
        for r0, r1 in blocks:
            d = read(r0, r1)
            nonzero = nonzero or bool(d.any())
            out.append(la.array(d) @ x)
        return out[0] if len(out) == 1 else _cat(la, out)

    def transposed_times(q: Any) -> Any:
        """Dᵀ·q, summed block by block in order."""
        acc = la.zeros((cols, q.shape[1]))
        for r0, r1 in blocks:
            acc += la.array(read(r0, r1)).T @ q[r0:r1]
        return acc

    q = la.qr(times(omega))
    if not nonzero:
        return ZERO
    for _ in range(sketch.power):
        z = la.qr(transposed_times(q))
        q = la.qr(times(z))
    small = transposed_times(q).T  # Qᵀ·D, k by cols
    u, s, vt = la.svd(small)
    return _factors(la, q @ u, s, vt, rank)


def _cat(la: LinAlg, parts: list[Any]) -> Any:
    if la.torch is None:
        return np.concatenate(parts)
    return la.torch.cat(parts)


def _factors(la: LinAlg, u: Any, s: Any, vt: Any, rank: int) -> Factors:
    u, s, vt = la.numpy(u), la.numpy(s), la.numpy(vt)
    r = min(rank, s.shape[0])
    b = (u[:, :r] * s[:r]).astype(np.float32)
    a = vt[:r].astype(np.float32)
    return Factors(a, b)
