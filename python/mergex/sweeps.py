"""Sweeps: many merges of the same inputs from one read of them per pass (``mergex sweep``).

A sweep config is either a YAML file of several documents (each a whole merge config with
an optional ``name:``; a document that later ones use as a model is a recipe stage, written
like the others and run before them), or one config in which parameter values may be
``{sweep: [v1, v2, …]}``: the members are the Cartesian product of those lists, named from
their values (``density=0.2,lambda=1.0``). Each member is an ordinary output folder
``OUTDIR/NAME``, byte-identical to ``mergex merge`` of its expanded config; the members that
read the same inputs run together, reading each input chunk once per pass for all of them.
``OUTDIR/sweep.yml`` records the members, their configs and, once written, their files'
checksums (what ``--resume`` verifies).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import _mergex, hub
from .api import (
    MergeResult,
    Size,
    _fingerprint,
    _resolve_hub,
    merge_result,
)
from .config import MergeConfig, load_config
from .errors import ConfigError, MergexError, OutputExistsError
from .output import OutputFolder, check_output_path, finish_output
from .planner import Job
from .progress import ProgressCallback, counts, run_with_progress
from .recipe import refs, substitute

__all__ = ["MAX_MEMBERS", "Member", "SweepPlan", "expand", "is_sweep", "sweep", "sweep_plan"]

MAX_MEMBERS = 256
"""The most members one sweep may have."""
_RECORD = "sweep.yml"


@dataclass
class Member:
    """One merge of a sweep."""

    name: str
    raw: dict[str, Any]
    """Its whole config (swept values put in; stage names not yet replaced)."""
    values: dict[str, Any] = field(default_factory=dict)
    """The swept values that make it, by label."""


# --------------------------------------------------------------------------- expansion


def _is_sweep(v: Any) -> bool:
    return isinstance(v, dict) and set(v) == {"sweep"}


def _swept(
    raw: Any, path: tuple[Any, ...] = (), in_params: bool = False
) -> list[tuple[tuple[Any, ...], list[Any]]]:
    """Every ``{sweep: [...]}`` in ``raw`` with its path; a sweep anywhere but under a
    ``parameters`` mapping is a config error."""
    found: list[tuple[tuple[Any, ...], list[Any]]] = []
    where = ".".join(str(p) for p in path)
    if _is_sweep(raw):
        values = raw["sweep"]
        if not in_params:
            raise ConfigError(
                f"{where}: sweep: only parameter values can be swept, and {where} is not a parameter"
            )
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: sweep: expected a non-empty list of values, got {values!r}")
        return [(path, values)]
    if isinstance(raw, dict):
        for k, v in raw.items():
            found += _swept(v, (*path, k), in_params or k == "parameters")
    elif isinstance(raw, list):
        for i, v in enumerate(raw):
            found += _swept(v, (*path, i), in_params)
    return found


def is_sweep(path: Path) -> bool:
    """Whether ``path`` is a one-document config with ``{sweep: [...]}`` values."""
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return len(docs) == 1 and '"sweep"' in json.dumps(docs[0], default=str) and _has_sweep(docs[0])


def _has_sweep(raw: Any) -> bool:
    if _is_sweep(raw):
        return True
    if isinstance(raw, dict):
        return any(_has_sweep(v) for v in raw.values())
    return isinstance(raw, list) and any(_has_sweep(v) for v in raw)


def _label(path: tuple[Any, ...], paths: list[tuple[Any, ...]]) -> str:
    """A swept value's label: its parameter name, qualified by where it is when two swept
    values share a name (``models.1.density``)."""
    key = next((str(p) for p in reversed(path) if isinstance(p, str) and p != "parameters"), str(path[-1]))
    same = [
        p
        for p in paths
        if next((str(q) for q in reversed(p) if isinstance(q, str) and q != "parameters"), "") == key
    ]
    if len(same) <= 1:
        return key
    return ".".join(str(p) for p in path if p != "parameters")


def _shown(v: Any) -> str:
    return json.dumps(v, separators=(",", ":")) if isinstance(v, list | dict) else str(v)


def _set(raw: Any, path: tuple[Any, ...], value: Any) -> None:
    for p in path[:-1]:
        raw = raw[p]
    raw[path[-1]] = value


def expand(path: Path) -> list[Member]:
    """The members of the sweep config ``path``, in order.

    Raises:
        ConfigError: Not YAML, a document that is not a mapping, a sweep outside the
            parameters, an empty sweep list, two members of one name, or more than
            :data:`MAX_MEMBERS` members.
    """
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read the sweep config: {str(e).splitlines()[0]}") from None
    if not docs:
        raise ConfigError(f"{path}: the sweep config is empty")
    members: list[Member] = []
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict):
            raise ConfigError(f"{path}: document {i + 1}: expected a mapping")
        name = doc.get("name")
        if name is not None and (
            not isinstance(name, str) or not name or "/" in name or name.startswith(".")
        ):
            raise ConfigError(f"{path}: document {i + 1}: name: expected a folder name, got {name!r}")
        raw = {k: v for k, v in doc.items() if k != "name"}
        swept = _swept(raw)
        if swept and len(docs) > 1:
            raise ConfigError(f"{path}: document {i + 1}: sweep lists need a config of one document")
        if not swept:
            members.append(Member(name or f"{i:03d}", raw))
            continue
        count = 1
        for _, values in swept:
            count *= len(values)
        if count > MAX_MEMBERS:
            raise ConfigError(f"{path}: the sweep has {count} members; at most {MAX_MEMBERS} are allowed")
        labels = [_label(p, [q for q, _ in swept]) for p, _ in swept]
        for combo in itertools.product(*(values for _, values in swept)):
            member = copy.deepcopy(raw)
            for (p, _), v in zip(swept, combo, strict=True):
                _set(member, p, v)
            chosen = dict(zip(labels, combo, strict=True))
            label = ",".join(f"{k}={_shown(v)}" for k, v in chosen.items()).replace("/", "_")
            members.append(Member(f"{name}/{label}" if name else label, member, chosen))
    if len(members) > MAX_MEMBERS:
        raise ConfigError(f"{path}: the sweep has {len(members)} members; at most {MAX_MEMBERS} are allowed")
    names = [m.name for m in members]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ConfigError(f"{path}: two members are named {dup!r}")
    return members


def _waves(path: Path, members: list[Member], outdir: Path) -> list[list[tuple[Member, dict[str, Any]]]]:
    """The members in dependency order (a member used by others as a model runs first), in
    waves of members whose inputs are all there, each with its config (member names
    replaced by their folders).

    Raises:
        ConfigError: The members form a cycle.
    """
    by_name = {m.name: m for m in members}
    folders = {m.name: str(outdir / m.name) for m in members}
    deps = {m.name: refs(m.raw) & set(by_name) - {m.name} for m in members}
    waves: list[list[tuple[Member, dict[str, Any]]]] = []
    done: set[str] = set()
    while len(done) < len(members):
        ready = [m for m in members if m.name not in done and deps[m.name] <= done]
        if not ready:
            left = sorted(set(by_name) - done)
            raise ConfigError(f"{path}: the documents form a cycle: {' -> '.join(left)}")
        waves.append([(m, substitute(m.raw, folders)) for m in ready])
        done |= {m.name for m in ready}
    return waves


# --------------------------------------------------------------------------- planning


@dataclass
class _Prepared:
    member: Member
    cfg: MergeConfig
    job: Job
    fingerprint: str = ""


def _signature(job: Job) -> str:
    """What a member reads: per output tensor, its inputs (file, tensor, scales, adapters,
    row maps, every model index resolved to its path), without the per-model parameters and
    draw positions. Members of equal signatures read together."""
    models = job.spec.models

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            v = {f.name: getattr(v, f.name) for f in dataclasses.fields(v)}
        if isinstance(v, dict):
            out = {k: plain(x) for k, x in v.items() if k not in ("params", "position")}
            if isinstance(out.get("model"), int):
                out["model"] = models[out["model"]]
            return out
        if isinstance(v, list | tuple):
            return [plain(x) for x in v]
        return v

    tensors = [[t.name, t.shape, t.copy, plain(t.base), plain(t.inputs)] for t in job.spec.tensors]
    return json.dumps(tensors, sort_keys=True, default=str)


def _prepare(
    session: hub.HubSession,
    wave: list[tuple[Member, dict[str, Any]]],
    source_dir: Path,
    kw: dict[str, Any],
    download: bool,
) -> list[_Prepared]:
    out = []
    for member, raw in wave:
        try:
            cfg = load_config(raw, source_dir)
            cfg, job, _ = _resolve_hub(session, cfg, download=download, **kw)
        except MergexError as e:
            raise _named(e, member) from None
        out.append(_Prepared(member, cfg, job))
    return out


def _named(e: MergexError, member: Member) -> MergexError:
    return type(e)(f"sweep member {member.name}: {e}")


def _engines(todo: list[_Prepared]) -> tuple[list[list[int]], list[_mergex.MergeJob]]:
    """The members grouped by their inputs, their budget shares set, and their prepared
    engines (whose checks, e.g. parameter ranges, run here: before anything is read)."""
    groups = _groups(todo)
    _split_budget(todo, groups)
    cores = []
    for p in todo:
        try:
            cores.append(_mergex.MergeJob(p.job.spec.to_json()))
        except MergexError as e:
            raise _named(e, p.member) from None
    return groups, cores


def _groups(prepared: list[_Prepared]) -> list[list[int]]:
    by_sig: dict[str, list[int]] = {}
    for i, p in enumerate(prepared):
        by_sig.setdefault(_signature(p.job), []).append(i)
    return list(by_sig.values())


def _split_budget(prepared: list[_Prepared], groups: list[list[int]]) -> None:
    """Each group's members share the budget evenly (the engine reads with the smallest
    chunk any member's share allows)."""
    for g in groups:
        for i in g:
            spec = prepared[i].job.spec
            share = spec.ram_budget // len(g)
            if share < _mergex.MIN_RAM_BUDGET:
                raise ConfigError(
                    f"ram_budget: {spec.ram_budget} bytes shared by {len(g)} sweep members leaves "
                    f"{share} each, under the {_mergex.MIN_RAM_BUDGET} a merge needs"
                )
            spec.ram_budget = share


@dataclass
class _MemberResult:
    result: MergeResult
    checksums: dict[str, str]
    """Of the safetensors files written, as the engine computed them while writing."""


@dataclass
class SweepPlan:
    """What a sweep will read, against its members merged one by one."""

    members: list[str]
    groups: list[list[str]]
    """Members that read their inputs together."""
    bytes_read: int
    """Input bytes the sweep reads over all passes."""
    separate_bytes_read: int
    """Input bytes the members would read merged one by one (each with the whole budget)."""
    bytes_written: int
    later: list[str] = field(default_factory=list)
    """Members that build on other members: planned once those exist (not counted here)."""


def sweep_plan(
    config: str | Path,
    *,
    ram_budget: Size | None = None,
    threads: int | None = None,
    shard_size: Size | None = None,
    offline: bool = False,
) -> SweepPlan:
    """Plan a sweep without running it (headers only).

    Raises:
        ConfigError, CheckpointError, ModelNotFoundError: As :func:`sweep`.
    """
    path = Path(config)
    members = expand(path)
    kw = {"ram_budget": ram_budget, "threads": threads, "shard_size": shard_size, "seed": None}
    total = separate = written = 0
    groups: list[list[str]] = []
    names = {m.name for m in members}
    later = [m.name for m in members if refs(m.raw) & names - {m.name}]
    with hub.hub_session(offline) as hs:
        wave = [(m, m.raw) for m in members if m.name not in later]
        prepared = _prepare(hs, wave, path.resolve().parent, kw, download=False)
        # One by one, each merge has the whole budget; in the sweep, its group's share.
        alone = [_mergex.MergeJob(p.job.spec.to_json()).plan() for p in prepared]
        split, cores = _engines(prepared)
        for g in split:
            groups.append([prepared[i].member.name for i in g])
            separate += sum(alone[i].bytes_read for i in g)
            written += sum(alone[i].bytes_written for i in g)
            total += _mergex.Sweep([cores[i] for i in g]).planned_bytes()
    return SweepPlan([m.name for m in members], groups, total, separate, written, later)


# --------------------------------------------------------------------------- running


def _record(outdir: Path, entries: dict[str, dict[str, Any]]) -> None:
    text = yaml.safe_dump({"members": list(entries.values())}, sort_keys=False, allow_unicode=True)
    tmp = outdir / f".{_RECORD}.tmp"
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(outdir / _RECORD)


def _recorded(outdir: Path) -> dict[str, dict[str, Any]]:
    try:
        data = yaml.safe_load((outdir / _RECORD).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    members = data.get("members") if isinstance(data, dict) else None
    return {str(m["name"]): m for m in members or [] if isinstance(m, dict) and "name" in m}


def _checksums(folder: Path) -> dict[str, str]:
    return {p.name: _mergex.checksum(str(p)) for p in sorted(folder.glob("*.safetensors"))}


def _complete(folder: Path, entry: dict[str, Any] | None, fingerprint: str) -> bool:
    """Whether ``folder`` holds the member an earlier run of this sweep finished: the same
    fingerprint, and every file's checksum as recorded."""
    if entry is None or entry.get("fingerprint") != fingerprint or not folder.is_dir():
        return False
    files = entry.get("checksums")
    try:
        return isinstance(files, dict) and bool(files) and _checksums(folder) == files
    except MergexError:
        return False


def sweep(
    config: str | Path,
    outdir: str | Path,
    *,
    ram_budget: Size | None = None,
    threads: int | None = None,
    shard_size: Size | None = None,
    seed: int | None = None,
    overwrite: bool = False,
    resume: bool = False,
    progress: ProgressCallback | None = None,
    offline: bool = False,
    ray: str | None = None,
) -> list[MergeResult]:
    """Run every member of the sweep config ``config`` into ``outdir/NAME``.

    The members that read the same inputs run together: each input chunk is read once per
    pass for all of them. ``ram_budget`` covers the whole sweep: each group's members share
    it evenly.

    Args:
        config: A sweep config (see the module's description).
        outdir: The sweep's folder; created if missing.
        resume: Keep the members an interrupted run of the same sweep finished (after
            verifying their files' checksums) and run the others.
        overwrite: Replace members' folders that exist (else an existing one is an error).
        ray: Run on a Ray cluster (as :func:`mergex.merge`): one task per output shard of
            each group whose members lay out their shards alike, reading the inputs once
            for all of them.
        The others: as :func:`mergex.merge`.

    Returns:
        One :class:`MergeResult` per member, in order (a kept member's with nothing read).

    Raises:
        ConfigError: The sweep config, or a member's expansion, is invalid (named).
        OutputExistsError: A member's folder exists without ``overwrite`` or ``resume``.
        As :func:`mergex.merge` otherwise.
    """
    start = time.perf_counter()
    path = Path(config)
    out = Path(outdir).expanduser().absolute()
    members = expand(path)
    kw = {"ram_budget": ram_budget, "threads": threads, "shard_size": shard_size, "seed": seed}
    if isinstance(progress, bool):
        progress = None
    results: dict[str, MergeResult] = {}
    with hub.hub_session(offline) as hs:
        waves = _waves(path, members, out)
        source = path.resolve().parent
        for wave in waves:  # every member's config checked first
            for m, raw in wave:
                try:
                    load_config(raw, source)
                except MergexError as e:
                    raise _named(e, m) from None
        record = _recorded(out) if resume else {}
        entries: dict[str, dict[str, Any]] = {m.name: {"name": m.name, "values": m.values} for m in members}
        for wave in waves:
            todo = []
            for p in _prepare(hs, wave, source, kw, download=False):
                p.fingerprint = _fingerprint(p.job)
                name = p.member.name
                entries[name] |= {"config": p.cfg.raw, "fingerprint": p.fingerprint}
                folder = out / name
                if resume and _complete(folder, record.get(name), p.fingerprint):
                    entries[name]["checksums"] = record[name]["checksums"]
                    results[name] = MergeResult(
                        folder, sorted(folder.iterdir()), 0, 0, 0.0, 0, ["kept (complete)"]
                    )
                    continue
                if folder.exists() and not (overwrite or resume):
                    raise OutputExistsError(
                        f"sweep member {name}: {folder} already exists (pass --overwrite)"
                    )
                todo.append(p)
            if not todo:
                continue
            groups, cores = _engines(todo)
            if hs.models and not hs.fetched:  # Hub inputs: fetch what the members read
                todo = _prepare(hs, [(p.member, p.cfg.raw) for p in todo], source, kw, download=True)
                for p in todo:
                    p.fingerprint = _fingerprint(p.job)
                    entries[p.member.name] |= {"config": p.cfg.raw, "fingerprint": p.fingerprint}
                groups, cores = _engines(todo)
            out.mkdir(parents=True, exist_ok=True)
            _record(out, entries)
            ran = _run_wave(todo, groups, cores, out, progress, start, ray)
            for r, p in zip(ran, todo, strict=True):
                results[p.member.name] = r.result
                entries[p.member.name]["checksums"] = r.checksums
            _record(out, entries)
        out.mkdir(parents=True, exist_ok=True)
        _record(out, entries)
    return [results[m.name] for m in members]


def _run_wave(
    todo: list[_Prepared],
    groups: list[list[int]],
    cores: list[_mergex.MergeJob],
    out: Path,
    progress: ProgressCallback | None,
    start: float,
    ray: str | None,
) -> list[_MemberResult]:
    """Run the members of one wave, each group reading its inputs once, into their folders."""
    folders: list[OutputFolder] = []
    try:
        for p in todo:
            target = check_output_path(out / p.member.name, [m.path for m in p.job.models], True)
            target.parent.mkdir(parents=True, exist_ok=True)
            folders.append(OutputFolder(target, p.fingerprint, False))
        summaries: list[Any]
        if ray is not None:
            from .distributed import sweep_on_ray

            specs, tmps = [p.job.spec for p in todo], [f.tmp for f in folders]
            report = None if progress is None else counts(progress)
            summaries = sweep_on_ray(ray, specs, tmps, groups, [p.fingerprint for p in todo], report)
        else:
            runner = _mergex.Sweep(cores)
            dirs = [str(f.tmp) for f in folders]
            summaries = run_with_progress(runner, lambda: runner.run(groups, dirs), progress)
        results = []
        for p, folder, summary in zip(todo, folders, summaries, strict=True):
            finish_output(folder, p.cfg, p.job)
            result = merge_result(folder.target, summary, start, folder.notes + p.job.warnings)
            result.nodes = list(getattr(summary, "nodes", []))
            results.append(_MemberResult(result, dict(summary.checksums)))
        return results
    except BaseException:
        for f in folders:
            if f.tmp.exists():
                f.discard()
        raise
