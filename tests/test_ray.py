"""Merges and sweeps on Ray (``--ray``): on a local cluster of three one-CPU nodes made here
(``ray.cluster_utils.Cluster``), a merge of several shards and a sweep give the bytes of a
local run, also when a worker node dies while its tasks run; the summary reports each
node's throughput; without Ray, a one-line error names the extra.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import mergex
import pytest
import ray
import yaml
from mergex.errors import ConfigError
from ray.cluster_utils import Cluster
from support import models

SHARD = "40KB"  # several output shards: several tasks


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    workers = [c.add_node(num_cpus=1) for _ in range(2)]
    ray.init(address=c.address, logging_level="ERROR", log_to_driver=False)
    c.wait_for_nodes()
    yield c, workers
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray_models")
    return [models.make_llama(root / n, dtype="bf16", seed=s) for n, s in (("base", 1), ("a", 2), ("b", 3))]


def ties(trio) -> dict:
    base, a, b = trio
    return models._plain(
        {
            "merge_method": "ties",
            "base_model": base,
            "models": [
                {"model": a, "parameters": {"weight": 0.6, "density": 0.3}},
                {"model": b, "parameters": {"weight": 0.4, "density": 0.5}},
            ],
        }
    )


def files(folder: Path) -> dict[str, bytes]:
    names = [*folder.glob("*.safetensors"), *folder.glob("*.index.json")]
    return {p.name: p.read_bytes() for p in sorted(names)}


def test_merge_on_ray_gives_the_local_bytes(cluster, trio, tmp_path):
    c, _ = cluster
    kw = {"ram_budget": "64KiB", "threads": 1, "shard_size": SHARD}
    local = mergex.merge(ties(trio), tmp_path / "local", **kw)
    seen = []
    remote = mergex.merge(ties(trio), tmp_path / "ray", ray=c.address, progress=seen.append, **kw)
    got, want = files(tmp_path / "ray"), files(tmp_path / "local")
    assert len(want) > 3 and got == want
    assert remote.kernels.startswith("ray") and remote.bytes_read == local.bytes_read
    assert sum(n.tasks for n in remote.nodes) == len(want) - 1  # one task per shard
    assert all(n.bytes_read > 0 and n.rate > 0 for n in remote.nodes)
    assert not list((tmp_path / "ray").glob(".ray-*"))
    # Progress as the shards' tasks finish: it ends with every byte and tensor counted.
    last = seen[-1]
    assert last.bytes_done == last.bytes_total > 0 and last.tensors_done == last.tensors_total > 0


def test_sweep_on_ray_gives_the_local_bytes(cluster, trio, tmp_path):
    c, _ = cluster
    cfg = ties(trio)
    cfg["parameters"] = {"lambda": {"sweep": [1.0, 0.5]}}
    config = tmp_path / "sweep.yml"
    config.write_text(yaml.safe_dump(cfg))
    kw = {"ram_budget": "128KiB", "threads": 1, "shard_size": SHARD}
    mergex.sweep(config, tmp_path / "local", **kw)
    results = mergex.sweep(config, tmp_path / "ray", ray=c.address, **kw)
    for r in results:
        want = files(tmp_path / "local" / r.out_dir.name)
        assert len(want) > 3 and files(r.out_dir) == want
        assert r.nodes


def test_a_worker_node_dying_mid_run_changes_nothing(cluster, trio, tmp_path):
    c, workers = cluster
    root = tmp_path / "big"
    big = [
        models.make_llama(root / n, dtype="bf16", seed=s, hidden=256, inter=768, vocab=4096)
        for n, s in (("base", 4), ("a", 5), ("b", 6))
    ]
    kw = {"ram_budget": "64KiB", "threads": 1, "shard_size": "100KB"}
    mergex.merge(ties(big), tmp_path / "local", **kw)
    out = tmp_path / "ray"
    partial = tmp_path / ".ray.mergex-partial"
    errors: list[BaseException] = []

    def run() -> None:
        try:
            mergex.merge(ties(big), out, ray=c.address, **kw)
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    deadline = time.time() + 60
    while time.time() < deadline and not list(partial.glob("*.safetensors")):
        time.sleep(0.01)
    assert t.is_alive(), "the merge ended before the node could be stopped"
    c.remove_node(workers[0])  # a node dies while the merge's tasks run
    t.join(300)
    assert not t.is_alive() and not errors, errors
    assert files(out) == files(tmp_path / "local")


def test_without_ray_a_one_line_error_names_the_extra(trio, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails
    with pytest.raises(ConfigError, match=r"pip install 'mergex\[ray\]'"):
        mergex.merge(ties(trio), tmp_path / "out", ray="auto")
    assert not (tmp_path / "out").exists()
