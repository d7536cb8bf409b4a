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
    /// Bytes per value.
    const BYTES: usize;
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
    /// The magnitude a key stands for.
    fn key_value(key: u64) -> f64;
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
    const BYTES: usize = 4;
    const KEY_BITS: u32 = 32;
    #[inline(always)]
    fn mag_key(self) -> u64 {
        (self.to_bits() & 0x7fff_ffff) as u64
    }
    fn key_value(key: u64) -> f64 {
        f32::from_bits(key as u32) as f64
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
    const BYTES: usize = 8;
    const KEY_BITS: u32 = 64;
    #[inline(always)]
    fn mag_key(self) -> u64 {
        self.to_bits() & 0x7fff_ffff_ffff_ffff
    }
    fn key_value(key: u64) -> f64 {
        f64::from_bits(key)
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
}

/// `acc[j] += w · x[j]` for `x` decoded from `bytes` of `dtype`: the fused decode and
/// weighted accumulation of a weighted sum. The same operations in the same order as
/// decoding the whole range and then [`crate::kernels::axpy`], so the result is identical;
/// decoding piece by piece into a small stack buffer keeps the decoded values in L1
/// instead of a buffer per input.
///
/// With `base`, accumulates the task vector instead: `acc[j] += w · (x[j] − base[j])`, as
/// [`crate::kernels::axpy_delta`] does.
#[inline(always)]
pub fn decode_axpy<T: Real>(dtype: Dtype, bytes: &[u8], w: T, base: Option<&[T]>, acc: &mut [T]) {
    const PIECE: usize = 512;
    let mut buf = [T::ZERO; PIECE];
    let size = dtype.size();
    for (i, (a, b)) in acc.chunks_mut(PIECE).zip(bytes.chunks(PIECE * size)).enumerate() {
        let x = &mut buf[..a.len()];
        T::decode(dtype, b, x);
        match base.and_then(|base| base.get(i * PIECE..i * PIECE + a.len())) {
            Some(base) => crate::kernels::axpy_delta(a, w, x, base),
            None => crate::kernels::axpy(a, w, x),
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
    pub use crate::kernels::{Ties, TiesInputs, TopCut};

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
        ($features:literal, $decode:ident, $encode:ident, $decode_axpy:ident, $run:ident) => {
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
            fn $decode_axpy<T: Real>(dtype: Dtype, bytes: &[u8], w: T, base: Option<&[T]>, acc: &mut [T]) {
                super::decode_axpy(dtype, bytes, w, base, acc)
            }

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = $features)]
            fn $run<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
        };
    }

    build!("avx2,fma,bmi1,bmi2,lzcnt,popcnt", decode_avx2, encode_avx2, decode_axpy_avx2, run_avx2);
    build!(
        "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi1,bmi2,lzcnt,popcnt",
        decode_avx512,
        encode_avx512,
        decode_axpy_avx512,
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

    /// Run `f` in the chosen build: `f`'s body, and what it inlines, is generated once per
    /// build (it must be `#[inline(always)]`), and the chosen copy is called.
    #[inline(always)]
    pub fn fast<R>(f: impl FnOnce() -> R) -> R {
        dispatched!(run_avx512, run_avx2, f(), (f))
    }

    /// A selection band's sweep over f32 values with packed candidates, where a build has a
    /// faster form of it than the portable loop (AVX-512): the count of magnitude keys under
    /// `lo_key`, the in-band candidates `key << 32 | index` appended to `out` in index order.
    /// `None` where no such build runs; the caller then sweeps the portable way, which gives
    /// the same count and candidates.
    pub fn band_sweep_f32(
        values: &[f32],
        start: u64,
        lo_key: u32,
        span: u32,
        out: &mut Vec<u64>,
    ) -> Option<u64> {
        #[cfg(target_arch = "x86_64")]
        if level() == Level::Avx512 {
            // SAFETY: `level` only picks AVX-512 when the CPU has it.
            return Some(unsafe { crate::kernels::avx512::band_sweep_f32(values, start, lo_key, span, out) });
        }
        let _ = (values, start, lo_key, span, out);
        None
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

    /// Whether [`ties_f32`] has a fused form in this build for `models` models.
    pub fn has_fused_ties(models: usize) -> bool {
        #[cfg(target_arch = "x86_64")]
        if level() == Level::Avx512 {
            return models <= crate::kernels::avx512::TIES_MODELS;
        }
        let _ = models;
        false
    }

    /// The TIES output of one sub-block, fused, where a build has that form (AVX-512; see
    /// `kernels::avx512::ties_f32`, whose [`TopCut`]s advance past the ties seen): `false`
    /// (nothing done) where no such build runs or there are more models than it holds.
    pub fn ties_f32(inputs: &TiesInputs<'_>, cuts: &mut [TopCut], out: &mut [f32]) -> bool {
        #[cfg(target_arch = "x86_64")]
        if has_fused_ties(inputs.models.len()) {
            // SAFETY: `has_fused_ties` is only true under AVX-512, which `level` only picks
            // when the CPU has it.
            unsafe { crate::kernels::avx512::ties_f32(inputs, cuts, out) };
            return true;
        }
        let _ = (inputs, cuts, out);
        false
    }

    /// [`super::decode_axpy`] in the chosen build.
    pub fn decode_axpy<T: Real>(dtype: Dtype, bytes: &[u8], w: T, base: Option<&[T]>, acc: &mut [T]) {
        dispatched!(
            decode_axpy_avx512,
            decode_axpy_avx2,
            super::decode_axpy(dtype, bytes, w, base, acc),
            (dtype, bytes, w, base, acc)
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
