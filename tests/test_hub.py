"""Models from the Hugging Face Hub (``org/name[@revision]``), through ``huggingface_hub``
against a local server of the tests' own (``hub_server``, on 127.0.0.1, pointed to by
``HF_ENDPOINT``): the merge is validated and planned on the safetensors headers (fetched
with range requests) before any weight is downloaded, only the files it reads are
downloaded into the standard cache, and the output equals merging the same local folders.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from mergex import CheckpointError, ModelNotFoundError
from support import models
from support.hub_server import HubServer, folder_files

SHARDS = 4


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A running server with three repos made from local models, and a fresh cache."""
    local = tmp_path / "local"
    shapes = models.llama_shapes(layers=4)
    base = models.write_model(local / "base", models.random_tensors(shapes, "bf16", 1), "bf16", layers=4)
    tuned = models.write_model(local / "tuned", models.random_tensors(shapes, "bf16", 2), "bf16", layers=4)
    sharded = models.write_model(
        local / "sharded", models.random_tensors(shapes, "bf16", 3), "bf16", shards=SHARDS, layers=4
    )
    with HubServer() as server:
        server.repo("org/base").commit(folder_files(base.path))
        server.repo("org/tuned").commit(folder_files(tuned.path))
        server.repo("org/sharded").commit(folder_files(sharded.path))
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        server.local = {"org/base": base.path, "org/tuned": tuned.path, "org/sharded": sharded.path}  # type: ignore[attr-defined]
        yield server


def linear(a: str, b: str) -> dict:
    return {
        "merge_method": "linear",
        "models": [{"model": a, "parameters": {"weight": 0.6}}, {"model": b, "parameters": {"weight": 0.4}}],
    }


def assert_like_local(mergex_mod, hub, out: Path, tmp_path: Path) -> None:
    """``out`` holds the bytes of the same linear merge of org/base and org/tuned made from
    their local folders."""
    local = mergex_mod.merge(
        linear(str(hub.local["org/base"]), str(hub.local["org/tuned"])), tmp_path / "local-out", progress=None
    )
    assert models.read_output(out).raw == models.read_output(local.out_dir).raw


def file_sizes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in folder.glob("*.safetensors")}


def test_hub_inputs_merge_like_local_folders_and_pin_their_commit(mergex_mod, hub, tmp_path):
    out = mergex_mod.merge(linear("org/base", "org/tuned@main"), tmp_path / "hub-out", progress=None)
    assert_like_local(mergex_mod, hub, out.out_dir, tmp_path)
    # Each weight file was downloaded once (plus its header, read first).
    for repo in ("org/base", "org/tuned"):
        sizes = file_sizes(hub.local[repo])
        served = hub.weights_served(repo)
        for name, size in sizes.items():
            assert size <= served[name] < size + 200_000, (repo, name, served)
    # The run configuration names the commits, so it merges exactly these files again.
    run = yaml.safe_load((out.out_dir / "mergex_config.yml").read_text())
    shas = {r: hub.repos[r].branches["main"] for r in ("org/base", "org/tuned")}
    assert [m["model"] for m in run["models"]] == [
        f"org/base@{shas['org/base']}",
        f"org/tuned@{shas['org/tuned']}",
    ]
    # The files are in the standard cache, where the next run finds them.
    assert (
        tmp_path / "cache" / "models--org--base" / "snapshots" / shas["org/base"] / "model.safetensors"
    ).exists()
    again = mergex_mod.merge(run, tmp_path / "again", progress=None)
    assert models.read_output(again.out_dir).raw == models.read_output(out.out_dir).raw


def test_a_mismatch_fails_after_the_headers_only(mergex_mod, hub, tmp_path):
    shapes = models.llama_shapes(layers=4, hidden=48)
    wrong = models.write_model(tmp_path / "wrong", models.random_tensors(shapes, "bf16", 4), "bf16", layers=4)
    hub.repo("org/wrong").commit(folder_files(wrong.path))
    with pytest.raises(CheckpointError, match="shape") as info:
        mergex_mod.merge(linear("org/base", "org/wrong"), tmp_path / "out", progress=None)
    assert "\n" not in str(info.value)
    for repo, folder in (("org/base", hub.local["org/base"]), ("org/wrong", wrong.path)):
        for name, size in file_sizes(folder).items():
            assert hub.weights_served(repo).get(name, 0) < min(size, 100_000), (repo, name)
    assert not (tmp_path / "out").exists()


def test_plan_reads_headers_only_and_counts_the_download(mergex_mod, hub):
    plan = mergex_mod.plan(linear("org/base", "org/tuned"))
    total = sum(file_sizes(hub.local["org/base"]).values()) + sum(file_sizes(hub.local["org/tuned"]).values())
    assert plan.download_bytes == total
    assert plan.tensors > 0 and plan.bytes_written > 0
    for repo in ("org/base", "org/tuned"):
        for name, size in file_sizes(hub.local[repo]).items():
            assert hub.weights_served(repo)[name] < size


def test_a_slice_of_a_sharded_model_downloads_only_its_shards(mergex_mod, hub, tmp_path):
    cfg = {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": "org/sharded", "layer_range": [3, 4]}]}],
    }
    index = json.loads((hub.local["org/sharded"] / "model.safetensors.index.json").read_text())
    wanted = {f for n, f in index["weight_map"].items() if "layers." not in n or "layers.3." in n}
    sizes = file_sizes(hub.local["org/sharded"])
    assert wanted != set(sizes), "the test needs a shard the slice does not read"
    out = mergex_mod.merge(cfg, tmp_path / "out", progress=None)
    served = hub.weights_served("org/sharded")
    for name, size in sizes.items():
        if name in wanted:
            assert served[name] >= size, name
        else:
            assert served[name] < size, f"{name} was downloaded"
    local = mergex_mod.merge(
        {**cfg, "slices": [{"sources": [{"model": str(hub.local["org/sharded"]), "layer_range": [3, 4]}]}]},
        tmp_path / "local-out",
        progress=None,
    )
    assert models.read_output(out.out_dir).raw == models.read_output(local.out_dir).raw


def test_offline_uses_the_cache_only(mergex_mod, hub, tmp_path, monkeypatch):
    mergex_mod.merge(linear("org/base", "org/tuned"), tmp_path / "first", progress=None)
    hub.__exit__()  # no server any more
    out = mergex_mod.merge(linear("org/base", "org/tuned"), tmp_path / "offline", progress=None, offline=True)
    assert models.read_output(out.out_dir).raw == models.read_output(tmp_path / "first").raw
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        ModelNotFoundError, match=r"model 'org/sharded' \(revision main\): not in the Hugging Face cache"
    ):
        mergex_mod.merge(linear("org/base", "org/sharded"), tmp_path / "missing", progress=None)
    assert not (tmp_path / "missing").exists()


def test_revisions_pin_a_branch_or_a_commit(mergex_mod, hub, tmp_path):
    repo = hub.repo("org/tuned")
    first = repo.branches["main"]
    shapes = models.llama_shapes(layers=4)
    newer = models.write_model(tmp_path / "newer", models.random_tensors(shapes, "bf16", 9), "bf16", layers=4)
    repo.commit(folder_files(newer.path), branch="main")
    repo.branches["v1"] = first
    by_sha = mergex_mod.merge(linear("org/base", f"org/tuned@{first}"), tmp_path / "sha", progress=None)
    by_branch = mergex_mod.merge(linear("org/base", "org/tuned@v1"), tmp_path / "branch", progress=None)
    latest = mergex_mod.merge(linear("org/base", "org/tuned"), tmp_path / "main", progress=None)
    assert models.read_output(by_sha.out_dir).raw == models.read_output(by_branch.out_dir).raw
    assert models.read_output(latest.out_dir).raw != models.read_output(by_sha.out_dir).raw


@pytest.mark.parametrize(
    "ref, setup, words",
    [
        ("org/nothing", None, ["org/nothing", "no such repo"]),
        ("org/base@nope", None, ["org/base", "revision nope", "no such revision"]),
        ("org/gated", "gated", ["org/gated", "gated"]),
        ("org/gated", "wrong token", ["org/gated", "gated"]),
        ("org/pickle", "pickle", ["org/pickle", "only pickle weights", "pytorch_model.bin"]),
        ("org/unsafe", "unsafe", ["org/unsafe", "unsafe name", "../evil.safetensors"]),
        ("org/broken", "500", ["org/broken", "HTTP 500"]),
    ],
)
def test_hub_errors_are_one_line_and_leave_no_output(
    mergex_mod, hub, tmp_path, monkeypatch, ref, setup, words
):
    files = folder_files(hub.local["org/base"])
    if setup in ("gated", "wrong token"):
        hub.repo("org/gated").commit(files)
        hub.repo("org/gated").token = "secret"
        if setup == "wrong token":
            monkeypatch.setenv("HF_TOKEN", "not-the-secret")  # HTTP 403
    elif setup == "pickle":
        hub.repo("org/pickle").commit(
            {"config.json": files["config.json"], "pytorch_model.bin": b"\x80\x04."}
        )
    elif setup == "unsafe":
        hub.repo("org/unsafe").commit(files)
        hub.faults["org/unsafe/__list__"] = json.dumps([*files, "../evil.safetensors"])
    elif setup == "500":
        hub.repo("org/broken").commit(files)
        hub.faults["org/broken/model.safetensors"] = "500"
    with pytest.raises(Exception) as info:
        mergex_mod.merge(linear("org/base", ref), tmp_path / "out", progress=None)
    line = str(info.value)
    assert "\n" not in line, line
    for w in words:
        assert w in line, line
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith("out") for p in tmp_path.iterdir() if p.name != "out" and p.is_dir())


def test_a_token_opens_a_gated_repo(mergex_mod, hub, tmp_path, monkeypatch):
    hub.repo("org/gated").commit(folder_files(hub.local["org/tuned"]))
    hub.repo("org/gated").token = "secret"
    monkeypatch.setenv("HF_TOKEN", "secret")
    out = mergex_mod.merge(linear("org/base", "org/gated"), tmp_path / "out", progress=None)
    assert_like_local(mergex_mod, hub, out.out_dir, tmp_path)


def test_a_header_that_does_not_fit_its_file_is_refused_before_downloading(mergex_mod, hub, tmp_path):
    files = folder_files(hub.local["org/base"])
    raw = files["model.safetensors"]
    files["model.safetensors"] = (2**63).to_bytes(8, "little") + raw[8:]
    hub.repo("org/huge").commit(files)
    with pytest.raises(CheckpointError, match=r"org/huge.*header length 9223372036854775808 does not fit"):
        mergex_mod.merge(linear("org/base", "org/huge"), tmp_path / "out", progress=None)
    assert hub.weights_served("org/huge")["model.safetensors"] == 8
    assert not (tmp_path / "out").exists()


def test_a_download_cut_short_resumes_where_it_stopped(mergex_mod, hub, tmp_path):
    # The server drops the connection halfway through the file: huggingface_hub retries (its
    # own resume logic), and the merge completes with the right bytes.
    hub.faults["org/tuned/model.safetensors"] = "cut"
    size = file_sizes(hub.local["org/tuned"])["model.safetensors"]
    out = mergex_mod.merge(linear("org/base", "org/tuned"), tmp_path / "out", progress=None)
    assert_like_local(mergex_mod, hub, out.out_dir, tmp_path)
    # The cut half, then the file again (this huggingface_hub retries from the start).
    assert size <= hub.weights_served("org/tuned")["model.safetensors"] < 2 * size


def test_downloads_report_their_progress(mergex_mod, hub, tmp_path):
    seen = []
    mergex_mod.merge(linear("org/base", "org/tuned"), tmp_path / "out", progress=seen.append)
    downloads = [p for p in seen if p.stage == "downloading"]
    total = sum(file_sizes(hub.local["org/base"]).values()) + sum(file_sizes(hub.local["org/tuned"]).values())
    assert downloads, "no download progress"
    last = downloads[-1]
    assert (last.bytes_done, last.bytes_total, last.files_done, last.files_total) == (total, total, 2, 2)


def test_ctrl_c_while_downloading_leaves_no_output_and_a_usable_cache(mergex_mod, hub, tmp_path):
    def interrupt(p):
        if p.stage == "downloading":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        mergex_mod.merge(linear("org/base", "org/tuned"), tmp_path / "out", progress=interrupt)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]
    out = mergex_mod.merge(linear("org/base", "org/tuned"), tmp_path / "out", progress=None)
    assert_like_local(mergex_mod, hub, out.out_dir, tmp_path)


def test_a_header_whose_offsets_pass_the_file_size_names_the_file(mergex_mod, hub, tmp_path):
    files = folder_files(hub.local["org/base"])
    files["model.safetensors"] = files["model.safetensors"][:-4]  # the Hub reports a short file
    hub.repo("org/short").commit(files)
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors.*(outside the data section|bytes)"
    ) as info:
        mergex_mod.merge(linear("org/base", "org/short"), tmp_path / "out", progress=None)
    assert "\n" not in str(info.value)
    assert hub.weights_served("org/short")["model.safetensors"] < 100_000
    assert not (tmp_path / "out").exists()


def test_a_redirect_loop_is_one_line(mergex_mod, hub, tmp_path):
    hub.repo("org/loop").commit(folder_files(hub.local["org/tuned"]))
    hub.faults["org/loop/model.safetensors"] = "loop"
    with pytest.raises(Exception) as info:
        mergex_mod.merge(linear("org/base", "org/loop"), tmp_path / "out", progress=None)
    assert "\n" not in str(info.value) and "org/loop" in str(info.value), str(info.value)
    assert not (tmp_path / "out").exists()


def test_the_tokenizer_source_can_be_a_hub_repo(mergex_mod, hub, tmp_path):
    marker = b'{"tokenizer_class": "LlamaTokenizer", "marker": "from org/tok"}'
    hub.repo("org/tok").commit({**folder_files(hub.local["org/sharded"]), "tokenizer_config.json": marker})
    cfg = {**linear("org/base", "org/tuned"), "tokenizer_source": "org/tok"}
    out = mergex_mod.merge(cfg, tmp_path / "out", progress=None)
    # The output tokenizer is org/tok's (as transformers writes it back).
    assert json.loads((out.out_dir / "tokenizer_config.json").read_text())["tokenizer_class"]
    run = yaml.safe_load((out.out_dir / "mergex_config.yml").read_text())
    assert run["tokenizer_source"] == f"org/tok@{hub.repos['org/tok'].branches['main']}"
    # Only its small files were fetched, none of its weights.
    assert all(v < 100_000 for v in hub.weights_served("org/tok").values())


def test_too_little_space_in_the_cache_stops_before_downloading(mergex_mod, hub, tmp_path, monkeypatch):
    import shutil as real_shutil

    import mergex.hub

    usage = real_shutil.disk_usage(tmp_path)
    monkeypatch.setattr(mergex.hub.shutil, "disk_usage", lambda _p: usage._replace(free=1000))
    total = sum(file_sizes(hub.local["org/base"]).values()) + sum(file_sizes(hub.local["org/tuned"]).values())
    with pytest.raises(mergex_mod.MergexIOError, match=rf"needs {total} bytes but .* has 1000 bytes free"):
        mergex_mod.merge(linear("org/base", "org/tuned"), tmp_path / "out", progress=None)
    for repo in ("org/base", "org/tuned"):
        assert all(v < 100_000 for v in hub.weights_served(repo).values())
    assert not (tmp_path / "out").exists()


def test_the_cli_plans_hub_models_and_reports_errors_in_one_line(hub, tmp_path):
    cfg = models.dump_yaml(linear("org/base", "org/tuned"), tmp_path / "merge.yml")
    res = models.run_cli(["plan", str(cfg)])
    assert res.returncode == 0, res.stderr
    assert "download from the Hub:" in res.stdout and "org/base@" in res.stdout
    bad = models.dump_yaml(linear("org/base", "org/missing"), tmp_path / "bad.yml")
    res = models.run_cli(["merge", str(bad), str(tmp_path / "out")])
    assert res.returncode == 1
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "org/missing" in lines[0] and "Traceback" not in res.stderr, res.stderr
    assert not (tmp_path / "out").exists()
    res = models.run_cli(["merge", str(cfg), str(tmp_path / "offline"), "--offline"])
    assert res.returncode == 1 and "not in the Hugging Face cache" in res.stderr, res.stderr


def test_an_adapter_on_the_hub_applies_like_a_local_one(mergex_mod, hub, tmp_path):
    import numpy as np

    rng = np.random.default_rng(5)
    module = "model.layers.1.self_attn.q_proj"
    factors = {module: (rng.standard_normal((4, models.HIDDEN)), rng.standard_normal((models.HIDDEN, 4)))}
    adapter = models.write_adapter(tmp_path / "adapter", factors, {"r": 4, "lora_alpha": 8})
    hub.repo("org/adapter").commit(folder_files(adapter))
    out = mergex_mod.merge(linear("org/base+org/adapter", "org/tuned"), tmp_path / "hub-out", progress=None)
    local = linear(f"{hub.local['org/base']}+{adapter}", str(hub.local["org/tuned"]))
    want = mergex_mod.merge(local, tmp_path / "local-out", progress=None)
    assert models.read_output(out.out_dir).raw == models.read_output(want.out_dir).raw
    run = yaml.safe_load((out.out_dir / "mergex_config.yml").read_text())
    base_sha, adapter_sha = (hub.repos[r].branches["main"] for r in ("org/base", "org/adapter"))
    assert run["models"][0]["model"] == f"org/base@{base_sha}+org/adapter@{adapter_sha}"
