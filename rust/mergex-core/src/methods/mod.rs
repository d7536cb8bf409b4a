//! Merge methods. Each method turns one output tensor's job into a [`TensorMerge`], which
//! the engine drives chunk by chunk: optional statistics passes, then the output pass.
//! Methods register in [`METHODS`], the one table the engine consults.

mod linear;
mod passthrough;
mod task_vector;

use std::path::Path;

use crate::engine::job::TensorJob;
use crate::engine::reduce::ExactSum;
use crate::error::{Error, Result};
use crate::kernels::real::Real;

/// What one chunk of an output tensor reads: the same element range of every input,
/// decoded to the working precision.
#[derive(Debug)]
pub struct ChunkInputs<'a, T> {
    /// Flat index of the first element.
    pub start: u64,
    /// The base model's values, when the method uses a base.
    pub base: Option<&'a [T]>,
    /// The other models' values, in config order.
    pub models: &'a [&'a [T]],
}

/// Partial statistics of a pass; merged across chunks in any order with the same result.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Exact sums (norms, dot products, …), method-defined meaning per slot.
    pub sums: Vec<ExactSum>,
    /// Integer counts (histograms, kept elements, …).
    pub counts: Vec<u64>,
}

impl Stats {
    /// Fold `other` into `self`.
    pub fn merge(mut self, other: Stats) -> Stats {
        if self.sums.len() < other.sums.len() {
            self.sums.resize(other.sums.len(), ExactSum::default());
        }
        for (a, b) in self.sums.iter_mut().zip(&other.sums) {
            a.merge(b);
        }
        if self.counts.len() < other.counts.len() {
            self.counts.resize(other.counts.len(), 0);
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self
    }
}

/// The per-tensor state of a method.
pub trait TensorMerge<T: Real>: Send + Sync {
    /// Statistics passes needed before the output pass.
    fn stat_passes(&self) -> usize {
        0
    }

    /// Statistics of one chunk in pass `pass`.
    fn stat_chunk(&self, _pass: usize, _x: &ChunkInputs<'_, T>) -> Result<Stats> {
        Ok(Stats::default())
    }

    /// Take the merged statistics of pass `pass`.
    fn end_pass(&mut self, _pass: usize, _stats: Stats) -> Result<()> {
        Ok(())
    }

    /// Compute the output values of one chunk.
    fn merge_chunk(&self, x: &ChunkInputs<'_, T>, out: &mut [T]);
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
}

impl TensorCtx<'_> {
    /// A global parameter, which the planner must have resolved.
    pub fn global(&self, name: &str) -> Result<f64> {
        self.job
            .params
            .get(name)
            .copied()
            .ok_or_else(|| Error::InvalidParameter {
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
        input
            .and_then(|m| m.params.get(name).copied())
            .ok_or_else(|| Error::InvalidParameter {
                name: name.into(),
                tensor: self.job.name.clone(),
                model: input
                    .and_then(|m| self.models.get(m.model))
                    .map(|p| p.to_path_buf()),
                message: "missing".into(),
            })
    }

    /// An optional per-model parameter.
    pub fn model_param_opt(&self, i: usize, name: &str) -> Option<f64> {
        self.job
            .inputs
            .get(i)
            .and_then(|m| m.params.get(name).copied())
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

/// Whether a method reads a base model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseUse {
    /// The method has no base (a configured base is an ordinary input).
    None,
    /// A base model is required.
    Required,
}

type Build<T> = fn(&TensorCtx<'_>) -> Result<Box<dyn TensorMerge<T>>>;

/// One registered method.
#[derive(Debug)]
pub struct MethodInfo {
    /// Name as written in configs.
    pub name: &'static str,
    /// Whether it needs a base.
    pub base: BaseUse,
    /// Build the f32 merger of one tensor.
    pub build_f32: Build<f32>,
    /// Build the f64 merger of one tensor (when an input is F64).
    pub build_f64: Build<f64>,
}

/// The method table.
pub static METHODS: &[MethodInfo] = &[
    MethodInfo {
        name: "linear",
        base: BaseUse::None,
        build_f32: linear::build,
        build_f64: linear::build,
    },
    MethodInfo {
        name: "task_arithmetic",
        base: BaseUse::Required,
        build_f32: task_vector::build_task_arithmetic,
        build_f64: task_vector::build_task_arithmetic,
    },
    MethodInfo {
        name: "passthrough",
        base: BaseUse::None,
        build_f32: passthrough::build,
        build_f64: passthrough::build,
    },
];

/// Look a method up by name.
pub fn find(name: &str) -> Option<&'static MethodInfo> {
    METHODS.iter().find(|m| m.name == name)
}

/// Round a parameter to f32 (METHODS.md §0) and then to the working precision.
pub(crate) fn param<T: Real>(v: f64) -> T {
    T::from_f64(v as f32 as f64)
}
