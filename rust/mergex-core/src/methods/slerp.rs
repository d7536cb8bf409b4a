//! `slerp` and `nuslerp` (METHODS.md §4): spherical interpolation of two vectors, the
//! whole tensor (a statistics pass for the norms and the dot product, then the output
//! pass), each row (rows are whole inside a chunk: one pass) or each column (per-column
//! exact sums, then the output pass).

use super::gram;
use super::inputs::ChunkInputs;
use super::kernel::{Kernel, Stage, StatOp, Vectors as KernelVectors, NO_STATS};
use super::merge::{TensorCtx, TensorMerge};
use super::slots::ColumnSlots;
use super::spec::{spec, BaseUse, Default, MethodSpec, ParamSpec, Passes};
use super::stats::Stats;
use crate::error::Result;
use crate::kernels::real::Real;
use crate::numeric::reduce::ExactSum;

/// Interpolation coefficients `(c_a, c_b)` with `out = c_a·a + c_b·b`, in f64.
fn slerp_coefficients(t: f64, dot: f64, parallel: bool) -> (f64, f64) {
    if parallel {
        return (1.0 - t, t);
    }
    let theta = dot.acos();
    let s = theta.sin();
    (((1.0 - t) * theta).sin() / s, (t * theta).sin() / s)
}

/// `slerp`: base `a` and one other model `c`, whole tensor.
struct Slerp<T> {
    t: f64,
    coef: Option<(T, T)>,
}

pub(super) const SLERP: MethodSpec = spec!(build_slerp {
    name: "slerp",
    summary: "spherical interpolation between the base and one other model",
    base: BaseUse::Required,
    min_models: 1,
    max_models: Some(1),
    params: &[ParamSpec::number(
        "t",
        false,
        Default::Required,
        "interpolation factor: 0 gives the base, 1 the other model",
    )],
    passes: Passes::between(1, 2, "2 when the tensor spans several chunks"),
});

pub(super) const NUSLERP: MethodSpec = spec!(build_nuslerp {
    name: "nuslerp",
    summary: "spherical interpolation of two models (of their task vectors with a base)",
    base: BaseUse::Optional,
    min_models: 2,
    max_models: Some(2),
    params: &[
        ParamSpec::number("weight", true, Default::Required, "the model's weight"),
        ParamSpec::flag("nuslerp_flatten", true, "one vector per tensor"),
        ParamSpec::flag("nuslerp_row_wise", false, "with flatten off: columns instead of rows"),
    ],
    passes: Passes::between(1, 2, "2 when a vector spans several chunks"),
});

pub(super) fn build_slerp<T: Real>(ctx: &TensorCtx<'_>) -> Result<Box<dyn TensorMerge<T>>> {
    Ok(Box::new(Slerp::<T> { t: f32_of(ctx.global("t")?), coef: None }))
}

fn f32_of(v: f64) -> f64 {
    v as f32 as f64
}

impl<T: Real> TensorMerge<T> for Slerp<T> {
    fn planned_passes(&self) -> usize {
        1
    }

    fn wants_pass(&self) -> bool {
        self.coef.is_none()
    }

    fn stat_chunk(&self, x: &mut ChunkInputs<'_, T>, acc: &mut Stats) -> Result<()> {
        if let (Some(a), Some(c)) = (x.base, x.models.first()) {
            gram::accumulate(&[a, &**c], 0, acc);
        }
        Ok(())
    }

    fn kernel(&self, stage: Stage, _: &[u64]) -> Kernel {
        match (stage, self.coef) {
            (Stage::Pass, _) => {
                Kernel::Stats { vectors: KernelVectors::Inputs, ops: vec![StatOp::Gram { with_base: true }] }
            }
            (Stage::Output, Some((ca, cc))) => Kernel::Lerp {
                deltas: false,
                coef: vec![(ca.to_f64(), cc.to_f64())],
                columns: None,
                rows: None,
                add_base: false,
            },
            _ => NO_STATS,
        }
    }

    fn end_pass(&mut self, stats: Stats) -> Result<()> {
        let g = gram::matrix(2, 0, &stats);
        let norm = |v: f64| if v.sqrt() <= 1e-8 { 1.0 } else { v.sqrt() };
        let dot = (g[0][1] / (norm(g[0][0]) * norm(g[1][1]))).clamp(-1.0, 1.0);
        let (ca, cc) = slerp_coefficients(self.t, dot, dot.abs() > 0.9995);
        self.coef = Some((T::from_f64(f32_of(ca)), T::from_f64(f32_of(cc))));
        Ok(())
    }

    fn merge_chunk(&self, x: &mut ChunkInputs<'_, T>, out: &mut [T]) {
        let (Some(a), Some(c), Some((ca, cc))) = (x.base, x.models.first(), self.coef) else { return };
        for ((o, &p), &q) in out.iter_mut().zip(a).zip(c.iter()) {
            *o = ca * p + cc * q;
        }
    }
}

/// How nuslerp forms its vectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Vectors {
    /// The whole tensor.
    Flat,
    /// Each row along the last axis.
    Rows(u64),
    /// Each column `v[:, c]` (`cols` columns).
    Columns(u64),
}

struct Nuslerp<T> {
    t: f64,
    mode: Vectors,
    /// Per vector (one for Flat, one per column): coefficients.
    coef: Option<Vec<(T, T)>>,
}

pub(super) fn build_nuslerp<T: Real>(ctx: &TensorCtx<'_>) -> Result<Box<dyn TensorMerge<T>>> {
    let (w1, w2) = (f32_of(ctx.model_param(0, "weight")?), f32_of(ctx.model_param(1, "weight")?));
    let t = if (w1 + w2).abs() < 1e-6 { 0.5 } else { w2 / (w1 + w2) };
    let shape = &ctx.job.shape;
    let mode = if ctx.flag("nuslerp_flatten")? || shape.len() < 2 {
        Vectors::Flat
    } else if ctx.flag("nuslerp_row_wise")? {
        Vectors::Columns(shape[1..].iter().product())
    } else {
        Vectors::Rows(shape.last().copied().unwrap_or(1))
    };
    Ok(Box::new(Nuslerp::<T> { t, mode, coef: None }))
}

impl<T: Real> Nuslerp<T> {
    fn coefficients(&self, g: &[Vec<f64>]) -> (T, T) {
        let norm = |v: f64| v.sqrt().max(1e-7);
        let cos = (g[0][1] / (norm(g[0][0]) * norm(g[1][1]))).clamp(-1.0, 1.0);
        let (c1, c2) = slerp_coefficients(self.t, cos, 1.0 - cos * cos <= 1e-16);
        (T::from_f64(f32_of(c1)), T::from_f64(f32_of(c2)))
    }
}

impl<T: Real> TensorMerge<T> for Nuslerp<T> {
    fn planned_passes(&self) -> usize {
        usize::from(!matches!(self.mode, Vectors::Rows(_)))
    }

    fn wants_pass(&self) -> bool {
        self.coef.is_none() && !matches!(self.mode, Vectors::Rows(_))
    }

    fn align(&self) -> u64 {
        match self.mode {
            Vectors::Flat => 1,
            Vectors::Rows(m) | Vectors::Columns(m) => m.max(1),
        }
    }

    fn stat_chunk(&self, x: &mut ChunkInputs<'_, T>, acc: &mut Stats) -> Result<()> {
        x.to_deltas();
        let (Some(v1), Some(v2)) = (x.models.first(), x.models.get(1)) else { return Ok(()) };
        match self.mode {
            Vectors::Flat => gram::accumulate(&[&**v1, &**v2], 0, acc),
            Vectors::Columns(cols) => {
                // Per column: ‖v1‖², ‖v2‖², v1·v2 as exact sums (each product is exact in f64).
                let cols = cols as usize;
                if acc.sums.len() < ColumnSlots::count(cols) {
                    acc.sums.resize(ColumnSlots::count(cols), ExactSum::default());
                }
                for (j, (&p, &q)) in v1.iter().zip(v2.iter()).enumerate() {
                    let c = j % cols;
                    let (p, q) = (p.to_f64(), q.to_f64());
                    let at = ColumnSlots::column(c);
                    acc.sums[at].add(p * p);
                    acc.sums[at + 1].add(q * q);
                    acc.sums[at + 2].add(p * q);
                }
            }
            Vectors::Rows(_) => {}
        }
        Ok(())
    }

    fn kernel(&self, stage: Stage, _: &[u64]) -> Kernel {
        let op = match self.mode {
            Vectors::Columns(cols) => StatOp::Columns { cols },
            _ => StatOp::Gram { with_base: false },
        };
        let coef = self.coef.iter().flatten().map(|(a, b)| (a.to_f64(), b.to_f64())).collect();
        match stage {
            Stage::Pass => Kernel::Stats { vectors: KernelVectors::Deltas, ops: vec![op] },
            Stage::Output => Kernel::Lerp {
                deltas: true,
                coef,
                columns: if let Vectors::Columns(c) = self.mode { Some(c) } else { None },
                rows: if let Vectors::Rows(m) = self.mode { Some(m.max(1)) } else { None },
                add_base: true,
            },
            Stage::Sample => NO_STATS,
        }
    }

    fn row_solve(&self, gram: &[Vec<f64>]) -> Vec<f64> {
        let (c1, c2) = self.coefficients(gram);
        vec![c1.to_f64(), c2.to_f64()]
    }

    fn end_pass(&mut self, stats: Stats) -> Result<()> {
        self.coef = Some(match self.mode {
            Vectors::Columns(cols) => (0..cols as usize)
                .map(|c| {
                    let at = ColumnSlots::column(c);
                    let (a, b, d) = (stats.total(at), stats.total(at + 1), stats.total(at + 2));
                    self.coefficients(&[vec![a, d], vec![d, b]])
                })
                .collect(),
            _ => vec![self.coefficients(&gram::matrix(2, 0, &stats))],
        });
        Ok(())
    }

    fn merge_chunk(&self, x: &mut ChunkInputs<'_, T>, out: &mut [T]) {
        x.to_deltas();
        let (Some(v1), Some(v2)) = (x.models.first(), x.models.get(1)) else { return };
        match (self.mode, &self.coef) {
            (Vectors::Rows(m), _) => {
                let m = m.max(1) as usize;
                for ((o, a), b) in out.chunks_mut(m).zip(v1.chunks(m)).zip(v2.chunks(m)) {
                    let (c1, c2) = self.coefficients(&gram::local(&[a, b]));
                    for ((o, &p), &q) in o.iter_mut().zip(a).zip(b) {
                        *o = c1 * p + c2 * q;
                    }
                }
            }
            (Vectors::Columns(cols), Some(coef)) => {
                let cols = cols.max(1) as usize;
                for (j, ((o, &p), &q)) in out.iter_mut().zip(v1.iter()).zip(v2.iter()).enumerate() {
                    if let Some(&(c1, c2)) = coef.get(j % cols) {
                        *o = c1 * p + c2 * q;
                    }
                }
            }
            (_, Some(coef)) => {
                let Some(&(c1, c2)) = coef.first() else { return };
                for ((o, &p), &q) in out.iter_mut().zip(v1.iter()).zip(v2.iter()) {
                    *o = c1 * p + c2 * q;
                }
            }
            _ => {}
        }
        if let Some(b) = x.base {
            for (o, &bv) in out.iter_mut().zip(b) {
                *o += bv;
            }
        }
    }
}
