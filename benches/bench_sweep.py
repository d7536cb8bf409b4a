r"""Sweep benchmark: ``mergex sweep`` against the same merges run one by one, and against one
merge, on a set made by ``make_experts.py`` (warm page cache).

Two sweeps over the set's base and experts:

* **ties**: TIES at densities 0.1, 0.2, 0.3 and 0.5 (4 members);
* **linear**: the experts averaged with 8 different weightings (8 members).

For each, in the same run: the plain sequential read of the input files; one merge of the
first member (``mergex merge``); the sweep (``mergex sweep``, the same budget for the whole
sweep); and every member merged one by one. Times are the best of ``--repeat`` runs; peak
RSS is the child's own (``os.wait4``). The sweep's outputs are checked against the one-by-one
merges' (byte for byte) once.

Example::

    python benches/bench_sweep.py /tmp/set8 --ram-budget 1GiB --repeat 3
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import bench  # the sibling script

DENSITIES = [0.1, 0.2, 0.3, 0.5]
LINEAR_WEIGHTINGS = 8


def ties_sweep(models: bench.ModelSet) -> dict[str, object]:
    k = len(models.experts)
    return {
        "merge_method": "ties",
        "base_model": str(models.base),
        "models": [{"model": str(e), "parameters": {"weight": round(1.0 / k, 6)}} for e in models.experts],
        "parameters": {"density": {"sweep": DENSITIES}},
    }


def linear_sweep(models: bench.ModelSet) -> list[dict[str, object]]:
    k = len(models.experts)
    docs = []
    for j in range(LINEAR_WEIGHTINGS):
        weights = [1.0 + ((i + j) % k) / k for i in range(k)]
        docs.append(
            {
                "name": f"weighting_{j}",
                "merge_method": "linear",
                "models": [
                    {"model": str(e), "parameters": {"weight": w}}
                    for e, w in zip(models.experts, weights, strict=True)
                ],
            }
        )
    return docs


def write_docs(path: Path, docs: list[dict[str, object]]) -> Path:
    path.write_text("---\n".join(bench.to_yaml(d) for d in docs))
    return path


def members(config: Path) -> list[tuple[str, dict[str, object]]]:
    from mergex.sweeps import expand

    return [(m.name, m.raw) for m in expand(config)]


def same_bytes(a: Path, b: Path) -> bool:
    files = sorted(p.name for p in a.glob("*.safetensors"))
    return bool(files) and all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("set", type=Path)
    p.add_argument("--ram-budget", default="1GiB")
    p.add_argument("--threads", type=int)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--work", type=Path, help="where outputs go (default: SET/.bench-sweep)")
    p.add_argument("--only", choices=["ties", "linear"])
    p.add_argument("--mergex", help="how to start the mergex CLI")
    args = p.parse_args(argv)
    models = bench.find_set(args.set)
    work = args.work or args.set / ".bench-sweep"
    work.mkdir(parents=True, exist_ok=True)
    cli = bench.mergex_command(args.mergex)
    common = ["--ram-budget", args.ram_budget, "--quiet"]
    if args.threads:
        common += ["--threads", str(args.threads)]
    files = [f for m in (models.base, *models.experts) for f in bench.safetensors_files(m)]
    bench.read_all(files)  # warm
    read_s = min(bench.read_all(files)[0] for _ in range(max(args.repeat, 1)))
    print(f"inputs: {len(files)} files, read once in {read_s:.2f} s; budget {args.ram_budget}", flush=True)
    sweeps = {
        "ties": write_docs(work / "ties.yml", [ties_sweep(models)]),
        "linear": write_docs(work / "linear.yml", linear_sweep(models)),
    }
    for name, config in sweeps.items():
        if args.only and name != args.only:
            continue
        listed = members(config)
        singles = []
        for i, (member, raw) in enumerate(listed):
            cfg = work / f"{name}-{i}.yml"
            cfg.write_text(bench.to_yaml(raw))
            singles.append((member, cfg))
        one = bench.best_run(
            [*cli, "merge", str(singles[0][1]), str(work / "one"), "--overwrite", *common],
            args.repeat,
            work / "one",
        )
        swept = bench.best_run(
            [*cli, "sweep", str(config), str(work / name), "--overwrite", *common], args.repeat, work / name
        )
        separate_s, separate_rss = 0.0, 0
        for member, cfg in singles:
            out = work / "single" / member
            run = bench.best_run([*cli, "merge", str(cfg), str(out), "--overwrite", *common], 1, out)
            separate_s += run.seconds
            separate_rss = max(separate_rss, run.peak_rss)
            if not same_bytes(work / name / member, out):
                raise SystemExit(f"error: sweep member {member} differs from its own merge")
        mib = 2**20
        print(
            f"{name}: {len(listed)} members; one merge {one.seconds:.2f} s "
            f"({one.seconds / read_s:.2f}x read), {one.peak_rss / mib:.0f} MiB; "
            f"sweep {swept.seconds:.2f} s = {swept.seconds / one.seconds:.2f}x one merge "
            f"({swept.seconds / read_s:.2f}x read), {swept.peak_rss / mib:.0f} MiB; "
            f"one by one {separate_s:.2f} s ({separate_s / swept.seconds:.2f}x the sweep), "
            f"{separate_rss / mib:.0f} MiB; outputs identical",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
