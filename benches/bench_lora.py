r"""LoRA benchmark on a set made by ``make_experts.py``, against a plain read of the inputs
measured in the same run.

* **extract**: ``mergex extract-lora expert_0 base OUT --rank R --ram-budget B`` (and, with
  ``--mergekit PYTHON``, ``mergekit-extract-lora`` from that interpreter's environment), time
  and the child's peak RSS, with each adapter's error on one weight against the optimal
  rank-R error (the SVD's discarded singular values).
* **adapter input**: a linear merge of ``base+ADAPTER`` (the adapter just extracted) with
  ``expert_1``, against the same merge through a pre-merged model (``base+ADAPTER`` written
  to disk first, as tools that cache adapted models do): time and bytes written.

Example::

    python benches/bench_lora.py /tmp/set8 --rank 64 --ram-budget 1GiB --mergekit /tmp/mk/bin/python
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import bench
import numpy as np

WEIGHT = "model.layers.3.mlp.up_proj.weight"


def tensor(folder: Path, name: str) -> np.ndarray:
    """One tensor of a folder's safetensors files, as f64 (through safetensors + torch for
    bf16)."""
    from safetensors import safe_open

    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            if name in h.keys():  # noqa: SIM118 - safe_open has no __contains__
                return np.asarray(h.get_tensor(name).double().numpy())
    raise SystemExit(f"error: {name} not in {folder}")


def relative_error(adapter: Path, delta: np.ndarray, rank: int) -> float:
    """The adapter's Frobenius error on :data:`WEIGHT` over the optimal rank-``rank`` one."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    prefix = "base_model.model." + WEIGHT.removesuffix(".weight")
    a, b = tensor(adapter, f"{prefix}.lora_A.weight"), tensor(adapter, f"{prefix}.lora_B.weight")
    s = np.linalg.svd(delta, compute_uv=False)
    best = float(np.sqrt(np.sum(s[rank:] ** 2)))
    return float(np.linalg.norm(delta - cfg["lora_alpha"] / cfg["r"] * (b @ a))) / best


def merge_config(work: Path, name: str, models: list[str]) -> Path:
    cfg = {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": 1.0}} for m in models]}
    path = work / f"{name}.yml"
    path.write_text(bench.to_yaml(cfg))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("set", type=Path)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--ram-budget", default="1GiB")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--mergekit", help="a Python interpreter whose environment has mergekit")
    p.add_argument("--mergex", help="how to start the mergex CLI")
    args = p.parse_args(argv)
    models = bench.find_set(args.set)
    expert, other = models.experts[0], models.experts[1]
    work = (models.root / ".bench-lora").resolve()
    work.mkdir(exist_ok=True)
    mergex = bench.mergex_command(args.mergex)
    read, nbytes = bench.read_all(bench.safetensors_files(expert) + bench.safetensors_files(models.base))
    print(f"read of expert_0 + base: {nbytes / 1e9:.3f} GB in {read:.2f} s")
    bench.read_all(bench.safetensors_files(other))  # the merges' other input, warm too

    delta = tensor(expert, WEIGHT) - tensor(models.base, WEIGHT)
    adapter = work / "mergex-adapter"
    cmd = [*mergex, "extract-lora", str(expert), str(models.base), str(adapter), "--rank", str(args.rank)]
    run = bench.best_run([*cmd, "--ram-budget", args.ram_budget, "-q"], args.repeat, adapter)
    err = relative_error(adapter, delta, args.rank)
    print(
        f"mergex extract-lora --rank {args.rank} --ram-budget {args.ram_budget}: {run.seconds:.1f} s "
        f"({run.seconds / read:.1f}x read), peak RSS {run.peak_rss / 2**20:.0f} MiB, "
        f"{bench.folder_bytes(adapter) / 1e6:.0f} MB written, error {err:.4f}x optimal"
    )
    if args.mergekit:
        tool = str(Path(args.mergekit).parent / "mergekit-extract-lora")
        out = work / "mergekit-adapter"
        mk = [tool, "--model", str(expert), "--base-model", str(models.base), "--out-path", str(out)]
        run = bench.best_run([*mk, "--max-rank", str(args.rank)], args.repeat, out)
        err = relative_error(out, delta, args.rank)
        print(
            f"mergekit-extract-lora --max-rank {args.rank}: {run.seconds:.1f} s "
            f"({run.seconds / read:.1f}x read), peak RSS {run.peak_rss / 2**20:.0f} MiB, "
            f"{bench.folder_bytes(out) / 1e6:.0f} MB written, error {err:.4f}x optimal"
        )

    budget = ["--ram-budget", args.ram_budget, "--quiet", "--overwrite"]
    direct = merge_config(work, "direct", [f"{models.base}+{adapter}", str(other)])
    out = work / "merged"
    run = bench.best_run([*mergex, "merge", str(direct), str(out), *budget], args.repeat, out)
    print(
        f"linear merge of base+adapter with expert_1: {run.seconds:.2f} s, "
        f"{bench.folder_bytes(out) / 1e6:.0f} MB written"
    )
    pre = merge_config(work, "pre", [f"{models.base}+{adapter}"])
    premerged = work / "premerged"
    first = bench.best_run([*mergex, "merge", str(pre), str(premerged), *budget], args.repeat, premerged)
    then = merge_config(work, "then", [str(premerged), str(other)])
    second = bench.best_run([*mergex, "merge", str(then), str(out), *budget], args.repeat, out)
    written = bench.folder_bytes(premerged) + bench.folder_bytes(out)
    print(
        f"the same through a pre-merged model: {first.seconds:.2f} + {second.seconds:.2f} = "
        f"{first.seconds + second.seconds:.2f} s, {written / 1e6:.0f} MB written"
    )
    shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
