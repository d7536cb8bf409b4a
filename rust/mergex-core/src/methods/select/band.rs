//! Locating a rank in a histogram, collecting a cut's ties, and the band sweep: the keys of
//! a sub-block that fall in a selection's band, counted and listed.

use crate::kernels::real::Real;

/// The bin of `hist` that holds ascending position `at` (counted from its first bin): the
/// bin, its count and the count of the bins before it; `(0, 0, 0)` when `at` is past the end.
pub(super) fn locate(hist: &[u64], at: u64) -> (u64, u64, u64) {
    let mut before = 0;
    for (bin, &c) in hist.iter().enumerate() {
        if at < before + c {
            return (bin as u64, c, before);
        }
        before += c;
    }
    (0, 0, 0)
}

/// The indices of the `count` packed candidates in `lists` whose key is `key`, in the lists'
/// order. Every candidate is written to the next free place and the place moves on only for
/// a tie: ties are many and interleaved with the other keys, and a branch on each cost more
/// than the counting sweep.
pub(super) fn ties_of(lists: &[Vec<u64>], key: u64, count: usize) -> Vec<u64> {
    let mut ties = vec![0u64; count + 1];
    let mut len = 0;
    for &p in lists.iter().flatten() {
        if let Some(slot) = ties.get_mut(len) {
            *slot = p & 0xffff_ffff;
        }
        len += usize::from(p >> 32 == key);
    }
    ties.truncate(len.min(count));
    ties
}

/// Unsigned keys of one width, for the vectorized sweeps.
pub(super) trait Lane: Copy + Ord {
    /// `self − other`, wrapping.
    fn minus(self, other: Self) -> Self;
}

impl Lane for u32 {
    #[inline(always)]
    fn minus(self, other: u32) -> u32 {
        self.wrapping_sub(other)
    }
}

impl Lane for u64 {
    #[inline(always)]
    fn minus(self, other: u64) -> u64 {
        self.wrapping_sub(other)
    }
}

/// One sub-block of a band's first pass: count the keys under `lo_key`, and (with `push`)
/// hand `(key, start + j)` of every element whose key is in `[lo_key, lo_key + span]` to
/// `push`, in index order. Two vectorized sweeps over the (cached) values: the band test
/// runs on blocks of lanes and only looks at single elements in the few blocks with a hit.
#[inline(always)]
pub(super) fn band_sweep<T: Real, K: Lane>(
    values: &[T],
    start: u64,
    lo_key: K,
    span: K,
    key: impl Fn(&T) -> K,
    push: Option<impl FnMut(K, u64)>,
) -> u64 {
    const LANES: usize = 16;
    // Counted in u32 per run of 2^16 (no widening in the inner loop).
    let under: u64 = values
        .chunks(1 << 16)
        .map(|c| c.iter().map(|v| u32::from(key(v) < lo_key)).sum::<u32>() as u64)
        .sum();
    let Some(mut push) = push else { return under };
    let in_band = |v: &T| key(v).minus(lo_key) <= span;
    let mut blocks = values.chunks_exact(LANES);
    for (c, block) in blocks.by_ref().enumerate() {
        let Ok(block) = <&[T; LANES]>::try_from(block) else { continue };
        // The lanes in the band as bits (a vector compare), then one push per bit.
        let mut hits = block.iter().enumerate().fold(0u32, |m, (j, v)| m | (u32::from(in_band(v)) << j));
        while hits != 0 {
            let j = hits.trailing_zeros() as usize;
            hits &= hits - 1;
            if let Some(v) = block.get(j) {
                push(key(v), start + (c * LANES + j) as u64);
            }
        }
    }
    let at = values.len() / LANES * LANES;
    for (j, v) in blocks.remainder().iter().enumerate() {
        if in_band(v) {
            push(key(v), start + (at + j) as u64);
        }
    }
    under
}
