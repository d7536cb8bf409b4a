//! One output tensor's method for the torch engine ([`TensorControl`]): the core keeps the
//! control, Python computes the chunk kernels it describes and hands their statistics back.

use std::collections::BTreeMap;
use std::sync::Mutex;

use mergex_core::engine::control::TensorControl as Core;
use mergex_core::methods::{Stage, Stats};
use mergex_core::numeric::reduce::ExactSum;
use pyo3::buffer::PyBuffer;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use serde_json::Value;

use crate::errors::to_py;

/// The method of one output tensor (`MergeJob.tensor_control`): its passes, selections,
/// cuts and solves stay in the engine; `kernel` describes a chunk's work in the coming
/// stage, and the statistics come back through `end_sample` and `end_pass`.
#[pyclass(frozen, module = "mergex._mergex")]
pub struct TensorControl(pub Mutex<Core>);

impl TensorControl {
    fn with<R>(&self, py: Python<'_>, f: impl FnOnce(&mut Core) -> mergex_core::Result<R>) -> PyResult<R> {
        let mut core =
            self.0.lock().map_err(|_| PyErr::new::<pyo3::exceptions::PyRuntimeError, _>("poisoned"))?;
        f(&mut core).map_err(|e| to_py(py, e))
    }
}

/// Statistics handed back by Python, per slot: exact sums as their totals, histograms,
/// `(keys, indices)` candidates, packed candidates, counts, and the slots whose band
/// overflowed.
#[derive(FromPyObject)]
#[pyo3(from_item_all)]
pub struct Partials<'py> {
    sums: BTreeMap<usize, f64>,
    hists: BTreeMap<usize, Bound<'py, PyAny>>,
    items: BTreeMap<usize, (Bound<'py, PyAny>, Bound<'py, PyAny>)>,
    packed: BTreeMap<usize, Bound<'py, PyAny>>,
    counts: BTreeMap<usize, u64>,
    overflow: Vec<usize>,
}

fn words(b: &Bound<'_, PyAny>) -> PyResult<Vec<u64>> {
    PyBuffer::<u64>::get(b)?.to_vec(b.py())
}

impl Partials<'_> {
    fn into_stats(self) -> PyResult<Stats> {
        let mut s = Stats::default();
        for (slot, total) in self.sums {
            // A total is the correctly rounded exact sum: one addition gives it back.
            let mut sum = ExactSum::default();
            sum.add(total);
            *s.sum(slot) = sum;
        }
        for (slot, hist) in self.hists {
            let counts = words(&hist)?;
            for (h, c) in s.hist(slot).iter_mut().zip(counts) {
                *h = c;
            }
        }
        for (slot, (keys, index)) in self.items {
            let items = words(&keys)?.into_iter().zip(words(&index)?);
            s.items(slot).extend(items);
        }
        for (slot, packed) in self.packed {
            s.packed(slot).extend(words(&packed)?);
        }
        for (slot, n) in self.counts {
            *s.count(slot) = n;
        }
        for slot in self.overflow {
            s.set_overflow(slot);
        }
        Ok(s)
    }
}

fn stage(name: &str) -> PyResult<Stage> {
    match name {
        "sample" => Ok(Stage::Sample),
        "pass" => Ok(Stage::Pass),
        "output" => Ok(Stage::Output),
        _ => Err(PyErr::new::<pyo3::exceptions::PyValueError, _>(format!("unknown stage {name:?}"))),
    }
}

/// A serialized kernel as Python objects (dicts, lists, numbers, strings).
fn to_python<'py>(py: Python<'py>, v: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match v {
        Value::Null => py.None().into_bound(py),
        Value::Bool(b) => b.into_pyobject(py)?.to_owned().into_any(),
        Value::Number(n) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => u.into_pyobject(py)?.into_any(),
            (_, Some(i)) => i.into_pyobject(py)?.into_any(),
            _ => n.as_f64().unwrap_or(f64::NAN).into_pyobject(py)?.into_any(),
        },
        Value::String(s) => s.into_pyobject(py)?.into_any(),
        Value::Array(a) => {
            let items = a.iter().map(|x| to_python(py, x)).collect::<PyResult<Vec<_>>>()?;
            PyList::new(py, items)?.into_any()
        }
        Value::Object(o) => {
            let d = PyDict::new(py);
            for (k, x) in o {
                d.set_item(k, to_python(py, x)?)?;
            }
            d.into_any()
        }
    })
}

#[pymethods]
impl TensorControl {
    /// Element ranges `(start, len)` of the sample to take before the first pass.
    fn sample_ranges(&self, py: Python<'_>) -> PyResult<Vec<(u64, u64)>> {
        self.with(py, |c| Ok(c.sample_ranges()))
    }

    /// Whether another statistics pass is needed now.
    fn wants_pass(&self, py: Python<'_>) -> PyResult<bool> {
        self.with(py, |c| Ok(c.wants_pass()))
    }

    /// The chunk kernel of the coming `stage` ("sample", "pass" or "output") as a dict:
    /// `kernel` names it, the other keys are its arguments (`methods/kernel.rs`).
    fn kernel<'py>(&self, py: Python<'py>, stage_name: &str) -> PyResult<Bound<'py, PyAny>> {
        let stage = stage(stage_name)?;
        let kernel = self.with(py, |c| Ok(c.kernel(stage)))?;
        let value = serde_json::to_value(&kernel)
            .map_err(|e| PyErr::new::<pyo3::exceptions::PyValueError, _>(e.to_string()))?;
        to_python(py, &value)
    }

    /// Take the statistics of the sample.
    fn end_sample(&self, py: Python<'_>, partials: Partials<'_>) -> PyResult<()> {
        let stats = partials.into_stats()?;
        self.with(py, |c| c.end_sample(stats))
    }

    /// Take the statistics of the pass just finished.
    fn end_pass(&self, py: Python<'_>, partials: Partials<'_>) -> PyResult<()> {
        let stats = partials.into_stats()?;
        self.with(py, |c| c.end_pass(stats))
    }

    /// Per row, its coefficients from its Gram matrix: `grams` is a contiguous float64
    /// buffer of rows × k × k values.
    fn row_solve(&self, py: Python<'_>, grams: &Bound<'_, PyAny>, k: usize) -> PyResult<Vec<Vec<f64>>> {
        let flat = PyBuffer::<f64>::get(grams)?.to_vec(py)?;
        let rows: Vec<Vec<Vec<f64>>> =
            flat.chunks(k * k).map(|g| g.chunks(k).map(<[f64]>::to_vec).collect()).collect();
        self.with(py, |c| Ok(c.row_solve(&rows)))
    }
}
