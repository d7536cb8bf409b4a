"""The task-vector family (METHODS.md §2, §3) in torch: task_arithmetic, ties, dare_ties,
dare_linear, breadcrumbs, breadcrumbs_ties, della and della_linear.

A port of the Rust engine's ``methods/task_vector.rs`` and ``methods/sparsify.rs``: the same
sparsifiers and statistics passes, the same f32 operations in the same order (never a fused
multiply-add), and L1 norms summed over the same 256-element blocks and 8 lanes, the block
sums added exactly. So outputs are bit-identical to the Rust engine's, and random keep masks
are the same draws.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ...errors import ConfigError
from .. import kit
from ..base import Chunk, TensorCtx, TorchMerge, f32
from ..select import Selector, Side, key_bits, mag_keys, passes, sample_ranges


class Kind(enum.Enum):
    """Which sparsifier a method uses (METHODS.md §3)."""

    NONE = "none"
    MAGNITUDE = "magnitude"
    OUTLIERS = "magnitude_outliers"
    RANDOM = "random"
    DELLA = "della_magprune"


@dataclass(frozen=True)
class Family:
    """The switches that tell the family's methods apart."""

    sparsify: Kind
    consensus: bool


FAMILIES = {
    "task_arithmetic": Family(Kind.NONE, consensus=False),
    "ties": Family(Kind.MAGNITUDE, consensus=True),
    "dare_ties": Family(Kind.RANDOM, consensus=True),
    "dare_linear": Family(Kind.RANDOM, consensus=False),
    "breadcrumbs": Family(Kind.OUTLIERS, consensus=False),
    "breadcrumbs_ties": Family(Kind.OUTLIERS, consensus=True),
    "della": Family(Kind.DELLA, consensus=True),
    "della_linear": Family(Kind.DELLA, consensus=False),
}


# --------------------------------------------------------------------------- L1 sums


def _l1_blocks(delta: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Σ|δ| (where ``keep``) of every block of one chunk, as the Rust engine's ``reduce_abs``
    (the lanes and order of ``block_sum``)."""
    a = delta.to(torch.float64).abs()
    return kit.block_sums(a if keep is None else torch.where(keep, a, 0.0))


# --------------------------------------------------------------------------- sparsifiers


class Sparsifier:
    """One model's sparsifier for one tensor. This base keeps every element; the
    subclasses are the other cases of the Rust ``Sparsifier`` enum."""

    drops = False
    """Whether anything may be dropped (so the L1 rescale applies)."""
    is_selection = False
    """Whether the kept set comes from magnitude cuts (statistics passes)."""
    random = False
    """Whether :meth:`mask` needs the chunk's index hashes."""

    @property
    def pending(self) -> bool:
        """Whether a selection still needs passes."""
        return False

    def collect(self, start: int, delta: torch.Tensor, keys: torch.Tensor | None = None) -> None:
        """Selection statistics of one chunk of δ (``keys``: its magnitude keys, when the
        caller has them)."""

    def advance(self) -> None:
        """Take the statistics of the pass just finished."""

    def wants_sample(self, n: int) -> bool:
        """Whether a sample of a tensor of ``n`` elements can save this sparsifier passes."""
        return False

    def sample(self, delta: torch.Tensor) -> None:
        """Collect one sample range of δ."""

    def plan_bands(self, n: int) -> None:
        """Take the sample: the selections' first bands."""

    def mask(self, start: int, delta: torch.Tensor, hashes: torch.Tensor | None) -> torch.Tensor:
        """The keep mask of one chunk of δ starting at flat index ``start``."""
        return torch.ones(delta.shape, dtype=torch.bool, device=delta.device)


class KeepNothing(Sparsifier):
    drops = True

    def mask(self, start: int, delta: torch.Tensor, hashes: torch.Tensor | None) -> torch.Tensor:
        return torch.zeros(delta.shape, dtype=torch.bool, device=delta.device)


class Select(Sparsifier):
    """Keep elements between two exact rank cuts of |δ| (either may be absent): at or above
    ``lower`` (TOPK or LOWER), at or below ``upper`` (UPPER)."""

    drops = True
    is_selection = True

    def __init__(self, lower: Selector | None, upper: Selector | None) -> None:
        self.selectors = (lower, upper)

    @property
    def pending(self) -> bool:
        return any(s is not None and s.pending for s in self.selectors)

    def collect(self, start: int, delta: torch.Tensor, keys: torch.Tensor | None = None) -> None:
        keys = mag_keys(delta) if keys is None else keys
        for s in self.selectors:
            if s is not None and s.pending:
                s.collect(start, keys)

    def wants_sample(self, n: int) -> bool:
        return any(s is not None and s.pending and s.wants_sample(n) for s in self.selectors)

    def sample(self, delta: torch.Tensor) -> None:
        keys = mag_keys(delta)
        for s in self.selectors:
            if s is not None:
                s.sample(keys)

    def plan_bands(self, n: int) -> None:
        for s in self.selectors:
            if s is not None and s.wants_sample(n):
                s.plan_band(n)

    def advance(self) -> None:
        for s in self.selectors:
            if s is not None and s.pending:
                s.advance()

    def mask(self, start: int, delta: torch.Tensor, hashes: torch.Tensor | None) -> torch.Tensor:
        keys = mag_keys(delta)
        keep = torch.ones(delta.shape, dtype=torch.bool, device=delta.device)
        for s, above in zip(self.selectors, (True, False), strict=True):
            if s is not None:
                assert s.cut is not None, "mask of an unresolved selection"
                keep &= passes(s.cut, keys, start, above)
        return keep


class RandomDrop(Sparsifier):
    """DARE: keep element j iff its draw is below ``floor(d · 2^32)``."""

    drops = True
    random = True

    def __init__(self, stream: int, threshold: int) -> None:
        self.stream = stream
        self.threshold = threshold

    def mask(self, start: int, delta: torch.Tensor, hashes: torch.Tensor | None) -> torch.Tensor:
        assert hashes is not None
        return kit.draws(self.stream, hashes) < self.threshold


@dataclass(frozen=True)
class Rows:
    """Vectors DELLA ranks within: ``len`` elements ``inner`` apart, in groups of
    ``len · inner`` contiguous elements (the chunk alignment)."""

    len: int
    inner: int

    @staticmethod
    def of(shape: tuple[int, ...]) -> Rows:
        """METHODS.md §3: 1-D → one row; 2-D → rows along the last axis; more → along axis 1."""
        if not shape:
            return Rows(1, 1)
        if len(shape) == 1:
            return Rows(shape[0], 1)
        return Rows(shape[1], math.prod(shape[2:]))


class Della(Sparsifier):
    """DELLA: rank |δ| within each row (ascending, lower index first among ties) and keep
    rank q (0-based) with probability ``d - ε + 2ε·q/(m-1)``."""

    drops = True
    random = True

    def __init__(self, stream: int, d: float, eps: float, rows: Rows) -> None:
        self.stream = stream
        self.rows = rows
        m = rows.len
        # Keep probability by rank, the f64 operations of the Rust code in its order, and
        # its threshold floor(p · 2^32) as kit.threshold computes it.
        if m <= 1:
            p = np.full(max(m, 1), d)
        else:
            p = (d - eps) + (2.0 * eps) * np.arange(m, dtype=np.float64) / float(m - 1)
        with np.errstate(invalid="ignore"):
            thr = np.where(p > 0.0, np.minimum(np.floor(p * 4294967296.0), 4294967296.0), 0.0)
        self.table = thr.astype(np.int64)
        self._thresholds: torch.Tensor | None = None

    def mask(self, start: int, delta: torch.Tensor, hashes: torch.Tensor | None) -> torch.Tensor:
        assert hashes is not None
        if delta.numel() == 0:
            return torch.zeros(0, dtype=torch.bool, device=delta.device)
        if self._thresholds is None or self._thresholds.device != delta.device:
            self._thresholds = torch.from_numpy(self.table).to(delta.device)
        m, inner = self.rows.len, self.rows.inner
        keys = mag_keys(delta).view(-1, m, inner)
        order = torch.sort(keys, dim=1, stable=True).indices
        ranks = torch.arange(m, device=delta.device).view(1, m, 1).expand_as(order)
        rank = torch.empty_like(order).scatter_(1, order, ranks)
        return kit.draws(self.stream, hashes) < self._thresholds[rank.reshape(-1)]


def _floor_n(f: float, n: int) -> int:
    return 0 if f <= 0.0 else min(math.floor(f * float(n)), n)


def make_sparsifier(
    kind: Kind, d: float, gamma: float, eps: float, ctx: TensorCtx, position: int, gather_cap: int
) -> Sparsifier:
    """One model's sparsifier from its (f32-rounded) density ``d``, ``gamma`` and ``eps``."""
    if kind == Kind.NONE or d >= 1.0:
        return Sparsifier()
    n = ctx.numel
    bits = key_bits(ctx.dtype)
    if kind == Kind.MAGNITUDE:
        k = 0 if d <= 0.0 else max(_floor_n(d, n), 1)
        if k == 0:
            return KeepNothing()
        if k >= n:
            return Sparsifier()
        return Select(Selector(n - k, Side.TOPK, bits, gather_cap), None)
    if kind == Kind.OUTLIERS:
        keep = _floor_n(d, n)
        top = _floor_n(gamma, n)
        bot = max(n - (keep + top), 0)
        if keep == 0:
            return KeepNothing()
        lower = Selector(bot, Side.LOWER, bits, gather_cap) if bot > 0 else None
        upper = Selector(bot + keep - 1, Side.UPPER, bits, gather_cap) if bot + keep < n else None
        if lower is None and upper is None:
            return Sparsifier()
        return Select(lower, upper)
    stream = kit.stream(ctx.seed & 0xFFFFFFFF, ctx.name, position)
    if kind == Kind.RANDOM:
        return RandomDrop(stream, kit.threshold(d))
    return Della(stream, d, eps, Rows.of(ctx.shape))


# --------------------------------------------------------------------------- the pipeline


class TaskVector(TorchMerge):
    """METHODS.md §2 for one tensor: δ_i = x_i - b, sparsified (optionally L1-rescaled),
    weighted, combined with or without the sign election, normalized, scaled by λ, added
    to b."""

    def __init__(self, family: Family, ctx: TensorCtx) -> None:
        if not ctx.has_base:
            raise ctx.bad_param("base_model", "this method needs a base model")
        m = len(ctx.model_params)
        # Breadcrumbs cuts twice per model, the others at most once; half the budget may
        # hold selection candidates (16 bytes each), as in the Rust engine.
        selectors = (2 if family.sparsify == Kind.OUTLIERS else 1) * max(m, 1)
        gather_cap = max(ctx.ram_budget // 2 // 16 // selectors, 4096)
        self.family = family
        self.weights: list[float] = []
        self.sparsifiers: list[Sparsifier] = []
        for i in range(m):
            self.weights.append(f32(ctx.model_param(i, "weight")))
            if family.sparsify == Kind.NONE:
                self.sparsifiers.append(Sparsifier())
                continue
            d = f32(ctx.model_param(i, "density"))
            if d < 0.0 or math.isnan(d):
                raise _model_error(ctx, i, "density", f"must be at least 0, got {d}")
            gamma = f32(_opt(ctx.model_param_opt(i, "gamma")))
            if gamma < 0.0 or math.isnan(gamma):
                raise _model_error(ctx, i, "gamma", f"must be at least 0, got {gamma}")
            eps = f32(_opt(ctx.model_param_opt(i, "epsilon")))
            if family.sparsify == Kind.DELLA and d < 1.0 and not (d - eps > 0.0 and d + eps < 1.0):
                raise _model_error(
                    ctx,
                    i,
                    "epsilon",
                    "della needs 0 < density - epsilon and density + epsilon < 1, "
                    f"got density {d}, epsilon {eps}",
                )
            self.sparsifiers.append(
                make_sparsifier(family.sparsify, d, gamma, eps, ctx, ctx.positions[i], gather_cap)
            )
        total = ctx.scalar(0.0)
        for w in self.weights:
            total = total + ctx.scalar(w)
        tiny = ctx.scalar(1e-8)
        small = bool(total < tiny) and bool(-total < tiny)
        # Σ w_i without consensus (f32, config order), 1 where |Σ w_i| < 1e-8. Divisors
        # stay tensors on the device: CUDA divides by a Python number as a multiplication by
        # its reciprocal, which is not the Rust engine's division.
        self.divisor = ctx.scalar(1.0) if small else total
        self.lam = f32(ctx.global_("lambda"))
        self.normalize = ctx.flag("normalize")
        self.rescale = ctx.flag("rescale")
        self.scales = [1.0] * m
        self.ctx = ctx
        self.passes_done = 0
        self.selected_l1 = False
        self.l1_all = [0.0] * m
        self._slots = torch.arange(m, device=ctx.device)[:, None]
        """Per model, the slot of its sums (one add for every model's block sums)."""
        self._all = kit.ExactSums(m, ctx.device)
        self._kept = kit.ExactSums(m, ctx.device)
        # One selection pass when a sample is expected to narrow every cut to a band that
        # fits in memory, else two.
        pending = [sp for sp in self.sparsifiers if sp.pending]
        self._selection_passes = 1 if all(sp.wants_sample(ctx.numel) for sp in pending) else 2

    def _rescaling(self) -> bool:
        return self.rescale and any(sp.drops for sp in self.sparsifiers)

    def _selecting(self) -> bool:
        return any(sp.pending for sp in self.sparsifiers)

    def _needs_selected_l1(self) -> bool:
        """Selections resolved but the L1 of what they keep still unknown."""
        return self._rescaling() and not self.selected_l1 and any(sp.is_selection for sp in self.sparsifiers)

    def planned_passes(self) -> int:
        if self._selecting():
            return self._selection_passes + (1 if self._needs_selected_l1() else 0)
        return 1 if self._rescaling() else 0

    def wants_pass(self) -> bool:
        return (self.passes_done == 0 and self._rescaling()) or self._selecting() or self._needs_selected_l1()

    def sample_ranges(self) -> list[tuple[int, int]]:
        n = self.ctx.numel
        wanted = self.passes_done == 0 and any(sp.wants_sample(n) for sp in self.sparsifiers)
        return sample_ranges(n) if wanted else []

    def sample_chunk(self, x: Chunk) -> None:
        assert x.base is not None
        x.models.sub_(x.base)
        for delta, sp in zip(x.models, self.sparsifiers, strict=True):
            sp.sample(delta)

    def end_sample(self) -> None:
        for sp in self.sparsifiers:
            sp.plan_bands(self.ctx.numel)

    def stat_chunk(self, x: Chunk) -> None:
        assert x.base is not None
        x.models.sub_(x.base)
        first = self.passes_done == 0
        rescaling = self._rescaling()
        selected_l1 = not self._selecting() and self._needs_selected_l1()
        hashes = None
        if rescaling and first and any(sp.random for sp in self.sparsifiers):
            hashes = kit.index_hashes(x.indices())
        if rescaling and first:
            self._all.add(torch.stack([_l1_blocks(delta, None) for delta in x.models]), self._slots)
        # Every model's magnitude keys at once (one kernel instead of one per model).
        keys = mag_keys(x.models) if any(sp.pending for sp in self.sparsifiers) else None
        for i, (delta, sp) in enumerate(zip(x.models, self.sparsifiers, strict=True)):
            sp.collect(x.start, delta, None if keys is None else keys[i])
            if rescaling and ((first and sp.random) or (selected_l1 and sp.is_selection)):
                self._kept.add(_l1_blocks(delta, sp.mask(x.start, delta, hashes)), i)

    def end_pass(self) -> None:
        selected_l1 = not self._selecting() and self._needs_selected_l1()
        first = self.passes_done == 0
        if first and self._rescaling():
            # ‖δ‖₁ of every model comes from the first pass.
            self.l1_all = self._all.values()
        rescaled = [
            i
            for i, sp in enumerate(self.sparsifiers)
            if self.rescale and ((first and sp.random) or (selected_l1 and sp.is_selection))
        ]
        for sp in self.sparsifiers:
            sp.advance()
        if rescaled:
            kept = self._kept.values()
            for i in rescaled:
                self._scale_from(i, kept[i])
        if selected_l1:
            self.selected_l1 = True
        self.passes_done += 1
        self._kept = kit.ExactSums(len(self.sparsifiers), self.ctx.device)

    def _scale_from(self, i: int, kept: float) -> None:
        """The L1 rescale factor ‖δ‖₁ / ‖δ ⊙ mask‖₁, rounded to f32 (1 if either is tiny)."""
        full = self.l1_all[i]
        self.scales[i] = 1.0 if full < 1e-7 or kept < 1e-7 else f32(full / kept)

    def merge_chunk(self, x: Chunk) -> torch.Tensor:
        base = x.base
        assert base is not None
        ctx = self.ctx
        models = x.models
        models.sub_(base)
        hashes = kit.index_hashes(x.indices()) if any(sp.random for sp in self.sparsifiers) else None
        for i, (sp, w, s) in enumerate(zip(self.sparsifiers, self.weights, self.scales, strict=True)):
            # W_i = w_i · (δ_i ⊙ mask_i · s_i): kept values rescaled, then weighted.
            if not sp.drops:
                models[i].mul_(w)
            else:
                keep = sp.mask(x.start, models[i], hashes)
                models[i] = torch.where(keep, (models[i] * s) * w, 0.0)
        # S = Σ W_i, in config order.
        out = torch.zeros_like(base)
        for m in models:
            out += m
        if not self.family.consensus:
            mixed = out / self.divisor if self.normalize else out
            return base + mixed * self.lam
        # The sign election: a model agrees where sign(W_i) is the sign of S (S ≥ 0 counts
        # as +); an exact zero never agrees. Disagreeing values are zeroed.
        zero = ctx.scalar(0.0)
        agreeing = torch.where(torch.where(out >= 0, models > 0, models < 0), models, zero)
        out = torch.zeros_like(base)
        for m in agreeing:
            out += m
        if not self.normalize:
            return base + out * self.lam
        div = torch.where(agreeing[0] != 0, ctx.scalar(self.weights[0]), zero)
        for m, w in zip(agreeing[1:], self.weights[1:], strict=True):
            div += torch.where(m != 0, ctx.scalar(w), zero)
        div = torch.where(div == 0, ctx.scalar(1.0), div)
        return base + (out / div) * self.lam


def _opt(v: float | None) -> float:
    return 0.0 if v is None else v


def _model_error(ctx: TensorCtx, i: int, name: str, message: str) -> ConfigError:
    return ctx.bad_param(name, f"model {i}: {message}")


def _builder(family: Family) -> Callable[[TensorCtx], TorchMerge]:
    def build(ctx: TensorCtx) -> TorchMerge:
        return TaskVector(family, ctx)

    return build


METHODS = {name: _builder(family) for name, family in FAMILIES.items()}
