"""The Rust engine's whole-tensor sums written out literally (``block_sum`` of
engine/reduce.rs), and exact sums of floats, to check the torch engine's against.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
from mergex.torch_engine import kit


def rust_block_sums(values: np.ndarray) -> list[float]:
    """engine/reduce.rs ``block_sum`` literally: per block of 256 from the first value,
    element ``t`` into lane ``t % 8`` in order, the lanes folded in the fixed tree."""
    sums = []
    for s in range(0, values.size, kit.BLOCK):
        x = [0.0] * 8
        for t, v in enumerate(values[s : s + kit.BLOCK].tolist()):
            x[t % 8] += v
        sums.append(((x[0] + x[1]) + (x[2] + x[3])) + ((x[4] + x[5]) + (x[6] + x[7])))
    return sums


def exact(values) -> float:
    return float(sum((Fraction(v) for v in values), Fraction(0)))
