//! One safetensors file, memory-mapped, with its validated header.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Bytes read from tensor data by [`SafeFile::read_at`] in this process, all files together
/// (what tests count to check that a sweep reads each input once per pass).
static BYTES_READ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The bytes of tensor data read so far in this process ([`SafeFile::read_at`]).
pub fn bytes_read() -> u64 {
    BYTES_READ.load(std::sync::atomic::Ordering::Relaxed)
}

use memmap2::{Mmap, MmapOptions};

use super::header::{parse_header, Header, TensorEntry, MAX_HEADER_LEN};
use crate::error::{Error, Result};

/// A memory-mapped safetensors file.
#[derive(Debug)]
pub struct SafeFile {
    path: PathBuf,
    file: File,
    map: Mmap,
    header: Header,
    by_name: HashMap<String, usize>,
    /// (length, modification time) when opened, to detect changes during a merge.
    stamp: (u64, Option<std::time::SystemTime>),
}

impl SafeFile {
    /// Open `path`, validate its header and map it read-only.
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = File::open(path).map_err(|e| Error::io(path, "open", e))?;
        let meta = file.metadata().map_err(|e| Error::io(path, "stat", e))?;
        let file_len = meta.len();
        let stamp = (file_len, meta.modified().ok());
        if file_len < 8 {
            return Err(Error::FileTooSmall { path: path.to_path_buf(), len: file_len });
        }
        let mut prefix = [0u8; 8];
        file.read_exact(&mut prefix).map_err(|e| Error::io(path, "read", e))?;
        if prefix.starts_with(b"GGUF") {
            return Err(Error::Gguf { path: path.to_path_buf() });
        }
        let header_len = u64::from_le_bytes(prefix);
        if header_len > file_len - 8 || header_len > MAX_HEADER_LEN {
            return Err(Error::HeaderLength { path: path.to_path_buf(), header_len, file_len });
        }
        let mut json = vec![0u8; header_len as usize];
        file.read_exact(&mut json).map_err(|e| Error::io(path, "read", e))?;
        let header = parse_header(path, &json, file_len - 8 - header_len)?;
        // SAFETY: the map is read-only and private to this process. mergex never writes to
        // its inputs; another process truncating the file during a merge could fault the
        // reads (SIGBUS), which the merge-time size check in `check_unchanged` narrows.
        let map = unsafe { MmapOptions::new().len(file_len as usize).map(&file) }
            .map_err(|e| Error::io(path, "map", e))?;
        let by_name = header.tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        Ok(SafeFile { path: path.to_path_buf(), file, map, header, by_name, stamp })
    }

    /// Fail if the file's length or modification time changed since it was opened: its
    /// data may no longer be what was validated (or, shrunk, may fault when read).
    pub fn check_unchanged(&self) -> Result<()> {
        let meta = std::fs::metadata(&self.path).map_err(|e| Error::io(&self.path, "stat", e))?;
        if (meta.len(), meta.modified().ok()) != self.stamp {
            return Err(Error::InputChanged { path: self.path.clone() });
        }
        Ok(())
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The validated header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Look a tensor up by name.
    pub fn tensor(&self, name: &str) -> Option<&TensorEntry> {
        self.by_name.get(name).and_then(|&i| self.header.tensors.get(i))
    }

    /// Absolute file offsets of bytes `[begin, end)` of a tensor's data (relative to the
    /// tensor's start), checked to lie within the tensor.
    fn span(&self, t: &TensorEntry, begin: u64, end: u64) -> Result<(u64, u64)> {
        let out_of_range = || Error::OffsetsOutOfFile {
            path: self.path.clone(),
            tensor: t.name.clone(),
            begin: t.begin.saturating_add(begin),
            end: t.begin.saturating_add(end),
            data_len: t.end,
        };
        let absolute = |rel: u64| {
            t.begin
                .checked_add(rel)
                .filter(|&a| a <= t.end)
                .and_then(|a| a.checked_add(self.header.data_start))
        };
        match (absolute(begin), absolute(end)) {
            (Some(start), Some(stop)) if stop >= start => Ok((start, stop)),
            _ => Err(out_of_range()),
        }
    }

    /// Bytes `[begin, end)` of a tensor's data (offsets relative to the tensor's start),
    /// through the memory map. Out-of-range requests return an error.
    pub fn bytes(&self, t: &TensorEntry, begin: u64, end: u64) -> Result<&[u8]> {
        let (start, stop) = self.span(t, begin, end)?;
        self.map.get(start as usize..stop as usize).ok_or_else(|| Error::OffsetsOutOfFile {
            path: self.path.clone(),
            tensor: t.name.clone(),
            begin: t.begin.saturating_add(begin),
            end: t.begin.saturating_add(end),
            data_len: t.end,
        })
    }

    /// Read bytes `[begin, begin + buf.len())` of a tensor's data into `buf` with `pread`:
    /// a copy from the page cache through the kernel's own mapping, which streams faster
    /// than faulting our map in page by page and leaves nothing mapped to release. A file
    /// that shrank since it was opened gives an error here, where the map would fault.
    pub fn read_at(&self, t: &TensorEntry, begin: u64, buf: &mut [u8]) -> Result<()> {
        BYTES_READ.fetch_add(buf.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let (start, _) = self.span(t, begin, begin.saturating_add(buf.len() as u64))?;
        self.file.read_exact_at(buf, start).map_err(|e| Error::io(&self.path, "read", e))
    }

    /// Start reading bytes `[begin, end)` of a tensor into the page cache (advisory), unless
    /// its first and last bytes are there already: for a resident range the advice does no
    /// reading but still looks up every page, which cost 6% of a warm linear merge's CPU.
    pub fn will_need(&self, t: &TensorEntry, begin: u64, end: u64) {
        let Ok((start, stop)) = self.span(t, begin, end) else { return };
        if stop <= start || (self.cached(start) && self.cached(stop - 1)) {
            return;
        }
        // SAFETY: posix_fadvise only reads its arguments; the result is advisory.
        unsafe {
            libc::posix_fadvise(
                self.file.as_raw_fd(),
                start as libc::off_t,
                (stop - start) as libc::off_t,
                libc::POSIX_FADV_WILLNEED,
            );
        }
    }

    /// [`SafeFile::will_need`] for many byte ranges `[begin, end)` of a tensor, in ascending
    /// order, unless the first byte of the first and the last byte of the last are in the
    /// page cache already: a tensor's sample is 64 small ranges, and looking up two pages of
    /// each, for every input, cost 5% of a warm TIES merge's time.
    pub fn will_need_all(&self, t: &TensorEntry, ranges: &[(u64, u64)]) {
        let (Some(&(begin, _)), Some(&(_, end))) = (ranges.first(), ranges.last()) else { return };
        let Ok((start, stop)) = self.span(t, begin, end) else { return };
        if stop <= start || (self.cached(start) && self.cached(stop - 1)) {
            return;
        }
        for &(b, e) in ranges {
            self.will_need(t, b, e);
        }
    }

    /// Whether the page holding absolute offset `at` is in the page cache: `mincore` over
    /// that page of the file's map, which looks the page up without reading it, faulting it
    /// in or starting read-ahead (a one-byte `preadv2(RWF_NOWAIT)` may start read-ahead, which
    /// cost a merge larger than memory extra reads). `false` where that is unsupported.
    fn cached(&self, at: u64) -> bool {
        #[cfg(target_os = "linux")]
        {
            let page = page_size();
            let start = at as usize / page * page;
            if start >= self.map.len() {
                return false;
            }
            let mut resident = 0u8;
            // SAFETY: `start` is page-aligned and inside the mapping, so the one page asked
            // about is mapped; `resident` receives one byte per page, one here.
            let rc =
                unsafe { libc::mincore(self.map.as_ptr().add(start) as *mut libc::c_void, 1, &mut resident) };
            rc == 0 && resident & 1 == 1
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = at;
            false
        }
    }

    /// Drop the mapped pages covering `bytes` of a tensor from this process's resident set.
    /// Pages are widened to page boundaries: a neighbour that still needs one simply faults
    /// it back in from the page cache, which is correct because the map is never written.
    pub fn release(&self, t: &TensorEntry, begin: u64, end: u64) {
        self.advise(t, begin, end, libc::MADV_DONTNEED);
    }

    fn advise(&self, t: &TensorEntry, begin: u64, end: u64, advice: libc::c_int) {
        let page = page_size();
        let start = (self.header.data_start + t.begin + begin) as usize / page * page;
        let stop = ((self.header.data_start + t.begin + end) as usize).min(self.map.len());
        if stop <= start {
            return;
        }
        let len = (stop - start).div_ceil(page) * page;
        // SAFETY: [start, start+len) lies within the mapping (rounded up to whole pages,
        // which the kernel mapped), `start` is page-aligned, and the mapping is read-only
        // file-backed memory, so MADV_DONTNEED only discards pages that are re-read from
        // the file on the next access. The return value is advisory and ignored.
        unsafe {
            libc::madvise(self.map.as_ptr().add(start) as *mut libc::c_void, len, advice);
        }
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}
