"""CLI failures: one ``error:`` line naming the culprit, the right exit code, no traceback,
no output (not even a temporary folder) and untouched inputs.

Exit codes (contract): 2 for configuration errors (bad YAML, unknown key or method), 1 for
everything else (bad checkpoint, missing tensor, shape mismatch, missing model folder).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from support import models
from support import reference as ref


@dataclass
class Setup:
    config: Path  # the YAML file passed to the CLI
    expect_code: int
    mentions: list[str]  # each must appear in the error line
    inputs: list[Path]  # folders/files that must not change


def two_models(tmp_path, **kw_b):
    a = models.make_llama(tmp_path / "model_a", "bf16", seed=1)
    b = models.make_llama(tmp_path / "model_b", "bf16", seed=2, **kw_b)
    return a, b


def linear_yaml(tmp_path, *refs, extra=None, name="merge.yml") -> Path:
    cfg = {
        "merge_method": "linear",
        "models": [{"model": str(r), "parameters": {"weight": 1.0}} for r in refs],
    }
    cfg.update(extra or {})
    return models.dump_yaml(cfg, tmp_path / name)


def rewrite_header(path: Path, edit) -> None:
    """Apply ``edit(header_dict)`` to a safetensors file, keeping its data bytes."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    hbytes = json.dumps(header).encode()
    hbytes += b" " * (-len(hbytes) % 8)
    path.write_bytes(struct.pack("<Q", len(hbytes)) + hbytes + data[8 + n :])


# --------------------------------------------------------------------------- cases


def case_truncated_file(tmp_path):
    a, b = two_models(tmp_path)
    f = b.path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    return Setup(linear_yaml(tmp_path, a, b), 1, ["model_b"], [a.path, b.path])


def case_truncated_shard(tmp_path):
    a, b = two_models(tmp_path, shards=3)
    f = b.path / "model-00002-of-00003.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    return Setup(linear_yaml(tmp_path, a, b), 1, ["model-00002-of-00003"], [a.path, b.path])


def case_bad_header_json(tmp_path):
    a, b = two_models(tmp_path)
    f = b.path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b'{"oops": [1,'  # same length, header no longer valid JSON
    f.write_bytes(bytes(data))
    return Setup(linear_yaml(tmp_path, a, b), 1, ["model_b"], [a.path, b.path])


def case_header_length_too_big(tmp_path):
    a, b = two_models(tmp_path)
    f = b.path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(struct.pack("<Q", len(data) * 4) + data[8:])
    return Setup(linear_yaml(tmp_path, a, b), 1, ["model_b"], [a.path, b.path])


def case_offsets_outside_file(tmp_path):
    a, b = two_models(tmp_path)
    f = b.path / "model.safetensors"
    name = "model.layers.1.mlp.up_proj.weight"

    def edit(h):
        lo, hi = h[name]["data_offsets"]
        h[name]["data_offsets"] = [lo + 10**9, hi + 10**9]

    rewrite_header(f, edit)
    return Setup(linear_yaml(tmp_path, a, b), 1, ["model_b"], [a.path, b.path])


def case_offsets_disagree_with_shape(tmp_path):
    a, b = two_models(tmp_path)
    f = b.path / "model.safetensors"
    name = "model.layers.0.self_attn.q_proj.weight"

    def edit(h):
        h[name]["shape"] = [96, 97]  # data_offsets still span 96 x 96 bf16 values

    rewrite_header(f, edit)
    return Setup(linear_yaml(tmp_path, a, b), 1, ["model_b"], [a.path, b.path])


def case_missing_tensor(tmp_path):
    a = models.make_llama(tmp_path / "model_a", "bf16", seed=1)
    shapes = models.llama_shapes()
    del shapes["model.layers.1.mlp.up_proj.weight"]
    b = models.write_model(tmp_path / "model_b", models.random_tensors(shapes, "bf16", 2), "bf16", layers=3)
    return Setup(
        linear_yaml(tmp_path, a, b),
        1,
        ["model.layers.1.mlp.up_proj.weight", "model_b"],
        [a.path, b.path],
    )


def case_shape_mismatch(tmp_path):
    a = models.make_llama(tmp_path / "model_a", "bf16", seed=1)
    shapes = models.llama_shapes()
    shapes["model.layers.2.self_attn.q_proj.weight"] = (96, 64)
    b = models.write_model(tmp_path / "model_b", models.random_tensors(shapes, "bf16", 2), "bf16", layers=3)
    return Setup(
        linear_yaml(tmp_path, a, b),
        1,
        ["model.layers.2.self_attn.q_proj.weight"],
        [a.path, b.path],
    )


def case_missing_model_folder(tmp_path):
    a = models.make_llama(tmp_path / "model_a", "bf16", seed=1)
    missing = tmp_path / "no_such_model"
    return Setup(linear_yaml(tmp_path, a, missing), 1, ["no_such_model"], [a.path])


def case_shard_path_leaves_folder(tmp_path):
    a, b = two_models(tmp_path, shards=2)
    # A perfectly valid file sits outside the folder: the index must still be refused.
    models.make_llama(tmp_path / "elsewhere", "bf16", seed=3)
    outside = tmp_path / "x.safetensors"
    outside.write_bytes((tmp_path / "elsewhere" / "model.safetensors").read_bytes())
    index_path = b.path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../x.safetensors"
    index_path.write_text(json.dumps(index))
    return Setup(linear_yaml(tmp_path, a, b), 1, ["x.safetensors"], [a.path, b.path, outside])


def case_bad_yaml(tmp_path):
    a = models.make_llama(tmp_path / "model_a", "bf16", seed=1)
    cfg = tmp_path / "broken.yml"
    cfg.write_text(f"merge_method: linear\nmodels:\n  - model: {a.path}\n   parameters: {{weight: [1, 2\n")
    return Setup(cfg, 2, ["broken.yml"], [a.path])


def case_unknown_method(tmp_path):
    a, b = two_models(tmp_path)
    cfg = linear_yaml(tmp_path, a, b, extra={"merge_method": "frobnicate"})
    return Setup(cfg, 2, ["frobnicate"], [a.path, b.path])


def case_unknown_top_level_key(tmp_path):
    a, b = two_models(tmp_path)
    cfg = linear_yaml(tmp_path, a, b, extra={"unknown_knob": 3})
    return Setup(cfg, 2, ["unknown_knob"], [a.path, b.path])


def case_normalize_zero_weights(tmp_path):
    # METHODS.md §1 (mergex rule): normalize with a weight sum of 0 is a config error.
    a, b = two_models(tmp_path)
    cfg = {
        "merge_method": "linear",
        "models": [
            {"model": str(a.path), "parameters": {"weight": 1.0}},
            {"model": str(b.path), "parameters": {"weight": -1.0}},
        ],
    }
    return Setup(models.dump_yaml(cfg, tmp_path / "merge.yml"), 2, ["weight"], [a.path, b.path])


CASES = {
    f.__name__.removeprefix("case_"): f
    for f in (
        case_truncated_file,
        case_truncated_shard,
        case_bad_header_json,
        case_header_length_too_big,
        case_offsets_outside_file,
        case_offsets_disagree_with_shape,
        case_missing_tensor,
        case_shape_mismatch,
        case_missing_model_folder,
        case_shard_path_leaves_folder,
        case_bad_yaml,
        case_unknown_method,
        case_unknown_top_level_key,
        case_normalize_zero_weights,
    )
}


error_line = models.error_line


@pytest.mark.parametrize("case", list(CASES))
def test_cli_error(tmp_path, case):
    setup = CASES[case](tmp_path)
    before = models.file_hashes(setup.config, *[p for p in setup.inputs if p.exists()])
    outs = tmp_path / "outs"
    outs.mkdir()
    out = outs / "merged"
    res = models.run_cli(
        [
            "merge",
            setup.config,
            out,
            "--ram-budget",
            "64KiB",
            "--threads",
            "2",
            "--quiet",
        ]
    )
    line = error_line(res.stderr)
    assert res.returncode == setup.expect_code, f"exit {res.returncode}: {line}"
    for word in setup.mentions:
        assert word in line, f"{word!r} not named in: {line}"
    assert list(outs.iterdir()) == [], f"left behind: {list(outs.iterdir())}"
    after = models.file_hashes(setup.config, *[p for p in setup.inputs if p.exists()])
    assert after == before, "an input changed"


@pytest.mark.parametrize("case", ["truncated_file", "missing_tensor", "unknown_method"])
def test_api_raises_contract_errors(tmp_path, mergex_mod, case):
    setup = CASES[case](tmp_path)
    expected = {
        "truncated_file": mergex_mod.CheckpointError,
        "missing_tensor": mergex_mod.MergexError,
        "unknown_method": mergex_mod.ConfigError,
    }[case]
    out = tmp_path / "outs" / "merged"
    out.parent.mkdir()
    with pytest.raises(expected):
        mergex_mod.merge(setup.config, out, ram_budget="64KiB", threads=2, progress=False)
    assert list(out.parent.iterdir()) == []


def test_api_missing_model_is_file_not_found(tmp_path, mergex_mod):
    setup = case_missing_model_folder(tmp_path)
    with pytest.raises(FileNotFoundError) as info:
        mergex_mod.merge(setup.config, tmp_path / "out", progress=False)
    assert isinstance(info.value, mergex_mod.ModelNotFoundError)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- output location


def test_refuses_to_write_into_an_input_folder(tmp_path):
    a, b = two_models(tmp_path)
    cfg = linear_yaml(tmp_path, a, b)
    before = models.file_hashes(a.path, b.path)
    res = models.run_cli(["merge", cfg, a.path, "--overwrite", "--quiet", "--threads", "2"])
    line = error_line(res.stderr)
    assert res.returncode in (1, 2), line
    assert "model_a" in line or "input" in line.lower(), line
    assert models.file_hashes(a.path, b.path) == before, "an input folder was modified"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "merge.yml",
        "model_a",
        "model_b",
    ]


def test_refuses_existing_output_without_overwrite(tmp_path):
    a, b = two_models(tmp_path)
    out = tmp_path / "merged"
    # A folder from an earlier merge, plus a marker file, to see what replaces it.
    first = models.run_cli(["merge", linear_yaml(tmp_path, a), out, "--quiet", "--threads", "2"])
    assert first.returncode == 0, first.stderr
    (out / "keep.txt").write_text("precious")
    before = models.file_hashes(out)

    cfg = linear_yaml(tmp_path, a, b, name="merge2.yml")
    res = models.run_cli(["merge", cfg, out, "--quiet", "--threads", "2"])
    line = error_line(res.stderr)
    assert res.returncode in (1, 2), line
    assert "merged" in line and ("overwrite" in line.lower() or "exists" in line.lower()), line
    assert models.file_hashes(out) == before, "the existing output was modified"
    assert not [p for p in tmp_path.iterdir() if "mergex-" in p.name]

    # With --overwrite the folder is replaced by the new merge.
    res = models.run_cli(["merge", cfg, out, "--overwrite", "--quiet", "--threads", "2"])
    assert res.returncode == 0, res.stderr
    assert not (out / "keep.txt").exists()
    loaded = models.read_output(out)
    for name in ("model.norm.weight", "lm_head.weight"):
        np.testing.assert_array_equal(
            loaded.f32(name), ref.round_to((a.tensors[name] + b.tensors[name]) / np.float32(2), "BF16")
        )
    assert not [p for p in tmp_path.iterdir() if "mergex-" in p.name]


def test_overwrite_refuses_a_folder_mergex_did_not_write(tmp_path):
    # Not in the contract, but the engine's documented safety rule: --overwrite only
    # replaces a previous mergex output (one with mergex_config.yml), never e.g. a home dir.
    a, b = two_models(tmp_path)
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("not a model")
    res = models.run_cli(["merge", linear_yaml(tmp_path, a, b), out, "--overwrite", "--quiet"])
    line = error_line(res.stderr)
    assert res.returncode in (1, 2), line
    assert "precious" in line, line
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert not [p for p in tmp_path.iterdir() if "mergex-" in p.name]


def test_api_existing_output_error_type(tmp_path, mergex_mod):
    a, b = two_models(tmp_path)
    out = tmp_path / "merged"
    out.mkdir()
    with pytest.raises(FileExistsError) as info:
        mergex_mod.merge(str(linear_yaml(tmp_path, a, b)), out, progress=False)
    assert isinstance(info.value, mergex_mod.OutputExistsError)


def test_api_errors_carry_the_file_and_tensor(tmp_path, mergex_mod):
    # From the Rust reader (a header whose shape disagrees with its offsets) and from the
    # Python planner (a missing tensor): `path` and `tensor` as attributes.
    setup = case_offsets_disagree_with_shape(tmp_path)
    with pytest.raises(mergex_mod.CheckpointError) as info:
        mergex_mod.merge(setup.config, tmp_path / "out", progress=None)
    assert info.value.path == str(tmp_path / "model_b" / "model.safetensors")
    assert info.value.tensor == "model.layers.0.self_attn.q_proj.weight"
    setup = case_missing_tensor(tmp_path / "missing")
    with pytest.raises(mergex_mod.CheckpointError) as info:
        mergex_mod.plan(setup.config)
    assert info.value.tensor == "model.layers.1.mlp.up_proj.weight"
    assert info.value.path == str(tmp_path / "missing" / "model_b")
    cfg = {
        "merge_method": "linear",
        "models": [{"model": str(setup.inputs[0]), "parameters": {"weight": math.nan}}],
    }
    with pytest.raises(
        mergex_mod.ConfigError, match=r"'weight'.*expected a finite number, got nan"
    ) as cfg_info:
        mergex_mod.plan(cfg)
    assert cfg_info.value.path is None and cfg_info.value.tensor is not None
