"""Write the corpus of hand-made hostile safetensors files kept in ``tests/hostile``.

Each file is a tiny checkpoint (two tensors, a few dozen bytes) broken in one way. The
tests check that the files on disk are exactly what this script writes, that ``mergex
inspect`` and ``mergex merge`` refuse each one with the error text listed in ``CORPUS``,
and the fuzzers start their mutations from them. Run ``python tests/hostile/make_corpus.py``
after changing a case.

Cases already covered by ``tests/test_cli_errors.py`` on full model folders (truncated
data, a header length of several times the file, invalid JSON, data offsets far outside the
file, a shape that disagrees with its offsets) are not repeated here.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

HERE = Path(__file__).resolve().parent
U64_MAX = 2**64 - 1

# The valid file every case starts from: "a" F32 [2] at [0, 8), "b" BF16 [3] at [8, 14).
DATA = bytes(range(1, 15))
A = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
B = {"dtype": "BF16", "shape": [3], "data_offsets": [8, 14]}
META = {"format": "pt"}


def pack(header: bytes | str, data: bytes = DATA, length: int | None = None) -> bytes:
    """8-byte little-endian header length, the header (space padded to 8 bytes), the data."""
    h = header.encode() if isinstance(header, str) else header
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h) if length is None else length) + h + data


def entries(*items: tuple[str, object]) -> str:
    """A JSON object from ``(key, value)`` pairs, written in order (duplicates kept)."""
    return "{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in items) + "}"


def with_a(**fields) -> str:
    """The valid header with fields of tensor "a" replaced."""
    return entries(("__metadata__", META), ("a", {**A, **fields}), ("b", B))


def with_b(**fields) -> str:
    return entries(("__metadata__", META), ("a", A), ("b", {**B, **fields}))


VALID = entries(("__metadata__", META), ("a", A), ("b", B))

# name -> (file bytes, text the one-line error must contain). Every error also names the file.
CORPUS: dict[str, tuple[bytes, str]] = {
    "empty": (b"", "shorter than the 8-byte header length"),
    "short_prefix": (b"\x10\x00\x00\x00\x00", "shorter than the 8-byte header length"),
    "header_length_u64_max": (
        pack(VALID, length=U64_MAX),
        f"header length {U64_MAX} does not fit in the file",
    ),
    "header_length_past_end": (pack(VALID, length=len(pack(VALID))), "does not fit in the file"),
    "header_length_zero": (pack(b"", length=0), "invalid safetensors header"),
    "header_not_utf8": (pack(VALID.replace('"a"', '"\xff"').encode("latin-1")), "not UTF-8"),
    "header_json_array": (pack("[1, 2]"), "invalid safetensors header"),
    "header_json_number": (pack("42"), "invalid safetensors header"),
    "header_json_string": (pack('"model"'), "invalid safetensors header"),
    "header_trailing_garbage": (pack(VALID + "xyz"), "invalid safetensors header"),
    "entry_not_object": (pack(entries(("a", 5), ("b", B))), "tensor 'a'"),
    "dtype_unknown": (pack(with_a(dtype="Q4_K")), "tensor 'a': unknown dtype 'Q4_K'"),
    "dtype_not_string": (pack(with_a(dtype=4)), "tensor 'a': invalid or missing 'dtype'"),
    "dtype_missing": (pack(entries(("a", {"shape": [2], "data_offsets": [0, 8]}), ("b", B))), "'dtype'"),
    "shape_negative": (pack(with_a(shape=[-2])), "tensor 'a': invalid or missing 'shape'"),
    "shape_float": (pack(with_a(shape=[2.0])), "tensor 'a': invalid or missing 'shape'"),
    "shape_not_list": (pack(with_a(shape=2)), "tensor 'a': invalid or missing 'shape'"),
    "shape_dim_over_u64": (pack(with_a(shape=[2**64])), "tensor 'a': invalid or missing 'shape'"),
    # 2^32 * 2^32 * 4 bytes overflows u64: must be a size mismatch, not a wrapped product.
    "shape_product_overflows_u64": (
        pack(with_a(shape=[2**32, 2**32])),
        "tensor 'a': shape [4294967296, 4294967296] of F32 needs",
    ),
    "offsets_reversed": (pack(with_a(data_offsets=[8, 0])), "tensor 'a': invalid or missing 'data_offsets'"),
    "offsets_three_values": (
        pack(with_a(data_offsets=[0, 4, 8])),
        "tensor 'a': invalid or missing 'data_offsets'",
    ),
    "offsets_negative": (
        pack(with_a(data_offsets=[-8, 0])),
        "tensor 'a': invalid or missing 'data_offsets'",
    ),
    "offsets_near_u64_max": (
        pack(with_b(dtype="U8", shape=[5], data_offsets=[U64_MAX - 5, U64_MAX]), DATA[:8]),
        "tensor 'b': data offsets",
    ),
    # "b" starts inside "a" (and the data section ends where "b" ends).
    "offsets_overlap": (
        pack(with_b(data_offsets=[6, 12]), DATA[:12]),
        "tensor 'b': data starts at 6, expected 8",
    ),
    "offsets_gap": (
        pack(with_b(data_offsets=[10, 16]), DATA + b"\0\0"),
        "tensor 'b': data starts at 10, expected 8",
    ),
    "trailing_bytes": (pack(VALID, DATA + bytes(16)), "16 bytes after the last tensor's data"),
    "duplicate_name": (
        pack(entries(("a", A), ("b", B), ("a", A))),
        "tensor 'a' appears twice in the header",
    ),
    "metadata_not_map": (pack(entries(("__metadata__", ["pt"]), ("a", A), ("b", B))), "__metadata__"),
    "metadata_non_string_value": (
        pack(entries(("__metadata__", {"format": 1}), ("a", A), ("b", B))),
        "__metadata__ must map strings to strings",
    ),
}

SUFFIX = ".safetensors"


def build() -> dict[str, bytes]:
    """File name -> bytes, including the valid control file."""
    files = {"valid" + SUFFIX: pack(VALID)}
    files.update({name + SUFFIX: data for name, (data, _) in CORPUS.items()})
    return files


def main() -> None:
    for old in HERE.glob("*" + SUFFIX):
        old.unlink()
    for name, data in build().items():
        (HERE / name).write_bytes(data)
    print(f"wrote {len(build())} files to {HERE}")


if __name__ == "__main__":
    main()
