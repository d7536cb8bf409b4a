//! What the engine reports, as Python objects: the plan, the run summary and the prepared
//! output tensors (no JSON between the two sides).

use std::collections::BTreeMap;

use mergex_core::engine::stream::TensorInfo as CoreTensorInfo;
use mergex_core::{PlanSummary as CorePlan, RunSummary as CoreRun};
use pyo3::prelude::*;

/// What a merge will do: bytes, passes, shards and peak memory.
#[pyclass(frozen, get_all, module = "mergex._mergex")]
pub struct PlanSummary {
    method: String,
    tensors: usize,
    bytes_read: u64,
    input_bytes: u64,
    bytes_written: u64,
    threads: usize,
    ram_budget: u64,
    max_chunk_elems: u64,
    /// Output tensors for each pass count.
    passes: BTreeMap<usize, usize>,
    /// Output files: (name, bytes, tensors).
    shards: Vec<(String, u64, usize)>,
    peak_memory: u64,
}

impl From<CorePlan> for PlanSummary {
    fn from(p: CorePlan) -> Self {
        PlanSummary {
            method: p.method,
            tensors: p.tensors,
            bytes_read: p.bytes_read,
            input_bytes: p.input_bytes,
            bytes_written: p.bytes_written,
            threads: p.threads,
            ram_budget: p.ram_budget,
            max_chunk_elems: p.max_chunk_elems,
            passes: p.passes,
            shards: p.shards,
            peak_memory: p.peak_memory,
        }
    }
}

/// What a finished run wrote, read and how its time went.
#[pyclass(frozen, get_all, module = "mergex._mergex")]
#[derive(Clone)]
pub struct RunSummary {
    files: Vec<String>,
    bytes_read: u64,
    bytes_written: u64,
    tensors: usize,
    sample_seconds: f64,
    stat_pass_seconds: Vec<f64>,
    output_seconds: f64,
    kernels: String,
    /// The checksum of each output file written, by name (`checksum()`'s value).
    checksums: BTreeMap<String, String>,
}

impl From<CoreRun> for RunSummary {
    fn from(r: CoreRun) -> Self {
        RunSummary {
            files: r.files,
            bytes_read: r.bytes_read,
            bytes_written: r.bytes_written,
            tensors: r.tensors,
            sample_seconds: r.sample_seconds,
            stat_pass_seconds: r.stat_pass_seconds,
            output_seconds: r.output_seconds,
            kernels: r.kernels,
            checksums: r.checksums,
        }
    }
}

#[pymethods]
impl RunSummary {
    /// The same summary with the timings of another engine that ran the arithmetic (the
    /// torch path times its own samples and passes).
    fn with_timings(
        &self,
        sample_seconds: f64,
        stat_pass_seconds: Vec<f64>,
        output_seconds: f64,
        kernels: String,
    ) -> RunSummary {
        RunSummary { sample_seconds, stat_pass_seconds, output_seconds, kernels, ..self.clone() }
    }
}

/// One output tensor as the engine prepared it, for an engine that merges outside Rust.
#[pyclass(frozen, get_all, module = "mergex._mergex")]
pub struct TensorInfo {
    name: String,
    shape: Vec<u64>,
    dtype: &'static str,
    copy: bool,
    wide: bool,
    chunk: u64,
    unit: u64,
    passes: usize,
    views: usize,
    dtypes: Vec<&'static str>,
    slot: usize,
    amax_key: Option<String>,
    kept: bool,
}

impl From<CoreTensorInfo> for TensorInfo {
    fn from(t: CoreTensorInfo) -> Self {
        TensorInfo {
            name: t.name,
            shape: t.shape,
            dtype: t.dtype,
            copy: t.copy,
            wide: t.wide,
            chunk: t.chunk,
            unit: t.unit,
            passes: t.passes,
            views: t.views,
            dtypes: t.dtypes,
            slot: t.slot,
            amax_key: t.amax_key,
            kept: t.kept,
        }
    }
}
