"""The torch methods, by config name: each builds a :class:`~..base.TorchMerge` for one
output tensor, mirroring the Rust method of the same name (METHODS.md)."""

from __future__ import annotations

from collections.abc import Callable

from ..base import TensorCtx, TorchMerge
from . import simple

Builder = Callable[[TensorCtx], TorchMerge]

METHODS: dict[str, Builder] = {}
METHODS.update(simple.METHODS)

for _module in ("task_family", "spherical", "other"):
    try:
        _mod = __import__(f"{__name__}.{_module}", fromlist=["METHODS"])
    except ModuleNotFoundError as _e:  # a group not written yet
        if _e.name != f"{__name__}.{_module}":
            raise
    else:
        METHODS.update(_mod.METHODS)
