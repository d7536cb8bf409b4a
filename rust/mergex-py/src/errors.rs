//! The one place where core errors become Python exceptions (classes of `mergex.errors`).

use mergex_core::{Error, ErrorKind};
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::PyType;

fn class_name(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::Config => "ConfigError",
        ErrorKind::Checkpoint => "CheckpointError",
        ErrorKind::NotFound => "ModelNotFoundError",
        ErrorKind::Io => "MergexIOError",
        ErrorKind::Cancelled => "MergeInterrupted",
    }
}

/// Convert a core error to an instance of the matching `mergex.errors` class.
pub(crate) fn to_py(py: Python<'_>, e: Error) -> PyErr {
    let message = e.to_string();
    let class = py
        .import("mergex.errors")
        .and_then(|m| m.getattr(class_name(e.kind())))
        .and_then(|c| c.cast_into::<PyType>().map_err(PyErr::from));
    match class {
        Ok(cls) => PyErr::from_type(cls, message),
        Err(_) => PyRuntimeError::new_err(message),
    }
}
