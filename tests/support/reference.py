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


# --------------------------------------------------------------------------- spherical and other methods
#
# METHODS.md §4 and §5. Whole-tensor reductions (sums of squares, dot products, Gram
# matrices) in f64 with exactly rounded sums (math.fsum): the engine's blocked f64 sums agree
# to a few ulps of f64, far below what could change an f32 coefficient. Coefficients are
# rounded to f32 and applied to the f32 tensors, ``c1 * a + c2 * c`` (two roundings, no FMA).


def _f64(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=F32).astype(np.float64).reshape(-1)


def fdot(a: np.ndarray, b: np.ndarray) -> float:
    """Σ a·b over the whole tensor in f64, exactly rounded (products of f32 are exact in f64)."""
    return math.fsum(_f64(a) * _f64(b))


def slerp_coefficients(base: np.ndarray, x: np.ndarray, t: float) -> tuple[float, float, float]:
    """(dot, ca, cc) of §4 slerp in f64: the cosine and the two coefficients before rounding."""
    a = np.asarray(base, dtype=F32)
    c = np.asarray(x, dtype=F32)
    tt = param64(t)
    na = math.sqrt(fdot(a, a))
    nc = math.sqrt(fdot(c, c))
    na = 1.0 if na <= 1e-8 else na
    nc = 1.0 if nc <= 1e-8 else nc
    dot = min(1.0, max(-1.0, fdot(a, c) / (na * nc)))
    if abs(dot) > 0.9995:
        return dot, 1.0 - tt, tt
    theta = math.acos(dot)
    s = math.sin(theta)
    return dot, math.sin((1.0 - tt) * theta) / s, math.sin(tt * theta) / s


def slerp(base: np.ndarray, x: np.ndarray, t: float) -> np.ndarray:
    """§4 slerp of the base ``a`` toward ``c = x`` over the whole tensor (on the raw tensors)."""
    _dot, ca, cc = slerp_coefficients(base, x, t)
    a = np.asarray(base, dtype=F32)
    c = np.asarray(x, dtype=F32)
    return (F32(ca) * a + F32(cc) * c).astype(F32)


def _vector_sums(v1: np.ndarray, v2: np.ndarray, mode: str):
    """(Σv1², Σv2², Σv1·v2) per vector, as f64 arrays shaped to broadcast over the tensor."""
    a, b = np.asarray(v1, dtype=F32), np.asarray(v2, dtype=F32)
    if mode == "whole" or a.ndim == 1:
        return (np.array(fdot(a, a)), np.array(fdot(b, b)), np.array(fdot(a, b)))
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    if mode == "rows":
        a64, b64 = a64.reshape(-1, a.shape[-1]), b64.reshape(-1, a.shape[-1])
        shape = (*a.shape[:-1], 1)

        def red(p):
            return np.array([math.fsum(r) for r in p]).reshape(shape)

    elif mode == "columns":
        if a.ndim != 2:
            raise NotImplementedError("columns of a tensor with more than two axes")
        shape = (1, a.shape[1])

        def red(p):
            return np.array([math.fsum(col) for col in p.T]).reshape(shape)

    else:
        raise ValueError(mode)
    return red(a64 * a64), red(b64 * b64), red(a64 * b64)


def nuslerp(
    xs: Sequence[np.ndarray],
    weights: Sequence[float],
    base: np.ndarray | None = None,
    flatten: bool = True,
    row_wise: bool = False,
) -> np.ndarray:
    """§4 nuslerp of two models (of their task vectors with a base)."""
    if len(xs) != 2:
        raise ValueError("nuslerp takes exactly two models")
    w1, w2 = param64(weights[0]), param64(weights[1])
    t = 0.5 if abs(w1 + w2) < 1e-6 else w2 / (w1 + w2)
    if base is not None:
        b = np.asarray(base, dtype=F32)
        v1 = (np.asarray(xs[0], dtype=F32) - b).astype(F32)
        v2 = (np.asarray(xs[1], dtype=F32) - b).astype(F32)
    else:
        v1, v2 = (np.asarray(x, dtype=F32) for x in xs)
    mode = "whole" if flatten else ("columns" if row_wise else "rows")
    s11, s22, s12 = _vector_sums(v1, v2, mode)
    n1 = np.maximum(np.sqrt(s11), 1e-7)
    n2 = np.maximum(np.sqrt(s22), 1e-7)
    cos = np.clip(s12 / (n1 * n2), -1.0, 1.0)
    linear = 1.0 - cos * cos <= 1e-16
    theta = np.arccos(cos)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.sin(theta)
        c1 = np.where(linear, 1.0 - t, np.sin((1.0 - t) * theta) / s)
        c2 = np.where(linear, t, np.sin(t * theta) / s)
    out = (c1.astype(F32) * v1 + c2.astype(F32) * v2).astype(F32)
    if base is not None:
        out = (out + b).astype(F32)
    return out


class AntipodalError(ValueError):
    """multislerp's weighted mean direction is zero with more than two inputs."""


def multislerp(
    xs: Sequence[np.ndarray],
    weights: Sequence[float],
    base: np.ndarray | None = None,
    normalize_weights: bool = True,
    eps: float = 1e-8,
) -> np.ndarray:
    """§4 multislerp, followed literally in f64 (returns f64; compare with a tolerance)."""
    shape = np.shape(xs[0])
    if len(xs) == 1:
        return np.asarray(xs[0], dtype=F32).astype(np.float64)
    e = param64(eps)
    w = np.array([param64(v) for v in weights])
    if normalize_weights:
        w = w / w.sum()
    b = None if base is None else _f64(base)
    vs = [_f64(x) - b if b is not None else _f64(x) for x in xs]
    ns = [math.sqrt(math.fsum(v * v)) for v in vs]
    us = [v / (n + e) for v, n in zip(vs, ns, strict=True)]
    m = sum(wi * u for wi, u in zip(w, us, strict=True))
    mn = math.sqrt(math.fsum(m * m))
    if mn < e:
        if len(xs) == 2:
            out = w[0] * vs[0] + w[1] * vs[1]
            return (out if b is None else out + b).reshape(shape)
        raise AntipodalError("multislerp inputs are antipodal")
    mh = m / mn
    tangent = sum(wi * (u - math.fsum(u * mh) * mh) for wi, u in zip(w, us, strict=True))
    L = math.sqrt(math.fsum(tangent * tangent)) + e
    r = mh * math.cos(L) + tangent * (math.sin(L) / L)
    out = r * float(np.dot(w, ns))
    return (out if b is None else out + b).reshape(shape)


def karcher(xs: Sequence[np.ndarray], max_iter: int = 10, tol: float = 1e-5) -> np.ndarray:
    """§4 karcher mean of all inputs (the base is just one of them), literally in f64."""
    shape = np.shape(xs[0])
    tl = param64(tol)
    k = len(xs)
    alpha = [1.0 / k] * k
    vs = [_f64(x) for x in xs]
    ns = [math.sqrt(math.fsum(v * v)) for v in vs]
    us = [v / n if n > 0 else np.zeros_like(v) for v, n in zip(vs, ns, strict=True)]
    valid = [i for i in range(k) if ns[i] > tl]
    if not valid:
        return np.zeros(shape)
    total = sum(alpha[i] for i in valid)
    a = {i: alpha[i] / total for i in valid}
    u = sum(a[i] * us[i] for i in valid)
    un = math.sqrt(math.fsum(u * u))
    u = us[valid[0]] if un < tl else u / un
    for _ in range(int(max_iter)):
        tangent = np.zeros_like(u)
        for i in valid:
            cos = min(1.0, max(-1.0, math.fsum(u * us[i])))
            theta = math.acos(cos)
            if theta >= tl:
                tangent = tangent + a[i] * theta / math.sin(theta) * (us[i] - cos * u)
        tn = math.sqrt(math.fsum(tangent * tangent))
        if tn < tl:
            break
        u = math.cos(tn) * u + math.sin(tn) * tangent / tn
        u = u / math.sqrt(math.fsum(u * u))
    scale = sum(alpha[i] * ns[i] for i in range(k))
    return (scale * u).reshape(shape)


def _rows(x: np.ndarray) -> np.ndarray:
    """Rows along the last axis as a 2-D view (a 1-D tensor is one row)."""
    x = np.asarray(x)
    return x.reshape(1, -1) if x.ndim <= 1 else x.reshape(-1, x.shape[-1])


def model_stock(base: np.ndarray, xs: Sequence[np.ndarray], filter_wise: bool = False) -> np.ndarray:
    """§4 model_stock: t from the task vectors' mean pairwise cosine (per tensor or per row)."""
    b = np.asarray(base, dtype=F32)
    n = len(xs)
    if n < 2:
        raise ValueError("model_stock takes at least two models besides the base")
    ds = [(np.asarray(x, dtype=F32) - b).astype(F32) for x in xs]
    if filter_wise and b.ndim > 1:
        d64 = [_rows(d).astype(np.float64) for d in ds]

        def gram(i, j):
            return np.array([math.fsum(r) for r in d64[i] * d64[j]])

        rows_shape = (*b.shape[:-1], 1)
    else:

        def gram(i, j):
            return np.array([fdot(ds[i], ds[j])])

        rows_shape = ()
    g = {(i, j): gram(i, j) for i in range(n) for j in range(i, n)}
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    cs = []
    for i, j in pairs:
        den = np.maximum(np.sqrt(g[i, i]) * np.sqrt(g[j, j]), 1e-6)
        cs.append(np.clip(g[i, j] / den, -1.0, 1.0))
    c = sum(cs) / len(pairs)
    den = 1.0 + (n - 1) * c
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(np.abs(den) < 1e-6, 0.0, n * c / den)
    t32 = t.astype(F32).reshape(rows_shape)
    acc = np.zeros(b.shape, dtype=F32)
    for x in xs:
        acc = (acc + np.asarray(x, dtype=F32)).astype(F32)
    mean = (acc / F32(n)).astype(F32)
    return (t32 * mean + (F32(1.0) - t32) * b).astype(F32)


def model_stock_t(base: np.ndarray, xs: Sequence[np.ndarray]) -> float:
    """The whole-tensor t of :func:`model_stock` (f64, before rounding), for assertions."""
    b = np.asarray(base, dtype=F32)
    ds = [(np.asarray(x, dtype=F32) - b).astype(F32) for x in xs]
    n = len(ds)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    c = 0.0
    for i, j in pairs:
        den = max(math.sqrt(fdot(ds[i], ds[i])) * math.sqrt(fdot(ds[j], ds[j])), 1e-6)
        c += min(1.0, max(-1.0, fdot(ds[i], ds[j]) / den))
    c /= len(pairs)
    den = 1.0 + (n - 1) * c
    return 0.0 if abs(den) < 1e-6 else n * c / den


def sce_variance(deltas: Sequence[np.ndarray]) -> np.ndarray:
    """§5 sce: per-element population variance over models, in f32 (sequential sums)."""
    n = F32(len(deltas))
    s = np.zeros(np.shape(deltas[0]), dtype=F32)
    for d in deltas:
        s = (s + d).astype(F32)
    mean = (s / n).astype(F32)
    var = np.zeros_like(s)
    for d in deltas:
        e = (d - mean).astype(F32)
        var = (var + e * e).astype(F32)
    return (var / n).astype(F32)


def sce_mask(deltas: Sequence[np.ndarray], select_topk: float) -> np.ndarray:
    """The k = floor(topk · count(var ≠ 0)) largest variances, lower flat index first on ties."""
    var = sce_variance(deltas).reshape(-1)
    k = math.floor(param64(select_topk) * int(np.count_nonzero(var)))
    order = np.argsort(-var, kind="stable")
    mask = np.zeros(var.size, dtype=bool)
    mask[order[:k]] = True
    return mask.reshape(np.shape(deltas[0]))


def sce(base: np.ndarray, xs: Sequence[np.ndarray], select_topk: float = 1.0) -> np.ndarray:
    """§5 sce: variance selection, TIES sum election, mean-square matrix weights."""
    b = np.asarray(base, dtype=F32)
    ds = [(np.asarray(x, dtype=F32) - b).astype(F32) for x in xs]
    if param64(select_topk) < 1.0:
        mask = sce_mask(ds, select_topk)
        ds = [np.where(mask, d, F32(0.0)).astype(F32) for d in ds]
    total = np.zeros(b.shape, dtype=F32)
    for d in ds:
        total = (total + d).astype(F32)
    positive = total >= 0
    cs = [math.fsum(_f64(d) ** 2) / b.size for d in ds]
    csum = sum(cs)
    cn = [1.0 / len(ds)] * len(ds) if csum < 1e-6 else [c / csum for c in cs]
    num = np.zeros(b.shape, dtype=F32)
    den = np.zeros(b.shape, dtype=F32)
    for c, d in zip(cn, ds, strict=True):
        c32 = F32(c)
        agree = np.where(positive, d > 0, d < 0)
        num = np.where(agree, num + c32 * d, num).astype(F32)
        den = np.where(agree, den + c32, den).astype(F32)
    return (b + num / np.maximum(den, F32(1e-6))).astype(F32)


def ram_activity(base: np.ndarray, xs: Sequence[np.ndarray], epsilon: float = 1e-5):
    """(deltas, active masks, per-element count) of §5 ram."""
    b = np.asarray(base, dtype=F32)
    ds = [(np.asarray(x, dtype=F32) - b).astype(F32) for x in xs]
    eps = param_f32(epsilon)
    active = [np.abs(d) > eps for d in ds]
    count = sum(a.astype(np.int64) for a in active)
    return ds, active, count


def ram(base: np.ndarray, xs: Sequence[np.ndarray], epsilon: float = 1e-5) -> np.ndarray:
    """§5 ram: average where several task vectors are active, keep where one is."""
    return ramplus_tl(base, xs, epsilon, lambdas=[F32(1.0)] * len(xs))


def ramplus_lambdas(
    base: np.ndarray, xs: Sequence[np.ndarray], epsilon: float = 1e-5, r: float = 0.1, alpha: float = 0.2
) -> list[np.float32]:
    """§5 ramplus_tl: λ_i = 1 + r·clamp(shared_i / max(unique_i, ε), 0, alpha), f64 → f32."""
    _ds, active, count = ram_activity(base, xs, epsilon)
    out = []
    for a in active:
        shared = int(np.count_nonzero(a & (count > 1)))
        unique = int(np.count_nonzero(a & (count == 1)))
        rho = shared / max(unique, param64(epsilon))
        out.append(F32(1.0 + param64(r) * min(max(rho, 0.0), param64(alpha))))
    return out


def ramplus_tl(
    base: np.ndarray,
    xs: Sequence[np.ndarray],
    epsilon: float = 1e-5,
    r: float = 0.1,
    alpha: float = 0.2,
    lambdas: Sequence[np.float32] | None = None,
) -> np.ndarray:
    """§5 ramplus_tl (``lambdas`` all 1 gives plain ram)."""
    b = np.asarray(base, dtype=F32)
    ds, active, count = ram_activity(base, xs, epsilon)
    if lambdas is None:
        lambdas = ramplus_lambdas(base, xs, epsilon, r, alpha)
    # count 0 gives inf here, only ever used where no model is active (masked out below).
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inv = (F32(1.0) / count.astype(F32)).astype(F32)
    acc = np.zeros(b.shape, dtype=F32)
    for lam, d, a in zip(lambdas, ds, active, strict=True):
        unique = d if lam == F32(1.0) else (lam * d).astype(F32)
        with np.errstate(invalid="ignore", over="ignore"):
            term = np.where(count == 1, unique, (d * inv).astype(F32))
        acc = (acc + np.where(a, term, F32(0.0))).astype(F32)
    return (b + acc).astype(F32)


def nearswap(base: np.ndarray, x: np.ndarray, t: float) -> np.ndarray:
    """§5 nearswap: w = clamp(t / max(|b - x|, 1e-6), 0, 1); out = w x + (1 - w) b."""
    b = np.asarray(base, dtype=F32)
    xx = np.asarray(x, dtype=F32)
    diff = np.abs(b - xx).astype(F32)
    w = (param_f32(t) / np.maximum(diff, F32(1e-6))).astype(F32)
    w = np.clip(w, F32(0.0), F32(1.0)).astype(F32)
    return (w * xx + (F32(1.0) - w) * b).astype(F32)


def arcee_importance(base: np.ndarray, x: np.ndarray) -> np.ndarray:
    """§5 arcee_fusion: imp = |x - b| · KL(row) in f64, flat."""
    b64 = _rows(np.asarray(base, dtype=F32)).astype(np.float64)
    x64 = _rows(np.asarray(x, dtype=F32)).astype(np.float64)

    def softmax(v):
        e = np.exp(v - v.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    p = softmax(x64) + 1e-8
    q = softmax(b64) + 1e-8
    kl = (p * np.log(p / q)).sum(axis=1, keepdims=True)
    return (np.abs(x64 - b64) * kl).reshape(-1)


def arcee_threshold(imp: np.ndarray) -> float:
    """median + 1.5·(Q3 - Q1), quantile q = the sorted element at floor(q·(n-1))."""
    s = np.sort(np.asarray(imp).reshape(-1))
    last = s.size - 1

    def q(f):
        return float(s[math.floor(f * last)])

    return q(0.5) + 1.5 * (q(0.75) - q(0.25))


def arcee_fusion(base: np.ndarray, x: np.ndarray) -> np.ndarray:
    """§5 arcee_fusion: take x where its importance is an outlier (imp ≥ thr)."""
    b = np.asarray(base, dtype=F32)
    xx = np.asarray(x, dtype=F32)
    imp = arcee_importance(b, xx)
    take = (imp >= arcee_threshold(imp)).reshape(b.shape)
    return np.where(take, (b + (xx - b).astype(F32)).astype(F32), b).astype(F32)


def arcee_fusion_ties(base: np.ndarray, x: np.ndarray, rel: float = 1e-12) -> tuple[np.ndarray, np.ndarray]:
    """Elements whose importance is within f64 noise of the threshold, and their other value.

    Such elements are exact ties in real arithmetic (e.g. bf16 inputs in one row, where
    imp ∝ |x - b| and |x_j - b_j| equals median + 1.5 IQR of the |x - b| values exactly), so
    which side they fall on depends on the order of the f64 sums (METHODS.md §0). Returns
    (mask, value had the comparison gone the other way).
    """
    b = np.asarray(base, dtype=F32)
    xx = np.asarray(x, dtype=F32)
    imp = arcee_importance(b, xx)
    thr = arcee_threshold(imp)
    s = np.sort(imp)
    last = s.size - 1
    flat_iqr = s[math.floor(0.75 * last)] == s[math.floor(0.25 * last)]
    # thr = 0 (all imp 0) or thr = the median element itself (IQR 0) compare exactly.
    near = (np.abs(imp - thr) <= rel * thr) & (thr > 0) & ~(flat_iqr & (imp == thr))
    mask = near.reshape(b.shape)
    take = (imp >= thr).reshape(b.shape)
    other = np.where(take, b, (b + (xx - b).astype(F32)).astype(F32)).astype(F32)
    return mask, other


def lora_apply(w: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float, transposed: bool) -> np.ndarray:
    """``W + s·B·A`` as the engine's reader computes it: element (i, j) adds
    ``s · Σₖ L[i,k]·R[k,j]`` (L = B, R = A; L = Aᵀ, R = Bᵀ for a weight stored transposed),
    the sum over k in order in f64, added to W in f64 and rounded once to f32."""
    left, right = (a.T, b.T) if transposed else (b, a)
    acc = np.zeros(w.shape, dtype=np.float64)
    for k in range(left.shape[1]):
        acc += left[:, k : k + 1].astype(np.float64) * right[k : k + 1, :].astype(np.float64)
    return (w.astype(np.float64) + np.float64(scale) * acc).astype(np.float32)
