//! The one error type of mergex-core. Every variant carries the offending file, tensor,
//! shape or key as data, so that bindings can map and word it without parsing strings.

use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Which side of the library an error belongs to; bindings map kinds to exception classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The merge job (config) asks for something invalid.
    Config,
    /// A checkpoint file or folder is malformed or does not match the others.
    Checkpoint,
    /// A file or folder that should exist does not.
    NotFound,
    /// Any other operating-system error.
    Io,
    /// The merge was cancelled by the caller.
    Cancelled,
}

/// Everything that can go wrong in mergex-core.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system call on `path` failed.
    #[error("{path}: cannot {op}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// What was attempted ("open", "read", "write", "map", ...).
        op: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A file is shorter than the 8-byte safetensors length prefix.
    #[error("{path}: not a safetensors file: {len} bytes is shorter than the 8-byte header length")]
    FileTooSmall {
        /// The file.
        path: PathBuf,
        /// Its length in bytes.
        len: u64,
    },
    /// The header length prefix points past the end of the file or is absurdly large.
    #[error("{path}: header length {header_len} does not fit in the file ({file_len} bytes)")]
    HeaderLength {
        /// The file.
        path: PathBuf,
        /// The length read from the prefix.
        header_len: u64,
        /// The file's length.
        file_len: u64,
    },
    /// The header is not valid UTF-8 JSON of the expected shape.
    #[error("{path}: invalid safetensors header: {message}")]
    HeaderJson {
        /// The file.
        path: PathBuf,
        /// The parser's description.
        message: String,
    },
    /// A tensor entry lacks a field or has one of the wrong type.
    #[error("{path}: tensor '{tensor}': invalid or missing '{field}' in the header")]
    BadTensorEntry {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// The field ("dtype", "shape", "data_offsets").
        field: &'static str,
    },
    /// A tensor name appears twice in one header.
    #[error("{path}: tensor '{tensor}' appears twice in the header")]
    DuplicateTensor {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
    },
    /// Two files of one checkpoint (without an index) hold the same tensor.
    #[error("tensor '{tensor}' is in both {first} and {second}")]
    DuplicateAcrossFiles {
        /// The first file holding it.
        first: PathBuf,
        /// The second file holding it.
        second: PathBuf,
        /// The tensor name.
        tensor: String,
    },
    /// A dtype name that safetensors does not define.
    #[error("{path}: tensor '{tensor}': unknown dtype '{dtype}'")]
    UnknownDtype {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// The dtype string found.
        dtype: String,
    },
    /// A dtype of a quantized format that mergex refuses (`F8_E4M3FNUZ`, `F4`, `F6_*`).
    #[error("{path}: tensor '{tensor}' has dtype {dtype}, a quantized format mergex does not support")]
    RefusedDtype {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// The dtype string found.
        dtype: String,
    },
    /// A GGUF file where a safetensors file was expected.
    #[error("{path}: GGUF checkpoints are not supported (the file starts with 'GGUF'); use the model's safetensors release")]
    Gguf {
        /// The file.
        path: PathBuf,
    },
    /// A quantized weight's codes or scales are malformed (QUANT.md).
    #[error("{path}: tensor '{tensor}': {message}")]
    QuantizedWeight {
        /// The model (checkpoint) holding it.
        path: PathBuf,
        /// The weight's codes tensor.
        tensor: String,
        /// What is wrong.
        message: String,
    },
    /// A LoRA adapter's factors do not fit the weight they target, or hold a non-finite value.
    #[error("{path}: tensor '{tensor}': {message}")]
    Adapter {
        /// The adapter file.
        path: PathBuf,
        /// The adapter tensor.
        tensor: String,
        /// What is wrong.
        message: String,
    },
    /// The shape and dtype imply a byte size other than the data offsets give.
    #[error("{path}: tensor '{tensor}': shape {shape:?} of {dtype} needs {expected} bytes but its data offsets span {actual}")]
    ShapeSize {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// The declared shape.
        shape: Vec<u64>,
        /// The declared dtype.
        dtype: &'static str,
        /// Bytes implied by the shape (saturating).
        expected: u64,
        /// Bytes given by the offsets.
        actual: u64,
    },
    /// Data offsets run outside the data section.
    #[error("{path}: tensor '{tensor}': data offsets [{begin}, {end}) lie outside the data section ({data_len} bytes)")]
    OffsetsOutOfFile {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// Start offset.
        begin: u64,
        /// End offset.
        end: u64,
        /// Length of the data section.
        data_len: u64,
    },
    /// Tensors overlap or leave gaps: the data section is not tiled exactly.
    #[error("{path}: tensor '{tensor}': data starts at {begin}, expected {expected} (tensors must tile the data section without gaps or overlaps)")]
    OffsetsNotContiguous {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// Where its data starts.
        begin: u64,
        /// Where it should start.
        expected: u64,
    },
    /// The data section is longer than its tensors.
    #[error("{path}: {extra} bytes after the last tensor's data")]
    TrailingData {
        /// The file.
        path: PathBuf,
        /// Unaccounted bytes.
        extra: u64,
    },
    /// `model.safetensors.index.json` is malformed.
    #[error("{path}: invalid index: {message}")]
    IndexJson {
        /// The index file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A shard named by an index leaves the model folder.
    #[error("{index}: shard '{shard}' is outside the model folder")]
    ShardOutsideFolder {
        /// The index file.
        index: PathBuf,
        /// The shard name as written.
        shard: String,
    },
    /// An index maps a tensor to a shard that does not hold it.
    #[error("{index}: tensor '{tensor}' is mapped to '{shard}', which does not contain it")]
    IndexMismatch {
        /// The index file.
        index: PathBuf,
        /// The tensor name.
        tensor: String,
        /// The shard named.
        shard: String,
    },
    /// A folder holds no safetensors checkpoint.
    #[error("{dir}: no model.safetensors, model.safetensors.index.json or *.safetensors file")]
    NoCheckpoint {
        /// The folder.
        dir: PathBuf,
    },
    /// Only a pickle checkpoint is present; mergex never unpickles.
    #[error("{path}: pickle checkpoints are not loaded (unpickling can run arbitrary code); convert it to safetensors first")]
    PickleCheckpoint {
        /// The .bin/.pt file.
        path: PathBuf,
    },
    /// A tensor the merge needs is missing from a model.
    #[error("tensor '{tensor}' not found in model {model} (searched {files})")]
    MissingTensor {
        /// The model folder or file.
        model: PathBuf,
        /// The tensor name.
        tensor: String,
        /// The files searched, comma separated for display.
        files: String,
    },
    /// An input tensor's shape cannot serve the output tensor.
    #[error("tensor '{tensor}' of model {model} has shape {shape:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The model.
        model: PathBuf,
        /// The input tensor name.
        tensor: String,
        /// Its shape.
        shape: Vec<u64>,
        /// The shape required.
        expected: Vec<u64>,
    },
    /// A tensor of a non-float dtype was given to a method that merges values.
    #[error("tensor '{tensor}' of model {model} has dtype {dtype}, which cannot be merged")]
    NotFloat {
        /// The model.
        model: PathBuf,
        /// The tensor name.
        tensor: String,
        /// Its dtype.
        dtype: &'static str,
    },
    /// The job description is invalid (a config-level problem).
    #[error("invalid merge job: {field}: {message}")]
    InvalidJob {
        /// The field or key at fault.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// A parameter is missing or out of range for a tensor.
    #[error("parameter '{name}' for tensor '{tensor}'{}: {message}", model.as_ref().map(|m| format!(" of model {}", m.display())).unwrap_or_default())]
    InvalidParameter {
        /// The parameter.
        name: String,
        /// The output tensor.
        tensor: String,
        /// The model the parameter belongs to, if per-model.
        model: Option<PathBuf>,
        /// What is wrong.
        message: String,
    },
    /// The inputs of a tensor make the method undefined (e.g. antipodal vectors).
    #[error("tensor '{tensor}': {message}")]
    Degenerate {
        /// The output tensor.
        tensor: String,
        /// Why the method cannot proceed.
        message: String,
    },
    /// An input file was modified while the merge read it.
    #[error("{path}: the file changed during the merge (size or modification time); its data can no longer be trusted")]
    InputChanged {
        /// The file.
        path: PathBuf,
    },
    /// The caller cancelled the merge.
    #[error("merge cancelled")]
    Cancelled,
}

impl Error {
    /// The family this error belongs to.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => ErrorKind::NotFound,
            Error::Io { .. } => ErrorKind::Io,
            Error::InvalidJob { .. } | Error::InvalidParameter { .. } => ErrorKind::Config,
            Error::Cancelled => ErrorKind::Cancelled,
            _ => ErrorKind::Checkpoint,
        }
    }

    /// The file, folder or model the error is about, when there is one.
    pub fn path(&self) -> Option<&std::path::Path> {
        match self {
            Error::Io { path, .. }
            | Error::FileTooSmall { path, .. }
            | Error::HeaderLength { path, .. }
            | Error::HeaderJson { path, .. }
            | Error::BadTensorEntry { path, .. }
            | Error::DuplicateTensor { path, .. }
            | Error::UnknownDtype { path, .. }
            | Error::RefusedDtype { path, .. }
            | Error::Gguf { path }
            | Error::QuantizedWeight { path, .. }
            | Error::Adapter { path, .. }
            | Error::ShapeSize { path, .. }
            | Error::OffsetsOutOfFile { path, .. }
            | Error::OffsetsNotContiguous { path, .. }
            | Error::TrailingData { path, .. }
            | Error::IndexJson { path, .. }
            | Error::PickleCheckpoint { path }
            | Error::InputChanged { path } => Some(path),
            Error::DuplicateAcrossFiles { second: path, .. }
            | Error::IndexMismatch { index: path, .. }
            | Error::ShardOutsideFolder { index: path, .. }
            | Error::NoCheckpoint { dir: path }
            | Error::MissingTensor { model: path, .. }
            | Error::ShapeMismatch { model: path, .. }
            | Error::NotFloat { model: path, .. } => Some(path),
            Error::InvalidParameter { model, .. } => model.as_deref(),
            Error::InvalidJob { .. } | Error::Degenerate { .. } | Error::Cancelled => None,
        }
    }

    /// The tensor the error is about, when there is one.
    pub fn tensor(&self) -> Option<&str> {
        match self {
            Error::BadTensorEntry { tensor, .. }
            | Error::DuplicateTensor { tensor, .. }
            | Error::DuplicateAcrossFiles { tensor, .. }
            | Error::UnknownDtype { tensor, .. }
            | Error::RefusedDtype { tensor, .. }
            | Error::QuantizedWeight { tensor, .. }
            | Error::Adapter { tensor, .. }
            | Error::ShapeSize { tensor, .. }
            | Error::OffsetsOutOfFile { tensor, .. }
            | Error::OffsetsNotContiguous { tensor, .. }
            | Error::IndexMismatch { tensor, .. }
            | Error::MissingTensor { tensor, .. }
            | Error::ShapeMismatch { tensor, .. }
            | Error::NotFloat { tensor, .. }
            | Error::InvalidParameter { tensor, .. }
            | Error::Degenerate { tensor, .. } => Some(tensor),
            Error::Io { .. }
            | Error::FileTooSmall { .. }
            | Error::HeaderLength { .. }
            | Error::HeaderJson { .. }
            | Error::Gguf { .. }
            | Error::TrailingData { .. }
            | Error::IndexJson { .. }
            | Error::ShardOutsideFolder { .. }
            | Error::NoCheckpoint { .. }
            | Error::PickleCheckpoint { .. }
            | Error::InvalidJob { .. }
            | Error::InputChanged { .. }
            | Error::Cancelled => None,
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, op: &'static str, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), op, source }
    }

    pub(crate) fn job(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::InvalidJob { field: field.into(), message: message.into() }
    }
}
