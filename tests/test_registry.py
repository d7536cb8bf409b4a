"""The method registry (each method's spec in its Rust file, read through
``_mergex.methods()``) is the one description of a method: these tests fail when a registered
method lacks its numpy reference, its case here, or torch coverage; when the passes it
declares disagree with what the engine plans; and when the README's methods table or
``mergex methods`` disagree with it.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from mergex import METHODS, _mergex
from mergex.errors import ConfigError
from support import models, reference

README = Path(__file__).resolve().parent.parent / "README.md"


def w(weight: float, **more: float) -> dict:
    return {"weight": weight, **more}


# One small case per registered method: (base?, per-model parameters of the experts,
# top-level parameters). A method added to the registry must add its line here.
CASES: dict[str, tuple[bool, list[dict], dict]] = {
    "linear": (False, [w(0.6), w(0.4)], {}),
    "passthrough": (False, [{"scale": 0.5}], {}),
    "task_arithmetic": (True, [w(0.6), w(0.4)], {"lambda": 0.9}),
    "ties": (True, [w(0.6, density=0.5), w(0.4, density=0.3)], {}),
    "dare_ties": (True, [w(0.6, density=0.5), w(0.4, density=0.3)], {}),
    "dare_linear": (True, [w(0.6, density=0.5), w(0.4, density=0.3)], {}),
    "breadcrumbs": (True, [w(0.6, density=0.5, gamma=0.05), w(0.4, density=0.3)], {}),
    "breadcrumbs_ties": (True, [w(0.6, density=0.5), w(0.4, density=0.3, gamma=0.1)], {}),
    "della": (True, [w(0.6, density=0.5, epsilon=0.1), w(0.4, density=0.3, epsilon=0.2)], {}),
    "della_linear": (True, [w(0.6, density=0.5, epsilon=0.1), w(0.4, density=0.3, epsilon=0.2)], {}),
    "slerp": (True, [{}], {"t": 0.3}),
    "nuslerp": (True, [w(0.6), w(0.4)], {}),
    "multislerp": (True, [w(0.6), w(0.4)], {}),
    "karcher": (False, [{}, {}, {}], {}),
    "model_stock": (True, [{}, {}], {"filter_wise": False}),
    "sce": (True, [{}, {}], {"select_topk": 0.4}),
    "ram": (True, [{}, {}], {}),
    "ramplus_tl": (True, [{}, {}], {"r": 0.2}),
    "nearswap": (True, [{}], {"t": 0.01}),
    "arcee_fusion": (True, [{}], {}),
}


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    return [models.make_llama(root / f"m{s}", "bf16", seed=s) for s in range(3)]


def config(name: str, trio) -> dict:
    with_base, params, top = CASES[name]
    base, *experts = trio if with_base else [None, *trio]
    cfg = {
        "merge_method": name,
        "models": [{"model": str(x.path), "parameters": p} for x, p in zip(experts, params, strict=False)],
        "parameters": top,
    }
    if base is not None:
        cfg["base_model"] = str(base.path)
    return cfg


def test_the_python_side_has_no_table_of_its_own():
    assert [m.name for m in _mergex.methods()] == list(METHODS)
    assert set(CASES) == set(METHODS), "every registered method needs a case here, and only they"


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_has_a_reference(name):
    # (Torch coverage: the test below runs every registered method's case through the torch
    # engine's kernels, which must give the Rust engine's bytes.)
    assert hasattr(reference, name) or name in reference.TASK_METHODS, f"{name}: no numpy reference"


@pytest.mark.parametrize("name", list(METHODS))
def test_declared_passes_are_what_the_engine_plans(name, trio, mergex_mod, tmp_path):
    spec = METHODS[name]
    cfg = config(name, trio)
    plan = mergex_mod.plan(cfg, ram_budget="64KiB", threads=2)
    assert plan.max_chunk_elems < max(np.prod(s) for s in models.llama_shapes().values())
    for passes in plan.passes:
        assert spec.passes_min <= passes <= spec.passes_max, (name, plan.passes)
    # And both engines run the case to the same bytes.
    outs = []
    for engine in ("rust", "torch"):
        out = tmp_path / engine
        mergex_mod.merge(cfg, out, engine=engine, ram_budget="64KiB", threads=2, progress=False)
        outs.append(models.read_output(out).raw)
    assert outs[0] == outs[1], f"{name}: the engines differ"


def test_parameter_ranges_come_from_the_registry(trio, mergex_mod):
    cfg = config("sce", trio)
    cfg["parameters"] = {"select_topk": 1.5}
    with pytest.raises(ConfigError, match=r"select_topk.*must be within \[0, 1\], got 1.5"):
        mergex_mod.plan(cfg, ram_budget="64KiB")
    cfg = config("slerp", trio)
    cfg["models"].append({"model": str(trio[2].path)})
    with pytest.raises(ConfigError, match="slerp takes the base model and exactly one other model; got 2"):
        mergex_mod.plan(cfg, ram_budget="64KiB")


def readme_rows() -> dict[str, list[str]]:
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Methods\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"^\| `([a-z_]+)` \|(.*)\|$", line)
        if m:
            rows[m.group(1)] = [c.strip() for c in m.group(2).rsplit("|", 2)]
    return rows


def test_readme_methods_table_matches_the_registry():
    rows = readme_rows()
    assert list(rows) == list(METHODS), "the README's methods table lists other methods"
    for name, spec in METHODS.items():
        _what, base, passes = rows[name]
        assert base.split(" ")[0] == spec.base, (name, base)
        assert passes.split(" ")[0] == spec.passes, (name, passes, spec.passes)


def test_mergex_methods_prints_the_registry():
    res = models.run_cli(["methods"])
    assert res.returncode == 0, res.stderr
    for name, spec in METHODS.items():
        row = next(ln for ln in res.stdout.splitlines() if f" {name} " in ln)
        assert f" {spec.base} " in row and f" {spec.passes} " in row, row
    assert "ready" not in res.stdout and "status" not in res.stdout
