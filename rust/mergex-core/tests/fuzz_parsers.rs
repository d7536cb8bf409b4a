//! Fuzzing every parser of untrusted input with proptest: safetensors headers (random bytes,
//! structured-random and valid-by-construction headers), whole files, sharded folders with
//! random indexes, and merge jobs. Nothing may panic; what is accepted must be consistent.
//!
//! The default run is small and uses a fixed seed, so `cargo test` stays fast and
//! reproducible. A long run is one command (see the README's fuzzing section):
//!
//! ```text
//! PROPTEST_CASES=100000 cargo test -p mergex-core --test fuzz_parsers --release
//! ```
//!
//! `PROPTEST_RNG_SEED=<u64>` explores other inputs than the fixed default. Scratch files
//! go to Cargo's per-test temporary folder and are removed after each case.

// Helpers outside #[test] functions set up scratch files and report failed runs: failing
// loudly there is the point (clippy.toml allows this inside #[test] functions only).
#![allow(clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use mergex_core::format::checkpoint::Checkpoint;
use mergex_core::format::file::SafeFile;
use mergex_core::format::header::{parse_header, Header};
use mergex_core::{Engine, Job};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, RngSeed, TestRunner};
use serde_json::{json, Value};

/// The seed of the default run (overridden by `PROPTEST_RNG_SEED`).
const SEED: u64 = 0x6d65_7267_6578;

const DTYPES: &[(&str, u64)] = &[
    ("BOOL", 1),
    ("U8", 1),
    ("I8", 1),
    ("F8_E4M3", 1),
    ("F8_E5M2", 1),
    ("I16", 2),
    ("U16", 2),
    ("F16", 2),
    ("BF16", 2),
    ("I32", 4),
    ("U32", 4),
    ("F32", 4),
    ("I64", 8),
    ("U64", 8),
    ("F64", 8),
];

const METHODS: &[&str] = &[
    "linear",
    "passthrough",
    "task_arithmetic",
    "ties",
    "dare_ties",
    "dare_linear",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "slerp",
    "nuslerp",
    "multislerp",
    "karcher",
    "model_stock",
    "sce",
    "ram",
    "ramplus_tl",
    "nearswap",
    "arcee_fusion",
    "frobnicate",
];

const PARAMS: &[&str] = &[
    "weight",
    "density",
    "epsilon",
    "eps",
    "gamma",
    "lambda",
    "t",
    "normalize",
    "rescale",
    "select_topk",
    "max_iter",
    "tol",
    "filter_wise",
    "normalize_weights",
    "nuslerp_flatten",
    "nuslerp_row_wise",
    "unknown",
];

/// Proptest settings: `PROPTEST_*` variables as proptest reads them, else `cases` cases
/// from the fixed seed; no regression files (a failure prints its minimal input).
fn config(cases: u32) -> ProptestConfig {
    let mut c = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = cases;
    }
    if matches!(c.rng_seed, RngSeed::Random) {
        c.rng_seed = RngSeed::Fixed(SEED);
    }
    c.failure_persistence = None;
    c
}

fn run<S: Strategy>(cases: u32, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S::Value: std::fmt::Debug,
{
    let mut runner = TestRunner::new(config(cases));
    if let Err(e) = runner.run(&strategy, test) {
        panic!("{e}");
    }
}

// --------------------------------------------------------------------------- scratch files

/// A folder under Cargo's test temporary directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir =
            Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("fuzz-{tag}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create scratch folder");
        Scratch(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

// --------------------------------------------------------------------------- building files

/// A JSON object written from `(key, value)` pairs in order, duplicates kept.
fn object_text(items: &[(String, Value)]) -> String {
    let body: Vec<String> = items
        .iter()
        .map(|(k, v)| {
            format!("{}:{}", Value::String(k.clone()), serde_json::to_string(v).unwrap_or_default())
        })
        .collect();
    format!("{{{}}}", body.join(","))
}

/// 8-byte length, header, data.
fn pack(header: &[u8], data_len: u64, length: Option<u64>) -> Vec<u8> {
    let mut out = length.unwrap_or(header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header);
    out.extend((0..data_len).map(|i| i as u8));
    out
}

/// A valid safetensors file of `(name, dtype, shape)` tensors, laid out in order.
fn valid_file(tensors: &[(&str, &str, &[u64])]) -> Vec<u8> {
    let mut items = vec![("__metadata__".to_string(), json!({"format": "pt"}))];
    let mut offset = 0u64;
    for (name, dtype, shape) in tensors {
        let size = DTYPES.iter().find(|(d, _)| d == dtype).map_or(1, |(_, s)| *s);
        let n = shape.iter().try_fold(size, |a, &d| a.checked_mul(d)).unwrap_or(0);
        items.push((
            name.to_string(),
            json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}),
        ));
        offset += n;
    }
    let mut header = object_text(&items).into_bytes();
    header.resize(header.len().div_ceil(8) * 8, b' ');
    pack(&header, offset, None)
}

// --------------------------------------------------------------------------- strategies

fn interesting_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(1),
        Just(2),
        Just(7),
        Just(8),
        Just(u64::from(u32::MAX)),
        Just(1 << 32),
        Just(1 << 62),
        Just(1 << 63),
        Just(u64::MAX - 1),
        Just(u64::MAX),
        0..64u64,
        any::<u64>(),
    ]
}

fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        interesting_u64().prop_map(Value::from),
        (-1e30f64..1e30).prop_map(Value::from),
        Just(json!(1e300)),
        Just(json!(-0.0)),
        "[a-zA-Z0-9_./ -]{0,8}".prop_map(Value::from),
        Just(json!("F32")),
        Just(json!("BF16")),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    json_leaf().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{0,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn dtype_name() -> impl Strategy<Value = Value> {
    prop_oneof![
        6 => prop::sample::select(DTYPES).prop_map(|(d, _)| json!(d)),
        1 => prop::sample::select(&["Q4_K", "f32", "", "F4", "bf16 "][..]).prop_map(|d| json!(d)),
        1 => json_value(),
    ]
}

fn shape_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        6 => prop::collection::vec(0..5u64, 0..4).prop_map(|v| json!(v)),
        2 => prop::collection::vec(interesting_u64().prop_map(Value::from), 0..4).prop_map(Value::Array),
        1 => prop::collection::vec(prop_oneof![Just(json!(-1)), Just(json!(2.0)), Just(json!(18446744073709551616.0))], 1..3)
            .prop_map(Value::Array),
        1 => json_value(),
    ]
}

fn tensor_name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(&["a", "b", "c", "d", "e", "f"][..]).prop_map(String::from),
        1 => prop::sample::select(&["__metadata__", "", "a", "b"][..]).prop_map(String::from),
        1 => "[a-z.]{1,4}",
        1 => ".{0,4}",
    ]
}

/// Bytes per element and element count when `dtype`/`shape` are well-formed and small.
fn entry_size(dtype: &Value, shape: &Value) -> Option<u64> {
    let size = DTYPES.iter().find(|(d, _)| Some(*d) == dtype.as_str())?.1;
    shape
        .as_array()?
        .iter()
        .try_fold(size, |a, d| d.as_u64().filter(|&d| d < 1 << 16).and_then(|d| a.checked_mul(d)))
}

#[derive(Debug, Clone, Copy)]
enum Layout {
    /// Contiguous, in file order.
    InOrder,
    /// Contiguous, written in another order.
    Shuffled,
    /// Contiguous but one tensor moved by a few bytes: overlaps and gaps.
    Shifted,
    /// Any offsets.
    Random,
}

/// A header built from entries that are mostly well-formed: duplicate names, bad dtypes,
/// shapes and offsets, junk fields, overlaps and gaps all occur.
fn structured_header() -> impl Strategy<Value = (Vec<u8>, u64)> {
    let entry = (tensor_name(), dtype_name(), shape_value(), prop::option::weighted(0.05, json_value()));
    let metadata = prop_oneof![
        prop::collection::btree_map("[a-z]{0,4}", "[a-z]{0,4}", 0..3).prop_map(|m| json!(m)),
        json_value(),
    ];
    (
        prop::collection::vec(entry, 0..6),
        prop_oneof![
            Just(Layout::InOrder),
            Just(Layout::Shuffled),
            Just(Layout::Shifted),
            Just(Layout::Random)
        ],
        prop::collection::vec((interesting_u64(), interesting_u64()), 6),
        prop::option::weighted(0.2, metadata),
        prop::sample::select(&["", "", "", "        ", "\0\0\0", "\n", " x"][..]),
        prop_oneof![3 => Just(0i64), 1 => Just(1), 1 => Just(-1), 1 => -64..64i64],
        (any::<prop::sample::Index>(), -8..8i64),
    )
        .prop_map(|(entries, layout, random_offsets, metadata, pad, data_delta, (pick, shift))| {
            let mut items: Vec<(String, Value)> = Vec::new();
            if let Some(m) = metadata {
                items.push(("__metadata__".into(), m));
            }
            let mut offset = 0u64;
            let shifted = pick.index(entries.len().max(1));
            for (i, (name, mut dtype, mut shape, mut junk)) in entries.into_iter().enumerate() {
                if matches!(layout, Layout::Shifted) && entry_size(&dtype, &shape).is_none() {
                    // Layout errors show only when every entry is well-formed.
                    (dtype, shape, junk) = (json!("U8"), json!([i + 1]), None);
                }
                let n = entry_size(&dtype, &shape).unwrap_or(i as u64 % 3);
                let offsets = match layout {
                    Layout::Random => {
                        let (b, e) = random_offsets.get(i).copied().unwrap_or_default();
                        json!([b, e])
                    }
                    Layout::Shifted if i == shifted => {
                        let b = offset.saturating_add_signed(shift);
                        json!([b, b + n])
                    }
                    _ => json!([offset, offset + n]),
                };
                offset += n;
                let mut entry = json!({"dtype": dtype, "shape": shape, "data_offsets": offsets});
                if let Some(junk) = junk {
                    entry = junk;
                }
                items.push((name, entry));
            }
            if matches!(layout, Layout::Shuffled) && items.len() > 1 {
                let k = pick.index(items.len());
                items.rotate_left(k);
                let last = items.len() - 1;
                items.swap(0, last);
            }
            let mut text = object_text(&items).into_bytes();
            text.extend_from_slice(pad.as_bytes());
            (text, offset.saturating_add_signed(data_delta))
        })
}

/// `(name, dtype, shape)` of the tensors a valid header declares.
type Declared = Vec<(String, &'static str, Vec<u64>)>;

/// A valid header of unique tensors (written in any order) and its data length.
fn valid_header() -> impl Strategy<Value = (Vec<u8>, u64, Declared)> {
    prop::collection::vec((prop::sample::select(DTYPES), prop::collection::vec(0..5u64, 0..3)), 0..6)
        .prop_flat_map(|tensors| {
            let mut offset = 0u64;
            let mut items = Vec::new();
            let mut expected = Vec::new();
            for (i, ((dtype, size), shape)) in tensors.into_iter().enumerate() {
                let n = size * shape.iter().product::<u64>();
                let name = format!("t{i}");
                items.push((
                    name.clone(),
                    json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}),
                ));
                expected.push((name, dtype, shape));
                offset += n;
            }
            (Just(items).prop_shuffle(), Just(offset), Just(expected), any::<bool>())
        })
        .prop_map(|(mut items, data_len, expected, metadata)| {
            if metadata {
                items.insert(0, ("__metadata__".into(), json!({"format": "pt", "x": ""})));
            }
            let mut text = object_text(&items).into_bytes();
            text.resize(text.len().div_ceil(8) * 8, b' ');
            (text, data_len, expected)
        })
}

/// The checks every accepted header must pass.
fn check_header(h: &Header, json_len: usize, data_len: u64) -> Result<(), TestCaseError> {
    prop_assert_eq!(h.data_start, 8 + json_len as u64);
    let mut names = BTreeSet::new();
    let mut expected = 0u64;
    for t in &h.tensors {
        prop_assert!(names.insert(t.name.as_str()), "tensor {} twice", t.name);
        prop_assert_eq!(t.begin, expected, "tensors must be sorted and tile the data");
        prop_assert!(t.end >= t.begin);
        let bytes = t.shape.iter().try_fold(t.dtype.size() as u64, |a, &d| a.checked_mul(d));
        prop_assert_eq!(bytes, Some(t.end - t.begin), "shape x size of {}", t.name);
        prop_assert_eq!(t.nbytes(), t.end - t.begin);
        expected = t.end;
    }
    prop_assert_eq!(expected, data_len, "the tensors must end where the data does");
    Ok(())
}

fn check_parse(json: &[u8], data_len: u64) -> Result<(), TestCaseError> {
    if let Ok(h) = parse_header(Path::new("fuzz.safetensors"), json, data_len) {
        check_header(&h, json.len(), data_len)?;
    }
    Ok(())
}

// --------------------------------------------------------------------------- parse_header

#[test]
fn parse_header_random_bytes() {
    let data_len = prop_oneof![Just(0u64), 0..256u64, interesting_u64()];
    run(4096, (prop::collection::vec(any::<u8>(), 0..256), data_len), |(bytes, n)| check_parse(&bytes, n));
}

#[test]
fn parse_header_random_json() {
    let text = prop_oneof![
        json_value().prop_map(|v| serde_json::to_vec(&v).unwrap_or_default()),
        "[{}\\[\\]\":,0-9a-zA-Z_ .-]{0,64}".prop_map(String::into_bytes),
    ];
    run(4096, (text, prop_oneof![Just(0u64), 0..64u64, interesting_u64()]), |(t, n)| check_parse(&t, n));
}

#[test]
fn parse_header_structured() {
    run(4096, structured_header(), |(text, n)| check_parse(&text, n));
}

#[test]
fn parse_header_accepts_valid_headers() {
    run(2048, valid_header(), |(text, data_len, expected)| {
        let h = parse_header(Path::new("fuzz.safetensors"), &text, data_len)
            .map_err(|e| TestCaseError::fail(format!("valid header refused: {e}")))?;
        check_header(&h, text.len(), data_len)?;
        let mut got: Vec<_> =
            h.tensors.iter().map(|t| (t.name.clone(), t.dtype.name(), t.shape.clone())).collect();
        let mut want = expected;
        got.sort();
        want.sort();
        prop_assert_eq!(got, want);
        prop_assert!(h.metadata.is_empty() || h.metadata.get("format").map(String::as_str) == Some("pt"));
        Ok(())
    });
}

/// Byte-level mutations of a valid header keep parse_header panic-free.
#[test]
fn parse_header_mutated_valid() {
    let base = valid_file(&[("a", "F32", &[2]), ("b", "BF16", &[3]), ("c", "I8", &[0])]);
    let len = u64::from_le_bytes(base[..8].try_into().unwrap_or_default()) as usize;
    let json = base[8..8 + len].to_vec();
    let edits = prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0..3u8), 1..6);
    run(4096, (edits, prop_oneof![Just(14u64), 0..32u64]), move |(edits, n)| {
        let mut text = json.clone();
        for (i, byte, op) in edits {
            match op {
                0 if !text.is_empty() => {
                    let k = i.index(text.len());
                    text[k] = byte;
                }
                1 if !text.is_empty() => {
                    text.remove(i.index(text.len()));
                }
                _ => text.insert(i.index(text.len() + 1), byte),
            }
        }
        check_parse(&text, n)
    });
}

// --------------------------------------------------------------------------- SafeFile::open

fn file_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..64),
        3 => (structured_header(), prop::option::weighted(0.2, interesting_u64()))
            .prop_map(|((text, n), length)| pack(&text, n.min(4096), length)),
        2 => (valid_header(), prop::option::weighted(0.2, interesting_u64()), -2..3i64)
            .prop_map(|((text, n, _), length, delta)| pack(&text, n.saturating_add_signed(delta), length)),
    ]
}

fn check_safe_file(f: &SafeFile, file_len: u64) -> Result<(), TestCaseError> {
    let h = f.header();
    let json_len = (h.data_start - 8) as usize;
    check_header(h, json_len, file_len - h.data_start)?;
    for t in &h.tensors {
        prop_assert!(f.tensor(&t.name).is_some());
        let bytes = f.bytes(t, 0, t.nbytes()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(bytes.len() as u64, t.nbytes());
        prop_assert!(f.bytes(t, 0, t.nbytes() + 1).is_err());
        f.release(t, 0, t.nbytes());
    }
    Ok(())
}

#[test]
fn safe_file_open_random_files() {
    run(1024, file_bytes(), |bytes| {
        let dir = Scratch::new("file");
        let path = dir.path().join("x.safetensors");
        fs::write(&path, &bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        if let Ok(f) = SafeFile::open(&path) {
            check_safe_file(&f, bytes.len() as u64)?;
        }
        prop_assert_eq!(fs::read(&path).ok(), Some(bytes), "the input changed");
        Ok(())
    });
}

/// `SafeFile::bytes` promises an error, not a panic, for any range outside the tensor.
#[test]
fn safe_file_bytes_any_range() {
    let dir = Scratch::new("ranges");
    let path = dir.path().join("x.safetensors");
    fs::write(&path, valid_file(&[("a", "F32", &[2]), ("b", "BF16", &[3])])).expect("write");
    let f = SafeFile::open(&path).expect("valid file");
    run(512, (any::<bool>(), interesting_u64(), interesting_u64()), |(which, begin, end)| {
        let t = &f.header().tensors[usize::from(which)];
        let ok = begin <= end && end <= t.nbytes();
        match f.bytes(t, begin, end) {
            Ok(b) => prop_assert!(ok && b.len() as u64 == end - begin),
            Err(_) => prop_assert!(!ok),
        }
        Ok(())
    });
}

// --------------------------------------------------------------------------- Checkpoint::open

const SHARDS: &[&str] = &[
    "s1.safetensors",
    "s2.safetensors",
    "link.safetensors",
    "s1.bin",
    "../outside.safetensors",
    "sub/../s1.safetensors",
    "sub/../../outside.safetensors",
    "./s1.safetensors",
    "sub",
    "",
    ".",
    "..",
    "/",
    "missing.safetensors",
    "s1.safetensors\0",
    "S1.SAFETENSORS",
];

/// A model folder: two valid shards, a symlink to a valid file outside, a pickle-named
/// file and a subfolder. Returns (scratch root, model folder, outside file).
fn sharded_folder() -> (Scratch, PathBuf, PathBuf) {
    let scratch = Scratch::new("ckpt");
    let dir = scratch.path().join("model");
    fs::create_dir_all(dir.join("sub")).expect("mkdir");
    fs::write(dir.join("s1.safetensors"), valid_file(&[("a", "F32", &[2]), ("b", "F32", &[3])]))
        .expect("write");
    fs::write(dir.join("s2.safetensors"), valid_file(&[("c", "BF16", &[4])])).expect("write");
    let outside = scratch.path().join("outside.safetensors");
    fs::write(&outside, valid_file(&[("a", "F32", &[2]), ("d", "F32", &[1])])).expect("write");
    std::os::unix::fs::symlink(&outside, dir.join("link.safetensors")).expect("symlink");
    fs::write(dir.join("s1.bin"), b"\x80\x04K\x01.").expect("write");
    (scratch, dir, outside)
}

/// Stands for the absolute path of the valid file outside the model folder.
const OUTSIDE: &str = "@OUTSIDE@";

fn index_text() -> impl Strategy<Value = Vec<u8>> {
    let shard = prop_oneof![
        6 => prop::sample::select(SHARDS).prop_map(|s| json!(s)),
        1 => Just(json!(OUTSIDE)),
        1 => ".{0,6}".prop_map(Value::from),
        1 => json_value(),
    ];
    let name =
        prop_oneof![prop::sample::select(&["a", "b", "c", "d", ""][..]).prop_map(String::from), ".{0,3}"];
    let structured =
        (prop::collection::btree_map(name, shard, 0..5), prop::option::weighted(0.3, json_value()), 0..12u8)
            .prop_map(|(map, metadata, shape)| {
                let mut index = json!({"weight_map": Value::Object(map.into_iter().collect())});
                if let Some(m) = metadata {
                    index["metadata"] = m;
                }
                match shape {
                    0 => json!({"metadata": {}}),
                    1 => json!({"weight_map": []}),
                    _ => index,
                }
            });
    prop_oneof![
        6 => structured.prop_map(|v| serde_json::to_vec(&v).unwrap_or_default()),
        1 => json_value().prop_map(|v| serde_json::to_vec(&v).unwrap_or_default()),
        1 => prop::collection::vec(any::<u8>(), 0..64),
    ]
}

#[test]
fn checkpoint_open_random_indexes() {
    run(1024, index_text(), |content| {
        let (scratch, dir, outside) = sharded_folder();
        let index_path = dir.join("model.safetensors.index.json");
        let text = String::from_utf8_lossy(&content).replace(OUTSIDE, &outside.display().to_string());
        fs::write(&index_path, &text).map_err(|e| TestCaseError::fail(e.to_string()))?;
        if let Ok(ckpt) = Checkpoint::open(&dir) {
            let real = dir.canonicalize().map_err(|e| TestCaseError::fail(e.to_string()))?;
            for f in ckpt.files() {
                let p = f.path().canonicalize().map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert!(p.starts_with(&real), "{} is outside the model folder", p.display());
            }
            let names: BTreeSet<String> = ckpt.entries().map(|(_, t)| t.name.clone()).collect();
            let index: Value = serde_json::from_str(&text).unwrap_or_default();
            let wanted: BTreeSet<String> =
                index["weight_map"].as_object().map(|m| m.keys().cloned().collect()).unwrap_or_default();
            prop_assert_eq!(&names, &wanted);
            for name in &names {
                prop_assert!(ckpt.require(name).is_ok());
            }
            prop_assert!(ckpt.require("no such tensor").is_err());
        }
        drop(scratch);
        Ok(())
    });
}

#[test]
fn checkpoint_open_random_folders() {
    // Folders without an index: one to three files of random content, names may repeat
    // tensors across files.
    let file = prop_oneof![file_bytes(), Just(valid_file(&[("a", "F32", &[2])]))];
    let names =
        prop::sample::select(&["model.safetensors", "x-1.safetensors", "x-2.safetensors", "model.bin"][..]);
    run(512, prop::collection::vec((names, file), 1..4), |files| {
        let scratch = Scratch::new("folder");
        for (name, bytes) in &files {
            fs::write(scratch.path().join(name), bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        }
        if let Ok(ckpt) = Checkpoint::open(scratch.path()) {
            let mut seen = BTreeSet::new();
            for (_, t) in ckpt.entries() {
                prop_assert!(seen.insert(t.name.clone()), "{} listed twice", t.name);
            }
        }
        for (name, _) in &files {
            let _ = Checkpoint::open(&scratch.path().join(name));
        }
        Ok(())
    });
}

// --------------------------------------------------------------------------- Job and Engine

const HUGE_EMPTY: &[u64] = &[0, 1 << 62, 1 << 62];

/// The tensors of the two job models: float and integer dtypes, a scalar, a padded 2-D
/// block (`w` is wider in the second model) and an empty tensor with huge dims.
const JOB_TENSORS: [&[(&str, &str, &[u64])]; 2] = [
    &[
        ("w", "F32", &[3, 4]),
        ("v", "BF16", &[5]),
        ("h", "F64", &[2, 2]),
        ("i", "I8", &[4]),
        ("s", "F32", &[]),
        ("z", "F32", HUGE_EMPTY),
    ],
    &[
        ("w", "F32", &[3, 6]),
        ("v", "F16", &[5]),
        ("h", "F64", &[2, 2]),
        ("i", "I8", &[4]),
        ("s", "BF16", &[]),
        ("z", "F32", HUGE_EMPTY),
    ],
];

fn job_models(root: &Path) -> Vec<PathBuf> {
    JOB_TENSORS
        .iter()
        .enumerate()
        .map(|(k, spec)| {
            let dir = root.join(format!("m{k}"));
            fs::create_dir_all(&dir).expect("mkdir");
            fs::write(dir.join("model.safetensors"), valid_file(spec)).expect("write");
            dir
        })
        .collect()
}

fn param_value() -> impl Strategy<Value = f64> {
    prop_oneof![
        4 => prop::sample::select(&[0.0f64, 0.5, 1.0, 0.1, 0.9][..]),
        1 => prop::sample::select(&[-1.0f64, 2.0, 1e-30, 1e30, 1e300, -0.0, 4294967296.0, 1e9][..]),
        1 => -10.0..10.0f64,
    ]
}

/// Parameters: usually every name a method may read (so that valid jobs are common),
/// sometimes a random few.
fn params() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => prop::collection::vec(param_value(), PARAMS.len()).prop_map(|v| {
            let m: serde_json::Map<String, Value> =
                PARAMS.iter().zip(v).map(|(k, x)| (k.to_string(), json!(x))).collect();
            Value::Object(m)
        }),
        1 => prop::collection::btree_map(prop::sample::select(PARAMS).prop_map(String::from), param_value(), 0..4)
            .prop_map(|m| json!(m)),
    ]
}

fn input_ref(tensor: impl Strategy<Value = &'static str>) -> impl Strategy<Value = Value> {
    (prop_oneof![16 => 0..2usize, 1 => 2..4usize, 1 => Just(usize::MAX)], tensor, 0..3usize, params())
        .prop_map(|(model, tensor, position, params)| {
            json!({"model": model, "tensor": tensor, "position": position, "params": params})
        })
}

const JOB_SHAPES: &[&[u64]] = &[&[3, 4], &[3, 6], &[2, 4], &[5], &[2, 2], &[4], &[], HUGE_EMPTY, &[0, 5]];
const TENSOR_NAMES: &[&str] = &["w", "v", "h", "i", "s", "z", "missing"];

/// An output tensor that mostly makes sense: a tensor of the first model, its shape, its
/// inputs from both models; sometimes a field is replaced by something random.
fn tensor_job() -> impl Strategy<Value = Value> {
    let shape = prop_oneof![
        prop::sample::select(JOB_SHAPES).prop_map(|s| json!(s)),
        prop::collection::vec(interesting_u64(), 0..4).prop_map(|s| json!(s)),
    ];
    (
        prop::sample::select(JOB_TENSORS[0]),
        prop::sample::select(&["F32", "BF16", "F16", "F64"][..]),
        prop::collection::vec(input_ref(prop::sample::select(TENSOR_NAMES)), 1..4),
        prop::option::weighted(0.5, input_ref(prop::sample::select(TENSOR_NAMES))),
        params(),
        prop::option::weighted(0.3, (0..6u8, shape, prop::sample::select(&["I8", "U8", "Q4", "BOOL"][..]))),
    )
        .prop_map(|((name, dtype, shape), out_dtype, mut inputs, base, params, twist)| {
            let copy = !matches!(dtype, "F32" | "BF16" | "F16" | "F64");
            for (k, input) in inputs.iter_mut().enumerate() {
                if k < 2 {
                    input["tensor"] = json!(name);
                }
            }
            let mut t = json!({
                "name": name, "dtype": if copy { dtype } else { out_dtype }, "shape": shape,
                "copy": copy, "inputs": inputs, "params": params,
            });
            if let Some(mut b) = base {
                b["tensor"] = json!(name);
                t["base"] = b;
            }
            if let Some((field, shape, dtype)) = twist {
                match field {
                    0 => t["shape"] = shape,
                    1 => t["dtype"] = json!(dtype),
                    2 => t["copy"] = json!(!copy),
                    3 => t["inputs"] = json!([]),
                    4 => t["name"] = json!("w"),
                    _ => t["base"] = Value::Null,
                }
            }
            t
        })
}

fn job_value(models: Vec<String>) -> impl Strategy<Value = Value> {
    let sizes = || {
        prop_oneof![
            8 => prop::sample::select(&[65536u64, 1 << 20, 1 << 30][..]),
            1 => prop::sample::select(&[0u64, 65535, 1 << 40][..]),
            1 => interesting_u64(),
        ]
    };
    let threads = prop_oneof![
        8 => 1..5u64,
        1 => prop::sample::select(&[0u64, 64, 1 << 20, 1 << 32, 1 << 62, 1 << 63][..]),
        1 => interesting_u64(),
    ];
    let model =
        prop_oneof![16 => prop::sample::select(models.clone()), 1 => Just("/no/such/model".to_string())];
    let model_list = prop_oneof![6 => Just(models), 1 => prop::collection::vec(model, 1..4)];
    (
        prop::sample::select(METHODS),
        model_list,
        prop::collection::vec(tensor_job(), 1..3),
        any::<u64>(),
        sizes(),
        threads,
        sizes(),
        prop::option::weighted(0.1, (".{0,6}", json_value())),
        prop::option::weighted(0.9, any::<prop::sample::Index>()),
    )
        .prop_map(
            |(method, models, mut tensors, seed, ram_budget, threads, shard_size, junk, coherent)| {
                // Usually give each tensor the base and the number of models its method takes.
                if let Some(pick) = coherent {
                    for t in tensors.iter_mut() {
                        fit_to_method(t, method, &pick);
                    }
                }
                let mut job = json!({
                    "method": method, "models": models, "tensors": tensors, "seed": seed,
                    "ram_budget": ram_budget, "threads": threads, "shard_size": shard_size,
                    "metadata": {"source": "fuzz"},
                });
                if let Some((key, value)) = junk {
                    job[key] = value;
                }
                job
            },
        )
}

/// Methods that take no base tensor, and how many other models each method takes.
fn fit_to_method(t: &mut Value, method: &str, pick: &prop::sample::Index) {
    let uses_base = !matches!(method, "linear" | "passthrough" | "multislerp" | "karcher");
    let count = match method {
        "passthrough" | "slerp" | "nearswap" | "arcee_fusion" => 1,
        "nuslerp" => 2,
        _ => 1 + pick.index(3),
    };
    let Some(obj) = t.as_object_mut() else { return };
    let name = obj.get("name").cloned().unwrap_or(Value::Null);
    if !obj.get("copy").and_then(Value::as_bool).unwrap_or(false) {
        let mut inputs = obj.get("inputs").and_then(Value::as_array).cloned().unwrap_or_default();
        while inputs.len() < count {
            let k = inputs.len();
            inputs.push(json!({"model": k % 2, "tensor": name, "position": k, "params": {"weight": 1.0, "density": 0.5}}));
        }
        inputs.truncate(count);
        obj.insert("inputs".into(), Value::Array(inputs));
    }
    if uses_base && !obj.get("copy").and_then(Value::as_bool).unwrap_or(false) {
        if obj.get("base").is_none_or(Value::is_null) {
            obj.insert("base".into(), json!({"model": 0, "tensor": name}));
        }
    } else {
        obj.remove("base");
    }
}

#[test]
fn job_and_engine_prepare() {
    let scratch = Scratch::new("job");
    let paths: Vec<String> = job_models(scratch.path()).iter().map(|p| p.display().to_string()).collect();
    run(1024, job_value(paths), |job| {
        let text = serde_json::to_string(&job).unwrap_or_default();
        if let Ok(job) = Job::from_json(&text) {
            if let Ok(engine) = Engine::prepare(job) {
                let _ = engine.plan();
            }
        }
        Ok(())
    });
}

#[test]
fn job_from_random_text() {
    let text =
        prop_oneof![json_value().prop_map(|v| v.to_string()), ".{0,64}", "[{}\\[\\]\":,0-9a-z_ ]{0,96}",];
    run(2048, text, |text| {
        let _ = Job::from_json(&text);
        Ok(())
    });
}
