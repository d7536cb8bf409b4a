"""Same inputs and config -> byte-identical output, whatever the RAM budget or threads.

METHODS.md §0: reductions must not depend on how a tensor is cut into chunks or how many
threads run. 64KiB vs 2MiB is a 32x change in chunk size: with the larger budget every
tensor of these models fits in one chunk, with the smaller one each spans many.
"""

from __future__ import annotations

import pytest
from support import models

# (budget, threads) settings compared with the first one.
SETTINGS = [("64KiB", 1), ("2MiB", 1), ("64KiB", 2), ("256KiB", 3), ("2MiB", 2)]

COMPARED = ("model.safetensors.index.json", "config.json")


def merge_config(method: str, a, b, c) -> dict:
    models_ = [
        {"model": b, "parameters": {"weight": 0.6, "density": 0.5}},
        {"model": c, "parameters": {"weight": -0.35, "density": 0.7}},
    ]
    if method == "linear":
        return {
            "merge_method": "linear",
            "models": [{"model": a, "parameters": {"weight": 0.2}}]
            + [{"model": m["model"], "parameters": {"weight": 0.4}} for m in models_],
            "out_dtype": "bfloat16",
        }
    if method == "passthrough":
        return {
            "merge_method": "passthrough",
            "models": [{"model": b, "parameters": {"scale": 0.3}}],
        }
    cfg = {
        "merge_method": method,
        "base_model": a,
        "models": models_,
        "out_dtype": "bfloat16",
    }
    if method == "task_arithmetic":
        cfg["parameters"] = {"lambda": 0.9, "normalize": True}
        for m in models_:
            del m["parameters"]["density"]
    return cfg


def output_bytes(path) -> dict[str, bytes]:
    files = sorted(p for p in path.iterdir() if p.suffix == ".safetensors" or p.name in COMPARED)
    assert any(p.suffix == ".safetensors" for p in files), f"no safetensors in {path}"
    return {p.name: p.read_bytes() for p in files}


# The one-pass methods of this suite, then methods of the task family whose whole-tensor
# statistics (magnitude cut, L1 rescale, random masks) are where chunking could leak in.
METHODS = ["linear", "task_arithmetic", "passthrough", "ties", "dare_ties", "della"]


@pytest.mark.parametrize("shard_size", [None, "48KiB"])
@pytest.mark.parametrize("method", METHODS)
def test_bytes_do_not_depend_on_budget_or_threads(zoo, mergex_mod, tmp_path, method, shard_size):
    a, b, c = (
        zoo("bf16", seed=1, shards=2),
        zoo("f16", seed=2),
        zoo("bf16", seed=3, shards=3),
    )
    cfg = models._plain(merge_config(method, a, b, c))
    results = []
    for budget, threads in SETTINGS:
        out = tmp_path / f"out-{budget}-{threads}"
        mergex_mod.merge(
            cfg,
            out,
            ram_budget=budget,
            threads=threads,
            shard_size=shard_size,
            progress=False,
        )
        results.append(((budget, threads), output_bytes(out)))
    (first_setting, first), *rest = results
    for setting, got in rest:
        assert got.keys() == first.keys(), f"{setting} wrote other files than {first_setting}"
        for name in first:
            assert got[name] == first[name], f"{name}: {setting} differs from {first_setting}"


def test_same_run_twice_is_identical(zoo, mergex_mod, tmp_path):
    a, b, c = zoo("bf16", seed=1), zoo("bf16", seed=2), zoo("bf16", seed=3)
    cfg = models._plain(merge_config("task_arithmetic", a, b, c))
    outs = []
    for k in range(2):
        out = tmp_path / f"run{k}"
        mergex_mod.merge(cfg, out, ram_budget="64KiB", threads=2, progress=False)
        outs.append(output_bytes(out))
    assert outs[0] == outs[1]


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare_ties", "della"])
def test_bytes_do_not_depend_on_the_cpu_build(zoo, tmp_path, method, monkeypatch):
    # Every build of the kernels gives the same bytes: the widest the CPU has (chosen at run
    # time), and the narrower ones forced with MERGEX_SIMD (AVX2, portable) or
    # MERGEX_PORTABLE (as on a CPU without AVX2). A build the CPU lacks falls back.
    a, b, c = (zoo("bf16", seed=s) for s in (1, 2, 3))
    cfg = models.dump_yaml(merge_config(method, a, b, c), tmp_path / "merge.yml")
    outs = {}
    for build in ("default", "avx512", "avx2", "portable", "MERGEX_PORTABLE"):
        monkeypatch.delenv("MERGEX_SIMD", raising=False)
        monkeypatch.delenv("MERGEX_PORTABLE", raising=False)
        if build == "MERGEX_PORTABLE":
            monkeypatch.setenv("MERGEX_PORTABLE", "1")
        elif build != "default":
            monkeypatch.setenv("MERGEX_SIMD", build)
        out = tmp_path / f"out-{build}"
        res = models.run_cli(["merge", str(cfg), str(out), "--ram-budget", "64KiB"])
        assert res.returncode == 0, res.stderr
        outs[build] = output_bytes(out)
        # The summary names the build that ran: the one asked for, or a narrower one.
        ran = res.stdout.rsplit("kernels: ", 1)[-1].strip()
        widest = {"avx512": 2, "avx2": 1, "portable": 0}
        asked = {"default": "avx512", "MERGEX_PORTABLE": "portable"}.get(build, build)
        assert ran in widest and widest[ran] <= widest[asked], (build, res.stdout)
        if build == "default":
            best = ran
        else:
            assert ran == min(asked, best, key=widest.__getitem__), (build, res.stdout)
    for build, got in outs.items():
        assert got == outs["default"], f"{method}: the {build} build differs"
