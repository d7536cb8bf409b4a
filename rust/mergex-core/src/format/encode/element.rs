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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::dtype::{f8_table, Dtype};
    use crate::kernels::real::E2M1;

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
}
