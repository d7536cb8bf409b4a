"""Fuzzing the parsers of untrusted input with hypothesis: safetensors files, sharded
indexes, the YAML configuration, and the config.json / tokenizer_config.json that a merge
reads. Each target asserts that mergex either succeeds (with its invariants holding) or
raises a :class:`mergex.MergexError` subclass, never another exception and never a crash.

The runs are derandomized (a fixed seed per test) and small, so the suite stays fast and
reproducible. A longer run is one command::

    MERGEX_FUZZ_EXAMPLES=20000 python -m pytest -q tests/test_fuzz.py

``MERGEX_FUZZ_EXAMPLES`` sets the examples of every target (the merge target runs a tenth
of them: each example is a whole merge); ``MERGEX_FUZZ_SEED=<int>`` explores other inputs
than the fixed default. A failure prints the smallest input found; add it as an
``@example`` to keep it as a regression case.
"""

from __future__ import annotations

import builtins
import copy
import json
import math
import os
import pickle
import shutil
import struct
from pathlib import Path

import mergex
import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, example, given, seed, settings
from hypothesis import strategies as st
from mergex.config import _TOP_KEYS
from support import models

EXAMPLES = int(os.environ.get("MERGEX_FUZZ_EXAMPLES", "200"))
SEED = os.environ.get("MERGEX_FUZZ_SEED")
HOSTILE = Path(__file__).resolve().parent / "hostile"
U64_MAX = 2**64 - 1
DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


def fuzz(examples: int = EXAMPLES):
    """Fixed-seed hypothesis settings (another seed with MERGEX_FUZZ_SEED), no database."""

    def wrap(f):
        f = settings(
            max_examples=max(1, examples),
            derandomize=SEED is None,
            deadline=None,
            database=None,
            print_blob=True,
            suppress_health_check=list(HealthCheck),
        )(f)
        return f if SEED is None else seed(int(SEED))(f)

    return wrap


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


# --------------------------------------------------------------------------- JSON-ish values

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([0, 1, 2, 3, -1, 2**32, 2**63, U64_MAX, 2**64])
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=16,
)


# --------------------------------------------------------------------------- (a) safetensors files


def _pack(header: bytes, data: bytes, length: int | None = None) -> bytes:
    return struct.pack("<Q", len(header) if length is None else length % 2**64) + header + data


def _corpus() -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(HOSTILE.glob("*.safetensors"))}


CORPUS_FILES = _corpus()

mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 4096), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 4096)),
    st.tuples(st.just("delete"), st.integers(0, 4096), st.integers(1, 16)),
    st.tuples(st.just("insert"), st.integers(0, 4096), st.binary(min_size=1, max_size=16)),
    st.tuples(
        st.just("insert"),
        st.integers(0, 4096),
        st.sampled_from(
            [b'"', b"{", b"}", b"[", b"]", b",", b":", b"-", b"1e999", b"\\u0000", b"\xff", b"\0"]
        ),
    ),
    st.tuples(
        st.just("length"),
        st.sampled_from([0, 1, 7, 8, 2**31, 2**32, 2**63, U64_MAX]) | st.integers(0, U64_MAX),
    ),
    st.tuples(st.just("length_delta"), st.integers(-16, 16)),
)


def _mutate(data: bytes, op: tuple) -> bytes:
    b = bytearray(data)
    kind = op[0]
    if kind == "flip" and b:
        b[op[1] % len(b)] ^= op[2]
    elif kind == "truncate":
        del b[op[1] % (len(b) + 1) :]
    elif kind == "delete" and b:
        i = op[1] % len(b)
        del b[i : i + op[2]]
    elif kind == "insert":
        i = op[1] % (len(b) + 1)
        b[i:i] = op[2]
    elif kind in ("length", "length_delta") and len(b) >= 8:
        (n,) = struct.unpack("<Q", bytes(b[:8]))
        n = op[1] if kind == "length" else (n + op[1]) % 2**64
        b[:8] = struct.pack("<Q", n)
    return bytes(b)


@st.composite
def mutated_corpus_file(draw) -> bytes:
    data = CORPUS_FILES[draw(st.sampled_from(sorted(CORPUS_FILES)))]
    for op in draw(st.lists(mutation, max_size=4)):
        data = _mutate(data, op)
    return data


shape_dims = st.sampled_from([0, 1, 2, 3, 4, 2**32, 2**63, U64_MAX]) | st.integers(-3, 2**70)


@st.composite
def tensor_entry(draw) -> object:
    """A tensor entry: usually well-formed, sometimes with any field replaced by junk."""
    dtype = draw(st.sampled_from(sorted(DTYPE_SIZES)) | st.sampled_from(["Q4_K", "f32", "", "F4"]))
    shape = draw(st.lists(st.integers(0, 5), max_size=3))
    entry = {"dtype": dtype, "shape": shape, "data_offsets": [0, 0]}
    for key in draw(st.lists(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]), max_size=2)):
        if key == "shape":
            entry[key] = draw(st.lists(shape_dims, max_size=3) | json_values)
        else:
            entry[key] = draw(json_values)
    if draw(st.booleans()):
        entry.pop(draw(st.sampled_from(sorted(entry))))
    return entry if draw(st.integers(0, 9)) else draw(json_values)


@st.composite
def structured_file(draw) -> bytes:
    """A header built from entries (names may repeat), offsets laid out in order or not."""
    names = st.sampled_from(["a", "b", "c", "__metadata__", ""]) | st.text(max_size=6)
    items = draw(st.lists(st.tuples(names, tensor_entry()), max_size=5))
    offset = 0
    layout = draw(st.sampled_from(["contiguous", "shuffled", "random"]))
    for _, entry in items:
        if not isinstance(entry, dict) or layout == "random":
            continue
        size = DTYPE_SIZES.get(entry.get("dtype"), 1) if isinstance(entry.get("dtype"), str) else 1
        shape = entry.get("shape")
        if isinstance(shape, list) and all(isinstance(d, int) and 0 <= d < 2**16 for d in shape):
            size *= math.prod(shape)
        entry["data_offsets"] = [offset, offset + size]
        offset += size
    if layout == "shuffled":
        items = draw(st.permutations(items))
    if layout == "random":
        for _, entry in items:
            if isinstance(entry, dict) and draw(st.booleans()):
                entry["data_offsets"] = draw(st.lists(shape_dims, min_size=2, max_size=2))
    text = "{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in items) + "}"
    header = text.encode()
    header += draw(st.sampled_from([b"", b" " * 8, b"\0" * 3, b"\n"]))
    data_len = draw(st.sampled_from([offset, offset + 1, max(offset - 1, 0), 0]) | st.integers(0, 64))
    return _pack(header, bytes(data_len % 4096))


def _check_inspect(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    try:
        infos = mergex.inspect(path)
    except mergex.MergexError as e:
        assert str(path) in str(e), f"the error does not name the file: {e}"
        return
    finally:
        assert path.read_bytes() == data, "inspect changed its input"
    # Accepted: the header must describe the data section exactly, as safetensors does.
    (n,) = struct.unpack("<Q", data[:8])
    data_len = len(data) - 8 - n
    assert sum(t.nbytes for t in infos) == data_len
    assert len({t.name for t in infos}) == len(infos)
    for t in infos:
        assert t.dtype in DTYPE_SIZES and t.nbytes == math.prod(t.shape) * DTYPE_SIZES[t.dtype]
        assert t.file == str(path)
    # mergex also accepts a header padded with NUL bytes, which safetensors refuses.
    if not data[8 : 8 + n].rstrip(b" ").endswith(b"\0"):
        _agrees_with_safetensors(path, infos)


def _agrees_with_safetensors(path: Path, infos) -> None:
    """What mergex accepts, the reference implementation accepts, with the same tensors."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        names = set(f.keys())
        assert names == {t.name for t in infos}
        for t in infos:
            s = f.get_slice(t.name)
            assert tuple(s.get_shape()) == t.shape
            assert s.get_dtype() == t.dtype


@fuzz()
@given(data=st.binary(max_size=300))
def test_inspect_random_bytes(workdir, data):
    _check_inspect(workdir / "random.safetensors", data)


@fuzz()
@given(data=mutated_corpus_file())
@example(data=CORPUS_FILES["valid.safetensors"])
def test_inspect_mutated_files(workdir, data):
    _check_inspect(workdir / "mutated.safetensors", data)


@fuzz()
@given(data=structured_file())
def test_inspect_structured_headers(workdir, data):
    _check_inspect(workdir / "structured.safetensors", data)


# --------------------------------------------------------------------------- (b) YAML configs

CONFIG_KEYS = [
    *sorted(_TOP_KEYS),
    *["model", "parameters", "sources", "layer_range", "filter", "value"],
    *["weight", "density", "t", "normalize", "lambda"],
]
config_keys = st.sampled_from(CONFIG_KEYS) | st.text(max_size=8) | st.integers(-2, 2) | st.none()
config_scalars = json_scalars | st.sampled_from(
    ["linear", "ties", "slerp", "passthrough", "task_arithmetic", "bfloat16", "base", "union", "a+lora"]
)
config_values = st.recursive(
    config_scalars | st.floats(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(config_keys, inner, max_size=4),
    max_leaves=24,
)

VALID_CONFIGS = [
    {
        "merge_method": "linear",
        "models": [
            {"model": "a", "parameters": {"weight": 1.0}},
            {"model": "b", "parameters": {"weight": 0.5}},
        ],
        "dtype": "bfloat16",
    },
    {
        "merge_method": "ties",
        "base_model": "base",
        "models": [
            {"model": "a", "parameters": {"weight": [0.1, 0.5, 1.0], "density": 0.5}},
            {"model": "b", "parameters": {"weight": [{"filter": "mlp", "value": 0.3}, {"value": 1.0}]}},
        ],
        "parameters": {"normalize": True},
        "seed": 3,
    },
    {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": "a", "layer_range": [0, 2]}]},
            {"sources": [{"model": "b", "layer_range": [1, 3]}]},
        ],
        "out_dtype": "float16",
        "tokenizer_source": "base",
        "chat_template": "{{ messages }}",
    },
    {
        "merge_method": "slerp",
        "base_model": "a",
        "slices": [
            {
                "sources": [{"model": "a", "layer_range": [0, 3]}, {"model": "b", "layer_range": [0, 3]}],
                "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"value": 0.5}]},
            }
        ],
    },
]


@st.composite
def mutated_config(draw) -> dict:
    """A valid configuration with a few nodes replaced, deleted or added."""
    cfg = copy.deepcopy(draw(st.sampled_from(VALID_CONFIGS)))
    for _ in range(draw(st.integers(1, 4))):
        node = cfg
        # Walk down a random path, then edit the container reached.
        while True:
            children = list(node.items()) if isinstance(node, dict) else list(enumerate(node))
            containers = [k for k, v in children if isinstance(v, dict | list) and v]
            if not containers or draw(st.integers(0, 2)) == 0:
                break
            node = node[draw(st.sampled_from(containers))]
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace" and keys:
            node[draw(st.sampled_from(keys))] = draw(config_values)
        elif action == "delete" and keys:
            del node[draw(st.sampled_from(keys))]
        elif isinstance(node, dict):
            node[draw(config_keys)] = draw(config_values)
        else:
            node.append(draw(config_values))
    return cfg


random_configs = st.dictionaries(st.sampled_from(sorted(_TOP_KEYS)) | config_keys, config_values, max_size=6)


def _check_config(value) -> None:
    try:
        cfg = mergex.load_config(value)
    except mergex.ConfigError:
        return
    assert isinstance(cfg, mergex.MergeConfig)


@fuzz()
@given(cfg=mutated_config() | random_configs)
# Found by this test: keys of mixed types in a {filter, value} entry (sorting them for the
# message raised TypeError).
@example(
    cfg={"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": [{"x": 1, None: 2}]}}]}
)
def test_load_config_dicts(workdir, cfg):
    _check_config(cfg)
    path = workdir / "config.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    _check_config(path)


YAML_PIECES = [
    "merge_method: linear\n",
    "models:\n",
    "  - model: a\n",
    "    parameters: {weight: 1}\n",
    "slices:\n  - sources:\n      - model: a\n        layer_range: [0, 2]\n",
    "base_model: &x a\n",
    "seed: *x\n",
    "a: &r [*r]\n",
    "parameters: !!python/object/apply:os.system ['true']\n",
    "dtype: !!binary aGk=\n",
    "seed: 2001-12-14\n",
    "? [1, 2]\n: 3\n",
    "--- \n",
    "...\n",
    "\t",
    "{",
    "]",
    ": ",
    "- ",
    "'",
    '"',
    "\\",
    "#",
    "%YAML 1.1\n",
    "\ufeff",
    "\x00",
    "\udcff",
]


@st.composite
def yaml_text(draw) -> str:
    """Text built from YAML fragments and random characters, or a mutated valid file."""
    if draw(st.booleans()):
        return "".join(draw(st.lists(st.sampled_from(YAML_PIECES) | st.text(max_size=6), max_size=10)))
    text = yaml.safe_dump(draw(st.sampled_from(VALID_CONFIGS)), sort_keys=False)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(text)))
        j = i + draw(st.integers(0, 8))
        text = text[:i] + draw(st.sampled_from(YAML_PIECES) | st.text(max_size=4)) + text[j:]
    return text


@fuzz()
@given(text=yaml_text())
def test_load_config_yaml_text(workdir, text):
    path = workdir / "text.yml"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    _check_config(path)


# --------------------------------------------------------------------------- (c) sharded indexes


class Canary:
    """Unpickling this creates ``marker``: proof that something loaded the pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def sharded(workdir):
    """A folder with two valid shards, a symlink leaving it, a pickle and a subfolder, plus
    a valid file outside it."""
    root = workdir / "sharded"
    root.mkdir()
    f32 = lambda n: ("F32", (n,), np.arange(n, dtype=np.float32).tobytes())  # noqa: E731
    models.write_safetensors(root / "s1.safetensors", {"a": f32(2), "b": f32(3)})
    models.write_safetensors(root / "s2.safetensors", {"c": f32(4)})
    models.write_safetensors(workdir / "outside.safetensors", {"a": f32(2), "d": f32(1)})
    (root / "link.safetensors").symlink_to(workdir / "outside.safetensors")
    (root / "sub").mkdir()
    marker = workdir / "unpickled"
    (root / "s1.bin").write_bytes(pickle.dumps(Canary(marker)))
    return root, marker


SHARD_NAMES = [
    "s1.safetensors",
    "s2.safetensors",
    "link.safetensors",
    "s1.bin",
    "../outside.safetensors",
    "sub/../s1.safetensors",
    "sub/../../outside.safetensors",
    "./s1.safetensors",
    "sub",
    "",
    ".",
    "..",
    "missing.safetensors",
    "s1.safetensors\x00",
    "S1.SAFETENSORS",
]


@st.composite
def index_content(draw, outside: str) -> bytes:
    kind = draw(st.sampled_from(["structured", "structured", "json", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    shards = st.sampled_from([*SHARD_NAMES, outside]) | st.text(max_size=8) | json_values
    names = st.sampled_from(["a", "b", "c", "d", ""]) | st.text(max_size=4)
    index: dict = {"weight_map": draw(st.dictionaries(names, shards, max_size=5))}
    if draw(st.booleans()):
        index["metadata"] = draw(json_values)
    if draw(st.integers(0, 9)) == 0:
        index["weight_map"] = draw(json_values)
    if draw(st.integers(0, 9)) == 0:
        del index["weight_map"]
    return json.dumps(index).encode()


@fuzz()
@given(data=st.data())
def test_inspect_random_indexes(workdir, sharded, data):
    root, marker = sharded
    content = data.draw(index_content(str(workdir / "outside.safetensors")))
    index = root / "model.safetensors.index.json"
    index.write_bytes(content)
    try:
        infos = mergex.inspect(root)
    except mergex.MergexError:
        return
    finally:
        assert not marker.exists(), "a pickle was loaded"
    real_root = root.resolve()
    weight_map = json.loads(content)["weight_map"]
    assert {t.name for t in infos} == set(weight_map)
    for t in infos:
        assert real_root in Path(t.file).resolve().parents, f"{t.name} read from {t.file}, outside the folder"


# --------------------------------------------------------------------------- (d) config.json & co


@pytest.fixture(scope="module")
def tiny_models(workdir):
    """Two tiny llama-like model folders without lm_head (so tie_word_embeddings is read)."""
    shapes = models.llama_shapes(layers=2, vocab=5, hidden=4, inter=6)
    del shapes["lm_head.weight"]
    out = []
    for i in (1, 2):
        out.append(models.write_model(workdir / f"tiny{i}", models.random_tensors(shapes, "bf16", i)).path)
    return out


config_json_keys = st.sampled_from(
    [
        "num_hidden_layers",
        "n_layer",
        "num_layers",
        "n_layers",
        "tie_word_embeddings",
        "torch_dtype",
        "dtype",
        "model_type",
        "architectures",
    ]
) | st.text(max_size=6)
json_file = st.one_of(
    st.dictionaries(config_json_keys, json_values, max_size=5).map(lambda d: json.dumps(d).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=40),
)


@fuzz(max(EXAMPLES // 10, 10))
# Found by this test: tokenizer_config.json that is not JSON, or not an object, when the
# config sets chat_template (a traceback, not an error line).
@example(config_json=b"{}", tokenizer_json=b"", layered=False, chat_template="{{ messages }}")
@example(config_json=b"{}", tokenizer_json=b"[1]", layered=False, chat_template="{{ messages }}")
@given(
    config_json=json_file,
    tokenizer_json=st.none() | json_file,
    layered=st.booleans(),
    chat_template=st.none() | st.just("{{ messages }}"),
)
def test_merge_random_model_configs(
    workdir, tiny_models, config_json, tokenizer_json, layered, chat_template
):
    a, b = tiny_models
    (a / "config.json").write_bytes(config_json)
    tok = a / "tokenizer_config.json"
    if tokenizer_json is None:
        tok.unlink(missing_ok=True)
    else:
        tok.write_bytes(tokenizer_json)
    if layered:
        sources = [{"model": str(m), "layer_range": [0, 2]} for m in (a, b)]
        cfg = {"merge_method": "slerp", "base_model": str(a), "slices": [{"sources": sources}]}
        cfg["parameters"] = {"t": 0.5}
    else:
        cfg = {"merge_method": "linear", "models": [{"model": str(m)} for m in (a, b)]}
        cfg["parameters"] = {"weight": 1.0}
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    outs = workdir / "outs"
    shutil.rmtree(outs, ignore_errors=True)
    outs.mkdir()
    try:
        mergex.merge(cfg, outs / "merged", ram_budget="64KiB", threads=2, progress=False)
    except mergex.MergexError:
        assert list(outs.iterdir()) == [], "a failed merge left files behind"
        return
    config = outs / "merged" / "config.json"
    if config.exists():
        assert isinstance(json.loads(config.read_text()), dict)
