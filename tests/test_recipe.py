"""Multi-stage recipes (mergekit-multi's format): named documents used as models by later
ones run in dependency order; the final document goes to OUT and equals the same merges run
one by one; an element-wise stage that feeds one element-wise stage is fused into it (not
written, the same bytes); --lazy reuses a complete stage; cycles and duplicate names are
errors."""

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
    # Both stages are element-wise: the first was computed as the final one read it.
    assert result.warnings == ["stage first: fused into document 1 (not written)"]


def test_fused_stages_give_the_bytes_of_written_ones(mergex_mod, trio, tmp_path):
    # A chain of three element-wise stages (two fused, one into the other) and a TIES reader
    # of another stage (not element-wise: that stage is written): the same bytes as the
    # recipe with every stage written (--keep-intermediates fuses nothing), reading less.
    from mergex import _mergex

    a, b, c = trio
    chain = [
        {
            "name": "one",
            "merge_method": "linear",
            "models": [
                {"model": str(a.path), "parameters": {"weight": 0.7}},
                {"model": str(b.path), "parameters": {"weight": 0.3}},
            ],
        },
        {
            "name": "two",
            "merge_method": "task_arithmetic",
            "base_model": str(c.path),
            "models": [{"model": "one", "parameters": {"weight": 0.5}}],
            "out_dtype": "float32",
        },
        {
            "name": "three",
            "merge_method": "linear",
            "models": [
                {"model": str(a.path), "parameters": {"weight": 0.5}},
                {"model": str(c.path), "parameters": {"weight": 0.5}},
            ],
        },
        {
            "merge_method": "ties",
            "base_model": str(c.path),
            "models": [
                {"model": "two", "parameters": {"weight": 0.5, "density": 0.5}},
                {"model": "three", "parameters": {"weight": 0.5, "density": 0.5}},
            ],
        },
    ]
    # "two" feeds TIES: written; "one" feeds "two" (element-wise): fused; "three" too is read
    # by TIES: written.
    recipe = write_recipe(tmp_path / "recipe.yml", chain)
    before = _mergex.bytes_read()
    fused = mergex_mod.merge(recipe, tmp_path / "fused", ram_budget="64KiB", progress=None)
    fused_read = _mergex.bytes_read() - before
    before = _mergex.bytes_read()
    kept = mergex_mod.merge(
        recipe, tmp_path / "kept", ram_budget="64KiB", keep_intermediates=True, progress=None
    )
    kept_read = _mergex.bytes_read() - before
    assert fused.warnings == ["stage one: fused into two (not written)"]
    # The torch engine reads the fused stage's tensors through the same reader.
    torch_run = mergex_mod.merge(
        recipe, tmp_path / "torch", ram_budget="64KiB", engine="torch", progress=None
    )
    assert torch_run.warnings == fused.warnings
    assert models.read_output(tmp_path / "torch").raw == models.read_output(tmp_path / "fused").raw
    assert not any("fused" in w for w in kept.warnings)
    assert models.read_output(tmp_path / "fused").raw == models.read_output(tmp_path / "kept").raw
    assert fused_read < kept_read
    # A fused stage of two fused stages: the first stage's tensors computed inside the second's.
    nested = [
        chain[0],
        {**chain[1], "out_dtype": "bfloat16"},
        {
            "merge_method": "linear",
            "models": [
                {"model": "two", "parameters": {"weight": 1.0}},
                {"model": str(b.path), "parameters": {"weight": 1.0}},
            ],
        },
    ]
    recipe = write_recipe(tmp_path / "nested.yml", nested)
    got = mergex_mod.merge(recipe, tmp_path / "nested", ram_budget="64KiB", progress=None)
    assert got.warnings == [
        "stage one: fused into two (not written)",
        "stage two: fused into document 3 (not written)",
    ]
    mergex_mod.merge(
        recipe, tmp_path / "nested-kept", ram_budget="64KiB", keep_intermediates=True, progress=None
    )
    assert models.read_output(tmp_path / "nested").raw == models.read_output(tmp_path / "nested-kept").raw


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
    # A folder left by a fused stage (killed before it was removed) holds no tensors: never
    # reused.
    (stages / "first" / "mergex_fused_stage").write_text("laid out only\n")
    result = mergex_mod.merge(
        recipe, tmp_path / "out", intermediate_dir=stages, lazy=True, overwrite=True, progress=None
    )
    assert not any("reused" in w for w in result.warnings)
    assert not (stages / "first" / "mergex_fused_stage").exists()


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
