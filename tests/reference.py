"""Plain numpy reference for the merge math in ``spec/METHODS.md``.

Independent of the mergex package on purpose: the tests compare the engine against this.
Conventions (METHODS.md §0): every input converted exactly to float32, parameters
rounded to float32 before use, per-element sums over models in config order written as
``acc = acc + w * x`` (two roundings, no FMA), and the result rounded once, to nearest
even, to the output dtype.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

F32 = np.float32

# safetensors dtype string <-> numpy storage dtype and element size.
# bfloat16 is stored as its raw uint16 bit pattern because numpy has no bfloat16.
STORAGE = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2}
# Output dtype names accepted in a config -> safetensors dtype string.
DTYPE_NAMES = {
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "torch.float32": "F32",
    "torch.float16": "F16",
    "torch.bfloat16": "BF16",
}
TORCH_DTYPE = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


# --------------------------------------------------------------------------- dtypes


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 values to bfloat16 bit patterns (uint16), round-to-nearest-even.

    Done on the uint32 bit pattern: add 0x7FFF plus the lowest kept bit, then drop the low
    16 bits. Overflow past the largest finite bf16 carries into the exponent and lands on
    infinity, as IEEE rounding requires. NaN keeps its sign and top payload bits and is
    forced quiet, so it can never round into infinity.
    """
    u = np.ascontiguousarray(x, dtype=F32).view(np.uint32)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    # Non-NaN patterns are <= 0xFF800000, so adding at most 0x8000 cannot wrap.
    safe = np.where(nan, np.uint32(0), u)
    lsb = (safe >> np.uint32(16)) & np.uint32(1)
    rounded = (safe + np.uint32(0x7FFF) + lsb) >> np.uint32(16)
    quiet_nan = (u >> np.uint32(16)) | np.uint32(0x0040)
    return np.where(nan, quiet_nan, rounded).astype(np.uint16)


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32, exactly."""
    b = np.ascontiguousarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)
    return b.view(F32)


def f32_to_f16(x: np.ndarray) -> np.ndarray:
    """float32 -> float16; numpy's conversion rounds to nearest even (incl. subnormals)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(x, dtype=F32).astype(np.float16)


def to_f32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Stored array (as returned by :func:`decode`) -> exact float32 values."""
    if dtype == "BF16":
        return bf16_bits_to_f32(raw)
    if dtype in ("F16", "F32"):
        return np.asarray(raw).astype(F32)
    raise ValueError(f"not a float dtype: {dtype}")


def from_f32(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> storage array of ``dtype`` (bf16 as uint16 bits), rounding RNE once."""
    x = np.asarray(x, dtype=F32)
    if dtype == "F32":
        return x.astype("<f4")
    if dtype == "F16":
        return f32_to_f16(x).astype("<f2")
    if dtype == "BF16":
        return f32_to_bf16_bits(x).astype("<u2")
    raise ValueError(f"not a float dtype: {dtype}")


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> value after a round trip through ``dtype`` (what a reader would see)."""
    return to_f32(from_f32(x, dtype), dtype)


def decode(raw: bytes, dtype: str, shape: Sequence[int]) -> np.ndarray:
    """Raw little-endian tensor bytes -> storage array (bf16 as uint16 bits)."""
    return np.frombuffer(raw, dtype=STORAGE[dtype]).reshape(tuple(shape))


# --------------------------------------------------------------------------- parameters


def param_f32(value: float) -> np.float32:
    """A parameter evaluated in f64 (a Python float), rounded to f32 before use."""
    return F32(float(value))


def layer_index(tensor_name: str) -> int | None:
    m = re.search(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.", tensor_name)
    return int(m.group(1)) if m else None


def gradient_at(values: Sequence[float], p: float) -> float:
    """Piecewise-linear interpolation of a gradient list at p in [0, 1] (f64)."""
    vals = [float(v) for v in values]
    if len(vals) == 1:
        return vals[0]
    return float(np.interp(p, np.linspace(0.0, 1.0, len(vals)), vals))


_MISSING = object()


def resolve_value(value: Any, tensor_name: str, p: float) -> Any:
    """Resolve one parameter value (CONFIG.md "Parameter values") for one tensor.

    Returns ``_MISSING`` when a filtered list has no matching entry (fall through).
    """
    if isinstance(value, list) and value and isinstance(value[0], dict):
        for entry in value:
            f = entry.get("filter")
            if f is None or f == "*" or f in tensor_name:
                return resolve_value(entry["value"], tensor_name, p)
        return _MISSING
    if isinstance(value, list):
        return gradient_at(value, p)
    return value


def lookup(levels: Sequence[dict | None], key: str, tensor_name: str, p: float, default=None):
    """First hit over parameter dicts (model's, slice's, top-level), else ``default``."""
    for params in levels:
        if params and key in params:
            v = resolve_value(params[key], tensor_name, p)
            if v is not _MISSING:
                return v
    return default


def position(tensor_name: str, num_layers: int, first_layer: int = 0) -> float:
    """p for a tensor (CONFIG.md): i/(n-1) within its output slice, 0 outside layers."""
    i = layer_index(tensor_name)
    if i is None:
        return 0.0
    if num_layers == 1:
        return 1.0
    return (i - first_layer) / (num_layers - 1)


# --------------------------------------------------------------------------- methods


def linear(xs: Sequence[np.ndarray], weights: Sequence[float], normalize: bool = True) -> np.ndarray:
    """METHODS.md §1: ``Σ w_i x_i`` in config order, divided by ``Σ w_i`` if normalize."""
    acc = np.zeros(np.shape(xs[0]), dtype=F32)
    div = F32(0.0)
    for w, x in zip(weights, xs, strict=True):
        w32 = param_f32(w)
        acc = acc + w32 * np.asarray(x, dtype=F32)
        div = F32(div + w32)
    if normalize:
        if div == 0:
            raise ValueError("normalize with sum of weights 0 is a config error")
        acc = acc / div
    return acc.astype(F32)


def task_arithmetic(
    base: np.ndarray,
    xs: Sequence[np.ndarray],
    weights: Sequence[float],
    normalize: bool = False,
    lam: float = 1.0,
) -> np.ndarray:
    """METHODS.md §2 without sparsification or consensus.

    ``mixed = Σ w_i (x_i - b)``; ``div = Σ w_i`` (scalar, 1 if ``|div| < 1e-8``);
    ``mixed /= div`` if normalize; ``mixed *= lambda``; ``out = b + mixed``.
    """
    b = np.asarray(base, dtype=F32)
    mixed = np.zeros(b.shape, dtype=F32)
    div = F32(0.0)
    for w, x in zip(weights, xs, strict=True):
        w32 = param_f32(w)
        delta = np.asarray(x, dtype=F32) - b
        mixed = mixed + w32 * delta
        div = F32(div + w32)
    if abs(div) < F32(1e-8):
        div = F32(1.0)
    if normalize:
        mixed = mixed / div
    mixed = mixed * param_f32(lam)
    return (b + mixed).astype(F32)


def passthrough(x: np.ndarray, scale: float | None = None) -> np.ndarray:
    """METHODS.md §5: ``out = x`` or ``x · scale``."""
    x = np.asarray(x, dtype=F32)
    if scale is None:
        return x.copy()
    return (x * param_f32(scale)).astype(F32)
