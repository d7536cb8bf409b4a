//! `arcee_fusion` (METHODS.md §5): take the other model's value where its importance —
//! `|x − b|` times the row's KL divergence between the softmaxes of x and b — is an upper
//! outlier (`≥ median + 1.5·IQR` over the tensor). The quartiles are exact order
//! statistics found by radix selection over the chunks (rows whole inside a chunk).

use super::inputs::ChunkInputs;
use super::kernel::{Kernel, Keys, Stage, StatOp, Vectors, NO_STATS};
use super::merge::{TensorCtx, TensorMerge};
use super::select::{Selector, Side};
use super::spec::{spec, BaseUse, MethodSpec, Passes};
use super::stats::Stats;
use crate::error::Result;
use crate::kernels::real::Real;

struct Fusion {
    row: u64,
    quartiles: [Selector; 3],
    threshold: Option<f64>,
}

pub(super) const ARCEE_FUSION: MethodSpec = spec!(build {
    name: "arcee_fusion",
    summary: "take the other model's values where their importance is an outlier",
    base: BaseUse::Required,
    min_models: 1,
    max_models: Some(1),
    params: &[],
    passes: Passes::exactly(3),
});

pub(super) fn build<T: Real>(ctx: &TensorCtx<'_>) -> Result<Box<dyn TensorMerge<T>>> {
    let shape = &ctx.job.shape;
    let n: u64 = shape.iter().product();
    let row = if shape.len() >= 2 { shape.last().copied().unwrap_or(1) } else { n }.max(1);
    let cap = (ctx.ram_budget / 4 / 16 / 3).max(4096);
    let last = n.saturating_sub(1) as f64;
    let q = |f: f64| Selector::new((f * last).floor() as u64, Side::Value, 64, cap);
    Ok(Box::new(Fusion { row, quartiles: [q(0.25), q(0.5), q(0.75)], threshold: None }))
}

/// A key that orders f64 values numerically: a row's KL can round below zero, making its
/// importances negative, and they must rank below the positive ones (METHODS.md: the
/// quartiles of the sorted values). Raw bits would rank them above.
fn order_key(v: f64) -> u64 {
    let b = v.to_bits();
    if b >> 63 != 0 {
        !b
    } else {
        b | 1 << 63
    }
}

/// The value of an [`order_key`].
fn key_value(k: u64) -> f64 {
    if k >> 63 != 0 {
        f64::from_bits(k & !(1 << 63))
    } else {
        f64::from_bits(!k)
    }
}

/// Importance of every element of whole rows, in f64.
fn importance<T: Real>(b: &[T], x: &[T], row: usize, imp: &mut Vec<f64>) {
    imp.clear();
    for (br, xr) in b.chunks(row).zip(x.chunks(row)) {
        let kl = kl_divergence(xr, br);
        imp.extend(br.iter().zip(xr).map(|(&bv, &xv)| (xv.to_f64() - bv.to_f64()).abs() * kl));
    }
}

/// KL(p ‖ q) with p = softmax(x) + 1e-8, q = softmax(b) + 1e-8, in f64.
fn kl_divergence<T: Real>(x: &[T], b: &[T]) -> f64 {
    let softmax = |v: &[T]| -> Vec<f64> {
        let max = v.iter().map(|t| t.to_f64()).fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = v.iter().map(|t| (t.to_f64() - max).exp()).collect();
        let s: f64 = e.iter().sum();
        e.into_iter().map(|v| v / s + 1e-8).collect()
    };
    let (p, q) = (softmax(x), softmax(b));
    p.iter().zip(&q).map(|(&p, &q)| p * (p / q).ln()).sum()
}

impl<T: Real> TensorMerge<T> for Fusion {
    fn planned_passes(&self) -> usize {
        2
    }

    fn wants_pass(&self) -> bool {
        self.threshold.is_none()
    }

    fn align(&self) -> u64 {
        self.row
    }

    fn stat_chunk(&self, x: &mut ChunkInputs<'_, T>, acc: &mut Stats) -> Result<()> {
        let (Some(b), Some(m)) = (x.base, x.models.first()) else { return Ok(()) };
        let mut imp = Vec::new();
        importance(b, m, self.row as usize, &mut imp);
        for (slot, sel) in self.quartiles.iter().enumerate() {
            if sel.pending() {
                sel.collect(slot, x.start, imp.iter().map(|&v| order_key(v)), acc);
            }
        }
        Ok(())
    }

    fn kernel(&self, stage: Stage, _: &[u64]) -> Kernel {
        match (stage, self.threshold) {
            (Stage::Pass, _) => {
                let ops = self.quartiles.iter().enumerate().filter_map(|(slot, sel)| sel.describe(slot));
                let ops = ops.map(|collect| StatOp::Collect { keys: Keys::Importance, collect }).collect();
                Kernel::Stats { vectors: Vectors::Importance { row: self.row }, ops }
            }
            (Stage::Output, Some(threshold)) => Kernel::Fusion { row: self.row, threshold },
            _ => NO_STATS,
        }
    }

    fn end_pass(&mut self, mut stats: Stats) -> Result<()> {
        for (slot, sel) in self.quartiles.iter_mut().enumerate() {
            if sel.pending() {
                sel.advance(slot, &mut stats);
            }
        }
        let values: Vec<f64> =
            self.quartiles.iter().filter_map(|s| s.cut().map(|c| key_value(c.key))).collect();
        if let [q1, median, q3] = values[..] {
            self.threshold = Some(median + 1.5 * (q3 - q1));
        }
        Ok(())
    }

    fn merge_chunk(&self, x: &mut ChunkInputs<'_, T>, out: &mut [T]) {
        let (Some(b), Some(m), Some(thr)) = (x.base, x.models.first(), self.threshold) else { return };
        let mut imp = Vec::new();
        importance(b, m, self.row as usize, &mut imp);
        for (((o, &bv), &xv), &i) in out.iter_mut().zip(b).zip(m.iter()).zip(&imp) {
            *o = if i >= thr { bv + (xv - bv) } else { bv };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_keys_sort_numerically() {
        let mut v = [3.5, -1e-300, 0.0, -2.0, 1e-17, -0.0, f64::MIN_POSITIVE, -7.25];
        let mut keys: Vec<u64> = v.iter().map(|&x| order_key(x)).collect();
        keys.sort_unstable();
        v.sort_by(f64::total_cmp);
        let back: Vec<f64> = keys.iter().map(|&k| key_value(k)).collect();
        assert_eq!(back.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), v.map(f64::to_bits).to_vec());
    }

    #[test]
    fn kl_of_equal_rows_is_zero_and_positive_otherwise() {
        let a = [0.1f32, 0.5, -0.3];
        assert!(kl_divergence(&a, &a).abs() < 1e-15);
        assert!(kl_divergence(&a, &[0.4f32, -0.5, 0.3]) > 0.0);
    }
}
