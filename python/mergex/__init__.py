"""mergex: merge fine-tuned LLM checkpoints within a fixed RAM budget."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._mergex import __version__
from .api import MergePlan, MergeResult, inspect, merge, plan
from .config import MergeConfig, load_config
from .errors import (
    CheckpointError,
    ConfigError,
    MergeInterrupted,
    MergexError,
    MergexIOError,
    ModelNotFoundError,
    OutputExistsError,
)
from .methods import METHODS
from .models import TensorInfo
from .progress import MergeProgress
from .sweeps import SweepPlan, sweep, sweep_plan
from .units import parse_size

if TYPE_CHECKING:
    from .extract import ExtractResult, extract_lora

__all__ = [
    "METHODS",
    "CheckpointError",
    "ConfigError",
    "ExtractResult",
    "MergeConfig",
    "MergeInterrupted",
    "MergePlan",
    "MergeProgress",
    "MergeResult",
    "MergexError",
    "MergexIOError",
    "ModelNotFoundError",
    "OutputExistsError",
    "SweepPlan",
    "TensorInfo",
    "__version__",
    "extract_lora",
    "inspect",
    "load_config",
    "merge",
    "parse_size",
    "plan",
    "sweep",
    "sweep_plan",
]


def __getattr__(name: str) -> Any:
    # extract-lora brings numpy in: imported when first used, not with every command.
    if name in ("extract_lora", "ExtractResult"):
        from . import extract

        return getattr(extract, name)
    raise AttributeError(f"module 'mergex' has no attribute {name!r}")
