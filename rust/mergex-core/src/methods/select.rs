//! Exact rank selection over tensors larger than memory: which magnitude sits at a given
//! rank, found by radix passes over the chunks (16 bits of the order-preserving magnitude
//! key per pass), finished in memory once the candidates fit, with ties at the cut broken
//! by flat index.

use super::Stats;

/// Bins of one radix level.
pub const BINS: usize = 1 << 16;
const LEVEL_BITS: u32 = 16;

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

/// How ties are located in the output pass.
#[derive(Debug, Clone)]
enum TieIndex {
    /// Keep all ties or none: no ordinals needed.
    Unneeded,
    /// Sorted flat indices of every tie.
    Sorted(Vec<u64>),
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
            TieIndex::Sorted(v) => v.partition_point(|&i| i < start) as u64,
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
    state: State,
}

impl Selector {
    /// Select ascending rank `rank` (0-based) of keys `key_bits` wide.
    pub fn new(rank: u64, side: Side, key_bits: u32, gather_cap: u64) -> Selector {
        Selector { rank, side, key_bits, gather_cap, state: State::Radix { level: 0, prefix: 0, below: 0 } }
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

    /// Take the merged statistics of a pass.
    pub fn advance(&mut self, slot: usize, stats: &mut Stats) {
        let state = std::mem::replace(&mut self.state, State::Radix { level: 0, prefix: 0, below: 0 });
        self.state = match state {
            State::Radix { level, prefix, below } => {
                let hist = stats.take_hist(slot);
                let mut cum = below;
                let mut found = (0u64, 0u64, cum);
                for (bin, &c) in hist.iter().enumerate() {
                    if self.rank < cum + c {
                        found = (bin as u64, c, cum);
                        break;
                    }
                    cum += c;
                }
                let (bin, count, below) = found;
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
            State::Gather { below, .. } => {
                let mut items = stats.take_items(slot);
                items.sort_unstable();
                let at = (self.rank - below) as usize;
                let key = items.get(at).map(|&(k, _)| k).unwrap_or(0);
                let first = items.partition_point(|&(k, _)| k < key);
                let ties: Vec<u64> = items.iter().filter(|&&(k, _)| k == key).map(|&(_, i)| i).collect();
                let eq = ties.len() as u64;
                let mut cut = self.cut_at(key, below + first as u64, eq);
                if !cut.all_or_none() {
                    cut.ties = TieIndex::Sorted(ties);
                }
                State::Done(cut)
            }
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
            TieIndex::Sorted(Vec::new())
        };
        Cut { key, keep, eq, ties }
    }
}

/// The keep decisions of a run of keys against a cut whose ties are all kept or all
/// dropped ([`Cut::all_or_none`]): a plain comparison, without tie ordinals. `None` when
/// ordinals are needed.
pub fn plain_cut(cut: &Cut, above: bool) -> Option<impl Fn(u64) -> bool> {
    if !cut.all_or_none() {
        return None;
    }
    let (key, with_ties) = (cut.key, cut.keep.1 > cut.keep.0);
    Some(move |k: u64| match (above, with_ties) {
        (true, true) => k >= key,
        (true, false) => k > key,
        (false, true) => k <= key,
        (false, false) => k < key,
    })
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
    use proptest::prelude::*;

    /// Drive a selector over `keys` cut into chunks of `chunk`, as the engine does.
    fn run(keys: &[u64], rank: u64, side: Side, cap: u64, chunk: usize) -> (Cut, usize) {
        let mut sel = Selector::new(rank, side, 32, cap);
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

    #[test]
    fn gathering_finishes_in_two_passes() {
        let keys: Vec<u64> = (0..10_000u64).map(|i| ((i * 7919) % 10_007) << 8).collect();
        let (_, passes) = run(&keys, 5_000, Side::TopK, 1 << 20, 333);
        assert_eq!(passes, 2);
        let (_, passes) = run(&keys, 5_000, Side::TopK, 0, 333);
        assert!(passes >= 2);
    }
}
