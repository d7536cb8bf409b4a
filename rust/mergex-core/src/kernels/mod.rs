//! Element-wise kernels: dtype conversion and the arithmetic shared by merge methods.

#[cfg(target_arch = "x86_64")]
mod avx512;
pub mod real;

use real::Real;

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

/// The inputs of a fused TIES output sub-block (`real::dispatch::ties_f32`): the models'
/// values (not yet task vectors), one weight and rescale factor per model, the base, whether
/// to normalize by the agreeing weights, and λ.
#[derive(Debug, Clone, Copy)]
pub struct TiesInputs<'a> {
    /// Each model's values over the sub-block.
    pub models: &'a [&'a [f32]],
    /// `w_i`.
    pub weights: &'a [f32],
    /// `s_i`.
    pub scales: &'a [f32],
    /// The base's values over the sub-block.
    pub base: &'a [f32],
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
