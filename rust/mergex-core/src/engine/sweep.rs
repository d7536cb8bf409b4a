//! A sweep: several merges of the same inputs (its members, each a prepared [`Engine`] with
//! its own method, parameters and output) from one read of the inputs per pass.
//!
//! Tensor by tensor, every member builds its method as a single merge does. A statistics
//! pass reads each chunk once and hands every member that wants the pass its own copy of
//! the decoded inputs (methods overwrite them); the output pass reads each chunk once and
//! every member merges, rounds and writes it into its own output. Chunks are the smallest
//! any member's budget allows, in whole units of every member: the bytes do not depend on
//! chunking, so each member's output is the one its own merge writes.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::Instant;

use rayon::prelude::*;

use super::plan::{Engine, Prepared, SUB_BLOCK};
use super::progress::Progress;
use super::read::View;
use super::run::{read_stored, stored, Build, RunSummary, Scratches, Timings};
use super::values::{out_buffers, place_out, Output};
use crate::error::{Error, Result};
use crate::format::dtype::Dtype;
use crate::format::encode::Encoded;
use crate::kernels::real::Real;
use crate::kernels::sums::SumInputs;
use crate::methods::{ChunkInputs, Stage, Stats, TensorCtx, TensorMerge};

/// One member's buffers in a worker.
struct Own<T> {
    out: Vec<T>,
    bytes: Vec<u8>,
    vals: Vec<f32>,
    encoded: Encoded,
    stats: Stats,
}

/// A worker's buffers: the chunk's stored bytes and decoded values, read once, a member's
/// working copy of them, and each member's own output and statistics.
struct Shared<T> {
    raws: Vec<Vec<u8>>,
    decoded: Vec<Vec<T>>,
    work: Vec<Vec<T>>,
    own: Vec<Own<T>>,
}

/// One [`Shared`] per pool thread, kept for the whole sweep.
struct Pool<T> {
    shared: Vec<Mutex<Shared<T>>>,
    members: usize,
}

impl<T: Real> Shared<T> {
    fn new(members: usize) -> Self {
        Shared {
            raws: Vec::new(),
            decoded: Vec::new(),
            work: Vec::new(),
            own: (0..members)
                .map(|_| Own {
                    out: Vec::new(),
                    bytes: Vec::new(),
                    vals: Vec::new(),
                    encoded: Encoded::default(),
                    stats: Stats::default(),
                })
                .collect(),
        }
    }
}

impl<T: Real> Pool<T> {
    fn new(threads: usize, members: usize) -> Self {
        Pool { shared: (0..threads.max(1)).map(|_| Mutex::new(Shared::new(members))).collect(), members }
    }

    /// Run `f` with this pool thread's buffers. A chunk never waits on other rayon work
    /// while holding them, so the lock is uncontended.
    fn with<R>(&self, f: impl FnOnce(&mut Shared<T>) -> R) -> R {
        let i = rayon::current_thread_index().unwrap_or(0) % self.shared.len().max(1);
        let slot = self.shared.get(i).or(self.shared.first());
        match slot.map(|m| m.lock()) {
            Some(Ok(mut s)) => f(&mut s),
            Some(Err(poisoned)) => f(&mut poisoned.into_inner()),
            None => f(&mut Shared::new(self.members)),
        }
    }

    /// Take and merge every worker's statistics of member `m`.
    fn take_stats(&self, m: usize) -> Stats {
        self.shared.iter().fold(Stats::default(), |acc, s| {
            let mut s = match s.lock() {
                Ok(s) => s,
                Err(p) => p.into_inner(),
            };
            acc.merge(s.own.get_mut(m).map(|o| std::mem::take(&mut o.stats)).unwrap_or_default())
        })
    }
}

/// What one chunk of a pass gives each member.
#[derive(Clone, Copy)]
struct Pass<'a> {
    /// The members taking part.
    active: &'a [usize],
    /// Per member: it takes the stored bytes, undecoded.
    stored: &'a [bool],
    /// Round each member's output into its buffers.
    encode: bool,
}

/// Read elements `[start, start + len)` of the group's inputs once, sub-block by sub-block,
/// and call `f(m, inputs, out, stats)` for every active member `m` (its own copy of the
/// decoded inputs, or the stored bytes); with `encode`, round each member's output into
/// its buffers. Then count the chunk's bytes once.
fn shared_chunk<T: Real>(
    ts: &[&Prepared],
    pass: Pass<'_>,
    s: &mut Shared<T>,
    (start, len): (u64, u64),
    progress: &Progress,
    mut f: impl FnMut(usize, &mut ChunkInputs<'_, T>, &mut [T], &mut Stats) -> Result<()>,
) -> Result<()> {
    if progress.is_cancelled() {
        return Err(Error::Cancelled);
    }
    let Some(lead) = ts.first() else { return Ok(()) };
    let unit = ts.iter().fold(1, |u, t| lcm(u, t.unit()));
    let sub = SUB_BLOCK.div_ceil(unit) * unit;
    let views: Vec<&View> = lead.views().collect();
    for v in &views {
        v.will_need(start, len);
    }
    let Shared { raws, decoded, work, own } = s;
    if pass.encode {
        for &m in pass.active {
            if let (Some(t), Some(o)) = (ts.get(m), own.get_mut(m)) {
                out_buffers(t, len, &mut o.bytes, &mut o.vals);
            }
        }
    }
    let decode = pass.active.iter().any(|&m| !pass.stored.get(m).copied().unwrap_or(false));
    let mut at = start;
    while at < start + len {
        let n = sub.min(start + len - at) as usize;
        read_stored(&views, raws, at, n)?;
        if decode {
            decoded.resize_with(views.len(), Vec::new);
            for ((v, raw), buf) in views.iter().zip(raws.iter()).zip(decoded.iter_mut()) {
                buf.resize(n, T::ZERO);
                crate::kernels::dispatch::decode(v.dtype(), raw, buf);
            }
        }
        for (j, &m) in pass.active.iter().enumerate() {
            let (Some(t), Some(o)) = (ts.get(m), own.get_mut(m)) else { continue };
            o.out.resize(n, T::ZERO);
            let takes_stored = pass.stored.get(m).copied().unwrap_or(false);
            let inputs: &mut [Vec<T>] = if takes_stored {
                &mut []
            } else if j + 1 == pass.active.len() {
                // The last member may overwrite the decoded values themselves.
                &mut decoded[..]
            } else {
                work.resize_with(decoded.len(), Vec::new);
                for (w, d) in work.iter_mut().zip(decoded.iter()) {
                    w.clear();
                    w.extend_from_slice(d);
                }
                &mut work[..]
            };
            let d = if takes_stored { 0 } else { n };
            let (base, models): (Option<&[T]>, &mut [Vec<T>]) = match (&t.base, inputs.split_first_mut()) {
                (Some(_), Some((b, rest))) => (Some(&b[..d]), rest),
                _ => (None, inputs),
            };
            let raw = if takes_stored { stored(&views, raws) } else { Vec::new() };
            let models = models.iter_mut().map(|v| &mut v[..d]).collect();
            let mut x = ChunkInputs { start: at, base, models, stored: raw, decoded: !takes_stored };
            f(m, &mut x, &mut o.out[..n], &mut o.stats)?;
            if pass.encode {
                place_out(t, &o.out[..n], (at - start) as usize, &mut o.bytes, &mut o.vals);
            }
        }
        at += n as u64;
    }
    super::read::release_thread();
    for v in &views {
        progress.add_bytes(v.bytes_for(len));
    }
    Ok(())
}

fn lcm(a: u64, b: u64) -> u64 {
    let (mut x, mut y) = (a, b);
    while y != 0 {
        (x, y) = (y, x % y);
    }
    (a / x.max(1)).saturating_mul(b)
}

/// Check that the members read the same inputs (the caller groups them by their inputs):
/// the same tensors, each with the same number of inputs of the same dtypes and sizes.
fn check_group(members: &[&Engine]) -> Result<()> {
    let Some(lead) = members.first() else { return Ok(()) };
    for e in members {
        let same = e.tensors.len() == lead.tensors.len()
            && e.tensors.iter().zip(&lead.tensors).all(|(a, b)| {
                a.numel() == b.numel()
                    && a.copy == b.copy
                    && a.wide == b.wide
                    && a.base.is_some() == b.base.is_some()
                    && a.views().count() == b.views().count()
                    && a.views().zip(b.views()).all(|(x, y)| x.dtype() == y.dtype() && x.same_source(y))
            });
        if !same {
            return Err(Error::job("sweep", "the members of a sweep group must read the same inputs"));
        }
    }
    Ok(())
}

/// Run a sweep of `members` (which read the same inputs) into `dirs` (existing, empty
/// folders, one per member): one read of the inputs per pass for all of them.
pub fn run_sweep(members: &[&Engine], dirs: &[&Path], progress: &Progress) -> Result<Vec<RunSummary>> {
    check_group(members)?;
    let Some(lead) = members.first() else { return Ok(Vec::new()) };
    if dirs.len() != members.len() {
        return Err(Error::job("sweep", "one output folder per member"));
    }
    let threads = members.iter().map(|e| e.job.threads).max().unwrap_or(1);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("mergex-{i}"))
        .build()
        .map_err(|e| Error::job("threads", e.to_string()))?;
    let quiet = Progress::default();
    // Tensors an earlier run (or another task) finished: the same for every member.
    let kept = lead.kept_flags();
    if members.iter().any(|e| e.kept_flags() != kept) {
        return Err(Error::job("sweep", "the members of a sweep group must keep the same finished tensors"));
    }
    let mut sinks = Vec::with_capacity(members.len());
    for (e, dir) in members.iter().zip(dirs) {
        sinks.push(e.open_sink(dir, &quiet)?);
    }
    progress.bytes_total.fetch_add(planned_bytes(members), Ordering::Relaxed);
    progress.tensors_total.fetch_add(lead.tensors.len() as u64, Ordering::Relaxed);
    let (p32, p64) = (Pool::<f32>::new(threads, members.len()), Pool::<f64>::new(threads, members.len()));
    let mut times = Timings::default();
    pool.install(|| -> Result<()> {
        let mut amax = Vec::with_capacity(members.len());
        for e in members {
            let scratch = (&Scratches::<f32>::new(threads), &Scratches::<f64>::new(threads));
            amax.push(e.amax_values(&kept, &quiet, scratch, &mut times)?);
        }
        for i in 0..lead.tensors.len() {
            if kept.get(i) == Some(&true) {
                progress.tensors_done.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            for e in members {
                e.begin_tensor(i)?;
            }
            let outs: Vec<Output<'_>> = members
                .iter()
                .zip(&sinks)
                .zip(&amax)
                .map(|((e, sink), a)| {
                    let key = e.tensors.get(i).and_then(Prepared::amax_key);
                    Output::Write(sink.writer(), key.and_then(|k| a.get(k)).copied())
                })
                .collect();
            let ts: Vec<&Prepared> = members.iter().filter_map(|e| e.tensors.get(i)).collect();
            if lead.tensors.get(i).is_some_and(|t| t.copy) {
                let clock = Instant::now();
                for (m, (e, t)) in members.iter().zip(&ts).enumerate() {
                    let Output::Write(writer, _) = outs[m] else { continue };
                    e.copy_tensor(t, e.place(t, 0), writer, if m == 0 { progress } else { &quiet })?;
                }
                times.output += clock.elapsed().as_secs_f64();
            } else if lead.tensors.get(i).is_some_and(|t| t.wide) {
                sweep_tensor(members, &ts, &outs, progress, &p64, &mut times)?;
            } else {
                sweep_tensor(members, &ts, &outs, progress, &p32, &mut times)?;
            }
            drop(outs);
            for (e, sink) in members.iter().zip(sinks.iter_mut()) {
                e.end_tensor(sink, i, &quiet)?;
            }
            progress.tensors_done.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    })?;
    let mut summaries = Vec::with_capacity(members.len());
    for ((e, sink), dir) in members.iter().zip(sinks).zip(dirs) {
        let mut summary = e.close_sink(sink, dir, &quiet)?;
        summary.bytes_read = progress.bytes_done.load(Ordering::Relaxed);
        summary.sample_seconds = times.sample;
        summary.stat_pass_seconds.clone_from(&times.stats);
        summary.output_seconds = times.output;
        summaries.push(summary);
    }
    Ok(summaries)
}

/// Input bytes the sweep plans to read: per tensor, as many passes as its most demanding
/// member takes (a copied tensor once per member).
pub fn planned_bytes(members: &[&Engine]) -> u64 {
    let Some(lead) = members.first() else { return 0 };
    let kept = lead.kept_flags();
    (0..lead.tensors.len())
        .filter(|&i| kept.get(i) != Some(&true))
        .map(|i| {
            let ts = members.iter().filter_map(|e| e.tensors.get(i));
            match lead.tensors.get(i) {
                Some(t) if t.copy => t.pass_bytes() * members.len() as u64,
                Some(t) => t.pass_bytes() * ts.map(|t| t.passes as u64).max().unwrap_or(1),
                None => 0,
            }
        })
        .sum()
}

/// For each member (by index), the member whose statistics of `stage` it takes: the first
/// of `members` whose kernel for that stage is the same ([`TensorMerge::kernel`]: what a
/// chunk computes, so equal kernels give equal statistics), itself when none before it.
fn sources<T: Real>(
    mergers: &[Box<dyn TensorMerge<T>>],
    members: &[usize],
    stage: Stage,
    starts: &[u64],
) -> Vec<usize> {
    let mut source: Vec<usize> = (0..mergers.len()).collect();
    let kernels: Vec<Option<serde_json::Value>> =
        members.iter().map(|&m| serde_json::to_value(mergers[m].kernel(stage, starts)).ok()).collect();
    for (j, &m) in members.iter().enumerate() {
        let same = (0..j).find(|&i| kernels[i].is_some() && kernels[i] == kernels[j]);
        if let Some(i) = same {
            source[m] = members[i];
        }
    }
    source
}

/// Each of `members`' statistics: its own, or a copy of its source's ([`sources`]).
fn shared_stats<T: Real>(pool: &Pool<T>, members: &[usize], source: &[usize]) -> Vec<(usize, Stats)> {
    let mut own: Vec<(usize, Stats)> =
        members.iter().filter(|&&m| source[m] == m).map(|&m| (m, pool.take_stats(m))).collect();
    let copies: Vec<(usize, Stats)> = members
        .iter()
        .filter(|&&m| source[m] != m)
        .map(|&m| (m, own.iter().find(|(o, _)| *o == source[m]).map(|(_, s)| s.clone()).unwrap_or_default()))
        .collect();
    own.extend(copies);
    own
}

/// Merge tensor `ts` of every member: the samples, the statistics passes any member
/// wants (each chunk read once for all of them), then one output pass.
fn sweep_tensor<T: Real>(
    members: &[&Engine],
    ts: &[&Prepared],
    outs: &[Output<'_>],
    progress: &Progress,
    pool: &Pool<T>,
    times: &mut Timings,
) -> Result<()>
where
    Engine: Build<T>,
{
    let Some(lead) = ts.first() else { return Ok(()) };
    let mut mergers: Vec<Box<dyn TensorMerge<T>>> = Vec::with_capacity(members.len());
    for (e, t) in members.iter().zip(ts) {
        let paths: Vec<&Path> = e.job.models.iter().map(|p| p.as_path()).collect();
        let ctx = TensorCtx { job: &t.job, models: &paths, seed: e.job.seed, ram_budget: e.job.ram_budget };
        mergers.push(e.build(&ctx)?);
    }
    let unit = ts.iter().fold(1, |u, t| lcm(u, t.chunk_unit()));
    let chunk = (ts.iter().map(|t| t.chunk).min().unwrap_or(unit) / unit * unit).max(unit);
    let numel = lead.numel();
    let chunks: Vec<(u64, u64)> =
        (0..numel.div_ceil(chunk)).map(|c| (c * chunk, chunk.min(numel - c * chunk))).collect();
    let dtypes: Vec<Dtype> = lead.views().map(View::dtype).collect();
    let none = vec![false; members.len()];
    let starts: Vec<u64> = chunks.iter().map(|c| c.0).collect();

    // The samples: a few small ranges, outside the counted passes, read once for the
    // members that take the same ranges.
    let clock = Instant::now();
    let quiet = Progress::default();
    let samples: Vec<Vec<(u64, u64)>> = mergers.iter().map(|m| m.sample_ranges()).collect();
    let mut taken = vec![false; mergers.len()];
    for m in 0..mergers.len() {
        if taken[m] || samples[m].is_empty() {
            continue;
        }
        let same: Vec<usize> =
            (m..mergers.len()).filter(|&o| !taken[o] && samples[o] == samples[m]).collect();
        for &o in &same {
            taken[o] = true;
        }
        let source = sources(&mergers, &same, Stage::Sample, &starts);
        let computing: Vec<usize> = same.iter().copied().filter(|&o| source[o] == o).collect();
        let (ms, pass) = (&mergers, Pass { active: &computing, stored: &none, encode: false });
        samples[m].par_iter().try_for_each(|&range| {
            pool.with(|s| shared_chunk(ts, pass, s, range, &quiet, |o, x, _, st| ms[o].sample_chunk(x, st)))
        })?;
        for (o, stats) in shared_stats(pool, &same, &source) {
            mergers[o].end_sample(stats)?;
        }
    }
    times.sample += clock.elapsed().as_secs_f64();

    // The statistics passes, each chunk read once for every member that wants the pass.
    let planned = ts.iter().map(|t| t.passes).max().unwrap_or(1);
    let mut pass = 0;
    loop {
        let active: Vec<usize> = (0..mergers.len()).filter(|&m| mergers[m].wants_pass()).collect();
        if active.is_empty() {
            break;
        }
        let clock = Instant::now();
        pass += 1;
        if pass >= planned {
            progress.bytes_total.fetch_add(lead.pass_bytes(), Ordering::Relaxed);
        }
        let stored: Vec<bool> = mergers.iter().map(|mg| mg.takes_stored(&dtypes)).collect();
        let source = sources(&mergers, &active, Stage::Pass, &starts);
        let computing: Vec<usize> = active.iter().copied().filter(|&m| source[m] == m).collect();
        let (ms, p) = (&mergers, Pass { active: &computing, stored: &stored, encode: false });
        chunks.par_iter().try_for_each(|&c| {
            pool.with(|s| shared_chunk(ts, p, s, c, progress, |m, x, _, st| ms[m].stat_chunk(x, st)))
        })?;
        for (m, stats) in shared_stats(pool, &active, &source) {
            mergers[m].end_pass(stats)?;
        }
        if times.stats.len() < pass {
            times.stats.resize(pass, 0.0);
        }
        times.stats[pass - 1] += clock.elapsed().as_secs_f64();
    }
    if pass + 1 < planned {
        let unread = (planned - pass - 1) as u64 * lead.pass_bytes();
        progress.bytes_total.fetch_sub(unread, Ordering::Relaxed);
    }

    // The output pass: every member merges each chunk read once.
    let clock = Instant::now();
    for ((e, t), to) in members.iter().zip(ts).zip(outs) {
        if let Output::Write(writer, amax) = to {
            e.write_scalars(t, writer, *amax)?;
        }
    }
    let fused: Vec<_> = mergers.iter().map(|m| m.weighted_sum()).collect();
    let stored: Vec<bool> =
        mergers.iter().zip(&fused).map(|(m, f)| f.is_some() || m.takes_stored(&dtypes)).collect();
    let all: Vec<usize> = (0..mergers.len()).collect();
    let (ms, p) = (&mergers, Pass { active: &all, stored: &stored, encode: true });
    let written = chunks.par_iter().try_for_each(|&(start, len)| {
        pool.with(|s| {
            shared_chunk(ts, p, s, (start, len), progress, |m, x, out, _| {
                match &fused[m] {
                    Some(sum) => {
                        let (base, models) = match (sum.task, x.stored.split_first()) {
                            (Some(_), Some((b, rest))) => (Some(*b), rest),
                            _ => (None, &x.stored[..]),
                        };
                        let inputs = SumInputs {
                            models,
                            weights: &sum.weights,
                            base,
                            divisor: sum.divisor,
                            lambda: sum.task,
                        };
                        crate::kernels::dispatch::weighted_sum(&inputs, out);
                    }
                    None => ms[m].merge_chunk(x, out),
                }
                Ok(())
            })?;
            for (m, ((e, t), to)) in members.iter().zip(ts).zip(outs).enumerate() {
                let Some(o) = s.own.get_mut(m) else { continue };
                e.emit_values(t, (&o.bytes, &o.vals, &mut o.encoded), start, len, to)?;
            }
            Ok(())
        })
    });
    times.output += clock.elapsed().as_secs_f64();
    written
}
