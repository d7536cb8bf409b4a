//! The sparsifiers of METHODS.md §3, per model and per tensor: which elements of a task
//! vector δ are kept. Magnitude-based ones need exact rank cuts (see [`super::select`]);
//! random ones replay the counter-based draw of [`crate::numeric::random`].

use super::kernel::{Collect, Mask};
use super::select::{passes, top_mask, Selector, Side};
use super::slots::TaskSlots;
use super::stats::Stats;
use crate::kernels::real::Real;
use crate::numeric::random::{mix, stream, threshold};

/// Which sparsifier a method uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Keep everything.
    None,
    /// Exact top-k by magnitude, lower index first among ties (TIES).
    Magnitude,
    /// Drop the smallest and the largest outliers (breadcrumbs).
    Outliers,
    /// Keep each element with probability d (DARE).
    Random,
    /// Keep with probability rising with the magnitude rank within rows (DELLA).
    Della,
}

/// Vectors that DELLA ranks within: `len` elements `inner` apart, in groups of
/// `len · inner` contiguous elements.
#[derive(Debug, Clone, Copy)]
pub struct Rows {
    /// Elements per vector.
    pub len: u64,
    /// Stride between a vector's elements.
    pub inner: u64,
}

impl Rows {
    /// METHODS.md §3: 1-D → one row; 2-D → rows along the last axis; more → along axis 1.
    pub fn of(shape: &[u64]) -> Rows {
        match shape {
            [] => Rows { len: 1, inner: 1 },
            [n] => Rows { len: *n, inner: 1 },
            [_, rest @ ..] => Rows { len: rest[0], inner: rest[1..].iter().product() },
        }
    }

    /// Elements of one group (the chunk alignment).
    pub fn group(&self) -> u64 {
        (self.len * self.inner).max(1)
    }
}

/// One model's sparsifier for one tensor.
#[derive(Debug, Clone)]
pub enum Sparsifier {
    /// Keep every element.
    All,
    /// Keep no element.
    Nothing,
    /// Keep elements between two exact rank cuts (either may be absent).
    Select {
        /// Elements must be at or above this cut (`TopK` or `Lower`).
        lower: Option<Box<Selector>>,
        /// Elements must be at or below this cut (`Upper`).
        upper: Option<Box<Selector>>,
    },
    /// DARE: keep iff `draw < threshold`.
    Random {
        /// The model's stream.
        stream: u32,
        /// `floor(d · 2^32)`.
        threshold: u64,
    },
    /// DELLA: keep probability from the rank within each row.
    Della {
        /// The model's stream.
        stream: u32,
        /// Density.
        d: f64,
        /// Spread.
        eps: f64,
        /// Row geometry.
        rows: Rows,
    },
}

/// Inputs to build a sparsifier.
#[derive(Debug, Clone, Copy)]
pub struct Setup<'a> {
    /// Output tensor name (seeds the random stream).
    pub tensor: &'a str,
    /// Output shape.
    pub shape: &'a [u64],
    /// Seed.
    pub seed: u64,
    /// Model position among the non-base models.
    pub position: usize,
    /// Largest candidate set a selection may gather in memory.
    pub gather_cap: u64,
    /// Width of magnitude keys.
    pub key_bits: u32,
}

impl Sparsifier {
    /// Build from the (f32-rounded) density `d`, `gamma` and `epsilon`.
    pub fn new(kind: Kind, d: f64, gamma: f64, eps: f64, s: Setup<'_>) -> Sparsifier {
        if kind == Kind::None || d >= 1.0 {
            return Sparsifier::All;
        }
        let n: u64 = s.shape.iter().product();
        let floor_n = |f: f64| if f <= 0.0 { 0 } else { ((f * n as f64).floor() as u64).min(n) };
        let stream = || stream(s.seed as u32, s.tensor, s.position as u32);
        match kind {
            Kind::None => Sparsifier::All,
            Kind::Magnitude => {
                let k = if d <= 0.0 { 0 } else { floor_n(d).max(1) };
                match k {
                    0 => Sparsifier::Nothing,
                    k if k >= n => Sparsifier::All,
                    k => Sparsifier::Select {
                        lower: Some(Box::new(Selector::new(n - k, Side::TopK, s.key_bits, s.gather_cap))),
                        upper: None,
                    },
                }
            }
            Kind::Outliers => {
                let keep = floor_n(d);
                let top = floor_n(gamma);
                let bot = n.saturating_sub(keep + top);
                if keep == 0 {
                    return Sparsifier::Nothing;
                }
                let selector = |rank, side| Box::new(Selector::new(rank, side, s.key_bits, s.gather_cap));
                let lower = (bot > 0).then(|| selector(bot, Side::Lower));
                let upper = (bot + keep < n).then(|| selector(bot + keep - 1, Side::Upper));
                if lower.is_none() && upper.is_none() {
                    Sparsifier::All
                } else {
                    Sparsifier::Select { lower, upper }
                }
            }
            Kind::Random => Sparsifier::Random { stream: stream(), threshold: threshold(d) },
            Kind::Della => Sparsifier::Della { stream: stream(), d, eps, rows: Rows::of(s.shape) },
        }
    }

    /// Whether a selection still needs passes.
    pub fn pending(&self) -> bool {
        match self {
            Sparsifier::Select { lower, upper } => {
                lower.as_ref().is_some_and(|s| s.pending()) || upper.as_ref().is_some_and(|s| s.pending())
            }
            _ => false,
        }
    }

    /// Whether this sparsifier drops anything (so the L1 rescale applies).
    pub fn drops(&self) -> bool {
        !matches!(self, Sparsifier::All)
    }

    /// Whether the kept set is known without statistics (random draws, all, nothing).
    pub fn is_selection(&self) -> bool {
        matches!(self, Sparsifier::Select { .. })
    }

    /// Collect selection statistics of one chunk (slots `2·model` and `2·model + 1`).
    #[inline(always)]
    pub fn collect<T: Real>(&self, model: usize, start: u64, delta: &[T], acc: &mut Stats) {
        if let Sparsifier::Select { lower, upper } = self {
            for (i, sel) in [lower, upper].into_iter().enumerate() {
                if let Some(sel) = sel.as_ref().filter(|s| s.pending()) {
                    sel.collect_values(TaskSlots::cut(model, i), start, delta, acc);
                }
            }
        }
    }

    /// Whether this pass's statistics can come from stored bf16 task vectors
    /// ([`Sparsifier::collect_stored_bf16`]): nothing to collect, or band sweeps only.
    pub fn sweeps_stored(&self) -> bool {
        match self {
            Sparsifier::All => true,
            Sparsifier::Select { lower, upper } => {
                [lower, upper].into_iter().flatten().all(|s| !s.pending() || s.sweeps_band())
            }
            _ => false,
        }
    }

    /// [`Sparsifier::collect`] from the task vector `x − base` of bf16 values as stored
    /// (when [`Sparsifier::sweeps_stored`]).
    pub fn collect_stored_bf16(&self, model: usize, start: u64, x: &[u8], base: &[u8], acc: &mut Stats) {
        if let Sparsifier::Select { lower, upper } = self {
            for (i, sel) in [lower, upper].into_iter().enumerate() {
                if let Some(sel) = sel.as_ref().filter(|s| s.pending()) {
                    sel.collect_stored_bf16(TaskSlots::cut(model, i), start, x, base, acc);
                }
            }
        }
    }

    /// Whether a sample of a tensor of `n` elements can save this sparsifier passes.
    pub fn wants_sample(&self, n: u64) -> bool {
        match self {
            Sparsifier::Select { lower, upper } => {
                [lower, upper].into_iter().flatten().any(|s| s.pending() && s.wants_sample(n))
            }
            _ => false,
        }
    }

    /// Collect one sample range of δ (slots as in [`Sparsifier::collect`]).
    #[inline(always)]
    pub fn sample<T: Real>(&self, model: usize, delta: &[T], acc: &mut Stats) {
        if let Sparsifier::Select { lower, upper } = self {
            for (i, sel) in [lower, upper].into_iter().enumerate() {
                if let Some(sel) = sel.as_ref() {
                    sel.sample(TaskSlots::cut(model, i), delta.iter().map(|v| v.mag_key()), acc);
                }
            }
        }
    }

    /// Take the merged sample of a tensor of `n` elements: the selections' first bands.
    pub fn plan_bands(&mut self, model: usize, n: u64, stats: &mut Stats) {
        if let Sparsifier::Select { lower, upper } = self {
            for (i, sel) in [lower, upper].into_iter().enumerate() {
                if let Some(sel) = sel.as_mut().filter(|s| s.wants_sample(n)) {
                    sel.plan_band(TaskSlots::cut(model, i), n, stats);
                }
            }
        }
    }

    /// Take a pass's merged selection statistics.
    pub fn advance(&mut self, model: usize, stats: &mut Stats) {
        if let Sparsifier::Select { lower, upper } = self {
            for (i, sel) in [lower, upper].into_iter().enumerate() {
                if let Some(sel) = sel.as_mut().filter(|s| s.pending()) {
                    sel.advance(TaskSlots::cut(model, i), stats);
                }
            }
        }
    }

    /// DARE's `(stream, threshold)`: [`Sparsifier::mask`] keeps element `j` iff its draw is
    /// under the threshold (`crate::kernels::Keep::Draws`).
    pub fn draws(&self) -> Option<(u32, u64)> {
        match self {
            Sparsifier::Random { stream, threshold } => Some((*stream, *threshold)),
            _ => None,
        }
    }

    /// Whether [`Sparsifier::mask`] needs the chunk's index hashes.
    pub fn random(&self) -> bool {
        matches!(self, Sparsifier::Random { .. } | Sparsifier::Della { .. })
    }

    /// The cut of a selection that keeps the top of the magnitudes (a lower cut alone),
    /// once resolved: its keep mask is [`top_mask`].
    pub fn top_cut(&self) -> Option<&super::select::Cut> {
        match self {
            Sparsifier::Select { lower: Some(lower), upper: None } => lower.cut(),
            _ => None,
        }
    }

    /// The keep mask of one chunk of δ starting at flat index `start` (selections must be
    /// resolved; chunks hold whole DELLA groups). `hashes` are the chunk's
    /// [`crate::numeric::random::index_hashes`] when [`Sparsifier::random`].
    /// This sparsifier's keep mask for a kernel of another engine whose chunks start at
    /// `starts` ([`Sparsifier::mask`] as data); cuts must be resolved.
    pub fn view(&self, starts: &[u64]) -> Mask {
        match self {
            Sparsifier::All => Mask::All,
            Sparsifier::Nothing => Mask::Nothing,
            Sparsifier::Select { lower, upper } => {
                let cut =
                    |s: &Option<Box<Selector>>| s.as_ref().and_then(|s| s.cut()).map(|c| c.view(starts));
                Mask::Cuts { lower: cut(lower), upper: cut(upper) }
            }
            &Sparsifier::Random { stream, threshold } => Mask::Random { stream, threshold },
            &Sparsifier::Della { stream, d, eps, rows } => {
                let m = rows.len;
                let p = |q: u64| if m <= 1 { d } else { d - eps + 2.0 * eps * q as f64 / (m - 1) as f64 };
                let thresholds = (0..m.max(1)).map(|q| threshold(p(q))).collect();
                Mask::Della { stream, thresholds, len: rows.len, inner: rows.inner }
            }
        }
    }

    /// The selections' work in this pass over model `model`'s magnitudes (slots `2·model`
    /// and `2·model + 1`), for a kernel of another engine.
    pub fn describe(&self, model: usize) -> Vec<Collect> {
        let Sparsifier::Select { lower, upper } = self else { return Vec::new() };
        [lower, upper]
            .into_iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().and_then(|s| s.describe(TaskSlots::cut(model, i))))
            .collect()
    }

    /// The sample slots of this sparsifier's selections (see [`Sparsifier::sample`]).
    pub fn sample_slots(&self, model: usize) -> Vec<usize> {
        let Sparsifier::Select { lower, upper } = self else { return Vec::new() };
        [lower, upper]
            .into_iter()
            .enumerate()
            .filter(|(_, s)| s.is_some())
            .map(|(i, _)| TaskSlots::cut(model, i))
            .collect()
    }

    #[inline(always)]
    pub fn mask<T: Real>(&self, start: u64, delta: &[T], hashes: &[u32], keep: &mut Vec<bool>) {
        keep.clear();
        match self {
            Sparsifier::All => keep.resize(delta.len(), true),
            Sparsifier::Nothing => keep.resize(delta.len(), false),
            Sparsifier::Select { lower, upper } => {
                let lo = lower.as_ref().and_then(|s| s.cut());
                let hi = upper.as_ref().and_then(|s| s.cut());
                if let (Some(c), None) = (lo, hi) {
                    top_mask(c, start, delta, keep);
                    return;
                }
                let mut lo_ord = lo.map(|c| c.ties_before(start)).unwrap_or(0);
                let mut hi_ord = hi.map(|c| c.ties_before(start)).unwrap_or(0);
                keep.extend(delta.iter().map(|v| {
                    let k = v.mag_key();
                    let a = lo.is_none_or(|c| passes(c, k, &mut lo_ord, true));
                    let b = hi.is_none_or(|c| passes(c, k, &mut hi_ord, false));
                    a && b
                }));
            }
            Sparsifier::Random { stream, threshold } => {
                keep.resize(delta.len(), false);
                if *threshold > u32::MAX as u64 {
                    keep.fill(true);
                } else {
                    // u32 compares and plain slices: this loop vectorizes.
                    let t = *threshold as u32;
                    for (k, &h) in keep.iter_mut().zip(hashes) {
                        *k = mix(stream ^ h) < t;
                    }
                }
            }
            Sparsifier::Della { stream, d, eps, rows } => {
                della_mask(*stream, *d, *eps, *rows, hashes, delta, keep)
            }
        }
    }
}

/// DELLA's keep mask over whole groups: rank each vector by magnitude (ascending, lower
/// index first among ties), keep with probability `d − ε + 2ε(q−1)/(m−1)`.
#[inline(always)]
fn della_mask<T: Real>(
    stream: u32,
    d: f64,
    eps: f64,
    rows: Rows,
    hashes: &[u32],
    delta: &[T],
    keep: &mut Vec<bool>,
) {
    keep.resize(delta.len(), false);
    let (m, inner) = (rows.len as usize, rows.inner as usize);
    let group = (m * inner).max(1);
    let mut order: Vec<(u64, usize)> = Vec::with_capacity(m);
    for g in (0..delta.len()).step_by(group) {
        for c in 0..inner {
            order.clear();
            for t in 0..m {
                let i = g + c + t * inner;
                if let Some(v) = delta.get(i) {
                    order.push((v.mag_key(), i));
                }
            }
            order.sort_unstable();
            for (q, &(_, i)) in order.iter().enumerate() {
                let p = if m <= 1 { d } else { d - eps + 2.0 * eps * q as f64 / (m - 1) as f64 };
                if let (Some(k), Some(&h)) = (keep.get_mut(i), hashes.get(i)) {
                    *k = (mix(stream ^ h) as u64) < threshold(p);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_follow_the_spec() {
        let r = Rows::of(&[7]);
        assert_eq!((r.len, r.inner, r.group()), (7, 1, 7));
        let r = Rows::of(&[3, 5]);
        assert_eq!((r.len, r.inner, r.group()), (5, 1, 5));
        let r = Rows::of(&[2, 3, 4]);
        assert_eq!((r.len, r.inner, r.group()), (3, 4, 12));
    }

    #[test]
    fn della_keeps_more_of_the_larger_magnitudes() {
        let delta: Vec<f32> = (0..4096).map(|i| (i % 64) as f32).collect();
        let (mut keep, mut hashes) = (Vec::new(), Vec::new());
        crate::numeric::random::index_hashes(0, delta.len(), &mut hashes);
        della_mask(stream(0, "t", 0), 0.5, 0.4, Rows { len: 64, inner: 1 }, &hashes, &delta, &mut keep);
        let low: usize = keep.iter().enumerate().filter(|(i, &k)| k && i % 64 < 16).count();
        let high: usize = keep.iter().enumerate().filter(|(i, &k)| k && i % 64 >= 48).count();
        assert!(high > 2 * low, "{low} {high}");
    }
}
