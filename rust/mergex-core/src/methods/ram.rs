//! `ram` and `ramplus_tl` (METHODS.md §5): average task-vector elements where several
//! models are active, keep them whole where one is; `ramplus_tl` scales the unique
//! elements of each model by how much it shares (a counting pass first).

use super::inputs::ChunkInputs;
use super::kernel::{values, Kernel, Stage, StatOp, Vectors, NO_STATS};
use super::merge::{TensorCtx, TensorMerge};
use super::slots::RamSlots;
use super::spec::{spec, BaseUse, Default, MethodSpec, ParamSpec, Passes};
use super::stats::Stats;
use crate::error::Result;
use crate::kernels::real::Real;

struct Ram<T> {
    /// Models besides the base.
    k: usize,
    eps: T,
    /// ramplus_tl: (r, alpha, ε in f64) and the per-model unique scale once counted.
    plus: Option<(f64, f64, f64)>,
    lambdas: Option<Vec<T>>,
}

const EPSILON: ParamSpec =
    ParamSpec::number("epsilon", false, Default::Value(1e-5), "activity threshold on |δ|");

pub(super) const RAM: MethodSpec = spec!(build_ram {
    name: "ram",
    summary: "average where several task vectors are active, keep where one is",
    base: BaseUse::Required,
    min_models: 1,
    max_models: None,
    params: &[EPSILON],
    passes: Passes::exactly(1),
});

pub(super) const RAMPLUS_TL: MethodSpec = spec!(build_ramplus {
    name: "ramplus_tl",
    summary: "RAM with each model's unique elements scaled by how much it shares",
    base: BaseUse::Required,
    min_models: 1,
    max_models: None,
    params: &[
        EPSILON,
        ParamSpec::number("r", false, Default::Value(0.1), "strength of the unique-element boost"),
        // ρ is clamped to [0, alpha]: a negative alpha leaves no such interval.
        ParamSpec::number("alpha", false, Default::Value(0.2), "cap of the shared/unique ratio")
            .at_least(0.0),
    ],
    passes: Passes::between(1, 2, "2 when the tensor spans several chunks"),
});

pub(super) fn build_ram<T: Real>(ctx: &TensorCtx<'_>) -> Result<Box<dyn TensorMerge<T>>> {
    Ok(Box::new(Ram::<T> { k: ctx.job.inputs.len(), eps: eps(ctx)?, plus: None, lambdas: None }))
}

pub(super) fn build_ramplus<T: Real>(ctx: &TensorCtx<'_>) -> Result<Box<dyn TensorMerge<T>>> {
    Ok(Box::new(Ram::<T> {
        k: ctx.job.inputs.len(),
        eps: eps(ctx)?,
        plus: Some((ctx.global("r")?, ctx.global("alpha")?, ctx.global("epsilon")?)),
        lambdas: None,
    }))
}

fn eps<T: Real>(ctx: &TensorCtx<'_>) -> Result<T> {
    Ok(T::from_f64(ctx.global("epsilon")?))
}

/// Task vectors in place, and per element the number of active models in `count`.
fn active<T: Real>(x: &mut ChunkInputs<'_, T>, eps: T, count: &mut Vec<u32>) {
    count.clear();
    count.resize(x.models.first().map_or(0, |m| m.len()), 0);
    x.to_deltas();
    for m in x.models.iter() {
        for (&v, c) in m.iter().zip(count.iter_mut()) {
            *c += u32::from(v > eps || -v > eps);
        }
    }
}

impl<T: Real> TensorMerge<T> for Ram<T> {
    fn planned_passes(&self) -> usize {
        usize::from(self.plus.is_some())
    }

    fn wants_pass(&self) -> bool {
        self.plus.is_some() && self.lambdas.is_none()
    }

    fn stat_chunk(&self, x: &mut ChunkInputs<'_, T>, acc: &mut Stats) -> Result<()> {
        let mut count = Vec::new();
        active(x, self.eps, &mut count);
        // Counts per model, shared (sum 2i) and unique (sum 2i + 1): integers, exact in f64.
        for (i, m) in x.models.iter().enumerate() {
            let (mut shared, mut unique) = (0u64, 0u64);
            for (&v, &c) in m.iter().zip(&count) {
                if v > self.eps || -v > self.eps {
                    if c == 1 {
                        unique += 1;
                    } else {
                        shared += 1;
                    }
                }
            }
            acc.sum(RamSlots::shared(i)).add(shared as f64);
            acc.sum(RamSlots::unique(i)).add(unique as f64);
        }
        Ok(())
    }

    fn kernel(&self, stage: Stage, _: &[u64]) -> Kernel {
        let eps = self.eps.to_f64();
        match stage {
            Stage::Pass => Kernel::Stats { vectors: Vectors::Deltas, ops: vec![StatOp::Active { eps }] },
            Stage::Output => Kernel::Ram { eps, lambdas: self.lambdas.as_deref().map(values) },
            Stage::Sample => NO_STATS,
        }
    }

    fn end_pass(&mut self, stats: Stats) -> Result<()> {
        let (r, alpha, eps) = self.plus.unwrap_or((0.0, 0.0, 1e-5));
        self.lambdas = Some(
            (0..self.k)
                .map(|i| {
                    let (shared, unique) =
                        (stats.total(RamSlots::shared(i)), stats.total(RamSlots::unique(i)));
                    let rho = shared / unique.max(eps);
                    T::from_f64((1.0 + r * rho.clamp(0.0, alpha)) as f32 as f64)
                })
                .collect(),
        );
        Ok(())
    }

    fn merge_chunk(&self, x: &mut ChunkInputs<'_, T>, out: &mut [T]) {
        let mut count = Vec::new();
        active(x, self.eps, &mut count);
        let Some(base) = x.base else { return };
        out.fill(T::ZERO);
        for (i, m) in x.models.iter().enumerate() {
            let lambda = self.lambdas.as_ref().and_then(|l| l.get(i).copied()).unwrap_or(T::ONE);
            for ((o, &v), &c) in out.iter_mut().zip(m.iter()).zip(&count) {
                if v > self.eps || -v > self.eps {
                    *o += if c == 1 { lambda * v } else { v * (T::ONE / T::from_f64(c as f64)) };
                }
            }
        }
        for (o, &b) in out.iter_mut().zip(base) {
            *o = b + *o;
        }
    }
}
