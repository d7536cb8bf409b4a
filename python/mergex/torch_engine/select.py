"""Exact rank selection over tensors larger than memory, in torch: the key at an
ascending rank of a tensor's order-preserving keys (e.g. magnitudes), found by radix
passes over the chunks (16 bits per pass), finished in memory once the candidates fit,
with ties at the cut broken by flat index. The same states, cuts and tie rules as the
Rust engine's ``methods/select.rs``.

Use: while ``sel.pending``, call ``sel.collect(start, keys)`` for every chunk of a pass
and ``sel.advance()`` after it; then ``sel.cut`` decides with :func:`passes`.

Optionally, before the first pass, when ``sel.wants_sample(n)``: ``sel.sample(keys)`` for
every range of :func:`sample_ranges` and ``sel.plan_band(n)``. The first pass then counts
the elements under a band of level-0 bins around the expected cut and gathers those in
it, and finishes the selection when the rank falls among them; else a histogram pass
follows (the Rust engine's rules, so both engines take the same passes). The sample never
changes the cut.

Keys are int64 tensors holding unsigned keys of ``key_bits`` bits (64-bit keys with the
top bit set are negative int64 values); ``Cut.key`` is the unsigned Python int.
:func:`passes` compares keys as signed numbers, so it takes keys below 2^63 (magnitudes).
"""

from __future__ import annotations

import bisect
import enum
import math
from dataclasses import dataclass, field

import torch

LEVEL_BITS = 16
BINS = 1 << LEVEL_BITS
_TOP = 1 << 63
_TOP_I64 = -_TOP  # the top bit as an int64 value


_SAMPLE_RANGES = 64
_SAMPLE_LEN = 1024


def sample_ranges(n: int) -> list[tuple[int, int]]:
    """Element ranges ``(start, len)`` of the sample of a tensor of ``n`` elements: the
    whole tensor when it is small, else 64 ranges of 1,024 starting at ``j·n // 64``."""
    if n <= _SAMPLE_RANGES * _SAMPLE_LEN:
        return [(0, n)] if n > 0 else []
    return [(j * n // _SAMPLE_RANGES, _SAMPLE_LEN) for j in range(_SAMPLE_RANGES)]


def _band_halfwidth(s: int, q: float) -> float:
    """Sample ranks either side of the expected cut that the band spans (as in Rust)."""
    return 3.5 * math.sqrt(s * q * (1.0 - q)) + s / 1024.0 + 2.0


def _signed(key: int) -> int:
    """An unsigned 64-bit key as the int64 value with the same bits."""
    return key - (1 << 64) if key >= 1 << 63 else key


class Side(enum.Enum):
    """Which ties at the cut value are kept, as an interval of tie ordinals (the i-th
    element in flat-index order whose key equals the cut has ordinal i)."""

    LOWER = "lower"
    """Keep elements at or above ascending rank r (breadcrumbs' lower cut)."""
    UPPER = "upper"
    """Keep elements at or below ascending rank r (breadcrumbs' upper cut)."""
    TOPK = "topk"
    """Keep the elements above ascending rank r, lowest indices first among ties."""
    VALUE = "value"
    """Only the value at the rank matters (quantiles)."""


@dataclass
class Cut:
    key: int
    keep: tuple[int, int]
    """Ordinals of the ties kept: [lo, hi)."""
    eq: int
    """Elements whose key equals ``key``."""
    sorted_ties: torch.Tensor | None = None
    """Flat indices of every tie (int64, ascending, on the host), when gathered."""
    prefix: list[tuple[int, int]] = field(default_factory=list)
    """(chunk start, ties before it), when counted per chunk."""

    @property
    def all_or_none(self) -> bool:
        return self.sorted_ties is None and not self.prefix

    def ties_before(self, start: int) -> int:
        """Ties at flat indices below ``start`` (a chunk start)."""
        if self.sorted_ties is not None:
            at = torch.tensor([start], dtype=torch.int64)
            return int(torch.searchsorted(self.sorted_ties, at).item())
        i = bisect.bisect_right(self.prefix, (start, 1 << 64)) - 1
        if i >= 0 and self.prefix[i][0] == start:
            return self.prefix[i][1]
        return 0


def passes(cut: Cut, keys: torch.Tensor, start: int, above: bool) -> torch.Tensor:
    """Keep decisions of one chunk's keys (starting at flat index ``start``): keys
    beyond the cut (above it, or below it with ``above=False``) and the ties whose ordinal
    is in ``cut.keep``."""
    eq = keys == cut.key
    beyond = keys > cut.key if above else keys < cut.key
    lo, hi = cut.keep
    if lo == 0 and hi == cut.eq:
        return beyond | eq
    if hi == 0 or lo >= hi:
        return beyond
    ordinal = torch.cumsum(eq, 0, dtype=torch.int64) - 1 + cut.ties_before(start)
    return beyond | (eq & (ordinal >= lo) & (ordinal < hi))


class Selector:
    """Finds the key at ascending rank ``rank`` (0-based) of ``key_bits``-wide keys."""

    def __init__(self, rank: int, side: Side, key_bits: int, gather_cap: int) -> None:
        self.rank = rank
        self.side = side
        self.key_bits = key_bits
        self.gather_cap = gather_cap
        self.state = "radix"
        self.level = 0
        self.prefix = 0
        self.below = 0
        self.cut: Cut | None = None
        self._hist: torch.Tensor | None = None
        self._items: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._counts: list[tuple[int, int]] = []
        self.band: tuple[int, int] | None = None
        """Level-0 bins (inclusive) that the first pass also gathers."""
        self._sample: list[torch.Tensor] = []
        self._gathered = 0
        self._overflow = False
        self._under: torch.Tensor | None = None
        """Elements under the band so far (on the device)."""

    def wants_sample(self, n: int) -> bool:
        """Whether a sample can save passes: no pass has run, and the band a sample of a
        tensor of ``n`` elements would give is expected to fit in memory."""
        first = self.state == "radix" and self.level == 0 and self.band is None
        if not first or self.key_bits <= LEVEL_BITS:
            return False
        s = max(sum(length for _, length in sample_ranges(n)), 1)
        q = self.rank / max(n, 1)
        share = (2.0 * _band_halfwidth(s, q) + 1.0) / s
        return share * float(n) <= float(self.gather_cap)

    def sample(self, keys: torch.Tensor) -> None:
        """Collect the keys of one sample range."""
        self._sample.append(keys.cpu())

    def plan_band(self, n: int) -> None:
        """Set the first pass's band from the sample of a tensor of ``n`` elements."""
        keys = torch.cat(self._sample) if self._sample else torch.zeros(0, dtype=torch.int64)
        self._sample = []
        s = keys.numel()
        if s == 0 or n == 0:
            return
        q = self.rank / n
        at, half = q * s, _band_halfwidth(s, q)
        lo, hi = math.floor(at - half), math.ceil(at + half)
        shift = self._shift(0)

        keys = torch.sort(keys ^ _TOP_I64).values ^ _TOP_I64  # unsigned order
        hi_bin = 0xFFFF if hi >= s - 1 else int(self._top(keys[hi : hi + 1], shift).item())
        lo_bin = 0 if lo <= 0 else int(self._top(keys[lo : lo + 1], shift).item())
        bins = self._top(keys, shift)
        inside = int(((bins >= lo_bin) & (bins <= hi_bin)).sum().item())
        if inside * n <= self.gather_cap * s:
            self.band = (lo_bin, hi_bin)

    @property
    def pending(self) -> bool:
        return self.state != "done"

    def _shift(self, level: int) -> int:
        return self.key_bits - LEVEL_BITS * (level + 1)

    def _top(self, keys: torch.Tensor, shift: int) -> torch.Tensor:
        """The key bits above ``shift``, as an unsigned number: int64 shifts are
        arithmetic, so 64-bit keys with the top bit set are masked back to their width."""
        return (keys >> shift) & ((1 << (self.key_bits - shift)) - 1)

    def collect(self, start: int, keys: torch.Tensor) -> None:
        """This pass's statistics from the int64 keys of one chunk starting at ``start``."""
        if self.state == "radix" and self.level == 0 and self.band is not None:
            # The band's pass: count the elements under the band, gather those in it.
            bins = self._top(keys, self._shift(0))
            under = (bins < self.band[0]).sum()
            self._under = under if self._under is None else self._under + under
            if not self._overflow:
                idx = torch.nonzero((bins >= self.band[0]) & (bins <= self.band[1])).flatten()
                self._gathered += idx.numel()
                if self._gathered > self.gather_cap:
                    # Outgrew the cap: the band is given up, as the Rust engine does.
                    self._overflow, self._items = True, []
                else:
                    self._items.append((keys[idx].cpu(), (idx + start).cpu()))
        elif self.state == "radix":
            shift = self._shift(self.level)
            k = keys if self.level == 0 else keys[self._top(keys, shift + LEVEL_BITS) == self.prefix]
            if self._hist is None:
                self._hist = torch.zeros(BINS, dtype=torch.int64, device=keys.device)
            bins = (k >> shift) & 0xFFFF
            # Accumulate in place: a fresh 65,536-bin histogram per chunk costs more than
            # the chunk's own work at small budgets.
            self._hist.index_add_(0, bins, torch.ones_like(bins))
        elif self.state == "gather":
            shift = self._shift(self.level - 1)
            hit = self._top(keys, shift) == self.prefix
            idx = torch.nonzero(hit).flatten()
            self._items.append((keys[idx].cpu(), (idx + start).cpu()))
        elif self.state == "ties":
            assert self.cut is not None
            self._counts.append((start, int((keys == _signed(self.cut.key)).sum().item())))

    def advance(self) -> None:
        """Take the statistics of the pass just finished."""
        if self.state == "radix" and self.level == 0 and self.band is not None:
            # The cut is in the band when the rank falls among its candidates: they resolve
            # it as a gather pass would. Else a histogram pass follows, as without a band.
            under = int(self._under.item()) if self._under is not None else 0
            gathered = sum(k.numel() for k, _ in self._items)
            self.band, self._under = None, None
            if not self._overflow and under <= self.rank < under + gathered:
                self.below, self.state = under, "gather"
                self.advance()
            self._items, self._overflow = [], False
        elif self.state == "radix":
            b, count, below = self._find_bin()
            self.prefix = (self.prefix << LEVEL_BITS) | b
            self.level += 1
            self.below = below
            if LEVEL_BITS * self.level >= self.key_bits:
                self._resolve(self.prefix, below, count)
            elif count <= self.gather_cap:
                self.state = "gather"
        elif self.state == "gather":
            shifted, idx = _sorted_candidates(self._items)
            self._items = []
            at = self.rank - self.below
            key = int(shifted[at]) + _TOP if at < shifted.numel() else 0
            probe = torch.tensor([key - _TOP], dtype=torch.int64)
            first = int(torch.searchsorted(shifted, probe).item())
            last = int(torch.searchsorted(shifted, probe, right=True).item())
            cut = self._cut_at(key, self.below + first, last - first)
            if not _unneeded(cut):
                cut.sorted_ties = idx[first:last].contiguous()
            self.cut = cut
            self.state = "done"
        elif self.state == "ties":
            assert self.cut is not None
            before = 0
            prefix = []
            for start, n in sorted(self._counts):
                prefix.append((start, before))
                before += n
            self._counts = []
            self.cut.prefix = prefix
            self.state = "done"

    def _find_bin(self) -> tuple[int, int, int]:
        """(bin, its count, elements below it) of the bin holding the rank, searched on the
        histogram's device; (0, 0, below) when the rank is beyond every bin, as in Rust."""
        hist, self._hist = self._hist, None
        if hist is None:
            return 0, 0, self.below
        ends = torch.cumsum(hist, 0) + self.below
        b = int(torch.searchsorted(ends, torch.tensor([self.rank], device=ends.device), right=True).item())
        if b >= BINS:
            return 0, 0, self.below
        count, end = (int(v) for v in torch.stack((hist[b], ends[b])).tolist())
        return b, count, end - count

    def _resolve(self, key: int, below: int, eq: int) -> None:
        self.cut = self._cut_at(key, below, eq)
        self.state = "done" if _unneeded(self.cut) else "ties"

    def _cut_at(self, key: int, below: int, eq: int) -> Cut:
        o = self.rank - below
        keep = {
            Side.LOWER: (o, eq),
            Side.UPPER: (0, o + 1),
            Side.TOPK: (0, eq - o),
            Side.VALUE: (0, eq),
        }[self.side]
        # Zero magnitudes contribute nothing whichever are kept: keep none, no ordinals.
        if key == 0 and keep != (0, eq):
            keep = (0, 0)
        return Cut(key=key, keep=keep, eq=eq)


def _sorted_candidates(items: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The gathered keys and flat indices in ascending (key, index) order, the keys shifted
    by -2^63 (their top bit flipped) so that their int64 order is their unsigned order."""
    if not items:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    keys = torch.cat([k for k, _ in items]) ^ _TOP_I64
    idx = torch.cat([i for _, i in items])
    # By index (all distinct), then stably by key: ties stay in index order.
    by_index = torch.argsort(idx)
    shifted, by_key = torch.sort(keys[by_index], stable=True)
    return shifted, idx[by_index][by_key]


def _unneeded(cut: Cut) -> bool:
    lo, hi = cut.keep
    return lo == 0 and (hi == cut.eq or hi == 0)


def mag_keys(values: torch.Tensor) -> torch.Tensor:
    """Order-preserving int64 keys of ``|values|``: the IEEE bits without the sign (f32 or
    f64), as in the Rust engine's ``Real::mag_key``."""
    if values.dtype == torch.float64:
        return values.view(torch.int64) & 0x7FFF_FFFF_FFFF_FFFF
    return values.contiguous().view(torch.int32).to(torch.int64) & 0x7FFF_FFFF


def key_bits(dtype: torch.dtype) -> int:
    return 64 if dtype == torch.float64 else 32


def key_value(key: int, dtype: torch.dtype) -> float:
    """The magnitude a key stands for."""
    if dtype == torch.float64:
        return float(torch.tensor([key], dtype=torch.int64).view(torch.float64).item())
    return float(torch.tensor([key], dtype=torch.int32).view(torch.float32).item())
