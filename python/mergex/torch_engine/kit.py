"""Shared arithmetic of the torch kernels: the §3 random draw in torch integer arithmetic
(the draw streams and keep thresholds come from the Rust engine, in the kernels' masks),
and whole-tensor f64 sums taken the Rust engine's way (``engine/reduce.rs``), which do not
depend on how the tensor is cut into chunks:

- within each block of :data:`BLOCK` elements (counted from the chunk start, a block
  boundary), element ``t`` is added to lane ``t % 8`` in index order and the lanes are folded
  in a fixed tree (:func:`block_sums`; :func:`lane_fold` over any rows, e.g. whole rows for
  row-local dot products);
- the block sums, or any other values, are added exactly (:class:`ExactSums`), so the order
  the chunks come in never matters.
"""

from __future__ import annotations

import math

import numpy as np
import torch

_M32 = 0xFFFFFFFF

# --------------------------------------------------------------------------- §3 random draws


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x · c mod 2^32`` for int64 tensors holding u32 values, without overflowing int64
    (signed overflow is undefined behaviour in C++ kernels): ``c`` is replaced by the number
    congruent to it mod 2^32 in [-2^31, 2^31), so ``|x · c| ≤ (2^32 - 1) · 2^31 < 2^63``, and
    the product's low 32 bits (two's complement) are the u32 wrapping product."""
    signed = c - (1 << 32) if c >= 1 << 31 else c
    return (x * signed) & _M32


def mix(x: torch.Tensor) -> torch.Tensor:
    """The 32-bit finalizer of METHODS.md §3 over int64 tensors holding u32 values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def index_hashes(j: torch.Tensor) -> torch.Tensor:
    """The stream-independent half of a draw: ``mix(lo32(j)) ^ mix(hi32(j) ^ 0x85ebca6b)``."""
    return mix(j & _M32) ^ mix((j >> 32) ^ 0x85EBCA6B)


def draws(stream_: int, hashes: torch.Tensor) -> torch.Tensor:
    """``r_j`` for every element, given :func:`index_hashes` of their indices (int64 values
    in 0 ... 2^32-1)."""
    return mix(hashes ^ stream_)


# --------------------------------------------------------------------------- block sums

BLOCK = 256
"""Elements per reduction block (engine/reduce.rs); every chunk starts on a block boundary."""
LANES = 8


def lane_fold(rows: torch.Tensor) -> torch.Tensor:
    """Row sums of ``rows`` ([G, L], f64) as the Rust engine adds a block or a row: element
    ``t`` into lane ``t % 8`` in index order, then the fixed tree of engine/reduce.rs
    ``fold``. Zero padding is harmless: a lane starts at +0.0, so it is never -0.0, and
    adding +0.0 changes nothing."""
    groups, length = rows.shape
    steps = -(-length // LANES)
    if steps * LANES != length:
        rows = torch.nn.functional.pad(rows, (0, steps * LANES - length))
    view = rows.reshape(groups, steps, LANES)
    lanes = torch.zeros(groups, LANES, dtype=torch.float64, device=rows.device)
    for s in range(steps):
        lanes += view[:, s]
    x = lanes.unbind(1)
    return ((x[0] + x[1]) + (x[2] + x[3])) + ((x[4] + x[5]) + (x[6] + x[7]))


def block_sums(values: torch.Tensor) -> torch.Tensor:
    """The sums of every :data:`BLOCK` of f64 ``values`` along the last axis (whose first
    element starts a block), as Rust's ``block_sum``: ``[..., n]`` gives ``[..., ⌈n/256⌉]``.
    The values are whatever is summed: signed values, absolute values, products."""
    *lead, n = values.shape
    blocks = -(-n // BLOCK)
    if blocks * BLOCK != n:
        values = torch.nn.functional.pad(values, (0, blocks * BLOCK - n))
    return lane_fold(values.reshape(-1, BLOCK)).view(*lead, blocks)


# --------------------------------------------------------------------------- exact sums

_LIMBS = 70
# Values added to one limb between carry passes: each adds less than 2^33 in magnitude.
_PENDING_MAX = 1 << 28
# Values handled at once by ExactSums.add (bounds its int64 temporaries).
_ADD_SLICE = 1 << 18


class ExactSums:
    """Exact sums of f64 values in ``groups`` slots, on the device: the superaccumulator of
    engine/reduce.rs (``ExactSum``) — 32-bit digits at fixed binary positions held in int64,
    carries propagated now and then — read out correctly rounded, as Rust's ``value()``.
    Exact addition is associative, so chunking and order never change the result."""

    def __init__(self, groups: int, device: torch.device) -> None:
        self.limbs = torch.zeros(groups, _LIMBS, dtype=torch.int64, device=device)
        self.flags = torch.zeros(groups, 4, dtype=torch.int64, device=device)
        """Per group, counts of: finite values, NaNs, +inf, -inf."""
        self.pending = 0

    def add(self, values: torch.Tensor, groups: torch.Tensor | int) -> None:
        """Add every value to its group: ``groups`` is one slot for all, or a tensor that
        broadcasts to ``values``' shape."""
        flat = values.to(torch.float64).reshape(-1)
        index: torch.Tensor | int = groups
        if isinstance(groups, torch.Tensor):
            index = groups.to(device=flat.device, dtype=torch.int64).expand(values.shape).reshape(-1)
        for at in range(0, flat.numel(), _ADD_SLICE):
            part = index[at : at + _ADD_SLICE] if isinstance(index, torch.Tensor) else index
            self._add(flat[at : at + _ADD_SLICE], part)

    def _add(self, values: torch.Tensor, groups: torch.Tensor | int) -> None:
        if self.pending + values.numel() > _PENDING_MAX:
            self._normalize()
        bits = values.contiguous().view(torch.int64)
        exp = (bits >> 52) & 0x7FF
        frac = bits & ((1 << 52) - 1)
        special = exp == 0x7FF
        kind = torch.where(special, torch.where(frac != 0, 1, torch.where(bits < 0, 3, 2)), 0)
        self.flags.view(-1).index_add_(0, groups * 4 + kind, torch.ones_like(kind))
        subnormal = exp == 0
        mant = torch.where(subnormal, frac, frac | (1 << 52)).masked_fill_(special, 0)
        pos = torch.where(subnormal, 0, exp - 1)  # bit position of the mantissa's lowest bit
        shift = pos & 31
        low = (mant & _M32) << shift  # < 2^63
        high = (mant >> 32) << shift  # < 2^53
        sign = torch.where(bits < 0, -1, 1)
        digits = (
            (low & _M32) * sign,
            ((low >> 32) + (high & _M32)) * sign,
            (high >> 32) * sign,
        )
        at = (pos >> 5) + groups * _LIMBS
        dest = self.limbs.view(-1)
        for k, d in enumerate(digits):
            dest.index_add_(0, at + k, d)
        self.pending += values.numel()

    def _normalize(self) -> None:
        """Carry so that every limb but the last lies in [0, 2^32) (the last holds the sign)."""
        limbs = self.limbs
        for i in range(_LIMBS - 1):
            carry = limbs[:, i] >> 32
            limbs[:, i] &= _M32
            limbs[:, i + 1] += carry
        self.pending = 0

    def values(self) -> list[float]:
        """Every group's sum, correctly rounded to f64 (NaN and infinities as Rust's)."""
        self._normalize()
        limbs = self.limbs.cpu().numpy()
        low = np.ascontiguousarray(limbs[:, :-1].astype("<u4"))
        out = []
        for g, (_, nan, pos_inf, neg_inf) in enumerate(self.flags.tolist()):
            if nan or (pos_inf and neg_inf):
                out.append(math.nan)
            elif pos_inf or neg_inf:
                out.append(math.inf if pos_inf else -math.inf)
            else:
                top = int(limbs[g, -1]) << (32 * (_LIMBS - 1))
                out.append(_scaled(int.from_bytes(low[g].tobytes(), "little") + top))
        return out


def _scaled(total: int) -> float:
    """``total · 2^-1074`` correctly rounded (Python's int division rounds correctly)."""
    try:
        return total / (1 << 1074)
    except OverflowError:
        return math.copysign(math.inf, total)
