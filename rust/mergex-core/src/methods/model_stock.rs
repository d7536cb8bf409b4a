//! `model_stock` (METHODS.md §4): interpolate between the base and the models' mean by
//! the average cosine between their task vectors — over the whole tensor (a statistics
//! pass for the Gram matrix of the task vectors) or per row with `filter_wise` (rows are
//! whole inside a chunk: one pass).

use super::gram;
use super::inputs::ChunkInputs;
use super::kernel::{Kernel, Stage, StatOp, Vectors, NO_STATS};
use super::merge::{TensorCtx, TensorMerge};
use super::spec::{spec, BaseUse, MethodSpec, ParamSpec, Passes};
use super::stats::Stats;
use crate::error::Result;
use crate::kernels::real::Real;

struct ModelStock<T> {
    /// Models besides the base.
    n: usize,
    /// Row length when `filter_wise`.
    rows: Option<u64>,
    t: Option<T>,
}

pub(super) const MODEL_STOCK: MethodSpec = spec!(build {
    name: "model_stock",
    summary: "interpolate base and mean by the task vectors' average cosine",
    base: BaseUse::Required,
    min_models: 2,
    max_models: None,
    params: &[ParamSpec::flag("filter_wise", false, "one factor per row instead of per tensor")],
    passes: Passes::between(1, 2, "2 when the tensor spans several chunks"),
});

pub(super) fn build<T: Real>(ctx: &TensorCtx<'_>) -> Result<Box<dyn TensorMerge<T>>> {
    let rows = ctx.flag("filter_wise")?.then(|| ctx.job.shape.last().copied().unwrap_or(1).max(1));
    Ok(Box::new(ModelStock::<T> { n: ctx.job.inputs.len(), rows, t: None }))
}

/// The interpolation factor from the Gram matrix of the task vectors.
fn factor(g: &[Vec<f64>]) -> f64 {
    let n = g.len();
    let mut total = 0.0;
    let mut pairs = 0usize;
    for i in 0..n {
        for j in i + 1..n {
            let den = (g[i][i].max(0.0).sqrt() * g[j][j].max(0.0).sqrt()).max(1e-6);
            total += (g[i][j] / den).clamp(-1.0, 1.0);
            pairs += 1;
        }
    }
    let c = if pairs == 0 { 0.0 } else { total / pairs as f64 };
    let nf = n as f64;
    let den = 1.0 + (nf - 1.0) * c;
    if den.abs() < 1e-6 {
        0.0
    } else {
        nf * c / den
    }
}

fn deltas<T: Real>(base: &[T], models: &[&mut [T]]) -> Vec<Vec<T>> {
    models.iter().map(|m| m.iter().zip(base).map(|(&v, &b)| v - b).collect()).collect()
}

/// out = t · mean(x_i) + (1 − t) · b, with mean = (Σ x_i) / N in config order.
fn interpolate<T: Real>(t: T, base: &[T], models: &[&mut [T]], out: &mut [T]) {
    let n = T::from_f64(models.len() as f64);
    let one_minus = T::ONE - t;
    out.fill(T::ZERO);
    for m in models {
        for (o, &v) in out.iter_mut().zip(m.iter()) {
            *o += v;
        }
    }
    for (o, &b) in out.iter_mut().zip(base) {
        *o = t * (*o / n) + one_minus * b;
    }
}

impl<T: Real> TensorMerge<T> for ModelStock<T> {
    fn planned_passes(&self) -> usize {
        usize::from(self.rows.is_none())
    }

    fn wants_pass(&self) -> bool {
        self.rows.is_none() && self.t.is_none()
    }

    fn align(&self) -> u64 {
        self.rows.unwrap_or(1)
    }

    fn stat_chunk(&self, x: &mut ChunkInputs<'_, T>, acc: &mut Stats) -> Result<()> {
        let Some(base) = x.base else { return Ok(()) };
        let d = deltas(base, &x.models);
        let v: Vec<&[T]> = d.iter().map(|v| &v[..]).collect();
        gram::accumulate(&v, 0, acc);
        Ok(())
    }

    fn kernel(&self, stage: Stage, _: &[u64]) -> Kernel {
        match stage {
            Stage::Pass => {
                Kernel::Stats { vectors: Vectors::Deltas, ops: vec![StatOp::Gram { with_base: false }] }
            }
            Stage::Output => Kernel::ModelStock { t: self.t.map(|t| t.to_f64()), rows: self.rows },
            Stage::Sample => NO_STATS,
        }
    }

    fn row_solve(&self, gram: &[Vec<f64>]) -> Vec<f64> {
        vec![factor(gram) as f32 as f64]
    }

    fn end_pass(&mut self, stats: Stats) -> Result<()> {
        self.t = Some(T::from_f64(factor(&gram::matrix(self.n, 0, &stats)) as f32 as f64));
        Ok(())
    }

    fn merge_chunk(&self, x: &mut ChunkInputs<'_, T>, out: &mut [T]) {
        let Some(base) = x.base else { return };
        match (self.rows, self.t) {
            (Some(m), _) => {
                let m = m as usize;
                let mut start = 0;
                while start < out.len() {
                    let end = (start + m).min(out.len());
                    let rows: Vec<&mut [T]> = x.models.iter_mut().map(|v| &mut v[start..end]).collect();
                    let d = deltas(&base[start..end], &rows);
                    let v: Vec<&[T]> = d.iter().map(|v| &v[..]).collect();
                    let t = T::from_f64(factor(&gram::local(&v)) as f32 as f64);
                    interpolate(t, &base[start..end], &rows, &mut out[start..end]);
                    start = end;
                }
            }
            (None, Some(t)) => interpolate(t, base, &x.models, out),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn factor_follows_the_spec() {
        // Two orthogonal task vectors: c = 0, t = 0 (the base).
        assert_eq!(factor(&[vec![1.0, 0.0], vec![0.0, 1.0]]), 0.0);
        // Identical directions: c = 1, t = N·1/(1 + N − 1) = 1.
        assert!((factor(&[vec![1.0, 2.0], vec![2.0, 4.0]]) - 1.0).abs() < 1e-12);
        // Singular denominator: N = 2, c = −1 → den = 0 → t = 0.
        assert_eq!(factor(&[vec![1.0, -1.0], vec![-1.0, 1.0]]), 0.0);
    }
}
