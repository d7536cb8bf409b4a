//! A model checkpoint: one safetensors file, a folder holding one, or a sharded folder with
//! `model.safetensors.index.json`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

use super::file::SafeFile;
use super::header::TensorEntry;
use crate::error::{Error, Result};

/// The index file name of a sharded checkpoint.
pub const INDEX_NAME: &str = "model.safetensors.index.json";

const PICKLE_NAMES: &[&str] = &["pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.bin"];

/// An opened checkpoint: its files and where each tensor lives.
#[derive(Debug)]
pub struct Checkpoint {
    root: PathBuf,
    files: Vec<Arc<SafeFile>>,
    tensors: HashMap<String, usize>,
    /// Tensors of shards an index lists that are not in the folder (a partial download,
    /// [`Checkpoint::open_partial`]), with their shard.
    absent: BTreeMap<String, String>,
}

impl Checkpoint {
    /// Open a checkpoint folder or a single `.safetensors` file.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with(path, false)
    }

    /// [`Checkpoint::open`], where the shards of an index that are not in the folder are left
    /// out (a Hub snapshot of which only the shards a merge needs were downloaded): their
    /// tensors are missing, and asking for one names its shard.
    pub fn open_partial(path: &Path) -> Result<Self> {
        Self::open_with(path, true)
    }

    fn open_with(path: &Path, partial: bool) -> Result<Self> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, "open", e))?;
        if meta.is_file() {
            if is_pickle_name(path) {
                return Err(Error::PickleCheckpoint { path: path.to_path_buf() });
            }
            return Self::from_files(path, vec![path.to_path_buf()], None);
        }
        let index = path.join(INDEX_NAME);
        if index.is_file() {
            return Self::open_index(path, &index, partial);
        }
        let single = path.join("model.safetensors");
        if single.is_file() {
            return Self::from_files(path, vec![single], None);
        }
        let mut found: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| Error::io(path, "list", e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors") && p.is_file())
            .collect();
        found.sort();
        if !found.is_empty() {
            return Self::from_files(path, found, None);
        }
        for name in PICKLE_NAMES {
            if path.join(name).exists() {
                return Err(Error::PickleCheckpoint { path: path.join(name) });
            }
        }
        Err(Error::NoCheckpoint { dir: path.to_path_buf() })
    }

    fn open_index(dir: &Path, index: &Path, partial: bool) -> Result<Self> {
        let bad = |message: &str| Error::IndexJson { path: index.to_path_buf(), message: message.into() };
        let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, "read", e))?;
        let json: Value = serde_json::from_str(&text).map_err(|e| bad(&e.to_string()))?;
        let map =
            json.get("weight_map").and_then(Value::as_object).ok_or_else(|| bad("no 'weight_map' object"))?;
        let real_dir = allowed_root(dir)?;
        let mut shards: Vec<String> = Vec::new();
        let mut wanted = BTreeMap::new();
        for (tensor, shard) in map {
            let shard = shard.as_str().ok_or_else(|| bad(&format!("shard of '{tensor}' is not a string")))?;
            if !shards.iter().any(|s| s == shard) {
                shards.push(shard.to_string());
            }
            wanted.insert(tensor.clone(), shard.to_string());
        }
        let mut absent = BTreeMap::new();
        if partial {
            let missing: Vec<String> =
                shards.iter().filter(|s| !dir.join(s.as_str()).exists()).cloned().collect();
            shards.retain(|s| !missing.contains(s));
            let (kept, gone): (BTreeMap<_, _>, BTreeMap<_, _>) =
                wanted.into_iter().partition(|(_, shard)| !missing.contains(shard));
            wanted = kept;
            absent = gone;
        }
        let mut paths = Vec::with_capacity(shards.len());
        for shard in &shards {
            paths.push(shard_path(dir, &real_dir, index, shard)?);
        }
        let mut ckpt = Self::from_files(dir, paths, Some((index, shards, wanted)))?;
        ckpt.absent = absent;
        Ok(ckpt)
    }

    fn from_files(
        root: &Path,
        paths: Vec<PathBuf>,
        index: Option<(&Path, Vec<String>, BTreeMap<String, String>)>,
    ) -> Result<Self> {
        let files = paths.iter().map(|p| SafeFile::open(p).map(Arc::new)).collect::<Result<Vec<_>>>()?;
        let mut tensors = HashMap::new();
        match index {
            Some((index, shards, wanted)) => {
                for (tensor, shard) in wanted {
                    let i = shards.iter().position(|s| *s == shard).unwrap_or(0);
                    if files.get(i).and_then(|f| f.tensor(&tensor)).is_none() {
                        return Err(Error::IndexMismatch { index: index.to_path_buf(), tensor, shard });
                    }
                    tensors.insert(tensor, i);
                }
            }
            None => {
                for (i, f) in files.iter().enumerate() {
                    for t in &f.header().tensors {
                        if let Some(first) = tensors.insert(t.name.clone(), i) {
                            return Err(Error::DuplicateAcrossFiles {
                                first: files.get(first).map(|g| g.path().to_path_buf()).unwrap_or_default(),
                                second: f.path().to_path_buf(),
                                tensor: t.name.clone(),
                            });
                        }
                    }
                }
            }
        }
        Ok(Checkpoint { root: root.to_path_buf(), files, tensors, absent: BTreeMap::new() })
    }

    /// The files of the checkpoint.
    pub fn files(&self) -> &[Arc<SafeFile>] {
        &self.files
    }

    /// Find a tensor: the file holding it and its entry.
    pub fn get(&self, name: &str) -> Option<(&Arc<SafeFile>, &TensorEntry)> {
        let f = self.files.get(*self.tensors.get(name)?)?;
        Some((f, f.tensor(name)?))
    }

    /// Like [`Checkpoint::get`], but a missing tensor is an error naming the files searched.
    pub fn require(&self, name: &str) -> Result<(&Arc<SafeFile>, &TensorEntry)> {
        self.get(name).ok_or_else(|| match self.absent.get(name) {
            Some(shard) => Error::MissingTensor {
                model: self.root.clone(),
                tensor: name.to_string(),
                files: format!("its shard {shard} is not downloaded"),
            },
            None => Error::MissingTensor {
                model: self.root.clone(),
                tensor: name.to_string(),
                files: self
                    .files
                    .iter()
                    .map(|f| f.path().display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            },
        })
    }

    /// All tensors, in file order then data order.
    pub fn entries(&self) -> impl Iterator<Item = (&Arc<SafeFile>, &TensorEntry)> {
        self.files.iter().flat_map(move |f| {
            f.header()
                .tensors
                .iter()
                .filter(move |t| self.get(&t.name).is_some_and(|(g, _)| Arc::ptr_eq(g, f)))
                .map(move |t| (f, t))
        })
    }
}

fn is_pickle_name(path: &Path) -> bool {
    path.extension().is_some_and(|x| x == "bin" || x == "pt" || x == "pth" || x == "ckpt" || x == "pkl")
}

/// The folder a shard's real path must lie in: the model folder itself, or — for a snapshot
/// of the Hugging Face cache (`models--org--name/snapshots/<rev>`), whose files are symlinks
/// into `models--org--name/blobs` — that repository's cache folder.
fn allowed_root(dir: &Path) -> Result<PathBuf> {
    let real = dir.canonicalize().map_err(|e| Error::io(dir, "resolve", e))?;
    let parent = real.parent();
    let is_snapshot = parent.and_then(Path::file_name).is_some_and(|n| n == "snapshots")
        && parent
            .and_then(Path::parent)
            .and_then(Path::file_name)
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("models--"));
    Ok(match parent.and_then(Path::parent) {
        Some(repo) if is_snapshot => repo.to_path_buf(),
        _ => real,
    })
}

/// Resolve a shard name from an index, refusing anything that leaves the model folder.
fn shard_path(dir: &Path, real_dir: &Path, index: &Path, shard: &str) -> Result<PathBuf> {
    let outside = || Error::ShardOutsideFolder { index: index.to_path_buf(), shard: shard.to_string() };
    let rel = Path::new(shard);
    // Plain relative names only (`./` is harmless); no `..`, no absolute paths.
    let plain = rel.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if shard.is_empty() || !plain || !rel.components().any(|c| matches!(c, Component::Normal(_))) {
        return Err(outside());
    }
    let path = dir.join(rel);
    let real = path.canonicalize().map_err(|e| Error::io(&path, "open", e))?;
    if !real.starts_with(real_dir) {
        return Err(outside());
    }
    if is_pickle_name(&path) {
        return Err(Error::PickleCheckpoint { path });
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-tensor safetensors file holding `name` (one F32 value).
    fn one_tensor(path: &Path, name: &str) {
        let header = format!(r#"{{"{name}":{{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}}}"#);
        let mut h = header.into_bytes();
        h.resize(h.len().div_ceil(8) * 8, b' ');
        let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
        bytes.extend(h);
        bytes.extend(1f32.to_le_bytes());
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn a_partial_snapshot_leaves_out_its_missing_shards() {
        let dir = std::env::temp_dir().join(format!("mergex-partial-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        one_tensor(&dir.join("a.safetensors"), "x");
        let index = r#"{"weight_map":{"x":"a.safetensors","y":"b.safetensors"}}"#;
        std::fs::write(dir.join(INDEX_NAME), index).unwrap();
        // A whole checkpoint needs every shard; a partial one names the missing shard.
        assert!(matches!(Checkpoint::open(&dir), Err(Error::Io { .. })));
        let partial = Checkpoint::open_partial(&dir).unwrap();
        assert!(partial.require("x").is_ok());
        let missing = partial.require("y").unwrap_err().to_string();
        assert!(missing.contains("its shard b.safetensors is not downloaded"), "{missing}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn shard_names_stay_inside_the_folder() {
        let dir = std::env::temp_dir().join(format!("mergex-shard-test-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("a.safetensors"), b"x").unwrap();
        let real = allowed_root(&dir).unwrap();
        let index = dir.join(INDEX_NAME);
        assert!(shard_path(&dir, &real, &index, "a.safetensors").is_ok());
        assert!(shard_path(&dir, &real, &index, "./a.safetensors").is_ok());
        for bad in ["../a.safetensors", "sub/../a.safetensors", ".", "", "/etc/passwd"] {
            assert!(
                matches!(shard_path(&dir, &real, &index, bad), Err(Error::ShardOutsideFolder { .. })),
                "{bad}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
