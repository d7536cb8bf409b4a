"""What the command line shows: the progress bar, a sweep's plan, Ray nodes' throughput."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from .progress import MergeProgress

__all__ = ["ProgressBar", "plan_sweep", "print_nodes"]


class ProgressBar:
    """The merge's progress bar (rich, on stderr): bytes over all passes, their rate, the
    tensors finished and the time left."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.bar = Progress(
            TextColumn("[bold]{task.fields[stage]}[/]"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TextColumn("{task.fields[tensors]}"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        self.task = self.bar.add_task("merge", total=None, tensors="", stage="merging")
        self.stage = "merging"

    def __enter__(self) -> ProgressBar:
        self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()

    def update(self, p: MergeProgress) -> None:
        if p.stage == "downloading":
            count = f"{p.files_done}/{p.files_total} files"
        else:
            count = f"{p.tensors_done}/{p.tensors_total} tensors"
        if p.stage != self.stage:
            # A new stage starts its bar (and rate) from zero.
            self.stage = p.stage
            self.bar.reset(self.task)
        self.bar.update(
            self.task, completed=p.bytes_done, total=p.bytes_total or None, tensors=count, stage=p.stage
        )


def print_nodes(nodes: list[Any]) -> None:
    """Per Ray node: its tasks, what they read and at what rate."""
    from .units import format_size

    for n in nodes:
        typer.echo(
            f"node {n.node}: {n.tasks} task(s), read {format_size(n.bytes_read)} in {n.seconds:.1f} s "
            f"({n.rate / 1e9:.2f} GB/s)"
        )


def plan_sweep(
    config: Path, ram_budget: str | None, threads: int | None, shard_size: str | None, offline: bool
) -> None:
    from .sweeps import sweep_plan
    from .units import format_size

    p = sweep_plan(config, ram_budget=ram_budget, threads=threads, shard_size=shard_size, offline=offline)
    typer.echo(f"sweep of {len(p.members)} members in {len(p.groups)} group(s) reading the same inputs")
    for g in p.groups:
        typer.echo(f"  together: {', '.join(g)}")
    if p.later:
        typer.echo(f"  built on other members, planned once those exist: {', '.join(p.later)}")
    ratio = p.separate_bytes_read / p.bytes_read if p.bytes_read else 0.0
    typer.echo(
        f"reads {format_size(p.bytes_read)} over all passes; merged one by one they would read "
        f"{format_size(p.separate_bytes_read)} ({ratio:.1f}x); writes {format_size(p.bytes_written)}"
    )
