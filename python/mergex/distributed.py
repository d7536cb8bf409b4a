"""Merges and sweeps on a Ray cluster (``--ray [ADDRESS]``, ``pip install 'mergex[ray]'``).

The plan is the one a local run makes; the unit of work is one output shard of a merge (of
every member of a sweep group, when they lay their outputs out alike). A task receives the
job (paths and parameters, never tensor data) with every other shard marked finished, so
the engine writes that shard's file alone, at its final offsets, in the output folder every
node sees, and returns its checksum. The coordinator verifies each checksum against the file
and renames the folder into place as a local merge does. Ray retries a task that fails or
whose node dies; a retry starts its shard over, so the bytes are those of a local run.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any

from . import _mergex
from .errors import ConfigError, MergexIOError
from .job import EngineJob, Resume

__all__ = ["NodeThroughput", "RaySummary", "connect", "merge_on_ray", "sweep_on_ray"]

# Ray retries a task whose worker or node died this many times, and one that raised an
# I/O error (a node's disk or network) as often.
_RETRIES = 3


def connect(address: str) -> ModuleType:
    """Import Ray and join the cluster at ``address`` (``auto``: the one this machine belongs
    to; ``local``: start one here), unless this process already has.

    Raises:
        ConfigError: Ray is not installed, or there is no cluster at ``address``.
    """
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray needs Ray, which is not installed: pip install 'mergex[ray]'") from None
    if not ray.is_initialized():
        try:
            if address == "local":
                ray.init(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
            else:
                ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ConfigError(
                f"ray: cannot join the cluster at {address}: {str(e).splitlines()[0]}"
            ) from None
    return ray


@dataclass
class NodeThroughput:
    """What one node's tasks read, and how long they ran."""

    node: str
    tasks: int = 0
    bytes_read: int = 0
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        """Bytes read per second of task time."""
        return self.bytes_read / self.seconds if self.seconds > 0 else 0.0


@dataclass
class RaySummary:
    """A run's summary (as the engine's ``RunSummary``), from its tasks."""

    files: list[str]
    bytes_read: int
    bytes_written: int
    checksums: dict[str, str]
    sample_seconds: float = 0.0
    stat_pass_seconds: list[float] = field(default_factory=list)
    output_seconds: float = 0.0
    kernels: str = ""
    nodes: list[NodeThroughput] = field(default_factory=list)


def _task(specs: list[str], dirs: list[str], shard: str) -> dict[str, Any]:
    """One shard of every member in ``specs`` (each with the other shards marked finished)
    into its folder in ``dirs``: the shard's checksum per member, and what it read."""
    import ray

    for d in dirs:
        (Path(d) / shard).unlink(missing_ok=True)  # a retry starts the shard over
    clock = time.perf_counter()
    cores = [_mergex.MergeJob(s) for s in specs]
    if len(cores) == 1:
        summaries = [cores[0].run(dirs[0])]
    else:
        summaries = _mergex.Sweep(cores).run([list(range(len(cores)))], dirs)
    node = f"{socket.gethostname()}:{ray.get_runtime_context().get_node_id()[:8]}"
    return {
        "shard": shard,
        "checksums": [s.checksums[shard] for s in summaries],
        "bytes_read": summaries[0].bytes_read,
        "seconds": time.perf_counter() - clock,
        "node": node,
        "timings": (summaries[0].sample_seconds, summaries[0].stat_pass_seconds, summaries[0].output_seconds),
        "kernels": summaries[0].kernels,
    }


def _shard_spec(spec: EngineJob, shards: list[str], shard: str, folder: Path, fingerprint: str) -> str:
    """``spec`` with every shard but ``shard`` marked finished (its state file its own)."""
    done = {s: "" for s in shards if s != shard}
    resume = Resume(str(folder / f".ray-{shard}.json"), fingerprint, done)
    return replace(spec, resume=resume).to_json()


def _run_tasks(
    ray: ModuleType,
    units: list[tuple[list[str], list[str], str]],
    threads: int,
    on_done: Callable[[dict[str, Any]], None],
) -> list[dict[str, Any]]:
    """Run every unit ``(job JSONs, folders, shard)`` as a Ray task; ``on_done`` sees each
    result as it comes. On an interruption the tasks still pending are cancelled."""
    cpus = max((int(n.get("Resources", {}).get("CPU", 1)) for n in ray.nodes() if n.get("Alive")), default=1)
    task = ray.remote(
        num_cpus=max(1, min(threads, cpus)), max_retries=_RETRIES, retry_exceptions=[MergexIOError]
    )(_task)
    pending = {task.remote(specs, dirs, shard): i for i, (specs, dirs, shard) in enumerate(units)}
    results: list[dict[str, Any] | None] = [None] * len(units)
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.2)
            for ref in ready:
                r = results[pending.pop(ref)] = ray.get(ref)
                on_done(r)
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    return [r for r in results if r is not None]


def _verify(results: list[dict[str, Any]], dirs: list[str]) -> None:
    """Each shard file's checksum is the one its task computed while writing it."""
    for r in results:
        for d, want in zip(dirs, r["checksums"], strict=True):
            path = Path(d) / r["shard"]
            if _mergex.checksum(str(path)) != want:
                raise MergexIOError(f"{path}: its checksum differs from what its Ray task wrote")


def _summary(results: list[dict[str, Any]], plan: Any) -> RaySummary:
    nodes: dict[str, NodeThroughput] = {}
    stats: list[float] = []
    sample = output = 0.0
    for r in results:
        n = nodes.setdefault(r["node"], NodeThroughput(r["node"]))
        n.tasks += 1
        n.bytes_read += r["bytes_read"]
        n.seconds += r["seconds"]
        s, passes, o = r["timings"]
        sample, output = sample + s, output + o
        stats = [
            a + b for a, b in zip(stats + [0.0] * len(passes), passes + [0.0] * len(stats), strict=False)
        ]
    checksums = {r["shard"]: r["checksums"][0] for r in results}
    return RaySummary(
        files=[name for name, _, _ in plan.shards]
        + (["model.safetensors.index.json"] if len(plan.shards) > 1 else []),
        bytes_read=sum(r["bytes_read"] for r in results),
        bytes_written=plan.bytes_written,
        checksums=checksums,
        sample_seconds=sample,
        stat_pass_seconds=stats,
        output_seconds=output,
        kernels=f"ray ({results[0]['kernels'] if results else ''})",
        nodes=sorted(nodes.values(), key=lambda n: n.node),
    )


Progress = Callable[[int, int, int, int], None]
"""Told (bytes read, bytes to read, tensors done, tensors) as the tasks finish."""


def _progress(plans: list[Any], progress: Progress | None) -> Callable[[dict[str, Any]], None]:
    """The ``on_done`` of :func:`_run_tasks` that reports to ``progress``: a shard's bytes and
    tensors count once its task is done."""
    tensors = {name: n for p in plans for name, _, n in p.shards}
    total_bytes = sum(p.bytes_read for p in plans)
    total = sum(tensors.values())
    done = [0, 0]

    def on_done(r: dict[str, Any]) -> None:
        done[0] += r["bytes_read"]
        done[1] += tensors.get(r["shard"], 0)
        if progress is not None:
            progress(min(done[0], total_bytes), total_bytes, min(done[1], total), total)

    return on_done


def merge_on_ray(
    address: str, spec: EngineJob, folder: Path, fingerprint: str, progress: Progress | None = None
) -> RaySummary:
    """Run the merge ``spec`` into ``folder`` (the temporary output folder, on a filesystem
    every node sees) as one Ray task per output shard not already finished."""
    ray = connect(address)
    plan = _mergex.MergeJob(spec.to_json()).plan()
    shards = [name for name, _, _ in plan.shards]
    done = set(spec.resume.done) if spec.resume is not None else set()
    units = [
        ([_shard_spec(spec, shards, s, folder, fingerprint)], [str(folder)], s)
        for s in shards
        if s not in done
    ]
    results = _run_tasks(ray, units, spec.threads, _progress([plan], progress))
    _verify(results, [str(folder)])
    for s in shards:
        (folder / f".ray-{s}.json").unlink(missing_ok=True)
    return _summary(results, plan)


def sweep_on_ray(
    address: str,
    specs: list[EngineJob],
    folders: list[Path],
    groups: list[list[int]],
    fingerprints: list[str],
    progress: Progress | None = None,
) -> list[RaySummary]:
    """Run sweep members (``specs``, grouped by their inputs) into their ``folders`` on Ray:
    one task per output shard of a group whose members lay out their shards alike (the
    task reads the inputs once for all of them), else one task per member and shard."""
    ray = connect(address)
    plans = [_mergex.MergeJob(s.to_json()).plan() for s in specs]
    units: list[tuple[list[str], list[str], str]] = []
    owners: list[list[int]] = []
    for g in groups:
        layouts = {tuple(name for name, _, _ in plans[i].shards) for i in g}
        parts = [g] if len(layouts) == 1 else [[i] for i in g]
        for part in parts:
            shards = [name for name, _, _ in plans[part[0]].shards]
            for s in shards:
                task_specs = [_shard_spec(specs[i], shards, s, folders[i], fingerprints[i]) for i in part]
                units.append((task_specs, [str(folders[i]) for i in part], s))
                owners.append(part)
    results = _run_tasks(
        ray, units, max(s.threads for s in specs), _progress([plans[g[0]] for g in groups], progress)
    )
    per_member: list[list[dict[str, Any]]] = [[] for _ in specs]
    for unit, owner, r in zip(units, owners, results, strict=True):
        _verify([r], unit[1])
        for j, i in enumerate(owner):
            per_member[i].append({**r, "checksums": [r["checksums"][j]]})
    for plan, folder in zip(plans, folders, strict=True):
        for name, _, _ in plan.shards:
            (folder / f".ray-{name}.json").unlink(missing_ok=True)
    return [_summary(per_member[i], plans[i]) for i in range(len(specs))]
