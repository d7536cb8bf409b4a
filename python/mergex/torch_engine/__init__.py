"""The torch path: the Rust engine's plan, reader and writer, with the arithmetic of every
method done by torch on a CPU or a CUDA device (``--device cuda``, ``--engine torch``).

Only :func:`load_torch` and :func:`run` are used from outside; torch is imported when this
path is chosen, never by ``import mergex``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:
    from types import ModuleType

    from .._mergex import MergeJob, RunSummary, TensorInfo
    from ..job import EngineJob

__all__ = ["check_device", "load_torch", "run"]


def load_torch() -> ModuleType:
    """Import torch, or say how to get it."""
    try:
        import torch
    except ImportError as e:
        raise ConfigError(
            "the torch engine needs PyTorch, which is not installed: pip install 'mergex[torch]'"
        ) from e
    return torch


def check_device(device: str) -> str:
    """Validate a ``--device`` value (cpu, cuda, cuda:N) against what torch sees."""
    torch = load_torch()
    if device == "cpu":
        return device
    if device != "cuda" and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise ConfigError(f"device: expected cpu, cuda or cuda:N, got {device!r}")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {device}: torch sees no CUDA GPU (torch {torch.__version__})")
    index = int(device[5:]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        raise ConfigError(f"device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return device


def run(job: MergeJob, stream: Any, infos: list[TensorInfo], spec: EngineJob, **kw: Any) -> RunSummary:
    from .driver import Driver

    return Driver(job, stream, infos, spec, **kw).run()
