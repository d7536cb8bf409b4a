"""Block FP8 inputs (QUANT.md §3, ``quant_method: fp8``): the reader decodes every code with
its block's scale, ``w = E4M3(q) · s`` in one f32 multiply, for the chunk's elements only,
and the merge then runs as on plain inputs. Checked against a numpy decode written from the
spec, with F32, BF16 and E8M0 scales, partial blocks, a per-tensor scale, a 3-D expert
stack, FP8 mixed with BF16 models, both engines, every budget and thread count; the plain
output drops every scale and the ``quantization_config``, and loads in transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from mergex import CheckpointError, ConfigError
from support import models
from support import reference as ref
from support.quant_models import (
    F32,
    FP4,
    INT,
    LAYOUTS,
    STACK,
    Fp8Model,
    e4m3,
    expand,
    fp4_model,
    int_model,
    plain_model,
    scaled_model,
)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    return {
        "f32": Fp8Model(root, "fp8-f32", 1, "F32"),
        "bf16": Fp8Model(root, "fp8-bf16", 2, "BF16"),
        "e8m0": Fp8Model(root, "fp8-e8m0", 3, "E8M0"),
        "tensor": Fp8Model(root, "fp8-tensor", 4, "F32", per_tensor=True),
        "plain": plain_model(root, "bf16", 5),
    }


def outputs(mergex_mod, cfg: dict, out: Path, **kw) -> models.Output:
    kw = {"ram_budget": "64KiB", "threads": 2, "progress": None, **kw}
    mergex_mod.merge(cfg, out, **kw)
    return models.read_output(out)


def linear_with_plain(mergex_mod, tmp_path, path, values, plain, pv, w: float, torch: bool = False):
    """Merge the quantized model at ``path`` (decoding to ``values``) with a plain one, weights
    ``w`` and ``1 - w``: the output holds exactly the plain names (no codes, scales or
    activation scales) with the numpy reference's values, and the torch engine's bytes."""
    cfg = {
        "merge_method": "linear",
        "models": [
            {"model": str(path), "parameters": {"weight": w}},
            {"model": str(plain), "parameters": {"weight": 1 - w}},
        ],
    }
    out = outputs(mergex_mod, cfg, tmp_path / "out")
    assert set(out.raw) == set(values), "codes, scales or activation scales reached the output"
    for name, x in values.items():
        models.assert_tensor_equal(out, name, ref.linear([x, pv[name]], [w, 1 - w]), "BF16")
    if torch:
        torch_out = outputs(mergex_mod, cfg, tmp_path / "torch", engine="torch", ram_budget="1MiB", threads=1)
        assert torch_out.raw == out.raw
    return out


@pytest.mark.parametrize("scales", ["f32", "bf16", "e8m0", "tensor"])
def test_linear_of_fp8_and_bf16_equals_the_numpy_decode(family, mergex_mod, tmp_path, scales):
    q, (plain, pv) = family[scales], family["plain"]
    out = linear_with_plain(mergex_mod, tmp_path, q.path, q.values, plain, pv, 0.7)
    config = out.config()
    assert "quantization_config" not in config and config["torch_dtype"] == "bfloat16"


def test_ties_with_an_fp8_base_across_budgets_threads_and_engines(family, mergex_mod, tmp_path):
    base, e1, (plain, pv) = family["f32"], family["bf16"], family["plain"]
    cfg = {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [
            {"model": str(e1), "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": str(plain), "parameters": {"weight": 0.4, "density": 0.3}},
        ],
    }
    first = outputs(mergex_mod, cfg, tmp_path / "a")
    for name, b in base.values.items():
        want = ref.task_family("ties", b, [e1.values[name], pv[name]], name, [0.6, 0.4], densities=[0.5, 0.3])
        models.assert_tensor_equal(first, name, want, "BF16")
    for k, kw in enumerate([{"ram_budget": "8MiB", "threads": 1}, {"engine": "torch"}]):
        again = outputs(mergex_mod, cfg, tmp_path / f"b{k}", **kw)
        assert again.raw == first.raw, kw


def quantize_fp8(x: np.ndarray, block: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A straightforward block FP8 encoder (QUANT.md §3): ``s = amax / 448`` per block (1 for
    an all-zero block), each value to the nearest E4M3 code of ``x / s``."""
    codes_all = np.array([c for c in range(256) if c & 0x7F != 0x7F], np.uint8)
    values = e4m3(codes_all)
    rows, cols = x.shape
    grid = (-(-rows // block[0]), -(-cols // block[1]))
    scales = np.ones(grid, F32)
    codes = np.zeros(x.shape, np.uint8)
    for br in range(grid[0]):
        for bc in range(grid[1]):
            sl = np.s_[br * block[0] : (br + 1) * block[0], bc * block[1] : (bc + 1) * block[1]]
            amax = F32(np.abs(x[sl]).max())
            s = F32(amax / F32(448)) if amax > 0 else F32(1)
            scales[br, bc] = s
            y = (x[sl] / s).astype(F32)
            codes[sl] = codes_all[np.abs(y[..., None] - values).argmin(axis=-1)]
    return codes, scales


def test_plain_output_loads_in_transformers(mergex_mod, tmp_path):
    # A real (tiny) Llama saved by transformers, its projections quantized to block FP8 with
    # partial blocks, merged with a BF16 fine-tune: the plain output loads and runs, holding
    # the numpy reference of the merge (decode, average, round to bf16).
    import torch
    import transformers
    from safetensors.torch import load_file

    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    base.save_pretrained(tmp_path / "bf16")
    tuned = {k: v + 0.02 * torch.randn(v.shape).to(v.dtype) for k, v in base.state_dict().items()}
    base.load_state_dict(tuned)
    base.save_pretrained(tmp_path / "tuned")
    plain = {k: v.float().numpy() for k, v in load_file(tmp_path / "bf16" / "model.safetensors").items()}
    block = (16, 32)
    tensors, decoded = {}, {}
    for name, x in plain.items():
        if name.endswith("_proj.weight"):
            codes, scales = quantize_fp8(x, block)
            tensors[name] = ("F8_E4M3", x.shape, codes.tobytes())
            tensors[name + "_scale_inv"] = ("F32", scales.shape, scales.tobytes())
            decoded[name] = (e4m3(codes) * expand(scales, x.shape, block)).astype(F32)
        else:
            tensors[name] = models.encode(x, "bf16")
            decoded[name] = x
    fp8 = tmp_path / "fp8"
    fp8.mkdir()
    models.write_safetensors(fp8 / "model.safetensors", tensors, {"format": "pt"})
    cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(block)}
    (fp8 / "config.json").write_text(json.dumps(cfg))

    merge = {
        "merge_method": "linear",
        "models": [
            {"model": str(fp8), "parameters": {"weight": 0.5}},
            {"model": str(tmp_path / "tuned"), "parameters": {"weight": 0.5}},
        ],
    }
    out = tmp_path / "out"
    mergex_mod.merge(merge, out, ram_budget="64KiB", progress=None)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    ids = torch.arange(16).reshape(1, 16)
    merged = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    tuned_np = {k: v.float().numpy() for k, v in load_file(tmp_path / "tuned" / "model.safetensors").items()}
    want = {k: ref.round_to(ref.linear([decoded[k], tuned_np[k]], [0.5, 0.5]), "BF16") for k in decoded}
    written = models.read_output(out)
    for k, v in want.items():
        np.testing.assert_array_equal(written.f32(k), v, err_msg=k)
    with torch.no_grad():
        assert torch.isfinite(merged(input_ids=ids).logits).all()
    state = merged.state_dict()
    for k, v in want.items():
        assert torch.equal(state[k], torch.from_numpy(v).to(torch.bfloat16)), k


def rewrite(model: Fp8Model, root: Path, edit) -> Path:
    """A copy of ``model`` with ``edit(tensors, config)`` applied."""
    _, tensors = models.read_safetensors_raw(model.path / "model.safetensors")
    cfg = json.loads((model.path / "config.json").read_text())
    edit(tensors, cfg)
    path = root / "bad"
    path.mkdir()
    models.write_safetensors(path / "model.safetensors", tensors, {"format": "pt"})
    (path / "config.json").write_text(json.dumps(cfg))
    return path


W = "model.layers.0.mlp.up_proj.weight"
S = W + "_scale_inv"


def set_scale(value: float):
    def edit(t, _cfg):
        dtype, shape, raw = t[S]
        s = np.frombuffer(raw, F32).copy()
        s[3] = value
        t[S] = (dtype, shape, s.tobytes())

    return edit


def set_code(code: int):
    def edit(t, _cfg):
        dtype, shape, raw = t[W]
        c = np.frombuffer(raw, np.uint8).copy()
        c[1234] = code
        t[W] = (dtype, shape, c.tobytes())

    return edit


def drop(name: str):
    return lambda t, _cfg: t.pop(name)


def regrid(t, _cfg):
    t[S] = ("F32", (7, 2), bytes(7 * 2 * 4))


def e8m0_without_ue8m0(t, _cfg):
    t[S] = ("F8_E8M0", (8, 2), bytes([127]) * 16)


def stack_regrid(t, _cfg):
    # A fused 3-D expert stack whose scales cover one row of blocks per expert, not two.
    t[STACK + "_scale_inv"] = ("F32", (3, 1, 2), bytes(3 * 2 * 4))


def packed_companion(t, _cfg):
    # compressed-tensors companions in a model whose config says block FP8.
    t["model.layers.0.mlp.up_proj.weight_packed"] = ("I32", (250, 12), bytes(250 * 12 * 4))


def bad_block(_t, cfg):
    cfg["quantization_config"]["weight_block_size"] = [0, 64]


BAD = {
    "nan_scale": (set_scale(float("nan")), ["scale", "index 3", "finite and positive"]),
    "zero_scale": (set_scale(0.0), ["index 3 is 0"]),
    "negative_scale": (set_scale(-1.0), ["index 3 is -1"]),
    "inf_scale": (set_scale(float("inf")), ["index 3 is inf"]),
    "nan_code": (set_code(0x7F), ["code at index 1234 (0x7f)"]),
    "grid_mismatch": (regrid, ["scale grid [7, 2]", "expected [8, 2]"]),
    "missing_scale": (drop(S), [W, "no scale"]),
    "orphan_scale": (drop(W), [S, "without its weight"]),
    "e8m0_without_ue8m0": (e8m0_without_ue8m0, ["F8_E8M0", "scale_fmt: ue8m0"]),
    "bad_block_size": (bad_block, ["weight_block_size"]),
    "stack_grid_mismatch": (stack_regrid, ["scale grid [3, 1, 2]", "expected [3, 2, 2]"]),
    "config_contradicts_tensors": (
        packed_companion,
        ["up_proj.weight_packed", "belongs to no quantized weight"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_fp8_input_is_one_line_naming_the_tensor(family, mergex_mod, tmp_path, case):
    edit, words = BAD[case]
    bad = rewrite(family["f32"], tmp_path, edit)
    cfg = {"merge_method": "linear", "models": [{"model": str(bad), "parameters": {"weight": 1.0}}]}
    parent = tmp_path / "outs"
    parent.mkdir()
    with pytest.raises(CheckpointError) as info:
        mergex_mod.merge(cfg, parent / "merged", ram_budget="64KiB", progress=None)
    line = str(info.value)
    assert "\n" not in line and str(bad) in line, line
    for w in words:
        assert w in line, line
    assert list(parent.iterdir()) == []


def test_out_quantization_key(family, mergex_mod, tmp_path):
    cfg = {"merge_method": "linear", "models": [{"model": str(family["f32"])}], "parameters": {"weight": 1.0}}
    with pytest.raises(ConfigError, match="out_quantization: base writes the base's own dtypes"):
        mergex_mod.plan({**cfg, "out_quantization": "base", "out_dtype": "float16"})
    with pytest.raises(ConfigError, match="expected 'none' or 'base'"):
        mergex_mod.plan({**cfg, "out_quantization": "fp8"})
    plan = mergex_mod.plan({**cfg, "out_quantization": "none"}, ram_budget="64KiB")
    # Each code byte is read with its scales (one F32 scale per 32x64 block, rounded up).
    assert plan.input_bytes >= sum(v.size for v in family["f32"].values.values())


def test_inspect_folds_the_scales_and_plan_shows_the_formats(family, tmp_path):
    q, (plain, _) = family["f32"], family["plain"]
    res = models.run_cli(["inspect", q.path])
    assert res.returncode == 0, res.stderr
    table = res.stdout.split("format:")[0]
    assert "_scale_inv" not in table
    row = next(ln for ln in res.stdout.splitlines() if "layers.0.mlp.up_proj.weight" in ln)
    assert "F8_E4M3, 32x64 blocks" in row and "[250, 96]" in row, row
    assert "format: block FP8 (config.json quant_method 'fp8'" in res.stdout
    assert "read by mergex (7 quantized weights" in res.stdout
    cfg = {
        "merge_method": "linear",
        "models": [{"model": str(q)}, {"model": str(plain)}],
        "parameters": {"weight": 0.5},
    }
    res = models.run_cli(["plan", models.dump_yaml(cfg, tmp_path / "m.yml")])
    assert res.returncode == 0, res.stderr
    assert f"reads {q.path} (FP8 (7 weights, 32x64 blocks, F32 scales))" in res.stdout
    assert f"reads {plain} (plain)" in res.stdout and "writes plain BF16" in res.stdout


def test_inspect_names_a_refused_format(tmp_path):
    m = models.make_llama(tmp_path / "gptq", "bf16", seed=1)
    cfg = json.loads((m.path / "config.json").read_text())
    (m.path / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "gptq"}}))
    res = models.run_cli(["inspect", m.path])
    assert res.returncode == 0, res.stderr
    assert "format: GPTQ (config.json quant_method 'gptq'); refused" in res.stdout


def test_inspect_shows_packed_fp4_under_the_plain_name(tmp_path):
    path, _ = fp4_model(tmp_path, "ct_nvfp4", seed=3)
    res = models.run_cli(["inspect", path])
    assert res.returncode == 0, res.stderr
    table = res.stdout.split("format:")[0]
    row = next(ln for ln in table.splitlines() if "layers.0.mlp.up_proj.weight " in ln)
    assert "FP4 (E2M1), 1x16 blocks" in row and "[250, 96]" in row, row
    assert "weight_packed" not in table and "weight_global_scale" not in table
    assert "read by mergex (6 quantized weights" in res.stdout


@pytest.mark.parametrize("layout", [*sorted(LAYOUTS), *sorted(FP4)])
def test_scaled_layouts_equal_the_numpy_decode(mergex_mod, tmp_path, layout):
    path, values = (scaled_model if layout in LAYOUTS else fp4_model)(tmp_path, layout, seed=11)
    plain, pv = plain_model(tmp_path, "plain", 12)
    linear_with_plain(mergex_mod, tmp_path, path, values, plain, pv, 0.25, torch=True)


@pytest.mark.parametrize("layout", sorted(INT))
def test_packed_integers_equal_the_numpy_decode(mergex_mod, tmp_path, layout):
    path, values = int_model(tmp_path, layout, seed=31)
    plain, pv = plain_model(tmp_path, "plain", 32)
    cfg = {
        "merge_method": "ties",
        "base_model": str(path),
        "models": [{"model": str(plain), "parameters": {"weight": 0.8, "density": 0.5}}],
    }
    out = outputs(mergex_mod, cfg, tmp_path / "out")
    assert set(out.raw) == set(values)
    for name, b in values.items():
        want = ref.task_family("ties", b, [pv[name]], name, [0.8], densities=[0.5])
        models.assert_tensor_equal(out, name, want, "BF16")
    torch_out = outputs(mergex_mod, cfg, tmp_path / "torch", engine="torch", ram_budget="1MiB", threads=1)
    assert torch_out.raw == out.raw


def test_weight_shape_disagreeing_with_the_codes_is_an_error(mergex_mod, tmp_path):
    path, _ = int_model(tmp_path, "ct_int4_group", seed=33, weight_shape=(96, 88))
    cfg = {"merge_method": "linear", "models": [{"model": str(path)}], "parameters": {"weight": 1.0}}
    with pytest.raises(CheckpointError, match=r"weight_shape \[96, 88\] disagrees with the packed codes"):
        mergex_mod.merge(cfg, tmp_path / "out", ram_budget="64KiB", progress=None)
    assert not (tmp_path / "out").exists()


def test_requantized_fp8_output_loads_in_transformers(mergex_mod, tmp_path):
    # The same merge written back as block FP8 (out_quantization: base): transformers reads
    # the quantization_config, decodes the FP8 weights on the CPU and runs a forward pass.
    import torch
    import transformers

    test_plain_output_loads_in_transformers(mergex_mod, tmp_path)
    merge = {
        "merge_method": "linear",
        "out_quantization": "base",
        "models": [
            {"model": str(tmp_path / "fp8"), "parameters": {"weight": 0.5}},
            {"model": str(tmp_path / "tuned"), "parameters": {"weight": 0.5}},
        ],
    }
    out = tmp_path / "requantized"
    mergex_mod.merge(merge, out, ram_budget="64KiB", progress=None)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "fp8"
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16).eval()
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    ids = torch.arange(16).reshape(1, 16)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
        want = plain(input_ids=ids).logits.float()
    assert torch.isfinite(logits).all()
    # FP8 keeps about two significant digits: the logits stay close to the plain merge's.
    assert torch.nn.functional.cosine_similarity(logits.flatten(), want.flatten(), dim=0) > 0.98
