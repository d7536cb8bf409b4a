//! Parsing and validation of a safetensors header, before any tensor data is touched.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::Path;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

use super::dtype::{Dtype, REFUSED_DTYPES};
use crate::error::{Error, Result};

/// Headers larger than this are refused (the safetensors reference limit).
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// One tensor of a safetensors file; offsets are relative to the start of the data section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorEntry {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape (empty for a scalar).
    pub shape: Vec<u64>,
    /// Start of the data, relative to the data section.
    pub begin: u64,
    /// End of the data (exclusive), relative to the data section.
    pub end: u64,
}

impl TensorEntry {
    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }

    /// Number of bytes of data.
    pub fn nbytes(&self) -> u64 {
        self.end - self.begin
    }
}

/// A validated header: tensors sorted by offset, tiling the data section exactly.
#[derive(Debug, Clone)]
pub struct Header {
    /// Tensors in data order.
    pub tensors: Vec<TensorEntry>,
    /// The `__metadata__` map, if present.
    pub metadata: BTreeMap<String, String>,
    /// Byte offset of the data section in the file (8 + header length).
    pub data_start: u64,
}

/// JSON object entries in file order, so that duplicate keys are seen rather than collapsed.
struct Entries(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> std::result::Result<Entries, A::Error> {
                let mut v = Vec::new();
                while let Some((k, val)) = m.next_entry::<String, Value>()? {
                    v.push((k, val));
                }
                Ok(Entries(v))
            }
        }
        d.deserialize_map(V)
    }
}

/// Parse and validate the header bytes (the JSON after the 8-byte length) of `path`,
/// whose data section is `data_len` bytes long.
pub fn parse_header(path: &Path, json: &[u8], data_len: u64) -> Result<Header> {
    let text = std::str::from_utf8(json)
        .map_err(|e| Error::HeaderJson { path: path.to_path_buf(), message: format!("not UTF-8 ({e})") })?;
    let entries: Entries = serde_json::from_str(text.trim_end_matches([' ', '\0']))
        .map_err(|e| Error::HeaderJson { path: path.to_path_buf(), message: e.to_string() })?;
    let mut seen = HashSet::new();
    let mut tensors = Vec::with_capacity(entries.0.len());
    let mut metadata = BTreeMap::new();
    for (name, value) in entries.0 {
        if !seen.insert(name.clone()) {
            return Err(Error::DuplicateTensor { path: path.to_path_buf(), tensor: name });
        }
        if name == "__metadata__" {
            metadata = parse_metadata(path, &value)?;
            continue;
        }
        tensors.push(parse_entry(path, name, &value)?);
    }
    check_layout(path, &mut tensors, data_len)?;
    Ok(Header { tensors, metadata, data_start: 8 + json.len() as u64 })
}

fn parse_metadata(path: &Path, value: &Value) -> Result<BTreeMap<String, String>> {
    let bad = || Error::HeaderJson {
        path: path.to_path_buf(),
        message: "__metadata__ must map strings to strings".into(),
    };
    let obj = value.as_object().ok_or_else(bad)?;
    obj.iter().map(|(k, v)| Ok((k.clone(), v.as_str().ok_or_else(bad)?.to_string()))).collect()
}

fn parse_entry(path: &Path, name: String, value: &Value) -> Result<TensorEntry> {
    let bad = |field| Error::BadTensorEntry { path: path.to_path_buf(), tensor: name.clone(), field };
    let obj = value.as_object().ok_or_else(|| bad("dtype"))?;
    let dtype_name = obj.get("dtype").and_then(Value::as_str).ok_or_else(|| bad("dtype"))?;
    let dtype = Dtype::from_name(dtype_name).ok_or_else(|| {
        let (path, tensor, dtype) = (path.to_path_buf(), name.clone(), dtype_name.to_string());
        if REFUSED_DTYPES.contains(&dtype_name) {
            Error::RefusedDtype { path, tensor, dtype }
        } else {
            Error::UnknownDtype { path, tensor, dtype }
        }
    })?;
    let shape = obj
        .get("shape")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("shape"))?
        .iter()
        .map(|d| d.as_u64().ok_or_else(|| bad("shape")))
        .collect::<Result<Vec<u64>>>()?;
    let offsets = obj.get("data_offsets").and_then(Value::as_array).ok_or_else(|| bad("data_offsets"))?;
    let (begin, end) = match offsets.as_slice() {
        [b, e] => {
            (b.as_u64().ok_or_else(|| bad("data_offsets"))?, e.as_u64().ok_or_else(|| bad("data_offsets"))?)
        }
        _ => return Err(bad("data_offsets")),
    };
    if end < begin {
        return Err(bad("data_offsets"));
    }
    // The non-zero dimensions must not overflow either: an empty tensor with huge
    // dimensions would otherwise slip through (0 · anything = 0) and poison size arithmetic.
    let nonzero =
        shape.iter().filter(|&&d| d != 0).try_fold(dtype.size() as u64, |acc, &d| acc.checked_mul(d));
    let expected = match nonzero {
        None => u64::MAX,
        Some(_) if shape.contains(&0) => 0,
        Some(bytes) => bytes,
    };
    if expected != end - begin {
        return Err(Error::ShapeSize {
            path: path.to_path_buf(),
            tensor: name,
            shape,
            dtype: dtype.name(),
            expected,
            actual: end - begin,
        });
    }
    Ok(TensorEntry { name, dtype, shape, begin, end })
}

/// Sort by offset and check that the tensors tile `[0, data_len)` exactly.
fn check_layout(path: &Path, tensors: &mut [TensorEntry], data_len: u64) -> Result<()> {
    tensors.sort_by(|a, b| (a.begin, a.end, &a.name).cmp(&(b.begin, b.end, &b.name)));
    // Out-of-file offsets first, so the message names the tensor at fault rather than
    // the neighbour whose gap it leaves.
    if let Some(t) = tensors.iter().find(|t| t.end > data_len) {
        return Err(Error::OffsetsOutOfFile {
            path: path.to_path_buf(),
            tensor: t.name.clone(),
            begin: t.begin,
            end: t.end,
            data_len,
        });
    }
    let mut expected = 0u64;
    for t in tensors.iter() {
        if t.begin != expected {
            return Err(Error::OffsetsNotContiguous {
                path: path.to_path_buf(),
                tensor: t.name.clone(),
                begin: t.begin,
                expected,
            });
        }
        expected = t.end;
    }
    if expected != data_len {
        return Err(Error::TrailingData { path: path.to_path_buf(), extra: data_len - expected });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str, data_len: u64) -> Result<Header> {
        parse_header(Path::new("x.safetensors"), json.as_bytes(), data_len)
    }

    #[test]
    fn accepts_a_valid_header() {
        let h = parse(
            r#"{"__metadata__":{"format":"pt"},"b":{"dtype":"BF16","shape":[2],"data_offsets":[8,12]},
               "a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}  "#,
            12,
        )
        .unwrap();
        assert_eq!(h.tensors[0].name, "a");
        assert_eq!(h.tensors[1].dtype, Dtype::BF16);
        assert_eq!(h.metadata["format"], "pt");
    }

    #[test]
    fn rejects_bad_layouts() {
        let gap = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
        assert!(matches!(parse(gap, 8), Err(Error::OffsetsNotContiguous { .. })));
        let outside = r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
        assert!(matches!(parse(outside, 8), Err(Error::OffsetsOutOfFile { .. })));
        let size = r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#;
        assert!(matches!(parse(size, 8), Err(Error::ShapeSize { .. })));
        let trailing = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
        assert!(matches!(parse(trailing, 12), Err(Error::TrailingData { .. })));
        let dup = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#;
        assert!(matches!(parse(dup, 2), Err(Error::DuplicateTensor { .. })));
        let dtype = r#"{"a":{"dtype":"Q4","shape":[1],"data_offsets":[0,1]}}"#;
        assert!(matches!(parse(dtype, 1), Err(Error::UnknownDtype { .. })));
        let fnuz = r#"{"a":{"dtype":"F8_E4M3FNUZ","shape":[1],"data_offsets":[0,1]}}"#;
        assert!(matches!(parse(fnuz, 1), Err(Error::RefusedDtype { .. })));
        let overflow = r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}}"#;
        assert!(matches!(parse(overflow, 8), Err(Error::ShapeSize { .. })));
        let neg = r#"{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#;
        assert!(matches!(parse(neg, 4), Err(Error::BadTensorEntry { field: "shape", .. })));
        assert!(matches!(parse("[1,2]", 0), Err(Error::HeaderJson { .. })));
        assert!(matches!(parse("{", 0), Err(Error::HeaderJson { .. })));
    }
}
