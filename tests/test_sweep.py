"""Sweeps (``mergex sweep``): every member of a ``{sweep: …}`` grid and of a multi-document
sweep equals its own ``mergex merge``, at budgets that cut every tensor into many chunks, on
1 and 2 threads; each input byte is read once per pass for the whole sweep (counted by the
engine's reader); stages that later documents use run first; ``--resume`` keeps verified
members; bad sweeps fail before anything is read; an interrupted sweep leaves no partial
folder.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mergex
import pytest
import yaml
from mergex import _mergex
from mergex.errors import ConfigError, OutputExistsError
from mergex.sweeps import MAX_MEMBERS, expand, sweep_plan
from support import models

SMALL = "256KiB"  # four members' shares of 64 KiB: many chunks per tensor


def budget(config: Path) -> str:
    """64 KiB a member, the smallest share: every tensor spans many chunks."""
    return f"{64 * len(expand(config))}KiB"


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep_models")
    return [models.make_llama(root / n, dtype="bf16", seed=s) for n, s in (("base", 1), ("a", 2), ("b", 3))]


def write(path: Path, *docs: dict) -> Path:
    path.write_text(yaml.safe_dump_all([models._plain(d) for d in docs], sort_keys=False))
    return path


def shards(folder: Path) -> dict[str, bytes]:
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.index.json"))
    return {p.name: p.read_bytes() for p in files}


def assert_members_match_single_merges(config: Path, out: Path, tmp: Path, threads: int) -> None:
    results = mergex.sweep(config, out, ram_budget=budget(config), threads=threads)
    members = expand(config)
    assert [r.out_dir for r in results] == [out / m.name for m in members]
    for m in members:
        single = tmp / "single" / m.name
        mergex.merge(m.raw, single, ram_budget="64KiB", threads=1, progress=None)
        got, want = shards(out / m.name), shards(single)
        assert want and got == want, f"member {m.name} differs from its own merge"
        assert (out / m.name / "mergex_config.yml").is_file() and (out / m.name / "config.json").is_file()


def grid(method: str, trio) -> dict:
    base, a, b = trio
    if method == "linear":
        return {
            "merge_method": "linear",
            "models": [
                {"model": a, "parameters": {"weight": {"sweep": [0.3, 0.7]}}},
                {"model": b, "parameters": {"weight": 0.5}},
            ],
        }
    if method in ("ties", "dare_ties"):
        return {
            "merge_method": method,
            "base_model": base,
            "models": [
                {"model": a, "parameters": {"weight": 0.6, "density": {"sweep": [0.2, 0.7]}}},
                {"model": b, "parameters": {"weight": 0.4, "density": 0.5}},
            ],
            "parameters": {"lambda": {"sweep": [1.0, 0.5]}},
            "seed": 11,
        }
    if method == "slerp":
        return {
            "merge_method": "slerp",
            "base_model": base,
            "models": [{"model": a}],
            "parameters": {"t": {"sweep": [0.25, 0.8]}},
        }
    # Layer stacking: slices of two models, one slice scaled by each swept factor.
    return {
        "merge_method": "passthrough",
        "slices": [
            {
                "sources": [
                    {"model": a, "layer_range": [0, 1], "parameters": {"scale": {"sweep": [1.0, 0.5]}}}
                ]
            },
            {"sources": [{"model": b, "layer_range": [1, 2]}]},
        ],
        "dtype": "float32",
    }


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("method", ["linear", "ties", "dare_ties", "slerp", "passthrough"])
def test_grid_members_equal_their_own_merges(trio, tmp_path, method, threads):
    config = write(tmp_path / "sweep.yml", grid(method, trio))
    names = [m.name for m in expand(config)]
    assert len(names) == (4 if method in ("ties", "dare_ties") else 2)
    if method == "ties":
        assert names[0] == "density=0.2,lambda=1.0"
    assert_members_match_single_merges(config, tmp_path / "out", tmp_path, threads)
    recorded = yaml.safe_load((tmp_path / "out" / "sweep.yml").read_text())["members"]
    assert [m["name"] for m in recorded] == names and all(m["checksums"] for m in recorded)


@pytest.mark.parametrize("threads", [1, 2])
def test_documents_with_different_methods_run_together(trio, tmp_path, threads):
    base, a, b = trio
    models_ = [
        {"model": a, "parameters": {"weight": 0.5, "density": 0.4}},
        {"model": b, "parameters": {"weight": 0.5}},
    ]
    docs = [
        {"name": "ties", "merge_method": "ties", "base_model": base, "models": models_},
        {"name": "dare", "merge_method": "dare_ties", "base_model": base, "models": models_, "seed": 3},
        {"merge_method": "task_arithmetic", "base_model": base, "models": models_},
        # Other inputs: a group of its own.
        {
            "name": "other",
            "merge_method": "linear",
            "models": [
                {"model": a, "parameters": {"weight": 0.5}},
                {"model": base, "parameters": {"weight": 0.5}},
            ],
        },
    ]
    config = write(tmp_path / "sweep.yml", *docs)
    assert [m.name for m in expand(config)] == ["ties", "dare", "002", "other"]
    plan = sweep_plan(config, ram_budget=budget(config), threads=threads)
    assert plan.groups == [["ties", "dare", "002"], ["other"]]
    assert plan.bytes_read < plan.separate_bytes_read
    assert_members_match_single_merges(config, tmp_path / "out", tmp_path, threads)
    if threads == 1:  # the plan of a file of several documents, from the CLI
        cli = [sys.executable, "-m", "mergex", "plan", str(config), "--sweep", "--ram-budget", budget(config)]
        shown = subprocess.run(cli, capture_output=True, text=True)
        assert shown.returncode == 0, shown.stderr
        assert (
            "sweep of 4 members in 2 group(s)" in shown.stdout and "together: ties, dare, 002" in shown.stdout
        )


def test_each_input_byte_is_read_once_per_pass(trio, tmp_path):
    # A lambda grid: every member takes the same passes (their cuts depend on the densities
    # only), so the sweep reads exactly what one member's merge reads: its passes and the
    # selections' sample (here whole tensors: they are small), each once for all members.
    cfg = grid("ties", trio)
    cfg["models"][0]["parameters"]["density"] = 0.3
    cfg["parameters"]["lambda"] = {"sweep": [0.5, 1.0, 1.5, 2.0]}
    config = write(tmp_path / "sweep.yml", cfg)
    before = _mergex.bytes_read()
    results = mergex.sweep(config, tmp_path / "out", ram_budget="256KiB", threads=2)
    swept = _mergex.bytes_read() - before
    before = _mergex.bytes_read()
    single = mergex.merge(expand(config)[0].raw, tmp_path / "single", ram_budget="64KiB", threads=2)
    one = _mergex.bytes_read() - before
    counted = results[0].bytes_read  # the passes' bytes, counted once per chunk
    assert counted == single.bytes_read
    sample = one - single.bytes_read  # read outside the passes: the selections' sample
    assert sample > 0
    assert swept == one
    plan = sweep_plan(config, ram_budget="256KiB", threads=2)
    assert plan.bytes_read == counted and plan.separate_bytes_read == 4 * counted


def test_stages_used_by_later_documents_run_first(trio, tmp_path):
    base, a, b = trio
    docs = [
        {
            "name": "blend",
            "merge_method": "task_arithmetic",
            "base_model": "first",
            "models": [{"model": b, "parameters": {"weight": 0.5}}],
        },
        {
            "name": "first",
            "merge_method": "linear",
            "models": [
                {"model": a, "parameters": {"weight": 0.5}},
                {"model": base, "parameters": {"weight": 0.5}},
            ],
        },
    ]
    config = write(tmp_path / "sweep.yml", *docs)
    plan = sweep_plan(config, ram_budget=SMALL)
    assert plan.groups == [["first"]] and plan.later == ["blend"]
    out = tmp_path / "out"
    results = mergex.sweep(config, out, ram_budget=SMALL, threads=2)
    assert [r.out_dir.name for r in results] == ["blend", "first"]
    mergex.merge(models._plain(docs[1]), tmp_path / "first", ram_budget="64KiB")
    blend = {**docs[0], "base_model": str(out / "first")}
    mergex.merge(models._plain(blend), tmp_path / "blend", ram_budget="64KiB")
    assert shards(out / "first") == shards(tmp_path / "first")
    assert shards(out / "blend") == shards(tmp_path / "blend")
    cycle = write(
        tmp_path / "cycle.yml",
        {**docs[0], "models": [{"model": "first"}]},
        {**docs[1], "base_model": "blend"},
    )
    with pytest.raises(ConfigError, match="cycle"):
        mergex.sweep(cycle, tmp_path / "out2")


def test_resume_keeps_verified_members_and_redoes_the_rest(trio, tmp_path):
    config = write(tmp_path / "sweep.yml", grid("ties", trio))
    out = tmp_path / "out"
    mergex.sweep(config, out, ram_budget=SMALL, threads=2)
    names = [m.name for m in expand(config)]
    want = {n: shards(out / n) for n in names}
    kept = out / names[0] / "model.safetensors"
    stamp = kept.stat().st_mtime_ns
    # One member lost, one damaged (a flipped byte in its data), as a crash could leave them.
    for p in (out / names[1]).iterdir():
        p.unlink()
    (out / names[1]).rmdir()
    damaged = out / names[2] / "model.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-3] ^= 0xFF
    damaged.write_bytes(bytes(data))
    with pytest.raises(OutputExistsError, match=names[0]):
        mergex.sweep(config, out, ram_budget=SMALL)
    results = mergex.sweep(config, out, ram_budget=SMALL, threads=2, resume=True)
    assert results[0].warnings == ["kept (complete)"] and results[0].bytes_read == 0
    assert kept.stat().st_mtime_ns == stamp
    assert results[1].bytes_read > 0 and results[2].bytes_read > 0
    assert {n: shards(out / n) for n in names} == want


def test_bad_sweeps_fail_before_anything_is_read(trio, tmp_path):
    out = tmp_path / "out"
    bad = grid("ties", trio)
    bad["models"][0]["parameters"]["density"] = {"sweep": [0.5, -0.5]}
    before = _mergex.bytes_read()
    with pytest.raises(ConfigError, match=r"sweep member density=-0\.5,lambda=1\.0: .*density"):
        mergex.sweep(write(tmp_path / "bad.yml", bad), out)
    assert _mergex.bytes_read() == before and not out.exists()
    many = grid("linear", trio)
    many["models"][0]["parameters"]["weight"] = {"sweep": [0.1] * 17}
    many["models"][1]["parameters"]["weight"] = {"sweep": [0.2] * 16}
    with pytest.raises(ConfigError, match=f"272 members; at most {MAX_MEMBERS}"):
        mergex.sweep(write(tmp_path / "many.yml", many), out)
    method = {**grid("linear", trio), "merge_method": {"sweep": ["linear", "ties"]}}
    with pytest.raises(ConfigError, match="merge_method: sweep: only parameter values"):
        mergex.sweep(write(tmp_path / "method.yml", method), out)
    empty = grid("slerp", trio)
    empty["parameters"]["t"] = {"sweep": []}
    with pytest.raises(ConfigError, match="non-empty list"):
        mergex.sweep(write(tmp_path / "empty.yml", empty), out)
    assert not out.exists()


def test_interrupted_sweep_leaves_complete_members_and_no_partial_folders(trio, tmp_path):
    base, a, b = trio
    docs = [
        {
            "name": "first",
            "merge_method": "linear",
            "models": [
                {"model": a, "parameters": {"weight": 0.5}},
                {"model": base, "parameters": {"weight": 0.5}},
            ],
        },
        {
            "name": "second",
            "merge_method": "ties",
            "base_model": "first",
            "models": [{"model": b, "parameters": {"weight": 1.0, "density": 0.5}}],
        },
    ]
    config = write(tmp_path / "sweep.yml", *docs)
    out = tmp_path / "out"
    calls = []

    def interrupt(p):
        calls.append(p)
        if (out / "first").is_dir():  # the first wave is done: stop in the second
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        mergex.sweep(config, out, ram_budget=SMALL, threads=1, progress=interrupt)
    assert calls
    assert sorted(p.name for p in out.iterdir()) == ["first", "sweep.yml"]
    assert shards(out / "first")


def test_cli_sweep_and_its_plan(trio, tmp_path):
    config = write(tmp_path / "sweep.yml", grid("ties", trio))
    cli = [sys.executable, "-m", "mergex"]
    plan = subprocess.run([*cli, "plan", str(config), "--ram-budget", SMALL], capture_output=True, text=True)
    assert plan.returncode == 0, plan.stderr
    assert "sweep of 4 members in 1 group(s)" in plan.stdout and "(4.0x)" in plan.stdout
    out = tmp_path / "out"
    run = subprocess.run(
        [*cli, "sweep", str(config), str(out), "--ram-budget", SMALL], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("wrote ") == 4 and "sweep of 4 members" in run.stdout
    again = subprocess.run([*cli, "sweep", str(config), str(out)], capture_output=True, text=True)
    assert (
        again.returncode == 1
        and again.stderr.startswith("error: sweep member")
        and "Traceback" not in again.stderr
    )


@pytest.mark.parametrize("scales", ["block", "tensor"])
def test_quantized_members_written_back_equal_their_own_merges(tmp_path, scales):
    # Block FP8 inputs, re-quantized in the base's layout: with per-tensor scales each
    # member first merges every weight once for its amax, as its own merge does.
    from support import quant_models as qm

    per_tensor = scales == "tensor"
    base, a, b = (qm.Fp8Model(tmp_path, f"m{s}", s, "F32", per_tensor=per_tensor) for s in (1, 2, 3))
    cfg = {
        "merge_method": "ties",
        "base_model": str(base.path),
        "models": [
            {"model": str(a.path), "parameters": {"weight": 0.5, "density": {"sweep": [0.3, 0.8]}}},
            {"model": str(b.path), "parameters": {"weight": 0.5, "density": 0.6}},
        ],
        "out_quantization": "base",
    }
    config = write(tmp_path / "sweep.yml", cfg)
    assert_members_match_single_merges(config, tmp_path / "out", tmp_path, 2)


def test_members_with_other_adapters_read_apart(trio, tmp_path):
    # The same base under two different LoRA adapters: the same model indices, other files.
    # They must not be grouped (each reads its own adapter), and each equals its own merge.
    import numpy as np

    base, a, _ = trio
    rng = np.random.default_rng(5)
    shapes = models.llama_shapes()
    adapters = []
    for k in range(2):
        module = "model.layers.0.self_attn.q_proj"
        out_dim, in_dim = shapes[f"{module}.weight"]
        factors = {module: (rng.standard_normal((2, in_dim)) * 0.1, rng.standard_normal((out_dim, 2)) * 0.1)}
        cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
        adapters.append(models.write_adapter(tmp_path / f"adapter{k}", factors, cfg))
    docs = [
        {
            "name": f"with{k}",
            "merge_method": "linear",
            "models": [
                {"model": f"{base.path}+{adapters[k]}", "parameters": {"weight": 0.5}},
                {"model": a, "parameters": {"weight": 0.5}},
            ],
        }
        for k in range(2)
    ]
    config = write(tmp_path / "sweep.yml", *docs)
    assert sweep_plan(config, ram_budget="128KiB").groups == [["with0"], ["with1"]]
    assert_members_match_single_merges(config, tmp_path / "out", tmp_path, 2)
