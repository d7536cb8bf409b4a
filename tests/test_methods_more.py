"""slerp, nuslerp, multislerp, karcher, model_stock, sce, ram, ramplus_tl, nearswap and
arcee_fusion (METHODS.md §4, §5) against the numpy reference in ``support/reference.py``.

Every merge runs with the smallest RAM budget, so the whole-tensor statistics (norms, dot
products, Gram matrices, variance cuts, quartiles) are gathered over many chunks.

The models are built tensor by tensor from *kinds* (``support/method_cases.py``, with the
cases): each kind plants one situation a method must get right (exactly parallel or
antiparallel vectors, a zero-norm input, a task vector that is zero, rows or columns that
differ in kind, equal variances at the top-k cut, models active alone or together). Planted
values sit on a coarse power-of-two grid, so they are exact in bf16 and f32 and every f64
sum over them is exact in any order: the branch a method takes on them cannot depend on how
the engine orders its sums. Each method gets a map from tensor to kind, in a bf16 and an f32
copy; the reference always works on the values as stored.

Methods marked EXACT are compared bit for bit; multislerp and karcher (computed by the
engine on the Gram matrix, by the reference on the materialized vectors) with a tolerance.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from support import memory, models
from support import reference as ref
from support.method_cases import (
    ANTIPODAL,
    CASES,
    EMBED,
    F32,
    HEAD,
    LAYERS,
    MAPS,
    NAMES,
    NORM,
    SHAPES,
    Family,
    _grid_base,
    antipodal_config,
    build_family,
    check,
    entries,
    ln,
    q,
    up,
)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    cache: dict = {}

    def get(kind_map: str, dtype: str) -> Family:
        key = (kind_map, dtype)
        if key not in cache:
            root = tmp_path_factory.mktemp(f"{kind_map}-{dtype}")
            cache[key] = build_family(root, MAPS[kind_map], dtype, seed=sorted(MAPS).index(kind_map))
        return cache[key]

    return get


# --------------------------------------------------------------------------- 1. reference


@pytest.mark.parametrize("engine", ["rust", "torch"])
@pytest.mark.parametrize("dtype", ["bf16", "f32"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(family, run_merge, out_dir, name, dtype, engine):
    # Both engines: the torch engine's kernels under the Rust engine's control.
    c = CASES[name]
    f = family(c.kind_map, dtype)
    cfg, expected, *either = c.build(f)
    either = either[0] if either else None
    assert cfg["merge_method"] == c.method
    # float32 output: the engine's working values themselves.
    out = run_merge({**cfg, "out_dtype": "float32"}, out_dir.parent / "f32", engine=engine)
    check(out, expected, "F32", c.exact, f, either)
    if dtype == "bf16":
        # No dtype set: the base's (bf16; the first model's without a base), rounded once.
        out = run_merge(cfg, out_dir.parent / "bf16", engine=engine)
        check(out, expected, "BF16", c.exact, f, either)


def test_cases_cover_every_method():
    assert {c.method for c in CASES.values()} == {
        "slerp",
        "nuslerp",
        "multislerp",
        "karcher",
        "model_stock",
        "sce",
        "ram",
        "ramplus_tl",
        "nearswap",
        "arcee_fusion",
    }


# The planted situations really are there (in the stored values the reference sees), so the
# comparisons above cover them.


@pytest.mark.parametrize("dtype", ["bf16", "f32"])
def test_slerp_data_takes_both_branches(family, dtype):
    f = family("geo", dtype)
    dots = {n: ref.slerp_coefficients(f.base.tensors[n], f.xs[0].tensors[n], 0.3)[0] for n in NAMES}
    assert dots[q(0)] > 0.9999  # x0 = 1.5 b
    assert 0.9995 < dots[up(0)] < 0.9999  # nearly parallel: still the straight line
    assert dots[q(2)] == -1.0  # x0 = -b
    assert dots[ln(1)] == 0.0 and dots[ln(2)] == 0.0  # a zero tensor on either side
    assert -0.1 < dots[HEAD] < 0.1
    assert 0.9 < dots[EMBED] < 0.9995
    d1 = ref.slerp_coefficients(f.base.tensors[up(0)], f.xs[1].tensors[up(0)], 0.3)[0]
    assert 0.998 < d1 < 0.9995  # the arc at a small angle (slerp_base_listed)


def nuslerp_cosines(v1, v2, mode):
    s11, s22, s12 = ref._vector_sums(v1, v2, mode)
    return np.clip(s12 / (np.maximum(np.sqrt(s11), 1e-7) * np.maximum(np.sqrt(s22), 1e-7)), -1, 1).reshape(-1)


def test_nuslerp_data_has_parallel_and_opposite_vectors(family):
    f = family("geo", "f32")
    seen = {"+1": 0, "-1": 0, "arc": 0}
    for n in NAMES:
        b, x0, x1 = f.base.tensors[n], f.xs[0].tensors[n], f.xs[1].tensors[n]
        for v1, v2 in ((x0 - b, x1 - b), (x0, x1)):
            for mode in ("whole", "rows", "columns"):
                if mode == "columns" and b.ndim != 2:
                    continue
                cos = nuslerp_cosines(v1, v2, mode)
                straight = 1 - cos * cos <= 1e-16
                seen["+1"] += int(np.sum(straight & (cos > 0)))
                seen["-1"] += int(np.sum(straight & (cos < 0)))
                seen["arc"] += int(np.sum(~straight))
    assert all(v >= 10 for v in seen.values()), seen


def test_karcher_and_model_stock_edges_present(family):
    k = family("karcher", "f32")
    assert not np.any(k.xs[0].tensors[ln(1)])  # a zero-norm input
    assert not any(np.any(m.tensors[q(2)]) for m in [k.base, *k.xs])  # all inputs zero
    s = family("stock", "f32")
    b = s.base.tensors
    # Opposite task vectors: c = -1, den = 0, t = 0 (out = b); with a third model t = -3.
    assert ref.model_stock_t(b[q(0)], [s.xs[0].tensors[q(0)], s.xs[1].tensors[q(0)]]) == 0.0
    np.testing.assert_array_equal(ref.model_stock(b[q(0)], [x.tensors[q(0)] for x in s.xs[:2]]), b[q(0)])
    assert ref.model_stock_t(b[q(2)], [x.tensors[q(2)] for x in s.xs]) == pytest.approx(1.0)
    # filter_wise: the opposite rows of the row mix come out as the base rows.
    rows = ref.model_stock(b[up(0)], [x.tensors[up(0)] for x in s.xs[:2]], filter_wise=True)
    np.testing.assert_array_equal(rows[0::4], b[up(0)][0::4])
    assert np.any(rows[3::4] != b[up(0)][3::4])


@pytest.mark.parametrize("dtype", ["bf16", "f32"])
def test_ram_counts_and_lambdas_vary(family, dtype):
    f = family("ram", dtype)
    lambdas = set()
    for n in NAMES:
        _ds, _active, count = ref.ram_activity(f.base.tensors[n], [x.tensors[n] for x in f.xs])
        if n in (up(1), q(2), HEAD):
            assert set(np.unique(count)) == {0, 1, 2, 3}, n
        lambdas.update(ref.ramplus_lambdas(f.base.tensors[n], [x.tensors[n] for x in f.xs]))
    cap = F32(1 + 0.1 * float(F32(0.2)))
    assert F32(1) in lambdas and cap in lambdas, lambdas
    assert any(F32(1) < v < cap for v in lambdas), lambdas  # a ratio under alpha


@pytest.mark.parametrize(("kind_map", "expert"), [("near", 0), ("geo", 1)])
def test_arcee_fusion_ties_are_rare(family, kind_map, expert):
    # The comparisons above let elements at an exact tie with the threshold go either way;
    # there must be next to none of them, or the comparison would mean little.
    for dtype in ("bf16", "f32"):
        f = family(kind_map, dtype)
        x = f.xs[expert]
        ties = {n: int(ref.arcee_fusion_ties(f.base.tensors[n], x.tensors[n])[0].sum()) for n in NAMES}
        print(kind_map, dtype, {n: k for n, k in ties.items() if k})
        assert sum(ties.values()) <= 8, ties


def test_sce_cut_falls_inside_ties(family):
    f = family("sce", "f32")
    hits = 0
    for n in (EMBED, q(0), up(1), HEAD):
        ds = [x.tensors[n] - f.base.tensors[n] for x in f.xs]
        var = ref.sce_variance(ds).reshape(-1)
        k = math.floor(ref.param64(0.3) * np.count_nonzero(var))
        cut = np.sort(var)[::-1][k - 1]
        kept = ref.sce_mask(ds, 0.3).reshape(-1)
        at = var == cut
        hits += int((at & kept).any() and (at & ~kept).any())
        # The kept ones at the cut are the lowest indices among the tied.
        assert np.all(kept[at] == (np.cumsum(at)[at] <= int(kept[at].sum()))), n
    assert hits == 4


# --------------------------------------------------------------------------- 2. gradient slerp over slices

T_GRADIENT = [
    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
    {"value": 0.5},
]


def test_gradient_slerp_over_slices(tmp_path, run_merge, out_dir):
    # Two fine-tunes of one model (b = a + noise): cosines of ~0.86 on the weights.
    a = models.make_llama(tmp_path / "a", "bf16", seed=21, layers=6)
    rng = np.random.default_rng(22)
    b_t = {n: v + F32(0.03) * rng.standard_normal(v.shape).astype(F32) for n, v in a.tensors.items()}
    b = models.write_model(tmp_path / "b", b_t, "bf16", layers=6)
    # (a's range, b's range): 4 + 3 output layers, input layer 3 used twice.
    slices = [((0, 4), (0, 4)), ((3, 6), (3, 6))]
    cfg = {
        "merge_method": "slerp",
        "base_model": a,
        "slices": [
            {"sources": [{"model": a, "layer_range": list(ra)}, {"model": b, "layer_range": list(rb)}]}
            for ra, rb in slices
        ],
        "parameters": {"t": T_GRADIENT},
        "out_dtype": "float32",
    }
    out = run_merge(cfg, out_dir)
    assert out.config()["num_hidden_layers"] == 7
    suffixes = ("self_attn.q_proj.weight", "mlp.up_proj.weight", "input_layernorm.weight")
    expected = {}
    ts = {}
    offset = 0
    for ra, rb in slices:
        n = ra[1] - ra[0]
        for k in range(n):
            p = k / (n - 1)
            for s in suffixes:
                name = f"model.layers.{offset + k}.{s}"
                t = ref.resolve_value(T_GRADIENT, name, p)
                ts[name] = t
                expected[name] = ref.slerp(
                    a.tensors[f"model.layers.{ra[0] + k}.{s}"], b.tensors[f"model.layers.{rb[0] + k}.{s}"], t
                )
        offset += n
    for name in (EMBED, NORM, HEAD):  # p = 0 outside the layers: t = 0 for none of them (filters)
        ts[name] = ref.resolve_value(T_GRADIENT, name, 0.0)
        expected[name] = ref.slerp(a.tensors[name], b.tensors[name], ts[name])
    # CONFIG.md's positions, by hand: p = 1/3 in the first slice, 0.5 in the second.
    assert ts["model.layers.1.self_attn.q_proj.weight"] == pytest.approx(0.5 + (0.3 - 0.5) / 3)
    assert ts["model.layers.5.self_attn.q_proj.weight"] == pytest.approx(0.3)
    assert ts["model.layers.5.mlp.up_proj.weight"] == pytest.approx(0.7)
    assert ts["model.layers.3.mlp.up_proj.weight"] == 0.0 and ts["model.layers.4.mlp.up_proj.weight"] == 1.0
    assert ts["model.layers.2.input_layernorm.weight"] == 0.5 and ts[HEAD] == 0.5
    assert set(out.raw) == set(expected)
    for name, want in expected.items():
        models.assert_tensor_equal(out, name, want, "F32")
    # t = 0 gives the base (a) exactly, t = 1 the other model.
    models.assert_tensor_equal(out, "model.layers.0.self_attn.q_proj.weight", a.tensors[q(0)], "F32")
    models.assert_tensor_equal(out, "model.layers.0.mlp.up_proj.weight", b.tensors[up(0)], "F32")
    # Positions over the whole output depth (i/6) would give other tensors.
    wrong = ref.slerp(a.tensors[q(1)], b.tensors[q(1)], ref.gradient_at(T_GRADIENT[0]["value"], 1 / 6))
    assert not np.array_equal(out.f32(q(1)), wrong)


# --------------------------------------------------------------------------- 3. frankenmerge


def test_passthrough_three_slices(tmp_path, run_merge, out_dir):
    a = models.make_llama(tmp_path / "a", "bf16", seed=31, layers=4)
    b = models.make_llama(tmp_path / "b", "f32", seed=32, layers=4)
    cfg = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": a, "layer_range": [0, 3]}]},
            {"sources": [{"model": b, "layer_range": [1, 3], "parameters": {"scale": 0.5}}]},
            {"sources": [{"model": a, "layer_range": [2, 4]}]},
        ],
        "out_dtype": "float32",
    }
    out = run_merge(cfg, out_dir)
    assert out.config()["num_hidden_layers"] == 7
    plan = [(a, 0, None), (a, 1, None), (a, 2, None), (b, 1, 0.5), (b, 2, 0.5), (a, 2, None), (a, 3, None)]
    suffixes = ("self_attn.q_proj.weight", "mlp.up_proj.weight", "input_layernorm.weight")
    for k, (m, src, scale) in enumerate(plan):
        for s in suffixes:
            want = ref.passthrough(m.tensors[f"model.layers.{src}.{s}"], scale)
            models.assert_tensor_equal(out, f"model.layers.{k}.{s}", want, "F32")
    models.assert_tensor_equal(out, EMBED, a.tensors[EMBED], "F32")
    models.assert_tensor_equal(out, HEAD, a.tensors[HEAD], "F32")  # the last slice's source
    layer_names = [n for n in out.raw if "layers." in n]
    assert sorted(layer_names) == sorted(f"model.layers.{k}.{s}" for k in range(7) for s in suffixes)
    # Written in output-layer order.
    order = [ref.layer_index(n) for n in out.raw if ref.layer_index(n) is not None]
    assert order == sorted(order)


# --------------------------------------------------------------------------- 4. memory

MiB = 1 << 20
MEM_BUDGET = 16 * MiB
N_MEM = memory.MEM_SHAPE[0] * memory.MEM_SHAPE[1]
BLOCK = 1 << 23


@pytest.fixture(scope="module")
def big_models(tmp_path_factory):
    """A base and two experts, one 8192 x 8192 bf16 tensor each (128 MiB, 8x the budget).

    Experts are the base plus 1-7 ulps (random per element and expert): exact nonzero deltas.
    Expert 1 also has the sign of 2% of its elements flipped (a cosine of ~0.96 to the base,
    so slerp takes the arc, and task vectors of both signs)."""
    root = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(7)
    base = (rng.integers(0, 2, N_MEM, dtype=np.uint16) << np.uint16(15)) | rng.integers(
        0x3C00, 0x3F78, N_MEM, dtype=np.uint16
    )
    memory.write_one_tensor_model(root / "base", base)
    for i in range(2):
        x = base + rng.integers(1, 8, N_MEM, dtype=np.uint16)
        if i == 1:
            x ^= (rng.integers(0, 50, N_MEM, dtype=np.uint8) == 0).astype(np.uint16) << np.uint16(15)
        memory.write_one_tensor_model(root / f"x{i}", x)
        del x
    return root


def run_measured(cfg: dict, tmp_path: Path, name: str) -> Path:
    cfg_path = models.dump_yaml(cfg, tmp_path / f"{name}.yml")
    out = tmp_path / name
    cmd = [*models.mergex_cmd(), "merge", str(cfg_path), str(out), "--ram-budget", "16MiB", "--quiet"]
    rc, rss, stderr = memory.peak_rss(cmd, tmp_path)
    assert rc == 0, stderr
    n_in = len(cfg["models"]) + (1 if "base_model" in cfg else 0)
    total_in = 2 * N_MEM * n_in
    msg = (
        f"{name} peak RSS {rss / MiB:.1f} MiB, budget {MEM_BUDGET / MiB:.0f} MiB, "
        f"inputs {total_in / MiB:.0f} MiB"
    )
    print(msg)
    assert rss < MEM_BUDGET + memory.SLACK, msg
    assert rss < 0.8 * total_in, msg
    return out


def views(root: Path, *names: str) -> list[np.ndarray]:
    return [memory.bf16_view(root / n) for n in names]


def blocks(n: int):
    for lo in range(0, n, BLOCK):
        yield slice(lo, min(n, lo + BLOCK))


def f32_block(v: np.ndarray, sl: slice) -> np.ndarray:
    return ref.bf16_bits_to_f32(np.array(v[sl]))


SPOTS = [slice(0, 4096), slice(N_MEM // 2 - 2048, N_MEM // 2 + 2048), slice(N_MEM - 4096, N_MEM)]


def test_slerp_peak_rss_within_budget(big_models, tmp_path):
    root = big_models
    cfg = {
        "merge_method": "slerp",
        "base_model": str(root / "base"),
        "models": [{"model": str(root / "x1")}],
        "parameters": {"t": 0.3},
    }
    out = run_measured(cfg, tmp_path, "slerp")
    a, c, o = [*views(root, "base", "x1"), memory.bf16_view(out)]
    s = np.zeros(3)
    for sl in blocks(N_MEM):
        av, cv = f32_block(a, sl).astype(np.float64), f32_block(c, sl).astype(np.float64)
        s += [av @ av, cv @ cv, av @ cv]
    na, nc = math.sqrt(s[0]), math.sqrt(s[1])
    dot = s[2] / (na * nc)
    assert abs(dot) < 0.9995  # the arc
    theta = math.acos(dot)
    t = ref.param64(0.3)
    ca, cc = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    for sl in SPOTS:
        want = F32(ca) * f32_block(a, sl) + F32(cc) * f32_block(c, sl)
        np.testing.assert_array_equal(np.array(o[sl]), ref.f32_to_bf16_bits(want))


def test_model_stock_peak_rss_within_budget(big_models, tmp_path):
    root = big_models
    cfg = {
        "merge_method": "model_stock",
        "base_model": str(root / "base"),
        "models": [{"model": str(root / "x0")}, {"model": str(root / "x1")}],
    }
    out = run_measured(cfg, tmp_path, "model_stock")
    b, x0, x1, o = [*views(root, "base", "x0", "x1"), memory.bf16_view(out)]
    g = np.zeros(3)
    for sl in blocks(N_MEM):
        bb = f32_block(b, sl)
        d0 = (f32_block(x0, sl) - bb).astype(np.float64)
        d1 = (f32_block(x1, sl) - bb).astype(np.float64)
        g += [d0 @ d0, d1 @ d1, d0 @ d1]
    c = min(1.0, max(-1.0, g[2] / max(math.sqrt(g[0]) * math.sqrt(g[1]), 1e-6)))
    t = F32(2 * c / (1 + c))  # c < 0: expert 1's flipped signs outweigh the shared ulps
    for sl in SPOTS:
        bb = f32_block(b, sl)
        mean = (f32_block(x0, sl) + f32_block(x1, sl)) / F32(2)
        want = t * mean + (F32(1) - t) * bb
        np.testing.assert_array_equal(
            np.array(o[sl]), ref.f32_to_bf16_bits(want), err_msg=f"model_stock at {sl}, t = {t} (c = {c})"
        )


def test_sce_peak_rss_within_budget(big_models, tmp_path):
    root = big_models
    topk = 0.5
    cfg = {
        "merge_method": "sce",
        "base_model": str(root / "base"),
        "models": [{"model": str(root / "x0")}, {"model": str(root / "x1")}],
        "parameters": {"select_topk": topk},
    }
    out = run_measured(cfg, tmp_path, "sce")
    b, x0, x1, o = [*views(root, "base", "x0", "x1"), memory.bf16_view(out)]
    # Exactly k elements change (the two deltas share their sign, so each kept element moves
    # by at least one ulp), and they are the ones with the largest variance.
    nonzero = changed = 0
    kept_min, dropped_max = np.inf, -np.inf
    for sl in blocks(N_MEM):
        bb = f32_block(b, sl)
        var = ref.sce_variance([f32_block(x0, sl) - bb, f32_block(x1, sl) - bb])
        kept = np.array(o[sl]) != np.array(b[sl])
        nonzero += int(np.count_nonzero(var))
        changed += int(kept.sum())
        if kept.any():
            kept_min = min(kept_min, float(var[kept].min()))
        if (~kept).any():
            dropped_max = max(dropped_max, float(var[~kept].max()))
    assert changed == math.floor(ref.param64(topk) * nonzero)
    assert kept_min >= dropped_max > 0


# --------------------------------------------------------------------------- 5. misuse


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    root = tmp_path_factory.mktemp("trio")
    return [
        models.make_llama(root / name, "bf16", seed=s, layers=LAYERS)
        for s, name in enumerate(("base_a", "expert_b", "expert_c"))
    ]


def bad_slerp_two_others(a, b, c):
    cfg = {"merge_method": "slerp", "base_model": a, "models": entries([b, c]), "parameters": {"t": 0.5}}
    return cfg, ["slerp", "got 2"]


def bad_slerp_no_other(a, b, c):
    cfg = {"merge_method": "slerp", "base_model": a, "models": entries([a]), "parameters": {"t": 0.5}}
    return cfg, ["slerp", "got 0"]


def bad_nearswap_without_t(a, b, c):
    return {"merge_method": "nearswap", "base_model": a, "models": entries([b])}, ["'t'"]


def bad_model_stock_one_other(a, b, c):
    return {"merge_method": "model_stock", "base_model": a, "models": entries([b])}, ["model_stock", "got 1"]


def bad_nuslerp_three(a, b, c):
    cfg = {"merge_method": "nuslerp", "models": entries([a, b, c], [{"weight": 1.0}] * 3)}
    return cfg, ["nuslerp", "got 3"]


BAD = {
    f.__name__.removeprefix("bad_"): f
    for f in (
        bad_slerp_two_others,
        bad_slerp_no_other,
        bad_nearswap_without_t,
        bad_model_stock_one_other,
        bad_nuslerp_three,
    )
}


@pytest.mark.parametrize("case", list(BAD))
def test_misuse_cli(tmp_path, trio, case):
    cfg, words = BAD[case](*trio)
    cfg_path = models.dump_yaml(cfg, tmp_path / "merge.yml")
    outs = tmp_path / "outs"
    outs.mkdir()
    res = models.run_cli(["merge", cfg_path, outs / "merged", "--ram-budget", "64KiB", "--quiet"])
    line = models.error_line(res.stderr)
    assert res.returncode == 2, f"exit {res.returncode}: {line}"
    for w in words:
        assert w in line, f"{w!r} not in: {line}"
    assert list(outs.iterdir()) == []


@pytest.mark.parametrize("case", list(BAD))
def test_misuse_api(tmp_path, trio, mergex_mod, case):
    cfg, words = BAD[case](*trio)
    out = tmp_path / "outs" / "merged"
    out.parent.mkdir()
    with pytest.raises(mergex_mod.ConfigError) as info:
        mergex_mod.merge(models._plain(cfg), out, ram_budget="64KiB", threads=2, progress=False)
    for w in words:
        assert w in str(info.value), str(info.value)
    assert list(out.parent.iterdir()) == []


@pytest.fixture(scope="module")
def antipodal(tmp_path_factory):
    """Three fine-tunes of one model, except one tensor: v, -v and 0 (the weighted mean
    direction is exactly 0)."""
    root = tmp_path_factory.mktemp("antipodal")
    rng = np.random.default_rng(41)
    common = models.random_tensors(SHAPES, "f32", 50)
    out = []
    v = _grid_base(rng, SHAPES[ANTIPODAL])
    for i, special in enumerate((v, -v, np.zeros_like(v))):
        t = {n: x + F32(0.01) * rng.standard_normal(x.shape).astype(F32) for n, x in common.items()}
        t[ANTIPODAL] = special
        out.append(models.write_model(root / f"m{i}", t, "bf16", layers=LAYERS))
    return out


def test_multislerp_antipodal_cli(tmp_path, antipodal):
    cfg_path = models.dump_yaml(antipodal_config(antipodal), tmp_path / "merge.yml")
    outs = tmp_path / "outs"
    outs.mkdir()
    res = models.run_cli(["merge", cfg_path, outs / "merged", "--ram-budget", "64KiB", "--quiet"])
    line = models.error_line(res.stderr)
    assert res.returncode == 1, f"exit {res.returncode}: {line}"
    assert ANTIPODAL in line and "antipodal" in line, line
    assert list(outs.iterdir()) == []


def test_multislerp_antipodal_api(tmp_path, antipodal, mergex_mod):
    with pytest.raises(ref.AntipodalError):
        ref.multislerp([m.tensors[ANTIPODAL] for m in antipodal], [1.0, 1.0, 1.0])
    out = tmp_path / "outs" / "merged"
    out.parent.mkdir()
    with pytest.raises(mergex_mod.CheckpointError) as info:
        mergex_mod.merge(models._plain(antipodal_config(antipodal)), out, ram_budget="64KiB", progress=False)
    msg = str(info.value)
    assert ANTIPODAL in msg and "antipodal" in msg, msg
    assert list(out.parent.iterdir()) == []
