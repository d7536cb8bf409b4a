"""The torch path's flags and failures (issue 6): ``--device``/``--engine``/``--gpu-budget``
are checked before anything is written, a missing torch or GPU is one clear error line
(exit 2, no traceback, no output), and a device out-of-memory names the budget to lower."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from mergex.errors import ConfigError
from support import models


def setup(tmp_path: Path) -> Path:
    a = models.make_llama(tmp_path / "model_a", "bf16", seed=1)
    b = models.make_llama(tmp_path / "model_b", "bf16", seed=2)
    cfg = {
        "merge_method": "linear",
        "models": [{"model": str(m.path), "parameters": {"weight": 1.0}} for m in (a, b)],
    }
    return models.dump_yaml(cfg, tmp_path / "merge.yml")


def run_cli(
    args: list[str], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    cmd = [*models.mergex_cmd(), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=300, check=False)


def assert_clean_failure(res: subprocess.CompletedProcess[str], out: Path, *mentions: str) -> None:
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for m in mentions:
        assert m in lines[0], lines[0]
    assert "Traceback" not in res.stderr
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_a_gpu(tmp_path):
    cfg = setup(tmp_path)
    res = run_cli(["merge", str(cfg), str(tmp_path / "out"), "--device", "cuda"], tmp_path)
    assert_clean_failure(res, tmp_path / "out", "device cuda", "no CUDA GPU")


@pytest.mark.parametrize(
    ("flags", "mentions"),
    [
        (["--engine", "jax"], ["engine", "jax"]),
        (["--device", "tpu"], ["device", "tpu"]),
        (["--device", "cuda", "--engine", "rust"], ["rust engine runs on the CPU"]),
        (["--gpu-budget", "1GiB"], ["gpu_budget"]),
        (["--engine", "torch", "--gpu-budget", "lots"], ["gpu_budget"]),
    ],
)
def test_bad_flags(tmp_path, flags, mentions):
    cfg = setup(tmp_path)
    res = run_cli(["merge", str(cfg), str(tmp_path / "out"), *flags], tmp_path)
    assert_clean_failure(res, tmp_path / "out", *mentions)


def test_torch_not_installed(tmp_path):
    # A `torch` package that fails to import, first on the path: as if torch were missing.
    fake = tmp_path / "fake"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text("raise ImportError('No module named torch')\n")
    cfg = setup(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")])}
    res = run_cli(["merge", str(cfg), str(tmp_path / "out"), "--engine", "torch"], tmp_path, env)
    assert_clean_failure(res, tmp_path / "out", "pip install 'mergex[torch]'")
    # The Rust engine does not need torch.
    ok = run_cli(["merge", str(cfg), str(tmp_path / "out"), "--quiet"], tmp_path, env)
    assert ok.returncode == 0, ok.stderr


def test_device_out_of_memory_names_the_budget(tmp_path, monkeypatch):
    import mergex
    from mergex.torch_engine import kernels

    def hungry(self, x, s):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(kernels.Output, "weighted_sum", hungry)
    cfg = setup(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"ran out of memory.*--gpu-budget"):
        mergex.merge(cfg, out, engine="torch", progress=False)
    assert not out.exists()
