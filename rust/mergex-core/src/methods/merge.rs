//! The per-tensor state of a method ([`TensorMerge`]) and what it sees when it is built
//! ([`TensorCtx`]).

use super::inputs::ChunkInputs;
use super::kernel::{values, Kernel, Stage};
use super::stats::Stats;
use crate::error::{Error, Result};
use crate::format::dtype::Dtype;
use crate::job::TensorJob;
use crate::kernels::real::Real;
use std::path::Path;

/// The per-tensor state of a method. The engine runs statistics passes while
/// [`TensorMerge::wants_pass`] says so, then one output pass.
pub trait TensorMerge<T: Real>: Send + Sync {
    /// Statistics passes expected before the output pass (for plans and progress); data
    /// may force more (see [`TensorMerge::wants_pass`]).
    fn planned_passes(&self) -> usize {
        0
    }

    /// Whether another statistics pass is needed now.
    fn wants_pass(&self) -> bool {
        false
    }

    /// Chunks must hold whole groups of this many elements (rows, for row-wise methods).
    fn align(&self) -> u64 {
        1
    }

    /// Element ranges to show [`TensorMerge::sample_chunk`] before the first pass (a small
    /// sample that lets later passes do less); none by default.
    fn sample_ranges(&self) -> Vec<(u64, u64)> {
        Vec::new()
    }

    /// Accumulate one sample range into `acc`.
    fn sample_chunk(&self, _x: &mut ChunkInputs<'_, T>, _acc: &mut Stats) -> Result<()> {
        Ok(())
    }

    /// Take the merged statistics of the sample.
    fn end_sample(&mut self, _stats: Stats) -> Result<()> {
        Ok(())
    }

    /// Accumulate one chunk's statistics of the current pass into `acc`.
    fn stat_chunk(&self, _x: &mut ChunkInputs<'_, T>, _acc: &mut Stats) -> Result<()> {
        Ok(())
    }

    /// Take the merged statistics of the pass just finished.
    fn end_pass(&mut self, _stats: Stats) -> Result<()> {
        Ok(())
    }

    /// Compute the output values of one chunk.
    fn merge_chunk(&self, x: &mut ChunkInputs<'_, T>, out: &mut [T]);

    /// Whether the chunks of the coming pass (a statistics pass while
    /// [`TensorMerge::wants_pass`], else the output pass) need only the inputs' stored bytes
    /// ([`ChunkInputs::stored`]), given their dtypes (the base first): then the engine does
    /// not decode them. The result must not depend on which it is.
    fn takes_stored(&self, dtypes: &[Dtype]) -> bool {
        let _ = dtypes;
        false
    }

    /// When the output is a plain weighted sum of the inputs, `out = Σ w_i x_i` (÷ d), the
    /// engine may compute it while decoding, without [`TensorMerge::merge_chunk`]; the
    /// result must be identical.
    fn weighted_sum(&self) -> Option<WeightedSum<T>> {
        None
    }

    /// The coming stage's chunk work as a [`Kernel`], for an engine that runs the kernels
    /// on another backend while this object keeps the control; `starts` are the chunk
    /// starts of that engine's passes over the tensor.
    fn kernel(&self, stage: Stage, starts: &[u64]) -> Kernel;

    /// The coefficients of one row from the Gram matrix of its vectors, for output kernels
    /// that solve per row ([`Kernel::Lerp`] and [`Kernel::ModelStock`] without
    /// coefficients).
    fn row_solve(&self, gram: &[Vec<f64>]) -> Vec<f64> {
        let _ = gram;
        Vec::new()
    }
}

/// A weighted sum, accumulated in the working precision from zero, input by input in order:
/// `out = (Σ_i w_i x_i) / divisor` over every input; or, with `task = Some(λ)`, over the
/// task vectors of the non-base inputs, `out = b + ((Σ_i w_i (x_i − b)) / divisor) · λ`.
#[derive(Debug, Clone)]
pub struct WeightedSum<T> {
    /// One weight per summed input.
    pub weights: Vec<T>,
    /// Divide by this at the end, when set.
    pub divisor: Option<T>,
    /// Sum task vectors against the base (the first input) and add it back after scaling
    /// by this λ.
    pub task: Option<T>,
}

/// A weighted sum as the kernel of another engine.
impl<T: Real> From<WeightedSum<T>> for Kernel {
    fn from(s: WeightedSum<T>) -> Kernel {
        Kernel::WeightedSum {
            weights: values(&s.weights),
            divisor: s.divisor.map(|d| d.to_f64()),
            task: s.task.map(|l| l.to_f64()),
        }
    }
}

/// Everything a method may look at when it sets up one output tensor.
#[derive(Debug)]
pub struct TensorCtx<'a> {
    /// The tensor's job.
    pub job: &'a TensorJob,
    /// Model paths, for error messages.
    pub models: &'a [&'a Path],
    /// Random seed.
    pub seed: u64,
    /// RAM budget of the merge, for in-memory statistics.
    pub ram_budget: u64,
}

impl TensorCtx<'_> {
    /// A global parameter, which the planner must have resolved.
    pub fn global(&self, name: &str) -> Result<f64> {
        self.job.params.get(name).copied().ok_or_else(|| Error::InvalidParameter {
            name: name.into(),
            tensor: self.job.name.clone(),
            model: None,
            message: "missing".into(),
        })
    }

    /// A global flag (non-zero is true).
    pub fn flag(&self, name: &str) -> Result<bool> {
        Ok(self.global(name)? != 0.0)
    }

    /// A per-model parameter of the `i`-th non-base input.
    pub fn model_param(&self, i: usize, name: &str) -> Result<f64> {
        let input = self.job.inputs.get(i);
        input.and_then(|m| m.params.get(name).copied()).ok_or_else(|| Error::InvalidParameter {
            name: name.into(),
            tensor: self.job.name.clone(),
            model: input.and_then(|m| self.models.get(m.model)).map(|p| p.to_path_buf()),
            message: "missing".into(),
        })
    }

    /// An optional per-model parameter.
    pub fn model_param_opt(&self, i: usize, name: &str) -> Option<f64> {
        self.job.inputs.get(i).and_then(|m| m.params.get(name).copied())
    }

    /// An error about a parameter of this tensor.
    pub fn bad_param(&self, name: &str, message: impl Into<String>) -> Error {
        Error::InvalidParameter {
            name: name.into(),
            tensor: self.job.name.clone(),
            model: None,
            message: message.into(),
        }
    }
}

/// Round a parameter to f32 (METHODS.md §0) and then to the working precision.
pub(crate) fn param<T: Real>(v: f64) -> T {
    T::from_f64(v as f32 as f64)
}
