"""The torch engine's loop: for every output tensor, statistics passes then the output
pass over the same chunks, read by the Rust reader into pinned host buffers, merged on the
device, and written back through the Rust writer at their final offsets.

Reads of the next chunk overlap the merge of the current one (a reader thread fills the
other of two host buffers; the Rust reader releases the GIL), and on a GPU the host-to-
device copy runs on its own CUDA stream.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from .base import Chunk, TensorCtx, as_dict
from .methods import METHODS

# Host memory per chunk element and input: two read buffers (double buffering), the
# device copy (the same memory on the CPU), the method's temporaries (a few times the
# inputs) and the Rust reader's scratch.
_HOST_FACTOR = 6
# Device memory per chunk element and input: the inputs and the method's temporaries.
_DEVICE_FACTOR = 5
# Share of the RAM budget given to chunk buffers.
_WORK_SHARE = 0.75


class Driver:
    def __init__(
        self,
        stream: Any,
        infos: list[dict[str, Any]],
        spec: dict[str, Any],
        *,
        device: str = "cpu",
        gpu_budget: int | None = None,
    ) -> None:
        self.stream = stream
        self.infos = infos
        self.spec = spec
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.ram_budget = int(spec["ram_budget"])
        self.gpu_budget = gpu_budget if gpu_budget is not None else self._default_gpu_budget()
        builder = METHODS.get(spec["method"])
        if builder is None:
            raise ConfigError(f"merge_method {spec['method']}: not available in the torch engine")
        self.builder = builder
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="mergex-read")
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None  # type: ignore[no-untyped-call]
        if not self.cuda:
            # --threads bounds torch's CPU threads as it bounds the Rust engine's.
            torch.set_num_threads(int(spec["threads"]))
        self.stat_seconds: list[float] = []
        self.output_seconds = 0.0

    def _default_gpu_budget(self) -> int:
        if not self.cuda:
            return 1 << 62
        free, _ = torch.cuda.mem_get_info(self.device)
        return int(free * 0.8)

    def chunk_elems(self, info: dict[str, Any]) -> int:
        """Elements per chunk: what the RAM and device budgets allow for all inputs, a whole
        number of the engine's units, never more than the tensor (rounded up to a unit)."""
        unit = int(info["unit"])
        wsize = 8 if info["wide"] else 4
        per_elem = int(info["views"]) * wsize
        host = int(self.ram_budget * _WORK_SHARE) // (per_elem * _HOST_FACTOR)
        dev = self.gpu_budget // (per_elem * _DEVICE_FACTOR)
        numel = int(np.prod(info["shape"], dtype=np.int64)) if info["shape"] else 1
        elems = max(unit, min(host, dev) // unit * unit)
        return min(elems, -(-numel // unit) * unit)

    def run(self) -> dict[str, Any]:
        try:
            for i, info in enumerate(self.infos):
                if info["kept"]:
                    self.stream.end(i)
                    continue
                self.stream.begin(i)
                if info["copy"]:
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
        summary: dict[str, Any] = dict(json.loads(self.stream.close()))
        summary["stat_pass_seconds"] = self.stat_seconds
        summary["output_seconds"] = self.output_seconds
        return summary

    def context(self, i: int, info: dict[str, Any]) -> TensorCtx:
        job = self.spec["tensors"][i]
        shape = tuple(int(s) for s in info["shape"])
        numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
        step = self.chunk_elems(info)
        return TensorCtx(
            index=i,
            name=job["name"],
            shape=shape,
            numel=numel,
            params=as_dict(job.get("params")),
            model_params=[as_dict(r.get("params")) for r in job["inputs"]],
            positions=[int(r.get("position", 0)) for r in job["inputs"]],
            has_base=job.get("base") is not None,
            seed=int(self.spec.get("seed", 0)),
            dtype=torch.float64 if info["wide"] else torch.float32,
            device=self.device,
            ram_budget=self.ram_budget,
            chunks=[(s, min(step, numel - s)) for s in range(0, numel, step)],
        )

    def merge_tensor(self, i: int, info: dict[str, Any]) -> None:
        ctx = self.context(i, info)
        merger = self.builder(ctx)
        sample = merger.sample_ranges()
        if sample:
            for x in self.chunks(i, replace(ctx, chunks=sample)):
                merger.sample_chunk(x)
            merger.end_sample()
        npass = 0
        while merger.wants_pass():
            clock = time.perf_counter()
            for x in self.chunks(i, ctx):
                merger.stat_chunk(x)
            merger.end_pass()
            if len(self.stat_seconds) <= npass:
                self.stat_seconds.append(0.0)
            self.stat_seconds[npass] += time.perf_counter() - clock
            npass += 1
        clock = time.perf_counter()
        for x in self.chunks(i, ctx):
            out = merger.merge_chunk(x)
            host = out.detach().to("cpu", copy=False).contiguous().numpy()
            self.stream.write(i, x.start, host)
        self.output_seconds += time.perf_counter() - clock

    def chunks(self, i: int, ctx: TensorCtx) -> Iterator[Chunk]:
        """Yield every chunk of tensor ``i``, reading the next while the current is used."""
        views = int(self.infos[i]["views"])
        size = max((n for _, n in ctx.chunks), default=0)
        bufs = [torch.empty(views * size, dtype=ctx.dtype, pin_memory=self.cuda) for _ in range(2)]
        copied: list[torch.cuda.Event | None] = [None, None]

        def read(k: int) -> torch.Tensor:
            start, n = ctx.chunks[k]
            host = bufs[k % 2][: views * n]
            self.stream.read(i, start, n, host.numpy())
            return host.view(views, n)

        pending: Future[torch.Tensor] | None = self.reader.submit(read, 0) if ctx.chunks else None
        for k, (start, _) in enumerate(ctx.chunks):
            assert pending is not None
            host = pending.result()
            if k + 1 < len(ctx.chunks):
                # The other buffer is free once its device copy (chunk k-1) has finished.
                event = copied[(k + 1) % 2]
                if event is not None:
                    event.synchronize()
                pending = self.reader.submit(read, k + 1)
            if self.copy_stream is not None:
                with torch.cuda.stream(self.copy_stream):
                    data = host.to(self.device, non_blocking=True)
                    copied[k % 2] = self.copy_stream.record_event()
                compute = torch.cuda.current_stream(self.device)
                compute.wait_stream(self.copy_stream)
                # The copy's memory belongs to the copy stream's pool: without this, freeing it
                # after the chunk could hand it to the next copy while kernels still read it.
                data.record_stream(compute)
            else:
                data = host
            base, models = (data[0], data[1:]) if ctx.has_base else (None, data)
            yield Chunk(start=start, base=base, models=models)
