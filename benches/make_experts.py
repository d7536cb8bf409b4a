r"""Generate synthetic "experts" with real LLM architecture shapes, for benchmarks.

Writes ``OUT/base`` and ``OUT/expert_0`` … ``OUT/expert_{K-1}``: Hugging Face style
model folders (``config.json`` plus safetensors shards) with the tensor names and shapes
of a Qwen2 model. The base holds random bf16 weights; each expert is the base plus a
small random delta, so task-vector merges have something real to do.

The safetensors format is written directly (no torch, no safetensors package) and the
data is streamed block by block, so memory stays near a few blocks whatever the model
size. With ``--sparse`` only the headers are written and each file is extended with
``truncate``: the data reads as zeros and takes no disk, which is enough to simulate a
72B merge's I/O and memory profile on a small disk.

Example::

    python benches/make_experts.py --preset qwen2.5-0.5b --layers 2 --experts 2 \
        --out /tmp/set
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import numpy.typing as npt

BASE_STD = 0.02
DELTA_STD = 0.002
DEFAULT_BLOCK = 16 * 1024 * 1024  # elements per generated block (64 MiB as f32)
MARKER = "mergex_bench_set.json"


@dataclass(frozen=True)
class Preset:
    """Shapes of one Qwen2-family architecture."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    tie_word_embeddings: bool
    max_position_embeddings: int = 32768
    rope_theta: float = 1000000.0
    rms_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        """Per-head width (Qwen2 derives it from hidden size and head count)."""
        return self.hidden_size // self.num_attention_heads


PRESETS: dict[str, Preset] = {
    "qwen2.5-0.5b": Preset(151936, 896, 4864, 24, 14, 2, tie_word_embeddings=True),
    "qwen2.5-1.5b": Preset(151936, 1536, 8960, 28, 12, 2, tie_word_embeddings=True),
    "qwen2.5-72b": Preset(
        152064,
        8192,
        29568,
        80,
        64,
        8,
        tie_word_embeddings=False,
        max_position_embeddings=131072,
    ),
}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor to write: its name, shape and how its values are drawn."""

    name: str
    shape: tuple[int, ...]
    # Norm weights sit around 1.0 in real checkpoints; everything else around 0.
    mean: float = 0.0

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Size in bytes as bf16."""
        return 2 * self.numel


def tensor_specs(preset: Preset, layers: int) -> list[TensorSpec]:
    """List the tensors of a Qwen2 model of ``layers`` layers, in checkpoint order."""
    h, inter = preset.hidden_size, preset.intermediate_size
    q_rows = preset.num_attention_heads * preset.head_dim
    kv_rows = preset.num_key_value_heads * preset.head_dim
    specs = [TensorSpec("model.embed_tokens.weight", (preset.vocab_size, h))]
    for i in range(layers):
        p = f"model.layers.{i}"
        specs += [
            TensorSpec(f"{p}.input_layernorm.weight", (h,), mean=1.0),
            TensorSpec(f"{p}.self_attn.q_proj.weight", (q_rows, h)),
            TensorSpec(f"{p}.self_attn.q_proj.bias", (q_rows,)),
            TensorSpec(f"{p}.self_attn.k_proj.weight", (kv_rows, h)),
            TensorSpec(f"{p}.self_attn.k_proj.bias", (kv_rows,)),
            TensorSpec(f"{p}.self_attn.v_proj.weight", (kv_rows, h)),
            TensorSpec(f"{p}.self_attn.v_proj.bias", (kv_rows,)),
            TensorSpec(f"{p}.self_attn.o_proj.weight", (h, q_rows)),
            TensorSpec(f"{p}.post_attention_layernorm.weight", (h,), mean=1.0),
            TensorSpec(f"{p}.mlp.gate_proj.weight", (inter, h)),
            TensorSpec(f"{p}.mlp.up_proj.weight", (inter, h)),
            TensorSpec(f"{p}.mlp.down_proj.weight", (h, inter)),
        ]
    specs.append(TensorSpec("model.norm.weight", (h,), mean=1.0))
    if not preset.tie_word_embeddings:
        specs.append(TensorSpec("lm_head.weight", (preset.vocab_size, h)))
    return specs


def model_config(preset: Preset, layers: int) -> dict[str, object]:
    """The ``config.json`` of a Qwen2 model with these shapes."""
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_act": "silu",
        "hidden_size": preset.hidden_size,
        "intermediate_size": preset.intermediate_size,
        "num_hidden_layers": layers,
        "num_attention_heads": preset.num_attention_heads,
        "num_key_value_heads": preset.num_key_value_heads,
        "vocab_size": preset.vocab_size,
        "max_position_embeddings": preset.max_position_embeddings,
        "max_window_layers": layers,
        "rms_norm_eps": preset.rms_norm_eps,
        "rope_theta": preset.rope_theta,
        "use_sliding_window": False,
        "sliding_window": preset.max_position_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": BASE_STD,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "tie_word_embeddings": preset.tie_word_embeddings,
        "use_cache": True,
        "torch_dtype": "bfloat16",
    }


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Parse ``"5GB"`` (decimal), ``"4GiB"`` (binary), ``"64K"`` or a byte count."""
    m = _SIZE_RE.match(text)
    if m is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 5GB, 512MiB, 1000000)")
    number, unit, binary = m.groups()
    base = 1024 if binary else 1000
    power = " KMGT".index(unit.upper() or " ")
    return int(float(number) * base**power)


def plan_shards(specs: list[TensorSpec], shard_size: int) -> list[list[TensorSpec]]:
    """Group tensors into shards of at most ``shard_size`` bytes.

    A tensor bigger than ``shard_size`` gets a shard of its own.
    """
    shards: list[list[TensorSpec]] = [[]]
    used = 0
    for spec in specs:
        if shards[-1] and used + spec.nbytes > shard_size:
            shards.append([])
            used = 0
        shards[-1].append(spec)
        used += spec.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    """File names of ``count`` shards, as Hugging Face names them."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def safetensors_header(specs: list[TensorSpec]) -> bytes:
    """Encode a safetensors header: 8-byte length, JSON space-padded to 8 bytes."""
    meta: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        meta[spec.name] = {
            "dtype": "BF16",
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    body = json.dumps(meta, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return len(body).to_bytes(8, "little") + body


class Bf16Writer:
    """Rounds f32 blocks to bf16 (round-to-nearest-even) in reused buffers; writes them.

    Reusing the buffers matters: fresh 64 MiB arrays per block cost more in page
    faults than
    the arithmetic itself.
    """

    def __init__(self, block: int) -> None:
        self._bits = np.empty(block, dtype=np.uint32)
        self._out = np.empty(block, dtype="<u2")

    def convert(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.uint16]:
        """bf16 bit patterns of ``x`` (finite values), a view into the reused buffer."""
        n = x.size
        u = x.view(np.uint32)
        t = self._bits[:n]
        np.right_shift(u, 16, out=t)
        np.bitwise_and(t, 1, out=t)
        t += np.uint32(0x7FFF)
        t += u
        t >>= np.uint32(16)
        out = self._out[:n]
        # After the shift the value fits the low (first, little-endian) half-word.
        np.copyto(out, t.view("<u2")[0::2], casting="unsafe")
        return out

    def write(self, f: BinaryIO, x: npt.NDArray[np.float32]) -> None:
        """Write ``x`` as little-endian bf16."""
        f.write(self.convert(x).data)


def to_bf16(x: npt.NDArray[np.float32]) -> npt.NDArray[np.uint16]:
    """Round f32 to bf16 bit patterns, to nearest even (a fresh array; for tests)."""
    return Bf16Writer(x.size).convert(np.ascontiguousarray(x, dtype=np.float32)).copy()


class DeltaPool:
    """Cheap per-expert deltas: windows into one random pool, offset per expert.

    Drawing fresh noise for every expert and block would cost more normal draws than
    the base itself; a window at a different offset gives each expert different values
    for the same element at the cost of one addition. The window also moves from block
    to block so that neighbouring blocks do not repeat the same deltas at the same
    positions.
    """

    _STRIDE = 7919  # offset between experts' windows (prime, so windows never line up)
    _DRIFT = 1 << 20  # room for the per-block movement
    _STEP = 104729  # per-block movement (prime)

    def __init__(self, rng: np.random.Generator, block: int, experts: int) -> None:
        size = block + experts * self._STRIDE + self._DRIFT
        self._pool = rng.standard_normal(size, dtype=np.float32)
        self._pool *= np.float32(DELTA_STD)
        self._shift = 0

    def next_block(self) -> None:
        """Move the windows on for the next block."""
        self._shift = (self._shift + self._STEP) % self._DRIFT

    def window(self, expert: int, n: int) -> npt.NDArray[np.float32]:
        """The delta of ``expert`` for the current block (a view, no copy)."""
        start = self._shift + expert * self._STRIDE
        return self._pool[start : start + n]


def blocks(numel: int, block: int) -> Iterator[int]:
    """Sizes of the blocks that cover ``numel`` elements."""
    done = 0
    while done < numel:
        n = min(block, numel - done)
        yield n
        done += n


def write_dense_shard(
    files: Sequence[BinaryIO],
    specs: list[TensorSpec],
    rng: np.random.Generator,
    pool: DeltaPool,
    block: int,
    progress: Progress,
) -> None:
    """Write one shard's data into the base file ``files[0]`` and the experts' files."""
    experts = len(files) - 1
    base = np.empty(block, dtype=np.float32)
    work = np.empty(block, dtype=np.float32)
    writer = Bf16Writer(block)
    for spec in specs:
        for n in blocks(spec.numel, block):
            b = base[:n]
            rng.standard_normal(n, dtype=np.float32, out=b)
            b *= np.float32(BASE_STD)
            if spec.mean:
                b += np.float32(spec.mean)
            writer.write(files[0], b)
            pool.next_block()
            for k in range(experts):
                w = work[:n]
                np.add(b, pool.window(k, n), out=w)
                writer.write(files[k + 1], w)
            progress.advance(2 * n * (experts + 1))


class Progress:
    """Reports bytes written: a live line on a terminal, a line per 10% otherwise."""

    def __init__(self, total: int, quiet: bool) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.quiet = quiet
        self.start = time.perf_counter()
        self._tty = sys.stdout.isatty()
        self._last = -1

    def advance(self, nbytes: int) -> None:
        """Count ``nbytes`` more as written and print if a new step was reached."""
        self.done += nbytes
        step = 100 * self.done // self.total
        if not self._tty:
            step -= step % 10
        if self.quiet or step == self._last:
            return
        self._last = step
        elapsed = time.perf_counter() - self.start
        rate = self.done / max(elapsed, 1e-9) / 1e9
        line = (
            f"  {step:3d}%  {self.done / 1e9:8.2f} / {self.total / 1e9:.2f} GB"
            f"  {rate:6.2f} GB/s  {elapsed:7.1f} s"
        )
        if self._tty:
            end = "\n" if self.done >= self.total else ""
            print("\r" + line, end=end, flush=True)
        else:
            print(line, flush=True)


@dataclass(frozen=True)
class SetInfo:
    """What was generated; stored as ``mergex_bench_set.json`` in the set folder."""

    preset: str
    layers: int
    experts: int
    seed: int
    sparse: bool
    shard_size: int
    model_bytes: int
    tensors: int


def generate(
    out: Path,
    preset_name: str,
    *,
    layers: int | None = None,
    experts: int = 8,
    seed: int = 0,
    shard_size: int = 5 * 10**9,
    sparse: bool = False,
    block: int = DEFAULT_BLOCK,
    force: bool = False,
    quiet: bool = False,
) -> SetInfo:
    """Write ``out/base`` and ``out/expert_{k}`` model folders; return what was made.

    Args:
        out: Folder of the set (created).
        preset_name: A key of ``PRESETS``.
        layers: Cut the model to this many layers (default: the preset's count).
        experts: Number of expert folders.
        seed: Seed of numpy's default generator.
        shard_size: Largest shard in bytes; more than one shard adds an index file.
        sparse: Write headers only and extend files with holes (all-zero data, no disk).
        block: Elements generated at a time (memory is a few blocks of f32).
        force: Replace existing model folders in ``out``.
        quiet: No progress output.
    """
    preset = PRESETS[preset_name]
    n_layers = preset.num_hidden_layers if layers is None else layers
    if not 0 <= n_layers <= preset.num_hidden_layers:
        raise ValueError(f"--layers must be 0..{preset.num_hidden_layers} for {preset_name}")
    if experts < 1:
        raise ValueError("--experts must be at least 1")
    specs = tensor_specs(preset, n_layers)
    shards = plan_shards(specs, shard_size)
    names = shard_names(len(shards))
    model_bytes = sum(s.nbytes for s in specs)
    dirs = [out / "base"] + [out / f"expert_{k}" for k in range(experts)]

    if force:
        # Experts left over from a larger earlier set would be picked up by bench.py.
        for stale in out.glob("expert_*"):
            if stale.is_dir() and stale not in dirs:
                shutil.rmtree(stale)
        (out / MARKER).unlink(missing_ok=True)
    for d in dirs:
        if d.exists():
            if not force:
                raise FileExistsError(f"{d} exists (use --force to replace it)")
            shutil.rmtree(d)
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps(model_config(preset, n_layers), indent=2) + "\n")
        if len(shards) > 1:
            weight_map = {s.name: name for name, shard in zip(names, shards, strict=True) for s in shard}
            index = {"metadata": {"total_size": model_bytes}, "weight_map": weight_map}
            (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    if not quiet:
        kind = "sparse" if sparse else "dense"
        print(
            f"{preset_name}: {n_layers} layers, {len(specs)} tensors,"
            f" {model_bytes / 1e9:.3f} GB per model in {len(shards)} shard(s);"
            f" writing base + {experts} experts ({kind})"
            f" into {out}"
        )
    rng = np.random.default_rng(seed)
    pool = DeltaPool(rng, block, experts) if not sparse else None
    progress = Progress(model_bytes * len(dirs), quiet)
    for name, shard in zip(names, shards, strict=True):
        header = safetensors_header(shard)
        data_bytes = sum(s.nbytes for s in shard)
        if pool is None:
            for d in dirs:
                with open(d / name, "wb") as f:
                    f.write(header)
                    f.truncate(len(header) + data_bytes)
            progress.advance(data_bytes * len(dirs))
            continue
        files = [open(d / name, "wb") for d in dirs]  # noqa: SIM115 - closed below
        try:
            for f in files:
                f.write(header)
            write_dense_shard(files, shard, rng, pool, block, progress)
        finally:
            for f in files:
                f.close()

    info = SetInfo(
        preset=preset_name,
        layers=n_layers,
        experts=experts,
        seed=seed,
        sparse=sparse,
        shard_size=shard_size,
        model_bytes=model_bytes,
        tensors=len(specs),
    )
    (out / MARKER).write_text(json.dumps(asdict(info), indent=2) + "\n")
    if not quiet:
        elapsed = time.perf_counter() - progress.start
        print(f"done in {elapsed:.1f} s")
    return info


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = argparse.ArgumentParser(
        description="Write a synthetic base model and K experts with Qwen2 shapes.",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="qwen2.5-0.5b")
    p.add_argument("--layers", type=int, default=None, help="cut to N layers (default: all)")
    p.add_argument("--experts", type=int, default=8, help="number of experts (default 8)")
    p.add_argument("--out", type=Path, required=True, help="folder of the set")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--shard-size",
        type=parse_size,
        default=5 * 10**9,
        help="largest shard (default 5GB)",
    )
    p.add_argument(
        "--sparse",
        action="store_true",
        help="headers only, data as file holes (reads as zeros, takes no disk)",
    )
    p.add_argument(
        "--block",
        type=int,
        default=DEFAULT_BLOCK,
        help=f"elements generated at a time (default {DEFAULT_BLOCK})",
    )
    p.add_argument("--force", action="store_true", help="replace existing model folders")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the generator; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        generate(
            args.out,
            args.preset,
            layers=args.layers,
            experts=args.experts,
            seed=args.seed,
            shard_size=args.shard_size,
            sparse=args.sparse,
            block=args.block,
            force=args.force,
            quiet=args.quiet,
        )
    except (ValueError, FileExistsError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
