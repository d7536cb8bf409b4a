"""PEFT LoRA adapters as merge inputs (``BASE+ADAPTER``): which base weights an adapter
targets, with which factors and scale, and which base tensors it replaces. The engine's
reader adds ``scale · B·A`` to each targeted weight, chunk by chunk (README, "LoRA
adapters")."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from .models import Model, TensorInfo

__all__ = ["Adapter", "LoraTarget", "open_adapter", "split_ref"]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."
# `<module>.lora_A[.<adapter name>].weight`, `<module>.lora_embedding_A[.<adapter name>]`.
_FACTOR = re.compile(r"^(?P<module>.+)\.lora_(?P<emb>embedding_)?(?P<ab>[AB])(?:\.[^.]+)?(?:\.weight)?$")
# A full tensor saved with the adapter: a module to save, or an embedding's base layer.
_SAVED = re.compile(r"^(?P<module>.+?)(?:\.modules_to_save(?:\.[^.]+)?|\.base_layer)(?P<param>\.[^.]+)$")
_TYPES = {
    "LOHA": "LoHa",
    "LOKR": "LoKr",
    "IA3": "IA³",
    "PROMPT_TUNING": "prompt tuning",
    "PREFIX_TUNING": "prefix tuning",
    "P_TUNING": "p-tuning",
    "ADALORA": "AdaLoRA",
    "OFT": "OFT",
    "BOFT": "BOFT",
    "VERA": "VeRA",
}


def split_ref(ref: str) -> tuple[str, str | None]:
    """``BASE+ADAPTER`` → ``(BASE, ADAPTER)``; a plain reference → ``(ref, None)``."""
    base, plus, adapter = ref.partition("+")
    return (base, adapter) if plus else (ref, None)


@dataclass(frozen=True)
class LoraTarget:
    """The factors of one targeted weight."""

    a: str
    b: str
    scale: float
    """``lora_alpha / r``, or ``lora_alpha / √r`` with rsLoRA."""
    transposed: bool
    """The weight is stored as the transpose of ``B·A`` (fan_in_fan_out, embeddings)."""
    rank: int


@dataclass
class Adapter:
    """An opened PEFT LoRA adapter folder."""

    ref: str
    folder: Path
    file: Path
    config: dict[str, Any]
    model: Model
    """The adapter file's tensors, an input of the engine job like a model."""
    targets: dict[str, LoraTarget] = field(default_factory=dict)
    """Base weight name → its factors."""
    replaced: dict[str, str] = field(default_factory=dict)
    """Base tensor name → the adapter tensor that replaces it (``modules_to_save``, the base
    layer of an adapted embedding, which PEFT saves and loads over the base's)."""

    def check(self, base: Model) -> None:
        """Every targeted weight and replaced tensor exists in ``base``, and the factors fit
        the weight's shape (``A`` is r by in, ``B`` out by r)."""
        for name, t in self.targets.items():
            info = base.tensors.get(name)
            if info is None:
                raise CheckpointError(
                    f"{self.file}: tensor '{t.a}' targets '{name.removesuffix('.weight')}', which model "
                    f"{base.ref} does not have",
                    path=self.file,
                    tensor=t.a,
                )
            if len(info.shape) != 2:
                raise CheckpointError(
                    f"{self.file}: tensor '{t.a}' targets '{name}' of shape {list(info.shape)}, not a matrix",
                    path=self.file,
                    tensor=t.a,
                )
            rows, cols = info.shape
            out, inp = (cols, rows) if t.transposed else (rows, cols)
            for tensor, want in ((t.a, [t.rank, inp]), (t.b, [out, t.rank])):
                got = list(self.model.tensors[tensor].shape)
                if got != want:
                    raise CheckpointError(
                        f"{self.file}: tensor '{tensor}' has shape {got}, which does not fit '{name}' "
                        f"of shape {list(info.shape)} in model {base.ref} (expected {want}; an adapter "
                        f"for another model?)",
                        path=self.file,
                        tensor=tensor,
                    )
        for name, tensor in self.replaced.items():
            if name not in base.tensors:
                raise CheckpointError(
                    f"{self.file}: tensor '{tensor}' replaces '{name}', which model {base.ref} does not have",
                    path=self.file,
                    tensor=tensor,
                )

    def info(self, name: str) -> TensorInfo:
        """The adapter tensor that replaces base tensor ``name``."""
        return self.model.tensors[self.replaced[name]]


def _fail(path: Path, message: str, tensor: str | None = None) -> CheckpointError:
    return CheckpointError(f"{path}: {message}", path=path, tensor=tensor)


def _read_config(folder: Path) -> dict[str, Any]:
    f = folder / CONFIG_FILE
    if not f.is_file():
        raise _fail(folder, f"not a PEFT adapter folder ({CONFIG_FILE} is missing)")
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise _fail(f, f"invalid JSON: {e}") from None
    if not isinstance(data, dict):
        raise _fail(f, "expected a JSON object")
    kind = str(data.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        raise _fail(f, f"{_TYPES.get(kind, kind)} adapters (peft_type {kind}) are not supported; only LoRA")
    refused = {
        "use_dora": "DoRA adapters (use_dora) are not supported",
        "lora_bias": "LoRA adapters with a bias (lora_bias) are not supported",
        "layer_replication": "adapters with layer_replication are not supported",
        "trainable_token_indices": "adapters with trainable_token_indices are not supported",
        "target_parameters": "adapters of parameters (target_parameters) are not supported",
    }
    for key, message in refused.items():
        if data.get(key):
            raise _fail(f, message)
    for key in ("r", "lora_alpha", "target_modules"):
        if data.get(key) is None:
            raise _fail(f, f"key '{key}' is missing")
    for key in ("r", "lora_alpha"):
        v = data[key]
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise _fail(f, f"key '{key}': expected a number, got {v!r}")
    if data["r"] <= 0:
        raise _fail(f, f"key 'r': the rank must be positive, got {data['r']!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(data.get(key) or {}, dict):
            raise _fail(f, f"key '{key}': expected a mapping of module patterns to numbers")
    return data


def _pattern(patterns: dict[str, Any], module: str) -> Any:
    """PEFT's rule for ``rank_pattern`` / ``alpha_pattern``: the first key that matches the
    end of the module name at a component boundary."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return None


def open_adapter(ref: str, config_dir: Path | None = None) -> Adapter:
    """Resolve and read the adapter folder ``ref``: its config, its tensor headers, and which
    base weight each factor pair targets.

    Raises:
        CheckpointError: Not a LoRA adapter, an adapter type mergex does not apply, a pickle
            adapter, or factors that do not pair up or do not match the configured rank.
    """
    from .models import Model, resolve_model

    folder = resolve_model(ref, config_dir)
    if not folder.is_dir():
        raise _fail(folder, "an adapter reference must name a PEFT adapter folder")
    cfg = _read_config(folder)
    file = folder / WEIGHTS_FILE
    if not file.is_file():
        pickled = [p.name for p in folder.glob("adapter_model*.bin")]
        if pickled:
            raise _fail(
                folder / pickled[0],
                "pickle adapters are refused (never unpickled); save the adapter with "
                "safe_serialization=True (adapter_model.safetensors)",
            )
        raise _fail(folder, f"{WEIGHTS_FILE} is missing")
    ad = Adapter(ref, folder, file, cfg, Model.open(str(file)))
    ad.model.ref = ref
    factors: dict[str, dict[str, str]] = {}
    kinds: dict[str, bool] = {}
    for name in ad.model.order:
        key = name.removeprefix(_PREFIX)
        m = _FACTOR.match(key)
        if m:
            factors.setdefault(m["module"], {})[m["ab"]] = name
            kinds[m["module"]] = bool(m["emb"])
            continue
        s = _SAVED.match(key)
        target = s["module"] + s["param"] if s else key
        if re.search(r"\.lora_|lora_magnitude", key):
            raise _fail(file, "an adapter tensor mergex does not know (DoRA's magnitude?)", name)
        ad.replaced[target] = name
    for module, pair in factors.items():
        for ab in "AB":
            if ab not in pair:
                other = next(iter(pair.values()))
                raise _fail(file, f"has no lora_{ab} beside it", other)
        a_info = ad.model.tensors[pair["A"]]
        rank = a_info.shape[0] if a_info.shape else 0
        want = _pattern(cfg.get("rank_pattern") or {}, module) or cfg["r"]
        if rank != want:
            raise _fail(
                file,
                f"rank {rank} does not match r = {want} of {CONFIG_FILE} (rank_pattern included)",
                pair["A"],
            )
        alpha = _pattern(cfg.get("alpha_pattern") or {}, module) or cfg["lora_alpha"]
        scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
        transposed = kinds[module] or bool(cfg.get("fan_in_fan_out"))
        ad.targets[module + ".weight"] = LoraTarget(pair["A"], pair["B"], float(scale), transposed, rank)
    if not ad.targets and not ad.replaced:
        raise _fail(file, "the adapter holds no LoRA factors")
    return ad


def structured_ref(value: dict[str, Any], where: str) -> str:
    """mergekit's structured reference ``{model: {path: BASE}, lora: {path: ADAPTER}}`` (or
    plain strings for either) as ``BASE+ADAPTER``."""

    def path(v: Any, key: str) -> str:
        if isinstance(v, dict) and set(v) <= {"path", "revision"} and isinstance(v.get("path"), str):
            rev = v.get("revision")
            return str(v["path"]) + (f"@{rev}" if rev else "")
        if isinstance(v, str) and v:
            return v
        raise ConfigError(f"{where}.{key}: expected a path or {{path: ...}}, got {v!r}")

    unknown = set(value) - {"model", "lora"}
    if unknown or "model" not in value:
        key = sorted(map(str, unknown))[0] if unknown else "model"
        raise ConfigError(f"{where}: a structured model reference takes 'model' and 'lora' (bad key {key!r})")
    base = path(value["model"], "model")
    return base + (f"+{path(value['lora'], 'lora')}" if value.get("lora") is not None else "")
