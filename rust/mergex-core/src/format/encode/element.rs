//! Element codes and power-of-two scales (QUANT.md §2): rounding an f32 to the nearest
//! code of a small float format, and the shared exponents of MX and `ue8m0` scales.

/// `2^e` for the smallest integer `e` with `amax ≤ max · 2^e` (`amax > 0`).
pub(super) fn pow2_at_least(amax: f32, max: f32) -> f32 {
    let (a, m) = (f64::from(amax), f64::from(max));
    let mut e = (a / m).log2().ceil() as i32;
    while m * 2f64.powi(e) < a {
        e += 1;
    }
    while e > -200 && m * 2f64.powi(e - 1) >= a {
        e -= 1;
    }
    2f64.powi(e.clamp(-127, 127)) as f32
}

/// The E8M0 byte of a power of two, clamped to `0..=254`.
pub(super) fn pow2_byte(s: f32) -> u8 {
    if s <= f32::from_bits(1 << 22) {
        return 0;
    }
    let e = ((s.to_bits() >> 23) & 0xff) as i32 - 127;
    (127 + e).clamp(0, 254) as u8
}

/// Round `x` to the nearest code of a small float format (`ebits` exponent and `mbits`
/// mantissa bits, `bias`), ties to the even code, saturating to the code `max` (the largest
/// finite magnitude); the sign of −0 is kept. `x` is finite.
pub fn minifloat(x: f32, ebits: u32, mbits: u32, bias: i32, max: u8) -> u8 {
    let sign = if x.is_sign_negative() { 1u8 << (ebits + mbits) } else { 0 };
    let a = x.abs();
    let min_e = 1 - bias;
    let top = u32::from(max);
    let top_value = {
        let (e, m) = ((top >> mbits) as i32, top & ((1 << mbits) - 1));
        (1.0 + m as f32 / (1u32 << mbits) as f32) * 2f32.powi(e - bias)
    };
    if a >= top_value {
        return sign | max;
    }
    let e = (((a.to_bits() >> 23) & 0xff) as i32 - 127).max(min_e);
    // Elements below 2^min_e are subnormal: steps of 2^(min_e − mbits), as the normal
    // range's lowest binade.
    let scaled = a * 2f32.powi(mbits as i32 - e);
    let mut r = scaled.round_ties_even() as u32;
    let mut e = e;
    if r == 2 << mbits {
        e += 1;
        r = 1 << mbits;
    }
    let code = if r < 1 << mbits {
        r // subnormal (e = min_e) or zero
    } else {
        (((e + bias) as u32) << mbits) | (r - (1 << mbits))
    };
    sign | code.min(top) as u8
}

/// [`minifloat`] for E4M3 (QUANT.md §2), from the bits of `x` without a branch so that the
/// loops over a block vectorize: a normal result rounds the f32 mantissa to 3 bits (ties to
/// even, a carry moving into the exponent), a subnormal one is `RNE(|x| · 2⁹)`, and
/// magnitudes from 448 up saturate to `0x7e`.
#[inline(always)]
pub fn e4m3(x: f32) -> u8 {
    let bits = x.to_bits();
    let sign = ((bits >> 24) & 0x80) as u8;
    let a = f32::from_bits(bits & 0x7fff_ffff);
    let b = a.to_bits();
    let rounded = b.wrapping_add(0x7_ffff + ((b >> 20) & 1));
    let normal = (rounded >> 20).wrapping_sub(120 << 3);
    // RNE of a value below 2^23 by adding and taking away 2^23 (no rounding instruction needed).
    let sub = ((a * 512.0 + 8_388_608.0) - 8_388_608.0) as u32;
    let code = if a < 1.0 / 64.0 { sub } else { normal };
    let code = if a >= 448.0 { 0x7e } else { code };
    sign | code as u8
}

/// [`minifloat`] for E2M1 (FP4): the count of decision points passed, each midpoint between
/// two codes going to the even one.
#[inline(always)]
pub fn e2m1(x: f32) -> u8 {
    let a = x.abs();
    let code = u8::from(a > 0.25)
        + u8::from(a >= 0.75)
        + u8::from(a > 1.25)
        + u8::from(a >= 1.75)
        + u8::from(a > 2.5)
        + u8::from(a >= 3.5)
        + u8::from(a > 5.0);
    (u8::from(x.is_sign_negative()) << 3) | code
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::dtype::{f8_table, Dtype, E2M1};

    /// The nearest code by search: the smallest distance, ties to the even code.
    fn nearest(values: &[(u8, f32)], x: f32) -> u8 {
        let mut best = (f32::INFINITY, 0u8);
        for &(c, v) in values {
            let d = (v - x).abs();
            if d < best.0 || (d == best.0 && c % 2 == 0) {
                best = (d, c);
            }
        }
        best.1
    }

    #[test]
    fn e4m3_rounds_to_the_nearest_even_code_and_saturates() {
        let table = f8_table(Dtype::F8_E4M3);
        let pos: Vec<(u8, f32)> = (0u8..0x7f).map(|c| (c, table[c as usize])).collect();
        let mut x = 1e-4f32;
        while x < 600.0 {
            for v in [x, (x + 0.001).min(447.9)] {
                let want = if v >= 448.0 { 0x7e } else { nearest(&pos, v) };
                assert_eq!(minifloat(v, 4, 3, 7, 0x7e), want, "{v}");
                assert_eq!(minifloat(-v, 4, 3, 7, 0x7e), want | 0x80, "-{v}");
            }
            x *= 1.013;
        }
        // Every code's value and every midpoint between neighbours (ties to even).
        for c in 0u8..0x7e {
            let (a, b) = (table[c as usize], table[c as usize + 1]);
            assert_eq!(minifloat(a, 4, 3, 7, 0x7e), c);
            let want = if c % 2 == 0 { c } else { c + 1 };
            assert_eq!(minifloat((a + b) / 2.0, 4, 3, 7, 0x7e), want, "midpoint of {c:#x}");
        }
        assert_eq!(minifloat(-0.0, 4, 3, 7, 0x7e), 0x80);
        assert_eq!(minifloat(1e9, 4, 3, 7, 0x7e), 0x7e);
    }

    #[test]
    fn e2m1_and_e5m2_round_to_nearest_even() {
        let fp4: Vec<(u8, f32)> = (0u8..8).map(|c| (c, E2M1[c as usize])).collect();
        for k in 0..=700 {
            let v = k as f32 / 100.0;
            assert_eq!(minifloat(v, 2, 1, 1, 7), if v >= 6.0 { 7 } else { nearest(&fp4, v) }, "{v}");
        }
        assert_eq!(minifloat(5.0, 2, 1, 1, 7), 6); // the tie between 4 and 6 goes to the even code
        assert_eq!(minifloat(-0.25, 2, 1, 1, 7), 8);
        let table = f8_table(Dtype::F8_E5M2);
        let pos: Vec<(u8, f32)> = (0u8..0x7c).map(|c| (c, table[c as usize])).collect();
        let mut x = 1e-6f32;
        while x < 60000.0 {
            assert_eq!(minifloat(x, 5, 2, 15, 0x7b), nearest(&pos, x), "{x}");
            x *= 1.07;
        }
    }

    #[test]
    fn pow2_scales_are_the_smallest_that_fit() {
        assert_eq!(pow2_at_least(6.0, 6.0), 1.0);
        assert_eq!(pow2_at_least(6.01, 6.0), 2.0);
        assert_eq!(pow2_at_least(3.0, 6.0), 0.5);
        assert_eq!(pow2_at_least(448.0 * 0.25, 448.0), 0.25);
        assert_eq!(pow2_byte(1.0), 127);
        assert_eq!(pow2_byte(2f32.powi(-127)), 0);
    }

    #[test]
    fn the_fast_encoders_are_the_general_rule() {
        let mut x = 1e-7f32;
        while x < 1000.0 {
            for v in [x, -x, x * 1.0001, f32::from_bits(x.to_bits() + 1)] {
                assert_eq!(e4m3(v), minifloat(v, 4, 3, 7, 0x7e), "{v}");
                assert_eq!(e2m1(v), minifloat(v, 2, 1, 1, 7), "{v}");
            }
            x *= 1.0007;
        }
        let table = f8_table(Dtype::F8_E4M3);
        for c in 0u8..0x7e {
            let mid = (table[c as usize] + table[c as usize + 1]) / 2.0;
            assert_eq!(e4m3(mid), minifloat(mid, 4, 3, 7, 0x7e), "midpoint of {c:#x}");
        }
        for v in [0.0f32, -0.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 448.0, 464.0, 1e30] {
            assert_eq!(e4m3(v), minifloat(v, 4, 3, 7, 0x7e), "{v}");
            assert_eq!(e2m1(v), minifloat(v, 2, 1, 1, 7), "{v}");
        }
    }
}
