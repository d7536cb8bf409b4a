"""Shared arithmetic of the torch methods: the §3 random draw in torch integer arithmetic,
and whole-tensor f64 sums that do not depend on how the tensor is cut into chunks."""

from __future__ import annotations

import math

import torch

_M32 = 0xFFFFFFFF


def _mix_int(x: int) -> int:
    x &= _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    x ^= x >> 16
    return x


def mix(x: torch.Tensor) -> torch.Tensor:
    """The 32-bit finalizer of METHODS.md §3 over int64 tensors holding u32 values.
    Products wrap in int64; their low 32 bits are the u32 wrapping product."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def fnv1a(name: str) -> int:
    h = 0x811C9DC5
    for b in name.encode():
        h = ((h ^ b) * 0x01000193) & _M32
    return h


def stream(seed: int, tensor: str, model_pos: int) -> int:
    """The draw stream of one (seed, output tensor, model position)."""
    return _mix_int(_mix_int(_mix_int((seed ^ 0x9E3779B9) & _M32) ^ fnv1a(tensor)) ^ ((model_pos + 1) & _M32))


def index_hashes(j: torch.Tensor) -> torch.Tensor:
    """The stream-independent half of a draw: ``mix(lo32(j)) ^ mix(hi32(j) ^ 0x85ebca6b)``."""
    return mix(j & _M32) ^ mix((j >> 32) ^ 0x85EBCA6B)


def draws(stream_: int, hashes: torch.Tensor) -> torch.Tensor:
    """``r_j`` for every element, given :func:`index_hashes` of their indices (int64 values
    in 0 ... 2^32-1)."""
    return mix(hashes ^ stream_)


def threshold(p: float) -> int:
    """``floor(p · 2^32)`` in f64, clamped: element kept iff ``r_j < threshold``."""
    if math.isnan(p) or p <= 0.0:
        return 0
    return int(min(math.floor(p * 4294967296.0), 4294967296.0))


def f64_sum(values: torch.Tensor) -> float:
    """Σ of a chunk's values in f64 (for whole-tensor statistics: norms, dots, L1 sums)."""
    return float(values.to(torch.float64).sum().item())


class Sums:
    """Whole-tensor sums accumulated chunk by chunk. Each chunk's f64 partial sum is
    collected, and the partials are added exactly at the end (``math.fsum``), so the order
    the chunks finish in does not matter."""

    def __init__(self, n: int) -> None:
        self.parts: list[list[float]] = [[] for _ in range(n)]

    def add(self, i: int, value: torch.Tensor | float) -> None:
        self.parts[i].append(float(value.item()) if isinstance(value, torch.Tensor) else float(value))

    def value(self, i: int) -> float:
        return math.fsum(self.parts[i])
