"""The benchmark's floor measurements (``benches/bench.py``): what they read, write and run."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

BENCHES = Path(__file__).resolve().parent.parent / "benches"
sys.path.insert(0, str(BENCHES))

import bench  # noqa: E402  (beside make_experts.py, which it imports)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_read_parallel_reads_every_byte_once(tmp_path, monkeypatch, threads):
    # Sizes around the piece and read lengths, so that every edge is crossed.
    piece, step = 4096, 1024
    monkeypatch.setattr(bench, "PARALLEL_PIECE", piece)
    monkeypatch.setattr(bench, "PARALLEL_READ", step)
    sizes = [0, 1, step - 1, piece, piece + 1, 3 * piece + step + 7]
    files = []
    for i, size in enumerate(sizes):
        path = tmp_path / f"f{i}"
        path.write_bytes(bytes([i + 1]) * size)
        files.append(path)
    seen: dict[str, list[tuple[int, int]]] = {}
    real_preadv = os.preadv

    def preadv(fd, buffers, offset):
        n = real_preadv(fd, buffers, offset)
        seen.setdefault(os.readlink(f"/proc/self/fd/{fd}"), []).append((offset, n))
        return n

    monkeypatch.setattr(bench.os, "preadv", preadv)
    assert bench.read_parallel(files, threads) >= 0
    for i, (path, size) in enumerate(zip(files, sizes, strict=True)):
        got = sorted(seen.get(str(path), []))
        covered = [b for at, n in got for b in range(at, at + n)]
        assert covered == list(range(size)), f"file {i} of {size} bytes"


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_write_parallel_writes_the_size_and_removes_the_file(tmp_path, monkeypatch, threads):
    monkeypatch.setattr(bench, "PARALLEL_PIECE", 4096)
    monkeypatch.setattr(bench, "PARALLEL_READ", 1024)
    path = tmp_path / "w"
    written: list[tuple[int, int]] = []
    real_pwrite = os.pwrite

    def pwrite(fd, data, offset):
        n = real_pwrite(fd, data, offset)
        written.append((offset, n))
        return n

    monkeypatch.setattr(bench.os, "pwrite", pwrite)
    size = 3 * 4096 + 1024 + 5
    assert bench.write_parallel(path, size, threads) >= 0
    # Filled once untimed, then written over: every byte twice.
    assert sorted(b for at, n in written for b in range(at, at + n)) == sorted(2 * list(range(size)))
    assert not path.exists()


def test_tiny_merge_is_a_merge_the_cli_runs(tmp_path, mergex_mod):
    cmd = bench.tiny_merge(tmp_path, [sys.executable, "-m", "mergex"])
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    (info,) = mergex_mod.inspect(tmp_path / "tiny" / "out")
    assert (info.name, info.shape) == ("w", (256,))


def test_the_floor_is_fixed_plus_parallel_read_and_write_over_the_read(capsys):
    r = bench.Result("linear", "mergex", 4 * 10**9)
    r.read_seconds += [0.5, 0.4]
    r.parallel_read_seconds += [0.3, 0.2]
    r.parallel_write_seconds += [0.1, 0.15]
    r.seconds += [0.7, 0.6]
    r.peak_rss += [2**20]
    bench.print_table([r], fixed=0.1)
    header, _, row = capsys.readouterr().out.splitlines()[:3]
    table = dict(zip(re.split(r"\s{2,}", header.strip()), row.split(), strict=True))
    assert table["x read"] == "1.50"  # 0.6 / 0.4
    assert table["floor x"] == "1.00"  # (0.1 + 0.2 + 0.1) / 0.4, each the best of its rounds


def test_the_fp8_bench_set_decodes_within_half_a_step(tmp_path, mergex_mod):
    # benches/quantize_fp8.py writes block FP8 as QUANT.md §3 says; mergex reads it back to
    # within half an E4M3 step of the bf16 source (times the block scale).
    import numpy as np
    import quantize_fp8

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((300, 200)) * 0.02).astype(np.float32)
    x[:128, :128] = 0.0  # an all-zero block
    codes, scales = quantize_fp8.quantize(x)
    assert codes.shape == x.shape and scales.shape == (3, 2)
    assert scales[0, 0] == 1.0
    step = np.repeat(np.repeat(scales, 128, 0), 128, 1)[:300, :200]
    y = x / step
    decoded = np.where(codes & 0x80, -1.0, 1.0) * quantize_fp8.VALUES[codes & 0x7F]
    # Half the gap to the neighbouring code at each value's magnitude.
    gap = np.diff(quantize_fp8.VALUES)[np.minimum(codes & 0x7F, 125)]
    assert np.all(np.abs(decoded - y) <= gap / 2 + 1e-6)
    # A whole model folder converts and merges.
    src = tmp_path / "set" / "base"
    src.mkdir(parents=True)
    bits = (x.view(np.uint32) >> 16).astype("<u2")  # truncation is exact enough for the test
    header = {"w_proj.weight": {"dtype": "BF16", "shape": [300, 200], "data_offsets": [0, bits.nbytes]}}
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    (src / "model.safetensors").write_bytes(struct.pack("<Q", len(h)) + h + bits.tobytes())
    (src / "config.json").write_text(json.dumps({"model_type": "toy"}))
    assert quantize_fp8.main([str(tmp_path / "set"), str(tmp_path / "fp8")]) == 0
    out = tmp_path / "out"
    cfg = {"merge_method": "linear", "models": [{"model": str(tmp_path / "fp8" / "base")}]}
    mergex_mod.merge({**cfg, "parameters": {"weight": 1.0}, "out_dtype": "float32"}, out, progress=None)
    (info,) = mergex_mod.inspect(out)
    assert (info.name, info.dtype) == ("w_proj.weight", "F32")


def test_the_mxfp4_bench_set_decodes_within_half_a_step():
    import numpy as np
    import quantize_fp8

    rng = np.random.default_rng(1)
    x = (rng.standard_normal((8, 96)) * 0.02).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero group
    packed, scale_bytes = quantize_fp8.quantize_mxfp4(x)
    assert packed.shape == (8, 48) and scale_bytes.shape == (8, 3) and scale_bytes[0, 0] == 0
    codes = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(8, 96)
    scale = np.repeat(np.ldexp(1.0, scale_bytes.astype(np.int64) - 127), 32, axis=1)
    decoded = np.where(codes & 8, -1.0, 1.0) * quantize_fp8.E2M1[codes & 7] * scale
    # Never saturating (amax <= 6·2^e), and within half the widest E2M1 step (2, from 4 to 6).
    assert np.all(np.abs(x) <= 6 * scale)
    assert np.all(np.abs(decoded - x) <= 1.0 * scale + 1e-12)
