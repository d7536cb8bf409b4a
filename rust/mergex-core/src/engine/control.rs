//! One output tensor's method driven by another engine (the torch engine): the method's
//! state stays here and takes every decision (passes, selections, cuts, solves) as in
//! [`Engine::run`]; the other engine computes the chunk kernels it describes
//! ([`Kernel`]) and hands their statistics back.

use std::path::Path;

use super::plan::Engine;
use crate::error::{Error, Result};
use crate::methods::{Kernel, Stage, Stats, TensorCtx, TensorMerge};

/// A method's per-tensor state in either working precision.
enum Merger {
    F32(Box<dyn TensorMerge<f32>>),
    F64(Box<dyn TensorMerge<f64>>),
}

/// Calls `$body` with `$m` bound to the method, whichever its precision.
macro_rules! with {
    ($self:expr, $m:ident => $body:expr) => {
        match &$self.merger {
            Merger::F32($m) => $body,
            Merger::F64($m) => $body,
        }
    };
    (mut $self:expr, $m:ident => $body:expr) => {
        match &mut $self.merger {
            Merger::F32($m) => $body,
            Merger::F64($m) => $body,
        }
    };
}

/// One output tensor's method, driven from outside: [`TensorControl::sample_ranges`]
/// (then the [`Stage::Sample`] kernel over them and [`TensorControl::end_sample`]), while
/// [`TensorControl::wants_pass`] the [`Stage::Pass`] kernel over every chunk and
/// [`TensorControl::end_pass`], then the [`Stage::Output`] kernel.
pub struct TensorControl {
    merger: Merger,
    /// Start of every chunk of the driving engine's passes.
    starts: Vec<u64>,
}

impl std::fmt::Debug for TensorControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TensorControl").field("starts", &self.starts.len()).finish()
    }
}

impl Engine {
    /// The method of output tensor `t`, for an engine that cuts it into chunks of `chunk`
    /// elements (a multiple of the tensor's unit).
    pub fn tensor_control(&self, t: usize, chunk: u64) -> Result<TensorControl> {
        let p = self.tensors.get(t).ok_or_else(|| Error::InvalidJob {
            field: "tensor".into(),
            message: format!("no output tensor {t}"),
        })?;
        let unit = p.chunk_unit();
        if chunk == 0 || !chunk.is_multiple_of(unit) {
            return Err(Error::InvalidJob {
                field: "chunk".into(),
                message: format!(
                    "tensor {}: chunks of {chunk} elements are not a multiple of {unit}",
                    p.job.name
                ),
            });
        }
        let paths: Vec<&Path> = self.job.models.iter().map(|p| p.as_path()).collect();
        let ctx =
            TensorCtx { job: &p.job, models: &paths, seed: self.job.seed, ram_budget: self.job.ram_budget };
        let merger = if p.wide {
            Merger::F64((self.method.build_f64)(&ctx)?)
        } else {
            Merger::F32((self.method.build_f32)(&ctx)?)
        };
        let starts = (0..p.numel()).step_by(chunk as usize).collect();
        Ok(TensorControl { merger, starts })
    }
}

impl TensorControl {
    /// Element ranges of the sample, before the first pass (often none).
    pub fn sample_ranges(&self) -> Vec<(u64, u64)> {
        with!(self, m => m.sample_ranges())
    }

    /// Whether another statistics pass is needed now.
    pub fn wants_pass(&self) -> bool {
        with!(self, m => m.wants_pass())
    }

    /// The chunk kernel of `stage`, which must be the coming one.
    pub fn kernel(&self, stage: Stage) -> Kernel {
        with!(self, m => m.kernel(stage, &self.starts))
    }

    /// Take the statistics of the sample.
    pub fn end_sample(&mut self, stats: Stats) -> Result<()> {
        with!(mut self, m => m.end_sample(stats))
    }

    /// Take the statistics of the pass just finished.
    pub fn end_pass(&mut self, stats: Stats) -> Result<()> {
        with!(mut self, m => m.end_pass(stats))
    }

    /// Per row, its coefficients from its Gram matrix (`k × k` of f64 each).
    pub fn row_solve(&self, grams: &[Vec<Vec<f64>>]) -> Vec<Vec<f64>> {
        with!(self, m => grams.iter().map(|g| m.row_solve(g)).collect())
    }
}
