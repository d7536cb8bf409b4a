//! Merge methods. Each method turns one output tensor's job into a [`TensorMerge`], which
//! the engine drives chunk by chunk: optional statistics passes, then the output pass.
//! Methods register in [`METHODS`], the one table the engine and the binding consult; each
//! declares its [`MethodSpec`] next to its builder.

mod arcee_fusion;
pub mod gram;
pub mod inputs;
pub mod kernel;
mod l1;
mod linear;
pub mod merge;
mod model_stock;
mod nearswap;
mod passthrough;
mod ram;
mod sce;
pub mod select;
mod slerp;
pub mod slots;
pub mod sparsify;
pub mod spec;
mod sphere;
pub mod stats;
mod task_vector;

pub use inputs::ChunkInputs;
pub use kernel::{Kernel, Stage};
pub use merge::{TensorCtx, TensorMerge, WeightedSum};
pub use spec::{BaseUse, MethodSpec};
pub use stats::Stats;

/// The registry: every method the engine runs, one line each (its spec sits beside its
/// builder, in the method's file).
pub static METHODS: &[&MethodSpec] = &[
    &linear::LINEAR,
    &task_vector::TASK_ARITHMETIC,
    &passthrough::PASSTHROUGH,
    &task_vector::TIES,
    &task_vector::DARE_TIES,
    &task_vector::DARE_LINEAR,
    &task_vector::BREADCRUMBS,
    &task_vector::BREADCRUMBS_TIES,
    &task_vector::DELLA,
    &task_vector::DELLA_LINEAR,
    &slerp::SLERP,
    &slerp::NUSLERP,
    &sphere::MULTISLERP,
    &sphere::KARCHER,
    &model_stock::MODEL_STOCK,
    &sce::SCE,
    &ram::RAM,
    &ram::RAMPLUS_TL,
    &nearswap::NEARSWAP,
    &arcee_fusion::ARCEE_FUSION,
];

/// Look a method up by name.
pub fn find(name: &str) -> Option<&'static MethodSpec> {
    METHODS.iter().find(|m| m.name == name).copied()
}
