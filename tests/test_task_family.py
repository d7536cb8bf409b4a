"""The task-vector family (METHODS.md §2, §3) against the numpy reference: ties, dare_ties,
dare_linear, breadcrumbs, breadcrumbs_ties, della and della_linear.

Every merge runs with the smallest RAM budget, so the whole-tensor statistics these methods
need (magnitude cuts, L1 rescale factors, row ranks) are gathered over many chunks. Two sets
of models feed the comparisons:

- ``planted``: base and experts on a grid of 2^-6 (exact in bf16), every delta one of
  ±1, ±2, ±3 · 2^-6. With three magnitudes, every magnitude cut falls inside a long run of
  equal |δ| spread over the whole tensor (the lower flat index must win), and many
  per-element sign sums are exactly 0 (the majority is then +1).
- ``random``: a random bf16 base and experts stored as bf16, f16 and f32 with small random
  deltas (never exactly 0), so the cut values and rescale factors are arbitrary floats.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from support import memory, models
from support import reference as ref
from support.memory import MEM_SHAPE, bf16_view, write_one_tensor_model
from support.task_cases import (
    GRID,
    LAYERS,
    RANDOM_METHODS,
    SHAPES,
    TASK_METHODS,
    planted_family,
    random_family,
    wd,
)

# --------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    return {
        "planted": planted_family(root / "planted"),
        "random": random_family(root / "random"),
    }


# --------------------------------------------------------------------------- configs and expectations


def task_config(method, base, xs, params, top=None, base_weight=None) -> dict:
    """A config with one entry per expert (``params[i]`` for ``xs[i]``); with ``base_weight``
    the base is also listed under models, first (it must not count as a model position)."""
    entries = [{"model": x, "parameters": dict(p)} for x, p in zip(xs, params, strict=True)]
    if base_weight is not None:
        entries.insert(0, {"model": base, "parameters": {"weight": base_weight, "density": 0.5}})
    cfg = {"merge_method": method, "base_model": base, "models": entries}
    if top:
        cfg["parameters"] = dict(top)
    return cfg


def expected_outputs(cfg: dict, base: models.Model, xs: list, seed: int = 0) -> dict[str, np.ndarray]:
    """Reference float32 values for every tensor, parameters looked up per CONFIG.md."""
    method = cfg["merge_method"]
    top = cfg.get("parameters") or {}
    entries = [m for m in cfg["models"] if m["model"] is not base]
    assert [m["model"] for m in entries] == xs
    out = {}
    for name in base.tensors:
        p = ref.position(name, LAYERS)

        def per_model(key, default, name=name, p=p):
            return [ref.lookup([m.get("parameters"), top], key, name, p, default) for m in entries]

        def global_(key, default, name=name, p=p):
            return ref.lookup([top], key, name, p, default)

        out[name] = ref.task_family(
            method,
            base.tensors[name],
            [x.tensors[name] for x in xs],
            name,
            weights=per_model("weight", None),
            densities=per_model("density", 1.0),
            gammas=per_model("gamma", 0.01),
            epsilons=per_model("epsilon", 0.15),
            normalize=global_("normalize", None),
            rescale=global_("rescale", None),
            lam=global_("lambda", 1.0),
            seed=seed,
        )
    return out


# name -> (method, per-expert parameters, top-level parameters, base weight if listed, seed)
CASES = {
    # density 0.7 on 24 000 elements: k = floor(f32(0.7)·n) = 16 799 (in f64 it would be 16 800).
    "ties": ("ties", [wd(0.6, 0.7), wd(0.5, [0.25, 0.75]), wd(-0.3, 0.5)], None, None, 0),
    # density 1 keeps all, 0 keeps nothing, 0.001 keeps max(1, floor(d·n)) (1 on the norms).
    "ties_edges": (
        "ties",
        [wd(0.5, 1.0), wd(1.0, 0.0), wd(0.7, 0.001)],
        {"normalize": False, "lambda": 1.5},
        None,
        0,
    ),
    "dare_ties": ("dare_ties", [wd(1.0, 0.5), wd(0.7, [0.25, 0.75]), wd(0.4, 0.9)], None, None, 7),
    # density 0: nothing kept, the kept L1 norm is 0 and the rescale factor falls back to 1.
    "dare_ties_edges": (
        "dare_ties",
        [wd(0.5, 1.0), wd(1.0, 0.0), wd(-0.7, 0.05)],
        {"normalize": True, "lambda": 0.5},
        None,
        0,
    ),
    # The base is listed first under models: the experts are still model positions 0, 1, 2.
    "dare_linear": (
        "dare_linear",
        [wd(0.5, 0.3), wd(0.4, 0.6), wd(0.3, [0.75, 0.25])],
        {"lambda": 0.8},
        0.5,
        123456789,
    ),
    "dare_linear_plain": (
        "dare_linear",
        [wd(1.0, 0.2), wd(-0.5, 0.4), wd(0.25, 0.6)],
        {"rescale": False, "normalize": True},
        None,
        0,
    ),
    "breadcrumbs": (
        "breadcrumbs",
        [wd(0.5, 0.8, gamma=0.05), wd(0.3, 0.7), wd(0.2, [0.5, 0.875], gamma=0.1)],
        None,
        None,
        0,
    ),
    # gamma 0.2 with density 0.9: keep + top > n, so bot = 0 (only the top is cut);
    # gamma 0: nothing cut at the top. With the L1 rescale switched on.
    "breadcrumbs_ties": (
        "breadcrumbs_ties",
        [wd(1.0, 0.9, gamma=0.2), wd(-0.4, 0.7, gamma=0.0), wd(0.6, 0.5, gamma=0.05)],
        {"rescale": True},
        None,
        0,
    ),
    "della": (
        "della",
        [wd(0.4, 0.5, epsilon=0.1), wd(0.4, [0.3, 0.7]), wd(0.2, 0.6, epsilon=0.2)],
        None,
        None,
        99,
    ),
    "della_linear": (
        "della_linear",
        [wd(0.3, 0.4, epsilon=0.05), wd(0.6, 0.5, epsilon=0.1), wd(0.5, [0.25, 0.75], epsilon=0.2)],
        {"normalize": True},
        None,
        3,
    ),
    "della_plain": (
        "della",
        [wd(1.0, 0.5, epsilon=0.3), wd(0.5, 0.35), wd(-0.25, 0.8, epsilon=0.05)],
        {"normalize": False, "rescale": False, "lambda": 2.0},
        None,
        2**32 - 1,
    ),
}


def case_config(case: str, base, xs):
    method, params, top, base_weight, seed = CASES[case]
    return task_config(method, base, xs, params, top, base_weight), seed


def check(out: models.Output, expected: dict, dtype: str) -> None:
    assert set(out.raw) == set(expected), "output tensor names differ from the inputs'"
    for name, want in expected.items():
        models.assert_tensor_equal(out, name, want, dtype)


# --------------------------------------------------------------------------- 1. reference


def test_cases_cover_every_method():
    assert {c[0] for c in CASES.values()} == set(TASK_METHODS)


@pytest.mark.parametrize("engine", ["rust", "torch"])
@pytest.mark.parametrize("family", ["planted", "random"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(families, run_merge, out_dir, case, family, engine):
    # Both engines: the torch engine's kernels under the Rust engine's control.
    base, xs = families[family]
    cfg, seed = case_config(case, base, xs)
    expected = expected_outputs(cfg, base, xs, seed)
    kw = {"seed": seed, "engine": engine}
    # float32 output: the engine's working values themselves, bit for bit.
    check(run_merge({**cfg, "out_dtype": "float32"}, out_dir.parent / "f32", **kw), expected, "F32")
    # No dtype set: the inputs' own (bf16) when they agree, else torch's promotion (the
    # random family mixes bf16, f16 and f32: f32), rounded once to nearest even.
    dtype = "BF16" if family == "planted" else "F32"
    check(run_merge(cfg, out_dir.parent / "bf16", **kw), expected, dtype)


def test_reference_draw_matches_spec_vectors():
    # METHODS.md §3 test vectors, for the reference's own hash.
    name = "model.layers.0.mlp.up_proj.weight"
    assert ref.fnv1a32(name) == 0x53D38DE8
    s = ref.draw_stream(0, name, 0)
    assert s == 0x4ADD06D6
    got = ref.draws(s, [0, 1, 2, 3, 2**32 + 5]).tolist()
    assert got == [0xB3798433, 0xD2120608, 0x92D890EF, 0x82F98EEF, 0xB5613FBD]
    s1 = ref.draw_stream(0, name, 1)
    assert s1 == 0x7AEF8979
    assert ref.draws(s1, [0]).tolist() == [0x79BA6FB8]
    s42 = ref.draw_stream(42, name, 0)
    assert s42 == 0xCF306DAB
    assert ref.draws(s42, [0]).tolist() == [0x4D924E58]


def test_reference_sparsifiers_on_hand_examples():
    # The reference's own cuts, on values small enough to check by eye.
    d = np.array([0.5, -2.0, 1.0, -1.0, 2.0, 0.25, 1.0, -0.5], dtype=np.float32)
    # magnitude: k = floor(0.5·8) = 4 → both 2s, then the first two 1s (indices 2, 3).
    assert ref.mask_magnitude(d, 0.5).nonzero()[0].tolist() == [1, 2, 3, 4]
    # k = max(1, floor(0.1·8)) = 1 → the first 2 (index 1).
    assert ref.mask_magnitude(d, 0.1).nonzero()[0].tolist() == [1]
    assert not ref.mask_magnitude(d, 0.0).any()
    # outliers: keep 4, top floor(0.25·8) = 2, bot 2. Ascending: 5, 0, 7, 2, 3, 6, 1, 4.
    assert ref.mask_magnitude_outliers(d, 0.5, 0.25).nonzero()[0].tolist() == [2, 3, 6, 7]
    # della ranks within rows of a 2-D tensor: p runs d-ε … d+ε by |δ| ascending.
    p = ref.della_keep_probability(d.reshape(2, 4), 0.5, 0.3)
    # Row 0 = 0.5, -2, 1, -1: ranks 1, 4, 2, 3 (the two 1s by index).
    np.testing.assert_allclose(p[0], [0.2, 0.8, 0.4, 0.6], rtol=1e-6)
    # rescale: ‖δ‖₁ = 8.25, kept 6 → 1.375.
    assert ref.rescale_factor(d, ref.mask_magnitude(d, 0.5)) == np.float32(8.25 / 6.0)


# --------------------------------------------------------------------------- 2. exact top-k


BIG = (700, 330)  # 231 000 elements: ~150 chunks of the 64KiB budget
TIES_DENSITY = [
    {"filter": "input_layernorm", "value": 0.7},  # n = 1000: k = 699, not 700 (f32 density)
    {"filter": "layers.0.", "value": 0.1},
    {"filter": "layers.1.", "value": 0.37},
    {"filter": "layers.2.", "value": 1e-6},  # floor(d·n) = 0 → k = 1
    {"value": 0.5},
]


def test_ties_keeps_exactly_k_lower_index_first(tmp_path, run_merge, out_dir, mergex_mod):
    rng = np.random.default_rng(5)
    shapes = {f"model.layers.{i}.mlp.up_proj.weight": BIG for i in range(LAYERS)}
    shapes["model.layers.0.input_layernorm.weight"] = (1000,)
    shapes["model.norm.weight"] = (5,)
    base_t, x_t = {}, {}
    for n, s in shapes.items():
        base_t[n] = (rng.integers(-64, 65, s) * GRID).astype(np.float32)
        # Four magnitudes, the largest the rarest: each cut lands inside a run of equal |δ|
        # that spreads over the whole tensor.
        level = rng.choice(np.array([1, 2, 3, 4]), s, p=[0.4, 0.3, 0.2, 0.1])
        sign = rng.choice(np.array([-1, 1]), s)
        x_t[n] = (base_t[n] + sign * level * GRID).astype(np.float32)
    base = models.write_model(tmp_path / "base", base_t, "f32", layers=LAYERS)
    x = models.write_model(tmp_path / "expert", x_t, "f32", layers=LAYERS)
    cfg = {
        "merge_method": "ties",
        "base_model": base,
        "models": [{"model": x, "parameters": {"weight": 1.0, "density": TIES_DENSITY}}],
    }
    plan = mergex_mod.plan(models._plain(cfg), ram_budget="64KiB", threads=2)
    assert BIG[0] * BIG[1] >= 100 * plan.max_chunk_elems
    out = run_merge(cfg, out_dir)
    for n in shapes:
        b, xv = base.tensors[n].reshape(-1), x.tensors[n].reshape(-1)
        got = out.f32(n).reshape(-1)
        density = ref.lookup([{"density": TIES_DENSITY}], "density", n, 0.0)
        k = max(1, math.floor(ref.param64(density) * b.size))
        if "input_layernorm" in n:
            assert k == 699  # the f32 density 0.699999988 times 1000, floored
        changed = got != b
        assert changed.sum() == k, f"{n}: {changed.sum()} elements kept, expected k = {k}"
        # Kept elements carry the whole delta (one expert, weight 1, normalized by 1).
        np.testing.assert_array_equal(got[changed], xv[changed], err_msg=n)
        # Which ones: everything above the cut, then the lowest indices at the cut.
        a = np.abs(xv - b)
        cut = np.sort(a)[::-1][k - 1]
        at = a == cut
        want = (a > cut) | (at & (np.cumsum(at) <= k - int((a > cut).sum())))
        if b.size == BIG[0] * BIG[1]:
            assert (at & changed).any() and (at & ~changed).any(), f"{n}: the cut is not inside a tie"
        bad = np.nonzero(changed != want)[0]
        assert bad.size == 0, (
            f"{n} (k={k}, cut |δ|={cut}): kept set differs at {bad.size} indices, first {bad[:5].tolist()}; "
            f"kept at the cut: indices {np.nonzero(changed & at)[0][:3].tolist()}…"
        )
        np.testing.assert_array_equal(ref.mask_magnitude(xv - b, density), want)


# --------------------------------------------------------------------------- 3. random masks

SETTINGS = [("64KiB", 2), ("64KiB", 1), ("4MiB", 1), ("4MiB", 2)]


def safetensors_bytes(path: Path) -> dict[str, bytes]:
    files = sorted(path.glob("*.safetensors"))
    assert files, f"no safetensors in {path}"
    return {p.name: p.read_bytes() for p in files}


@pytest.mark.parametrize("method", RANDOM_METHODS)
def test_random_masks_independent_of_budget_and_threads(families, run_merge, out_dir, method):
    base, xs = families["random"]
    cfg, _ = case_config(method, base, xs)
    cfg["out_dtype"] = "float32"
    outs = {}
    for budget, threads in SETTINGS:
        target = out_dir.parent / f"{budget}-{threads}"
        run_merge(cfg, target, ram_budget=budget, threads=threads, seed=0)
        outs[(budget, threads)] = safetensors_bytes(target)
    first, *rest = SETTINGS
    for setting in rest:
        assert outs[setting] == outs[first], f"{method}: {setting} differs from {first}"
    # Another seed gives another mask on every tensor of any size.
    other = run_merge(cfg, out_dir.parent / "seed1", seed=1)
    same = run_merge(cfg, out_dir.parent / "seed0", seed=0)
    for name in base.tensors:
        if base.tensors[name].size >= 1000:
            assert other.raw[name][2] != same.raw[name][2], f"{method}: {name} same for seeds 0 and 1"


def test_seed_default_and_recorded(families, run_merge, out_dir, mergex_mod):
    base, xs = families["random"]
    cfg, _ = case_config("dare_ties", base, xs)
    a = out_dir.parent / "default"
    run_merge(cfg, a)  # no seed: 0
    b = out_dir.parent / "zero"
    run_merge(cfg, b, seed=0)
    assert safetensors_bytes(a) == safetensors_bytes(b)
    c = out_dir.parent / "five"
    run_merge(cfg, c, seed=5)
    assert safetensors_bytes(c) != safetensors_bytes(a)
    # mergex_config.yml records the seed, and running it again gives the same model.
    recorded = c / "mergex_config.yml"
    assert "seed: 5" in recorded.read_text()
    d = out_dir.parent / "again"
    mergex_mod.merge(str(recorded), d, ram_budget="64KiB", threads=2, progress=False)
    assert safetensors_bytes(d) == safetensors_bytes(c)


@pytest.mark.parametrize("method", RANDOM_METHODS)
def test_kept_fraction(families, run_merge, out_dir, method):
    # One expert, weight 1, no rescale: an element changed from the base iff it was kept.
    base, xs = families["random"]
    density = [0.2, 0.6]  # per layer 0.2, 0.4, 0.6; 0.2 outside the layers
    params = {"weight": 1.0, "density": density}
    if method.startswith("della"):
        params["epsilon"] = 0.15
    cfg = task_config(method, base, xs[:1], [params], {"rescale": False})
    cfg["out_dtype"] = "float32"
    seed = 11
    out = run_merge(cfg, out_dir, seed=seed)
    for name, b in base.tensors.items():
        d = ref.param64(ref.gradient_at(density, ref.position(name, LAYERS)))
        delta = xs[0].tensors[name] - b
        if method.startswith("della"):
            want = ref.mask_della(delta, d, 0.15, seed, name, 0)
        else:
            want = ref.mask_random(delta, d, seed, name, 0)
        kept = out.f32(name) != b
        n = b.size
        sd = math.sqrt(n * d * (1 - d))
        assert abs(int(kept.sum()) - n * d) <= 4 * sd, f"{name}: kept {kept.sum()} of {n} at density {d}"
        bad = np.nonzero((kept != want).reshape(-1))[0]
        assert bad.size == 0, f"{method} {name}: mask differs from METHODS.md §3 at {bad[:5].tolist()}"


# --------------------------------------------------------------------------- 4. memory

MiB = 1 << 20
MEM_BUDGET = 16 * MiB


def test_ties_peak_rss_within_budget(tmp_path):
    n = MEM_SHAPE[0] * MEM_SHAPE[1]
    rng = np.random.default_rng(3)
    # bf16 bit patterns: random sign, magnitudes in [2^-7, 1); the expert is 1-7 ulps away,
    # so every delta is nonzero and exact, with many equal magnitudes.
    base = (rng.integers(0, 2, n, dtype=np.uint16) << np.uint16(15)) | rng.integers(
        0x3C00, 0x3F78, n, dtype=np.uint16
    )
    write_one_tensor_model(tmp_path / "base", base)
    expert = base + rng.integers(1, 8, n, dtype=np.uint16)
    write_one_tensor_model(tmp_path / "expert", expert)
    del base, expert
    total_in = 2 * 2 * n
    assert 2 * n >= 8 * MEM_BUDGET

    density = 0.2
    cfg = {
        "merge_method": "ties",
        "base_model": str(tmp_path / "base"),
        "models": [{"model": str(tmp_path / "expert"), "parameters": {"weight": 1.0, "density": density}}],
    }
    cfg_path = models.dump_yaml(cfg, tmp_path / "merge.yml")
    out = tmp_path / "merged"
    cmd = [*models.mergex_cmd(), "merge", str(cfg_path), str(out), "--ram-budget", "16MiB", "--quiet"]
    rc, rss, stderr = memory.peak_rss(cmd, tmp_path)
    assert rc == 0, stderr
    msg = (
        f"ties peak RSS {rss / MiB:.1f} MiB, budget {MEM_BUDGET / MiB:.0f} MiB, "
        f"inputs {total_in / MiB:.0f} MiB"
    )
    print(msg)
    assert rss < MEM_BUDGET + memory.SLACK, msg
    assert rss < 0.8 * total_in, msg

    # And it is the exact top-k: k elements replaced by the expert's, chosen by |δ| with the
    # lower index winning at the cut (checked block by block to keep this process small).
    b, x, o = bf16_view(tmp_path / "base"), bf16_view(tmp_path / "expert"), bf16_view(out)
    k = max(1, math.floor(ref.param64(density) * n))
    kept_min, dropped_max = np.inf, -np.inf
    blocks = []
    step = 1 << 23
    for lo in range(0, n, step):
        bb, xx, oo = np.array(b[lo : lo + step]), np.array(x[lo : lo + step]), np.array(o[lo : lo + step])
        assert np.all((oo == bb) | (oo == xx)), f"block at {lo}: values neither base nor expert"
        kept = oo != bb
        a = np.abs(ref.bf16_bits_to_f32(xx) - ref.bf16_bits_to_f32(bb))
        blocks.append((lo, kept, a))
        if kept.any():
            kept_min = min(kept_min, float(a[kept].min()))
        if (~kept).any():
            dropped_max = max(dropped_max, float(a[~kept].max()))
    assert sum(int(k_.sum()) for _, k_, _ in blocks) == k
    assert kept_min >= dropped_max, f"dropped |δ| {dropped_max} above kept {kept_min}"
    if kept_min == dropped_max:  # a tie at the cut: kept ones come first in index order
        last_kept = max(
            (
                lo + int(np.nonzero(kk & (a == kept_min))[0].max())
                for lo, kk, a in blocks
                if (kk & (a == kept_min)).any()
            )
        )
        first_dropped = min(
            (
                lo + int(np.nonzero(~kk & (a == kept_min))[0].min())
                for lo, kk, a in blocks
                if (~kk & (a == kept_min)).any()
            )
        )
        assert last_kept < first_dropped, "at the cut a higher index was kept over a lower one"


# --------------------------------------------------------------------------- 5. config errors


def bad_della_low(a, b, c):
    # density 0.1 - epsilon 0.15 < 0
    return (
        task_config("della", a, [b, c], [wd(1.0, 0.5), wd(1.0, 0.1, epsilon=0.15)]),
        "expert_c",
        ["epsilon", "density"],
    )


def bad_della_high(a, b, c):
    # density 0.9 + epsilon 0.15 > 1
    return (
        task_config("della_linear", a, [b, c], [wd(1.0, 0.9), wd(1.0, 0.5)]),
        "expert_b",
        ["epsilon", "density"],
    )


def bad_della_gradient(a, b, c):
    # Fine at layer 0 (0.5 ± 0.15), out of range at layer 2 (0.1 - 0.15).
    return (
        task_config("della", a, [b, c], [wd(1.0, 0.5), wd(1.0, [0.5, 0.1])]),
        "expert_c",
        ["epsilon", "density"],
    )


def bad_ties_no_base(a, b, c):
    cfg = task_config("ties", a, [b, c], [wd(1.0, 0.5), wd(1.0, 0.5)])
    del cfg["base_model"]
    return cfg, None, ["base_model"]


def bad_dare_ties_no_base(a, b, c):
    cfg = task_config("dare_ties", a, [b, c], [wd(1.0, 0.5), wd(1.0, 0.5)])
    del cfg["base_model"]
    return cfg, None, ["base_model"]


def bad_missing_weight(a, b, c):
    return task_config("dare_linear", a, [b, c], [wd(1.0, 0.5), {"density": 0.5}]), "expert_c", ["weight"]


def bad_negative_density(a, b, c):
    return task_config("breadcrumbs", a, [b, c], [wd(1.0, -0.2), wd(1.0, 0.5)]), "expert_b", ["density"]


def bad_negative_density_ties(a, b, c):
    return task_config("ties", a, [b, c], [wd(1.0, 0.5), wd(1.0, -0.5)]), "expert_c", ["density"]


BAD = {
    f.__name__.removeprefix("bad_"): f
    for f in (
        bad_della_low,
        bad_della_high,
        bad_della_gradient,
        bad_ties_no_base,
        bad_dare_ties_no_base,
        bad_missing_weight,
        bad_negative_density,
        bad_negative_density_ties,
    )
}


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    root = tmp_path_factory.mktemp("trio")
    return [
        models.make_llama(root / name, "bf16", seed=s, layers=LAYERS)
        for s, name in enumerate(("base_a", "expert_b", "expert_c"))
    ]


@pytest.mark.parametrize("case", list(BAD))
def test_config_error_cli(tmp_path, trio, case):
    cfg, model, params = BAD[case](*trio)
    cfg_path = models.dump_yaml(cfg, tmp_path / "merge.yml")
    outs = tmp_path / "outs"
    outs.mkdir()
    res = models.run_cli(["merge", cfg_path, outs / "merged", "--ram-budget", "64KiB", "--quiet"])
    line = models.error_line(res.stderr)
    assert res.returncode == 2, f"exit {res.returncode}: {line}"
    assert any(p in line for p in params), f"none of {params} named in: {line}"
    if model is not None:
        assert model in line, f"model {model} not named in: {line}"
        others = {"base_a", "expert_b", "expert_c"} - {model}
        assert not any(f"/{o}" in line for o in others), f"names another model: {line}"
    else:
        assert cfg["merge_method"] in line, line
    assert list(outs.iterdir()) == []


@pytest.mark.parametrize("case", list(BAD))
def test_config_error_api(tmp_path, trio, mergex_mod, case):
    cfg, model, params = BAD[case](*trio)
    out = tmp_path / "outs" / "merged"
    out.parent.mkdir()
    with pytest.raises(mergex_mod.ConfigError) as info:
        mergex_mod.merge(models._plain(cfg), out, ram_budget="64KiB", threads=2, progress=False)
    msg = str(info.value)
    assert any(p in msg for p in params), msg
    if model is not None:
        assert model in msg, msg
    assert list(out.parent.iterdir()) == []


def test_della_bounds_are_open(tmp_path, trio, mergex_mod):
    # d - ε = 0 exactly is outside (0, 1) too (0.25 and 0.25 are exact in f32).
    a, b, _c = trio
    cfg = task_config("della", a, [b], [wd(1.0, 0.25, epsilon=0.25)])
    with pytest.raises(mergex_mod.ConfigError, match="expert_b"):
        mergex_mod.merge(models._plain(cfg), tmp_path / "out", ram_budget="64KiB", threads=2, progress=False)


# --------------------------------------------------------------------------- listing and plan


def test_methods_listed():
    res = models.run_cli(["methods"])
    assert res.returncode == 0, res.stderr
    for method in TASK_METHODS:
        rows = [ln for ln in res.stdout.splitlines() if f" {method} " in ln]
        assert rows, f"{method} not listed:\n{res.stdout}"
        assert "density*=1.0" in rows[0] and " required " in rows[0], rows[0]


def test_plan_passes(trio, mergex_mod):
    a, b, c = trio
    cfg = models._plain(task_config("ties", a, [b, c], [wd(1.0, 0.3), wd(1.0, 0.5)]))
    plan = mergex_mod.plan(cfg, ram_budget="64KiB", threads=2)
    big = sum(1 for s in SHAPES.values() if math.prod(s) > plan.max_chunk_elems)
    assert big >= 6
    assert sum(plan.passes.values()) == plan.tensors == len(SHAPES)
    assert sum(v for p, v in plan.passes.items() if p > 1) >= big, plan.passes
    assert plan.bytes_read > plan.input_bytes
    # METHODS.md §7: ties at density 1 needs no statistics pass.
    for m in cfg["models"]:
        m["parameters"]["density"] = 1.0
    plan1 = mergex_mod.plan(cfg, ram_budget="64KiB", threads=2)
    assert plan1.passes == {1: len(SHAPES)}, plan1.passes
