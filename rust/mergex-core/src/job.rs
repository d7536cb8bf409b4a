//! The merge job: what the planner (the Python front end) asks the engine to do, fully
//! resolved — every output tensor with its inputs and per-tensor parameter values.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use crate::error::{Error, Result};

/// A whole merge.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Job {
    /// Merge method name (METHODS.md).
    pub method: String,
    /// Model checkpoints (folders or files), referenced by index from the tensors.
    pub models: Vec<PathBuf>,
    /// Indices of models that are partial Hub snapshots: the shards of their index that are
    /// not downloaded are left out ([`crate::format::checkpoint::Checkpoint::open_partial`]).
    #[serde(default)]
    pub partial: Vec<usize>,
    /// Output tensors, in output order.
    pub tensors: Vec<TensorJob>,
    /// Seed of the random methods.
    #[serde(default)]
    pub seed: u64,
    /// RAM budget in bytes.
    pub ram_budget: u64,
    /// Worker threads.
    pub threads: usize,
    /// Largest data size of one output file, in bytes.
    pub shard_size: u64,
    /// Extra `__metadata__` entries for every output file.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Resumable runs: where to record finished shards, and those already finished.
    #[serde(default)]
    pub resume: Option<Resume>,
    /// Recipe stages fused into this merge, by the index of the model that is their output:
    /// that model's folder holds the stage's output laid out but not written, and its
    /// tensors are computed from the stage's job as they are read (`engine::stage`).
    #[serde(default)]
    pub stages: BTreeMap<usize, Job>,
}

/// The state of a resumable merge.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resume {
    /// File rewritten (atomically) after every finished shard.
    pub state_file: PathBuf,
    /// Identifies the configuration and inputs; stored in the state file.
    pub fingerprint: String,
    /// Shards already finished and verified: file name → checksum. Not rewritten.
    #[serde(default)]
    pub done: BTreeMap<String, String>,
}

/// One output tensor.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorJob {
    /// Output name.
    pub name: String,
    /// Output dtype name (safetensors spelling).
    pub dtype: String,
    /// Output shape; inputs must equal it, or (2-D) contain it as their top-left block.
    pub shape: Vec<u64>,
    /// Copy the single input byte for byte (non-float tensors).
    #[serde(default)]
    pub copy: bool,
    /// The base model's tensor, for methods that use one.
    #[serde(default)]
    pub base: Option<InputRef>,
    /// The other inputs, in config order.
    pub inputs: Vec<InputRef>,
    /// Global parameters for this tensor.
    #[serde(default)]
    pub params: BTreeMap<String, f64>,
    /// Write the merged values quantized (`name` and `dtype` are then the codes'; `shape`
    /// stays the weight's): `out_quantization: base` (QUANT.md §8).
    #[serde(default)]
    pub encode: Option<Encode>,
}

/// How a merged weight is written back quantized, in the base model's layout.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Encode {
    /// How each block's scale is chosen: `amax` (`amax / max`: block, compressed-tensors and
    /// ModelOpt FP8, QUANT.md §3, §4a, §5), `ue8m0` (powers of two, §3), `mx` (E8M0 bytes,
    /// §4d, §6), `nvfp4` (over a global divisor, §4c), `nvfp4_modelopt` (times a global
    /// multiplier, §5), `int` or `int_asym` (§4b).
    pub rule: String,
    /// The block (or per-tensor) scales.
    pub scale: Companion,
    /// Rows and columns of one block; `None` for one scale over the whole tensor.
    #[serde(default)]
    pub block: Option<[u64; 2]>,
    /// Bits of packed integers (4 or 8).
    #[serde(default)]
    pub bits: Option<u8>,
    /// NVFP4's one-value global scale.
    #[serde(default)]
    pub global: Option<Companion>,
    /// gpt-oss MXFP4: the codes (`[E, N, K/32, 16]`) and scales (`[E, N, K/32]`) store the
    /// transpose of the weight `[E, K, N]` (QUANT.md §6).
    #[serde(default)]
    pub transposed: bool,
    /// Tensors with the same key share the amax their global scale is computed from (an
    /// NVFP4 fusion group: q/k/v, gate/up); by default, the tensor's own.
    #[serde(default)]
    pub fusion: Option<String>,
    /// Zero points of asymmetric integers.
    #[serde(default)]
    pub zero_point: Option<Companion>,
}

/// An output tensor written beside a quantized weight's codes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Companion {
    /// Its name.
    pub name: String,
    /// Its dtype (safetensors spelling).
    pub dtype: String,
    /// Its shape, as in the base model.
    pub shape: Vec<u64>,
}

/// One input tensor of one model.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputRef {
    /// Index into [`Job::models`].
    pub model: usize,
    /// Tensor name in that model.
    pub tensor: String,
    /// Position of the model among the non-base models in config order (random draws).
    #[serde(default)]
    pub position: usize,
    /// Per-model parameters for this tensor.
    #[serde(default)]
    pub params: BTreeMap<String, f64>,
    /// The scales of a quantized weight (`tensor` holds its codes), decoded in the reader.
    #[serde(default)]
    pub scale: Option<ScaleRef>,
    /// A LoRA adapter applied to the tensor in the reader: `W + scale · B·A`.
    #[serde(default)]
    pub lora: Option<LoraRef>,
    /// The rows of a vocabulary-indexed tensor gathered in the output vocabulary's order
    /// (`tensor` then only names the input for messages).
    #[serde(default)]
    pub rows: Option<RowMap>,
}

/// Where each row of a vocabulary-indexed tensor comes from (CONFIG.md, vocabularies).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RowMap {
    /// The tensors rows are taken from, with their (plain) shapes: each a matrix with the
    /// output's columns (or a vector, for a 1-D output), read as any input is (quantized
    /// weights decoded, adapters applied).
    pub sources: Vec<(InputRef, Vec<u64>)>,
    /// The output rows in runs, in order: `[rows, source, first row]` gives the next `rows`
    /// output rows from consecutive rows of `source` starting at `first row`; a source of
    /// -1 gives rows of zeros.
    pub runs: Vec<(u64, i64, u64)>,
}

/// The LoRA factors of one weight (PEFT layout: `A` is `r × in`, `B` is `out × r`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraRef {
    /// Index into [`Job::models`] of the adapter's file.
    pub model: usize,
    /// The `A` factor's tensor name.
    pub a: String,
    /// The `B` factor's tensor name.
    pub b: String,
    /// `lora_alpha / r` (or `/ √r` with rsLoRA).
    pub scale: f64,
    /// The stored weight is the transpose of `B·A`'s shape: a `fan_in_fan_out` layer
    /// (`[in, out]`), or an embedding (`lora_embedding_A` is `r × vocab`, `…_B` is `dim × r`).
    #[serde(default)]
    pub transposed: bool,
}

/// The scale tensor of a quantized weight and how it maps onto the codes (QUANT.md §3).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScaleRef {
    /// The scale tensor's name in the same model.
    pub tensor: String,
    /// Rows and columns of one block; `None` for one scale over the whole tensor.
    #[serde(default)]
    pub block: Option<[u64; 2]>,
    /// The codes are FP4 (E2M1), two a byte, the even element in the low nibble: the codes
    /// tensor holds half as many bytes as the weight has elements along its last axis.
    #[serde(default)]
    pub packed_fp4: bool,
    /// The codes are symmetric integers of this many bits (4 or 8) packed in `I32` words
    /// (compressed-tensors `pack-quantized`, QUANT.md §4b).
    #[serde(default)]
    pub int_bits: Option<u8>,
    /// A tensor holding the weight's shape (`weight_shape`), checked against it.
    #[serde(default)]
    pub weight_shape: Option<String>,
    /// The zero points of asymmetric packed integers (`weight_zero_point`).
    #[serde(default)]
    pub zero_point: Option<String>,
    /// A one-value tensor every scale is divided (`divide`) or multiplied by (NVFP4's global
    /// scale, QUANT.md §4c and §5).
    #[serde(default)]
    pub global_scale: Option<GlobalScale>,
    /// gpt-oss MXFP4 (QUANT.md §6): `tensor` holds the scales `[E, N, K/32]` and the input's
    /// tensor the blocks `[E, N, K/32, 16]` of the weight's transpose.
    #[serde(default)]
    pub transposed: bool,
}

/// The global scale of an NVFP4 weight.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GlobalScale {
    /// The one-value tensor.
    pub tensor: String,
    /// Divide the block scales by it (compressed-tensors), else multiply (ModelOpt).
    pub divide: bool,
}

impl Job {
    /// Parse a job from JSON.
    pub fn from_json(text: &str) -> Result<Job> {
        serde_json::from_str(text).map_err(|e| Error::job("job", e.to_string()))
    }
}
