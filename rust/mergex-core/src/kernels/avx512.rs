//! Kernels written with AVX-512 intrinsics, where the portable loops compile to something
//! much slower. Only called through [`super::dispatch`], once the CPU is known to have
//! the features.

use std::arch::x86_64::{
    __m512, __m512d, __m512i, _mm256_maskz_loadu_epi16, _mm512_add_epi32, _mm512_add_epi64, _mm512_add_pd,
    _mm512_and_si512, _mm512_castps_si512, _mm512_castsi512_ps, _mm512_castsi512_si256,
    _mm512_cmple_epu32_mask, _mm512_cmplt_epu32_mask, _mm512_cvtepu16_epi32, _mm512_cvtepu32_epi64,
    _mm512_extracti64x4_epi64, _mm512_loadu_si512, _mm512_mask_add_epi32, _mm512_mask_cmplt_epu32_mask,
    _mm512_maskz_compress_epi64, _mm512_or_si512, _mm512_reduce_add_epi32, _mm512_set1_epi32,
    _mm512_set1_epi64, _mm512_set_epi32, _mm512_set_epi64, _mm512_setzero_si512, _mm512_slli_epi32,
    _mm512_slli_epi64, _mm512_storeu_si512, _mm512_sub_epi32, _mm512_sub_ps, _mm512_xor_si512,
};

use super::ops::{bf16_delta_key, Band, Keep, Ties, TiesInputs, TiesOperands, TIES_MODELS};
use super::real::Real;

/// Lanes of one block: sixteen f32 keys.
const LANES: usize = 16;

/// A selection band's sweep over f32 values (see `methods::select`): the count of
/// magnitude keys (`bits & 0x7fff_ffff`) under `band.lo_key`, and, appended to `out` in index
/// order, `key << 32 | (band.start + j)` for every element `j` whose key is in the band.
/// `band.start + values.len()` must not exceed 2^32.
///
/// The portable form tests a block of lanes, then pushes its hits one by one; a block with
/// a hit is a mispredicted branch, and about one block in four has one. Here a first sweep
/// lists the blocks with a hit, and a second compresses each listed block's in-band lanes
/// into place and moves the end of `out` by their count: no branch depends on the data.
///
/// # Safety
/// The CPU must support AVX-512 F (the caller checks with the dispatch level).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi1,bmi2,lzcnt,popcnt")]
pub(super) unsafe fn band_sweep_f32(values: &[f32], band: Band, out: &mut Vec<u64>) -> u64 {
    let p = values.as_ptr();
    // SAFETY: the sweep loads whole blocks below `values.len()`; the loads are unaligned.
    let block = |at: usize| unsafe { _mm512_loadu_si512(p.add(at).cast::<__m512i>()) };
    let tail = |at: usize| values.get(at).map_or(0, |v| v.mag_key() as u32);
    // SAFETY: the caller's guarantees.
    unsafe { band_sweep(values.len(), band, out, block, tail) }
}

/// [`band_sweep_f32`] over the task vector `x − base` of bf16 values stored little-endian in
/// `x` and `base` (two bytes an element, any alignment, `base` at least as long as `x`):
/// each difference is taken in f32, as decoding both and subtracting does.
///
/// # Safety
/// The CPU must support AVX-512 F/BW (the caller checks with the dispatch level).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi1,bmi2,lzcnt,popcnt")]
pub(super) unsafe fn band_sweep_bf16(x: &[u8], base: &[u8], band: Band, out: &mut Vec<u64>) -> u64 {
    let n = x.len().min(base.len()) / 2;
    let (px, pb) = (x.as_ptr(), base.as_ptr());
    // SAFETY: the sweep loads whole blocks below `n`; the loads are unaligned.
    let block = |at: usize| unsafe {
        let d = _mm512_sub_ps(load_bf16(u16::MAX, px, at), load_bf16(u16::MAX, pb, at));
        _mm512_castps_si512(d)
    };
    let tail = |at: usize| bf16_delta_key(x, base, at);
    // SAFETY: the caller's guarantees.
    unsafe { band_sweep(n, band, out, block, tail) }
}

/// Sixteen bf16 values from element `at` of the little-endian bytes at `p`, as f32 (lanes
/// off in `lanes` read nothing and are zero).
///
/// # Safety
/// AVX-512 F/BW; every lane on in `lanes` is inside the bytes at `p`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi1,bmi2,lzcnt,popcnt")]
#[inline]
unsafe fn load_bf16(lanes: u16, p: *const u8, at: usize) -> __m512 {
    // SAFETY: masked, so only the lanes on are read; the load is unaligned.
    let h = unsafe { _mm256_maskz_loadu_epi16(lanes, p.add(2 * at).cast::<i16>()) };
    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
}

/// The band sweep over `n` keys: `block(at)` gives the sixteen f32 values (as bits) from
/// element `at` of a whole block, `tail(at)` the key of one element past the whole blocks.
///
/// # Safety
/// AVX-512 F; `block` may be called for every whole block below `n`; `start + n <= 2^32`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi1,bmi2,lzcnt,popcnt")]
#[inline]
unsafe fn band_sweep(
    n: usize,
    Band { start, lo_key, span }: Band,
    out: &mut Vec<u64>,
    block: impl Fn(usize) -> __m512i,
    tail: impl Fn(usize) -> u32,
) -> u64 {
    let blocks = n / LANES;
    // A listed block stores two full vectors of eight candidates at the current end: room
    // for all the candidates plus one vector's overhang.
    out.reserve(blocks * LANES + LANES);
    let magnitude = _mm512_set1_epi32(0x7fff_ffff);
    let lo = _mm512_set1_epi32(lo_key as i32);
    let width = _mm512_set1_epi32(span as i32);
    let lanes = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
    let eight = _mm512_set1_epi64(8);
    let mut len = out.len();
    let dst = out.as_mut_ptr();
    // Keys under the band, counted per lane (at most one a block, so no lane overflows
    // within a window).
    let one = _mm512_set1_epi32(1);
    let mut under = 0u64;
    // Two sweeps a window of blocks: the first counts, tests and lists the blocks with a
    // candidate (a quarter of them, in no pattern a branch could follow), the second packs
    // and stores only those.
    const WINDOW: usize = 1024;
    let mut hits = [0u16; WINDOW];
    let mut listed = [0u16; WINDOW];
    for w in (0..blocks).step_by(WINDOW) {
        let count = (blocks - w).min(WINDOW);
        let mut under_lanes = _mm512_setzero_si512();
        let mut found = 0;
        for k in 0..count {
            let keys = _mm512_and_si512(block((w + k) * LANES), magnitude);
            under_lanes =
                _mm512_mask_add_epi32(under_lanes, _mm512_cmplt_epu32_mask(keys, lo), under_lanes, one);
            let h = _mm512_cmple_epu32_mask(_mm512_sub_epi32(keys, lo), width);
            // SAFETY: `k < count <= WINDOW` and `found <= k`.
            unsafe {
                *hits.get_unchecked_mut(k) = h;
                *listed.get_unchecked_mut(found) = k as u16;
            }
            found += usize::from(h != 0);
        }
        under += u64::from(_mm512_reduce_add_epi32(under_lanes) as u32);
        for &k in listed.get(..found).unwrap_or_default() {
            let k = usize::from(k);
            let at = (w + k) * LANES;
            let keys = _mm512_and_si512(block(at), magnitude);
            // SAFETY: `k < count <= WINDOW`.
            let h = unsafe { *hits.get_unchecked(k) };
            let index = _mm512_add_epi64(_mm512_set1_epi64((start + at as u64) as i64), lanes);
            let low = _mm512_slli_epi64::<32>(_mm512_cvtepu32_epi64(_mm512_castsi512_si256(keys)));
            let high = _mm512_slli_epi64::<32>(_mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64::<1>(keys)));
            let (hits_low, hits_high) = ((h & 0xff) as u8, (h >> 8) as u8);
            // SAFETY: `len` never passes the candidates so far, and the capacity reserved
            // above covers every candidate of this call plus the eight lanes each store may
            // write past them; the stores are unaligned.
            unsafe {
                let packed = _mm512_maskz_compress_epi64(hits_low, _mm512_or_si512(low, index));
                _mm512_storeu_si512(dst.add(len).cast::<__m512i>(), packed);
                len += hits_low.count_ones() as usize;
                let packed = _mm512_maskz_compress_epi64(
                    hits_high,
                    _mm512_or_si512(high, _mm512_add_epi64(index, eight)),
                );
                _mm512_storeu_si512(dst.add(len).cast::<__m512i>(), packed);
                len += hits_high.count_ones() as usize;
            }
        }
    }
    // SAFETY: the first `len` elements were all written (the old ones, then the compressed
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

/// Elements of one block of an exact sum.
const SUM_BLOCK: usize = crate::numeric::reduce::BLOCK as usize;
/// Blocks summed side by side.
const SIDE_BY_SIDE: usize = 4;

/// The per-block lane sums of `|x|` in f64 (where `keep` is true, when given), for the whole
/// groups of four 256-element blocks at the front of `values`: lane `j` of a block adds its
/// elements `j, j + 8, …` in index order, exactly as `methods::reduce_abs` defines them, and
/// `each` receives every block's eight lanes in block order. Returns the elements covered (a
/// multiple of 1,024); the caller sums the rest. `keep`, when given, is at least as long as
/// `values`.
///
/// The portable loop vectorizes across the four blocks with gathers (slow on every AVX-512
/// CPU) instead of along each block's lanes; here each block's eight lanes are one register,
/// and an element left out adds nothing (a masked add, the same as adding +0.0 to a sum of
/// magnitudes, which is never −0.0).
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL (the caller checks with the dispatch level).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi1,bmi2,lzcnt,popcnt")]
pub(super) unsafe fn abs_block_sums_f32(
    values: &[f32],
    keep: Option<&[bool]>,
    mut each: impl FnMut(&[f64; 8]),
) -> usize {
    use std::arch::x86_64::{
        __m128i, _mm256_loadu_ps, _mm512_castpd_si512, _mm512_castsi512_pd, _mm512_cvtps_pd,
        _mm512_mask_add_pd, _mm512_set1_epi64, _mm512_setzero_pd, _mm512_storeu_pd, _mm_loadl_epi64,
        _mm_test_epi8_mask,
    };
    const GROUP: usize = SUM_BLOCK * SIDE_BY_SIDE;
    let groups = match keep {
        Some(k) => values.len().min(k.len()) / GROUP,
        None => values.len() / GROUP,
    };
    let magnitude = _mm512_set1_epi64(0x7fff_ffff_ffff_ffff);
    for g in 0..groups {
        let mut lanes = [_mm512_setzero_pd(); SIDE_BY_SIDE];
        for step in (0..SUM_BLOCK).step_by(8) {
            for (b, acc) in lanes.iter_mut().enumerate() {
                let at = g * GROUP + b * SUM_BLOCK + step;
                // SAFETY: `at + 8 <= groups * GROUP`, within `values` (and `keep`); the loads
                // are unaligned.
                let (x, kept) = unsafe {
                    let x = _mm512_cvtps_pd(_mm256_loadu_ps(values.as_ptr().add(at)));
                    let kept = match keep {
                        Some(k) => {
                            let bytes = _mm_loadl_epi64(k.as_ptr().add(at).cast::<__m128i>());
                            _mm_test_epi8_mask(bytes, bytes) as u8
                        }
                        None => u8::MAX,
                    };
                    (x, kept)
                };
                let x = _mm512_castsi512_pd(std::arch::x86_64::_mm512_and_si512(
                    _mm512_castpd_si512(x),
                    magnitude,
                ));
                *acc = _mm512_mask_add_pd(*acc, kept, *acc, x);
            }
        }
        for acc in &lanes {
            let mut l = [0f64; 8];
            // SAFETY: `l` holds eight f64; the store is unaligned.
            unsafe { _mm512_storeu_pd(l.as_mut_ptr(), *acc) };
            each(&l);
        }
    }
    groups * GROUP
}

/// The TIES output of one sub-block, fused (`methods::task_vector`: the task vectors, the
/// keep masks, the weighted task vectors and the sign election in one sweep, every model's 16
/// lanes in a register): `δ_i = x_i − base`; `W_i = w_i·(δ_i·s_i)` where model `i`'s cut
/// keeps `δ_i`, else 0; `S = Σ W_i`
/// from 0 in model order; model `i` agrees where `W_i > 0` if `S ≥ 0`, else where `W_i < 0`;
/// `mixed = Σ` agreeing `W_i` and, with `normalize`, divided by `Σ` agreeing `w_i` (1 where
/// that is 0); `out = base + mixed·λ`. The same operations in the same order as the portable
/// code: an element left out of a sum adds nothing (masked adds), as adding +0.0 to a sum
/// that is never −0.0 does. The models, `cuts`, weights and scales have one entry per model
/// (at most [`TIES_MODELS`]); every slice of values is as long as `out`. Each `Range` cut's
/// `next` is advanced past the ties seen.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL/DQ (the caller checks with the dispatch level).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi1,bmi2,lzcnt,popcnt")]
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
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi1,bmi2,lzcnt,popcnt")]
#[inline]
fn mix(x: __m512i) -> __m512i {
    use std::arch::x86_64::{_mm512_mullo_epi32, _mm512_srli_epi32};
    let x = _mm512_xor_si512(x, _mm512_srli_epi32::<16>(x));
    let x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x7feb_352d));
    let x = _mm512_xor_si512(x, _mm512_srli_epi32::<15>(x));
    let x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x846c_a68b_u32 as i32));
    _mm512_xor_si512(x, _mm512_srli_epi32::<16>(x))
}

/// The index hashes (`numeric::random::index_hashes`) of flat indices `j .. j + 16`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi1,bmi2,lzcnt,popcnt")]
#[inline]
fn index_hashes(j: u64) -> __m512i {
    use crate::numeric::random::mix as mix1;
    let lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    if j >> 32 == (j + LANES as u64 - 1) >> 32 {
        let high = mix1((j >> 32) as u32 ^ 0x85eb_ca6b);
        let low = _mm512_add_epi32(_mm512_set1_epi32(j as u32 as i32), lanes);
        _mm512_xor_si512(mix(low), _mm512_set1_epi32(high as i32))
    } else {
        // The block crosses a multiple of 2^32: lane by lane.
        let h: [u32; LANES] = std::array::from_fn(|l| crate::numeric::random::index_hash(j + l as u64));
        // SAFETY: sixteen u32; the load is unaligned.
        unsafe { _mm512_loadu_si512(h.as_ptr().cast::<__m512i>()) }
    }
}

/// [`ties_f32`] with the models' and the base's values at `models` and `base`, bf16 as
/// stored where `BF16`, else f32, keeping by `keep`'s draws where `DRAWS`, else its cuts.
///
/// # Safety
/// As [`ties_f32`]; every pointer holds `out.len()` values; `models` is no longer than
/// `keep`'s rules, the weights and the scales.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi1,bmi2,lzcnt,popcnt")]
unsafe fn ties_values<const BF16: bool, const DRAWS: bool>(
    inputs: &TiesInputs<'_>,
    models: &[*const u8],
    base: *const u8,
    keep: &mut Keep<'_>,
    out: &mut [f32],
) {
    // SAFETY (both loads): masked, so only lanes below `out.len()` are read.
    let load = |lanes: u16, p: *const u8, at: usize| unsafe {
        if BF16 {
            load_bf16(lanes, p, at)
        } else {
            _mm512_maskz_loadu_ps(lanes, p.cast::<f32>().add(at))
        }
    };
    use std::arch::x86_64::{
        __m512, _mm512_add_ps, _mm512_castps_si512, _mm512_castsi512_ps, _mm512_cmp_ps_mask, _mm512_div_ps,
        _mm512_mask_add_ps, _mm512_mask_blend_ps, _mm512_mask_cmpeq_epu32_mask, _mm512_mask_cmpgt_epu32_mask,
        _mm512_mask_storeu_ps, _mm512_maskz_loadu_ps, _mm512_maskz_mov_epi32, _mm512_maskz_mul_ps,
        _mm512_mul_ps, _mm512_set1_ps, _mm512_setzero_ps, _mm512_sub_ps, _mm512_xor_si512, _pdep_u32,
        _CMP_EQ_OQ, _CMP_GE_OQ, _CMP_GT_OQ,
    };
    let TiesInputs { weights, scales, normalize, lambda, .. } = *inputs;
    let n = out.len();
    let m = models.len();
    let magnitude = _mm512_set1_epi32(0x7fff_ffff);
    let (zero, one, lam) = (_mm512_setzero_ps(), _mm512_set1_ps(1.0), _mm512_set1_ps(lambda));
    let mut w = [_mm512_setzero_ps(); TIES_MODELS];
    // Every cut's ties as a range `[lo, hi)` of kept ordinals (none is `[0, 0)`, all is
    // `[0, ∞)`) and `next`, the ordinal of the next tie. A block whose ties all fall inside
    // or all outside the range keeps all or none of them: two tests that mispredict only
    // where the range starts or ends. (Visiting the tied lanes one by one mispredicted in
    // every block that held a tie, and a bf16 task vector takes few distinct values, so many
    // do: the fused output 1.31 → 1.17 s of a warm TIES merge.) The one block where the
    // range starts or ends deposits the kept ranks onto its tied lanes (`pdep`).
    let mut ords = [(0u64, 0u64, 0u64); TIES_MODELS];
    let mut keys_at = [0u32; TIES_MODELS];
    // Draws: each model's stream, and its threshold (`None`: keep everything).
    let mut draws = [(_mm512_setzero_si512(), None); TIES_MODELS];
    let mut start = 0;
    match keep {
        Keep::Cuts(cuts) => {
            for ((o, k), cut) in ords.iter_mut().zip(keys_at.iter_mut()).zip(cuts.iter()) {
                *o = match cut.ties {
                    Ties::None => (0, 0, 0),
                    Ties::All => (0, u64::MAX, 0),
                    Ties::Range { lo, hi, next } => (lo, hi, next),
                };
                *k = cut.at;
            }
        }
        Keep::Draws { start: s, draws: d } => {
            start = *s;
            for (slot, &(stream, threshold)) in draws.iter_mut().zip(d.iter()) {
                let t = u32::try_from(threshold).ok().map(|t| _mm512_set1_epi32(t as i32));
                *slot = (_mm512_set1_epi32(stream as i32), t);
            }
        }
    }
    let mut at = 0;
    while at < n {
        let lanes: u16 = if n - at >= LANES { u16::MAX } else { (1u16 << (n - at)) - 1 };
        // SAFETY: masked loads touch only the lanes below `n - at`, inside every slice.
        let b = load(lanes, base, at);
        let hashes = if DRAWS { index_hashes(start + at as u64) } else { _mm512_setzero_si512() };
        let mut total = zero;
        for i in 0..m {
            // SAFETY: as above; `i < m` bounds every per-model slice.
            let x = load(lanes, unsafe { *models.get_unchecked(i) }, at);
            let v = _mm512_sub_ps(x, b);
            let keep = if DRAWS {
                // SAFETY: `i < m <= TIES_MODELS`.
                match unsafe { *draws.get_unchecked(i) } {
                    (stream, Some(t)) => {
                        _mm512_mask_cmplt_epu32_mask(lanes, mix(_mm512_xor_si512(stream, hashes)), t)
                    }
                    (_, None) => lanes,
                }
            } else {
                // SAFETY: `i < m <= TIES_MODELS`.
                let key_at = _mm512_set1_epi32(unsafe { *keys_at.get_unchecked(i) } as i32);
                let keys = _mm512_and_si512(_mm512_castps_si512(v), magnitude);
                let above = _mm512_mask_cmpgt_epu32_mask(lanes, keys, key_at);
                let tied = _mm512_mask_cmpeq_epu32_mask(lanes, keys, key_at);
                // SAFETY: `i < m <= TIES_MODELS`.
                let (lo, hi, next) = unsafe { ords.get_unchecked_mut(i) };
                let seen = *next + u64::from(tied.count_ones());
                let keep = if *next >= *lo && seen <= *hi {
                    above | tied
                } else if seen <= *lo || *next >= *hi {
                    above
                } else {
                    let from = lo.saturating_sub(*next).min(16) as u32;
                    let to = hi.saturating_sub(*next).min(16) as u32;
                    let ranks = ((1u32 << to) - 1) & !((1u32 << from) - 1);
                    above | _pdep_u32(ranks, u32::from(tied)) as u16
                };
                *next = seen;
                keep
            };
            let (wi, si) = unsafe { (*weights.get_unchecked(i), *scales.get_unchecked(i)) };
            let wv = _mm512_maskz_mul_ps(keep, _mm512_set1_ps(wi), _mm512_mul_ps(v, _mm512_set1_ps(si)));
            total = _mm512_add_ps(total, wv);
            // SAFETY: `i < m <= TIES_MODELS`.
            unsafe { *w.get_unchecked_mut(i) = wv };
        }
        // Model i agrees where `W_i > 0` if `S >= 0`, else where `W_i < 0`: flipping the
        // sign of `W_i` where `S >= 0` fails (negative or NaN) makes both `> 0`, and a zero
        // or NaN `W_i` never agrees either way.
        let plus = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(total, zero);
        let flip = _mm512_maskz_mov_epi32(!plus, _mm512_set1_epi32(i32::MIN));
        let (mut mixed, mut div) = (zero, zero);
        for i in 0..m {
            // SAFETY: `i < m`, within `w` and `weights`.
            let (wv, wi): (__m512, f32) = unsafe { (*w.get_unchecked(i), *weights.get_unchecked(i)) };
            let signed = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(wv), flip));
            let agree = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(signed, zero);
            mixed = _mm512_mask_add_ps(mixed, agree, mixed, wv);
            div = _mm512_mask_add_ps(div, agree, div, _mm512_set1_ps(wi));
        }
        let r = if normalize {
            let d = _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_EQ_OQ>(div, zero), div, one);
            _mm512_add_ps(b, _mm512_mul_ps(_mm512_div_ps(mixed, d), lam))
        } else {
            _mm512_add_ps(b, _mm512_mul_ps(mixed, lam))
        };
        // SAFETY: the masked store writes only the lanes below `n - at`.
        unsafe { _mm512_mask_storeu_ps(out.as_mut_ptr().add(at), lanes, r) };
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

/// DARE's L1 sums of one model's task vector `x − base`, from bf16 values as stored (two
/// bytes an element, any alignment, `base` at least as long as `x`), for the whole groups of
/// four 256-element blocks at the front: every block's eight f64 lane sums of `|δ|` go to
/// `all`, and of `|δ|` where the element is drawn (`mix(stream ^ hashes[j]) < threshold`,
/// `hashes` being the elements' index hashes, as `methods::random` defines them) to `kept`,
/// in block order; lane `l` of a block adds its elements `l, l + 8, …` in index order, as
/// `methods::reduce_abs` does. Returns the elements covered (a multiple of 1,024).
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL/DQ (the caller checks with the dispatch level).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi1,bmi2,lzcnt,popcnt")]
pub(super) unsafe fn dare_l1_bf16(
    x: &[u8],
    base: &[u8],
    hashes: &[u32],
    (stream, threshold): (u32, u64),
    all: &mut dyn FnMut(&[f64; 8]),
    kept: &mut dyn FnMut(&[f64; 8]),
) -> usize {
    use std::arch::x86_64::{
        _mm512_castpd_si512, _mm512_castps512_ps256, _mm512_castsi512_pd, _mm512_cvtps_pd,
        _mm512_extractf32x8_ps, _mm512_mask_add_pd, _mm512_setzero_pd, _mm512_storeu_pd,
    };
    const GROUP: usize = SUM_BLOCK * SIDE_BY_SIDE;
    let n = (x.len().min(base.len()) / 2).min(hashes.len());
    let groups = n / GROUP;
    let (px, pb) = (x.as_ptr(), base.as_ptr());
    let magnitude = _mm512_set1_epi64(0x7fff_ffff_ffff_ffff);
    let abs = |v: __m512d| _mm512_castsi512_pd(_mm512_and_si512(_mm512_castpd_si512(v), magnitude));
    let (stream, t) = (_mm512_set1_epi32(stream as i32), u32::try_from(threshold).ok());
    for g in 0..groups {
        let mut sums = [[_mm512_setzero_pd(); SIDE_BY_SIDE]; 2];
        for step in (0..SUM_BLOCK).step_by(LANES) {
            for b in 0..SIDE_BY_SIDE {
                let at = g * GROUP + b * SUM_BLOCK + step;
                // SAFETY: `at + 16 <= groups * GROUP <= n`, inside both.
                let d = unsafe { _mm512_sub_ps(load_bf16(u16::MAX, px, at), load_bf16(u16::MAX, pb, at)) };
                let drawn: u16 = match t {
                    Some(t) => _mm512_cmplt_epu32_mask(
                        // SAFETY: `at + 16 <= n`, inside `hashes`; the load is unaligned.
                        mix(_mm512_xor_si512(stream, unsafe {
                            _mm512_loadu_si512(hashes.as_ptr().add(at).cast::<__m512i>())
                        })),
                        _mm512_set1_epi32(t as i32),
                    ),
                    None => u16::MAX,
                };
                let low = abs(_mm512_cvtps_pd(_mm512_castps512_ps256(d)));
                let high = abs(_mm512_cvtps_pd(_mm512_extractf32x8_ps::<1>(d)));
                let [a, k] = &mut sums;
                // Elements `at .. at + 8` in lanes 0–7, then `at + 8 .. at + 16`: each lane
                // adds its elements in index order.
                a[b] = _mm512_add_pd(_mm512_add_pd(a[b], low), high);
                k[b] = _mm512_mask_add_pd(k[b], drawn as u8, k[b], low);
                k[b] = _mm512_mask_add_pd(k[b], (drawn >> 8) as u8, k[b], high);
            }
        }
        let lanes = |v: __m512d| {
            let mut l = [0f64; 8];
            // SAFETY: `l` holds eight f64; the store is unaligned.
            unsafe { _mm512_storeu_pd(l.as_mut_ptr(), v) };
            l
        };
        for &v in &sums[0] {
            all(&lanes(v));
        }
        for &v in &sums[1] {
            kept(&lanes(v));
        }
    }
    groups * GROUP
}
