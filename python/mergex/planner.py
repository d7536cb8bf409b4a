"""Turning a configuration into an engine job: which output tensors exist, which input
tensors feed each, and every parameter's value for each tensor (CONFIG.md, METHODS.md §6)."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .adapter import open_adapter, split_ref
from .config import MergeConfig
from .errors import CheckpointError, ConfigError
from .job import Companion, Encode, EngineJob, GlobalScale, InputRef, LoraRef, RowMap, ScaleRef, TensorJob
from .layers import rebuild_layer_lists
from .methods import MethodSpec, get_method
from .models import Model, TensorInfo
from .names import fusion_key, is_before, is_embedding, layers_of, module_of, promote, scopes
from .params import NOT_FOUND, layer_index, lookup, rename_layer, to_f32
from .quant import FLOAT_DTYPES, Quantized, check, is_activation_scale
from .vocab import RowReader, SideRows, Vocabulary, is_vocabulary_tensor, row_maps

__all__ = ["Job", "build_job"]


@dataclass
class _Source:
    model: Model
    layer_range: tuple[int, int] | None
    params: dict[str, Any]
    is_base: bool
    listed: bool = True


@dataclass
class _Slice:
    sources: list[_Source]
    params: dict[str, Any]
    offset: int
    length: int

    @property
    def reference(self) -> _Source:
        return next((s for s in self.sources if s.is_base), self.sources[0])


@dataclass
class Job:
    """A planned merge: the engine job plus what the output folder needs."""

    spec: EngineJob
    """The job for the engine."""
    models: list[Model]
    base: Model | None
    reference: Model
    """The model whose config.json the output takes (the base, else the first)."""
    total_layers: int
    layered: bool
    """True when the config uses slices (the layer count may change)."""
    output_dtype: str
    quantized_like: Model | None = None
    """The model whose quantized format the output takes (``out_quantization: base``)."""
    warnings: list[str] = field(default_factory=list)
    vocabulary: Vocabulary | None = None
    """The output vocabulary, when a tokenizer setting aligns the inputs' rows."""
    config_keys: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Keys of config.json the merge changes, by section (``""`` for the top level,
    ``text_config``): per-layer lists rebuilt for sliced layers, the vocabulary size."""


def _scale(q: Quantized | None) -> ScaleRef | None:
    if q is None:
        return None
    g = GlobalScale(q.global_scale, q.divide) if q.global_scale else None
    block = list(q.block) if q.block else None
    return ScaleRef(q.scale, block, q.fp4, g, q.int_bits or None, q.weight_shape, q.zero_point, q.transposed)


def _plain_names(m: Model) -> None:
    """List a model's packed weights under their plain names and shapes (QUANT.md §1): the
    planner then finds ``X.weight`` of the shape a plain model has, read from its codes."""
    for codes, q in m.quantized.items():
        if not (q.plain or q.shape):
            continue
        info = m.tensors[codes]
        plain = q.plain or codes
        m.tensors[plain] = TensorInfo(codes, info.dtype, q.shape or info.shape, info.file, info.nbytes)
        m.order = [plain if n == codes else n for n in m.order]


class _Planner:
    def __init__(self, cfg: MergeConfig) -> None:
        spec = get_method(cfg.merge_method)
        assert spec is not None  # load_config checked it
        self.cfg = cfg
        self.spec: MethodSpec = spec
        self.uses_base = spec.base != "none"
        self.models: dict[tuple[Path, Path | None], Model] = {}
        self.warnings: list[str] = list(cfg.warnings)
        self.base = self._open(cfg.base_model) if cfg.base_model else None
        self.requant = cfg.out_quantization == "base"
        self.qbase: Model | None = None
        """The model whose format the output takes (``out_quantization: base``)."""
        self.scope_params: dict[str, Any] = cfg.parameters
        """The parameters of the part being planned (a module's, else the config's own)."""

    def _open(self, ref: str) -> Model:
        base_ref, adapter_ref = split_ref(ref)
        if adapter_ref is not None:
            # BASE+ADAPTER: the base's tensors, with the adapter applied by the reader.
            base = self._open(base_ref)
            ad = open_adapter(adapter_ref, self.cfg.source_dir)
            ad.check(base)
            m = dataclasses.replace(base, ref=ref, adapter=ad)
            return self.models.setdefault(m.key, m)
        m = Model.open(ref, self.cfg.source_dir)
        if m.key not in self.models:
            # Formats mergex does not read and stray non-float tensors stop the merge here;
            # the weights it reads quantized are decoded by the engine's reader (QUANT.md).
            m.quantized = check(m)
            if m.quantized:
                m.hidden = {q.scale for q in m.quantized.values()}
                m.hidden |= {
                    n
                    for q in m.quantized.values()
                    for n in (q.global_scale, q.weight_shape, q.zero_point)
                    if n
                }
                m.hidden |= {n for n in m.order if is_activation_scale(n)}
                _plain_names(m)
        return self.models.setdefault(m.key, m)

    def _is_base(self, m: Model) -> bool:
        return self.base is not None and m.key == self.base.key

    def input_ref(
        self,
        m: Model,
        name: str,
        info: TensorInfo,
        q: Quantized | None,
        position: int = 0,
        params: dict[str, float] | None = None,
    ) -> InputRef:
        """The engine's input for tensor ``name`` of ``m`` (``info`` as :meth:`Model.require`
        found it): with its scales when quantized, and its LoRA factors or replacement when
        ``m`` carries an adapter."""
        ad = m.adapter
        if ad is not None and name in ad.replaced:
            ref = InputRef(self.model_index(ad.model), ad.replaced[name], position, params or {})
        else:
            ref = InputRef(self.model_index(m), info.name, position, params or {}, _scale(q))
        t = ad.targets.get(name) if ad is not None else None
        if ad is not None and t is not None:
            ref.lora = LoraRef(self.model_index(ad.model), t.a, t.b, t.scale, t.transposed)
        return ref

    def slices(self, cfg: MergeConfig, member: Callable[[str], bool]) -> list[_Slice]:
        """The slices of ``cfg`` (the config, or one of its modules, whose tensors ``member``
        picks)."""
        out: list[_Slice] = []
        if cfg.models is not None:
            sources = [
                _Source(m, None, e.parameters, False) for e in cfg.models for m in [self._open(e.model)]
            ]
            for s in sources:
                s.is_base = self._is_base(s.model)
            if self.base is not None and not any(s.is_base for s in sources):
                sources.append(_Source(self.base, None, {}, True, listed=False))
            ref = next((s for s in sources if s.is_base), sources[0]).model
            n = layers_of(ref, member) if self.cfg.modules else ref.num_layers
            for s in sources:
                s.layer_range = (0, n)
            out.append(_Slice(sources, {}, 0, n))
            return out
        assert cfg.slices is not None
        offset = 0
        for i, sl in enumerate(cfg.slices):
            base = self._open(sl.base_model) if sl.base_model else self.base
            sources = []
            for src in sl.sources:
                m = self._open(src.model)
                sources.append(
                    _Source(m, src.layer_range, src.parameters, base is not None and m.key == base.key)
                )
            if self.uses_base and self.spec.base == "required" and not any(s.is_base for s in sources):
                raise ConfigError(f"slices[{i}]: the base model must be one of the slice's sources")
            head = next((s for s in sources if s.is_base), sources[0])
            if head.layer_range is None:
                head.layer_range = (
                    0,
                    layers_of(head.model, member) if self.cfg.modules else head.model.num_layers,
                )
            n = head.layer_range[1] - head.layer_range[0]
            for s in sources:
                if s.layer_range is None:
                    s.layer_range = head.layer_range
                if s.layer_range[1] > s.model.num_layers:
                    raise ConfigError(
                        f"slices[{i}]: layer_range {list(s.layer_range)} of {s.model.ref} goes past "
                        f"its {s.model.num_layers} layers"
                    )
            out.append(_Slice(sources, sl.parameters, offset, n))
            offset += n
        return out

    def value(
        self,
        name: str,
        levels: list[tuple[dict[str, Any], str]],
        p: float,
        tensor: str,
        model: Model | None,
    ) -> float | None:
        param = self.spec.param(name)
        assert param is not None
        v = lookup(levels, name, p)
        if v is NOT_FOUND:
            v = param.default
        if v is None:
            if not param.required:
                return None
            who = f" of model {model.ref}" if model else ""
            raise ConfigError(f"parameter '{name}'{who} is required but not set for tensor '{tensor}'")
        if isinstance(v, bool):
            return 1.0 if v else 0.0
        if isinstance(v, int | float) and math.isfinite(v):
            return to_f32(float(v))
        what = "a finite number" if isinstance(v, float) else "a number"
        raise ConfigError(
            f"parameter '{name}' for tensor '{tensor}': expected {what}, got {v!r}", tensor=tensor
        )

    def tensor(self, sl: _Slice, out_name: str, in_names: list[str], p: float) -> list[TensorJob]:
        """The output tensor ``out_name`` (with, for a re-quantized weight, the companions
        copied from the base)."""
        sources = sl.sources
        index = self.model_index
        ref_i = next((i for i, s in enumerate(sources) if s.is_base), 0)
        if self.requant and is_activation_scale(in_names[ref_i]):
            # Activation and KV-cache scales of a re-quantized output: copied from the base,
            # never merged (QUANT.md §1).
            src, t = sources[ref_i], sources[ref_i].model.require(in_names[ref_i])
            return [
                TensorJob(out_name, t.dtype, list(t.shape), [InputRef(index(src.model), t.name)], copy=True)
            ]
        infos: list[TensorInfo] = []
        for s, n in zip(sources, in_names, strict=True):
            ad = s.model.adapter
            infos.append(ad.info(n) if ad is not None and n in ad.replaced else s.model.require(n))
        ref = infos[ref_i]
        quantized = [s.model.quantized.get(info.name) for s, info in zip(sources, infos, strict=True)]
        if ref.dtype not in FLOAT_DTYPES and quantized[ref_i] is None:
            src = sources[ref_i]
            self.warnings.append(f"{out_name}: {ref.dtype} tensor copied from {src.model.ref}, not merged")
            return [
                TensorJob(
                    out_name, ref.dtype, list(ref.shape), [InputRef(index(src.model), ref.name)], copy=True
                )
            ]
        qi = next((i for i, s in enumerate(sources) if self.qbase and s.model.key == self.qbase.key), None)
        if self.requant:
            # The base's stored dtype; its quantized weights are encoded again below.
            keep = ref_i if qi is None else qi
            out_dtype = "BF16" if quantized[keep] else infos[keep].dtype
        else:
            # A quantized weight is written as plain bf16 unless out_dtype says otherwise.
            # Inputs that mix dtypes promote as torch does (bf16 with f16 → f32), as the tool
            # users know does; a tensor an adapter replaces counts as the base's dtype, as
            # peft loads it.
            stored = {
                sources[i].model.require(in_names[i]).dtype for i in range(len(sources)) if not quantized[i]
            }
            out_dtype = self.cfg.output_dtype or ("BF16" if quantized[ref_i] else promote(stored))
        base_i = ref_i if self.uses_base and sources[ref_i].is_base else None
        members = [i for i in range(len(sources)) if i != base_i]
        self.check_count(out_name, len(members))
        shape = ref.shape
        shapes = {infos[i].shape for i in members} | ({ref.shape} if base_i is not None else set())
        rows = None
        if self.vocab is not None and is_vocabulary_tensor(out_name):
            # Every input's rows in the output vocabulary's order (README, "Vocabularies").
            rows = self.vocab_rows(sources, out_name, in_names, infos, quantized)
            shape = (self.vocab.size, *ref.shape[1:])
        elif len(shapes) > 1:
            if is_embedding(out_name) and len({s[1:] for s in shapes}) == 1:
                (na, a), (nb, b) = (
                    min((t.shape[0], i) for i, t in enumerate(infos)),
                    max((t.shape[0], i) for i, t in enumerate(infos)),
                )
                raise ConfigError(
                    f"tensor '{out_name}': vocabularies differ ({na} rows in {sources[a].model.ref}, {nb} in "
                    f"{sources[b].model.ref}); set tokenizer_source (base, union or a model) or a tokenizer "
                    "block to align them"
                )
            if base_i is not None:
                kept = []
                for i in members:
                    if infos[i].shape != ref.shape:
                        self.warnings.append(
                            f"{out_name}: model {sources[i].model.ref} skipped (shape {list(infos[i].shape)}"
                            f" differs from the base's {list(ref.shape)})"
                        )
                    else:
                        kept.append(i)
                members = kept
            else:
                a, b = (
                    members[0],
                    next(i for i in members if infos[i].shape != infos[members[0]].shape),
                )
                raise CheckpointError(
                    f"tensor '{out_name}': shape {list(infos[b].shape)} in model {sources[b].model.ref} "
                    f"differs from {list(infos[a].shape)} in model {sources[a].model.ref}"
                )
        global_levels = [
            (sl.params, out_name),
            (self.scope_params, out_name),
            (self.cfg.parameters, out_name),
        ]
        params: dict[str, float] = {}
        for prm in self.spec.params:
            if not prm.per_model:
                v = self.value(prm.name, global_levels, p, out_name, None)
                if v is not None:
                    params[prm.name] = v
        positions = {i: pos for pos, i in enumerate(j for j in range(len(sources)) if j != base_i)}
        inputs = []
        for i in members:
            s = sources[i]
            levels = ([(s.params, in_names[i])] if s.listed else []) + global_levels
            mp: dict[str, float] = {}
            for prm in self.spec.params:
                if prm.per_model:
                    v = self.value(prm.name, levels, p, out_name, s.model)
                    if v is not None:
                        mp[prm.name] = v
            inputs.append(self.input_ref(s.model, in_names[i], infos[i], quantized[i], positions[i], mp))
            inputs[-1].rows = rows[i] if rows is not None else None
        if not inputs:
            raise CheckpointError(f"tensor '{out_name}': no model has the base's shape {list(ref.shape)}")
        base = None
        if base_i is not None:
            base = self.input_ref(sources[base_i].model, in_names[base_i], infos[base_i], quantized[base_i])
            base.rows = rows[base_i] if rows is not None else None
        job = TensorJob(out_name, out_dtype, list(shape), inputs, params, base)
        q = quantized[qi] if qi is not None and self.requant else None
        if q is None or qi is None:
            return [job]
        if tuple(shape) != infos[qi].shape or not all(
            n.startswith(in_names[qi]) for n in (infos[qi].name, q.scale) if n
        ):
            self.warnings.append(
                f"{out_name}: written plain BF16 (its shape or names differ from the base's)"
            )
            return [job]
        return self.encode(job, sources[qi].model, in_names[qi], infos[qi], q)

    def encode(
        self, job: TensorJob, m: Model, plain: str, codes: TensorInfo, q: Quantized
    ) -> list[TensorJob]:
        """Write ``job`` quantized like the base's weight ``plain`` of ``m`` (codes ``codes``):
        the same codes, scale, global scale and zero-point names (moved to the output's
        layer), dtypes and shapes; ``weight_shape`` copied (QUANT.md §8)."""
        out_name = job.name

        def renamed(name: str) -> str:
            return out_name + name[len(plain) :]

        def companion(name: str | None) -> Companion | None:
            if name is None:
                return None
            t = m.tensors[name]
            return Companion(renamed(name), t.dtype, list(t.shape))

        scale = companion(q.scale)
        assert scale is not None
        job.name, job.dtype = renamed(codes.name), codes.dtype
        job.encode = Encode(
            rule=q.rule,
            scale=scale,
            block=list(q.block) if q.block else None,
            bits=q.int_bits or None,
            global_scale=companion(q.global_scale),
            fusion=fusion_key(out_name) if q.rule.startswith("nvfp4") else None,
            zero_point=companion(q.zero_point),
            transposed=q.transposed,
        )
        jobs = [job]
        if q.weight_shape:
            t = m.tensors[q.weight_shape]
            ref = InputRef(self.model_index(m), q.weight_shape)
            jobs.append(TensorJob(renamed(q.weight_shape), t.dtype, list(t.shape), [ref], copy=True))
        return jobs

    def vocab_rows(
        self,
        sources: list[_Source],
        name: str,
        in_names: list[str],
        infos: list[TensorInfo],
        quantized: list[Quantized | None],
    ) -> list[RowMap]:
        """Each source's row map of the vocabulary-indexed tensor ``name``."""
        assert self.vocab is not None and self.side is not None
        if len({i.shape[1:] for i in infos}) > 1:
            shapes = ", ".join(
                f"{list(i.shape)} in {s.model.ref}" for s, i in zip(sources, infos, strict=True)
            )
            raise CheckpointError(f"tensor '{name}': the rows differ in size ({shapes})")
        refs = [
            self.input_ref(s.model, n, info, q)
            for s, n, info, q in zip(sources, in_names, infos, quantized, strict=True)
        ]
        reader = RowReader(self, refs, infos)
        maps = row_maps(
            self.vocab,
            name,
            [s.model.key for s in sources],
            [i.shape[0] for i in infos],
            reader.row,
            self.side,
        )
        shaped = [(r, list(i.shape)) for r, i in zip(refs, infos, strict=True)]
        computed = self.side.rows.get(name)
        if computed:
            side = InputRef(self.model_index(self.side_model), name)
            shaped.append((side, [len(computed), *infos[0].shape[1:]]))
        return [RowMap(list(shaped), m) for m in maps]

    def check_count(self, tensor: str, others: int) -> None:
        """The number of models besides the base that the method accepts."""
        low, high = self.spec.min_models, self.spec.max_models
        if others < low or (high is not None and others > high):
            raise ConfigError(
                f"{self.spec.name} takes {self.spec.models_words}; got {others} for tensor '{tensor}'"
            )

    def model_index(self, m: Model) -> int:
        """The engine's index of ``m``'s checkpoint (models sharing one share it)."""
        if m.path not in self.index:
            self.index[m.path] = len(self.index)
            self.checkpoints[m.path] = m
        return self.index[m.path]

    def build(self) -> tuple[list[TensorJob], list[_Slice]]:
        self.index: dict[Path, int] = {}
        self.checkpoints: dict[Path, Model] = {}
        planned = [(n, scope, member, self.slices(scope, member)) for n, scope, member in scopes(self.cfg)]
        slices = planned[0][3]
        self.vocab: Vocabulary | None = None
        self.side: SideRows | None = None
        if self.cfg.tokenizer is not None:
            every = [s.model for _, _, _, sls in planned for sl in sls for s in sl.sources]
            models = list({m.key: m for m in every}.values())
            self.vocab = Vocabulary.build(self.cfg.tokenizer, models, self.base, self._open)
            self.side = SideRows(self.vocab.workdir / "vocabulary-rows.safetensors")
            self.side_model = Model("(computed vocabulary rows)", self.side.path)
        self.qbase = self.base or slices[0].reference.model
        if self.requant:
            # The base's activation and KV-cache scales are copied to the output.
            self.qbase.hidden = {n for n in self.qbase.hidden if not is_activation_scale(n)}
        tensors: list[TensorJob] = []

        def add(sl: _Slice, name: str, k: int | None) -> None:
            if k is None:
                out_name, in_names, p = name, [name] * len(sl.sources), 0.0
            else:
                out_name = rename_layer(name, sl.offset + k)
                in_names = [rename_layer(name, (s.layer_range or (0, 0))[0] + k) for s in sl.sources]
                p = k / (sl.length - 1) if sl.length > 1 else 1.0
            tensors.extend(self.tensor(sl, out_name, in_names, p))

        for _module, scope, member, sls in planned:
            self.scope_params = scope.parameters
            names = [n for n in sls[0].reference.model.names if member(n)]
            first, last = sls[0], sls[-1]
            for name in names:
                if layer_index(name) is None and is_before(name):
                    add(first, name, None)
            for sl in sls:
                ref = sl.reference
                start = (ref.layer_range or (0, 0))[0]
                by_layer: dict[int, list[str]] = {}
                for name in ref.model.names:
                    li = layer_index(name)
                    if li is not None and member(name):
                        by_layer.setdefault(li, []).append(name)
                for k in range(sl.length):
                    for name in by_layer.get(start + k, []):
                        add(sl, name, k)
            for name in [n for n in last.reference.model.names if member(n)]:
                if layer_index(name) is None and not is_before(name):
                    add(last, name, None)
        self.planned = planned
        if self.cfg.modules:
            # Every tensor belongs to a module the config lists.
            listed = set(self.cfg.modules)
            for m in {s.model.key: s.model for *_, sls in planned for sl in sls for s in sl.sources}.values():
                missing = sorted({module_of(n) for n in m.names} - listed)
                if missing:
                    example = next(n for n in m.names if module_of(n) == missing[0])
                    raise ConfigError(
                        f"modules: tensor '{example}' of {m.ref} belongs to module {missing[0]}, which "
                        "modules does not list"
                    )
        if self.side is not None and self.side.rows:
            self.side.write()
            self.checkpoints[self.side.path] = Model.open(str(self.side.path))
        return tensors, slices


def build_job(cfg: MergeConfig, *, ram_budget: int, threads: int, shard_size: int, seed: int) -> Job:
    """Plan a merge: open every model's headers and resolve every tensor's inputs and parameters.

    Raises:
        ConfigError: A parameter is missing or invalid, or slices are inconsistent.
        CheckpointError: A tensor is missing or its shapes cannot be merged.
        ModelNotFoundError: A model reference names nothing.
    """
    pl = _Planner(cfg)
    tensors, slices = pl.build()
    if not tensors:
        raise ConfigError("the configuration selects no tensors")
    paths = sorted(pl.index, key=pl.index.__getitem__)
    reference = pl.base or slices[0].reference.model
    by_module = {name: (scope, sls) for name, scope, _member, sls in pl.planned}
    text_scope, text_slices = by_module.get("text_decoder", (cfg, slices))
    layered = text_scope.slices is not None
    config_keys: dict[str, dict[str, Any]] = {}
    if layered:
        layer_sources = [
            (sl.reference.model, (sl.reference.layer_range or (0, 0))[0] + k)
            for sl in text_slices
            for k in range(sl.length)
        ]
        config_keys = rebuild_layer_lists(reference, layer_sources)
    vision = by_module.get("vision_tower")
    if vision is not None and vision[0].slices is not None:
        # A sliced vision tower: its block count in vision_config.
        vc = reference.config.get("vision_config")
        key = next((k for k in ("depth", "num_hidden_layers") if isinstance(vc, dict) and k in vc), None)
        if key is not None:
            config_keys.setdefault("vision_config", {})[key] = sum(sl.length for sl in vision[1])
    if pl.vocab is not None:
        for section in ("", "text_config"):
            if "vocab_size" in (reference.config.get(section, {}) if section else reference.config):
                config_keys.setdefault(section, {})["vocab_size"] = pl.vocab.size
    merged = Counter(t.dtype for t in tensors if not (t.copy or t.encode))
    output_dtype = cfg.output_dtype or (merged.most_common(1)[0][0] if merged else "BF16")
    from . import hub

    session = hub.current()
    spec = EngineJob(
        method=cfg.merge_method,
        models=[str(p) for p in paths],
        partial=[i for i, p in enumerate(paths) if session is not None and session.is_partial(p)],
        tensors=tensors,
        seed=seed,
        ram_budget=ram_budget,
        threads=threads,
        shard_size=shard_size,
        metadata={"mergex_method": cfg.merge_method},
    )
    return Job(
        spec=spec,
        models=[pl.checkpoints[p] for p in paths],
        base=pl.base,
        reference=reference,
        total_layers=sum(s.length for s in text_slices),
        layered=layered,
        output_dtype=output_dtype,
        quantized_like=pl.qbase if pl.requant else None,
        warnings=pl.warnings,
        vocabulary=pl.vocab,
        config_keys=config_keys,
    )
