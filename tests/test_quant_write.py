"""``out_quantization: base`` (QUANT.md §8): the merged weights the base has quantized are
encoded again in the base's layout — codes, scales, global scales and zero points, the same
names, dtypes and shapes — and every other tensor keeps the base's dtype; activation scales,
``weight_shape``, ``quantization_config`` and ``hf_quant_config.json`` are copied. Checked
for every format against the numpy encoder in ``quant_ref`` (written from the spec), for
byte identity across budgets, threads and engines, for the idempotence QUANT.md §7 promises,
and for NVFP4's fusion-group global scales.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from mergex import ConfigError, MergexError
from support import models
from support import quant_models as qm
from support import quant_ref as qref
from support import reference as ref

F32 = np.float32


def _fp8(kind: str) -> Callable[[Path, int], tuple[Path, dict[str, np.ndarray]]]:
    scales = {"f32": "F32", "bf16": "BF16", "e8m0": "E8M0", "tensor": "F32"}[kind]

    def build(root: Path, seed: int) -> tuple[Path, dict[str, np.ndarray]]:
        m = qm.Fp8Model(root, f"fp8-{kind}", seed, scales, per_tensor=kind == "tensor")
        return m.path, m.values

    return build


def _layout(build, layout: str):
    return lambda root, seed: build(root, layout, seed)


def _names(kind: str, n: str) -> tuple[str, str, str | None, str | None]:
    """Codes, scale, global scale and zero points of the weight ``n`` in each family."""
    stem = n.removesuffix(".weight")
    return {
        "fp8": (n, n + "_scale_inv", None, None),
        "ct8": (n, n + "_scale", None, None),
        "ct4": (stem + ".weight_packed", n + "_scale", n + "_global_scale", None),
        "mo4": (n, n + "_scale", n + "_scale_2", None),
        "mx4": (stem + ".weight_packed", n + "_scale", None, None),
        "int": (stem + ".weight_packed", n + "_scale", None, None),
        "int_asym": (stem + ".weight_packed", n + "_scale", None, n + "_zero_point"),
    }[kind]


CHANNEL = "channel"
# case: (fixture builder, rule, block, bits, names kind, idempotent per QUANT.md §7)
CASES = {
    "fp8_f32": (_fp8("f32"), "amax", (32, 64), None, "fp8", "bytes"),
    "fp8_bf16": (_fp8("bf16"), "amax", (32, 64), None, "fp8", "bytes"),
    "fp8_e8m0": (_fp8("e8m0"), "ue8m0", (32, 64), None, "fp8", "bytes"),
    "fp8_tensor": (_fp8("tensor"), "amax", None, None, "fp8", "bytes"),
    "ct_tensor": (_layout(qm.scaled_model, "ct_tensor"), "amax", None, None, "ct8", "bytes"),
    "ct_channel": (_layout(qm.scaled_model, "ct_channel"), "amax", CHANNEL, None, "ct8", "bytes"),
    "ct_group": (_layout(qm.scaled_model, "ct_group"), "amax", (1, 32), None, "ct8", "bytes"),
    "ct_block": (_layout(qm.scaled_model, "ct_block"), "amax", (32, 64), None, "ct8", "bytes"),
    "mxfp8": (_layout(qm.scaled_model, "mxfp8"), "mx", (1, 32), None, "ct8", "values"),
    "modelopt_fp8": (_layout(qm.scaled_model, "modelopt_fp8"), "amax", None, None, "ct8", "bytes"),
    "ct_nvfp4": (_layout(qm.fp4_model, "ct_nvfp4"), "nvfp4", (1, 16), None, "ct4", None),
    "modelopt_nvfp4": (_layout(qm.fp4_model, "modelopt_nvfp4"), "nvfp4_modelopt", (1, 16), None, "mo4", None),
    "ct_mxfp4": (_layout(qm.fp4_model, "ct_mxfp4"), "mx", (1, 32), 4, "mx4", "values"),
    "ct_int4_group": (_layout(qm.int_model, "ct_int4_group"), "int", (1, 32), 4, "int", "bytes"),
    "ct_int8_channel": (_layout(qm.int_model, "ct_int8_channel"), "int", CHANNEL, 8, "int", "bytes"),
    "ct_int4_asymmetric": (
        _layout(qm.int_model, "ct_int4_asymmetric"),
        "int_asym",
        (1, 32),
        4,
        "int_asym",
        None,
    ),
}


def merge(mergex_mod, cfg: dict, out: Path, **kw) -> models.Output:
    kw = {"ram_budget": "64KiB", "threads": 2, "progress": None, **kw}
    mergex_mod.merge({**cfg, "out_quantization": "base"}, out, **kw)
    return models.read_output(out)


def expected(case: str, base: models.Output, n: str, x: np.ndarray, group_amax=None) -> dict[str, bytes]:
    """The reference encoding of merged values ``x`` of weight ``n``, by output tensor name."""
    _, rule, block, bits, kind, _ = CASES[case]
    codes, scale, glob, zero = _names(kind, n)
    if block == CHANNEL:
        block = (1, x.shape[-1])
    sdtype = base.dtype(scale)
    enc = qref.encode(x, rule, block, sdtype, bits, group_amax)
    if rule.startswith("nvfp4") or (rule == "mx" and bits == 4):
        want = {codes: qref.pack_fp4(enc["codes"])}
    elif rule.startswith("int"):
        want = {codes: qref.pack_int(enc["codes"], bits)}
    else:
        want = {codes: enc["codes"].astype(np.uint8).tobytes()}
    if rule.startswith("nvfp4"):
        want[scale] = enc["scales"].astype(np.uint8).tobytes()
        want[glob] = F32(enc["global"]).tobytes()  # type: ignore[index]
    else:
        want[scale] = qref.scale_bytes(enc["scales"], sdtype)
    if zero is not None:
        want[zero] = qref.pack_zero_points(enc["zero"], bits)  # type: ignore[arg-type]
    return want


def quantized_names(case: str, base: models.Output, values: dict) -> list[str]:
    kind = CASES[case][4]
    return [n for n in values if _names(kind, n)[1] in base.raw]


@pytest.mark.parametrize("case", sorted(CASES))
def test_requantized_merge_equals_the_numpy_encoder(mergex_mod, tmp_path, case):
    build = CASES[case][0]
    path, values = build(tmp_path, 21)
    plain, pv = qm.plain_model(tmp_path, "plain", 22)
    base = models.read_output(path)
    cfg = {
        "merge_method": "linear",
        "models": [
            {"model": str(path), "parameters": {"weight": 0.7}},
            {"model": str(plain), "parameters": {"weight": 0.3}},
        ],
    }
    out = merge(mergex_mod, cfg, tmp_path / "out")
    # The base's tensors, names, dtypes and shapes: no more, no fewer.
    assert {k: v[:2] for k, v in out.raw.items()} == {k: v[:2] for k, v in base.raw.items()}
    quantized = quantized_names(case, base, values)
    assert quantized
    for n, x in values.items():
        merged = ref.linear([x, pv[n]], [0.7, 0.3])
        if n not in quantized:
            models.assert_tensor_equal(out, n, merged, base.dtype(n))
            continue
        for name, want in expected(case, base, n, merged).items():
            assert out.raw[name][2] == want, f"{case}: {name}"
    for name, (_, _, raw) in base.raw.items():
        if name.endswith(("input_scale", "activation_scale", "input_global_scale", "weight_shape")):
            assert out.raw[name][2] == raw, f"{name} is copied from the base"
    assert out.config().get("quantization_config") == json.loads((path / "config.json").read_text()).get(
        "quantization_config"
    )
    if (path / "hf_quant_config.json").is_file():
        assert (out.path / "hf_quant_config.json").read_bytes() == (
            path / "hf_quant_config.json"
        ).read_bytes()
    # The same bytes for every budget, thread count and engine.
    for k, kw in enumerate([{"ram_budget": "8MiB", "threads": 1}, {"engine": "torch", "ram_budget": "1MiB"}]):
        again = merge(mergex_mod, cfg, tmp_path / f"again{k}", **kw)
        assert again.raw == out.raw, kw


@pytest.mark.parametrize("case", sorted(c for c, v in CASES.items() if v[5]))
def test_a_model_merged_with_itself_keeps_its_encoding(mergex_mod, tmp_path, case):
    """QUANT.md §7: re-encoding the encoder's own output gives the same bytes (FP8 and
    symmetric integers) or the same values (MX)."""
    build, *_, idempotent = CASES[case]
    path, _ = build(tmp_path, 23)
    once = tmp_path / "once"
    merge(
        mergex_mod,
        {"merge_method": "linear", "models": [{"model": str(path), "parameters": {"weight": 1.0}}]},
        once,
    )
    copy = tmp_path / "copy"
    shutil.copytree(once, copy)
    halves = {
        "merge_method": "linear",
        "models": [
            {"model": str(once), "parameters": {"weight": 0.5}},
            {"model": str(copy), "parameters": {"weight": 0.5}},
        ],
    }
    twice = merge(mergex_mod, halves, tmp_path / "twice")
    if idempotent == "bytes":
        assert twice.raw == models.read_output(once).raw
        return
    plain = {"merge_method": "linear", "models": [{"model": str(once)}], "parameters": {"weight": 1.0}}
    a = models.read_output(mergex_mod.merge(plain, tmp_path / "a", progress=None).out_dir)
    b = models.read_output(
        mergex_mod.merge(
            {**plain, "models": [{"model": str(twice.path)}]}, tmp_path / "b", progress=None
        ).out_dir
    )
    assert a.raw == b.raw


def test_nvfp4_global_scales_follow_the_fusion_group(mergex_mod, tmp_path):
    """q/k/v of one attention and gate/up of one MLP share the global scale of the group's
    largest merged magnitude (QUANT.md §4c); the other projections keep their own."""
    rng = np.random.default_rng(5)
    hidden, inter = 64, 96
    shapes = {
        "model.embed_tokens.weight": (32, hidden),
        "model.layers.0.self_attn.q_proj.weight": (hidden, hidden),
        "model.layers.0.self_attn.k_proj.weight": (32, hidden),
        "model.layers.0.self_attn.v_proj.weight": (32, hidden),
        "model.layers.0.self_attn.o_proj.weight": (hidden, hidden),
        "model.layers.0.mlp.gate_proj.weight": (inter, hidden),
        "model.layers.0.mlp.up_proj.weight": (inter, hidden),
        "model.layers.0.mlp.down_proj.weight": (hidden, inter),
        "lm_head.weight": (32, hidden),
    }
    scale = {n: F32(0.02 * (k + 1)) for k, n in enumerate(shapes)}  # different magnitudes
    values = {
        n: ref.round_to((rng.standard_normal(s) * scale[n]).astype(F32), "BF16") for n, s in shapes.items()
    }
    tensors, decoded = {}, {}
    for n, x in values.items():
        if "layers" not in n:
            tensors[n] = models.encode(x, "bf16")
            continue
        enc = qref.encode(x, "nvfp4", (1, 16), "F8_E4M3")
        block_scales = (qref.e4m3(enc["scales"]) / enc["global"]).astype(F32)
        decoded[n] = (qref.E2M1[enc["codes"]] * np.repeat(block_scales, 16, axis=-1)).astype(F32)
        stem = n.removesuffix(".weight")
        tensors[stem + ".weight_packed"] = ("U8", (x.shape[0], x.shape[1] // 2), qref.pack_fp4(enc["codes"]))
        tensors[n + "_scale"] = ("F8_E4M3", enc["scales"].shape, enc["scales"].astype(np.uint8).tobytes())
        tensors[n + "_global_scale"] = ("F32", (1,), F32(enc["global"]).tobytes())
    quant = qm.ct_config("nvfp4-pack-quantized", num_bits=4, strategy="tensor_group", group_size=16)
    path = models.write_quantized(tmp_path / "nvfp4", tensors, quant, layers=1)
    plain = models.write_model(tmp_path / "plain", models.random_tensors(shapes, "bf16", 6), "bf16", layers=1)
    cfg = {
        "merge_method": "linear",
        "models": [
            {"model": str(path), "parameters": {"weight": 0.5}},
            {"model": str(plain.path), "parameters": {"weight": 0.5}},
        ],
    }
    out = merge(mergex_mod, cfg, tmp_path / "out")
    base = models.read_output(path)
    merged = {n: ref.linear([decoded[n], plain.tensors[n]], [0.5, 0.5]) for n in decoded}
    groups = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gu", "up_proj": "gu"}
    for n, x in merged.items():
        leaf = n.split(".")[-2]
        members = [m for m in merged if groups.get(m.split(".")[-2], m) == groups.get(leaf, n)]
        amax = max(float(np.abs(merged[m]).max()) for m in members)
        for name, want in expected("ct_nvfp4", base, n, x, group_amax=amax).items():
            assert out.raw[name][2] == want, name
    g = {n.split(".")[-2]: out.raw[n + "_global_scale"][2] for n in merged}
    assert g["q_proj"] == g["k_proj"] == g["v_proj"] != g["o_proj"]
    assert g["gate_proj"] == g["up_proj"] != g["down_proj"]


def test_a_merged_value_that_cannot_be_quantized_is_an_error(mergex_mod, tmp_path):
    path, _ = _fp8("f32")(tmp_path, 25)
    plain, _ = qm.plain_model(tmp_path, "plain", 26)
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(path),
        "models": [{"model": str(plain), "parameters": {"weight": 1e30}}],
        "parameters": {"lambda": 1e30},
    }
    with pytest.raises(MergexError, match=r"merged value at index \d+ is (inf|-inf); it cannot be quantized"):
        merge(mergex_mod, cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_out_dtype_with_base_is_a_config_error_and_plan_shows_the_format(mergex_mod, tmp_path):
    path, _ = _fp8("f32")(tmp_path, 27)
    cfg = {
        "merge_method": "linear",
        "models": [{"model": str(path)}],
        "parameters": {"weight": 1.0},
        "out_quantization": "base",
    }
    with pytest.raises(ConfigError, match="out_quantization: base writes the base's own dtypes"):
        mergex_mod.plan({**cfg, "out_dtype": "float16"})
    plan = mergex_mod.plan(cfg, ram_budget="64KiB")
    assert plan.output_format.startswith("block FP8") or "FP8" in plan.output_format, plan.output_format
    plain_plan = mergex_mod.plan({**cfg, "out_quantization": "none"}, ram_budget="64KiB")
    # Writing FP8 codes and their scales is about half of writing BF16.
    assert plan.bytes_written < 0.75 * plain_plan.bytes_written
    # The encoded weights are merged twice when their scale is per tensor (an amax run first).
    tensor_path, _ = _fp8("tensor")(tmp_path, 28)
    per_tensor = mergex_mod.plan({**cfg, "models": [{"model": str(tensor_path)}]}, ram_budget="64KiB")
    assert per_tensor.bytes_read > plan.bytes_read
