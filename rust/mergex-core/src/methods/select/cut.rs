//! A resolved cut of a selection: the key at the rank, which of its ties are kept, and
//! where they are, with the masks and tests the output pass applies.

use super::band::Lane;
use crate::kernels::real::Real;
use crate::kernels::{Ties, TopCut};
use crate::methods::kernel::CutView;

/// Spacing of the coarse index of sorted ties.
pub(super) const COARSE: usize = 64;

/// How ties are located in the output pass.
#[derive(Debug, Clone)]
pub(super) enum TieIndex {
    /// Keep all ties or none: no ordinals needed.
    Unneeded,
    /// Sorted flat indices of every tie, and every [`COARSE`]-th of them (a small index
    /// that stays in cache: a lookup per sub-block must not miss it all the way down).
    Sorted(Vec<u64>, Vec<u64>),
    /// (chunk start, ties before it), sorted by chunk start.
    Prefix(Vec<(u64, u64)>),
}

/// A resolved cut.
#[derive(Debug, Clone)]
pub struct Cut {
    /// The key of the cut value.
    pub key: u64,
    /// Ordinals of the ties kept.
    pub keep: (u64, u64),
    /// Elements whose key equals `key`.
    pub eq: u64,
    pub(super) ties: TieIndex,
}

impl Cut {
    /// Ties (elements with key == `self.key`) before flat index `start`, which is a chunk
    /// start of the tensor.
    pub fn ties_before(&self, start: u64) -> u64 {
        match &self.ties {
            TieIndex::Unneeded => 0,
            TieIndex::Sorted(v, coarse) => {
                // Ties before `start` are at least (c−1)·COARSE + 1 and at most c·COARSE.
                let c = coarse.partition_point(|&i| i < start);
                let from = c.saturating_sub(1) * COARSE;
                let window = v.get(from..(c * COARSE).min(v.len())).unwrap_or_default();
                (from + window.partition_point(|&i| i < start)) as u64
            }
            TieIndex::Prefix(v) => {
                let i = v.partition_point(|&(s, _)| s <= start);
                i.checked_sub(1)
                    .and_then(|i| v.get(i))
                    .map(|&(s, c)| if s == start { c } else { 0 })
                    .unwrap_or(0)
            }
        }
    }

    /// The cut as a kernel of another engine takes it, whose chunks start at `starts`.
    pub fn view(&self, starts: &[u64]) -> CutView {
        let ties_before = if self.all_or_none() {
            Vec::new()
        } else {
            starts.iter().map(|&s| self.ties_before(s)).collect()
        };
        CutView { key: self.key, keep: self.keep, eq: self.eq, ties_before }
    }

    /// Whether every tie is kept, or none: ordinals do not matter.
    pub fn all_or_none(&self) -> bool {
        matches!(self.ties, TieIndex::Unneeded)
    }

    /// The cut as the fused TIES kernel takes it (f32 keys), for a chunk starting at flat
    /// index `start`: what [`top_mask`] keeps.
    pub fn top_cut_f32(&self, start: u64) -> TopCut {
        let at = u32::try_from(self.key).unwrap_or(u32::MAX);
        let ties = match (self.all_or_none(), self.keep) {
            (true, (lo, hi)) if hi > lo => Ties::All,
            (true, _) => Ties::None,
            (false, (lo, hi)) => Ties::Range { lo, hi, next: self.ties_before(start) },
        };
        TopCut { at, ties }
    }
}

/// The keep mask of a top-k cut (`keep`, cleared first) over the values of a chunk that
/// starts at flat index `start`: the keys above the cut, and the ties at it whose ordinals
/// are kept.
#[inline(always)]
pub fn top_mask<T: Real>(cut: &Cut, start: u64, values: &[T], keep: &mut Vec<bool>) {
    keep.clear();
    if T::KEY_BITS <= 32 {
        let at = u32::try_from(cut.key).unwrap_or(u32::MAX);
        top_mask_lanes(cut, at, start, values, |v: &T| v.mag_key() as u32, keep);
    } else {
        top_mask_lanes(cut, cut.key, start, values, |v: &T| v.mag_key(), keep);
    }
}

#[inline(always)]
fn top_mask_lanes<T: Real, K: Lane>(
    cut: &Cut,
    at: K,
    start: u64,
    values: &[T],
    key: impl Fn(&T) -> K,
    keep: &mut Vec<bool>,
) {
    if cut.all_or_none() {
        // One comparison per element, which vectorizes.
        if cut.keep.1 > cut.keep.0 {
            keep.extend(values.iter().map(|v| key(v) >= at));
        } else {
            keep.extend(values.iter().map(|v| key(v) > at));
        }
        return;
    }
    // Ordinals at the cut: first the comparison (vectorized), then a second sweep that
    // finds the ties in blocks of lanes (a vector compare) and visits only them.
    const LANES: usize = 16;
    keep.extend(values.iter().map(|v| key(v) > at));
    let (lo, hi) = cut.keep;
    let mut ordinal = cut.ties_before(start);
    for (ks, vs) in keep.chunks_mut(LANES).zip(values.chunks(LANES)) {
        // The lanes at the cut as bits, visited in index order; most blocks have none, which
        // a vector compare and one test tell (half the time of building every block's bits).
        if !vs.iter().fold(false, |a, v| a | (key(v) == at)) {
            continue;
        }
        let mut ties = vs.iter().enumerate().fold(0u32, |m, (j, v)| m | (u32::from(key(v) == at) << j));
        // Only the block where the kept ordinals start or end keeps some of its ties: the
        // others keep all or none, which two predictable tests tell (visiting the ties one
        // by one mispredicted wherever a block held a tie).
        let seen = ordinal + u64::from(ties.count_ones());
        if seen <= lo || ordinal >= hi {
            ordinal = seen;
            continue;
        }
        if ordinal >= lo && seen <= hi {
            for (j, k) in ks.iter_mut().enumerate() {
                *k |= ties >> j & 1 == 1;
            }
            ordinal = seen;
            continue;
        }
        while ties != 0 {
            let j = ties.trailing_zeros() as usize;
            ties &= ties - 1;
            if let Some(k) = ks.get_mut(j) {
                *k = ordinal >= lo && ordinal < hi;
            }
            ordinal += 1;
        }
    }
}

/// Keep decision for one element against a resolved cut, given its tie ordinal counter.
#[inline]
pub fn passes(cut: &Cut, key: u64, ordinal: &mut u64, above: bool) -> bool {
    if key == cut.key {
        let o = *ordinal;
        *ordinal += 1;
        o >= cut.keep.0 && o < cut.keep.1
    } else if above {
        key > cut.key
    } else {
        key < cut.key
    }
}
