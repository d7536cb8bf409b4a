"""Type stubs of the Rust extension (checked against it by mypy.stubtest)."""

from typing import final

from typing_extensions import Buffer

__all__ = ["MergeJob", "Stream", "__version__", "checksum", "inspect"]

__version__: str

@final
class MergeJob:
    """A validated merge job: inputs opened, output laid out."""

    def __new__(cls, job_json: str) -> MergeJob: ...
    def plan(self) -> str: ...
    def run(self, out_dir: str) -> str: ...
    def tensors(self) -> str: ...
    def open_stream(self, out_dir: str) -> Stream: ...
    def progress(self) -> tuple[int, int, int, int]: ...
    def cancel(self) -> None: ...

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
        and write them from element start of tensor t."""
    def passes(self, t: int, ran: int) -> None:
        """Tensor t took ``ran`` statistics passes: the progress total follows."""
    def copy(self, t: int) -> None: ...
    def end(self, t: int) -> None: ...
    def close(self) -> str: ...

def inspect(path: str) -> list[tuple[str, str, list[int], str, int]]: ...
def checksum(path: str) -> str: ...
