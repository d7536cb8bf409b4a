"""Quantized checkpoints (``../shared/spec/QUANT.md``): which format a model is stored in,
read from its ``config.json`` / ``hf_quant_config.json`` and from its tensors' companions.

A quantized weight is several tensors (codes, scales, shapes) that only together mean a
number; merging them one by one as if each were a weight gives a broken model without a
word. So every model passes :func:`check` before a merge is planned: a refused format
(QUANT.md §9), a format mergex cannot read yet, a configuration that contradicts the tensors
and an integer or 8-bit tensor that belongs to no quantized weight each stop the merge with
one line naming the model, the format and the signal that matched.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CheckpointError

if TYPE_CHECKING:
    from .models import Model

__all__ = ["Detected", "Quantized", "check", "detect", "is_plain_non_float", "quantization_config"]

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
            return Detected(_FAMILIES["mxfp4"], signal, False)
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


@dataclass(frozen=True)
class Quantized:
    """A quantized weight the reader decodes (keyed by its codes tensor's name)."""

    scale: str
    """The scale tensor (QUANT.md §3: ``X.weight_scale_inv``, the multiplier)."""
    block: tuple[int, int] | None
    """Rows and columns of one block; ``None`` for one scale over the whole tensor."""
    plain: str = ""
    """The name the weight is merged and written under (the codes' name when empty)."""
    shape: tuple[int, ...] = ()
    """The weight's shape, when it is not the codes' (packed FP4: twice as wide)."""
    fp4: bool = False
    """FP4 (E2M1) codes, two a byte."""
    global_scale: str | None = None
    """NVFP4's one-value global scale, which every block scale is divided or multiplied by."""
    divide: bool = False
    int_bits: int = 0
    """Symmetric integers of this many bits packed in I32 words (compressed-tensors INT4/INT8)."""
    weight_shape: str | None = None
    """The tensor holding the weight's shape (``X.weight_shape``), checked by the engine."""
    zero_point: str | None = None
    """Asymmetric packed integers' zero points (``X.weight_zero_point``)."""


def check(model: Model) -> dict[str, Quantized]:
    """The quantized weights of ``model`` that mergex reads (block FP8 today), by plain
    name; refuse the model when it holds anything else that is not plain: see the module's
    docstring.

    Raises:
        CheckpointError: One line naming the model, the format and the signal.
    """
    for f in sorted(model.folder.glob("*.gguf")) if model.path.is_dir() else []:
        raise CheckpointError(
            f"model {model.ref}: GGUF checkpoints are not supported (file {f.name})", path=f
        )
    found = detect(model)
    quantized: dict[str, Quantized] = {}
    if found is not None and found.family == "fp8":
        quantized = _block_fp8(model)
    elif found is not None and found.family == "compressed-tensors":
        fmt = (quantization_config(model.config) or {}).get("format")
        if fmt in _CT_INT:
            quantized = _ct_int(model)
        else:
            quantized = _ct_fp4(model, fmt) if fmt in _CT_FP4 else _ct_fp8(model)
    elif found is not None and found.family == "modelopt" and "NVFP4" in found.format:
        quantized = _fp4_codes(model, ".weight", (1, 16), {"F8_E4M3"}, ("_scale_2", False), "ModelOpt NVFP4")
    elif found is not None and found.family == "modelopt":
        quantized = _scaled_codes(model, ".weight_scale", lambda _shape: None, {"F32"}, "ModelOpt FP8")
    elif found is not None:
        if found.refused:
            raise CheckpointError(
                f"model {model.ref}: {found.format} checkpoints are not supported ({found.signal})",
                path=model.path,
                tensor=found.tensor,
            )
        raise CheckpointError(
            f"model {model.ref}: {found.format} checkpoints are not supported yet ({found.signal}); "
            f"dequantize it to BF16 first",
            path=model.path,
            tensor=found.tensor,
        )
    skipped = {
        n for q in quantized.values() for n in (q.scale, q.global_scale, q.weight_shape, q.zero_point) if n
    }
    for name in model.order:
        dtype = model.tensors[name].dtype
        if name in quantized or name in skipped or (quantized and is_activation_scale(name)):
            continue
        if dtype not in FLOAT_DTYPES and not is_plain_non_float(name, dtype):
            raise CheckpointError(
                f"model {model.ref}: tensor {name} is {dtype} but belongs to no quantized weight "
                f"(no scale or other companion tensor); mergex merges only float tensors and copies "
                f"BOOL masks and integer *_ids buffers",
                path=model.path,
                tensor=name,
            )
    return quantized


def _block_fp8(model: Model) -> dict[str, Quantized]:
    """QUANT.md §3: every ``X_scale_inv`` scales the 8-bit codes ``X`` in blocks of
    ``weight_block_size`` (or as one value, with ``weight_block_size: null``)."""
    q = quantization_config(model.config) or {}
    size = q.get("weight_block_size")
    block: tuple[int, int] | None = None
    if size is not None:
        block = _block(model, size, "quantization_config.weight_block_size")
    if q.get("fmt", "e4m3") not in ("e4m3", "e5m2"):
        raise _fail(model, f"block FP8 with fmt {q.get('fmt')!r} is not supported (e4m3 or e5m2)")
    e8m0 = q.get("scale_fmt") == "ue8m0"
    dtypes = {"F32", "BF16", "F16"} | ({"F8_E8M0", "U8"} if e8m0 else set())
    return _scaled_codes(model, "_scale_inv", lambda _shape: block, dtypes, "block FP8")


def _ct_fp8(model: Model) -> dict[str, Quantized]:
    """QUANT.md §4a and §4d: compressed-tensors 8-bit float weights, ``X.weight_scale`` the
    multiplier over the strategy's region (tensor, channel, group or block), E8M0 scales in
    groups of 32 for ``mxfp8-quantized``."""
    q = quantization_config(model.config) or {}
    groups = q.get("config_groups") or {}
    w = next((g.get("weights") for g in groups.values() if isinstance(g, dict)), None) or {}
    if w.get("num_bits") != 8 or w.get("type") != "float":
        raise _fail(model, f"compressed-tensors {q.get('format')} with weights {w!r} is not 8-bit float")
    strategy, mx = w.get("strategy"), q.get("format") == "mxfp8-quantized"

    def region(shape: tuple[int, ...]) -> tuple[int, int] | None:
        cols = shape[-1] if shape else 1
        if mx:
            return (1, 32)
        if strategy == "tensor":
            return None
        if strategy == "channel":
            return (1, cols)
        if strategy == "group":
            return _block(model, [1, w.get("group_size")], "weights.group_size")
        if strategy == "block":
            return _block(model, w.get("block_structure"), "weights.block_structure")
        raise _fail(model, f"compressed-tensors weight strategy {strategy!r} is not supported")

    dtypes = {"U8", "F8_E8M0"} if mx else {"F32", "BF16", "F16"}
    return _scaled_codes(model, ".weight_scale", region, dtypes, f"compressed-tensors {q.get('format')}")


def _fail(model: Model, message: str, tensor: str | None = None) -> CheckpointError:
    return CheckpointError(f"model {model.ref}: {message}", path=model.path, tensor=tensor)


def _block(model: Model, size: Any, key: str) -> tuple[int, int]:
    ok = isinstance(size, list) and len(size) == 2 and all(isinstance(b, int) and b > 0 for b in size)
    if not ok:
        raise _fail(model, f"{key} must be two positive integers, got {size!r}")
    return (size[0], size[1])


def _scaled_codes(
    model: Model,
    suffix: str,
    region: Callable[[tuple[int, ...]], tuple[int, int] | None],
    scale_dtypes: set[str],
    what: str,
) -> dict[str, Quantized]:
    """Every tensor named ``X`` + ``suffix`` scales the 8-bit float codes of its weight (``X``
    for ``_scale_inv``, ``X.weight`` for ``.weight_scale``) over ``region(shape)`` (rows and
    columns of one scale; ``None``: the whole tensor). The engine checks the grid."""
    out: dict[str, Quantized] = {}
    for name in model.order:
        if not name.endswith(suffix):
            continue
        weight = name[: -len(suffix)] + (".weight" if suffix.startswith(".weight") else "")
        codes = model.tensors.get(weight)
        if codes is None:
            raise _fail(
                model, f"tensor {name} is a quantization companion without its weight ({weight})", name
            )
        if codes.dtype not in ("F8_E4M3", "F8_E5M2"):
            raise _fail(
                model,
                f"tensor {weight} has a scale ({name}) but is {codes.dtype}, not 8-bit float codes",
                weight,
            )
        scale = model.tensors[name]
        if scale.dtype not in scale_dtypes:
            why = " (E8M0 scales need scale_fmt: ue8m0)" if scale.dtype in ("U8", "F8_E8M0") else ""
            raise _fail(model, f"scale {name} is {scale.dtype}, which {what} does not use{why}", name)
        out[weight] = Quantized(name, region(codes.shape))
    for name in model.order:
        if model.tensors[name].dtype in ("F8_E4M3", "F8_E5M2") and name not in out:
            raise _fail(
                model,
                f"tensor {name} holds 8-bit float codes but has no scale "
                f"({name}{suffix.removeprefix('.weight')})",
                name,
            )
    return out


def _ct_fp4(model: Model, fmt: str) -> dict[str, Quantized]:
    """QUANT.md §4c and §4d: compressed-tensors NVFP4 (``X.weight_packed`` E2M1 codes, E4M3
    ``X.weight_scale`` per 16 values, divided by ``X.weight_global_scale``) and MXFP4 (E8M0
    scales per 32 values), merged as ``X.weight``."""
    if fmt == "nvfp4-pack-quantized":
        return _fp4_codes(model, ".weight_packed", (1, 16), {"F8_E4M3"}, ("_global_scale", True), "NVFP4")
    return _fp4_codes(model, ".weight_packed", (1, 32), {"U8", "F8_E8M0"}, None, "MXFP4")


def _fp4_codes(
    model: Model,
    codes_suffix: str,
    block: tuple[int, int],
    scale_dtypes: set[str],
    global_scale: tuple[str, bool] | None,
    what: str,
) -> dict[str, Quantized]:
    """Every ``X`` + ``codes_suffix`` that has an ``X.weight_scale`` is a weight of packed FP4
    codes (``U8``, two a byte along the last axis), merged as ``X.weight`` with its last axis
    twice the codes'; ``global_scale`` names the suffix of its one-value global scale (after
    ``X.weight``) and whether the block scales are divided by it."""
    out: dict[str, Quantized] = {}
    for name in model.order:
        if not name.endswith(".weight_scale"):
            continue
        stem = name[: -len(".weight_scale")]
        codes_name = stem + codes_suffix
        codes = model.tensors.get(codes_name)
        if codes is None:
            raise _fail(
                model, f"tensor {name} is a quantization companion without its weight ({codes_name})", name
            )
        if codes.dtype != "U8" or not codes.shape:
            raise _fail(
                model, f"tensor {codes_name} should hold packed FP4 codes (U8), not {codes.dtype}", codes_name
            )
        scale = model.tensors[name]
        if scale.dtype not in scale_dtypes:
            raise _fail(model, f"scale {name} is {scale.dtype}, which {what} does not use", name)
        g = None
        if global_scale is not None:
            g = stem + ".weight" + global_scale[0]
            if g not in model.tensors:
                raise _fail(model, f"{what} weight {codes_name} has no global scale ({g})", codes_name)
        shape = (*codes.shape[:-1], codes.shape[-1] * 2)
        out[codes_name] = Quantized(
            name, block, stem + ".weight", shape, True, g, bool(global_scale and global_scale[1])
        )
    for name in model.order:
        if name.endswith(codes_suffix) and model.tensors[name].dtype == "U8" and name not in out:
            raise _fail(model, f"tensor {name} holds packed FP4 codes but has no scale ({name}_scale)", name)
    return out


def _ct_int(model: Model) -> dict[str, Quantized]:
    """QUANT.md §4b: ``X.weight_packed`` holds 4- or 8-bit integers in I32 words
    (``q + 2^(b-1)``, element ``i`` of a row at bit ``i·b``), ``X.weight_scale`` per group of
    ``group_size`` columns (or per row, ``channel``), ``X.weight_shape`` the plain shape;
    ``w = (q - zp) · s``, with asymmetric packs' zero points ``X.weight_zero_point`` packed
    the same way down the rows (``zp = 0`` when symmetric)."""
    q = quantization_config(model.config) or {}
    groups = q.get("config_groups") or {}
    w = next((g.get("weights") for g in groups.values() if isinstance(g, dict)), None) or {}
    bits, strategy = w.get("num_bits"), w.get("strategy")
    if w.get("type") != "int" or bits not in (4, 8):
        raise _fail(model, f"compressed-tensors pack-quantized weights {w!r} are not 4- or 8-bit integers")
    asymmetric = w.get("symmetric") is False
    if strategy not in ("group", "channel"):
        raise _fail(model, f"compressed-tensors pack-quantized strategy {strategy!r} is not supported")
    out: dict[str, Quantized] = {}
    for name in model.order:
        if not name.endswith(".weight_packed"):
            continue
        stem = name[: -len(".weight_packed")]
        codes = model.tensors[name]
        scale, shape_name = stem + ".weight_scale", stem + ".weight_shape"
        zero = stem + ".weight_zero_point"
        if not asymmetric and zero in model.tensors:
            raise _fail(model, f"{zero}: zero points in a pack declared symmetric", zero)
        for needed in (scale, shape_name, *([zero] if asymmetric else [])):
            if needed not in model.tensors:
                raise _fail(model, f"packed weight {name} has no {needed.rsplit('.', 1)[1]} ({needed})", name)
        if codes.dtype != "I32" or not codes.shape:
            raise _fail(
                model, f"tensor {name} should hold I32 words of packed integers, not {codes.dtype}", name
            )
        if model.tensors[scale].dtype not in ("F32", "BF16", "F16"):
            raise _fail(model, f"scale {scale} is {model.tensors[scale].dtype}, not F32, BF16 or F16", scale)
        shape = (*codes.shape[:-1], codes.shape[-1] * 32 // bits)
        group = shape[-1] if strategy == "channel" else w.get("group_size")
        block = _block(model, [1, group], "weights.group_size")
        out[name] = Quantized(
            scale,
            block,
            stem + ".weight",
            shape,
            int_bits=bits,
            weight_shape=shape_name,
            zero_point=zero if asymmetric else None,
        )
    return out
