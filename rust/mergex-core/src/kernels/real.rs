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
fn as_u16(bytes: &[u8]) -> Option<&[u16]> {
    // SAFETY: every bit pattern is a valid u16, and align_to only reinterprets the aligned
    // middle part; we use it only when nothing is left over on either side.
    let (pre, mid, post) = unsafe { bytes.align_to::<u16>() };
    (pre.is_empty() && post.is_empty()).then_some(mid)
}

#[cfg(not(target_endian = "little"))]
fn as_u16(_: &[u8]) -> Option<&[u16]> {
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

/// One input's stored values over a sub-block, not yet decoded.
#[derive(Debug, Clone, Copy)]
pub struct Raw<'a> {
    /// Their dtype.
    pub dtype: Dtype,
    /// Their little-endian bytes.
    pub bytes: &'a [u8],
}

/// A weighted sum over one sub-block, from every input's stored bytes
/// (`methods::WeightedSum`): `acc = Σ w_i·x_i` from 0 in input order, or with `base` and
/// `lambda`, `acc = Σ w_i·(x_i − base)` and `out = base + (acc [/ divisor])·λ`; without them
/// `out = acc [/ divisor]`.
#[derive(Debug, Clone, Copy)]
pub struct SumInputs<'a, T> {
    /// The summed inputs, one per weight.
    pub models: &'a [Raw<'a>],
    /// `w_i`.
    pub weights: &'a [T],
    /// The base, for a sum of task vectors.
    pub base: Option<Raw<'a>>,
    /// Divide the sum by this, when set.
    pub divisor: Option<T>,
    /// λ, for a sum of task vectors.
    pub lambda: Option<T>,
}

/// [`SumInputs`] into `out` (one value per element; every input holds `out.len()` values).
///
/// The work goes in pieces of 512 elements: each input's piece is decoded into a stack
/// buffer and added into a stack accumulator, so both stay in L1 however many inputs there
/// are, and each output value is stored once. The operations and their order are those of
/// decoding everything and then [`crate::kernels::axpy`] (or
/// [`crate::kernels::axpy_delta`]) input by input, so the result is the same.
#[inline(always)]
pub fn weighted_sum<'a, T: Real>(x: &SumInputs<'a, T>, out: &mut [T]) {
    const PIECE: usize = 512;
    let done = weighted_sum_bf16(x, out);
    let (mut acc, mut vals, mut base) = ([T::ZERO; PIECE], [T::ZERO; PIECE], [T::ZERO; PIECE]);
    for (p, o) in out[done..].chunks_mut(PIECE).enumerate() {
        let (n, at) = (o.len(), done + p * PIECE);
        let piece = |r: Raw<'a>| {
            let size = r.dtype.size();
            r.bytes.get(at * size..(at + n) * size).unwrap_or_default()
        };
        let b = x.base.map(|r| {
            T::decode(r.dtype, piece(r), &mut base[..n]);
            &base[..n]
        });
        let acc = &mut acc[..n];
        acc.fill(T::ZERO);
        for (r, &w) in x.models.iter().zip(x.weights) {
            let v = &mut vals[..n];
            T::decode(r.dtype, piece(*r), v);
            match b {
                Some(b) => crate::kernels::axpy_delta(acc, w, v, b),
                None => crate::kernels::axpy(acc, w, v),
            }
        }
        finish_sum(o, acc, b, x.divisor, x.lambda);
    }
}

/// The last step of [`weighted_sum`] from the accumulated `acc`: with `base` and `lambda`,
/// `out = base + (acc [/ divisor])·λ`; else `out = acc [/ divisor]`.
#[inline(always)]
fn finish_sum<T: Real>(out: &mut [T], acc: &[T], base: Option<&[T]>, divisor: Option<T>, lambda: Option<T>) {
    match (base, lambda) {
        (Some(b), Some(lambda)) => {
            for ((o, &a), &b) in out.iter_mut().zip(acc).zip(b) {
                let mixed = divisor.map_or(a, |d| a / d);
                *o = b + mixed * lambda;
            }
        }
        _ => {
            for (o, &a) in out.iter_mut().zip(acc) {
                *o = divisor.map_or(a, |d| a / d);
            }
        }
    }
}

/// [`weighted_sum`] where every input is bf16 and the sum is in f32 (the common case),
/// over the whole 64-element blocks at the front of `out`: each block's accumulator stays in
/// registers while every input is converted and added into it, in input order, so each
/// value is the same as the general loop's. Returns the elements done (0 where the inputs
/// are not all bf16, or not aligned as `u16`s).
#[inline(always)]
fn weighted_sum_bf16<'a, T: Real>(x: &SumInputs<'a, T>, out: &mut [T]) -> usize {
    const B: usize = 64;
    let bf16 = |r: &Raw<'a>| if r.dtype == Dtype::BF16 { as_u16(r.bytes) } else { None };
    let models: Option<Vec<&[u16]>> = x.models.iter().map(bf16).collect();
    let base = match &x.base {
        Some(r) => bf16(r).map(Some),
        None => Some(None),
    };
    let (Some(models), Some(base), Some(weights), Some(out)) =
        (models, base, T::as_f32s(x.weights), T::as_f32s_mut(out))
    else {
        return 0;
    };
    // T is f32 here, so these conversions are exact.
    let (divisor, lambda) = (x.divisor.map(|d| d.to_f64() as f32), x.lambda.map(|l| l.to_f64() as f32));
    let whole = out.len() / B * B;
    if models.iter().chain(base.iter()).any(|m| m.len() < whole) {
        return 0;
    }
    for (p, o) in out[..whole].chunks_exact_mut(B).enumerate() {
        let at = p * B;
        let mut acc = [0f32; B];
        let mut b = [0f32; B];
        if let Some(base) = base {
            for (v, &h) in b.iter_mut().zip(&base[at..at + B]) {
                *v = bf16_to_f32(h);
            }
        }
        for (m, &w) in models.iter().zip(weights) {
            let h = &m[at..at + B];
            if base.is_some() {
                for ((a, &h), &b) in acc.iter_mut().zip(h).zip(&b) {
                    *a += w * (bf16_to_f32(h) - b);
                }
            } else {
                for (a, &h) in acc.iter_mut().zip(h) {
                    *a += w * bf16_to_f32(h);
                }
            }
        }
        finish_sum(o, &acc, base.map(|_| &b[..]), divisor, lambda);
    }
    whole
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// The straightforward weighted sum: decode every input whole, then add them up input
    /// by input (`axpy`/`axpy_delta`), then divide and scale.
    fn plain_sum(x: &SumInputs<'_, f32>, n: usize) -> Vec<f32> {
        let decode = |r: &Raw<'_>| {
            let mut v = vec![0f32; n];
            f32::decode(r.dtype, r.bytes, &mut v);
            v
        };
        let base = x.base.as_ref().map(decode);
        let mut acc = vec![0f32; n];
        for (r, &w) in x.models.iter().zip(x.weights) {
            match &base {
                Some(b) => crate::kernels::axpy_delta(&mut acc, w, &decode(r), b),
                None => crate::kernels::axpy(&mut acc, w, &decode(r)),
            }
        }
        acc.iter()
            .enumerate()
            .map(|(j, &a)| {
                let mixed = x.divisor.map_or(a, |d| a / d);
                match (&base, x.lambda) {
                    (Some(b), Some(l)) => b[j] + mixed * l,
                    _ => mixed,
                }
            })
            .collect()
    }

    proptest::proptest! {
        /// The dispatched weighted sum (register-blocked for bf16, pieces otherwise) gives
        /// the plain sum's bits, with and without a base, divisor and λ, for lengths that
        /// are not whole blocks, and with one input of another dtype.
        #[test]
        fn weighted_sum_is_the_plain_sum(
            bits in proptest::collection::vec(proptest::num::u16::ANY, 9 * 200),
            n in 0usize..200,
            models in 1usize..9,
            weights in proptest::collection::vec(-2.0f32..2.0, 8),
            task in proptest::bool::ANY,
            divisor in proptest::option::of(0.1f32..3.0),
            f16_input in proptest::option::of(0usize..8),
        ) {
            let inputs: Vec<(Dtype, Vec<u8>)> = (0..=models)
                .map(|i| {
                    let b = &bits[i * 200..i * 200 + n];
                    if f16_input == Some(i) {
                        (Dtype::F16, b.iter().flat_map(|h| (h & 0x7bff).to_le_bytes()).collect())
                    } else {
                        (Dtype::BF16, b.iter().flat_map(|h| h.to_le_bytes()).collect())
                    }
                })
                .collect();
            let raws: Vec<Raw<'_>> = inputs.iter().map(|(d, b)| Raw { dtype: *d, bytes: b }).collect();
            let (base, summed) = if task { (Some(raws[0]), &raws[1..]) } else { (None, &raws[1..]) };
            let x = SumInputs {
                models: summed,
                weights: &weights[..models],
                base,
                divisor,
                lambda: task.then_some(0.75),
            };
            let mut out = vec![0f32; n];
            dispatch::weighted_sum(&x, &mut out);
            let want = plain_sum(&x, n);
            let same = out.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()));
            proptest::prop_assert!(same, "{out:?} != {want:?}");
        }
    }
}

/// Runtime CPU dispatch: the conversion kernels and the methods' chunk code compiled three
/// times (portable, AVX2/FMA/BMI2, AVX-512), the widest build the CPU supports chosen once.
/// Results are identical: these loops have no floating-point reassociation for wider
/// vectors to change, and Rust never contracts `a * b + c` into a fused multiply-add.
pub mod dispatch {
    use super::Real;
    use crate::format::dtype::Dtype;
    pub use crate::kernels::{Band, Keep, Ties, TiesInputs, TiesValues, TopCut};

    /// A build of the kernels, from the most portable.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
    pub enum Level {
        /// The baseline of the target (SSE2 on x86-64, NEON on arm64).
        Portable,
        /// AVX2, FMA, BMI1/2, LZCNT and POPCNT (x86-64-v3).
        Avx2,
        /// The AVX2 set plus AVX-512 F/BW/VL/DQ.
        Avx512,
    }

    impl Level {
        /// Lower-case name, as `MERGEX_SIMD` takes it.
        pub fn name(self) -> &'static str {
            match self {
                Level::Portable => "portable",
                Level::Avx2 => "avx2",
                Level::Avx512 => "avx512",
            }
        }
    }

    /// The build in use: the widest the CPU supports, or a narrower one asked for with
    /// `MERGEX_SIMD` (`portable`, `avx2`, `avx512`) or `MERGEX_PORTABLE` (set to anything),
    /// for testing that every build gives the same bytes. Decided once per process.
    pub fn level() -> Level {
        static LEVEL: std::sync::OnceLock<Level> = std::sync::OnceLock::new();
        *LEVEL.get_or_init(|| {
            let asked = if std::env::var_os("MERGEX_PORTABLE").is_some() {
                Some(Level::Portable)
            } else {
                let name = std::env::var("MERGEX_SIMD").unwrap_or_default();
                [Level::Portable, Level::Avx2, Level::Avx512].into_iter().find(|l| l.name() == name)
            };
            let best = supported();
            asked.map_or(best, |a| a.min(best))
        })
    }

    fn supported() -> Level {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let v3 = has!("avx2")
                && has!("fma")
                && has!("bmi1")
                && has!("bmi2")
                && has!("lzcnt")
                && has!("popcnt");
            let avx512 = has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512dq");
            match (v3, avx512) {
                (true, true) => return Level::Avx512,
                (true, false) => return Level::Avx2,
                _ => {}
            }
        }
        Level::Portable
    }

    /// One build of every dispatched function, for the target features `$features`.
    macro_rules! build {
        ($features:literal, $decode:ident, $encode:ident, $run:ident) => {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = $features)]
            fn $decode<T: Real>(dtype: Dtype, bytes: &[u8], out: &mut [T]) {
                T::decode(dtype, bytes, out)
            }

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = $features)]
            fn $encode<T: Real>(vals: &[T], dtype: Dtype, out: &mut [u8]) {
                T::encode(vals, dtype, out)
            }

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = $features)]
            fn $run<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
        };
    }

    build!("avx2,fma,bmi1,bmi2,lzcnt,popcnt", decode_avx2, encode_avx2, run_avx2);
    build!(
        "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi1,bmi2,lzcnt,popcnt",
        decode_avx512,
        encode_avx512,
        run_avx512
    );

    /// Call the build of `$f` that [`level`] chose.
    macro_rules! dispatched {
        ($avx512:ident, $avx2:ident, $portable:expr, ($($arg:expr),*)) => {{
            #[cfg(target_arch = "x86_64")]
            match level() {
                // SAFETY: `level` only picks a build whose every feature the CPU has.
                Level::Avx512 => return unsafe { $avx512($($arg),*) },
                // SAFETY: as above.
                Level::Avx2 => return unsafe { $avx2($($arg),*) },
                Level::Portable => {}
            }
            $portable
        }};
    }

    /// `Some` of the AVX-512 or AVX2 form of the kernel `$f` in the build `$level` where the
    /// CPU has that build; `None` for the portable build (which has no such form), or a build
    /// the CPU lacks.
    macro_rules! at_level {
        ($level:expr, $f:ident($($arg:expr),*)) => {{
            #[cfg(target_arch = "x86_64")]
            match $level {
                l if l > supported() => None,
                // SAFETY: the CPU has every feature of the build (the arm above).
                Level::Avx512 => Some(unsafe { crate::kernels::avx512::$f($($arg),*) }),
                // SAFETY: as above.
                Level::Avx2 => Some(unsafe { crate::kernels::avx2::$f($($arg),*) }),
                Level::Portable => {
                    let _ = ($($arg),*);
                    None
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                let _ = ($level, $($arg),*);
                None
            }
        }};
    }

    /// Run `f` in the chosen build: `f`'s body, and what it inlines, is generated once per
    /// build (it must be `#[inline(always)]`), and the chosen copy is called.
    #[inline(always)]
    pub fn fast<R>(f: impl FnOnce() -> R) -> R {
        dispatched!(run_avx512, run_avx2, f(), (f))
    }

    /// A selection band's sweep over f32 values with packed candidates, where a build has a
    /// faster form of it than the portable loop (AVX-512, AVX2): the count of magnitude keys
    /// under the band, and its candidates `key << 32 | index` appended to `out` in index
    /// order. `None` where no such build runs; the caller then sweeps the portable way, which
    /// gives the same count and candidates.
    pub fn band_sweep_f32(values: &[f32], band: Band, out: &mut Vec<u64>) -> Option<u64> {
        band_sweep_f32_at(level(), values, band, out)
    }

    /// [`band_sweep_f32`] in the build `level`, where the CPU has it (for tests of every
    /// build on one machine).
    pub fn band_sweep_f32_at(level: Level, values: &[f32], band: Band, out: &mut Vec<u64>) -> Option<u64> {
        at_level!(level, band_sweep_f32(values, band, out))
    }

    /// [`band_sweep_f32`] over the task vector `x − base` of bf16 values as stored
    /// (little-endian, any alignment), where a build has that form (AVX-512, AVX2): `None`
    /// where none runs, and then nothing was done.
    pub fn band_sweep_bf16(x: &[u8], base: &[u8], band: Band, out: &mut Vec<u64>) -> Option<u64> {
        band_sweep_bf16_at(level(), x, base, band, out)
    }

    /// [`band_sweep_bf16`] in the build `level`, where the CPU has it.
    pub fn band_sweep_bf16_at(
        level: Level,
        x: &[u8],
        base: &[u8],
        band: Band,
        out: &mut Vec<u64>,
    ) -> Option<u64> {
        at_level!(level, band_sweep_bf16(x, base, band, out))
    }

    /// Whether this build has the statistics kernels that read bf16 as stored
    /// ([`band_sweep_bf16`] and [`dare_l1_bf16`]; the fused TIES output reads it too, where
    /// [`has_fused_ties`]).
    pub fn has_bf16_kernels() -> bool {
        cfg!(target_arch = "x86_64") && level() >= Level::Avx2
    }

    /// The lane sums of `|x|` (where `keep`, when given) of the whole groups of four
    /// 256-element blocks at the front of f32 `values`, each block's eight lanes handed to
    /// `each` in block order, where a build has a faster form than the portable loop
    /// (AVX-512): the elements covered, a multiple of 1,024. `None` where no such build runs.
    pub fn abs_block_sums_f32(
        values: &[f32],
        keep: Option<&[bool]>,
        each: &mut dyn FnMut(&[f64; 8]),
    ) -> Option<usize> {
        #[cfg(target_arch = "x86_64")]
        if level() == Level::Avx512 {
            // SAFETY: `level` only picks AVX-512 when the CPU has it.
            return Some(unsafe { crate::kernels::avx512::abs_block_sums_f32(values, keep, each) });
        }
        let _ = (values, keep, each);
        None
    }

    /// DARE's L1 sums of one model from stored bf16 (`kernels::avx512::dare_l1_bf16`: every
    /// 256-element block's lane sums of `|δ|` to `all` and of the drawn `|δ|` to `kept`, the
    /// draws from the elements' index `hashes`) for the whole groups of four blocks at the
    /// front, where a build has that form (AVX-512, AVX2): the elements covered, or `None`
    /// where none runs.
    pub fn dare_l1_bf16(
        x: &[u8],
        base: &[u8],
        hashes: &[u32],
        draw: (u32, u64),
        all: &mut dyn FnMut(&[f64; 8]),
        kept: &mut dyn FnMut(&[f64; 8]),
    ) -> Option<usize> {
        dare_l1_bf16_at(level(), x, base, hashes, draw, all, kept)
    }

    /// [`dare_l1_bf16`] in the build `level`, where the CPU has it (for tests of every build
    /// on one machine).
    pub fn dare_l1_bf16_at(
        level: Level,
        x: &[u8],
        base: &[u8],
        hashes: &[u32],
        draw: (u32, u64),
        all: &mut dyn FnMut(&[f64; 8]),
        kept: &mut dyn FnMut(&[f64; 8]),
    ) -> Option<usize> {
        at_level!(level, dare_l1_bf16(x, base, hashes, draw, all, kept))
    }

    /// Whether [`ties_f32`] has a fused form in this build for `models` models.
    pub fn has_fused_ties(models: usize) -> bool {
        has_fused_ties_at(level(), models)
    }

    fn has_fused_ties_at(level: Level, models: usize) -> bool {
        cfg!(target_arch = "x86_64") && level >= Level::Avx2 && models <= crate::kernels::TIES_MODELS
    }

    /// The TIES output of one sub-block, fused, where a build has that form (AVX-512 and
    /// AVX2; see `kernels::avx512::ties_f32`), keeping each model's top magnitudes (its
    /// [`TopCut`], advanced past the ties seen) or DARE's draws: `false` (nothing done) where
    /// no such build runs or there are more models than it holds.
    pub fn ties_f32(inputs: &TiesInputs<'_>, keep: Keep<'_>, out: &mut [f32]) -> bool {
        ties_f32_at(level(), inputs, keep, out)
    }

    /// [`ties_f32`] in the build `level`, where the CPU has it (for tests of every build on
    /// one machine): `false` where it has not.
    pub fn ties_f32_at(level: Level, inputs: &TiesInputs<'_>, keep: Keep<'_>, out: &mut [f32]) -> bool {
        has_fused_ties_at(level, inputs.values.models())
            && at_level!(level, ties_f32(inputs, keep, out)).is_some()
    }

    /// [`super::weighted_sum`] in the chosen build.
    pub fn weighted_sum<T: Real>(x: &super::SumInputs<'_, T>, out: &mut [T]) {
        fast(
            #[inline(always)]
            || super::weighted_sum(x, out),
        )
    }

    /// [`Real::decode`] in the chosen build.
    pub fn decode<T: Real>(dtype: Dtype, bytes: &[u8], out: &mut [T]) {
        dispatched!(decode_avx512, decode_avx2, T::decode(dtype, bytes, out), (dtype, bytes, out))
    }

    /// [`Real::encode`] in the chosen build.
    pub fn encode<T: Real>(vals: &[T], dtype: Dtype, out: &mut [u8]) {
        dispatched!(encode_avx512, encode_avx2, T::encode(vals, dtype, out), (vals, dtype, out))
    }
}
