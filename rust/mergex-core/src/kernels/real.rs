//! The working-precision scalar: f32 normally, f64 when an input tensor is F64
//! (METHODS.md §0). Kernels are written once, generic over [`Real`].

use std::fmt::Debug;
use std::ops::{Add, AddAssign, Div, Mul, Neg, Sub};
use std::sync::OnceLock;

use crate::format::dtype::{bf16_to_f32, f32_to_bf16, f8_table, Dtype};

/// A floating-point working type.
pub trait Real:
    Copy
    + Debug
    + Default
    + Send
    + Sync
    + PartialOrd
    + Add<Output = Self>
    + AddAssign
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + 'static
{
    /// Zero.
    const ZERO: Self;
    /// One.
    const ONE: Self;
    /// Width of [`Real::mag_key`].
    const KEY_BITS: u32;
    /// An integer key that orders magnitudes: `|a| < |b|` iff `key(a) < key(b)` (NaN last).
    fn mag_key(self) -> u64;
    /// The values as f32, when that is what they are.
    fn as_f32s(values: &[Self]) -> Option<&[f32]> {
        let _ = values;
        None
    }
    /// [`Real::as_f32s`], mutable.
    fn as_f32s_mut(values: &mut [Self]) -> Option<&mut [f32]> {
        let _ = values;
        None
    }
    /// Convert a parameter (already rounded to f32 by the planner) or a statistic.
    fn from_f64(v: f64) -> Self;
    /// Widen for whole-tensor reductions.
    fn to_f64(self) -> f64;
    /// Decode `out.len()` values of `dtype` from little-endian `bytes`.
    fn decode(dtype: Dtype, bytes: &[u8], out: &mut [Self]);
    /// Round `vals` once (round-to-nearest-even) to `dtype`, little-endian, into `out`.
    fn encode(vals: &[Self], dtype: Dtype, out: &mut [u8]);
}

fn table(dtype: Dtype) -> &'static [f32; 256] {
    static E4M3: OnceLock<[f32; 256]> = OnceLock::new();
    static E5M2: OnceLock<[f32; 256]> = OnceLock::new();
    match dtype {
        Dtype::F8_E5M2 => E5M2.get_or_init(|| f8_table(Dtype::F8_E5M2)),
        _ => E4M3.get_or_init(|| f8_table(Dtype::F8_E4M3)),
    }
}

/// View little-endian bytes as `u16`s when they are aligned (the common case: the data of
/// a safetensors file and our own buffers are), so the conversion loops vectorize.
#[cfg(target_endian = "little")]
pub(crate) fn as_u16(bytes: &[u8]) -> Option<&[u16]> {
    // SAFETY: every bit pattern is a valid u16, and align_to only reinterprets the aligned
    // middle part; we use it only when nothing is left over on either side.
    let (pre, mid, post) = unsafe { bytes.align_to::<u16>() };
    (pre.is_empty() && post.is_empty()).then_some(mid)
}

#[cfg(not(target_endian = "little"))]
pub(crate) fn as_u16(_: &[u8]) -> Option<&[u16]> {
    None
}

#[cfg(target_endian = "little")]
fn as_u16_mut(bytes: &mut [u8]) -> Option<&mut [u16]> {
    // SAFETY: as in `as_u16`; writing any u16 leaves valid bytes.
    let (pre, mid, post) = unsafe { bytes.align_to_mut::<u16>() };
    (pre.is_empty() && post.is_empty()).then_some(mid)
}

#[cfg(not(target_endian = "little"))]
fn as_u16_mut(_: &mut [u8]) -> Option<&mut [u16]> {
    None
}

/// Decode any float dtype to f32 values through `f`, which receives each decoded f32
/// (or, for F64, the f64 value).
macro_rules! decode_into {
    ($dtype:expr, $bytes:expr, $out:expr, $from32:expr, $from64:expr) => {{
        let out = $out;
        match $dtype {
            Dtype::F32 => {
                for (o, c) in out.iter_mut().zip($bytes.chunks_exact(4)) {
                    *o = $from32(f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
                }
            }
            Dtype::BF16 => match as_u16($bytes) {
                Some(h) => {
                    for (o, &h) in out.iter_mut().zip(h) {
                        *o = $from32(bf16_to_f32(h));
                    }
                }
                None => {
                    for (o, c) in out.iter_mut().zip($bytes.chunks_exact(2)) {
                        *o = $from32(bf16_to_f32(u16::from_le_bytes([c[0], c[1]])));
                    }
                }
            },
            Dtype::F16 => {
                for (o, c) in out.iter_mut().zip($bytes.chunks_exact(2)) {
                    *o = $from32(half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32());
                }
            }
            Dtype::F64 => {
                for (o, c) in out.iter_mut().zip($bytes.chunks_exact(8)) {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(c);
                    *o = $from64(f64::from_le_bytes(b));
                }
            }
            Dtype::F8_E4M3 | Dtype::F8_E5M2 => {
                let t = table($dtype);
                for (o, &b) in out.iter_mut().zip($bytes.iter()) {
                    *o = $from32(t[b as usize]);
                }
            }
            // Integer dtypes never reach a kernel: the engine copies them byte for byte.
            _ => out.fill(Default::default()),
        }
    }};
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const KEY_BITS: u32 = 32;
    #[inline(always)]
    fn mag_key(self) -> u64 {
        (self.to_bits() & 0x7fff_ffff) as u64
    }
    fn as_f32s(values: &[f32]) -> Option<&[f32]> {
        Some(values)
    }
    fn as_f32s_mut(values: &mut [f32]) -> Option<&mut [f32]> {
        Some(values)
    }
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn decode(dtype: Dtype, bytes: &[u8], out: &mut [Self]) {
        decode_into!(dtype, bytes, out, |x: f32| x, |x: f64| x as f32)
    }
    #[inline(always)]
    fn encode(vals: &[Self], dtype: Dtype, out: &mut [u8]) {
        match dtype {
            Dtype::BF16 => match as_u16_mut(out) {
                Some(h) => {
                    for (h, &v) in h.iter_mut().zip(vals) {
                        *h = f32_to_bf16(v);
                    }
                }
                None => {
                    for (c, &v) in out.chunks_exact_mut(2).zip(vals) {
                        c.copy_from_slice(&f32_to_bf16(v).to_le_bytes());
                    }
                }
            },
            Dtype::F16 => {
                for (c, &v) in out.chunks_exact_mut(2).zip(vals) {
                    c.copy_from_slice(&half::f16::from_f32(v).to_bits().to_le_bytes());
                }
            }
            Dtype::F64 => {
                for (c, &v) in out.chunks_exact_mut(8).zip(vals) {
                    c.copy_from_slice(&(v as f64).to_le_bytes());
                }
            }
            _ => {
                for (c, &v) in out.chunks_exact_mut(4).zip(vals) {
                    c.copy_from_slice(&v.to_le_bytes());
                }
            }
        }
    }
}

/// Round an f64 to bf16 in one step (no double rounding): truncate to f32, make the
/// discarded bits sticky in the last f32 bit (round-to-odd), then round that to bf16.
fn f64_to_bf16(x: f64) -> u16 {
    let y = x as f32;
    if !y.is_finite() || y as f64 == x {
        return f32_to_bf16(y);
    }
    let mut bits = y.to_bits();
    if (y as f64).abs() > x.abs() {
        bits -= 1; // step toward zero: the truncated value
    }
    f32_to_bf16(f32::from_bits(bits | 1))
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const KEY_BITS: u32 = 64;
    #[inline(always)]
    fn mag_key(self) -> u64 {
        self.to_bits() & 0x7fff_ffff_ffff_ffff
    }
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn decode(dtype: Dtype, bytes: &[u8], out: &mut [Self]) {
        decode_into!(dtype, bytes, out, |x: f32| x as f64, |x: f64| x)
    }
    #[inline(always)]
    fn encode(vals: &[Self], dtype: Dtype, out: &mut [u8]) {
        match dtype {
            Dtype::BF16 => {
                for (c, &v) in out.chunks_exact_mut(2).zip(vals) {
                    c.copy_from_slice(&f64_to_bf16(v).to_le_bytes());
                }
            }
            Dtype::F16 => {
                for (c, &v) in out.chunks_exact_mut(2).zip(vals) {
                    c.copy_from_slice(&half::f16::from_f64(v).to_bits().to_le_bytes());
                }
            }
            Dtype::F32 => {
                for (c, &v) in out.chunks_exact_mut(4).zip(vals) {
                    c.copy_from_slice(&(v as f32).to_le_bytes());
                }
            }
            _ => {
                for (c, &v) in out.chunks_exact_mut(8).zip(vals) {
                    c.copy_from_slice(&v.to_le_bytes());
                }
            }
        }
    }
}

/// `out[k] = E4M3(codes[k]) · s`, the code decoded by its bits (the same values as
/// [`f8_table`], exact), without a table lookup so that the loop vectorizes: a normal code
/// `s eeee mmm` is the f32 with exponent `e + 120` and mantissa `m << 20`; a subnormal one
/// (`e = 0`) is `m · 2⁻⁹`; `s 1111 111` is NaN.
#[inline(always)]
pub fn e4m3_times(codes: &[u8], s: f32, out: &mut [f32]) {
    const SUB: f32 = 1.0 / 512.0;
    for (o, &q) in out.iter_mut().zip(codes) {
        let q = u32::from(q);
        let (sign, e, m) = ((q & 0x80) << 24, (q >> 3) & 0xf, q & 7);
        let normal = f32::from_bits(sign | ((e + 120) << 23) | (m << 20));
        let sub = f32::from_bits(sign | (m as f32 * SUB).to_bits());
        let v = if e == 0 { sub } else { normal };
        *o = if q & 0x7f == 0x7f { f32::NAN } else { v * s };
    }
}

/// `out[k] = code(codes[k]) · s` for 8-bit float codes of `dtype` (E4M3 by its bits, E5M2
/// by table), the product in f32: how a quantized weight's codes are decoded (QUANT.md §3).
#[inline(always)]
pub fn f8_times(dtype: Dtype, codes: &[u8], s: f32, out: &mut [f32]) {
    if dtype == Dtype::F8_E4M3 {
        e4m3_times(codes, s, out);
    } else {
        let t = table(dtype);
        for (o, &q) in out.iter_mut().zip(codes) {
            *o = t[q as usize] * s;
        }
    }
}

pub use crate::format::dtype::E2M1;

/// `out[k] = E2M1(codes[k]) · s` for FP4 codes, one a byte (already unpacked).
#[inline(always)]
pub fn fp4_times(codes: &[u8], s: f32, out: &mut [f32]) {
    for (o, &q) in out.iter_mut().zip(codes) {
        *o = E2M1[(q & 0xf) as usize] * s;
    }
}

/// `out[k] = E2M1(code k) · s` for FP4 codes two a byte, the even element in the low nibble
/// (`out` may end on a low nibble); each code decoded from its bits ([`e2m1`]) so that the
/// loop vectorizes.
#[inline(always)]
pub fn fp4_pairs_times(bytes: &[u8], s: f32, out: &mut [f32]) {
    let half = out.len() / 2;
    let mut pairs = out.chunks_exact_mut(2);
    for (o, &b) in (&mut pairs).zip(bytes) {
        o[0] = e2m1(u32::from(b & 0xf)) * s;
        o[1] = e2m1(u32::from(b >> 4)) * s;
    }
    if let ([o], Some(&b)) = (pairs.into_remainder(), bytes.get(half)) {
        *o = E2M1[(b & 0xf) as usize] * s;
    }
}

/// The value of an E2M1 code from its bits, without a table: a normal code `s ee m` is the
/// f32 with exponent `e − 1` and mantissa `m`, `s 00 m` is `m · 0.5` (the values of [`E2M1`]).
#[inline(always)]
pub fn e2m1(c: u32) -> f32 {
    let (e, m) = ((c >> 1) & 3, c & 1);
    let normal = ((e + 126) << 23) | (m << 22);
    let sub = m * 0x3f00_0000;
    let bits = if e == 0 { sub } else { normal };
    f32::from_bits(bits | ((c & 8) << 28))
}

/// `out[k] = (q − zp) · s` with `q = u − 2^(bits−1)` for integer codes stored unsigned (`u`,
/// one a byte, already unpacked): compressed-tensors' `pack-quantized` (QUANT.md §4b); `zp`
/// is 0 for symmetric packs. `q − zp` is an exact small integer, so one f32 multiply rounds.
#[inline(always)]
pub fn int_times(codes: &[u8], bits: u8, zp: i32, s: f32, out: &mut [f32]) {
    let offset = (1i32 << (bits.clamp(1, 8) - 1)) + zp;
    for (o, &u) in out.iter_mut().zip(codes) {
        *o = (i32::from(u) - offset) as f32 * s;
    }
}

/// One input's stored values over a sub-block, not yet decoded.
#[derive(Debug, Clone, Copy)]
pub struct Raw<'a> {
    /// Their dtype.
    pub dtype: Dtype,
    /// Their little-endian bytes.
    pub bytes: &'a [u8],
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_by_bits_is_the_table() {
        let table = f8_table(Dtype::F8_E4M3);
        let codes: Vec<u8> = (0..=255).collect();
        for s in [1.0f32, 0.37, 3.5e-3, 1e30] {
            let mut out = vec![0f32; 256];
            f8_times(Dtype::F8_E4M3, &codes, s, &mut out);
            for (q, v) in out.iter().enumerate() {
                let want = table[q] * s;
                assert!(v.to_bits() == want.to_bits() || (v.is_nan() && want.is_nan()), "{q:#x} × {s}");
            }
        }
    }

    #[test]
    fn e2m1_by_bits_is_the_table() {
        for c in 0..16u32 {
            assert_eq!(e2m1(c).to_bits(), E2M1[c as usize].to_bits(), "{c}");
        }
        let bytes: Vec<u8> = (0..=255).collect();
        let mut out = vec![0f32; 511];
        fp4_pairs_times(&bytes, 0.75, &mut out);
        for (k, v) in out.iter().enumerate() {
            let b = bytes[k / 2];
            let c = if k % 2 == 0 { b & 0xf } else { b >> 4 };
            assert_eq!(v.to_bits(), (E2M1[c as usize] * 0.75).to_bits(), "{k}");
        }
    }

    #[test]
    fn f64_to_bf16_has_no_double_rounding() {
        // Just above the bf16 halfway point between 1.0 and 1+2^-7, but the excess is
        // below f32 resolution: f64 -> f32 would round to the exact halfway point and
        // then to even (1.0); the correct single rounding goes up.
        let x = 1.0 + 2f64.powi(-8) + 2f64.powi(-40);
        assert_eq!(f64_to_bf16(x), 0x3f81);
        assert_eq!(f64_to_bf16(-x), 0xbf81);
        assert_eq!(f64_to_bf16(1.0 + 2f64.powi(-8)), 0x3f80);
        assert_eq!(f64_to_bf16(1.5), 0x3fc0);
    }

    #[test]
    fn encode_decode_round_trip() {
        let vals = [1.5f32, -2.25, 0.0, 1024.0];
        for d in [Dtype::F32, Dtype::F16, Dtype::BF16, Dtype::F64] {
            let mut bytes = vec![0u8; vals.len() * d.size()];
            f32::encode(&vals, d, &mut bytes);
            let mut back = [0f32; 4];
            f32::decode(d, &bytes, &mut back);
            assert_eq!(back, vals, "{d:?}");
        }
    }
}
