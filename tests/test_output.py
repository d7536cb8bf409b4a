"""The output folder: readable by the safetensors package, sharding, dtype rounding, extras."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import yaml
from safetensors import safe_open
from safetensors.numpy import load_file
from support import models
from support import reference as ref


def linear_cfg(*ms, out_dtype=None, weights=None):
    weights = weights or [1.0] * len(ms)
    cfg = {
        "merge_method": "linear",
        "models": [{"model": m, "parameters": {"weight": w}} for m, w in zip(ms, weights, strict=True)],
    }
    if out_dtype:
        cfg["out_dtype"] = out_dtype
    return cfg


# --------------------------------------------------------------------------- safetensors


@pytest.mark.parametrize("out_dtype", ["float32", "float16"])
def test_loads_with_safetensors_package(zoo, run_merge, out_dir, out_dtype):
    a, b = zoo("bf16", seed=1), zoo("bf16", seed=2, shards=2)
    out = run_merge(linear_cfg(a, b, out_dtype=out_dtype, weights=[0.4, 0.6]), out_dir)
    assert [p.name for p in out.files] == ["model.safetensors"]
    path = out_dir / "model.safetensors"
    loaded = load_file(path)
    assert set(loaded) == set(a.tensors)
    np_dtype = {"float32": np.float32, "float16": np.float16}[out_dtype]
    for name, arr in loaded.items():
        assert arr.dtype == np_dtype
        assert arr.shape == a.tensors[name].shape
        want = ref.linear([a.tensors[name], b.tensors[name]], [0.4, 0.6])
        np.testing.assert_array_equal(arr, want.astype(np_dtype), err_msg=name)
    with safe_open(path, framework="np") as f:
        meta = f.metadata()
        assert meta is not None and meta.get("format") == "pt"
        assert set(f.keys()) == set(a.tensors)
        name = "model.layers.1.mlp.up_proj.weight"
        np.testing.assert_array_equal(f.get_tensor(name), loaded[name])
        sl = f.get_slice(name)[3:7]
        np.testing.assert_array_equal(sl, loaded[name][3:7])


def test_bf16_output_header_and_metadata(zoo, run_merge, out_dir):
    a, b = zoo("f32", seed=1), zoo("f32", seed=2)
    out = run_merge(linear_cfg(a, b, out_dtype="bfloat16"), out_dir)
    with safe_open(out_dir / "model.safetensors", framework="np") as f:
        assert f.metadata()["format"] == "pt"
        assert set(f.keys()) == set(a.tensors)
    for name in a.tensors:
        assert out.dtype(name) == "BF16"
    # Data is packed: the last tensor ends at the end of the file.
    raw = (out_dir / "model.safetensors").read_bytes()
    (n,) = np.frombuffer(raw[:8], dtype="<u8")
    header = json.loads(raw[8 : 8 + int(n)])
    header.pop("__metadata__")
    assert max(v["data_offsets"][1] for v in header.values()) == len(raw) - 8 - int(n)
    assert (8 + int(n)) % 8 == 0, "header not padded to 8 bytes: tensor data misaligned"


# --------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("shard_size", ["64KiB", "200KiB", 150_000])
def test_sharded_output_index(zoo, mergex_mod, out_dir, shard_size):
    a, b = zoo("bf16", seed=1), zoo("f16", seed=2, shards=3)
    result = mergex_mod.merge(
        models._plain(linear_cfg(a, b, out_dtype="float32")),
        out_dir,
        ram_budget="64KiB",
        threads=2,
        shard_size=shard_size,
        progress=False,
    )
    limit = {"64KiB": 64 * 1024, "200KiB": 200 * 1024}.get(shard_size, shard_size)
    index_path = out_dir / "model.safetensors.index.json"
    assert index_path.exists()
    assert not (out_dir / "model.safetensors").exists()
    index = json.loads(index_path.read_text())
    weight_map = index["weight_map"]
    assert set(weight_map) == set(a.tensors), "weight_map must cover every tensor"

    shards = sorted(p.name for p in out_dir.glob("*.safetensors"))
    k = len(shards)
    assert k > 1
    assert shards == [f"model-{i:05d}-of-{k:05d}.safetensors" for i in range(1, k + 1)]
    assert set(weight_map.values()) == set(shards), "every shard is referenced"
    assert sorted(p.name for p in result.files if p.suffix == ".safetensors") == shards

    total = 0
    seen = set()
    for shard in shards:
        with safe_open(out_dir / shard, framework="np") as f:
            assert f.metadata()["format"] == "pt"
            names = set(f.keys())
            nbytes = 0
            for name in names:
                arr = f.get_tensor(name)
                nbytes += arr.nbytes
                want = ref.linear([a.tensors[name], b.tensors[name]], [1.0, 1.0])
                np.testing.assert_array_equal(arr, want, err_msg=name)
        assert names == {n for n, s in weight_map.items() if s == shard}
        assert not names & seen
        seen |= names
        total += nbytes
        # A shard holds at most shard_size bytes of tensors, unless one tensor alone is
        # bigger than that.
        assert nbytes <= limit or len(names) == 1, f"{shard}: {nbytes} bytes > {limit}"
    assert seen == set(a.tensors)
    assert index["metadata"]["total_size"] == total
    assert total == sum(t.size * 4 for t in a.tensors.values())


# --------------------------------------------------------------------------- bf16 rounding


def halfway_patterns(rng, n):
    """f32 bit patterns around bf16 rounding boundaries: ties, and one ulp on each side."""
    # High halves with normal exponents (1..253), both signs, both parities of the last
    # kept bit, plus the largest finite bf16 (0x7F7F) whose tie rounds up to infinity.
    hi = rng.integers(0x0080, 0x7E80, size=n, dtype=np.uint32)
    hi[: n // 2] |= 1  # odd last kept bit
    hi[n // 2 :] &= ~np.uint32(1)  # even
    hi[::3] |= 0x8000  # negative
    lows = np.array([0x8000, 0x7FFF, 0x8001, 0x0010, 0xFFF0, 0x4000, 0xC000], dtype=np.uint32)
    lo = lows[np.arange(n) % len(lows)]
    bits = (hi << np.uint32(16)) | lo
    special = np.array(
        [
            0x7F7F8000,
            0xFF7F8000,
            0x7F7F7FFF,
            0x7F7E8000,
            0x3F808000,
            0x3F818000,
            0x3F810000,
        ],
        dtype=np.uint32,
    )
    bits[: len(special)] = special
    return bits


def test_bf16_round_to_nearest_even_of_linear_average(make_model, run_merge, out_dir):
    """Averages land exactly on bf16 ties (and one f32 ulp either side): ties go to even."""
    rng = np.random.default_rng(5)
    shape = (64, 96)  # 6144 elements: several chunks at 64KiB
    t = halfway_patterns(rng, shape[0] * shape[1]).reshape(shape)
    target = t.view(np.float32)
    # a = t + 5 ulp, b = t - 5 ulp (same binade, low half in 0x10..0xFFF0): 0.5a + 0.5b
    # is exactly t, and each product is exact, so the f32 result before rounding is t.
    a_vals = (t + np.uint32(5)).view(np.float32)
    b_vals = (t - np.uint32(5)).view(np.float32)
    assert np.array_equal(np.float32(0.5) * a_vals + np.float32(0.5) * b_vals, target)
    names = {"model.embed_tokens.weight": None, "model.norm.weight": None}
    a = models.write_model(
        out_dir.parent.parent / "tie_a",
        {"model.embed_tokens.weight": a_vals, "model.norm.weight": a_vals[0]},
        "f32",
    )
    b = models.write_model(
        out_dir.parent.parent / "tie_b",
        {"model.embed_tokens.weight": b_vals, "model.norm.weight": b_vals[0]},
        "f32",
        shards=2,
    )
    cfg = linear_cfg(a, b, out_dtype="bfloat16", weights=[0.5, 0.5])
    cfg["parameters"] = {"normalize": False}
    out = run_merge(cfg, out_dir)
    assert set(out.raw) == set(names)
    got = out.array("model.embed_tokens.weight")
    want = ref.f32_to_bf16_bits(target)
    if not np.array_equal(got, want):
        raise AssertionError(models.describe_mismatch("embed", got, want, "BF16"))
    # Spot-check the reference itself on the hand-picked patterns.
    flat = got.reshape(-1)
    assert flat[0] == 0x7F80  # tie above the largest finite bf16 -> +inf
    assert flat[1] == 0xFF80  # -> -inf
    assert flat[2] == 0x7F7F  # just below the tie: stays finite
    assert flat[3] == 0x7F7E  # tie, even last bit: stays
    assert flat[4] == 0x3F80  # 1.0 + half ulp, even: down
    assert flat[5] == 0x3F82  # odd: up to even
    assert flat[6] == 0x3F81  # exactly representable
    np.testing.assert_array_equal(out.array("model.norm.weight"), want[0])


def test_bf16_and_f16_conversion_edge_values(make_model, run_merge, out_dir):
    """A plain passthrough f32 -> bf16/f16: subnormals, signed zeros, infinities, NaN."""
    rng = np.random.default_rng(6)
    bits = halfway_patterns(rng, 4096)
    edge = np.array(
        [
            0x00000000,
            0x80000000,
            0x7F800000,
            0xFF800000,  # zeros, infinities
            0x00000001,
            0x00008000,
            0x00018000,
            0x00017FFF,  # subnormals, ties
            0x807F8000,
            0x007FFFFF,
            0x7F7FFFFF,
            0xFF7FFFFF,  # largest subnormal/finite
            0x33000000,
            0x33000001,
            0x387FE000,
            0x477FF000,  # f16 tie to 0, f16 edges
            0x7FC00000,
            0xFFC00001,
            0x7F800001,
            0x7FFFFFFF,  # NaNs (last two overflow
        ],  # a naive rounding into infinity / the wrong NaN)
        dtype=np.uint32,
    )
    bits[: edge.size] = edge
    x = bits.view(np.float32).reshape(64, 64)
    src = models.write_model(out_dir.parent.parent / "edge", {"model.embed_tokens.weight": x}, "f32")
    nan = np.isnan(x)
    for out_dtype, dt in (("bfloat16", "BF16"), ("float16", "F16")):
        target = out_dir.parent / f"edge-{out_dtype}"
        cfg = {
            "merge_method": "passthrough",
            "models": [{"model": src}],
            "out_dtype": out_dtype,
        }
        got = run_merge(cfg, target).array("model.embed_tokens.weight")
        want = ref.from_f32(x, dt)
        gv = ref.to_f32(got, dt)
        # Any NaN is fine for a NaN input, with its sign kept.
        assert np.isnan(gv[nan]).all(), f"{out_dtype}: NaN input did not give NaN"
        assert (np.signbit(gv[nan]) == np.signbit(x[nan])).all()
        ok = ~nan
        if not np.array_equal(got[ok], want[ok]):
            raise AssertionError(models.describe_mismatch(out_dtype, got[ok], want[ok], dt))


def test_reference_bf16_rounding_self_check():
    """The reference's bit-level rounding on known values (guards the guard)."""
    x = np.array(
        [1.0, 1.00390625, 1.005859375, 1.001953125, 3.0e38, -0.0, 65504.0],
        dtype=np.float32,
    )
    got = ref.f32_to_bf16_bits(x)
    # 1.00390625 = 1 + 2^-8 is a tie between 1.0 (even) and 1.0078125: down.
    # 1.005859375 = 1 + 1.5 * 2^-8 rounds up; 1.001953125 = 1 + 2^-9 rounds down.
    assert got.tolist() == [0x3F80, 0x3F80, 0x3F81, 0x3F80, 0x7F62, 0x8000, 0x4780]
    nan_bits = np.array([0x7F800001, 0xFFFFFFFF], dtype=np.uint32).view(np.float32)
    nb = ref.f32_to_bf16_bits(nan_bits)
    assert np.isnan(ref.bf16_bits_to_f32(nb)).all()
    assert nb.tolist() == [0x7FC0, 0xFFFF]
    r = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    assert np.array_equal(
        ref.f32_to_bf16_bits(ref.bf16_bits_to_f32(ref.f32_to_bf16_bits(r))),
        ref.f32_to_bf16_bits(r),
    )
    err = np.abs(ref.bf16_bits_to_f32(ref.f32_to_bf16_bits(r)) - r) / np.abs(r)
    assert err.max() <= 2.0**-8  # unit roundoff of an 8-bit significand


# --------------------------------------------------------------------------- other files


def test_config_and_side_files(zoo, mergex_mod, out_dir):
    a, b = zoo("bf16", seed=1), zoo("bf16", seed=2)
    cfg = linear_cfg(a, b, out_dtype="float16", weights=[0.25, 0.75])
    result = mergex_mod.merge(
        models._plain(cfg),
        out_dir,
        ram_budget="64KiB",
        threads=2,
        progress=False,
        seed=7,
    )
    assert result.out_dir.resolve() == out_dir.resolve()
    assert result.bytes_written >= sum(t.size * 2 for t in a.tensors.values())
    assert result.bytes_read >= sum(t.size * 2 for t in a.tensors.values()) * 2
    assert result.peak_rss > 0

    out_config = json.loads((out_dir / "config.json").read_text())
    in_config = json.loads((a.path / "config.json").read_text())
    assert in_config["torch_dtype"] == "bfloat16"
    assert out_config["torch_dtype"] == "float16"
    for key in (
        "architectures",
        "model_type",
        "num_hidden_layers",
        "hidden_size",
        "vocab_size",
    ):
        assert out_config[key] == in_config[key], key

    for fname in [*models.TOKENIZER_FILES, "generation_config.json"]:
        assert (out_dir / fname).exists(), f"{fname} not copied"
        assert (out_dir / fname).read_text() == (a.path / fname).read_text()

    run_cfg = yaml.safe_load((out_dir / "mergex_config.yml").read_text())
    assert run_cfg["merge_method"] == "linear"
    assert len(run_cfg["models"]) == 2
    assert 7 in _values(run_cfg), "the seed is recorded in mergex_config.yml"

    readme = (out_dir / "README.md").read_text()
    assert "linear" in readme
    assert a.path.name in readme and b.path.name in readme, "README lists the inputs"

    # No temporary folder left beside the output.
    assert [p.name for p in out_dir.parent.iterdir()] == [out_dir.name]
    assert not [p for p in out_dir.iterdir() if re.search(r"mergex-(partial|old)", p.name)]


def _values(x):
    if isinstance(x, dict):
        for v in x.values():
            yield from _values(v)
    elif isinstance(x, list):
        for v in x:
            yield from _values(v)
    else:
        yield x


def test_reference_bf16_rounding_matches_exact_arithmetic():
    """The bit trick against rounding done with exact f64 arithmetic, on 2M patterns."""
    rng = np.random.default_rng(1)
    bits = rng.integers(0, 2**32, size=2_000_000, dtype=np.uint64).astype(np.uint32)
    bits[:4] = [0x7F7F8000, 0x7F7FFFFF, 0x00008000, 0x00018000]
    x = bits.view(np.float32)
    x = x[np.isfinite(x)]
    got = ref.bf16_bits_to_f32(ref.f32_to_bf16_bits(x)).astype(np.float64)
    xd = x.astype(np.float64)
    # The two bf16 neighbours by truncation toward zero and one step away from it.
    lo_bits = (x.view(np.uint32) >> np.uint32(16)).astype(np.uint16)
    lo = ref.bf16_bits_to_f32(lo_bits).astype(np.float64)
    hi_mag = ref.bf16_bits_to_f32(lo_bits + np.uint16(1)).astype(np.float64)
    # Past the largest finite bf16 the next step is 2^128 (rounds to inf).
    hi = np.where(np.isinf(hi_mag), np.sign(xd) * 2.0**128, hi_mag)
    dlo, dhi = np.abs(xd - lo), np.abs(hi - xd)
    even_lo = (lo_bits & 1) == 0
    pick_lo = (dlo < dhi) | ((dlo == dhi) & even_lo)
    want = np.where(pick_lo, lo, hi)
    want = np.where(np.abs(want) >= 2.0**128, np.sign(xd) * np.inf, want)
    assert np.array_equal(got, want)
