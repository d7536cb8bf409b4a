"""The public entry points: :func:`merge`, :func:`plan` and :func:`inspect`."""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import _mergex, hub
from .config import MergeConfig, load_config
from .errors import ConfigError
from .job import EngineJob, Resume
from .models import Model, TensorInfo
from .output import OutputFolder, check_output_path, finish_output
from .planner import Job, build_job
from .progress import MergeProgress, ProgressCallback, counts, run_with_progress
from .recipe import FUSED_MARK, read_recipe, run_recipe
from .units import default_ram_budget, default_threads, parse_size

__all__ = ["MergePlan", "MergeProgress", "MergeResult", "inspect", "merge", "plan"]

ConfigSource = str | os.PathLike[str] | dict[str, Any] | MergeConfig
Size = int | str
DEFAULT_SHARD_SIZE = _mergex.DEFAULT_SHARD_SIZE
MAX_THREADS = _mergex.MAX_THREADS


@dataclass
class MergeResult:
    """What a finished merge did."""

    out_dir: Path
    files: list[Path]
    """Every file written into ``out_dir``."""
    bytes_read: int
    """Input bytes read, over all passes."""
    bytes_written: int
    """Bytes of the safetensors files written."""
    seconds: float
    peak_rss: int
    """Peak resident memory of this process so far, in bytes."""
    warnings: list[str] = field(default_factory=list)
    sample_seconds: float = 0.0
    """Wall seconds reading the selections' samples and planning their bands before the
    first pass (TIES and other top-k methods), summed over tensors."""
    stat_pass_seconds: list[float] = field(default_factory=list)
    """Wall seconds of the k-th statistics pass, with merging its statistics (e.g.
    resolving the cuts), summed over tensors."""
    output_seconds: float = 0.0
    """Wall seconds of the output passes."""
    kernels: str = ""
    """What computed the merge: the Rust engine's CPU kernels (``avx512``, ``avx2`` or
    ``portable``, the widest the CPU has unless ``MERGEX_SIMD`` asks for less), or ``torch``
    and its device."""
    nodes: list[Any] = field(default_factory=list)
    """On Ray: each node's tasks, bytes read and seconds (``distributed.NodeThroughput``)."""


@dataclass
class MergePlan:
    """What a merge will do, without doing it."""

    method: str
    models: list[Path]
    tensors: int
    bytes_read: int
    """Input bytes read over all passes."""
    input_bytes: int
    """Input bytes of the tensors used, read once."""
    bytes_written: int
    threads: int
    ram_budget: int
    max_chunk_elems: int
    passes: dict[int, int]
    """Number of output tensors for each pass count."""
    shards: list[tuple[str, int, int]]
    """Output files: (name, bytes, tensors)."""
    peak_memory: int
    """Estimated peak resident memory, in bytes."""
    warnings: list[str] = field(default_factory=list)
    formats: list[str] = field(default_factory=list)
    """How each of :attr:`models` is stored: ``plain`` or its quantized format."""
    output_format: str = ""
    """How the output is written, e.g. ``plain BF16``."""
    download_bytes: int = 0
    """Bytes of Hub files the merge would download (none are, by a plan)."""


def _resolve(
    config: ConfigSource,
    ram_budget: Size | None,
    threads: int | None,
    shard_size: Size | None,
    seed: int | None,
) -> tuple[MergeConfig, Job]:
    cfg = load_config(config)
    budget = parse_size(ram_budget, "ram_budget") if ram_budget is not None else default_ram_budget()
    nthreads = default_threads() if threads is None else threads
    if isinstance(nthreads, bool) or not isinstance(nthreads, int) or not 1 <= nthreads <= MAX_THREADS:
        raise ConfigError(f"threads: expected an integer from 1 to {MAX_THREADS}, got {threads!r}")
    shard = parse_size(shard_size, "shard_size") if shard_size is not None else DEFAULT_SHARD_SIZE
    run_seed = seed if seed is not None else (cfg.seed or 0)
    if isinstance(run_seed, bool) or not isinstance(run_seed, int) or not 0 <= run_seed < 2**32:
        raise ConfigError(f"seed: expected an integer from 0 to 2^32-1, got {seed!r}")
    return cfg, build_job(cfg, ram_budget=budget, threads=nthreads, shard_size=shard, seed=run_seed)


def _files_read(job: Job) -> set[str]:
    """Every file the job reads a tensor from (quantization companions included)."""
    files = set()
    for t in job.spec.tensors:
        for r in [*t.inputs, *([t.base] if t.base else [])]:
            m = job.models[r.model]
            names: list[str | None] = [r.tensor]
            if r.scale is not None:
                sc = r.scale
                names += [sc.tensor, sc.weight_shape, sc.zero_point]
                names += [sc.global_scale.tensor] if sc.global_scale else []
            files |= {m.tensors[n].file for n in names if n and n in m.tensors}
            if r.lora is not None:
                files.add(str(job.models[r.lora.model].path))
    return files


def _pin(raw: dict[str, Any], pins: dict[str, str]) -> dict[str, Any]:
    """The configuration with every Hub reference replaced by ``org/name@<sha>``."""

    def walk(v: Any) -> Any:
        if isinstance(v, dict):
            pinned = {
                k: "+".join(pins.get(p, p) for p in x.split("+"))
                for k, x in v.items()
                if k in _REF_KEYS and isinstance(x, str)
            }
            return {k: pinned[k] if k in pinned else walk(x) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x) for x in v]
        return v

    return walk(raw)  # type: ignore[no-any-return]


_REF_KEYS = ("model", "base_model", "tokenizer_source")


def _resolve_hub(
    session: hub.HubSession,
    config: ConfigSource,
    ram_budget: Size | None,
    threads: int | None,
    shard_size: Size | None,
    seed: int | None,
    download: bool,
    progress: ProgressCallback | None = None,
) -> tuple[MergeConfig, Job, int]:
    """Plan on the inputs' headers (Hub inputs' stand-ins), then (``download``) fetch the Hub
    files the plan reads and plan again on them; also the bytes downloaded (or to download)."""
    cfg, job = _resolve(config, ram_budget, threads, shard_size, seed)
    if cfg.tokenizer_source not in (None, "base"):
        # A Hub tokenizer source is resolved now (its small files), to be pinned with the rest.
        Model.open(cfg.tokenizer_source, cfg.source_dir)
    if not session.models or session.fetched:
        return cfg, job, 0
    needed = session.needed_files(_files_read(job))
    if not download:
        return cfg, job, session.pending_bytes(needed)
    report = None
    if progress is not None:
        callback = progress

        def report(done: int, total: int, files_done: int, files_total: int) -> None:
            callback(MergeProgress(done, total, 0, 0, "downloading", files_done, files_total))

    fetched = session.download(needed, report)
    cfg, job = _resolve(config, ram_budget, threads, shard_size, seed)
    cfg.raw = _pin(cfg.raw, {ref: m.pinned for ref, m in session.models.items()})
    return cfg, job, fetched


def _fingerprint(job: Job) -> str:
    """What the output depends on: the job (less budget and threads, which never change the
    bytes) and every input file's size and modification time."""
    spec = job.spec.fingerprint_part()
    files = sorted({os.path.realpath(t.file) for m in job.models for t in m.tensors.values()})
    stamps = []
    for f in files:
        st = os.stat(f)
        stamps.append([f, st.st_size, st.st_mtime_ns])
    text = json.dumps([spec, stamps], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def plan(
    config: ConfigSource,
    *,
    ram_budget: Size | None = None,
    threads: int | None = None,
    shard_size: Size | None = None,
    offline: bool = False,
) -> MergePlan:
    """Plan a merge without running it: what it reads and writes, chunks, passes, shards
    and peak memory. Every input header is read and validated; Hub inputs' headers are
    fetched with range requests, and no weight is downloaded.

    Raises:
        ConfigError, CheckpointError, ModelNotFoundError: As :func:`merge`.
    """
    with hub.hub_session(offline) as hs:
        _, job, download = _resolve_hub(hs, config, ram_budget, threads, shard_size, None, False)
        s = _mergex.MergeJob(job.spec.to_json()).plan()
        return _plan_of(job, s, download)


def _shown(path: Path) -> Path:
    """A model's path as a plan shows it: a Hub model as ``org/name@sha``."""
    session = hub.current()
    for m in session.models.values() if session is not None else []:
        if path in (m.folder, m.snapshot):
            return Path(m.pinned)
    return path


def _plan_of(job: Job, s: Any, download: int) -> MergePlan:
    return MergePlan(
        method=s.method,
        models=[_shown(m.path) for m in job.models],
        tensors=s.tensors,
        bytes_read=s.bytes_read,
        input_bytes=s.input_bytes,
        bytes_written=s.bytes_written,
        threads=s.threads,
        ram_budget=s.ram_budget,
        max_chunk_elems=s.max_chunk_elems,
        passes=dict(s.passes),
        shards=list(s.shards),
        peak_memory=s.peak_memory,
        warnings=job.warnings,
        formats=[quantized_format(m) for m in job.models],
        output_format=(
            f"plain {job.output_dtype}"
            if job.quantized_like is None or not job.quantized_like.quantized
            else f"{quantized_format(job.quantized_like)}, like {job.quantized_like.ref}"
        ),
        download_bytes=download,
    )


def quantized_format(model: Model) -> str:
    """``plain``, or how a model's quantized weights are stored (as read for a merge), or
    that it is a LoRA adapter's file."""
    if model.path.name == "adapter_model.safetensors":
        pairs = sum(bool(re.search(r"\.lora_(embedding_)?A(\.|$)", n)) for n in model.order)
        return f"LoRA adapter, {pairs} adapted weights"
    if not model.quantized:
        return "plain"
    qs = list(model.quantized.values())
    scales = sorted({model.tensors[q.scale].dtype for q in qs})
    kinds = sorted(
        {
            f"INT{q.int_bits}"
            if q.int_bits
            else ("NVFP4" if "F8_E4M3" in scales else "MXFP4")
            if q.fp4
            else "FP8"
            for q in qs
        }
    )
    blocks = {q.block for q in qs}
    size = (
        "per-tensor scales" if blocks == {None} else ", ".join(f"{b[0]}x{b[1]} blocks" for b in blocks if b)
    )
    return f"{'/'.join(kinds)} ({len(qs)} weights, {size}, {'/'.join(scales)} scales)"


@dataclass
class _Backend:
    """Which engine does the arithmetic: the Rust engine, or torch on ``device``."""

    engine: str = "rust"
    device: str = "cpu"
    gpu_budget: int | None = None

    def run(self, engine: _mergex.MergeJob, spec: EngineJob, out: Path) -> _mergex.RunSummary:
        if self.engine == "rust":
            return engine.run(str(out))
        from . import torch_engine

        stream = engine.open_stream(str(out))
        return torch_engine.run(
            engine, stream, engine.tensors(), spec, device=self.device, gpu_budget=self.gpu_budget
        )


def _backend(engine: str | None, device: str | None, gpu_budget: Size | None) -> _Backend:
    """Check ``engine``/``device``/``gpu_budget``: a CUDA device implies the torch engine;
    the Rust engine runs on the CPU only."""
    dev = "cpu" if device is None else str(device)
    name = engine if engine is not None else ("torch" if dev != "cpu" else "rust")
    if name not in ("rust", "torch"):
        raise ConfigError(f"engine: expected rust or torch, got {engine!r}")
    if name == "rust":
        if dev != "cpu":
            raise ConfigError(f"device {dev}: the rust engine runs on the CPU; use --engine torch")
        if gpu_budget is not None:
            raise ConfigError("gpu_budget: only the torch engine on a CUDA device uses it")
        return _Backend()
    from . import torch_engine

    dev = torch_engine.check_device(dev)
    budget = parse_size(gpu_budget, "gpu_budget") if gpu_budget is not None else None
    return _Backend("torch", dev, budget)


def _run_engine(
    engine: _mergex.MergeJob,
    out: Path,
    on_progress: ProgressCallback | None,
    backend: _Backend,
    spec: EngineJob,
) -> _mergex.RunSummary:
    """Run the engine in a worker thread (see :func:`run_with_progress`)."""
    summary: _mergex.RunSummary = run_with_progress(
        engine, lambda: backend.run(engine, spec, out), on_progress
    )
    return summary


def merge(
    config: ConfigSource,
    out: str | os.PathLike[str],
    *,
    ram_budget: Size | None = None,
    threads: int | None = None,
    shard_size: Size | None = None,
    seed: int | None = None,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
    resume: bool = False,
    engine: str | None = None,
    device: str | None = None,
    gpu_budget: Size | None = None,
    offline: bool = False,
    intermediate_dir: str | os.PathLike[str] | None = None,
    lazy: bool = False,
    keep_intermediates: bool = False,
    ray: str | None = None,
) -> MergeResult:
    """Merge the models of ``config`` into the folder ``out``.

    The merge streams every tensor in chunks sized from ``ram_budget``; peak memory depends
    on the budget, not on the models. Output is written to a temporary folder beside ``out``
    and renamed into place when complete. The GIL is released while the engine runs.

    Args:
        config: A YAML path, a dict of the same content, or a loaded config.
        out: The output folder.
        ram_budget: Bytes or a size such as ``"4GiB"``; default a quarter of the available
            memory, at most 4 GiB.
        threads: Worker threads; default the CPUs available.
        shard_size: Largest output file (tensor bytes), default 5 GB.
        seed: Seed of the random methods; default the config's ``seed``, else 0.
        overwrite: Replace an existing output folder written by mergex.
        progress: Called with a :class:`MergeProgress` about ten times a second while the
            engine runs (from the calling thread; an exception it raises stops the merge
            as Ctrl-C does). The CLI draws its progress bar with it.
        resume: Continue a merge into ``out`` that was killed before it finished: the
            shards it completed are kept after their checksums are verified, the rest are
            recomputed. Refused if the configuration or inputs changed since.
        engine: ``"rust"`` (the default on the CPU) or ``"torch"``: the same plan, reads
            and writes, with the arithmetic done by torch (needs ``mergex[torch]``).
        device: ``"cpu"`` (default), ``"cuda"`` or ``"cuda:N"``; a CUDA device implies the
            torch engine.
        gpu_budget: Device memory for chunks (torch on CUDA); default 80% of the free
            device memory.
        offline: Hub references (``org/name[@revision]``) come from the Hugging Face cache
            only, as with ``HF_HUB_OFFLINE=1``; otherwise the merge is planned on their
            headers and only the files it reads are downloaded.
        intermediate_dir: For a multi-stage recipe (a YAML file of several documents), where
            the named stages are written (default: ``.OUT.stages`` beside ``out``).
        lazy: Reuse a stage already complete in ``intermediate_dir`` (and keep the stages).
        keep_intermediates: Keep the stages' folders after the final merge.
        ray: Run on a Ray cluster (``pip install 'mergex[ray]'``): its address, ``auto`` (the
            cluster this machine belongs to) or ``local`` (start one here). One task per
            output shard; ``out`` must be on a filesystem every node sees, as the inputs.

    Returns:
        What was written, read and how long it took.

    Raises:
        ConfigError: The configuration is invalid, or the output overlaps an input.
        CheckpointError: An input checkpoint is malformed or does not fit the merge.
        ModelNotFoundError: A model reference names nothing.
        OutputExistsError: ``out`` exists and ``overwrite`` is false.
        MergexIOError: Reading or writing failed.
        KeyboardInterrupt: Interrupted; the temporary output was removed.
    """
    start = time.perf_counter()
    path = Path(config) if isinstance(config, str | os.PathLike) else None
    stages = read_recipe(path) if path is not None else None
    if path is not None and stages is not None:
        kw: dict[str, Any] = {"ram_budget": ram_budget, "threads": threads, "shard_size": shard_size}
        kw |= {"seed": seed, "progress": progress, "engine": engine, "device": device}
        kw |= {"gpu_budget": gpu_budget, "offline": offline, "ray": ray}
        folder = (
            Path(intermediate_dir)
            if intermediate_dir is not None
            else Path(out).parent / f".{Path(out).name}.stages"
        )
        result: MergeResult = run_recipe(
            path,
            stages,
            Path(out),
            folder,
            overwrite=overwrite,
            lazy=lazy,
            keep=keep_intermediates,
            merge_one=lambda cfg, target, ow, fused: _recipe_stage(cfg, target, ow, fused, kw),
            lay_out=lambda cfg, dest, fused: _lay_out(cfg, dest, fused, kw),
            load=load_config,
        )
        return result
    if isinstance(progress, bool):  # the bar moved to the CLI; False still means none
        if progress:
            raise ConfigError("progress: expected a callback taking a MergeProgress (or None)")
        progress = None
    with hub.hub_session(offline) as hs:
        cfg, job, _ = _resolve_hub(hs, config, ram_budget, threads, shard_size, seed, True, progress)
        return _merge(cfg, job, start, out, overwrite, progress, resume, engine, device, gpu_budget, ray)


def _recipe_stage(
    cfg: MergeConfig, target: Path, overwrite: bool, fused: dict[str, Any], kw: dict[str, Any]
) -> MergeResult:
    """One stage of a recipe; ``fused``: the stages fused into it, by folder (their jobs)."""
    if not fused:
        return merge(cfg, target, overwrite=overwrite, **kw)
    start = time.perf_counter()
    run = {k: kw[k] for k in ("ram_budget", "threads", "shard_size", "seed")}
    with hub.hub_session(kw["offline"]) as hs:
        cfg, job, _ = _resolve_hub(hs, cfg, **run, download=True, progress=kw["progress"])
        _fuse(job, fused)
        rest = (kw["engine"], kw["device"], kw["gpu_budget"], kw["ray"])
        return _merge(cfg, job, start, target, overwrite, kw["progress"], False, *rest)


def _fuse(job: Job, fused: dict[str, Any]) -> None:
    """Mark the job's models that are fused stages' folders with those stages' jobs."""
    wanted = {os.path.realpath(f): spec for f, spec in fused.items()}
    folders = [os.path.realpath(m.folder) for m in job.models]
    job.spec.stages = {i: wanted[f] for i, f in enumerate(folders) if f in wanted}
    missing = set(wanted) - set(folders)
    if missing:  # never read a laid-out stage's (unwritten) files
        raise ConfigError(f"fused stage {sorted(missing)[0]} is not among the inputs of the stage it feeds")


def _lay_out(cfg: MergeConfig, dest: Path, fused: dict[str, Any], kw: dict[str, Any]) -> EngineJob:
    """A fused stage's folder: its output laid out, not written (``recipe`` module); its job
    (with the stages fused into it in turn)."""
    run = {k: kw[k] for k in ("ram_budget", "threads", "shard_size", "seed")}
    with hub.hub_session(kw["offline"]) as hs:
        cfg, job, _ = _resolve_hub(hs, cfg, **run, download=True)
        _fuse(job, fused)
        folder = OutputFolder(check_output_path(dest, [m.path for m in job.models], True), "", False)
        try:
            _mergex.MergeJob(job.spec.to_json()).write_layout(str(folder.tmp))
            # Marks the folder as laid out only: never reused (--lazy) as a written stage.
            (folder.tmp / FUSED_MARK).write_text("computed as read by the stage it feeds\n")
            finish_output(folder, cfg, job)
        except BaseException:
            folder.discard()
            raise
        return job.spec


def _merge(
    cfg: MergeConfig,
    job: Job,
    start: float,
    out: str | os.PathLike[str],
    overwrite: bool,
    progress: ProgressCallback | None,
    resume: bool,
    engine: str | None,
    device: str | None,
    gpu_budget: Size | None,
    ray: str | None = None,
) -> MergeResult:
    backend = _backend(engine, device, gpu_budget)
    if ray is not None and backend.engine != "rust":
        raise ConfigError("--ray runs the Rust engine; it does not take --engine torch or --device cuda")
    target = check_output_path(Path(out), [m.path for m in job.models], overwrite)
    fingerprint = _fingerprint(job)
    folder = OutputFolder(target, fingerprint, resume)
    try:
        job.spec.resume = Resume(str(folder.state), fingerprint, dict(folder.done))
        core = _mergex.MergeJob(job.spec.to_json())
    except BaseException:
        folder.discard()
        raise
    try:
        if ray is not None:
            from .distributed import merge_on_ray

            report = None if progress is None else counts(progress)
            summary: Any = merge_on_ray(ray, job.spec, folder.tmp, fingerprint, report)
        else:
            summary = _run_engine(core, folder.tmp, progress, backend, job.spec)
        finish_output(folder, cfg, job)
    except BaseException:
        folder.discard()
        raise
    result = merge_result(target, summary, start, folder.notes + job.warnings)
    result.nodes = list(getattr(summary, "nodes", []))
    return result


def merge_result(target: Path, summary: Any, start: float, warnings: list[str]) -> MergeResult:
    """The :class:`MergeResult` of an output written into ``target``."""
    return MergeResult(
        out_dir=target,
        files=sorted(target.iterdir()),
        bytes_read=summary.bytes_read,
        bytes_written=summary.bytes_written,
        seconds=time.perf_counter() - start,
        peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        warnings=warnings,
        sample_seconds=summary.sample_seconds,
        stat_pass_seconds=summary.stat_pass_seconds,
        output_seconds=summary.output_seconds,
        kernels=summary.kernels,
    )


def inspect(path: str | os.PathLike[str]) -> list[TensorInfo]:
    """The tensors of a checkpoint folder or ``.safetensors`` file, validated.

    Raises:
        CheckpointError: The checkpoint is malformed.
        ModelNotFoundError: Nothing is at ``path``.
    """
    return [TensorInfo(n, d, tuple(s), f, b) for n, d, s, f, b in _mergex.inspect(str(path))]
