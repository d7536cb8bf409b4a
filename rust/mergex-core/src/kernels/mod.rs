//! Element-wise kernels: the working precision and dtype conversion ([`real`]), the shared
//! operands and loops ([`ops`]), weighted sums from stored bytes ([`sums`]), and the SIMD
//! builds chosen at run time ([`dispatch`]).

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
pub mod dispatch;
pub mod ops;
pub mod real;
pub mod sums;

pub use ops::*;
