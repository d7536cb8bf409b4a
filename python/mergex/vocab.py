"""The output vocabulary (``tokenizer_source`` / ``tokenizer:``) and where each row of a
vocabulary-indexed tensor comes from, for every input (README, "Vocabularies").

Each input's rows are put in the output tokenizer's id order before the method runs. A token
an input lacks (or whose ``force`` is set) gets a default row, the same for every input, by
the rule of the tool users know: its ``tokens:`` entry if it has one; else the row of the
one model that has it; else zeros when none has it; else the base's row when the base has
it; else the average of the rows of the models that have it. Rows padded on by
``pad_to_multiple_of`` are each input's mean row. Rows that are computed (averages, means)
are computed here, in f64, and handed to the engine as f32 rows of a side file; the others
are gathered by the engine's reader, chunk by chunk."""

from __future__ import annotations

import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import TokenizerSettings, TokenSource
from .errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from .models import Model

__all__ = ["Vocabulary", "is_vocabulary_tensor"]

_INPUT = ("embed_tokens", "wte", "word_embeddings", "tok_embeddings")
_OUTPUT = ("lm_head", "embed_out")


def is_vocabulary_tensor(name: str) -> bool:
    """Input embeddings, the output head, and its bias."""
    module = name.rsplit(".", 1)[0]
    return any(module.endswith(k) for k in (*_INPUT, *_OUTPUT))


def _load(folder: Path, who: str) -> Any:
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # transformers raises many kinds
        raise CheckpointError(
            f"model {who}: cannot load its tokenizer from {folder}: {e}".splitlines()[0]
        ) from None


@dataclass
class Vocabulary:
    """The output tokenizer, and each input model's id of every output token."""

    tokenizer: Any
    tokens: list[str]
    """Output tokens by id."""
    size: int
    """Output rows (tokens, padded to ``pad_to_multiple_of``)."""
    ids: dict[tuple[Path, Path | None], list[int]]
    """Per model (its key): for each output id, the model's id of the token, or -1."""
    vocabs: dict[tuple[Path, Path | None], dict[str, int]]
    settings: TokenizerSettings
    base: tuple[Path, Path | None] | None
    ref_keys: dict[str, tuple[Path, Path | None]]
    """The models ``tokens:`` entries name, by their reference."""
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="mergex-vocab-")))

    def __post_init__(self) -> None:
        import shutil

        weakref.finalize(self, shutil.rmtree, str(self.workdir), True)

    @classmethod
    def build(
        cls,
        settings: TokenizerSettings,
        models: list[Model],
        base: Model | None,
        resolve: Any,
    ) -> Vocabulary:
        """The output vocabulary of ``models`` (distinct, config order); ``resolve(ref)`` opens
        a model reference (the tokenizer source, the models ``tokens:`` entries name)."""
        tokenizers = {m.key: _load(m.folder, m.ref) for m in models}
        first = base or models[0]
        # The base's tokens beyond its vocabulary size are dropped, as the tool users know does.
        tokenizers[first.key] = _stripped(tokenizers[first.key], first)
        if settings.source == "base":
            out = tokenizers[first.key]
        elif settings.source == "union":
            out = _union(tokenizers[first.key], [tokenizers[m.key] for m in models if m.key != first.key])
        else:
            source = resolve(settings.source)
            out = _load(source.folder, source.ref)
        vocab = out.get_vocab()
        tokens = [""] * len(vocab)
        for t, i in vocab.items():
            if not 0 <= i < len(tokens):
                raise CheckpointError(
                    f"tokenizer of {settings.source}: token ids are not 0..{len(vocab) - 1}"
                )
            tokens[i] = t
        pad = settings.pad_to_multiple_of or 1
        size = -(-len(tokens) // pad) * pad
        vocabs = {k: t.get_vocab() for k, t in tokenizers.items()}
        ids = {k: [v.get(t, -1) for t in tokens] for k, v in vocabs.items()}
        ref_keys = {e.model: resolve(e.model).key for e in settings.tokens.values() if e.model}
        return cls(out, tokens, size, ids, vocabs, settings, base.key if base else None, ref_keys)

    def default(self, token: str, present: list[tuple[Path, Path | None]]) -> TokenSource | None:
        """The default row rule for output token ``token``, which the models ``present`` have."""
        cfg = self.settings.tokens.get(token)
        if cfg is not None and cfg.kind != "default":
            return cfg
        if len(present) == 1:
            return TokenSource("present")
        if not present:
            return TokenSource("zero")
        if self.base in present:
            return TokenSource("base")
        return TokenSource("average")

    def forced(self, token: str) -> bool:
        cfg = self.settings.tokens.get(token)
        return cfg is not None and cfg.force


def _stripped(tok: Any, model: Model) -> Any:
    """``tok`` without the tokens whose ids are at or beyond ``model``'s vocabulary size
    (config ``vocab_size``, else its embedding rows): BPE tokenizers only, as the tool users
    know does."""
    import json

    import tokenizers

    size = model.config.get("vocab_size")
    if not isinstance(size, int) or isinstance(size, bool):
        emb = next((t for n, t in model.tensors.items() if n.endswith("embed_tokens.weight")), None)
        size = emb.shape[0] if emb is not None else None
    unused = {t for t, i in tok.get_vocab().items() if size is not None and i >= size}
    if not unused:
        return tok
    data = json.loads(tok.backend_tokenizer.to_str())
    vocab = data["model"].get("vocab", {})
    if data["model"].get("type") != "BPE" and any(t in vocab for t in unused if isinstance(vocab, dict)):
        raise CheckpointError(
            f"model {model.ref}: its tokenizer has tokens beyond its vocab_size {size} and is not BPE; "
            "mergex cannot strip them"
        )
    data["added_tokens"] = [e for e in data.get("added_tokens", []) if e["id"] < size]
    for t in unused:
        vocab.pop(t, None)

    def keep(merge: Any) -> bool:
        parts = merge.split(" ") if isinstance(merge, str) else merge
        return not any(p in unused for p in parts)

    if "merges" in data["model"]:
        data["model"]["merges"] = [m for m in data["model"]["merges"] if keep(m)]
    tok._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(data))
    return tok


def _union(base: Any, others: list[Any]) -> Any:
    """The base tokenizer with every other model's tokens added (plain tokens in each model's
    id order, then their added tokens), as the tool users know builds a union."""
    import transformers

    with tempfile.TemporaryDirectory() as d:
        base.save_pretrained(d)
        out = transformers.AutoTokenizer.from_pretrained(d)
    have = set(out.get_vocab())
    added: dict[str, Any] = {}
    for tok in others:
        special = {info.content for info in tok.added_tokens_decoder.values()}
        for t, _i in sorted(tok.get_vocab().items(), key=lambda e: e[1]):
            if t not in have and t not in special:
                out.add_tokens(t)
                have.add(t)
        for _i, info in sorted(tok.added_tokens_decoder.items()):
            if info.content not in have and info.content not in added:
                added[info.content] = info
    for info in added.values():
        if info.special:
            out.add_special_tokens({"additional_special_tokens": [info]}, replace_extra_special_tokens=False)
        else:
            out.add_tokens(info)
    return out


RowRef = tuple[int, int] | None
"""A row of an output tensor: ``(source, row)``, or zeros."""


@dataclass
class SideRows:
    """Rows computed while planning (averages, padding means), per output tensor: written to
    a side file the engine reads like a model."""

    path: Path
    rows: dict[str, list[Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Empty until written: the jobs that read rows while planning open it already.
        self.write()

    def add(self, name: str, row: Any) -> int:
        self.rows.setdefault(name, []).append(row)
        return len(self.rows[name]) - 1

    def write(self) -> None:
        import json
        import struct

        import numpy as np

        header: dict[str, Any] = {}
        data = []
        offset = 0
        for n, rows in self.rows.items():
            raw = np.ascontiguousarray(np.stack(rows).astype(np.float32)).tobytes()
            header[n] = {
                "dtype": "F32",
                "shape": [len(rows), *rows[0].shape],
                "data_offsets": [offset, offset + len(raw)],
            }
            data.append(raw)
            offset += len(raw)
        head = json.dumps(header or {"__metadata__": {"format": "pt"}}).encode()
        head += b" " * (-len(head) % 8)
        self.path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(data))


def row_maps(
    vocab: Vocabulary,
    name: str,
    keys: list[tuple[Path, Path | None]],
    rows: list[int],
    read: Any,
    side: SideRows,
) -> list[list[tuple[int, int, int]]]:
    """Each source's rows of output tensor ``name`` in the output vocabulary's order, as runs
    (:func:`runs`; built row by row without holding a list of rows).

    ``keys[i]`` is source ``i``'s model, ``rows[i]`` its tensor's rows, ``read(i, row)`` a row
    of it as f64 (numpy); a computed row refers to source ``len(keys)``, the side tensor.
    """
    import numpy as np

    n, tokens = len(keys), vocab.tokens
    side_source = n
    ids = [[j if 0 <= j < rows[i] else -1 for j in vocab.ids[keys[i]]] for i in range(n)]
    out: list[list[tuple[int, int, int]]] = [[] for _ in range(n)]
    for t, token in enumerate(tokens):
        present = [i for i in range(n) if ids[i][t] >= 0]
        forced = vocab.forced(token)
        default: RowRef = None
        if len(present) < n or forced:
            rule = vocab.default(token, [keys[i] for i in present])
            default = _default_row(
                vocab, rule, token, t, keys, ids, present, rows, read, side, name, side_source
            )
        for i in range(n):
            _extend(out[i], default if forced or ids[i][t] < 0 else (i, ids[i][t]))
    if vocab.size > len(tokens):
        # Padding rows: each input's mean row over the vocabulary (its rows as gathered, in
        # order).
        for i in range(n):
            total = np.zeros_like(read(i, 0))
            for count, source, first in out[i]:
                for r in range(first, first + count) if source >= 0 else ():
                    total += read(source, r) if source != side_source else side.rows[name][r]
            mean = side.add(name, total / len(tokens))
            for _ in range(len(tokens), vocab.size):
                _extend(out[i], (side_source, mean))
    return out


def _extend(runs: list[tuple[int, int, int]], r: RowRef) -> None:
    """Append row ``r`` to ``runs`` (``(rows, source, first row)``, source -1: zeros)."""
    source, first = (-1, 0) if r is None else r
    if runs:
        n, s, f = runs[-1]
        if s == source and (source == -1 or f + n == first):
            runs[-1] = (n + 1, s, f)
            return
    runs.append((1, source, first))


def _default_row(
    vocab: Vocabulary,
    rule: TokenSource | None,
    token: str,
    t: int,
    keys: list[tuple[Path, Path | None]],
    ids: list[list[int]],
    present: list[int],
    rows: list[int],
    read: Any,
    side: SideRows,
    name: str,
    side_source: int,
) -> RowRef:
    if rule is None or rule.kind == "zero":
        return None
    if rule.kind == "present":
        return (present[0], ids[present[0]][t])
    if rule.kind == "base":
        i = keys.index(vocab.base)  # type: ignore[arg-type]
        return (i, ids[i][t])
    if rule.kind == "average":
        total = sum(read(i, ids[i][t]) for i in present)
        return (side_source, side.add(name, total / len(present)))
    i = _source_of(rule.model, keys, vocab, token)
    if rule.kind == "model":
        if ids[i][t] < 0:
            raise ConfigError(f"tokenizer.tokens.{token}: model {rule.model} has no token {token!r}")
        return (i, ids[i][t])
    row = rule.token_id
    if row is None:
        row = vocab.vocabs[keys[i]].get(rule.token or "", -1)
        if row < 0:
            raise ConfigError(f"tokenizer.tokens.{token}: model {rule.model} has no token {rule.token!r}")
    if not 0 <= row < rows[i]:
        raise ConfigError(f"tokenizer.tokens.{token}: token id {row} is out of range for model {rule.model}")
    return (i, row)


def _source_of(ref: str | None, keys: list[tuple[Path, Path | None]], vocab: Vocabulary, token: str) -> int:
    key = vocab.ref_keys.get(ref or "")
    if key in keys:
        return keys.index(key)
    raise ConfigError(f"tokenizer.tokens.{token}: model {ref} is not an input of this tensor's merge")


class RowReader:
    """Rows of the planned inputs of one tensor, read through the engine (a one-tensor job
    for each) while planning: for averages and padding means."""

    def __init__(self, planner: Any, refs: list[Any], infos: list[Any]) -> None:
        self.planner, self.refs, self.infos = planner, refs, infos
        self.reader: Any = None

    def _open(self) -> None:
        from . import _mergex
        from .job import EngineJob, TensorJob

        pl = self.planner
        tensors = []
        for k, (r, info) in enumerate(zip(self.refs, self.infos, strict=True)):
            ref = type(r)(r.model, r.tensor, 0, {"weight": 1.0}, r.scale, r.lora)
            tensors.append(TensorJob(f"source {k}", "F32", list(info.shape), [ref]))
        paths = [str(p) for p in sorted(pl.index, key=pl.index.__getitem__)]
        job = EngineJob("linear", paths, tensors, 0, 64 << 20, 1, 1 << 40)
        self.core = _mergex.MergeJob(job.to_json())
        self.meta = self.core.tensors()
        self.reader = self.core.open_reader()

    def row(self, i: int, row: int) -> Any:
        """Row ``row`` of source ``i`` as f64."""
        import numpy as np

        from .extract import DECODE

        if self.reader is None:
            self._open()
        t = self.meta[i]
        cols = int(np.prod(t.shape[1:]))
        buf = np.empty(cols * t.slot, np.uint8)
        self.reader.read(i, row * cols, cols, buf.data)
        return DECODE[t.dtypes[0]](buf).astype(np.float64)
