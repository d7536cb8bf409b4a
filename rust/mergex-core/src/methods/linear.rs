//! `linear`: a weighted average (METHODS.md §1).

use super::inputs::ChunkInputs;
use super::kernel::{Kernel, Stage, NO_STATS};
use super::merge::{param, TensorCtx, TensorMerge, WeightedSum};
use super::spec::{spec, BaseUse, Default, MethodSpec, ParamSpec, Passes};
use crate::error::Result;
use crate::kernels::{axpy, real::Real};

struct Linear<T> {
    weights: Vec<T>,
    /// Σ w_i in f32, config order; `None` when not normalizing.
    divisor: Option<T>,
}

pub(super) const LINEAR: MethodSpec = spec!(build {
    name: "linear",
    summary: "weighted average of the models",
    base: BaseUse::None,
    min_models: 1,
    max_models: None,
    params: &[
        ParamSpec::number("weight", true, Default::Required, "the model's weight"),
        ParamSpec::flag("normalize", true, "divide by the summed weights"),
    ],
    passes: Passes::exactly(1),
});

pub(super) fn build<T: Real>(ctx: &TensorCtx<'_>) -> Result<Box<dyn TensorMerge<T>>> {
    let weights = (0..ctx.job.inputs.len())
        .map(|i| ctx.model_param(i, "weight").map(param::<T>))
        .collect::<Result<Vec<T>>>()?;
    let divisor = if ctx.flag("normalize")? {
        let mut sum = T::ZERO;
        for &w in &weights {
            sum += w;
        }
        if sum == T::ZERO {
            return Err(ctx.bad_param("weight", "the weights sum to 0, so normalize would divide by zero"));
        }
        Some(sum)
    } else {
        None
    };
    Ok(Box::new(Linear { weights, divisor }))
}

impl<T: Real> TensorMerge<T> for Linear<T> {
    fn merge_chunk(&self, x: &mut ChunkInputs<'_, T>, out: &mut [T]) {
        out.fill(T::ZERO);
        for (&w, xs) in self.weights.iter().zip(x.models.iter()) {
            axpy(out, w, xs);
        }
        if let Some(d) = self.divisor {
            for o in out.iter_mut() {
                *o = *o / d;
            }
        }
    }

    fn kernel(&self, stage: Stage, _: &[u64]) -> Kernel {
        match (stage, self.weighted_sum()) {
            (Stage::Output, Some(sum)) => sum.into(),
            _ => NO_STATS,
        }
    }

    fn weighted_sum(&self) -> Option<WeightedSum<T>> {
        Some(WeightedSum { weights: self.weights.clone(), divisor: self.divisor, task: None })
    }
}
