"""Plain numpy reference for the merge math in ``spec/METHODS.md``.

Independent of the mergex package on purpose: the tests compare the engine against this.
Conventions (METHODS.md §0): every input converted exactly to float32, parameters
rounded to float32 before use, per-element sums over models in config order written as
``acc = acc + w * x`` (two roundings, no FMA), and the result rounded once, to nearest
even, to the output dtype.
"""

from __future__ import annotations

import math
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


# --------------------------------------------------------------------------- task-vector family
#
# METHODS.md §2 and §3. The random draw is the counter-based hash of §3, written in numpy
# uint32 arithmetic (multiplication of uint32 arrays wraps modulo 2^32).

U32 = np.uint32
_MASK32 = 0xFFFFFFFF


def mix32(x):
    """§3 ``mix`` on a uint32 array (or a Python int, returned as an int)."""
    if isinstance(x, int | np.integer):
        v = int(x) & _MASK32
        v ^= v >> 16
        v = (v * 0x7FEB352D) & _MASK32
        v ^= v >> 15
        v = (v * 0x846CA68B) & _MASK32
        v ^= v >> 16
        return v
    v = np.asarray(x, dtype=U32).copy()
    v ^= v >> U32(16)
    v *= U32(0x7FEB352D)
    v ^= v >> U32(15)
    v *= U32(0x846CA68B)
    v ^= v >> U32(16)
    return v


def fnv1a32(name: str) -> int:
    """§3 ``fnv1a`` over the UTF-8 bytes of a tensor name."""
    h = 0x811C9DC5
    for byte in name.encode("utf-8"):
        h ^= byte
        h = (h * 0x01000193) & _MASK32
    return h


def draw_stream(seed: int, tensor_name: str, model_pos: int) -> int:
    """§3 ``stream`` for one (seed, output tensor, non-base model position)."""
    s = mix32(mix32((seed & _MASK32) ^ 0x9E3779B9) ^ fnv1a32(tensor_name))
    return int(mix32(s ^ ((model_pos + 1) & _MASK32)))


def draws(stream: int, index) -> np.ndarray:
    """§3 ``r_j`` (uint32) for the flat indices ``index`` (any int array, u64 range)."""
    j = np.asarray(index, dtype=np.uint64)
    lo = (j & np.uint64(_MASK32)).astype(U32)
    hi = (j >> np.uint64(32)).astype(U32)
    return mix32(U32(stream) ^ mix32(lo) ^ mix32(hi ^ U32(0x85EBCA6B)))


def keep_threshold(p) -> np.ndarray:
    """``floor(p · 2^32)`` in f64 (as int64, so p = 1 gives 2^32 and keeps everything)."""
    return np.floor(np.asarray(p, dtype=np.float64) * 4294967296.0).astype(np.int64)


def param64(value: float) -> float:
    """A parameter rounded to f32, then used in an f64 formula (k = floor(d·n), p)."""
    return float(np.float32(float(value)))


def _order_by_magnitude(a: np.ndarray) -> np.ndarray:
    """Flat indices sorted by |a| ascending, lower index first among equal magnitudes."""
    return np.argsort(a, kind="stable")


def mask_magnitude(delta: np.ndarray, density: float) -> np.ndarray:
    """§3 magnitude (ties): the k = max(1, floor(d·n)) largest |δ|, lower index on ties."""
    d = param64(density)
    flat = np.abs(np.asarray(delta, dtype=F32)).reshape(-1)
    n = flat.size
    if d >= 1.0:
        return np.ones(np.shape(delta), dtype=bool)
    k = 0 if d <= 0.0 else max(1, math.floor(d * n))
    # Descending by |δ|, ascending by index: a stable sort of -|δ|.
    order = np.argsort(-flat, kind="stable")
    mask = np.zeros(n, dtype=bool)
    mask[order[:k]] = True
    return mask.reshape(np.shape(delta))


def mask_magnitude_outliers(delta: np.ndarray, density: float, gamma: float) -> np.ndarray:
    """§3 magnitude_outliers (breadcrumbs): keep ranks bot … bot+keep-1 of |δ| ascending."""
    d = param64(density)
    g = param64(gamma)
    flat = np.abs(np.asarray(delta, dtype=F32)).reshape(-1)
    n = flat.size
    if d >= 1.0:
        return np.ones(np.shape(delta), dtype=bool)
    keep = math.floor(d * n)
    top = math.floor(g * n)
    bot = max(0, n - keep - top)
    order = _order_by_magnitude(flat)
    mask = np.zeros(n, dtype=bool)
    mask[order[bot : bot + keep]] = True
    return mask.reshape(np.shape(delta))


def mask_random(delta: np.ndarray, density: float, seed: int, tensor_name: str, model_pos: int) -> np.ndarray:
    """§3 random (DARE): keep j iff r_j < floor(d · 2^32)."""
    d = param64(density)
    shape = np.shape(delta)
    if d >= 1.0:
        return np.ones(shape, dtype=bool)
    n = int(np.prod(shape, dtype=np.int64))
    r = draws(draw_stream(seed, tensor_name, model_pos), np.arange(n, dtype=np.uint64))
    return (r.astype(np.int64) < keep_threshold(d)).reshape(shape)


def della_keep_probability(delta: np.ndarray, density: float, epsilon: float) -> np.ndarray:
    """§3 della_magprune: p = d - ε + 2ε(q-1)/(m-1) by rank q of |δ| within each row."""
    d = param64(density)
    eps = param64(epsilon)
    a = np.abs(np.asarray(delta, dtype=F32))
    if a.ndim == 0:
        a = a.reshape(1)
    rows = a.reshape(1, -1) if a.ndim == 1 else a.reshape(-1, a.shape[-1])
    if a.ndim > 2:
        raise NotImplementedError("ranks along axis 1 for >2-D tensors")
    m = rows.shape[1]
    order = np.argsort(rows, axis=1, kind="stable")  # ascending, lower index first on ties
    q = np.empty(rows.shape, dtype=np.int64)
    np.put_along_axis(q, order, np.arange(1, m + 1, dtype=np.int64)[None, :], axis=1)
    if m == 1:
        p = np.full(rows.shape, d, dtype=np.float64)
    else:
        p = (d - eps) + (2.0 * eps * (q - 1).astype(np.float64)) / float(m - 1)
    return p.reshape(np.shape(delta))


def mask_della(
    delta: np.ndarray, density: float, epsilon: float, seed: int, tensor_name: str, model_pos: int
) -> np.ndarray:
    """§3 della_magprune: keep j iff r_j < floor(p_j · 2^32), j the flat index in the tensor."""
    if param64(density) >= 1.0:
        return np.ones(np.shape(delta), dtype=bool)
    p = della_keep_probability(delta, density, epsilon).reshape(-1)
    r = draws(draw_stream(seed, tensor_name, model_pos), np.arange(p.size, dtype=np.uint64))
    return (r.astype(np.int64) < keep_threshold(p)).reshape(np.shape(delta))


def rescale_factor(delta: np.ndarray, mask: np.ndarray) -> np.float32:
    """§2 L1 matching: ‖δ‖₁ / ‖δ ⊙ mask‖₁ in f64 (exact sums), rounded to f32; 1 if a norm < 1e-7."""
    a = np.abs(np.asarray(delta, dtype=F32).astype(np.float64)).reshape(-1)
    full = math.fsum(a)
    kept = math.fsum(a[np.asarray(mask).reshape(-1)])
    if full < 1e-7 or kept < 1e-7:
        return F32(1.0)
    return F32(full / kept)


# method -> (sparsifier, consensus, normalize default, rescale default)
TASK_METHODS: dict[str, tuple[str | None, bool, bool, bool]] = {
    "task_arithmetic": (None, False, False, False),
    "ties": ("magnitude", True, True, False),
    "dare_ties": ("random", True, False, True),
    "dare_linear": ("random", False, False, True),
    "breadcrumbs": ("magnitude_outliers", False, False, False),
    "breadcrumbs_ties": ("magnitude_outliers", True, False, False),
    "della": ("della_magprune", True, True, True),
    "della_linear": ("della_magprune", False, False, True),
}


def task_mask(
    method: str,
    delta: np.ndarray,
    tensor_name: str,
    model_pos: int,
    density: float = 1.0,
    gamma: float = 0.01,
    epsilon: float = 0.15,
    seed: int = 0,
) -> np.ndarray:
    """The kept-elements mask of one model's δ for one tensor, by the method's sparsifier."""
    kind = TASK_METHODS[method][0]
    if kind is None:
        return np.ones(np.shape(delta), dtype=bool)
    if kind == "magnitude":
        return mask_magnitude(delta, density)
    if kind == "magnitude_outliers":
        return mask_magnitude_outliers(delta, density, gamma)
    if kind == "random":
        return mask_random(delta, density, seed, tensor_name, model_pos)
    return mask_della(delta, density, epsilon, seed, tensor_name, model_pos)


def task_family(
    method: str,
    base: np.ndarray,
    xs: Sequence[np.ndarray],
    tensor_name: str,
    weights: Sequence[float],
    densities: Sequence[float] | None = None,
    gammas: Sequence[float] | None = None,
    epsilons: Sequence[float] | None = None,
    normalize: bool | None = None,
    rescale: bool | None = None,
    lam: float = 1.0,
    seed: int = 0,
) -> np.ndarray:
    """METHODS.md §2 for one tensor: the merged float32 values before output rounding.

    ``xs`` are the non-base models' tensors in config order (their position is the
    ``model_pos`` of the random draw). Per-model parameter lists default to the method's
    defaults (density 1, gamma 0.01, epsilon 0.15).
    """
    _kind, consensus, norm_default, rescale_default = TASK_METHODS[method]
    normalize = norm_default if normalize is None else normalize
    rescale = rescale_default if rescale is None else rescale
    nm = len(xs)
    densities = [1.0] * nm if densities is None else list(densities)
    gammas = [0.01] * nm if gammas is None else list(gammas)
    epsilons = [0.15] * nm if epsilons is None else list(epsilons)

    b = np.asarray(base, dtype=F32)
    ws = [param_f32(w) for w in weights]
    contributions = []
    for pos, x in enumerate(xs):
        delta = (np.asarray(x, dtype=F32) - b).astype(F32)
        mask = task_mask(method, delta, tensor_name, pos, densities[pos], gammas[pos], epsilons[pos], seed)
        scaled = delta
        if rescale:
            scaled = (delta * rescale_factor(delta, mask)).astype(F32)
        contributions.append(np.where(mask, (ws[pos] * scaled).astype(F32), F32(0.0)).astype(F32))

    if consensus:
        total = np.zeros(b.shape, dtype=F32)
        for c in contributions:
            total = total + c
        majority_positive = total >= 0
        mixed = np.zeros(b.shape, dtype=F32)
        div = np.zeros(b.shape, dtype=F32)
        for w, c in zip(ws, contributions, strict=True):
            agree = np.where(majority_positive, c > 0, c < 0)
            mixed = np.where(agree, mixed + c, mixed).astype(F32)
            div = np.where(agree, div + w, div).astype(F32)
        div = np.where(div == 0, F32(1.0), div).astype(F32)
    else:
        mixed = np.zeros(b.shape, dtype=F32)
        div = F32(0.0)
        for w, c in zip(ws, contributions, strict=True):
            mixed = (mixed + c).astype(F32)
            div = F32(div + w)
        if abs(div) < F32(1e-8):
            div = F32(1.0)
    if normalize:
        mixed = (mixed / div).astype(F32)
    mixed = (mixed * param_f32(lam)).astype(F32)
    return (b + mixed).astype(F32)
