"""The exceptions mergex raises. Each subclass also derives from the natural builtin, so
callers can catch ``ValueError`` or ``OSError`` without knowing mergex."""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "MergeInterrupted",
    "MergexError",
    "MergexIOError",
    "ModelNotFoundError",
    "OutputExistsError",
]


class MergexError(Exception):
    """Base class of every error mergex raises on purpose."""


class ConfigError(MergexError, ValueError):
    """The merge configuration is invalid: a bad key, value, method or parameter."""


class CheckpointError(MergexError, ValueError):
    """A checkpoint is malformed, or its tensors do not fit the merge."""


class ModelNotFoundError(MergexError, FileNotFoundError):
    """A model reference names no folder, file or Hugging Face cache entry."""


class OutputExistsError(MergexError, FileExistsError):
    """The output folder exists (or is unsafe to write) and ``overwrite`` was not given."""


class MergeInterrupted(MergexError):
    """The merge was cancelled before it finished; nothing was written."""


class MergexIOError(MergexError, OSError):
    """Reading or writing a file failed."""
