"""slerp, nuslerp, multislerp, karcher and model_stock (METHODS.md §4), mirroring
rust/mergex-core/src/methods/slerp.rs, sphere.rs, model_stock.rs and gram.rs.

Every method here reduces its inputs to dot products first — whole-tensor, per row or per
column — and forms the output from a few f64 coefficients rounded to f32. The dot products
are computed the Rust way so that the coefficients, and then the outputs, are bit for bit
the Rust engine's:

- whole tensor (gram.rs ``accumulate``): in f64 within 256-element blocks (element ``t`` of a
  block into lane ``t % 8``, lanes summed in index order and folded in a fixed tree), block
  sums added exactly (``kit.block_sums`` and ``kit.ExactSums``, as engine/reduce.rs);
- per row (gram.rs ``local``): the same eight lanes over the whole row;
- per column (nuslerp with ``nuslerp_row_wise``): every product added exactly.

The scalar math after that (norms, acos, sin, the karcher iterations) runs in Python floats,
operation for operation as Rust's f64 code, with Rust's semantics where Python's differ
(NaN in ``max``, division by zero, iterator sums starting at -0.0); ``math`` calls the
platform's C math library, as Rust's f64 functions do.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence

import torch

from ...errors import CheckpointError
from .. import kit
from ..base import Chunk, TensorCtx, TorchMerge, f32

# --------------------------------------------------------------------------- Rust's f64 scalars


def _max(a: float, b: float) -> float:
    """Rust's ``f64::max``: a NaN operand loses."""
    if math.isnan(a):
        return b
    if math.isnan(b):
        return a
    return a if a > b else b


def _clamp(x: float, lo: float, hi: float) -> float:
    """Rust's ``f64::clamp`` (NaN stays NaN)."""
    if x < lo:
        x = lo
    if x > hi:
        x = hi
    return x


def _sum(values: Sequence[float]) -> float:
    """Rust's ``Iterator::sum`` over f64: a left fold from -0.0."""
    total = -0.0
    for v in values:
        total += v
    return total


def _div(a: float, b: float) -> float:
    """IEEE division (Python raises on a zero divisor)."""
    if b != 0.0:
        return a / b
    if a == 0.0 or math.isnan(a):
        return math.nan
    return math.copysign(math.inf, a) * math.copysign(1.0, b)


def _sqrt(x: float) -> float:
    return math.sqrt(x) if x >= 0.0 else math.nan


def _sin(x: float) -> float:
    return math.sin(x) if math.isfinite(x) else math.nan


def _cos(x: float) -> float:
    return math.cos(x) if math.isfinite(x) else math.nan


def _quad(g: list[list[float]], a: Sequence[float], b: Sequence[float]) -> float:
    """``aᵀ G b`` in sphere.rs's order."""
    s = 0.0
    for i, ai in enumerate(a):
        for j, bj in enumerate(b):
            s += ai * g[i][j] * bj
    return s


# --------------------------------------------------------------------------- dot products

# Elements of each vector handled at once for dot products (a multiple of kit.BLOCK; bounds
# the f64 temporaries).
_SLICE = 1 << 16


def _pairs(k: int) -> list[tuple[int, int]]:
    """The pairs i <= j of a Gram matrix, in gram.rs's slot order."""
    return [(i, j) for i in range(k) for j in range(i, k)]


def _pair_products(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``v_i · v_j`` elementwise in f64 for every pair, stacked in slot order: [P, ...]."""
    wide = [v.to(torch.float64) for v in vectors]
    pairs = _pairs(len(wide))
    out = torch.empty((len(pairs), *wide[0].shape), dtype=torch.float64, device=wide[0].device)
    for p, (i, j) in enumerate(pairs):
        torch.mul(wide[i], wide[j], out=out[p])
    return out


class WholeGram:
    """Whole-tensor Gram matrix of ``k`` vectors, gathered chunk by chunk (gram.rs
    ``accumulate`` + ``matrix``)."""

    def __init__(self, k: int, device: torch.device) -> None:
        self.k = k
        self.slots = torch.arange(len(_pairs(k)), device=device)[:, None]
        self.sums = kit.ExactSums(len(_pairs(k)), device)

    def add(self, vectors: Sequence[torch.Tensor]) -> None:
        """One chunk of every vector (the chunk starts on a block boundary, as its blocks)."""
        n = vectors[0].numel()
        for at in range(0, n, _SLICE):
            prods = _pair_products([v[at : at + _SLICE] for v in vectors])
            self.sums.add(kit.block_sums(prods), self.slots)

    def matrix(self) -> list[list[float]]:
        g = [[0.0] * self.k for _ in range(self.k)]
        for (i, j), s in zip(_pairs(self.k), self.sums.values(), strict=True):
            g[i][j] = g[j][i] = s
        return g


def _row_gram(rows: Sequence[torch.Tensor]) -> dict[tuple[int, int], torch.Tensor]:
    """Per row (gram.rs ``local``): the dot products of every pair of ``rows`` ([R, m] each),
    as [R] f64 tensors keyed (i, j) with i <= j."""
    count, m = rows[0].shape
    step = max(1, _SLICE // max(m, 1))
    parts = []
    for at in range(0, count, step):
        prods = _pair_products([r[at : at + step] for r in rows])
        parts.append(kit.lane_fold(prods.view(-1, m)).view(prods.shape[0], -1))
    sums = torch.cat(parts, dim=1)
    return {pair: sums[s] for s, pair in enumerate(_pairs(len(rows)))}


# --------------------------------------------------------------------------- slerp, nuslerp


def _slerp_coefficients(t: float, dot: float, parallel: bool) -> tuple[float, float]:
    """``(c_a, c_b)`` with ``out = c_a·a + c_b·b`` (slerp.rs ``slerp_coefficients``)."""
    if parallel:
        return 1.0 - t, t
    theta = math.acos(dot)
    s = math.sin(theta)
    return _div(_sin((1.0 - t) * theta), s), _div(_sin(t * theta), s)


def _slerp_norm(v: float) -> float:
    r = _sqrt(v)
    return 1.0 if r <= 1e-8 else r


class Slerp(TorchMerge):
    """slerp: the base and one other model over the whole tensor (one statistics pass)."""

    def __init__(self, ctx: TensorCtx) -> None:
        ctx.expect_models(1, 1, "slerp takes the base model and exactly one other model")
        self.t = f32(ctx.global_("t"))
        self.gram = WholeGram(2, ctx.device)
        self.coef: tuple[float, float] | None = None

    def planned_passes(self) -> int:
        return 1

    def wants_pass(self) -> bool:
        return self.coef is None

    def stat_chunk(self, x: Chunk) -> None:
        if x.base is not None and x.models.shape[0] > 0:
            self.gram.add([x.base, x.models[0]])

    def end_pass(self) -> None:
        g = self.gram.matrix()
        dot = _clamp(g[0][1] / (_slerp_norm(g[0][0]) * _slerp_norm(g[1][1])), -1.0, 1.0)
        ca, cc = _slerp_coefficients(self.t, dot, abs(dot) > 0.9995)
        self.coef = (f32(ca), f32(cc))

    def merge_chunk(self, x: Chunk) -> torch.Tensor:
        assert self.coef is not None and x.base is not None
        ca, cc = self.coef
        return x.base * ca + x.models[0] * cc


def _nuslerp_coefficients(t: float, g11: float, g22: float, g12: float) -> tuple[float, float]:
    """f32 coefficients of one vector pair from its dot products (slerp.rs ``coefficients``)."""
    n1, n2 = _max(_sqrt(g11), 1e-7), _max(_sqrt(g22), 1e-7)
    cos = _clamp(g12 / (n1 * n2), -1.0, 1.0)
    c1, c2 = _slerp_coefficients(t, cos, 1.0 - cos * cos <= 1e-16)
    return f32(c1), f32(c2)


class Nuslerp(TorchMerge):
    """nuslerp of two models (their task vectors with a base): the whole tensor as one vector
    (a statistics pass), each row (row-local: no pass) or each column (per-column exact
    sums in a statistics pass). The tensor is viewed as [-1, width] (width 1 for the whole
    tensor), so one expression applies scalar, per-row or per-column coefficients."""

    def __init__(self, ctx: TensorCtx) -> None:
        ctx.expect_models(2, 2, "nuslerp takes exactly two models besides the base")
        w1, w2 = f32(ctx.model_param(0, "weight")), f32(ctx.model_param(1, "weight"))
        self.t = 0.5 if abs(w1 + w2) < 1e-6 else w2 / (w1 + w2)
        self.ctx = ctx
        self.mode = "flat"
        self.width = 1
        """Row length (rows) or number of columns (columns)."""
        if not (ctx.flag("nuslerp_flatten") or len(ctx.shape) < 2):
            if ctx.flag("nuslerp_row_wise"):
                self.mode, self.width = "columns", math.prod(ctx.shape[1:])
            else:
                self.mode, self.width = "rows", max(ctx.shape[-1], 1)
        self.gram = WholeGram(2, ctx.device) if self.mode == "flat" else None
        self.columns = kit.ExactSums(3 * self.width, ctx.device) if self.mode == "columns" else None
        self.coef: tuple[torch.Tensor | float, torch.Tensor | float] | None = None

    def planned_passes(self) -> int:
        return int(self.mode != "rows")

    def wants_pass(self) -> bool:
        return self.coef is None and self.mode != "rows"

    def stat_chunk(self, x: Chunk) -> None:
        v = x.deltas()
        if self.gram is not None:
            self.gram.add([v[0], v[1]])
        elif self.columns is not None:
            # Per column: ‖v1‖², ‖v2‖², v1·v2, every product added exactly (slots s·cols + c).
            p, q = (r.to(torch.float64).view(-1, self.width) for r in (v[0], v[1]))
            cols = torch.arange(self.width, device=p.device)
            for s, prod in enumerate((p * p, q * q, p * q)):
                self.columns.add(prod, cols + s * self.width)

    def end_pass(self) -> None:
        if self.columns is not None:
            sums = self.columns.values()
            w = self.width
            pairs = [_nuslerp_coefficients(self.t, sums[c], sums[w + c], sums[2 * w + c]) for c in range(w)]
            self.coef = self._as_tensors(pairs)
        else:
            assert self.gram is not None
            g = self.gram.matrix()
            self.coef = _nuslerp_coefficients(self.t, g[0][0], g[1][1], g[0][1])

    def _as_tensors(self, pairs: list[tuple[float, float]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-vector coefficients as two tensors in the working precision (exact: they are
        f32 values)."""
        c = torch.tensor(pairs, dtype=torch.float64).reshape(-1, 2)
        c = c.to(device=self.ctx.device, dtype=self.ctx.dtype)
        return c[:, 0], c[:, 1]

    def merge_chunk(self, x: Chunk) -> torch.Tensor:
        v = x.deltas()
        a, b = v[0].view(-1, self.width), v[1].view(-1, self.width)
        c1: torch.Tensor | float
        c2: torch.Tensor | float
        if self.mode == "rows":
            g = _row_gram([a, b])
            rows = zip(g[0, 0].tolist(), g[1, 1].tolist(), g[0, 1].tolist(), strict=True)
            r1, r2 = self._as_tensors([_nuslerp_coefficients(self.t, *r) for r in rows])
            c1, c2 = r1[:, None], r2[:, None]
        else:
            assert self.coef is not None
            c1, c2 = self.coef
        out = (a * c1 + b * c2).view(-1)
        if x.base is not None:
            out += x.base
        return out


# --------------------------------------------------------------------------- multislerp, karcher

Solve = Callable[[list[list[float]]], list[float]]


class Combination(TorchMerge):
    """``out = Σ c_k v_k`` (+ base), with the coefficients solved from the inputs' Gram
    matrix (sphere.rs ``Combination``): one statistics pass, even for karcher's
    iterations, which all run on coefficients."""

    def __init__(self, ctx: TensorCtx, solve: Solve, deltas: bool, fixed: bool) -> None:
        self.k = len(ctx.model_params)
        self.solve = solve
        self.deltas = deltas
        self.fixed = fixed
        """Coefficients known without statistics (one input): the pass still runs, as in
        Rust, but gathers nothing."""
        self.gram = WholeGram(self.k, ctx.device)
        self.coef: list[float] | None = None

    def planned_passes(self) -> int:
        return int(not self.fixed)

    def wants_pass(self) -> bool:
        return self.coef is None

    def stat_chunk(self, x: Chunk) -> None:
        if not self.fixed:
            self.gram.add(list(x.deltas()))

    def end_pass(self) -> None:
        g = self.gram.matrix() if not self.fixed else [[0.0]]
        self.coef = [f32(c) for c in self.solve(g)]

    def merge_chunk(self, x: Chunk) -> torch.Tensor:
        assert self.coef is not None
        v = x.deltas()
        out = torch.zeros(x.n, dtype=v.dtype, device=v.device)
        for m, c in zip(v, self.coef, strict=True):
            out += m * c
        if self.deltas and x.base is not None:
            out += x.base
        return out


def build_multislerp(ctx: TensorCtx) -> Combination:
    k = len(ctx.model_params)
    w = [f32(ctx.model_param(i, "weight")) for i in range(k)]
    if ctx.flag("normalize_weights"):
        total = _sum(w)
        if abs(total) < 1e-12:
            raise ctx.bad_param("weight", "the weights sum to 0 and cannot be normalized")
        w = [v / total for v in w]
    eps = f32(ctx.global_("eps"))
    name = ctx.name

    def solve(g: list[list[float]]) -> list[float]:
        if k == 1:
            return [1.0]
        n = [_sqrt(_max(g[i][i], 0.0)) for i in range(k)]
        # m = Σ a_i v_i with a_i = w_i / (n_i + eps).
        a = [_div(w[i], n[i] + eps) for i in range(k)]
        m_norm = _sqrt(_max(_quad(g, a, a), 0.0))
        if m_norm < eps:
            if k == 2:
                return list(w)
            raise CheckpointError(
                f"tensor '{name}': multislerp inputs are antipodal: their weighted mean direction is zero"
            )
        # s = Σ_i w_i (u_i · m̂); T = m - s m̂ = Σ a_k (1 - s/‖m‖) v_k.
        ui_m = [_div(_div(_sum([a[j] * g[i][j] for j in range(k)]), n[i] + eps), m_norm) for i in range(k)]
        s = _sum([w[i] * ui_m[i] for i in range(k)])
        shrink = 1.0 - _div(s, m_norm)
        t_norm = _sqrt(_max(shrink * shrink * _quad(g, a, a), 0.0))
        ln = t_norm + eps
        scale = _sum([w[i] * n[i] for i in range(k)])
        return [
            scale * (_div(a[j], m_norm) * _cos(ln) + _div(a[j] * shrink * _sin(ln), ln)) for j in range(k)
        ]

    return Combination(ctx, solve, deltas=ctx.has_base, fixed=k == 1)


def karcher(g: list[list[float]], k: int, max_iter: int, tol: float) -> list[float]:
    """Karcher mean coefficients from the Gram matrix of the inputs (sphere.rs ``karcher``)."""
    n = [_sqrt(_max(g[i][i], 0.0)) for i in range(k)]
    valid = [i for i in range(k) if n[i] > tol]
    if not valid:
        return [0.0] * k
    alpha = 1.0 / len(valid)

    def unit(i: int) -> list[float]:
        c = [0.0] * k
        c[i] = _div(1.0, n[i])
        return c

    u = [0.0] * k
    for i in valid:
        u[i] += _div(alpha, n[i])
    norm = _sqrt(_max(_quad(g, u, u), 0.0))
    u = unit(valid[0]) if norm < tol else [_div(c, norm) for c in u]
    for _ in range(max_iter):
        t = [0.0] * k
        for i in valid:
            ui = unit(i)
            cos = _clamp(_quad(g, u, ui), -1.0, 1.0)
            theta = math.acos(cos)
            if theta < tol:
                continue
            f = _div(alpha * theta, math.sin(theta))
            for j in range(k):
                t[j] += f * (ui[j] - cos * u[j])
        t_norm = _sqrt(_max(_quad(g, t, t), 0.0))
        if t_norm < tol:
            break
        c, s = _cos(t_norm), _div(_sin(t_norm), t_norm)
        u = [c * u[j] + s * t[j] for j in range(k)]
        norm = _sqrt(_max(_quad(g, u, u), 0.0))
        if norm > 0.0:
            u = [v / norm for v in u]
    scale = _sum(n) / k
    return [c * scale for c in u]


def build_karcher(ctx: TensorCtx) -> Combination:
    k = len(ctx.model_params)
    raw = _max(ctx.global_("max_iter"), 0.0)
    max_iter = int(raw) if math.isfinite(raw) else sys.maxsize  # Rust's saturating `as usize`
    tol = f32(ctx.global_("tol"))
    return Combination(ctx, lambda g: karcher(g, k, max_iter, tol), deltas=False, fixed=False)


# --------------------------------------------------------------------------- model_stock


def _stock_factor(g: dict[tuple[int, int], torch.Tensor], n: int) -> torch.Tensor:
    """model_stock.rs ``factor`` over f64 tensors (one value per vector), in Rust's order;
    ``fmax`` is Rust's ``max`` (NaN loses), the rest are correctly rounded IEEE operations."""
    any_g = g[0, 0]
    zero = torch.zeros_like(any_g)
    floor = torch.full_like(any_g, 1e-6)
    total = zero.clone()
    pairs = 0
    for i in range(n):
        for j in range(i + 1, n):
            den = torch.fmax(torch.fmax(g[i, i], zero).sqrt() * torch.fmax(g[j, j], zero).sqrt(), floor)
            total = total + (g[i, j] / den).clamp(-1.0, 1.0)
            pairs += 1
    c = total / torch.full_like(any_g, pairs)  # n >= 2: at least one pair
    den = 1.0 + (n - 1.0) * c
    return torch.where(den.abs() < 1e-6, zero, (n * c) / den)


class ModelStock(TorchMerge):
    """model_stock: ``t`` from the mean cosine of the task vectors over the whole tensor (a
    statistics pass) or per row with ``filter_wise`` (row-local: no pass)."""

    def __init__(self, ctx: TensorCtx) -> None:
        ctx.expect_models(2, None, "model_stock takes a base model and at least two other models")
        self.n = len(ctx.model_params)
        self.ctx = ctx
        self.rows = max(ctx.shape[-1] if ctx.shape else 1, 1) if ctx.flag("filter_wise") else None
        self.gram = WholeGram(self.n, ctx.device)
        self.t: torch.Tensor | None = None

    def planned_passes(self) -> int:
        return int(self.rows is None)

    def wants_pass(self) -> bool:
        return self.rows is None and self.t is None

    def stat_chunk(self, x: Chunk) -> None:
        if x.base is not None:
            self.gram.add(list(x.deltas()))

    def end_pass(self) -> None:
        g = self.gram.matrix()
        wide = {(i, j): torch.tensor([g[i][j]], dtype=torch.float64) for i, j in _pairs(self.n)}
        self.t = self._working(_stock_factor(wide, self.n))

    def _working(self, t: torch.Tensor) -> torch.Tensor:
        """``T::from_f64(t as f32 as f64)``."""
        return t.to(torch.float32).to(device=self.ctx.device, dtype=self.ctx.dtype)

    def merge_chunk(self, x: Chunk) -> torch.Tensor:
        assert x.base is not None
        if self.rows is None:
            assert self.t is not None
            return self._interpolate(self.t, x.base, x.models)
        m = self.rows
        base = x.base.view(-1, m)
        models = x.models.view(self.n, -1, m)
        t = self._working(_stock_factor(_row_gram(list(models - base)), self.n))
        return self._interpolate(t[:, None], base, models).view(-1)

    def _interpolate(self, t: torch.Tensor, base: torch.Tensor, models: torch.Tensor) -> torch.Tensor:
        """``t · (Σ x_i / N) + (1 - t) · b``, the sum in config order (model_stock.rs)."""
        ctx = self.ctx
        one_minus = ctx.scalar(1.0) - t
        out = torch.zeros_like(base)
        for m in models:
            out += m
        return t * (out / ctx.scalar(float(self.n))) + one_minus * base


METHODS = {
    "slerp": Slerp,
    "nuslerp": Nuslerp,
    "multislerp": build_multislerp,
    "karcher": build_karcher,
    "model_stock": ModelStock,
}
