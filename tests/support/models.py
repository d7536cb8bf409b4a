"""Small synthetic checkpoints on disk, and a reader for merge outputs.

Everything here writes and parses safetensors by hand (8-byte little-endian header length,
JSON header, raw data), so bfloat16 files need neither torch nor ml_dtypes and the tests can
also write deliberately broken files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from support import reference as ref

# Sizes: the big tensors hold tens of thousands of elements, so that with the smallest
# budget (64KiB, a chunk of ~1-3k elements) each spans many chunks. None of them is a
# multiple of 256 elements, so every tensor also ends in a partial chunk.
VOCAB = 323
HIDDEN = 96
INTERMEDIATE = 250
LAYERS = 3

TOKENIZER_FILES = {
    "tokenizer_config.json": {
        "model_max_length": 128,
        "tokenizer_class": "LlamaTokenizer",
    },
    "special_tokens_map.json": {"bos_token": "<s>", "eos_token": "</s>"},
}
GENERATION_CONFIG = {"bos_token_id": 1, "eos_token_id": 2, "max_length": 64}

SHORT = {
    "bf16": "BF16",
    "f16": "F16",
    "f32": "F32",
    "BF16": "BF16",
    "F16": "F16",
    "F32": "F32",
}


# --------------------------------------------------------------------------- writing


def write_safetensors(
    path: os.PathLike | str,
    tensors: Mapping[str, tuple[str, Sequence[int], bytes]],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``{name: (dtype_str, shape, raw_bytes)}`` as a safetensors file.

    Tensors are laid out in the given order. The header is padded with spaces to a multiple
    of 8 bytes, like the reference implementation.
    """
    header: dict = {}
    if metadata is not None:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {
            "dtype": dtype,
            "shape": [int(s) for s in shape],
            "data_offsets": [offset, offset + len(raw)],
        }
        offset += len(raw)
    hbytes = json.dumps(header, separators=(",", ":")).encode()
    hbytes += b" " * (-len(hbytes) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hbytes)))
        f.write(hbytes)
        for _dtype, _shape, raw in tensors.values():
            f.write(raw)


def encode(values_f32: np.ndarray, dtype: str) -> tuple[str, tuple[int, ...], bytes]:
    """float32 values -> ``(dtype_str, shape, raw_bytes)``, rounding RNE to ``dtype``."""
    dtype = SHORT[dtype]
    arr = ref.from_f32(values_f32, dtype)
    return dtype, tuple(arr.shape), np.ascontiguousarray(arr).tobytes()


def llama_shapes(
    layers: int = LAYERS,
    vocab: int = VOCAB,
    hidden: int = HIDDEN,
    inter: int = INTERMEDIATE,
) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        shapes[f"model.layers.{i}.self_attn.q_proj.weight"] = (hidden, hidden)
        shapes[f"model.layers.{i}.mlp.up_proj.weight"] = (inter, hidden)
        shapes[f"model.layers.{i}.input_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def random_tensors(shapes: Mapping[str, Sequence[int]], dtype: str, seed: int) -> dict[str, np.ndarray]:
    """Random values, already rounded to ``dtype`` (so f32 copies are the exact values)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes.items():
        x = rng.standard_normal(shape, dtype=np.float32)
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            x = np.float32(1.0) + np.float32(0.1) * x
        else:
            x = np.float32(0.05) * x
        out[name] = ref.round_to(x, SHORT[dtype])
    return out


def model_config(layers: int, dtype: str, **extra) -> dict:
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "num_hidden_layers": layers,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "vocab_size": VOCAB,
        "torch_dtype": ref.TORCH_DTYPE[SHORT[dtype]],
        "tie_word_embeddings": False,
    }
    cfg.update(extra)
    return cfg


@dataclass
class Model:
    """A model folder written by :func:`write_model`, with its exact float32 values."""

    path: Path
    dtype: str  # safetensors dtype string: BF16 / F16 / F32
    tensors: dict[str, np.ndarray] = field(repr=False)  # exact values as float32
    layers: int = LAYERS
    files: list[Path] = field(default_factory=list)

    def __str__(self) -> str:
        return str(self.path)


def write_quantized(
    path: Path, tensors: Mapping[str, tuple], quant: Mapping | None, layers: int = LAYERS
) -> Path:
    """A quantized model folder: ``tensors`` (dtype, shape, bytes) as they are, and a
    llama ``config.json`` carrying ``quant`` as its ``quantization_config`` (none if None)."""
    path.mkdir(parents=True)
    write_safetensors(path / "model.safetensors", dict(tensors), {"format": "pt"})
    cfg = model_config(layers, "BF16")
    if quant is not None:
        cfg["quantization_config"] = dict(quant)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def write_model(
    path: os.PathLike | str,
    tensors_f32: Mapping[str, np.ndarray],
    dtype: str = "bf16",
    shards: int = 1,
    layers: int | None = None,
    config: Mapping | None = None,
    extras: bool = True,
) -> Model:
    """Write a model folder: ``config.json`` + ``model.safetensors`` or K shards + index.

    ``tensors_f32`` are rounded (RNE) to ``dtype`` when written; the returned
    :class:`Model` holds the exact stored values as float32.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtype = SHORT[dtype]
    names = list(tensors_f32)
    encoded = {n: encode(tensors_f32[n], dtype) for n in names}
    exact = {n: ref.to_f32(ref.decode(raw, d, s), d) for n, (d, s, raw) in encoded.items()}
    if layers is None:
        idx = [ref.layer_index(n) for n in names]
        layers = max([i for i in idx if i is not None], default=-1) + 1
    files: list[Path] = []
    meta = {"format": "pt"}
    if shards <= 1:
        f = path / "model.safetensors"
        write_safetensors(f, encoded, meta)
        files.append(f)
    else:
        groups = np.array_split(np.arange(len(names)), shards)
        weight_map = {}
        total = 0
        for k, group in enumerate(groups, start=1):
            fname = f"model-{k:05d}-of-{shards:05d}.safetensors"
            part = {names[i]: encoded[names[i]] for i in group}
            write_safetensors(path / fname, part, meta)
            files.append(path / fname)
            for n, (_d, _s, raw) in part.items():
                weight_map[n] = fname
                total += len(raw)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    cfg = dict(config) if config is not None else model_config(layers, dtype)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    if extras:
        for fname, content in TOKENIZER_FILES.items():
            (path / fname).write_text(json.dumps(content))
        (path / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))
    return Model(path=path, dtype=dtype, tensors=exact, layers=layers, files=files)


def make_llama(
    path: os.PathLike | str,
    dtype: str = "bf16",
    seed: int = 0,
    shards: int = 1,
    layers: int = LAYERS,
    **shape_kw,
) -> Model:
    """A small random llama-like model folder."""
    shapes = llama_shapes(layers=layers, **shape_kw)
    return write_model(path, random_tensors(shapes, dtype, seed), dtype, shards, layers)


# --------------------------------------------------------------------------- reading


def read_safetensors_raw(path: os.PathLike | str) -> tuple[dict, dict[str, tuple]]:
    """Parse a safetensors file by hand: ``(metadata, {name: (dtype, shape, raw)})``."""
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    meta = header.pop("__metadata__", {})
    body = data[8 + n :]
    out = {}
    for name, info in header.items():
        a, b = info["data_offsets"]
        assert 0 <= a <= b <= len(body), f"{path}: {name} offsets {a}..{b} outside data"
        out[name] = (info["dtype"], tuple(info["shape"]), body[a:b])
    return meta, out


@dataclass
class Output:
    """A merge output folder, loaded."""

    path: Path
    files: list[Path]
    raw: dict[str, tuple[str, tuple[int, ...], bytes]]  # name -> (dtype, shape, bytes)
    metadata: dict[Path, dict]
    index: dict | None

    def dtype(self, name: str) -> str:
        return self.raw[name][0]

    def array(self, name: str) -> np.ndarray:
        """Stored array (bf16 as uint16 bit patterns)."""
        d, s, raw = self.raw[name]
        return ref.decode(raw, d, s)

    def f32(self, name: str) -> np.ndarray:
        d, s, raw = self.raw[name]
        return ref.to_f32(ref.decode(raw, d, s), d)

    def config(self) -> dict:
        return json.loads((self.path / "config.json").read_text())


def read_output(path: os.PathLike | str) -> Output:
    """Load every tensor of a model folder (single file or sharded)."""
    path = Path(path)
    index_path = path / "model.safetensors.index.json"
    index = None
    if index_path.exists():
        index = json.loads(index_path.read_text())
        files = [path / f for f in sorted(set(index["weight_map"].values()))]
    else:
        files = [path / "model.safetensors"]
    raw: dict = {}
    metadata: dict = {}
    for f in files:
        meta, tensors = read_safetensors_raw(f)
        metadata[f] = meta
        for name, t in tensors.items():
            assert name not in raw, f"tensor {name} stored twice ({f})"
            raw[name] = t
    return Output(path=path, files=files, raw=raw, metadata=metadata, index=index)


# --------------------------------------------------------------------------- comparing


def describe_mismatch(name: str, got: np.ndarray, want: np.ndarray, dtype: str) -> str:
    """A readable account of where two same-dtype storage arrays differ."""
    g = np.ascontiguousarray(got).reshape(-1)
    w = np.ascontiguousarray(want).reshape(-1)
    ubits = {"F32": np.int64, "F16": np.int32, "BF16": np.int32}[dtype]
    gi = g.view(np.uint32 if dtype == "F32" else np.uint16).astype(ubits)
    wi = w.view(np.uint32 if dtype == "F32" else np.uint16).astype(ubits)
    bad = np.nonzero(gi != wi)[0]
    gf = ref.to_f32(g, dtype)
    wf = ref.to_f32(w, dtype)
    lines = [f"{name} ({dtype}): {bad.size} of {g.size} elements differ"]
    diff = np.abs(gi[bad] - wi[bad])
    lines.append(f"  max |bit-pattern difference| (ulps, same sign): {diff.max()}")
    for j in bad[:5]:
        lines.append(f"  [{j}] got {gf[j]!r} (0x{int(gi[j]):x}) want {wf[j]!r} (0x{int(wi[j]):x})")
    return "\n".join(lines)


def assert_tensor_equal(out: Output, name: str, expected_f32: np.ndarray, dtype: str) -> None:
    """The output tensor has ``dtype``, the expected shape, and bit-identical values."""
    assert name in out.raw, f"{name} missing from output"
    got_dtype, got_shape, _ = out.raw[name]
    assert got_dtype == dtype, f"{name}: dtype {got_dtype}, expected {dtype}"
    assert got_shape == tuple(expected_f32.shape), f"{name}: shape {got_shape}"
    got = out.array(name)
    want = ref.from_f32(expected_f32, dtype)
    if got.tobytes() != want.tobytes():
        raise AssertionError(describe_mismatch(name, got, want, dtype))


def file_hashes(*paths: os.PathLike | str) -> dict[str, str]:
    """sha256 of every file under the given files/folders."""
    out = {}
    for p in paths:
        p = Path(p)
        items = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
        for q in items:
            out[str(q)] = hashlib.sha256(q.read_bytes()).hexdigest()
    return out


# --------------------------------------------------------------------------- CLI


def mergex_cmd() -> list[str]:
    """The ``mergex`` console script of this interpreter's environment."""
    script = Path(sys.executable).parent / "mergex"
    if script.exists():
        return [str(script)]
    found = shutil.which("mergex")
    if found:
        return [found]
    return [sys.executable, "-c", "from mergex.cli import app; app()"]


def run_cli(args: Iterable[str], cwd: os.PathLike | str | None = None, timeout: float = 300):
    env = dict(os.environ)
    env.setdefault("NO_COLOR", "1")
    env["COLUMNS"] = "200"
    return subprocess.run(
        [*mergex_cmd(), *map(str, args)],
        check=False,
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


def error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, f"expected exactly one line on stderr, got:\n{stderr}"
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def dump_yaml(cfg: Mapping, path: os.PathLike | str) -> Path:
    import yaml

    path = Path(path)
    path.write_text(yaml.safe_dump(_plain(cfg), sort_keys=False))
    return path


def _plain(x):
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    if isinstance(x, os.PathLike):
        return str(x)
    if isinstance(x, Model):
        return str(x.path)
    return x


PEFT_PREFIX = "base_model.model."


def write_adapter(
    path: os.PathLike | str,
    factors: Mapping[str, tuple[np.ndarray, np.ndarray]],
    config: Mapping,
    saved: Mapping[str, np.ndarray] | None = None,
    embeddings: Sequence[str] = (),
    dtype: str = "F32",
    adapter_name: str = "",
) -> Path:
    """A PEFT LoRA adapter folder: ``factors`` maps a module name to its ``(A, B)``, saved
    under PEFT's names (``base_model.model.<module>.lora_A[.<adapter name>].weight``, or
    ``lora_embedding_A`` for the modules in ``embeddings``); ``saved`` are full tensors
    (``modules_to_save``) by their plain name; ``config`` is ``adapter_config.json``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, tuple[str, tuple[int, ...], bytes]] = {}
    name = f".{adapter_name}" if adapter_name else ""
    for module, (a, b) in factors.items():
        for ab, x in (("A", a), ("B", b)):
            key = f"lora_embedding_{ab}{name}" if module in embeddings else f"lora_{ab}{name}.weight"
            tensors[f"{PEFT_PREFIX}{module}.{key}"] = encode(np.asarray(x, np.float32), dtype)
    for tname, x in (saved or {}).items():
        tensors[PEFT_PREFIX + tname] = encode(np.asarray(x, np.float32), dtype)
    write_safetensors(path / "adapter_model.safetensors", tensors, {"format": "pt"})
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": sorted(factors), **config}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


def tiny_llama_config(transformers, **extra):
    """A tiny transformers Llama config, for round trips through transformers and peft."""
    kw = {
        "vocab_size": 96,
        "hidden_size": 32,
        "intermediate_size": 40,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "tie_word_embeddings": False,
        **extra,
    }
    return transformers.LlamaConfig(**kw)
