//! Running a prepared merge: each output tensor as statistics passes then an output pass,
//! every pass a parallel sweep over chunks. A chunk reads the same element range of every
//! input, merges it in the working precision, rounds once to the output dtype and writes it
//! at its final offset; the input pages it used are then released.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;

use super::plan::{Engine, Prepared, SUB_BLOCK};
use super::progress::Progress;
use super::read::View;
use super::values::{f32_bytes, fold_amax, out_buffers, place_out, Output};
use crate::error::{Error, Result};
use crate::format::dtype::Dtype;
use crate::format::encode::Encoded;
use crate::format::writer::{Placement, Writer};
use crate::kernels::real::{Raw, Real};
use crate::kernels::sums::SumInputs;
use crate::methods::{ChunkInputs, Stats, TensorCtx, TensorMerge, WeightedSum};

/// What a finished merge reports.
#[derive(Debug, Serialize)]
pub struct RunSummary {
    /// Files written, relative to the output folder.
    pub files: Vec<String>,
    /// Input bytes read, over all passes.
    pub bytes_read: u64,
    /// Bytes written (all output files).
    pub bytes_written: u64,
    /// Output tensors.
    pub tensors: usize,
    /// Wall seconds spent reading the selections' samples and planning their bands before
    /// the first pass, summed over tensors.
    pub sample_seconds: f64,
    /// Wall seconds spent in the k-th statistics pass (with merging its statistics, e.g.
    /// resolving the cuts), summed over tensors.
    pub stat_pass_seconds: Vec<f64>,
    /// Wall seconds spent in output passes (and copies).
    pub output_seconds: f64,
    /// The build of the CPU kernels that ran (`avx512`, `avx2` or `portable`).
    pub kernels: String,
    /// The checksum of each output file this run wrote (as `format::writer::checksum`
    /// computes it), by file name.
    pub checksums: BTreeMap<String, String>,
}

/// Wall time of the samples and of each pass, summed over tensors.
#[derive(Debug, Default)]
pub(super) struct Timings {
    pub(super) sample: f64,
    pub(super) stats: Vec<f64>,
    pub(super) output: f64,
}

/// Per-worker buffers, reused across the chunks a worker runs.
pub(super) struct Scratch<T> {
    inputs: Vec<Vec<T>>,
    /// Stored bytes over a sub-block: each input's (weighted sums, and methods that take
    /// them undecoded), or one buffer every input is read through (decoding).
    raws: Vec<Vec<u8>>,
    out: Vec<T>,
    bytes: Vec<u8>,
    /// A quantized output's merged values over the whole chunk, and their encoding.
    vals: Vec<f32>,
    encoded: Encoded,
    /// This worker's share of the current statistics pass.
    stats: Stats,
}

impl<T: Real> Scratch<T> {
    fn new() -> Self {
        Scratch {
            inputs: Vec::new(),
            raws: Vec::new(),
            out: Vec::new(),
            bytes: Vec::new(),
            vals: Vec::new(),
            encoded: Encoded::default(),
            stats: Stats::default(),
        }
    }
}

/// One [`Scratch`] per pool thread, kept for the whole run: fresh buffers for every chunk
/// would cost a page fault per 4 KiB of zeroed memory, more than the merge arithmetic.
pub(super) struct Scratches<T>(Vec<Mutex<Scratch<T>>>);

impl<T: Real> Scratches<T> {
    pub(super) fn new(threads: usize) -> Self {
        Scratches((0..threads.max(1)).map(|_| Mutex::new(Scratch::new())).collect())
    }

    /// Take and merge every worker's statistics (exact merges: order does not matter).
    fn take_stats(&self) -> Stats {
        self.0.iter().fold(Stats::default(), |acc, m| {
            let taken = match m.lock() {
                Ok(mut s) => std::mem::take(&mut s.stats),
                Err(p) => std::mem::take(&mut p.into_inner().stats),
            };
            acc.merge(taken)
        })
    }

    /// Run `f` with this pool thread's scratch. A chunk never waits on other rayon work
    /// while holding it, so the lock is uncontended.
    fn with<R>(&self, f: impl FnOnce(&mut Scratch<T>) -> R) -> R {
        let i = rayon::current_thread_index().unwrap_or(0) % self.0.len();
        let slot = self.0.get(i).or(self.0.first());
        match slot.map(|m| m.lock()) {
            Some(Ok(mut s)) => f(&mut s),
            Some(Err(poisoned)) => f(&mut poisoned.into_inner()),
            None => f(&mut Scratch::new()),
        }
    }
}

impl Engine {
    /// Write the merged checkpoint into `dir` (an existing folder; with a resume state, it
    /// may hold the shards an interrupted run finished, which are kept as they are).
    pub fn run(&self, dir: &Path, progress: &Progress) -> Result<RunSummary> {
        let mut sink = self.open_sink(dir, progress)?;
        let kept = self.kept_flags();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(self.job.threads)
            .thread_name(|i| format!("mergex-{i}"))
            .build()
            .map_err(|e| Error::job("threads", e.to_string()))?;
        let (s32, s64) = (Scratches::<f32>::new(self.job.threads), Scratches::<f64>::new(self.job.threads));
        let mut times = Timings::default();
        pool.install(|| -> Result<()> {
            let amax = self.amax_values(&kept, progress, (&s32, &s64), &mut times)?;
            for (i, t) in self.tensors.iter().enumerate() {
                if kept.get(i) == Some(&true) {
                    progress.tensors_done.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                self.begin_tensor(i)?;
                let writer = sink.writer();
                let a = t.amax_key().and_then(|k| amax.get(k)).copied();
                if t.copy {
                    let clock = Instant::now();
                    self.copy_tensor(t, self.place(t, 0), writer, progress)?;
                    times.output += clock.elapsed().as_secs_f64();
                } else if t.wide {
                    self.merge_tensor(t, Output::Write(writer, a), progress, &s64, &mut times)?;
                } else {
                    self.merge_tensor(t, Output::Write(writer, a), progress, &s32, &mut times)?;
                }
                self.end_tensor(&mut sink, i, progress)?;
            }
            Ok(())
        })?;
        let mut summary = self.close_sink(sink, dir, progress)?;
        summary.sample_seconds = times.sample;
        summary.stat_pass_seconds = times.stats;
        summary.output_seconds = times.output;
        Ok(summary)
    }

    /// Scales that need the merged amax of a tensor or of its fusion group (QUANT.md §7):
    /// the members are merged once for it first, writing nothing.
    pub(super) fn amax_values(
        &self,
        kept: &[bool],
        progress: &Progress,
        (s32, s64): (&Scratches<f32>, &Scratches<f64>),
        times: &mut Timings,
    ) -> Result<BTreeMap<String, f32>> {
        let mut amax = BTreeMap::new();
        for (i, t) in self.tensors.iter().enumerate() {
            let Some(key) = t.amax_key().filter(|k| kept.get(i) != Some(&true) && !amax.contains_key(*k))
            else {
                continue;
            };
            let mut value = 0f32;
            for m in self.tensors.iter().filter(|m| m.amax_key() == Some(key)) {
                let a = if m.wide {
                    self.merged_amax(m, progress, s64, times)?
                } else {
                    self.merged_amax(m, progress, s32, times)?
                };
                value = value.max(a);
            }
            amax.insert(key.to_string(), value);
        }
        Ok(amax)
    }

    /// Where output `k` of tensor `t` goes (0: the tensor itself, then its companions).
    pub(crate) fn place(&self, t: &Prepared, k: usize) -> Placement {
        self.layout.placements.get(t.first_out + k).copied().unwrap_or(Placement { shard: 0, offset: 0 })
    }

    /// Merge tensor `t` once for the largest magnitude of its merged values, writing nothing.
    fn merged_amax<T: Real>(
        &self,
        t: &Prepared,
        progress: &Progress,
        scratch: &Scratches<T>,
        times: &mut Timings,
    ) -> Result<f32>
    where
        Self: Build<T>,
    {
        let amax = AtomicU32::new(0);
        self.merge_tensor(t, Output::Amax(&amax), progress, scratch, times)?;
        Ok(f32::from_bits(amax.load(Ordering::Relaxed)))
    }

    /// Write one finished chunk of merged values (`s.bytes`, or `s.vals` for a quantized
    /// output) or fold it into an amax.
    fn emit<T: Real>(
        &self,
        t: &Prepared,
        s: &mut Scratch<T>,
        start: u64,
        len: u64,
        to: &Output<'_>,
    ) -> Result<()> {
        self.emit_values(t, (&s.bytes, &s.vals, &mut s.encoded), start, len, to)
    }

    /// [`Engine::emit`] from the buffers `(bytes, vals, encoded)` of a chunk.
    pub(super) fn emit_values(
        &self,
        t: &Prepared,
        (bytes, vals, encoded): (&[u8], &[f32], &mut Encoded),
        start: u64,
        len: u64,
        to: &Output<'_>,
    ) -> Result<()> {
        match (to, &t.enc) {
            (Output::Write(writer, _), None) => {
                let size = t.out.dtype.size() as u64;
                let bytes = bytes.get(..len as usize * size as usize).unwrap_or_default();
                let place = self.place(t, 0);
                writer.write_at(place.shard, place.offset + start * size, bytes)
            }
            (Output::Write(writer, amax), Some(enc)) => {
                let vals = vals.get(..len as usize).unwrap_or_default();
                enc.encode(start, vals, *amax, encoded)?;
                self.write_encoded(t, writer, encoded)
            }
            (Output::Amax(cell), _) => {
                let vals = vals.get(..len as usize).unwrap_or_default();
                fold_amax(t, start, vals, cell)
            }
        }
    }

    /// Write one chunk's codes, block scales and zero points at their places.
    pub(crate) fn write_encoded(&self, t: &Prepared, writer: &Writer, e: &Encoded) -> Result<()> {
        let parts = [
            (0, e.codes_at, &e.codes),
            (1, e.scales_at, &e.scales),
            (t.companions.len(), e.zeros_at, &e.zeros),
        ];
        for (k, at, bytes) in parts {
            if !bytes.is_empty() {
                let place = self.place(t, k);
                writer.write_at(place.shard, place.offset + at, bytes)?;
            }
        }
        Ok(())
    }

    /// Write a quantized tensor's one-value companions (a per-tensor or global scale).
    pub(crate) fn write_scalars(&self, t: &Prepared, writer: &Writer, amax: Option<f32>) -> Result<()> {
        let Some(enc) = &t.enc else { return Ok(()) };
        for (k, bytes) in enc.scalars(amax.unwrap_or(0.0))? {
            let place = self.place(t, k);
            writer.write_at(place.shard, place.offset, &bytes)?;
        }
        Ok(())
    }

    pub(super) fn chunks(t: &Prepared) -> Vec<(u64, u64)> {
        let n = t.numel();
        (0..n.div_ceil(t.chunk)).map(|i| (i * t.chunk, t.chunk.min(n - i * t.chunk))).collect()
    }

    pub(crate) fn copy_tensor(
        &self,
        t: &Prepared,
        place: Placement,
        writer: &Writer,
        progress: &Progress,
    ) -> Result<()> {
        let Some(src) = t.inputs.first() else {
            return Ok(());
        };
        let size = t.out.dtype.size() as u64;
        Self::chunks(t).into_par_iter().try_for_each(|(start, len)| {
            if progress.is_cancelled() {
                return Err(Error::Cancelled);
            }
            writer.write_at(place.shard, place.offset + start * size, src.raw(start, len)?)?;
            src.release(start, len);
            progress.add_bytes(src.bytes_for(len));
            Ok(())
        })
    }

    fn merge_tensor<T: Real>(
        &self,
        t: &Prepared,
        to: Output<'_>,
        progress: &Progress,
        scratch: &Scratches<T>,
        times: &mut Timings,
    ) -> Result<()>
    where
        Self: Build<T>,
    {
        let paths: Vec<&Path> = self.job.models.iter().map(|p| p.as_path()).collect();
        let ctx =
            TensorCtx { job: &t.job, models: &paths, seed: self.job.seed, ram_budget: self.job.ram_budget };
        let mut merger = self.build(&ctx)?;
        let chunks = Self::chunks(t);
        let dtypes: Vec<Dtype> = t.views().map(|v| v.dtype()).collect();
        let sample = merger.sample_ranges();
        if !sample.is_empty() {
            let clock = Instant::now();
            // A few small ranges, read by the workers; not counted as progress. All are
            // announced first, so that cold reads queue together instead of one by one
            // (unless an input's first and last ranges are cached: then it is warm).
            // The merged sample does not depend on which worker read which range.
            for v in t.views() {
                v.will_need_all(&sample);
            }
            let (m, quiet) = (&*merger, Progress::default());
            let work = Work { announce: false, ..Work::stats(true) };
            sample.par_iter().try_for_each(|&(start, len)| {
                scratch.with(|s| {
                    with_chunk(t, s, start, len, &quiet, work, |x, _, stats| m.sample_chunk(x, stats))
                })
            })?;
            merger.end_sample(scratch.take_stats())?;
            times.sample += clock.elapsed().as_secs_f64();
        }
        let mut pass = 0;
        while merger.wants_pass() {
            let clock = Instant::now();
            pass += 1;
            if pass >= t.passes {
                // The data forced a pass the plan did not count.
                progress.bytes_total.fetch_add(t.pass_bytes(), Ordering::Relaxed);
            }
            let m = &*merger;
            let work = Work::stats(!m.takes_stored(&dtypes));
            chunks.par_iter().try_for_each(|&(start, len)| {
                scratch.with(|s| {
                    with_chunk(t, s, start, len, progress, work, |x, _, stats| m.stat_chunk(x, stats))
                })
            })?;
            merger.end_pass(scratch.take_stats())?;
            if times.stats.len() < pass {
                times.stats.resize(pass, 0.0);
            }
            times.stats[pass - 1] += clock.elapsed().as_secs_f64();
        }
        if pass + 1 < t.passes {
            // Fewer passes than planned: take the unread ones off the total.
            let unread = (t.passes - pass - 1) as u64 * t.pass_bytes();
            progress.bytes_total.fetch_sub(unread, Ordering::Relaxed);
        }
        let m = &*merger;
        let clock = Instant::now();
        if let Output::Write(writer, amax) = &to {
            self.write_scalars(t, writer, *amax)?;
        }
        let fused = merger.weighted_sum();
        let work = Work { decode: !m.takes_stored(&dtypes), encode: true, announce: true };
        let written = chunks.par_iter().try_for_each(|&(start, len)| {
            scratch.with(|s| {
                match &fused {
                    Some(sum) => weighted_chunk(t, s, start, len, progress, sum)?,
                    None => with_chunk(t, s, start, len, progress, work, |x, out, _| {
                        m.merge_chunk(x, out);
                        Ok(())
                    })?,
                }
                self.emit(t, s, start, len, &to)
            })
        });
        times.output += clock.elapsed().as_secs_f64();
        written
    }
}

/// What [`with_chunk`] does around the method's work.
#[derive(Debug, Clone, Copy)]
struct Work {
    /// Decode the inputs (else the method takes their stored bytes).
    decode: bool,
    /// Round the output into place.
    encode: bool,
    /// Announce the chunk's reads first ([`View::will_need`]); the sample's ranges are all
    /// announced together before any is read.
    announce: bool,
}

impl Work {
    /// A statistics (or sample) pass's work.
    fn stats(decode: bool) -> Work {
        Work { decode, encode: false, announce: true }
    }
}

/// Run `f` over one chunk, sub-block by sub-block: read the same element range of every
/// input and (with `work.decode`) decode it, call `f` with the inputs, an output buffer and
/// this worker's statistics, and (with `work.encode`) round the output into `s.bytes` at its
/// place in the chunk. Then count the chunk's bytes.
fn with_chunk<T: Real>(
    t: &Prepared,
    s: &mut Scratch<T>,
    start: u64,
    len: u64,
    progress: &Progress,
    work: Work,
    mut f: impl FnMut(&mut ChunkInputs<'_, T>, &mut [T], &mut Stats) -> Result<()>,
) -> Result<()> {
    if progress.is_cancelled() {
        return Err(Error::Cancelled);
    }
    let unit = t.unit();
    let sub = SUB_BLOCK.div_ceil(unit) * unit;
    let views: Vec<_> = t.views().collect();
    for v in views.iter().filter(|_| work.announce) {
        v.will_need(start, len);
    }
    s.inputs.resize_with(views.len(), Vec::new);
    if work.encode {
        out_buffers(t, len, &mut s.bytes, &mut s.vals);
    }
    let mut at = start;
    while at < start + len {
        let n = sub.min(start + len - at) as usize;
        let d = if work.decode { n } else { 0 };
        if work.decode {
            // Every input read through one buffer, which stays in the first-level cache.
            s.raws.resize_with(s.raws.len().max(1), Vec::new);
            for (v, buf) in views.iter().zip(s.inputs.iter_mut()) {
                buf.resize(n, T::ZERO);
                let in_place = cfg!(target_endian = "little") && v.dtype() == Dtype::F32;
                if let Some(values) = T::as_f32s_mut(buf).filter(|_| in_place) {
                    // F32 values (a quantized weight's, decoded by the reader) go straight
                    // into place.
                    v.read_raw(at, f32_bytes(values))?;
                    continue;
                }
                let raw = &mut s.raws[0];
                raw.resize(n * v.dtype().size(), 0);
                v.read_raw(at, raw)?;
                crate::kernels::dispatch::decode(v.dtype(), raw, buf);
            }
        } else {
            read_stored(&views, &mut s.raws, at, n)?;
        }
        s.out.resize(n, T::ZERO);
        let (base, models): (Option<&[T]>, &mut [Vec<T>]) = match (&t.base, s.inputs.split_first_mut()) {
            (Some(_), Some((b, rest))) => (Some(&b[..d]), rest),
            _ => (None, &mut s.inputs[..]),
        };
        let stored = if work.decode { Vec::new() } else { stored(&views, &s.raws) };
        let models = models.iter_mut().map(|m| &mut m[..d]).collect();
        let mut x = ChunkInputs { start: at, base, models, stored, decoded: work.decode };
        f(&mut x, &mut s.out[..n], &mut s.stats)?;
        if work.encode {
            place_out(t, &s.out[..n], (at - start) as usize, &mut s.bytes, &mut s.vals);
        }
        at += n as u64;
    }
    super::read::release_thread();
    for v in &views {
        progress.add_bytes(v.bytes_for(len));
    }
    Ok(())
}

/// The output pass of a [`WeightedSum`] over one chunk: each sub-block's stored bytes are
/// read for every input, summed in one sweep (`dispatch::weighted_sum`), and rounded into
/// place in `s.bytes`.
fn weighted_chunk<T: Real>(
    t: &Prepared,
    s: &mut Scratch<T>,
    start: u64,
    len: u64,
    progress: &Progress,
    sum: &WeightedSum<T>,
) -> Result<()> {
    if progress.is_cancelled() {
        return Err(Error::Cancelled);
    }
    let sub = SUB_BLOCK.div_ceil(t.unit()) * t.unit();
    out_buffers(t, len, &mut s.bytes, &mut s.vals);
    let views: Vec<_> = t.views().collect();
    for v in &views {
        v.will_need(start, len);
    }
    let mut at = start;
    while at < start + len {
        let n = sub.min(start + len - at) as usize;
        read_stored(&views, &mut s.raws, at, n)?;
        let raws = stored(&views, &s.raws);
        let (base, models) = match (sum.task, raws.split_first()) {
            (Some(_), Some((b, rest))) => (Some(*b), rest),
            _ => (None, &raws[..]),
        };
        let x = SumInputs { models, weights: &sum.weights, base, divisor: sum.divisor, lambda: sum.task };
        s.out.resize(n, T::ZERO);
        let out = &mut s.out[..n];
        crate::kernels::dispatch::weighted_sum(&x, out);
        place_out(t, out, (at - start) as usize, &mut s.bytes, &mut s.vals);
        at += n as u64;
    }
    super::read::release_thread();
    for v in &views {
        progress.add_bytes(v.bytes_for(len));
    }
    Ok(())
}

/// Read every view's stored bytes for elements `[at, at + n)`, each into its own buffer of
/// `raws` (in view order), for [`stored`].
pub(super) fn read_stored(views: &[&View], raws: &mut Vec<Vec<u8>>, at: u64, n: usize) -> Result<()> {
    raws.resize_with(raws.len().max(views.len()), Vec::new);
    for (v, raw) in views.iter().zip(raws.iter_mut()) {
        raw.resize(n * v.dtype().size(), 0);
        v.read_raw(at, raw)?;
    }
    Ok(())
}

/// The bytes [`read_stored`] read, with their views' dtypes.
pub(super) fn stored<'r>(views: &[&View], raws: &'r [Vec<u8>]) -> Vec<Raw<'r>> {
    views.iter().zip(raws).map(|(v, r)| Raw { dtype: v.dtype(), bytes: r }).collect()
}

/// Picks the f32 or f64 constructor of the method.
pub(crate) trait Build<T: Real> {
    fn build(&self, ctx: &TensorCtx<'_>) -> Result<Box<dyn TensorMerge<T>>>;
}

impl Build<f32> for Engine {
    fn build(&self, ctx: &TensorCtx<'_>) -> Result<Box<dyn TensorMerge<f32>>> {
        (self.method.build_f32)(ctx)
    }
}

impl Build<f64> for Engine {
    fn build(&self, ctx: &TensorCtx<'_>) -> Result<Box<dyn TensorMerge<f64>>> {
        (self.method.build_f64)(ctx)
    }
}
