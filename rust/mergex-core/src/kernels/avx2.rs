//! Kernels written with AVX2 intrinsics, for the CPUs without AVX-512 (most desktop and
//! laptop processors), where the portable loops compile to something much slower. Only
//! called through [`super::dispatch`], once the CPU is known to have the features.

use std::arch::x86_64::{
    __m256, __m256i, _mm256_add_epi32, _mm256_add_ps, _mm256_and_ps, _mm256_and_si256, _mm256_andnot_ps,
    _mm256_blendv_ps, _mm256_castps_si256, _mm256_castsi256_ps, _mm256_cmp_ps, _mm256_cmpeq_epi32,
    _mm256_cmpgt_epi32, _mm256_cvtepu16_epi32, _mm256_div_ps, _mm256_loadu_ps, _mm256_loadu_si256,
    _mm256_max_epu32, _mm256_min_epu32, _mm256_movemask_ps, _mm256_mul_ps, _mm256_or_si256,
    _mm256_permute2x128_si256, _mm256_permutevar8x32_epi32, _mm256_set1_epi32, _mm256_set1_ps,
    _mm256_setr_epi32, _mm256_setzero_ps, _mm256_setzero_si256, _mm256_slli_epi32, _mm256_storeu_ps,
    _mm256_storeu_si256, _mm256_sub_epi32, _mm256_sub_ps, _mm256_unpackhi_epi32, _mm256_unpacklo_epi32,
    _mm256_xor_ps, _mm256_xor_si256, _mm_loadu_si128, _pdep_u32, _CMP_EQ_OQ, _CMP_GE_OQ, _CMP_GT_OQ,
};

use super::ops::{bf16_delta_key, Band, Keep, Ties, TiesInputs, TiesOperands, TIES_MODELS};
use super::real::Real;

/// Lanes of one block: eight f32 values.
const LANES: usize = 8;

/// [`super::avx512::ties_f32`] with eight lanes a block: the same operations in the same
/// order as the portable stepwise election, bit for bit (values left out of a sum add
/// +0.0, as the portable code adds them). Each `Range` cut's `next` is advanced past the ties
/// seen.
///
/// # Safety
/// The CPU must support AVX2, FMA, BMI1/2, LZCNT and POPCNT (the caller checks with the
/// dispatch level).
#[target_feature(enable = "avx2,fma,bmi1,bmi2,lzcnt,popcnt")]
pub(super) unsafe fn ties_f32(inputs: &TiesInputs<'_>, mut keep: Keep<'_>, out: &mut [f32]) {
    let TiesOperands { models, base, bf16, count: m, n } = TiesOperands::of(inputs, keep.models(), out.len());
    let out = out.get_mut(..n).unwrap_or_default();
    let draws = matches!(keep, Keep::Draws { .. });
    // SAFETY: every pointer holds at least `n` values of its kind, and `m` bounds them all.
    unsafe {
        match (bf16, draws) {
            (true, false) => ties_values::<true, false>(inputs, &models[..m], base, &mut keep, out),
            (false, false) => ties_values::<false, false>(inputs, &models[..m], base, &mut keep, out),
            (true, true) => ties_values::<true, true>(inputs, &models[..m], base, &mut keep, out),
            (false, true) => ties_values::<false, true>(inputs, &models[..m], base, &mut keep, out),
        }
    }
}

/// `numeric::random::mix` in every lane.
#[target_feature(enable = "avx2,fma,bmi1,bmi2,lzcnt,popcnt")]
#[inline]
fn mix(x: __m256i) -> __m256i {
    use std::arch::x86_64::{_mm256_mullo_epi32, _mm256_srli_epi32};
    let x = _mm256_xor_si256(x, _mm256_srli_epi32::<16>(x));
    let x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x7feb_352d));
    let x = _mm256_xor_si256(x, _mm256_srli_epi32::<15>(x));
    let x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x846c_a68b_u32 as i32));
    _mm256_xor_si256(x, _mm256_srli_epi32::<16>(x))
}

/// The index hashes (`numeric::random::index_hashes`) of flat indices `j .. j + 8`.
#[target_feature(enable = "avx2,fma,bmi1,bmi2,lzcnt,popcnt")]
#[inline]
fn index_hashes(j: u64) -> __m256i {
    use crate::numeric::random::mix as mix1;
    if j >> 32 == (j + LANES as u64 - 1) >> 32 {
        let high = mix1((j >> 32) as u32 ^ 0x85eb_ca6b);
        let low =
            _mm256_add_epi32(_mm256_set1_epi32(j as u32 as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        _mm256_xor_si256(mix(low), _mm256_set1_epi32(high as i32))
    } else {
        // The block crosses a multiple of 2^32: lane by lane.
        let h: [u32; LANES] = std::array::from_fn(|l| crate::numeric::random::index_hash(j + l as u64));
        // SAFETY: eight u32; the load is unaligned.
        unsafe { _mm256_loadu_si256(h.as_ptr().cast::<__m256i>()) }
    }
}

/// Eight values from element `at` of the values at `p` (bf16 as stored where `BF16`, else
/// f32), as f32; only the first `count` are read, the others are zero.
///
/// # Safety
/// AVX2; `count <= 8` values from element `at` are inside the values at `p`.
#[target_feature(enable = "avx2,fma,bmi1,bmi2,lzcnt,popcnt")]
#[inline]
unsafe fn load<const BF16: bool>(p: *const u8, at: usize, count: usize) -> __m256 {
    let size = if BF16 { 2 } else { 4 };
    let mut part = [0u8; 32];
    let src = if count == LANES {
        // SAFETY: eight whole values (the caller's guarantee).
        unsafe { p.add(size * at) }
    } else {
        // SAFETY: `count` values are readable, and `part` holds eight of either size.
        unsafe { std::ptr::copy_nonoverlapping(p.add(size * at), part.as_mut_ptr(), size * count) };
        part.as_ptr()
    };
    // SAFETY: `src` holds eight values; the loads are unaligned.
    unsafe {
        if BF16 {
            let h = _mm_loadu_si128(src.cast());
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
        } else {
            _mm256_loadu_ps(src.cast::<f32>())
        }
    }
}

/// [`ties_f32`] with the models' and the base's values at `models` and `base`, bf16 as
/// stored where `BF16`, else f32, keeping by `keep`'s draws where `DRAWS`, else its cuts.
///
/// # Safety
/// As [`ties_f32`]; every pointer holds `out.len()` values; `models` is no longer than
/// `keep`'s rules, the weights and the scales.
#[target_feature(enable = "avx2,fma,bmi1,bmi2,lzcnt,popcnt")]
unsafe fn ties_values<const BF16: bool, const DRAWS: bool>(
    inputs: &TiesInputs<'_>,
    models: &[*const u8],
    base: *const u8,
    keep: &mut Keep<'_>,
    out: &mut [f32],
) {
    let TiesInputs { weights, scales, normalize, lambda, .. } = *inputs;
    let n = out.len();
    let m = models.len();
    let magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let sign = _mm256_castsi256_ps(_mm256_set1_epi32(i32::MIN));
    let (zero, one, lam) = (_mm256_setzero_ps(), _mm256_set1_ps(1.0), _mm256_set1_ps(lambda));
    // Lane `j` holds bit `j`: a mask of lanes as bits back to a vector mask.
    let lane_bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    let mut w = [_mm256_setzero_ps(); TIES_MODELS];
    // As in the AVX-512 kernel: every cut's kept ties as a range `[lo, hi)` of ordinals and
    // `next`, the ordinal of the next tie; a block keeps all or none of its ties unless the
    // range starts or ends inside it.
    let mut ords = [(0u64, 0u64, 0u64); TIES_MODELS];
    // Keys are at most 0x7fff_ffff, so they compare as signed: a cut key above that keeps
    // nothing, which the largest key (for "above") and a key no value has (for "tied") say.
    let mut keys_at = [(_mm256_setzero_si256(), _mm256_setzero_si256()); TIES_MODELS];
    // Draws: each model's stream, and its threshold flipped to the signed order (`None`: keep
    // everything).
    let mut draws = [(_mm256_setzero_si256(), None); TIES_MODELS];
    let mut start = 0;
    match keep {
        Keep::Cuts(cuts) => {
            for ((o, k), cut) in ords.iter_mut().zip(keys_at.iter_mut()).zip(cuts.iter()) {
                *o = match cut.ties {
                    Ties::None => (0, 0, 0),
                    Ties::All => (0, u64::MAX, 0),
                    Ties::Range { lo, hi, next } => (lo, hi, next),
                };
                *k = (_mm256_set1_epi32(cut.at.min(0x7fff_ffff) as i32), _mm256_set1_epi32(cut.at as i32));
            }
        }
        Keep::Draws { start: s, draws: d } => {
            start = *s;
            for (slot, &(stream, threshold)) in draws.iter_mut().zip(d.iter()) {
                let t = u32::try_from(threshold).ok().map(|t| _mm256_set1_epi32((t ^ 0x8000_0000) as i32));
                *slot = (_mm256_set1_epi32(stream as i32), t);
            }
        }
    }
    let sign_bits = _mm256_set1_epi32(i32::MIN);
    let mut at = 0;
    while at < n {
        let count = (n - at).min(LANES);
        let valid = (1u32 << count) - 1;
        let valid_vec =
            _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(valid as i32), lane_bits), lane_bits);
        // SAFETY: `count` values from `at` are inside every slice.
        let b = unsafe { load::<BF16>(base, at, count) };
        let hashes = if DRAWS { index_hashes(start + at as u64) } else { _mm256_setzero_si256() };
        let mut total = zero;
        for i in 0..m {
            // SAFETY: as above; `i < m` bounds every per-model slice and array.
            let x = unsafe { load::<BF16>(*models.get_unchecked(i), at, count) };
            let v = _mm256_sub_ps(x, b);
            let keep = if DRAWS {
                // Unsigned `draw < threshold`, as signed once both are flipped.
                // SAFETY: `i < m <= TIES_MODELS`.
                let all = match unsafe { *draws.get_unchecked(i) } {
                    (stream, Some(t)) => {
                        let r = _mm256_xor_si256(mix(_mm256_xor_si256(stream, hashes)), sign_bits);
                        _mm256_cmpgt_epi32(t, r)
                    }
                    (_, None) => _mm256_set1_epi32(-1),
                };
                if count < LANES {
                    _mm256_and_si256(all, valid_vec)
                } else {
                    all
                }
            } else {
                // SAFETY: `i < m <= TIES_MODELS`.
                let (gt_key, eq_key) = unsafe { *keys_at.get_unchecked(i) };
                let keys = _mm256_castps_si256(_mm256_and_ps(v, magnitude));
                let (mut above, mut tied_vec) =
                    (_mm256_cmpgt_epi32(keys, gt_key), _mm256_cmpeq_epi32(keys, eq_key));
                if count < LANES {
                    above = _mm256_and_si256(above, valid_vec);
                    tied_vec = _mm256_and_si256(tied_vec, valid_vec);
                }
                let tied = _mm256_movemask_ps(_mm256_castsi256_ps(tied_vec)) as u32;
                // SAFETY: `i < m <= TIES_MODELS`.
                let (lo, hi, next) = unsafe { ords.get_unchecked_mut(i) };
                let seen = *next + u64::from(tied.count_ones());
                let keep = if tied == 0 || seen <= *lo || *next >= *hi {
                    above
                } else if *next >= *lo && seen <= *hi {
                    _mm256_or_si256(above, tied_vec)
                } else {
                    let from = lo.saturating_sub(*next).min(8) as u32;
                    let to = hi.saturating_sub(*next).min(8) as u32;
                    let ranks = ((1u32 << to) - 1) & !((1u32 << from) - 1);
                    let kept = _mm256_set1_epi32(_pdep_u32(ranks, tied) as i32);
                    _mm256_or_si256(above, _mm256_cmpeq_epi32(_mm256_and_si256(kept, lane_bits), lane_bits))
                };
                *next = seen;
                keep
            };
            // SAFETY: `i < m`, within the weights and the scales.
            let (wi, si) = unsafe { (*weights.get_unchecked(i), *scales.get_unchecked(i)) };
            let wv = _mm256_and_ps(
                _mm256_castsi256_ps(keep),
                _mm256_mul_ps(_mm256_set1_ps(wi), _mm256_mul_ps(v, _mm256_set1_ps(si))),
            );
            total = _mm256_add_ps(total, wv);
            // SAFETY: `i < m <= TIES_MODELS`.
            unsafe { *w.get_unchecked_mut(i) = wv };
        }
        // Model i agrees where `W_i > 0` if `S >= 0`, else (`S` negative or NaN) where
        // `W_i < 0`, which is `−W_i > 0`.
        let plus = _mm256_cmp_ps::<_CMP_GE_OQ>(total, zero);
        let flip_w = _mm256_andnot_ps(plus, sign);
        let (mut mixed, mut div) = (zero, zero);
        for i in 0..m {
            // SAFETY: `i < m`, within `w` and the weights.
            let (wv, wi) = unsafe { (*w.get_unchecked(i), *weights.get_unchecked(i)) };
            let agree = _mm256_cmp_ps::<_CMP_GT_OQ>(_mm256_xor_ps(wv, flip_w), zero);
            mixed = _mm256_add_ps(mixed, _mm256_and_ps(agree, wv));
            div = _mm256_add_ps(div, _mm256_and_ps(agree, _mm256_set1_ps(wi)));
        }
        let r = if normalize {
            let d = _mm256_blendv_ps(div, one, _mm256_cmp_ps::<_CMP_EQ_OQ>(div, zero));
            _mm256_add_ps(b, _mm256_mul_ps(_mm256_div_ps(mixed, d), lam))
        } else {
            _mm256_add_ps(b, _mm256_mul_ps(mixed, lam))
        };
        if count == LANES {
            // SAFETY: eight values from `at` are inside `out`; the store is unaligned.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(at), r) };
        } else {
            let mut part = [0f32; LANES];
            // SAFETY: `part` holds eight values; the store is unaligned.
            unsafe { _mm256_storeu_ps(part.as_mut_ptr(), r) };
            if let Some(dst) = out.get_mut(at..at + count) {
                dst.copy_from_slice(&part[..count]);
            }
        }
        at += LANES;
    }
    if let Keep::Cuts(cuts) = keep {
        for (cut, &(_, _, seen)) in cuts.iter_mut().zip(&ords) {
            if let Ties::Range { next, .. } = &mut cut.ties {
                *next = seen;
            }
        }
    }
}

/// [`super::avx512::band_sweep_f32`] with eight lanes a block: the count of magnitude keys
/// under `band.lo_key`, and, appended to `out` in index order, `key << 32 | (band.start + j)`
/// for every element `j` whose key is in the band. As in the AVX-512 form, a first sweep
/// lists the blocks with a hit; AVX2 has no compress, so each listed half block's four
/// packed candidates are moved into place by a permutation looked up by their mask (no
/// branch depends on the data).
/// `band.start + values.len()` must not exceed 2^32.
///
/// # Safety
/// The CPU must support AVX2 (the caller checks with the dispatch level).
#[target_feature(enable = "avx2,fma,bmi1,bmi2,lzcnt,popcnt")]
pub(super) unsafe fn band_sweep_f32(values: &[f32], band: Band, out: &mut Vec<u64>) -> u64 {
    let p = values.as_ptr();
    // SAFETY: the sweep loads whole blocks below `values.len()`; the loads are unaligned.
    let block = |at: usize| unsafe { _mm256_castps_si256(_mm256_loadu_ps(p.add(at))) };
    let tail = |at: usize| values.get(at).map_or(0, |v| v.mag_key() as u32);
    // SAFETY: the caller's guarantees.
    unsafe { band_sweep(values.len(), band, out, block, tail) }
}

/// [`band_sweep_f32`] over the task vector `x − base` of bf16 values stored little-endian in
/// `x` and `base` (two bytes an element, any alignment, `base` at least as long as `x`):
/// each difference is taken in f32, as decoding both and subtracting does.
///
/// # Safety
/// The CPU must support AVX2 (the caller checks with the dispatch level).
#[target_feature(enable = "avx2,fma,bmi1,bmi2,lzcnt,popcnt")]
pub(super) unsafe fn band_sweep_bf16(x: &[u8], base: &[u8], band: Band, out: &mut Vec<u64>) -> u64 {
    let n = x.len().min(base.len()) / 2;
    let (px, pb) = (x.as_ptr(), base.as_ptr());
    // SAFETY: the sweep loads whole blocks below `n`; the loads are unaligned.
    let block = |at: usize| unsafe {
        _mm256_castps_si256(_mm256_sub_ps(load::<true>(px, at, LANES), load::<true>(pb, at, LANES)))
    };
    let tail = |at: usize| bf16_delta_key(x, base, at);
    // SAFETY: the caller's guarantees.
    unsafe { band_sweep(n, band, out, block, tail) }
}

/// For each mask of four lanes, the eight 32-bit indices that move its set lanes' 64-bit
/// values to the front, in order.
const COMPRESS: [[i32; 8]; 16] = {
    let mut table = [[0i32; 8]; 16];
    let mut mask = 0;
    while mask < 16 {
        let (mut to, mut lane) = (0usize, 0i32);
        while lane < 4 {
            if mask & (1 << lane) != 0 {
                table[mask][2 * to] = 2 * lane;
                table[mask][2 * to + 1] = 2 * lane + 1;
                to += 1;
            }
            lane += 1;
        }
        mask += 1;
    }
    table
};

/// The band sweep over `n` keys: `block(at)` gives the eight f32 values (as bits) from
/// element `at` of a whole block, `tail(at)` the key of one element past the whole blocks.
///
/// # Safety
/// AVX2; `block` may be called for every whole block below `n`; `start + n <= 2^32`.
#[target_feature(enable = "avx2,fma,bmi1,bmi2,lzcnt,popcnt")]
#[inline]
unsafe fn band_sweep(
    n: usize,
    Band { start, lo_key, span }: Band,
    out: &mut Vec<u64>,
    block: impl Fn(usize) -> __m256i,
    tail: impl Fn(usize) -> u32,
) -> u64 {
    let blocks = n / LANES;
    // A listed half block stores four candidates at the current end: room for all the
    // candidates plus one store's overhang.
    out.reserve(blocks * LANES + LANES);
    let magnitude = _mm256_set1_epi32(0x7fff_ffff);
    let lo = _mm256_set1_epi32(lo_key as i32);
    let width = _mm256_set1_epi32(span as i32);
    let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let mut under = 0u64;
    let mut len = out.len();
    let dst = out.as_mut_ptr();
    // Two sweeps a window of blocks, as in the AVX-512 form: count, test and list the blocks
    // with a candidate, then pack and store only those.
    const WINDOW: usize = 2048;
    let mut hits = [0u8; WINDOW];
    let mut listed = [0u16; WINDOW];
    for w in (0..blocks).step_by(WINDOW) {
        let count = (blocks - w).min(WINDOW);
        let mut found = 0;
        for k in 0..count {
            let keys = _mm256_and_si256(block((w + k) * LANES), magnitude);
            // Unsigned order: `keys >= lo` where the larger of the two is `keys`.
            let at_least = _mm256_cmpeq_epi32(_mm256_max_epu32(keys, lo), keys);
            under += u64::from(8 - (_mm256_movemask_ps(_mm256_castsi256_ps(at_least)) as u32).count_ones());
            let d = _mm256_sub_epi32(keys, lo);
            let h =
                _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_min_epu32(d, width), d)));
            // SAFETY: `k < count <= WINDOW` and `found <= k`.
            unsafe {
                *hits.get_unchecked_mut(k) = h as u8;
                *listed.get_unchecked_mut(found) = k as u16;
            }
            found += usize::from(h != 0);
        }
        for &k in listed.get(..found).unwrap_or_default() {
            let k = usize::from(k);
            let at = (w + k) * LANES;
            let keys = _mm256_and_si256(block(at), magnitude);
            // SAFETY: `k < count <= WINDOW`.
            let h = unsafe { *hits.get_unchecked(k) };
            // `start + at` is below 2^32 (the caller's guarantee), so the index fits 32 bits.
            let index = _mm256_add_epi32(_mm256_set1_epi32((start + at as u64) as u32 as i32), lanes);
            // (index, key) pairs: little-endian, each is the candidate `key << 32 | index`.
            let (low, high) = (_mm256_unpacklo_epi32(index, keys), _mm256_unpackhi_epi32(index, keys));
            let halves =
                [_mm256_permute2x128_si256::<0x20>(low, high), _mm256_permute2x128_si256::<0x31>(low, high)];
            for (half, packed) in halves.into_iter().enumerate() {
                let mask = usize::from(h >> (4 * half)) & 0xf;
                // SAFETY: `mask < 16`; `len` never passes the candidates so far, and the
                // capacity reserved above covers every candidate of this call plus the four
                // lanes a store may write past them; the loads and stores are unaligned.
                unsafe {
                    let order = _mm256_loadu_si256(COMPRESS.get_unchecked(mask).as_ptr().cast::<__m256i>());
                    _mm256_storeu_si256(
                        dst.add(len).cast::<__m256i>(),
                        _mm256_permutevar8x32_epi32(packed, order),
                    );
                }
                len += mask.count_ones() as usize;
            }
        }
    }
    // SAFETY: the first `len` elements were all written (the old ones, then the packed
    // candidates), and `len` is within the reserved capacity.
    unsafe { out.set_len(len) };
    for at in blocks * LANES..n {
        let key = tail(at);
        under += u64::from(key < lo_key);
        if key.wrapping_sub(lo_key) <= span {
            out.push(u64::from(key) << 32 | (start + at as u64));
        }
    }
    under
}

/// [`super::avx512::dare_l1_bf16`] with eight lanes a step: the same sums, lane for lane.
///
/// # Safety
/// The CPU must support AVX2 (the caller checks with the dispatch level).
#[target_feature(enable = "avx2,fma,bmi1,bmi2,lzcnt,popcnt")]
pub(super) unsafe fn dare_l1_bf16(
    x: &[u8],
    base: &[u8],
    hashes: &[u32],
    (stream, threshold): (u32, u64),
    all: &mut dyn FnMut(&[f64; 8]),
    kept: &mut dyn FnMut(&[f64; 8]),
) -> usize {
    use std::arch::x86_64::{
        __m256d, _mm256_add_pd, _mm256_and_pd, _mm256_castps256_ps128, _mm256_castsi256_pd,
        _mm256_castsi256_si128, _mm256_cvtepi32_epi64, _mm256_cvtps_pd, _mm256_extractf128_ps,
        _mm256_extracti128_si256, _mm256_set1_epi64x, _mm256_setzero_pd, _mm256_storeu_pd,
    };
    /// Elements of a block, and blocks in a group (as the AVX-512 form covers them).
    const BLOCK: usize = 256;
    const GROUP: usize = 4 * BLOCK;
    /// Blocks summed side by side (two: eight accumulators fill half the registers).
    const PAIR: usize = 2;
    let n = (x.len().min(base.len()) / 2).min(hashes.len());
    let groups = n / GROUP;
    let (px, pb) = (x.as_ptr(), base.as_ptr());
    let magnitude = _mm256_castsi256_pd(_mm256_set1_epi64x(0x7fff_ffff_ffff_ffff));
    let abs = |v: __m256d| _mm256_and_pd(v, magnitude);
    let stream = _mm256_set1_epi32(stream as i32);
    // Unsigned `draw < threshold`, as signed once both are flipped; `None`: all drawn.
    let t = u32::try_from(threshold).ok().map(|t| _mm256_set1_epi32((t ^ 0x8000_0000) as i32));
    let sign_bits = _mm256_set1_epi32(i32::MIN);
    let lanes = |v: __m256d, w: __m256d| {
        let mut l = [0f64; 8];
        // SAFETY: `l` holds eight f64; the stores are unaligned.
        unsafe {
            _mm256_storeu_pd(l.as_mut_ptr(), v);
            _mm256_storeu_pd(l.as_mut_ptr().add(4), w);
        }
        l
    };
    for g in 0..groups {
        for pair in 0..GROUP / BLOCK / PAIR {
            // Per block of the pair: all (lanes 0–3, 4–7), kept (lanes 0–3, 4–7).
            let mut sums = [[_mm256_setzero_pd(); 4]; PAIR];
            for step in (0..BLOCK).step_by(LANES) {
                for (b, s) in sums.iter_mut().enumerate() {
                    let at = g * GROUP + (pair * PAIR + b) * BLOCK + step;
                    // SAFETY: `at + 8 <= groups * GROUP <= n`, inside all three.
                    let (d, h) = unsafe {
                        let d = _mm256_sub_ps(load::<true>(px, at, LANES), load::<true>(pb, at, LANES));
                        (d, _mm256_loadu_si256(hashes.as_ptr().add(at).cast::<__m256i>()))
                    };
                    let drawn = match t {
                        Some(t) => _mm256_cmpgt_epi32(
                            t,
                            _mm256_xor_si256(mix(_mm256_xor_si256(stream, h)), sign_bits),
                        ),
                        None => _mm256_set1_epi32(-1),
                    };
                    let low = abs(_mm256_cvtps_pd(_mm256_castps256_ps128(d)));
                    let high = abs(_mm256_cvtps_pd(_mm256_extractf128_ps::<1>(d)));
                    let keep_low = _mm256_castsi256_pd(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(drawn)));
                    let keep_high =
                        _mm256_castsi256_pd(_mm256_cvtepi32_epi64(_mm256_extracti128_si256::<1>(drawn)));
                    // One element a lane a step: each lane adds its elements in index order,
                    // and an element not drawn adds +0 (the lane is never −0).
                    s[0] = _mm256_add_pd(s[0], low);
                    s[1] = _mm256_add_pd(s[1], high);
                    s[2] = _mm256_add_pd(s[2], _mm256_and_pd(low, keep_low));
                    s[3] = _mm256_add_pd(s[3], _mm256_and_pd(high, keep_high));
                }
            }
            for s in &sums {
                all(&lanes(s[0], s[1]));
            }
            for s in &sums {
                kept(&lanes(s[2], s[3]));
            }
        }
    }
    groups * GROUP
}
