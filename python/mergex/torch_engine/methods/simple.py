"""linear and passthrough (METHODS.md §1, §5)."""

from __future__ import annotations

import torch

from ..base import Chunk, TensorCtx, TorchMerge, f32


class Linear(TorchMerge):
    def __init__(self, ctx: TensorCtx) -> None:
        self.weights = [f32(ctx.model_param(i, "weight")) for i in range(len(ctx.model_params))]
        self.ctx = ctx
        self.divisor: torch.Tensor | None = None
        if ctx.flag("normalize"):
            total = ctx.scalar(0.0)
            for w in self.weights:
                total = total + ctx.scalar(w)
            if float(total) == 0.0:
                raise ctx.bad_param("weight", "the weights sum to 0, so normalize would divide by zero")
            self.divisor = total

    def merge_chunk(self, x: Chunk) -> torch.Tensor:
        out = torch.zeros(x.n, dtype=x.models.dtype, device=x.models.device)
        for w, m in zip(self.weights, x.models, strict=True):
            out += m * w
        if self.divisor is not None:
            out /= self.divisor
        return out


class Passthrough(TorchMerge):
    def __init__(self, ctx: TensorCtx) -> None:
        ctx.expect_models(1, 1, "passthrough takes exactly one input per tensor")
        scale = ctx.model_param_opt(0, "scale")
        self.scale = None if scale is None else f32(scale)

    def merge_chunk(self, x: Chunk) -> torch.Tensor:
        out = x.models[0].clone()
        if self.scale is not None:
            out *= self.scale
        return out


METHODS = {"linear": Linear, "passthrough": Passthrough}
