"""The output folder: written in a temporary folder beside the target and renamed into
place only when complete, so that an interrupted merge never leaves something that looks
finished (CONFIG.md, "Output folder")."""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from . import _mergex
from .errors import CheckpointError, ConfigError, MergexIOError, OutputExistsError
from .models import Model

if TYPE_CHECKING:
    from .config import MergeConfig
    from .planner import Job

__all__ = ["OutputFolder", "check_output_path", "finish_output"]

TORCH_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
)
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_output_path(out: Path, inputs: list[Path], overwrite: bool) -> Path:
    """Refuse outputs that would touch an input or clobber a folder that is not ours.

    Raises:
        ConfigError: The output is, or is inside, or contains an input model.
        OutputExistsError: The output exists and ``overwrite`` is false, or it exists and
            does not look like a mergex output.
    """
    target = out.expanduser().absolute().resolve()
    for p in inputs:
        folder = p.resolve()
        folder = folder if folder.is_dir() else folder.parent
        if _inside(target, folder) or _inside(folder, target):
            raise ConfigError(f"output folder {out} overlaps the input model folder {folder}; choose another")
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise OutputExistsError(f"output {out} already exists (pass --overwrite to replace it)")
        if not target.is_dir():
            raise OutputExistsError(f"output {out} exists and is not a folder; not replacing it")
        if any(target.iterdir()) and not (target / "mergex_config.yml").is_file():
            raise OutputExistsError(
                f"output {out} is not empty and has no mergex_config.yml: not replacing a folder "
                "that mergex did not write"
            )
    return target


STATE_NAME = "mergex-resume.json"
LOCK_NAME = ".mergex.lock"


class OutputFolder:
    """The unfinished output: a folder beside the target, committed by renaming.

    Its name is fixed (``.OUT.mergex-partial``) so that a merge killed outright can be resumed:
    the engine records every finished shard with its checksum in ``mergex-resume.json``.
    A lock file keeps two merges from writing the same output.
    """

    def __init__(self, target: Path, fingerprint: str, resume: bool) -> None:
        self.target = target
        self.tmp = target.parent / f".{target.name}.mergex-partial"
        self._old = target.parent / f".{target.name}.mergex-old-{os.getpid()}-{secrets.token_hex(4)}"
        self.state = self.tmp / STATE_NAME
        self.done: dict[str, str] = {}
        self.notes: list[str] = []
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            self.tmp.mkdir(exist_ok=True)
            self._lock = open(self.tmp / LOCK_NAME, "a+")  # noqa: SIM115 - held until commit/discard
        except OSError as e:
            raise MergexIOError(f"cannot create the output folder beside {target}: {e}") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise OutputExistsError(
                f"another mergex is writing {target} (its unfinished output is {self.tmp})"
            ) from None
        try:
            self._recover(fingerprint, resume)
        except BaseException:
            self._lock.close()
            raise

    def _recover(self, fingerprint: str, resume: bool) -> None:
        """Keep the verified shards of an interrupted run (with ``resume``), clear the rest."""
        previous = [p for p in self.tmp.iterdir() if p.name != LOCK_NAME]
        if resume and previous:
            try:
                state = json.loads(self.state.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                state = {}
            recorded = state.get("fingerprint") if isinstance(state, dict) else None
            if recorded is not None and recorded != fingerprint:
                raise ConfigError(
                    f"the unfinished merge in {self.tmp} was started with a different configuration or "
                    "different inputs; run without --resume to start over"
                )
            shards = state.get("shards", {}) if isinstance(state, dict) else {}
            for name, digest in shards.items() if isinstance(shards, dict) else []:
                path = self.tmp / str(name)
                if path.is_file() and _mergex.checksum(str(path)) == digest:
                    self.done[str(name)] = str(digest)
                else:
                    self.notes.append(
                        f"{name} from the interrupted merge failed its checksum; recomputing it"
                    )
            self.notes.append(f"resuming: {len(self.done)} finished shard(s) kept from {self.tmp}")
        elif resume:
            self.notes.append("nothing to resume: starting the merge from the beginning")
        elif previous:
            self.notes.append(f"removed an unfinished merge in {self.tmp} (use --resume to continue one)")
        for p in self.tmp.iterdir():
            if p.name == LOCK_NAME or p.name in self.done:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()

    def discard(self) -> None:
        """Remove the unfinished output (after a failure or interruption)."""
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._lock.close()

    def commit(self) -> None:
        """Rename the finished folder into place, replacing an old output if allowed."""
        for name in (STATE_NAME, LOCK_NAME):
            (self.tmp / name).unlink(missing_ok=True)
        try:
            if self.target.exists():
                self.target.rename(self._old)
            self.tmp.rename(self.target)
        except OSError as e:
            if self._old.exists() and not self.target.exists():
                self._old.rename(self.target)
            raise MergexIOError(f"cannot move the finished merge to {self.target}: {e}") from None
        finally:
            self._lock.close()
        shutil.rmtree(self._old, ignore_errors=True)

    def write_json(self, name: str, data: Any) -> None:
        (self.tmp / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    def write_model_config(
        self,
        reference: Model,
        dtype: str,
        layers: int | None,
        quantized_like: Model | None = None,
        config_keys: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        """config.json from the reference model, with dtype and layer count updated and any
        quantization_config removed; with ``quantized_like`` (``out_quantization: base``),
        that model's config as it is (its ``quantization_config`` verbatim) and its
        ``hf_quant_config.json`` copied (QUANT.md §8)."""
        if quantized_like is not None:
            reference = quantized_like
            hf = quantized_like.folder / "hf_quant_config.json"
            if hf.is_file():
                shutil.copyfile(hf, self.tmp / hf.name)
        config = dict(reference.config)
        if not config:
            return
        if quantized_like is None:
            torch_dtype = TORCH_DTYPES.get(dtype, "bfloat16")
            # The output is plain (out_quantization: none): a quantization_config left in
            # place would make transformers quantize it again on load (QUANT.md §8).
            config.pop("quantization_config", None)
            if isinstance(config.get("text_config"), dict):
                config["text_config"] = {
                    k: v for k, v in config["text_config"].items() if k != "quantization_config"
                }
            config["torch_dtype"] = torch_dtype
            if "dtype" in config:
                config["dtype"] = torch_dtype
        if layers is not None:
            keys = [k for k in _LAYER_KEYS if k in config] or ["num_hidden_layers"]
            for k in keys:
                config[k] = layers
            text = config.get("text_config")
            if isinstance(text, dict) and "num_hidden_layers" in text:
                config["text_config"] = {**text, "num_hidden_layers": layers}
        for section, changes in (config_keys or {}).items():
            if section:
                config[section] = {**config[section], **changes}
            else:
                config.update(changes)
        self.write_json("config.json", config)

    def copy_tokenizer(self, source: Model, chat_template: str | None) -> list[str]:
        """Copy the tokenizer and generation files of ``source``, with ``chat_template`` (Jinja
        text) in place of its template; returns the names copied."""
        copied = []
        for name in _TOKENIZER_FILES:
            src = source.folder / name
            if src.is_file():
                shutil.copyfile(src, self.tmp / name)
                copied.append(name)
        if chat_template is not None:
            self.set_chat_template(chat_template, source.folder / "tokenizer_config.json")
        return copied

    def save_tokenizer(self, tokenizer: Any) -> None:
        """Write ``tokenizer`` (a transformers tokenizer: the output vocabulary) over the
        copied tokenizer files."""
        for name in (
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "added_tokens.json",
        ):
            (self.tmp / name).unlink(missing_ok=True)
        tokenizer.save_pretrained(str(self.tmp))

    def set_chat_template(self, chat_template: str, source_file: Path) -> None:
        """Put ``chat_template`` (Jinja text) into ``tokenizer_config.json`` and
        ``chat_template.jinja``."""
        path = self.tmp / "tokenizer_config.json"
        try:
            tk = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{source_file}: invalid JSON: {e}") from None
        if not isinstance(tk, dict):
            raise CheckpointError(f"{source_file}: expected a JSON object")
        tk["chat_template"] = chat_template
        self.write_json("tokenizer_config.json", tk)
        # transformers 5 reads the template from its own file first.
        (self.tmp / "chat_template.jinja").write_text(chat_template, encoding="utf-8")

    def write_run_config(self, raw: dict[str, Any], seed: int) -> None:
        """mergex_config.yml: the configuration as run, with the seed."""
        data = dict(raw)
        data["seed"] = seed
        text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
        (self.tmp / "mergex_config.yml").write_text(
            "# Written by mergex: the configuration of this merge, with its seed.\n" + text,
            encoding="utf-8",
        )

    def write_card(self, method: str, models: list[Model], base: Model | None, dtype: str) -> None:
        """A short README.md model card listing the inputs and the method."""
        lines = [
            "---",
            "tags: [merge, mergex]",
            "---",
            "",
            "# Merged model",
            "",
            f"This model was merged with [mergex](https://pypi.org/project/mergex/) using the "
            f"`{method}` method, written as `{TORCH_DTYPES.get(dtype, dtype)}`.",
            "",
            "## Inputs",
            "",
        ]
        for m in models:
            role = " (base)" if base is not None and m.path == base.path else ""
            lines.append(f"- `{m.ref}`{role}")
        lines += ["", "The exact configuration is in `mergex_config.yml`.", ""]
        (self.tmp / "README.md").write_text("\n".join(lines), encoding="utf-8")


def finish_output(folder: OutputFolder, cfg: MergeConfig, job: Job) -> None:
    """Write everything beside the tensors (model config, tokenizer, chat template, the run's
    config, model card) into ``folder`` and rename it into place."""
    layers = job.total_layers if job.layered else None
    folder.write_model_config(job.reference, job.output_dtype, layers, job.quantized_like, job.config_keys)
    tok_ref = cfg.tokenizer_source
    tok = job.reference if tok_ref in (None, "base") else Model.open(tok_ref, cfg.source_dir)
    from .templates import resolve_template

    inputs = [job.reference.folder, *(m.folder for m in job.models)]
    template, notes = resolve_template(cfg.chat_template, inputs)
    job.warnings += notes
    folder.copy_tokenizer(tok, template if job.vocabulary is None else None)
    if job.vocabulary is not None:
        # The output vocabulary's tokenizer, consistent with the rows written.
        folder.save_tokenizer(job.vocabulary.tokenizer)
        if template is not None:
            folder.set_chat_template(template, tok.folder / "tokenizer_config.json")
    folder.write_run_config(cfg.raw, job.spec.seed)
    folder.write_card(cfg.merge_method, job.models, job.base, job.output_dtype)
    folder.commit()
