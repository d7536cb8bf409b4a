//! Kernels written with AVX-512 intrinsics, where the portable loops compile to something
//! much slower. Only called through [`super::real::dispatch`], once the CPU is known to have
//! the features.

use std::arch::x86_64::{
    __m512i, _mm512_add_epi64, _mm512_and_si512, _mm512_castsi512_si256, _mm512_cmple_epu32_mask,
    _mm512_cmplt_epu32_mask, _mm512_cvtepu32_epi64, _mm512_extracti64x4_epi64, _mm512_loadu_si512,
    _mm512_maskz_compress_epi64, _mm512_or_si512, _mm512_set1_epi32, _mm512_set1_epi64, _mm512_set_epi64,
    _mm512_slli_epi64, _mm512_storeu_si512, _mm512_sub_epi32,
};

/// Lanes of one block: sixteen f32 keys.
const LANES: usize = 16;

/// A selection band's sweep over f32 values (see `methods::select`): the count of
/// magnitude keys (`bits & 0x7fff_ffff`) under `lo_key`, and, appended to `out` in index
/// order, `key << 32 | (start + j)` for every element `j` whose key is in
/// `[lo_key, lo_key + span]`. `start + values.len()` must not exceed 2^32.
///
/// The portable form tests a block of lanes, then pushes its hits one by one; a block with
/// a hit is a mispredicted branch, and about one block in four has one. Here every block
/// compresses its in-band lanes into place and stores them whether or not there are any,
/// then moves the end of `out` by their count: no branch depends on the data.
///
/// # Safety
/// The CPU must support AVX-512 F (the caller checks with the dispatch level).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi1,bmi2,lzcnt,popcnt")]
pub(super) unsafe fn band_sweep_f32(
    values: &[f32],
    start: u64,
    lo_key: u32,
    span: u32,
    out: &mut Vec<u64>,
) -> u64 {
    let blocks = values.len() / LANES;
    // Every block stores two full vectors of eight candidates at the current end: room for
    // all the candidates plus one vector's overhang.
    out.reserve(blocks * LANES + LANES);
    let magnitude = _mm512_set1_epi32(0x7fff_ffff);
    let lo = _mm512_set1_epi32(lo_key as i32);
    let width = _mm512_set1_epi32(span as i32);
    let lanes = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
    let eight = _mm512_set1_epi64(8);
    let mut under = 0u64;
    let mut len = out.len();
    let dst = out.as_mut_ptr();
    for b in 0..blocks {
        let at = b * LANES;
        // SAFETY: `at + LANES <= values.len()`; the load is unaligned.
        let bits = unsafe { _mm512_loadu_si512(values.as_ptr().add(at).cast::<__m512i>()) };
        let keys = _mm512_and_si512(bits, magnitude);
        under += u64::from(_mm512_cmplt_epu32_mask(keys, lo).count_ones());
        let hits = _mm512_cmple_epu32_mask(_mm512_sub_epi32(keys, lo), width);
        let index = _mm512_add_epi64(_mm512_set1_epi64((start + at as u64) as i64), lanes);
        let low = _mm512_slli_epi64::<32>(_mm512_cvtepu32_epi64(_mm512_castsi512_si256(keys)));
        let high = _mm512_slli_epi64::<32>(_mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64::<1>(keys)));
        let (hits_low, hits_high) = ((hits & 0xff) as u8, (hits >> 8) as u8);
        // SAFETY: `len` never passes the candidates so far, and the capacity reserved above
        // covers every candidate of this call plus the eight lanes each store may write
        // past them; the stores are unaligned.
        unsafe {
            let packed = _mm512_maskz_compress_epi64(hits_low, _mm512_or_si512(low, index));
            _mm512_storeu_si512(dst.add(len).cast::<__m512i>(), packed);
            len += hits_low.count_ones() as usize;
            let packed =
                _mm512_maskz_compress_epi64(hits_high, _mm512_or_si512(high, _mm512_add_epi64(index, eight)));
            _mm512_storeu_si512(dst.add(len).cast::<__m512i>(), packed);
            len += hits_high.count_ones() as usize;
        }
    }
    // SAFETY: the first `len` elements were all written (the old ones, then the compressed
    // candidates), and `len` is within the reserved capacity.
    unsafe { out.set_len(len) };
    let at = blocks * LANES;
    for (j, v) in values.get(at..).unwrap_or_default().iter().enumerate() {
        let key = v.to_bits() & 0x7fff_ffff;
        under += u64::from(key < lo_key);
        if key.wrapping_sub(lo_key) <= span {
            out.push(u64::from(key) << 32 | (start + (at + j) as u64));
        }
    }
    under
}
