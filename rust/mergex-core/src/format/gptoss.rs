//! gpt-oss MXFP4 expert weights (QUANT.md §6): `X_blocks` `U8 [E, N, K/32, 16]` (two E2M1
//! codes a byte, the even element in the low nibble) and `X_scales` `U8 [E, N, K/32]` (E8M0)
//! store each expert's `[N, K]` matrix; the plain weight `X` is its transpose `[E, K, N]`.
//!
//! The engine reads the plain tensor in its own order, whole rows of `[K, N]` at a time, so
//! each read gathers one column of codes from every stored row. An expert's codes and scales
//! are read once (with `pread`) into a per-thread buffer that the next rows of the same
//! expert reuse; chunks hold whole experts, so each is read once per pass, and the engine
//! drops the buffers when a chunk is done ([`release_thread`]).

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::dtype::{e8m0_to_f32, Dtype, E2M1};
use super::file::SafeFile;
use super::header::TensorEntry;
use crate::error::{Error, Result};

/// A gpt-oss MXFP4 weight read as its plain transpose.
#[derive(Debug, Clone)]
pub struct Transposed {
    model: PathBuf,
    blocks_file: Arc<SafeFile>,
    blocks: TensorEntry,
    scales_file: Arc<SafeFile>,
    scales: TensorEntry,
    /// Experts, and each stored matrix's rows (`N`) and columns (`K`).
    experts: u64,
    n: u64,
    k: u64,
    /// Identifies this weight in the per-thread expert buffers.
    id: usize,
}

/// The expert last read on this thread: `(weight id, expert, codes, scales)`.
type Cached = (usize, u64, Vec<u8>, Vec<u8>);

thread_local! {
    static EXPERT: RefCell<Vec<Cached>> = const { RefCell::new(Vec::new()) };
}

/// Drop this thread's expert buffers (at the end of a chunk).
pub fn release_thread() {
    EXPERT.with(|cell| {
        let mut kept = cell.borrow_mut();
        if !kept.is_empty() {
            *kept = Vec::new();
        }
    });
}

fn bad(model: &Path, tensor: &str, message: String) -> Error {
    Error::QuantizedWeight { path: model.to_path_buf(), tensor: tensor.to_string(), message }
}

impl Transposed {
    /// The weight of plain `shape` `[E, K, N]` stored as `blocks` and `scales`; their shapes
    /// must be `[E, N, K/32, 16]` and `[E, N, K/32]`, both `U8`.
    pub fn new(
        model: &Path,
        (blocks_file, blocks): (Arc<SafeFile>, TensorEntry),
        (scales_file, scales): (Arc<SafeFile>, TensorEntry),
        shape: &[u64],
    ) -> Result<Transposed> {
        let [experts, k, n] = *shape else {
            return Err(bad(model, &blocks.name, format!("plain shape {shape:?} is not [experts, K, N]")));
        };
        let want_blocks = [experts, n, k / 32, 16];
        let want_scales = [experts, n, k / 32];
        if k % 32 != 0 || blocks.dtype != Dtype::U8 || blocks.shape != want_blocks {
            return Err(bad(
                model,
                &blocks.name,
                format!(
                    "{} {:?} should be U8 {want_blocks:?} for the plain {shape:?}",
                    blocks.name, blocks.shape
                ),
            ));
        }
        if !matches!(scales.dtype, Dtype::U8 | Dtype::F8_E8M0) || scales.shape != want_scales {
            return Err(bad(
                model,
                &blocks.name,
                format!(
                    "scales {} ({} {:?}) should be U8 {want_scales:?}",
                    scales.name,
                    scales.dtype.name(),
                    scales.shape
                ),
            ));
        }
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        Ok(Transposed {
            model: model.to_path_buf(),
            blocks_file,
            blocks,
            scales_file,
            scales,
            experts,
            n,
            k,
            id,
        })
    }

    /// Elements of one plain matrix (an expert).
    pub fn matrix(&self) -> u64 {
        self.k * self.n
    }

    /// Elements of 32 plain rows (one block of `K`).
    pub fn block_rows(&self) -> u64 {
        32 * self.n
    }

    /// Bytes of codes and scales per expert.
    fn expert_bytes(&self) -> (u64, u64) {
        (self.n * self.k / 2, self.n * self.k / 32)
    }

    /// Byte span of the codes that plain elements `[start, start + len)` touch: their experts'.
    pub fn span(&self, start: u64, len: u64) -> (u64, u64) {
        let m = self.matrix().max(1);
        let (first, last) = (start / m, (start + len.max(1) - 1) / m);
        let per = self.expert_bytes().0;
        (first * per, ((last + 1) * per).min(self.blocks.nbytes()))
    }

    /// Bytes read for `len` plain elements.
    pub fn bytes_for(&self, len: u64) -> u64 {
        len / 2 + len / 32
    }

    /// Decode plain elements `[start, start + out.len())` (`[E, K, N]` order).
    pub fn decode(&self, start: u64, out: &mut [f32]) -> Result<()> {
        let m = self.matrix();
        let end = start + out.len() as u64;
        let mut j = start;
        while j < end {
            let e = j / m;
            if e >= self.experts {
                return Err(bad(&self.model, &self.blocks.name, format!("element {j} is out of range")));
            }
            let stop = ((e + 1) * m).min(end);
            self.with_expert(e, |codes, scales| {
                self.decode_expert(
                    codes,
                    scales,
                    j - e * m,
                    &mut out[(j - start) as usize..(stop - start) as usize],
                )
            })?;
            j = stop;
        }
        Ok(())
    }

    /// Decode elements from `at` (within one expert's plain `[K, N]`) into `out`, from the
    /// expert's stored codes `[N, K/2]` and scales `[N, K/32]`.
    fn decode_expert(&self, codes: &[u8], scales: &[u8], at: u64, out: &mut [f32]) -> Result<()> {
        let (n, k) = (self.n as usize, self.k as usize);
        let (half, groups) = (k / 2, k / 32);
        let at = at as usize;
        // Whole blocks of 32 plain rows: each stored row's 16 bytes and one scale give 32
        // values, spread down the block's rows (the transpose of a 32-wide tile).
        let first_row = at.div_ceil(n);
        let head = (first_row * n - at).min(out.len());
        let whole = (out.len() - head) / (32 * n) * 32;
        let tiled = first_row % 32 == 0 && whole > 0;
        let mut done = 0;
        if tiled {
            let (head_out, rest) = out.split_at_mut(head);
            self.gather(codes, scales, at, head_out)?;
            for kb in (first_row..first_row + whole).step_by(32) {
                let tile = &mut rest[(kb - first_row) * n..(kb - first_row + 32) * n];
                for (row, (c, &s)) in
                    codes.chunks_exact(half).zip(scales.iter().skip(kb / 32).step_by(groups)).enumerate()
                {
                    let scale = self.scale(s, row, kb)?;
                    for (i, &b) in c[kb / 2..kb / 2 + 16].iter().enumerate() {
                        tile[2 * i * n + row] = E2M1[(b & 0xf) as usize] * scale;
                        tile[(2 * i + 1) * n + row] = E2M1[(b >> 4) as usize] * scale;
                    }
                }
            }
            done = head + whole * n;
        }
        self.gather(codes, scales, at + done, &mut out[done..])
    }

    /// Decode elements one by one (the rows before and after whole blocks).
    fn gather(&self, codes: &[u8], scales: &[u8], at: usize, out: &mut [f32]) -> Result<()> {
        let (n, k) = (self.n as usize, self.k as usize);
        for (i, o) in out.iter_mut().enumerate() {
            let (row_k, col_n) = ((at + i) / n, (at + i) % n);
            let b = codes[col_n * (k / 2) + row_k / 2];
            let code = if row_k % 2 == 0 { b & 0xf } else { b >> 4 };
            let s = self.scale(scales[col_n * (k / 32) + row_k / 32], col_n, row_k)?;
            *o = E2M1[code as usize] * s;
        }
        Ok(())
    }

    fn scale(&self, b: u8, n: usize, k: usize) -> Result<f32> {
        if b == 255 {
            return Err(bad(
                &self.model,
                &self.scales.name,
                format!(
                    "scale of row {n}, columns {}..{} is the E8M0 NaN (255)",
                    k / 32 * 32,
                    k / 32 * 32 + 32
                ),
            ));
        }
        Ok(e8m0_to_f32(b))
    }

    /// Run `f` with expert `e`'s stored codes and scales, read once per thread.
    fn with_expert<R>(&self, e: u64, f: impl FnOnce(&[u8], &[u8]) -> Result<R>) -> Result<R> {
        EXPERT.with(|cell| {
            let mut kept = cell.borrow_mut();
            let found = kept.iter().position(|(id, x, _, _)| *id == self.id && *x == e);
            let i = match found {
                Some(i) => i,
                None => {
                    let (cb, sb) = self.expert_bytes();
                    let mut codes = vec![0u8; cb as usize];
                    let mut scales = vec![0u8; sb as usize];
                    self.blocks_file.read_at(&self.blocks, e * cb, &mut codes)?;
                    self.scales_file.read_at(&self.scales, e * sb, &mut scales)?;
                    // One expert per weight: drop this weight's previous one.
                    kept.retain(|(id, _, _, _)| *id != self.id);
                    kept.push((self.id, e, codes, scales));
                    kept.len() - 1
                }
            };
            let (_, _, codes, scales) = &kept[i];
            f(codes, scales)
        })
    }
}
