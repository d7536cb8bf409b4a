"""Per-layer settings of ``config.json`` when slices change the layers: every list with one
entry a layer (``layer_types``, ``no_rope_layers``, ``layers_block_type``, …) and every list
of layer indices (``mlp_only_layers``, …) is rebuilt from the source layer of each output
layer, in that source model's config."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:
    from .models import Model

__all__ = ["rebuild_layer_lists"]

# Lists of layer indices (the layers with some property), not one entry a layer.
INDEX_LISTS = ("mlp_only_layers", "attn_layer_indices", "full_attn_idxs", "moe_layer_indices")
# Integers that describe a layer pattern which slices cannot keep in general.
PATTERN_INTS = ("first_k_dense_replace", "moe_layer_freq")


def _layers(config: dict[str, Any]) -> int | None:
    n = config.get("num_hidden_layers")
    return n if isinstance(n, int) and not isinstance(n, bool) else None


def _section(config: dict[str, Any], path: str) -> dict[str, Any]:
    sub = config.get(path) if path else config
    return sub if isinstance(sub, dict) else {}


def rebuild_layer_lists(reference: Model, sources: list[tuple[Model, int]]) -> dict[str, dict[str, Any]]:
    """New values of the per-layer keys of ``reference``'s config (top level ``""`` and
    ``text_config``) for output layers taken from ``sources`` (model, source layer).

    Raises:
        ConfigError: A per-layer key that a source model's config lacks (or has with another
            length), or a layer-pattern integer that the new layers break.
    """
    out: dict[str, dict[str, Any]] = {}
    for path in ("", "text_config"):
        section = _section(reference.config, path)
        n = _layers(section)
        if n is None:
            continue
        where = f"{path}." if path else ""
        changes: dict[str, Any] = {}
        for key, value in section.items():
            if not isinstance(value, list):
                continue
            if key in INDEX_LISTS:
                changes[key] = [j for j, (m, i) in enumerate(sources) if i in _source(m, path, key, where)]
            elif len(value) == n:
                changes[key] = [_entry(m, path, key, where, i) for m, i in sources]
        for key in PATTERN_INTS:
            if key in section and [_is_dense(m, path, i) for m, i in sources] != [
                _is_dense(reference, path, j) for j in range(len(sources))
            ]:
                raise ConfigError(
                    f"config.json: {where}{key} = {section[key]!r} cannot describe the sliced layers; "
                    "slices must keep the layer pattern of such a model"
                )
        if changes:
            out[path] = changes
    return out


def _source(m: Model, path: str, key: str, where: str) -> list[Any]:
    value = _section(m.config, path).get(key)
    if not isinstance(value, list):
        raise ConfigError(
            f"config.json of {m.ref}: {where}{key} is missing; it cannot fill the sliced layers"
        )
    return value


def _entry(m: Model, path: str, key: str, where: str, i: int) -> Any:
    value = _source(m, path, key, where)
    if len(value) != _layers(_section(m.config, path)) or i >= len(value):
        raise ConfigError(
            f"config.json of {m.ref}: {where}{key} has {len(value)} entries, not one a layer; "
            "it cannot fill the sliced layers"
        )
    return value[i]


def _is_dense(m: Model, path: str, i: int) -> bool | None:
    """Whether layer ``i`` of ``m`` is dense under its config's layer-pattern integers."""
    section = _section(m.config, path)
    k = section.get("first_k_dense_replace")
    freq = section.get("moe_layer_freq")
    if isinstance(k, int) and i < k:
        return True
    if isinstance(freq, int) and freq > 1:
        return i % freq != 0
    return None if k is None and freq is None else False
