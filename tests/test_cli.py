"""The CLI commands besides error cases: plan, inspect, methods, the shipped examples, and
clean interruption (SIGINT / SIGTERM mid-merge leave no output and no temporary files)."""

from __future__ import annotations

import json
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import mergex
import pytest
from support import models

ROOT = Path(__file__).resolve().parent.parent


def test_methods_lists_every_method_with_defaults():
    r = models.run_cli(["methods"])
    assert r.returncode == 0, r.stderr
    for name in ("linear", "task_arithmetic", "passthrough", "ties", "slerp", "arcee_fusion"):
        assert name in r.stdout
    assert "normalize=true" in r.stdout
    assert "lambda=1.0" in r.stdout


def test_inspect_shows_tensors(zoo):
    m = zoo("bf16", 0, 2)
    r = models.run_cli(["inspect", str(m.path)])
    assert r.returncode == 0, r.stderr
    assert "model.embed_tokens.weight" in r.stdout
    assert "BF16" in r.stdout
    assert f"{len(m.tensors)} tensors" in r.stdout
    assert "2 file(s)" in r.stdout
    infos = mergex.inspect(m.path)
    assert {t.name for t in infos} == set(m.tensors)
    emb = next(t for t in infos if t.name == "model.embed_tokens.weight")
    assert emb.shape == (models.VOCAB, models.HIDDEN)
    assert emb.nbytes == models.VOCAB * models.HIDDEN * 2


def test_plan_reports_bytes_passes_shards_and_memory(zoo, tmp_path):
    a, b = zoo("bf16", 1), zoo("f32", 2)
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(a.path),
        "models": [{"model": str(b.path), "parameters": {"weight": 0.5}}],
        "out_dtype": "bfloat16",
    }
    p = mergex.plan(cfg, ram_budget="1MiB", threads=2, shard_size="100KB")
    input_bytes = sum(t.size * 2 for t in a.tensors.values()) + sum(t.size * 4 for t in b.tensors.values())
    assert p.input_bytes == input_bytes
    assert p.bytes_read == input_bytes  # one pass
    assert p.passes == {1: len(a.tensors)}
    assert p.bytes_written == sum(t.size * 2 for t in a.tensors.values())
    assert len(p.shards) > 1 and sum(n for _, _, n in p.shards) == len(a.tensors)
    assert (1 << 20) < p.peak_memory <= (1 << 20) + (200 << 20)
    cfg_path = models.dump_yaml(cfg, tmp_path / "c.yml")
    r = models.run_cli(["plan", str(cfg_path), "--ram-budget", "1MiB", "--shard-size", "100KB"])
    assert r.returncode == 0, r.stderr
    assert "task_arithmetic" in r.stdout and "estimated peak memory" in r.stdout
    assert "model-00001-of-" in r.stdout


@pytest.mark.parametrize("example", sorted(p.stem for p in (ROOT / "examples").glob("*.yml")))
def test_shipped_examples_merge(example, tmp_path):
    out = tmp_path / "out"
    r = models.run_cli(["merge", f"examples/{example}.yml", str(out), "--ram-budget", "64KiB"], cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout
    # The summary times the top-k selections' samples apart from the passes (TIES only here).
    assert ("sample: " in r.stdout.rsplit("passes: ", 1)[-1]) == (example == "ties"), r.stdout
    merged = models.read_output(out)
    expect_layers = 4 if example == "frankenmerge" else 2
    assert merged.config()["num_hidden_layers"] == expect_layers
    assert (out / "mergex_config.yml").is_file() and (out / "tokenizer_config.json").is_file()


def _sparse_model(path: Path, elements: int) -> None:
    """An F32 model whose data is a hole in a sparse file: large, instant, no disk."""
    path.mkdir(parents=True)
    header = {
        "__metadata__": {"format": "pt"},
        "w": {"dtype": "F32", "shape": [elements], "data_offsets": [0, 4 * elements]},
    }
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.truncate(8 + len(text) + 4 * elements)
    (path / "config.json").write_text("{}")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_mid_merge_leaves_nothing(tmp_path, sig):
    inputs = tmp_path / "in"
    for k in range(3):
        _sparse_model(inputs / f"m{k}", 256 << 20)  # 1 GiB each, all holes
    cfg = {
        "merge_method": "linear",
        "models": [{"model": str(inputs / f"m{k}"), "parameters": {"weight": 1}} for k in range(3)],
    }
    cfg_path = models.dump_yaml(cfg, tmp_path / "c.yml")
    parent = tmp_path / "outs"
    parent.mkdir()
    out = parent / "merged"
    cmd = [*models.mergex_cmd(), "merge", str(cfg_path), str(out), "--ram-budget", "64KiB", "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not any(parent.glob(".merged.mergex-partial/model.safetensors")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "merge never started writing"
        time.sleep(0.02)
    time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["error: interrupted; no output was written"]
    assert list(parent.iterdir()) == []


def test_api_interrupt_removes_temporary_output(tmp_path, monkeypatch):
    inputs = tmp_path / "in"
    for k in range(2):
        _sparse_model(inputs / f"m{k}", 64 << 20)
    cfg = {
        "merge_method": "linear",
        "models": [{"model": str(inputs / f"m{k}"), "parameters": {"weight": 1}} for k in range(2)],
    }
    parent = tmp_path / "outs"
    parent.mkdir()
    calls = []

    def interrupt(p):
        calls.append(p.bytes_done)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        mergex.merge(cfg, parent / "merged", ram_budget="64KiB", threads=1, progress=interrupt)
    assert calls
    assert list(parent.iterdir()) == []


def test_python_dash_m_runs_the_cli():
    r = subprocess.run(
        [sys.executable, "-m", "mergex", "--help"], capture_output=True, text=True, check=False
    )
    assert r.returncode == 0
    assert "merge" in r.stdout and "plan" in r.stdout


def test_help_shows_every_default_and_plain_usage():
    # Bracketed parts of help texts are escaped from rich's markup (it ate them), and
    # required arguments read CONFIG OUT, not typer's {config} {out}.
    r = models.run_cli(["merge", "--help"])
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.replace("│", " ").split())
    assert "merge [OPTIONS] CONFIG OUT" in text
    for part in (
        "[default: 1/4 of available, ≤ 4GiB]",
        "[default: all CPUs]",
        "[default: 0]",
        "mergex[torch]",
    ):
        assert part in text, part
    assert "[default: 5GB]" in " ".join(models.run_cli(["plan", "--help"]).stdout.replace("│", " ").split())


@pytest.mark.parametrize("threads", ["0", "2000"])
def test_threads_out_of_range_is_a_usage_error(zoo, tmp_path, threads):
    cfg = models.dump_yaml(
        {"merge_method": "linear", "models": [{"model": str(zoo().path)}]}, tmp_path / "m.yml"
    )
    r = models.run_cli(["merge", cfg, tmp_path / "out", "--threads", threads])
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == f"error: threads: expected an integer from 1 to 1024, got {threads}"
    assert not (tmp_path / "out").exists()
