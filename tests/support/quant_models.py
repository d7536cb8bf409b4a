"""Quantized input models written from QUANT.md, with the values a correct reader decodes:
block FP8 (``Fp8Model``, §3), compressed-tensors float-quantized, MXFP8 and ModelOpt FP8
(``scaled_model``, §4a, §4d, §5), packed FP4 (``fp4_model``, §4c, §4d, §5) and packed
integers (``int_model``, §4b), and a plain BF16 fine-tune of the same architecture
(``plain_model``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from support import models
from support import reference as ref

F32 = np.float32
BLOCK = [32, 64]  # rows, columns: the test weights have partial blocks both ways
QUANTIZED = ("self_attn.q_proj.weight", "mlp.up_proj.weight")  # (96, 96) and (250, 96)
STACK = "model.layers.1.mlp.experts.gate_up_proj"  # a fused 3-D expert stack
STACK_SHAPE = (3, 40, 96)


def e4m3(codes: np.ndarray) -> np.ndarray:
    """QUANT.md §2: s eeee mmm, bias 7; e = 0 subnormal; no infinities."""
    c = codes.astype(np.int64)
    sign = np.where(c & 0x80, -1.0, 1.0)
    e, m = (c >> 3) & 0xF, (c & 7).astype(np.float64)
    mag = np.where(e == 0, m / 8 * 2.0**-6, (1 + m / 8) * 2.0 ** (e - 7))
    return (sign * mag).astype(F32)


def e8m0(b: np.ndarray) -> np.ndarray:
    return np.ldexp(np.float64(1.0), b.astype(np.int64) - 127).astype(F32)


def scale_grid(shape: tuple[int, ...]) -> tuple[int, ...]:
    *lead, r, c = shape
    return (*lead, -(-r // BLOCK[0]), -(-c // BLOCK[1]))


def expand(scales: np.ndarray, shape: tuple[int, ...], block: tuple[int, int] = tuple(BLOCK)) -> np.ndarray:
    """Each element's block scale (partial blocks use their real elements only)."""
    s = np.repeat(np.repeat(scales, block[0], axis=-2), block[1], axis=-1)
    return s[..., : shape[-2], : shape[-1]]


class Fp8Model:
    """A llama-shaped model whose projections (and an expert stack) are block FP8."""

    def __init__(self, root: Path, name: str, seed: int, scale_dtype: str, per_tensor: bool = False):
        rng = np.random.default_rng(seed)
        shapes = models.llama_shapes()
        plain = models.random_tensors(shapes, "bf16", seed)
        self.path = root / name
        self.values: dict[str, np.ndarray] = {}  # what a correct reader decodes, f32
        tensors = {}
        self.quantized = [n for n in shapes if n.endswith(QUANTIZED)] + [STACK]
        for n in [*shapes, STACK]:
            shape = shapes.get(n, STACK_SHAPE)
            if n not in self.quantized:
                tensors[n] = models.encode(plain[n], "bf16")
                self.values[n] = ref.to_f32(ref.decode(tensors[n][2], "BF16", shape), "BF16")
                continue
            codes = rng.integers(0, 0x7F, size=shape, dtype=np.uint8)  # finite E4M3, both signs
            codes |= rng.choice(np.array([0, 0x80], np.uint8), size=shape)
            if n.endswith("q_proj.weight"):
                codes[..., : BLOCK[0], : BLOCK[1]] = 0  # an all-zero block
            grid = () if per_tensor else scale_grid(shape)
            if scale_dtype == "E8M0":
                raw_s = rng.integers(118, 130, size=grid, dtype=np.uint8)
                s, stored = e8m0(raw_s), ("F8_E8M0", grid, raw_s.tobytes())
            else:
                s = (rng.random(grid) * 0.01 + 1e-4).astype(F32)
                if scale_dtype == "BF16":
                    stored = models.encode(s, "bf16")
                    s = ref.to_f32(ref.decode(stored[2], "BF16", grid), "BF16")
                else:
                    stored = ("F32", grid, s.tobytes())
            tensors[n] = ("F8_E4M3", shape, codes.tobytes())
            tensors[f"{n}_scale_inv"] = stored
            full = np.broadcast_to(s, shape) if per_tensor else expand(s, shape)
            self.values[n] = (e4m3(codes) * full).astype(F32)
        # A static activation scale: dropped from the plain output, never merged.
        tensors["model.layers.0.mlp.up_proj.activation_scale"] = ("F32", (), F32(0.5).tobytes())
        self.path.mkdir(parents=True)
        models.write_safetensors(self.path / "model.safetensors", tensors, {"format": "pt"})
        cfg = models.model_config(models.LAYERS, "BF16")
        cfg["quantization_config"] = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "static",
            "weight_block_size": None if per_tensor else BLOCK,
            **({"scale_fmt": "ue8m0"} if scale_dtype == "E8M0" else {}),
        }
        (self.path / "config.json").write_text(json.dumps(cfg))

    def __str__(self) -> str:
        return str(self.path)


def plain_model(root: Path, name: str, seed: int) -> tuple[Path, dict[str, np.ndarray]]:
    """A BF16 fine-tune of the same architecture, the expert stack included."""
    shapes = {**models.llama_shapes(), STACK: STACK_SHAPE}
    m = models.write_model(
        root / name, models.random_tensors(shapes, "bf16", seed), "bf16", layers=models.LAYERS
    )
    return m.path, m.tensors


# compressed-tensors float-quantized (§4a) in every strategy, MXFP8 (§4d) and ModelOpt FP8
# (§5): 8-bit codes times `X.weight_scale` over a region: (rows, columns) of one scale, or
# None for one scale over the tensor.
def ct_config(fmt: str, **weights) -> dict:
    scheme = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, **weights}
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": scheme}},
    }


LAYOUTS = {
    "ct_tensor": (None, "F32", ct_config("float-quantized", strategy="tensor")),
    "ct_channel": ("channel", "BF16", ct_config("float-quantized", strategy="channel")),
    "ct_group": ((1, 32), "F32", ct_config("float-quantized", strategy="group", group_size=32)),
    "ct_block": ((32, 64), "F32", ct_config("float-quantized", strategy="block", block_structure=[32, 64])),
    "mxfp8": ((1, 32), "E8M0", ct_config("mxfp8-quantized", strategy="group", group_size=32)),
    "modelopt_fp8": (None, "F32", {"quant_method": "modelopt", "quant_algo": "FP8"}),
}


def plain_part(seed: int) -> tuple[dict, dict[str, np.ndarray], dict[str, tuple[int, ...]]]:
    """The tensors that stay bf16 (stored, and their values), and the shapes to quantize."""
    shapes = models.llama_shapes()
    plain = models.random_tensors(shapes, "bf16", seed)
    tensors, values, todo = {}, {}, {}
    for n, shape in shapes.items():
        if n.endswith(QUANTIZED):
            todo[n] = shape
            continue
        tensors[n] = models.encode(plain[n], "bf16")
        values[n] = ref.to_f32(ref.decode(tensors[n][2], "BF16", shape), "BF16")
    return tensors, values, todo


def scaled_model(root: Path, layout: str, seed: int) -> tuple[Path, dict[str, np.ndarray]]:
    region, scale_dtype, quant = LAYOUTS[layout]
    rng = np.random.default_rng(seed)
    tensors, values, todo = plain_part(seed)
    for n, shape in todo.items():
        r, c = shape
        rb, cb = (r, c) if region is None else (1, c) if region == "channel" else region
        grid = (-(-r // rb), -(-c // cb))
        codes = rng.integers(0, 0x7F, size=shape, dtype=np.uint8) | rng.choice(
            np.array([0, 0x80], np.uint8), size=shape
        )
        if scale_dtype == "E8M0":
            raw = rng.integers(118, 130, size=grid, dtype=np.uint8)
            s, stored = e8m0(raw), ("U8", grid, raw.tobytes())
        else:
            s = (rng.random(grid) * 0.01 + 1e-4).astype(F32)
            stored = models.encode(s, "bf16") if scale_dtype == "BF16" else ("F32", grid, s.tobytes())
            s = ref.to_f32(ref.decode(stored[2], scale_dtype, grid), scale_dtype)
        if layout == "modelopt_fp8":
            stored = ("F32", (), stored[2])
        elif region is None:
            stored = (stored[0], (1,), stored[2])
        tensors[n] = ("F8_E4M3", shape, codes.tobytes())
        tensors[n + "_scale"] = stored
        tensors[n[: -len("weight")] + "input_scale"] = ("F32", (1,), F32(0.25).tobytes())
        full = expand(s, shape, (rb, cb))
        values[n] = (e4m3(codes) * full).astype(F32)
    legacy = layout == "modelopt_fp8"
    path = models.write_quantized(root / layout, tensors, None if legacy else quant)
    if legacy:
        # The legacy layout: hf_quant_config.json beside a config.json without the block.
        (path / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": "FP8"}}))
    return path, values


# Packed FP4 (QUANT.md §4c, §4d, §5): two E2M1 codes a byte, the even element in the low
# nibble; E4M3 scales per 16 values over a global divisor (compressed-tensors NVFP4) or
# multiplier (ModelOpt NVFP4), or E8M0 scales per 32 values (MXFP4).
E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], F32)
FP4 = {
    "ct_nvfp4": (
        16,
        ".weight_packed",
        ct_config("nvfp4-pack-quantized", num_bits=4, strategy="tensor_group", group_size=16),
    ),
    "modelopt_nvfp4": (16, ".weight", {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16}),
    "ct_mxfp4": (
        32,
        ".weight_packed",
        ct_config("mxfp4-pack-quantized", num_bits=4, strategy="group", group_size=32),
    ),
}


def fp4_model(root: Path, layout: str, seed: int) -> tuple[Path, dict[str, np.ndarray]]:
    group, suffix, quant = FP4[layout]
    rng = np.random.default_rng(seed)
    tensors, values, todo = plain_part(seed)
    for n, shape in todo.items():
        r, c = shape
        stem = n[: -len(".weight")]
        codes = rng.integers(0, 16, size=shape, dtype=np.uint8)
        packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
        grid = (r, c // group)
        if layout == "ct_mxfp4":
            raw = rng.integers(120, 130, size=grid, dtype=np.uint8)
            eff = e8m0(raw)
            tensors[stem + ".weight_scale"] = ("U8", grid, raw.tobytes())
        else:
            raw = rng.integers(0x20, 0x60, size=grid, dtype=np.uint8)  # positive finite E4M3
            g = F32(rng.random() * 100 + 1)
            if layout == "ct_nvfp4":
                eff = (e4m3(raw) / g).astype(F32)
                tensors[stem + ".weight_global_scale"] = ("F32", (1,), g.tobytes())
                tensors[stem + ".input_global_scale"] = ("F32", (1,), g.tobytes())
            else:
                eff = (e4m3(raw) * g).astype(F32)
                tensors[stem + ".weight_scale_2"] = ("F32", (), g.tobytes())
                tensors[stem + ".input_scale"] = ("F32", (), g.tobytes())
            tensors[stem + ".weight_scale"] = ("F8_E4M3", grid, raw.tobytes())
        tensors[stem + suffix] = ("U8", (r, c // 2), packed.tobytes())
        values[n] = (E2M1[codes] * expand(eff, shape, (1, group))).astype(F32)
    return models.write_quantized(root / layout, tensors, quant), values


# compressed-tensors pack-quantized (QUANT.md §4b), symmetric: integers of 4 or 8 bits
# stored as q + 2^(b-1) in little-endian I32 words, element i of a row at bit i·b; scales per
# group of columns (or per row); weight_shape holds the plain shape.
INT = {
    "ct_int4_group": (
        4,
        32,
        ct_config("pack-quantized", num_bits=4, type="int", strategy="group", group_size=32),
    ),
    "ct_int8_channel": (8, None, ct_config("pack-quantized", num_bits=8, type="int", strategy="channel")),
    "ct_int4_asymmetric": (
        4,
        32,
        ct_config("pack-quantized", num_bits=4, type="int", strategy="group", group_size=32, symmetric=False),
    ),
}


def int_model(root: Path, layout: str, seed: int, weight_shape=None) -> tuple[Path, dict[str, np.ndarray]]:
    bits, group, quant = INT[layout]
    rng = np.random.default_rng(seed)
    tensors, values, todo = plain_part(seed)
    for n, shape in todo.items():
        r, c = shape
        stem = n[: -len(".weight")]
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        q = rng.integers(lo, hi + 1, size=shape)
        u = (q - lo).astype(np.uint8)
        raw = (u[:, 0::2] | (u[:, 1::2] << 4)).astype(np.uint8) if bits == 4 else u
        words = np.ascontiguousarray(raw).view("<i4")  # bytes, little-endian, in I32 words
        g = c if group is None else group
        grid = (r, c // g)
        s = (rng.random(grid) * 0.01 + 1e-4).astype(F32)
        stored = models.encode(s, "bf16")
        s = ref.to_f32(ref.decode(stored[2], "BF16", grid), "BF16")
        tensors[stem + ".weight_packed"] = ("I32", words.shape, words.tobytes())
        tensors[stem + ".weight_scale"] = stored
        shape_vals = np.array(weight_shape or shape, np.int64)
        tensors[stem + ".weight_shape"] = ("I64", (2,), shape_vals.tobytes())
        zp = np.zeros(grid, np.int64)
        if not quant["config_groups"]["group_0"]["weights"]["symmetric"]:
            # Zero points packed down the rows: row r in word r·b//32 at bit (r·b) % 32.
            zp = rng.integers(lo, hi + 1, size=grid)
            zu = (zp - lo).astype(np.uint32)
            per = 32 // bits
            zrows = -(-r // per)
            pad = np.zeros((zrows * per, grid[1]), np.uint32)
            pad[:r] = zu
            words_zp = np.zeros((zrows, grid[1]), np.uint32)
            for k in range(per):
                words_zp |= pad[k::per] << np.uint32(k * bits)
            tensors[stem + ".weight_zero_point"] = ("I32", words_zp.shape, words_zp.astype("<u4").tobytes())
        zfull = expand(zp, shape, (1, g))
        values[n] = ((q - zfull).astype(F32) * expand(s, shape, (1, g))).astype(F32)
    return models.write_quantized(root / layout, tensors, quant), values
