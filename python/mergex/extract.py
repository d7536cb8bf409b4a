"""``mergex extract-lora``: a PEFT LoRA adapter whose ``B·A`` approximates ``MODEL - BASE``
for every 2-D weight, within the RAM budget at any model size (README, "Extracting a LoRA
adapter").

Both models are read through the engine's reader (so quantized, Hub and adapter inputs work
as in a merge), row block by row block. Each weight's factors come from an exact SVD when the
weight fits the budget, else from a randomized range finder over streamed passes
(:mod:`mergex.lowrank`). Weights run concurrently while their planned memory fits the
budget; each one's result depends only on the inputs, the seed and the budget, never on the
thread count."""

from __future__ import annotations

import json
import os
import re
import resource
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import _mergex, hub
from .errors import ConfigError
from .lowrank import Factors, LinAlg, Sketch, exact_bytes, factorize, sketch_bytes
from .output import OutputFolder, check_output_path
from .units import default_ram_budget, default_threads, parse_size

Size = int | str

__all__ = ["ExtractResult", "extract_lora"]

PREFIX = "base_model.model."
# Elements of a row block read for an exact SVD.
EXACT_BLOCK = 1 << 20
# nn.Embedding weights (their adapters are lora_embedding_A/B, and the delta is transposed).
_EMBEDDING = ("embed_tokens", "wte", "wpe", "word_embeddings", "tok_embeddings")
# Other vocabulary-sized weights, extracted only with --embeddings.
_VOCAB = (*_EMBEDDING, "lm_head", "embed_out")
# Bytes the engine's reader hands out, as values, by the view's dtype (also read by vocab).
DECODE: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "BF16": lambda b: (b.view(np.uint16).astype(np.uint32) << 16).view(np.float32),
    "F16": lambda b: b.view(np.float16),
    "F32": lambda b: b.view(np.float32),
    "F64": lambda b: b.view(np.float64),
}


@dataclass
class ExtractResult:
    """What ``extract_lora`` wrote."""

    out_dir: Path
    files: list[Path]
    targets: list[str]
    """Modules given a LoRA adapter."""
    saved: list[str]
    """Tensors saved whole (``modules_to_save`` and biases)."""
    exact: int
    """Weights factorized by an exact SVD (the rest by the randomized range finder)."""
    bytes_read: int
    seconds: float
    peak_rss: int
    warnings: list[str] = field(default_factory=list)


class _Reader:
    """One model's tensors, read through the engine (a one-model plan)."""

    def __init__(self, session: hub.HubSession, ref: str, budget: int, threads: int) -> None:
        from .api import _resolve_hub

        cfg = {"merge_method": "linear", "models": [{"model": ref, "parameters": {"weight": 1.0}}]}
        _cfg, job, _ = _resolve_hub(session, cfg, budget, threads, None, 0, True)
        self.paths = [m.path for m in job.models]
        self.core = _mergex.MergeJob(job.spec.to_json())
        self.reader = self.core.open_reader()
        self.infos = {t.name: (i, t) for i, t in enumerate(self.core.tensors())}
        self.bytes = 0
        self._lock = threading.Lock()

    def read(self, name: str, start: int, n: int) -> np.ndarray:
        """Elements ``[start, start + n)`` of tensor ``name`` as f64."""
        out = np.empty(n)
        self.read_into(name, start, out, np.empty(n * 8, np.uint8))
        return out

    def read_into(self, name: str, start: int, out: np.ndarray, raw: np.ndarray) -> None:
        """Elements ``[start, start + len(out))`` of tensor ``name`` into ``out`` (f64), read
        through ``raw`` (at least 8 bytes an element): no allocation but a temporary of the
        decoded f32 values."""
        i, t = self.infos[name]
        n, size = len(out), int(t.slot)
        buf = raw[: n * size]
        self.reader.read(i, start, n, buf.data)
        out[:] = DECODE[t.dtypes[0]](buf)
        with self._lock:
            self.bytes += n * size


class _Rows:
    """Rows of ``D = MODEL - BASE`` for one weight, read through buffers allocated once (a
    fresh buffer a block would leave the allocator's arenas holding several)."""

    def __init__(self, m: _Reader, b: _Reader, name: str, cols: int, rows: int) -> None:
        self.m, self.b, self.name, self.cols = m, b, name, cols
        self.raw = np.empty(rows * cols * 8, np.uint8)
        self.d, self.other = np.empty(rows * cols), np.empty(rows * cols)

    def __call__(self, r0: int, r1: int) -> np.ndarray:
        n = (r1 - r0) * self.cols
        d, other = self.d[:n], self.other[:n]
        self.m.read_into(self.name, r0 * self.cols, d, self.raw)
        self.b.read_into(self.name, r0 * self.cols, other, self.raw)
        np.subtract(d, other, out=d)
        return d.reshape(r1 - r0, self.cols)


@dataclass
class _Item:
    name: str
    shape: tuple[int, ...]
    kind: str
    """``lora`` (2-D, factorized), or ``whole``: the tensors of a module that are compared
    with the base's and saved whole when they differ (:attr:`group`)."""
    sketch: Sketch | None = None
    memory: int = 0
    group: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)
    forced: bool = False
    """A tensor of the group has no counterpart of its shape in the base: saved whole."""


def _module(name: str) -> str:
    return name.rsplit(".", 1)[0]


def _is_embedding(name: str) -> bool:
    return any(k in _module(name).rsplit(".", 1)[-1] for k in _EMBEDDING)


def _plan(
    model: _Reader, base: _Reader, rank: int, budget: int, selected: Callable[[str], bool], embeddings: bool
) -> tuple[list[_Item], list[str]]:
    items, warnings = [], []
    for name, (_i, t) in model.infos.items():
        if t.copy or not selected(name):
            continue
        shape = tuple(t.shape)
        other = base.infos.get(name)
        if other is None or tuple(other[1].shape) != shape:
            why = "the base lacks it" if other is None else f"the base's shape is {list(other[1].shape)}"
            warnings.append(f"{name}: saved whole ({why})")
            items.append(_Item(name, shape, "whole", forced=True))
            continue
        vocab = any(k in name for k in _VOCAB)
        if len(shape) != 2 or (vocab and not embeddings) or not name.endswith(".weight"):
            items.append(_Item(name, shape, "whole"))
            continue
        rows, cols = shape
        if exact_bytes(rows, cols) <= budget:
            items.append(_Item(name, shape, "lora", None, exact_bytes(rows, cols)))
            continue
        width = min(rank + max(10, rank // 2), rows, cols)
        fixed = sketch_bytes(rows, cols, Sketch(width, 0, 0))
        step = (budget - fixed) // (32 * cols) if budget > fixed else 0
        if step < 1:
            raise ConfigError(
                f"ram_budget: {budget} bytes cannot hold the rank-{rank} factorization of '{name}' "
                f"{list(shape)} (it needs at least {fixed + 32 * cols} bytes)"
            )
        sketch = Sketch(width, 2, min(rows, step))
        items.append(_Item(name, shape, "lora", sketch, sketch_bytes(rows, cols, sketch)))
    return _grouped(items), warnings


def _grouped(items: list[_Item]) -> list[_Item]:
    """The ``whole`` items of each module as one, where its first one was: peft saves (and
    loads) a module to save with all its tensors."""
    out: list[_Item] = []
    groups: dict[str, _Item] = {}
    for it in items:
        if it.kind != "whole":
            out.append(it)
            continue
        g = groups.get(_module(it.name))
        if g is None:
            g = groups[_module(it.name)] = _Item(it.name, it.shape, "whole")
            out.append(g)
        g.group.append((it.name, it.shape))
        g.forced = g.forced or it.forced
    return out


class _Budget:
    """Bytes held by the weights being worked on: a weight starts once its memory fits."""

    def __init__(self, total: int) -> None:
        self.total, self.used = total, 0
        self.cond = threading.Condition()

    def hold(self, n: int) -> None:
        with self.cond:
            while self.used > 0 and self.used + n > self.total:
                self.cond.wait()
            self.used += n

    def free(self, n: int) -> None:
        with self.cond:
            self.used -= n
            self.cond.notify_all()


class _Writer:
    """adapter_model.safetensors, written tensor by tensor: the data goes to a side file as
    results arrive (in plan order), and the header is put in front at the end."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "adapter_model.safetensors"
        self.data_path = folder / ".adapter_model.data"
        self.data = open(self.data_path, "wb")  # noqa: SIM115 - closed in finish()
        self.header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        self.offset = 0

    def begin(self, name: str, dtype: str, shape: tuple[int, ...]) -> None:
        self.header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [self.offset, self.offset]}

    def write(self, name: str, raw: bytes) -> None:
        self.data.write(raw)
        self.offset += len(raw)
        self.header[name]["data_offsets"][1] = self.offset

    def add(self, name: str, x: np.ndarray) -> None:
        self.begin(name, "F32", x.shape)
        self.write(name, np.ascontiguousarray(x, np.float32).tobytes())

    def rename(self, old: str, new: str) -> None:
        self.header[new] = self.header.pop(old)

    def finish(self) -> None:
        self.data.close()
        head = json.dumps(self.header, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)
        with open(self.path, "wb") as out, open(self.data_path, "rb") as data:
            out.write(struct.pack("<Q", len(head)) + head)
            while chunk := data.read(1 << 24):
                out.write(chunk)
        self.data_path.unlink()


def _encode(values: np.ndarray, dtype: str) -> bytes:
    """Values read from a tensor of ``dtype`` (so exactly representable in it), stored."""
    if dtype == "BF16":
        return (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()
    return values.astype({"F16": np.float16, "F64": np.float64}.get(dtype, np.float32)).tobytes()


def _unmap_freed_memory() -> None:
    """Have glibc's malloc hand large blocks (row blocks, SVD workspaces) back to the system
    when freed. By default it raises its mmap threshold after each free, up to 32 MiB, and
    then keeps such blocks in per-thread arenas: with two threads, RSS reached 1.6 times the
    budget. A fixed threshold turns that off."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(ctypes.c_int(-3), ctypes.c_int(256 * 1024))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        return


def _matcher(include: str | None, exclude: str | None) -> Callable[[str], bool]:
    def compile(pattern: str | None, what: str) -> re.Pattern[str] | None:
        try:
            return re.compile(pattern) if pattern else None
        except re.error as e:
            raise ConfigError(f"{what}: invalid regular expression {pattern!r}: {e}") from None

    inc, exc = compile(include, "include"), compile(exclude, "exclude")
    return lambda n: (inc is None or bool(inc.search(n))) and (exc is None or not exc.search(n))


def extract_lora(
    model: str | os.PathLike[str],
    base: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    rank: int,
    include: str | None = None,
    exclude: str | None = None,
    embeddings: bool = False,
    ram_budget: Size | None = None,
    threads: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    overwrite: bool = False,
    offline: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> ExtractResult:
    """Write to ``out`` a PEFT LoRA adapter whose ``B·A`` approximates ``model - base``.

    Every 2-D weight that differs gets rank-``rank`` factors (embeddings and ``lm_head`` only
    with ``embeddings``); other tensors that differ (norms, biases, weights whose shape
    changed) are saved whole, with a warning listing them; identical ones are skipped.

    Args:
        model: The fine-tuned model (a reference as in a merge config).
        base: The model it was tuned from.
        out: The adapter folder to write.
        rank: The adapter's rank.
        include: Only tensors whose name matches this regular expression.
        exclude: Not the tensors whose name matches this regular expression.
        embeddings: Also extract the embedding and ``lm_head`` adapters.
        ram_budget: Memory for the factorizations and reads (default as for a merge).
        threads: Weights worked on at once, and reading threads.
        seed: Seed of the randomized range finder's test matrices.
        device: ``"cpu"`` (numpy) or ``"cuda[:N]"`` (torch.linalg on the GPU).
        overwrite: Replace an existing output folder.
        offline: Hub references come from the cache only.
        progress: Called with (tensors done, tensors total) as tensors finish.

    Raises:
        ConfigError: A bad option, or a budget too small for the rank.
        CheckpointError: An input is malformed, or the models do not match.
    """
    start = time.perf_counter()
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"rank: expected a positive integer, got {rank!r}")
    selected = _matcher(include, exclude)
    budget = parse_size(ram_budget, "ram_budget") if ram_budget is not None else default_ram_budget()
    nthreads = default_threads() if threads is None else threads
    if device != "cpu":
        from . import torch_engine

        device = torch_engine.check_device(device)
    la = LinAlg(device)
    _unmap_freed_memory()
    # Reads of whole tensors (comparisons, saved tensors) take 1/16 of the budget.
    work = budget - budget // 16
    with hub.hub_session(offline) as hs:
        m, b = _Reader(hs, str(model), budget, nthreads), _Reader(hs, str(base), budget, nthreads)
        items, warnings = _plan(m, b, rank, work, selected, embeddings)
        target = check_output_path(Path(out), m.paths + b.paths, overwrite)
        folder = OutputFolder(target, "", False)
        try:
            targets, saved, whole = _run(items, m, b, rank, la, work, nthreads, seed, folder.tmp, progress)
            if not targets and not saved:
                warnings.append("the models are identical on every selected tensor: the adapter is empty")
            _write_config(folder, rank, targets, saved, whole, str(base))
            run = {"model": str(model), "base": str(base), "rank": rank, "include": include}
            run |= {"exclude": exclude, "embeddings": embeddings, "seed": seed}
            _write_run(folder, run)
            folder.commit()
        except BaseException:
            folder.discard()
            raise
    return ExtractResult(
        out_dir=target,
        files=sorted(target.iterdir()),
        targets=sorted(targets),
        saved=sorted(saved),
        exact=sum(
            1 for it in items if it.kind == "lora" and it.sketch is None and _module(it.name) in targets
        ),
        bytes_read=m.bytes + b.bytes,
        seconds=time.perf_counter() - start,
        peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        warnings=warnings + _saved_warning(saved, embeddings),
    )


def _run(
    items: list[_Item],
    m: _Reader,
    b: _Reader,
    rank: int,
    la: LinAlg,
    budget: int,
    threads: int,
    seed: int,
    folder: Path,
    progress: Callable[[int, int], None] | None,
) -> tuple[dict[str, int], list[str], set[str]]:
    """Work through ``items`` (``threads`` at once, within ``budget``), writing results in
    plan order; the modules given factors (with their rank) and the tensors saved whole."""
    from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

    held = _Budget(budget)
    writer = _Writer(folder)
    targets: dict[str, int] = {}
    saved: list[str] = []
    whole: set[str] = set()

    def work(it: _Item) -> Factors | list[bool]:
        held.hold(it.memory)
        try:
            if it.kind == "whole":
                return [it.forced or _differs(m, b, name, shape, step) for name, shape in it.group]
            rows, cols = it.shape
            block = it.sketch.rows if it.sketch else max(1, min(rows, EXACT_BLOCK // max(cols, 1)))
            reader = _Rows(m, b, it.name, cols, block)
            return factorize(reader, (rows, cols), rank, la, it.sketch, seed, it.name, block)
        finally:
            held.free(it.memory)

    # Elements a read of a whole tensor takes at once: within 1/16 of the budget, 32 bytes
    # an element (two models' values in f64 and their stored bytes), for every thread.
    step = max(1024, budget // (15 * 32 * max(1, threads)))
    # One BLAS thread: the same bytes whatever the thread count (threads run weights).
    with threadpool_limits(1), ThreadPoolExecutor(max(1, threads)) as pool:
        futures: list[Future[Factors | list[bool]]] = [pool.submit(work, it) for it in items]
        try:
            for k, (it, fut) in enumerate(zip(items, futures, strict=True)):
                _store(writer, m, it, fut.result(), (targets, saved, whole), step)
                if progress is not None:
                    progress(k + 1, len(items))
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    for name in saved:
        if name.endswith(".bias") and _module(name) in targets:
            # An adapted module's bias lives in its base layer, where peft loads it from.
            writer.rename(PREFIX + name, f"{PREFIX}{_module(name)}.base_layer.bias")
    writer.finish()
    return targets, saved, whole


def _store(
    writer: _Writer,
    m: _Reader,
    it: _Item,
    r: Factors | list[bool],
    out: tuple[dict[str, int], list[str], set[str]],
    step: int,
) -> None:
    """Write an item's result: its factors; or, for a module whose tensors differ (flags in
    ``r``), every tensor of it (a module to save), or only its bias when nothing else
    differs. ``out``: the modules given factors (with their rank), the tensors saved, and the
    modules saved whole."""
    targets, saved, whole = out
    module = _module(it.name)
    if isinstance(r, list):
        biases = [n for (n, _), d in zip(it.group, r, strict=True) if d and n.endswith(".bias")]
        others = any(d and not n.endswith(".bias") for (n, _), d in zip(it.group, r, strict=True))
        names = [n for n, _ in it.group] if others else biases
        if others:
            whole.add(module)
        for name in names:
            _save(writer, m, name, step)
            saved.append(name)
    elif not r.zero:
        if _is_embedding(it.name):
            # peft's embedding delta is (B·A)ᵀ: A is r by vocab, B is dim by r.
            writer.add(f"{PREFIX}{module}.lora_embedding_A", np.ascontiguousarray(r.b.T))
            writer.add(f"{PREFIX}{module}.lora_embedding_B", np.ascontiguousarray(r.a.T))
        else:
            writer.add(f"{PREFIX}{module}.lora_A.weight", r.a)
            writer.add(f"{PREFIX}{module}.lora_B.weight", r.b)
        targets[module] = r.a.shape[0]


def _save(writer: _Writer, m: _Reader, name: str, step: int) -> None:
    """The model's tensor ``name``, streamed into the adapter in its own dtype."""
    key, (_i, t) = PREFIX + name, m.infos[name]
    writer.begin(key, t.dtypes[0], tuple(t.shape))
    n = int(np.prod(t.shape))
    for s in range(0, n, step):
        writer.write(key, _encode(m.read(name, s, min(step, n - s)), t.dtypes[0]))


def _differs(m: _Reader, b: _Reader, name: str, shape: tuple[int, ...], step: int) -> bool:
    """Whether the model's tensor differs from the base's."""
    n = int(np.prod(shape))
    for s in range(0, n, step):
        k = min(step, n - s)
        if not np.array_equal(m.read(name, s, k), b.read(name, s, k)):
            return True
    return False


def _saved_warning(saved: list[str], embeddings: bool) -> list[str]:
    """One warning listing the tensors saved whole (the first few of them by name)."""
    if not saved:
        return []
    names = sorted(saved)
    shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    what = "not 2-D weights" if embeddings else "not 2-D weights, or embeddings (see --embeddings)"
    head = f"{len(names)} tensors differ from the base but get no LoRA factors ({what})"
    return [f"{head}; saved whole: {shown}"]


def _write_run(folder: OutputFolder, run: dict[str, Any]) -> None:
    """mergex_config.yml: how the adapter was extracted (and what marks the folder as mergex's,
    which ``overwrite`` may replace)."""
    import yaml

    text = yaml.safe_dump({"extract_lora": run}, sort_keys=False, allow_unicode=True)
    (folder.tmp / "mergex_config.yml").write_text(
        "# Written by mergex extract-lora.\n" + text, encoding="utf-8"
    )


def _write_config(
    folder: OutputFolder, rank: int, targets: dict[str, int], saved: list[str], whole: set[str], base: str
) -> None:
    """adapter_config.json: rank ``rank`` and scale 1 (``lora_alpha = r``); modules whose
    matrix is narrower get their rank and alpha by pattern. Modules saved whole are
    ``modules_to_save``; a bias saved alone is loaded by peft with ``bias: all``."""
    patterns = {re.escape(mod): r for mod, r in targets.items() if r != rank}
    alone = [n for n in saved if _module(n) not in whole]
    config = {
        "peft_type": "LORA",
        "base_model_name_or_path": base,
        "r": rank,
        "lora_alpha": rank,
        "rank_pattern": patterns,
        "alpha_pattern": dict(patterns),
        "target_modules": sorted(targets),
        "modules_to_save": sorted(whole) or None,
        "bias": "all" if alone else "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "lora_dropout": 0.0,
        "inference_mode": True,
        "init_lora_weights": True,
        "task_type": None,
    }
    folder.write_json("adapter_config.json", config)
