//! `multislerp` and `karcher` (METHODS.md §4): means on the sphere. Every intermediate
//! vector of both algorithms (m, m̂, the tangents, T, the iterate u) is a linear combination
//! of the inputs, so one statistics pass computes the inputs' Gram matrix and everything
//! else — all of karcher's iterations included — is done on coefficients in f64; the
//! output pass then forms `Σ c_k v_k`. This is the spec's arithmetic in exact linear algebra,
//! with one statistics pass instead of one per step (a documented deviation from the pass
//! count in METHODS.md §7, not from the result beyond f32 rounding).

use super::gram;
use super::inputs::ChunkInputs;
use super::kernel::{values, Kernel, Stage, StatOp, Vectors, NO_STATS};
use super::merge::{TensorCtx, TensorMerge};
use super::spec::{spec, BaseUse, Default, MethodSpec, ParamSpec, Passes};
use super::stats::Stats;
use crate::error::{Error, Result};
use crate::kernels::real::Real;

/// Turns a Gram matrix into output coefficients.
type Solve = Box<dyn Fn(&[Vec<f64>]) -> Result<Vec<f64>> + Send + Sync>;

/// Output = Σ coef_k v_k (+ base), where v are the inputs (or task vectors).
struct Combination<T> {
    /// Inputs.
    k: usize,
    /// Work on task vectors (x − b) and add the base back.
    deltas: bool,
    /// Turns the Gram matrix into coefficients.
    solve: Solve,
    coef: Option<Vec<T>>,
    /// Coefficients known without statistics (a single input).
    fixed: bool,
}

impl<T: Real> TensorMerge<T> for Combination<T> {
    fn planned_passes(&self) -> usize {
        usize::from(!self.fixed)
    }

    fn wants_pass(&self) -> bool {
        self.coef.is_none()
    }

    fn stat_chunk(&self, x: &mut ChunkInputs<'_, T>, acc: &mut Stats) -> Result<()> {
        x.to_deltas();
        let v: Vec<&[T]> = x.models.iter().map(|m| &**m).collect();
        gram::accumulate(&v, 0, acc);
        Ok(())
    }

    fn kernel(&self, stage: Stage, _: &[u64]) -> Kernel {
        match (stage, &self.coef) {
            (Stage::Pass, _) => {
                Kernel::Stats { vectors: Vectors::Deltas, ops: vec![StatOp::Gram { with_base: false }] }
            }
            (Stage::Output, Some(coef)) => Kernel::Combine { coef: values(coef), add_base: self.deltas },
            _ => NO_STATS,
        }
    }

    fn end_pass(&mut self, stats: Stats) -> Result<()> {
        let g = gram::matrix(self.k, 0, &stats);
        let c = (self.solve)(&g)?;
        self.coef = Some(c.into_iter().map(|v| T::from_f64(v as f32 as f64)).collect());
        Ok(())
    }

    fn merge_chunk(&self, x: &mut ChunkInputs<'_, T>, out: &mut [T]) {
        x.to_deltas();
        out.fill(T::ZERO);
        for (m, &c) in x.models.iter().zip(self.coef.iter().flatten()) {
            for (o, &v) in out.iter_mut().zip(m.iter()) {
                *o += c * v;
            }
        }
        if let (true, Some(b)) = (self.deltas, x.base) {
            for (o, &bv) in out.iter_mut().zip(b) {
                *o += bv;
            }
        }
    }
}

fn quad(g: &[Vec<f64>], a: &[f64], b: &[f64]) -> f64 {
    let mut s = 0.0;
    for (i, &ai) in a.iter().enumerate() {
        for (j, &bj) in b.iter().enumerate() {
            s += ai * g[i][j] * bj;
        }
    }
    s
}

pub(super) const MULTISLERP: MethodSpec = spec!(build_multislerp {
    name: "multislerp",
    summary: "weighted spherical mean of any number of models",
    base: BaseUse::Optional,
    min_models: 1,
    max_models: None,
    params: &[
        ParamSpec::number("weight", true, Default::Required, "the model's weight"),
        ParamSpec::flag("normalize_weights", true, "scale the weights to sum to 1"),
        ParamSpec::number("eps", false, Default::Value(1e-8), "numerical floor"),
    ],
    passes: Passes::between(1, 2, "2 when the tensor spans several chunks"),
});

pub(super) const KARCHER: MethodSpec = spec!(build_karcher {
    name: "karcher",
    summary: "Karcher (Riemannian) mean of all models, the base included",
    base: BaseUse::None,
    min_models: 1,
    max_models: None,
    params: &[
        ParamSpec::number("max_iter", false, Default::Value(10.0), "iterations").count().at_least(0.0),
        ParamSpec::number("tol", false, Default::Value(1e-5), "convergence tolerance"),
    ],
    passes: Passes::between(1, 2, "2 when the tensor spans several chunks"),
});

pub(super) fn build_multislerp<T: Real>(ctx: &TensorCtx<'_>) -> Result<Box<dyn TensorMerge<T>>> {
    let k = ctx.job.inputs.len();
    let mut w: Vec<f64> =
        (0..k).map(|i| ctx.model_param(i, "weight").map(|v| v as f32 as f64)).collect::<Result<_>>()?;
    if ctx.flag("normalize_weights")? {
        let sum: f64 = w.iter().sum();
        if sum.abs() < 1e-12 {
            return Err(ctx.bad_param("weight", "the weights sum to 0 and cannot be normalized"));
        }
        w.iter_mut().for_each(|v| *v /= sum);
    }
    let eps = ctx.global("eps")? as f32 as f64;
    let deltas = ctx.job.base.is_some();
    let fixed = k == 1;
    let tensor = ctx.job.name.clone();
    let solve = move |g: &[Vec<f64>]| -> Result<Vec<f64>> {
        if k == 1 {
            return Ok(vec![1.0]);
        }
        let n: Vec<f64> = (0..k).map(|i| g[i][i].max(0.0).sqrt()).collect();
        // m = Σ a_i v_i with a_i = w_i / (n_i + eps).
        let a: Vec<f64> = (0..k).map(|i| w[i] / (n[i] + eps)).collect();
        let m_norm = quad(g, &a, &a).max(0.0).sqrt();
        if m_norm < eps {
            if k == 2 {
                return Ok(w.clone());
            }
            return Err(Error::Degenerate {
                tensor: tensor.clone(),
                message: "multislerp inputs are antipodal: their weighted mean direction is zero".into(),
            });
        }
        // s = Σ_i w_i (u_i · m̂); T = m − s m̂ = Σ a_k (1 − s/‖m‖) v_k.
        let s: f64 = (0..k)
            .map(|i| {
                let ui_m: f64 = (0..k).map(|j| a[j] * g[i][j]).sum::<f64>() / (n[i] + eps) / m_norm;
                w[i] * ui_m
            })
            .sum();
        let shrink = 1.0 - s / m_norm;
        let t_norm = (shrink * shrink * quad(g, &a, &a)).max(0.0).sqrt();
        let l = t_norm + eps;
        let scale: f64 = (0..k).map(|i| w[i] * n[i]).sum();
        Ok((0..k).map(|j| scale * (a[j] / m_norm * l.cos() + a[j] * shrink * l.sin() / l)).collect())
    };
    Ok(Box::new(Combination::<T> { k, deltas, solve: Box::new(solve), coef: None, fixed }))
}

pub(super) fn build_karcher<T: Real>(ctx: &TensorCtx<'_>) -> Result<Box<dyn TensorMerge<T>>> {
    let k = ctx.job.inputs.len();
    let max_iter = ctx.global("max_iter")? as usize;
    let tol = ctx.global("tol")? as f32 as f64;
    let solve = move |g: &[Vec<f64>]| -> Result<Vec<f64>> { Ok(karcher(g, k, max_iter, tol)) };
    Ok(Box::new(Combination::<T> { k, deltas: false, solve: Box::new(solve), coef: None, fixed: false }))
}

/// Karcher mean coefficients from the Gram matrix of the inputs.
fn karcher(g: &[Vec<f64>], k: usize, max_iter: usize, tol: f64) -> Vec<f64> {
    let n: Vec<f64> = (0..k).map(|i| g[i][i].max(0.0).sqrt()).collect();
    let valid: Vec<usize> = (0..k).filter(|&i| n[i] > tol).collect();
    if valid.is_empty() {
        return vec![0.0; k];
    }
    let alpha = 1.0 / valid.len() as f64;
    // u_i as coefficient vectors: e_i / n_i.
    let unit = |i: usize| {
        let mut c = vec![0.0; k];
        c[i] = 1.0 / n[i];
        c
    };
    let mut u = vec![0.0; k];
    for &i in &valid {
        u[i] += alpha / n[i];
    }
    let norm = quad(g, &u, &u).max(0.0).sqrt();
    if norm < tol {
        u = unit(valid[0]);
    } else {
        u.iter_mut().for_each(|c| *c /= norm);
    }
    for _ in 0..max_iter {
        let mut t = vec![0.0; k];
        for &i in &valid {
            let ui = unit(i);
            let cos = quad(g, &u, &ui).clamp(-1.0, 1.0);
            let theta = cos.acos();
            if theta < tol {
                continue;
            }
            let f = alpha * theta / theta.sin();
            for j in 0..k {
                t[j] += f * (ui[j] - cos * u[j]);
            }
        }
        let t_norm = quad(g, &t, &t).max(0.0).sqrt();
        if t_norm < tol {
            break;
        }
        let (c, s) = (t_norm.cos(), t_norm.sin() / t_norm);
        for j in 0..k {
            u[j] = c * u[j] + s * t[j];
        }
        let norm = quad(g, &u, &u).max(0.0).sqrt();
        if norm > 0.0 {
            u.iter_mut().for_each(|c| *c /= norm);
        }
    }
    let scale: f64 = n.iter().sum::<f64>() / k as f64;
    u.into_iter().map(|c| c * scale).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn karcher_of_orthogonal_unit_vectors_is_the_bisector() {
        let g = vec![vec![1.0, 0.0], vec![0.0, 1.0]];
        let c = karcher(&g, 2, 20, 1e-9);
        let h = std::f64::consts::FRAC_1_SQRT_2;
        assert!((c[0] - h).abs() < 1e-9 && (c[1] - h).abs() < 1e-9, "{c:?}");
    }

    #[test]
    fn karcher_ignores_zero_inputs_in_the_direction() {
        let g = vec![vec![4.0, 0.0], vec![0.0, 0.0]];
        let c = karcher(&g, 2, 10, 1e-5);
        // Direction from the one valid input; scale is the mean norm over all inputs (1).
        assert!((c[0] - 0.5).abs() < 1e-12 && c[1] == 0.0, "{c:?}");
    }
}
