//! `mergex._mergex`: the thin binding of mergex-core. Every entry point converts its
//! arguments to owned Rust values, runs the core with the GIL released, and converts the
//! result back; errors map to the `mergex.errors` hierarchy in [`errors`].

mod control;
mod errors;
mod registry;
mod results;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use mergex_core::engine::stream::{Reader, Sink};
use mergex_core::format::checkpoint::Checkpoint;
use mergex_core::kernels::real::Real;
use mergex_core::{Engine, Job, Progress};
use pyo3::buffer::{Element, PyBuffer};
use pyo3::prelude::*;

use errors::to_py;

/// A validated merge job: inputs opened, output laid out, ready to plan or run.
#[pyclass(frozen, module = "mergex._mergex")]
struct MergeJob {
    engine: Arc<Engine>,
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
        Ok(MergeJob { engine: Arc::new(engine), progress: Arc::new(Progress::default()) })
    }

    /// The plan summary.
    fn plan(&self) -> results::PlanSummary {
        self.engine.plan().into()
    }

    /// Run the merge into `out_dir` (an existing, empty folder); returns its summary.
    /// The GIL is released for the whole run, so other Python threads (progress display,
    /// Ctrl-C handling) keep going.
    fn run(&self, py: Python<'_>, out_dir: PathBuf) -> PyResult<results::RunSummary> {
        let summary = py.detach(|| self.engine.run(&out_dir, &self.progress)).map_err(|e| to_py(py, e))?;
        Ok(summary.into())
    }

    /// The output tensors as the engine prepared them (chunk sizes, passes, inputs).
    fn tensors(&self) -> Vec<results::TensorInfo> {
        self.engine.tensor_infos().into_iter().map(Into::into).collect()
    }

    /// Create the output files in `out_dir` and return a stream through which another
    /// engine (the torch path) reads chunks and writes merged values.
    fn open_stream(&self, py: Python<'_>, out_dir: PathBuf) -> PyResult<Stream> {
        let (engine, progress) = (&self.engine, &self.progress);
        let (sink, reader) = py
            .detach(|| Ok((engine.open_sink(&out_dir, progress)?, engine.open_reader()?)))
            .map_err(|e| to_py(py, e))?;
        Ok(Stream {
            engine: Arc::clone(&self.engine),
            progress: Arc::clone(&self.progress),
            reader,
            sink: Mutex::new(Some(sink)),
            bytes: Mutex::new(Vec::new()),
            out_dir,
        })
    }

    /// A reader of the inputs' chunks alone (no output): `extract-lora` reads its two models
    /// through it.
    fn open_reader(&self, py: Python<'_>) -> PyResult<ChunkReader> {
        let reader = py.detach(|| self.engine.open_reader()).map_err(|e| to_py(py, e))?;
        Ok(ChunkReader { engine: Arc::clone(&self.engine), progress: Arc::clone(&self.progress), reader })
    }

    /// The method of output tensor `t`, for an engine that cuts it into chunks of `chunk`
    /// elements and computes the kernels the method describes.
    fn tensor_control(&self, py: Python<'_>, t: usize, chunk: u64) -> PyResult<control::TensorControl> {
        let core = self.engine.tensor_control(t, chunk).map_err(|e| to_py(py, e))?;
        Ok(control::TensorControl(Mutex::new(core)))
    }

    /// Lay the output out in `out_dir` (an existing folder) without writing its tensors:
    /// headers, sparse files of the full length, the index. The files' names.
    fn write_layout(&self, py: Python<'_>, out_dir: PathBuf) -> PyResult<Vec<String>> {
        py.detach(|| self.engine.write_layout(&out_dir)).map_err(|e| to_py(py, e))
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

/// Several merges of the same inputs run together (`mergex sweep`): each group of members
/// reads its inputs once per pass for all of them.
#[pyclass(frozen, module = "mergex._mergex")]
struct Sweep {
    members: Vec<Arc<Engine>>,
    progress: Arc<Progress>,
}

#[pymethods]
impl Sweep {
    /// A sweep of the prepared `members`.
    #[new]
    fn new(members: Vec<Bound<'_, MergeJob>>) -> Self {
        let members = members.iter().map(|m| Arc::clone(&m.get().engine)).collect();
        Sweep { members, progress: Arc::new(Progress::default()) }
    }

    /// Run each group (member indices that read the same inputs) into its members' folders
    /// (`dirs`, one per member, existing and empty); the summaries in member order.
    fn run(
        &self,
        py: Python<'_>,
        groups: Vec<Vec<usize>>,
        dirs: Vec<PathBuf>,
    ) -> PyResult<Vec<results::RunSummary>> {
        let mut out: Vec<Option<results::RunSummary>> = (0..self.members.len()).map(|_| None).collect();
        for group in &groups {
            let engines: Vec<&Engine> =
                group.iter().filter_map(|&m| self.members.get(m).map(|e| &**e)).collect();
            let folders: Vec<&std::path::Path> =
                group.iter().filter_map(|&m| dirs.get(m).map(|d| d.as_path())).collect();
            let summaries = py
                .detach(|| mergex_core::engine::sweep::run_sweep(&engines, &folders, &self.progress))
                .map_err(|e| to_py(py, e))?;
            for (&m, summary) in group.iter().zip(summaries) {
                if let Some(slot) = out.get_mut(m) {
                    *slot = Some(summary.into());
                }
            }
        }
        let missing = || mergex_core::Error::InvalidJob {
            field: "sweep".into(),
            message: "a member in no group".into(),
        };
        out.into_iter().map(|s| s.ok_or_else(|| to_py(py, missing()))).collect()
    }

    /// Input bytes the members read together (one group), over all passes.
    fn planned_bytes(&self) -> u64 {
        let engines: Vec<&Engine> = self.members.iter().map(|e| &**e).collect();
        mergex_core::engine::sweep::planned_bytes(&engines)
    }

    /// (bytes done, bytes total, tensors done, tensors total) of the whole sweep.
    fn progress(&self) -> (u64, u64, u64, u64) {
        self.progress.snapshot()
    }

    /// Ask the sweep to stop at the next chunk; `run` then raises `MergeInterrupted`.
    fn cancel(&self) {
        self.progress.cancel();
    }
}

/// A merge whose arithmetic runs outside the Rust engine: the stored bytes of chunks are
/// read by the engine into caller buffers (the caller decodes them), and merged values go
/// back through its writer.
#[pyclass(frozen, module = "mergex._mergex")]
struct Stream {
    engine: Arc<Engine>,
    progress: Arc<Progress>,
    reader: Reader,
    sink: Mutex<Option<Sink>>,
    /// The encoded bytes of the chunk being written, kept from write to write.
    bytes: Mutex<Vec<u8>>,
    out_dir: PathBuf,
}

impl Stream {
    fn with_sink<R>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut Sink) -> mergex_core::Result<R>,
    ) -> PyResult<R> {
        let mut guard = self.sink.lock().map_err(|_| closed(py))?;
        let sink = guard.as_mut().ok_or_else(|| closed(py))?;
        f(sink).map_err(|e| to_py(py, e))
    }

    /// Write (`observe = false`) or fold into an amax (`true`) merged values of tensor `t`.
    fn take_values<T: Real + Element>(
        &self,
        py: Python<'_>,
        t: usize,
        start: u64,
        values: &PyBuffer<T>,
        observe: bool,
    ) -> PyResult<()> {
        let ptr =
            values.as_slice_ptr().ok_or_else(|| bad_buffer(py, "write: the buffer must be contiguous"))?;
        // SAFETY: `PyBuffer::get` checked the element format, size and alignment against T,
        // and `as_slice_ptr` that the buffer is C-contiguous with `item_count` elements;
        // `values` keeps the buffer exported (its memory alive) until this call returns, and
        // it is only read. The caller does not change it during the call (the torch driver
        // writes a chunk only once it is computed).
        let values: &[T] = unsafe { ptr.as_ref() };
        let engine = &self.engine;
        if observe {
            return self.with_sink(py, |sink| py.detach(|| engine.observe_amax(sink, t, start, values)));
        }
        let mut guard = self.bytes.lock().map_err(|_| closed(py))?;
        let bytes: &mut Vec<u8> = &mut guard;
        self.with_sink(py, |sink| py.detach(|| engine.write_chunk(sink, t, start, values, bytes)))
    }

    fn values(
        &self,
        py: Python<'_>,
        t: usize,
        start: u64,
        values: &Bound<'_, PyAny>,
        observe: bool,
    ) -> PyResult<()> {
        if let Ok(b) = PyBuffer::<f32>::get(values) {
            self.take_values(py, t, start, &b, observe)
        } else {
            self.take_values(py, t, start, &PyBuffer::<f64>::get(values)?, observe)
        }
    }
}

#[pymethods]
impl Stream {
    /// Check that tensor `t`'s input files did not change since they were opened.
    fn begin(&self, py: Python<'_>, t: usize) -> PyResult<()> {
        py.detach(|| self.engine.begin_tensor(t)).map_err(|e| to_py(py, e))
    }

    /// Copy the stored bytes of elements `[start, start+len)` of every input of tensor `t`
    /// (the base first) into `out`, a writable contiguous byte buffer of views × len × slot
    /// bytes, undecoded: input `k` at byte `k × len × slot` in its own dtype (`dtypes` and
    /// `slot` of `MergeJob.tensors`). The inputs are read in parallel, without the GIL.
    /// `count=False` leaves the bytes out of the progress (a method's sample).
    #[pyo3(signature = (t, start, len, out, count = true))]
    fn read(
        &self,
        py: Python<'_>,
        t: usize,
        start: u64,
        len: u64,
        out: &Bound<'_, PyAny>,
        count: bool,
    ) -> PyResult<()> {
        read_into(py, (&self.engine, &self.progress, &self.reader), t, (start, len), out, count)
    }

    /// Write merged values (a float32 or float64 buffer) of tensor `t` from element `start`.
    fn write(&self, py: Python<'_>, t: usize, start: u64, values: &Bound<'_, PyAny>) -> PyResult<()> {
        self.values(py, t, start, values, false)
    }

    /// Fold merged values of tensor `t` from element `start` into the amax of its
    /// `amax_key`, before any tensor of that key is written.
    fn observe(&self, py: Python<'_>, t: usize, start: u64, values: &Bound<'_, PyAny>) -> PyResult<()> {
        self.values(py, t, start, values, true)
    }

    /// Copy tensor `t` (a non-float tensor) byte for byte.
    fn copy(&self, py: Python<'_>, t: usize) -> PyResult<()> {
        let (engine, progress) = (&self.engine, &self.progress);
        self.with_sink(py, |sink| py.detach(|| engine.copy_chunks(sink, t, progress)))
    }

    /// Tensor `t` took `ran` statistics passes (the progress total follows).
    fn passes(&self, py: Python<'_>, t: usize, ran: usize) -> PyResult<()> {
        self.engine.settle_passes(t, ran, &self.progress).map_err(|e| to_py(py, e))
    }

    /// Tensor `t` is complete (a resumable run seals its shard when it is the last one).
    fn end(&self, py: Python<'_>, t: usize) -> PyResult<()> {
        let (engine, progress) = (&self.engine, &self.progress);
        self.with_sink(py, |sink| py.detach(|| engine.end_tensor(sink, t, progress)))
    }

    /// Flush everything and write the index; returns the run summary (the caller puts in
    /// its own pass timings with `with_timings`).
    fn close(&self, py: Python<'_>) -> PyResult<results::RunSummary> {
        let sink = self.sink.lock().map_err(|_| closed(py))?.take().ok_or_else(|| closed(py))?;
        let (engine, progress) = (&self.engine, &self.progress);
        let summary =
            py.detach(|| engine.close_sink(sink, &self.out_dir, progress)).map_err(|e| to_py(py, e))?;
        Ok(summary.into())
    }
}

/// Reads the inputs' chunks of a merge job, as [`Stream::read`] does, with no output.
#[pyclass(frozen, module = "mergex._mergex")]
struct ChunkReader {
    engine: Arc<Engine>,
    progress: Arc<Progress>,
    reader: Reader,
}

#[pymethods]
impl ChunkReader {
    /// As `Stream.read`.
    #[pyo3(signature = (t, start, len, out, count = true))]
    fn read(
        &self,
        py: Python<'_>,
        t: usize,
        start: u64,
        len: u64,
        out: &Bound<'_, PyAny>,
        count: bool,
    ) -> PyResult<()> {
        read_into(py, (&self.engine, &self.progress, &self.reader), t, (start, len), out, count)
    }
}

/// Read elements `[start, start+len)` of every input of tensor `t` into the byte buffer `out`.
fn read_into(
    py: Python<'_>,
    (engine, progress, reader): (&Engine, &Progress, &Reader),
    t: usize,
    (start, len): (u64, u64),
    out: &Bound<'_, PyAny>,
    count: bool,
) -> PyResult<()> {
    let buf = PyBuffer::<u8>::get(out)?;
    let ptr = match buf.as_slice_ptr() {
        Some(p) if !buf.readonly() => p,
        _ => return Err(bad_buffer(py, "read: the buffer must be writable and contiguous")),
    };
    // SAFETY: the buffer is writable and C-contiguous with `item_count` bytes (checked
    // above); `buf` keeps it exported (its memory alive) until this call returns. The
    // caller leaves it alone while it is read into (the torch driver's reader thread owns
    // the buffer until the read returns).
    let out: &mut [u8] = unsafe { &mut *ptr.as_ptr() };
    let quiet = Progress::default();
    let progress = if count { progress } else { &quiet };
    py.detach(|| engine.read_chunk_raw(reader, t, start, len, out, progress)).map_err(|e| to_py(py, e))
}

fn closed(py: Python<'_>) -> PyErr {
    to_py(
        py,
        mergex_core::Error::InvalidJob { field: "stream".into(), message: "the stream is closed".into() },
    )
}

fn bad_buffer(py: Python<'_>, message: &str) -> PyErr {
    to_py(py, mergex_core::Error::InvalidJob { field: "buffer".into(), message: message.into() })
}

/// Tensors of a checkpoint (folder or file): (name, dtype, shape, file, bytes), in file order.
#[pyfunction]
#[allow(clippy::type_complexity)]
#[pyo3(signature = (path, partial = false))]
fn inspect(
    py: Python<'_>,
    path: PathBuf,
    partial: bool,
) -> PyResult<Vec<(String, String, Vec<u64>, String, u64)>> {
    py.detach(move || {
        let ckpt = if partial { Checkpoint::open_partial(&path)? } else { Checkpoint::open(&path)? };
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

/// A file's checksum, as 16 hex digits (what resumable merges record per shard): the wrapping
/// sum of XXH3-64 over its 4 KiB blocks, each seeded with its index (`format::writer::checksum`).
#[pyfunction]
fn checksum(py: Python<'_>, path: PathBuf) -> PyResult<String> {
    py.detach(move || mergex_core::format::writer::checksum(&path)).map_err(|e| to_py(py, e))
}

/// The bytes of tensor data this process has read from input files so far.
#[pyfunction]
fn bytes_read() -> u64 {
    mergex_core::format::file::bytes_read()
}

#[pymodule]
fn _mergex(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<MergeJob>()?;
    m.add_class::<Stream>()?;
    m.add_class::<ChunkReader>()?;
    m.add_class::<control::TensorControl>()?;
    m.add_class::<Sweep>()?;
    m.add_function(wrap_pyfunction!(inspect, m)?)?;
    m.add_function(wrap_pyfunction!(checksum, m)?)?;
    m.add_function(wrap_pyfunction!(bytes_read, m)?)?;
    m.add_function(wrap_pyfunction!(registry::methods, m)?)?;
    m.add_class::<registry::Method>()?;
    m.add_class::<registry::MethodParam>()?;
    m.add_class::<results::PlanSummary>()?;
    m.add_class::<results::RunSummary>()?;
    m.add_class::<results::TensorInfo>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    // The engine's limits and defaults, so that the Python side states none of them again.
    m.add("MAX_THREADS", mergex_core::engine::plan::MAX_THREADS)?;
    m.add("MIN_RAM_BUDGET", mergex_core::engine::plan::MIN_RAM_BUDGET)?;
    m.add("DEFAULT_SHARD_SIZE", mergex_core::engine::plan::DEFAULT_SHARD_SIZE)?;
    Ok(())
}
