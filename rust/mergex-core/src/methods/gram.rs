//! Whole-tensor dot products between input vectors (norms, cosines, Gram matrices), the
//! chunk-invariant way: f64 within each 256-element block (eight lanes, fixed order), block
//! sums combined exactly.

use super::stats::Stats;
use crate::kernels::real::Real;
use crate::numeric::reduce::{fold, BLOCK};

/// Slot of pair (i, k), i ≤ k, among `first..` sums.
fn slot(first: usize, k_count: usize, i: usize, k: usize) -> usize {
    let (i, k) = if i <= k { (i, k) } else { (k, i) };
    first + i * k_count - i * (i + 1) / 2 + k
}

/// Number of sum slots a Gram matrix of `k` vectors takes.
pub fn slots(k: usize) -> usize {
    k * (k + 1) / 2
}

/// `x · y` in f64, element `t` in lane `t % 8`, lanes folded in the fixed tree. Written
/// over runs of eight so that the lanes are one vector register, not eight memory cells.
fn lane_dot<T: Real>(x: &[T], y: &[T]) -> f64 {
    let n = x.len().min(y.len());
    let (x, y) = (x.get(..n).unwrap_or_default(), y.get(..n).unwrap_or_default());
    let mut lanes = [0f64; 8];
    let (xs, ys) = (x.chunks_exact(8), y.chunks_exact(8));
    let (xr, yr) = (xs.remainder(), ys.remainder());
    for (a, b) in xs.zip(ys) {
        if let (Ok(a), Ok(b)) = (<&[T; 8]>::try_from(a), <&[T; 8]>::try_from(b)) {
            for ((l, &p), &q) in lanes.iter_mut().zip(a).zip(b) {
                *l += p.to_f64() * q.to_f64();
            }
        }
    }
    for ((l, &p), &q) in lanes.iter_mut().zip(xr).zip(yr) {
        *l += p.to_f64() * q.to_f64();
    }
    fold(&lanes)
}

/// Add the pairwise dot products of `vectors` over one chunk (which starts on a block
/// boundary) into sums `first..first + slots(k)` of `acc`.
pub fn accumulate<T: Real>(vectors: &[&[T]], first: usize, acc: &mut Stats) {
    let k = vectors.len();
    let n = vectors.first().map_or(0, |v| v.len());
    for b in (0..n).step_by(BLOCK as usize) {
        let e = (b + BLOCK as usize).min(n);
        for i in 0..k {
            for j in i..k {
                let (Some(x), Some(y)) = (vectors[i].get(b..e), vectors[j].get(b..e)) else { continue };
                acc.sum(slot(first, k, i, j)).add(lane_dot(x, y));
            }
        }
    }
}

/// The Gram matrix `G[i][k] = v_i · v_k` from merged statistics.
pub fn matrix(k: usize, first: usize, stats: &Stats) -> Vec<Vec<f64>> {
    let mut g = vec![vec![0.0; k]; k];
    for (i, row) in g.iter_mut().enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            *v = stats.total(slot(first, k, i, j));
        }
    }
    g
}

/// Dot products within one contiguous vector segment, in f64 with the same eight-lane
/// order (row-local statistics that never cross a chunk).
pub fn local<T: Real>(vectors: &[&[T]]) -> Vec<Vec<f64>> {
    let k = vectors.len();
    let mut g = vec![vec![0.0; k]; k];
    for i in 0..k {
        for j in i..k {
            let s = lane_dot(vectors[i], vectors[j]);
            g[i][j] = s;
            g[j][i] = s;
        }
    }
    g
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gram_matches_direct_products_for_any_chunking() {
        let a: Vec<f32> = (0..5000).map(|i| ((i * 37) % 101) as f32 / 7.0 - 6.0).collect();
        let b: Vec<f32> = (0..5000).map(|i| ((i * 13) % 97) as f32 / 5.0 - 9.0).collect();
        let whole = {
            let mut s = Stats::default();
            accumulate(&[&a[..], &b[..]], 0, &mut s);
            matrix(2, 0, &s)
        };
        let mut parts = Stats::default();
        for c in (0..5000).step_by(768) {
            let e = (c + 768).min(5000);
            let mut s = Stats::default();
            accumulate(&[&a[c..e], &b[c..e]], 0, &mut s);
            parts = parts.merge(s);
        }
        assert_eq!(whole, matrix(2, 0, &parts));
        let direct: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
        assert!((whole[0][1] - direct).abs() < 1e-6 * direct.abs().max(1.0));
        assert_eq!(whole[0][1], whole[1][0]);
    }

    #[test]
    fn lane_dot_keeps_the_lane_order() {
        // Values over many magnitudes, so that the lanes' sums round and their order shows.
        let x: Vec<f64> = (0..300).map(|i| ((i * 37) % 101) as f64 * 10f64.powi(i % 19 - 9) / 3.0).collect();
        let y: Vec<f64> = (0..300).map(|i| ((i * 13) % 97) as f64 / 7.0 - 6.0).collect();
        for n in [0, 5, 8, 255, 256, 300] {
            let mut lanes = [0f64; 8];
            for t in 0..n {
                lanes[t % 8] += x[t] * y[t];
            }
            assert_eq!(lane_dot(&x[..n], &y[..n]).to_bits(), fold(&lanes).to_bits(), "{n}");
        }
    }
}
