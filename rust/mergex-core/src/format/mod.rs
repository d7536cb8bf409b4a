//! Reading and writing the safetensors format.

pub mod checkpoint;
pub mod dtype;
pub mod encode;
pub mod file;
pub mod gptoss;
pub mod header;
pub mod quant;
pub mod writer;
