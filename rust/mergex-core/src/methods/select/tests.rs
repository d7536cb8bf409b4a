//! The selection against sorting, and the dispatched sweeps against the portable one.

use super::band::*;
use super::cut::*;
use super::*;
use crate::format::dtype::f32_to_bf16;
use crate::kernels::dispatch::{band_sweep_bf16_at, band_sweep_f32_at, ties_f32_at, Level};
use crate::kernels::{Keep, TiesValues, TopCut};
use proptest::prelude::*;

/// Values whose keys crowd around a few magnitudes, with the special values mixed in.
fn f32_values() -> impl Strategy<Value = Vec<f32>> {
    let special = prop_oneof![
        Just(0.0f32),
        Just(-0.0f32),
        Just(f32::NAN),
        Just(-f32::INFINITY),
        Just(f32::MIN_POSITIVE / 4.0),
        Just(1.0f32),
        Just(-1.0f32),
    ];
    let value = prop_oneof![4 => (-4i32..4, -2.0f32..2.0).prop_map(|(e, m)| m * 2f32.powi(e)), 1 => special];
    proptest::collection::vec(value, 0..300)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    /// The dispatched band sweep (AVX-512 where the CPU has it) counts and gathers what
    /// the portable sweep does, in the same order, for any band (including one that
    /// wraps past the largest key) and any length.
    #[test]
    fn the_dispatched_band_sweep_is_the_portable_one(
        values in f32_values(),
        lo_key in prop_oneof![Just(0u32), Just(0x3f80_0000u32), Just(0x7fff_ffffu32), any::<u32>()],
        span in prop_oneof![Just(0u32), Just(0x0080_0000u32), Just(u32::MAX), any::<u32>()],
        start in prop_oneof![Just(0u64), Just((1u64 << 32) - 300)],
        before in 0usize..3,
    ) {
        let key = |v: &f32| v.mag_key() as u32;
        let mut want = vec![7u64; before];
        let push = |k: u32, i: u64| want.push(u64::from(k) << 32 | i);
        let under = band_sweep(&values, start, lo_key, span, key, Some(push));
        let band = crate::kernels::Band { start, lo_key, span };
        for level in [Level::Avx2, Level::Avx512] {
            let mut got = vec![7u64; before];
            if let Some(fast) = band_sweep_f32_at(level, &values, band, &mut got) {
                prop_assert_eq!(fast, under, "{:?}", level);
                prop_assert_eq!(&got, &want, "{:?}", level);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    /// Sweeps longer than the kernels' windows of blocks (16,384 elements) count and
    /// gather what the portable sweep does across the windows' seams.
    #[test]
    fn long_band_sweeps_are_the_portable_one(
        seed in any::<u64>(),
        n in 16_000usize..50_000,
        lo_key in prop_oneof![Just(0x3f00_0000u32), 0x3e00_0000u32..0x3f80_0000],
        span in prop_oneof![Just(0x0080_0000u32), 0u32..0x0100_0000],
        start in prop_oneof![Just(0u64), Just((1u64 << 32) - 60_000)],
    ) {
        let mut x = seed | 1;
        let values: Vec<f32> = (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect();
        let key = |v: &f32| v.mag_key() as u32;
        let mut want = Vec::new();
        let push = |k: u32, i: u64| want.push(u64::from(k) << 32 | i);
        let under = band_sweep(&values, start, lo_key, span, key, Some(push));
        let band = crate::kernels::Band { start, lo_key, span };
        let bf16: Vec<u8> = values.iter().flat_map(|&v| f32_to_bf16(v).to_le_bytes()).collect();
        let zeros = vec![0u8; bf16.len()];
        let deltas: Vec<f32> = bf16.chunks(2).map(|h| crate::format::dtype::bf16_to_f32(u16::from_le_bytes([h[0], h[1]]))).collect();
        let mut want16 = Vec::new();
        let push16 = |k: u32, i: u64| want16.push(u64::from(k) << 32 | i);
        let under16 = band_sweep(&deltas, start, lo_key, span, key, Some(push16));
        for level in [Level::Avx2, Level::Avx512] {
            let mut got = Vec::new();
            if let Some(fast) = band_sweep_f32_at(level, &values, band, &mut got) {
                prop_assert_eq!(fast, under, "{:?}", level);
                prop_assert_eq!(&got, &want, "{:?}", level);
            }
            let mut got = Vec::new();
            if let Some(fast) = band_sweep_bf16_at(level, &bf16, &zeros, band, &mut got) {
                prop_assert_eq!(fast, under16, "bf16 {:?}", level);
                prop_assert_eq!(&got, &want16, "bf16 {:?}", level);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    /// The band sweep over stored bf16 task vectors counts and gathers what the portable
    /// sweep does over the decoded differences, for any band, length and alignment.
    #[test]
    fn the_bf16_band_sweep_is_the_decoded_one(
        pairs in proptest::collection::vec((any::<u16>(), any::<u16>()), 0..300),
        lo_key in prop_oneof![Just(0u32), Just(0x3f80_0000u32), any::<u32>()],
        span in prop_oneof![Just(0u32), Just(0x0100_0000u32), Just(u32::MAX), any::<u32>()],
        start in prop_oneof![Just(0u64), Just((1u64 << 32) - 300)],
        odd in any::<bool>(),
    ) {
        let bf16 = crate::format::dtype::bf16_to_f32;
        let deltas: Vec<f32> = pairs.iter().map(|&(x, b)| bf16(x) - bf16(b)).collect();
        let key = |v: &f32| v.mag_key() as u32;
        let mut want = Vec::new();
        let push = |k: u32, i: u64| want.push(u64::from(k) << 32 | i);
        let under = band_sweep(&deltas, start, lo_key, span, key, Some(push));
        // Stored bytes, one byte off their natural alignment when `odd`.
        let stored = |f: fn(&(u16, u16)) -> u16| -> Vec<u8> {
            let mut v = vec![0u8; usize::from(odd)];
            v.extend(pairs.iter().flat_map(|p| f(p).to_le_bytes()));
            v
        };
        let (x, b) = (stored(|p| p.0), stored(|p| p.1));
        let skip = usize::from(odd);
        let band = crate::kernels::Band { start, lo_key, span };
        for level in [Level::Avx2, Level::Avx512] {
            let mut got = Vec::new();
            if let Some(fast) = band_sweep_bf16_at(level, &x[skip..], &b[skip..], band, &mut got) {
                prop_assert_eq!(fast, under, "{:?}", level);
                prop_assert_eq!(&got, &want, "{:?}", level);
            }
        }
    }
}

/// Drive a selector over `keys` cut into chunks of `chunk`, as the engine does.
fn run(keys: &[u64], rank: u64, side: Side, cap: u64, chunk: usize) -> (Cut, usize) {
    finish(Selector::new(rank, side, 32, cap), keys, chunk)
}

/// As [`run`], after showing the selector its sample; `band` overrides the band.
fn run_sampled(
    keys: &[u64],
    rank: u64,
    side: Side,
    cap: u64,
    chunk: usize,
    band: Option<Option<(u64, u64)>>,
) -> (Cut, usize) {
    let n = keys.len() as u64;
    let mut sel = Selector::new(rank, side, 32, cap);
    let mut stats = Stats::default();
    for (start, len) in sample_ranges(n) {
        sel.sample(0, keys[start as usize..(start + len) as usize].iter().copied(), &mut stats);
    }
    sel.plan_band(0, n, &mut stats);
    if let Some(b) = band {
        sel.band = b;
    }
    finish(sel, keys, chunk)
}

/// The passes of `sel` over `keys` (chunks in reverse order): the cut and the pass count.
fn finish(mut sel: Selector, keys: &[u64], chunk: usize) -> (Cut, usize) {
    let mut passes = 0;
    while sel.pending() {
        let mut stats = Stats::default();
        for (c, part) in keys.chunks(chunk).enumerate().rev() {
            let mut acc = Stats::default();
            sel.collect(0, (c * chunk) as u64, part.iter().copied(), &mut acc);
            stats = stats.merge(acc);
        }
        sel.advance(0, &mut stats);
        passes += 1;
    }
    (sel.cut().cloned().unwrap(), passes)
}

/// The keep set by brute force.
fn expected(keys: &[u64], lo: Option<usize>, hi: Option<usize>, top: Option<usize>) -> Vec<bool> {
    let n = keys.len();
    let mut keep = vec![false; n];
    if let Some(k) = top {
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| keys[b].cmp(&keys[a]).then(a.cmp(&b)));
        for &i in &order[..k] {
            keep[i] = true;
        }
        return keep;
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| keys[a].cmp(&keys[b]).then(a.cmp(&b)));
    for (r, &i) in order.iter().enumerate() {
        keep[i] = lo.is_none_or(|l| r >= l) && hi.is_none_or(|h| r <= h);
    }
    keep
}

fn apply(keys: &[u64], cuts: &[(&Cut, bool)], chunk: usize) -> Vec<bool> {
    let mut out = Vec::new();
    for (c, part) in keys.chunks(chunk).enumerate() {
        let start = (c * chunk) as u64;
        let mut ords: Vec<u64> = cuts.iter().map(|(cut, _)| cut.ties_before(start)).collect();
        for &k in part {
            let mut keep = true;
            for ((cut, above), o) in cuts.iter().zip(ords.iter_mut()) {
                keep &= passes(cut, k, o, *above);
            }
            out.push(keep);
        }
    }
    out
}

proptest! {
    #[test]
    fn top_k_is_exact_with_index_tie_break(
        raw in proptest::collection::vec(0u64..40, 1..600),
        frac in 0.0f64..1.0,
        chunk in 1usize..100,
        cap in prop_oneof![Just(0u64), Just(1_000_000u64)],
    ) {
        // Small keys force many ties at the cut; shift them to exercise both radix levels.
        let keys: Vec<u64> = raw.iter().map(|&k| (k << 13) | 0x1000_0000).collect();
        let n = keys.len();
        let k = ((frac * n as f64) as usize).max(1);
        let (cut, _) = run(&keys, (n - k) as u64, Side::TopK, cap, chunk);
        let got = apply(&keys, &[(&cut, true)], chunk);
        prop_assert_eq!(got, expected(&keys, None, None, Some(k)));
    }

    #[test]
    fn bands_are_exact(
        raw in proptest::collection::vec(0u64..30, 2..500),
        a in 0.0f64..1.0,
        b in 0.0f64..1.0,
        chunk in 1usize..64,
        cap in prop_oneof![Just(0u64), Just(1_000_000u64)],
    ) {
        let keys: Vec<u64> = raw.iter().map(|&k| (k * 0x1_0003) | 0x2000_0000).collect();
        let n = keys.len();
        let (lo, hi) = {
            let x = (a * n as f64) as usize;
            let y = (b * n as f64) as usize;
            (x.min(y), x.max(y).min(n - 1))
        };
        let (c1, _) = run(&keys, lo as u64, Side::Lower, cap, chunk);
        let (c2, _) = run(&keys, hi as u64, Side::Upper, cap, chunk);
        let got = apply(&keys, &[(&c1, true), (&c2, false)], chunk);
        prop_assert_eq!(got, expected(&keys, Some(lo), Some(hi), None));
    }
}

proptest! {
    #[test]
    fn a_band_never_changes_the_cut(
        raw in proptest::collection::vec(0u64..3000, 1..3000),
        frac in 0.0f64..1.0,
        chunk in 1usize..700,
        side in prop_oneof![Just(Side::TopK), Just(Side::Lower), Just(Side::Upper)],
        band in prop_oneof![
            Just(None),
            Just(Some(None)),
            (0u64..0x1_0000, 0u64..64).prop_map(|(lo, w)| Some(Some((lo, (lo + w).min(0xffff))))),
        ],
        cap in prop_oneof![Just(2u64), Just(64u64), Just(1_000_000u64)],
    ) {
        // Keys spread over a few dozen level-0 bins, with many ties; `band` is the
        // sampled one, none, or an arbitrary (usually wrong) one.
        let keys: Vec<u64> = raw.iter().map(|&k| ((k * 0x9e37) & 0x3f_ffff) | 0x3c00_0000).collect();
        let n = keys.len();
        let rank = ((frac * n as f64) as u64).min(n as u64 - 1);
        let (plain, _) = run(&keys, rank, side, 1_000_000, chunk);
        let (banded, passes) = run_sampled(&keys, rank, side, cap, chunk, band);
        let above = side != Side::Upper;
        prop_assert_eq!(apply(&keys, &[(&banded, above)], chunk), apply(&keys, &[(&plain, above)], chunk));
        prop_assert_eq!((banded.key, banded.keep, banded.eq), (plain.key, plain.keep, plain.eq));
        if band.is_none() && cap == 1_000_000 {
            // The whole tensor is the sample: its band holds the cut, one pass.
            prop_assert_eq!(passes, 1);
        }
    }
}

/// The vectorized sweep over values (32- or 64-bit lanes) and the generic one over keys
/// gather the same.
fn band_collects_the_same<T: Real>(values: &[T]) {
    let keys: Vec<u64> = values.iter().map(|v| v.mag_key()).collect();
    let mut sel = Selector::new(4000, Side::TopK, T::KEY_BITS, 1 << 20);
    let mut stats = Stats::default();
    sel.sample(0, keys.iter().copied(), &mut stats);
    sel.plan_band(0, keys.len() as u64, &mut stats);
    assert!(sel.band.is_some());
    let (mut a, mut b) = (Stats::default(), Stats::default());
    for (c, part) in values.chunks(333).enumerate() {
        sel.collect_values(0, c as u64 * 333, part, &mut a);
        sel.collect(0, c as u64 * 333, part.iter().map(|v| v.mag_key()), &mut b);
    }
    assert_eq!(a.items(0), b.items(0));
    assert_eq!(a.packed(0), b.packed(0));
    assert_eq!(a.count(0), b.count(0));
    // f32 keys of a small tensor are packed, f64 keys are not.
    let gathered = if T::KEY_BITS <= 32 { a.packed(0).len() } else { a.items(0).len() };
    assert!(gathered > 0 && *a.count(0) > 0);
    // The same band with a cap it outgrows: both sweeps still count, and give it up.
    let band = sel.band;
    let mut small = Selector::new(4000, Side::TopK, T::KEY_BITS, 10);
    (small.band, small.pack) = (band, sel.pack);
    let (mut c, mut d) = (Stats::default(), Stats::default());
    for (i, part) in values.chunks(333).enumerate() {
        small.collect_values(0, i as u64 * 333, part, &mut c);
    }
    small.gathered = Gathered::default();
    for (i, part) in values.chunks(333).enumerate() {
        small.collect(0, i as u64 * 333, part.iter().map(|v| v.mag_key()), &mut d);
    }
    assert_eq!(c.count(0), a.count(0));
    assert_eq!(d.count(0), a.count(0));
    assert!(c.overflowed(0) && d.overflowed(0));
    assert!(c.items(0).is_empty() && c.packed(0).is_empty() && d.packed(0).is_empty());
}

#[test]
fn a_band_collects_the_same_from_values_and_from_keys() {
    let values: Vec<f32> = (0..5000).map(|i| ((i * 7919) % 4999) as f32 * 1e-3 - 2.5).collect();
    band_collects_the_same(&values);
    band_collects_the_same(&values.iter().map(|&v| v as f64 * 1.5).collect::<Vec<f64>>());
}

/// [`top_mask`] over the values of chunks of `chunk` agrees with the exact top-`k`.
fn top_mask_is_exact<T: Real>(values: &[T], k: usize, chunk: usize) -> Result<(), TestCaseError> {
    let keys: Vec<u64> = values.iter().map(|v| v.mag_key()).collect();
    let sel = Selector::new((keys.len() - k) as u64, Side::TopK, T::KEY_BITS, 1 << 20);
    let (cut, _) = finish(sel, &keys, chunk);
    let (mut got, mut keep) = (Vec::new(), Vec::new());
    for (c, part) in values.chunks(chunk).enumerate() {
        top_mask(&cut, (c * chunk) as u64, part, &mut keep);
        got.extend_from_slice(&keep);
    }
    prop_assert_eq!(got, expected(&keys, None, None, Some(k)));
    Ok(())
}

proptest! {
    #[test]
    fn top_masks_of_values_are_exact(
        raw in proptest::collection::vec(-25i32..25, 1..700),
        frac in 0.0f64..1.0,
        chunk in 1usize..120,
    ) {
        // Few distinct magnitudes, both signs: many ties at the cut, in 32- and 64-bit
        // lanes. No zeros (a cut at magnitude 0 keeps none of its ties, by design).
        let k = ((frac * raw.len() as f64) as usize).max(1);
        let v = |r: i32| r as f64 * 0.37 + 0.25 * (r >= 0) as i32 as f64 - 0.125;
        top_mask_is_exact(&raw.iter().map(|&r| v(r) as f32).collect::<Vec<f32>>(), k, chunk)?;
        top_mask_is_exact(&raw.iter().map(|&r| v(r)).collect::<Vec<f64>>(), k, chunk)?;
    }
}

/// The fused TIES kernel against the task vectors, keep masks, weighting and election done
/// one step at a time (as `task_vector` does without it), over chunks of `chunk`.
#[allow(clippy::too_many_arguments)]
fn fused_ties_agrees(
    models: &[Vec<f32>],
    base: &[f32],
    rule: &Rule,
    weights: &[f32],
    scales: &[f32],
    normalize: bool,
    lambda: f32,
    chunk: usize,
) -> Result<(), TestCaseError> {
    let n = base.len();
    let deltas: Vec<Vec<f32>> =
        models.iter().map(|x| x.iter().zip(base).map(|(&v, &b)| v - b).collect()).collect();
    let ks: &[usize] = match rule {
        Rule::TopK(ks) => ks,
        Rule::Draws(..) => &[],
    };
    let cuts: Vec<Cut> = deltas
        .iter()
        .zip(ks)
        .map(|(d, &k)| {
            let keys: Vec<u64> = d.iter().map(|v| v.mag_key()).collect();
            finish(Selector::new((n - k) as u64, Side::TopK, 32, 1 << 20), &keys, chunk).0
        })
        .collect();
    for c in 0..n.div_ceil(chunk) {
        let (from, to) = (c * chunk, ((c + 1) * chunk).min(n));
        let start = from as u64;
        let parts: Vec<&[f32]> = models.iter().map(|x| &x[from..to]).collect();
        let b = &base[from..to];
        // Every fused build the CPU has, from the values decoded and as stored in bf16
        // (the tests' values are exact in bf16), must give the same bits.
        let bf16 = |x: &[f32]| -> Vec<u8> { x.iter().flat_map(|&v| f32_to_bf16(v).to_le_bytes()).collect() };
        let stored: Vec<Vec<u8>> = parts.iter().map(|x| bf16(x)).collect();
        let stored_refs: Vec<&[u8]> = stored.iter().map(|x| &x[..]).collect();
        let b16 = bf16(b);
        let mut builds = Vec::new();
        for level in [Level::Avx2, Level::Avx512] {
            let mut tops: Vec<TopCut> = cuts.iter().map(|cut| cut.top_cut_f32(start)).collect();
            let mut tops16 = tops.clone();
            let values = TiesValues::F32 { models: &parts, base: b };
            let inputs = crate::kernels::TiesInputs { values, weights, scales, normalize, lambda };
            let mut got = vec![0f32; to - from];
            let keep = |tops| match rule {
                Rule::TopK(_) => Keep::Cuts(tops),
                Rule::Draws(d, offset) => Keep::Draws { start: offset + start, draws: d },
            };
            if !ties_f32_at(level, &inputs, keep(&mut tops), &mut got) {
                continue; // no fused form in this build, or not on this CPU
            }
            let values = TiesValues::Bf16 { models: &stored_refs, base: &b16 };
            let inputs = crate::kernels::TiesInputs { values, weights, scales, normalize, lambda };
            let mut got16 = vec![0f32; to - from];
            prop_assert!(ties_f32_at(level, &inputs, keep(&mut tops16), &mut got16));
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
            prop_assert_eq!(bits(&got16), bits(&got), "bf16 values, chunk {}, {:?}", c, level);
            builds.push((level, got));
        }
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let v3 = has!("avx2") && has!("fma") && has!("bmi1") && has!("bmi2") && has!("lzcnt");
            prop_assert!(!v3 || builds.iter().any(|(l, _)| *l == Level::Avx2), "the AVX2 build ran");
        }
        // One step at a time.
        let mut ws = Vec::new();
        for (i, (d, (&w, &s))) in deltas.iter().zip(weights.iter().zip(scales)).enumerate() {
            let (d, mut keep) = (&d[from..to], Vec::new());
            match rule {
                Rule::TopK(_) => top_mask(&cuts[i], start, d, &mut keep),
                Rule::Draws(draws, offset) => {
                    let (stream, threshold) = draws[i];
                    let draw = |j: u64| u64::from(crate::numeric::random::draw(stream, offset + j));
                    keep.extend((start..start + d.len() as u64).map(|j| draw(j) < threshold));
                }
            }
            ws.push(
                d.iter().zip(&keep).map(|(&v, &k)| if k { w * (v * s) } else { 0.0 }).collect::<Vec<f32>>(),
            );
        }
        for (level, got) in &builds {
            for (j, (&g, &bj)) in got.iter().zip(b).enumerate() {
                let total = ws.iter().fold(0f32, |t, w| t + w[j]);
                let (mut mixed, mut div) = (0f32, 0f32);
                for (w, &wi) in ws.iter().zip(weights) {
                    let agree = if total >= 0.0 { w[j] > 0.0 } else { w[j] < 0.0 };
                    mixed += if agree { w[j] } else { 0.0 };
                    div += if agree { wi } else { 0.0 };
                }
                let want = if normalize {
                    let d = if div == 0.0 { 1.0 } else { div };
                    bj + (mixed / d) * lambda
                } else {
                    bj + mixed * lambda
                };
                prop_assert_eq!(g.to_bits(), want.to_bits(), "chunk {} element {}, {:?}", c, j, level);
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]
    #[test]
    fn fused_ties_is_the_stepwise_election(
        raw in proptest::collection::vec(proptest::collection::vec(-7i32..7, 333), 1..6),
        fracs in proptest::collection::vec(0.0f64..1.0, 6),
        weights in proptest::collection::vec(prop_oneof![Just(0.0f32), Just(-0.5f32), Just(0.25f32), -1.0f32..1.0], 6),
        normalize in any::<bool>(),
        chunk in prop_oneof![Just(333usize), 1usize..70],
    ) {
        // Models a few steps from the base (so task vectors have few magnitudes, both
        // signs, exact zeros: many ties at each cut), and the odd NaN.
        let n = 333;
        let base: Vec<f32> = (0..n).map(|j| (j % 4) as f32 * 0.5 - 1.0).collect();
        let models: Vec<Vec<f32>> = raw
            .iter()
            .map(|r| {
                r.iter()
                    .zip(&base)
                    .enumerate()
                    .map(|(j, (&x, &b))| if x == 6 && j % 7 == 0 { f32::NAN } else { b + x as f32 * 0.375 })
                    .collect()
            })
            .collect();
        let ks: Vec<usize> = fracs.iter().take(models.len()).map(|f| ((f * n as f64) as usize).max(1)).collect();
        let scales = [1.0f32, 1.25, 0.5, 2.0, 1.0, 0.75];
        let m = models.len();
        fused_ties_agrees(&models, &base, &Rule::TopK(ks), &weights[..m], &scales[..m], normalize, 0.9, chunk)?;
    }

    /// DARE-TIES: the fused output keeps each model's drawn elements, as the stepwise
    /// masks do, near a multiple of 2^32 too (where the index hashes change their high half).
    #[test]
    fn fused_dare_ties_is_the_stepwise_election(
        raw in proptest::collection::vec(proptest::collection::vec(-7i32..7, 333), 1..6),
        draws in proptest::collection::vec((any::<u32>(), prop_oneof![Just(0u64), Just(1u64 << 32), 0u64..(1 << 32)]), 6),
        weights in proptest::collection::vec(prop_oneof![Just(0.0f32), Just(-0.5f32), Just(0.25f32), -1.0f32..1.0], 6),
        normalize in any::<bool>(),
        chunk in prop_oneof![Just(333usize), 1usize..70],
        offset in prop_oneof![Just(0u64), Just((1u64 << 32) - 150), Just((3u64 << 32) - 7)],
    ) {
        let n = 333;
        let base: Vec<f32> = (0..n).map(|j| (j % 4) as f32 * 0.5 - 1.0).collect();
        let models: Vec<Vec<f32>> =
            raw.iter().map(|r| r.iter().zip(&base).map(|(&x, &b)| b + x as f32 * 0.375).collect()).collect();
        let scales = [1.0f32, 1.25, 0.5, 2.0, 1.0, 0.75];
        let m = models.len();
        let rule = Rule::Draws(draws[..m].to_vec(), offset);
        fused_ties_agrees(&models, &base, &rule, &weights[..m], &scales[..m], normalize, 0.9, chunk)?;
    }
}

/// What a fused TIES test keeps of each model: its top `k` magnitudes, or its draws.
enum Rule {
    TopK(Vec<usize>),
    /// Each model's `(stream, threshold)`, and the flat index of the first element.
    Draws(Vec<(u32, u64)>, u64),
}

#[test]
fn an_overflowing_band_is_dropped_and_takes_the_usual_passes() {
    let keys: Vec<u64> = (0..50_000u64).map(|i| ((i * 7919) % 10_007) << 8).collect();
    let (cut, passes) = run_sampled(&keys, 40_000, Side::TopK, 1 << 20, 333, None);
    assert_eq!(passes, 1);
    let (small, more) = run_sampled(&keys, 40_000, Side::TopK, 10, 333, Some(Some((0, 0xffff))));
    assert!(more > 1);
    assert_eq!((small.key, small.keep, small.eq), (cut.key, cut.keep, cut.eq));
}

#[test]
fn ties_before_counts_through_the_coarse_index() {
    // Thousands of ties at the cut: lookups go through many windows of the coarse index.
    let keys: Vec<u64> = (0..20_000u64).map(|i| if i % 3 == 0 { 5 << 20 } else { (i % 97) << 23 }).collect();
    let (cut, _) = run(&keys, 3_000, Side::TopK, 1 << 20, 1_000);
    assert!(matches!(&cut.ties, TieIndex::Sorted(v, _) if v.len() > 4 * COARSE));
    for start in (0..20_000u64).step_by(37) {
        let naive = keys.iter().take(start as usize).filter(|&&k| k == cut.key).count() as u64;
        assert_eq!(cut.ties_before(start), naive, "{start}");
    }
}

#[test]
fn samples_are_spread_ranges_or_the_whole_tensor() {
    assert_eq!(sample_ranges(0), vec![]);
    assert_eq!(sample_ranges(1000), vec![(0, 1000)]);
    let r = sample_ranges(10_000_000);
    assert_eq!(r.len(), 64);
    assert!(r.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0));
    assert!(r.last().is_some_and(|&(s, l)| s + l <= 10_000_000));
}

#[test]
fn gathering_finishes_in_two_passes() {
    let keys: Vec<u64> = (0..10_000u64).map(|i| ((i * 7919) % 10_007) << 8).collect();
    let (_, passes) = run(&keys, 5_000, Side::TopK, 1 << 20, 333);
    assert_eq!(passes, 2);
    let (_, passes) = run(&keys, 5_000, Side::TopK, 0, 333);
    assert!(passes >= 2);
}
