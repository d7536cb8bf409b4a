"""What every torch method sees: one output tensor's context, its chunks, and the
interface the driver calls (the same as the Rust engine's ``TensorMerge`` trait)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ConfigError


@dataclass
class TensorCtx:
    """One output tensor, as the job and the Rust engine's plan describe it."""

    index: int
    name: str
    shape: tuple[int, ...]
    numel: int
    params: dict[str, float]
    """Global parameters (already resolved for this tensor; rounded to f32 by :meth:`p`)."""
    model_params: list[dict[str, float]]
    """Per non-base input, in config order."""
    positions: list[int]
    """Position of each non-base input among the non-base models (random draws)."""
    has_base: bool
    seed: int
    dtype: torch.dtype
    """Working precision: float32, or float64 when an input is F64."""
    device: torch.device
    ram_budget: int
    chunks: list[tuple[int, int]] = field(default_factory=list)
    """(start, length) of every chunk, the same in every pass."""

    @property
    def wide(self) -> bool:
        return self.dtype == torch.float64

    def global_(self, name: str) -> float:
        """A global parameter as resolved (f64), which the planner must have set."""
        try:
            return float(self.params[name])
        except KeyError:
            raise ConfigError(f"tensor '{self.name}': parameter '{name}' is missing") from None

    def flag(self, name: str) -> bool:
        return self.global_(name) != 0.0

    def model_param(self, i: int, name: str) -> float:
        try:
            return float(self.model_params[i][name])
        except (KeyError, IndexError):
            raise ConfigError(f"tensor '{self.name}': parameter '{name}' of model {i} is missing") from None

    def model_param_opt(self, i: int, name: str) -> float | None:
        v = self.model_params[i].get(name) if i < len(self.model_params) else None
        return None if v is None else float(v)

    def bad_param(self, name: str, message: str) -> ConfigError:
        return ConfigError(f"tensor '{self.name}': parameter '{name}': {message}")

    def expect_models(self, low: int, high: int | None, words: str) -> None:
        n = len(self.model_params)
        if n < low or (high is not None and n > high):
            raise self.bad_param("models", f"{words}; got {n}")

    def scalar(self, value: float) -> torch.Tensor:
        """A 0-d tensor of ``value`` in the working precision on the device."""
        return torch.tensor(value, dtype=self.dtype, device=self.device)


@dataclass
class Chunk:
    """The same element range of every input, decoded to the working precision."""

    start: int
    """Flat index of the first element."""
    base: torch.Tensor | None
    """The base model's values (1-D), when the tensor has a base."""
    models: torch.Tensor
    """The other inputs' values, one row each (2-D); methods may overwrite them in place."""

    @property
    def n(self) -> int:
        return int(self.models.shape[1])

    def indices(self) -> torch.Tensor:
        """Flat indices of this chunk's elements (int64)."""
        return torch.arange(self.start, self.start + self.n, dtype=torch.int64, device=self.models.device)

    def deltas(self) -> torch.Tensor:
        """The task vectors ``x_i - b`` (a new tensor; the models when there is no base)."""
        return self.models - self.base if self.base is not None else self.models


class TorchMerge:
    """Per-tensor state of a method. The driver calls :meth:`stat_chunk` over every chunk
    while :meth:`wants_pass` says so, :meth:`end_pass` after each such pass, then
    :meth:`merge_chunk` over every chunk for the output."""

    def planned_passes(self) -> int:
        return 0

    def wants_pass(self) -> bool:
        return False

    def sample_ranges(self) -> list[tuple[int, int]]:
        """Element ranges to show :meth:`sample_chunk` before the first pass (a small sample
        that lets later passes do less); none by default."""
        return []

    def sample_chunk(self, x: Chunk) -> None:
        """Take one sample range."""

    def end_sample(self) -> None:
        """The sample is complete."""

    def stat_chunk(self, x: Chunk) -> None:
        raise NotImplementedError(type(self).__name__ + " has no statistics pass")

    def end_pass(self) -> None:
        return None

    def merge_chunk(self, x: Chunk) -> torch.Tensor:
        raise NotImplementedError


def f32(value: float) -> float:
    """A parameter rounded to f32 (METHODS.md §0), as a Python float."""
    import numpy as np

    return float(np.float32(value))
