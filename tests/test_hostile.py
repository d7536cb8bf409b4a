"""Hostile inputs: every one is refused with one ``error:`` line naming the file (and the
tensor or key at fault), exit code 1 for checkpoint problems, no traceback, no Rust panic,
no output (not even a temporary folder) and untouched inputs.

The single-file header cases come from the corpus in ``tests/hostile`` (written by
``tests/hostile/make_corpus.py``); the folder cases (shards, indexes, symlinks, pickles,
config.json) are built here on full llama-like models. Cases already in
``test_cli_errors.py`` are not repeated.
"""

from __future__ import annotations

import builtins
import importlib.util
import json
import os
import pickle
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import mergex
import pytest
from support import models

HOSTILE = Path(__file__).resolve().parent / "hostile"


def _load_corpus():
    spec = importlib.util.spec_from_file_location("make_corpus", HOSTILE / "make_corpus.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


corpus = _load_corpus()
CORPUS = corpus.CORPUS


# --------------------------------------------------------------------------- helpers


def error_line(res) -> str:
    """The one ``error:`` line of a failed command; no traceback, no panic, no stdout."""
    err = res.stderr
    assert "Traceback" not in err, err
    assert "panicked" not in err and "RUST_BACKTRACE" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected exactly one line on stderr, got:\n{err}"
    assert lines[0].startswith("error: "), lines[0]
    assert res.stdout == "", f"unexpected output:\n{res.stdout}"
    return lines[0]


def linear_yaml(tmp_path: Path, *refs, extra: dict | None = None) -> Path:
    cfg = {
        "merge_method": "linear",
        "models": [{"model": str(r), "parameters": {"weight": 1.0}} for r in refs],
    }
    cfg.update(extra or {})
    return models.dump_yaml(cfg, tmp_path / "merge.yml")


def run_merge_cli(config: Path, out: Path):
    return models.run_cli(
        ["merge", config, out, "--ram-budget", "64KiB", "--threads", "2", "--quiet"],
        timeout=120,
    )


def check_merge_refused(tmp_path: Path, config: Path, code: int, mentions: list[str], inputs: list[Path]):
    """Run ``mergex merge`` and check the whole failure contract."""
    before = models.file_hashes(config, *inputs)
    outs = tmp_path / "outs"
    outs.mkdir()
    res = run_merge_cli(config, outs / "merged")
    line = error_line(res)
    assert res.returncode == code, f"exit {res.returncode}: {line}"
    for word in mentions:
        assert word in line, f"{word!r} not named in: {line}"
    assert list(outs.iterdir()) == [], f"left behind: {list(outs.iterdir())}"
    assert models.file_hashes(config, *inputs) == before, "an input changed"
    return line


def check_inspect_refused(path: Path, mentions: list[str], inputs: list[Path]):
    before = models.file_hashes(*inputs)
    res = models.run_cli(["inspect", path], timeout=60)
    line = error_line(res)
    assert res.returncode == 1, f"exit {res.returncode}: {line}"
    for word in mentions:
        assert word in line, f"{word!r} not named in: {line}"
    assert models.file_hashes(*inputs) == before, "an input changed"
    return line


def split_safetensors(path: Path) -> tuple[dict, dict[str, tuple]]:
    return models.read_safetensors_raw(path)


def add_tensor(dst: Path, name: str, tensor: tuple) -> None:
    """Append a tensor (``(dtype, shape, raw)``) to a safetensors file."""
    meta, tensors = split_safetensors(dst)
    tensors[name] = tensor
    models.write_safetensors(dst, tensors, meta)


class Canary:
    """Unpickling this creates ``marker``: proof that something loaded the pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (str(self.marker), "w"))


def write_pickle(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"model.norm.weight": Canary(marker)}))


def test_the_pickle_canary_works(tmp_path):
    # The pickle tests below rely on loading the payload creating the marker; check that
    # it does, so that "no marker" really means "never unpickled".
    marker = tmp_path / "unpickled"
    write_pickle(tmp_path / "p.bin", marker)
    with open(tmp_path / "p.bin", "rb") as f:
        pickle.load(f)  # our own canary, loaded on purpose
    assert marker.exists()


# --------------------------------------------------------------------------- the corpus


def test_corpus_files_are_what_make_corpus_writes():
    want = corpus.build()
    have = {p.name: p.read_bytes() for p in HOSTILE.glob("*" + corpus.SUFFIX)}
    assert sorted(have) == sorted(want), "run python tests/hostile/make_corpus.py"
    for name, data in want.items():
        assert have[name] == data, f"{name} is stale: run python tests/hostile/make_corpus.py"
    assert sum(map(len, have.values())) < 16_000, "keep the corpus tiny"


def test_corpus_control_file_is_valid():
    infos = mergex.inspect(HOSTILE / "valid.safetensors")
    assert [(t.name, t.dtype, t.shape, t.nbytes) for t in infos] == [
        ("a", "F32", (2,), 8),
        ("b", "BF16", (3,), 6),
    ]


@pytest.mark.parametrize("case", list(CORPUS))
def test_corpus_inspect(case):
    path = HOSTILE / (case + corpus.SUFFIX)
    _, expected = CORPUS[case]
    check_inspect_refused(path, [str(path), expected], [path])
    with pytest.raises(mergex.CheckpointError) as info:
        mergex.inspect(path)
    assert expected in str(info.value)


@pytest.mark.parametrize("case", list(CORPUS))
def test_corpus_merge(tmp_path, case):
    a = models.make_llama(tmp_path / "model_a", "bf16", seed=1)
    b = tmp_path / "model_b"
    b.mkdir()
    shutil.copyfile(HOSTILE / (case + corpus.SUFFIX), b / "model.safetensors")
    (b / "config.json").write_text(json.dumps(models.model_config(models.LAYERS, "bf16")))
    _, expected = CORPUS[case]
    check_merge_refused(
        tmp_path,
        linear_yaml(tmp_path, a, b),
        1,
        [str(b / "model.safetensors"), expected],
        [a.path, b],
    )


# --------------------------------------------------------------------------- folder cases


@dataclass
class Case:
    config: Path
    expect_code: int
    mentions: list[str]
    inputs: list[Path]
    inspect: Path | None = None
    """A checkpoint ``mergex inspect`` must refuse too (None: inspect does not read the culprit)."""
    markers: list[Path] = field(default_factory=list)
    """Files that appear only if a pickle was loaded."""


def two_models(tmp_path: Path, shards: int = 1):
    a = models.make_llama(tmp_path / "model_a", "bf16", seed=1)
    b = models.make_llama(tmp_path / "model_b", "bf16", seed=2, shards=shards)
    return a, b


def edit_index(b: models.Model, edit) -> Path:
    index_path = b.path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    edit(index)
    index_path.write_text(json.dumps(index))
    return index_path


def outside_copy(tmp_path: Path, b: models.Model, shard: int = 0) -> Path:
    """A valid copy, outside the model folder, of one of ``b``'s shards."""
    dst = tmp_path / "elsewhere" / "stolen.safetensors"
    dst.parent.mkdir()
    shutil.copyfile(b.files[shard], dst)
    return dst


def case_duplicate_tensor_across_shards(tmp_path):
    a, b = two_models(tmp_path, shards=2)
    (b.path / "model.safetensors.index.json").unlink()
    name = "model.norm.weight"
    first = next(f for f in b.files if name in split_safetensors(f)[1])
    other = next(f for f in b.files if f != first)
    add_tensor(other, name, split_safetensors(first)[1][name])
    # Shards are opened in name order: the error names the second file holding it.
    second = max(first, other)
    return Case(linear_yaml(tmp_path, a, b), 1, [name, str(second)], [a.path, b.path], b.path)


def case_index_absolute_path(tmp_path):
    a, b = two_models(tmp_path, shards=2)
    outside = outside_copy(tmp_path, b)
    tensor = next(iter(split_safetensors(b.files[0])[1]))
    index = edit_index(b, lambda ix: ix["weight_map"].__setitem__(tensor, str(outside)))
    return Case(
        linear_yaml(tmp_path, a, b),
        1,
        [str(index), str(outside), "outside the model folder"],
        [a.path, b.path, outside],
        b.path,
    )


def case_index_dotdot_through_a_subfolder(tmp_path):
    a, b = two_models(tmp_path, shards=2)
    outside = outside_copy(tmp_path, b)
    (b.path / "sub").mkdir()
    shard = "sub/../../elsewhere/stolen.safetensors"
    tensor = next(iter(split_safetensors(b.files[0])[1]))
    index = edit_index(b, lambda ix: ix["weight_map"].__setitem__(tensor, shard))
    return Case(
        linear_yaml(tmp_path, a, b),
        1,
        [str(index), shard, "outside the model folder"],
        [a.path, b.path, outside],
        b.path,
    )


def case_shard_symlink_outside(tmp_path):
    a, b = two_models(tmp_path, shards=2)
    outside = outside_copy(tmp_path, b)
    b.files[0].unlink()
    b.files[0].symlink_to(outside)
    return Case(
        linear_yaml(tmp_path, a, b),
        1,
        [str(b.path / "model.safetensors.index.json"), b.files[0].name, "outside the model folder"],
        [a.path, b.path, outside],
        b.path,
    )


def case_index_maps_tensor_to_wrong_shard(tmp_path):
    a, b = two_models(tmp_path, shards=2)
    tensor = next(iter(split_safetensors(b.files[0])[1]))
    index = edit_index(b, lambda ix: ix["weight_map"].__setitem__(tensor, b.files[1].name))
    return Case(
        linear_yaml(tmp_path, a, b),
        1,
        [str(index), tensor, b.files[1].name],
        [a.path, b.path],
        b.path,
    )


def case_index_without_weight_map(tmp_path):
    a, b = two_models(tmp_path, shards=2)
    index = edit_index(b, lambda ix: ix.pop("weight_map"))
    return Case(linear_yaml(tmp_path, a, b), 1, [str(index), "weight_map"], [a.path, b.path], b.path)


def case_index_weight_map_is_a_list(tmp_path):
    a, b = two_models(tmp_path, shards=2)
    index = edit_index(b, lambda ix: ix.__setitem__("weight_map", [b.files[0].name]))
    return Case(linear_yaml(tmp_path, a, b), 1, [str(index), "weight_map"], [a.path, b.path], b.path)


def case_index_shard_not_a_string(tmp_path):
    a, b = two_models(tmp_path, shards=2)
    tensor = next(iter(split_safetensors(b.files[0])[1]))
    index = edit_index(b, lambda ix: ix["weight_map"].__setitem__(tensor, 1))
    return Case(linear_yaml(tmp_path, a, b), 1, [str(index), tensor], [a.path, b.path], b.path)


def case_index_not_json(tmp_path):
    a, b = two_models(tmp_path, shards=2)
    index = b.path / "model.safetensors.index.json"
    index.write_bytes(b'{"weight_map": {"\xff": ')
    return Case(linear_yaml(tmp_path, a, b), 1, [str(index)], [a.path, b.path], b.path)


def case_pickle_only_folder(tmp_path):
    a = models.make_llama(tmp_path / "model_a", "bf16", seed=1)
    b = tmp_path / "model_b"
    marker = tmp_path / "unpickled"
    write_pickle(b / "pytorch_model.bin", marker)
    (b / "config.json").write_text(json.dumps(models.model_config(models.LAYERS, "bf16")))
    return Case(
        linear_yaml(tmp_path, a, b),
        1,
        [str(b / "pytorch_model.bin"), "pickle", "safetensors"],
        [a.path, b],
        b,
        [marker],
    )


def case_pickle_file_given_directly(tmp_path):
    a = models.make_llama(tmp_path / "model_a", "bf16", seed=1)
    marker = tmp_path / "unpickled"
    f = tmp_path / "weights" / "pytorch_model.bin"
    write_pickle(f, marker)
    return Case(
        linear_yaml(tmp_path, a, f),
        1,
        [str(f), "pickle", "safetensors"],
        [a.path, f.parent],
        f,
        [marker],
    )


def case_pickle_shard_in_index(tmp_path):
    a, b = two_models(tmp_path, shards=2)
    marker = tmp_path / "unpickled"
    write_pickle(b.path / "pytorch_model-00001-of-00002.bin", marker)
    tensor = next(iter(split_safetensors(b.files[0])[1]))
    edit_index(b, lambda ix: ix["weight_map"].__setitem__(tensor, "pytorch_model-00001-of-00002.bin"))
    return Case(
        linear_yaml(tmp_path, a, b),
        1,
        ["pytorch_model-00001-of-00002.bin", "pickle"],
        [a.path, b.path],
        b.path,
        [marker],
    )


def case_pickle_named_safetensors(tmp_path):
    # A pickle under a safetensors name is just a malformed header: never handed to pickle.
    a, b = two_models(tmp_path)
    marker = tmp_path / "unpickled"
    write_pickle(b.path / "model.safetensors", marker)
    return Case(
        linear_yaml(tmp_path, a, b),
        1,
        [str(b.path / "model.safetensors")],
        [a.path, b.path],
        b.path,
        [marker],
    )


def _reference_with_config(tmp_path, content: bytes):
    """Model ``a`` is the reference (first) model, whose config.json the output copies."""
    a, b = two_models(tmp_path)
    (a.path / "config.json").write_bytes(content)
    return a, b


def case_config_json_not_json(tmp_path):
    a, b = _reference_with_config(tmp_path, b'{"num_hidden_layers": 3,')
    return Case(linear_yaml(tmp_path, a, b), 1, [str(a.path / "config.json")], [a.path, b.path])


def case_config_json_is_a_list(tmp_path):
    a, b = _reference_with_config(tmp_path, b'[{"num_hidden_layers": 3}]')
    return Case(linear_yaml(tmp_path, a, b), 1, [str(a.path / "config.json")], [a.path, b.path])


def case_config_json_not_utf8(tmp_path):
    a, b = _reference_with_config(tmp_path, b'{"model_type": "\xff\xfe"}')
    return Case(linear_yaml(tmp_path, a, b), 1, [str(a.path / "config.json")], [a.path, b.path])


def case_tokenizer_config_not_json(tmp_path):
    # chat_template makes mergex read and rewrite the reference's tokenizer_config.json.
    a, b = two_models(tmp_path)
    (a.path / "tokenizer_config.json").write_text('{"model_max_length": ')
    cfg = linear_yaml(tmp_path, a, b, extra={"chat_template": "{{ messages }}"})
    return Case(cfg, 1, [str(a.path / "tokenizer_config.json")], [a.path, b.path])


def case_tokenizer_config_is_a_list(tmp_path):
    a, b = two_models(tmp_path)
    (a.path / "tokenizer_config.json").write_text("[1, 2]")
    cfg = linear_yaml(tmp_path, a, b, extra={"chat_template": "{{ messages }}"})
    return Case(cfg, 1, [str(a.path / "tokenizer_config.json")], [a.path, b.path])


CASES = {
    f.__name__.removeprefix("case_"): f
    for f in (
        case_duplicate_tensor_across_shards,
        case_index_absolute_path,
        case_index_dotdot_through_a_subfolder,
        case_shard_symlink_outside,
        case_index_maps_tensor_to_wrong_shard,
        case_index_without_weight_map,
        case_index_weight_map_is_a_list,
        case_index_shard_not_a_string,
        case_index_not_json,
        case_pickle_only_folder,
        case_pickle_file_given_directly,
        case_pickle_shard_in_index,
        case_pickle_named_safetensors,
        case_config_json_not_json,
        case_config_json_is_a_list,
        case_config_json_not_utf8,
        case_tokenizer_config_not_json,
        case_tokenizer_config_is_a_list,
    )
}


@pytest.mark.parametrize("case", list(CASES))
def test_merge_refuses(tmp_path, case):
    c = CASES[case](tmp_path)
    check_merge_refused(tmp_path, c.config, c.expect_code, c.mentions, c.inputs)
    for marker in c.markers:
        assert not marker.exists(), "a pickle was loaded"


@pytest.mark.parametrize("case", [name for name, f in CASES.items() if "config" not in name])
def test_inspect_refuses(tmp_path, case):
    c = CASES[case](tmp_path)
    assert c.inspect is not None
    check_inspect_refused(c.inspect, c.mentions, c.inputs)
    for marker in c.markers:
        assert not marker.exists(), "a pickle was loaded"


# --------------------------------------------------------------------------- what must still work


def _hf_cache_model(cache: Path, repo: str, src: models.Model) -> None:
    """Lay ``src`` out like huggingface_hub does: snapshot files are symlinks into blobs/."""
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "blobs").mkdir(parents=True)
    snap = root / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for f in sorted(src.path.iterdir()):
        blob = root / "blobs" / f"blob-{f.name}"
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("abc123")


@pytest.mark.parametrize("shards", [1, 2])
def test_hugging_face_cache_symlinks_are_not_hostile(tmp_path, monkeypatch, shards):
    # The symlink rule must not refuse the Hugging Face cache, whose snapshot files are
    # symlinks to ../../blobs/<hash>, outside the snapshot folder.
    cache = tmp_path / "hf"
    _hf_cache_model(cache, "acme/tiny", models.make_llama(tmp_path / "src", "bf16", seed=3, shards=shards))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    infos = mergex.inspect(cache / "models--acme--tiny" / "snapshots" / "abc123")
    assert len(infos) == len(models.llama_shapes())
    out = tmp_path / "out"
    cfg = {"merge_method": "linear", "models": [{"model": "acme/tiny", "parameters": {"weight": 1}}]}
    mergex.merge(cfg, out, progress=False, ram_budget="1MiB", threads=2)
    assert len(models.read_output(out).raw) == len(models.llama_shapes())
