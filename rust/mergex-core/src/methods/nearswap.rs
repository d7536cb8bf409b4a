//! `nearswap` (METHODS.md §5): take the other model's value where it is close to the
//! base, `w = clamp(t / max(|b − x|, 1e-6), 0, 1)`, `out = w·x + (1 − w)·b`.

use super::inputs::ChunkInputs;
use super::kernel::{Kernel, Stage, NO_STATS};
use super::merge::{param, TensorCtx, TensorMerge};
use super::spec::{spec, BaseUse, Default, MethodSpec, ParamSpec, Passes};
use crate::error::Result;
use crate::kernels::real::Real;

struct NearSwap<T> {
    t: T,
}

pub(super) const NEARSWAP: MethodSpec = spec!(build {
    name: "nearswap",
    summary: "move toward the other model where it is close to the base",
    base: BaseUse::Required,
    min_models: 1,
    max_models: Some(1),
    params: &[ParamSpec::number("t", false, Default::Required, "closeness threshold")],
    passes: Passes::exactly(1),
});

pub(super) fn build<T: Real>(ctx: &TensorCtx<'_>) -> Result<Box<dyn TensorMerge<T>>> {
    Ok(Box::new(NearSwap::<T> { t: param(ctx.global("t")?) }))
}

impl<T: Real> TensorMerge<T> for NearSwap<T> {
    fn kernel(&self, stage: Stage, _: &[u64]) -> Kernel {
        match stage {
            Stage::Output => Kernel::NearSwap { t: self.t.to_f64() },
            _ => NO_STATS,
        }
    }

    fn merge_chunk(&self, x: &mut ChunkInputs<'_, T>, out: &mut [T]) {
        let (Some(b), Some(m)) = (x.base, x.models.first()) else { return };
        let floor = T::from_f64(1e-6f32 as f64);
        for ((o, &bv), &xv) in out.iter_mut().zip(b).zip(m.iter()) {
            let diff = if bv > xv { bv - xv } else { xv - bv };
            let mut w = self.t / if diff > floor { diff } else { floor };
            w = if w > T::ONE {
                T::ONE
            } else if w > T::ZERO {
                w
            } else {
                T::ZERO
            };
            *o = w * xv + (T::ONE - w) * bv;
        }
    }
}
