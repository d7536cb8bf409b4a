"""The torch engine's loop: for every output tensor, statistics passes then the output
pass over the same chunks, read by the Rust reader into pinned host buffers, merged on the
device, and written back through the Rust writer at their final offsets.

The Rust reader copies the inputs' stored bytes as they are (bf16 inputs move half the
bytes of f32 across the bus); they are decoded on the device, where widening bf16, f16,
f8 and f32 to float32 or float64 is exact, as the Rust engine's own decoding is. Reads of
the next chunk overlap the merge of the current one (a reader thread fills the other of
two host buffers; the Rust reader releases the GIL and reads the inputs in parallel), and
on a GPU the host-to-device copy runs on its own CUDA stream.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import ConfigError
from .kernels import Chunk, Importance, Output, Partials, Stats

if TYPE_CHECKING:
    from .._mergex import MergeJob, RunSummary, TensorControl, TensorInfo
    from ..job import EngineJob

# Host memory per chunk element and input: two raw read buffers (double buffering, at
# most the working width), the decoded values (on the device; on the CPU, a host buffer)
# and the method's temporaries (a few times the inputs).
_HOST_FACTOR = 6
# Device memory per chunk element and input: the inputs and the method's temporaries.
_DEVICE_FACTOR = 5
# Share of the RAM budget given to chunk buffers.
_WORK_SHARE = 0.75
# The torch dtype of each stored dtype the engine merges (`dtypes` of the tensor infos).
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
# Host buffers kept by the driver: the two raw read buffers, the decoded chunk (CPU) and
# the merged values copied back from the GPU.
_RAW, _DECODED, _MERGED = 0, 2, 3


class Driver:
    def __init__(
        self,
        job: MergeJob,
        stream: Any,
        infos: list[TensorInfo],
        spec: EngineJob,
        *,
        device: str = "cpu",
        gpu_budget: int | None = None,
    ) -> None:
        self.job = job
        self.stream = stream
        self.infos = infos
        self.spec = spec
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.ram_budget = spec.ram_budget
        self.gpu_budget = gpu_budget if gpu_budget is not None else self._default_gpu_budget()
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="mergex-read")
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None  # type: ignore[no-untyped-call]
        self.host: list[torch.Tensor | None] = [None] * 4
        # Per raw buffer: its last host-to-device copy, which must finish before it is refilled.
        self.copied: list[torch.cuda.Event | None] = [None, None]
        if not self.cuda:
            # --threads bounds torch's CPU threads as it bounds the Rust engine's.
            torch.set_num_threads(spec.threads)
        self.sample_seconds = 0.0
        self.stat_seconds: list[float] = []
        self.output_seconds = 0.0

    def _default_gpu_budget(self) -> int:
        if not self.cuda:
            return 1 << 62
        free, _ = torch.cuda.mem_get_info(self.device)
        return int(free * 0.8)

    def chunk_elems(self, info: TensorInfo) -> int:
        """Elements per chunk: what the RAM and device budgets allow for all inputs, a whole
        number of the engine's units, never more than the tensor (rounded up to a unit)."""
        unit = int(info.unit)
        wsize = 8 if info.wide else 4
        per_elem = int(info.views) * wsize
        host = int(self.ram_budget * _WORK_SHARE) // (per_elem * _HOST_FACTOR)
        dev = self.gpu_budget // (per_elem * _DEVICE_FACTOR)
        numel = int(np.prod(info.shape, dtype=np.int64)) if info.shape else 1
        elems = max(unit, min(host, dev) // unit * unit)
        return min(elems, -(-numel // unit) * unit)

    def run(self) -> RunSummary:
        try:
            # Quantized outputs whose scales need the merged amax of their tensor or fusion
            # group: every member is merged once for it first (QUANT.md §7).
            done: set[str] = set()
            for info in self.infos:
                key = info.amax_key
                if key is None or key in done or info.kept:
                    continue
                done.add(key)
                for j, member in enumerate(self.infos):
                    if member.amax_key == key:
                        self.merge_tensor(j, member, observe=True)
            for i, info in enumerate(self.infos):
                if info.kept:
                    self.stream.end(i)
                    continue
                self.stream.begin(i)
                if info.copy:
                    clock = time.perf_counter()
                    self.stream.copy(i)
                    self.output_seconds += time.perf_counter() - clock
                else:
                    self.merge_tensor(i, info)
                self.stream.end(i)
        except torch.OutOfMemoryError as e:
            raise ConfigError(
                f"the GPU ran out of memory ({str(e).splitlines()[0]}); lower --gpu-budget "
                f"(now {self.gpu_budget} bytes) or --ram-budget"
            ) from None
        finally:
            self.reader.shutdown(wait=True)
        summary: RunSummary = self.stream.close().with_timings(
            self.sample_seconds, self.stat_seconds, self.output_seconds, f"torch ({self.device})"
        )
        return summary

    def merge_tensor(self, i: int, info: TensorInfo, observe: bool = False) -> None:
        """Merge tensor ``i`` and write it (``observe``: only fold it into its amax). The
        engine's :class:`TensorControl` takes every decision; torch runs its kernels."""
        numel = int(np.prod(info.shape, dtype=np.int64)) if info.shape else 1
        step = self.chunk_elems(info)
        chunks = [(s, min(step, numel - s)) for s in range(0, numel, step)]
        dtype = torch.float64 if info.wide else torch.float32
        ctl: TensorControl = self.job.tensor_control(i, step)
        importance = None
        row = self._importance_row(ctl)
        if row is not None:
            importance = Importance(row, numel, self.device)
        sample = [(int(s), int(n)) for s, n in ctl.sample_ranges()]
        if sample:
            clock = time.perf_counter()
            self._stats(i, ctl, "sample", sample, dtype, importance, count=False)
            self.sample_seconds += time.perf_counter() - clock
        npass = 0
        while ctl.wants_pass():
            clock = time.perf_counter()
            self._stats(i, ctl, "pass", chunks, dtype, importance)
            if len(self.stat_seconds) <= npass:
                self.stat_seconds.append(0.0)
            self.stat_seconds[npass] += time.perf_counter() - clock
            npass += 1
        self.stream.passes(i, npass)
        clock = time.perf_counter()
        output = Output(ctl.kernel("output"), ctl.row_solve)
        output.importance = importance
        take = self.stream.observe if observe else self.stream.write
        for x in self.chunks(i, chunks, dtype):
            out = output(x).detach()
            take(i, x.start, self.to_host(out).numpy())
        self.output_seconds += time.perf_counter() - clock

    @staticmethod
    def _importance_row(ctl: TensorControl) -> int | None:
        """The row length of arcee_fusion's importance, when the tensor's passes use it."""
        if not ctl.wants_pass():
            return None
        vectors = ctl.kernel("pass").get("vectors")
        return int(vectors["importance"]["row"]) if isinstance(vectors, dict) else None

    def _stats(
        self,
        i: int,
        ctl: TensorControl,
        stage: str,
        chunks: list[tuple[int, int]],
        dtype: torch.dtype,
        importance: Importance | None,
        count: bool = True,
    ) -> None:
        """One sample or pass: the kernel over every chunk, the statistics to the engine."""
        partials = Partials(self.device)
        kernel = Stats(ctl.kernel(stage), partials, importance)
        for x in self.chunks(i, chunks, dtype, count):
            kernel.chunk(x)
        (ctl.end_sample if stage == "sample" else ctl.end_pass)(partials.export())

    def buffer(self, k: int, nbytes: int) -> torch.Tensor:
        """Host buffer ``k`` (``_RAW``, ``_RAW + 1``, ``_DECODED``, ``_MERGED``) of ``nbytes``
        bytes, pinned on a GPU. Buffers are kept from tensor to tensor, grown when one needs
        more, so that chunks neither fault in fresh pages nor pin memory again."""
        buf = self.host[k]
        if buf is None or buf.numel() < nbytes:
            self.host[k] = None
            buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.cuda)
            self.host[k] = buf
        return buf[:nbytes]

    def to_host(self, out: torch.Tensor) -> torch.Tensor:
        """The merged values, contiguous in host memory (from a GPU, through a pinned buffer)."""
        if not self.cuda:
            return out.contiguous()
        host = self.buffer(_MERGED, out.numel() * out.element_size()).view(out.dtype)
        host.copy_(out)
        return host

    def input_dtypes(self, i: int) -> list[torch.dtype]:
        """The stored dtype of every input of tensor ``i``, in read order."""
        kinds = []
        for name in self.infos[i].dtypes:
            kind = _DTYPES.get(name)
            if kind is None:
                raise ConfigError(
                    f"tensor {self.spec.tensors[i].name}: the torch engine cannot decode "
                    f"{name} inputs; use the Rust engine"
                )
            kinds.append(kind)
        return kinds

    def chunks(
        self, i: int, chunks: list[tuple[int, int]], dtype: torch.dtype, count: bool = True
    ) -> Iterator[Chunk]:
        """Yield every chunk of tensor ``i``, reading the next while the current is used
        (``count=False``: a sample, left out of the progress).

        A raw chunk holds input ``v``'s stored bytes at byte ``v * n * slot``; each input is
        viewed as its stored dtype and widened into row ``v`` of the decoded chunk."""
        kinds = self.input_dtypes(i)
        slot, views = int(self.infos[i].slot), len(kinds)
        size = max((n for _, n in chunks), default=0)
        for event in self.copied:
            if event is not None:
                event.synchronize()
        self.copied = [None, None]
        bufs = [self.buffer(_RAW + b, views * size * slot) for b in range(2)]

        def read(k: int) -> torch.Tensor:
            start, n = chunks[k]
            host = bufs[k % 2][: views * n * slot]
            self.stream.read(i, start, n, host.numpy(), count)
            return host

        pending: Future[torch.Tensor] | None = self.reader.submit(read, 0) if chunks else None
        for k, (start, n) in enumerate(chunks):
            assert pending is not None
            host = pending.result()
            if k + 1 < len(chunks):
                # The other buffer is free once its device copy (chunk k-1) has finished.
                event = self.copied[(k + 1) % 2]
                if event is not None:
                    event.synchronize()
                pending = self.reader.submit(read, k + 1)
            if self.copy_stream is not None:
                with torch.cuda.stream(self.copy_stream):
                    raw = host.to(self.device, non_blocking=True)
                    self.copied[k % 2] = self.copy_stream.record_event()
                compute = torch.cuda.current_stream(self.device)
                compute.wait_stream(self.copy_stream)
                # The copy's memory belongs to the copy stream's pool: without this, freeing it
                # after the decode could hand it to the next copy while the decode still reads it.
                raw.record_stream(compute)
                data = torch.empty((views, n), dtype=dtype, device=self.device)
            else:
                raw = host
                data = self.buffer(_DECODED, views * n * dtype.itemsize).view(dtype).view(views, n)
            for v, kind in enumerate(kinds):
                at = v * n * slot
                data[v].copy_(raw[at : at + n * kind.itemsize].view(kind))
            base, models = (data[0], data[1:]) if self.spec.tensors[i].base is not None else (None, data)
            yield Chunk(index=k, start=start, base=base, models=models)
