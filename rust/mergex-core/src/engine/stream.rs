//! A merge driven from outside (the torch engine): the same tensors, chunks, passes, pages
//! released and output layout as [`Engine::run`], with the arithmetic done by the caller.
//! [`Engine::run`] itself uses the same [`Sink`] for the output side.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use rayon::prelude::*;
use rayon::ThreadPool;
use serde::Serialize;

use super::plan::{Engine, Prepared};
use super::progress::Progress;
use super::run::RunSummary;
use crate::error::{Error, Result};
use crate::format::writer::{write_index, Writer};
use crate::job::Resume;
use crate::kernels::real::Real;

/// Elements of one input that a reader thread copies at a time: a chunk's inputs are cut
/// into pieces so that every thread has work even when there are fewer inputs than threads.
const READ_PIECE: usize = 1 << 20;

/// The output side of a running merge: open shards, and the shards already finished.
#[derive(Debug)]
pub struct Sink {
    writer: Writer,
    /// Shards kept from an interrupted run, by index.
    keep: Vec<bool>,
    /// Finished shards and their checksums (resumable runs).
    sealed: BTreeMap<String, String>,
    /// The amax of each key whose scales need one ([`Engine::observe_amax`]).
    amax: BTreeMap<String, AtomicU32>,
}

/// The input side of a stream: the threads that read chunks ([`Engine::open_reader`]).
#[derive(Debug)]
pub struct Reader {
    pool: ThreadPool,
}

/// What the caller of a stream needs to know about one output tensor.
#[derive(Debug, Serialize)]
pub struct TensorInfo {
    /// Output name.
    pub name: String,
    /// Output shape.
    pub shape: Vec<u64>,
    /// Output dtype (safetensors spelling).
    pub dtype: &'static str,
    /// Copied byte for byte ([`Engine::copy_chunks`]), never merged.
    pub copy: bool,
    /// Work in f64.
    pub wide: bool,
    /// Elements per chunk, from the budget.
    pub chunk: u64,
    /// Chunks must be whole numbers of this many elements (blocks and rows).
    pub unit: u64,
    /// Passes the plan counts (statistics passes + 1).
    pub passes: usize,
    /// Inputs read per chunk, the base first when there is one.
    pub views: usize,
    /// The stored dtype of each input (safetensors spelling), in read order.
    pub dtypes: Vec<&'static str>,
    /// Bytes per element of each input's place in a raw chunk: the widest input dtype.
    pub slot: usize,
    /// The scales need the amax of the merged values of every tensor with this key first
    /// (a quantized output with a per-tensor or global scale): [`Engine::observe_amax`].
    pub amax_key: Option<String>,
    /// Already written by an interrupted run that is being resumed: skip it.
    pub kept: bool,
}

impl Sink {
    pub(crate) fn writer(&self) -> &Writer {
        &self.writer
    }
}

impl Engine {
    /// The output tensors, in output order.
    pub fn tensor_infos(&self) -> Vec<TensorInfo> {
        self.tensors
            .iter()
            .zip(self.kept_flags())
            .map(|(t, kept)| TensorInfo {
                name: t.out.name.clone(),
                shape: t.shape.clone(),
                dtype: t.out.dtype.name(),
                copy: t.copy,
                wide: t.wide,
                chunk: t.chunk,
                unit: t.chunk_unit(),
                passes: t.passes,
                views: t.views().count(),
                dtypes: t.views().map(|v| v.dtype().name()).collect(),
                slot: slot(t),
                amax_key: t.amax_key().map(str::to_string),
                kept,
            })
            .collect()
    }

    /// Per shard: whether an interrupted run finished it (it is kept as it is).
    fn kept_shards(&self) -> Vec<bool> {
        let done = self.job.resume.as_ref().map(|r| &r.done);
        self.layout.shards.iter().map(|s| done.is_some_and(|d| d.contains_key(&s.file_name))).collect()
    }

    /// Per tensor: whether its shard was finished by an interrupted run (a quantized
    /// weight's companions share its shard).
    pub(crate) fn kept_flags(&self) -> Vec<bool> {
        let shards = self.kept_shards();
        self.tensors.iter().map(|t| shards.get(self.place(t, 0).shard) == Some(&true)).collect()
    }

    /// Create the output files in `dir` (an existing folder; when resuming, it may hold the
    /// finished shards, which are kept as they are) and set the progress totals.
    pub fn open_sink(&self, dir: &Path, progress: &Progress) -> Result<Sink> {
        let total: u64 =
            self.tensors.iter().zip(self.kept_flags()).filter(|(_, k)| !k).map(|(t, _)| t.bytes_read()).sum();
        progress.bytes_total.store(total, Ordering::Relaxed);
        progress.tensors_total.store(self.tensors.len() as u64, Ordering::Relaxed);
        let keep = self.kept_shards();
        let writer = Writer::create(dir, &self.layout, &keep)?;
        let sealed = self.job.resume.as_ref().map(|r| r.done.clone()).unwrap_or_default();
        let amax = self
            .tensors
            .iter()
            .filter_map(|t| t.amax_key())
            .map(|k| (k.to_string(), AtomicU32::new(0)))
            .collect();
        Ok(Sink { writer, keep, sealed, amax })
    }

    pub(crate) fn tensor(&self, t: usize) -> Result<&Prepared> {
        self.tensors.get(t).ok_or_else(|| Error::job("tensor", format!("no output tensor {t}")))
    }

    /// Check, before a tensor is merged, that none of its input files changed.
    pub fn begin_tensor(&self, t: usize) -> Result<()> {
        for v in self.tensor(t)?.views() {
            v.file.check_unchanged()?;
        }
        Ok(())
    }

    /// A reader for [`Engine::read_chunk_raw`]: a pool of the job's threads.
    pub fn open_reader(&self) -> Result<Reader> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(self.job.threads)
            .thread_name(|i| format!("mergex-read-{i}"))
            .build()
            .map_err(|e| Error::job("threads", e.to_string()))?;
        Ok(Reader { pool })
    }

    /// Copy the stored bytes of elements `[start, start+len)` of every input of tensor `t`
    /// (the base first) into `out`, undecoded: input `k` at byte `k · len · slot`, its `len`
    /// elements packed in its own dtype ([`TensorInfo::dtypes`], [`TensorInfo::slot`]), the
    /// rest of its place untouched. The inputs are read in pieces on the reader's threads.
    pub fn read_chunk_raw(
        &self,
        reader: &Reader,
        t: usize,
        start: u64,
        len: u64,
        out: &mut [u8],
        progress: &Progress,
    ) -> Result<()> {
        if progress.is_cancelled() {
            return Err(Error::Cancelled);
        }
        let p = self.tensor(t)?;
        let place = usize::try_from(len).ok().and_then(|n| n.checked_mul(slot(p)));
        let fits = place.and_then(|b| b.checked_mul(p.views().count())) == Some(out.len());
        if start.checked_add(len).is_none_or(|end| end > p.numel()) || !fits {
            return Err(Error::job("chunk", format!("bad chunk {start}+{len} of '{}'", p.out.name)));
        }
        for v in p.views() {
            v.will_need(start, len);
        }
        let mut pieces = Vec::new();
        for (v, dst) in p.views().zip(out.chunks_mut(place.unwrap_or(0).max(1))) {
            let size = v.dtype().size();
            let used = dst.get_mut(..len as usize * size).unwrap_or_default();
            for (i, piece) in used.chunks_mut(READ_PIECE * size).enumerate() {
                pieces.push((v, start + (i * READ_PIECE) as u64, piece));
            }
        }
        let read = reader
            .pool
            .install(|| pieces.into_par_iter().try_for_each(|(v, at, piece)| v.read_raw(at, piece)));
        // gpt-oss and LoRA inputs keep buffers per reading thread for the pieces of one chunk.
        reader.pool.broadcast(|_| super::read::release_thread());
        read?;
        for v in p.views() {
            progress.add_bytes(v.bytes_for(len));
        }
        Ok(())
    }

    /// Round `values` (elements from `start` of tensor `t`, whole chunks of its units) to
    /// the output dtype, or quantize them, and write them at their final place; `bytes` is
    /// scratch. A quantized tensor whose scales need an amax ([`TensorInfo::amax_key`]) takes
    /// it from [`Engine::observe_amax`], over every tensor of its key, all observed first.
    pub fn write_chunk<T: Real>(
        &self,
        sink: &Sink,
        t: usize,
        start: u64,
        values: &[T],
        bytes: &mut Vec<u8>,
    ) -> Result<()> {
        let p = self.tensor(t)?;
        if p.copy || start.checked_add(values.len() as u64).is_none_or(|end| end > p.numel()) {
            return Err(Error::job("chunk", format!("bad output chunk at {start} of '{}'", p.out.name)));
        }
        let Some(enc) = &p.enc else {
            let place = self.place(p, 0);
            let size = p.out.dtype.size();
            bytes.resize(values.len() * size, 0);
            crate::kernels::dispatch::encode(values, p.out.dtype, bytes);
            return sink.writer.write_at(place.shard, place.offset + start * size as u64, bytes);
        };
        let amax =
            p.amax_key().and_then(|k| sink.amax.get(k)).map(|a| f32::from_bits(a.load(Ordering::Relaxed)));
        if start == 0 {
            self.write_scalars(p, &sink.writer, amax)?;
        }
        let mut vals = vec![0f32; values.len()];
        super::values::to_f32(values, &mut vals);
        let mut e = crate::format::encode::Encoded::default();
        enc.encode(start, &vals, amax, &mut e)?;
        bytes.clear();
        self.write_encoded(p, &sink.writer, &e)
    }

    /// Fold merged `values` (elements from `start` of tensor `t`) into the amax of its key,
    /// before any tensor of that key is written (QUANT.md §7).
    pub fn observe_amax<T: Real>(&self, sink: &Sink, t: usize, start: u64, values: &[T]) -> Result<()> {
        let p = self.tensor(t)?;
        let cell = p
            .amax_key()
            .and_then(|k| sink.amax.get(k))
            .ok_or_else(|| Error::job("chunk", format!("tensor '{}' needs no amax", p.out.name)))?;
        let mut vals = vec![0f32; values.len()];
        super::values::to_f32(values, &mut vals);
        super::values::fold_amax(p, start, &vals, cell)
    }

    /// Copy tensor `t` (a copy tensor) chunk by chunk.
    pub fn copy_chunks(&self, sink: &Sink, t: usize, progress: &Progress) -> Result<()> {
        let p = self.tensor(t)?;
        self.copy_tensor(p, self.place(p, 0), &sink.writer, progress)
    }

    /// Tensor `t`'s statistics passes are done, `ran` of them: correct the progress total
    /// where the data asked for more or fewer passes than the plan counted.
    pub fn settle_passes(&self, t: usize, ran: usize, progress: &Progress) -> Result<()> {
        let p = self.tensor(t)?;
        let (planned, taken) = (p.passes as u64, ran as u64 + 1);
        if taken > planned {
            progress.bytes_total.fetch_add((taken - planned) * p.pass_bytes(), Ordering::Relaxed);
        } else {
            progress.bytes_total.fetch_sub((planned - taken) * p.pass_bytes(), Ordering::Relaxed);
        }
        Ok(())
    }

    /// Tensor `t` is complete: count it and, when that finishes its shard in a resumable
    /// run, flush the shard and record its checksum.
    pub fn end_tensor(&self, sink: &mut Sink, t: usize, progress: &Progress) -> Result<()> {
        progress.tensors_done.fetch_add(1, Ordering::Relaxed);
        let p = self.tensor(t)?;
        let (place, last) = (self.place(p, 0), p.first_out + p.companions.len());
        let shard = self.layout.shards.get(place.shard);
        if let (Some(r), Some(shard)) = (self.job.resume.as_ref(), shard) {
            if shard.tensors.last() == Some(&last) && sink.keep.get(place.shard) != Some(&true) {
                sink.sealed.insert(shard.file_name.clone(), sink.writer.seal(place.shard)?);
                save_state(r, &sink.sealed)?;
            }
        }
        Ok(())
    }

    /// Check the inputs one last time, flush the shards and write the index. The summary's
    /// pass timings are left for the caller to fill in.
    pub fn close_sink(&self, sink: Sink, dir: &Path, progress: &Progress) -> Result<RunSummary> {
        for v in self.tensors.iter().flat_map(Prepared::views) {
            v.file.check_unchanged()?;
        }
        let mut files: Vec<String> = self.layout.shards.iter().map(|s| s.file_name.clone()).collect();
        let checksums = sink.writer.finish()?;
        if self.layout.shards.len() > 1 {
            write_index(dir, &self.out, &self.layout)?;
            files.push(crate::format::checkpoint::INDEX_NAME.to_string());
        }
        Ok(RunSummary {
            files,
            bytes_read: progress.bytes_done.load(Ordering::Relaxed),
            bytes_written: self.bytes_written(),
            tensors: self.tensors.len(),
            sample_seconds: 0.0,
            stat_pass_seconds: Vec::new(),
            output_seconds: 0.0,
            kernels: crate::kernels::dispatch::level().name().to_string(),
            checksums,
        })
    }

    /// Lay out the output in `dir` without its tensors' values: every shard with its header
    /// and its whole length (sparse), and the index. A fused recipe stage's output is so, for
    /// the stage that reads it to plan on (its tensors are computed as they are read).
    pub fn write_layout(&self, dir: &Path) -> Result<Vec<String>> {
        use std::os::unix::fs::FileExt;
        let mut files = Vec::new();
        for shard in &self.layout.shards {
            let path = dir.join(&shard.file_name);
            let file = std::fs::File::create(&path).map_err(|e| Error::io(&path, "create", e))?;
            file.write_all_at(&shard.header, 0).map_err(|e| Error::io(&path, "write", e))?;
            file.set_len(shard.len).map_err(|e| Error::io(&path, "write", e))?;
            files.push(shard.file_name.clone());
        }
        if self.layout.shards.len() > 1 {
            write_index(dir, &self.out, &self.layout)?;
            files.push(crate::format::checkpoint::INDEX_NAME.to_string());
        }
        Ok(files)
    }

    /// Bytes of all output files.
    fn bytes_written(&self) -> u64 {
        self.layout.shards.iter().map(|s| s.len).sum()
    }
}

/// Bytes per element of each input's place in a raw chunk of `p`: the widest input dtype.
fn slot(p: &Prepared) -> usize {
    p.views().map(|v| v.dtype().size()).max().unwrap_or(1)
}

/// Rewrite the resume state atomically: fingerprint and finished shards with checksums.
fn save_state(r: &Resume, sealed: &BTreeMap<String, String>) -> Result<()> {
    let state = serde_json::json!({"fingerprint": r.fingerprint, "shards": sealed});
    let tmp: PathBuf = r.state_file.with_extension("tmp");
    let text = serde_json::to_string_pretty(&state).map_err(|e| Error::job("resume", e.to_string()))?;
    std::fs::write(&tmp, text).map_err(|e| Error::io(&tmp, "write", e))?;
    std::fs::rename(&tmp, &r.state_file).map_err(|e| Error::io(&r.state_file, "write", e))
}
