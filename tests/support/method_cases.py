"""The cases of the methods beyond the task-vector family (METHODS.md §4, §5): slerp,
nuslerp, multislerp, karcher, model_stock, sce, ram, ramplus_tl, nearswap and arcee_fusion.

The models are built tensor by tensor from *kinds*: each kind plants one situation a method
must get right (exactly parallel or antiparallel vectors, a zero-norm input, a task vector
that is zero, rows or columns that differ in kind, equal variances at the top-k cut, models
active alone or together), and ``MAPS`` gives each method family its map from tensor to
kind (``build_family`` writes one). A case (``CASES``) builds a config and the numpy
reference's expected tensors from a family; ``check`` compares an output with them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from support import models
from support import reference as ref

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


ANTIPODAL = up(1)


def antipodal_config(ms):
    return {"merge_method": "multislerp", "models": entries(ms, [{"weight": 1.0}] * 3)}
