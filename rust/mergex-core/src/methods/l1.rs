//! L1 norms over chunks, summed the chunk-invariant way of [`block_sum`].

use crate::kernels::real::Real;
#[cfg(doc)]
use crate::numeric::reduce::block_sum;
use crate::numeric::reduce::{fold, ExactSum, BLOCK};

/// Add `Σ |v|` (only where `keep` is true, when given) over one chunk's values to `acc`,
/// the chunk-invariant way of [`block_sum`] — the same lanes and order — written over slices
/// so that it vectorizes. Four blocks are summed side by side: each block's lanes still add
/// in index order, but the four chains of additions overlap instead of waiting on each other.
#[inline(always)]
pub(crate) fn reduce_abs<T: Real>(values: &[T], keep: Option<&[bool]>, acc: &mut ExactSum) {
    match keep {
        Some(keep) if keep.len() >= values.len() => reduce_abs_where::<T, true>(values, keep, acc),
        _ => reduce_abs_where::<T, false>(values, &[], acc),
    }
}

/// `|x|` where `k`, else +0, without a branch (so that the loops vectorize).
#[inline(always)]
fn abs_where(x: f64, k: bool) -> f64 {
    f64::from_bits(x.abs().to_bits() & u64::from(k).wrapping_neg())
}

/// [`reduce_abs`], with (`MASKED`, `keep` at least as long as `values`) or without a mask.
#[inline(always)]
fn reduce_abs_where<T: Real, const MASKED: bool>(values: &[T], keep: &[bool], acc: &mut ExactSum) {
    const B: usize = BLOCK as usize;
    const G: usize = 4;
    // f32 under AVX-512: whole groups of blocks in registers (the loop below compiles to
    // gathers there); the groups' sums are the same, in the same order.
    let done = T::as_f32s(values)
        .and_then(|v| {
            let each = &mut |l: &[f64; 8]| acc.add(fold(l));
            crate::kernels::dispatch::abs_block_sums_f32(v, MASKED.then_some(keep), each)
        })
        .unwrap_or(0);
    let values = values.get(done..).unwrap_or_default();
    let keep = if MASKED { keep.get(done..).unwrap_or_default() } else { keep };
    let mask8 = |i: usize| -> [bool; 8] {
        match keep.get(i..i + 8).and_then(|m| <[bool; 8]>::try_from(m).ok()) {
            Some(m) if MASKED => m,
            _ => [!MASKED; 8],
        }
    };
    let groups = values.chunks_exact(B * G);
    let at = values.len() - groups.remainder().len();
    for (g, group) in groups.enumerate() {
        let mut lanes = [[0f64; 8]; G];
        for step in (0..B).step_by(8) {
            for (blk, l) in lanes.iter_mut().enumerate() {
                let i = blk * B + step;
                let Some(x) = group.get(i..i + 8).and_then(|x| <&[T; 8]>::try_from(x).ok()) else { continue };
                let k = mask8(g * B * G + i);
                for ((l, x), &k) in l.iter_mut().zip(x).zip(&k) {
                    *l += abs_where(x.to_f64(), k);
                }
            }
        }
        for l in &lanes {
            acc.add(fold(l));
        }
    }
    // The last blocks (fewer than four, the last maybe short), one at a time.
    for (b, block) in values.get(at..).unwrap_or_default().chunks(B).enumerate() {
        let from = at + b * B;
        let mut lanes = [0f64; 8];
        for (j, x) in block.iter().enumerate() {
            let k = !MASKED || keep.get(from + j).copied().unwrap_or(false);
            lanes[j % 8] += abs_where(x.to_f64(), k);
        }
        acc.add(fold(&lanes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::numeric::reduce::block_sum;

    #[test]
    fn reduce_abs_matches_block_sum() {
        // Lengths below, at and past whole groups of four blocks, and ragged tails.
        for n in [0usize, 7, 1000, 1024, 1025, 4096, 5000, 9999] {
            let v: Vec<f32> = (0..n).map(|i| ((i * 7919) % 211) as f32 / 13.0 - 8.0).collect();
            let keep: Vec<bool> = (0..n).map(|i| i % 3 != 0).collect();
            let mut a = ExactSum::default();
            reduce_abs(&v, Some(&keep), &mut a);
            let mut b = ExactSum::default();
            block_sum(v.iter().zip(&keep).map(|(&x, &k)| if k { (x as f64).abs() } else { 0.0 }), &mut b);
            assert_eq!(a.value().to_bits(), b.value().to_bits(), "{n}");
            let (mut c, mut d) = (ExactSum::default(), ExactSum::default());
            reduce_abs(&v, None, &mut c);
            block_sum(v.iter().map(|&x| (x as f64).abs()), &mut d);
            assert_eq!(c.value().to_bits(), d.value().to_bits(), "{n}");
            // f64 values over many magnitudes: the lanes' sums round, so their order shows.
            let w: Vec<f64> =
                (0..n).map(|i| ((i * 7919) % 211) as f64 * 10f64.powi((i % 23) as i32 - 11) / 3.0).collect();
            let (mut e, mut f) = (ExactSum::default(), ExactSum::default());
            reduce_abs(&w, Some(&keep), &mut e);
            block_sum(w.iter().zip(&keep).map(|(&x, &k)| if k { x.abs() } else { 0.0 }), &mut f);
            assert_eq!(e.value().to_bits(), f.value().to_bits(), "f64 {n}");
            // Signed zeros, subnormals, and NaNs where they are not kept (a kept NaN makes
            // any sum NaN): f32 values go through the AVX-512 form where the CPU has it.
            let keep: Vec<bool> = (0..n).map(|i| i % 13 != 0 && i % 3 != 0).collect();
            let odd: Vec<f32> = (0..n)
                .map(|i| match i {
                    _ if i % 13 == 0 => f32::NAN,
                    _ if i % 5 == 0 => -0.0,
                    _ if i % 11 == 0 => f32::MIN_POSITIVE / 3.0,
                    _ => ((i * 31) % 97) as f32 * -1e-3,
                })
                .collect();
            let (mut g, mut h) = (ExactSum::default(), ExactSum::default());
            reduce_abs(&odd, Some(&keep), &mut g);
            block_sum(odd.iter().zip(&keep).map(|(&x, &k)| if k { (x as f64).abs() } else { 0.0 }), &mut h);
            assert_eq!(g.value().to_bits(), h.value().to_bits(), "special {n}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// DARE's L1 sums from stored bf16 (where a build has them) are the decoded pass's:
        /// every block's lanes, in order, for values of any magnitude, and draws of any
        /// threshold, near a multiple of 2^32 too.
        #[test]
        fn dare_l1_from_stored_bf16_is_the_decoded_sum(
            pairs in proptest::collection::vec(
                (proptest::prop_oneof![0x0080u16..0x7f00, 0x3f80u16..0x5f80], 0u16..0x0400, proptest::bool::ANY),
                0..3000,
            ),
            stream in proptest::prelude::any::<u32>(),
            threshold in proptest::prop_oneof![proptest::strategy::Just(0u64), proptest::strategy::Just(1u64 << 32), 0u64..(1 << 32)],
            start in proptest::prop_oneof![proptest::strategy::Just(0u64), proptest::strategy::Just((1u64 << 32) - 1024)],
        ) {
            use crate::format::dtype::bf16_to_f32;
            use crate::kernels::dispatch::{dare_l1_bf16_at, Level};
            // Magnitudes from 2^-126 to 2^127, and many within 2^0..2^64 (where a lane's sum
            // rounds partly, so the order of its additions shows), either sign.
            let x: Vec<u16> = pairs.iter().map(|&(a, _, neg)| a | if neg { 0x8000 } else { 0 }).collect();
            let b: Vec<u16> = pairs.iter().map(|&(_, c, _)| c).collect();
            let bytes = |v: &[u16]| -> Vec<u8> { v.iter().flat_map(|h| h.to_le_bytes()).collect() };
            let delta: Vec<f32> = x.iter().zip(&b).map(|(&a, &c)| bf16_to_f32(a) - bf16_to_f32(c)).collect();
            let mut hashes = Vec::new();
            crate::numeric::random::index_hashes(start, delta.len(), &mut hashes);
            let keep: Vec<bool> = hashes.iter().map(|&h| u64::from(crate::numeric::random::mix(stream ^ h)) < threshold).collect();
            let (mut want_all, mut want_kept) = (ExactSum::default(), ExactSum::default());
            reduce_abs(&delta, None, &mut want_all);
            reduce_abs(&delta, Some(&keep), &mut want_kept);
            let mut ran = 0;
            for level in [Level::Avx2, Level::Avx512] {
                let (mut all_lanes, mut kept_lanes) = (Vec::new(), Vec::new());
                let done = dare_l1_bf16_at(
                    level,
                    &bytes(&x),
                    &bytes(&b),
                    &hashes,
                    (stream, threshold),
                    &mut |l| all_lanes.push(*l),
                    &mut |l| kept_lanes.push(*l),
                );
                if let Some(done) = done {
                    proptest::prop_assert_eq!(done, delta.len() / 1024 * 1024);
                    // Every block's lanes, bit for bit: lane `l` adds elements `l, l + 8, …`.
                    let lanes = |k: Option<&[bool]>| -> Vec<[f64; 8]> {
                        delta[..done]
                            .chunks(256)
                            .enumerate()
                            .map(|(blk, d)| {
                                let mut l = [0f64; 8];
                                for (j, &v) in d.iter().enumerate() {
                                    if k.is_none_or(|k| k[blk * 256 + j]) {
                                        l[j % 8] += (v as f64).abs();
                                    }
                                }
                                l
                            })
                            .collect()
                    };
                    let bits = |v: &[[f64; 8]]| -> Vec<u64> { v.iter().flatten().map(|x| x.to_bits()).collect() };
                    proptest::prop_assert_eq!(bits(&all_lanes), bits(&lanes(None)), "{:?}", level);
                    proptest::prop_assert_eq!(bits(&kept_lanes), bits(&lanes(Some(&keep))), "{:?}", level);
                    let (mut all, mut kept) = (ExactSum::default(), ExactSum::default());
                    for l in &all_lanes {
                        all.add(fold(l));
                    }
                    for l in &kept_lanes {
                        kept.add(fold(l));
                    }
                    reduce_abs(&delta[done..], None, &mut all);
                    reduce_abs(&delta[done..], Some(&keep[done..]), &mut kept);
                    proptest::prop_assert_eq!(all.value().to_bits(), want_all.value().to_bits());
                    proptest::prop_assert_eq!(kept.value().to_bits(), want_kept.value().to_bits());
                    ran += 1;
                }
            }
            #[cfg(target_arch = "x86_64")]
            proptest::prop_assert!(ran > 0 || !std::arch::is_x86_feature_detected!("avx2"), "no build ran");
        }
    }
}
