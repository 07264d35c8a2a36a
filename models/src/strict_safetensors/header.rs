//! Parsing and validation of the safetensors JSON header.
//!
//! The reference `safetensors` crate accepts duplicate keys (serde keeps the last), trailing bytes
//! and gaps between tensors. A model is untrusted input, and later a signed one: any ambiguity in
//! which bytes are a tensor is a place to hide data or make two readers disagree. So the header is
//! parsed here with a duplicate-detecting map and the layout must be exact.

use std::collections::{BTreeMap, HashSet};
use std::fmt;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::HeaderError;

/// Bounds applied while parsing a header. The defaults fit every public model we know of with
/// a wide margin; they exist so a hostile file cannot make the parser allocate without bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Limits {
    /// Largest accepted JSON header, in bytes (default 16 MiB).
    pub max_header_len: u64,
    /// Most tensors in one file.
    pub max_tensors: usize,
    /// Highest tensor rank.
    pub max_rank: usize,
    /// Longest tensor name, in bytes.
    pub max_name_len: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_len: 16 * 1024 * 1024,
            max_tensors: 65_536,
            max_rank: 8,
            max_name_len: 1024,
        }
    }
}

/// Element types defined by the safetensors format (byte-sized ones; sub-byte FP4/FP6 are refused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dtype {
    Bool,
    U8,
    I8,
    F8E4M3,
    F8E5M2,
    I16,
    U16,
    F16,
    BF16,
    I32,
    U32,
    F32,
    F64,
    I64,
    U64,
}

impl Dtype {
    fn parse(s: &str) -> Option<Dtype> {
        Some(match s {
            "BOOL" => Dtype::Bool,
            "U8" => Dtype::U8,
            "I8" => Dtype::I8,
            "F8_E4M3" => Dtype::F8E4M3,
            "F8_E5M2" => Dtype::F8E5M2,
            "I16" => Dtype::I16,
            "U16" => Dtype::U16,
            "F16" => Dtype::F16,
            "BF16" => Dtype::BF16,
            "I32" => Dtype::I32,
            "U32" => Dtype::U32,
            "F32" => Dtype::F32,
            "F64" => Dtype::F64,
            "I64" => Dtype::I64,
            "U64" => Dtype::U64,
            _ => return None,
        })
    }

    /// The name used in safetensors headers.
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::Bool => "BOOL",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::F8E4M3 => "F8_E4M3",
            Dtype::F8E5M2 => "F8_E5M2",
            Dtype::I16 => "I16",
            Dtype::U16 => "U16",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::I32 => "I32",
            Dtype::U32 => "U32",
            Dtype::F32 => "F32",
            Dtype::F64 => "F64",
            Dtype::I64 => "I64",
            Dtype::U64 => "U64",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> u64 {
        match self {
            Dtype::Bool | Dtype::U8 | Dtype::I8 | Dtype::F8E4M3 | Dtype::F8E5M2 => 1,
            Dtype::I16 | Dtype::U16 | Dtype::F16 | Dtype::BF16 => 2,
            Dtype::I32 | Dtype::U32 | Dtype::F32 => 4,
            Dtype::F64 | Dtype::I64 | Dtype::U64 => 8,
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One tensor's entry, validated: its byte range lies inside the data section and matches its
/// shape and dtype exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Byte range relative to the start of the data section.
    pub begin: u64,
    pub end: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn elements(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }
}

/// A validated header: tensors in data-section order, and the string metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Tensors sorted by their position in the data section.
    pub tensors: Vec<TensorInfo>,
    /// `__metadata__`, sorted by key.
    pub metadata: BTreeMap<String, String>,
    /// Length of the JSON header in bytes (excluding the 8-byte length prefix).
    pub header_len: u64,
}

impl Header {
    /// Offset of the data section from the start of the file.
    pub fn data_start(&self) -> u64 {
        8 + self.header_len
    }

    /// Looks a tensor up by name (linear; callers that need many lookups build an index).
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

/// Reads the 8-byte little-endian header length and checks it against the file and the limit.
pub fn header_len(prefix: &[u8], file_len: u64, limits: &Limits) -> Result<u64, HeaderError> {
    if file_len < 8 || prefix.len() < 8 {
        return Err(HeaderError::FileTooSmall { len: file_len });
    }
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&prefix[..8]);
    let len = u64::from_le_bytes(len_bytes);
    if len > limits.max_header_len {
        return Err(HeaderError::HeaderTooLarge {
            len,
            max: limits.max_header_len,
        });
    }
    if len > file_len - 8 {
        return Err(HeaderError::HeaderBeyondFile {
            header_len: len,
            file_len,
        });
    }
    Ok(len)
}

/// Parses and validates a whole file image (the 8-byte prefix, the header and the data section).
pub fn parse(file: &[u8], limits: &Limits) -> Result<Header, HeaderError> {
    let file_len = file.len() as u64;
    let len = header_len(file, file_len, limits)?;
    // `len <= file_len - 8` was checked above, so these casts and slices are in bounds.
    let json = &file[8..8 + len as usize];
    parse_json(json, file_len - 8 - len, limits)
}

/// Validates a JSON header against the length of the data section that follows it.
pub fn parse_json(json: &[u8], data_len: u64, limits: &Limits) -> Result<Header, HeaderError> {
    match json.first() {
        Some(b'{') => {}
        Some(&first) => return Err(HeaderError::HeaderNotObject { first }),
        None => return Err(HeaderError::EmptyHeader),
    }
    let text = std::str::from_utf8(json).map_err(|e| HeaderError::HeaderNotUtf8 {
        offset: e.valid_up_to(),
    })?;
    let top: UniqueMap<Box<RawValue>> =
        serde_json::from_str(text).map_err(|e| HeaderError::HeaderJson {
            reason: e.to_string(),
        })?;
    if let Some(name) = top.first_duplicate {
        return Err(HeaderError::DuplicateTensor { name });
    }

    let mut metadata = BTreeMap::new();
    let mut raw_tensors = Vec::with_capacity(top.entries.len());
    for (key, value) in top.entries {
        if key == "__metadata__" {
            metadata = parse_metadata(value.get())?;
        } else {
            raw_tensors.push((key, value));
        }
    }
    if raw_tensors.len() > limits.max_tensors {
        return Err(HeaderError::TooManyTensors {
            count: raw_tensors.len(),
            max: limits.max_tensors,
        });
    }

    let mut tensors = Vec::with_capacity(raw_tensors.len());
    for (name, value) in raw_tensors {
        tensors.push(parse_tensor(name, value.get(), data_len, limits)?);
    }
    check_layout(&mut tensors, data_len)?;
    Ok(Header {
        tensors,
        metadata,
        header_len: json.len() as u64,
    })
}

fn parse_metadata(json: &str) -> Result<BTreeMap<String, String>, HeaderError> {
    let map: UniqueMap<String> =
        serde_json::from_str(json).map_err(|e| HeaderError::MetadataNotStringMap {
            reason: e.to_string(),
        })?;
    if let Some(key) = map.first_duplicate {
        return Err(HeaderError::DuplicateMetadataKey { key });
    }
    Ok(map.entries.into_iter().collect())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTensor {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: (u64, u64),
}

fn parse_tensor(
    name: String,
    json: &str,
    data_len: u64,
    limits: &Limits,
) -> Result<TensorInfo, HeaderError> {
    if name.is_empty() {
        return Err(HeaderError::EmptyName);
    }
    if name.len() > limits.max_name_len {
        let prefix: String = name.chars().take(40).collect();
        return Err(HeaderError::NameTooLong {
            prefix,
            len: name.len(),
            max: limits.max_name_len,
        });
    }
    let raw: RawTensor = match serde_json::from_str(json) {
        Ok(raw) => raw,
        Err(e) => {
            return Err(HeaderError::InvalidTensorEntry {
                tensor: name,
                reason: e.to_string(),
            })
        }
    };
    if raw.shape.len() > limits.max_rank {
        return Err(HeaderError::RankTooLarge {
            tensor: name,
            rank: raw.shape.len(),
            max: limits.max_rank,
        });
    }
    let Some(dtype) = Dtype::parse(&raw.dtype) else {
        return Err(HeaderError::UnsupportedDtype {
            tensor: name,
            dtype: raw.dtype,
        });
    };
    let (begin, end) = raw.data_offsets;
    if begin > end {
        return Err(HeaderError::ReversedOffsets {
            tensor: name,
            begin,
            end,
        });
    }
    let expected = raw
        .shape
        .iter()
        .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d));
    let Some(expected) = expected else {
        return Err(HeaderError::SizeOverflow {
            tensor: name,
            shape: raw.shape,
        });
    };
    if expected != end - begin {
        return Err(HeaderError::SizeMismatch {
            tensor: name,
            expected,
            actual: end - begin,
        });
    }
    if end > data_len {
        return Err(HeaderError::TensorOutOfBounds {
            tensor: name,
            end,
            data_len,
        });
    }
    // Every dimension is now bounded by the data length, which fits in memory: no truncation.
    let shape = raw.shape.iter().map(|&d| d as usize).collect();
    Ok(TensorInfo {
        name,
        dtype,
        shape,
        begin,
        end,
    })
}

/// Requires the tensors to tile the data section exactly: from offset 0, no gap, no overlap,
/// nothing after the last one. Sorts `tensors` into data order.
fn check_layout(tensors: &mut [TensorInfo], data_len: u64) -> Result<(), HeaderError> {
    tensors.sort_by(|a, b| (a.begin, a.end, &a.name).cmp(&(b.begin, b.end, &b.name)));
    let mut covered = 0u64;
    let mut previous: Option<&TensorInfo> = None;
    for t in tensors.iter() {
        let previous_name = || previous.map(|p| p.name.clone()).unwrap_or_default();
        if t.begin > covered {
            return Err(HeaderError::Gap {
                tensor: t.name.clone(),
                expected: covered,
                begin: t.begin,
            });
        }
        if t.begin < covered {
            return Err(HeaderError::Overlap {
                tensor: t.name.clone(),
                begin: t.begin,
                previous: previous_name(),
                previous_end: covered,
            });
        }
        covered = t.end;
        previous = Some(t);
    }
    if covered != data_len {
        return Err(HeaderError::TrailingBytes {
            trailing: data_len - covered,
            covered,
            data_len,
        });
    }
    Ok(())
}

/// A JSON object read in order, remembering the first key seen twice (serde_json's own maps
/// silently keep the last value, which is exactly the ambiguity we refuse).
pub(crate) struct UniqueMap<V> {
    pub entries: Vec<(String, V)>,
    pub first_duplicate: Option<String>,
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for UniqueMap<V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MapVisitor<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for MapVisitor<V> {
            type Value = UniqueMap<V>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut seen = HashSet::new();
                let mut entries = Vec::new();
                let mut first_duplicate = None;
                while let Some(key) = map.next_key::<String>()? {
                    let value = map.next_value::<V>()?;
                    if !seen.insert(key.clone()) {
                        first_duplicate.get_or_insert(key);
                        continue;
                    }
                    entries.push((key, value));
                }
                Ok(UniqueMap {
                    entries,
                    first_duplicate,
                })
            }
        }
        deserializer.deserialize_map(MapVisitor(std::marker::PhantomData))
    }
}
