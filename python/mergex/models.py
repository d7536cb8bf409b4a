"""Model references: local folders and files, or entries of the local Hugging Face cache,
and what the planner needs to know of each checkpoint."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import _mergex
from .errors import CheckpointError, ModelNotFoundError
from .params import layer_index

if TYPE_CHECKING:
    from .adapter import Adapter
    from .quant import Quantized

__all__ = ["Model", "TensorInfo", "hf_cache_dir", "resolve_model"]

_HF_REF = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(?:@[\w./-]+)?$")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a checkpoint."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    nbytes: int


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache folder, as huggingface_hub finds it."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def _from_hf_cache(ref: str) -> Path | None:
    name, _, rev = ref.partition("@")
    repo = hf_cache_dir() / ("models--" + name.replace("/", "--"))
    rev = rev or "main"
    ref_file = repo / "refs" / rev
    if ref_file.is_file():
        rev = ref_file.read_text(encoding="utf-8").strip()
    snap = repo / "snapshots" / rev
    return snap if snap.is_dir() else None


def resolve_model(ref: str, config_dir: Path | None = None) -> Path:
    """Find the folder or file a model reference names.

    Relative paths are tried against the current directory first, then the config file's
    folder; ``org/name[@revision]`` is then looked up in the local Hugging Face cache.

    Raises:
        ModelNotFoundError: Nothing matches; the message lists where it looked.
    """
    p = Path(ref).expanduser()
    tried = [p] if p.is_absolute() else [Path.cwd() / p]
    if not p.is_absolute() and config_dir is not None and config_dir != Path.cwd():
        tried.append(config_dir / p)
    for c in tried:
        if c.exists():
            return c.absolute()
    from . import hub

    session = hub.current()
    if session is not None and hub.parse_ref(ref) is not None:
        # Through huggingface_hub: the cache, else the Hub (header-first).
        return session.resolve(ref)
    if _HF_REF.match(ref):
        snap = _from_hf_cache(ref)
        if snap is not None:
            return snap
        raise ModelNotFoundError(
            f"model '{ref}': no such folder ({', '.join(map(str, tried))}) and not in the "
            f"Hugging Face cache at {hf_cache_dir()} (merge and plan fetch Hub models, inspect does not)"
        )
    raise ModelNotFoundError(f"model '{ref}': no such folder or file ({', '.join(map(str, tried))})")


@dataclass
class Model:
    """An opened model reference: its checkpoint's tensors and its config.json."""

    ref: str
    path: Path
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    quantized: dict[str, Quantized] = field(default_factory=dict)
    """Quantized weights the reader decodes, by plain name (set by the planner)."""
    hidden: set[str] = field(default_factory=set)
    """Tensors that are no output of their own: quantization scales, activation scales."""
    adapter: Adapter | None = None
    """The LoRA adapter applied to the checkpoint (a ``BASE+ADAPTER`` reference)."""

    @property
    def key(self) -> tuple[Path, Path | None]:
        """What identifies the model: its checkpoint, and its adapter's file."""
        return self.path, self.adapter.file if self.adapter else None

    @property
    def names(self) -> list[str]:
        """The tensor names a merge sees, in file order (without :attr:`hidden`)."""
        return [n for n in self.order if n not in self.hidden]

    @classmethod
    def open(cls, ref: str, config_dir: Path | None = None) -> Model:
        """Resolve ``ref`` and read its tensor headers (validated by the Rust reader)."""
        from . import hub

        path = resolve_model(ref, config_dir)
        session = hub.current()
        rows = _mergex.inspect(str(path), session is not None and session.is_partial(path))
        m = cls(ref, path)
        for name, dtype, shape, file, nbytes in rows:
            m.tensors[name] = TensorInfo(name, dtype, tuple(shape), file, nbytes)
            m.order.append(name)
        return m

    @property
    def folder(self) -> Path:
        """The folder holding the checkpoint."""
        return self.path if self.path.is_dir() else self.path.parent

    @cached_property
    def config(self) -> dict[str, Any]:
        """The model's config.json, or {} when it has none."""
        f = self.folder / "config.json"
        if not f.is_file():
            return {}
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{f}: invalid JSON: {e}") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{f}: expected a JSON object")
        return data

    @cached_property
    def num_layers(self) -> int:
        """Number of layers, from the tensor names (else config.json)."""
        idx = [i for n in self.order if (i := layer_index(n)) is not None]
        if idx:
            return max(idx) + 1
        n = self.config.get("num_hidden_layers", 0)
        return n if isinstance(n, int) else 0

    def find(self, name: str) -> str | None:
        """The tensor name to read for ``name``: itself, or for a missing ``lm_head`` of a
        model with tied embeddings, its input embedding."""
        if name in self.tensors:
            return name
        if name.endswith("lm_head.weight") and self.config.get("tie_word_embeddings"):
            for alt in (
                "model.embed_tokens.weight",
                "transformer.wte.weight",
                "embed_tokens.weight",
            ):
                if alt in self.tensors:
                    return alt
        return None

    def require(self, name: str) -> TensorInfo:
        """The tensor ``name`` (see :meth:`find`), or a CheckpointError naming the files searched."""
        found = self.find(name)
        if found is None:
            files = sorted({t.file for t in self.tensors.values()}) or [str(self.path)]
            raise CheckpointError(
                f"tensor '{name}' not found in model {self.ref} (searched {', '.join(files)})",
                path=self.path,
                tensor=name,
            )
        return self.tensors[found]
