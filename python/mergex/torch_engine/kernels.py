"""The torch engine's chunk kernels: the work that ``TensorControl.kernel`` describes
(``rust/mergex-core/src/methods/kernel.rs``), in torch, with the Rust engine's f32/f64
operations in its order (never a fused multiply-add), f64 sums over its 256-element
blocks and 8 lanes added exactly, and its random draws. The control of every tensor —
passes, selections and their cuts, solves — stays in the Rust engine; statistics go back
to it through :class:`Partials`, so both engines take the same decisions and write the
same bits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from . import kit

Kernel = dict[str, Any]
BINS = 1 << 16
_SIGN_I64 = -(1 << 63)  # the top bit of a 64-bit key, as an int64 value
# Elements of a chunk whose pairwise f64 products are formed at once.
_SLICE = 1 << 16


@dataclass
class Chunk:
    """The same element range of every input, decoded to the working precision."""

    index: int
    """Ordinal of the chunk in its pass (cuts count ties per chunk)."""
    start: int
    base: torch.Tensor | None
    models: torch.Tensor
    """The other inputs, one row each; kernels may overwrite them."""

    @property
    def n(self) -> int:
        return int(self.models.shape[1])

    def deltas(self) -> torch.Tensor:
        """The task vectors ``x_i - b``, in place (the models when there is no base)."""
        if self.base is not None:
            self.models.sub_(self.base)
        return self.models

    def hashes(self) -> torch.Tensor:
        """The index hashes of the §3 random draws of this chunk's elements."""
        j = torch.arange(self.start, self.start + self.n, dtype=torch.int64, device=self.models.device)
        return kit.index_hashes(j)


@dataclass
class Partials:
    """One pass's statistics, per slot of the Rust engine's ``Stats``."""

    device: torch.device
    exact: dict[int, kit.ExactSums] = field(default_factory=dict)
    """Exact sums, per group of slots (``first`` slot → sums of ``len`` slots)."""
    ints: dict[int, int] = field(default_factory=dict)
    hists: dict[int, torch.Tensor] = field(default_factory=dict)
    items: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    packed: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    counts: dict[int, int] = field(default_factory=dict)
    gathered: dict[int, int] = field(default_factory=dict)
    overflow: set[int] = field(default_factory=set)

    def add(self, first: int, size: int, values: torch.Tensor, groups: torch.Tensor | int) -> None:
        """Add ``values`` exactly into slots ``first + groups`` (of ``size`` slots)."""
        sums = self.exact.get(first)
        if sums is None:
            sums = self.exact[first] = kit.ExactSums(size, self.device)
        sums.add(values, groups)

    def export(self) -> dict[str, Any]:
        """The statistics as ``TensorControl.end_pass`` takes them."""
        sums = {slot: float(v) for slot, v in self.ints.items()}
        for first, group in self.exact.items():
            for i, v in enumerate(group.values()):
                sums[first + i] = v

        def words(t: torch.Tensor) -> np.ndarray:
            return np.ascontiguousarray(t.to(torch.int64).cpu().numpy()).view(np.uint64)

        def cat(parts: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)

        items = {}
        for slot, pairs in self.items.items():
            items[slot] = (words(cat([k for k, _ in pairs])), words(cat([i for _, i in pairs])))
        return {
            "sums": sums,
            "hists": {slot: words(h) for slot, h in self.hists.items()},
            "items": items,
            "packed": {slot: words(cat(p)) for slot, p in self.packed.items()},
            "counts": dict(self.counts),
            "overflow": sorted(self.overflow),
        }


# --------------------------------------------------------------------------- keys and masks


def mag_keys(values: torch.Tensor) -> torch.Tensor:
    """Order-preserving int64 keys of ``|values|`` (``Real::mag_key``)."""
    if values.dtype == torch.float64:
        return values.view(torch.int64) & 0x7FFF_FFFF_FFFF_FFFF
    return values.contiguous().view(torch.int32).to(torch.int64) & 0x7FFF_FFFF


def order_keys(values: torch.Tensor) -> torch.Tensor:
    """Keys that order f64 values numerically (arcee_fusion's ``order_key``), as unsigned
    64-bit numbers held in int64."""
    bits = values.view(torch.int64)
    return torch.where(bits < 0, ~bits, bits | _SIGN_I64)


def _signed(key: int) -> int:
    return key - (1 << 64) if key >= 1 << 63 else key


def _top(keys: torch.Tensor, shift: int) -> torch.Tensor:
    """The bits of ``keys`` from ``shift`` up, as an unsigned number (``shift`` ≥ 16)."""
    return (keys >> shift) & ((1 << (64 - shift)) - 1)


def _passes(cut: Kernel, keys: torch.Tensor, chunk: int, above: bool) -> torch.Tensor:
    """Keys beyond the cut (above it, or below it with ``above=False``), and the ties at it
    whose ordinal is kept."""
    key = _signed(cut["key"])
    eq = keys == key
    beyond = keys > key if above else keys < key
    lo, hi = cut["keep"]
    if not cut["ties_before"]:
        return beyond | eq if hi > lo else beyond
    ordinal = torch.cumsum(eq, 0, dtype=torch.int64) - 1 + int(cut["ties_before"][chunk])
    kept: torch.Tensor = beyond | (eq & (ordinal >= lo) & (ordinal < hi))
    return kept


def mask(m: Kernel, x: Chunk, values: torch.Tensor, hashes: torch.Tensor | None) -> torch.Tensor | None:
    """The keep mask of ``values`` (one chunk); ``None`` keeps all."""
    kind = m["mask"]
    if kind == "all":
        return None
    if kind == "nothing":
        return torch.zeros(values.shape, dtype=torch.bool, device=values.device)
    if kind == "cuts":
        keys = mag_keys(values)
        keep = torch.ones(values.shape, dtype=torch.bool, device=values.device)
        for cut, above in ((m["lower"], True), (m["upper"], False)):
            if cut is not None:
                keep &= _passes(cut, keys, x.index, above)
        return keep
    assert hashes is not None
    draws = kit.draws(m["stream"], hashes)
    if kind == "random":
        return None if m["threshold"] > 0xFFFF_FFFF else draws < m["threshold"]
    # della: rank |δ| within each row (ascending, the lower index first among ties).
    length, inner = m["len"], m["inner"]
    if values.numel() == 0:
        return torch.zeros(0, dtype=torch.bool, device=values.device)
    keys = mag_keys(values).view(-1, length, inner)
    order = torch.sort(keys, dim=1, stable=True).indices
    ranks = torch.arange(length, device=values.device).view(1, length, 1).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, ranks)
    table = torch.tensor(m["thresholds"], dtype=torch.int64, device=values.device)
    return draws < table[rank.reshape(-1)]


def _kept(values: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    return values if keep is None else torch.where(keep, values, 0.0)


# --------------------------------------------------------------------------- sums


def _pairs(k: int) -> list[tuple[int, int]]:
    """The pairs i ≤ j of a Gram matrix, in gram.rs's slot order."""
    return [(i, j) for i in range(k) for j in range(i, k)]


def _pair_products(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``v_i · v_j`` elementwise in f64 for every pair, stacked in slot order: [P, ...]."""
    wide = [v.to(torch.float64) for v in vectors]
    pairs = _pairs(len(wide))
    out = torch.empty((len(pairs), *wide[0].shape), dtype=torch.float64, device=wide[0].device)
    for p, (i, j) in enumerate(pairs):
        torch.mul(wide[i], wide[j], out=out[p])
    return out


def row_grams(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per row of ``rows`` ([R, m] each), the Gram matrix of the vectors (gram.rs ``local``):
    [R, k, k] f64."""
    count, m = rows[0].shape
    k = len(rows)
    step = max(1, _SLICE // max(m, 1))
    parts = []
    for at in range(0, count, step):
        prods = _pair_products([r[at : at + step] for r in rows])
        parts.append(kit.lane_fold(prods.view(-1, m)).view(prods.shape[0], -1))
    sums = torch.cat(parts, dim=1) if parts else torch.zeros(len(_pairs(k)), 0, dtype=torch.float64)
    g = torch.empty(count, k, k, dtype=torch.float64, device=rows[0].device)
    for s, (i, j) in enumerate(_pairs(k)):
        g[:, i, j] = g[:, j, i] = sums[s]
    return g


# --------------------------------------------------------------------------- vectors


def variance(x: Chunk) -> torch.Tensor:
    """Task vectors in place; per element the population variance over the models (f32 sums
    in config order, as ``sce.rs::variance``)."""
    models = x.deltas()
    k = torch.tensor(float(models.shape[0]), dtype=models.dtype, device=models.device)
    total = torch.zeros_like(models[0])
    for m in models:
        total = total + m
    mean = total / k
    var = torch.zeros_like(total)
    for m in models:
        d = m - mean
        var = var + d * d
    return var / k


def _libm(fn: Callable[[float], float], values: torch.Tensor) -> torch.Tensor:
    """``fn`` (``math.exp`` or ``math.log``) of every value, on the CPU in f64: Python's math
    calls the C library's, as Rust's ``f64::exp``/``ln`` do (torch's differ in the last bit
    for about 1% of inputs, which would move importances across the threshold)."""
    flat = values.reshape(-1).tolist()
    out = np.fromiter(map(fn, flat), dtype=np.float64, count=len(flat))
    return torch.from_numpy(out).view(values.shape)


def _seq_sum(rows: torch.Tensor) -> torch.Tensor:
    """Per row, the left-to-right f64 sum (Rust's ``Iterator::sum``; the CPU cumsum adds in
    that order)."""
    return torch.cumsum(rows, 1)[:, -1]


def _softmax(rows: torch.Tensor) -> torch.Tensor:
    """``softmax(v) + 1e-8`` per row in f64 (``arcee_fusion.rs::kl_divergence``)."""
    top = torch.where(rows.isnan(), -math.inf, rows).amax(1, keepdim=True)  # fold(-inf, max)
    e = _libm(math.exp, rows - top)
    return e / _seq_sum(e)[:, None] + 1e-8


class Importance:
    """arcee_fusion's importance ``|x - b| · KL(row)``, each row's KL computed once (on the
    CPU, in f64) and kept for the later passes."""

    def __init__(self, row: int, numel: int, device: torch.device) -> None:
        self.row = row
        self.kl = torch.empty(-(-numel // row), dtype=torch.float64, device=device)
        self.known: set[int] = set()

    def __call__(self, x: Chunk) -> torch.Tensor:
        assert x.base is not None
        b = x.base.to(torch.float64).view(-1, self.row)
        m = x.models[0].to(torch.float64).view(-1, self.row)
        rows = slice(x.start // self.row, x.start // self.row + b.shape[0])
        if x.start not in self.known:
            p, q = _softmax(m.cpu()), _softmax(b.cpu())
            self.kl[rows] = _seq_sum(p * _libm(math.log, p / q)).to(self.kl.device)
            self.known.add(x.start)
        return ((m - b).abs() * self.kl[rows, None]).view(-1)


# --------------------------------------------------------------------------- statistics


class Stats:
    """The statistics kernel of one sample or pass, chunk by chunk into :class:`Partials`."""

    def __init__(self, kernel: Kernel, partials: Partials, importance: Importance | None) -> None:
        self.vectors = kernel["vectors"]
        self.ops: list[Kernel] = kernel["ops"]
        self.out = partials
        self.importance = importance

    def chunk(self, x: Chunk) -> None:
        vec = self.vectors
        var = imp = None
        if vec == "deltas":
            x.deltas()
        elif vec == "variance":
            var = variance(x)
        elif isinstance(vec, dict):  # importance
            assert self.importance is not None
            imp = self.importance(x)
        hashes = (
            x.hashes()
            if any(op.get("mask") and op["mask"]["mask"] in ("random", "della") for op in self.ops)
            else None
        )
        for op in self.ops:
            kind = op["op"]
            if kind in ("collect", "sample"):
                of = op["keys"]["of"]
                source = x.models[op["keys"]["model"]] if of == "model" else var if of == "variance" else imp
                assert source is not None
                keys = order_keys(source) if of == "importance" else mag_keys(source)
                if kind == "sample":
                    self.out.items.setdefault(op["slot"], []).append(
                        (keys.cpu(), torch.zeros_like(keys).cpu())
                    )
                else:
                    self.collect(op["collect"], x, keys)
            elif kind == "l1":
                v = x.models[op["model"]]
                keep = None if op["mask"] is None else mask(op["mask"], x, v, hashes)
                self.out.add(op["slot"], 1, kit.block_sums(_kept(v.to(torch.float64).abs(), keep)), 0)
            elif kind == "gram":
                vectors = ([x.base] if op["with_base"] and x.base is not None else []) + list(x.models)
                slots = torch.arange(len(_pairs(len(vectors))), device=x.models.device)[:, None]
                for at in range(0, x.n, _SLICE):
                    prods = _pair_products([v[at : at + _SLICE] for v in vectors])
                    self.out.add(0, len(slots), kit.block_sums(prods), slots)
            elif kind == "columns":
                cols = op["cols"]
                p, q = (v.to(torch.float64).view(-1, cols) for v in x.models[:2])
                groups = (
                    3 * torch.arange(cols, device=p.device) + torch.arange(3, device=p.device)[:, None, None]
                )
                self.out.add(0, 3 * cols, torch.stack((p * p, q * q, p * q)), groups)
            elif kind == "squares":
                assert var is not None
                keep = mask(op["mask"], x, var, None)
                v = _kept(x.models[op["model"]], keep).to(torch.float64)
                self.out.add(op["slot"], 1, kit.block_sums(v * v), 0)
            elif kind == "nonzero":
                assert var is not None
                self.out.ints[op["slot"]] = self.out.ints.get(op["slot"], 0) + int((var != 0).sum().item())
            elif kind == "active":
                active, count = _active(x.models, op["eps"])
                alone = count == 1
                for i, a in enumerate(active):
                    unique = int((a & alone).sum().item())
                    shared = int(a.sum().item()) - unique
                    self.out.ints[2 * i] = self.out.ints.get(2 * i, 0) + shared
                    self.out.ints[2 * i + 1] = self.out.ints.get(2 * i + 1, 0) + unique

    def collect(self, c: Kernel, x: Chunk, keys: torch.Tensor) -> None:
        """A selection's statistics of one chunk's keys (``Selector::collect``)."""
        out, slot, mode = self.out, c["slot"], c["mode"]
        if mode == "hist":
            shift = c["shift"]
            k = keys if c["prefix"] is None else keys[_top(keys, shift + 16) == c["prefix"]]
            hist = out.hists.get(slot)
            if hist is None:
                hist = out.hists[slot] = torch.zeros(BINS, dtype=torch.int64, device=keys.device)
            bins = (k >> shift) & 0xFFFF
            hist.index_add_(0, bins, torch.ones_like(bins))
        elif mode == "gather":
            idx = torch.nonzero(_top(keys, c["shift"]) == c["prefix"]).flatten()
            out.items.setdefault(slot, []).append((keys[idx].cpu(), (idx + x.start).cpu()))
        elif mode == "ties":
            n = int((keys == _signed(c["key"])).sum().item())
            start = torch.tensor([x.start], dtype=torch.int64)
            out.items.setdefault(slot, []).append((start, torch.tensor([n], dtype=torch.int64)))
        else:  # band: magnitude keys, below 2^63
            lo, hi = c["lo_key"], min(c["lo_key"] + c["span"], (1 << 63) - 1)
            out.counts[slot] = out.counts.get(slot, 0) + int((keys < lo).sum().item())
            if slot in out.overflow:
                return
            idx = torch.nonzero((keys >= lo) & (keys <= hi)).flatten()
            out.gathered[slot] = out.gathered.get(slot, 0) + idx.numel()
            if out.gathered[slot] > c["cap"]:
                out.overflow.add(slot)
                out.items.pop(slot, None)
                out.packed.pop(slot, None)
            elif c["pack"]:
                out.packed.setdefault(slot, []).append(((keys[idx] << 32) | (idx + x.start)).cpu())
            else:
                out.items.setdefault(slot, []).append((keys[idx].cpu(), (idx + x.start).cpu()))


def _active(models: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per model and element whether it is active (``|δ| > ε``), and per element the number
    of active models (the models hold the task vectors)."""
    e = torch.tensor(eps, dtype=models.dtype, device=models.device)
    active = (models > e) | (-models > e)
    return active, active.sum(0, dtype=torch.int32)


# --------------------------------------------------------------------------- outputs


def _not_below(value: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """Rust's ``if v > floor { v } else { floor }`` (NaN gives the floor)."""
    return torch.where(value > floor, value, floor)


class Output:
    """The output kernel of one tensor; ``solve`` is ``TensorControl.row_solve``."""

    def __init__(self, kernel: Kernel, solve: Callable[[Any, int], list[list[float]]]) -> None:
        self.k = kernel
        self.solve = solve
        self.importance: Importance | None = None

    def __call__(self, x: Chunk) -> torch.Tensor:
        kernel = getattr(self, self.k["kernel"], None)
        if kernel is None:
            raise ConfigError(f"the torch engine has no {self.k['kernel']} kernel; use the Rust engine")
        result: torch.Tensor = kernel(x, _Scalars(x.models.dtype, x.models.device))
        return result

    def weighted_sum(self, x: Chunk, s: _Scalars) -> torch.Tensor:
        k = self.k
        models = x.deltas() if k["task"] is not None else x.models
        out = torch.zeros_like(models[0])
        for w, m in zip(k["weights"], models, strict=True):
            out += m * s(w)
        if k["divisor"] is not None:
            out /= s(k["divisor"])
        if k["task"] is None:
            return out
        assert x.base is not None
        return x.base + out * s(k["task"])

    def scale(self, x: Chunk, s: _Scalars) -> torch.Tensor:
        scale = self.k["scale"]
        return x.models[0].clone() if scale is None else x.models[0] * s(scale)

    def combine(self, x: Chunk, s: _Scalars) -> torch.Tensor:
        out = torch.zeros_like(x.models[0])
        for c, m in zip(self.k["coef"], x.deltas(), strict=True):
            out += m * s(c)
        return out + x.base if self.k["add_base"] and x.base is not None else out

    def fusion(self, x: Chunk, s: _Scalars) -> torch.Tensor:
        assert x.base is not None and self.importance is not None
        b, m = x.base, x.models[0]
        return torch.where(self.importance(x) >= self.k["threshold"], b + (m - b), b)

    def near_swap(self, x: Chunk, s: _Scalars) -> torch.Tensor:
        b, m = x.base, x.models[0]
        assert b is not None
        diff = torch.where(b > m, b - m, m - b)
        w = s(self.k["t"]) / _not_below(diff, s(1e-6, f32=True))
        w = torch.where(w > s(1.0), s(1.0), torch.where(w > s(0.0), w, s(0.0)))  # NaN gives 0
        return w * m + (s(1.0) - w) * b

    def task_vector(self, x: Chunk, s: _Scalars) -> torch.Tensor:
        k, base = self.k, x.base
        assert base is not None
        models = x.deltas()
        random = any(m["mask"] in ("random", "della") for m in k["masks"])
        hashes = x.hashes() if random else None
        for i, (m, w, sc) in enumerate(zip(k["masks"], k["weights"], k["scales"], strict=True)):
            # W_i = w_i · (δ_i ⊙ mask_i · s_i): kept values rescaled, then weighted.
            if m["mask"] == "all":
                models[i].mul_(s(w))
            else:
                keep = mask(m, x, models[i], hashes)
                scaled = (models[i] * s(sc)) * s(w)
                models[i] = scaled if keep is None else torch.where(keep, scaled, 0.0)
        out = torch.zeros_like(base)
        for m in models:
            out += m
        if not k["consensus"]:
            mixed = out / s(k["divisor"]) if k["normalize"] else out
            return base + mixed * s(k["lambda"])
        # The sign election: a model agrees where sign(W_i) is the sign of S (S ≥ 0 counts
        # as +); an exact zero never agrees. Disagreeing values are zeroed.
        agreeing = torch.where(torch.where(out >= 0, models > 0, models < 0), models, s(0.0))
        out = torch.zeros_like(base)
        for m in agreeing:
            out += m
        if not k["normalize"]:
            return base + out * s(k["lambda"])
        div = torch.where(agreeing[0] != 0, s(k["weights"][0]), s(0.0))
        for m, w in zip(agreeing[1:], k["weights"][1:], strict=True):
            div += torch.where(m != 0, s(w), s(0.0))
        div = torch.where(div == 0, s(1.0), div)
        return base + (out / div) * s(k["lambda"])

    def _row_coefficients(self, rows: Sequence[torch.Tensor], s: _Scalars) -> torch.Tensor:
        """Per row, the coefficients the engine solves from the row's Gram matrix: [R, c]."""
        g = row_grams(rows)
        coef = self.solve(g.cpu().contiguous().numpy(), len(rows))
        return torch.tensor(coef, dtype=torch.float64).reshape(g.shape[0], -1).to(s.device, s.dtype)

    def lerp(self, x: Chunk, s: _Scalars) -> torch.Tensor:
        k = self.k
        if k["deltas"]:
            p, q = x.deltas()[:2]
        else:
            assert x.base is not None
            p, q = x.base, x.models[0]
        width = k["columns"] or k["rows"] or p.numel() or 1
        a, b = p.view(-1, width), q.view(-1, width)
        if k["rows"] is not None:
            c = self._row_coefficients([a, b], s)
            c1, c2 = c[:, 0:1], c[:, 1:2]
        else:
            c = torch.tensor(k["coef"], dtype=torch.float64).reshape(-1, 2).to(s.device, s.dtype)
            c1, c2 = c[:, 0], c[:, 1]
        out: torch.Tensor = (c1 * a + c2 * b).view(-1)
        if k["add_base"] and x.base is not None:
            out += x.base
        return out

    def model_stock(self, x: Chunk, s: _Scalars) -> torch.Tensor:
        k, base = self.k, x.base
        assert base is not None
        n = x.models.shape[0]
        if k["rows"] is None:
            t, b, models = s(k["t"]), base, x.models
        else:
            m = k["rows"]
            b, models = base.view(-1, m), x.models.view(n, -1, m)
            t = self._row_coefficients(list(models - b), s)
        # t · (Σ x_i / N) + (1 - t) · b, the sum in config order (model_stock.rs).
        out = torch.zeros_like(b)
        for v in models:
            out += v
        return (t * (out / s(float(n))) + (s(1.0) - t) * b).view(-1)

    def sce(self, x: Chunk, s: _Scalars) -> torch.Tensor:
        k, base = self.k, x.base
        assert base is not None
        var = variance(x)
        keep = mask(k["mask"], x, var, None)
        if keep is not None:
            x.models.masked_fill_(~keep, 0.0)
        total = torch.zeros_like(base)
        for m in x.models:
            total = total + m
        positive = total >= 0
        num, den = torch.zeros_like(total), torch.zeros_like(total)
        for m, c in zip(x.models, k["weights"], strict=True):
            agree = torch.where(positive, m > 0, m < 0)
            num = torch.where(agree, num + s(c) * m, num)
            den = torch.where(agree, den + s(c), den)
        return base + num / _not_below(den, s(1e-6, f32=True))

    def ram(self, x: Chunk, s: _Scalars) -> torch.Tensor:
        k, base = self.k, x.base
        assert base is not None
        active, count = _active(x.deltas(), k["eps"])
        inv = s(1.0) / count.to(x.models.dtype)  # count 0: inf, never used
        alone = count == 1
        out = torch.zeros_like(base)
        for i, (m, a) in enumerate(zip(x.models, active, strict=True)):
            lam = s(k["lambdas"][i]) if k["lambdas"] is not None else s(1.0)
            out = torch.where(a, out + torch.where(alone, lam * m, m * inv), out)
        return base + out


class _Scalars:
    """0-d tensors of the working precision on the device: CUDA divides by a Python number
    as a multiplication by its reciprocal, which is not the Rust engine's division."""

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype, self.device = dtype, device

    def __call__(self, value: float, f32: bool = False) -> torch.Tensor:
        v = float(np.float32(value)) if f32 else value
        return torch.tensor(v, dtype=self.dtype, device=self.device)
