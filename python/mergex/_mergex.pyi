"""Type stubs of the Rust extension (checked against it by mypy.stubtest)."""

from typing import Any, final

from typing_extensions import Buffer

__all__ = [
    "DEFAULT_SHARD_SIZE",
    "MAX_THREADS",
    "MIN_RAM_BUDGET",
    "ChunkReader",
    "MergeJob",
    "Method",
    "MethodParam",
    "PlanSummary",
    "RunSummary",
    "Stream",
    "Sweep",
    "TensorControl",
    "TensorInfo",
    "__version__",
    "bytes_read",
    "checksum",
    "inspect",
    "methods",
]

__version__: str
MAX_THREADS: int
MIN_RAM_BUDGET: int
DEFAULT_SHARD_SIZE: int

@final
class MergeJob:
    """A validated merge job: inputs opened, output laid out."""

    def __new__(cls, job_json: str) -> MergeJob: ...
    def plan(self) -> PlanSummary: ...
    def run(self, out_dir: str) -> RunSummary: ...
    def tensors(self) -> list[TensorInfo]: ...
    def open_stream(self, out_dir: str) -> Stream: ...
    def open_reader(self) -> ChunkReader: ...
    def write_layout(self, out_dir: str) -> list[str]:
        """Lay the output out in ``out_dir`` without writing its tensors (a fused stage)."""
    def tensor_control(self, t: int, chunk: int) -> TensorControl:
        """The method of output tensor ``t``, for an engine that cuts it into chunks of
        ``chunk`` elements and computes the kernels the method describes."""
    def progress(self) -> tuple[int, int, int, int]: ...
    def cancel(self) -> None: ...

@final
class Sweep:
    """Several merges of the same inputs run together (``mergex sweep``)."""

    def __new__(cls, members: list[MergeJob]) -> Sweep: ...
    def run(self, groups: list[list[int]], dirs: list[str]) -> list[RunSummary]:
        """Run each group (member indices reading the same inputs) into its members'
        folders; the summaries in member order."""
    def planned_bytes(self) -> int:
        """Input bytes the members read together (one group), over all passes."""
    def progress(self) -> tuple[int, int, int, int]: ...
    def cancel(self) -> None: ...

@final
class TensorControl:
    """One output tensor's method, driven by another engine: the engine keeps its passes,
    selections, cuts and solves; ``kernel`` describes a chunk's work in the coming stage
    (``rust/mergex-core/src/methods/kernel.rs``), and the statistics come back through
    ``end_sample`` and ``end_pass``."""

    def sample_ranges(self) -> list[tuple[int, int]]: ...
    def wants_pass(self) -> bool: ...
    def kernel(self, stage_name: str) -> dict[str, Any]:
        """The chunk kernel of the coming stage (``sample``, ``pass`` or ``output``)."""
    def end_sample(self, partials: dict[str, Any]) -> None: ...
    def end_pass(self, partials: dict[str, Any]) -> None:
        """Take a pass's statistics: ``sums``, ``hists``, ``items``, ``packed``, ``counts``
        (per slot) and ``overflow`` (slots)."""
    def row_solve(self, grams: Buffer, k: int) -> list[list[float]]:
        """Per row, its coefficients from its k-by-k Gram matrix (float64, contiguous)."""

@final
class ChunkReader:
    """Reads the inputs' chunks of a merge job, with no output (``extract-lora``)."""

    def read(self, t: int, start: int, len: int, out: Buffer, count: bool = True) -> None:
        """As :meth:`Stream.read`."""

@final
class Stream:
    """Chunks read and written through the engine, merged elsewhere (the torch path)."""

    def begin(self, t: int) -> None: ...
    def read(self, t: int, start: int, len: int, out: Buffer, count: bool = True) -> None:
        """Copy the stored bytes of elements [start, start+len) of every input of tensor t
        (the base first) into the writable byte buffer out (views * len * slot bytes),
        undecoded: input k at byte k * len * slot, in its own dtype (``dtypes`` and
        ``slot`` of ``MergeJob.tensors``). ``count=False`` leaves the bytes out of the
        progress (a method's sample)."""
    def write(self, t: int, start: int, values: Buffer) -> None:
        """Round merged values (a contiguous float32 or float64 buffer) to the output dtype
        (or quantize them) and write them from element start of tensor t."""
    def observe(self, t: int, start: int, values: Buffer) -> None:
        """Fold merged values of tensor t into the amax of its ``amax_key``."""
    def passes(self, t: int, ran: int) -> None:
        """Tensor t took ``ran`` statistics passes: the progress total follows."""
    def copy(self, t: int) -> None: ...
    def end(self, t: int) -> None: ...
    def close(self) -> RunSummary: ...

def inspect(path: str, partial: bool = False) -> list[tuple[str, str, list[int], str, int]]:
    """Every tensor of a checkpoint: name, dtype, shape, file, bytes. ``partial``: the shards
    of an index that are not in the folder are left out (a partial Hub download)."""

def bytes_read() -> int:
    """The bytes of tensor data this process has read from input files so far."""

def checksum(path: str) -> str: ...

@final
class MethodParam:
    """One parameter of a method, as its Rust file declares it."""

    @property
    def name(self) -> str: ...
    @property
    def per_model(self) -> bool: ...
    @property
    def kind(self) -> str: ...
    @property
    def required(self) -> bool: ...
    @property
    def default(self) -> float | None: ...
    @property
    def min(self) -> float | None: ...
    @property
    def max(self) -> float | None: ...
    @property
    def doc(self) -> str: ...

@final
class Method:
    """One registered method, as its Rust file declares it."""

    @property
    def name(self) -> str: ...
    @property
    def summary(self) -> str: ...
    @property
    def base(self) -> str: ...
    @property
    def min_models(self) -> int: ...
    @property
    def max_models(self) -> int | None: ...
    @property
    def models_words(self) -> str: ...
    @property
    def params(self) -> list[MethodParam]: ...
    @property
    def passes_min(self) -> int: ...
    @property
    def passes_max(self) -> int: ...
    @property
    def passes_note(self) -> str: ...

def methods() -> list[Method]: ...

@final
class PlanSummary:
    """What a merge will do: bytes, passes, shards and peak memory."""

    @property
    def method(self) -> str: ...
    @property
    def tensors(self) -> int: ...
    @property
    def bytes_read(self) -> int: ...
    @property
    def input_bytes(self) -> int: ...
    @property
    def bytes_written(self) -> int: ...
    @property
    def threads(self) -> int: ...
    @property
    def ram_budget(self) -> int: ...
    @property
    def max_chunk_elems(self) -> int: ...
    @property
    def passes(self) -> dict[int, int]: ...
    @property
    def shards(self) -> list[tuple[str, int, int]]: ...
    @property
    def peak_memory(self) -> int: ...

@final
class RunSummary:
    """What a finished run wrote, read and how its time went."""

    @property
    def files(self) -> list[str]: ...
    @property
    def bytes_read(self) -> int: ...
    @property
    def bytes_written(self) -> int: ...
    @property
    def tensors(self) -> int: ...
    @property
    def sample_seconds(self) -> float: ...
    @property
    def stat_pass_seconds(self) -> list[float]: ...
    @property
    def output_seconds(self) -> float: ...
    @property
    def checksums(self) -> dict[str, str]:
        """The checksum of each output file written, by name (as :func:`checksum`)."""
    @property
    def kernels(self) -> str: ...
    def with_timings(
        self, sample_seconds: float, stat_pass_seconds: list[float], output_seconds: float, kernels: str
    ) -> RunSummary: ...

@final
class TensorInfo:
    """One output tensor as the engine prepared it."""

    @property
    def name(self) -> str: ...
    @property
    def shape(self) -> list[int]: ...
    @property
    def dtype(self) -> str: ...
    @property
    def copy(self) -> bool: ...
    @property
    def wide(self) -> bool: ...
    @property
    def chunk(self) -> int: ...
    @property
    def unit(self) -> int: ...
    @property
    def passes(self) -> int: ...
    @property
    def views(self) -> int: ...
    @property
    def dtypes(self) -> list[str]: ...
    @property
    def slot(self) -> int: ...
    @property
    def amax_key(self) -> str | None:
        """Quantized outputs whose scales need the merged amax of every tensor with this
        key first: ``Stream.observe`` them all before writing any."""
    @property
    def kept(self) -> bool: ...
