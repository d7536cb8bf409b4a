//! The chunked merge engine: plan (open inputs, validate, lay out the output), then run
//! every output tensor as passes over chunks of element ranges.

pub mod adapter;
pub mod control;
pub mod plan;
pub mod progress;
pub mod read;
mod run;
pub mod stage;
pub mod stream;
pub mod sweep;
mod values;

pub use plan::{Engine, PlanSummary};
pub use run::RunSummary;
