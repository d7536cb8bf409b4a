//! The streaming writer: every header is computed up front from the plan, so each chunk
//! can be written at its final offset, in any order, by any thread.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use super::checkpoint::INDEX_NAME;
use super::dtype::Dtype;
use crate::error::{Error, Result};

/// One output tensor as the writer needs it.
#[derive(Debug, Clone)]
pub struct OutTensor {
    /// Name in the output checkpoint.
    pub name: String,
    /// Output dtype.
    pub dtype: Dtype,
    /// Output shape.
    pub shape: Vec<u64>,
}

impl OutTensor {
    /// Bytes of data.
    pub fn nbytes(&self) -> u64 {
        self.shape.iter().product::<u64>() * self.dtype.size() as u64
    }
}

/// Where an output tensor's data lives.
#[derive(Debug, Clone, Copy)]
pub struct Placement {
    /// Index of the shard file.
    pub shard: usize,
    /// Absolute byte offset of the tensor's data in that file.
    pub offset: u64,
}

/// One output file, with its serialized header.
#[derive(Debug, Clone)]
pub struct Shard {
    /// File name within the output folder.
    pub file_name: String,
    /// The 8-byte length prefix and the padded JSON header.
    pub header: Vec<u8>,
    /// Indices of the tensors it holds, in data order.
    pub tensors: Vec<usize>,
    /// Total file length.
    pub len: u64,
}

/// The complete output layout.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The files.
    pub shards: Vec<Shard>,
    /// Per output tensor, where its data goes.
    pub placements: Vec<Placement>,
    /// Sum of all tensors' bytes.
    pub total_size: u64,
}

/// Split tensors into shards of at most `shard_size` data bytes (a larger tensor gets a
/// shard of its own) and serialize each shard's header.
pub fn layout(tensors: &[OutTensor], shard_size: u64, metadata: &BTreeMap<String, String>) -> Result<Layout> {
    let mut groups: Vec<Vec<usize>> = vec![Vec::new()];
    let mut current = 0u64;
    for (i, t) in tensors.iter().enumerate() {
        let n = t.nbytes();
        if let Some(last) = groups.last_mut() {
            if !last.is_empty() && current + n > shard_size {
                groups.push(Vec::new());
                current = 0;
            }
        }
        if let Some(last) = groups.last_mut() {
            last.push(i);
        }
        current += n;
    }
    let count = groups.len();
    let mut placements = vec![Placement { shard: 0, offset: 0 }; tensors.len()];
    let mut shards = Vec::with_capacity(count);
    for (s, group) in groups.into_iter().enumerate() {
        let file_name = if count == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", s + 1, count)
        };
        let mut header = Map::new();
        let mut meta = Map::new();
        meta.insert("format".into(), Value::String("pt".into()));
        for (k, v) in metadata {
            meta.insert(k.clone(), Value::String(v.clone()));
        }
        header.insert("__metadata__".into(), Value::Object(meta));
        let mut offset = 0u64;
        let mut rel = Vec::with_capacity(group.len());
        for &i in &group {
            let t = &tensors[i];
            let end = offset + t.nbytes();
            header.insert(
                t.name.clone(),
                json!({"dtype": t.dtype.name(), "shape": t.shape, "data_offsets": [offset, end]}),
            );
            rel.push((i, offset));
            offset = end;
        }
        let mut bytes = serde_json::to_vec(&Value::Object(header))
            .map_err(|e| Error::job("output header", e.to_string()))?;
        while bytes.len() % 8 != 0 {
            bytes.push(b' ');
        }
        let data_start = 8 + bytes.len() as u64;
        let mut full = Vec::with_capacity(bytes.len() + 8);
        full.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        full.extend_from_slice(&bytes);
        for (i, off) in rel {
            placements[i] = Placement { shard: s, offset: data_start + off };
        }
        shards.push(Shard { file_name, header: full, tensors: group, len: data_start + offset });
    }
    let total_size = tensors.iter().map(OutTensor::nbytes).sum();
    Ok(Layout { shards, placements, total_size })
}

/// Open output files, already sized, with their headers written. Workers write finished
/// chunks with `pwrite` at their final offsets. (Writing through a shared memory map was
/// measured slower: the kernel zeroes every newly faulted page before the copy.)
#[derive(Debug)]
pub struct Writer {
    /// Every shard's path, and its open file unless it was kept from an earlier run.
    files: Vec<(PathBuf, Option<File>)>,
}

impl Writer {
    /// Create every shard of `layout` in `dir` (which must exist). The full size of each
    /// file is allocated now, so a full disk or a file-size limit fails here with an error
    /// rather than in the middle of the merge.
    pub fn create(dir: &Path, layout: &Layout, keep: &[bool]) -> Result<Self> {
        let mut files = Vec::with_capacity(layout.shards.len());
        for (i, shard) in layout.shards.iter().enumerate() {
            let path = dir.join(&shard.file_name);
            if keep.get(i).copied().unwrap_or(false) {
                // Finished by an earlier, interrupted run and verified: left as it is.
                files.push((path, None));
                continue;
            }
            let file = File::options()
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(|e| Error::io(&path, "create", e))?;
            reserve(&file, shard.len).map_err(|e| Error::io(&path, "allocate", e))?;
            file.write_all_at(&shard.header, 0).map_err(|e| Error::io(&path, "write", e))?;
            files.push((path, Some(file)));
        }
        Ok(Writer { files })
    }

    /// Write `bytes` at absolute `offset` of shard `shard`.
    pub fn write_at(&self, shard: usize, offset: u64, bytes: &[u8]) -> Result<()> {
        match self.files.get(shard) {
            Some((path, Some(file))) => {
                file.write_all_at(bytes, offset).map_err(|e| Error::io(path, "write", e))?;
                start_writeback(file, offset, bytes.len());
                Ok(())
            }
            _ => Err(Error::job("output", format!("shard {shard} is not open for writing"))),
        }
    }

    /// Flush one shard to disk and return its checksum (see [`checksum`]).
    pub fn seal(&self, shard: usize) -> Result<String> {
        match self.files.get(shard) {
            Some((path, Some(file))) => {
                file.sync_all().map_err(|e| Error::io(path, "sync", e))?;
                checksum(path)
            }
            _ => Err(Error::job("output", format!("shard {shard} is not open for writing"))),
        }
    }

    /// Flush everything to disk.
    pub fn finish(self) -> Result<Vec<PathBuf>> {
        let mut out = Vec::with_capacity(self.files.len());
        for (path, file) in self.files {
            if let Some(file) = file {
                file.sync_all().map_err(|e| Error::io(&path, "sync", e))?;
            }
            out.push(path);
        }
        Ok(out)
    }
}

/// Start writing a just-written range back to disk without waiting for it
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`): dirty pages do not pile up until the final
/// flush, which then has little left to wait for, and disk writes overlap the merge.
/// Advisory: where the call is not supported, the final flush does all the work.
fn start_writeback(file: &File, offset: u64, len: usize) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: sync_file_range only reads its integer arguments; the result is advisory.
        unsafe {
            libc::sync_file_range(
                file.as_raw_fd(),
                offset as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len);
}

/// A file's checksum: XXH3-64 of its bytes, as 16 hex digits.
pub fn checksum(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut file = File::open(path).map_err(|e| Error::io(path, "open", e))?;
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 8 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| Error::io(path, "read", e))?;
        if n == 0 {
            break;
        }
        hasher.update(buf.get(..n).unwrap_or_default());
    }
    Ok(format!("{:016x}", hasher.digest()))
}

/// Give `file` its final length with the blocks allocated (`fallocate`), falling back to a
/// sparse `set_len` where the filesystem cannot preallocate.
fn reserve(file: &File, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: fallocate on an open, writable descriptor; no memory is passed.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len as libc::off_t) };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => file.set_len(len),
        _ => Err(err),
    }
}

/// Write `model.safetensors.index.json` for a sharded layout.
pub fn write_index(dir: &Path, tensors: &[OutTensor], layout: &Layout) -> Result<PathBuf> {
    let mut weight_map = BTreeMap::new();
    for (t, p) in tensors.iter().zip(&layout.placements) {
        if let Some(s) = layout.shards.get(p.shard) {
            weight_map.insert(t.name.clone(), s.file_name.clone());
        }
    }
    let index = json!({"metadata": {"total_size": layout.total_size}, "weight_map": weight_map});
    let path = dir.join(INDEX_NAME);
    let text = serde_json::to_string_pretty(&index).map_err(|e| Error::job("index", e.to_string()))?;
    std::fs::write(&path, text + "\n").map_err(|e| Error::io(&path, "write", e))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, n: u64) -> OutTensor {
        OutTensor { name: name.into(), dtype: Dtype::F32, shape: vec![n] }
    }

    #[test]
    fn shards_split_at_the_size_limit() {
        let ts = [t("a", 10), t("b", 10), t("c", 30), t("d", 1)];
        let l = layout(&ts, 80, &BTreeMap::new()).unwrap();
        // a+b = 80 bytes fit; c (120 bytes) alone; d next.
        assert_eq!(l.shards.len(), 3);
        assert_eq!(l.shards[0].tensors, vec![0, 1]);
        assert_eq!(l.shards[1].tensors, vec![2]);
        assert_eq!(l.shards[2].file_name, "model-00003-of-00003.safetensors");
        assert_eq!(l.total_size, 204);
        for s in &l.shards {
            assert_eq!((s.header.len() - 8) % 8, 0);
        }
    }

    #[test]
    fn header_parses_back() {
        let ts = [t("a", 3), t("b", 2)];
        let l = layout(&ts, u64::MAX, &BTreeMap::new()).unwrap();
        let s = &l.shards[0];
        let h = crate::format::header::parse_header(
            Path::new("out"),
            &s.header[8..],
            s.len - s.header.len() as u64,
        )
        .unwrap();
        assert_eq!(h.tensors.len(), 2);
        assert_eq!(h.metadata["format"], "pt");
        assert_eq!(l.placements[1].offset, s.header.len() as u64 + 12);
    }
}
