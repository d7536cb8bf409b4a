"""sce, ram, ramplus_tl, nearswap and arcee_fusion (METHODS.md §5), mirroring the Rust
engine's ``methods/sce.rs``, ``ram.rs``, ``nearswap.rs`` and ``arcee_fusion.rs``: the same
passes, the same f32 operations per element in the same order, the same f64 statistics,
thresholds and tie rules, so that the torch engine on the CPU writes the same bits.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable

import numpy as np
import torch

from .. import kit
from ..base import Chunk, TensorCtx, TorchMerge, f32
from ..select import Selector, Side, key_bits, mag_keys, passes


def _not_below(value: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """Rust's ``if v > floor { v } else { floor }`` (NaN gives the floor)."""
    return torch.where(value > floor, value, floor)


# --------------------------------------------------------------------------- sce


def _variance(x: Chunk, k: torch.Tensor) -> torch.Tensor:
    """Task vectors in place; per element the population variance over the models (f32
    sums in config order, as ``sce.rs::variance``)."""
    assert x.base is not None
    x.models.sub_(x.base)
    total = torch.zeros_like(x.models[0])
    for m in x.models:
        total = total + m
    mean = total / k
    var = torch.zeros_like(total)
    for m in x.models:
        d = m - mean
        var = var + d * d
    return var / k


class Sce(TorchMerge):
    """Pass 1 counts the nonzero variances and histograms them; passes 2… finish the exact
    top-k of the variance; the last pass sums each selected task vector's squares for the
    matrix weights. With ``select_topk = 1`` only that last pass runs."""

    def __init__(self, ctx: TensorCtx) -> None:
        if not ctx.has_base:
            raise ctx.bad_param("base_model", "sce needs a base model")
        topk = f32(ctx.global_("select_topk"))
        if not 0.0 <= topk <= 1.0:
            raise ctx.bad_param("select_topk", f"must be within [0, 1], got {topk!r}")
        self.ctx = ctx
        self.topk = topk
        self.n = ctx.numel
        self.k = ctx.scalar(float(len(ctx.model_params)))
        self.floor = ctx.scalar(f32(1e-6))
        # The variance selection: "all", "nothing", or a Selector (top-k above its rank).
        # The first pass's selector only histograms (its rank is set once k is known).
        self.keep_all = topk >= 1.0
        self.keep_none = False
        self.probing = not self.keep_all
        gather_cap = max(ctx.ram_budget // 4 // 16, 4096)
        self.select = Selector(0, Side.TOPK, key_bits(ctx.dtype), gather_cap)
        self.nonzero = 0
        self.squares = kit.ExactSums(len(ctx.model_params), ctx.device)
        self.slots = torch.arange(len(ctx.model_params), device=ctx.device)[:, None]
        """Per model, the slot of its sum of squares."""
        self.weights: list[torch.Tensor] | None = None

    def planned_passes(self) -> int:
        return 1 if self.topk >= 1.0 else 3

    def wants_pass(self) -> bool:
        return self.weights is None

    def _selecting(self) -> bool:
        return not (self.keep_all or self.keep_none) and self.select.pending

    def _apply_selection(self, x: Chunk, var: torch.Tensor) -> None:
        """Zero the unselected elements of every task vector."""
        if self.keep_all:
            return
        if self.keep_none:
            x.models.zero_()
            return
        cut = self.select.cut
        assert cut is not None
        keep = passes(cut, mag_keys(var), x.start, above=True)
        x.models.masked_fill_(~keep, 0.0)

    def stat_chunk(self, x: Chunk) -> None:
        var = _variance(x, self.k)
        if self._selecting():
            if self.probing:
                self.nonzero += int((var != 0).sum().item())
            self.select.collect(x.start, mag_keys(var))
        else:
            self._apply_selection(x, var)
            wide = (m.to(torch.float64) for m in x.models)
            self.squares.add(torch.stack([kit.block_sums(v * v) for v in wide]), self.slots)

    def end_pass(self) -> None:
        if self.probing:
            self.probing = False
            k = math.floor(self.topk * float(self.nonzero))
            if k == 0:
                self.keep_none = True
            elif k >= self.n:
                self.keep_all = True
            else:
                self.select.rank = self.n - k
                self.select.advance()
        elif self._selecting():
            self.select.advance()
        else:
            sums = self.squares.values()
            count = len(sums)
            c = [v / float(max(self.n, 1)) for v in sums]
            total = 0.0
            for v in c:  # a plain f64 sum in model order, as Rust's ``Iterator::sum``
                total += v
            c = [1.0 / max(count, 1)] * count if total < 1e-6 else [v / total for v in c]
            self.weights = [self.ctx.scalar(f32(v)) for v in c]

    def merge_chunk(self, x: Chunk) -> torch.Tensor:
        var = _variance(x, self.k)
        self._apply_selection(x, var)
        assert x.base is not None and self.weights is not None
        # The TIES election on the unweighted task vectors.
        total = torch.zeros_like(x.base)
        for m in x.models:
            total = total + m
        positive = total >= 0
        num = torch.zeros_like(total)
        den = torch.zeros_like(total)
        for m, c in zip(x.models, self.weights, strict=True):
            agree = torch.where(positive, m > 0, m < 0)
            num = torch.where(agree, num + c * m, num)
            den = torch.where(agree, den + c, den)
        return x.base + num / _not_below(den, self.floor)


# --------------------------------------------------------------------------- ram


def _f64_div(a: float, b: float) -> float:
    """IEEE f64 division (inf or NaN for a zero divisor, as in Rust)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.float64(a) / np.float64(b))


class Ram(TorchMerge):
    """ram (no statistics), or ramplus_tl (one counting pass for the unique scale λ_i)."""

    def __init__(self, ctx: TensorCtx, plus: bool) -> None:
        if not ctx.has_base:
            raise ctx.bad_param("base_model", "this method needs a base model")
        self.ctx = ctx
        self.eps = ctx.scalar(f32(ctx.global_("epsilon")))
        count = len(ctx.model_params)
        self.plus: tuple[float, float, float] | None = None
        if plus:
            self.plus = (f32(ctx.global_("r")), f32(ctx.global_("alpha")), f32(ctx.global_("epsilon")))
        if self.plus is not None and not self.plus[1] >= 0.0:
            # rho is clamped to [0, alpha]: a negative alpha leaves no such interval.
            raise ctx.bad_param("alpha", f"must be at least 0, got {self.plus[1]!r}")
        self.shared = [0] * count
        self.unique = [0] * count
        self.lambdas: list[torch.Tensor] | None = None

    def planned_passes(self) -> int:
        return int(self.plus is not None)

    def wants_pass(self) -> bool:
        return self.plus is not None and self.lambdas is None

    def _active(self, x: Chunk) -> tuple[torch.Tensor, torch.Tensor]:
        """Task vectors in place; per model and element whether it is active, and per
        element the number of active models."""
        assert x.base is not None
        x.models.sub_(x.base)
        active = (x.models > self.eps) | (-x.models > self.eps)
        return active, active.sum(0, dtype=torch.int32)

    def stat_chunk(self, x: Chunk) -> None:
        active, count = self._active(x)
        alone = count == 1
        for i, a in enumerate(active):
            unique = int((a & alone).sum().item())
            self.unique[i] += unique
            self.shared[i] += int(a.sum().item()) - unique

    def end_pass(self) -> None:
        assert self.plus is not None
        r, alpha, eps = self.plus
        lambdas: list[torch.Tensor] = []
        for shared, unique in zip(self.shared, self.unique, strict=True):
            # f64::max ignores a NaN ε, and f64::clamp passes a NaN ratio through, as here.
            rho = _f64_div(float(shared), max(float(unique), eps))
            clamped = 0.0 if rho < 0.0 else alpha if rho > alpha else rho
            lambdas.append(self.ctx.scalar(f32(1.0 + r * clamped)))
        self.lambdas = lambdas

    def merge_chunk(self, x: Chunk) -> torch.Tensor:
        active, count = self._active(x)
        assert x.base is not None
        inv = self.ctx.scalar(1.0) / count.to(x.models.dtype)  # count 0: inf, never used
        alone = count == 1
        out = torch.zeros_like(x.base)
        for i, (m, a) in enumerate(zip(x.models, active, strict=True)):
            lam = self.lambdas[i] if self.lambdas is not None else self.ctx.scalar(1.0)
            term = torch.where(alone, lam * m, m * inv)
            out = torch.where(a, out + term, out)
        return x.base + out


def _ram(ctx: TensorCtx) -> TorchMerge:
    return Ram(ctx, plus=False)


def _ramplus(ctx: TensorCtx) -> TorchMerge:
    return Ram(ctx, plus=True)


# --------------------------------------------------------------------------- nearswap


class NearSwap(TorchMerge):
    """``w = clamp(t / max(|b - x|, 1e-6), 0, 1)``, ``out = w·x + (1 - w)·b`` (one pass)."""

    def __init__(self, ctx: TensorCtx) -> None:
        ctx.expect_models(1, 1, "nearswap takes the base model and exactly one other model")
        self.t = ctx.scalar(f32(ctx.global_("t")))
        self.floor = ctx.scalar(f32(1e-6))
        self.one = ctx.scalar(1.0)
        self.zero = ctx.scalar(0.0)

    def merge_chunk(self, x: Chunk) -> torch.Tensor:
        b, m = x.base, x.models[0]
        assert b is not None
        diff = torch.where(b > m, b - m, m - b)
        w = self.t / _not_below(diff, self.floor)
        # Rust's if/else clamp: NaN gives 0.
        w = torch.where(w > self.one, self.one, torch.where(w > self.zero, w, self.zero))
        return w * m + (self.one - w) * b


# --------------------------------------------------------------------------- arcee_fusion


def _libm(fn: Callable[[float], float], values: torch.Tensor) -> torch.Tensor:
    """``fn`` (``math.exp`` or ``math.log``) of every value, on the CPU in f64.

    Python's math functions call the C library's, as Rust's ``f64::exp``/``ln`` do; torch's
    and numpy's vectorized versions differ from it in the last bit for about 1% of inputs,
    which would move importances near the threshold across it.
    """
    flat = values.reshape(-1).tolist()
    out = np.fromiter(map(fn, flat), dtype=np.float64, count=len(flat))
    return torch.from_numpy(out).view(values.shape)


def _seq_sum(rows: torch.Tensor) -> torch.Tensor:
    """Per row, the plain left-to-right f64 sum (Rust's ``Iterator::sum``); the CPU cumsum
    adds in that order."""
    return torch.cumsum(rows, 1)[:, -1]


def _softmax(rows: torch.Tensor) -> torch.Tensor:
    """``softmax(v) + 1e-8`` per row in f64, as ``arcee_fusion.rs::kl_divergence``."""
    # fold(-inf, f64::max) skips NaN.
    top = torch.where(rows.isnan(), -math.inf, rows).amax(1, keepdim=True)
    e = _libm(math.exp, rows - top)
    return e / _seq_sum(e)[:, None] + 1e-8


def _kl_rows(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) of every row, p = softmax(x) + 1e-8, q = softmax(b) + 1e-8, in f64 on the CPU."""
    p, q = _softmax(x), _softmax(b)
    return _seq_sum(p * _libm(math.log, p / q))


_SIGN = 1 << 63
_SIGN_I64 = -(1 << 63)  # the sign bit as an int64 value


def _order_keys(values: torch.Tensor) -> torch.Tensor:
    """Keys that order f64 values numerically, as unsigned 64-bit numbers held in int64
    (the Rust engine's ``order_key``): a row's KL can round below zero, and the negative
    importances it gives must rank below the positive ones."""
    bits = values.view(torch.int64)
    return torch.where(bits < 0, ~bits, bits | _SIGN_I64)


def _key_value(key: int) -> float:
    """The f64 value of an :func:`_order_keys` key (an unsigned Python int)."""
    bits = key & ~_SIGN if key & _SIGN else ~key & ((1 << 64) - 1)
    return float(struct.unpack("<d", struct.pack("<Q", bits))[0])


class ArceeFusion(TorchMerge):
    """Statistics passes find the exact quartiles of the importance (rows whole in every
    chunk); the output pass takes the other model where ``imp ≥ median + 1.5·IQR``.

    Each row's KL is computed once, in the first pass, and kept (one f64 per row): later
    passes give the same values Rust recomputes, without calling libm per element again.
    """

    def __init__(self, ctx: TensorCtx) -> None:
        ctx.expect_models(1, 1, "arcee_fusion takes the base model and exactly one other model")
        n = ctx.numel
        self.row = max(ctx.shape[-1] if len(ctx.shape) >= 2 else n, 1)
        cap = max(ctx.ram_budget // 4 // 16 // 3, 4096)
        last = float(max(n - 1, 0))
        self.quartiles = [Selector(math.floor(f * last), Side.VALUE, 64, cap) for f in (0.25, 0.5, 0.75)]
        self.kl = torch.empty(-(-n // self.row), dtype=torch.float64, device=ctx.device)
        self.kl_known = False
        self.threshold: float | None = None

    def planned_passes(self) -> int:
        return 2

    def wants_pass(self) -> bool:
        return self.threshold is None

    def _importance(self, x: Chunk) -> torch.Tensor:
        """Importance of every element of the chunk's whole rows, in f64."""
        assert x.base is not None
        b = x.base.to(torch.float64).view(-1, self.row)
        m = x.models[0].to(torch.float64).view(-1, self.row)
        rows = slice(x.start // self.row, x.start // self.row + b.shape[0])
        if not self.kl_known:
            self.kl[rows] = _kl_rows(m.cpu(), b.cpu()).to(self.kl.device)
        return ((m - b).abs() * self.kl[rows, None]).view(-1)

    def stat_chunk(self, x: Chunk) -> None:
        keys = _order_keys(self._importance(x))
        for q in self.quartiles:
            if q.pending:
                q.collect(x.start, keys)

    def end_pass(self) -> None:
        self.kl_known = True
        for q in self.quartiles:
            if q.pending:
                q.advance()
        if not any(q.pending for q in self.quartiles):
            q1, median, q3 = (_key_value(q.cut.key) for q in self.quartiles if q.cut is not None)
            self.threshold = median + 1.5 * (q3 - q1)

    def merge_chunk(self, x: Chunk) -> torch.Tensor:
        assert x.base is not None and self.threshold is not None
        b, m = x.base, x.models[0]
        take = self._importance(x) >= self.threshold
        return torch.where(take, b + (m - b), b)


METHODS = {"sce": Sce, "ram": _ram, "ramplus_tl": _ramplus, "nearswap": NearSwap, "arcee_fusion": ArceeFusion}
