"""slerp, nuslerp, multislerp, karcher, model_stock, sce, ram, ramplus_tl, nearswap and
arcee_fusion (METHODS.md §4, §5) against the numpy reference in ``reference.py``.

Every merge runs with the smallest RAM budget, so the whole-tensor statistics (norms, dot
products, Gram matrices, variance cuts, quartiles) are gathered over many chunks.

The models are built tensor by tensor from *kinds*: each kind plants one situation a method
must get right (exactly parallel or antiparallel vectors, a zero-norm input, a task vector
that is zero, rows or columns that differ in kind, equal variances at the top-k cut, models
active alone or together). Planted values sit on a coarse power-of-two grid, so they are
exact in bf16 and f32 and every f64 sum over them is exact in any order: the branch a
method takes on them cannot depend on how the engine orders its sums. Each method gets a
map from tensor to kind, in a bf16 and an f32 copy; the reference always works on the
values as stored.

Methods marked EXACT are compared bit for bit; multislerp and karcher (computed by the
engine on the Gram matrix, by the reference on the materialized vectors) with a tolerance.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import models
import numpy as np
import pytest
import reference as ref
import test_memory
import test_task_family

F32 = np.float32
LAYERS = 3  # p = 0, 0.5, 1 for layers 0, 1, 2
SHAPES = models.llama_shapes(layers=LAYERS)
NAMES = list(SHAPES)
GRID_B = 2.0**-6  # planted bases: j · 2^-6 with |j| <= 31
GRID_D = 2.0**-8  # planted deltas: k · 2^-8 with |k| <= 3 (b + 2d stays within 8 bits)

# The tensors, by role (3 layers of q_proj (96, 96), up_proj (250, 96), input_layernorm (96,)).
EMBED, NORM, HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"


def q(i):
    return f"model.layers.{i}.self_attn.q_proj.weight"


def up(i):
    return f"model.layers.{i}.mlp.up_proj.weight"


def ln(i):
    return f"model.layers.{i}.input_layernorm.weight"


# --------------------------------------------------------------------------- kinds
#
# A kind maps (rng, shape, is_norm) to the base and the three experts' float32 values (before
# rounding to the storage dtype).


def _base(rng, shape, is_norm):
    x = rng.standard_normal(shape).astype(F32)
    return (F32(1) + F32(0.1) * x) if is_norm else F32(0.05) * x


def _grid_base(rng, shape):
    return (rng.integers(-31, 32, shape) * GRID_B).astype(F32)


def _grid_delta(rng, shape, levels=(-3, -2, -1, 1, 2, 3)):
    return (rng.choice(np.array(levels), shape) * GRID_D).astype(F32)


def kind_related(rng, shape, is_norm):
    b = _base(rng, shape, is_norm)
    return b, [b + F32(0.01) * rng.standard_normal(shape).astype(F32) for _ in range(3)]


def kind_independent(rng, shape, is_norm):
    return _base(rng, shape, is_norm), [_base(rng, shape, is_norm) for _ in range(3)]


def kind_parallel(rng, shape, is_norm):
    # Every vector a multiple of b (exact): raw values and task vectors alike are parallel.
    b = _grid_base(rng, shape)
    return b, [F32(1.5) * b, F32(2) * b, F32(3) * b]


def kind_near_parallel(rng, shape, is_norm):
    # cos(b, x_i) ~ 0.9997 (slerp's linear branch, visibly different from the arc), 0.999
    # and 0.998 (the arc, at a small angle).
    b = _base(rng, shape, is_norm)
    sd = float(np.std(b))
    xs = []
    for s, gap in ((1.5, 3e-4), (2.0, 1e-3), (0.5, 2e-3)):
        noise = rng.standard_normal(shape).astype(F32) * F32(s * sd * math.sqrt(2 * gap))
        xs.append(F32(s) * b + noise)
    return b, xs


def kind_antiparallel(rng, shape, is_norm):
    # x0 = -b (slerp at dot = -1); x0 and x1 exact opposites (nuslerp without a base).
    b = _grid_base(rng, shape)
    return b, [-b, b.copy(), b + _grid_delta(rng, shape)]


def kind_opposite(rng, shape, is_norm):
    # Task vectors δ1 = -δ0 exactly; δ2 unrelated.
    b = _grid_base(rng, shape)
    d = _grid_delta(rng, shape)
    return b, [b + d, b - d, b + _grid_delta(rng, shape)]


def _mixed(rng, shape, axis):
    """Per row (axis 0) or column (axis 1), by index mod 4: δ1 = -δ0; δ0 = 0; δ1 = 2δ0; unrelated."""
    b = _grid_base(rng, shape)
    d, e = _grid_delta(rng, shape), _grid_delta(rng, shape)
    idx = np.arange(shape[axis]) % 4
    sel = idx[:, None] if axis == 0 else idx[None, :]
    x0 = np.where(sel == 1, b, b + d)
    x1 = np.select([sel == 0, sel == 1, sel == 2], [b - d, b + d, b + F32(2) * d], b + e)
    return b, [x0.astype(F32), x1.astype(F32), b + _grid_delta(rng, shape)]


def kind_rowmix(rng, shape, is_norm):
    return _mixed(rng, shape, 0)


def kind_colmix(rng, shape, is_norm):
    return _mixed(rng, shape, 1)


def kind_zeros(rng, shape, is_norm):
    # x0 is all zeros (a zero-norm input; with a base, δ0 = -b).
    b, xs = kind_related(rng, shape, is_norm)
    return b, [np.zeros(shape, F32), xs[1], xs[2]]


def kind_zero_base(rng, shape, is_norm):
    return np.zeros(shape, F32), kind_independent(rng, shape, is_norm)[1]


def kind_all_zero(rng, shape, is_norm):
    return np.zeros(shape, F32), [np.zeros(shape, F32) for _ in range(3)]


def kind_equal(rng, shape, is_norm):
    b = _base(rng, shape, is_norm)
    return b, [b.copy() for _ in range(3)]


def kind_grid(rng, shape, is_norm):
    # δ_i in {-2, ..., 2} · 2^-8: few distinct variances, so long ties at any top-k cut,
    # zero deltas, and sign sums of exactly 0.
    b = _grid_base(rng, shape)
    return b, [b + _grid_delta(rng, shape, (-2, -1, 0, 1, 2)) for _ in range(3)]


def kind_tiny(rng, shape, is_norm):
    # Mean squares of the task vectors sum to < 1e-6: sce's matrix weights fall back to uniform.
    b = _base(rng, shape, is_norm)
    return b, [b + F32(1e-4) * rng.standard_normal(shape).astype(F32) for _ in range(3)]


SMALL = 2.0**-17  # below ram's epsilon 1e-5 (and exact next to bases of at most 2^-4)
STEP = 2.0**-10  # active deltas: 1..8 steps (the smallest below epsilon 1.5e-3, the rest above)


def _sparse(rng, shape, active):
    b = (rng.integers(-64, 65, shape) * STEP).astype(F32)
    xs = []
    for a in active:
        big = rng.choice(np.array([-8, -5, -2, -1, 1, 2, 3, 7]), shape) * STEP
        small = rng.choice(np.array([-SMALL, 0.0, SMALL]), shape)
        xs.append((b + np.where(a, big, small)).astype(F32))
    return b, xs


def kind_sparse(rng, shape, is_norm):
    # ram activity: model 0 active on half the elements, mostly alone (shared/unique ~ 0.17,
    # under alpha); model 1 on 5%, half of them shared (ratio ~ 1, capped); model 2 only where
    # model 0 is (no unique elements at all: ratio shared/epsilon, capped).
    a0 = rng.random(shape) < 0.5
    a1 = rng.random(shape) < 0.05
    a2 = a0 & (rng.random(shape) < 0.1)
    return _sparse(rng, shape, [a0, a1, a2])


def kind_sparse_disjoint(rng, shape, is_norm):
    # Model 1 active only where no other model is: it shares nothing (ratio 0, λ = 1).
    a0 = rng.random(shape) < 0.4
    a2 = rng.random(shape) < 0.2
    a1 = ~a0 & ~a2 & (rng.random(shape) < 0.3)
    return _sparse(rng, shape, [a0, a1, a2])


Kind = Callable[..., tuple[np.ndarray, list[np.ndarray]]]

# Spherical methods: slerp (base + x0), nuslerp (x0, x1), multislerp.
GEO: dict[str, Kind] = {
    EMBED: kind_related,
    q(0): kind_parallel,
    up(0): kind_near_parallel,
    ln(0): kind_related,
    q(1): kind_opposite,
    up(1): kind_rowmix,
    ln(1): kind_zeros,
    q(2): kind_antiparallel,
    up(2): kind_colmix,
    ln(2): kind_zero_base,
    NORM: kind_related,
    HEAD: kind_independent,
}
# karcher averages raw values (the base included): no antipodal inputs, but all-zero ones.
KARCHER = {**GEO, q(2): kind_all_zero}
STOCK = {
    EMBED: kind_related,
    q(0): kind_opposite,
    up(0): kind_rowmix,
    ln(0): kind_related,
    q(1): kind_equal,
    up(1): kind_independent,
    ln(1): kind_opposite,
    q(2): kind_parallel,
    up(2): kind_colmix,
    ln(2): kind_zeros,
    NORM: kind_related,
    HEAD: kind_related,
}
SCE = {
    EMBED: kind_grid,
    q(0): kind_grid,
    up(0): kind_related,
    ln(0): kind_tiny,
    q(1): kind_sparse,
    up(1): kind_grid,
    ln(1): kind_equal,
    q(2): kind_opposite,
    up(2): kind_tiny,
    ln(2): kind_grid,
    NORM: kind_related,
    HEAD: kind_grid,
}
RAM = {
    EMBED: kind_sparse,
    q(0): kind_sparse_disjoint,
    up(0): kind_grid,
    ln(0): kind_equal,
    q(1): kind_related,
    up(1): kind_sparse,
    ln(1): kind_sparse_disjoint,
    q(2): kind_sparse,
    up(2): kind_sparse_disjoint,
    ln(2): kind_all_zero,
    NORM: kind_related,
    HEAD: kind_sparse,
}
NEAR = {
    EMBED: kind_related,
    q(0): kind_rowmix,
    up(0): kind_independent,
    ln(0): kind_related,
    q(1): kind_equal,
    up(1): kind_grid,
    ln(1): kind_sparse,
    q(2): kind_related,
    up(2): kind_near_parallel,
    ln(2): kind_grid,
    NORM: kind_related,
    HEAD: kind_sparse,
}
MAPS = {"geo": GEO, "karcher": KARCHER, "stock": STOCK, "sce": SCE, "ram": RAM, "near": NEAR}


class Family:
    def __init__(self, base: models.Model, xs: list[models.Model]):
        self.base, self.xs = base, xs


def build_family(root: Path, kinds: dict[str, Kind], dtype: str, seed: int) -> Family:
    assert list(kinds) == NAMES
    rng = np.random.default_rng(seed)
    base_t: dict[str, np.ndarray] = {}
    xs_t: list[dict[str, np.ndarray]] = [{}, {}, {}]
    for name, shape in SHAPES.items():
        b, xs = kinds[name](rng, shape, len(shape) == 1)
        base_t[name] = b
        for i, x in enumerate(xs):
            assert x.shape == shape and x.dtype == F32, name
            xs_t[i][name] = x
    base = models.write_model(root / "base", base_t, dtype, layers=LAYERS)
    xs = [models.write_model(root / f"expert_{i}", t, dtype, layers=LAYERS) for i, t in enumerate(xs_t)]
    return Family(base, xs)


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


# --------------------------------------------------------------------------- cases
#
# A case builds (config, expected) from a family: expected maps every output tensor name to
# float32 values (EXACT) or float64 values (TOL).


def entries(xs, params=None):
    return [
        {"model": x, "parameters": dict(p)} if p else {"model": x}
        for x, p in zip(xs, params or [None] * len(xs), strict=True)
    ]


def resolve(params: dict | None, key: str, name: str, default=None):
    return ref.lookup([params], key, name, ref.position(name, LAYERS), default)


class Case:
    def __init__(self, method: str, kind_map: str, exact: bool, build):
        self.method, self.kind_map, self.exact, self.build = method, kind_map, exact, build


CASES: dict[str, Case] = {}


def case(name: str, method: str, kind_map: str, exact: bool = True):
    def register(fn):
        CASES[name] = Case(method, kind_map, exact, fn)
        return fn

    return register


T_SLERP = [{"filter": "mlp", "value": [0.2, 0.9]}, {"filter": "layernorm", "value": 0.75}, {"value": 0.3}]


@case("slerp", "slerp", "geo")
def _(f: Family):
    top = {"t": T_SLERP}
    cfg = {"merge_method": "slerp", "base_model": f.base, "models": entries([f.xs[0]]), "parameters": top}
    return cfg, {n: ref.slerp(f.base.tensors[n], f.xs[0].tensors[n], resolve(top, "t", n)) for n in NAMES}


@case("slerp_base_listed", "slerp", "geo")
def _(f: Family):
    # mergekit style: both models listed, the base one of them; expert x1; t from 0 to 1.
    top = {"t": [0.0, 1.0]}
    cfg = {
        "merge_method": "slerp",
        "base_model": f.base,
        "models": entries([f.base, f.xs[1]]),
        "parameters": top,
    }
    return cfg, {n: ref.slerp(f.base.tensors[n], f.xs[1].tensors[n], resolve(top, "t", n)) for n in NAMES}


def nuslerp_case(weights, with_base, flatten=None, row_wise=None):
    def build(f: Family):
        top = {}
        if flatten is not None:
            top["nuslerp_flatten"] = flatten
        if row_wise is not None:
            top["nuslerp_row_wise"] = row_wise
        cfg = {
            "merge_method": "nuslerp",
            "models": entries(f.xs[:2], [{"weight": w} for w in weights]),
        }
        if top:
            cfg["parameters"] = top
        if with_base:
            cfg["base_model"] = f.base
        exp = {}
        for n in NAMES:
            b = f.base.tensors[n] if with_base else None
            exp[n] = ref.nuslerp(
                [f.xs[0].tensors[n], f.xs[1].tensors[n]],
                [resolve(cfg["models"][i]["parameters"], "weight", n) for i in range(2)],
                b,
                flatten=True if flatten is None else flatten,
                row_wise=False if row_wise is None else row_wise,
            )
        return cfg, exp

    return build


# Exactly parallel or opposite vectors are planted on the grid: their sums are exact, so the
# engine and the reference take the same branch (1 - cos² <= 1e-16 or not) on them. Dyadic t
# (0.25, 0.5, 0.75) also makes the arc round to the straight line's f32 coefficients at θ ~ 0;
# other weights (0.4 / 0.6, a gradient, a zero sum) test t = w2 / (w1 + w2) itself.
CASES["nuslerp_base_whole"] = Case("nuslerp", "geo", True, nuslerp_case([0.75, 0.25], True))
CASES["nuslerp_base_rows"] = Case("nuslerp", "geo", True, nuslerp_case([1.0, 3.0], True, flatten=False))
CASES["nuslerp_base_columns"] = Case(
    "nuslerp", "geo", True, nuslerp_case([0.5, [0.5, 1.5]], True, flatten=False, row_wise=True)
)
# row_wise only matters with flatten off.
CASES["nuslerp_base_whole_row_wise"] = Case(
    "nuslerp", "geo", True, nuslerp_case([1.0, 1.0], True, row_wise=True)
)
CASES["nuslerp_whole"] = Case("nuslerp", "geo", True, nuslerp_case([0.4, 0.6], False))
CASES["nuslerp_rows"] = Case("nuslerp", "geo", True, nuslerp_case([2.0, 2.0], False, flatten=False))
# w1 + w2 = 0: t = 0.5.
CASES["nuslerp_columns"] = Case(
    "nuslerp", "geo", True, nuslerp_case([1.0, -1.0], False, flatten=False, row_wise=True)
)


def multislerp_case(n_models, weights, with_base, normalize=None):
    def build(f: Family):
        xs = f.xs[:n_models]
        cfg = {"merge_method": "multislerp", "models": entries(xs, [{"weight": w} for w in weights])}
        if normalize is not None:
            cfg["parameters"] = {"normalize_weights": normalize}
        if with_base:
            cfg["base_model"] = f.base
        exp = {}
        for n in NAMES:
            exp[n] = ref.multislerp(
                [x.tensors[n] for x in xs],
                [resolve({"weight": w}, "weight", n) for w in weights],
                f.base.tensors[n] if with_base else None,
                normalize_weights=True if normalize is None else normalize,
            )
        return cfg, exp

    return build


CASES["multislerp"] = Case("multislerp", "geo", False, multislerp_case(3, [0.5, 0.3, 0.2], False))
CASES["multislerp_base"] = Case("multislerp", "geo", False, multislerp_case(3, [1.0, [2.0, 1.0], 3.0], True))
# Two task vectors, equal weights: exact opposites on q_proj of layer 1 (‖m‖ = 0 → w1 v1 + w2 v2 + b).
CASES["multislerp_base_two"] = Case("multislerp", "geo", False, multislerp_case(2, [1.0, 1.0], True))
CASES["multislerp_unnormalized"] = Case(
    "multislerp", "geo", False, multislerp_case(3, [0.6, 0.6, 0.3], False, False)
)
CASES["multislerp_one"] = Case("multislerp", "geo", False, multislerp_case(1, [0.7], False))


def karcher_case(n_models, with_base, top=None):
    def build(f: Family):
        xs = f.xs[:n_models]
        cfg = {"merge_method": "karcher", "models": entries(xs)}
        if with_base:
            cfg["base_model"] = f.base
        if top:
            cfg["parameters"] = dict(top)
        exp = {}
        for n in NAMES:
            inputs = [x.tensors[n] for x in xs] + ([f.base.tensors[n]] if with_base else [])
            exp[n] = ref.karcher(
                inputs,
                max_iter=resolve(top, "max_iter", n, 10),
                tol=resolve(top, "tol", n, 1e-5),
            )
        return cfg, exp

    return build


CASES["karcher"] = Case("karcher", "karcher", False, karcher_case(3, False))
CASES["karcher_base"] = Case("karcher", "karcher", False, karcher_case(2, True))
CASES["karcher_few_iterations"] = Case(
    "karcher", "karcher", False, karcher_case(3, True, {"max_iter": 2, "tol": 1e-3})
)


def stock_case(n_models, filter_wise=None):
    def build(f: Family):
        xs = f.xs[:n_models]
        cfg = {"merge_method": "model_stock", "base_model": f.base, "models": entries(xs)}
        if filter_wise is not None:
            cfg["parameters"] = {"filter_wise": filter_wise}
        exp = {
            n: ref.model_stock(f.base.tensors[n], [x.tensors[n] for x in xs], bool(filter_wise))
            for n in NAMES
        }
        return cfg, exp

    return build


CASES["model_stock_two"] = Case("model_stock", "stock", True, stock_case(2))
CASES["model_stock_three"] = Case("model_stock", "stock", True, stock_case(3))
CASES["model_stock_two_filter_wise"] = Case("model_stock", "stock", True, stock_case(2, True))
CASES["model_stock_three_filter_wise"] = Case("model_stock", "stock", True, stock_case(3, True))


def task_case(method, kind_map, n_models, top, fn):
    def build(f: Family):
        xs = f.xs[:n_models]
        cfg = {"merge_method": method, "base_model": f.base, "models": entries(xs)}
        if top:
            cfg["parameters"] = dict(top)
        exp = {n: fn(f.base.tensors[n], [x.tensors[n] for x in xs], n) for n in NAMES}
        return cfg, exp

    return Case(method, kind_map, True, build)


SCE_TOPK = [{"filter": "norm", "value": 0.0}, {"filter": "up_proj", "value": [0.1, 0.9]}, {"value": 0.37}]
CASES["sce"] = task_case("sce", "sce", 3, None, lambda b, xs, n: ref.sce(b, xs))
CASES["sce_topk"] = task_case("sce", "sce", 3, {"select_topk": 0.3}, lambda b, xs, n: ref.sce(b, xs, 0.3))
CASES["sce_topk_per_tensor"] = task_case(
    "sce",
    "sce",
    2,
    {"select_topk": SCE_TOPK},
    lambda b, xs, n: ref.sce(b, xs, resolve({"select_topk": SCE_TOPK}, "select_topk", n)),
)
CASES["ram"] = task_case("ram", "ram", 3, None, lambda b, xs, n: ref.ram(b, xs))
CASES["ram_epsilon"] = task_case(
    "ram", "ram", 2, {"epsilon": 1.5e-3}, lambda b, xs, n: ref.ram(b, xs, 1.5e-3)
)
CASES["ramplus_tl"] = task_case("ramplus_tl", "ram", 3, None, lambda b, xs, n: ref.ramplus_tl(b, xs))
RAMPLUS_TOP = {"epsilon": 1.5e-3, "r": 0.5, "alpha": 0.1}
CASES["ramplus_tl_params"] = task_case(
    "ramplus_tl", "ram", 3, RAMPLUS_TOP, lambda b, xs, n: ref.ramplus_tl(b, xs, 1.5e-3, 0.5, 0.1)
)
T_NEAR = [{"filter": "self_attn", "value": [0.001, 0.02]}, {"value": 0.005}]
CASES["nearswap"] = task_case(
    "nearswap",
    "near",
    1,
    {"t": T_NEAR},
    lambda b, xs, n: ref.nearswap(b, xs[0], resolve({"t": T_NEAR}, "t", n)),
)
CASES["nearswap_large_t"] = task_case(
    "nearswap", "near", 1, {"t": 0.5}, lambda b, xs, n: ref.nearswap(b, xs[0], 0.5)
)


def arcee_case(kind_map, expert):
    def build(f: Family):
        x = f.xs[expert]
        cfg = {"merge_method": "arcee_fusion", "base_model": f.base, "models": entries([x])}
        exp = {n: ref.arcee_fusion(f.base.tensors[n], x.tensors[n]) for n in NAMES}
        ties = {n: ref.arcee_fusion_ties(f.base.tensors[n], x.tensors[n]) for n in NAMES}
        either = {n: t for n, t in ties.items() if t[0].any()}
        ARCEE_TIES[(kind_map, f.base.dtype, expert)] = {n: int(t[0].sum()) for n, t in either.items()}
        return cfg, exp, either

    return Case("arcee_fusion", kind_map, True, build)


# Exact ties at the threshold met by the cases (reported by test_arcee_fusion_ties).
ARCEE_TIES: dict = {}
CASES["arcee_fusion"] = arcee_case("near", 0)
# The zero-base 1-D tensor of this family (imp = |x| · KL of its one row) has a bf16 element
# exactly at median + 1.5 IQR.
CASES["arcee_fusion_x1"] = arcee_case("geo", 1)


# --------------------------------------------------------------------------- comparing


def ulp(x: np.ndarray, dtype: str) -> np.ndarray:
    """One unit in the last place of |x| in ``dtype`` (at least the smallest normal's)."""
    mant = {"F32": 23, "BF16": 7, "F16": 10}[dtype]
    tiny = {"F32": 2.0**-126, "BF16": 2.0**-126, "F16": 2.0**-14}[dtype]
    a = np.maximum(np.abs(np.asarray(x, dtype=np.float64)), tiny)
    return np.exp2(np.floor(np.log2(a)) - mant)


def assert_close(out: models.Output, name: str, want: np.ndarray, dtype: str, scale: float) -> None:
    """|got - ref| <= 1e-5 · scale + 1 ulp of the output dtype (at the reference value).

    ``scale`` is the largest magnitude among the reference and the inputs: with a base the
    engine adds it back in f32 (out = r · Σ w n + b), so an output that cancels to ~0 still
    carries rounding errors of the size of b's ulps.
    """
    assert out.dtype(name) == dtype, f"{name}: dtype {out.dtype(name)}, expected {dtype}"
    got = out.f32(name).astype(np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape}, expected {want.shape}"
    scale = max(scale, float(np.max(np.abs(want))) if want.size else 0.0)
    tol = 1e-5 * scale + ulp(want, dtype)
    err = np.abs(got - want)
    bad = np.nonzero((err > tol).reshape(-1))[0]
    if bad.size:
        g, w = got.reshape(-1), want.reshape(-1)
        lines = [f"{name} ({dtype}): {bad.size} of {got.size} elements off by more than the tolerance"]
        lines += [f"  [{j}] got {g[j]!r} want {w[j]!r}" for j in bad[:5]]
        raise AssertionError("\n".join(lines))


def check(out: models.Output, expected: dict, dtype: str, exact: bool, f: Family, either=None) -> None:
    """Compare every tensor; ``either[name] = (mask, alternative)``: where ``mask`` is set
    the engine may also give ``alternative`` (a decision within f64 noise of an exact tie)."""
    assert set(out.raw) == set(expected), "output tensor names differ from the inputs'"
    for name, want in expected.items():
        if exact:
            if either and name in either:
                mask, alt = either[name]
                got = out.f32(name)
                alt_ok = mask & (ref.round_to(alt, dtype) == got)
                want = np.where(alt_ok, alt, want).astype(F32)
            models.assert_tensor_equal(out, name, want, dtype)
        else:
            scale = max(float(np.abs(m.tensors[name]).max()) for m in [f.base, *f.xs])
            assert_close(out, name, want, dtype, scale)


# --------------------------------------------------------------------------- 1. reference


@pytest.mark.parametrize("dtype", ["bf16", "f32"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(family, run_merge, out_dir, name, dtype):
    c = CASES[name]
    f = family(c.kind_map, dtype)
    cfg, expected, *either = c.build(f)
    either = either[0] if either else None
    assert cfg["merge_method"] == c.method
    # float32 output: the engine's working values themselves.
    out = run_merge({**cfg, "out_dtype": "float32"}, out_dir.parent / "f32")
    check(out, expected, "F32", c.exact, f, either)
    if dtype == "bf16":
        # No dtype set: the base's (bf16; the first model's without a base), rounded once.
        out = run_merge(cfg, out_dir.parent / "bf16")
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
N_MEM = test_task_family.MEM_SHAPE[0] * test_task_family.MEM_SHAPE[1]
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
    test_task_family.write_one_tensor_model(root / "base", base)
    for i in range(2):
        x = base + rng.integers(1, 8, N_MEM, dtype=np.uint16)
        if i == 1:
            x ^= (rng.integers(0, 50, N_MEM, dtype=np.uint8) == 0).astype(np.uint16) << np.uint16(15)
        test_task_family.write_one_tensor_model(root / f"x{i}", x)
        del x
    return root


def run_measured(cfg: dict, tmp_path: Path, name: str) -> Path:
    cfg_path = models.dump_yaml(cfg, tmp_path / f"{name}.yml")
    out = tmp_path / name
    cmd = [*models.mergex_cmd(), "merge", str(cfg_path), str(out), "--ram-budget", "16MiB", "--quiet"]
    rc, rss, stderr = test_memory.peak_rss(cmd, tmp_path)
    assert rc == 0, stderr
    n_in = len(cfg["models"]) + (1 if "base_model" in cfg else 0)
    total_in = 2 * N_MEM * n_in
    msg = (
        f"{name} peak RSS {rss / MiB:.1f} MiB, budget {MEM_BUDGET / MiB:.0f} MiB, "
        f"inputs {total_in / MiB:.0f} MiB"
    )
    print(msg)
    assert rss < MEM_BUDGET + test_memory.SLACK, msg
    assert rss < 0.8 * total_in, msg
    return out


def views(root: Path, *names: str) -> list[np.ndarray]:
    return [test_task_family.bf16_view(root / n) for n in names]


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
    a, c, o = [*views(root, "base", "x1"), test_task_family.bf16_view(out)]
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
    b, x0, x1, o = [*views(root, "base", "x0", "x1"), test_task_family.bf16_view(out)]
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
    b, x0, x1, o = [*views(root, "base", "x0", "x1"), test_task_family.bf16_view(out)]
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
    line = test_task_family.error_line(res.stderr)
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


ANTIPODAL = up(1)


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


def antipodal_config(ms):
    return {"merge_method": "multislerp", "models": entries(ms, [{"weight": 1.0}] * 3)}


def test_multislerp_antipodal_cli(tmp_path, antipodal):
    cfg_path = models.dump_yaml(antipodal_config(antipodal), tmp_path / "merge.yml")
    outs = tmp_path / "outs"
    outs.mkdir()
    res = models.run_cli(["merge", cfg_path, outs / "merged", "--ram-budget", "64KiB", "--quiet"])
    line = test_task_family.error_line(res.stderr)
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
