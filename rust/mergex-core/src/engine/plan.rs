//! Preparing a merge: open and validate every input, decide each tensor's chunk size and
//! pass count, and compute the output layout — all before any output is written.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use super::adapter::Lora;
use super::read::{Rows, View};
use super::stage::{StageSum, StageTensor};

use crate::error::{Error, Result};
use crate::format::checkpoint::Checkpoint;
use crate::format::dtype::Dtype;
use crate::format::encode::Encoder;
use crate::format::gptoss::Transposed;
use crate::format::quant::{Packed, Scales};
use crate::format::writer::{layout, Layout, OutTensor};
use crate::job::{InputRef, Job, TensorJob};
use crate::methods::{self, MethodSpec, TensorCtx};
use crate::numeric::reduce::BLOCK;

/// The most worker threads accepted (each holds its own buffers).
pub const MAX_THREADS: usize = 1024;
/// Elements per sub-block: a chunk is merged in sub-blocks small enough that every
/// input's decoded values stay in the CPU cache between decoding and merging, while reads,
/// writes and page releases still happen once per (large) chunk.
pub(crate) const SUB_BLOCK: u64 = 16 * 1024;

/// The smallest RAM budget accepted.
pub const MIN_RAM_BUDGET: u64 = 64 * 1024;
/// Largest data size of one output file when the caller does not say (what the Hub's
/// checkpoints use: 5 GB).
pub const DEFAULT_SHARD_SIZE: u64 = 5_000_000_000;
/// Largest chunk, in elements: beyond this, bigger chunks buy nothing.
const MAX_CHUNK: u64 = 1 << 22;
/// Chunks a tensor is cut into per thread at least (when it is large enough): with two, a
/// thread that finishes its first chunk early takes another's second one instead of waiting
/// for the slowest (linear merges of the 8-layer benchmark set: 0.42 s against 0.45 s with
/// one chunk per thread).
const CHUNKS_PER_THREAD: u64 = 2;
/// Share of the budget given to chunk buffers; the rest covers page rounding, read-ahead
/// and allocator slack.
const WORK_PERCENT: u64 = 85;
/// Resident memory of the process that does not scale with the budget (interpreter,
/// libraries, thread stacks), used for the peak-memory estimate.
pub const FIXED_OVERHEAD: u64 = 96 * 1024 * 1024;

/// One output tensor, ready to run.
#[derive(Debug)]
pub(crate) struct Prepared {
    pub job: TensorJob,
    /// The output tensor (a quantized weight's codes).
    pub out: OutTensor,
    /// The merged tensor's shape (a quantized weight's, not its codes').
    pub shape: Vec<u64>,
    /// Writes the merged values quantized (`out_quantization: base`).
    pub enc: Option<Encoder>,
    /// The tensors written beside the codes of a quantized weight (scales, global scale,
    /// zero points), in output order after it.
    pub companions: Vec<OutTensor>,
    /// Index of [`Prepared::out`] among all output tensors ([`Engine::out`]).
    pub first_out: usize,
    pub copy: bool,
    pub base: Option<View>,
    pub inputs: Vec<View>,
    /// Work in f64 (an input is F64).
    pub wide: bool,
    pub chunk: u64,
    pub passes: usize,
    /// Chunks and their sub-blocks hold whole groups of this many elements (a row-wise
    /// method's rows; 32 rows of a gpt-oss input).
    pub align: u64,
    /// Chunks (not sub-blocks) also hold whole groups of this many elements: blocks of rows of
    /// a quantized output, whole experts of a gpt-oss input or output.
    pub chunk_align: u64,
}

impl Prepared {
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }

    /// The key whose amax the scales need, when they need one (QUANT.md §7): the tensor's
    /// fusion group, else its own name.
    pub fn amax_key(&self) -> Option<&str> {
        self.enc.as_ref().filter(|e| e.needs_amax())?;
        Some(self.job.encode.as_ref().and_then(|e| e.fusion.as_deref()).unwrap_or(&self.out.name))
    }

    /// Input bytes read over all passes: the statistics and output passes, and the passes
    /// of the amax run before them when the scales need one.
    pub fn bytes_read(&self) -> u64 {
        let runs = if self.amax_key().is_some() { 2 } else { 1 };
        self.pass_bytes() * self.passes as u64 * runs
    }

    pub fn views(&self) -> impl Iterator<Item = &View> {
        self.base.iter().chain(self.inputs.iter())
    }

    /// Sub-blocks are whole numbers of this many elements.
    pub fn unit(&self) -> u64 {
        lcm(BLOCK, self.align.max(1))
    }

    /// Chunks are whole numbers of this many elements.
    pub fn chunk_unit(&self) -> u64 {
        lcm(self.unit(), self.chunk_align.max(1))
    }

    /// Input bytes one pass reads.
    pub fn pass_bytes(&self) -> u64 {
        self.views().map(|v| v.bytes_for(self.numel())).sum()
    }

    /// Bytes a chunk holds per element: the mapped input bytes and the encoded output (and,
    /// for a quantized output, the f32 values it is encoded from).
    fn per_elem(&self) -> u64 {
        let encoding = self.enc.as_ref().map_or(0, Encoder::bytes_per_elem);
        self.views().map(|v| v.entry.dtype.size() as u64).sum::<u64>()
            + self.out.dtype.size() as u64
            + encoding
    }

    /// Bytes of one worker's sub-block buffers (decoded inputs and output, and the inputs'
    /// stored bytes).
    fn sub_block_bytes(&self) -> u64 {
        let work = if self.wide { 8 } else { 4 };
        let stored: u64 = self.views().map(|v| v.dtype().size() as u64).sum();
        let sub = SUB_BLOCK.max(self.unit());
        let adapters: u64 = self.views().map(|v| v.buffer_bytes(sub)).sum();
        (self.views().count() as u64 + 1)
            .saturating_mul(work)
            .saturating_add(stored)
            .saturating_mul(sub)
            .saturating_add(adapters)
    }
}

/// A validated merge, ready to run.
#[derive(Debug)]
pub struct Engine {
    pub(crate) job: Job,
    pub(crate) method: &'static MethodSpec,
    pub(crate) tensors: Vec<Prepared>,
    pub(crate) out: Vec<OutTensor>,
    pub(crate) layout: Layout,
}

/// What `mergex plan` shows.
#[derive(Debug, Serialize)]
pub struct PlanSummary {
    /// Method name.
    pub method: String,
    /// Output tensors.
    pub tensors: usize,
    /// Input bytes read over all passes.
    pub bytes_read: u64,
    /// Input bytes of the tensors used, read once.
    pub input_bytes: u64,
    /// Output data bytes.
    pub bytes_written: u64,
    /// Worker threads.
    pub threads: usize,
    /// RAM budget.
    pub ram_budget: u64,
    /// Largest chunk, in elements.
    pub max_chunk_elems: u64,
    /// Number of tensors per pass count.
    pub passes: BTreeMap<usize, usize>,
    /// Output files: (name, bytes, tensors).
    pub shards: Vec<(String, u64, usize)>,
    /// Estimated peak resident memory.
    pub peak_memory: u64,
}

impl Engine {
    /// Open and validate everything the job names.
    pub fn prepare(job: Job) -> Result<Engine> {
        let method = methods::find(&job.method)
            .ok_or_else(|| Error::job("merge_method", format!("unknown method '{}'", job.method)))?;
        if job.threads == 0 || job.threads > MAX_THREADS {
            return Err(Error::job(
                "threads",
                format!("must be from 1 to {MAX_THREADS}, got {}", job.threads),
            ));
        }
        if job.ram_budget < MIN_RAM_BUDGET {
            return Err(Error::job(
                "ram_budget",
                format!("{} bytes is below the minimum of 64KiB", job.ram_budget),
            ));
        }
        if job.shard_size == 0 {
            return Err(Error::job("shard_size", "must be positive"));
        }
        let models = job
            .models
            .iter()
            .enumerate()
            .map(|(i, p)| match job.partial.contains(&i) {
                true => Checkpoint::open_partial(p),
                false => Checkpoint::open(p),
            })
            .collect::<Result<Vec<_>>>()?;
        let paths: Vec<&Path> = job.models.iter().map(|p| p.as_path()).collect();
        let stages = job
            .stages
            .iter()
            .map(|(&k, j)| Engine::prepare(j.clone()).map(|e| (k, e)))
            .collect::<Result<BTreeMap<usize, Engine>>>()?;
        let inputs = Inputs { models: &models, paths: &paths, stages: &stages };
        let mut names = HashSet::new();
        let mut tensors = Vec::with_capacity(job.tensors.len());
        let (mut out, mut joined) = (Vec::new(), Vec::new());
        for t in &job.tensors {
            let mut p = prepare_tensor(&job, method, &inputs, t)?;
            p.first_out = out.len();
            for (k, o) in std::iter::once(&p.out).chain(&p.companions).enumerate() {
                if !names.insert(o.name.clone()) {
                    return Err(Error::job("tensors", format!("output tensor '{}' appears twice", o.name)));
                }
                out.push(o.clone());
                joined.push(k > 0);
            }
            tensors.push(p);
        }
        let layout = layout(&out, &joined, job.shard_size, &job.metadata)?;
        Ok(Engine { job, method, tensors, out, layout })
    }

    /// What the merge will read, write and hold in memory.
    pub fn plan(&self) -> PlanSummary {
        let mut passes = BTreeMap::new();
        let mut peak_work = 0u64;
        for t in &self.tensors {
            *passes.entry(t.passes).or_insert(0) += 1;
            let workers = self.job.threads.min(chunks(t)) as u64;
            let bytes = t.chunk.saturating_mul(t.per_elem()).saturating_add(t.sub_block_bytes());
            peak_work = peak_work.max(bytes.saturating_mul(workers));
        }
        PlanSummary {
            method: self.method.name.to_string(),
            tensors: self.tensors.len(),
            bytes_read: self.tensors.iter().map(Prepared::bytes_read).sum(),
            input_bytes: self.tensors.iter().map(Prepared::pass_bytes).sum(),
            bytes_written: self.layout.total_size,
            threads: self.job.threads,
            ram_budget: self.job.ram_budget,
            max_chunk_elems: self.tensors.iter().map(|t| t.chunk).max().unwrap_or(0),
            passes,
            shards: self
                .layout
                .shards
                .iter()
                .map(|s| (s.file_name.clone(), s.len, s.tensors.len()))
                .collect(),
            peak_memory: peak_work + FIXED_OVERHEAD,
        }
    }
}

fn chunks(t: &Prepared) -> usize {
    t.numel().div_ceil(t.chunk.max(1)) as usize
}

/// What the views of a job's inputs are made from.
struct Inputs<'a> {
    models: &'a [Checkpoint],
    paths: &'a [&'a Path],
    /// Fused recipe stages, by the index of the model that is their output.
    stages: &'a BTreeMap<usize, Engine>,
}

/// The view of tensor `r.tensor` of a fused stage's output (`stage`): computed as read.
fn stage_view(models: &[Checkpoint], stage: &Engine, r: &InputRef, shape: &[u64]) -> Result<View> {
    let refuse = |why: &str| Error::job("stages", format!("tensor '{}' of a fused stage: {why}", r.tensor));
    if r.rows.is_some() || r.lora.is_some() || r.scale.is_some() {
        return Err(refuse("read with a row map, an adapter or scales"));
    }
    let m = models.get(r.model).ok_or_else(|| refuse("model index out of range"))?;
    let (file, entry) = m.require(&r.tensor)?;
    let p =
        stage.tensors.iter().find(|t| t.out.name == r.tensor).ok_or_else(|| refuse("not in the stage"))?;
    if p.copy || p.enc.is_some() || p.out.dtype == Dtype::F64 || p.shape != shape {
        return Err(refuse("copied, quantized, F64 or of another shape"));
    }
    let paths: Vec<&Path> = stage.job.models.iter().map(|p| p.as_path()).collect();
    let ctx =
        TensorCtx { job: &p.job, models: &paths, seed: stage.job.seed, ram_budget: stage.job.ram_budget };
    let sum = if p.wide {
        StageSum::F64(
            (stage.method.build_f64)(&ctx)?.weighted_sum().ok_or_else(|| refuse("not element-wise"))?,
        )
    } else {
        StageSum::F32(
            (stage.method.build_f32)(&ctx)?.weighted_sum().ok_or_else(|| refuse("not element-wise"))?,
        )
    };
    let tensor = StageTensor::new(&r.tensor, p.views().cloned().collect(), sum, p.out.dtype);
    Ok(View::computed(file.clone(), entry.clone(), Arc::new(tensor)))
}

fn view(inputs: &Inputs<'_>, r: &InputRef, shape: &[u64]) -> Result<View> {
    let (models, paths) = (inputs.models, inputs.paths);
    if let Some(stage) = inputs.stages.get(&r.model) {
        return stage_view(models, stage, r, shape);
    }
    if let Some(map) = &r.rows {
        let source = |(s, shape): &(InputRef, Vec<u64>)| match s.rows {
            Some(_) => Err(Error::job("tensors", "a row source cannot have a row map of its own")),
            None => view(inputs, s, shape),
        };
        let sources = map.sources.iter().map(source).collect::<Result<Vec<_>>>()?;
        let model = paths.get(r.model).copied().unwrap_or(Path::new(""));
        return View::gathered(Rows::new(model, &r.tensor, sources, &map.runs, shape)?).ok_or_else(|| {
            Error::job("tensors", format!("tensor '{}': a row map without sources", r.tensor))
        });
    }
    let view = stored_view(models, paths, r, shape)?;
    let Some(l) = &r.lora else { return Ok(view) };
    let m = models
        .get(l.model)
        .ok_or_else(|| Error::job("tensors", format!("adapter index {} out of range", l.model)))?;
    let path = paths.get(l.model).map(|p| p.to_path_buf()).unwrap_or_default();
    let (a, b) = (m.require(&l.a)?, m.require(&l.b)?);
    // The adapter's factors index the stored weight (a quantized weight's plain shape).
    let stored = if view.is_quantized() { shape.to_vec() } else { view.entry.shape.clone() };
    let (a, b) = ((a.0.clone(), a.1.clone()), (b.0.clone(), b.1.clone()));
    Ok(view.with_lora(Lora::new(&path, a, b, &stored, l.scale, l.transposed)?))
}

/// The view of an input as stored (decoded when quantized), before any adapter.
fn stored_view(models: &[Checkpoint], paths: &[&Path], r: &InputRef, shape: &[u64]) -> Result<View> {
    let m = models
        .get(r.model)
        .ok_or_else(|| Error::job("tensors", format!("model index {} out of range", r.model)))?;
    let (file, entry) = m.require(&r.tensor)?;
    let model = paths.get(r.model).map(|p| p.to_path_buf()).unwrap_or_default();
    if let Some(scale) = r.scale.as_ref().filter(|s| s.transposed) {
        let (scale_file, scale_entry) = m.require(&scale.tensor)?;
        let codes = (file.clone(), entry.clone());
        let t = Transposed::new(&model, codes, (scale_file.clone(), scale_entry.clone()), shape)?;
        return Ok(View::transposed(file.clone(), entry.clone(), t));
    }
    let packed = r.scale.as_ref().and_then(|s| match (s.packed_fp4, s.int_bits) {
        (true, _) => Some(Packed::Fp4),
        (false, Some(b)) => Some(Packed::Int(b)),
        (false, None) => None,
    });
    let view = match packed {
        Some(p) => View::packed(file.clone(), entry.clone(), shape, p.bits()),
        None => View::new(file.clone(), entry.clone(), shape),
    };
    let view = view.ok_or_else(|| Error::ShapeMismatch {
        model: model.clone(),
        tensor: r.tensor.clone(),
        shape: entry.shape.clone(),
        expected: shape.to_vec(),
    })?;
    let Some(scale) = &r.scale else { return Ok(view) };
    let (scale_file, scale_entry) = m.require(&scale.tensor)?;
    let global = match &scale.global_scale {
        Some(g) => Some((one_value(m, &model, &g.tensor)?, g.divide)),
        None => None,
    };
    if let Some(name) = &scale.weight_shape {
        check_weight_shape(m, &model, name, shape)?;
    }
    let mut scales =
        Scales::new(&model, entry, scale_file.clone(), scale_entry.clone(), scale.block, packed, global)?;
    if let Some(name) = &scale.zero_point {
        let (zp_file, zp_entry) = m.require(name)?;
        scales = scales.with_zero_points(zp_file.clone(), zp_entry.clone())?;
    }
    Ok(view.with_scales(scales))
}

/// A `weight_shape` tensor (I64 or I32) must hold `shape`.
fn check_weight_shape(m: &Checkpoint, model: &Path, name: &str, shape: &[u64]) -> Result<()> {
    let (file, entry) = m.require(name)?;
    let size = entry.dtype.size();
    let mut bytes = vec![0u8; entry.nbytes() as usize];
    file.read_at(entry, 0, &mut bytes)?;
    let dims: Vec<u64> = match entry.dtype {
        Dtype::I64 => {
            bytes.chunks_exact(size).map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8]))).collect()
        }
        Dtype::I32 => bytes
            .chunks_exact(size)
            .map(|b| u64::from(u32::from_le_bytes(b.try_into().unwrap_or([0; 4]))))
            .collect(),
        _ => Vec::new(),
    };
    if dims != shape {
        return Err(Error::QuantizedWeight {
            path: model.to_path_buf(),
            tensor: name.to_string(),
            message: format!("weight_shape {dims:?} disagrees with the packed codes, which hold {shape:?}"),
        });
    }
    Ok(())
}

/// The value of a one-element F32 tensor (a global scale).
fn one_value(m: &Checkpoint, model: &Path, name: &str) -> Result<f32> {
    let (file, entry) = m.require(name)?;
    if entry.dtype != Dtype::F32 || entry.shape.iter().product::<u64>() != 1 {
        return Err(Error::QuantizedWeight {
            path: model.to_path_buf(),
            tensor: name.to_string(),
            message: format!(
                "a global scale must be one F32 value, not {} {:?}",
                entry.dtype.name(),
                entry.shape
            ),
        });
    }
    let mut b = [0u8; 4];
    file.read_at(entry, 0, &mut b)?;
    Ok(f32::from_le_bytes(b))
}

fn prepare_tensor(
    job: &Job,
    method: &'static MethodSpec,
    inputs: &Inputs<'_>,
    t: &TensorJob,
) -> Result<Prepared> {
    let paths = inputs.paths;
    let dtype = Dtype::from_name(&t.dtype)
        .ok_or_else(|| Error::job("dtype", format!("tensor '{}': unknown dtype '{}'", t.name, t.dtype)))?;
    let base = t.base.as_ref().map(|r| view(inputs, r, &t.shape)).transpose()?;
    let inputs = t.inputs.iter().map(|r| view(inputs, r, &t.shape)).collect::<Result<Vec<_>>>()?;
    if inputs.is_empty() {
        return Err(Error::job("tensors", format!("tensor '{}' has no inputs", t.name)));
    }
    let (enc, out, companions) = match &t.encode {
        Some(e) if !t.copy => {
            let (enc, mut outs) = Encoder::new(&t.name, &t.shape, dtype, e)?;
            let codes = outs.remove(0);
            (Some(enc), codes, outs)
        }
        _ => (None, OutTensor { name: t.name.clone(), dtype, shape: t.shape.clone() }, Vec::new()),
    };
    let mut p = Prepared {
        job: t.clone(),
        out,
        shape: t.shape.clone(),
        enc,
        companions,
        first_out: 0,
        copy: t.copy,
        base,
        inputs,
        wide: false,
        chunk: BLOCK,
        passes: 1,
        align: 1,
        chunk_align: 1,
    };
    if t.copy {
        let src = p.inputs.first().map(|v| v.entry.dtype);
        if p.inputs.len() != 1
            || p.base.is_some()
            || src != Some(dtype)
            || p.inputs.iter().any(|v| v.entry.shape != t.shape)
        {
            return Err(Error::job(
                "tensors",
                format!("tensor '{}': a copy takes one input of the same dtype and shape", t.name),
            ));
        }
    } else {
        if p.enc.is_none() && !dtype.is_output_float() {
            return Err(Error::job(
                "dtype",
                format!("tensor '{}': cannot write merged values as {}", t.name, dtype.name()),
            ));
        }
        for (v, r) in p.views().zip(t.base.iter().chain(t.inputs.iter())) {
            if !v.dtype().is_float() {
                return Err(Error::NotFloat {
                    model: paths.get(r.model).map(|p| p.to_path_buf()).unwrap_or_default(),
                    tensor: r.tensor.clone(),
                    dtype: v.dtype().name(),
                });
            }
        }
        p.job = method.complete(t, paths)?;
        let wide = p.views().any(|v| v.dtype() == Dtype::F64);
        p.wide = wide;
        let ctx = TensorCtx { job: &p.job, models: paths, seed: job.seed, ram_budget: job.ram_budget };
        let (passes, align) = if p.wide {
            let m = (method.build_f64)(&ctx)?;
            (m.planned_passes(), m.align())
        } else {
            let m = (method.build_f32)(&ctx)?;
            (m.planned_passes(), m.align())
        };
        p.passes = 1 + passes;
        let gpt_oss = p.views().filter_map(View::gpt_oss);
        let (rows, experts) = gpt_oss.fold((1, 1), |(r, e), t| (lcm(r, t.block_rows()), lcm(e, t.matrix())));
        p.align = lcm(align.max(1), rows);
        p.chunk_align = lcm(experts, p.enc.as_ref().map_or(1, Encoder::align));
    }
    let buffers = p.sub_block_bytes() * job.threads as u64;
    p.chunk = chunk_elems(
        job.ram_budget.saturating_sub(buffers),
        job.threads,
        p.per_elem(),
        p.numel(),
        p.chunk_unit(),
    );
    Ok(p)
}

/// Elements per chunk: as many as the budget allows for every thread, a whole number of
/// units (reduction blocks, and whole row groups for row-wise methods), and small enough
/// that a large tensor gives every thread [`CHUNKS_PER_THREAD`] chunks.
pub(crate) fn chunk_elems(budget: u64, threads: usize, per_elem: u64, numel: u64, align: u64) -> u64 {
    let unit = lcm(BLOCK, align.max(1));
    let work = budget / 100 * WORK_PERCENT;
    let by_budget =
        (work / (threads as u64).saturating_mul(per_elem.max(1))).min(MAX_CHUNK.max(unit)) / unit * unit;
    let share = numel.div_ceil(threads as u64 * CHUNKS_PER_THREAD).div_ceil(unit).max(1).saturating_mul(unit);
    by_budget.max(unit).min(share)
}

fn lcm(a: u64, b: u64) -> u64 {
    let (mut x, mut y) = (a, b);
    while y != 0 {
        (x, y) = (y, x % y);
    }
    (a / x).saturating_mul(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_follow_the_budget_and_the_thread_count() {
        // 64KiB, one thread, three f32 inputs: 85% of 64KiB over 32 bytes an element.
        assert_eq!(chunk_elems(64 * 1024, 1, 32, 1 << 20, 1), 1536);
        // Never below one block, even when the budget is too small.
        assert_eq!(chunk_elems(64 * 1024, 8, 10_000, 1 << 20, 1), BLOCK);
        // A tensor that fits is still split: two chunks for each of the two threads.
        assert_eq!(chunk_elems(1 << 30, 2, 32, 10_000, 1), 2560);
        assert_eq!(chunk_elems(1 << 30, 2, 32, 10, 1), BLOCK);
        // Row groups: whole rows and whole blocks (lcm(896, 256) = 1792).
        assert_eq!(chunk_elems(64 * 1024, 1, 32, 1 << 20, 896), 1792);
        assert_eq!(chunk_elems(1 << 30, 1, 32, 1 << 30, 896) % 1792, 0);
    }
}
