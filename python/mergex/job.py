"""The engine job: what the planner hands the Rust engine (and the torch engine), typed. It
mirrors ``rust/mergex-core/src/job.rs`` field for field; :meth:`EngineJob.to_json` is what
the engine parses (it refuses unknown fields, so a field added on one side only fails at
once)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

__all__ = [
    "Companion",
    "Encode",
    "EngineJob",
    "GlobalScale",
    "InputRef",
    "LoraRef",
    "Resume",
    "RowMap",
    "ScaleRef",
    "TensorJob",
]


@dataclass
class GlobalScale:
    """NVFP4's one-value global scale: block scales are divided or multiplied by it."""

    tensor: str
    divide: bool


@dataclass
class ScaleRef:
    """The scale tensor of a quantized weight, which the engine's reader decodes with it."""

    tensor: str
    block: list[int] | None = None
    """Rows and columns of one block; ``None`` for one scale over the whole tensor."""
    packed_fp4: bool = False
    """FP4 codes, two a byte along the last axis."""
    global_scale: GlobalScale | None = None
    int_bits: int | None = None
    """Symmetric integers of this many bits packed in I32 words."""
    weight_shape: str | None = None
    """The tensor holding the weight's shape, which the engine checks."""
    zero_point: str | None = None
    """Asymmetric packed integers' zero points."""
    transposed: bool = False
    """gpt-oss MXFP4: ``tensor`` holds the scales and the input the blocks of the weight's
    transpose."""


@dataclass
class Companion:
    """An output tensor written beside a quantized weight's codes."""

    name: str
    dtype: str
    shape: list[int]


@dataclass
class Encode:
    """How a merged weight is written back quantized in the base's layout (QUANT.md §8)."""

    rule: str
    """How a block's scale is chosen: ``amax``, ``ue8m0``, ``mx``, ``nvfp4``,
    ``nvfp4_modelopt``, ``int`` or ``int_asym``."""
    scale: Companion
    block: list[int] | None = None
    """Rows and columns of one block; ``None`` for one scale over the whole tensor."""
    bits: int | None = None
    """Bits of packed integers."""
    global_scale: Companion | None = None
    fusion: str | None = None
    """Tensors with the same key share the amax of their NVFP4 global scale."""
    zero_point: Companion | None = None
    transposed: bool = False
    """gpt-oss MXFP4: the codes and scales store the weight's transpose."""


@dataclass
class LoraRef:
    """The LoRA factors the reader adds to an input weight: ``W + scale · B·A``."""

    model: int
    """Index into :attr:`EngineJob.models` of the adapter's file."""
    a: str
    b: str
    scale: float
    transposed: bool = False
    """The weight is stored as the transpose of ``B·A`` (fan_in_fan_out, embeddings)."""


@dataclass
class RowMap:
    """Where each row of a vocabulary-indexed input comes from, in the output's order."""

    sources: list[tuple[InputRef, list[int]]]
    """Tensors rows are taken from, with their shapes."""
    runs: list[tuple[int, int, int]]
    """The output rows in runs: ``(rows, source, first row)`` gives the next ``rows`` output
    rows from consecutive rows of ``source`` (-1: zeros)."""


@dataclass
class InputRef:
    """One input tensor of one model."""

    model: int
    """Index into :attr:`EngineJob.models`."""
    tensor: str
    position: int = 0
    """Position of the model among the non-base models in config order (random draws)."""
    params: dict[str, float] = field(default_factory=dict)
    """Per-model parameter values for this tensor, already rounded to f32."""
    scale: ScaleRef | None = None
    lora: LoraRef | None = None
    rows: RowMap | None = None


@dataclass
class TensorJob:
    """One output tensor."""

    name: str
    dtype: str
    shape: list[int]
    inputs: list[InputRef]
    params: dict[str, float] = field(default_factory=dict)
    base: InputRef | None = None
    copy: bool = False
    """Copy the single input byte for byte (plain non-float tensors)."""
    encode: Encode | None = None
    """Write the merged values quantized (``name`` and ``dtype`` are the codes')."""


@dataclass
class Resume:
    """Where a resumable merge records its finished shards, and those already verified."""

    state_file: str
    fingerprint: str
    done: dict[str, str] = field(default_factory=dict)


@dataclass
class EngineJob:
    """A whole merge, fully resolved."""

    method: str
    models: list[str]
    tensors: list[TensorJob]
    seed: int
    ram_budget: int
    threads: int
    shard_size: int
    metadata: dict[str, str] = field(default_factory=dict)
    resume: Resume | None = None
    partial: list[int] = field(default_factory=list)
    """Indices of models that are partial Hub snapshots (only the shards the merge reads)."""
    stages: dict[int, EngineJob] = field(default_factory=dict)
    """Recipe stages fused into this merge, by the index of the model that is their output
    (laid out, not written): their tensors are computed from these jobs as they are read."""

    def to_dict(self) -> dict[str, Any]:
        """The job as the engine's JSON reads it (fields left at their default omitted)."""
        stages = {str(k): v.to_dict() for k, v in self.stages.items()}
        out = asdict(replace(self, stages={}))
        out["stages"] = stages
        if not stages:
            del out["stages"]
        if self.resume is None:
            del out["resume"]
        if not self.partial:
            del out["partial"]
        for t in out["tensors"]:
            if t["base"] is None:
                del t["base"]
            if not t["copy"]:
                del t["copy"]
            if t["encode"] is None:
                del t["encode"]
            else:
                e = t["encode"]
                e["global"] = e.pop("global_scale")
                for k in [k for k, v in e.items() if v is None]:
                    del e[k]
            for r in [*t["inputs"], *([t["base"]] if "base" in t else [])]:
                _drop_none(r)
        return out

    def to_json(self) -> str:
        """The JSON the engine parses."""
        return json.dumps(self.to_dict())

    def fingerprint_part(self) -> dict[str, Any]:
        """What the output depends on: everything but the budget, threads and resume state,
        which never change the bytes."""
        out = self.to_dict()
        for key in ("ram_budget", "threads", "resume"):
            out.pop(key, None)
        return out


def _drop_none(r: dict[str, Any]) -> None:
    """An input's optional parts left out when absent (also in a row map's sources)."""
    for key in ("scale", "lora", "rows"):
        if r[key] is None:
            del r[key]
    if "rows" in r:
        for source, _shape in r["rows"]["sources"]:
            _drop_none(source)
