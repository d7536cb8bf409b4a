//! Partial statistics of a pass, merged exactly across workers.

use crate::numeric::reduce::ExactSum;

/// Bins of one radix level of a selection (`methods::select`): what [`Stats::hist`] holds.
pub const BINS: usize = 1 << 16;

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

    /// The histogram of slot `i`, allocated with [`BINS`] bins on first use.
    pub fn hist(&mut self, i: usize) -> &mut Vec<u64> {
        if self.hists.len() <= i {
            self.hists.resize(i + 1, Vec::new());
        }
        let h = &mut self.hists[i];
        if h.is_empty() {
            h.resize(BINS, 0);
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
            vec![0; BINS]
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
