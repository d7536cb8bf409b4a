//! LoRA adapters applied in the reader: a weight `W` read through an adapter is
//! `W + s · B·A`, computed for the elements being read only (never the whole `B·A`).
//!
//! Element `(i, j)` of the stored weight gets `s · Σₖ L[i,k]·R[k,j]`, with `L = B`, `R = A`
//! for a plain layer, and `L = Aᵀ`, `R = Bᵀ` when the stored weight is the transpose of
//! `B·A`'s shape (a `fan_in_fan_out` layer, an embedding). The sum runs over `k` in order in
//! f64 (each product of two f32 values is exact there) and the result is added to `W` in
//! f64, then rounded once to f32: each element's value depends on nothing but its own
//! row of `L` and column of `R`, so every chunking gives the same bytes.
//!
//! `R` (`r × cols`) is read once per chunk into a per-thread buffer, and the rows of `L` a
//! read needs each time; [`release_thread`] drops the buffers when a chunk is done.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::format::file::SafeFile;
use crate::format::header::TensorEntry;

/// One weight's LoRA factors, checked against the weight's shape.
#[derive(Debug, Clone)]
pub struct Lora {
    path: PathBuf,
    a: (Arc<SafeFile>, TensorEntry),
    b: (Arc<SafeFile>, TensorEntry),
    scale: f64,
    transposed: bool,
    rank: u64,
    rows: u64,
    cols: u64,
    /// Identifies this adapter in the per-thread buffers.
    id: usize,
}

thread_local! {
    /// `R` of the adapters read on this thread during the current chunk: `(id, r × cols)`.
    static FACTORS: RefCell<Vec<(usize, Vec<f64>)>> = const { RefCell::new(Vec::new()) };
}

/// Drop this thread's adapter buffers (at the end of a chunk).
pub fn release_thread() {
    FACTORS.with(|cell| {
        let mut kept = cell.borrow_mut();
        if !kept.is_empty() {
            *kept = Vec::new();
        }
    });
}

fn bad(path: &Path, tensor: &str, message: String) -> Error {
    Error::Adapter { path: path.to_path_buf(), tensor: tensor.to_string(), message }
}

impl Lora {
    /// The adapter file, its factors and scale: what a sweep compares.
    pub(crate) fn source(&self) -> (&Path, &str, &str, u64) {
        (self.path.as_path(), self.a.1.name.as_str(), self.b.1.name.as_str(), self.scale.to_bits())
    }

    /// The factors `a` and `b` (of the adapter file `path`) of a weight stored as `shape`.
    pub fn new(
        path: &Path,
        a: (Arc<SafeFile>, TensorEntry),
        b: (Arc<SafeFile>, TensorEntry),
        shape: &[u64],
        scale: f64,
        transposed: bool,
    ) -> Result<Lora> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let [rows, cols] = *shape else {
            return Err(bad(
                path,
                &a.1.name,
                format!("LoRA targets a weight of shape {shape:?}, not a matrix"),
            ));
        };
        for (_, e) in [&a, &b] {
            if !e.dtype.is_float() || e.dtype.size() < 2 {
                return Err(bad(
                    path,
                    &e.name,
                    format!("LoRA factors must be F16, BF16, F32 or F64, not {}", e.dtype.name()),
                ));
            }
        }
        let rank = a.1.shape.first().copied().unwrap_or(0);
        // (out, in) of B·A: the weight's own, or its transpose.
        let (out, inp) = if transposed { (cols, rows) } else { (rows, cols) };
        if a.1.shape != [rank, inp] || rank == 0 {
            return Err(bad(
                path,
                &a.1.name,
                format!(
                    "shape {:?} does not fit a weight of shape {shape:?} (A must be [r, {inp}])",
                    a.1.shape
                ),
            ));
        }
        if b.1.shape != [out, rank] {
            return Err(bad(
                path,
                &b.1.name,
                format!(
                    "shape {:?} does not fit a weight of shape {shape:?} (B must be [{out}, {rank}])",
                    b.1.shape
                ),
            ));
        }
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        Ok(Lora { path: path.to_path_buf(), a, b, scale, transposed, rank, rows, cols, id })
    }

    /// Bytes of the per-thread buffers one reading thread holds.
    pub fn buffer_bytes(&self, sub_block: u64) -> u64 {
        let rows = sub_block / self.cols.max(1) + 2;
        (self.rank * (self.cols + rows) + sub_block) * 8
    }

    /// Adapter bytes read with `len` elements of the weight: their rows of `L`, and `R`
    /// once.
    pub fn bytes_for(&self, len: u64) -> u64 {
        let size = self.a.1.dtype.size() as u64;
        (len.div_ceil(self.cols.max(1)) + self.cols) * self.rank * size
    }

    /// Add `s · B·A` to `values`, the stored weight's elements `[src, src + n)` as f32.
    pub fn add(&self, src: u64, values: &mut [f32]) -> Result<()> {
        FACTORS.with(|cell| {
            let mut kept = cell.borrow_mut();
            let at = match kept.iter().position(|(id, _)| *id == self.id) {
                Some(at) => at,
                None => {
                    kept.push((self.id, self.right()?));
                    kept.len() - 1
                }
            };
            self.add_with(&kept[at].1, src, values)
        })
    }

    fn add_with(&self, right: &[f64], src: u64, values: &mut [f32]) -> Result<()> {
        let (r, cols) = (self.rank as usize, self.cols as usize);
        let n = values.len() as u64;
        if n == 0 {
            return Ok(());
        }
        let (first, last) = (src / self.cols, (src + n - 1) / self.cols);
        let left = self.left(first, last + 1 - first)?;
        let mut done = 0usize;
        for row in first..=last {
            let c0 = if row == first { (src % self.cols) as usize } else { 0 };
            let c1 = cols.min(c0 + values.len() - done);
            let l = &left[(row - first) as usize * r..][..r];
            let out = &mut values[done..done + (c1 - c0)];
            row_delta_fast(right, l, (cols, c0), out, self.scale);
            done += c1 - c0;
        }
        Ok(())
    }

    /// `R` as f64, `r × cols` row-major: `A`, or `Bᵀ` for a transposed weight.
    fn right(&self) -> Result<Vec<f64>> {
        let (r, cols) = (self.rank as usize, self.cols as usize);
        if !self.transposed {
            return self.read(&self.a, 0, r * cols);
        }
        let b = self.read(&self.b, 0, r * cols)?;
        let mut out = vec![0f64; r * cols];
        for (j, row) in b.chunks_exact(r).enumerate() {
            for (k, &x) in row.iter().enumerate() {
                out[k * cols + j] = x;
            }
        }
        Ok(out)
    }

    /// Rows `[first, first + n)` of `L` as f64, `n × r` row-major: of `B`, or columns of `A`
    /// for a transposed weight.
    fn left(&self, first: u64, n: u64) -> Result<Vec<f64>> {
        let r = self.rank as usize;
        if !self.transposed {
            return self.read(&self.b, first * self.rank, n as usize * r);
        }
        let mut out = vec![0f64; n as usize * r];
        for k in 0..self.rank {
            let col = self.read(&self.a, k * self.rows + first, n as usize)?;
            for (i, x) in col.into_iter().enumerate() {
                out[i * r + k as usize] = x;
            }
        }
        Ok(out)
    }

    /// Elements `[start, start + n)` of a factor as f64, all finite.
    fn read(&self, (file, entry): &(Arc<SafeFile>, TensorEntry), start: u64, n: usize) -> Result<Vec<f64>> {
        let size = entry.dtype.size();
        let mut bytes = vec![0u8; n * size];
        file.read_at(entry, start * size as u64, &mut bytes)?;
        let mut out = vec![0f64; n];
        crate::kernels::dispatch::decode::<f64>(entry.dtype, &bytes, &mut out);
        if let Some(i) = out.iter().position(|x| !x.is_finite()) {
            let what = if out[i].is_nan() { "NaN" } else { "an infinite value" };
            return Err(bad(&self.path, &entry.name, format!("{what} at element {}", start + i as u64)));
        }
        Ok(out)
    }
}

/// [`row_delta`] in the widest build the CPU runs (the same bytes in every build: Rust
/// never fuses the multiply and the add).
fn row_delta_fast(right: &[f64], l: &[f64], at: (usize, usize), out: &mut [f32], scale: f64) {
    #[cfg(target_arch = "x86_64")]
    {
        use crate::kernels::dispatch::{level, Level};

        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
        fn avx512(right: &[f64], l: &[f64], at: (usize, usize), out: &mut [f32], scale: f64) {
            row_delta(right, l, at, out, scale)
        }

        #[target_feature(enable = "avx2,fma")]
        fn avx2(right: &[f64], l: &[f64], at: (usize, usize), out: &mut [f32], scale: f64) {
            row_delta(right, l, at, out, scale)
        }

        match level() {
            // SAFETY: `level` only picks a build whose every feature the CPU has.
            Level::Avx512 => return unsafe { avx512(right, l, at, out, scale) },
            // SAFETY: as above.
            Level::Avx2 => return unsafe { avx2(right, l, at, out, scale) },
            Level::Portable => {}
        }
    }
    row_delta(right, l, at, out, scale)
}

/// Columns of a row whose sums stay in registers while `k` runs.
const LANES: usize = 64;

/// `out[j] += s · Σₖ l[k]·R[k, c0 + j]` for one row: the sum over `k` in order for every
/// element (kept in registers, `LANES` columns at a time), added to the value in f64 and
/// rounded once; each element's bytes depend on nothing else.
#[inline(always)]
fn row_delta(right: &[f64], l: &[f64], (cols, c0): (usize, usize), out: &mut [f32], scale: f64) {
    for (t, out) in out.chunks_mut(LANES).enumerate() {
        let c = c0 + t * LANES;
        let mut acc = [0f64; LANES];
        if out.len() == LANES {
            for (k, &lk) in l.iter().enumerate() {
                let row: &[f64; LANES] = right[k * cols + c..][..LANES].try_into().unwrap_or(&[0.0; LANES]);
                for (s, &x) in acc.iter_mut().zip(row) {
                    *s += lk * x;
                }
            }
        } else {
            for (k, &lk) in l.iter().enumerate() {
                for (s, &x) in acc.iter_mut().zip(&right[k * cols + c..][..out.len()]) {
                    *s += lk * x;
                }
            }
        }
        for (v, &d) in out.iter_mut().zip(acc.iter()) {
            *v = (f64::from(*v) + scale * d) as f32;
        }
    }
}
