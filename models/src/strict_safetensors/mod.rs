//! Strict, read-only safetensors loading.
//!
//! Stricter than the reference crate: a header-length cap, the header must be a JSON object,
//! duplicate names are refused, the tensors must tile the data section exactly (no gap, overlap
//! or trailing byte), sizes use checked arithmetic, and tensor count, rank and name length are
//! capped. See [`HeaderError`] for every rejection.

mod error;
mod file;
mod header;

pub use error::HeaderError;
pub use file::{SafetensorsError, SafetensorsFile};
pub(crate) use header::UniqueMap;
pub use header::{parse, parse_json, Dtype, Header, Limits, TensorInfo};
