r"""End-to-end merge benchmark: mergex against a plain read of the same input bytes.

For each method the script writes a merge config over a set made by ``make_experts.py``,
then measures in the same run:

* **read**: the time to read every input safetensors file once, sequentially, with large
  reads (what the targets compare against);
* **read ∥**: the same bytes read once by all the merge's threads together, each taking
  every Nth 4 MiB piece of every file (the least a merge on this many cores can spend
  reading them);
* **write ∥**: as many bytes as the merge wrote, written by the same threads together over
  a file of that size already in the page cache (a pure copy: no page to allocate, no
  flush): the least a merge can spend writing;
* **fixed**: the same CLI merging a one-tensor model (its start-up, config, plan and
  flush: what every merge costs whatever its size);
* **mergex**: ``mergex merge CONFIG OUT --ram-budget B --overwrite --quiet`` as a child
  process, timed, with that child's own peak RSS from ``os.wait4``;
* **mergekit** (with ``--mergekit PYTHON``): ``mergekit-yaml CONFIG OUT`` from that
  interpreter's environment, timed the same way.

The page cache is warm by default (inputs read once before measuring); ``--cold`` evicts
the inputs with ``posix_fadvise(DONTNEED)`` before every measured read or merge.

Example::

    python benches/bench.py /tmp/set --generate --preset qwen2.5-0.5b --layers 2 \
        --experts 2 --ram-budget 64MiB --methods linear,task_arithmetic,ties
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

# The sibling script; ``python benches/bench.py`` puts this folder first on sys.path.
import make_experts

READ_BUFFER = 16 * 1024 * 1024
PARALLEL_PIECE = 4 * 1024 * 1024  # a thread's share of a file, round-robin
PARALLEL_READ = 512 * 1024  # one read within a piece
TASK_FAMILY = {
    "task_arithmetic",
    "ties",
    "dare_ties",
    "dare_linear",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
}
SPARSE_DENSITY = 0.2

Config = dict[str, object]


# --- the set and the configs ----------------------------------------------------


@dataclass(frozen=True)
class ModelSet:
    """A base model and its experts, as ``make_experts.py`` lays them out."""

    root: Path
    base: Path
    experts: list[Path]


def find_set(root: Path) -> ModelSet:
    """Locate ``base`` and ``expert_{k}`` folders under ``root``."""
    base = root / "base"
    if not (base / "config.json").is_file():
        raise SystemExit(f"error: {base} is not a model folder (generate a set first)")
    experts = [
        d
        for d in root.glob("expert_*")
        if d.name.removeprefix("expert_").isdigit() and (d / "config.json").is_file()
    ]
    experts.sort(key=lambda d: int(d.name.removeprefix("expert_")))
    if not experts:
        raise SystemExit(f"error: no expert_* folders in {root}")
    return ModelSet(root.resolve(), base.resolve(), [e.resolve() for e in experts])


def method_config(method: str, models: ModelSet) -> Config:
    """A merge config for ``method`` over the set, as each method takes inputs."""
    base, experts = str(models.base), [str(e) for e in models.experts]
    k = len(experts)

    def listed(paths: list[str], **params: object) -> list[Config]:
        return [{"model": p, "parameters": dict(params)} if params else {"model": p} for p in paths]

    if method == "linear":
        return {"merge_method": method, "models": listed(experts, weight=1.0)}
    if method in TASK_FAMILY:
        params: dict[str, object] = {"weight": round(1.0 / k, 6)}
        if method != "task_arithmetic":
            params["density"] = SPARSE_DENSITY
        return {
            "merge_method": method,
            "base_model": base,
            "models": listed(experts, **params),
        }
    if method in ("slerp", "nearswap"):
        # One model besides the base; nearswap's t is on the scale of the deltas.
        t = 0.5 if method == "slerp" else 0.001
        return {
            "merge_method": method,
            "base_model": base,
            "models": listed([experts[0]]),
            "parameters": {"t": t},
        }
    if method == "arcee_fusion":
        return {
            "merge_method": method,
            "base_model": base,
            "models": listed([experts[0]]),
        }
    if method == "nuslerp":
        return {
            "merge_method": method,
            "base_model": base,
            "models": listed(experts[:2], weight=0.5),
        }
    if method == "karcher":
        return {"merge_method": method, "models": listed(experts)}
    if method == "passthrough":
        return {"merge_method": method, "models": listed([experts[0]])}
    if method == "sce":
        return {
            "merge_method": method,
            "base_model": base,
            "models": listed(experts),
            "parameters": {"select_topk": 0.5},
        }
    if method in ("model_stock", "ram", "ramplus_tl"):
        return {"merge_method": method, "base_model": base, "models": listed(experts)}
    # multislerp and any other name: base plus every expert with equal weights; the tool
    # says so if the method does not exist or wants other parameters.
    return {
        "merge_method": method,
        "base_model": base,
        "models": listed(experts, weight=round(1.0 / k, 6)),
    }


def config_inputs(config: Config) -> list[Path]:
    """The model folders a config reads, base first, without repeats."""
    refs: list[str] = []
    if "base_model" in config:
        refs.append(str(config["base_model"]))
    models = config.get("models", [])
    if isinstance(models, list):
        refs += [str(m["model"]) for m in models]
    return [Path(r) for r in dict.fromkeys(refs)]


def safetensors_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder."""
    return sorted(folder.glob("*.safetensors"))


def to_yaml(value: object, indent: int = 0) -> str:
    """Emit the YAML subset the configs use (maps, lists, scalars), block style.

    Strings are JSON-quoted, which YAML reads as double-quoted scalars; this keeps the
    benchmark free of a YAML dependency.
    """
    pad = " " * indent
    if isinstance(value, dict):
        if not value:
            return "{}\n"
        lines = []
        for key, item in value.items():
            if isinstance(item, dict | list) and item:
                lines.append(f"{pad}{key}:\n{to_yaml(item, indent + 2)}")
            else:
                lines.append(f"{pad}{key}: {to_yaml(item).strip()}\n")
        return "".join(lines)
    if isinstance(value, list):
        if not value:
            return "[]\n"
        lines = []
        for item in value:
            if isinstance(item, dict | list) and item:
                body = to_yaml(item, indent + 2)[indent + 2 :]
            else:
                body = to_yaml(item)
            lines.append(f"{pad}- {body}")
        return "".join(lines)
    if isinstance(value, bool):
        return "true\n" if value else "false\n"
    if isinstance(value, int | float):
        return f"{value!r}\n"
    return json.dumps(str(value)) + "\n"


# --- measuring ------------------------------------------------------------------


def evict(files: list[Path]) -> None:
    """Drop the files from the page cache (dirty pages are written back first)."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_all(files: list[Path]) -> tuple[float, int]:
    """Read every file once, in order, discarding the data; return (seconds, bytes)."""
    buf = bytearray(READ_BUFFER)
    total = 0
    start = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return time.perf_counter() - start, total


def usable_cpus() -> int:
    """The CPUs this process may run on (mergex's default thread count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def offsets(t: int, threads: int, size: int) -> list[int]:
    """Where thread ``t`` of ``threads`` reads or writes a file of ``size`` bytes: its pieces
    ``t, t + threads, …`` of ``PARALLEL_PIECE`` bytes, in steps of ``PARALLEL_READ``."""
    return [
        at
        for piece in range(t * PARALLEL_PIECE, size, threads * PARALLEL_PIECE)
        for at in range(piece, min(piece + PARALLEL_PIECE, size), PARALLEL_READ)
    ]


def on_threads(work: Callable[[int], None], threads: int) -> float:
    """Run ``work(t)`` for every ``t < threads`` on threads of their own; the seconds."""
    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return time.perf_counter() - start


def read_parallel(files: list[Path], threads: int) -> float:
    """Read every file once with ``threads`` threads together (``offsets``, as the merge's
    workers share a tensor's chunks; the reads release the GIL); return the seconds."""
    sizes = [p.stat().st_size for p in files]

    def work(t: int) -> None:
        buf = memoryview(bytearray(PARALLEL_READ))
        for path, size in zip(files, sizes, strict=True):
            fd = os.open(path, os.O_RDONLY)
            try:
                for at in offsets(t, threads, size):
                    os.preadv(fd, [buf], at)
            finally:
                os.close(fd)

    return on_threads(work, threads)


def write_parallel(path: Path, size: int, threads: int) -> float:
    """Write ``size`` bytes over the file ``path`` with ``threads`` threads together
    (``offsets``); return the seconds. The file is first filled (not timed), so the timed
    writes only copy into pages the page cache already holds: no merge can put its output
    there for less. The file is removed unflushed.
    """
    buf = memoryview(os.urandom(PARALLEL_READ))
    fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644)

    def work(t: int) -> None:
        for at in offsets(t, threads, size):
            os.pwrite(fd, buf[: min(PARALLEL_READ, size - at)], at)

    try:
        on_threads(work, threads)
        return on_threads(work, threads)
    finally:
        os.close(fd)
        path.unlink()


def tiny_merge(work: Path, base_cmd: list[str]) -> list[str]:
    """A linear merge of two one-tensor models (256 bf16 zeros) in ``work/tiny``: the CLI
    command whose time is the fixed cost of any merge through it."""
    root = work / "tiny"
    header = json.dumps({"w": {"dtype": "BF16", "shape": [256], "data_offsets": [0, 512]}}).encode()
    header += b" " * (-len(header) % 8)
    lines = ["merge_method: linear", "models:"]
    for name in ("a", "b"):
        (root / name).mkdir(parents=True, exist_ok=True)
        data = len(header).to_bytes(8, "little") + header + bytes(512)
        (root / name / "model.safetensors").write_bytes(data)
        lines += [f"  - model: {json.dumps(str(root / name))}", "    parameters: {weight: 1.0}"]
    config = root / "tiny.yml"
    config.write_text("\n".join(lines) + "\n")
    return [*base_cmd, "merge", str(config), str(root / "out"), "--overwrite", "--quiet"]


@dataclass
class ChildRun:
    """One timed child process."""

    seconds: float
    peak_rss: int  # bytes
    returncode: int
    stderr: str


# Runs the measured command as its own child and reports that child's rusage. Measuring
# a direct child of this script would be wrong on Linux: a vfork-ed child execs from our
# address space, and exec folds that space's RSS high-water mark (numpy, read buffers,
# generation blocks) into the child's ru_maxrss. A grandchild forked from this small
# wrapper starts from the wrapper's ~13 MiB instead, which is the floor of the numbers.
_WRAPPER = """
import json, os, sys, time
start = time.perf_counter()
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
seconds = time.perf_counter() - start
with open(sys.argv[1], "w") as f:
    json.dump([seconds, usage.ru_maxrss, os.waitstatus_to_exitcode(status)], f)
"""


def run_child(cmd: list[str]) -> ChildRun:
    """Run ``cmd``; time it and read its own peak RSS from ``os.wait4``."""
    with (
        tempfile.TemporaryDirectory() as tmp,
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
    ):
        report = Path(tmp) / "rusage.json"
        wrapper = [sys.executable, "-c", _WRAPPER, str(report), *cmd]
        proc = subprocess.run(wrapper, check=False, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        err.seek(0)
        stderr = err.read().decode(errors="replace")
        if not report.is_file():  # the command could not be started at all
            return ChildRun(0.0, 0, proc.returncode or 127, stderr)
        seconds, maxrss, returncode = json.loads(report.read_text())
    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return ChildRun(seconds, maxrss * scale, returncode, stderr)


def mergex_command(override: str | None) -> list[str]:
    """How to start the mergex CLI: ``--mergex``, else the script beside this Python."""
    if override:
        return shlex.split(override)
    beside = Path(sys.executable).parent / "mergex"
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("mergex")
    if found:
        return [found]
    return [sys.executable, "-c", "from mergex.cli import app; app()"]


def mergekit_command(python: str) -> list[str]:
    """How to start mergekit-yaml from the environment of interpreter ``python``."""
    beside = Path(python).parent / "mergekit-yaml"
    if beside.is_file():
        return [str(beside)]
    code = "import sys; sys.argv[0] = 'mergekit-yaml'; from mergekit.scripts.run_yaml import main; main()"
    return [python, "-c", code]


def folder_bytes(folder: Path) -> int:
    """Total size of the safetensors files in ``folder`` (0 if it does not exist)."""
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) if folder.is_dir() else 0


def best_run(cmd: list[str], repeat: int, out: Path) -> ChildRun:
    """The fastest of ``repeat`` runs of ``cmd`` (``out`` removed before each); exits with
    the command's stderr if one fails."""
    runs = []
    for _ in range(repeat):
        shutil.rmtree(out, ignore_errors=True)
        run = run_child(cmd)
        if run.returncode != 0:
            raise SystemExit(f"error: {' '.join(cmd)} failed:\n{run.stderr}")
        runs.append(run)
    return min(runs, key=lambda r: r.seconds)


def best_of(seconds: list[float]) -> float:
    """The fastest of some timings (NaN if there are none)."""
    return min(seconds, default=float("nan"))


@dataclass
class Result:
    """All measurements of one method with one tool."""

    method: str
    tool: str
    input_bytes: int
    read_seconds: list[float] = field(default_factory=list)
    parallel_read_seconds: list[float] = field(default_factory=list)
    parallel_write_seconds: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    peak_rss: list[int] = field(default_factory=list)
    output_bytes: int = 0
    error: str | None = None

    @property
    def best_read(self) -> float:
        """Fastest read of the inputs."""
        return best_of(self.read_seconds)

    @property
    def best_parallel_read(self) -> float:
        """Fastest read of the inputs by all the merge's threads."""
        return best_of(self.parallel_read_seconds)

    @property
    def best_parallel_write(self) -> float:
        """Fastest write of the output's size by all the merge's threads."""
        return best_of(self.parallel_write_seconds)

    @property
    def best(self) -> float:
        """Fastest merge."""
        return best_of(self.seconds)


def measure(
    name: str,
    tool: str,
    cmd: list[str],
    inputs: list[Path],
    out: Path,
    args: argparse.Namespace,
) -> Result:
    """Time ``repeat`` rounds of (read the inputs, run ``cmd``) for one method."""
    input_bytes = sum(p.stat().st_size for p in inputs)
    result = Result(name, tool, input_bytes)
    if not args.cold:
        read_all(inputs)  # warm the page cache so read and merge both start warm
    for i in range(args.repeat):
        os.sync()  # a previous output's writeback must not overlap the measurements
        if args.cold:
            evict(inputs)
        secs, _ = read_all(inputs)
        result.read_seconds.append(secs)
        if args.cold:
            evict(inputs)
        threads = args.threads or usable_cpus()
        result.parallel_read_seconds.append(read_parallel(inputs, threads))
        if out.exists():
            shutil.rmtree(out)
        os.sync()
        if args.cold:
            evict(inputs)
        run = run_child(cmd)
        if run.returncode != 0:
            lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
            result.error = f"exit {run.returncode}: " + (lines[-1] if lines else "(no stderr)")
            print(f"  {tool} {name}: FAILED {result.error}", flush=True)
            if args.verbose:
                print(run.stderr, file=sys.stderr)
            break
        result.output_bytes = folder_bytes(out)
        if result.output_bytes == 0:
            result.error = f"exit 0 but no safetensors files in {out}"
            print(f"  {tool} {name}: FAILED {result.error}", flush=True)
            break
        result.seconds.append(run.seconds)
        result.peak_rss.append(run.peak_rss)
        os.sync()  # the output's writeback must not overlap the measured write
        result.parallel_write_seconds.append(
            write_parallel(out.parent / ".write-floor", result.output_bytes, threads)
        )
        print(
            f"  {tool} {name} [{i + 1}/{args.repeat}]: read {secs:.2f} s"
            f" ({result.parallel_read_seconds[-1]:.2f} s on all threads),"
            f" merge {run.seconds:.2f} s, peak RSS {run.peak_rss / 2**20:.0f} MiB,"
            f" writing its output's size on all threads {result.parallel_write_seconds[-1]:.2f} s",
            flush=True,
        )
    if not args.keep_output and out.exists():
        shutil.rmtree(out)
    return result


def measure_fixed(work: Path, base_cmd: list[str], args: argparse.Namespace) -> float | None:
    """The best of at least three runs of ``tiny_merge``, or None if it fails."""
    cmd = tiny_merge(work, base_cmd)
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    best = None
    for _ in range(max(3, args.repeat)):
        run = run_child(cmd)
        if run.returncode != 0:
            print(f"  fixed cost not measured: the one-tensor merge failed (exit {run.returncode})")
            if args.verbose:
                print(run.stderr, file=sys.stderr)
            return None
        best = run.seconds if best is None else min(best, run.seconds)
    print(f"  fixed cost (one-tensor merge): {best:.3f} s", flush=True)
    return best


# --- reporting ------------------------------------------------------------------


def machine_info() -> dict[str, object]:
    """What the numbers were measured on."""
    info: dict[str, object] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        if names:
            info["cpu"] = names[0]
        with open("/proc/meminfo") as f:
            for ln in f:
                if ln.startswith("MemTotal:"):
                    info["memory_bytes"] = int(ln.split()[1]) * 1024
    except OSError:
        pass
    info["file_huge_pages_bytes"] = file_huge_pages()
    try:
        info["mergex"] = version("mergex")
    except PackageNotFoundError:
        info["mergex"] = None
    return info


def file_huge_pages() -> int | None:
    """Bytes of file data the page cache holds in huge pages (Linux ``FileHugePages``).

    Reads from huge pages are much cheaper (on the benchmark VM the 8-layer set read in
    0.14 s from them against 0.33-0.46 s from small pages), so the ratios to the read depend
    on it; files read into a freshly emptied cache tend to get them.
    """
    try:
        with open("/proc/meminfo") as f:
            for ln in f:
                if ln.startswith("FileHugePages:"):
                    return int(ln.split()[1]) * 1024
    except OSError:
        pass
    return None


def print_table(results: list[Result], fixed: float | None) -> None:
    """Print seconds, GB/s, peak RSS and the ratio to the plain read, a row a run; for
    mergex, given its ``fixed`` cost (warm runs), also the floor: that plus the all-thread
    read and write, against the read."""
    header = (
        "method",
        "tool",
        "input GB",
        "read s",
        "read ∥ s",
        "write ∥ s",
        "merge s",
        "GB/s",
        "peak RSS MiB",
        "x read",
        "floor x",
    )
    rows = [header]
    for r in results:
        if r.error is not None:
            rows.append(
                (
                    r.method,
                    r.tool,
                    f"{r.input_bytes / 1e9:.3f}",
                    "",
                    "",
                    "",
                    "FAILED",
                    "",
                    "",
                    "",
                    "",
                )
            )
            continue
        rows.append(
            (
                r.method,
                r.tool,
                f"{r.input_bytes / 1e9:.3f}",
                f"{r.best_read:.2f}",
                f"{r.best_parallel_read:.2f}",
                f"{r.best_parallel_write:.2f}",
                f"{r.best:.2f}",
                f"{r.input_bytes / r.best / 1e9:.2f}",
                f"{max(r.peak_rss) / 2**20:.0f}",
                f"{r.best / r.best_read:.2f}",
                f"{(fixed + r.best_parallel_read + r.best_parallel_write) / r.best_read:.2f}"
                if fixed is not None and r.tool == "mergex"
                else "",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for n, row in enumerate(rows):
        cells = [
            c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        print("  ".join(cells).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))
    for r in results:
        if r.error is not None:
            print(f"{r.tool} {r.method}: {r.error}")


# --- command line ---------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = argparse.ArgumentParser(
        description="Benchmark mergex merges against a plain read of the same inputs.",
    )
    p.add_argument("set", type=Path, help="folder with base/ and expert_*/ (see make_experts.py)")
    p.add_argument("--methods", default="linear,task_arithmetic", help="comma-separated")
    p.add_argument("--ram-budget", default="1GiB", help="passed to mergex (default 1GiB)")
    p.add_argument("--threads", type=int, default=None, help="passed to mergex")
    p.add_argument("--repeat", type=int, default=1, help="rounds per method (best is shown)")
    p.add_argument("--cold", action="store_true", help="evict inputs before each measurement")
    p.add_argument(
        "--out-quantization",
        choices=("none", "base"),
        default="none",
        help="base: write the output in the (first or base) input's quantized format",
    )
    p.add_argument("--keep-output", action="store_true", help="keep the merged models")
    p.add_argument("--work", type=Path, default=None, help="configs and outputs (SET/.bench)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--mergex", default=None, help="command that runs the mergex CLI")
    p.add_argument("--mergekit", default=None, help="python of an env with mergekit installed")
    p.add_argument("--mergekit-args", default="", help="extra arguments for mergekit-yaml")
    p.add_argument("--no-space-check", action="store_true", help="skip the free-disk check")
    p.add_argument("-v", "--verbose", action="store_true", help="show failing runs' stderr")
    g = p.add_argument_group("generating the set (with --generate)")
    g.add_argument("--generate", action="store_true", help="make the set first (reused if same)")
    g.add_argument("--preset", choices=sorted(make_experts.PRESETS), default="qwen2.5-0.5b")
    g.add_argument("--layers", type=int, default=None)
    g.add_argument("--experts", type=int, default=8)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--sparse", action="store_true")
    g.add_argument("--shard-size", type=make_experts.parse_size, default=5 * 10**9)
    return p


def ensure_set(args: argparse.Namespace) -> None:
    """With ``--generate``, make the set unless the same one is already there."""
    preset = make_experts.PRESETS[args.preset]
    wanted = {
        "preset": args.preset,
        "layers": preset.num_hidden_layers if args.layers is None else args.layers,
        "experts": args.experts,
        "seed": args.seed,
        "sparse": args.sparse,
        "shard_size": args.shard_size,
    }
    marker = args.set / make_experts.MARKER
    if marker.is_file():
        have = json.loads(marker.read_text())
        if all(have.get(k) == v for k, v in wanted.items()):
            print(f"reusing the set in {args.set}")
            return
    make_experts.generate(
        args.set,
        args.preset,
        layers=args.layers,
        experts=args.experts,
        seed=args.seed,
        shard_size=args.shard_size,
        sparse=args.sparse,
        force=True,
    )


def check_space(work: Path, output_bytes: int) -> None:
    """Refuse to start when the merged models would not fit on the work disk."""
    free = shutil.disk_usage(work).free
    if output_bytes * 1.05 > free:
        raise SystemExit(
            f"error: outputs need about {output_bytes / 1e9:.1f} GB but {work} has"
            f" {free / 1e9:.1f} GB free (--no-space-check to try anyway)"
        )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status (1 if any merge failed)."""
    args = build_parser().parse_args(argv)
    if args.repeat < 1:
        raise SystemExit("error: --repeat must be at least 1")
    if args.generate:
        ensure_set(args)
    models = find_set(args.set)
    work = (args.work or models.root / ".bench").resolve()
    work.mkdir(parents=True, exist_ok=True)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]

    tools: list[tuple[str, list[str]]] = [("mergex", mergex_command(args.mergex))]
    if args.mergekit:
        tools.append(("mergekit", mergekit_command(args.mergekit)))
    if not args.no_space_check:
        # One output at a time unless kept, each about one model's size, and the write ∥
        # file of the same size beside the newest.
        per_output = folder_bytes(models.base)
        kept = len(methods) * len(tools) if args.keep_output else 1
        check_space(work, per_output * (kept + 1))

    print(
        f"set {models.root}: base + {len(models.experts)} experts,"
        f" {folder_bytes(models.base) / 1e9:.3f} GB per model;"
        f" ram budget {args.ram_budget}, threads {args.threads or 'default'},"
        f" {'cold' if args.cold else 'warm'} page cache, best of {args.repeat}",
        flush=True,
    )
    fixed = measure_fixed(work, tools[0][1], args)
    results: list[Result] = []
    for method in methods:
        config = method_config(method, models)
        if args.out_quantization != "none":
            config["out_quantization"] = args.out_quantization
        config_path = work / f"{method}.yml"
        config_path.write_text(to_yaml(config))
        inputs = [f for d in config_inputs(config) for f in safetensors_files(d)]
        for tool, base_cmd in tools:
            out = work / f"out-{method}-{tool}"
            if tool == "mergex":
                cmd = [*base_cmd, "merge", str(config_path), str(out)]
                cmd += ["--ram-budget", args.ram_budget, "--overwrite", "--quiet"]
                if args.threads:
                    cmd += ["--threads", str(args.threads)]
            else:
                cmd = [
                    *base_cmd,
                    str(config_path),
                    str(out),
                    *shlex.split(args.mergekit_args),
                ]
            results.append(measure(method, tool, cmd, inputs, out, args))

    print()
    # Warm, reading and writing both keep every thread busy copying memory, so their times
    # add up; cold, the disk works alongside the threads and a merge overlaps them.
    floor_fixed = None if args.cold else fixed
    print_table(results, floor_fixed)
    if fixed is not None:
        print(f"fixed cost of a merge through this CLI (a one-tensor model): {fixed:.3f} s", end="")
        if floor_fixed is None:
            print(" (no floor x with --cold: reads from the disk overlap the rest)")
        else:
            print("; floor x = (fixed + read ∥ + write ∥) / read, the least any merge through it could show")
    huge = file_huge_pages()
    if huge is not None:
        print(f"page cache: {huge / 2**30:.1f} GiB of file data in huge pages (reads from them are faster)")
    if args.json:
        report = {
            "set": str(models.root),
            "experts": len(models.experts),
            "ram_budget": args.ram_budget,
            "threads": args.threads,
            "cold": args.cold,
            "repeat": args.repeat,
            "fixed_seconds": fixed,
            "machine": machine_info(),
            "results": [asdict(r) for r in results],
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 1 if any(r.error is not None for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
