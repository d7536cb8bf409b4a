"""The torch engine's shared arithmetic (``torch_engine/kit.py``): the §3 random draw and the
Rust engine's whole-tensor sums (block sums in eight lanes, added exactly), checked against
METHODS.md's test vectors and against literal element-by-element versions of the Rust code.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from mergex.torch_engine import kit
from support import reference as ref
from support.sums import exact, rust_block_sums

NAME = "model.layers.0.mlp.up_proj.weight"  # the tensor of the stream vectors below

# --------------------------------------------------------------------------- §3 draws


def test_draws_match_the_spec_vectors():
    # The streams of (seed, tensor, position) are the Rust engine's (in the masks it hands
    # the torch kernels): METHODS.md's vectors for this tensor at seed 0 and 42.
    s = 0x4ADD06D6
    j = torch.tensor([0, 1, 2, 3, 2**32 + 5])
    assert kit.draws(s, kit.index_hashes(j)).tolist() == [
        0xB3798433,
        0xD2120608,
        0x92D890EF,
        0x82F98EEF,
        0xB5613FBD,
    ]
    s1, s42 = 0x7AEF8979, 0xCF306DAB  # position 1; seed 42
    r0 = kit.index_hashes(torch.tensor([0]))
    assert kit.draws(s1, r0).item() == 0x79BA6FB8 and kit.draws(s42, r0).item() == 0x4D924E58


def test_mix_wraps_as_u32():
    # The multiplications wrap modulo 2^32 (the products of the largest inputs need 64 bits).
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [np.array([0, 1, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]), rng.integers(0, 2**32, 5000)]
    ).astype(np.uint32)
    got = kit.mix(torch.from_numpy(x.astype(np.int64)))
    assert got.tolist() == ref.mix32(x).astype(np.int64).tolist()


# --------------------------------------------------------------------------- block sums


def test_block_sums_follow_the_rust_lanes():
    # Signed values of widely spread magnitudes, a short last block; per row of a 2-D input;
    # a whole tensor's total the same whether summed at once or chunk by chunk (chunks of
    # whole blocks).
    rng = np.random.default_rng(5)
    n = 256 * 9 + 77
    values = rng.standard_normal(n) * np.exp2(rng.integers(-30, 30, n))
    want = rust_block_sums(values)
    assert kit.block_sums(torch.from_numpy(values)).tolist() == want
    rows = np.stack([values, -values[::-1]])
    got = kit.block_sums(torch.from_numpy(rows.copy()))
    assert got.tolist() == [want, rust_block_sums(rows[1])]
    assert kit.block_sums(torch.zeros(2, 0, dtype=torch.float64)).shape == (2, 0)
    sums = kit.ExactSums(2, torch.device("cpu"))
    sums.add(kit.block_sums(torch.from_numpy(values)), 0)
    for start in range(0, n, 3 * 256):
        sums.add(kit.block_sums(torch.from_numpy(values[start : start + 3 * 256])), 1)
    assert sums.values() == [exact(want)] * 2


def test_lane_fold_of_rows():
    # Any row length (gram.rs ``local``: the eight lanes over a whole row).
    rng = np.random.default_rng(6)
    rows = rng.standard_normal((5, 99)) * np.exp2(rng.integers(-20, 20, (5, 99)))
    got = kit.lane_fold(torch.from_numpy(rows))
    assert got.tolist() == [rust_block_sums(r)[0] for r in rows]
    # A lane starts at +0.0, as in Rust: a row of -0.0 sums to +0.0.
    assert math.copysign(1.0, kit.lane_fold(torch.full((1, 8), -0.0, dtype=torch.float64)).item()) == 1.0


# --------------------------------------------------------------------------- exact sums


def test_exact_sums_are_exact_and_chunk_free():
    rng = np.random.default_rng(3)
    parts = [
        rng.standard_normal(1000) * np.exp2(rng.integers(-60, 60, 1000)),
        np.array([1e300, 1.0, -1e300, 5e-324, 2.0**-1074 * 3, -(2.0**-1022)]),
        rng.standard_normal(500) * 1e-310,  # subnormals
    ]
    values = np.concatenate(parts)
    want = exact(values)
    for cut in (1, 7, 256, values.size):
        sums = kit.ExactSums(2, torch.device("cpu"))
        for s in range(0, values.size, cut):
            piece = torch.from_numpy(values[s : s + cut].copy())
            sums.add(piece, 1)
            sums.add(-piece, 0)
        got = sums.values()
        assert got[1] == want and got[0] == -want
    # 1 + 2^-53 + 2^-100: correct rounding needs the bits below the last one (a sticky bit).
    sums = kit.ExactSums(1, torch.device("cpu"))
    sums.add(torch.tensor([1.0, 2.0**-53, 2.0**-100], dtype=torch.float64), 0)
    assert sums.values() == [1.0 + 2.0**-52]


def test_exact_sums_per_group():
    # Values spread over groups by a broadcast index tensor (nuslerp's per-column sums).
    rng = np.random.default_rng(4)
    values = rng.standard_normal((300, 6)) * np.exp2(rng.integers(-40, 40, (300, 6)))
    sums = kit.ExactSums(6, torch.device("cpu"))
    sums.add(torch.from_numpy(values), torch.arange(6))
    assert sums.values() == [exact(values[:, c]) for c in range(6)]


def test_exact_sums_infinities_and_nan():
    sums = kit.ExactSums(4, torch.device("cpu"))
    inf = math.inf
    sums.add(
        torch.tensor([[1.0, inf], [2.0, -inf], [inf, -inf], [math.nan, 1.0]], dtype=torch.float64),
        torch.arange(4)[:, None],
    )
    got = sums.values()
    assert got[0] == inf and got[1] == -inf and math.isnan(got[2]) and math.isnan(got[3])
