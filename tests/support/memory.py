"""Peak RSS measured from outside, and the big models the memory tests merge.

``peak_rss`` runs a command under a small launcher and reads its peak resident set size
from ``wait4``. ``write_big_model`` writes a f32 model of four 24 MiB tensors, tensor by
tensor, and ``write_one_tensor_model`` a model of one 8192 x 8192 bf16 tensor from its bit
patterns; ``tensor_view``, ``raw_view`` and ``bf16_view`` map one tensor of such a file
without reading it.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np

from support import models

MiB = 1 << 20
BUDGET = 32 * MiB
SLACK = 200 * MiB  # interpreter, imports, thread stacks, allocator slop
SHAPE = (6144, 1024)  # 6.3M elements, 24 MiB in f32
NAMES = [
    "model.embed_tokens.weight",
    "model.layers.0.mlp.up_proj.weight",
    "model.layers.1.mlp.up_proj.weight",
    "lm_head.weight",
]


def write_big_model(path: Path, seed: int) -> int:
    """A f32 model folder written tensor by tensor (the test process stays small)."""
    path.mkdir(parents=True)
    nbytes = SHAPE[0] * SHAPE[1] * 4
    header = {"__metadata__": {"format": "pt"}}
    for i, name in enumerate(NAMES):
        header[name] = {
            "dtype": "F32",
            "shape": list(SHAPE),
            "data_offsets": [i * nbytes, (i + 1) * nbytes],
        }
    hbytes = json.dumps(header).encode()
    hbytes += b" " * (-len(hbytes) % 8)
    rng = np.random.default_rng(seed)
    with open(path / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(hbytes)) + hbytes)
        for _ in NAMES:
            rng.standard_normal(SHAPE, dtype=np.float32).tofile(f)
    cfg = models.model_config(layers=2, dtype="f32", hidden_size=SHAPE[1], vocab_size=SHAPE[0])
    (path / "config.json").write_text(json.dumps(cfg))
    return nbytes * len(NAMES)


def tensor_view(folder: Path, name: str) -> np.ndarray:
    """A memory map of one tensor of a safetensors file (f32 only)."""
    return raw_view(folder, name, np.dtype("<f4"), "F32")


def raw_view(folder: Path, name: str, dtype: np.dtype | type, expect: str | None = None) -> np.ndarray:
    """A memory map of one tensor of a safetensors file, as ``dtype``."""
    f = folder / "model.safetensors"
    with open(f, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    info = header[name]
    assert expect is None or info["dtype"] == expect
    a, _b = info["data_offsets"]
    return np.memmap(f, dtype=dtype, mode="r", offset=8 + n + a, shape=tuple(info["shape"]))


# Runs the command and prints its peak RSS (KiB) as read by wait4. The launcher matters:
# Linux keeps the largest RSS a process had *before* exec in its ru_maxrss, and a child
# spawned straight from pytest starts out as a copy of (or shares) pytest's address space,
# so its ru_maxrss would be at least pytest's own RSS. A child of this small launcher
# starts from the launcher's few MiB instead.
LAUNCHER = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[1:])
_pid, status, usage = os.wait4(proc.pid, 0)
print(usage.ru_maxrss)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def peak_rss(cmd: list[str], cwd: Path) -> tuple[int, int, str]:
    """Run ``cmd``; return (exit code, its peak RSS in bytes, stderr)."""
    res = subprocess.run(
        [sys.executable, "-c", LAUNCHER, *cmd],
        check=False,
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )
    lines = res.stdout.split()
    assert lines, f"launcher printed nothing; stderr:\n{res.stderr}"
    return res.returncode, int(lines[-1]) * 1024, res.stderr  # KiB on Linux


# --------------------------------------------------------------------------- one big bf16 tensor

MEM_SHAPE = (8192, 8192)  # 64M elements, 128 MiB in bf16: 8x the tests' 16 MiB budget
MEM_NAME = "model.layers.0.mlp.up_proj.weight"


def write_one_tensor_model(path: Path, bits: np.ndarray) -> None:
    path.mkdir()
    n = bits.size
    header = {
        "__metadata__": {"format": "pt"},
        MEM_NAME: {"dtype": "BF16", "shape": list(MEM_SHAPE), "data_offsets": [0, 2 * n]},
    }
    hbytes = json.dumps(header).encode()
    hbytes += b" " * (-len(hbytes) % 8)
    with open(path / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(hbytes)) + hbytes)
        bits.tofile(f)
    (path / "config.json").write_text(json.dumps(models.model_config(layers=1, dtype="bf16")))


def bf16_view(folder: Path) -> np.ndarray:
    f = folder / "model.safetensors"
    with open(f, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    info = header[MEM_NAME]
    assert info["dtype"] == "BF16" and info["shape"] == list(MEM_SHAPE)
    a, b = info["data_offsets"]
    return np.memmap(f, dtype="<u2", mode="r", offset=8 + n + a, shape=((b - a) // 2,))
