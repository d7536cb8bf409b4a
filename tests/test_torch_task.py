"""The torch engine's task-vector family (METHODS.md §2, §3) against the Rust engine, the
numpy reference and, for its exact rank selection, a sort.

Every method runs the same config through both engines, mostly at the smallest RAM budget
(so magnitude cuts, L1 rescale factors and row ranks are gathered over many chunks), and
the outputs must agree within one unit in the last place of the output dtype — in fact
they are compared bit for bit, since the torch code does the Rust code's operations in its
order. Three sets of models:

- ``planted``: base and experts on a grid of 2^-6 (exact in bf16), every delta one of
  ±1, ±2, ±3 · 2^-6 (half of them ±1): every magnitude cut falls inside a long run of equal
  |δ| spread over the whole tensor — on the largest tensors one too long to gather in
  memory at 64KiB, so its ties are counted per chunk — and many sign sums are exactly 0.
- ``random``: a random bf16 base, experts in bf16, f16 and f32 with small nonzero deltas.
- ``bits``: float32 experts whose deltas are c · 2^(-4-4i) (c in 1, 2, 3) for expert i, so
  that with weight 1 and no rescale or normalization the output minus the base spells out
  which experts' elements were kept: the random masks themselves are compared.

Every set also holds a 3-D tensor, which DELLA ranks along axis 1.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from mergex.torch_engine import driver as torch_driver
from support import models
from support import reference as ref
from support.task_cases import GRID, RANDOM_METHODS, TASK_METHODS, random_family, wd

LAYERS = 2
SHAPES = models.llama_shapes(layers=LAYERS, vocab=160, hidden=64, inter=96)
SHAPES["model.layers.1.mlp.experts.weight"] = (4, 16, 40)
METHODS = ["task_arithmetic", *TASK_METHODS]


# --------------------------------------------------------------------------- models


def planted_family(root: Path, seed: int = 0) -> tuple[models.Model, list[models.Model]]:
    rng = np.random.default_rng(seed)
    base_t = {n: (rng.integers(-64, 65, s) * GRID).astype(np.float32) for n, s in SHAPES.items()}
    base = models.write_model(root / "base", base_t, "bf16", layers=LAYERS)

    def sign(shape: tuple[int, ...]) -> np.ndarray:
        return rng.choice(np.array([-1, 1]), shape)

    xs = []
    for i in range(3):
        t = {
            n: (
                v + sign(v.shape) * rng.choice(np.array([1, 2, 3]), v.shape, p=[0.5, 0.3, 0.2]) * GRID
            ).astype(np.float32)
            for n, v in base_t.items()
        }
        xs.append(models.write_model(root / f"expert_{i}", t, "bf16", layers=LAYERS))
    return base, xs


def bits_family(root: Path, seed: int = 4) -> tuple[models.Model, list[models.Model]]:
    rng = np.random.default_rng(seed)
    base_t = {n: (rng.integers(-32, 33, s) * 0.25).astype(np.float32) for n, s in SHAPES.items()}
    base = models.write_model(root / "base", base_t, "f32", layers=LAYERS)
    xs = []
    for i in range(3):
        t = {
            n: v + rng.integers(1, 4, v.shape).astype(np.float32) * np.float32(2.0 ** (-4 - 4 * i))
            for n, v in base_t.items()
        }
        xs.append(models.write_model(root / f"expert_{i}", t, "f32", layers=LAYERS))
    return base, xs


def wide_family(root: Path, random: tuple[models.Model, list[models.Model]], seed: int = 12):
    """The random family with its last expert replaced by one stored in F64 (values not
    representable in f32): the whole merge then works in f64, with 64-bit magnitude keys."""
    base, xs = random
    rng = np.random.default_rng(seed)
    path = root / "expert_f64"
    path.mkdir(parents=True)
    t = {n: b.astype(np.float64) + 0.01 * rng.standard_normal(b.shape) for n, b in base.tensors.items()}
    raw = {n: ("F64", v.shape, v.astype("<f8").tobytes()) for n, v in t.items()}
    models.write_safetensors(path / "model.safetensors", raw, {"format": "pt"})
    (path / "config.json").write_text(json.dumps(models.model_config(LAYERS, "f32")))
    return base, [*xs[:2], models.Model(path=path, dtype="F64", tensors={}, layers=LAYERS)]


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[models.Model, list[models.Model]]]:
    root = tmp_path_factory.mktemp("torch_task")
    random = random_family(root / "random", shapes=SHAPES, layers=LAYERS)
    return {
        "planted": planted_family(root / "planted"),
        "random": random,
        "bits": bits_family(root / "bits"),
        "wide": wide_family(root / "wide", random),
    }


# --------------------------------------------------------------------------- configs


# name -> (method, per-expert parameters, top-level parameters, seed)
CASES: dict[str, tuple[str, list[dict[str, object]], dict[str, object] | None, int]] = {
    "task_arithmetic": (
        "task_arithmetic",
        [wd(0.6), wd(-0.3), wd(0.5)],
        {"normalize": True, "lambda": 0.75},
        0,
    ),
    "ties": ("ties", [wd(0.6, 0.7), wd(0.5, [0.25, 0.75]), wd(-0.3, 0.5)], None, 0),
    # density 1 keeps all, 0 nothing; with the rescale, one more statistics pass for the L1
    # of the kept elements.
    "ties_rescale": ("ties", [wd(0.5, 1.0), wd(1.0, 0.0), wd(0.7, 0.7)], {"rescale": True, "lambda": 1.5}, 0),
    "dare_ties": ("dare_ties", [wd(1.0, 0.5), wd(0.7, [0.25, 0.75]), wd(0.4, 0.9)], None, 7),
    "dare_linear": (
        "dare_linear",
        [wd(0.5, 0.3), wd(-0.4, 0.6), wd(0.3, [0.75, 0.25])],
        {"lambda": 0.8},
        123456789,
    ),
    "breadcrumbs": (
        "breadcrumbs",
        [wd(0.5, 0.8, gamma=0.05), wd(0.3, 0.7), wd(0.2, [0.5, 0.875], gamma=0.1)],
        None,
        0,
    ),
    # gamma 0.2 with density 0.9: bot = 0 (only the top is cut); gamma 0: no top cut.
    "breadcrumbs_ties": (
        "breadcrumbs_ties",
        [wd(1.0, 0.9, gamma=0.2), wd(-0.4, 0.7, gamma=0.0), wd(0.6, 0.5, gamma=0.05)],
        {"rescale": True},
        0,
    ),
    "della": ("della", [wd(0.4, 0.5, epsilon=0.1), wd(0.4, [0.3, 0.7]), wd(0.2, 0.6, epsilon=0.2)], None, 99),
    "della_linear": (
        "della_linear",
        [wd(0.3, 0.4, epsilon=0.05), wd(-0.6, 0.5, epsilon=0.1), wd(0.5, [0.25, 0.75], epsilon=0.2)],
        {"normalize": True},
        2**32 - 1,
    ),
}


# The output is rounded by the writer both engines share: bf16 on a few cases is enough.
BF16_CASES = ["task_arithmetic", "ties", "dare_ties", "della"]


def case_config(case: str, base: models.Model, xs: list[models.Model]) -> tuple[dict, int]:
    method, params, top, seed = CASES[case]
    entries = [{"model": x, "parameters": dict(p)} for x, p in zip(xs, params, strict=True)]
    cfg: dict = {"merge_method": method, "base_model": base, "models": entries}
    if top:
        cfg["parameters"] = dict(top)
    return cfg, seed


# --------------------------------------------------------------------------- running and comparing


class Recorder:
    """Records what the torch engine did per tensor: the passes the plan counted and the
    passes it ran (the engine's control decides them), the tensors that read a sample
    first, and the working dtypes."""

    def __init__(self, monkeypatch) -> None:
        self.planned: dict[str, int] = {}
        self.ran: dict[str, int] = {}
        self.sampled: set[str] = set()
        self.dtypes: set[torch.dtype] = set()
        merge, stats = torch_driver.Driver.merge_tensor, torch_driver.Driver._stats

        def merging(driver, i, info, observe=False):
            self.planned[info.name] = int(info.passes) - 1
            self.ran[info.name] = 0
            self.dtypes.add(torch.float64 if info.wide else torch.float32)
            return merge(driver, i, info, observe)

        def counting(driver, i, ctl, stage, *args, **kw):
            name = driver.infos[i].name
            if stage == "sample":
                self.sampled.add(name)
            else:
                self.ran[name] += 1
            return stats(driver, i, ctl, stage, *args, **kw)

        monkeypatch.setattr(torch_driver.Driver, "merge_tensor", merging)
        monkeypatch.setattr(torch_driver.Driver, "_stats", counting)


def run_both(mergex_mod, monkeypatch, cfg: dict, root: Path, seed: int, budget: str = "64KiB"):
    """Merge with both engines: (rust output, torch output, recorder), after checking the
    passes: the torch merger plans what the Rust plan says and runs as many passes."""
    plain = models._plain(cfg)
    plan = mergex_mod.plan(plain, ram_budget=budget, threads=2)
    rec = Recorder(monkeypatch)
    kw = {"ram_budget": budget, "threads": 2, "progress": False, "seed": seed}
    root.mkdir(parents=True, exist_ok=True)
    r = mergex_mod.merge(plain, root / "rust", **kw)
    t = mergex_mod.merge(plain, root / "torch", engine="torch", **kw)
    assert Counter(p + 1 for p in rec.planned.values()) == plan.passes
    assert max(rec.ran.values(), default=0) == len(r.stat_pass_seconds) == len(t.stat_pass_seconds)
    assert r.kernels in ("avx512", "avx2", "portable") and t.kernels == "torch (cpu)"
    # Both engines time the samples apart from the passes, and only when one was read.
    assert (r.sample_seconds > 0) == (t.sample_seconds > 0) == bool(rec.sampled)
    return models.read_output(root / "rust"), models.read_output(root / "torch"), rec


def ordered_bits(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Storage bit patterns mapped to integers in the order of the values they encode, so
    that one unit in the last place is a difference of 1."""
    if dtype == "F32":
        u = raw.view(np.uint32).astype(np.int64)
        sign = 1 << 31
    else:
        u = raw.view(np.uint16).astype(np.int64)
        sign = 1 << 15
    return np.where(u & sign, -(u & (sign - 1)), u)


def compare_engines(rust: models.Output, torch_out: models.Output, dtype: str) -> None:
    """Same names, dtypes and shapes; values within 1 ulp; and in fact bit-identical
    (the message counts the elements that are not)."""
    assert set(rust.raw) == set(torch_out.raw)
    differing: dict[str, int] = {}
    for name in rust.raw:
        assert torch_out.raw[name][:2] == rust.raw[name][:2] == (dtype, tuple(SHAPES[name])), name
        a, b = rust.array(name), torch_out.array(name)
        ulps = np.abs(ordered_bits(a, dtype) - ordered_bits(b, dtype))
        assert ulps.max(initial=0) <= 1, models.describe_mismatch(name, b, a, dtype)
        if ulps.any():
            differing[name] = int(np.count_nonzero(ulps))
    assert not differing, f"within 1 ulp, but not bit-identical ({dtype}): {differing}"


# --------------------------------------------------------------------------- 1. torch = rust


@pytest.mark.parametrize("family", ["planted", "random"])
@pytest.mark.parametrize("case", list(CASES))
def test_engines_agree(families, mergex_mod, monkeypatch, tmp_path, case, family):
    base, xs = families[family]
    cfg, seed = case_config(case, base, xs)
    rust, torch_out, _ = run_both(
        mergex_mod, monkeypatch, {**cfg, "out_dtype": "float32"}, tmp_path / "f32", seed
    )
    compare_engines(rust, torch_out, "F32")
    if family == "planted" and case in BF16_CASES:
        # No dtype set: the base's (bf16), rounded once to nearest even by both engines.
        rust, torch_out, _ = run_both(mergex_mod, monkeypatch, cfg, tmp_path / "bf16", seed)
        compare_engines(rust, torch_out, "BF16")


@pytest.mark.parametrize("method", METHODS)
def test_engines_agree_large_budget(families, mergex_mod, monkeypatch, tmp_path, method):
    # 4MiB: whole tensors in one chunk, and selections gathered in memory after one pass.
    base, xs = families["random"]
    cfg, seed = case_config(method, base, xs)
    rust, torch_out, _ = run_both(
        mergex_mod, monkeypatch, {**cfg, "out_dtype": "float32"}, tmp_path, seed, "4MiB"
    )
    compare_engines(rust, torch_out, "F32")


@pytest.mark.parametrize("case", ["ties", "dare_linear", "della"])
def test_engines_agree_in_f64(families, mergex_mod, monkeypatch, tmp_path, case):
    # An F64 input: f64 arithmetic, 64-bit magnitude keys (four radix levels), f64 draws'
    # probabilities against f64 magnitudes.
    base, xs = families["wide"]
    cfg, seed = case_config(case, base, xs)
    rust, torch_out, rec = run_both(mergex_mod, monkeypatch, {**cfg, "out_dtype": "float32"}, tmp_path, seed)
    assert rec.dtypes == {torch.float64}
    compare_engines(rust, torch_out, "F32")


def test_magnitude_cuts_take_several_passes(families, mergex_mod, monkeypatch, tmp_path):
    # planted magnitudes: the cut bin is too big to gather at 64KiB, so the sampled band
    # is given up, the radix runs to the last level and a pass counts the ties per chunk:
    # 3 statistics passes, 4 with the L1 of the kept elements. The plan expected the
    # sample to settle the cut in one pass (2 with the L1); both engines agree on both.
    base, xs = families["planted"]
    cfg, seed = case_config("ties_rescale", base, xs)
    _, _, rec = run_both(mergex_mod, monkeypatch, cfg, tmp_path, seed)
    assert rec.ran["lm_head.weight"] == 4
    assert rec.planned["lm_head.weight"] == 2


def test_samples_are_timed_apart_from_the_passes(families, mergex_mod, monkeypatch, tmp_path):
    # A TIES merge of tensors larger than a sample reads one first (run_both checks that both
    # engines then report its seconds); a merge without a selection reads none.
    base, xs = families["planted"]
    for case, samples in (("ties", True), ("task_arithmetic", False)):
        cfg, seed = case_config(case, base, xs)
        _, _, rec = run_both(mergex_mod, monkeypatch, cfg, tmp_path / case, seed)
        assert bool(rec.sampled) == samples, case


def test_progress_ends_at_its_total_with_samples(families, mergex_mod, monkeypatch, tmp_path):
    # The selections' samples are read outside the counted passes: both engines end with
    # the bytes done equal to the planned total, though a sample reads whole small tensors.
    import mergex.api as api

    base, xs = families["planted"]
    cfg, _ = case_config("ties_rescale", base, xs)
    finals = {}
    run = api._run_engine

    def recording(engine, out, on_progress, backend, spec):
        summary = run(engine, out, on_progress, backend, spec)
        finals[backend.engine] = engine.progress()
        return summary

    monkeypatch.setattr(api, "_run_engine", recording)
    for engine in ("rust", "torch"):
        mergex_mod.merge(
            models._plain(cfg), tmp_path / engine, engine=engine, ram_budget="64KiB", progress=False
        )
    for engine, (done, total, tensors_done, tensors) in finals.items():
        assert done == total > 0 and tensors_done == tensors, engine
    assert finals["rust"] == finals["torch"]


# --------------------------------------------------------------------------- 2. random masks


def della_mask_nd(delta: np.ndarray, d: float, eps: float, seed: int, name: str, pos: int) -> np.ndarray:
    """§3 della_magprune for any rank: ranks along axis 1 of a >2-D tensor."""
    if delta.ndim <= 2:
        return ref.mask_della(delta, d, eps, seed, name, pos)
    d, eps = ref.param64(d), ref.param64(eps)
    a = np.abs(delta).reshape(delta.shape[0], delta.shape[1], -1)
    m = a.shape[1]
    order = np.argsort(a, axis=1, kind="stable")
    q = np.empty(a.shape, dtype=np.int64)
    np.put_along_axis(q, order, np.arange(m)[None, :, None], axis=1)
    p = (d - eps) + (2.0 * eps * q.astype(np.float64)) / float(m - 1)
    r = ref.draws(ref.draw_stream(seed, name, pos), np.arange(delta.size, dtype=np.uint64))
    return (r.astype(np.int64) < ref.keep_threshold(p.reshape(-1))).reshape(delta.shape)


def decode_masks(out: models.Output, base: models.Model, name: str) -> list[np.ndarray]:
    """Which experts' elements an output of the ``bits`` family kept."""
    r = (out.f32(name) - base.tensors[name]) * np.float32(4096.0)
    k = np.rint(r).astype(np.int64)
    assert np.array_equal(k, r), f"{name}: the output is not base + a sum of kept deltas"
    return [(k >> (8 - 4 * i)) & 0xF for i in range(3)]


@pytest.mark.parametrize("method", RANDOM_METHODS)
def test_random_masks_identical(families, mergex_mod, monkeypatch, tmp_path, method):
    base, xs = families["bits"]
    densities = [0.5, [0.2, 0.8], 0.35]
    params: list[dict] = [{"weight": 1.0, "density": d} for d in densities]
    if method.startswith("della"):
        for prm, eps in zip(params, (0.2, 0.1, 0.3), strict=True):
            prm["epsilon"] = eps
    entries = [{"model": x, "parameters": p} for x, p in zip(xs, params, strict=True)]
    top = {"rescale": False, "normalize": False}
    cfg = {
        "merge_method": method,
        "base_model": base,
        "models": entries,
        "parameters": top,
        "out_dtype": "float32",
    }
    seed = 2024
    rust, torch_out, _ = run_both(mergex_mod, monkeypatch, cfg, tmp_path, seed)
    for name in SHAPES:
        p = ref.position(name, LAYERS)
        got = decode_masks(torch_out, base, name)
        want = decode_masks(rust, base, name)
        for i, x in enumerate(xs):
            delta = x.tensors[name] - base.tensors[name]
            c = np.rint(delta * np.float32(2.0 ** (4 + 4 * i))).astype(np.int64)
            assert np.all((got[i] == 0) | (got[i] == c)), f"{name} expert {i}: not a kept or dropped delta"
            kept_torch, kept_rust = got[i] != 0, want[i] != 0
            d = ref.lookup([params[i]], "density", name, p)
            if method.startswith("della"):
                kept_ref = della_mask_nd(delta, d, params[i]["epsilon"], seed, name, i)
            else:
                kept_ref = ref.mask_random(delta, d, seed, name, i)
            bad = np.nonzero((kept_torch != kept_rust).reshape(-1))[0]
            assert bad.size == 0, f"{method} {name} expert {i}: masks differ at {bad[:5].tolist()}"
            assert np.array_equal(kept_torch, kept_ref), (
                f"{method} {name} expert {i}: mask is not METHODS.md §3's"
            )
            if delta.size >= 1000:
                assert 0 < kept_torch.sum() < delta.size, name


# Against the numpy reference: test_task_family.py runs every case on both engines.
