"""The RAM budget holds: peak RSS of the CLI process, measured from outside.

Three f32 models of 96 MiB each (288 MiB of input, 9x the 32 MiB budget) are merged by a
``mergex merge`` subprocess, with linear and with TIES (whose statistics pass holds each
cut's candidates in memory); its peak resident set size comes from ``wait4``. Memory-mapped
input pages that stay resident count in RSS, so an engine that maps and touches every input
without releasing pages fails here, as does one that holds whole tensors.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import struct
import sys
from pathlib import Path

import numpy as np
from support import models
from support import reference as ref
from support.memory import BUDGET, NAMES, SHAPE, SLACK, MiB, peak_rss, raw_view, tensor_view, write_big_model


def resident_bytes(path: Path) -> int:
    """Bytes of ``path`` in the page cache (``mincore`` over a shared read-only map)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    size, page = path.stat().st_size, os.sysconf("SC_PAGE_SIZE")
    vec = ctypes.create_string_buffer((size + page - 1) // page)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr is not None and addr != ctypes.c_void_p(-1).value, os.strerror(ctypes.get_errno())
        try:
            assert libc.mincore(addr, size, vec) == 0, os.strerror(ctypes.get_errno())
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    return sum(b & 1 for b in vec.raw) * page


def drops_written_pages(folder: Path) -> bool:
    """Whether this filesystem drops a file's clean pages on ``POSIX_FADV_DONTNEED`` (disk
    filesystems do; tmpfs keeps them, having nowhere else to put them)."""
    probe = folder / "page-probe"
    with open(probe, "wb") as f:
        f.write(b"x" * (4 * MiB))
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    dropped = resident_bytes(probe) < MiB
    probe.unlink()
    return dropped


def big_models(root: Path) -> tuple[list[Path], int]:
    """Three big f32 model folders and their total input bytes."""
    folders, total_in = [], 0
    for k in range(3):
        folder = root / f"big{k}"
        total_in += write_big_model(folder, seed=100 + k)
        folders.append(folder)
    assert total_in >= 5 * BUDGET, "inputs must be at least 5x the budget to mean anything"
    return folders, total_in


def merge_rss(cfg: dict, root: Path, total_in: int) -> Path:
    """Run ``mergex merge`` on ``cfg`` at the budget; check its peak RSS; the output folder."""
    cfg_path = models.dump_yaml(cfg, root / "merge.yml")
    out = root / "merged"
    cmd = [*models.mergex_cmd(), "merge", str(cfg_path), str(out), "--ram-budget", "32MiB", "--quiet"]
    rc, rss, stderr = peak_rss(cmd, root)
    assert rc == 0, stderr
    msg = f"peak RSS {rss / MiB:.1f} MiB, budget {BUDGET / MiB:.0f} MiB, inputs {total_in / MiB:.0f} MiB"
    print(msg)
    assert rss < BUDGET + SLACK, msg
    assert rss < 0.8 * total_in, msg
    return out


def test_peak_rss_within_budget_with_selections(tmp_path):
    # TIES holds each cut's band of candidates during its statistics pass (up to half the
    # budget): the budget still holds, and the cuts are exact.
    (base, *experts), total_in = big_models(tmp_path)
    cfg = {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [{"model": str(f), "parameters": {"weight": 0.5, "density": 0.2}} for f in experts],
        "out_dtype": "float32",
    }
    out = merge_rss(cfg, tmp_path, total_in)
    name = NAMES[1]
    xs = [np.array(tensor_view(f, name)) for f in experts]
    want = ref.task_family("ties", np.array(tensor_view(base, name)), xs, name, [0.5, 0.5], [0.2, 0.2])
    np.testing.assert_array_equal(np.array(tensor_view(out, name)), want.astype(np.float32))


def test_peak_rss_within_budget(tmp_path):
    weights = [0.5, 0.3, 0.2]
    folders, total_in = big_models(tmp_path)

    cfg = {
        "merge_method": "linear",
        "models": [
            {"model": str(f), "parameters": {"weight": w}} for f, w in zip(folders, weights, strict=True)
        ],
        "out_dtype": "float32",
    }
    out = merge_rss(cfg, tmp_path, total_in)

    # The output did not pile up in the page cache: the writer drops what is on disk once it
    # is 32 MiB behind the newest writes (96 MiB written here).
    if sys.platform == "linux" and drops_written_pages(tmp_path):
        shard = out / "model.safetensors"
        resident = resident_bytes(shard)
        assert resident <= 48 * MiB, f"{resident / MiB:.0f} of {shard.stat().st_size / MiB:.0f} MiB cached"

    # The measurement sees memory a child really touches ...
    _rc, hog, _ = peak_rss([sys.executable, "-c", "b = b'x' * (300 << 20)"], tmp_path)
    assert hog >= 300 * MiB, f"measured {hog / MiB:.0f} MiB for a 300 MiB allocation"
    # ... and is not inflated by this (pytest) process's own size.
    _rc, baseline, _ = peak_rss([sys.executable, "-c", "import mergex, mergex.cli"], tmp_path)
    assert baseline < 150 * MiB, f"python + import mergex measured at {baseline / MiB:.0f} MiB"

    # And the merge is right (spot checks at both ends of every tensor).
    for name in NAMES:
        got = tensor_view(out, name).reshape(-1)
        xs = [tensor_view(f, name).reshape(-1) for f in folders]
        for sl in (
            slice(0, 4096),
            slice(got.size - 4096, got.size),
            slice(3_000_000, 3_004_096),
        ):
            want = ref.linear([np.array(x[sl]) for x in xs], weights)
            np.testing.assert_array_equal(np.array(got[sl]), want, err_msg=name)


FP8_SHAPE = (12288, 4096)  # 50M one-byte codes a tensor, 48 MiB (192 MiB decoded to f32)
FP8_BLOCK = 128
FP8_NAMES = NAMES[1:3]


def write_fp8_model(path: Path, seed: int) -> int:
    """A block FP8 model folder (QUANT.md §3): random finite E4M3 codes, F32 scales."""
    path.mkdir(parents=True)
    n = FP8_SHAPE[0] * FP8_SHAPE[1]
    grid = (FP8_SHAPE[0] // FP8_BLOCK, FP8_SHAPE[1] // FP8_BLOCK)
    rng = np.random.default_rng(seed)
    scales = {name: (rng.random(grid, dtype=np.float32) * 0.01 + 1e-3) for name in FP8_NAMES}
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in FP8_NAMES:
        header[name] = {"dtype": "F8_E4M3", "shape": list(FP8_SHAPE), "data_offsets": [offset, offset + n]}
        offset += n
        size = scales[name].nbytes
        header[name + "_scale_inv"] = {
            "dtype": "F32",
            "shape": list(grid),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    hbytes = json.dumps(header).encode()
    hbytes += b" " * (-len(hbytes) % 8)
    with open(path / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(hbytes)) + hbytes)
        for name in FP8_NAMES:
            rng.integers(0, 0x7F, size=FP8_SHAPE, dtype=np.uint8).tofile(f)
            scales[name].tofile(f)
    cfg = models.model_config(layers=2, dtype="bf16", hidden_size=FP8_SHAPE[1], vocab_size=FP8_SHAPE[0])
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [FP8_BLOCK] * 2}
    (path / "config.json").write_text(json.dumps(cfg))
    return offset


def test_peak_rss_within_budget_on_fp8_inputs(tmp_path):
    # Decoding happens for a chunk's elements only: three FP8 models of 96 MiB (384 MiB
    # once decoded to f32) merge within the 32 MiB budget.
    folders, total_in = [], 0
    for k in range(3):
        folders.append(tmp_path / f"fp8-{k}")
        total_in += write_fp8_model(folders[-1], seed=200 + k)
    assert total_in >= 5 * BUDGET
    cfg = {
        "merge_method": "linear",
        "models": [{"model": str(f), "parameters": {"weight": 1.0}} for f in folders],
        "out_dtype": "float32",
    }
    out = merge_rss(cfg, tmp_path, total_in)
    name = FP8_NAMES[0]
    got = tensor_view(out, name).reshape(-1)
    sl = slice(got.size - 3 * FP8_SHAPE[1] - 77, got.size)  # the last rows, across blocks
    rows = np.arange(FP8_SHAPE[0] * FP8_SHAPE[1])[sl] // FP8_SHAPE[1]
    cols = np.arange(FP8_SHAPE[0] * FP8_SHAPE[1])[sl] % FP8_SHAPE[1]
    xs = []
    for f in folders:
        codes = np.array(raw_view(f, name, np.uint8).reshape(-1)[sl])
        s = np.array(raw_view(f, name + "_scale_inv", np.float32))
        xs.append((e4m3(codes) * s[rows // FP8_BLOCK, cols // FP8_BLOCK]).astype(np.float32))
    np.testing.assert_array_equal(np.array(got[sl]), ref.linear(xs, [1.0, 1.0, 1.0]))


def test_peak_rss_within_budget_writing_fp8(tmp_path):
    # The same merge written back as block FP8 (out_quantization: base): a chunk is whole
    # blocks of 128 rows, encoded from its own merged values, within the same budget.
    from support import quant_ref

    folders, total_in = [], 0
    for k in range(3):
        folders.append(tmp_path / f"fp8-{k}")
        total_in += write_fp8_model(folders[-1], seed=300 + k)
    cfg = {
        "merge_method": "linear",
        "models": [{"model": str(f), "parameters": {"weight": 1.0}} for f in folders],
        "out_quantization": "base",
    }
    out = merge_rss(cfg, tmp_path, total_in)
    name, (rows, cols) = FP8_NAMES[0], FP8_SHAPE
    # The last row of blocks, first two blocks across: decode, merge, encode with numpy.
    r0, width = rows - FP8_BLOCK, 2 * FP8_BLOCK
    xs = []
    for f in folders:
        codes = np.array(raw_view(f, name, np.uint8).reshape(rows, cols)[r0:, :width])
        s = np.array(raw_view(f, name + "_scale_inv", np.float32))[-1, :2]
        xs.append((e4m3(codes) * np.repeat(s, FP8_BLOCK)[None, :]).astype(np.float32))
    want = quant_ref.encode(ref.linear(xs, [1.0, 1.0, 1.0]), "amax", (FP8_BLOCK, FP8_BLOCK), "F32")
    got_codes = np.array(raw_view(out, name, np.uint8).reshape(rows, cols)[r0:, :width])
    got_scales = np.array(raw_view(out, name + "_scale_inv", np.float32))[-1, :2]
    np.testing.assert_array_equal(got_codes, want["codes"].astype(np.uint8))
    np.testing.assert_array_equal(got_scales, want["scales"].reshape(-1))


def e4m3(c: np.ndarray) -> np.ndarray:
    c = c.astype(np.int64)
    e, m = (c >> 3) & 0xF, (c & 7).astype(np.float64)
    mag = np.where(e == 0, m / 8 * 2.0**-6, (1 + m / 8) * 2.0 ** (e - 7))
    return (np.where(c & 0x80, -1.0, 1.0) * mag).astype(np.float32)


def test_peak_rss_within_budget_with_adapter_inputs(tmp_path):
    # Two of the three big models carry a rank-64 LoRA adapter on every tensor: the reader
    # adds B·A for each chunk's rows only, so the merge stays within the same budget.
    folders, total_in = big_models(tmp_path)
    rank, rng = 64, np.random.default_rng(7)
    adapters = []
    for k in range(2):
        factors = {
            name.removesuffix(".weight"): (
                (rng.standard_normal((rank, SHAPE[1])) * 0.05).astype(np.float32),
                (rng.standard_normal((SHAPE[0], rank)) * 0.05).astype(np.float32),
            )
            for name in NAMES
        }
        adapters.append(factors)
        models.write_adapter(tmp_path / f"adapter{k}", factors, {"r": rank, "lora_alpha": 2 * rank})
    refs = [f"{folders[0]}+{tmp_path / 'adapter0'}", f"{folders[1]}+{tmp_path / 'adapter1'}", str(folders[2])]
    weights = [0.5, 0.3, 0.2]
    cfg = {
        "merge_method": "linear",
        "models": [{"model": m, "parameters": {"weight": w}} for m, w in zip(refs, weights, strict=True)],
        "out_dtype": "float32",
    }
    out = merge_rss(cfg, tmp_path, total_in)
    for name in NAMES[::3]:
        module = name.removesuffix(".weight")
        rows = slice(SHAPE[0] - 5, SHAPE[0])
        xs = [np.array(tensor_view(f, name)[rows]) for f in folders]
        for k, factors in enumerate(adapters):
            a, b = factors[module]
            xs[k] = ref.lora_apply(xs[k], a, b[rows], 2.0, False)
        np.testing.assert_array_equal(np.array(tensor_view(out, name)[rows]), ref.linear(xs, weights))


def test_peak_rss_within_budget_extracting_a_lora(tmp_path):
    # extract-lora of one big model against another: every weight (24 MiB in f32, 200 MiB
    # for an exact SVD) goes through the randomized range finder, read in row blocks.
    folders, _ = big_models(tmp_path)
    out = tmp_path / "adapter"
    cmd = [*models.mergex_cmd(), "extract-lora", str(folders[1]), str(folders[0]), str(out)]
    rc, rss, stderr = peak_rss([*cmd, "--rank", "8", "--embeddings", "--ram-budget", "32MiB", "-q"], tmp_path)
    assert rc == 0, stderr
    msg = f"peak RSS {rss / MiB:.1f} MiB, budget {BUDGET / MiB:.0f} MiB"
    print(msg)
    assert rss < BUDGET + SLACK, msg
    header = json.loads((out / "adapter_config.json").read_text())
    assert sorted(header["target_modules"]) == sorted(n.removesuffix(".weight") for n in NAMES)
