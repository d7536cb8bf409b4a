"""Quantized checkpoints (``../shared/spec/QUANT.md``): which weights of a model are stored
quantized and how the engine reads (and writes back) each of them, after
:func:`~mergex.quant_detect.detect` has found the format.

A quantized weight is several tensors (codes, scales, shapes) that only together mean a
number; merging them one by one as if each were a weight gives a broken model without a
word. So every model passes :func:`check` before a merge is planned: a refused format
(QUANT.md §9), a format mergex cannot read yet, a configuration that contradicts the tensors
and an integer or 8-bit tensor that belongs to no quantized weight each stop the merge with
one line naming the model, the format and the signal that matched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import CheckpointError
from .quant_detect import (
    _CT_FP4,
    _CT_INT,
    FLOAT_DTYPES,
    Detected,
    detect,
    is_activation_scale,
    is_plain_non_float,
    quantization_config,
)

if TYPE_CHECKING:
    from .models import Model

__all__ = [
    "FLOAT_DTYPES",
    "Detected",
    "Quantized",
    "check",
    "detect",
    "is_activation_scale",
    "is_plain_non_float",
    "quantization_config",
]


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
    transposed: bool = False
    """gpt-oss MXFP4: the codes and scales store the weight's transpose (QUANT.md §6)."""
    rule: str = "amax"
    """How the format chooses a block's scale, for writing it back (the engine's
    ``Encode.rule``: ``amax``, ``ue8m0``, ``mx``, ``nvfp4``, ``nvfp4_modelopt``, ``int``,
    ``int_asym``)."""


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
        quantized = _fp4_codes(
            model, ".weight", (1, 16), {"F8_E4M3"}, ("_scale_2", False), "ModelOpt NVFP4", "nvfp4_modelopt"
        )
    elif found is not None and found.family == "mxfp4":
        quantized = _gpt_oss(model)
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
    rule = "ue8m0" if e8m0 else "amax"
    return _scaled_codes(model, "_scale_inv", lambda _shape: block, dtypes, "block FP8", rule)


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
    what = f"compressed-tensors {q.get('format')}"
    return _scaled_codes(model, ".weight_scale", region, dtypes, what, "mx" if mx else "amax")


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
    rule: str = "amax",
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
        out[weight] = Quantized(name, region(codes.shape), rule=rule)
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
        return _fp4_codes(
            model, ".weight_packed", (1, 16), {"F8_E4M3"}, ("_global_scale", True), "NVFP4", "nvfp4"
        )
    return _fp4_codes(model, ".weight_packed", (1, 32), {"U8", "F8_E8M0"}, None, "MXFP4", "mx")


def _fp4_codes(
    model: Model,
    codes_suffix: str,
    block: tuple[int, int],
    scale_dtypes: set[str],
    global_scale: tuple[str, bool] | None,
    what: str,
    rule: str,
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
            name, block, stem + ".weight", shape, True, g, bool(global_scale and global_scale[1]), rule=rule
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
            rule="int_asym" if asymmetric else "int",
        )
    return out


def _gpt_oss(model: Model) -> dict[str, Quantized]:
    """QUANT.md §6: ``X_blocks`` (``U8 [E, N, K/32, 16]``, two E2M1 codes a byte) and
    ``X_scales`` (E8M0 ``[E, N, K/32]``) store the transpose of the plain expert stack ``X``
    ``[E, K, N]``, which the engine reads in its plain order."""
    out: dict[str, Quantized] = {}
    for name in model.order:
        if not name.endswith("_blocks"):
            continue
        stem = name.removesuffix("_blocks")
        scales = stem + "_scales"
        if scales not in model.tensors:
            raise _fail(model, f"gpt-oss MXFP4 blocks {name} have no scales ({scales})", name)
        b, s = model.tensors[name], model.tensors[scales]
        if b.dtype != "U8" or len(b.shape) != 4 or b.shape[-1] != 16:
            what = f"{b.dtype} {list(b.shape)}"
            raise _fail(model, f"tensor {name} should be U8 [experts, N, K/32, 16], not {what}", name)
        if s.dtype not in ("U8", "F8_E8M0") or s.shape != b.shape[:-1]:
            what = f"{s.dtype} {list(s.shape)}"
            raise _fail(model, f"scales {scales} ({what}) should be U8 {list(b.shape[:-1])}", scales)
        experts, n, groups, _ = b.shape
        shape = (experts, groups * 32, n)
        out[name] = Quantized(scales, (1, 32), stem, shape, True, rule="mx", transposed=True)
    for name in model.order:
        if name.endswith("_scales") and name.removesuffix("_scales") + "_blocks" not in model.tensors:
            raise _fail(model, f"tensor {name} is a gpt-oss MXFP4 scale without its blocks", name)
    return out
