//! `sce` (METHODS.md §5): select the elements where the models' task vectors vary most
//! (exact top-k of the per-element variance), elect signs on the unweighted task vectors,
//! and weight each model by the mean square of its (selected) task vector.

use super::inputs::ChunkInputs;
use super::kernel::{values, Collect, Kernel, Keys, Mask, Stage, StatOp, Vectors, NO_STATS};
use super::merge::{TensorCtx, TensorMerge};
use super::select::{Selector, Side};
use super::slots::{SceSlots, TaskSlots};
use super::sparsify::Sparsifier;
use super::spec::{spec, BaseUse, Default, MethodSpec, ParamSpec, Passes};
use super::stats::Stats;
use crate::error::Result;
use crate::kernels::real::Real;
use crate::numeric::reduce::block_sum;

struct Sce<T> {
    /// Models besides the base.
    k: usize,
    topk: f64,
    n: u64,
    /// The variance selection: `None` before the first pass (or without selection).
    select: Option<Sparsifier>,
    /// Matrix weights c_i, normalized, once known.
    weights: Option<Vec<T>>,
    gather_cap: u64,
    pass: usize,
}

pub(super) const SCE: MethodSpec = spec!(build {
    name: "sce",
    summary: "select by variance, elect signs, weight by mean square",
    base: BaseUse::Required,
    min_models: 1,
    max_models: None,
    params: &[ParamSpec::number(
        "select_topk",
        false,
        Default::Value(1.0),
        "fraction of highest-variance elements kept",
    )
    .within(0.0, 1.0)],
    passes: Passes::between(1, 4, "more when select_topk < 1 and a cut's band misses"),
});

pub(super) fn build<T: Real>(ctx: &TensorCtx<'_>) -> Result<Box<dyn TensorMerge<T>>> {
    let topk = ctx.global("select_topk")?;
    let n = ctx.job.shape.iter().product();
    let select = (topk >= 1.0).then_some(Sparsifier::All);
    Ok(Box::new(Sce::<T> {
        k: ctx.job.inputs.len(),
        topk,
        n,
        select,
        weights: None,
        gather_cap: (ctx.ram_budget / 4 / 16).max(4096),
        pass: 0,
    }))
}

/// Task vectors in place; per element the population variance over models into `var`.
fn variance<T: Real>(x: &mut ChunkInputs<'_, T>, var: &mut Vec<T>) {
    let n = x.models.first().map_or(0, |m| m.len());
    x.to_deltas();
    let k = T::from_f64(x.models.len() as f64);
    var.clear();
    var.resize(n, T::ZERO);
    for m in x.models.iter() {
        for (s, &v) in var.iter_mut().zip(m.iter()) {
            *s += v;
        }
    }
    let mut dev = vec![T::ZERO; n];
    for (d, &s) in dev.iter_mut().zip(var.iter()) {
        *d = s / k; // the mean
    }
    var.fill(T::ZERO);
    for m in x.models.iter() {
        for ((s, &v), &mean) in var.iter_mut().zip(m.iter()).zip(&dev) {
            let d = v - mean;
            *s += d * d;
        }
    }
    for s in var.iter_mut() {
        *s = *s / k;
    }
}

impl<T: Real> Sce<T> {
    /// Zero the unselected elements of every task vector.
    fn apply_selection(&self, x: &mut ChunkInputs<'_, T>, var: &[T]) {
        if let Some(sel) = &self.select {
            if !matches!(sel, Sparsifier::All) {
                let mut keep = Vec::new();
                sel.mask(x.start, var, &[], &mut keep);
                for m in x.models.iter_mut() {
                    for (v, &k) in m.iter_mut().zip(&keep) {
                        if !k {
                            *v = T::ZERO;
                        }
                    }
                }
            }
        }
    }
}

impl<T: Real> TensorMerge<T> for Sce<T> {
    fn planned_passes(&self) -> usize {
        if self.topk >= 1.0 {
            1
        } else {
            3
        }
    }

    fn wants_pass(&self) -> bool {
        self.weights.is_none()
    }

    fn stat_chunk(&self, x: &mut ChunkInputs<'_, T>, acc: &mut Stats) -> Result<()> {
        let mut var = Vec::new();
        variance(x, &mut var);
        match &self.select {
            None => {
                // First pass: count v ≠ 0 and histogram v (level 0 of the selection).
                let nonzero = var.iter().filter(|&&v| v != T::ZERO).count() as u64;
                acc.sum(SceSlots::NONZERO).add(nonzero as f64);
                let probe = Selector::new(0, Side::TopK, T::KEY_BITS, self.gather_cap);
                probe.collect(
                    TaskSlots::cut(SceSlots::SELECTION, 0),
                    x.start,
                    var.iter().map(|v| v.mag_key()),
                    acc,
                );
            }
            Some(sel) if sel.pending() => sel.collect(SceSlots::SELECTION, x.start, &var, acc),
            Some(_) => {
                self.apply_selection(x, &var);
                for (i, m) in x.models.iter().enumerate() {
                    block_sum(m.iter().map(|&v| v.to_f64() * v.to_f64()), acc.sum(SceSlots::squares(i)));
                }
            }
        }
        Ok(())
    }

    fn kernel(&self, stage: Stage, starts: &[u64]) -> Kernel {
        let keys = Keys::Variance;
        let ops = match (&self.select, stage) {
            (_, Stage::Sample) => return NO_STATS,
            (select, Stage::Output) => {
                let mask = select.as_ref().map_or(Mask::All, |s| s.view(starts));
                return Kernel::Sce { weights: values(self.weights.as_deref().unwrap_or(&[])), mask };
            }
            (None, Stage::Pass) => {
                let collect = Collect::Hist {
                    slot: TaskSlots::cut(SceSlots::SELECTION, 0),
                    shift: T::KEY_BITS - 16,
                    prefix: None,
                };
                vec![StatOp::Nonzero { slot: SceSlots::NONZERO }, StatOp::Collect { keys, collect }]
            }
            (Some(sel), Stage::Pass) if sel.pending() => sel
                .describe(SceSlots::SELECTION)
                .into_iter()
                .map(|collect| StatOp::Collect { keys, collect })
                .collect(),
            (Some(sel), Stage::Pass) => (0..self.k)
                .map(|model| StatOp::Squares {
                    model,
                    slot: SceSlots::squares(model),
                    mask: sel.view(starts),
                })
                .collect(),
        };
        Kernel::Stats { vectors: Vectors::Variance, ops }
    }

    fn end_pass(&mut self, mut stats: Stats) -> Result<()> {
        self.pass += 1;
        match &mut self.select {
            None => {
                let nonzero = stats.total(SceSlots::NONZERO) as u64;
                let k = (self.topk * nonzero as f64).floor() as u64;
                self.select = Some(if k == 0 {
                    Sparsifier::Nothing
                } else if k >= self.n {
                    Sparsifier::All
                } else {
                    let mut sel = Selector::new(self.n - k, Side::TopK, T::KEY_BITS, self.gather_cap);
                    sel.advance(TaskSlots::cut(SceSlots::SELECTION, 0), &mut stats);
                    Sparsifier::Select { lower: Some(Box::new(sel)), upper: None }
                });
            }
            Some(sel) if sel.pending() => sel.advance(SceSlots::SELECTION, &mut stats),
            Some(_) => {
                let k = self.k;
                let c: Vec<f64> =
                    (0..k).map(|i| stats.total(SceSlots::squares(i)) / self.n.max(1) as f64).collect();
                let sum: f64 = c.iter().sum();
                let c: Vec<f64> = if sum < 1e-6 {
                    vec![1.0 / k.max(1) as f64; k]
                } else {
                    c.iter().map(|v| v / sum).collect()
                };
                self.weights = Some(c.into_iter().map(|v| T::from_f64(v as f32 as f64)).collect());
            }
        }
        Ok(())
    }

    fn merge_chunk(&self, x: &mut ChunkInputs<'_, T>, out: &mut [T]) {
        let mut var = Vec::new();
        variance(x, &mut var);
        self.apply_selection(x, &var);
        let Some(base) = x.base else { return };
        let weights = self.weights.as_deref().unwrap_or(&[]);
        // The TIES election on the unweighted task vectors.
        out.fill(T::ZERO);
        for m in x.models.iter() {
            for (o, &v) in out.iter_mut().zip(m.iter()) {
                *o += v;
            }
        }
        let mut den = vec![T::ZERO; out.len()];
        let mut num = vec![T::ZERO; out.len()];
        for (m, &c) in x.models.iter().zip(weights) {
            for (((n, d), &v), &s) in num.iter_mut().zip(den.iter_mut()).zip(m.iter()).zip(out.iter()) {
                let agree = if s >= T::ZERO { v > T::ZERO } else { v < T::ZERO };
                if agree {
                    *n += c * v;
                    *d += c;
                }
            }
        }
        let floor = T::from_f64(1e-6f32 as f64);
        for (((o, &b), &n), &d) in out.iter_mut().zip(base).zip(&num).zip(&den) {
            *o = b + n / if d > floor { d } else { floor };
        }
    }
}
