r"""Turn a bench set (``make_experts.py``) into its block FP8 version (QUANT.md §3), as
DeepSeek-V3 and Qwen3-FP8 ship: every 2-D ``*_proj.weight`` becomes ``F8_E4M3`` codes with
``weight_scale_inv`` F32 scales over 128x128 blocks (``s = amax / 448``, an all-zero block
``s = 1``, codes rounded to the nearest E4M3 value, ties to the even code); embeddings, norms
and biases stay bf16; ``config.json`` gets the ``quantization_config``.

With ``--format mxfp4`` it writes compressed-tensors MXFP4 instead (``mxfp4-pack-quantized``:
E2M1 codes two a byte, an E8M0 scale per 32 values of a row).

Reads one tensor at a time, so memory stays near the largest tensor.

Example::

    python benches/quantize_fp8.py /tmp/set /tmp/set-fp8
    python benches/bench.py /tmp/set-fp8 --methods linear,ties --repeat 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt

BLOCK = 128
E4M3_MAX = np.float32(448.0)


def e4m3_values() -> npt.NDArray[np.float32]:
    """The value of every non-negative finite E4M3 code 0x00..0x7E, ascending."""
    c = np.arange(0x7F, dtype=np.int64)
    e, m = c >> 3, (c & 7).astype(np.float64)
    return np.where(e == 0, m / 8 * 2.0**-6, (1 + m / 8) * 2.0 ** (e - 7)).astype(np.float32)


VALUES = e4m3_values()
MIDPOINTS = ((VALUES[:-1].astype(np.float64) + VALUES[1:]) / 2).astype(np.float64)


def encode(y: npt.NDArray[np.float32]) -> npt.NDArray[np.uint8]:
    """Nearest E4M3 code of each value (already scaled into ±448), ties to the even code."""
    a = np.abs(y).astype(np.float64)
    code = np.searchsorted(MIDPOINTS, a, side="left")  # a == midpoint lands on the lower code
    tie = (code < len(MIDPOINTS)) & (a == MIDPOINTS[np.minimum(code, len(MIDPOINTS) - 1)])
    code = np.where(tie & (code % 2 == 1), code + 1, code)
    return (code.astype(np.uint8) | np.where(np.signbit(y), 0x80, 0).astype(np.uint8)).astype(np.uint8)


def quantize(x: npt.NDArray[np.float32]) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32]]:
    rows, cols = x.shape
    gr, gc = -(-rows // BLOCK), -(-cols // BLOCK)
    pad = np.zeros((gr * BLOCK, gc * BLOCK), np.float32)
    pad[:rows, :cols] = x
    blocks = pad.reshape(gr, BLOCK, gc, BLOCK)
    amax = np.abs(blocks).max(axis=(1, 3))
    scales = np.where(amax > 0, (amax / E4M3_MAX).astype(np.float32), np.float32(1.0)).astype(np.float32)
    y = (blocks / scales[:, None, :, None]).astype(np.float32)
    codes = encode(y).reshape(gr * BLOCK, gc * BLOCK)[:rows, :cols]
    return np.ascontiguousarray(codes), scales


E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float32)
E2M1_MID = (E2M1[:-1] + E2M1[1:]) / 2


def quantize_mxfp4(x: npt.NDArray[np.float32]) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    """MXFP4 as compressed-tensors stores it (QUANT.md §4d, §6's rule): per 32 values of a
    row an E8M0 scale ``2^e``, ``e`` the smallest with ``amax <= 6 · 2^e`` (all-zero: byte 0),
    each value the nearest E2M1 code of ``x / 2^e``; codes two a byte, even element low."""
    rows, cols = x.shape
    groups = x.reshape(rows, cols // 32, 32)
    amax = np.abs(groups).max(axis=-1)
    e = np.ceil(np.log2(np.where(amax > 0, amax, 1) / 6)).astype(np.int64)
    e = np.where(amax > 0, e, -127)
    scale_bytes = np.clip(e + 127, 0, 254).astype(np.uint8)
    y = groups / np.ldexp(np.float32(1), scale_bytes.astype(np.int64) - 127)[..., None].astype(np.float32)
    mag = np.searchsorted(E2M1_MID, np.abs(y), side="left").astype(np.uint8)
    codes = (mag | np.where(np.signbit(y), 8, 0).astype(np.uint8)).reshape(rows, cols)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    return np.ascontiguousarray(packed), scale_bytes


def read_header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return n, json.loads(f.read(n))


def convert_file(src: Path, dst: Path, fmt: str = "fp8") -> None:
    n, header = read_header(src)
    meta = header.pop("__metadata__", {"format": "pt"})
    names = sorted(header, key=lambda k: header[k]["data_offsets"][0])
    data = np.memmap(src, dtype=np.uint8, mode="r", offset=8 + n)
    out_header: dict = {"__metadata__": meta}
    parts: list[tuple[str, str, list[int], bytes | npt.NDArray]] = []
    for name in names:
        info = header[name]
        a, b = info["data_offsets"]
        raw = data[a:b]
        if name.endswith("_proj.weight") and len(info["shape"]) == 2 and info["dtype"] == "BF16":
            bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            x = bits.view(np.float32).reshape(info["shape"])
            if fmt == "mxfp4" and x.shape[1] % 32 == 0:
                packed, scale_bytes = quantize_mxfp4(x)
                stem = name[: -len(".weight")]
                parts.append((stem + ".weight_packed", "U8", list(packed.shape), packed))
                parts.append((stem + ".weight_scale", "U8", list(scale_bytes.shape), scale_bytes))
            elif fmt == "mxfp4":
                parts.append((name, info["dtype"], info["shape"], raw))
            else:
                codes, scales = quantize(x)
                parts.append((name, "F8_E4M3", list(codes.shape), codes))
                parts.append((name + "_scale_inv", "F32", list(scales.shape), scales))
        else:
            parts.append((name, info["dtype"], info["shape"], raw))
    offset = 0
    for name, dtype, shape, arr in parts:
        size = arr.nbytes if isinstance(arr, np.ndarray) else len(arr)
        out_header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    hbytes = json.dumps(out_header).encode()
    hbytes += b" " * (-len(hbytes) % 8)
    with open(dst, "wb") as f:
        f.write(struct.pack("<Q", len(hbytes)) + hbytes)
        for _name, _dtype, _shape, arr in parts:
            f.write(np.ascontiguousarray(arr).tobytes() if isinstance(arr, np.ndarray) else bytes(arr))


def convert_model(src: Path, dst: Path, fmt: str = "fp8") -> None:
    dst.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    for f in sorted(src.glob("*.safetensors")):
        convert_file(f, dst / f.name, fmt)
        _, header = read_header(dst / f.name)
        weight_map.update({k: f.name for k in header if k != "__metadata__"})
    index = src / "model.safetensors.index.json"
    if index.is_file():
        total = sum((dst / f).stat().st_size for f in set(weight_map.values()))
        (dst / index.name).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
        )
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = (
        {
            "quant_method": "compressed-tensors",
            "format": "mxfp4-pack-quantized",
            "quantization_status": "compressed",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": {"num_bits": 4, "type": "float", "strategy": "group", "group_size": 32},
                }
            },
        }
        if fmt == "mxfp4"
        else {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [BLOCK, BLOCK],
        }
    )
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for extra in src.iterdir():
        if (
            extra.is_file()
            and not extra.name.endswith(".safetensors")
            and extra.name
            not in (
                "config.json",
                index.name,
            )
        ):
            shutil.copyfile(extra, dst / extra.name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", type=Path, help="a bench set (base/ and expert_*/)")
    p.add_argument("dst", type=Path, help="where to write its quantized version")
    p.add_argument("--format", choices=["fp8", "mxfp4"], default="fp8", help="block FP8 (default) or MXFP4")
    args = p.parse_args(argv)
    folders = [d for d in sorted(args.src.iterdir()) if (d / "config.json").is_file()]
    if not folders:
        print(f"error: no model folders in {args.src}", file=sys.stderr)
        return 1
    for d in folders:
        convert_model(d, args.dst / d.name, args.format)
        print(f"wrote {args.dst / d.name}")
    for f in args.src.iterdir():
        if f.is_file():
            shutil.copyfile(f, args.dst / f.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
