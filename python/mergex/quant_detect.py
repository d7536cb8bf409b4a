"""Which quantized format a model is stored in (``../shared/spec/QUANT.md`` §1, §9), read
from its ``config.json`` / ``hf_quant_config.json`` and from its tensors' companions, and
which of its tensors are activation scales or plain non-float data."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CheckpointError

if TYPE_CHECKING:
    from .models import Model

__all__ = [
    "FLOAT_DTYPES",
    "Detected",
    "detect",
    "is_activation_scale",
    "is_plain_non_float",
    "quantization_config",
]

FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
"""Dtypes that hold plain values; 8-bit floats are codes that need a scale."""

# Integer tensors that hold indices, not weights: copied from the base (else the first model).
_PLAIN_INTEGER_NAMES = ("num_batches_tracked",)
_PLAIN_INTEGER_SUFFIX = "_ids"

# QUANT.md §1: activation and KV-cache scales, copied and never merged.
_ACTIVATION_SCALES = frozenset(
    {
        "input_scale",
        "activation_scale",
        "input_global_scale",
        "input_zero_point",
        "k_scale",
        "v_scale",
        "q_scale",
        "kv_scale",
    }
)

# QUANT.md §9, by tensor name: (format, the name's last component or suffix).
_REFUSED_TENSORS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("bitsandbytes", re.compile(r"\.weight\.(absmax|quant_map|nested_absmax|nested_quant_map)$")),
    ("bitsandbytes", re.compile(r"\.weight\.quant_state\.bitsandbytes__(nf4|fp4)$")),
    ("bitsandbytes", re.compile(r"\.SCB$")),
    ("HQQ", re.compile(r"\.W_q$")),
    ("EXL2", re.compile(r"\.q_(weight|scale|scale_max|groups|invperm)$")),
    ("EXL3", re.compile(r"\.(trellis|suh|svh)$")),
    ("compressed-tensors with activation reordering (g_idx)", re.compile(r"\.weight_g_idx$")),
    ("sparse compressed-tensors", re.compile(r"\.(bitmask|compressed)$")),
)

# QUANT.md §9, by quant_method (anything not here and not read by mergex is refused too).
_REFUSED_METHODS = {
    "gptq": "GPTQ",
    "awq": "AWQ",
    "bitsandbytes": "bitsandbytes",
    "hqq": "HQQ",
    "exl2": "EXL2",
    "exl3": "EXL3",
    "gguf": "GGUF",
}

# compressed-tensors formats whose weights are 8-bit float codes times a scale (§4a, §4d),
# and those of packed FP4 codes (§4c, §4d).
_CT_FP8 = ("float-quantized", "naive-quantized", "mxfp8-quantized")
_CT_FP4 = ("nvfp4-pack-quantized", "mxfp4-pack-quantized")
_CT_INT = ("pack-quantized",)

# The families QUANT.md §3-§6 describes, by quant_method.
_FAMILIES = {
    "fp8": "block FP8",
    "compressed-tensors": "compressed-tensors",
    "modelopt": "ModelOpt",
    "mxfp4": "gpt-oss MXFP4",
}


@dataclass(frozen=True)
class Detected:
    """A quantized format found in a model, and what gave it away."""

    format: str
    """In words: ``block FP8``, ``compressed-tensors pack-quantized INT4``, ``GPTQ``, …"""
    signal: str
    """What matched: ``tensor X``, ``config.json quant_method 'gptq'``, ``file X``."""
    refused: bool
    """True for the formats QUANT.md §9 refuses; False for those mergex will read."""
    family: str | None = None
    """The ``quant_method`` of a format mergex reads, from the configuration."""

    @property
    def tensor(self) -> str | None:
        """The tensor that matched, when a tensor did."""
        _, found, name = self.signal.rpartition("tensor ")
        return name if found else None


def quantization_config(config: dict[str, Any]) -> dict[str, Any] | None:
    """``quantization_config`` of a config.json, or of its ``text_config`` when the top level
    has none (QUANT.md §1)."""
    q = config.get("quantization_config")
    if q is None and isinstance(config.get("text_config"), dict):
        q = config["text_config"].get("quantization_config")
    return q if isinstance(q, dict) else None


def is_activation_scale(name: str) -> bool:
    """Activation and KV-cache scales (QUANT.md §1)."""
    last = name.rsplit(".", 1)[-1]
    return last in _ACTIVATION_SCALES or last.endswith(("_activation_scale", "_input_scale"))


def is_plain_non_float(name: str, dtype: str) -> bool:
    """A non-float tensor that is genuinely plain data, copied as it is: a ``BOOL`` mask, or
    an integer index buffer (``position_ids``, ``token_type_ids``, any ``*_ids``,
    ``num_batches_tracked``)."""
    if dtype == "BOOL":
        return True
    if not (dtype.startswith(("I", "U")) and dtype != "U8"):
        return False
    last = name.rsplit(".", 1)[-1]
    return last in _PLAIN_INTEGER_NAMES or last.endswith(_PLAIN_INTEGER_SUFFIX)


_COMPANIONS = (
    "_scale_inv",
    "_scale",
    "_scale_2",
    "_packed",
    "_shape",
    "_zero_point",
    "_global_scale",
    "_blocks",
    "_scales",
)


# Names that only a quantized weight's companions carry.
_WEIGHT_COMPANIONS = tuple(".weight" + c for c in _COMPANIONS if c not in ("_blocks", "_scales"))


def _companion_weights(names: Iterable[str]) -> dict[str, str]:
    """Tensors that belong to a quantized weight of a family mergex reads (QUANT.md §3-§6),
    each mapped to the name of the family's first signal found on it."""
    names = set(names)
    parts: dict[str, str] = {}
    for n in sorted(names):
        if n.endswith("_scale_inv"):
            w = n[: -len("_scale_inv")]
            parts[n] = parts[w] = "block FP8"
        elif n.endswith(".weight_packed"):
            x = n[: -len("_packed")]
            for c in ("_packed", "_scale", "_shape", "_zero_point", "_global_scale"):
                if x + c in names:
                    parts[x + c] = "compressed-tensors"
        elif n.endswith(".weight_scale"):
            w = n[: -len("_scale")]
            if w in names:
                fmt = "ModelOpt NVFP4" if w + "_scale_2" in names else "FP8 or MX (weight_scale)"
                parts[n] = parts[w] = fmt
                if w + "_scale_2" in names:
                    parts[w + "_scale_2"] = fmt
        elif n.endswith("_blocks") and n[: -len("_blocks")] + "_scales" in names:
            x = n[: -len("_blocks")]
            parts[n] = parts[x + "_scales"] = "gpt-oss MXFP4"
    return parts


def _refused_by_tensors(names: list[str], dtypes: dict[str, str]) -> Detected | None:
    present = set(names)
    for n in names:
        if n.endswith(".qweight"):
            prefix = n[: -len("qweight")]
            fmt = "GPTQ" if prefix + "g_idx" in present else "AWQ"
            return Detected(fmt, f"tensor {n}", True)
        for fmt, pattern in _REFUSED_TENSORS:
            if pattern.search(n):
                return Detected(fmt, f"tensor {n}", True)
        if dtypes[n] == "I8" and n.endswith(".weight"):
            return Detected("DeepSeek-V4 FP4 experts (I8 weights)", f"tensor {n}", True)
        w = n[: -len("scale")] + "weight"
        if n.endswith(".scale") and w in present and dtypes[w] not in FLOAT_DTYPES:
            return Detected("DeepSeek-V4 FP4 experts ('.scale' companions)", f"tensor {n}", True)
    return None


def _compressed_tensors_format(q: dict[str, Any]) -> tuple[str, bool]:
    """The format of a compressed-tensors config, and whether QUANT.md §9 refuses it."""
    fmt = q.get("format")
    if q.get("sparsity_config"):
        return "sparse compressed-tensors", True
    if fmt == "mixed-precision":
        return "compressed-tensors mixed-precision", True
    groups = q.get("config_groups")
    schemes = []
    if isinstance(groups, dict):
        for g in groups.values():
            w = g.get("weights") if isinstance(g, dict) else None
            if isinstance(w, dict):
                schemes.append(w)
    keyed = {json.dumps(w, sort_keys=True) for w in schemes}
    if len(keyed) > 1:
        return "compressed-tensors with several weight schemes", True
    if not schemes:
        return "compressed-tensors (no weight scheme)", False
    bits, kind = schemes[0].get("num_bits"), schemes[0].get("type")
    if fmt == "pack-quantized" and bits not in (4, 8):
        return f"compressed-tensors pack-quantized with {bits}-bit weights", True
    if fmt == "mxfp6-pack-quantized" or (kind == "float" and bits == 6):
        return "compressed-tensors MXFP6", True
    if kind == "float" and bits == 4 and fmt not in ("nvfp4-pack-quantized", "mxfp4-pack-quantized"):
        return f"compressed-tensors 4-bit float in format {fmt!r}", True
    if fmt == "pack-quantized":
        return f"compressed-tensors pack-quantized INT{bits}", False
    if isinstance(fmt, str) and fmt:
        return f"compressed-tensors {fmt}", False
    return "compressed-tensors", False


def _by_config(config: dict[str, Any], folder: Path) -> Detected | None:
    q = quantization_config(config)
    if q is not None:
        method = q.get("quant_method")
        signal = f"config.json quant_method {method!r}"
        if not isinstance(method, str):
            return Detected(
                "an unknown quantization", "config.json quantization_config without quant_method", True
            )
        if method in _REFUSED_METHODS:
            return Detected(_REFUSED_METHODS[method], signal, True)
        if method == "fp8":
            per_tensor = q.get("weight_block_size", "absent") is None
            return Detected("per-tensor FP8" if per_tensor else "block FP8", signal, False, "fp8")
        if method == "compressed-tensors":
            fmt, refused = _compressed_tensors_format(q)
            status = q.get("quantization_status", "compressed")
            readable = q.get("format") in _CT_FP8 + _CT_FP4 + _CT_INT and status == "compressed"
            return Detected(fmt, signal, refused, "compressed-tensors" if readable and not refused else None)
        if method == "modelopt":
            algo = q.get("quant_algo")
            family = "modelopt" if algo in ("FP8", "NVFP4") else None
            return Detected(
                f"ModelOpt {algo}", f"{signal}, quant_algo {algo!r}", algo not in ("NVFP4", "FP8"), family
            )
        if method == "mxfp4":
            return Detected(_FAMILIES["mxfp4"], signal, False, "mxfp4")
        return Detected(f"quant_method {method!r}", signal, True)
    if config.get("expert_dtype") == "fp4":
        return Detected("DeepSeek-V4 FP4 experts", "config.json expert_dtype 'fp4'", True)
    hf = folder / "hf_quant_config.json"
    if hf.is_file():
        try:
            data = json.loads(hf.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{hf}: invalid JSON: {e}") from None
        section = data.get("quantization") if isinstance(data, dict) else None
        algo = section.get("quant_algo") if isinstance(section, dict) else None
        family = "modelopt" if algo in ("FP8", "NVFP4") else None
        return Detected(
            f"ModelOpt {algo}", f"file {hf.name}, quant_algo {algo!r}", algo not in ("NVFP4", "FP8"), family
        )
    return None


def detect(model: Model) -> Detected | None:
    """The quantized format of ``model``, if any (QUANT.md §1, §9); tensor signals first,
    since companions decide, then the configuration."""
    dtypes = {n: t.dtype for n, t in model.tensors.items()}
    found = _refused_by_tensors(model.order, dtypes)
    if found is not None:
        return found
    by_config = _by_config(model.config, model.folder)
    parts = _companion_weights(model.order)
    for n in model.order:
        if n.endswith(_WEIGHT_COMPANIONS) and n not in parts:
            raise CheckpointError(
                f"model {model.ref}: tensor {n} is a quantization companion without its weight "
                f"({n.rsplit('.', 1)[0]}.weight is missing)",
                path=model.path,
                tensor=n,
            )
    first = next((n for n in model.order if n in parts and n.endswith(_COMPANIONS)), None)
    scales = next((n for n in model.order if is_activation_scale(n)), None)
    if first is None and scales is not None:
        # Activation or KV-cache scales beside plain weights (an FP8 KV cache, say): they are
        # copied, never merged (QUANT.md §1), which mergex does not do yet.
        what = by_config.format if by_config is not None else "activation/KV-cache scales"
        where = f"{by_config.signal}, " if by_config is not None else ""
        return Detected(what, f"{where}tensor {scales}", by_config is not None and by_config.refused)
    if by_config is not None:
        if first is not None:
            return Detected(
                by_config.format, f"{by_config.signal}, tensor {first}", by_config.refused, by_config.family
            )
        if by_config.refused:
            return by_config
        raise CheckpointError(
            f"model {model.ref}: config.json says the weights are {by_config.format} "
            f"({by_config.signal}) but no tensor has a quantization companion (weight_scale, "
            f"weight_scale_inv, weight_packed, _blocks/_scales); remove quantization_config "
            f"if the weights are plain",
            path=model.path,
        )
    if first is not None:
        return Detected(parts[first], f"tensor {first}", False)
    return None
