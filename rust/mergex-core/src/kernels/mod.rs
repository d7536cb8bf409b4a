//! Element-wise kernels: dtype conversion and the arithmetic shared by merge methods.

#[cfg(target_arch = "x86_64")]
mod avx512;
pub mod real;

use real::Real;

/// `acc[j] += w * x[j]`, multiply then add (no fused multiply-add), so the result matches
/// the reference arithmetic bit for bit.
#[inline]
pub fn axpy<T: Real>(acc: &mut [T], w: T, x: &[T]) {
    for (a, &v) in acc.iter_mut().zip(x) {
        *a += w * v;
    }
}

/// `acc[j] += w * (x[j] - b[j])`: a weighted task vector.
#[inline]
pub fn axpy_delta<T: Real>(acc: &mut [T], w: T, x: &[T], b: &[T]) {
    for ((a, &v), &base) in acc.iter_mut().zip(x).zip(b) {
        *a += w * (v - base);
    }
}
