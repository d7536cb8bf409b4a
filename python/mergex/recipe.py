"""Multi-stage recipes (the format of mergekit-multi): a YAML file of several merge configs
separated by ``---``; a document with a ``name:`` is a stage that later documents use as a
model (``model: first-merge``, ``base_model: first-merge``). Stages run in dependency order,
each written to the intermediate folder; the final document (the one without a name, else
the last) is written to the output.

An element-wise stage (linear, task_arithmetic) that only feeds one element-wise stage is
fused into it: its folder holds its output laid out (headers, config, tokenizer) but not
written, and the later stage computes its tensors chunk by chunk as it reads them, exactly
as it would read them from the written files."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

__all__ = [
    "ELEMENTWISE",
    "Stage",
    "fusable",
    "read_recipe",
    "refs",
    "resolve_stages",
    "run_recipe",
    "substitute",
]

_REF_KEYS = ("model", "base_model", "tokenizer_source", "source")


@dataclass
class Stage:
    """One document of a recipe."""

    name: str | None
    raw: dict[str, Any]
    index: int

    @property
    def label(self) -> str:
        return self.name or f"document {self.index + 1}"


def read_recipe(path: Path) -> list[Stage] | None:
    """The documents of the YAML file ``path`` when it holds several, else None."""
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None  # load_config reports it, with the line
    if len(docs) < 2:
        return None
    stages = []
    for i, d in enumerate(docs):
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: document {i + 1}: expected a mapping")
        name = d.get("name")
        if name is not None and (not isinstance(name, str) or not name):
            raise ConfigError(f"{path}: document {i + 1}: name: expected a string, got {name!r}")
        stages.append(Stage(name, {k: v for k, v in d.items() if k != "name"}, i))
    names = [s.name for s in stages if s.name]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ConfigError(f"{path}: two documents are named {dup!r}")
    return stages


def refs(value: Any) -> set[str]:
    """Every model reference in a config (each part of ``BASE+ADAPTER``)."""
    out: set[str] = set()
    if isinstance(value, dict):
        for k, v in value.items():
            if k in _REF_KEYS and isinstance(v, str):
                out |= set(v.split("+"))
            else:
                out |= refs(v)
    elif isinstance(value, list):
        for v in value:
            out |= refs(v)
    return out


def substitute(value: Any, paths: dict[str, str]) -> Any:
    if isinstance(value, dict):
        return {
            k: "+".join(paths.get(p, p) for p in v.split("+"))
            if k in _REF_KEYS and isinstance(v, str)
            else substitute(v, paths)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [substitute(v, paths) for v in value]
    return value


def resolve_stages(
    path: Path, stages: list[Stage], folder: Path
) -> list[tuple[Stage, dict[str, Any], Path | None]]:
    """The stages to run, in dependency order, each with its config (stage names replaced by
    their folders under ``folder``) and its output folder (None for the final one).

    Raises:
        ConfigError: A cycle of stages, a stage no later document uses besides the final one
            ending nowhere, or more than one document without a name.
    """
    unnamed = [s for s in stages if not s.name]
    if len(unnamed) > 1:
        raise ConfigError(
            f"{path}: {unnamed[1].label} has no name; only the final document may go without one"
        )
    final = unnamed[0] if unnamed else stages[-1]
    by_name = {s.name: s for s in stages if s.name}
    deps = {s.index: sorted(refs(s.raw) & set(by_name)) for s in stages}
    order: list[Stage] = []
    state: dict[int, str] = {}

    def visit(s: Stage, chain: list[str]) -> None:
        if state.get(s.index) == "done":
            return
        if state.get(s.index) == "active":
            cycle = [*chain[chain.index(s.label) :], s.label]
            raise ConfigError(f"{path}: the stages form a cycle: {' -> '.join(cycle)}")
        state[s.index] = "active"
        for name in deps[s.index]:
            visit(by_name[name], [*chain, s.label])
        state[s.index] = "done"
        order.append(s)

    visit(final, [])
    paths = {name: str(folder / name) for name in by_name}
    return [(s, substitute(s.raw, paths), None if s is final else folder / str(s.name)) for s in order]


def remove(folders: list[Path], parent: Path) -> None:
    """Remove intermediate stage folders (and their parent when it is left empty)."""
    for f in folders:
        shutil.rmtree(f, ignore_errors=True)
    if parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()


FUSED_MARK = "mergex_fused_stage"
"""A file in a fused stage's folder: its tensors were never written."""
ELEMENTWISE = ("linear", "task_arithmetic")
"""Methods whose output element depends on the same element of the inputs alone."""


def _elementwise(raw: dict[str, Any]) -> bool:
    dtype = str(raw.get("out_dtype") or raw.get("dtype") or "")
    plain = raw.get("out_quantization") in (None, "none") and dtype not in ("float64", "f64", "F64")
    return raw.get("merge_method") in ELEMENTWISE and plain


def fusable(plan: list[tuple[Stage, dict[str, Any], Path | None]]) -> dict[str, str]:
    """The stages fused into their one reader: stage name → that reader's label. A stage is
    fused when it and the only stage that reads it are element-wise (and plain: not
    quantized, not F64)."""
    fused = {}
    for stage, raw, dest in plan:
        if dest is None or stage.name is None:
            continue
        readers = [(s, r) for s, r, _ in plan if s is not stage and stage.name in refs(s.raw)]
        if len(readers) == 1 and _elementwise(raw) and _elementwise(readers[0][1]):
            fused[stage.name] = readers[0][0].label
    return fused


def run_recipe(
    path: Path,
    stages: list[Stage],
    out: Path,
    folder: Path,
    *,
    overwrite: bool,
    lazy: bool,
    keep: bool,
    merge_one: Callable[[Any, Path, bool, dict[str, Any]], Any],
    lay_out: Callable[[Any, Path, dict[str, Any]], Any],
    load: Callable[[dict[str, Any], Path], Any],
) -> Any:
    """Run a recipe's stages: ``merge_one(cfg, target, overwrite, fused)`` merges one (with
    ``fused``: the stages fused into it, by folder, as ``lay_out(cfg, dest, fused)`` returned
    them);
    the final stage's result, with notes of what was reused and fused."""
    plan = resolve_stages(path, stages, folder.absolute())
    fused = {} if keep or lazy else fusable(plan)
    laid: dict[str, Any] = {}
    made: list[Path] = []
    notes: list[str] = []
    try:
        for stage, raw, dest in plan:
            cfg = load(raw, path.resolve().parent)
            written = (
                (dest / "mergex_config.yml").is_file() and not (dest / FUSED_MARK).exists() if dest else False
            )
            if dest is not None and lazy and written:
                notes.append(f"stage {stage.label}: reused {dest} (--lazy)")
                continue
            mine = {d: job for d, job in laid.items() if d in {str(Path(p)) for p in refs(raw)}}
            if dest is not None and stage.name in fused:
                laid[str(dest)] = lay_out(cfg, dest, mine)
                made.append(dest)
                notes.append(f"stage {stage.label}: fused into {fused[stage.name]} (not written)")
                continue
            target = out if dest is None else dest
            result = merge_one(cfg, target, overwrite if dest is None else True, mine)
            notes += [f"stage {stage.label}: {w}" for w in result.warnings]
            if dest is not None:
                made.append(dest)
    finally:
        if not (keep or lazy):
            remove(made, folder)
    # The final document names stage folders that may be gone: the whole recipe goes along.
    shutil.copyfile(path, result.out_dir / "mergex_recipe.yml")
    result.files = sorted(result.out_dir.iterdir())
    result.warnings = notes
    return result
