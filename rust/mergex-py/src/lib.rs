//! `mergex._mergex`: the thin binding of mergex-core. Every entry point converts its
//! arguments to owned Rust values, runs the core with the GIL released, and converts the
//! result back; errors map to the `mergex.errors` hierarchy in [`errors`].

mod errors;

use std::path::PathBuf;
use std::sync::Arc;

use mergex_core::format::checkpoint::Checkpoint;
use mergex_core::{Engine, Job, Progress};
use pyo3::prelude::*;

use errors::to_py;

/// A validated merge job: inputs opened, output laid out, ready to plan or run.
#[pyclass(frozen, module = "mergex._mergex")]
struct MergeJob {
    engine: Engine,
    progress: Arc<Progress>,
}

#[pymethods]
impl MergeJob {
    /// Parse and validate a job given as JSON, opening every input checkpoint.
    #[new]
    fn new(py: Python<'_>, job_json: String) -> PyResult<Self> {
        let engine = py
            .detach(move || Job::from_json(&job_json).and_then(Engine::prepare))
            .map_err(|e| to_py(py, e))?;
        Ok(MergeJob { engine, progress: Arc::new(Progress::default()) })
    }

    /// The plan summary, as JSON.
    fn plan(&self, py: Python<'_>) -> PyResult<String> {
        serde_json::to_string(&self.engine.plan()).map_err(|e| {
            to_py(py, mergex_core::Error::InvalidJob { field: "plan".into(), message: e.to_string() })
        })
    }

    /// Run the merge into `out_dir` (an existing, empty folder); returns the summary as JSON.
    /// The GIL is released for the whole run, so other Python threads (progress display,
    /// Ctrl-C handling) keep going.
    fn run(&self, py: Python<'_>, out_dir: PathBuf) -> PyResult<String> {
        let summary = py.detach(|| self.engine.run(&out_dir, &self.progress)).map_err(|e| to_py(py, e))?;
        serde_json::to_string(&summary).map_err(|e| {
            to_py(py, mergex_core::Error::InvalidJob { field: "summary".into(), message: e.to_string() })
        })
    }

    /// (bytes done, bytes total, tensors done, tensors total).
    fn progress(&self) -> (u64, u64, u64, u64) {
        self.progress.snapshot()
    }

    /// Ask a running merge to stop at the next chunk; `run` then raises `MergeInterrupted`.
    fn cancel(&self) {
        self.progress.cancel();
    }
}

/// Tensors of a checkpoint (folder or file): (name, dtype, shape, file, bytes), in file order.
#[pyfunction]
#[allow(clippy::type_complexity)]
fn inspect(py: Python<'_>, path: PathBuf) -> PyResult<Vec<(String, String, Vec<u64>, String, u64)>> {
    py.detach(move || {
        let ckpt = Checkpoint::open(&path)?;
        Ok(ckpt
            .entries()
            .map(|(f, t)| {
                (
                    t.name.clone(),
                    t.dtype.name().to_string(),
                    t.shape.clone(),
                    f.path().display().to_string(),
                    t.nbytes(),
                )
            })
            .collect())
    })
    .map_err(|e| to_py(py, e))
}

/// XXH3-64 checksum of a file, as 16 hex digits (what resumable merges record per shard).
#[pyfunction]
fn checksum(py: Python<'_>, path: PathBuf) -> PyResult<String> {
    py.detach(move || mergex_core::format::writer::checksum(&path)).map_err(|e| to_py(py, e))
}

#[pymodule]
fn _mergex(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<MergeJob>()?;
    m.add_function(wrap_pyfunction!(inspect, m)?)?;
    m.add_function(wrap_pyfunction!(checksum, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
