"""Faults and resuming: a merge killed at any point resumes to byte-identical output; a full
disk, a changed input, or a second merge into the same folder end cleanly."""

from __future__ import annotations

import fcntl
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import mergex
import numpy as np
import pytest
from support import models


def _write_models(root: Path) -> list[Path]:
    """Base + 2 experts, f32, about 6 MiB each over 40 tensors (so a small shard size gives
    many shards and the merge takes long enough to be killed in the middle)."""
    rng = np.random.default_rng(7)
    shapes = {f"model.layers.{i}.mlp.up_proj.weight": (160, 256) for i in range(40)}
    base = {n: rng.standard_normal(s, dtype=np.float32) * np.float32(0.02) for n, s in shapes.items()}
    paths = []
    for k in range(3):
        tensors = {
            n: v + rng.standard_normal(v.shape, dtype=np.float32) * np.float32(0.002) for n, v in base.items()
        }
        m = models.write_model(root / f"m{k}", tensors if k else base, "f32", layers=40)
        paths.append(m.path)
    return paths


def _config(paths: list[Path], tmp_path: Path, method: str = "dare_ties") -> Path:
    cfg = {
        "merge_method": method,
        "base_model": str(paths[0]),
        "models": [{"model": str(p), "parameters": {"weight": 0.5, "density": 0.5}} for p in paths[1:]],
    }
    return models.dump_yaml(cfg, tmp_path / f"{method}.yml")


def _merge_cmd(cfg: Path, out: Path, *extra: str) -> list[str]:
    return [
        *models.mergex_cmd(),
        "merge",
        str(cfg),
        str(out),
        "--ram-budget",
        "64KiB",
        "--threads",
        "1",
        "--shard-size",
        "400KB",
        "--quiet",
        *extra,
    ]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix in (".safetensors", ".json")}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    paths = _write_models(root / "in")
    cfg = _config(paths, root)
    reference = root / "reference"
    r = subprocess.run(_merge_cmd(cfg, reference), capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    return root, paths, cfg, _files(reference)


def _shards_recorded(partial: Path) -> int:
    try:
        return len(json.loads((partial / "mergex-resume.json").read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.parametrize("when", [0, 1, 5, "all but one"])
def test_sigkill_then_resume_is_byte_identical(setup, tmp_path, when):
    _root, _paths, cfg, expected = setup
    out = tmp_path / "merged"
    partial = tmp_path / ".merged.mergex-partial"
    total = sum(1 for n in expected if n.endswith(".safetensors"))
    target = total - 1 if when == "all but one" else when
    proc = subprocess.Popen(_merge_cmd(cfg, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while _shards_recorded(partial) < target or (target == 0 and not any(partial.glob("*.safetensors"))):
        assert proc.poll() is None, f"merge finished before it could be killed ({when})"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() and partial.is_dir()
    r = subprocess.run(_merge_cmd(cfg, out, "--resume"), capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    assert _files(out) == expected
    assert not partial.exists()
    assert not (out / "mergex-resume.json").exists() and not (out / ".mergex.lock").exists()


def test_torch_engine_killed_then_resumed_matches_the_rust_engine(setup, tmp_path):
    # The torch engine writes through the same sink: shards sealed, recorded, kept on resume.
    _root, _paths, cfg, expected = setup
    out = tmp_path / "merged"
    partial = tmp_path / ".merged.mergex-partial"
    proc = subprocess.Popen(
        _merge_cmd(cfg, out, "--engine", "torch"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while _shards_recorded(partial) < 3:
        assert proc.poll() is None, "merge finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = {p.name: p.stat().st_mtime_ns for p in partial.glob("*.safetensors")}
    r = subprocess.run(_merge_cmd(cfg, out, "--resume", "--engine", "torch"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert _files(out) == expected
    recorded = [n for n in kept if (out / n).stat().st_mtime_ns == kept[n]]
    assert len(recorded) >= 3, "the finished shards were kept, not rewritten"


def test_killed_just_before_the_rename_resumes(setup, tmp_path):
    """Every shard finished and recorded, killed before the output is renamed into place."""
    _root, _paths, cfg, expected = setup
    out = tmp_path / "merged"
    script = (
        "import os, sys, mergex.output as o\n"
        "o.OutputFolder.commit = lambda self: os._exit(9)\n"
        "from mergex.cli import main\n"
        "sys.argv = ['mergex'] + sys.argv[1:]\n"
        "main()\n"
    )
    args = _merge_cmd(cfg, out)[len(models.mergex_cmd()) :]
    r = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, check=False)
    assert r.returncode == 9, r.stderr
    partial = tmp_path / ".merged.mergex-partial"
    assert _shards_recorded(partial) == sum(n.endswith(".safetensors") for n in expected)
    r = subprocess.run(_merge_cmd(cfg, out, "--resume"), capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    assert _files(out) == expected


def _kill_after(cfg: Path, out: Path, shards: int) -> Path:
    """Start a merge, SIGKILL it once `shards` shards are recorded; return its partial folder."""
    partial = out.parent / f".{out.name}.mergex-partial"
    proc = subprocess.Popen(_merge_cmd(cfg, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while _shards_recorded(partial) < shards:
        assert proc.poll() is None, "the merge finished before it could be killed"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return partial


def test_resume_recomputes_a_corrupted_shard(setup, tmp_path):
    _root, _paths, cfg, expected = setup
    out = tmp_path / "merged"
    partial = _kill_after(cfg, out, 2)
    first = partial / "model-00001-of-{:05d}.safetensors".format(
        sum(n.endswith(".safetensors") for n in expected)
    )
    data = bytearray(first.read_bytes())
    data[-1] ^= 0xFF
    first.write_bytes(bytes(data))
    result = mergex.merge(
        cfg, out, ram_budget="64KiB", threads=1, shard_size="400KB", progress=False, resume=True
    )
    assert any("failed its checksum" in w for w in result.warnings)
    assert _files(out) == expected


def test_resume_refuses_a_different_config(setup, tmp_path):
    _root, paths, cfg, _expected = setup
    out = tmp_path / "merged"
    partial = _kill_after(cfg, out, 1)
    other = _config(paths, tmp_path, "dare_linear")
    r = subprocess.run(_merge_cmd(other, out, "--resume"), capture_output=True, text=True, check=False)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "different configuration" in lines[0], r.stderr
    assert partial.is_dir() and _shards_recorded(partial) >= 1, "the other run's partial output was kept"
    # Without --resume the stale partial output is replaced and the merge completes.
    r = subprocess.run(_merge_cmd(other, out), capture_output=True, text=True, check=False)
    assert r.returncode == 0 and not partial.exists()


def test_full_disk_leaves_nothing(setup, tmp_path):
    _root, _paths, cfg, _expected = setup
    out = tmp_path / "merged"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    r = subprocess.run(_merge_cmd(cfg, out), capture_output=True, text=True, check=False, preexec_fn=limit)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "model-0000" in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_second_merge_into_the_same_output_is_refused(setup, tmp_path):
    _root, _paths, cfg, expected = setup
    out = tmp_path / "merged"
    partial = tmp_path / ".merged.mergex-partial"
    partial.mkdir()
    # Hold the lock as a running merge does.
    with open(partial / ".mergex.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        r = subprocess.run(_merge_cmd(cfg, out), capture_output=True, text=True, check=False)
        assert r.returncode == 1
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "another mergex is writing" in lines[0], r.stderr
        assert partial.is_dir() and not out.exists(), "the running merge's files were left alone"
    r = subprocess.run(_merge_cmd(cfg, out), capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    assert _files(out) == expected


def test_an_input_changed_during_the_merge_is_an_error(setup, tmp_path, monkeypatch):
    _root, paths, cfg, _expected = setup
    victim = next((paths[1]).glob("*.safetensors"))
    before = victim.stat()
    touched = []

    def touch(_progress):
        if not touched:
            os.utime(victim, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
            touched.append(True)

    try:
        with pytest.raises(mergex.CheckpointError, match="changed during the merge"):
            mergex.merge(
                cfg, tmp_path / "merged", ram_budget="64KiB", threads=1, shard_size="400KB", progress=touch
            )
    finally:
        os.utime(victim, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert not (tmp_path / "merged").exists()
    assert not any(p.name.startswith(".merged.mergex") for p in tmp_path.iterdir())
