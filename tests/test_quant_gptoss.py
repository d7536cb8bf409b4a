"""gpt-oss MXFP4 expert stacks (QUANT.md §6): ``X_blocks`` ``U8 [E, N, K/32, 16]`` and
``X_scales`` ``[E, N, K/32]`` store the transpose of the plain ``X`` ``[E, K, N]``. The reader
decodes them in the plain order (so they merge with BF16 fine-tunes of gpt-oss, which use the
plain names and shapes), and ``out_quantization: base`` writes them back transposed. Checked
against a numpy decode and the ``quant_ref`` encoder, on both engines and several budgets.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from mergex import CheckpointError
from support import models
from support import quant_ref as qref
from support import reference as ref

F32 = np.float32
EXPERTS, HIDDEN, INTER = 3, 64, 64
STACKS = {  # plain name -> plain shape [E, K, N]
    "model.layers.0.mlp.experts.gate_up_proj": (EXPERTS, HIDDEN, 2 * INTER),
    "model.layers.0.mlp.experts.down_proj": (EXPERTS, INTER, HIDDEN),
}
PLAIN = {
    "model.embed_tokens.weight": (32, HIDDEN),
    "model.layers.0.mlp.experts.gate_up_proj_bias": (EXPERTS, 2 * INTER),
    "model.layers.0.mlp.experts.down_proj_bias": (EXPERTS, HIDDEN),
    "model.layers.0.self_attn.q_proj.weight": (HIDDEN, HIDDEN),
    "lm_head.weight": (32, HIDDEN),
}


def gpt_oss_model(root: Path, seed: int) -> tuple[Path, dict[str, np.ndarray]]:
    """A gpt-oss-shaped model whose expert stacks are MXFP4; returns the decoded values."""
    rng = np.random.default_rng(seed)
    plain = models.random_tensors(PLAIN, "bf16", seed)
    tensors = {n: models.encode(x, "bf16") for n, x in plain.items()}
    values: dict[str, np.ndarray] = dict(plain)
    for name, (e, k, n) in STACKS.items():
        codes = rng.integers(0, 16, size=(e, n, k), dtype=np.uint8)
        scales = rng.integers(118, 126, size=(e, n, k // 32), dtype=np.uint8)
        stored = qref.E2M1[codes] * np.repeat(np.ldexp(1.0, scales.astype(np.int64) - 127), 32, axis=-1)
        values[name] = np.ascontiguousarray(stored.astype(F32).transpose(0, 2, 1))
        blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).reshape(e, n, k // 32, 16)
        tensors[name + "_blocks"] = ("U8", blocks.shape, blocks.tobytes())
        tensors[name + "_scales"] = ("U8", scales.shape, scales.tobytes())
    quant = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.embed_tokens", "lm_head"],
    }
    return models.write_quantized(root / f"gpt-oss-{seed}", tensors, quant, layers=1), values


def bf16_fine_tune(root: Path, seed: int) -> tuple[Path, dict[str, np.ndarray]]:
    """A BF16 fine-tune of the same model: plain names and shapes."""
    m = models.write_model(
        root / "bf16", models.random_tensors({**PLAIN, **STACKS}, "bf16", seed), "bf16", layers=1
    )
    return m.path, m.tensors


def merge(mergex_mod, cfg: dict, out: Path, **kw) -> models.Output:
    mergex_mod.merge(cfg, out, **{"ram_budget": "64KiB", "threads": 2, "progress": None, **kw})
    return models.read_output(out)


def linear(a: Path, b: Path, **extra) -> dict:
    return {
        "merge_method": "linear",
        "models": [
            {"model": str(a), "parameters": {"weight": 0.6}},
            {"model": str(b), "parameters": {"weight": 0.4}},
        ],
        **extra,
    }


def test_gpt_oss_experts_merge_with_a_bf16_fine_tune_in_plain_order(mergex_mod, tmp_path):
    path, values = gpt_oss_model(tmp_path, 1)
    plain, pv = bf16_fine_tune(tmp_path, 2)
    out = merge(mergex_mod, linear(path, plain), tmp_path / "out")
    assert set(out.raw) == set(values)
    for name, x in values.items():
        assert out.raw[name][1] == x.shape
        models.assert_tensor_equal(out, name, ref.linear([x, pv[name]], [0.6, 0.4]), "BF16")
    assert "quantization_config" not in out.config()
    for k, kw in enumerate(
        [{"ram_budget": "16MiB", "threads": 1}, {"engine": "torch", "ram_budget": "1MiB"}]
    ):
        again = merge(mergex_mod, linear(path, plain), tmp_path / f"again{k}", **kw)
        assert again.raw == out.raw, kw


def test_gpt_oss_output_is_written_back_transposed(mergex_mod, tmp_path):
    path, values = gpt_oss_model(tmp_path, 3)
    plain, pv = bf16_fine_tune(tmp_path, 4)
    cfg = linear(path, plain, out_quantization="base")
    out = merge(mergex_mod, cfg, tmp_path / "out")
    base = models.read_output(path)
    assert {k: v[:2] for k, v in out.raw.items()} == {k: v[:2] for k, v in base.raw.items()}
    for name, x in values.items():
        merged = ref.linear([x, pv[name]], [0.6, 0.4])
        if name not in STACKS:
            models.assert_tensor_equal(out, name, merged, "BF16")
            continue
        enc = qref.encode(np.ascontiguousarray(merged.transpose(0, 2, 1)), "mx", (1, 32), "U8", bits=4)
        assert out.raw[name + "_blocks"][2] == qref.pack_fp4(enc["codes"]), name
        assert out.raw[name + "_scales"][2] == qref.scale_bytes(enc["scales"], "U8"), name
    assert out.config()["quantization_config"]["quant_method"] == "mxfp4"
    for k, kw in enumerate(
        [{"ram_budget": "32MiB", "threads": 1}, {"engine": "torch", "ram_budget": "1MiB"}]
    ):
        again = merge(mergex_mod, cfg, tmp_path / f"again{k}", **kw)
        assert again.raw == out.raw, kw
    # Re-encoding the encoder's output keeps its values (QUANT.md §7).
    once = merge(
        mergex_mod,
        {**cfg, "models": [{"model": str(out.path), "parameters": {"weight": 1.0}}]},
        tmp_path / "once",
    )
    plain_cfg = {"merge_method": "linear", "parameters": {"weight": 1.0}}
    a = merge(mergex_mod, {**plain_cfg, "models": [{"model": str(out.path)}]}, tmp_path / "a")
    b = merge(mergex_mod, {**plain_cfg, "models": [{"model": str(once.path)}]}, tmp_path / "b")
    assert a.raw == b.raw


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda t: t.pop("model.layers.0.mlp.experts.down_proj_scales"), ["down_proj_blocks", "no scales"]),
        (
            lambda t: t.pop("model.layers.0.mlp.experts.down_proj_blocks"),
            ["down_proj_scales", "without its blocks"],
        ),
        (
            lambda t: t.__setitem__(
                "model.layers.0.mlp.experts.down_proj_scales",
                ("U8", (EXPERTS, HIDDEN, 1), bytes(EXPERTS * HIDDEN)),
            ),
            ["down_proj_scales", "should be U8"],
        ),
    ],
)
def test_bad_gpt_oss_companions_are_one_line_errors(mergex_mod, tmp_path, edit, words):
    path, _ = gpt_oss_model(tmp_path, 5)
    _, tensors = models.read_safetensors_raw(path / "model.safetensors")
    edit(tensors)
    models.write_safetensors(path / "model.safetensors", tensors, {"format": "pt"})
    cfg = {"merge_method": "linear", "models": [{"model": str(path)}], "parameters": {"weight": 1.0}}
    with pytest.raises(CheckpointError) as info:
        mergex_mod.merge(cfg, tmp_path / "out", progress=None)
    assert "\n" not in str(info.value)
    for w in words:
        assert w in str(info.value)
    assert not (tmp_path / "out").exists()


def test_a_nan_scale_names_the_tensor(mergex_mod, tmp_path):
    path, _ = gpt_oss_model(tmp_path, 6)
    _, tensors = models.read_safetensors_raw(path / "model.safetensors")
    name = "model.layers.0.mlp.experts.gate_up_proj_scales"
    dtype, shape, raw = tensors[name]
    tensors[name] = (dtype, shape, b"\xff" + raw[1:])
    models.write_safetensors(path / "model.safetensors", tensors, {"format": "pt"})
    cfg = {"merge_method": "linear", "models": [{"model": str(path)}], "parameters": {"weight": 1.0}}
    with pytest.raises(CheckpointError, match=r"gate_up_proj_scales.*E8M0 NaN"):
        mergex_mod.merge(cfg, tmp_path / "out", progress=None)


def decode_stack(out: models.Output, name: str) -> np.ndarray:
    """An output's gpt-oss MXFP4 stack (``name_blocks``/``name_scales``) decoded to the plain
    ``[E, K, N]`` order."""
    blocks, scales = (
        np.frombuffer(out.raw[name + s][2], np.uint8).reshape(out.raw[name + s][1])
        for s in ("_blocks", "_scales")
    )
    e, n = blocks.shape[:2]
    codes = np.empty((e, n, blocks.shape[2] * 32), np.uint8)
    flat = blocks.reshape(e, n, -1)
    codes[..., 0::2], codes[..., 1::2] = flat & 0xF, flat >> 4
    stored = qref.E2M1[codes] * np.repeat(np.ldexp(1.0, scales.astype(np.int64) - 127), 32, axis=-1)
    return np.ascontiguousarray(stored.astype(F32).transpose(0, 2, 1))


def test_a_requantized_gpt_oss_output_loads_in_transformers(mergex_mod, tmp_path):
    # A real (tiny) GptOssForCausalLM: its experts MXFP4, merged with a BF16 fine-tune and
    # written back MXFP4; transformers dequantizes it on the CPU to the values mergex wrote.
    import json

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.GptOssConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        num_local_experts=2,
        num_experts_per_tok=1,
        layer_types=["full_attention"],
    )
    torch.manual_seed(0)
    transformers.GptOssForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "tuned")
    _meta, raw = models.read_safetensors_raw(tmp_path / "tuned" / "model.safetensors")
    rng = np.random.default_rng(7)
    tensors = {}
    for name, (dtype, shape, data) in raw.items():
        if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            tensors[name] = (dtype, shape, data)
            continue
        e, k, n = shape
        codes = rng.integers(0, 16, size=(e, n, k), dtype=np.uint8)
        scales = rng.integers(118, 126, size=(e, n, k // 32), dtype=np.uint8)
        blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).reshape(e, n, k // 32, 16)
        tensors[name + "_blocks"] = ("U8", blocks.shape, blocks.tobytes())
        tensors[name + "_scales"] = ("U8", scales.shape, scales.tobytes())
    quantized = tmp_path / "mxfp4"
    quantized.mkdir()
    models.write_safetensors(quantized / "model.safetensors", tensors, {"format": "pt"})
    cfg = json.loads((tmp_path / "tuned" / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
    }
    (quantized / "config.json").write_text(json.dumps(cfg))
    out = merge(mergex_mod, linear(quantized, tmp_path / "tuned", out_quantization="base"), tmp_path / "out")
    loaded = transformers.GptOssForCausalLM.from_pretrained(tmp_path / "out")
    experts = loaded.model.layers[0].mlp.experts
    for stack in ("gate_up_proj", "down_proj"):
        want = decode_stack(out, f"model.layers.0.mlp.experts.{stack}")
        got = getattr(experts, stack).detach().float().numpy()
        np.testing.assert_array_equal(got, want)
    assert bool(torch.isfinite(loaded(torch.tensor([[1, 2, 3]])).logits).all())
