"""The ``mergex`` command line: thin Typer commands over the public API.

Errors print one line (``error: …``) and exit 2 for usage and configuration problems,
1 for everything else, 130 when interrupted; ``-v`` shows the traceback.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from typer.core import TyperCommand

from .display import ProgressBar, plan_sweep, print_nodes
from .errors import ConfigError, MergexError

if TYPE_CHECKING:
    pass

app = typer.Typer(
    name="mergex",
    help="Merge fine-tuned LLM checkpoints within a fixed RAM budget.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


class _Command(TyperCommand):
    """Usage lines as ``mergex merge [OPTIONS] CONFIG OUT``: typer writes required arguments
    in braces (``{CONFIG}``), which reads like a set of choices."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        return [p.removeprefix("{").removesuffix("}") for p in super().collect_usage_pieces(ctx)]


ShardSize = Annotated[
    str | None,
    typer.Option("--shard-size", help="Largest output file, e.g. 2GB or 500MiB \\[default: 5GB]."),
]
Seed = Annotated[
    int | None,
    typer.Option("--seed", min=0, max=2**32 - 1, help="Seed of random methods \\[default: 0]."),
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks on errors.")]
RamBudget = Annotated[
    str | None,
    typer.Option(
        "--ram-budget",
        help="Memory budget, e.g. 512MiB or 4GiB \\[default: 1/4 of available, ≤ 4GiB].",
    ),
]
Threads = Annotated[int | None, typer.Option("--threads", help="Worker threads \\[default: all CPUs].")]
RayAddress = Annotated[
    str | None,
    typer.Option(
        "--ray",
        metavar="[ADDRESS]",
        help="Run on a Ray cluster (pip install 'mergex\\[ray]'): auto (the cluster this machine is "
        "in), an address, or nothing to start one here; outputs and inputs on a filesystem every "
        "node sees.",
    ),
]
Offline = Annotated[
    bool, typer.Option("--offline", help="Hub models from the Hugging Face cache only (as HF_HUB_OFFLINE=1).")
]


def _fail(message: str, code: int) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return " ".join(text.split())


@contextmanager
def _errors(verbose: bool) -> Iterator[None]:
    """Turn exceptions into one-line errors and exit codes."""
    try:
        yield
    except typer.Exit:
        raise
    except BrokenPipeError:
        # stdout was closed early (`mergex inspect … | head`): not an error of ours.
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the interpreter's final flush
        raise typer.Exit(0) from None
    except KeyboardInterrupt:
        if verbose:
            traceback.print_exc()
        _fail("interrupted; no output was written", 130)
    except ConfigError as e:
        if verbose:
            traceback.print_exc()
        _fail(_one_line(e), 2)
    except (MergexError, OSError) as e:
        if verbose:
            traceback.print_exc()
        _fail(_one_line(e), 1)


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@app.command(cls=_Command)
def merge(
    config: Annotated[Path, typer.Argument(metavar="CONFIG", help="The merge configuration (YAML).")],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="The output folder.")],
    ram_budget: RamBudget = None,
    threads: Threads = None,
    shard_size: ShardSize = None,
    seed: Seed = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing output folder.")
    ] = False,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue a merge into OUT that was killed: keep its verified shards."),
    ] = False,
    device: Annotated[
        str,
        typer.Option("--device", help="cpu, cuda or cuda:N; a CUDA device runs the torch engine."),
    ] = "cpu",
    engine: Annotated[
        str | None,
        typer.Option("--engine", help="rust or torch (needs mergex\\[torch]) \\[default: rust on cpu]."),
    ] = None,
    gpu_budget: Annotated[
        str | None,
        typer.Option("--gpu-budget", help="Device memory for chunks, e.g. 8GiB \\[default: 80% of free]."),
    ] = None,
    offline: Offline = False,
    intermediate_dir: Annotated[
        Path | None,
        typer.Option(
            "--intermediate-dir", help="A recipe's stage folders \\[default: .OUT.stages beside OUT]."
        ),
    ] = None,
    lazy: Annotated[
        bool, typer.Option("--lazy", help="Reuse a recipe's stages already complete (and keep them).")
    ] = False,
    keep_intermediates: Annotated[
        bool, typer.Option("--keep-intermediates", help="Keep a recipe's stage folders.")
    ] = False,
    ray: RayAddress = None,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Merge the models of CONFIG into the folder OUT (a multi-document CONFIG is a recipe of
    stages; its final document goes to OUT)."""
    from .api import merge as run_merge
    from .units import format_size

    signal.signal(signal.SIGTERM, _sigterm)
    bar = ProgressBar() if not quiet and sys.stderr.isatty() else None
    with _errors(verbose), bar or nullcontext():
        result = run_merge(
            config,
            out,
            ram_budget=ram_budget,
            threads=threads,
            shard_size=shard_size,
            seed=seed,
            overwrite=overwrite,
            progress=bar.update if bar is not None else None,
            resume=resume,
            engine=engine,
            device=device,
            gpu_budget=gpu_budget,
            offline=offline,
            intermediate_dir=intermediate_dir,
            lazy=lazy,
            keep_intermediates=keep_intermediates,
            ray=ray,
        )
        for w in result.warnings:
            typer.echo(f"warning: {w}", err=True)
        if not quiet:
            print_nodes(result.nodes)
        if not quiet:
            rate = result.bytes_read / result.seconds / 1e9 if result.seconds > 0 else 0.0
            typer.echo(
                f"wrote {result.out_dir} ({len(result.files)} files, {format_size(result.bytes_written)}) "
                f"in {result.seconds:.1f} s; read {format_size(result.bytes_read)} at {rate:.2f} GB/s; "
                f"peak RSS {format_size(result.peak_rss)}"
            )
            sample = [f"sample: {result.sample_seconds:.1f} s"] if result.sample_seconds > 0 else []
            passes = [f"statistics {i + 1}: {t:.1f} s" for i, t in enumerate(result.stat_pass_seconds)]
            typer.echo(
                "passes: "
                + ", ".join([*sample, *passes, f"output: {result.output_seconds:.1f} s"])
                + f"; kernels: {result.kernels}"
            )


@app.command(cls=_Command)
def sweep(
    config: Annotated[Path, typer.Argument(metavar="CONFIG", help="The sweep configuration (YAML).")],
    outdir: Annotated[Path, typer.Argument(metavar="OUTDIR", help="The folder of the members' outputs.")],
    ram_budget: RamBudget = None,
    threads: Threads = None,
    shard_size: ShardSize = None,
    seed: Seed = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace members' folders that exist.")
    ] = False,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Finish an interrupted sweep: keep the verified complete members."),
    ] = False,
    offline: Offline = False,
    ray: RayAddress = None,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Run every merge of a sweep CONFIG into OUTDIR/NAME, reading the inputs once per pass for
    all the members that share them (a multi-document CONFIG, or one whose parameters hold
    {sweep: [...]} lists)."""
    from .sweeps import sweep as run_sweep
    from .units import format_size

    signal.signal(signal.SIGTERM, _sigterm)
    bar = ProgressBar() if not quiet and sys.stderr.isatty() else None
    with _errors(verbose), bar or nullcontext():
        clock = time.perf_counter()
        results = run_sweep(
            config,
            outdir,
            ram_budget=ram_budget,
            threads=threads,
            shard_size=shard_size,
            seed=seed,
            overwrite=overwrite,
            resume=resume,
            progress=bar.update if bar is not None else None,
            offline=offline,
            ray=ray,
        )
        for r in results:
            for w in r.warnings:
                typer.echo(f"warning: {r.out_dir.name}: {w}", err=True)
        if not quiet:
            for r in results:
                typer.echo(f"wrote {r.out_dir} ({len(r.files)} files, {format_size(r.bytes_written)})")
            seconds = time.perf_counter() - clock
            read = max((r.bytes_read for r in results), default=0)
            typer.echo(f"sweep of {len(results)} members in {seconds:.1f} s; read {format_size(read)} in all")
            print_nodes([n for r in results for n in r.nodes])


@app.command(cls=_Command)
def plan(
    config: Annotated[Path, typer.Argument(metavar="CONFIG", help="The merge configuration (YAML).")],
    ram_budget: RamBudget = None,
    threads: Threads = None,
    shard_size: ShardSize = None,
    throughput: Annotated[
        str | None,
        typer.Option(
            "--throughput",
            help="Measured throughput in bytes read per second over all passes, e.g. 2.7GB (the "
            "'read … at … GB/s' of an earlier merge's summary), to project the merge time.",
        ),
    ] = None,
    offline: Offline = False,
    sweep: Annotated[
        bool, typer.Option("--sweep", help="CONFIG is a sweep of several documents (see 'mergex sweep').")
    ] = False,
    verbose: Verbose = False,
) -> None:
    """Show what a merge will read and write, its chunks, passes, shards and peak memory (for
    a sweep: what it reads against its members merged one by one)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from .api import plan as make_plan
    from .units import format_size, parse_size

    with _errors(verbose):
        from .sweeps import is_sweep

        if sweep or is_sweep(config):
            plan_sweep(config, ram_budget, threads, shard_size, offline)
            return
        p = make_plan(config, ram_budget=ram_budget, threads=threads, shard_size=shard_size, offline=offline)
        c = Console()
        c.print(f"[bold]{p.method}[/] merge of {len(p.models)} models, {p.tensors} output tensors")
        for m, fmt in zip(p.models, p.formats, strict=True):
            c.print(f"  reads {m} ({escape(fmt)})")
        c.print(f"  writes {p.output_format}")
        passes = ", ".join(
            f"{n} tensors in {k} pass{'es' if k > 1 else ''}" for k, n in sorted(p.passes.items())
        )
        c.print(
            f"input tensors: {format_size(p.input_bytes)}; "
            f"read over all passes: {format_size(p.bytes_read)} ({passes})"
        )
        c.print(f"output: {format_size(p.bytes_written)} in {len(p.shards)} file(s)")
        if p.download_bytes:
            c.print(f"download from the Hub: {format_size(p.download_bytes)} (a plan downloads only headers)")
        t = Table("file", "bytes", "tensors")
        for name, size, n in p.shards:
            t.add_row(name, format_size(size), str(n))
        c.print(t)
        c.print(
            f"RAM budget {format_size(p.ram_budget)}, {p.threads} threads, chunks of up to "
            f"{p.max_chunk_elems:,} elements; estimated peak memory {format_size(p.peak_memory)}"
        )
        if throughput is not None:
            rate = parse_size(throughput, "throughput")
            seconds = p.bytes_read / rate
            c.print(
                f"projected time at {format_size(rate)}/s: {seconds:,.0f} s ({seconds / 3600:.2f} h) "
                f"for {format_size(p.bytes_read)} read over all passes"
            )
        for w in p.warnings:
            c.print(f"[yellow]warning:[/] {w}")


@app.command(cls=_Command)
def inspect(
    path: Annotated[Path, typer.Argument(metavar="PATH", help="A checkpoint folder or .safetensors file.")],
    verbose: Verbose = False,
) -> None:
    """List the tensors of a checkpoint: name, dtype, shape and bytes; a quantized checkpoint's
    weights as one row each (plain name, format), their scales folded in."""
    from rich.console import Console
    from rich.table import Table

    from .api import inspect as read_tensors
    from .models import Model
    from .quant import check, detect
    from .units import format_size

    with _errors(verbose):
        c = Console()
        found, quantized = None, {}
        if path.is_dir():  # a model folder: its format too, from the same headers
            model = Model.open(str(path.absolute()))
            tensors = list(model.tensors.values())
            found = detect(model)
            if found is not None and found.family is not None:
                quantized = check(model)
        else:
            tensors = read_tensors(path)
        folded = {
            n
            for q in quantized.values()
            for n in (q.scale, q.global_scale, q.weight_shape, q.zero_point)
            if n
        }
        size = {x.name: x.nbytes for x in tensors}
        t = Table("tensor", "dtype", "shape", "bytes")
        for x in tensors:
            if x.name in folded:
                continue
            q = quantized.get(x.name)
            if q is None:
                t.add_row(x.name, x.dtype, str(list(x.shape)), format_size(x.nbytes))
                continue
            block = f"{q.block[0]}x{q.block[1]} blocks" if q.block else "per tensor"
            kind = f"INT{q.int_bits} (I32 words)" if q.int_bits else "FP4 (E2M1)" if q.fp4 else x.dtype
            what = f"{kind}, {block}" + (", stored transposed" if q.transposed else "")
            extra = sum(size[n] for n in (q.global_scale, q.weight_shape, q.zero_point) if n)
            nbytes = x.nbytes + size[q.scale] + extra
            shape = str(list(q.shape or x.shape))
            t.add_row(q.plain or x.name, what, shape, format_size(nbytes))
        c.print(t)
        files = len({x.file for x in tensors})
        c.print(f"{len(tensors)} tensors, {format_size(sum(x.nbytes for x in tensors))} in {files} file(s)")
        if found is not None:
            how = (
                f"read by mergex ({len(quantized)} quantized weights, scales folded in above)"
                if quantized
                else ("refused" if found.refused else "not read yet")
            )
            c.print(f"format: {found.format} ({found.signal}); {how}")


@app.command("extract-lora", cls=_Command)
def extract_lora(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="The fine-tuned model (path or org/name).")],
    base: Annotated[str, typer.Argument(metavar="BASE", help="The model it was tuned from.")],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="The adapter folder to write.")],
    rank: Annotated[int, typer.Option("--rank", "-r", min=1, help="The adapter's rank.")],
    include: Annotated[
        str | None, typer.Option("--include", help="Only tensors whose name matches this regex.")
    ] = None,
    exclude: Annotated[
        str | None, typer.Option("--exclude", help="Leave out tensors whose name matches this regex.")
    ] = None,
    embeddings: Annotated[
        bool, typer.Option("--embeddings", help="Also extract embedding and lm_head adapters.")
    ] = False,
    ram_budget: RamBudget = None,
    threads: Threads = None,
    seed: Annotated[
        int, typer.Option("--seed", min=0, help="Seed of the randomized SVD \\[default: 0].")
    ] = 0,
    device: Annotated[
        str, typer.Option("--device", help="cpu (numpy) or cuda[:N] (torch.linalg on the GPU).")
    ] = "cpu",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing output folder.")
    ] = False,
    offline: Offline = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Write a PEFT LoRA adapter to OUT whose B·A approximates MODEL - BASE."""
    from .extract import extract_lora as run_extract
    from .units import format_size

    signal.signal(signal.SIGTERM, _sigterm)
    bar = _CountBar("extracting") if not quiet and sys.stderr.isatty() else None
    with _errors(verbose), bar or nullcontext():
        result = run_extract(
            model,
            base,
            out,
            rank=rank,
            include=include,
            exclude=exclude,
            embeddings=embeddings,
            ram_budget=ram_budget,
            threads=threads,
            seed=seed,
            device=device,
            overwrite=overwrite,
            offline=offline,
            progress=bar.update if bar is not None else None,
        )
        for w in result.warnings:
            typer.echo(f"warning: {w}", err=True)
        if not quiet:
            typer.echo(
                f"wrote {result.out_dir}: rank-{rank} adapters for {len(result.targets)} modules "
                f"({result.exact} by exact SVD), {len(result.saved)} tensors saved whole, in "
                f"{result.seconds:.1f} s; read {format_size(result.bytes_read)}; "
                f"peak RSS {format_size(result.peak_rss)}"
            )


class _CountBar:
    """A progress bar over a count of items (rich, on stderr)."""

    def __init__(self, what: str) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn(f"[bold]{what}[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        self.task = self.bar.add_task(what, total=None)

    def __enter__(self) -> _CountBar:
        self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()

    def update(self, done: int, total: int) -> None:
        self.bar.update(self.task, completed=done, total=total)


@app.command(cls=_Command)
def methods() -> None:
    """List the merge methods with their parameters and defaults."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from .methods import METHODS

    t = Table(show_lines=True)
    t.add_column("method", no_wrap=True)
    t.add_column("what it computes")
    t.add_column("base")
    t.add_column("passes", no_wrap=True)
    t.add_column("parameters (default; * per model)", overflow="fold")
    for m in METHODS.values():
        params = ", ".join(f"{p.name}{'*' if p.per_model else ''}={p.default_text()}" for p in m.params)
        summary = f"{m.summary} (passes: {m.passes_note})" if m.passes_note else m.summary
        t.add_row(m.name, escape(summary), m.base, m.passes, escape(params) or "-")
    Console().print(t)


def _bare_ray(args: list[str]) -> list[str]:
    """``--ray`` with no address (last, or before another option) starts a local cluster."""
    out = []
    for i, a in enumerate(args):
        out.append(a)
        if a == "--ray" and (i + 1 == len(args) or args[i + 1].startswith("-")):
            out.append("local")
    return out


def main() -> None:
    """Console entry point: usage errors are one line too (``error: …``, exit 2)."""
    try:
        code = app(args=_bare_ray(sys.argv[1:]), standalone_mode=False)
    except Exception as e:
        # Typer's (vendored) click exceptions: usage errors carry a message and an exit code.
        message, exit_code = getattr(e, "format_message", None), getattr(e, "exit_code", None)
        if message is None or exit_code is None:
            raise
        ctx = getattr(e, "ctx", None)
        if type(e).__name__ == "NoArgsIsHelpError" and ctx is not None:
            typer.echo(ctx.get_help())
            sys.exit(0)
        command = f"mergex {ctx.info_name}" if ctx is not None and ctx.parent is not None else "mergex"
        typer.echo(f"error: {' '.join(message().split())} (see '{command} --help')", err=True)
        sys.exit(exit_code or 2)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
