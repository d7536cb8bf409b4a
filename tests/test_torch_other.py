"""The torch engine's sce, ram, ramplus_tl, nearswap and arcee_fusion against the Rust engine.

Every case of ``support/method_cases.py`` for these methods runs through both engines,
with the smallest RAM budget (each tensor spans many chunks, and the exact top-k and
quartile selections take several passes) and with a budget that holds whole tensors. The
torch engine mirrors the Rust code operation by operation, so the outputs must agree within
one unit in the last place of the output dtype; each comparison prints how many elements
are not bit-identical (arcee_fusion's must all be: it only chooses between b and x). The
torch outputs are also checked against the numpy references.

arcee_fusion gets data of its own: rows with an exact tie at the threshold whose side
depends on the last bit of the row's KL divergence, and rows whose KL rounds below zero.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from mergex.torch_engine import kernels
from support import method_cases as mc
from support import models
from support import reference as ref

METHODS = ("sce", "ram", "ramplus_tl", "nearswap", "arcee_fusion")
CASES = [name for name, c in mc.CASES.items() if c.method in METHODS]
SMALL, LARGE = "64KiB", "8MiB"


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    cache: dict = {}

    def get(kind_map: str, dtype: str) -> mc.Family:
        if (kind_map, dtype) not in cache:
            root = tmp_path_factory.mktemp(f"{kind_map}-{dtype}")
            seed = sorted(mc.MAPS).index(kind_map)
            cache[kind_map, dtype] = mc.build_family(root, mc.MAPS[kind_map], dtype, seed=seed)
        return cache[kind_map, dtype]

    return get


def merge(mergex_mod, cfg: dict, out: Path, engine: str, budget: str) -> models.Output:
    mergex_mod.merge(models._plain(cfg), out, engine=engine, ram_budget=budget, threads=2, progress=False)
    return models.read_output(out)


def ordered(bits: np.ndarray, dtype: str) -> np.ndarray:
    """Stored bit patterns as integers in the order of the values they encode, so that
    neighbouring floats differ by one (both zeros are 0)."""
    width = {"F32": 32, "BF16": 16}[dtype]
    b = bits.view(np.uint32 if width == 32 else np.uint16).astype(np.int64).reshape(-1)
    sign = np.int64(1) << (width - 1)
    return np.where(b & sign, -(b & (sign - 1)), b)


def compare(rust: models.Output, torch_out: models.Output, label: str) -> tuple[int, int]:
    """Assert every tensor agrees within one ulp of its dtype (NaN where the other is NaN);
    return (elements not bit-identical, elements)."""
    assert set(rust.raw) == set(torch_out.raw), label
    differ = total = 0
    for name in rust.raw:
        dtype = rust.dtype(name)
        assert torch_out.dtype(name) == dtype and torch_out.raw[name][1] == rust.raw[name][1], (label, name)
        a, b = rust.array(name), torch_out.array(name)
        nan_a, nan_b = np.isnan(ref.to_f32(a, dtype)), np.isnan(ref.to_f32(b, dtype))
        np.testing.assert_array_equal(nan_a, nan_b, err_msg=f"{label} {name}: NaN positions")
        gap = np.abs(ordered(a, dtype) - ordered(b, dtype))[~nan_a.reshape(-1)]
        assert gap.size == 0 or gap.max() <= 1, f"{label}\n" + models.describe_mismatch(name, b, a, dtype)
        differ += int(np.count_nonzero(ordered(a, dtype) != ordered(b, dtype)))
        total += a.size
    return differ, total


@pytest.mark.parametrize("dtype", ["bf16", "f32"])
@pytest.mark.parametrize("name", CASES)
def test_torch_matches_rust(family, mergex_mod, tmp_path, name, dtype):
    case = mc.CASES[name]
    f = family(case.kind_map, dtype)
    cfg, _, *_ = case.build(f)
    # float32 output at both budgets; the stored dtype (bf16 inputs) at the small one.
    runs = [(SMALL, {**cfg, "out_dtype": "float32"}, "F32"), (LARGE, {**cfg, "out_dtype": "float32"}, "F32")]
    if dtype == "bf16":
        runs.append((SMALL, cfg, "BF16"))
    for k, (budget, run_cfg, out_dtype) in enumerate(runs):
        label = f"{name} {dtype} -> {out_dtype} at {budget}"
        rust = merge(mergex_mod, run_cfg, tmp_path / f"rust{k}", "rust", budget)
        got = merge(mergex_mod, run_cfg, tmp_path / f"torch{k}", "torch", budget)
        differ, total = compare(rust, got, label)
        print(f"{label}: {differ} of {total} elements not bit-identical")
        if case.method == "arcee_fusion":
            # Each element is b or b + (x - b), decided by comparisons: no rounding to differ
            # in, and where x and b are one ulp apart a wrong decision is within one ulp.
            assert differ == 0, label
    # Against the numpy reference: test_methods_more.py runs every case on both engines.


# --------------------------------------------------------------------------- arcee_fusion

ROW = 96
# Rows of a seeded draw (see tie_rows) with an element exactly at median + 1.5·IQR of
# |x - b|: whether it passes depends on the last bit of the row's KL. With torch's own
# (vectorized) exp and log these four rows decide it the other way from the Rust engine.
TIE_ROWS = (309, 552, 1429, 1448)


def tie_rows() -> tuple[np.ndarray, np.ndarray]:
    """Bases on a 2^-6 grid, task vectors of 0..15 steps of 2^-8 (geometric), exact in f32."""
    rng = np.random.default_rng(2026)
    shape = (8000, ROW)
    b = rng.integers(-31, 32, shape) * 2.0**-6
    w = 0.7 ** np.arange(16)
    steps = rng.choice(16, shape, p=w / w.sum()) * rng.choice([-1, 1], shape)
    return b.astype(np.float32), (b + steps * 2.0**-8).astype(np.float32)


def near_rows(rows: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """x = b with half the elements one f32 ulp away: KLs of ~1e-17, about half of them
    rounding below zero, so that the upper quartile is a negative importance."""
    rng = np.random.default_rng(7)
    b = (rng.standard_normal((rows, ROW)) * 0.05).astype(np.float32)
    toward = np.where(rng.random(b.shape) < 0.5, np.float32(1), np.float32(-1))
    x = np.where(rng.random(b.shape) < 0.5, np.nextafter(b, toward), b)
    return b, x.astype(np.float32)


def test_arcee_fusion_exact_ties_and_negative_kl(mergex_mod, tmp_path):
    tb, tx = tie_rows()
    nb, nx = near_rows()
    base = {f"tie.{i}.weight": tb[r] for i, r in enumerate(TIE_ROWS)} | {"near.weight": nb}
    expert = {f"tie.{i}.weight": tx[r] for i, r in enumerate(TIE_ROWS)} | {"near.weight": nx}
    for r in TIE_ROWS:  # the planted ties are there, in exact arithmetic
        steps = np.sort(np.abs(tx[r] - tb[r]).astype(np.float64) * 2**8)
        q1, med, q3 = (steps[math.floor(f * (ROW - 1))] for f in (0.25, 0.5, 0.75))
        assert q3 > q1 and np.any(steps == med + 1.5 * (q3 - q1)), r
    nb64, nx64 = (torch.from_numpy(v.astype(np.float64)) for v in (nb, nx))
    chunk = kernels.Chunk(index=0, start=0, base=nb64.reshape(-1), models=nx64.reshape(1, -1))
    imp = kernels.Importance(ROW, nb.size, torch.device("cpu"))(chunk)
    # Some importances are negative (a row's KL rounded below zero): they must rank below
    # the positive ones, as numbers (raw f64 bits as unsigned integers would rank them
    # above, and move the upper quartile onto a negative value).
    assert (imp < 0).any() and (imp > 0).any()
    ordered = np.sort(imp.numpy())
    assert ordered[math.floor(0.75 * (ordered.size - 1))] >= 0
    cfg = {
        "merge_method": "arcee_fusion",
        "base_model": models.write_model(tmp_path / "base", base, "f32", layers=1),
        "models": [{"model": models.write_model(tmp_path / "expert", expert, "f32", layers=1)}],
    }
    for budget in (SMALL, LARGE):
        rust = merge(mergex_mod, cfg, tmp_path / f"rust-{budget}", "rust", budget)
        got = merge(mergex_mod, cfg, tmp_path / f"torch-{budget}", "torch", budget)
        assert compare(rust, got, f"arcee_fusion at {budget}")[0] == 0
        for name in base:
            taken = got.f32(name) != base[name]
            assert taken.any() and not taken.all(), name


# --------------------------------------------------------------------------- helpers


def test_order_keys_rank_numerically():
    # f64 values of both signs (and both zeros): their order keys, as unsigned numbers, sort
    # as the values do (the quartile selections rank them).
    rng = np.random.default_rng(3)
    values = np.concatenate([rng.standard_normal(3000), np.zeros(50), -np.zeros(50), np.full(40, 0.5)])
    rng.shuffle(values)
    keys = kernels.order_keys(torch.from_numpy(values.copy())).numpy().view(np.uint64)
    order = np.argsort(keys, kind="stable")
    assert np.array_equal(values[order], np.sort(values))


@pytest.mark.parametrize("engine", ["rust", "torch"])
def test_ramplus_negative_alpha_is_a_config_error(mergex_mod, zoo, tmp_path, engine):
    # rho is clamped to [0, alpha]; a negative alpha is refused before anything is written.
    base, a, b = (zoo("bf16", seed=s) for s in (1, 2, 3))
    cfg = {
        "merge_method": "ramplus_tl",
        "base_model": base,
        "models": [{"model": a}, {"model": b}],
        "parameters": {"alpha": -0.1},
    }
    out = tmp_path / "out"
    with pytest.raises(mergex_mod.ConfigError, match="alpha"):
        merge(mergex_mod, cfg, out, engine, SMALL)
    assert not out.exists()
