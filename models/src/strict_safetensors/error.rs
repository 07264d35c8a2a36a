//! Every reason a safetensors file is refused, each its own variant so callers (and tests) can
//! tell them apart, and each message names the tensor, key or offset at fault.

/// Why a safetensors header or file was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("file is {len} bytes, too small for a safetensors file (the 8-byte header length alone needs 8)")]
    FileTooSmall { len: u64 },
    #[error("header length {len} exceeds the limit of {max} bytes")]
    HeaderTooLarge { len: u64, max: u64 },
    #[error("header length {header_len} runs past the end of the {file_len}-byte file")]
    HeaderBeyondFile { header_len: u64, file_len: u64 },
    #[error("header is empty (length 0); it must be a JSON object")]
    EmptyHeader,
    #[error("header does not start with '{{' (first byte 0x{first:02x})")]
    HeaderNotObject { first: u8 },
    #[error("header is not valid UTF-8 (bad byte at header offset {offset})")]
    HeaderNotUtf8 { offset: usize },
    #[error("header is not valid JSON: {reason}")]
    HeaderJson { reason: String },
    #[error("tensor name {name:?} appears more than once in the header")]
    DuplicateTensor { name: String },
    #[error("__metadata__ must be a JSON object of string values: {reason}")]
    MetadataNotStringMap { reason: String },
    #[error("__metadata__ key {key:?} appears more than once")]
    DuplicateMetadataKey { key: String },
    #[error("header declares {count} tensors, more than the limit of {max}")]
    TooManyTensors { count: usize, max: usize },
    #[error("tensor name of {len} bytes exceeds the limit of {max} (starts {prefix:?})")]
    NameTooLong {
        prefix: String,
        len: usize,
        max: usize,
    },
    #[error("header contains a tensor with an empty name")]
    EmptyName,
    #[error("tensor {tensor:?}: invalid entry: {reason}")]
    InvalidTensorEntry { tensor: String, reason: String },
    #[error("tensor {tensor:?}: rank {rank} exceeds the limit of {max}")]
    RankTooLarge {
        tensor: String,
        rank: usize,
        max: usize,
    },
    #[error("tensor {tensor:?}: unsupported dtype {dtype:?}")]
    UnsupportedDtype { tensor: String, dtype: String },
    #[error("tensor {tensor:?}: data_offsets [{begin}, {end}] are reversed")]
    ReversedOffsets {
        tensor: String,
        begin: u64,
        end: u64,
    },
    #[error("tensor {tensor:?}: shape {shape:?} x dtype size overflows 64 bits")]
    SizeOverflow { tensor: String, shape: Vec<u64> },
    #[error(
        "tensor {tensor:?}: shape and dtype need {expected} bytes but data_offsets span {actual}"
    )]
    SizeMismatch {
        tensor: String,
        expected: u64,
        actual: u64,
    },
    #[error("tensor {tensor:?}: data ends at offset {end}, past the {data_len}-byte data section")]
    TensorOutOfBounds {
        tensor: String,
        end: u64,
        data_len: u64,
    },
    #[error("gap in data section: bytes [{expected}, {begin}) before tensor {tensor:?} belong to no tensor")]
    Gap {
        tensor: String,
        expected: u64,
        begin: u64,
    },
    #[error("tensor {tensor:?} at offset {begin} overlaps tensor {previous:?} (which ends at {previous_end})")]
    Overlap {
        tensor: String,
        begin: u64,
        previous: String,
        previous_end: u64,
    },
    #[error("{trailing} trailing bytes after the last tensor (data section covered up to {covered} of {data_len})")]
    TrailingBytes {
        trailing: u64,
        covered: u64,
        data_len: u64,
    },
}
