"""The task-vector family's shared pieces (METHODS.md §2, §3): its methods, the model
families the comparisons run on, and ``wd`` for per-model parameters.

- ``planted_family``: base and experts on a grid of 2^-6 (exact in bf16), every delta one
  of ±1, ±2, ±3 · 2^-6.
- ``random_family``: a random bf16 base and experts stored as bf16, f16 and f32 with small
  random deltas (never exactly 0).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from support import models
from support import reference as ref

LAYERS = 3  # p = 0, 0.5, 1 for layers 0, 1, 2 (dyadic, so gradients are exact)
SHAPES = models.llama_shapes(layers=LAYERS)
TASK_METHODS = [
    "ties",
    "dare_ties",
    "dare_linear",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
]
RANDOM_METHODS = ["dare_ties", "dare_linear", "della", "della_linear"]
GRID = 2.0**-6


def planted_family(root: Path, experts: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    base_t = {n: (rng.integers(-64, 65, s) * GRID).astype(np.float32) for n, s in SHAPES.items()}
    base = models.write_model(root / "base", base_t, "bf16", layers=LAYERS)
    xs = []
    for i in range(experts):
        t = {
            n: (v + rng.choice(np.array([-3, -2, -1, 1, 2, 3]), v.shape) * GRID).astype(np.float32)
            for n, v in base_t.items()
        }
        xs.append(models.write_model(root / f"expert_{i}", t, "bf16", layers=LAYERS))
    for x in xs:
        for n in base.tensors:
            d = x.tensors[n] - base.tensors[n]
            assert set(np.unique(np.abs(d) / GRID)) == {1.0, 2.0, 3.0}, n
    return base, xs


def random_family(root: Path, seed: int = 10, shapes: dict | None = None, layers: int = LAYERS):
    """A bf16 base and bf16, f16 and f32 experts near it with no zero deltas (``shapes``:
    this module's by default; the torch tests pass their own)."""
    base = models.write_model(
        root / "base", models.random_tensors(shapes or SHAPES, "bf16", seed), "bf16", layers=layers
    )
    rng = np.random.default_rng(seed + 1)
    xs = []
    for i, dtype in enumerate(("bf16", "f16", "f32")):
        t = {}
        for n, b in base.tensors.items():
            x = ref.round_to(
                b + np.float32(0.01) * rng.standard_normal(b.shape, dtype=np.float32), models.SHORT[dtype]
            )
            # Where rounding gave the base value back, move it clearly away: no zero deltas.
            away = b * np.float32(1.125) + np.copysign(np.float32(0.01), b)
            x = np.where(x == b, ref.round_to(away, models.SHORT[dtype]), x)
            t[n] = x
        xs.append(models.write_model(root / f"expert_{i}", t, dtype, layers=layers))
    for x in xs:
        for n in base.tensors:
            assert np.all(x.tensors[n] != base.tensors[n]), n
    return base, xs


def wd(weight, density=None, **more):
    p = {"weight": weight, **more}
    if density is not None:
        p["density"] = density
    return p
