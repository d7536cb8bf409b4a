"""Multi-stage recipes (mergekit-multi's format): named documents used as models by later
ones run in dependency order; the final document goes to OUT and equals the same merges run
one by one; --lazy reuses a complete stage; cycles and duplicate names are errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from mergex import ConfigError
from support import models


def write_recipe(path: Path, docs: list[dict]) -> Path:
    path.write_text(yaml.safe_dump_all([models._plain(d) for d in docs], sort_keys=False))
    return path


@pytest.fixture
def trio(make_model):
    return [make_model(n, seed=s) for n, s in (("a", 1), ("b", 2), ("c", 3))]


def docs(a, b, c) -> list[dict]:
    # The final document first: the order in the file does not matter, the references do.
    return [
        {
            "merge_method": "task_arithmetic",
            "base_model": str(c.path),
            "models": [{"model": "first", "parameters": {"weight": 0.5}}, {"model": str(b.path)}],
            "parameters": {"weight": 0.25},
        },
        {
            "name": "first",
            "merge_method": "linear",
            "models": [
                {"model": str(a.path), "parameters": {"weight": 0.6}},
                {"model": str(b.path), "parameters": {"weight": 0.4}},
            ],
        },
    ]


def test_stages_run_in_order_and_equal_the_merges_run_one_by_one(mergex_mod, trio, tmp_path):
    a, b, c = trio
    recipe = write_recipe(tmp_path / "recipe.yml", docs(a, b, c))
    out = tmp_path / "out"
    result = mergex_mod.merge(recipe, out, ram_budget="64KiB", progress=None)
    assert (out / "mergex_recipe.yml").read_text() == recipe.read_text()
    # By hand: the first stage, then the final document on its output.
    first, final = docs(a, b, c)[1], docs(a, b, c)[0]
    del first["name"]
    mergex_mod.merge(first, tmp_path / "by-hand-first", ram_budget="64KiB", progress=None)
    final["models"][0]["model"] = str(tmp_path / "by-hand-first")
    mergex_mod.merge(final, tmp_path / "by-hand", ram_budget="64KiB", progress=None)
    assert models.read_output(out).raw == models.read_output(tmp_path / "by-hand").raw
    # The stage's folder is gone, and nothing else is left beside the output.
    assert not (tmp_path / ".out.stages").exists()
    assert result.out_dir.resolve() == out.resolve()


def test_lazy_reuses_a_complete_stage(mergex_mod, trio, tmp_path):
    a, b, c = trio
    recipe = write_recipe(tmp_path / "recipe.yml", docs(a, b, c))
    stages = tmp_path / "stages"
    mergex_mod.merge(recipe, tmp_path / "out", intermediate_dir=stages, lazy=True, progress=None)
    stamp = (stages / "first" / "model.safetensors").stat().st_mtime_ns
    result = mergex_mod.merge(
        recipe, tmp_path / "out", intermediate_dir=stages, lazy=True, overwrite=True, progress=None
    )
    assert (stages / "first" / "model.safetensors").stat().st_mtime_ns == stamp
    assert any("stage first: reused" in w for w in result.warnings)


def test_cycles_and_duplicate_names_are_errors(mergex_mod, trio, tmp_path):
    a, b, _ = trio
    linear = {"merge_method": "linear", "parameters": {"weight": 1.0}}
    cyclic = [
        {**linear, "name": "x", "models": [{"model": "y"}, {"model": str(a.path)}]},
        {**linear, "name": "y", "models": [{"model": "x"}, {"model": str(b.path)}]},
        {**linear, "models": [{"model": "x"}]},
    ]
    with pytest.raises(ConfigError, match=r"the stages form a cycle: .*x -> y -> x"):
        mergex_mod.merge(write_recipe(tmp_path / "cyclic.yml", cyclic), tmp_path / "out", progress=None)
    twice = [
        {**linear, "name": "x", "models": [{"model": str(a.path)}]},
        {**linear, "name": "x", "models": [{"model": str(b.path)}]},
    ]
    with pytest.raises(ConfigError, match="two documents are named 'x'"):
        mergex_mod.merge(write_recipe(tmp_path / "twice.yml", twice), tmp_path / "out", progress=None)
    assert not (tmp_path / "out").exists()


def test_the_cli_runs_a_recipe(trio, tmp_path):
    a, b, c = trio
    recipe = write_recipe(tmp_path / "recipe.yml", docs(a, b, c))
    res = models.run_cli(["merge", recipe, tmp_path / "out", "--keep-intermediates", "-q"])
    assert res.returncode == 0, res.stderr
    assert (tmp_path / ".out.stages" / "first" / "model.safetensors").is_file()
    assert (tmp_path / "out" / "model.safetensors").is_file()
