//! Where each method keeps each of its statistics in [`Stats`](super::Stats): one named
//! layout per method, used by its chunks, its end-of-pass code and its kernel descriptions
//! ([`Kernel`](super::Kernel)), so that no method writes slot arithmetic of its own.

use std::ops::Range;

/// The task-vector family (and sce's variance selection, as model 0): per model, its two
/// L1 norms (exact sums) and its one or two selections (histograms, candidates, counts).
pub struct TaskSlots;

impl TaskSlots {
    /// `‖δ_i‖₁` of model `i` (sums).
    pub const fn l1_all(i: usize) -> usize {
        2 * i
    }

    /// `‖δ_i ⊙ mask_i‖₁` of model `i` (sums), beside [`TaskSlots::l1_all`].
    pub const fn l1_kept(i: usize) -> usize {
        2 * i + 1
    }

    /// Model `i`'s selection `cut`: 0 its lower (or only) cut, 1 its upper cut.
    pub const fn cut(i: usize, cut: usize) -> usize {
        2 * i + cut
    }

    /// Every slot of model `i`, for [`Stats::take_slots`](super::Stats::take_slots).
    pub const fn model(i: usize) -> Range<usize> {
        2 * i..2 * i + 2
    }
}

/// ram and ramplus_tl: per model, its active elements that another model shares and those it
/// alone has (exact sums of counts).
pub struct RamSlots;

impl RamSlots {
    /// Model `i`'s active elements another model shares.
    pub const fn shared(i: usize) -> usize {
        2 * i
    }

    /// Model `i`'s active elements no other model has.
    pub const fn unique(i: usize) -> usize {
        2 * i + 1
    }
}

/// nuslerp's column-wise statistics: per column `c`, the exact sums `‖p‖²`, `‖q‖²`, `p·q`.
pub struct ColumnSlots;

impl ColumnSlots {
    /// The first slot of column `c`: `‖p‖²` there, then `‖q‖²` and `p·q`.
    pub const fn column(c: usize) -> usize {
        3 * c
    }

    /// Slots of `cols` columns.
    pub const fn count(cols: usize) -> usize {
        3 * cols
    }
}

/// sce: the count of nonzero variances, each model's sum of squares of its selected task
/// vector (sums), and the variance selection (as [`TaskSlots`] model 0).
pub struct SceSlots;

impl SceSlots {
    /// The count of nonzero variances.
    pub const NONZERO: usize = 0;

    /// The variance selection's model number in [`TaskSlots`].
    pub const SELECTION: usize = 0;

    /// Model `i`'s sum of squares.
    pub const fn squares(i: usize) -> usize {
        1 + i
    }
}
