"""The merge methods mergex knows: parameters, defaults, base use and passes.

This is the planner's one table; the Rust engine has the matching kernels. Methods of
METHODS.md that this version does not run yet are listed with ``available=False`` so that
configs using them get a clear "not supported yet" error instead of an unknown-method one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["METHODS", "MethodSpec", "Param", "get_method"]

Scalar = float | bool | str


@dataclass(frozen=True)
class Param:
    """One parameter of a method."""

    name: str
    default: Scalar | None
    """``None`` means required."""
    per_model: bool
    doc: str


@dataclass(frozen=True)
class MethodSpec:
    """One merge method."""

    name: str
    base: Literal["none", "required", "optional"]
    params: tuple[Param, ...]
    passes: str
    summary: str
    available: bool = True

    def param(self, name: str) -> Param | None:
        """Look up a parameter by name."""
        return next((p for p in self.params if p.name == name), None)


_WEIGHT = Param("weight", None, True, "the model's weight")
_TASK_GLOBALS = (
    Param("lambda", 1.0, False, "scale of the merged task vector"),
    Param("int8_mask", False, False, "accepted for mergekit compatibility; no effect"),
)


def _task(
    name: str,
    summary: str,
    *,
    normalize: bool,
    rescale: bool,
    extra: tuple[Param, ...] = (),
    passes: str = "3",
    available: bool = True,
) -> MethodSpec:
    return MethodSpec(
        name,
        "required",
        (
            _WEIGHT,
            Param("density", 1.0, True, "fraction of the task vector kept"),
            *extra,
            Param("normalize", normalize, False, "divide by the summed weights"),
            Param("rescale", rescale, False, "L1-rescale what the sparsifier kept"),
            *_TASK_GLOBALS,
        ),
        passes,
        summary,
        available,
    )


METHODS: dict[str, MethodSpec] = {
    m.name: m
    for m in (
        MethodSpec(
            "linear",
            "none",
            (_WEIGHT, Param("normalize", True, False, "divide by the summed weights")),
            "1",
            "weighted average of the models",
        ),
        MethodSpec(
            "task_arithmetic",
            "required",
            (
                _WEIGHT,
                Param("normalize", False, False, "divide by the summed weights"),
                Param("rescale", False, False, "no effect without a sparsifier"),
                *_TASK_GLOBALS,
            ),
            "1",
            "base + λ · Σ w_i (x_i - base)",
        ),
        MethodSpec(
            "passthrough",
            "none",
            (Param("scale", None, True, "optional factor applied to the tensor"),),
            "1",
            "copy one input per tensor (layer stacking with slices)",
        ),
        _task("ties", "TIES: magnitude top-k, sign election", normalize=True, rescale=False),
        _task("dare_ties", "DARE random drops with sign election", normalize=False, rescale=True, passes="2"),
        _task("dare_linear", "DARE random drops", normalize=False, rescale=True, passes="2"),
        _task(
            "breadcrumbs",
            "drop the smallest and the largest outliers",
            normalize=False,
            rescale=False,
            extra=(Param("gamma", 0.01, True, "fraction of top outliers dropped"),),
        ),
        _task(
            "breadcrumbs_ties",
            "breadcrumbs with sign election",
            normalize=False,
            rescale=False,
            extra=(Param("gamma", 0.01, True, "fraction of top outliers dropped"),),
        ),
        _task(
            "della",
            "DELLA magnitude-ranked random drops, sign election",
            normalize=True,
            rescale=True,
            extra=(Param("epsilon", 0.15, True, "spread of keep probabilities"),),
            passes="2",
        ),
        _task(
            "della_linear",
            "DELLA without sign election",
            normalize=False,
            rescale=True,
            extra=(Param("epsilon", 0.15, True, "spread of keep probabilities"),),
            passes="2",
        ),
        MethodSpec(
            "slerp",
            "required",
            (Param("t", None, False, "interpolation factor: 0 gives the base, 1 the other model"),),
            "2",
            "spherical interpolation between the base and one other model",
        ),
        MethodSpec(
            "nuslerp",
            "optional",
            (
                _WEIGHT,
                Param("nuslerp_flatten", True, False, "one vector per tensor"),
                Param("nuslerp_row_wise", False, False, "with flatten off: columns instead of rows"),
            ),
            "1-2",
            "spherical interpolation of two models (of their task vectors with a base)",
        ),
        MethodSpec(
            "multislerp",
            "optional",
            (
                _WEIGHT,
                Param("normalize_weights", True, False, "scale the weights to sum to 1"),
                Param("eps", 1e-8, False, "numerical floor"),
            ),
            "2",
            "weighted spherical mean of any number of models",
        ),
        MethodSpec(
            "karcher",
            "none",
            (
                Param("max_iter", 10, False, "iterations"),
                Param("tol", 1e-5, False, "convergence tolerance"),
            ),
            "2",
            "Karcher (Riemannian) mean of all models, the base included",
        ),
        MethodSpec(
            "model_stock",
            "required",
            (Param("filter_wise", False, False, "one factor per row instead of per tensor"),),
            "1-2",
            "interpolate base and mean by the task vectors' average cosine",
        ),
        MethodSpec(
            "sce",
            "required",
            (Param("select_topk", 1.0, False, "fraction of highest-variance elements kept"),),
            "2-4",
            "select by variance, elect signs, weight by mean square",
        ),
        MethodSpec(
            "ram",
            "required",
            (Param("epsilon", 1e-5, False, "activity threshold on |δ|"),),
            "1",
            "average where several task vectors are active, keep where one is",
        ),
        MethodSpec(
            "ramplus_tl",
            "required",
            (
                Param("epsilon", 1e-5, False, "activity threshold on |δ|"),
                Param("r", 0.1, False, "strength of the unique-element boost"),
                Param("alpha", 0.2, False, "cap of the shared/unique ratio"),
            ),
            "2",
            "RAM with each model's unique elements scaled by how much it shares",
        ),
        MethodSpec(
            "nearswap",
            "required",
            (Param("t", None, False, "closeness threshold"),),
            "1",
            "move toward the other model where it is close to the base",
        ),
        MethodSpec(
            "arcee_fusion",
            "required",
            (),
            "3",
            "take the other model's values where their importance is an outlier",
        ),
    )
}


def get_method(name: str) -> MethodSpec | None:
    """The method called ``name``, or ``None``."""
    return METHODS.get(name)
