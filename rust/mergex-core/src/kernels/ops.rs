//! The operands and small kernels the methods and the SIMD builds share: selection bands,
//! top-k cuts and keep rules, TIES inputs, and the axpy loops.

use super::real::Real;

/// A selection band over f32 magnitude keys (`bits & 0x7fff_ffff`, see `methods::select`)
/// for a sweep of a sub-block: the keys from `lo_key` to `lo_key + span`, the sub-block's
/// first element being flat index `start`.
#[derive(Debug, Clone, Copy)]
pub struct Band {
    /// Flat index of the sub-block's first element.
    pub start: u64,
    /// The band's lowest key.
    pub lo_key: u32,
    /// Keys in the band above `lo_key`.
    pub span: u32,
}

/// Which of the elements whose key equals a top-k cut's key (`TopCut::at`) are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ties {
    /// None of them.
    None,
    /// All of them.
    All,
    /// Those whose ordinal (their count in index order over the tensor, the first of this
    /// range's being `next`) lies in `[lo, hi)`.
    Range {
        /// First kept ordinal.
        lo: u64,
        /// One past the last kept ordinal.
        hi: u64,
        /// Ordinal of the first tie at or after the range's start.
        next: u64,
    },
}

/// One model's resolved top-k cut over f32 magnitude keys (`methods::select::top_mask`):
/// keys above `at` are kept, and the ties at `at` as [`Ties`] says.
#[derive(Debug, Clone, Copy)]
pub struct TopCut {
    /// The cut's key (`bits & 0x7fff_ffff`).
    pub at: u32,
    /// The ties kept.
    pub ties: Ties,
}

/// What a fused TIES output keeps of each model's task vector: the top of the magnitudes
/// (a [`TopCut`] per model, each advanced past the ties it sees), or DARE's random draws
/// (`methods::random`): element `j` of model `i` is kept iff `mix(stream_i ^ hash(j)) <
/// threshold_i`, with `j` the flat index.
#[derive(Debug)]
pub enum Keep<'a> {
    /// One cut per model.
    Cuts(&'a mut [TopCut]),
    /// One draw per element and model.
    Draws {
        /// Flat index of the sub-block's first element.
        start: u64,
        /// `(stream, threshold)` per model (`threshold` is `floor(d · 2^32)`, up to 2^32).
        draws: &'a [(u32, u64)],
    },
}

impl Keep<'_> {
    /// Models it has a rule for.
    pub fn models(&self) -> usize {
        match self {
            Keep::Cuts(c) => c.len(),
            Keep::Draws { draws, .. } => draws.len(),
        }
    }
}

/// The values of a fused TIES output sub-block: the models' (not yet task vectors) and the
/// base's, decoded to f32 or as stored in bf16.
#[derive(Debug, Clone, Copy)]
pub enum TiesValues<'a> {
    /// Decoded values.
    F32 {
        /// Each model's values over the sub-block.
        models: &'a [&'a [f32]],
        /// The base's values over the sub-block.
        base: &'a [f32],
    },
    /// bf16 values as stored: little-endian, two bytes an element, any alignment.
    Bf16 {
        /// Each model's bytes over the sub-block.
        models: &'a [&'a [u8]],
        /// The base's bytes over the sub-block.
        base: &'a [u8],
    },
}

impl TiesValues<'_> {
    /// How many models there are.
    pub fn models(&self) -> usize {
        match self {
            TiesValues::F32 { models, .. } => models.len(),
            TiesValues::Bf16 { models, .. } => models.len(),
        }
    }
}

/// The models a fused TIES output sub-block handles at most (their weighted task vectors
/// are held in registers).
pub const TIES_MODELS: usize = 16;

/// A fused TIES sub-block's values as pointers, for the SIMD kernels: each model's, the
/// base's, whether they are bf16 as stored (else f32), how many models have values, weights,
/// scales and a keep rule (at most [`TIES_MODELS`]), and how many elements all of them and
/// the output hold.
#[cfg(target_arch = "x86_64")]
pub(super) struct TiesOperands {
    pub(super) models: [*const u8; TIES_MODELS],
    pub(super) base: *const u8,
    pub(super) bf16: bool,
    pub(super) count: usize,
    pub(super) n: usize,
}

#[cfg(target_arch = "x86_64")]
impl TiesOperands {
    pub(super) fn of(inputs: &TiesInputs<'_>, rules: usize, out: usize) -> TiesOperands {
        let mut models = [std::ptr::null::<u8>(); TIES_MODELS];
        let (count, base, bf16, n) = match inputs.values {
            TiesValues::F32 { models: xs, base } => {
                for (p, x) in models.iter_mut().zip(xs) {
                    *p = x.as_ptr().cast::<u8>();
                }
                let n = xs.iter().map(|x| x.len()).fold(out.min(base.len()), usize::min);
                (xs.len(), base.as_ptr().cast::<u8>(), false, n)
            }
            TiesValues::Bf16 { models: xs, base } => {
                for (p, x) in models.iter_mut().zip(xs) {
                    *p = x.as_ptr();
                }
                let n = xs.iter().map(|x| x.len() / 2).fold(out.min(base.len() / 2), usize::min);
                (xs.len(), base.as_ptr(), true, n)
            }
        };
        let count = count.min(rules).min(inputs.weights.len()).min(inputs.scales.len()).min(TIES_MODELS);
        TiesOperands { models, base, bf16, count, n }
    }
}

/// The magnitude key of element `at` of the task vector `x − base`, both bf16 as stored
/// (zero past either's end): the one-element tail of the SIMD band sweeps.
#[cfg(target_arch = "x86_64")]
pub(super) fn bf16_delta_key(x: &[u8], base: &[u8], at: usize) -> u32 {
    let get = |b: &[u8]| b.get(2 * at..2 * at + 2).map_or(0, |h| u16::from_le_bytes([h[0], h[1]]));
    let d = crate::format::dtype::bf16_to_f32(get(x)) - crate::format::dtype::bf16_to_f32(get(base));
    Real::mag_key(d) as u32
}

/// The inputs of a fused TIES output sub-block (`real::dispatch::ties_f32`): the values,
/// one weight and rescale factor per model, whether to normalize by the agreeing weights,
/// and λ.
#[derive(Debug, Clone, Copy)]
pub struct TiesInputs<'a> {
    /// The models' and the base's values.
    pub values: TiesValues<'a>,
    /// `w_i`.
    pub weights: &'a [f32],
    /// `s_i`.
    pub scales: &'a [f32],
    /// Divide by the sum of the agreeing weights.
    pub normalize: bool,
    /// λ.
    pub lambda: f32,
}

/// `acc[j] += w * x[j]`, multiply then add (no fused multiply-add), so the result matches
/// the reference arithmetic bit for bit.
#[inline]
pub fn axpy<T: Real>(acc: &mut [T], w: T, x: &[T]) {
    for (a, &v) in acc.iter_mut().zip(x) {
        *a += w * v;
    }
}

/// `acc[j] += w * (x[j] - b[j])`: a weighted task vector.
#[inline]
pub fn axpy_delta<T: Real>(acc: &mut [T], w: T, x: &[T], b: &[T]) {
    for ((a, &v), &base) in acc.iter_mut().zip(x).zip(b) {
        *a += w * (v - base);
    }
}
