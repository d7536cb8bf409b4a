"""``modules:``: a vision-language model's text decoder, vision tower and projector merged
with their own models or slices and parameters (tensors assigned to modules by name)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mergex import ConfigError
from support import models
from support import reference as ref

SHAPES = {
    "model.embed_tokens.weight": (40, 16),
    "model.layers.0.self_attn.q_proj.weight": (16, 16),
    "model.layers.1.self_attn.q_proj.weight": (16, 16),
    "model.norm.weight": (16,),
    "lm_head.weight": (40, 16),
    "visual.patch_embed.proj.weight": (24, 12),
    "visual.blocks.0.attn.qkv.weight": (36, 12),
    "visual.blocks.1.attn.qkv.weight": (36, 12),
    "visual.merger.mlp.0.weight": (16, 24),
}


def vlm(path: Path, seed: int) -> models.Model:
    config = models.model_config(2, "bf16", hidden_size=16, vocab_size=40)
    config["vision_config"] = {"depth": 2, "hidden_size": 12}
    return models.write_model(path, models.random_tensors(SHAPES, "bf16", seed), "bf16", config=config)


def test_each_module_merges_with_its_own_models_slices_and_parameters(run_merge, tmp_path):
    a, b = vlm(tmp_path / "a", 1), vlm(tmp_path / "b", 2)
    cfg = {
        "merge_method": "linear",
        "parameters": {"weight": 0.1},  # the lowest level: each module sets its own
        "modules": {
            "text_decoder": {
                "models": [
                    {"model": str(a.path), "parameters": {"weight": 0.7}},
                    {"model": str(b.path), "parameters": {"weight": 0.3}},
                ]
            },
            "vision_tower": {
                "slices": [
                    {"sources": [{"model": str(a.path), "layer_range": [0, 2]}]},
                    {"sources": [{"model": str(b.path), "layer_range": [1, 2]}]},
                ],
                "parameters": {"weight": 1.0},
            },
            "multi_modal_projector": {
                "models": [{"model": str(a.path)}, {"model": str(b.path)}],
                "parameters": {"weight": 0.5},
            },
        },
    }
    out = run_merge(cfg, tmp_path / "out")
    for name in SHAPES:
        if name.startswith("visual."):
            continue
        want = ref.linear([a.tensors[name], b.tensors[name]], [0.7, 0.3])
        models.assert_tensor_equal(out, name, want, "BF16")
    qkv = "visual.blocks.{}.attn.qkv.weight"
    for k, src in (
        (0, a.tensors[qkv.format(0)]),
        (1, a.tensors[qkv.format(1)]),
        (2, b.tensors[qkv.format(1)]),
    ):
        models.assert_tensor_equal(out, qkv.format(k), src, "BF16")
    models.assert_tensor_equal(
        out, "visual.patch_embed.proj.weight", b.tensors["visual.patch_embed.proj.weight"], "BF16"
    )
    merger = "visual.merger.mlp.0.weight"
    models.assert_tensor_equal(
        out, merger, ref.linear([a.tensors[merger], b.tensors[merger]], [0.5, 0.5]), "BF16"
    )
    config = json.loads((out.path / "config.json").read_text())
    assert config["vision_config"]["depth"] == 3 and config["num_hidden_layers"] == 2


def test_a_module_left_out_or_unknown_is_an_error(tmp_path):
    import mergex

    a = vlm(tmp_path / "a", 1)
    cfg = {"merge_method": "linear", "modules": {"text_decoder": {"models": [{"model": str(a.path)}]}}}
    cfg["parameters"] = {"weight": 1.0}
    with pytest.raises(
        ConfigError, match=r"'visual.merger.mlp.0.weight' .* belongs to module multi_modal_projector"
    ):
        mergex.plan(cfg)
    cfg["modules"]["vision"] = {"models": [{"model": str(a.path)}]}
    with pytest.raises(ConfigError, match=r"modules.vision: unknown module \(known: text_decoder"):
        mergex.plan(cfg)
