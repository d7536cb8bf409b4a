"""A transformers round trip (issue 6): tiny random-initialised Llama and Qwen2 models made
with transformers, merged by mergex with both engines, loaded back with
``AutoModelForCausalLM.from_pretrained``: their logits are finite and equal to those of
the same architecture holding the numpy-reference merge."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from support import reference as ref

ARCHS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
}


def tiny_family(root: Path, arch: str, experts: int = 2) -> list[Path]:
    """A base and ``experts`` fine-tunes of one tiny bf16 model: the base random, each
    expert the base plus small random changes to every tensor."""
    config_cls, model_cls = ARCHS[arch]
    config = config_cls(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    base = model_cls(config).to(torch.bfloat16).eval()
    paths = [root / "base"]
    base.save_pretrained(paths[0])
    for i in range(experts):
        gen = torch.Generator().manual_seed(100 + i)
        expert = model_cls(config).to(torch.bfloat16).eval()
        state = {
            k: v + 0.02 * torch.randn(v.shape, generator=gen).to(v.dtype)
            for k, v in base.state_dict().items()
        }
        expert.load_state_dict(state)
        paths.append(root / f"expert_{i}")
        expert.save_pretrained(paths[-1])
    return paths


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(0, 24, dtype=torch.long).reshape(2, 12) % 96
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def reference_model(arch: str, base: Path, merged: dict[str, np.ndarray]) -> torch.nn.Module:
    """The base architecture holding ``merged`` (f32 arrays rounded to bf16)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).eval()
    state = {k: torch.from_numpy(np.ascontiguousarray(v)).to(torch.bfloat16) for k, v in merged.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing)
    return model


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("engine", ["rust", "torch"])
def test_merged_model_loads_and_matches_the_reference(tmp_path, mergex_mod, arch, engine):
    base, e0, e1 = tiny_family(tmp_path / "models", arch)
    weights = [0.6, 0.4]
    config = {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [
            {"model": str(e0), "parameters": {"weight": weights[0], "density": 0.5}},
            {"model": str(e1), "parameters": {"weight": weights[1], "density": 0.5}},
        ],
        "dtype": "bfloat16",
    }
    out = tmp_path / "merged"
    mergex_mod.merge(config, out, engine=engine, ram_budget="64KiB", threads=2, progress=False)

    merged = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    got = logits(merged)
    assert torch.isfinite(got).all()

    b, x0, x1 = (torch_load_bf16(p) for p in (base, e0, e1))
    expected = {
        name: ref.task_family("ties", b[name], [x0[name], x1[name]], name, weights, densities=[0.5, 0.5])
        for name in b
    }
    want = logits(reference_model(arch, base, expected))
    assert torch.equal(got, want)
    # The merge changed the model: its logits differ from the base's.
    base_model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).eval()
    assert not torch.equal(got, logits(base_model))


def torch_load_bf16(path: Path) -> dict[str, np.ndarray]:
    """A model's tensors as exact f32 arrays."""
    from safetensors.torch import load_file as load_torch

    return {k: v.float().numpy() for k, v in load_torch(path / "model.safetensors").items()}
