//! mergex-core: merge the weights of many safetensors checkpoints within a fixed RAM
//! budget. The modules are layers, each using only those before it:
//! [`error`] and [`job`] (what the engine is asked) → [`format`] (read and write
//! safetensors) → [`numeric`] (exact reductions, random draws) → [`kernels`] (the working
//! precision, conversions, SIMD loops) → [`methods`] (one merge per tensor, pass by pass)
//! → [`engine`] (plan, chunk, run). `scripts/module_graph.py` checks it.

pub mod engine;
pub mod error;
pub mod format;
pub mod job;
pub mod kernels;
pub mod methods;
pub mod numeric;

pub use engine::progress::Progress;
pub use engine::{Engine, PlanSummary, RunSummary};
pub use error::{Error, ErrorKind, Result};
pub use job::Job;
