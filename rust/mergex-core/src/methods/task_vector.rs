//! The generalized task-arithmetic pipeline (METHODS.md §2): task vectors δ_i = x_i − b,
//! weighted, summed, optionally normalized by the summed weights, scaled by λ, added back
//! to the base. Sparsifiers and the sign election plug in here as further stages.

use super::{param, ChunkInputs, TensorCtx, TensorMerge};
use crate::error::Result;
use crate::kernels::{axpy_delta, real::Real};

struct TaskVector<T> {
    weights: Vec<T>,
    /// Σ w_i (f32, config order), or 1 where |Σ w_i| < 1e-8; `None` without normalize.
    divisor: Option<T>,
    lambda: T,
}

pub(super) fn build_task_arithmetic<T: Real>(
    ctx: &TensorCtx<'_>,
) -> Result<Box<dyn TensorMerge<T>>> {
    if ctx.job.base.is_none() {
        return Err(ctx.bad_param("base_model", "task_arithmetic needs a base model"));
    }
    let weights = (0..ctx.job.inputs.len())
        .map(|i| ctx.model_param(i, "weight").map(param::<T>))
        .collect::<Result<Vec<T>>>()?;
    let divisor = if ctx.flag("normalize")? {
        let mut sum = T::ZERO;
        for &w in &weights {
            sum += w;
        }
        let tiny = T::from_f64(1e-8);
        Some(if sum < tiny && -sum < tiny {
            T::ONE
        } else {
            sum
        })
    } else {
        None
    };
    Ok(Box::new(TaskVector {
        weights,
        divisor,
        lambda: param(ctx.global("lambda")?),
    }))
}

impl<T: Real> TensorMerge<T> for TaskVector<T> {
    fn merge_chunk(&self, x: &ChunkInputs<'_, T>, out: &mut [T]) {
        let Some(base) = x.base else { return };
        out.fill(T::ZERO);
        for (&w, xs) in self.weights.iter().zip(x.models) {
            axpy_delta(out, w, xs, base);
        }
        for (o, &b) in out.iter_mut().zip(base) {
            let mut mixed = *o;
            if let Some(d) = self.divisor {
                mixed = mixed / d;
            }
            *o = b + mixed * self.lambda;
        }
    }
}
