//! mergex-core: merge the weights of many safetensors checkpoints within a fixed RAM
//! budget. A tensor goes through the stages laid out as modules:
//! [`format`] (read) → [`engine`] (plan, chunk, run) → [`kernels`] and [`methods`]
//! (merge) → [`format::writer`] (write).

pub mod engine;
pub mod error;
pub mod format;
pub mod kernels;
pub mod methods;

pub use engine::job::Job;
pub use engine::progress::Progress;
pub use engine::{Engine, PlanSummary, RunSummary};
pub use error::{Error, ErrorKind, Result};
