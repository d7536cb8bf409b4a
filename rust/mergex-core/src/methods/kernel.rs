//! The chunk kernels of the methods, described for an engine that runs them on another
//! backend (the torch engine, `python/mergex/torch_engine`).
//!
//! The Rust engine keeps each tensor's control in its [`TensorMerge`]: the passes, the
//! selections and their cuts, the solves. [`TensorMerge::kernel`] says what one chunk of
//! the coming stage computes, in this small vocabulary; the other engine computes it and
//! hands the statistics back into the same [`Stats`] slots the Rust engine's own chunks
//! fill ([`Stats::sums`] as each slot's exact total), so both take the same decisions and
//! write the same bytes. The Rust engine never runs these descriptions: it runs its own,
//! vectorized, code.
//!
//! Every number is the value the Rust engine computes with (an f32 or f64 value as f64, so
//! exact); keys are the unsigned keys of `Real::mag_key` or the order keys of f64 values.
//!
//! [`TensorMerge`]: super::TensorMerge
//! [`TensorMerge::kernel`]: super::TensorMerge::kernel
//! [`Stats`]: super::Stats
//! [`Stats::sums`]: super::Stats::sums

use crate::kernels::real::Real;
use serde::Serialize;

/// Working-precision values as the f64 values they are.
pub fn values<T: Real>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| x.to_f64()).collect()
}

/// No statistics (a stage a method never runs).
pub const NO_STATS: Kernel = Kernel::Stats { vectors: Vectors::Inputs, ops: Vec::new() };

/// Which work of a tensor a kernel is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The sample ranges ([`TensorMerge::sample_ranges`](super::TensorMerge::sample_ranges)).
    Sample,
    /// A statistics pass.
    Pass,
    /// The output pass.
    Output,
}

/// One chunk's work in a stage.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kernel", rename_all = "snake_case")]
pub enum Kernel {
    /// Statistics of a sample or a pass: `ops` over the chunk's `vectors`.
    Stats { vectors: Vectors, ops: Vec<StatOp> },
    /// `out = (Σ_i w_i x_i) / divisor`, summed from zero in input order; with `task = λ`,
    /// over the task vectors: `out = b + ((Σ_i w_i (x_i − b)) / divisor) · λ`.
    WeightedSum { weights: Vec<f64>, divisor: Option<f64>, task: Option<f64> },
    /// `out = x_0`, times `scale` when set.
    Scale { scale: Option<f64> },
    /// METHODS.md §2: `W_i = w_i · (δ_i ⊙ mask_i · s_i)` (`w_i · δ_i` where the mask keeps
    /// all); without `consensus`, `out = b + (Σ W_i [/ divisor]) · λ`; with it, the sign
    /// election of [`TaskVector`](super::task_vector) (`normalize`: divided by the agreeing
    /// weights, 1 where none).
    TaskVector {
        weights: Vec<f64>,
        scales: Vec<f64>,
        masks: Vec<Mask>,
        consensus: bool,
        normalize: bool,
        divisor: f64,
        lambda: f64,
    },
    /// `out = c1·p + c2·q [+ b]`, with `(p, q)` the base and the first model as read
    /// (`deltas = false`) or the two models' task vectors. `coef`: one pair for the whole
    /// tensor, one per column (`columns`), or none: per row of `rows` elements, from the
    /// row's Gram matrix of `(p, q)` through [`TensorMerge::row_solve`](super::TensorMerge::row_solve).
    Lerp { deltas: bool, coef: Vec<(f64, f64)>, columns: Option<u64>, rows: Option<u64>, add_base: bool },
    /// `out = Σ_i c_i δ_i` from zero in order, `+ b` with `add_base`.
    Combine { coef: Vec<f64>, add_base: bool },
    /// model_stock: `out = t·mean(x) + (1 − t)·b` (see `model_stock.rs`), `t` for the
    /// tensor, or per row of `rows` elements from the row's Gram matrix of the task
    /// vectors through [`TensorMerge::row_solve`](super::TensorMerge::row_solve).
    ModelStock { t: Option<f64>, rows: Option<u64> },
    /// sce: task vectors kept where `mask` keeps the variance, then the weighted election.
    Sce { weights: Vec<f64>, mask: Mask },
    /// ram (`lambdas` none) or ramplus_tl.
    Ram { eps: f64, lambdas: Option<Vec<f64>> },
    /// arcee_fusion: the model where the importance (rows of `row`) is at least `threshold`.
    Fusion { row: u64, threshold: f64 },
    /// nearswap.
    NearSwap { t: f64 },
}

/// What a statistics kernel computes its operations over.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Vectors {
    /// The inputs as read (the base, when there is one, then the models).
    Inputs,
    /// The models' task vectors `x_i − b` (the models, when there is no base).
    Deltas,
    /// The task vectors and their population variance over the models (sce).
    Variance,
    /// The importance of every element (arcee_fusion), rows of `row` elements.
    Importance { row: u64 },
}

/// Which keys a selection collects.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(tag = "of", rename_all = "snake_case")]
pub enum Keys {
    /// Magnitude keys of model `model`'s vector.
    Model { model: usize },
    /// Magnitude keys of the variance.
    Variance,
    /// Order keys of the importance.
    Importance,
}

/// One statistic of a chunk, into the slots of [`Stats`](super::Stats).
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum StatOp {
    /// Block sums of `|v_model|` (where `mask` keeps) into `sums[slot]`.
    L1 { model: usize, slot: usize, mask: Option<Mask> },
    /// Block sums of every pairwise product of the vectors (the base first with
    /// `with_base`, then the models) into `sums[0..]`, pair `(i, j ≥ i)` of `k` vectors
    /// at slot `i·k − i(i+1)/2 + j`.
    Gram { with_base: bool },
    /// Per column `c` of `cols`: exact sums of `p²`, `q²`, `p·q` of the two vectors into
    /// `sums[3c..3c + 3]`.
    Columns { cols: u64 },
    /// Block sums of `v_model²`, zero where `mask` drops the variance, into `sums[slot]`.
    Squares { model: usize, slot: usize, mask: Mask },
    /// The count of nonzero variances into `sums[slot]`.
    Nonzero { slot: usize },
    /// Per model `i`: its active elements (`|δ| > eps`) that another model shares into
    /// `sums[2i]`, those it alone has into `sums[2i + 1]`.
    Active { eps: f64 },
    /// A selection's statistics of `keys`.
    Collect { keys: Keys, collect: Collect },
    /// The sample's keys, as `(key, 0)` pairs into `items[slot]`.
    Sample { keys: Keys, slot: usize },
}

/// A selection's work in a pass (`methods::select`), over keys `k`.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum Collect {
    /// Count `(k >> shift) & 0xffff` into `hists[slot]`, of the keys with
    /// `k >> (shift + 16) == prefix` (every key when `prefix` is none).
    Hist { slot: usize, shift: u32, prefix: Option<u64> },
    /// Count keys under `lo_key` into `counts[slot]`; gather those in
    /// `lo_key ..= lo_key + span` as `(key, index)` into `items[slot]`, or packed
    /// `key << 32 | index` into `packed[slot]`; when more than `cap` are gathered in the
    /// pass, drop them and mark `overflow[slot]`.
    Band { slot: usize, lo_key: u64, span: u64, pack: bool, cap: u64 },
    /// Gather `(key, index)` of the keys with `k >> shift == prefix` into `items[slot]`.
    Gather { slot: usize, shift: u32, prefix: u64 },
    /// Per chunk, `(chunk start, keys equal to key)` into `items[slot]`.
    Ties { slot: usize, key: u64 },
}

/// Which elements a sparsifier keeps.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "mask", rename_all = "snake_case")]
pub enum Mask {
    All,
    Nothing,
    /// At or above the `lower` cut and at or below the `upper` one (either may be absent).
    Cuts {
        lower: Option<CutView>,
        upper: Option<CutView>,
    },
    /// DARE: `mix(stream ^ hash(j)) < threshold`.
    Random {
        stream: u32,
        threshold: u64,
    },
    /// DELLA: ranked within rows of `len` elements `inner` apart; rank `q` kept when
    /// `mix(stream ^ hash(j)) < thresholds[q]`.
    Della {
        stream: u32,
        thresholds: Vec<u64>,
        len: u64,
        inner: u64,
    },
}

/// A resolved cut: keys beyond `key` pass; of the `eq` keys equal to it, the ties of
/// ordinal (flat-index order) in `keep.0 .. keep.1`. `ties_before[c]` is the number of
/// ties before the `c`-th chunk (when the ordinals matter; else empty).
#[derive(Debug, Clone, Serialize)]
pub struct CutView {
    pub key: u64,
    pub keep: (u64, u64),
    pub eq: u64,
    pub ties_before: Vec<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The torch engine (`torch_engine/kernels.py`) reads these names and shapes.
    #[test]
    fn kernels_serialize_as_the_torch_engine_reads_them() {
        let cut = CutView { key: 7, keep: (0, 2), eq: 3, ties_before: vec![0, 1] };
        let stats = Kernel::Stats {
            vectors: Vectors::Importance { row: 5 },
            ops: vec![
                StatOp::Collect {
                    keys: Keys::Model { model: 1 },
                    collect: Collect::Hist { slot: 2, shift: 16, prefix: None },
                },
                StatOp::L1 { model: 0, slot: 1, mask: Some(Mask::Cuts { lower: Some(cut), upper: None }) },
                StatOp::Sample { keys: Keys::Variance, slot: 0 },
            ],
        };
        assert_eq!(
            serde_json::to_value(&stats).ok(),
            Some(json!({
                "kernel": "stats",
                "vectors": {"importance": {"row": 5}},
                "ops": [
                    {"op": "collect", "keys": {"of": "model", "model": 1},
                     "collect": {"mode": "hist", "slot": 2, "shift": 16, "prefix": null}},
                    {"op": "l1", "model": 0, "slot": 1, "mask": {"mask": "cuts", "upper": null,
                     "lower": {"key": 7, "keep": [0, 2], "eq": 3, "ties_before": [0, 1]}}},
                    {"op": "sample", "keys": {"of": "variance"}, "slot": 0},
                ],
            }))
        );
        let out = Kernel::NearSwap { t: 0.5 };
        assert_eq!(serde_json::to_value(&out).ok(), Some(json!({"kernel": "near_swap", "t": 0.5})));
        let vectors = Kernel::Stats { vectors: Vectors::Deltas, ops: Vec::new() };
        assert_eq!(
            serde_json::to_value(&vectors).ok(),
            Some(json!({"kernel": "stats", "vectors": "deltas", "ops": []}))
        );
    }
}
