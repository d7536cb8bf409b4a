"""Byte sizes as users write them ("512MiB", "4GiB", "5GB") and machine defaults."""

from __future__ import annotations

import os
import re

from .errors import ConfigError

__all__ = ["default_ram_budget", "default_threads", "format_size", "parse_size"]

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")

GIB = 1024**3


def parse_size(value: int | str, what: str = "size") -> int:
    """Parse a byte size: an int, or a number with a unit such as ``512MiB`` or ``5GB``.

    Raises:
        ConfigError: The text is not a size.
    """
    if isinstance(value, bool):
        raise ConfigError(f"{what}: expected a size like 512MiB, got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ConfigError(f"{what}: must be positive, got {value}")
        return value
    m = _SIZE.match(str(value))
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise ConfigError(f"{what}: expected a size like 512MiB, 4GiB or 5GB, got {value!r}")
    n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise ConfigError(f"{what}: must be positive, got {value!r}")
    return n


def format_size(n: float) -> str:
    """Format bytes with binary units, e.g. ``1.50 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def default_ram_budget() -> int:
    """A quarter of the available memory, at most 4 GiB."""
    avail = _available_memory()
    return min(4 * GIB, avail // 4) if avail else GIB


def default_threads() -> int:
    """The CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)
