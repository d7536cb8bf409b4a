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
    """Base class of every error mergex raises on purpose.

    ``path`` and ``tensor`` name the file (or model folder) and the tensor the error is
    about, where there is one; the message names them too.
    """

    path: str | None = None
    tensor: str | None = None

    def __init__(self, *args: object, path: object = None, tensor: str | None = None) -> None:
        super().__init__(*args)
        self.path = None if path is None else str(path)
        self.tensor = tensor


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
