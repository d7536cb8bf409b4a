//! The generalized task-arithmetic pipeline (METHODS.md §2) shared by task_arithmetic,
//! ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties, della and della_linear:
//! task vectors δ_i = x_i − b, sparsified per model (optionally L1-rescaled), weighted,
//! combined with or without the TIES sign election, normalized, scaled by λ, added to b.

use super::inputs::ChunkInputs;
use super::kernel::{values, Kernel, Keys, Stage, StatOp, Vectors};
use super::l1::reduce_abs;
use super::merge::{param, TensorCtx, TensorMerge, WeightedSum};
use super::slots::TaskSlots;
use super::sparsify::{Kind, Setup, Sparsifier};
use super::spec::{spec, BaseUse, Default, MethodSpec, ParamSpec, Passes};
use super::stats::Stats;
use crate::error::{Error, Result};
use crate::format::dtype::Dtype;
use crate::kernels::real::Real;
use crate::kernels::{Keep, TiesInputs, TiesValues};
use crate::numeric::random::index_hashes;
use crate::numeric::reduce::fold;
use rayon::prelude::*;

mod stored;

/// The switches that tell the family's methods apart.
#[derive(Debug, Clone, Copy)]
pub(super) struct Family {
    sparsify: Kind,
    consensus: bool,
}

const WEIGHT: ParamSpec = ParamSpec::number("weight", true, Default::Required, "the model's weight");
const DENSITY: ParamSpec =
    ParamSpec::number("density", true, Default::Value(1.0), "fraction of the task vector kept").at_least(0.0);
const GAMMA: ParamSpec =
    ParamSpec::number("gamma", true, Default::Value(0.01), "fraction of top outliers dropped").at_least(0.0);
const EPSILON: ParamSpec =
    ParamSpec::number("epsilon", true, Default::Value(0.15), "spread of keep probabilities");
const LAMBDA: ParamSpec =
    ParamSpec::number("lambda", false, Default::Value(1.0), "scale of the merged task vector");
const INT8_MASK: ParamSpec =
    ParamSpec::flag("int8_mask", false, "accepted for mergekit compatibility; no effect");
const NORMALIZE: ParamSpec = ParamSpec::flag("normalize", true, "divide by the summed weights");
const NO_NORMALIZE: ParamSpec = ParamSpec::flag("normalize", false, "divide by the summed weights");
const RESCALE: ParamSpec = ParamSpec::flag("rescale", true, "L1-rescale what the sparsifier kept");
const NO_RESCALE: ParamSpec = ParamSpec::flag("rescale", false, "L1-rescale what the sparsifier kept");

/// One member of the family: its switches, builders and spec.
macro_rules! member {
    ($spec:ident, $build:ident, $name:literal, $summary:literal, $family:expr, [$($param:expr),*], $passes:expr) => {
        fn $build<T: Real>(ctx: &TensorCtx<'_>) -> Result<Box<dyn TensorMerge<T>>> {
            build($family, ctx)
        }

        pub(super) const $spec: MethodSpec = spec!($build {
            name: $name,
            summary: $summary,
            base: BaseUse::Required,
            min_models: 1,
            max_models: None,
            params: &[$($param),*],
            passes: $passes,
        });
    };
}

const SELECTION: Passes = Passes::between(1, 3, "1 at density 1; 3 when a cut's band misses its sample");
const RANDOM: Passes = Passes::between(1, 2, "1 at density 1");

member!(
    TASK_ARITHMETIC,
    build_task_arithmetic,
    "task_arithmetic",
    "base + λ · Σ w_i (x_i - base)",
    Family { sparsify: Kind::None, consensus: false },
    [
        WEIGHT,
        NO_NORMALIZE,
        ParamSpec::flag("rescale", false, "no effect without a sparsifier"),
        LAMBDA,
        INT8_MASK
    ],
    Passes::exactly(1)
);
member!(
    TIES,
    build_ties,
    "ties",
    "TIES: magnitude top-k, sign election",
    Family { sparsify: Kind::Magnitude, consensus: true },
    [WEIGHT, DENSITY, NORMALIZE, NO_RESCALE, LAMBDA, INT8_MASK],
    SELECTION
);
member!(
    DARE_TIES,
    build_dare_ties,
    "dare_ties",
    "DARE random drops with sign election",
    Family { sparsify: Kind::Random, consensus: true },
    [WEIGHT, DENSITY, NO_NORMALIZE, RESCALE, LAMBDA, INT8_MASK],
    RANDOM
);
member!(
    DARE_LINEAR,
    build_dare_linear,
    "dare_linear",
    "DARE random drops",
    Family { sparsify: Kind::Random, consensus: false },
    [WEIGHT, DENSITY, NO_NORMALIZE, RESCALE, LAMBDA, INT8_MASK],
    RANDOM
);
member!(
    BREADCRUMBS,
    build_breadcrumbs,
    "breadcrumbs",
    "drop the smallest and the largest outliers",
    Family { sparsify: Kind::Outliers, consensus: false },
    [WEIGHT, DENSITY, GAMMA, NO_NORMALIZE, NO_RESCALE, LAMBDA, INT8_MASK],
    SELECTION
);
member!(
    BREADCRUMBS_TIES,
    build_breadcrumbs_ties,
    "breadcrumbs_ties",
    "breadcrumbs with sign election",
    Family { sparsify: Kind::Outliers, consensus: true },
    [WEIGHT, DENSITY, GAMMA, NO_NORMALIZE, NO_RESCALE, LAMBDA, INT8_MASK],
    SELECTION
);
member!(
    DELLA,
    build_della,
    "della",
    "DELLA magnitude-ranked random drops, sign election",
    Family { sparsify: Kind::Della, consensus: true },
    [WEIGHT, DENSITY, EPSILON, NORMALIZE, RESCALE, LAMBDA, INT8_MASK],
    RANDOM
);
member!(
    DELLA_LINEAR,
    build_della_linear,
    "della_linear",
    "DELLA without sign election",
    Family { sparsify: Kind::Della, consensus: false },
    [WEIGHT, DENSITY, EPSILON, NO_NORMALIZE, RESCALE, LAMBDA, INT8_MASK],
    RANDOM
);

struct TaskVector<T> {
    family: Family,
    weights: Vec<T>,
    lambda: T,
    normalize: bool,
    rescale: bool,
    sparsifiers: Vec<Sparsifier>,
    /// Rescale factor per model (1 until known).
    scales: Vec<T>,
    /// Σ w_i without consensus (f32, config order), 1 where |Σ w_i| < 1e-8.
    divisor: T,
    /// Statistics passes done.
    pass: usize,
    /// L1 of the kept elements of selections computed.
    selected_l1: bool,
    /// ‖δ_i‖₁ per model, from the first pass.
    l1_all: Vec<f64>,
    align: u64,
    /// Elements of the tensor.
    numel: u64,
    /// Statistics passes the selections are expected to take: one when a sample is
    /// expected to narrow every cut to a band that fits in memory, else two.
    selection_passes: usize,
}

/// Build one member of the family for one tensor.
fn build<T: Real>(family: Family, ctx: &TensorCtx<'_>) -> Result<Box<dyn TensorMerge<T>>> {
    let job = ctx.job;
    let m = job.inputs.len();
    // Breadcrumbs cuts twice per model, the others at most once.
    let selectors = if family.sparsify == Kind::Outliers { 2 } else { 1 } * m.max(1) as u64;
    // Half the budget may hold selection candidates (16 bytes each): chunks are streamed
    // in sub-blocks, so their buffers take far less than the rest.
    let gather_cap = (ctx.ram_budget / 2 / 16 / selectors).max(4096);
    let mut weights = Vec::with_capacity(m);
    let mut sparsifiers = Vec::with_capacity(m);
    let mut align = 1;
    for (i, input) in job.inputs.iter().enumerate() {
        weights.push(param::<T>(ctx.model_param(i, "weight")?));
        if family.sparsify == Kind::None {
            sparsifiers.push(Sparsifier::All);
            continue;
        }
        let d = f32_param(ctx.model_param(i, "density")?);
        let gamma = f32_param(ctx.model_param_opt(i, "gamma").unwrap_or(0.0));
        let eps = f32_param(ctx.model_param_opt(i, "epsilon").unwrap_or(0.0));
        if family.sparsify == Kind::Della && d < 1.0 && !(d - eps > 0.0 && d + eps < 1.0) {
            return Err(model_error(
                ctx,
                i,
                "epsilon",
                format!("della needs 0 < density − epsilon and density + epsilon < 1, got density {d}, epsilon {eps}"),
            ));
        }
        let setup = Setup {
            tensor: &job.name,
            shape: &job.shape,
            seed: ctx.seed,
            position: input.position,
            gather_cap,
            key_bits: T::KEY_BITS,
        };
        let s = Sparsifier::new(family.sparsify, d, gamma, eps, setup);
        if let Sparsifier::Della { rows, .. } = &s {
            align = rows.group();
        }
        sparsifiers.push(s);
    }
    let mut sum = T::ZERO;
    for &w in &weights {
        sum += w;
    }
    let tiny = T::from_f64(1e-8);
    let divisor = if sum < tiny && -sum < tiny { T::ONE } else { sum };
    let numel: u64 = job.shape.iter().product();
    let pending = sparsifiers.iter().filter(|s| s.pending());
    let selection_passes = if pending.clone().all(|s| s.wants_sample(numel)) { 1 } else { 2 };
    Ok(Box::new(TaskVector {
        family,
        weights,
        lambda: param(ctx.global("lambda")?),
        normalize: ctx.flag("normalize")?,
        rescale: ctx.flag("rescale")?,
        scales: vec![T::ONE; m],
        sparsifiers,
        divisor,
        pass: 0,
        selected_l1: false,
        l1_all: vec![0.0; m],
        align,
        numel,
        selection_passes,
    }))
}

fn f32_param(v: f64) -> f64 {
    v as f32 as f64
}

fn model_error(ctx: &TensorCtx<'_>, i: usize, name: &str, message: String) -> Error {
    Error::InvalidParameter {
        name: name.into(),
        tensor: ctx.job.name.clone(),
        model: ctx.job.inputs.get(i).and_then(|r| ctx.models.get(r.model)).map(|p| p.to_path_buf()),
        message,
    }
}

impl<T: Real> TaskVector<T> {
    fn rescaling(&self) -> bool {
        self.rescale && self.sparsifiers.iter().any(Sparsifier::drops)
    }

    fn selecting(&self) -> bool {
        self.sparsifiers.iter().any(Sparsifier::pending)
    }

    /// Selections resolved but the L1 of what they keep still unknown.
    fn needs_selected_l1(&self) -> bool {
        self.rescaling() && !self.selected_l1 && self.sparsifiers.iter().any(Sparsifier::is_selection)
    }

    /// The L1 rescale factor ‖δ‖₁ / ‖δ ⊙ mask‖₁, rounded to f32 (1 if either is tiny).
    fn scale_from(&mut self, i: usize, stats: &Stats) {
        let all = self.l1_all.get(i).copied().unwrap_or(0.0);
        let kept = stats.total(TaskSlots::l1_kept(i));
        if let Some(s) = self.scales.get_mut(i) {
            *s = if all < 1e-7 || kept < 1e-7 { T::ONE } else { T::from_f64((all / kept) as f32 as f64) };
        }
    }
}

impl<T: Real> TensorMerge<T> for TaskVector<T> {
    fn planned_passes(&self) -> usize {
        let selection = if self.selecting() { self.selection_passes } else { 0 };
        let l1 = if self.rescaling() { 1 } else { 0 };
        if selection > 0 {
            selection + if self.needs_selected_l1() { 1 } else { 0 }
        } else {
            l1
        }
    }

    fn wants_pass(&self) -> bool {
        (self.pass == 0 && self.rescaling()) || self.selecting() || self.needs_selected_l1()
    }

    fn align(&self) -> u64 {
        self.align
    }

    fn sample_ranges(&self) -> Vec<(u64, u64)> {
        let wanted = self.pass == 0 && self.sparsifiers.iter().any(|s| s.wants_sample(self.numel));
        if wanted {
            super::select::sample_ranges(self.numel)
        } else {
            Vec::new()
        }
    }

    fn sample_chunk(&self, x: &mut ChunkInputs<'_, T>, acc: &mut Stats) -> Result<()> {
        x.to_deltas();
        for (i, (delta, sp)) in x.models.iter().zip(&self.sparsifiers).enumerate() {
            sp.sample(i, delta, acc);
        }
        Ok(())
    }

    fn end_sample(&mut self, mut stats: Stats) -> Result<()> {
        // Each model's bands come from its own slots: in parallel.
        let n = self.numel;
        let mut parts: Vec<Stats> =
            (0..self.sparsifiers.len()).map(|i| stats.take_slots(TaskSlots::model(i))).collect();
        self.sparsifiers.par_iter_mut().zip(parts.par_iter_mut()).enumerate().for_each(|(i, (sp, part))| {
            sp.plan_bands(i, n, part);
        });
        Ok(())
    }

    fn stat_chunk(&self, x: &mut ChunkInputs<'_, T>, acc: &mut Stats) -> Result<()> {
        if !x.decoded {
            return self.stat_stored(x, acc);
        }
        crate::kernels::dispatch::fast(
            #[inline(always)]
            || self.stat_chunk_impl(x, acc),
        )
    }

    fn kernel(&self, stage: Stage, starts: &[u64]) -> Kernel {
        let models = self.sparsifiers.iter().enumerate();
        let ops = match stage {
            Stage::Sample => models
                .flat_map(|(i, sp)| {
                    let keys = Keys::Model { model: i };
                    sp.sample_slots(i).into_iter().map(move |slot| StatOp::Sample { keys, slot })
                })
                .collect(),
            Stage::Pass => {
                let (first, rescaling) = (self.pass == 0, self.rescaling());
                let selected_l1 = !self.selecting() && self.needs_selected_l1();
                let mut ops = Vec::new();
                for (i, sp) in models {
                    if rescaling && first {
                        ops.push(StatOp::L1 { model: i, slot: TaskSlots::l1_all(i), mask: None });
                    }
                    let keys = Keys::Model { model: i };
                    ops.extend(sp.describe(i).into_iter().map(|collect| StatOp::Collect { keys, collect }));
                    if rescaling && ((first && sp.random()) || (selected_l1 && sp.is_selection())) {
                        ops.push(StatOp::L1 {
                            model: i,
                            slot: TaskSlots::l1_kept(i),
                            mask: Some(sp.view(starts)),
                        });
                    }
                }
                ops
            }
            Stage::Output => {
                return Kernel::TaskVector {
                    weights: values(&self.weights),
                    scales: values(&self.scales),
                    masks: self.sparsifiers.iter().map(|sp| sp.view(starts)).collect(),
                    consensus: self.family.consensus,
                    normalize: self.normalize,
                    divisor: self.divisor.to_f64(),
                    lambda: self.lambda.to_f64(),
                }
            }
        };
        Kernel::Stats { vectors: Vectors::Deltas, ops }
    }

    fn end_pass(&mut self, mut stats: Stats) -> Result<()> {
        let selected_l1 = !self.selecting() && self.needs_selected_l1();
        let first = self.pass == 0;
        if first && self.rescaling() {
            // ‖δ‖₁ of every model comes from the first pass.
            self.l1_all = (0..self.sparsifiers.len()).map(|i| stats.total(TaskSlots::l1_all(i))).collect();
        }
        // The selections resolve independently (each from its own slots): in parallel.
        let mut parts: Vec<Stats> =
            (0..self.sparsifiers.len()).map(|i| stats.take_slots(TaskSlots::model(i))).collect();
        self.sparsifiers.par_iter_mut().zip(parts.par_iter_mut()).enumerate().for_each(|(i, (sp, part))| {
            sp.advance(i, part);
        });
        for i in 0..self.sparsifiers.len() {
            let sp = &self.sparsifiers[i];
            let random = sp.random();
            let is_sel = sp.is_selection();
            if self.rescale && ((first && random) || (selected_l1 && is_sel)) {
                self.scale_from(i, &stats);
            }
        }
        if selected_l1 {
            self.selected_l1 = true;
        }
        self.pass += 1;
        Ok(())
    }

    fn weighted_sum(&self) -> Option<WeightedSum<T>> {
        // Without sparsification or an election (task_arithmetic, or density 1 without
        // consensus) the output is b + λ·(Σ w_i δ_i [/ Σ w_i]): the same operations as
        // `merge_chunk` below, in the same order.
        let plain = !self.family.consensus && self.sparsifiers.iter().all(|s| matches!(s, Sparsifier::All));
        plain.then(|| WeightedSum {
            weights: self.weights.clone(),
            divisor: self.normalize.then_some(self.divisor),
            task: Some(self.lambda),
        })
    }

    fn merge_chunk(&self, x: &mut ChunkInputs<'_, T>, out: &mut [T]) {
        if !x.decoded {
            // Stored bytes only: the fused TIES, which `takes_stored` promised.
            if !(self.family.consensus && self.fused_ties(x, &[], out)) {
                // Not reached, but never wrong.
                let mut values = x.decode_stored(out.len());
                self.merge_chunk(&mut x.with_decoded(&mut values), out);
            }
            return;
        }
        crate::kernels::dispatch::fast(
            #[inline(always)]
            || self.merge_chunk_impl(x, out),
        )
    }

    fn takes_stored(&self, dtypes: &[Dtype]) -> bool {
        // bf16 inputs merged in f32, in a build whose kernels read bf16 as stored.
        let models = self.sparsifiers.len();
        let bf16 =
            T::KEY_BITS == 32 && dtypes.len() == models + 1 && dtypes.iter().all(|&d| d == Dtype::BF16);
        if !bf16 {
            return false;
        }
        if self.wants_pass() {
            // A statistics pass that only sweeps the selections' bands, or only sums DARE's
            // L1 norms.
            let sweeps = crate::kernels::dispatch::has_bf16_kernels()
                && !self.rescaling()
                && self.sparsifiers.iter().all(Sparsifier::sweeps_stored);
            sweeps || self.dare_l1_stored()
        } else {
            // The fused TIES output.
            crate::kernels::dispatch::has_fused_ties(models)
                && self.family.consensus
                && (self.sparsifiers.iter().all(|sp| sp.top_cut().is_some())
                    || self.sparsifiers.iter().all(|sp| sp.draws().is_some()))
        }
    }
}

/// The per-chunk work, compiled once per SIMD build (AVX-512, AVX2, portable) through
/// [`dispatch::fast`].
///
/// [`dispatch::fast`]: crate::kernels::dispatch::fast
impl<T: Real> TaskVector<T> {
    #[inline(always)]
    fn stat_chunk_impl(&self, x: &mut ChunkInputs<'_, T>, acc: &mut Stats) -> Result<()> {
        x.to_deltas();
        let first = self.pass == 0;
        let selected_l1 = !self.selecting() && self.needs_selected_l1();
        let (mut mask, mut hashes) = (Vec::new(), Vec::new());
        if self.rescaling() && first && self.sparsifiers.iter().any(Sparsifier::random) {
            index_hashes(x.start, x.models.first().map_or(0, |m| m.len()), &mut hashes);
        }
        for (i, (delta, sp)) in x.models.iter().zip(&self.sparsifiers).enumerate() {
            let delta: &[T] = delta;
            if self.rescaling() && first {
                reduce_abs(delta, None, acc.sum(TaskSlots::l1_all(i)));
            }
            sp.collect(i, x.start, delta, acc);
            let random = sp.random();
            if self.rescaling() && ((first && random) || (selected_l1 && sp.is_selection())) {
                sp.mask(x.start, delta, &hashes, &mut mask);
                reduce_abs(delta, Some(&mask), acc.sum(TaskSlots::l1_kept(i)));
            }
        }
        Ok(())
    }

    #[inline(always)]
    fn merge_chunk_impl(&self, x: &mut ChunkInputs<'_, T>, out: &mut [T]) {
        let Some(base) = x.base else { return };
        if self.family.consensus && self.fused_ties(x, base, out) {
            return;
        }
        x.to_deltas();
        let (mut mask, mut hashes) = (Vec::new(), Vec::new());
        if self.sparsifiers.iter().any(Sparsifier::random) {
            index_hashes(x.start, out.len(), &mut hashes);
        }
        for ((delta, sp), (&w, &s)) in
            x.models.iter_mut().zip(&self.sparsifiers).zip(self.weights.iter().zip(&self.scales))
        {
            // W_i = w_i · (δ_i ⊙ mask_i · s_i): kept values rescaled, then weighted.
            if matches!(sp, Sparsifier::All) {
                for v in delta.iter_mut() {
                    *v = w * *v;
                }
            } else {
                sp.mask(x.start, delta, &hashes, &mut mask);
                for (v, &k) in delta.iter_mut().zip(&mask) {
                    *v = if k { w * (*v * s) } else { T::ZERO };
                }
            }
        }
        if self.family.consensus {
            self.elect(x.models.as_slice(), base, out);
            return;
        }
        // S = Σ W_i, in `out`.
        out.fill(T::ZERO);
        for m in x.models.iter() {
            for (o, &v) in out.iter_mut().zip(m.iter()) {
                *o += v;
            }
        }
        for (o, &b) in out.iter_mut().zip(base) {
            let mut mixed = *o;
            if self.normalize {
                mixed = mixed / self.divisor;
            }
            *o = b + mixed * self.lambda;
        }
    }

    /// The sign election (TIES) over the weighted, sparsified task vectors `W_i` (in
    /// `models`), tile by tile so that every model's tile stays in the core's first-level
    /// cache: S = Σ W_i (config order); a model agrees where sign(W_i) is the sign of S
    /// (S ≥ 0 counts as +; an exact zero never agrees); mixed = Σ agreeing W_i, and with
    /// `normalize` divided by Σ agreeing w_i (1 where that is 0); out = b + λ·mixed.
    /// Each sum starts from 0 and adds in config order, as METHODS.md §2 writes it.
    #[inline(always)]
    fn elect(&self, models: &[&mut [T]], base: &[T], out: &mut [T]) {
        const TILE: usize = 64;
        let (mut total, mut mixed, mut div) = ([T::ZERO; TILE], [T::ZERO; TILE], [T::ZERO; TILE]);
        for (t, (out, base)) in out.chunks_mut(TILE).zip(base.chunks(TILE)).enumerate() {
            let at = t * TILE;
            let len = out.len();
            let (total, mixed, div) = (&mut total[..len], &mut mixed[..len], &mut div[..len]);
            total.fill(T::ZERO);
            for m in models {
                for (s, &v) in total.iter_mut().zip(m.get(at..at + len).unwrap_or_default()) {
                    *s += v;
                }
            }
            mixed.fill(T::ZERO);
            div.fill(T::ZERO);
            for (m, &w) in models.iter().zip(&self.weights) {
                let m = m.get(at..at + len).unwrap_or_default();
                for (((x, d), &s), &v) in mixed.iter_mut().zip(div.iter_mut()).zip(total.iter()).zip(m) {
                    let agree = if s >= T::ZERO { v > T::ZERO } else { v < T::ZERO };
                    *x += if agree { v } else { T::ZERO };
                    *d += if agree { w } else { T::ZERO };
                }
            }
            if self.normalize {
                for (((o, &b), &x), &d) in out.iter_mut().zip(base).zip(mixed.iter()).zip(div.iter()) {
                    let d = if d == T::ZERO { T::ONE } else { d };
                    *o = b + (x / d) * self.lambda;
                }
            } else {
                for ((o, &b), &x) in out.iter_mut().zip(base).zip(mixed.iter()) {
                    *o = b + x * self.lambda;
                }
            }
        }
    }
}
