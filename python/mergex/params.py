"""Resolving parameter values per tensor: scalars, gradients and filtered lists (CONFIG.md)."""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Sequence
from typing import Any

__all__ = ["NOT_FOUND", "evaluate", "gradient", "layer_index", "lookup", "to_f32"]

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)(?=\.|$)")


class _NotFound:
    def __repr__(self) -> str:
        return "NOT_FOUND"


NOT_FOUND: Any = _NotFound()
"""Returned when a filtered list has no matching entry: fall through to the next level."""


def layer_index(name: str) -> int | None:
    """The layer number in a tensor name (after ``layers.``, ``h.`` or ``blocks.``)."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def rename_layer(name: str, new_index: int) -> str:
    """``name`` with its layer number replaced by ``new_index``."""
    m = _LAYER.search(name)
    if not m:
        return name
    return name[: m.start(1)] + str(new_index) + name[m.end(1) :]


def gradient(values: Sequence[float], p: float) -> float:
    """Piecewise-linear interpolation of ``values`` over L-1 equal segments at ``p`` in [0, 1]."""
    n = len(values)
    if n == 1:
        return float(values[0])
    x = min(max(p, 0.0), 1.0) * (n - 1)
    i = min(math.floor(x), n - 2)
    frac = x - i
    lo, hi = float(values[i]), float(values[i + 1])
    return lo + (hi - lo) * frac


def matches(pattern: str | None, tensor: str) -> bool:
    """A filter's rule (CONFIG.md): absent or ``*`` matches everything; a glob pattern (with
    ``*``, ``?`` or ``[...]``) the whole name; any other text a substring of it."""
    if pattern is None or pattern == "*":
        return True
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(tensor, pattern)
    return pattern in tensor


def evaluate(value: Any, tensor: str, p: float) -> Any:
    """Evaluate one parameter value for a tensor at layer position ``p``.

    Returns the scalar, or :data:`NOT_FOUND` when a filtered list has no entry whose
    filter :func:`matches` ``tensor``.
    """
    if isinstance(value, list):
        if value and all(isinstance(v, dict) for v in value):
            for entry in value:
                if matches(entry.get("filter"), tensor):
                    return evaluate(entry["value"], tensor, p)
            return NOT_FOUND
        return gradient(value, p)
    return value


def lookup(levels: Sequence[tuple[dict[str, Any], str]], name: str, p: float) -> Any:
    """First hit of ``name`` over ``levels``: (parameters, tensor name to filter on) pairs."""
    for params, tensor in levels:
        if name in params:
            v = evaluate(params[name], tensor, p)
            if v is not NOT_FOUND:
                return v
    return NOT_FOUND


def to_f32(v: float) -> float:
    """Round an f64 value to the nearest f32 (METHODS.md §0), as a Python float."""
    import struct

    try:
        return float(struct.unpack("<f", struct.pack("<f", v))[0])
    except OverflowError:
        return math.copysign(math.inf, v)
