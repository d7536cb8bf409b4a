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

use super::Stats;
use crate::kernels::real::Real;
use crate::kernels::{Ties, TopCut};
use std::sync::atomic::{AtomicU64, Ordering};

/// Keys of a band (above its first) under which its candidates may be counted key by key
/// (`Selector::finish_packed`): 32 bins, 8 MiB of counts.
const DIRECT_KEYS: u64 = 1 << 21;
/// Bins of one radix level.
pub const BINS: usize = 1 << 16;
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

/// Spacing of the coarse index of sorted ties.
const COARSE: usize = 64;

/// How ties are located in the output pass.
#[derive(Debug, Clone)]
enum TieIndex {
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
    ties: TieIndex,
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
                    crate::kernels::real::dispatch::band_sweep_f32(v, band, packed)
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
        let under = crate::kernels::real::dispatch::band_sweep_bf16(x, base, band, packed);
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

/// The bin of `hist` that holds ascending position `at` (counted from its first bin): the
/// bin, its count and the count of the bins before it; `(0, 0, 0)` when `at` is past the end.
fn locate(hist: &[u64], at: u64) -> (u64, u64, u64) {
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
fn ties_of(lists: &[Vec<u64>], key: u64, count: usize) -> Vec<u64> {
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
fn band_sweep<T: Real, K: Lane>(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::dtype::f32_to_bf16;
    use crate::kernels::real::dispatch::{band_sweep_bf16_at, band_sweep_f32_at, ties_f32_at, Level};
    use crate::kernels::{Keep, TiesValues};
    use proptest::prelude::*;

    /// Values whose keys crowd around a few magnitudes, with the special values mixed in.
    fn f32_values() -> impl Strategy<Value = Vec<f32>> {
        let special = prop_oneof![
            Just(0.0f32),
            Just(-0.0f32),
            Just(f32::NAN),
            Just(-f32::INFINITY),
            Just(f32::MIN_POSITIVE / 4.0),
            Just(1.0f32),
            Just(-1.0f32),
        ];
        let value =
            prop_oneof![4 => (-4i32..4, -2.0f32..2.0).prop_map(|(e, m)| m * 2f32.powi(e)), 1 => special];
        proptest::collection::vec(value, 0..300)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// The dispatched band sweep (AVX-512 where the CPU has it) counts and gathers what
        /// the portable sweep does, in the same order, for any band (including one that
        /// wraps past the largest key) and any length.
        #[test]
        fn the_dispatched_band_sweep_is_the_portable_one(
            values in f32_values(),
            lo_key in prop_oneof![Just(0u32), Just(0x3f80_0000u32), Just(0x7fff_ffffu32), any::<u32>()],
            span in prop_oneof![Just(0u32), Just(0x0080_0000u32), Just(u32::MAX), any::<u32>()],
            start in prop_oneof![Just(0u64), Just((1u64 << 32) - 300)],
            before in 0usize..3,
        ) {
            let key = |v: &f32| v.mag_key() as u32;
            let mut want = vec![7u64; before];
            let push = |k: u32, i: u64| want.push(u64::from(k) << 32 | i);
            let under = band_sweep(&values, start, lo_key, span, key, Some(push));
            let band = crate::kernels::Band { start, lo_key, span };
            for level in [Level::Avx2, Level::Avx512] {
                let mut got = vec![7u64; before];
                if let Some(fast) = band_sweep_f32_at(level, &values, band, &mut got) {
                    prop_assert_eq!(fast, under, "{:?}", level);
                    prop_assert_eq!(&got, &want, "{:?}", level);
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Sweeps longer than the kernels' windows of blocks (16,384 elements) count and
        /// gather what the portable sweep does across the windows' seams.
        #[test]
        fn long_band_sweeps_are_the_portable_one(
            seed in any::<u64>(),
            n in 16_000usize..50_000,
            lo_key in prop_oneof![Just(0x3f00_0000u32), 0x3e00_0000u32..0x3f80_0000],
            span in prop_oneof![Just(0x0080_0000u32), 0u32..0x0100_0000],
            start in prop_oneof![Just(0u64), Just((1u64 << 32) - 60_000)],
        ) {
            let mut x = seed | 1;
            let values: Vec<f32> = (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
                })
                .collect();
            let key = |v: &f32| v.mag_key() as u32;
            let mut want = Vec::new();
            let push = |k: u32, i: u64| want.push(u64::from(k) << 32 | i);
            let under = band_sweep(&values, start, lo_key, span, key, Some(push));
            let band = crate::kernels::Band { start, lo_key, span };
            let bf16: Vec<u8> = values.iter().flat_map(|&v| f32_to_bf16(v).to_le_bytes()).collect();
            let zeros = vec![0u8; bf16.len()];
            let deltas: Vec<f32> = bf16.chunks(2).map(|h| crate::format::dtype::bf16_to_f32(u16::from_le_bytes([h[0], h[1]]))).collect();
            let mut want16 = Vec::new();
            let push16 = |k: u32, i: u64| want16.push(u64::from(k) << 32 | i);
            let under16 = band_sweep(&deltas, start, lo_key, span, key, Some(push16));
            for level in [Level::Avx2, Level::Avx512] {
                let mut got = Vec::new();
                if let Some(fast) = band_sweep_f32_at(level, &values, band, &mut got) {
                    prop_assert_eq!(fast, under, "{:?}", level);
                    prop_assert_eq!(&got, &want, "{:?}", level);
                }
                let mut got = Vec::new();
                if let Some(fast) = band_sweep_bf16_at(level, &bf16, &zeros, band, &mut got) {
                    prop_assert_eq!(fast, under16, "bf16 {:?}", level);
                    prop_assert_eq!(&got, &want16, "bf16 {:?}", level);
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// The band sweep over stored bf16 task vectors counts and gathers what the portable
        /// sweep does over the decoded differences, for any band, length and alignment.
        #[test]
        fn the_bf16_band_sweep_is_the_decoded_one(
            pairs in proptest::collection::vec((any::<u16>(), any::<u16>()), 0..300),
            lo_key in prop_oneof![Just(0u32), Just(0x3f80_0000u32), any::<u32>()],
            span in prop_oneof![Just(0u32), Just(0x0100_0000u32), Just(u32::MAX), any::<u32>()],
            start in prop_oneof![Just(0u64), Just((1u64 << 32) - 300)],
            odd in any::<bool>(),
        ) {
            let bf16 = crate::format::dtype::bf16_to_f32;
            let deltas: Vec<f32> = pairs.iter().map(|&(x, b)| bf16(x) - bf16(b)).collect();
            let key = |v: &f32| v.mag_key() as u32;
            let mut want = Vec::new();
            let push = |k: u32, i: u64| want.push(u64::from(k) << 32 | i);
            let under = band_sweep(&deltas, start, lo_key, span, key, Some(push));
            // Stored bytes, one byte off their natural alignment when `odd`.
            let stored = |f: fn(&(u16, u16)) -> u16| -> Vec<u8> {
                let mut v = vec![0u8; usize::from(odd)];
                v.extend(pairs.iter().flat_map(|p| f(p).to_le_bytes()));
                v
            };
            let (x, b) = (stored(|p| p.0), stored(|p| p.1));
            let skip = usize::from(odd);
            let band = crate::kernels::Band { start, lo_key, span };
            for level in [Level::Avx2, Level::Avx512] {
                let mut got = Vec::new();
                if let Some(fast) = band_sweep_bf16_at(level, &x[skip..], &b[skip..], band, &mut got) {
                    prop_assert_eq!(fast, under, "{:?}", level);
                    prop_assert_eq!(&got, &want, "{:?}", level);
                }
            }
        }
    }

    /// Drive a selector over `keys` cut into chunks of `chunk`, as the engine does.
    fn run(keys: &[u64], rank: u64, side: Side, cap: u64, chunk: usize) -> (Cut, usize) {
        finish(Selector::new(rank, side, 32, cap), keys, chunk)
    }

    /// As [`run`], after showing the selector its sample; `band` overrides the band.
    fn run_sampled(
        keys: &[u64],
        rank: u64,
        side: Side,
        cap: u64,
        chunk: usize,
        band: Option<Option<(u64, u64)>>,
    ) -> (Cut, usize) {
        let n = keys.len() as u64;
        let mut sel = Selector::new(rank, side, 32, cap);
        let mut stats = Stats::default();
        for (start, len) in sample_ranges(n) {
            sel.sample(0, keys[start as usize..(start + len) as usize].iter().copied(), &mut stats);
        }
        sel.plan_band(0, n, &mut stats);
        if let Some(b) = band {
            sel.band = b;
        }
        finish(sel, keys, chunk)
    }

    /// The passes of `sel` over `keys` (chunks in reverse order): the cut and the pass count.
    fn finish(mut sel: Selector, keys: &[u64], chunk: usize) -> (Cut, usize) {
        let mut passes = 0;
        while sel.pending() {
            let mut stats = Stats::default();
            for (c, part) in keys.chunks(chunk).enumerate().rev() {
                let mut acc = Stats::default();
                sel.collect(0, (c * chunk) as u64, part.iter().copied(), &mut acc);
                stats = stats.merge(acc);
            }
            sel.advance(0, &mut stats);
            passes += 1;
        }
        (sel.cut().cloned().unwrap(), passes)
    }

    /// The keep set by brute force.
    fn expected(keys: &[u64], lo: Option<usize>, hi: Option<usize>, top: Option<usize>) -> Vec<bool> {
        let n = keys.len();
        let mut keep = vec![false; n];
        if let Some(k) = top {
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&a, &b| keys[b].cmp(&keys[a]).then(a.cmp(&b)));
            for &i in &order[..k] {
                keep[i] = true;
            }
            return keep;
        }
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| keys[a].cmp(&keys[b]).then(a.cmp(&b)));
        for (r, &i) in order.iter().enumerate() {
            keep[i] = lo.is_none_or(|l| r >= l) && hi.is_none_or(|h| r <= h);
        }
        keep
    }

    fn apply(keys: &[u64], cuts: &[(&Cut, bool)], chunk: usize) -> Vec<bool> {
        let mut out = Vec::new();
        for (c, part) in keys.chunks(chunk).enumerate() {
            let start = (c * chunk) as u64;
            let mut ords: Vec<u64> = cuts.iter().map(|(cut, _)| cut.ties_before(start)).collect();
            for &k in part {
                let mut keep = true;
                for ((cut, above), o) in cuts.iter().zip(ords.iter_mut()) {
                    keep &= passes(cut, k, o, *above);
                }
                out.push(keep);
            }
        }
        out
    }

    proptest! {
        #[test]
        fn top_k_is_exact_with_index_tie_break(
            raw in proptest::collection::vec(0u64..40, 1..600),
            frac in 0.0f64..1.0,
            chunk in 1usize..100,
            cap in prop_oneof![Just(0u64), Just(1_000_000u64)],
        ) {
            // Small keys force many ties at the cut; shift them to exercise both radix levels.
            let keys: Vec<u64> = raw.iter().map(|&k| (k << 13) | 0x1000_0000).collect();
            let n = keys.len();
            let k = ((frac * n as f64) as usize).max(1);
            let (cut, _) = run(&keys, (n - k) as u64, Side::TopK, cap, chunk);
            let got = apply(&keys, &[(&cut, true)], chunk);
            prop_assert_eq!(got, expected(&keys, None, None, Some(k)));
        }

        #[test]
        fn bands_are_exact(
            raw in proptest::collection::vec(0u64..30, 2..500),
            a in 0.0f64..1.0,
            b in 0.0f64..1.0,
            chunk in 1usize..64,
            cap in prop_oneof![Just(0u64), Just(1_000_000u64)],
        ) {
            let keys: Vec<u64> = raw.iter().map(|&k| (k * 0x1_0003) | 0x2000_0000).collect();
            let n = keys.len();
            let (lo, hi) = {
                let x = (a * n as f64) as usize;
                let y = (b * n as f64) as usize;
                (x.min(y), x.max(y).min(n - 1))
            };
            let (c1, _) = run(&keys, lo as u64, Side::Lower, cap, chunk);
            let (c2, _) = run(&keys, hi as u64, Side::Upper, cap, chunk);
            let got = apply(&keys, &[(&c1, true), (&c2, false)], chunk);
            prop_assert_eq!(got, expected(&keys, Some(lo), Some(hi), None));
        }
    }

    proptest! {
        #[test]
        fn a_band_never_changes_the_cut(
            raw in proptest::collection::vec(0u64..3000, 1..3000),
            frac in 0.0f64..1.0,
            chunk in 1usize..700,
            side in prop_oneof![Just(Side::TopK), Just(Side::Lower), Just(Side::Upper)],
            band in prop_oneof![
                Just(None),
                Just(Some(None)),
                (0u64..0x1_0000, 0u64..64).prop_map(|(lo, w)| Some(Some((lo, (lo + w).min(0xffff))))),
            ],
            cap in prop_oneof![Just(2u64), Just(64u64), Just(1_000_000u64)],
        ) {
            // Keys spread over a few dozen level-0 bins, with many ties; `band` is the
            // sampled one, none, or an arbitrary (usually wrong) one.
            let keys: Vec<u64> = raw.iter().map(|&k| ((k * 0x9e37) & 0x3f_ffff) | 0x3c00_0000).collect();
            let n = keys.len();
            let rank = ((frac * n as f64) as u64).min(n as u64 - 1);
            let (plain, _) = run(&keys, rank, side, 1_000_000, chunk);
            let (banded, passes) = run_sampled(&keys, rank, side, cap, chunk, band);
            let above = side != Side::Upper;
            prop_assert_eq!(apply(&keys, &[(&banded, above)], chunk), apply(&keys, &[(&plain, above)], chunk));
            prop_assert_eq!((banded.key, banded.keep, banded.eq), (plain.key, plain.keep, plain.eq));
            if band.is_none() && cap == 1_000_000 {
                // The whole tensor is the sample: its band holds the cut, one pass.
                prop_assert_eq!(passes, 1);
            }
        }
    }

    /// The vectorized sweep over values (32- or 64-bit lanes) and the generic one over keys
    /// gather the same.
    fn band_collects_the_same<T: Real>(values: &[T]) {
        let keys: Vec<u64> = values.iter().map(|v| v.mag_key()).collect();
        let mut sel = Selector::new(4000, Side::TopK, T::KEY_BITS, 1 << 20);
        let mut stats = Stats::default();
        sel.sample(0, keys.iter().copied(), &mut stats);
        sel.plan_band(0, keys.len() as u64, &mut stats);
        assert!(sel.band.is_some());
        let (mut a, mut b) = (Stats::default(), Stats::default());
        for (c, part) in values.chunks(333).enumerate() {
            sel.collect_values(0, c as u64 * 333, part, &mut a);
            sel.collect(0, c as u64 * 333, part.iter().map(|v| v.mag_key()), &mut b);
        }
        assert_eq!(a.items(0), b.items(0));
        assert_eq!(a.packed(0), b.packed(0));
        assert_eq!(a.count(0), b.count(0));
        // f32 keys of a small tensor are packed, f64 keys are not.
        let gathered = if T::KEY_BITS <= 32 { a.packed(0).len() } else { a.items(0).len() };
        assert!(gathered > 0 && *a.count(0) > 0);
        // The same band with a cap it outgrows: both sweeps still count, and give it up.
        let band = sel.band;
        let mut small = Selector::new(4000, Side::TopK, T::KEY_BITS, 10);
        (small.band, small.pack) = (band, sel.pack);
        let (mut c, mut d) = (Stats::default(), Stats::default());
        for (i, part) in values.chunks(333).enumerate() {
            small.collect_values(0, i as u64 * 333, part, &mut c);
        }
        small.gathered = Gathered::default();
        for (i, part) in values.chunks(333).enumerate() {
            small.collect(0, i as u64 * 333, part.iter().map(|v| v.mag_key()), &mut d);
        }
        assert_eq!(c.count(0), a.count(0));
        assert_eq!(d.count(0), a.count(0));
        assert!(c.overflowed(0) && d.overflowed(0));
        assert!(c.items(0).is_empty() && c.packed(0).is_empty() && d.packed(0).is_empty());
    }

    #[test]
    fn a_band_collects_the_same_from_values_and_from_keys() {
        let values: Vec<f32> = (0..5000).map(|i| ((i * 7919) % 4999) as f32 * 1e-3 - 2.5).collect();
        band_collects_the_same(&values);
        band_collects_the_same(&values.iter().map(|&v| v as f64 * 1.5).collect::<Vec<f64>>());
    }

    /// [`top_mask`] over the values of chunks of `chunk` agrees with the exact top-`k`.
    fn top_mask_is_exact<T: Real>(values: &[T], k: usize, chunk: usize) -> Result<(), TestCaseError> {
        let keys: Vec<u64> = values.iter().map(|v| v.mag_key()).collect();
        let sel = Selector::new((keys.len() - k) as u64, Side::TopK, T::KEY_BITS, 1 << 20);
        let (cut, _) = finish(sel, &keys, chunk);
        let (mut got, mut keep) = (Vec::new(), Vec::new());
        for (c, part) in values.chunks(chunk).enumerate() {
            top_mask(&cut, (c * chunk) as u64, part, &mut keep);
            got.extend_from_slice(&keep);
        }
        prop_assert_eq!(got, expected(&keys, None, None, Some(k)));
        Ok(())
    }

    proptest! {
        #[test]
        fn top_masks_of_values_are_exact(
            raw in proptest::collection::vec(-25i32..25, 1..700),
            frac in 0.0f64..1.0,
            chunk in 1usize..120,
        ) {
            // Few distinct magnitudes, both signs: many ties at the cut, in 32- and 64-bit
            // lanes. No zeros (a cut at magnitude 0 keeps none of its ties, by design).
            let k = ((frac * raw.len() as f64) as usize).max(1);
            let v = |r: i32| r as f64 * 0.37 + 0.25 * (r >= 0) as i32 as f64 - 0.125;
            top_mask_is_exact(&raw.iter().map(|&r| v(r) as f32).collect::<Vec<f32>>(), k, chunk)?;
            top_mask_is_exact(&raw.iter().map(|&r| v(r)).collect::<Vec<f64>>(), k, chunk)?;
        }
    }

    /// The fused TIES kernel against the task vectors, keep masks, weighting and election done
    /// one step at a time (as `task_vector` does without it), over chunks of `chunk`.
    #[allow(clippy::too_many_arguments)]
    fn fused_ties_agrees(
        models: &[Vec<f32>],
        base: &[f32],
        rule: &Rule,
        weights: &[f32],
        scales: &[f32],
        normalize: bool,
        lambda: f32,
        chunk: usize,
    ) -> Result<(), TestCaseError> {
        let n = base.len();
        let deltas: Vec<Vec<f32>> =
            models.iter().map(|x| x.iter().zip(base).map(|(&v, &b)| v - b).collect()).collect();
        let ks: &[usize] = match rule {
            Rule::TopK(ks) => ks,
            Rule::Draws(..) => &[],
        };
        let cuts: Vec<Cut> = deltas
            .iter()
            .zip(ks)
            .map(|(d, &k)| {
                let keys: Vec<u64> = d.iter().map(|v| v.mag_key()).collect();
                finish(Selector::new((n - k) as u64, Side::TopK, 32, 1 << 20), &keys, chunk).0
            })
            .collect();
        for c in 0..n.div_ceil(chunk) {
            let (from, to) = (c * chunk, ((c + 1) * chunk).min(n));
            let start = from as u64;
            let parts: Vec<&[f32]> = models.iter().map(|x| &x[from..to]).collect();
            let b = &base[from..to];
            // Every fused build the CPU has, from the values decoded and as stored in bf16
            // (the tests' values are exact in bf16), must give the same bits.
            let bf16 =
                |x: &[f32]| -> Vec<u8> { x.iter().flat_map(|&v| f32_to_bf16(v).to_le_bytes()).collect() };
            let stored: Vec<Vec<u8>> = parts.iter().map(|x| bf16(x)).collect();
            let stored_refs: Vec<&[u8]> = stored.iter().map(|x| &x[..]).collect();
            let b16 = bf16(b);
            let mut builds = Vec::new();
            for level in [Level::Avx2, Level::Avx512] {
                let mut tops: Vec<TopCut> = cuts.iter().map(|cut| cut.top_cut_f32(start)).collect();
                let mut tops16 = tops.clone();
                let values = TiesValues::F32 { models: &parts, base: b };
                let inputs = crate::kernels::TiesInputs { values, weights, scales, normalize, lambda };
                let mut got = vec![0f32; to - from];
                let keep = |tops| match rule {
                    Rule::TopK(_) => Keep::Cuts(tops),
                    Rule::Draws(d, offset) => Keep::Draws { start: offset + start, draws: d },
                };
                if !ties_f32_at(level, &inputs, keep(&mut tops), &mut got) {
                    continue; // no fused form in this build, or not on this CPU
                }
                let values = TiesValues::Bf16 { models: &stored_refs, base: &b16 };
                let inputs = crate::kernels::TiesInputs { values, weights, scales, normalize, lambda };
                let mut got16 = vec![0f32; to - from];
                prop_assert!(ties_f32_at(level, &inputs, keep(&mut tops16), &mut got16));
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
                prop_assert_eq!(bits(&got16), bits(&got), "bf16 values, chunk {}, {:?}", c, level);
                builds.push((level, got));
            }
            #[cfg(target_arch = "x86_64")]
            {
                use std::arch::is_x86_feature_detected as has;
                let v3 = has!("avx2") && has!("fma") && has!("bmi1") && has!("bmi2") && has!("lzcnt");
                prop_assert!(!v3 || builds.iter().any(|(l, _)| *l == Level::Avx2), "the AVX2 build ran");
            }
            // One step at a time.
            let mut ws = Vec::new();
            for (i, (d, (&w, &s))) in deltas.iter().zip(weights.iter().zip(scales)).enumerate() {
                let (d, mut keep) = (&d[from..to], Vec::new());
                match rule {
                    Rule::TopK(_) => top_mask(&cuts[i], start, d, &mut keep),
                    Rule::Draws(draws, offset) => {
                        let (stream, threshold) = draws[i];
                        let draw = |j: u64| u64::from(crate::methods::random::draw(stream, offset + j));
                        keep.extend((start..start + d.len() as u64).map(|j| draw(j) < threshold));
                    }
                }
                ws.push(
                    d.iter()
                        .zip(&keep)
                        .map(|(&v, &k)| if k { w * (v * s) } else { 0.0 })
                        .collect::<Vec<f32>>(),
                );
            }
            for (level, got) in &builds {
                for (j, (&g, &bj)) in got.iter().zip(b).enumerate() {
                    let total = ws.iter().fold(0f32, |t, w| t + w[j]);
                    let (mut mixed, mut div) = (0f32, 0f32);
                    for (w, &wi) in ws.iter().zip(weights) {
                        let agree = if total >= 0.0 { w[j] > 0.0 } else { w[j] < 0.0 };
                        mixed += if agree { w[j] } else { 0.0 };
                        div += if agree { wi } else { 0.0 };
                    }
                    let want = if normalize {
                        let d = if div == 0.0 { 1.0 } else { div };
                        bj + (mixed / d) * lambda
                    } else {
                        bj + mixed * lambda
                    };
                    prop_assert_eq!(g.to_bits(), want.to_bits(), "chunk {} element {}, {:?}", c, j, level);
                }
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]
        #[test]
        fn fused_ties_is_the_stepwise_election(
            raw in proptest::collection::vec(proptest::collection::vec(-7i32..7, 333), 1..6),
            fracs in proptest::collection::vec(0.0f64..1.0, 6),
            weights in proptest::collection::vec(prop_oneof![Just(0.0f32), Just(-0.5f32), Just(0.25f32), -1.0f32..1.0], 6),
            normalize in any::<bool>(),
            chunk in prop_oneof![Just(333usize), 1usize..70],
        ) {
            // Models a few steps from the base (so task vectors have few magnitudes, both
            // signs, exact zeros: many ties at each cut), and the odd NaN.
            let n = 333;
            let base: Vec<f32> = (0..n).map(|j| (j % 4) as f32 * 0.5 - 1.0).collect();
            let models: Vec<Vec<f32>> = raw
                .iter()
                .map(|r| {
                    r.iter()
                        .zip(&base)
                        .enumerate()
                        .map(|(j, (&x, &b))| if x == 6 && j % 7 == 0 { f32::NAN } else { b + x as f32 * 0.375 })
                        .collect()
                })
                .collect();
            let ks: Vec<usize> = fracs.iter().take(models.len()).map(|f| ((f * n as f64) as usize).max(1)).collect();
            let scales = [1.0f32, 1.25, 0.5, 2.0, 1.0, 0.75];
            let m = models.len();
            fused_ties_agrees(&models, &base, &Rule::TopK(ks), &weights[..m], &scales[..m], normalize, 0.9, chunk)?;
        }

        /// DARE-TIES: the fused output keeps each model's drawn elements, as the stepwise
        /// masks do, near a multiple of 2^32 too (where the index hashes change their high half).
        #[test]
        fn fused_dare_ties_is_the_stepwise_election(
            raw in proptest::collection::vec(proptest::collection::vec(-7i32..7, 333), 1..6),
            draws in proptest::collection::vec((any::<u32>(), prop_oneof![Just(0u64), Just(1u64 << 32), 0u64..(1 << 32)]), 6),
            weights in proptest::collection::vec(prop_oneof![Just(0.0f32), Just(-0.5f32), Just(0.25f32), -1.0f32..1.0], 6),
            normalize in any::<bool>(),
            chunk in prop_oneof![Just(333usize), 1usize..70],
            offset in prop_oneof![Just(0u64), Just((1u64 << 32) - 150), Just((3u64 << 32) - 7)],
        ) {
            let n = 333;
            let base: Vec<f32> = (0..n).map(|j| (j % 4) as f32 * 0.5 - 1.0).collect();
            let models: Vec<Vec<f32>> =
                raw.iter().map(|r| r.iter().zip(&base).map(|(&x, &b)| b + x as f32 * 0.375).collect()).collect();
            let scales = [1.0f32, 1.25, 0.5, 2.0, 1.0, 0.75];
            let m = models.len();
            let rule = Rule::Draws(draws[..m].to_vec(), offset);
            fused_ties_agrees(&models, &base, &rule, &weights[..m], &scales[..m], normalize, 0.9, chunk)?;
        }
    }

    /// What a fused TIES test keeps of each model: its top `k` magnitudes, or its draws.
    enum Rule {
        TopK(Vec<usize>),
        /// Each model's `(stream, threshold)`, and the flat index of the first element.
        Draws(Vec<(u32, u64)>, u64),
    }

    #[test]
    fn an_overflowing_band_is_dropped_and_takes_the_usual_passes() {
        let keys: Vec<u64> = (0..50_000u64).map(|i| ((i * 7919) % 10_007) << 8).collect();
        let (cut, passes) = run_sampled(&keys, 40_000, Side::TopK, 1 << 20, 333, None);
        assert_eq!(passes, 1);
        let (small, more) = run_sampled(&keys, 40_000, Side::TopK, 10, 333, Some(Some((0, 0xffff))));
        assert!(more > 1);
        assert_eq!((small.key, small.keep, small.eq), (cut.key, cut.keep, cut.eq));
    }

    #[test]
    fn ties_before_counts_through_the_coarse_index() {
        // Thousands of ties at the cut: lookups go through many windows of the coarse index.
        let keys: Vec<u64> =
            (0..20_000u64).map(|i| if i % 3 == 0 { 5 << 20 } else { (i % 97) << 23 }).collect();
        let (cut, _) = run(&keys, 3_000, Side::TopK, 1 << 20, 1_000);
        assert!(matches!(&cut.ties, TieIndex::Sorted(v, _) if v.len() > 4 * COARSE));
        for start in (0..20_000u64).step_by(37) {
            let naive = keys.iter().take(start as usize).filter(|&&k| k == cut.key).count() as u64;
            assert_eq!(cut.ties_before(start), naive, "{start}");
        }
    }

    #[test]
    fn samples_are_spread_ranges_or_the_whole_tensor() {
        assert_eq!(sample_ranges(0), vec![]);
        assert_eq!(sample_ranges(1000), vec![(0, 1000)]);
        let r = sample_ranges(10_000_000);
        assert_eq!(r.len(), 64);
        assert!(r.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0));
        assert!(r.last().is_some_and(|&(s, l)| s + l <= 10_000_000));
    }

    #[test]
    fn gathering_finishes_in_two_passes() {
        let keys: Vec<u64> = (0..10_000u64).map(|i| ((i * 7919) % 10_007) << 8).collect();
        let (_, passes) = run(&keys, 5_000, Side::TopK, 1 << 20, 333);
        assert_eq!(passes, 2);
        let (_, passes) = run(&keys, 5_000, Side::TopK, 0, 333);
        assert!(passes >= 2);
    }
}
