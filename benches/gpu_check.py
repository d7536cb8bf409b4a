r"""The torch path on a GPU machine, in one run (issue 6): every method on the torch
engine against the Rust engine, then linear and TIES timed on the synthetic 8-expert set.

1. Correctness: a tiny Qwen2-shaped set (base + 3 experts) is merged by every method of
   the method table with the Rust engine and with the torch engine on ``--device``; the
   outputs must agree to one unit in the last place of the output dtype (bf16 here) for
   every element. Random methods draw the same masks, so they are held to the same bound.
2. Speed: the 0.5B-shaped set cut to ``--layers`` layers with 8 experts (made once and
   reused): the time to read the inputs once, host-to-device copy GB/s of a pinned buffer,
   and end-to-end time and GB/s of linear and TIES on both engines, all in the same run.

Usage (on the GPU machine, from the repository root, mergex[torch] installed)::

    python benches/gpu_check.py --work /tmp/gpu-check [--device cuda] [--layers 8]

Prints one table per part and exits non-zero if any method disagrees.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

import bench
import make_experts

TINY = make_experts.Preset(4096, 256, 704, 2, 8, 2, tie_word_embeddings=False)


def output_bits(folder: Path) -> dict[str, np.ndarray]:
    """Every float tensor of a merged model folder as ordered integers: its bit patterns,
    negative values mapped so that adjacent floats are adjacent integers."""
    out: dict[str, np.ndarray] = {}
    for f in sorted(folder.glob("*.safetensors")):
        data = f.read_bytes()
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
        for name, info in header.items():
            if name == "__metadata__":
                continue
            a, b = info["data_offsets"]
            kind = {"BF16": (np.int16, 0x7FFF), "F16": (np.int16, 0x7FFF), "F32": (np.int32, 0x7FFFFFFF)}
            if info["dtype"] in kind:
                width, mask = kind[info["dtype"]]
                x = np.frombuffer(data[8 + n + a : 8 + n + b], dtype=width).astype(np.int64)
                out[name] = np.where(x < 0, -(x & mask), x)
    return out


def ulps(a: np.ndarray, b: np.ndarray) -> int:
    """Largest distance in units in the last place between two arrays from :func:`output_bits`."""
    return int(np.abs(a - b).max()) if a.size else 0


def ensure_set(root: Path, preset: str, *, layers: int | None, experts: int, seed: int) -> None:
    """Generate a model set, unless a finished one with the same parameters is there."""
    marker = root / make_experts.MARKER
    want = {"preset": preset, "layers": layers, "experts": experts, "seed": seed}
    request = root / "request.json"
    if marker.exists() and request.exists() and json.loads(request.read_text()) == want:
        return
    make_experts.generate(root, preset, layers=layers, experts=experts, seed=seed, force=True, quiet=True)
    (root / "request.json").write_text(json.dumps(want))


def check_methods(work: Path, device: str) -> bool:
    """Part 1: every method, torch on ``device`` against Rust; prints a table."""
    import mergex
    from mergex.methods import METHODS

    make_experts.PRESETS["tiny"] = TINY
    root = work / "tiny"
    ensure_set(root, "tiny", layers=None, experts=3, seed=1)
    models = bench.find_set(root)
    ok = True
    print(f"\nmethods: torch engine on {device} against the Rust engine (bf16 output)")
    print(f"{'method':<18}{'tensors':>8}{'max ulps':>10}{'bit-identical':>15}  result")
    for method in sorted(METHODS):
        cfg = bench.method_config(method, models)
        cfg["dtype"] = "bfloat16"
        outs = {}
        try:
            for engine in ("rust", "torch"):
                out = work / f"out-{method}-{engine}"
                shutil.rmtree(out, ignore_errors=True)
                dev = device if engine == "torch" else None
                mergex.merge(cfg, out, ram_budget="4MiB", engine=engine, device=dev, progress=False)
                outs[engine] = output_bits(out)
                shutil.rmtree(out)
        except Exception as e:  # report and go on with the other methods
            print(f"{method:<18}{'':>8}{'':>10}{'':>15}  ERROR {type(e).__name__}: {e}")
            ok = False
            continue
        dist = {n: ulps(outs["rust"][n], outs["torch"][n]) for n in outs["rust"]}
        same = sum(d == 0 for d in dist.values())
        worst = max(dist.values(), default=0)
        good = worst <= 1 and set(outs["rust"]) == set(outs["torch"])
        ok &= good
        verdict = "ok" if good else "MISMATCH"
        print(f"{method:<18}{len(dist):>8}{worst:>10}{same:>9}/{len(dist):<5}  {verdict}")
    return ok


def h2d_gbps(device: str, nbytes: int = 1 << 30) -> float:
    """Host-to-device copy rate of a pinned buffer (best of 3)."""
    import torch

    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    best = float("inf")
    for _ in range(3):
        torch.cuda.synchronize()
        t = time.perf_counter()
        host.to(device, non_blocking=True)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


def time_engines(work: Path, device: str, layers: int, budget: str) -> list[dict[str, object]]:
    """Part 2: read once, then linear and TIES on both engines; prints a table."""
    root = work / "set"
    ensure_set(root, "qwen2.5-0.5b", layers=layers, experts=8, seed=0)
    models = bench.find_set(root)
    rows: list[dict[str, object]] = []
    if device.startswith("cuda"):
        print(f"\nhost-to-device copy (pinned, 1 GiB): {h2d_gbps(device):.1f} GB/s")
    print(f"\n8 experts of the 0.5B shape, {layers} layers, --ram-budget {budget}, warm page cache")
    print(f"{'method':<8}{'engine':<14}{'read s':>8}{'merge s':>9}{'GB/s':>7}{'x read':>8}{'peak RSS':>10}")
    for method in ("linear", "ties"):
        cfg = bench.method_config(method, models)
        cfg_path = work / f"{method}.yml"
        cfg_path.write_text(json.dumps(cfg))
        inputs = [f for m in bench.config_inputs(cfg) for f in bench.safetensors_files(m)]
        size = sum(f.stat().st_size for f in inputs)
        bench.read_all(inputs)
        for engine, flags in (("rust", []), (f"torch {device}", ["--device", device, "--engine", "torch"])):
            read_s, _ = bench.read_all(inputs)
            out = work / "out"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [*bench.mergex_command(None), "merge", str(cfg_path), str(out), "--quiet"]
            run = bench.run_child([*cmd, "--ram-budget", budget, *flags])
            if run.returncode != 0:
                print(f"{method:<8}{engine:<14} FAILED: {run.stderr.strip().splitlines()[-1:]}")
                continue
            row = {
                "method": method,
                "engine": engine,
                "read_s": read_s,
                "merge_s": run.seconds,
                "gbps": size / run.seconds / 1e9,
                "x_read": run.seconds / read_s,
                "peak_rss": run.peak_rss,
            }
            rows.append(row)
            print(
                f"{method:<8}{engine:<14}{read_s:>8.2f}{run.seconds:>9.2f}{row['gbps']:>7.2f}"
                f"{row['x_read']:>8.1f}{run.peak_rss / 2**20:>7.0f} MiB"
            )
            shutil.rmtree(out, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True, help="folder for the sets and outputs")
    p.add_argument("--device", default="cuda", help="torch device (default cuda)")
    p.add_argument("--layers", type=int, default=8, help="layers of the timed 0.5B-shaped set")
    p.add_argument("--ram-budget", default="2GiB", help="host budget of the timed merges")
    p.add_argument("--skip-timing", action="store_true", help="only check the methods")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    print(json.dumps(bench.machine_info()))
    ok = check_methods(args.work, args.device)
    rows = [] if args.skip_timing else time_engines(args.work, args.device, args.layers, args.ram_budget)
    if args.json:
        args.json.write_text(json.dumps({"methods_ok": ok, "timings": rows}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
