"""mergex: merge fine-tuned LLM checkpoints within a fixed RAM budget."""

from __future__ import annotations

from ._mergex import __version__
from .api import MergePlan, MergeProgress, MergeResult, inspect, merge, plan
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
from .units import parse_size

__all__ = [
    "METHODS",
    "CheckpointError",
    "ConfigError",
    "MergeConfig",
    "MergeInterrupted",
    "MergePlan",
    "MergeProgress",
    "MergeResult",
    "MergexError",
    "MergexIOError",
    "ModelNotFoundError",
    "OutputExistsError",
    "TensorInfo",
    "__version__",
    "inspect",
    "load_config",
    "merge",
    "parse_size",
    "plan",
]
