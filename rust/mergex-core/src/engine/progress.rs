//! Shared progress counters and the cancel flag, read by the front end while a merge runs.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Counters updated by the engine as chunks complete.
#[derive(Debug, Default)]
pub struct Progress {
    /// Input bytes processed so far, over all passes.
    pub bytes_done: AtomicU64,
    /// Input bytes to process, over all passes.
    pub bytes_total: AtomicU64,
    /// Output tensors finished.
    pub tensors_done: AtomicU64,
    /// Output tensors in the merge.
    pub tensors_total: AtomicU64,
    cancelled: AtomicBool,
}

impl Progress {
    /// Ask the running merge to stop at the next chunk boundary.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }

    /// Whether a stop was requested.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }

    pub(crate) fn add_bytes(&self, n: u64) {
        self.bytes_done.fetch_add(n, Ordering::Relaxed);
    }

    /// A snapshot: (bytes done, bytes total, tensors done, tensors total).
    pub fn snapshot(&self) -> (u64, u64, u64, u64) {
        (
            self.bytes_done.load(Ordering::Relaxed),
            self.bytes_total.load(Ordering::Relaxed),
            self.tensors_done.load(Ordering::Relaxed),
            self.tensors_total.load(Ordering::Relaxed),
        )
    }
}
