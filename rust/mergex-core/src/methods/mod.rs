//! Merge methods. Each method turns one output tensor's job into a [`TensorMerge`], which
//! the engine drives chunk by chunk: optional statistics passes, then the output pass.
//! Methods register in [`METHODS`], the one table the engine and the binding consult; each
//! declares its [`MethodSpec`] next to its builder.

mod arcee_fusion;
pub mod gram;
mod linear;
mod model_stock;
mod nearswap;
mod passthrough;
mod ram;
pub mod random;
mod sce;
pub mod select;
mod slerp;
pub mod sparsify;
pub mod spec;
mod sphere;
mod task_vector;

use std::path::Path;

use crate::engine::job::TensorJob;
use crate::engine::reduce::{fold, ExactSum, BLOCK};
use crate::error::{Error, Result};
use crate::format::dtype::Dtype;
use crate::kernels::real::{Raw, Real};
pub use spec::{BaseUse, MethodSpec};

/// What one chunk of an output tensor reads: the same element range of every input,
/// decoded to the working precision. Methods may overwrite the models' buffers in place
/// (they are re-read for every pass).
#[derive(Debug)]
pub struct ChunkInputs<'a, T> {
    /// Flat index of the first element.
    pub start: u64,
    /// The base model's values, when the method uses a base.
    pub base: Option<&'a [T]>,
    /// The other models' values, in config order.
    pub models: Vec<&'a mut [T]>,
    /// Every input's stored bytes over the same elements, the base first when there is one,
    /// when they are not decoded (else empty).
    pub stored: Vec<Raw<'a>>,
    /// Whether `base` and `models` hold the decoded values; when the method said it
    /// [takes the stored bytes](TensorMerge::takes_stored), they are empty.
    pub decoded: bool,
}

impl<T: Real> ChunkInputs<'_, T> {
    /// The stored inputs decoded, `n` values each: the base (when there is one), then the
    /// models, for [`ChunkInputs::with_decoded`].
    pub fn decode_stored(&self, n: usize) -> Vec<Vec<T>> {
        let decode = |r: &Raw<'_>| {
            let mut v = vec![T::ZERO; n];
            crate::kernels::real::dispatch::decode(r.dtype, r.bytes, &mut v);
            v
        };
        self.stored.iter().map(decode).collect()
    }

    /// Inputs over the same elements holding `values` (from [`ChunkInputs::decode_stored`]).
    pub fn with_decoded<'v>(&self, values: &'v mut [Vec<T>]) -> ChunkInputs<'v, T> {
        let (base, models): (Option<&[T]>, &mut [Vec<T>]) = if self.base.is_some() {
            match values.split_first_mut() {
                Some((b, rest)) => (Some(&b[..]), rest),
                None => (None, &mut []),
            }
        } else {
            (None, values)
        };
        let models = models.iter_mut().map(|m| &mut m[..]).collect();
        ChunkInputs { start: self.start, base, models, stored: Vec::new(), decoded: true }
    }

    /// Replace the models' values by their task vectors `x_i − b`, when there is a base.
    #[inline(always)]
    pub fn to_deltas(&mut self) {
        let Some(base) = self.base else { return };
        for m in self.models.iter_mut() {
            for (v, &b) in m.iter_mut().zip(base) {
                *v = *v - b;
            }
        }
    }
}

/// Partial statistics of a pass, accumulated per worker and merged at the end of the pass.
/// Every field merges exactly (exact sums, integer counts, collections sorted before use),
/// so the result does not depend on chunking, threads or completion order.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Exact sums (norms, dot products, …), method-defined meaning per slot.
    pub sums: Vec<ExactSum>,
    /// Histograms per slot (allocated on first use).
    pub hists: Vec<Vec<u64>>,
    /// Collected pairs per slot (candidates, per-chunk counts).
    pub items: Vec<Vec<(u64, u64)>>,
    /// Collected candidates packed in one word per slot, `key << 32 | index` (32-bit keys
    /// of tensors under 2^32 elements: half the memory of a pair), as each worker's list:
    /// merging keeps the lists apart, since appending one to another copied half of a
    /// pass's candidates, and their order does not matter (they are counted or sorted).
    pub packed: Vec<Vec<Vec<u64>>>,
    /// Slots whose collection outgrew its cap and was given up.
    pub overflow: Vec<bool>,
    /// Counts per slot (elements under a selection's band).
    pub counts: Vec<u64>,
}

impl Stats {
    /// Fold `other` into `self`.
    pub fn merge(mut self, other: Stats) -> Stats {
        if self.sums.len() < other.sums.len() {
            self.sums.resize(other.sums.len(), ExactSum::default());
        }
        for (a, b) in self.sums.iter_mut().zip(&other.sums) {
            a.merge(b);
        }
        if self.hists.len() < other.hists.len() {
            self.hists.resize(other.hists.len(), Vec::new());
        }
        for (a, b) in self.hists.iter_mut().zip(other.hists) {
            if a.is_empty() {
                *a = b;
            } else {
                for (x, y) in a.iter_mut().zip(&b) {
                    *x += y;
                }
            }
        }
        append_lists(&mut self.items, other.items);
        if self.packed.len() < other.packed.len() {
            self.packed.resize_with(other.packed.len(), Vec::new);
        }
        for (a, b) in self.packed.iter_mut().zip(other.packed) {
            a.retain(|list| !list.is_empty());
            a.extend(b.into_iter().filter(|list| !list.is_empty()));
        }
        if self.overflow.len() < other.overflow.len() {
            self.overflow.resize(other.overflow.len(), false);
        }
        for (a, b) in self.overflow.iter_mut().zip(other.overflow) {
            *a |= b;
        }
        if self.counts.len() < other.counts.len() {
            self.counts.resize(other.counts.len(), 0);
        }
        for (a, b) in self.counts.iter_mut().zip(other.counts) {
            *a += b;
        }
        self
    }

    /// The exact sum in slot `i`.
    pub fn sum(&mut self, i: usize) -> &mut ExactSum {
        if self.sums.len() <= i {
            self.sums.resize(i + 1, ExactSum::default());
        }
        &mut self.sums[i]
    }

    /// Slots `i` and `i + 1` of [`Stats::sums`] at once.
    pub fn sum_pair(&mut self, i: usize) -> (&mut ExactSum, &mut ExactSum) {
        self.sum(i + 1);
        let (a, b) = self.sums.split_at_mut(i + 1);
        (&mut a[i], &mut b[0])
    }

    /// The histogram of slot `i`, allocated with [`select::BINS`] bins on first use.
    pub fn hist(&mut self, i: usize) -> &mut Vec<u64> {
        if self.hists.len() <= i {
            self.hists.resize(i + 1, Vec::new());
        }
        let h = &mut self.hists[i];
        if h.is_empty() {
            h.resize(select::BINS, 0);
        }
        h
    }

    /// The collected pairs of slot `i`.
    pub fn items(&mut self, i: usize) -> &mut Vec<(u64, u64)> {
        if self.items.len() <= i {
            self.items.resize(i + 1, Vec::new());
        }
        &mut self.items[i]
    }

    /// The first list of packed candidates of slot `i` (see [`Stats::packed`]): a worker's
    /// own, which it pushes to.
    pub fn packed(&mut self, i: usize) -> &mut Vec<u64> {
        if self.packed.len() <= i {
            self.packed.resize_with(i + 1, Vec::new);
        }
        let lists = &mut self.packed[i];
        if lists.is_empty() {
            lists.push(Vec::new());
        }
        &mut lists[0]
    }

    /// Take the lists of packed candidates of slot `i`.
    pub fn take_packed(&mut self, i: usize) -> Vec<Vec<u64>> {
        self.packed.get_mut(i).map(std::mem::take).unwrap_or_default()
    }

    /// The count of slot `i`.
    pub fn count(&mut self, i: usize) -> &mut u64 {
        if self.counts.len() <= i {
            self.counts.resize(i + 1, 0);
        }
        &mut self.counts[i]
    }

    /// Take the count of slot `i` (0 if never counted).
    pub fn take_count(&mut self, i: usize) -> u64 {
        self.counts.get_mut(i).map(std::mem::take).unwrap_or(0)
    }

    /// Whether slot `i`'s collection was given up (see [`Stats::set_overflow`]).
    pub fn overflowed(&self, i: usize) -> bool {
        self.overflow.get(i).copied().unwrap_or(false)
    }

    /// Mark slot `i`'s collection as given up: it outgrew its cap.
    pub fn set_overflow(&mut self, i: usize) {
        if self.overflow.len() <= i {
            self.overflow.resize(i + 1, false);
        }
        self.overflow[i] = true;
    }

    /// Move the histograms, pairs, packed candidates, counts and overflow marks of `slots`
    /// into a new `Stats` (at the same slot numbers); sums stay.
    pub fn take_slots(&mut self, slots: std::ops::Range<usize>) -> Stats {
        let mut part = Stats::default();
        for i in slots {
            if let Some(h) = self.hists.get_mut(i) {
                part.hists.resize(i + 1, Vec::new());
                part.hists[i] = std::mem::take(h);
            }
            if let Some(v) = self.items.get_mut(i) {
                *part.items(i) = std::mem::take(v);
            }
            if let Some(v) = self.packed.get_mut(i) {
                part.packed.resize_with(i + 1, Vec::new);
                part.packed[i] = std::mem::take(v);
            }
            if self.overflowed(i) {
                part.set_overflow(i);
            }
            *part.count(i) = self.take_count(i);
        }
        part
    }

    /// Take the histogram of slot `i` (all zeros if never filled).
    pub fn take_hist(&mut self, i: usize) -> Vec<u64> {
        let h = self.hists.get_mut(i).map(std::mem::take).unwrap_or_default();
        if h.is_empty() {
            vec![0; select::BINS]
        } else {
            h
        }
    }

    /// Take the pairs of slot `i`.
    pub fn take_items(&mut self, i: usize) -> Vec<(u64, u64)> {
        self.items.get_mut(i).map(std::mem::take).unwrap_or_default()
    }

    /// The value of exact sum `i` (0 if never added to).
    pub fn total(&self, i: usize) -> f64 {
        self.sums.get(i).map(ExactSum::value).unwrap_or(0.0)
    }
}

/// Append each list of `other` to the same slot of `lists`, the shorter to the longer: a
/// pass's candidates move, not copy, when one worker holds them, and at most half are
/// copied otherwise (their order does not matter: they are sorted or counted before use).
fn append_lists<V>(lists: &mut Vec<Vec<V>>, other: Vec<Vec<V>>) {
    if lists.len() < other.len() {
        lists.resize_with(other.len(), Vec::new);
    }
    for (a, mut b) in lists.iter_mut().zip(other) {
        if b.len() > a.len() {
            std::mem::swap(a, &mut b);
        }
        a.extend(b);
    }
}

/// The per-tensor state of a method. The engine runs statistics passes while
/// [`TensorMerge::wants_pass`] says so, then one output pass.
pub trait TensorMerge<T: Real>: Send + Sync {
    /// Statistics passes expected before the output pass (for plans and progress); data
    /// may force more (see [`TensorMerge::wants_pass`]).
    fn planned_passes(&self) -> usize {
        0
    }

    /// Whether another statistics pass is needed now.
    fn wants_pass(&self) -> bool {
        false
    }

    /// Chunks must hold whole groups of this many elements (rows, for row-wise methods).
    fn align(&self) -> u64 {
        1
    }

    /// Element ranges to show [`TensorMerge::sample_chunk`] before the first pass (a small
    /// sample that lets later passes do less); none by default.
    fn sample_ranges(&self) -> Vec<(u64, u64)> {
        Vec::new()
    }

    /// Accumulate one sample range into `acc`.
    fn sample_chunk(&self, _x: &mut ChunkInputs<'_, T>, _acc: &mut Stats) -> Result<()> {
        Ok(())
    }

    /// Take the merged statistics of the sample.
    fn end_sample(&mut self, _stats: Stats) -> Result<()> {
        Ok(())
    }

    /// Accumulate one chunk's statistics of the current pass into `acc`.
    fn stat_chunk(&self, _x: &mut ChunkInputs<'_, T>, _acc: &mut Stats) -> Result<()> {
        Ok(())
    }

    /// Take the merged statistics of the pass just finished.
    fn end_pass(&mut self, _stats: Stats) -> Result<()> {
        Ok(())
    }

    /// Compute the output values of one chunk.
    fn merge_chunk(&self, x: &mut ChunkInputs<'_, T>, out: &mut [T]);

    /// Whether the chunks of the coming pass (a statistics pass while
    /// [`TensorMerge::wants_pass`], else the output pass) need only the inputs' stored bytes
    /// ([`ChunkInputs::stored`]), given their dtypes (the base first): then the engine does
    /// not decode them. The result must not depend on which it is.
    fn takes_stored(&self, dtypes: &[Dtype]) -> bool {
        let _ = dtypes;
        false
    }

    /// When the output is a plain weighted sum of the inputs, `out = Σ w_i x_i` (÷ d), the
    /// engine may compute it while decoding, without [`TensorMerge::merge_chunk`]; the
    /// result must be identical.
    fn weighted_sum(&self) -> Option<WeightedSum<T>> {
        None
    }
}

/// A weighted sum, accumulated in the working precision from zero, input by input in order:
/// `out = (Σ_i w_i x_i) / divisor` over every input; or, with `task = Some(λ)`, over the
/// task vectors of the non-base inputs, `out = b + ((Σ_i w_i (x_i − b)) / divisor) · λ`.
#[derive(Debug, Clone)]
pub struct WeightedSum<T> {
    /// One weight per summed input.
    pub weights: Vec<T>,
    /// Divide by this at the end, when set.
    pub divisor: Option<T>,
    /// Sum task vectors against the base (the first input) and add it back after scaling
    /// by this λ.
    pub task: Option<T>,
}

/// Everything a method may look at when it sets up one output tensor.
#[derive(Debug)]
pub struct TensorCtx<'a> {
    /// The tensor's job.
    pub job: &'a TensorJob,
    /// Model paths, for error messages.
    pub models: &'a [&'a Path],
    /// Random seed.
    pub seed: u64,
    /// RAM budget of the merge, for in-memory statistics.
    pub ram_budget: u64,
}

impl TensorCtx<'_> {
    /// A global parameter, which the planner must have resolved.
    pub fn global(&self, name: &str) -> Result<f64> {
        self.job.params.get(name).copied().ok_or_else(|| Error::InvalidParameter {
            name: name.into(),
            tensor: self.job.name.clone(),
            model: None,
            message: "missing".into(),
        })
    }

    /// A global flag (non-zero is true).
    pub fn flag(&self, name: &str) -> Result<bool> {
        Ok(self.global(name)? != 0.0)
    }

    /// A per-model parameter of the `i`-th non-base input.
    pub fn model_param(&self, i: usize, name: &str) -> Result<f64> {
        let input = self.job.inputs.get(i);
        input.and_then(|m| m.params.get(name).copied()).ok_or_else(|| Error::InvalidParameter {
            name: name.into(),
            tensor: self.job.name.clone(),
            model: input.and_then(|m| self.models.get(m.model)).map(|p| p.to_path_buf()),
            message: "missing".into(),
        })
    }

    /// An optional per-model parameter.
    pub fn model_param_opt(&self, i: usize, name: &str) -> Option<f64> {
        self.job.inputs.get(i).and_then(|m| m.params.get(name).copied())
    }

    /// An error about a parameter of this tensor.
    pub fn bad_param(&self, name: &str, message: impl Into<String>) -> Error {
        Error::InvalidParameter {
            name: name.into(),
            tensor: self.job.name.clone(),
            model: None,
            message: message.into(),
        }
    }
}

/// The registry: every method the engine runs, one line each (its spec sits beside its
/// builder, in the method's file).
pub static METHODS: &[&MethodSpec] = &[
    &linear::LINEAR,
    &task_vector::TASK_ARITHMETIC,
    &passthrough::PASSTHROUGH,
    &task_vector::TIES,
    &task_vector::DARE_TIES,
    &task_vector::DARE_LINEAR,
    &task_vector::BREADCRUMBS,
    &task_vector::BREADCRUMBS_TIES,
    &task_vector::DELLA,
    &task_vector::DELLA_LINEAR,
    &slerp::SLERP,
    &slerp::NUSLERP,
    &sphere::MULTISLERP,
    &sphere::KARCHER,
    &model_stock::MODEL_STOCK,
    &sce::SCE,
    &ram::RAM,
    &ram::RAMPLUS_TL,
    &nearswap::NEARSWAP,
    &arcee_fusion::ARCEE_FUSION,
];

/// Add `Σ |v|` (only where `keep` is true, when given) over one chunk's values to `acc`,
/// the chunk-invariant way of [`block_sum`] — the same lanes and order — written over slices
/// so that it vectorizes. Four blocks are summed side by side: each block's lanes still add
/// in index order, but the four chains of additions overlap instead of waiting on each other.
#[inline(always)]
pub(crate) fn reduce_abs<T: Real>(values: &[T], keep: Option<&[bool]>, acc: &mut ExactSum) {
    match keep {
        Some(keep) if keep.len() >= values.len() => reduce_abs_where::<T, true>(values, keep, acc),
        _ => reduce_abs_where::<T, false>(values, &[], acc),
    }
}

/// `|x|` where `k`, else +0, without a branch (so that the loops vectorize).
#[inline(always)]
fn abs_where(x: f64, k: bool) -> f64 {
    f64::from_bits(x.abs().to_bits() & u64::from(k).wrapping_neg())
}

/// [`reduce_abs`], with (`MASKED`, `keep` at least as long as `values`) or without a mask.
#[inline(always)]
fn reduce_abs_where<T: Real, const MASKED: bool>(values: &[T], keep: &[bool], acc: &mut ExactSum) {
    const B: usize = BLOCK as usize;
    const G: usize = 4;
    // f32 under AVX-512: whole groups of blocks in registers (the loop below compiles to
    // gathers there); the groups' sums are the same, in the same order.
    let done = T::as_f32s(values)
        .and_then(|v| {
            let each = &mut |l: &[f64; 8]| acc.add(fold(l));
            crate::kernels::real::dispatch::abs_block_sums_f32(v, MASKED.then_some(keep), each)
        })
        .unwrap_or(0);
    let values = values.get(done..).unwrap_or_default();
    let keep = if MASKED { keep.get(done..).unwrap_or_default() } else { keep };
    let mask8 = |i: usize| -> [bool; 8] {
        match keep.get(i..i + 8).and_then(|m| <[bool; 8]>::try_from(m).ok()) {
            Some(m) if MASKED => m,
            _ => [!MASKED; 8],
        }
    };
    let groups = values.chunks_exact(B * G);
    let at = values.len() - groups.remainder().len();
    for (g, group) in groups.enumerate() {
        let mut lanes = [[0f64; 8]; G];
        for step in (0..B).step_by(8) {
            for (blk, l) in lanes.iter_mut().enumerate() {
                let i = blk * B + step;
                let Some(x) = group.get(i..i + 8).and_then(|x| <&[T; 8]>::try_from(x).ok()) else { continue };
                let k = mask8(g * B * G + i);
                for ((l, x), &k) in l.iter_mut().zip(x).zip(&k) {
                    *l += abs_where(x.to_f64(), k);
                }
            }
        }
        for l in &lanes {
            acc.add(fold(l));
        }
    }
    // The last blocks (fewer than four, the last maybe short), one at a time.
    for (b, block) in values.get(at..).unwrap_or_default().chunks(B).enumerate() {
        let from = at + b * B;
        let mut lanes = [0f64; 8];
        for (j, x) in block.iter().enumerate() {
            let k = !MASKED || keep.get(from + j).copied().unwrap_or(false);
            lanes[j % 8] += abs_where(x.to_f64(), k);
        }
        acc.add(fold(&lanes));
    }
}

/// Look a method up by name.
pub fn find(name: &str) -> Option<&'static MethodSpec> {
    METHODS.iter().find(|m| m.name == name).copied()
}

/// Round a parameter to f32 (METHODS.md §0) and then to the working precision.
pub(crate) fn param<T: Real>(v: f64) -> T {
    T::from_f64(v as f32 as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::reduce::block_sum;

    #[test]
    fn reduce_abs_matches_block_sum() {
        // Lengths below, at and past whole groups of four blocks, and ragged tails.
        for n in [0usize, 7, 1000, 1024, 1025, 4096, 5000, 9999] {
            let v: Vec<f32> = (0..n).map(|i| ((i * 7919) % 211) as f32 / 13.0 - 8.0).collect();
            let keep: Vec<bool> = (0..n).map(|i| i % 3 != 0).collect();
            let mut a = ExactSum::default();
            reduce_abs(&v, Some(&keep), &mut a);
            let mut b = ExactSum::default();
            block_sum(v.iter().zip(&keep).map(|(&x, &k)| if k { (x as f64).abs() } else { 0.0 }), &mut b);
            assert_eq!(a.value().to_bits(), b.value().to_bits(), "{n}");
            let (mut c, mut d) = (ExactSum::default(), ExactSum::default());
            reduce_abs(&v, None, &mut c);
            block_sum(v.iter().map(|&x| (x as f64).abs()), &mut d);
            assert_eq!(c.value().to_bits(), d.value().to_bits(), "{n}");
            // f64 values over many magnitudes: the lanes' sums round, so their order shows.
            let w: Vec<f64> =
                (0..n).map(|i| ((i * 7919) % 211) as f64 * 10f64.powi((i % 23) as i32 - 11) / 3.0).collect();
            let (mut e, mut f) = (ExactSum::default(), ExactSum::default());
            reduce_abs(&w, Some(&keep), &mut e);
            block_sum(w.iter().zip(&keep).map(|(&x, &k)| if k { x.abs() } else { 0.0 }), &mut f);
            assert_eq!(e.value().to_bits(), f.value().to_bits(), "f64 {n}");
            // Signed zeros, subnormals, and NaNs where they are not kept (a kept NaN makes
            // any sum NaN): f32 values go through the AVX-512 form where the CPU has it.
            let keep: Vec<bool> = (0..n).map(|i| i % 13 != 0 && i % 3 != 0).collect();
            let odd: Vec<f32> = (0..n)
                .map(|i| match i {
                    _ if i % 13 == 0 => f32::NAN,
                    _ if i % 5 == 0 => -0.0,
                    _ if i % 11 == 0 => f32::MIN_POSITIVE / 3.0,
                    _ => ((i * 31) % 97) as f32 * -1e-3,
                })
                .collect();
            let (mut g, mut h) = (ExactSum::default(), ExactSum::default());
            reduce_abs(&odd, Some(&keep), &mut g);
            block_sum(odd.iter().zip(&keep).map(|(&x, &k)| if k { (x as f64).abs() } else { 0.0 }), &mut h);
            assert_eq!(g.value().to_bits(), h.value().to_bits(), "special {n}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// DARE's L1 sums from stored bf16 (where a build has them) are the decoded pass's:
        /// every block's lanes, in order, for values of any magnitude, and draws of any
        /// threshold, near a multiple of 2^32 too.
        #[test]
        fn dare_l1_from_stored_bf16_is_the_decoded_sum(
            pairs in proptest::collection::vec(
                (proptest::prop_oneof![0x0080u16..0x7f00, 0x3f80u16..0x5f80], 0u16..0x0400, proptest::bool::ANY),
                0..3000,
            ),
            stream in proptest::prelude::any::<u32>(),
            threshold in proptest::prop_oneof![proptest::strategy::Just(0u64), proptest::strategy::Just(1u64 << 32), 0u64..(1 << 32)],
            start in proptest::prop_oneof![proptest::strategy::Just(0u64), proptest::strategy::Just((1u64 << 32) - 1024)],
        ) {
            use crate::format::dtype::bf16_to_f32;
            use crate::kernels::real::dispatch::{dare_l1_bf16_at, Level};
            // Magnitudes from 2^-126 to 2^127, and many within 2^0..2^64 (where a lane's sum
            // rounds partly, so the order of its additions shows), either sign.
            let x: Vec<u16> = pairs.iter().map(|&(a, _, neg)| a | if neg { 0x8000 } else { 0 }).collect();
            let b: Vec<u16> = pairs.iter().map(|&(_, c, _)| c).collect();
            let bytes = |v: &[u16]| -> Vec<u8> { v.iter().flat_map(|h| h.to_le_bytes()).collect() };
            let delta: Vec<f32> = x.iter().zip(&b).map(|(&a, &c)| bf16_to_f32(a) - bf16_to_f32(c)).collect();
            let mut hashes = Vec::new();
            random::index_hashes(start, delta.len(), &mut hashes);
            let keep: Vec<bool> = hashes.iter().map(|&h| u64::from(random::mix(stream ^ h)) < threshold).collect();
            let (mut want_all, mut want_kept) = (ExactSum::default(), ExactSum::default());
            reduce_abs(&delta, None, &mut want_all);
            reduce_abs(&delta, Some(&keep), &mut want_kept);
            let mut ran = 0;
            for level in [Level::Avx2, Level::Avx512] {
                let (mut all_lanes, mut kept_lanes) = (Vec::new(), Vec::new());
                let done = dare_l1_bf16_at(
                    level,
                    &bytes(&x),
                    &bytes(&b),
                    &hashes,
                    (stream, threshold),
                    &mut |l| all_lanes.push(*l),
                    &mut |l| kept_lanes.push(*l),
                );
                if let Some(done) = done {
                    proptest::prop_assert_eq!(done, delta.len() / 1024 * 1024);
                    // Every block's lanes, bit for bit: lane `l` adds elements `l, l + 8, …`.
                    let lanes = |k: Option<&[bool]>| -> Vec<[f64; 8]> {
                        delta[..done]
                            .chunks(256)
                            .enumerate()
                            .map(|(blk, d)| {
                                let mut l = [0f64; 8];
                                for (j, &v) in d.iter().enumerate() {
                                    if k.is_none_or(|k| k[blk * 256 + j]) {
                                        l[j % 8] += (v as f64).abs();
                                    }
                                }
                                l
                            })
                            .collect()
                    };
                    let bits = |v: &[[f64; 8]]| -> Vec<u64> { v.iter().flatten().map(|x| x.to_bits()).collect() };
                    proptest::prop_assert_eq!(bits(&all_lanes), bits(&lanes(None)), "{:?}", level);
                    proptest::prop_assert_eq!(bits(&kept_lanes), bits(&lanes(Some(&keep))), "{:?}", level);
                    let (mut all, mut kept) = (ExactSum::default(), ExactSum::default());
                    for l in &all_lanes {
                        all.add(fold(l));
                    }
                    for l in &kept_lanes {
                        kept.add(fold(l));
                    }
                    reduce_abs(&delta[done..], None, &mut all);
                    reduce_abs(&delta[done..], Some(&keep[done..]), &mut kept);
                    proptest::prop_assert_eq!(all.value().to_bits(), want_all.value().to_bits());
                    proptest::prop_assert_eq!(kept.value().to_bits(), want_kept.value().to_bits());
                    ran += 1;
                }
            }
            #[cfg(target_arch = "x86_64")]
            proptest::prop_assert!(ran > 0 || !std::arch::is_x86_feature_detected!("avx2"), "no build ran");
        }
    }
}
