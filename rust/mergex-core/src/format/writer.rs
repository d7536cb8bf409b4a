//! The streaming writer: every header is computed up front from the plan, so each chunk
//! can be written at its final offset, in any order, by any thread.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

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
/// shard of its own) and serialize each shard's header. A tensor whose `joined` flag is set
/// stays in the shard of the tensor before it (a quantized weight's scales beside its codes).
pub fn layout(
    tensors: &[OutTensor],
    joined: &[bool],
    shard_size: u64,
    metadata: &BTreeMap<String, String>,
) -> Result<Layout> {
    let mut groups: Vec<Vec<usize>> = vec![Vec::new()];
    let mut current = 0u64;
    for i in 0..tensors.len() {
        // The whole group that starts here must fit.
        let group_end =
            (i + 1..tensors.len()).find(|&k| joined.get(k) != Some(&true)).unwrap_or(tensors.len());
        let n: u64 = if joined.get(i) == Some(&true) {
            0
        } else {
            tensors[i..group_end].iter().map(OutTensor::nbytes).sum()
        };
        if let Some(last) = groups.last_mut() {
            if !last.is_empty() && joined.get(i) != Some(&true) && current + n > shard_size {
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
///
/// Each shard's checksum is folded from the bytes as they are written, in whatever order
/// they come ([`checksum`] defines it over the file), so that finishing a shard never reads
/// it back; that lets the written pages leave the page cache once they are on disk
/// ([`WRITE_LAG`]), which is what keeps a long merge's output from crowding out its inputs.
#[derive(Debug)]
pub struct Writer {
    shards: Vec<OutShard>,
}

/// One shard of a [`Writer`].
#[derive(Debug)]
struct OutShard {
    path: PathBuf,
    /// The open file; `None` for a shard kept from an earlier run.
    file: Option<File>,
    len: u64,
    digest: Digest,
    /// Ranges written and not yet dropped from the page cache, oldest first, and their bytes.
    behind: Mutex<(VecDeque<(u64, u64)>, u64)>,
}

/// Bytes per block of a shard's checksum.
const SUM_BLOCK: u64 = 4096;

/// Bytes of a shard's output kept in the page cache behind the newest writes: older ranges
/// are waited on until they are on disk, then dropped, so the page cache recycles a few of
/// its own pages for the output instead of taking fresh ones for every byte. (On this
/// project's benchmark VM fresh pages cost the most: 1.0–1.1 s of system time to write a new
/// 512 MiB file against 0.13–0.15 s recycled.)
const WRITE_LAG: u64 = 32 << 20;

/// A shard's checksum while it is written: the wrapping sum of its finished blocks' hashes
/// (a block is finished when all its bytes have arrived), and the blocks still in part.
#[derive(Debug, Default)]
struct Digest {
    sum: AtomicU64,
    bytes: AtomicU64,
    partial: Mutex<HashMap<u64, (Vec<u8>, u64)>>,
}

impl Digest {
    /// Fold bytes `[offset, offset + bytes.len())` of a file of `len` bytes. Each byte of the
    /// file must be folded exactly once.
    fn add(&self, len: u64, offset: u64, bytes: &[u8]) {
        let (mut at, mut rest) = (offset, bytes);
        while !rest.is_empty() {
            let block = at / SUM_BLOCK;
            let block_len = SUM_BLOCK.min(len.saturating_sub(block * SUM_BLOCK));
            let inner = at - block * SUM_BLOCK;
            let n = (rest.len() as u64).min(block_len.saturating_sub(inner)).max(1);
            let (piece, tail) = rest.split_at((n as usize).min(rest.len()));
            if inner == 0 && n == block_len {
                self.finish(block, piece);
            } else {
                self.fill(block, block_len, inner, piece);
            }
            (at, rest) = (at + n, tail);
        }
    }

    fn finish(&self, block: u64, data: &[u8]) {
        self.sum.fetch_add(block_hash(block, data), Ordering::Relaxed);
        self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
    }

    /// Place part of a block; hash the block once all of it has arrived.
    fn fill(&self, block: u64, block_len: u64, inner: u64, piece: &[u8]) {
        let done = {
            let mut partial = self.partial.lock().unwrap_or_else(|p| p.into_inner());
            let (data, got) = partial.entry(block).or_insert_with(|| (vec![0; block_len as usize], 0));
            if let Some(dst) = data.get_mut(inner as usize..inner as usize + piece.len()) {
                dst.copy_from_slice(piece);
            }
            *got += piece.len() as u64;
            if *got == block_len {
                partial.remove(&block).map(|(data, _)| data)
            } else {
                None
            }
        };
        if let Some(data) = done {
            self.finish(block, &data);
        }
    }

    /// The checksum of a file of `len` bytes, all of them folded; otherwise `None`.
    fn value(&self, len: u64) -> Option<String> {
        let partial = self.partial.lock().unwrap_or_else(|p| p.into_inner());
        (partial.is_empty() && self.bytes.load(Ordering::Relaxed) == len)
            .then(|| format!("{:016x}", self.sum.load(Ordering::Relaxed)))
    }
}

/// The hash of block `index` of a file.
fn block_hash(index: u64, data: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(data, index)
}

impl Writer {
    /// Create every shard of `layout` in `dir` (which must exist). The full size of each
    /// file is allocated now, so a full disk or a file-size limit fails here with an error
    /// rather than in the middle of the merge.
    pub fn create(dir: &Path, layout: &Layout, keep: &[bool]) -> Result<Self> {
        let mut shards = Vec::with_capacity(layout.shards.len());
        for (i, shard) in layout.shards.iter().enumerate() {
            let path = dir.join(&shard.file_name);
            let file = if keep.get(i).copied().unwrap_or(false) {
                // Finished by an earlier, interrupted run and verified: left as it is.
                None
            } else {
                let file = File::options()
                    .write(true)
                    .create_new(true)
                    .open(&path)
                    .map_err(|e| Error::io(&path, "create", e))?;
                reserve(&file, shard.len).map_err(|e| Error::io(&path, "allocate", e))?;
                Some(file)
            };
            let out = OutShard {
                path,
                file,
                len: shard.len,
                digest: Digest::default(),
                behind: Mutex::new((VecDeque::new(), 0)),
            };
            if out.file.is_some() {
                out.write_at(0, &shard.header)?;
            }
            shards.push(out);
        }
        Ok(Writer { shards })
    }

    fn shard(&self, shard: usize) -> Result<&OutShard> {
        match self.shards.get(shard) {
            Some(s) if s.file.is_some() => Ok(s),
            _ => Err(Error::job("output", format!("shard {shard} is not open for writing"))),
        }
    }

    /// Write `bytes` at absolute `offset` of shard `shard`. Every byte of a shard is
    /// written exactly once.
    pub fn write_at(&self, shard: usize, offset: u64, bytes: &[u8]) -> Result<()> {
        self.shard(shard)?.write_at(offset, bytes)
    }

    /// Flush one shard to disk and return its checksum (see [`checksum`]).
    pub fn seal(&self, shard: usize) -> Result<String> {
        self.shard(shard)?.seal()
    }

    /// Flush everything to disk, checking that every byte of every shard was written;
    /// the checksum ([`checksum`]) of each shard written, by file name.
    pub fn finish(self) -> Result<BTreeMap<String, String>> {
        let mut out = BTreeMap::new();
        for shard in self.shards {
            if shard.file.is_some() {
                let sum = shard.seal()?;
                let name = shard.path.file_name().map(|n| n.to_string_lossy().into_owned());
                out.insert(name.unwrap_or_default(), sum);
            }
        }
        Ok(out)
    }
}

impl OutShard {
    fn write_at(&self, offset: u64, bytes: &[u8]) -> Result<()> {
        let Some(file) = &self.file else {
            return Err(Error::job("output", format!("{} is not open for writing", self.path.display())));
        };
        if offset.checked_add(bytes.len() as u64).is_none_or(|end| end > self.len) {
            let msg = format!(
                "{}: write of {} bytes at {offset} is past the end",
                self.path.display(),
                bytes.len()
            );
            return Err(Error::job("output", msg));
        }
        file.write_all_at(bytes, offset).map_err(|e| Error::io(&self.path, "write", e))?;
        self.digest.add(self.len, offset, bytes);
        start_writeback(file, offset, bytes.len() as u64);
        self.recycle(file, offset, bytes.len() as u64);
        Ok(())
    }

    /// Note a written range; drop the ranges more than [`WRITE_LAG`] behind from the page
    /// cache once they are on disk.
    fn recycle(&self, file: &File, offset: u64, len: u64) {
        let old: Vec<(u64, u64)> = {
            let mut behind = self.behind.lock().unwrap_or_else(|p| p.into_inner());
            let (queue, bytes) = &mut *behind;
            queue.push_back((offset, len));
            *bytes += len;
            let mut old = Vec::new();
            while *bytes > WRITE_LAG {
                let Some(front) = queue.pop_front() else { break };
                *bytes -= front.1;
                old.push(front);
            }
            old
        };
        for (offset, len) in old {
            drop_written(file, offset, len);
        }
    }

    /// Flush to disk; the checksum, or an error if some byte was never written.
    fn seal(&self) -> Result<String> {
        if let Some(file) = &self.file {
            file.sync_all().map_err(|e| Error::io(&self.path, "sync", e))?;
        }
        self.digest.value(self.len).ok_or_else(|| {
            let written = self.digest.bytes.load(Ordering::Relaxed);
            Error::job(
                "output",
                format!("{}: {written} of {} bytes were written", self.path.display(), self.len),
            )
        })
    }
}

/// Start writing a just-written range back to disk without waiting for it
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`): dirty pages do not pile up until the final
/// flush, which then has little left to wait for, and disk writes overlap the merge.
/// Advisory: where the call is not supported, the final flush does all the work.
fn start_writeback(file: &File, offset: u64, len: u64) {
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

/// Wait until a written range is on disk, then drop its pages from the page cache.
/// Advisory: errors are left for the final flush to report.
fn drop_written(file: &File, offset: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let fd = file.as_raw_fd();
        let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER;
        // SAFETY: both calls only read their integer arguments; the results are advisory.
        unsafe {
            if libc::sync_file_range(fd, offset as libc::off64_t, len as libc::off64_t, flags) == 0 {
                libc::posix_fadvise(fd, offset as libc::off_t, len as libc::off_t, libc::POSIX_FADV_DONTNEED);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len);
}

/// A file's checksum, as 16 hex digits: the wrapping sum, over its 4 KiB blocks (the last
/// may be shorter), of XXH3-64 of the block seeded with the block's index. A sum does not
/// depend on the order the blocks are added in, so the writer folds it while chunks land
/// in any order; seeding with the index ties each block to its place.
pub fn checksum(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut file = File::open(path).map_err(|e| Error::io(path, "open", e))?;
    let mut buf = vec![0u8; 8 << 20];
    let (mut sum, mut block) = (0u64, 0u64);
    loop {
        // Fill the buffer (short reads aside) so that blocks never straddle two reads.
        let mut n = 0;
        while n < buf.len() {
            let got =
                file.read(buf.get_mut(n..).unwrap_or_default()).map_err(|e| Error::io(path, "read", e))?;
            if got == 0 {
                break;
            }
            n += got;
        }
        for data in buf.get(..n).unwrap_or_default().chunks(SUM_BLOCK as usize) {
            sum = sum.wrapping_add(block_hash(block, data));
            block += 1;
        }
        if n < buf.len() {
            break;
        }
    }
    Ok(format!("{sum:016x}"))
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
    // Written beside and renamed into place: tasks that each write a shard of the same
    // output (Ray) may all write this same index at once.
    let tmp = dir.join(format!(".{INDEX_NAME}.{}.{:?}.tmp", std::process::id(), std::thread::current().id()));
    std::fs::write(&tmp, text + "\n").map_err(|e| Error::io(&tmp, "write", e))?;
    std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, "write", e))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, n: u64) -> OutTensor {
        OutTensor { name: name.into(), dtype: Dtype::F32, shape: vec![n] }
    }

    /// A fresh folder under the system's temporary folder.
    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mergex-writer-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Split `data` into pieces at `cuts` and write them in the order of `order`.
    fn write_shuffled(w: &Writer, header: usize, data: &[u8], cuts: &[usize], order: &[usize]) {
        let mut bounds: Vec<usize> = cuts.iter().map(|&c| c % (data.len() + 1)).collect();
        bounds.extend([0, data.len()]);
        bounds.sort_unstable();
        bounds.dedup();
        let pieces: Vec<(usize, usize)> = bounds.windows(2).map(|p| (p[0], p[1])).collect();
        let mut idx: Vec<usize> = (0..pieces.len()).collect();
        idx.sort_by_key(|&i| order.get(i).copied().unwrap_or(i));
        for i in idx {
            let (b, e) = pieces[i];
            w.write_at(0, (header + b) as u64, &data[b..e]).unwrap();
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
        /// The checksum folded from writes in any order and of any size is the checksum of
        /// the file read back, and differs when one byte differs.
        #[test]
        fn folded_checksum_is_the_files(
            n in 1usize..20_000,
            cuts in proptest::collection::vec(0usize..20_000, 0..12),
            order in proptest::collection::vec(0usize..100, 0..13),
        ) {
            let dir = scratch(&format!("fold-{n}-{}", cuts.len()));
            let tensors = [OutTensor { name: "x".into(), dtype: Dtype::U8, shape: vec![n as u64] }];
            let l = layout(&tensors, &[], u64::MAX, &BTreeMap::new()).unwrap();
            let header = l.shards[0].header.len();
            let data: Vec<u8> = (0..n).map(|i| (i * 7 + i / 300) as u8).collect();
            let w = Writer::create(&dir, &l, &[]).unwrap();
            write_shuffled(&w, header, &data, &cuts, &order);
            let sealed = w.seal(0).unwrap();
            w.finish().unwrap();
            let path = dir.join("model.safetensors");
            proptest::prop_assert_eq!(&sealed, &checksum(&path).unwrap());
            let mut bytes = std::fs::read(&path).unwrap();
            let at = (n * 31) % bytes.len();
            bytes[at] ^= 1;
            std::fs::write(&path, bytes).unwrap();
            proptest::prop_assert_ne!(&sealed, &checksum(&path).unwrap());
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }

    #[test]
    fn a_shard_with_unwritten_bytes_does_not_seal() {
        let dir = scratch("gap");
        let tensors = [OutTensor { name: "x".into(), dtype: Dtype::F32, shape: vec![3000] }];
        let l = layout(&tensors, &[], u64::MAX, &BTreeMap::new()).unwrap();
        let at = l.placements[0].offset;
        let w = Writer::create(&dir, &l, &[]).unwrap();
        w.write_at(0, at, &[1u8; 8000]).unwrap();
        let err = w.seal(0).unwrap_err().to_string();
        assert!(err.contains("model.safetensors") && err.contains("bytes were written"), "{err}");
        // Past the end is refused, naming the file.
        assert!(w.write_at(0, at + 11_999, &[0, 0]).is_err());
        w.write_at(0, at + 8000, &[2u8; 4000]).unwrap();
        let sealed = w.seal(0).unwrap();
        w.finish().unwrap();
        assert_eq!(sealed, checksum(&dir.join("model.safetensors")).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn shards_split_at_the_size_limit() {
        let ts = [t("a", 10), t("b", 10), t("c", 30), t("d", 1)];
        let l = layout(&ts, &[], 80, &BTreeMap::new()).unwrap();
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
        let l = layout(&ts, &[], u64::MAX, &BTreeMap::new()).unwrap();
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
