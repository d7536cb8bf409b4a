//! `passthrough`: one input per output tensor, optionally scaled (METHODS.md §5).

use super::inputs::ChunkInputs;
use super::kernel::{Kernel, Stage, NO_STATS};
use super::merge::{param, TensorCtx, TensorMerge};
use super::spec::{spec, BaseUse, Default, MethodSpec, ParamSpec, Passes};
use crate::error::Result;
use crate::kernels::real::Real;

struct Passthrough<T> {
    scale: Option<T>,
}

pub(super) const PASSTHROUGH: MethodSpec = spec!(build {
    name: "passthrough",
    summary: "copy one input per tensor (layer stacking with slices)",
    base: BaseUse::None,
    min_models: 1,
    max_models: Some(1),
    params: &[ParamSpec::number("scale", true, Default::Optional, "optional factor applied to the tensor")],
    passes: Passes::exactly(1),
});

pub(super) fn build<T: Real>(ctx: &TensorCtx<'_>) -> Result<Box<dyn TensorMerge<T>>> {
    Ok(Box::new(Passthrough { scale: ctx.model_param_opt(0, "scale").map(param::<T>) }))
}

impl<T: Real> TensorMerge<T> for Passthrough<T> {
    fn kernel(&self, stage: Stage, _: &[u64]) -> Kernel {
        match stage {
            Stage::Output => Kernel::Scale { scale: self.scale.map(|s| s.to_f64()) },
            _ => NO_STATS,
        }
    }

    fn merge_chunk(&self, x: &mut ChunkInputs<'_, T>, out: &mut [T]) {
        let Some(src) = x.models.first() else { return };
        match self.scale {
            Some(s) => {
                for (o, &v) in out.iter_mut().zip(src.iter()) {
                    *o = v * s;
                }
            }
            None => {
                for (o, &v) in out.iter_mut().zip(src.iter()) {
                    *o = v;
                }
            }
        }
    }
}
