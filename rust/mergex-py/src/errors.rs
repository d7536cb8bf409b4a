//! The one place where core errors become Python exceptions: the classes of
//! `mergex.errors`, one per error kind (the match is exhaustive), with the error's file and
//! tensor as the exception's `path` and `tensor` attributes.

use mergex_core::{Error, ErrorKind};
use pyo3::prelude::*;

pyo3::import_exception!(mergex.errors, ConfigError);
pyo3::import_exception!(mergex.errors, CheckpointError);
pyo3::import_exception!(mergex.errors, ModelNotFoundError);
pyo3::import_exception!(mergex.errors, MergexIOError);
pyo3::import_exception!(mergex.errors, MergeInterrupted);

/// Convert a core error to an instance of the matching `mergex.errors` class.
pub(crate) fn to_py(py: Python<'_>, e: Error) -> PyErr {
    let message = e.to_string();
    let err = match e.kind() {
        ErrorKind::Config => ConfigError::new_err(message),
        ErrorKind::Checkpoint => CheckpointError::new_err(message),
        ErrorKind::NotFound => ModelNotFoundError::new_err(message),
        ErrorKind::Io => MergexIOError::new_err(message),
        ErrorKind::Cancelled => MergeInterrupted::new_err(message),
    };
    let value = err.value(py);
    let path = e.path().map(|p| p.display().to_string());
    // Setting an attribute on a fresh exception instance cannot fail short of memory; the
    // message already names both, so a failure here loses nothing.
    let _ = value.setattr("path", path);
    let _ = value.setattr("tensor", e.tensor());
    err
}
