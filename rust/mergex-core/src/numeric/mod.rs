//! Numerics every layer above shares: exact, chunk-invariant reductions and the
//! counter-based random draws of METHODS.md §3.

pub mod random;
pub mod reduce;
