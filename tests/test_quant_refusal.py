"""Quantized checkpoints are never mis-merged (QUANT.md §1, §9): every refused format, every
format mergex does not read yet, a configuration that contradicts the tensors and a stray
integer or 8-bit tensor stop the merge (and the plan) before anything is written, with one
line naming the model, the format and the signal. Genuinely plain non-float tensors (index
buffers, masks) are still copied.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from mergex import CheckpointError
from support import models

PROJ = "model.layers.0.mlp.up_proj.weight"  # (INTERMEDIATE, HIDDEN) = (250, 96)
PREFIX = PROJ[: -len("weight")]
ROWS, COLS = models.INTERMEDIATE, models.HIDDEN


def raw(dtype: str, shape: tuple[int, ...], fill: int = 0) -> tuple[str, tuple[int, ...], bytes]:
    size = {"F8_E4M3": 1, "F8_E8M0": 1, "U8": 1, "I8": 1, "BF16": 2, "I32": 4, "F32": 4, "I64": 8}[dtype]
    return dtype, shape, bytes([fill]) * (int(np.prod(shape)) * size)


def quantized(
    root: Path,
    *,
    drop: tuple[str, ...] = (),
    add: dict | None = None,
    quant: dict | None = None,
    config: dict | None = None,
    files: dict[str, str] | None = None,
) -> Path:
    """Model ``b``: a plain llama with ``drop`` removed, ``add`` tensors added, and
    ``quant`` as its ``quantization_config`` (or ``config`` merged into config.json)."""
    m = models.make_llama(root / "b", "bf16", seed=2)
    f = m.path / "model.safetensors"
    _meta, tensors = models.read_safetensors_raw(f)
    for n in drop:
        del tensors[n]
    tensors.update(add or {})
    models.write_safetensors(f, tensors, {"format": "pt"})
    cfg = json.loads((m.path / "config.json").read_text())
    if quant is not None:
        cfg["quantization_config"] = quant
    cfg.update(config or {})
    (m.path / "config.json").write_text(json.dumps(cfg))
    for name, text in (files or {}).items():
        (m.path / name).write_text(text)
    return m.path


FP8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
FP8_TENSORS = {PROJ: raw("F8_E4M3", (ROWS, COLS)), PREFIX + "weight_scale_inv": raw("F32", (2, 1))}
CT_INT4 = {
    "quant_method": "compressed-tensors",
    "format": "pack-quantized",
    "quantization_status": "compressed",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {
                "num_bits": 4,
                "type": "int",
                "symmetric": True,
                "strategy": "group",
                "group_size": 32,
            },
        }
    },
}
CT_INT4_TENSORS = {
    PREFIX + "weight_packed": raw("I32", (ROWS, COLS // 8)),
    PREFIX + "weight_scale": raw("BF16", (ROWS, COLS // 32)),
    PREFIX + "weight_shape": raw("I64", (2,)),
}


def ct(fmt: str, bits: int, kind: str, **more) -> dict:
    q = json.loads(json.dumps(CT_INT4))
    q["format"] = fmt
    q["config_groups"]["group_0"]["weights"].update({"num_bits": bits, "type": kind})
    q.update(more)
    return q


# (id, how model b is made, words the error line must contain)
CASES = {
    # Formats mergex will read (QUANT.md §3-§6), refused until it does.
    "fp8_companions_without_config": (
        dict(drop=(PROJ,), add=FP8_TENSORS),
        ["block FP8", PREFIX + "weight_scale_inv", "not supported yet"],
    ),
    "ct_int4_without_config": (
        dict(drop=(PROJ,), add=CT_INT4_TENSORS),
        ["compressed-tensors", PREFIX + "weight_packed"],
    ),
    # Refused formats (QUANT.md §9), by configuration or by tensor.
    "gptq_config": (dict(quant={"quant_method": "gptq", "bits": 4}), ["GPTQ", "quant_method 'gptq'"]),
    "gptq_tensors": (
        dict(
            drop=(PROJ,),
            add={
                PREFIX + "qweight": raw("I32", (12, ROWS)),
                PREFIX + "qzeros": raw("I32", (1, 32)),
                PREFIX + "scales": raw("BF16", (1, ROWS)),
                PREFIX + "g_idx": raw("I32", (COLS,)),
            },
        ),
        ["GPTQ", PREFIX + "qweight"],
    ),
    "awq_tensors": (
        dict(
            drop=(PROJ,),
            add={PREFIX + "qweight": raw("I32", (COLS, 32)), PREFIX + "scales": raw("BF16", (1, 250))},
        ),
        ["AWQ", PREFIX + "qweight"],
    ),
    "bnb_nf4": (
        dict(add={PROJ + ".absmax": raw("F32", (8,)), PROJ + ".quant_map": raw("F32", (16,))}),
        ["bitsandbytes", PROJ + ".absmax"],
    ),
    "bnb_int8": (dict(add={PREFIX + "SCB": raw("F32", (ROWS,))}), ["bitsandbytes", PREFIX + "SCB"]),
    "hqq": (dict(add={PREFIX + "W_q": raw("U8", (ROWS, 48))}), ["HQQ", PREFIX + "W_q"]),
    "exl2": (dict(add={PREFIX + "q_weight": raw("I32", (12, ROWS))}), ["EXL2", PREFIX + "q_weight"]),
    "exl3": (dict(add={PREFIX + "trellis": raw("I32", (4, 4))}), ["EXL3", PREFIX + "trellis"]),
    "ct_g_idx": (
        dict(
            drop=(PROJ,), add={**CT_INT4_TENSORS, PREFIX + "weight_g_idx": raw("I32", (COLS,))}, quant=CT_INT4
        ),
        ["activation reordering", PREFIX + "weight_g_idx"],
    ),
    "ct_sparse_tensor": (
        dict(add={PREFIX + "bitmask": raw("U8", (ROWS, 12))}),
        ["sparse", PREFIX + "bitmask"],
    ),
    "ct_sparse_config": (
        dict(
            drop=(PROJ,),
            add=CT_INT4_TENSORS,
            quant={**CT_INT4, "sparsity_config": {"format": "sparse-bitmask"}},
        ),
        ["sparse compressed-tensors"],
    ),
    "ct_mixed_precision": (
        dict(drop=(PROJ,), add=CT_INT4_TENSORS, quant={**CT_INT4, "format": "mixed-precision"}),
        ["mixed-precision"],
    ),
    "ct_int3": (
        dict(drop=(PROJ,), add=CT_INT4_TENSORS, quant=ct("pack-quantized", 3, "int")),
        ["3-bit", "not supported ("],
    ),
    "ct_mxfp6": (
        dict(drop=(PROJ,), add=CT_INT4_TENSORS, quant=ct("mxfp6-pack-quantized", 6, "float")),
        ["MXFP6"],
    ),
    "modelopt_other_algo": (
        dict(
            drop=(PROJ,),
            add={
                PROJ: raw("U8", (ROWS, COLS // 2)),
                PREFIX + "weight_scale": raw("F8_E4M3", (ROWS, COLS // 16)),
            },
            quant={"quant_method": "modelopt", "quant_algo": "W4A16_NVFP4"},
        ),
        ["ModelOpt W4A16_NVFP4", "not supported ("],
    ),
    "deepseek_v4_config": (dict(config={"expert_dtype": "fp4"}), ["DeepSeek-V4", "expert_dtype"]),
    "deepseek_v4_i8": (dict(drop=(PROJ,), add={PROJ: raw("I8", (ROWS, COLS // 2))}), ["DeepSeek-V4", PROJ]),
    "deepseek_v4_scale": (
        dict(
            drop=(PROJ,),
            add={PROJ: raw("F8_E4M3", (ROWS, COLS)), PREFIX + "scale": raw("F32", (2, 1))},
        ),
        ["DeepSeek-V4", PREFIX + "scale"],
    ),
    "other_quant_method": (
        dict(quant={"quant_method": "torchao"}),
        ["quant_method 'torchao'", "not supported ("],
    ),
    "gguf_beside": (dict(files={"model-Q4_K_M.gguf": "GGUF"}), ["GGUF", "model-Q4_K_M.gguf"]),
    # Configurations that contradict the tensors, and stray tensors.
    "config_without_companions": (dict(quant=FP8), ["block FP8", "no tensor has a quantization companion"]),
    "orphan_companion": (
        dict(add={"model.layers.0.mlp.extra.weight_scale": raw("F32", (4, 1))}),
        ["model.layers.0.mlp.extra.weight_scale", "companion without its weight"],
    ),
    "kv_cache_scales_only": (
        dict(
            add={"model.layers.0.self_attn.k_scale": raw("F32", ())},
            quant={**CT_INT4, "config_groups": {}, "kv_cache_scheme": {"num_bits": 8, "type": "float"}},
        ),
        ["compressed-tensors", "model.layers.0.self_attn.k_scale", "not supported yet"],
    ),
    "activation_scale_without_config": (
        dict(add={PREFIX + "input_scale": raw("F32", ())}),
        ["activation/KV-cache scales", PREFIX + "input_scale"],
    ),
    "plain_scale_parameter_is_not_deepseek_v4": (
        dict(add={PREFIX + "scale": raw("I32", (ROWS, 3))}),
        [PREFIX + "scale", "I32", "belongs to no quantized weight"],
    ),
    "stray_i32": (
        dict(drop=(PROJ,), add={PROJ: raw("I32", (ROWS, COLS))}),
        [PROJ, "I32", "belongs to no quantized weight"],
    ),
    "stray_f8": (
        dict(drop=(PROJ,), add={PROJ: raw("F8_E4M3", (ROWS, COLS))}),
        [PROJ, "F8_E4M3", "belongs to no quantized weight"],
    ),
    "stray_u8": (
        dict(add={"model.layers.1.mlp.codes": raw("U8", (64,))}),
        ["model.layers.1.mlp.codes", "U8"],
    ),
}


def _config(a: Path, b: Path) -> dict:
    return {
        "merge_method": "linear",
        "models": [{"model": str(a)}, {"model": str(b)}],
        "parameters": {"weight": 0.5},
    }


@pytest.mark.parametrize("case", sorted(CASES))
def test_quantized_or_stray_input_stops_the_merge(tmp_path, mergex_mod, case):
    how, words = CASES[case]
    a = models.make_llama(tmp_path / "a", "bf16", seed=1).path
    b = quantized(tmp_path, **how)
    before = models.file_hashes(a, b)
    out = tmp_path / "outs" / "merged"
    out.parent.mkdir()
    with pytest.raises(CheckpointError) as info:
        mergex_mod.merge(_config(a, b), out, ram_budget="64KiB", threads=2, progress=False)
    line = str(info.value)
    assert "\n" not in line
    assert line.startswith(f"model {b}:"), line
    for w in words:
        assert w in line, line
    assert info.value.path is not None and info.value.path.startswith(str(b))
    assert info.value.tensor is None or info.value.tensor in line
    assert list(out.parent.iterdir()) == [], "something was written"
    assert models.file_hashes(a, b) == before, "an input was modified"
    # The plan refuses it too, so nothing downstream ever sees the quantized tensors.
    with pytest.raises(CheckpointError):
        mergex_mod.plan(_config(a, b), ram_budget="64KiB")


def test_cli_one_line_exit_1_nothing_written(tmp_path):
    a = models.make_llama(tmp_path / "a", "bf16", seed=1).path
    b = quantized(tmp_path, drop=(PROJ,), add=FP8_TENSORS)
    cfg = models.dump_yaml(_config(a, b), tmp_path / "merge.yml")
    res = models.run_cli(["merge", cfg, tmp_path / "out", "--quiet"])
    assert res.returncode == 1, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model "), res.stderr
    assert "block FP8" in lines[0] and "weight_scale_inv" in lines[0] and "not supported yet" in lines[0]
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if "mergex-partial" in p.name]


def test_refused_dtype_and_gguf_file_name_the_format(tmp_path, mergex_mod):
    fnuz = tmp_path / "fnuz.safetensors"
    models.write_safetensors(fnuz, {"w": ("F8_E4M3FNUZ", (4,), bytes(4))})
    with pytest.raises(CheckpointError, match=r"tensor 'w' has dtype F8_E4M3FNUZ, a quantized format"):
        mergex_mod.inspect(fnuz)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + b"\3\0\0\0" + b"\0" * 64)
    with pytest.raises(CheckpointError, match="GGUF checkpoints are not supported"):
        mergex_mod.inspect(gguf)


def test_plain_non_float_tensors_are_still_copied(tmp_path, run_merge, out_dir):
    # Index buffers and masks are plain data: copied from the first model, never merged.
    rng = np.random.default_rng(0)
    ids = np.arange(100, dtype=np.int64)
    mask = rng.integers(0, 2, 64, dtype=np.uint8)
    xs = [rng.standard_normal(300).astype(np.float32) for _ in range(2)]
    paths = []
    for k in range(2):
        p = tmp_path / f"m{k}"
        p.mkdir()
        models.write_safetensors(
            p / "model.safetensors",
            {
                "embeddings.position_ids": ("I64", (100,), (ids + k).tobytes()),
                "token_type_ids": ("I32", (100,), (ids + k).astype(np.int32).tobytes()),
                "bn.num_batches_tracked": ("I64", (), np.int64(7 + k).tobytes()),
                "h.0.attn.mask": ("BOOL", (64,), mask.tobytes()),
                "w": ("F32", (300,), xs[k].tobytes()),
            },
            {"format": "pt"},
        )
        (p / "config.json").write_text(json.dumps({"model_type": "toy"}))
        paths.append(p)
    cfg = {"merge_method": "linear", "models": [{"model": p} for p in paths], "parameters": {"weight": 1.0}}
    out = run_merge(cfg, out_dir)
    assert np.array_equal(np.frombuffer(out.raw["embeddings.position_ids"][2], np.int64), ids)
    assert np.array_equal(np.frombuffer(out.raw["token_type_ids"][2], np.int32), ids)
    assert np.frombuffer(out.raw["bn.num_batches_tracked"][2], np.int64)[0] == 7
    assert out.raw["h.0.attn.mask"] == ("BOOL", (64,), mask.tobytes())
    np.testing.assert_array_equal(out.f32("w"), (xs[0] + xs[1]) / np.float32(2))
