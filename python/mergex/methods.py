"""The merge methods mergex knows, read from the Rust engine's registry (``_mergex.methods()``):
each method declares its parameters, defaults, ranges, base use, model counts and passes in
its own Rust file, and nothing here restates them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, cast

from . import _mergex

__all__ = ["METHODS", "MethodSpec", "Param", "get_method"]

Scalar = float | int | bool


@dataclass(frozen=True)
class Param:
    """One parameter of a method."""

    name: str
    default: Scalar | None
    """``None`` when the config must set it (``required``) or may leave it out."""
    per_model: bool
    doc: str
    kind: Literal["number", "flag", "count"] = "number"
    required: bool = False
    min: float | None = None
    max: float | None = None

    def default_text(self) -> str:
        """The default as ``mergex methods`` shows it: a value, ``required`` or ``optional``."""
        if self.default is None:
            return "required" if self.required else "optional"
        return str(self.default).lower() if isinstance(self.default, bool) else str(self.default)


@dataclass(frozen=True)
class MethodSpec:
    """One merge method."""

    name: str
    base: Literal["none", "required", "optional"]
    params: tuple[Param, ...]
    summary: str
    min_models: int
    max_models: int | None
    models_words: str
    """The model count in words: ``the base model and exactly one other model``."""
    passes_min: int
    passes_max: int
    passes_note: str

    @property
    def passes(self) -> str:
        """``1``, or ``1-3`` for a range."""
        lo, hi = self.passes_min, self.passes_max
        return str(lo) if lo == hi else f"{lo}-{hi}"

    def param(self, name: str) -> Param | None:
        """Look up a parameter by name."""
        return next((p for p in self.params if p.name == name), None)


def _param(p: _mergex.MethodParam) -> Param:
    default: Scalar | None = p.default
    if p.default is not None and p.kind == "flag":
        default = p.default != 0.0
    elif p.default is not None and p.kind == "count":
        default = int(p.default)
    kind = cast(Literal["number", "flag", "count"], p.kind)
    return Param(p.name, default, p.per_model, p.doc, kind, p.required, p.min, p.max)


def _method(m: _mergex.Method) -> MethodSpec:
    base = cast(Literal["none", "required", "optional"], m.base)
    return MethodSpec(
        m.name,
        base,
        tuple(_param(p) for p in m.params),
        m.summary,
        m.min_models,
        m.max_models,
        m.models_words,
        m.passes_min,
        m.passes_max,
        m.passes_note,
    )


METHODS: dict[str, MethodSpec] = {m.name: _method(m) for m in _mergex.methods()}


def get_method(name: str) -> MethodSpec | None:
    """The method called ``name``, or ``None``."""
    return METHODS.get(name)
