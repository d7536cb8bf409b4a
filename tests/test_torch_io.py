"""The torch engine's reading: the Rust reader hands over the inputs' stored bytes and the
driver decodes them with torch. Every stored float dtype, every bit pattern of the 8-bit
and 16-bit ones (subnormals, infinities and NaNs included), inputs of different widths in
one tensor, and embeddings cut to a narrower common block must give the same numbers as
the Rust engine's own decoding.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import mergex
import mergex.units
import numpy as np
import pytest
import torch
from mergex import api
from mergex.errors import ConfigError
from mergex.job import EngineJob, InputRef, TensorJob
from mergex.torch_engine import driver
from support import models

# Each stored dtype, paired with the dtype the other model stores the same tensor in, so
# that one chunk holds inputs of different widths.
PAIRS = {
    "F8_E4M3": "BF16",
    "F8_E5M2": "F32",
    "F16": "F8_E4M3",
    "BF16": "F16",
    "F32": "F8_E5M2",
    "F64": "BF16",
}
WIDTH = {"F8_E4M3": 1, "F8_E5M2": 1, "F16": 2, "BF16": 2, "F32": 4, "F64": 8}
N = 3 * 65536 + 7


def every_pattern(dtype: str, rng: np.random.Generator) -> bytes:
    """N values covering every bit pattern of a narrow dtype, random bits of a wide one."""
    width = WIDTH[dtype]
    if width <= 2:
        patterns = np.arange(1 << (8 * width), dtype=np.uint8 if width == 1 else np.uint16)
        return np.resize(rng.permutation(patterns), N).tobytes()
    return rng.integers(0, 256, N * width, dtype=np.uint8).tobytes()


def finite(dtype: str, rng: np.random.Generator) -> bytes:
    """N finite values of ``dtype``, of both signs."""
    if dtype.startswith("F8"):
        return (
            rng.integers(0, 0x78, N, dtype=np.uint8) | rng.choice([0, 0x80], N).astype(np.uint8)
        ).tobytes()
    x = rng.standard_normal(N)
    if dtype == "BF16":
        return torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().tobytes()
    return x.astype({"F16": np.float16, "F32": np.float32, "F64": np.float64}[dtype]).tobytes()


def write(root: Path, name: str, tensors: dict) -> Path:
    path = root / name
    path.mkdir()
    models.write_safetensors(path / "model.safetensors", tensors, {"format": "pt"})
    (path / "config.json").write_text(json.dumps({"model_type": "toy"}))
    return path


def run_both(spec: EngineJob, tmp_path: Path, budget: str) -> tuple[models.Output, models.Output]:
    """Run an engine job written by hand on both engines. The planner refuses 8-bit float
    codes without their scales (QUANT.md §1), but the engines' decoding of every stored
    pattern is what a quantized weight's codes go through, so it is tested here directly."""
    outs = []
    for engine in ("rust", "torch"):
        out = tmp_path / f"{engine}-{budget}"
        out.mkdir()
        spec.ram_budget = mergex.units.parse_size(budget, "budget")
        core = mergex._mergex.MergeJob(spec.to_json())
        api._Backend(engine).run(core, spec, out)
        outs.append(models.read_output(out))
    return outs[0], outs[1]


def merge_both(mergex_mod, cfg: dict, tmp_path: Path, budget: str) -> tuple[models.Output, models.Output]:
    outs = []
    for engine in ("rust", "torch"):
        out = tmp_path / f"{engine}-{budget}"
        mergex_mod.merge(models._plain(cfg), out, engine=engine, ram_budget=budget, threads=2, progress=False)
        outs.append(models.read_output(out))
    return outs[0], outs[1]


def assert_same(rust: models.Output, torch_out: models.Output) -> None:
    """Bit-identical outputs, except that a NaN may carry another sign or payload."""
    assert set(rust.raw) == set(torch_out.raw)
    for name, (dtype, shape, data) in rust.raw.items():
        assert torch_out.raw[name][:2] == (dtype, shape), name
        kind, bits = {"F32": (np.float32, np.int32), "F64": (np.float64, np.int64)}[dtype]
        a, b = np.frombuffer(data, kind), np.frombuffer(torch_out.raw[name][2], kind)
        nan = np.isnan(a)
        np.testing.assert_array_equal(nan, np.isnan(b), err_msg=f"{name}: NaN positions")
        np.testing.assert_array_equal(a[~nan].view(bits), b[~nan].view(bits), err_msg=name)


@pytest.mark.parametrize("budget", ["64KiB", "64MiB"])
def test_every_stored_dtype_decodes_like_rust(mergex_mod, tmp_path, budget):
    rng = np.random.default_rng(7)
    a = {f"x.{d}": (d, (N,), every_pattern(d, rng)) for d in PAIRS}
    b = {f"x.{d}": (p, (N,), finite(p, rng)) for d, p in PAIRS.items()}
    paths = [write(tmp_path, "a", a), write(tmp_path, "b", b)]
    spec = EngineJob(
        method="linear",
        models=[str(p) for p in paths],
        tensors=[
            TensorJob(
                name,
                "F64",
                [N],
                [InputRef(k, name, k, {"weight": w}) for k, w in enumerate((1.0, 0.75))],
                {"normalize": 1.0},
            )
            for name in a
        ],
        seed=0,
        ram_budget=0,
        threads=2,
        shard_size=5_000_000_000,
    )
    rust, torch_out = run_both(spec, tmp_path, budget)
    assert_same(rust, torch_out)
    # The merge is not trivial: most values are finite and nonzero.
    x = np.frombuffer(rust.raw["x.F16"][2], np.float64)
    assert np.count_nonzero(np.isfinite(x) & (x != 0)) > N // 2


def test_unknown_stored_dtype_is_a_config_error(monkeypatch):
    monkeypatch.delitem(driver._DTYPES, "F8_E5M2")
    d = driver.Driver.__new__(driver.Driver)
    d.infos = [SimpleNamespace(dtypes=["BF16", "F8_E5M2"])]
    d.spec = SimpleNamespace(tensors=[SimpleNamespace(name="w")])
    with pytest.raises(ConfigError, match="cannot decode F8_E5M2"):
        d.input_dtypes(0)
