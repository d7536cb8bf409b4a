"""Loading and validating the YAML merge configuration (mergekit's format, CONFIG.md)."""

from __future__ import annotations

import copy
import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .methods import METHODS, get_method

__all__ = ["MergeConfig", "ModelEntry", "Slice", "SliceSource", "load_config"]

_TOP_KEYS = {
    "merge_method",
    "base_model",
    "models",
    "slices",
    "parameters",
    "dtype",
    "out_dtype",
    "out_quantization",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
    "seed",
    "modules",
    "name",
}
# mergekit's module names: groups of a vision-language model's tensors, each merged with
# its own models or slices and parameters (the planner's ``module_of`` says which is which).
MODULES = ("text_decoder", "vision_tower", "multi_modal_projector")
_DTYPES = {
    "float32": "F32",
    "fp32": "F32",
    "float": "F32",
    "float16": "F16",
    "fp16": "F16",
    "half": "F16",
    "bfloat16": "BF16",
    "bf16": "BF16",
    "float64": "F64",
    "double": "F64",
}

ParamValue = Any  # scalar | list[float] | list[{filter, value}]


@dataclass
class ModelEntry:
    """One entry of ``models``."""

    model: str
    parameters: dict[str, ParamValue] = field(default_factory=dict)


@dataclass
class SliceSource:
    """One source of a slice."""

    model: str
    layer_range: tuple[int, int] | None
    parameters: dict[str, ParamValue] = field(default_factory=dict)


@dataclass
class Slice:
    """One entry of ``slices``."""

    sources: list[SliceSource]
    parameters: dict[str, ParamValue] = field(default_factory=dict)
    base_model: str | None = None
    """The slice's own base (default: the top-level ``base_model``)."""


@dataclass(frozen=True)
class TokenSource:
    """Where one token's embedding comes from (``tokenizer.tokens``)."""

    kind: str
    """``model`` (that model's row of the token), ``model_token`` (a model's row of another
    token or id), ``zero``, or ``default`` (the usual rule, only ``force`` given)."""
    model: str | None = None
    token: str | None = None
    token_id: int | None = None
    force: bool = False


@dataclass
class TokenizerSettings:
    """``tokenizer_source`` or the ``tokenizer:`` block."""

    source: str
    """``base``, ``union`` or a model reference."""
    tokens: dict[str, TokenSource] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None


@dataclass
class MergeConfig:
    """A validated merge configuration."""

    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] | None = None
    slices: list[Slice] | None = None
    parameters: dict[str, ParamValue] = field(default_factory=dict)
    dtype: str | None = None
    """Safetensors dtype name (``BF16``…) from ``dtype``."""
    out_dtype: str | None = None
    """Safetensors dtype name from ``out_dtype``."""
    tokenizer_source: str | None = None
    """The model whose tokenizer files are copied (``base`` or None: the reference's)."""
    tokenizer: TokenizerSettings | None = None
    """How the output vocabulary is built (``tokenizer_source`` or ``tokenizer:``)."""
    chat_template: str | None = None
    out_quantization: str = "none"
    """``none`` (a plain output) or ``base`` (the base model's quantized format, QUANT.md §8)."""
    seed: int | None = None
    source_dir: Path | None = None
    """Folder of the YAML file; relative model paths are also tried against it."""
    raw: dict[str, Any] = field(default_factory=dict)
    """The configuration as given, for ``mergex_config.yml``."""
    warnings: list[str] = field(default_factory=list)
    """What loading it noticed and let pass (parameters the method does not take)."""
    modules: dict[str, MergeConfig] | None = None
    """``modules:``: each module's own models or slices and parameters (as a config of its
    own, with the top level's method and base)."""

    @property
    def output_dtype(self) -> str | None:
        """``out_dtype`` if set, else ``dtype``."""
        return self.out_dtype or self.dtype


def _dtype(value: Any, key: str) -> str:
    name = str(value).removeprefix("torch.").lower()
    if name not in _DTYPES:
        raise ConfigError(f"{key}: unknown dtype {value!r} (use float32, float16 or bfloat16)")
    return _DTYPES[name]


def _check_value(value: Any, where: str) -> None:
    """Check that a parameter value is a scalar, a gradient or a filtered list."""
    if isinstance(value, bool | int | float | str):
        return
    if isinstance(value, list) and value:
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
            return
        if all(isinstance(v, dict) for v in value):
            for i, entry in enumerate(value):
                unknown = set(entry) - {"filter", "value"}
                if unknown:
                    raise ConfigError(f"{where}[{i}]: unknown key {sorted(map(str, unknown))[0]!r}")
                if "value" not in entry:
                    raise ConfigError(f"{where}[{i}]: missing 'value'")
                if "filter" in entry and not isinstance(entry["filter"], str):
                    raise ConfigError(f"{where}[{i}].filter: must be a string")
                if (
                    isinstance(entry["value"], list)
                    and entry["value"]
                    and all(isinstance(v, dict) for v in entry["value"])
                ):
                    raise ConfigError(f"{where}[{i}].value: filtered lists cannot nest")
                _check_value(entry["value"], f"{where}[{i}].value")
            return
    raise ConfigError(
        f"{where}: expected a number, a gradient (list of numbers) or a list of "
        f"{{filter, value}} entries, got {value!r}"
    )


# A number as YAML 1.2 writes it: PyYAML (YAML 1.1) reads `1e-3` (no dot) as a string.
_NUMBER = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$")


def _numbers(value: Any) -> Any:
    """``value`` with every string that is a YAML 1.2 number (``1e-3``) read as a float, in
    scalars, gradients and filtered lists."""
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        return float(value)
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    if isinstance(value, dict) and "value" in value:
        return {**value, "value": _numbers(value["value"])}
    return value


def _params(raw: Any, where: str) -> dict[str, ParamValue]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of parameter names to values")
    params = {str(k): _numbers(v) for k, v in raw.items()}
    for name, value in params.items():
        _check_value(value, f"{where}.{name}")
    return params


def _model_ref(value: Any, where: str) -> str:
    if isinstance(value, dict):
        from .adapter import structured_ref

        value = structured_ref(value, where)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected a model path or org/name, got {value!r}")
    base, plus, adapter = value.partition("+")
    if plus and (not base or not adapter or "+" in adapter):
        raise ConfigError(f"{where}: expected BASE+ADAPTER (one '+'), got {value!r}")
    return value


def _tokenizer(raw: dict[str, Any]) -> TokenizerSettings | None:
    """``tokenizer_source: X`` or the ``tokenizer:`` block (source default ``union``)."""
    ts, block = raw.get("tokenizer_source"), raw.get("tokenizer")
    if ts is not None and block is not None:
        raise ConfigError("tokenizer_source: give either it or the tokenizer block, not both")
    if ts is not None:
        if not isinstance(ts, str) or not ts:
            raise ConfigError(f"tokenizer_source: expected base, union or a model reference, got {ts!r}")
        return TokenizerSettings(ts if ts in ("base", "union") else _model_ref(ts, "tokenizer_source"))
    if block is None:
        return None
    block = _mapping(block, "tokenizer", {"source", "tokens", "pad_to_multiple_of"})
    source = block.get("source", "union")
    if not isinstance(source, str) or not source:
        raise ConfigError(f"tokenizer.source: expected base, union or a model reference, got {source!r}")
    if source not in ("base", "union"):
        source = _model_ref(source, "tokenizer.source")
    pad = block.get("pad_to_multiple_of")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
        raise ConfigError(f"tokenizer.pad_to_multiple_of: expected a positive integer, got {pad!r}")
    tokens = block.get("tokens") or {}
    if not isinstance(tokens, dict):
        raise ConfigError("tokenizer.tokens: expected a mapping of tokens to their source")
    return TokenizerSettings(
        source, {str(t): _token(v, f"tokenizer.tokens.{t}") for t, v in tokens.items()}, pad
    )


def _token(raw: Any, where: str) -> TokenSource:
    entry = _mapping(raw, where, {"source", "force"})
    force = entry.get("force", False)
    if not isinstance(force, bool):
        raise ConfigError(f"{where}.force: expected true or false, got {force!r}")
    src = entry.get("source")
    if src is None:
        return TokenSource("default", force=force)
    if isinstance(src, str):
        return TokenSource("model", _model_ref(src, f"{where}.source"), force=force)
    src = _mapping(src, f"{where}.source", {"kind", "model", "token", "token_id"})
    kind = src.get("kind")
    if kind == "zero":
        return TokenSource("zero", force=force)
    if kind != "model_token":
        raise ConfigError(f"{where}.source.kind: expected model_token or zero, got {kind!r}")
    token, token_id = src.get("token"), src.get("token_id")
    if (token is None) == (token_id is None):
        raise ConfigError(f"{where}.source: give exactly one of token and token_id")
    if token_id is not None and (isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0):
        raise ConfigError(f"{where}.source.token_id: expected a token id, got {token_id!r}")
    if "model" not in src:
        raise ConfigError(f"{where}.source: missing 'model'")
    model = _model_ref(src["model"], f"{where}.source.model")
    return TokenSource("model_token", model, None if token is None else str(token), token_id, force)


def _mapping(raw: Any, where: str, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping")
    unknown = set(raw) - allowed
    if unknown:
        key = sorted(map(str, unknown))[0]
        raise ConfigError(f"{where}: unknown key {key!r}")
    return raw


def _parse(raw: dict[str, Any], source_dir: Path | None) -> MergeConfig:
    _mapping(raw, "config", _TOP_KEYS)
    method = raw.get("merge_method")
    if not isinstance(method, str):
        raise ConfigError("merge_method: required (one of " + ", ".join(METHODS) + ")")
    spec = get_method(method)
    if spec is None:
        raise ConfigError(f"merge_method: unknown method {method!r} (known: {', '.join(METHODS)})")
    if "modules" in raw:
        return _parse_modules(raw, source_dir)
    has_models, has_slices = "models" in raw, "slices" in raw
    if has_models == has_slices:
        raise ConfigError("config: give exactly one of 'models', 'slices' and 'modules'")
    cfg = MergeConfig(merge_method=method, source_dir=source_dir, raw=copy.deepcopy(raw))
    if raw.get("base_model") is not None:
        cfg.base_model = _model_ref(raw["base_model"], "base_model")
    cfg.parameters = _params(raw.get("parameters"), "parameters")
    if has_models:
        models = raw["models"]
        if not isinstance(models, list) or not models:
            raise ConfigError("models: expected a non-empty list")
        cfg.models = []
        for i, m in enumerate(models):
            where = f"models[{i}]"
            if isinstance(m, str):
                m = {"model": m}
            m = _mapping(m, where, {"model", "parameters"})
            if "model" not in m:
                raise ConfigError(f"{where}: missing 'model'")
            cfg.models.append(
                ModelEntry(
                    _model_ref(m["model"], f"{where}.model"),
                    _params(m.get("parameters"), f"{where}.parameters"),
                )
            )
    else:
        slices = raw["slices"]
        if not isinstance(slices, list) or not slices:
            raise ConfigError("slices: expected a non-empty list")
        cfg.slices = []
        for i, s in enumerate(slices):
            where = f"slices[{i}]"
            # residual_weight: accepted and unused, as in the tool users know (it declares the
            # key and never reads it).
            s = _mapping(s, where, {"sources", "parameters", "base_model", "residual_weight"})
            rw = s.get("residual_weight")
            if rw is not None and (isinstance(rw, bool) or not isinstance(_numbers(rw), int | float)):
                raise ConfigError(f"{where}.residual_weight: expected a number, got {rw!r}")
            slice_base = _model_ref(s["base_model"], f"{where}.base_model") if s.get("base_model") else None
            sources = s.get("sources")
            if not isinstance(sources, list) or not sources:
                raise ConfigError(f"{where}.sources: expected a non-empty list")
            parsed = []
            for j, src in enumerate(sources):
                w = f"{where}.sources[{j}]"
                src = _mapping(src, w, {"model", "layer_range", "parameters"})
                if "model" not in src:
                    raise ConfigError(f"{w}: missing 'model'")
                lr = src.get("layer_range")
                if lr is not None:
                    ok = (
                        isinstance(lr, list)
                        and len(lr) == 2
                        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in lr)
                    )
                    if not ok or lr[1] <= lr[0]:
                        raise ConfigError(
                            f"{w}.layer_range: expected [start, end) with start < end, got {lr!r}"
                        )
                    lr = (lr[0], lr[1])
                parsed.append(
                    SliceSource(
                        _model_ref(src["model"], f"{w}.model"),
                        lr,
                        _params(src.get("parameters"), f"{w}.parameters"),
                    )
                )
            lengths = {s.layer_range[1] - s.layer_range[0] for s in parsed if s.layer_range}
            if len(lengths) > 1:
                raise ConfigError(f"{where}: all sources of a slice must span the same number of layers")
            params = _params(s.get("parameters"), f"{where}.parameters")
            cfg.slices.append(Slice(parsed, params, slice_base))
    for key in ("dtype", "out_dtype"):
        if raw.get(key) is not None:
            setattr(cfg, key, _dtype(raw[key], key))
    cfg.tokenizer = _tokenizer(raw)
    if cfg.tokenizer is not None and cfg.tokenizer.source not in ("base", "union"):
        cfg.tokenizer_source = cfg.tokenizer.source
    oq = raw.get("out_quantization", "none")
    if oq not in ("none", "base"):
        raise ConfigError(f"out_quantization: expected 'none' or 'base', got {oq!r}")
    if oq == "base" and cfg.out_dtype is not None:
        raise ConfigError("out_quantization: base writes the base's own dtypes; remove out_dtype")
    cfg.out_quantization = oq
    ct = raw.get("chat_template")
    if ct is not None:
        from .templates import check_template

        cfg.chat_template = check_template(ct)
    seed = raw.get("seed")
    if seed is not None:
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
            raise ConfigError(f"seed: expected an integer from 0 to 2^32-1, got {seed!r}")
        cfg.seed = seed
    slice_bases = cfg.slices is not None and all(sl.base_model for sl in cfg.slices)
    if spec.base == "required" and cfg.base_model is None and not slice_bases:
        raise ConfigError(f"base_model: {method} needs a base model")
    _check_param_names(cfg)
    return cfg


def _parse_modules(raw: dict[str, Any], source_dir: Path | None) -> MergeConfig:
    """A config with ``modules:``: the top level holds what every module shares (method,
    base, parameters as the lowest level, dtype, tokenizer, ...), each module its own
    ``models`` or ``slices`` and ``parameters``."""
    modules = raw.get("modules")
    if "models" in raw or "slices" in raw:
        raise ConfigError("config: give exactly one of 'models', 'slices' and 'modules'")
    if not isinstance(modules, dict) or not modules:
        raise ConfigError("modules: expected a mapping of module names to their models or slices")
    shared = {k: v for k, v in raw.items() if k != "modules"}
    parsed: dict[str, MergeConfig] = {}
    for name, body in modules.items():
        where = f"modules.{name}"
        if name not in MODULES:
            raise ConfigError(f"{where}: unknown module (known: {', '.join(MODULES)})")
        body = _mapping(body, where, {"models", "slices", "parameters"})
        sub = {**shared, **body, "parameters": body.get("parameters")}
        try:
            parsed[name] = _parse(sub, source_dir)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
    # The top level itself: its models are the modules' (the first module's stand for it
    # where one list is needed), its parameters the lowest level of every module's.
    first = next(iter(parsed.values()))
    cfg = copy.copy(first)
    cfg.raw = copy.deepcopy(raw)
    cfg.parameters = _params(raw.get("parameters"), "parameters")
    cfg.modules = parsed
    cfg.warnings = [w for name, m in parsed.items() for w in (f"modules.{name}.{x}" for x in m.warnings)]
    _check_param_names(cfg)
    return cfg


def _check_param_names(cfg: MergeConfig) -> None:
    """Every parameter named anywhere must be one the method takes."""
    spec = get_method(cfg.merge_method)
    assert spec is not None
    known = {p.name for p in spec.params}
    places: list[tuple[str, dict[str, ParamValue]]] = [("parameters", cfg.parameters)]
    for i, m in enumerate(cfg.models or []):
        places.append((f"models[{i}].parameters", m.parameters))
    for i, sl in enumerate(cfg.slices or []):
        places.append((f"slices[{i}].parameters", sl.parameters))
        for j, src in enumerate(sl.sources):
            places.append((f"slices[{i}].sources[{j}].parameters", src.parameters))
    others = {p.name for m in METHODS.values() for p in m.params} - known
    ignored: dict[str, list[str]] = {}
    for where, params in places:
        for name in list(params):
            if name in known:
                continue
            takes = ", ".join(sorted(known)) or "none"
            if name not in others:
                close = difflib.get_close_matches(name, sorted(known | others), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"{where}.{name}: not a parameter of {spec.name} (it takes: {takes}){hint}")
            # A parameter of another method (`weight` on slerp, model_stock, karcher, …, which
            # a third of the configs users share carry): ignored, as the tool users know does,
            # with one warning a name. A name no method takes stays an error (a typo, most likely).
            del params[name]
            ignored.setdefault(name, []).append(where)
    for name, wheres in ignored.items():
        takes = ", ".join(sorted(known)) or "none"
        at = f"{wheres[0]}.{name}" + (f" and {len(wheres) - 1} more" if len(wheres) > 1 else "")
        cfg.warnings.append(f"{at}: {spec.name} takes no '{name}' (it takes: {takes}); ignored")


def load_config(
    source: str | os.PathLike[str] | dict[str, Any] | MergeConfig, source_dir: Path | None = None
) -> MergeConfig:
    """Load and validate a merge configuration.

    Args:
        source: A path to a YAML file, a dict with the same content, or a config already
            loaded (returned as is).
        source_dir: For a dict, the folder its relative model paths are also tried against.

    Returns:
        The validated configuration.

    Raises:
        ConfigError: The YAML cannot be parsed, or a key or value is invalid; the message
            names the key.
    """
    if isinstance(source, MergeConfig):
        return source
    if isinstance(source, dict):
        return _parse(source, source_dir)
    path = Path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.composer.ComposerError:
        raise ConfigError(
            f"{path}: a multi-document recipe; `mergex merge` runs it (each document alone is a config)"
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        return _parse(raw, path.resolve().parent)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
