//! Exact rank selection over tensors larger than memory: which magnitude sits at a given
//! rank, found by radix passes over the chunks (16 bits of the order-preserving magnitude
//! key per pass), finished in memory once the candidates fit, with ties at the cut broken
//! by flat index.
//!
//! A small sample read before the first pass narrows where the cut should fall: the first
//! pass then counts the elements under a band of level-0 bins around it and gathers those in
//! it, and when the rank falls among them (and they fitted in memory) the selection finishes
//! after that one pass; else the radix passes follow. The sample only decides how much work
//! is done, never the result.

mod band;
mod cut;

use self::band::{band_sweep, locate, ties_of};
pub use self::cut::{passes, top_mask, Cut};
use self::cut::{TieIndex, COARSE};
use super::kernel::Collect;
use super::stats::Stats;
use crate::kernels::real::Real;
use std::sync::atomic::{AtomicU64, Ordering};

/// Keys of a band (above its first) under which its candidates may be counted key by key
/// (`Selector::finish_packed`): 32 bins, 8 MiB of counts.
const DIRECT_KEYS: u64 = 1 << 21;
pub use super::stats::BINS;
const LEVEL_BITS: u32 = 16;

/// The sample: up to this many ranges, spread evenly over the tensor…
const SAMPLE_RANGES: u64 = 64;
/// …of this many elements each.
const SAMPLE_LEN: u64 = 1024;

/// Element ranges `(start, len)` of the sample of a tensor of `n` elements: the whole
/// tensor when it is small, else `SAMPLE_RANGES` ranges starting at `⌊j·n / SAMPLE_RANGES⌋`.
pub fn sample_ranges(n: u64) -> Vec<(u64, u64)> {
    if n <= SAMPLE_RANGES * SAMPLE_LEN {
        return if n == 0 { Vec::new() } else { vec![(0, n)] };
    }
    (0..SAMPLE_RANGES).map(|j| ((j as u128 * n as u128 / SAMPLE_RANGES as u128) as u64, SAMPLE_LEN)).collect()
}

/// Sample ranks on either side of the expected position of the cut that the band spans:
/// 3.5 standard deviations of a binomial sample quantile (a miss costs one more pass, and
/// comes about once in 2,000 cuts), plus 1/1024 of the sample for samples of correlated
/// neighbours (ranges of adjacent elements), plus two.
fn band_halfwidth(s: u64, q: f64) -> f64 {
    3.5 * (s as f64 * q * (1.0 - q)).sqrt() + s as f64 / 1024.0 + 2.0
}

/// Candidates gathered in the band so far, by all workers of a pass.
#[derive(Debug, Default)]
struct Gathered(AtomicU64);

impl Clone for Gathered {
    fn clone(&self) -> Gathered {
        Gathered(AtomicU64::new(self.0.load(Ordering::Relaxed)))
    }
}

/// Which ties at the cut value a selection keeps, as an interval of tie ordinals: the
/// `i`-th element (in flat-index order) whose key equals the cut value has ordinal `i`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Keep elements at or above ascending rank `r`, ties ordered by index (breadcrumbs'
    /// lower cut): ordinals `[r − below, eq)`.
    Lower,
    /// Keep elements at or below ascending rank `r`, ties ordered by index (breadcrumbs'
    /// upper cut): ordinals `[0, r − below + 1)`.
    Upper,
    /// Keep the elements above ascending rank `r` in magnitude, the lowest indices first
    /// among ties (the TIES top-k with `r = n − k`): ordinals `[0, eq − (r − below))`.
    TopK,
    /// Only the value at the rank matters (quantiles): no tie bookkeeping.
    Value,
}

#[derive(Debug, Clone)]
enum State {
    /// Histogram the next 16 bits of the keys that start with `prefix`.
    Radix {
        level: u32,
        prefix: u64,
        below: u64,
    },
    /// Collect (key, index) of every element whose key starts with `prefix`.
    Gather {
        level: u32,
        prefix: u64,
        below: u64,
    },
    /// Count the ties at `cut.key` per chunk.
    Ties {
        cut: Cut,
    },
    Done(Cut),
}

/// Finds the key at one ascending rank of a tensor's magnitudes.
#[derive(Debug, Clone)]
pub struct Selector {
    rank: u64,
    side: Side,
    key_bits: u32,
    /// Largest candidate set gathered in memory.
    gather_cap: u64,
    /// Level-0 bins (inclusive) whose elements the first pass also gathers.
    band: Option<(u64, u64)>,
    /// The band's candidates are packed (`key << 32 | index`, see [`Stats::packed`]): keys
    /// of at most 32 bits in a tensor of at most 2^32 elements.
    pack: bool,
    gathered: Gathered,
    state: State,
}

impl Selector {
    /// Select ascending rank `rank` (0-based) of keys `key_bits` wide.
    pub fn new(rank: u64, side: Side, key_bits: u32, gather_cap: u64) -> Selector {
        debug_assert!(
            key_bits.is_multiple_of(LEVEL_BITS) && key_bits <= 64,
            "keys are 16, 32, 48 or 64 bits"
        );
        Selector {
            rank,
            side,
            key_bits,
            gather_cap,
            band: None,
            pack: false,
            gathered: Gathered::default(),
            state: State::Radix { level: 0, prefix: 0, below: 0 },
        }
    }

    /// Whether a sample can save passes: the first pass has not run yet, and the band that
    /// a sample of a tensor of `n` elements would give is expected to fit in memory.
    pub fn wants_sample(&self, n: u64) -> bool {
        let first = matches!(self.state, State::Radix { level: 0, .. }) && self.band.is_none();
        first && self.key_bits > LEVEL_BITS && {
            let s = sample_ranges(n).iter().map(|r| r.1).sum::<u64>().max(1);
            let q = self.rank as f64 / n.max(1) as f64;
            let share = (2.0 * band_halfwidth(s, q) + 1.0) / s as f64;
            share * (n as f64) <= self.gather_cap as f64
        }
    }

    /// Collect the keys of one sample range into slot `slot` of `acc`.
    pub fn sample(&self, slot: usize, keys: impl Iterator<Item = u64>, acc: &mut Stats) {
        acc.items(slot).extend(keys.map(|k| (k, 0)));
    }

    /// Set the first pass's band from the merged sample (slot `slot`) of a tensor of `n`
    /// elements: the level-0 bins between the sample keys `band_halfwidth` ranks either
    /// side of where the cut's rank falls in the sample; no band when the sample suggests
    /// the band holds more elements than fit in memory.
    pub fn plan_band(&mut self, slot: usize, n: u64, stats: &mut Stats) {
        let mut keys: Vec<u64> = stats.take_items(slot).into_iter().map(|(k, _)| k).collect();
        let s = keys.len() as u64;
        if s == 0 || n == 0 {
            return;
        }
        let q = self.rank as f64 / n as f64;
        let (at, half) = (q * s as f64, band_halfwidth(s, q));
        let (lo, hi) = ((at - half).floor(), (at + half).ceil());
        let shift = self.shift(0);
        // The sample keys at ranks `lo` and `hi` (linear-time selection, no full sort); once
        // `hi` is in place, rank `lo` is among the keys before it.
        let mut upto = keys.len();
        let mut ranked = |r: f64| {
            let r = r as usize;
            let part = keys.get_mut(..upto).unwrap_or_default();
            if r < part.len() {
                part.select_nth_unstable(r);
            }
            upto = r;
            part.get(r).map(|&k| k >> shift)
        };
        let hi_bin = if hi >= (s - 1) as f64 { 0xffff } else { ranked(hi).unwrap_or(0xffff) };
        let lo_bin = if lo <= 0.0 { 0 } else { ranked(lo).unwrap_or(0) };
        let inside = keys.iter().filter(|&&k| (lo_bin..=hi_bin).contains(&(k >> shift))).count() as u64;
        // The band's expected size, from its share of the sample.
        if (inside as u128) * (n as u128) <= (self.gather_cap as u128) * (s as u128) {
            self.band = Some((lo_bin, hi_bin));
            self.pack = self.key_bits <= 32 && n <= 1 << 32;
        }
    }

    /// Still needs a pass over the data.
    pub fn pending(&self) -> bool {
        !matches!(self.state, State::Done(_))
    }

    /// The cut, once resolved.
    pub fn cut(&self) -> Option<&Cut> {
        match &self.state {
            State::Done(c) => Some(c),
            _ => None,
        }
    }

    /// This pass's work on the keys, for a kernel of another engine ([`Selector::collect`]
    /// as data), into slot `slot`; none once resolved.
    pub fn describe(&self, slot: usize) -> Option<Collect> {
        Some(match &self.state {
            State::Radix { level: 0, .. } if self.band.is_some() => {
                let (lo, hi) = self.band.unwrap_or((0, 0));
                let (lo_key, span) = self.band_keys(lo, hi);
                Collect::Band { slot, lo_key, span, pack: self.pack, cap: self.gather_cap }
            }
            State::Radix { level, prefix, .. } => {
                Collect::Hist { slot, shift: self.shift(*level), prefix: (*level > 0).then_some(*prefix) }
            }
            State::Gather { level, prefix, .. } => {
                Collect::Gather { slot, shift: self.shift(level - 1), prefix: *prefix }
            }
            State::Ties { cut } => Collect::Ties { slot, key: cut.key },
            State::Done(_) => return None,
        })
    }

    fn shift(&self, level: u32) -> u32 {
        self.key_bits - LEVEL_BITS * (level + 1)
    }

    /// Collect this pass's statistics from the keys of one chunk starting at `start`,
    /// into slot `slot` of `acc`.
    #[inline(always)]
    pub fn collect(&self, slot: usize, start: u64, keys: impl Iterator<Item = u64>, acc: &mut Stats) {
        match &self.state {
            State::Radix { level, prefix, .. } => {
                let shift = self.shift(*level);
                if let (0, Some((lo, hi))) = (*level, self.band) {
                    // One sweep ([`Selector::collect_values`] has the vectorized form).
                    let over = self.band_full();
                    let (mut under, mut added) = (0, 0);
                    for (j, k) in keys.enumerate() {
                        let bin = (k >> shift) & 0xffff;
                        if bin < lo {
                            under += 1;
                        } else if !over && bin - lo <= hi - lo {
                            let i = start + j as u64;
                            if self.pack {
                                acc.packed(slot).push(k << 32 | i);
                            } else {
                                acc.items(slot).push((k, i));
                            }
                            added += 1;
                        }
                    }
                    *acc.count(slot) += under;
                    self.band_added(slot, added, over, acc);
                    return;
                }
                let Ok(hist) = <&mut [u64; BINS]>::try_from(acc.hist(slot).as_mut_slice()) else { return };
                // The bin index is masked to 16 bits, so indexing the fixed-size array
                // needs no bounds check; the first level (most passes) has no prefix test.
                if *level == 0 {
                    for k in keys {
                        hist[((k >> shift) & 0xffff) as usize] += 1;
                    }
                } else {
                    for k in keys {
                        if (k >> (shift + LEVEL_BITS)) == *prefix {
                            hist[((k >> shift) & 0xffff) as usize] += 1;
                        }
                    }
                }
            }
            State::Gather { level, prefix, .. } => {
                let shift = self.shift(level - 1);
                let items = acc.items(slot);
                for (j, k) in keys.enumerate() {
                    if k >> shift == *prefix {
                        items.push((k, start + j as u64));
                    }
                }
            }
            State::Ties { cut } => {
                let n = keys.filter(|&k| k == cut.key).count() as u64;
                acc.items(slot).push((start, n));
            }
            State::Done(_) => {}
        }
    }

    /// Collect this pass's statistics from the magnitudes of `values`, a chunk starting at
    /// `start` (as [`Selector::collect`] with their keys).
    #[inline(always)]
    pub fn collect_values<T: Real>(&self, slot: usize, start: u64, values: &[T], acc: &mut Stats) {
        match (&self.state, self.band) {
            (State::Radix { level: 0, .. }, Some(band)) => self.collect_band(slot, start, band, values, acc),
            _ => self.collect(slot, start, values.iter().map(|v| v.mag_key()), acc),
        }
    }

    /// The first pass with a band: the elements under the band counted and every element
    /// whose bin is in the band gathered, unless all workers' candidates together outgrow
    /// the cap: then the band is given up ([`Stats::overflow`]) and its candidates dropped,
    /// so memory stays within the cap plus one sub-block per worker.
    #[inline(always)]
    fn collect_band<T: Real>(
        &self,
        slot: usize,
        start: u64,
        (lo, hi): (u64, u64),
        values: &[T],
        acc: &mut Stats,
    ) {
        // The band's bins as a range of keys: `lo_key` and the `span` keys above it.
        let (lo_key, span) = self.band_keys(lo, hi);
        let over = self.band_full();
        // f32 keys fit in 32 bits: twice the lanes of a 64-bit compare, and (packed) half
        // the memory per candidate. Unpacked candidates (tensors over 2^32 elements) take
        // the 64-bit sweep.
        let (under, added) = if T::KEY_BITS <= 32 && (over || self.pack) {
            let key = |v: &T| v.mag_key() as u32;
            let (lo_key, span) = (lo_key as u32, span as u32);
            if over {
                (band_sweep(values, start, lo_key, span, key, None::<fn(u32, u64)>), 0)
            } else {
                let packed = acc.packed(slot);
                let before = packed.len();
                let fast = T::as_f32s(values).and_then(|v| {
                    let band = crate::kernels::Band { start, lo_key, span };
                    crate::kernels::dispatch::band_sweep_f32(v, band, packed)
                });
                let under = match fast {
                    Some(under) => under,
                    None => {
                        let push = |k: u32, i: u64| packed.push(u64::from(k) << 32 | i);
                        band_sweep(values, start, lo_key, span, key, Some(push))
                    }
                };
                (under, packed.len() - before)
            }
        } else {
            let key = |v: &T| v.mag_key();
            if over {
                (band_sweep(values, start, lo_key, span, key, None::<fn(u64, u64)>), 0)
            } else {
                let items = acc.items(slot);
                let before = items.len();
                let under = band_sweep(values, start, lo_key, span, key, Some(|k, i| items.push((k, i))));
                (under, items.len() - before)
            }
        };
        *acc.count(slot) += under;
        self.band_added(slot, added as u64, over, acc);
    }

    /// Whether this pass sweeps a band for packed candidates (the first pass after a
    /// sample), which [`Selector::collect_stored_bf16`] can do from stored bf16 values.
    pub fn sweeps_band(&self) -> bool {
        matches!(self.state, State::Radix { level: 0, .. }) && self.band.is_some() && self.pack
    }

    /// [`Selector::collect_values`] in the band's pass ([`Selector::sweeps_band`]) over the
    /// task vector `x − base` of bf16 values as stored, in the build that has that sweep
    /// (`dispatch::band_sweep_bf16`); the same statistics as from the decoded differences.
    pub fn collect_stored_bf16(&self, slot: usize, start: u64, x: &[u8], base: &[u8], acc: &mut Stats) {
        let Some((lo, hi)) = self.band.filter(|_| self.sweeps_band()) else { return };
        let (lo_key, span) = self.band_keys(lo, hi);
        let (lo_key, span) = (lo_key as u32, span as u32);
        // Past the cap the candidates are dropped below, as the decoded sweep drops them.
        let over = self.band_full();
        let packed = acc.packed(slot);
        let before = packed.len();
        let band = crate::kernels::Band { start, lo_key, span };
        let under = crate::kernels::dispatch::band_sweep_bf16(x, base, band, packed);
        let added = packed.len() - before;
        *acc.count(slot) += under.unwrap_or(0);
        self.band_added(slot, added as u64, over, acc);
    }

    /// Whether the band's candidates already outgrew the cap (all workers together).
    fn band_full(&self) -> bool {
        self.gathered.0.load(Ordering::Relaxed) > self.gather_cap
    }

    /// Count the `added` candidates a sub-block gathered into slot `slot`; once all
    /// workers' candidates outgrow the cap, drop them and mark the slot.
    fn band_added(&self, slot: usize, added: u64, over: bool, acc: &mut Stats) {
        if over || self.gathered.0.fetch_add(added, Ordering::Relaxed) + added > self.gather_cap {
            *acc.items(slot) = Vec::new();
            *acc.packed(slot) = Vec::new();
            acc.set_overflow(slot);
        }
    }

    /// Take the merged statistics of a pass.
    pub fn advance(&mut self, slot: usize, stats: &mut Stats) {
        let state = std::mem::replace(&mut self.state, State::Radix { level: 0, prefix: 0, below: 0 });
        self.state = match state {
            State::Radix { level: 0, .. } if self.band.is_some() => {
                let band = self.band.take();
                // The band's pass: the cut is in the band when the rank falls among its
                // candidates; then they resolve it exactly. Else (a misleading sample, or
                // candidates beyond the cap) a histogram pass follows, as without a band.
                let (items, packed) = (stats.take_items(slot), stats.take_packed(slot));
                let under = stats.take_count(slot);
                let gathered = (items.len() + packed.iter().map(Vec::len).sum::<usize>()) as u64;
                let hit = under <= self.rank && self.rank - under < gathered;
                if hit && !stats.overflowed(slot) {
                    if self.pack {
                        let keys = band.map(|(lo, hi)| self.band_keys(lo, hi));
                        self.finish_packed(packed, under, keys)
                    } else {
                        self.finish_gather(items, under)
                    }
                } else {
                    State::Radix { level: 0, prefix: 0, below: 0 }
                }
            }
            State::Radix { level, prefix, below } => {
                let (bin, count, before) = locate(&stats.take_hist(slot), self.rank.saturating_sub(below));
                let below = below + before;
                let prefix = (prefix << LEVEL_BITS) | bin;
                let next = level + 1;
                if LEVEL_BITS * next >= self.key_bits {
                    self.resolve(prefix, below, count)
                } else if count <= self.gather_cap {
                    State::Gather { level: next, prefix, below }
                } else {
                    State::Radix { level: next, prefix, below }
                }
            }
            State::Gather { below, .. } => self.finish_gather(stats.take_items(slot), below),
            State::Ties { mut cut } => {
                let mut counts = stats.take_items(slot);
                counts.sort_unstable();
                let mut before = 0;
                let prefix = counts
                    .into_iter()
                    .map(|(start, n)| {
                        let p = (start, before);
                        before += n;
                        p
                    })
                    .collect();
                cut.ties = TieIndex::Prefix(prefix);
                State::Done(cut)
            }
            done @ State::Done(_) => done,
        };
    }

    /// Every candidate `(key, index)` is in `items` (`below` elements rank under them): the
    /// cut and the sorted indices of its ties.
    fn finish_gather(&self, items: Vec<(u64, u64)>, below: u64) -> State {
        self.finish_from(items, below, |&(k, _)| k, |&(_, i)| i)
    }

    /// [`Selector::finish_gather`] with packed candidates (`key << 32 | index`), in the
    /// lists the workers collected.
    ///
    /// When the band's keys (`lo_key` and the `span` above it) are few enough, one counting
    /// pass over the candidates gives the cut and the count under it at full resolution
    /// (the radix select sweeps them three times); then one more collects the ties. The
    /// counts (4 bytes a key, at most two keys per candidate the cap allows) and the packed
    /// candidates (8 bytes) stay within the 16 bytes a candidate the cap is sized for.
    fn finish_packed(&self, mut lists: Vec<Vec<u64>>, below: u64, band: Option<(u64, u64)>) -> State {
        let at = self.rank - below;
        let few = |&(_, span): &(u64, u64)| span < DIRECT_KEYS && span < 2 * self.gather_cap;
        if let Some((lo_key, span)) = band.filter(few) {
            let mut counts = vec![0u32; span as usize + 1];
            let mut inside = true;
            for &p in lists.iter().flatten() {
                match (p >> 32).checked_sub(lo_key).and_then(|i| counts.get_mut(i as usize)) {
                    Some(c) => *c += 1,
                    None => inside = false,
                }
            }
            if inside {
                let mut under = 0u64;
                for (i, &c) in counts.iter().enumerate() {
                    if under + u64::from(c) > at {
                        let key = lo_key + i as u64;
                        let ties = ties_of(&lists, key, c as usize);
                        drop(lists);
                        return self.finish_ties(key, below + under, ties);
                    }
                    under += u64::from(c);
                }
            }
        }
        // One list: the longest, the others appended one by one (each freed once moved).
        lists.sort_by_key(|list| std::cmp::Reverse(list.len()));
        let mut rest = lists.into_iter();
        let mut items = rest.next().unwrap_or_default();
        for list in rest {
            items.extend(list);
        }
        self.finish_from(items, below, |&p| p >> 32, |&p| p & 0xffff_ffff)
    }

    /// A band of level-0 bins `lo..=hi` as keys: the first, and the count above it.
    fn band_keys(&self, lo: u64, hi: u64) -> (u64, u64) {
        let shift = self.shift(0);
        let span = ((u128::from(hi - lo + 1) << shift) - 1).min(u128::from(u64::MAX)) as u64;
        (lo << shift, span)
    }

    /// The cut from candidates whose key and index `key` and `index` read.
    fn finish_from<I>(
        &self,
        items: Vec<I>,
        below: u64,
        key: impl Fn(&I) -> u64 + Copy,
        index: impl Fn(&I) -> u64,
    ) -> State {
        let at = self.rank - below;
        let cut = if at < items.len() as u64 { self.key_at(items.iter().map(key), at) } else { 0 };
        let first = items.iter().filter(|p| key(p) < cut).count() as u64;
        let ties: Vec<u64> = items.iter().filter(|p| key(p) == cut).map(index).collect();
        drop(items);
        self.finish_ties(cut, below + first, ties)
    }

    /// The cut at `key` (`below` elements under it) with the indices of its ties. The
    /// candidates were pushed chunk by chunk, each in index order, so the ties form a few
    /// sorted runs, which the stable sort merges in about linear time.
    fn finish_ties(&self, key: u64, below: u64, mut ties: Vec<u64>) -> State {
        ties.sort();
        let mut cut = self.cut_at(key, below, ties.len() as u64);
        if !cut.all_or_none() {
            let coarse = ties.iter().step_by(COARSE).copied().collect();
            cut.ties = TieIndex::Sorted(ties, coarse);
        }
        State::Done(cut)
    }

    /// The key at ascending position `at` (< `items.len()`) of the candidates' keys, by
    /// radix counting (16 bits a sweep, the items left in place).
    fn key_at(&self, keys: impl Iterator<Item = u64> + Clone, mut at: u64) -> u64 {
        let mut hist = vec![0u64; BINS];
        let mut prefix = 0u64;
        for level in 0..self.key_bits / LEVEL_BITS {
            let shift = self.shift(level);
            let high = shift + LEVEL_BITS;
            hist.fill(0);
            for k in keys.clone() {
                if high >= 64 || k >> high == prefix {
                    hist[((k >> shift) & 0xffff) as usize] += 1;
                }
            }
            let (bin, _, before) = locate(&hist, at);
            at -= before;
            prefix = (prefix << LEVEL_BITS) | bin;
        }
        prefix
    }

    /// The key is fully known: finish, or count ties per chunk if ordinals matter.
    fn resolve(&self, key: u64, below: u64, eq: u64) -> State {
        let cut = self.cut_at(key, below, eq);
        if cut.all_or_none() {
            State::Done(cut)
        } else {
            State::Ties { cut }
        }
    }

    fn cut_at(&self, key: u64, below: u64, eq: u64) -> Cut {
        let o = self.rank - below;
        let keep = match self.side {
            Side::Lower => (o, eq),
            Side::Upper => (0, o + 1),
            Side::TopK => (0, eq - o),
            Side::Value => (0, eq),
        };
        // Zero magnitudes contribute nothing whichever are kept: keep none and skip the
        // ordinal bookkeeping.
        let keep = if key == 0 && keep != (0, eq) { (0, 0) } else { keep };
        let ties = if keep.0 == 0 && (keep.1 == eq || keep.1 == 0) {
            TieIndex::Unneeded
        } else {
            TieIndex::Sorted(Vec::new(), Vec::new())
        };
        Cut { key, keep, eq, ties }
    }
}

#[cfg(test)]
mod tests;
