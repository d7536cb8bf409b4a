"""What tensor names mean to the planner: embeddings and what comes before the layers,
NVFP4 fusion groups, the modules of a vision-language model, and dtype promotion."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from .params import layer_index

if TYPE_CHECKING:
    from .config import MergeConfig
    from .models import Model

_BEFORE = ("embed_tokens", "wte", "wpe", "tok_embeddings", "word_embeddings", "embeddings.")
_EMBEDDING = (
    "embed_tokens",
    "lm_head",
    "wte",
    "word_embeddings",
    "tok_embeddings",
    "embed_out",
    "output.weight",
)


# NVFP4 fusion groups (QUANT.md §4c): projections that share one global scale, by the last
# name component of the module.
_FUSED = {
    "q_proj": "qkv",
    "k_proj": "qkv",
    "v_proj": "qkv",
    "gate_proj": "gate_up",
    "up_proj": "gate_up",
    "w1": "w13",
    "w3": "w13",
    "q_a_proj": "mla_a",
    "kv_a_proj_with_mqa": "mla_a",
}


def fusion_key(name: str) -> str | None:
    """The fusion group of an NVFP4 weight's plain name (``…self_attn.q_proj.weight`` →
    ``…self_attn:qkv``), or None when it is a group of its own."""
    module = name.removesuffix(".weight")
    parent, _, leaf = module.rpartition(".")
    kind = _FUSED.get(leaf)
    return f"{parent}:{kind}" if kind else None


def promote(dtypes: set[str]) -> str:
    """torch's promotion of float dtypes: one dtype stays; F64 wins; any other mix is F32."""
    if len(dtypes) == 1:
        return next(iter(dtypes))
    return "F64" if "F64" in dtypes else "F32"


_PROJECTOR = ("multi_modal_projector.", "mm_projector.", "visual.merger.")
_VISION = ("visual.", "vision_tower.", "vision_model.", "vision_encoder.")


def module_of(name: str) -> str:
    """The module (``modules:``) a tensor of a vision-language model belongs to, by name."""
    if any(p in name for p in _PROJECTOR):
        return "multi_modal_projector"
    if any(name.startswith(p) or f".{p}" in name for p in _VISION):
        return "vision_tower"
    return "text_decoder"


def scopes(cfg: MergeConfig) -> list[tuple[str, MergeConfig, Callable[[str], bool]]]:
    """The config's parts planned one by one, with the tensors each takes: the config
    itself (as the text decoder), or each of its modules."""
    if not cfg.modules:
        return [("text_decoder", cfg, _everything)]
    return [(name, sub, _in_module(name)) for name, sub in cfg.modules.items()]


def _everything(_name: str) -> bool:
    return True


def _in_module(module: str) -> Callable[[str], bool]:
    return lambda name: module_of(name) == module


def layers_of(m: Model, member: Callable[[str], bool]) -> int:
    """Layers of ``m`` among the tensors ``member`` picks."""
    return max((i + 1 for n in m.names if member(n) and (i := layer_index(n)) is not None), default=0)


def is_before(name: str) -> bool:
    return any(k in name for k in _BEFORE)


def is_embedding(name: str) -> bool:
    return any(k in name for k in _EMBEDDING)
