"""A running merge's progress, and the worker thread that runs an engine while the caller's
thread reports it (and cancels it on Ctrl-C)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["MergeProgress", "ProgressCallback", "counts", "run_with_progress"]


@dataclass(frozen=True)
class MergeProgress:
    """Where a running merge stands, as handed to a ``progress`` callback about ten times a
    second."""

    bytes_done: int
    """Input bytes processed, over all passes."""
    bytes_total: int
    """Input bytes to process, over all passes (0 until known)."""
    tensors_done: int
    tensors_total: int
    stage: str = "merging"
    """``downloading`` while Hub files are fetched (bytes then count the download, and
    :attr:`files_done` / :attr:`files_total` the files), then ``merging``."""
    files_done: int = 0
    files_total: int = 0


ProgressCallback = Callable[[MergeProgress], None]


def counts(progress: ProgressCallback) -> Callable[..., None]:
    """``progress`` fed the engine's four counts."""
    return lambda *counts: progress(MergeProgress(*counts))


def run_with_progress(target: Any, run: Callable[[], Any], on_progress: ProgressCallback | None) -> Any:
    """``run()`` in a worker thread, so the main thread stays responsive to Ctrl-C and can
    report ``target.progress()``; on KeyboardInterrupt (or an exception the callback raises)
    ``target`` is cancelled and the worker joined."""
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            result["value"] = run()
        except BaseException as e:  # handed to the main thread
            result["error"] = e

    t = threading.Thread(target=work, name="mergex-engine", daemon=True)
    t.start()
    try:
        while t.is_alive():
            t.join(0.1)
            if on_progress is not None:
                on_progress(MergeProgress(*target.progress()))
    except BaseException:
        target.cancel()
        t.join()
        raise
    if "error" in result:
        raise result["error"]
    return result["value"]
