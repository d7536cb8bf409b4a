//! Weighted sums straight from the inputs' stored bytes: what linear and task arithmetic
//! compute while decoding, without a method's chunk code.

use super::ops::{axpy, axpy_delta};
use super::real::{as_u16, Raw, Real};
use crate::format::dtype::{bf16_to_f32, Dtype};

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
/// decoding everything and then [`axpy`] (or
/// [`axpy_delta`]) input by input, so the result is the same.
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
                Some(b) => axpy_delta(acc, w, v, b),
                None => axpy(acc, w, v),
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
    use crate::kernels::dispatch;
    use crate::kernels::real::Real;

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
                Some(b) => axpy_delta(&mut acc, w, &decode(r), b),
                None => axpy(&mut acc, w, &decode(r)),
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
