//! Runtime CPU dispatch: the conversion kernels and the methods' chunk code compiled three
//! times (portable, AVX2/FMA/BMI2, AVX-512), the widest build the CPU supports chosen once.
//! Results are identical: these loops have no floating-point reassociation for wider
//! vectors to change, and Rust never contracts `a * b + c` into a fused multiply-add.

pub use super::ops::{Band, Keep, Ties, TiesInputs, TiesValues, TopCut};
use super::real::Real;
use super::sums::SumInputs;
use crate::format::dtype::Dtype;

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
        let v3 =
            has!("avx2") && has!("fma") && has!("bmi1") && has!("bmi2") && has!("lzcnt") && has!("popcnt");
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
            Level::Avx512 => Some(unsafe { super::avx512::$f($($arg),*) }),
            // SAFETY: as above.
            Level::Avx2 => Some(unsafe { super::avx2::$f($($arg),*) }),
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
        return Some(unsafe { super::avx512::abs_block_sums_f32(values, keep, each) });
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
pub fn weighted_sum<T: Real>(x: &SumInputs<'_, T>, out: &mut [T]) {
    fast(
        #[inline(always)]
        || super::sums::weighted_sum(x, out),
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

/// `out[k] = code(codes[k]) · s` for 8-bit float codes ([`crate::kernels::real::f8_times`]),
/// in the widest build.
pub fn f8_times(dtype: Dtype, codes: &[u8], s: f32, out: &mut [f32]) {
    fast(|| super::real::f8_times(dtype, codes, s, out));
}

/// `out[k] = E2M1(code k) · s` for FP4 codes two a byte
/// ([`crate::kernels::real::fp4_pairs_times`]), in the widest build.
pub fn fp4_pairs_times(bytes: &[u8], s: f32, out: &mut [f32]) {
    fast(|| super::real::fp4_pairs_times(bytes, s, out));
}
