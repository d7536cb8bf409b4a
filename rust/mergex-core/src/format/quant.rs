//! Quantized weights read as plain values (QUANT.md §3): the 8-bit float codes of a weight
//! and its scales (one per `bm × bn` block of each matrix, or one for the whole tensor),
//! decoded to f32 for one element range at a time, `w = code · scale` in one f32 multiply.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::dtype::{bf16_to_f32, e8m0_to_f32, f8_e4m3_to_f32, Dtype};
use super::file::SafeFile;
use super::header::TensorEntry;
use crate::error::{Error, Result};

/// Codes stored several to a byte or word, instead of one 8-bit float a byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packed {
    /// FP4 (E2M1) in a `U8` tensor, two a byte, the even element in the low nibble.
    Fp4,
    /// Symmetric integers of 4 or 8 bits in little-endian `I32` words (compressed-tensors
    /// `pack-quantized`, QUANT.md §4b), element `i` of a row at bit `i·bits` of the row,
    /// stored as `q + 2^(bits−1)`.
    Int(u8),
}

impl Packed {
    /// Bits per element.
    pub fn bits(self) -> u64 {
        match self {
            Packed::Fp4 => 4,
            Packed::Int(b) => u64::from(b),
        }
    }
}

/// The scales of one quantized weight and how they map onto its codes.
#[derive(Debug, Clone)]
pub struct Scales {
    /// The checkpoint the weight belongs to, for errors.
    model: PathBuf,
    /// The codes' tensor name, for errors.
    codes: String,
    codes_dtype: Dtype,
    /// Codes several to a byte or word, else one 8-bit float a byte.
    packed: Option<Packed>,
    /// Every block scale divided (`true`) or multiplied by this value (NVFP4's global scale).
    global: Option<(f32, bool)>,
    /// Asymmetric integers' zero points: `I32` words packed down the rows, one per row and
    /// group (QUANT.md §4b).
    zero: Option<(Arc<SafeFile>, TensorEntry)>,
    file: Arc<SafeFile>,
    entry: TensorEntry,
    /// Block rows and columns; a per-tensor scale covers the whole matrix.
    bm: u64,
    bn: u64,
    /// Rows and columns of each matrix (the last two axes).
    rows: u64,
    cols: u64,
    /// Scales per row of blocks, and per matrix.
    grid_cols: u64,
    per_matrix: u64,
    per_tensor: bool,
}

fn bad(model: &Path, tensor: &str, message: String) -> Error {
    Error::QuantizedWeight { path: model.to_path_buf(), tensor: tensor.to_string(), message }
}

impl Scales {
    /// The scales `entry` (in `file`) of the codes `codes`, in blocks of `block` rows and
    /// columns (`None`: one scale for the whole tensor). The grid must be the codes' shape
    /// divided by the block, rounded up (a partial block is a block of its own).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        model: &Path,
        codes: &TensorEntry,
        file: Arc<SafeFile>,
        entry: TensorEntry,
        block: Option<[u64; 2]>,
        packed: Option<Packed>,
        global: Option<(f32, bool)>,
    ) -> Result<Scales> {
        let fail = |m: String| bad(model, &codes.name, m);
        let codes_ok = match packed {
            None => matches!(codes.dtype, Dtype::F8_E4M3 | Dtype::F8_E5M2),
            Some(Packed::Fp4) => codes.dtype == Dtype::U8,
            Some(Packed::Int(b)) => codes.dtype == Dtype::I32 && (b == 4 || b == 8),
        };
        if !codes_ok {
            let want = match packed {
                None => "F8_E4M3 or F8_E5M2",
                Some(Packed::Fp4) => "U8 (FP4 two a byte)",
                Some(Packed::Int(_)) => "I32 words of 4- or 8-bit integers",
            };
            return Err(fail(format!("quantized codes must be {want}, not {}", codes.dtype.name())));
        }
        let scale_ok = matches!(entry.dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16)
            || (matches!(entry.dtype, Dtype::F8_E8M0 | Dtype::U8) && !matches!(packed, Some(Packed::Int(_))))
            || (entry.dtype == Dtype::F8_E4M3 && packed == Some(Packed::Fp4));
        if !scale_ok {
            return Err(fail(format!(
                "scale {} is {}, which these codes do not use",
                entry.name,
                entry.dtype.name()
            )));
        }
        if let Some((g, _)) = global.filter(|(g, _)| !(g.is_finite() && *g > 0.0)) {
            return Err(fail(format!("its global scale is {g}: it must be finite and positive")));
        }
        let mut logical = codes.shape.clone();
        if let (Some(p), Some(last)) = (packed, logical.last_mut()) {
            // Bytes of a row, times the elements a byte holds.
            *last = *last * codes.dtype.size() as u64 * 8 / p.bits();
        }
        let shape = &logical;
        let (rows, cols) = match shape.as_slice() {
            [.., r, c] => (*r, *c),
            [n] => (1, *n),
            [] => (1, 1),
        };
        let lead: Vec<u64> = shape.iter().take(shape.len().saturating_sub(2)).copied().collect();
        let (bm, bn, per_tensor) = match block {
            None => {
                if entry.shape.iter().product::<u64>() != 1 {
                    return Err(fail(format!(
                        "a per-tensor scale must hold one value, but {} has shape {:?}",
                        entry.name, entry.shape
                    )));
                }
                (rows.max(1), cols.max(1), true)
            }
            Some([bm, bn]) => {
                if bm == 0 || bn == 0 || shape.len() < 2 {
                    return Err(fail(format!("block {bm}×{bn} does not fit a weight of shape {shape:?}")));
                }
                let mut want = lead.clone();
                want.extend([rows.div_ceil(bm), cols.div_ceil(bn)]);
                if entry.shape != want {
                    return Err(fail(format!(
                        "scale grid {:?} of {} does not match the block size {bm}×{bn} for shape {shape:?} \
                         (expected {want:?})",
                        entry.shape, entry.name
                    )));
                }
                (bm, bn, false)
            }
        };
        let grid_cols = cols.div_ceil(bn);
        let per_matrix = rows.div_ceil(bm) * grid_cols;
        Ok(Scales {
            model: model.to_path_buf(),
            codes: codes.name.clone(),
            codes_dtype: codes.dtype,
            packed,
            global,
            zero: None,
            file,
            entry,
            bm,
            bn,
            rows,
            cols,
            grid_cols,
            per_matrix,
            per_tensor,
        })
    }

    /// The same scales with the zero points of asymmetric packed integers (`entry`, `I32`
    /// `[..., ⌈rows·b/32⌉, groups]`, row `r` at bit `(r·b) % 32` of word row `r·b / 32`).
    pub fn with_zero_points(mut self, file: Arc<SafeFile>, entry: TensorEntry) -> Result<Scales> {
        let Some(Packed::Int(b)) = self.packed else {
            return Err(bad(&self.model, &self.codes, "zero points go with packed integers only".into()));
        };
        let matrices = (self.entry.shape.iter().product::<u64>() / self.per_matrix.max(1)).max(1);
        let want = matrices * (self.rows * u64::from(b)).div_ceil(32) * self.grid_cols;
        if entry.dtype != Dtype::I32 || entry.shape.iter().product::<u64>() != want || self.bm != 1 {
            return Err(bad(
                &self.model,
                &self.codes,
                format!(
                    "zero points {} ({} {:?}) do not fit {} rows in groups of {} columns",
                    entry.name,
                    entry.dtype.name(),
                    entry.shape,
                    self.rows,
                    self.bn
                ),
            ));
        }
        self.zero = Some((file, entry));
        Ok(self)
    }

    /// The zero point of every (row, group) of flat rows `[r0, r1]`: `(first word row, words)`.
    fn read_zero_points(&self, r0: u64, r1: u64) -> Result<Option<(u64, Vec<u32>)>> {
        let (Some((file, entry)), Some(Packed::Int(b))) = (&self.zero, self.packed) else { return Ok(None) };
        let per = (self.rows * u64::from(b)).div_ceil(32);
        let word_row = |r: u64| (r / self.rows) * per + (r % self.rows) * u64::from(b) / 32;
        let (w0, w1) = (word_row(r0), word_row(r1));
        let mut bytes = vec![0u8; ((w1 + 1 - w0) * self.grid_cols * 4) as usize];
        file.read_at(entry, w0 * self.grid_cols * 4, &mut bytes)?;
        Ok(Some((w0, bytes.chunks_exact(4).map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]])).collect())))
    }

    /// Scale index of code element `i` (flat).
    fn index(&self, i: u64) -> u64 {
        if self.per_tensor {
            return 0;
        }
        let (m, rest) = (i / (self.rows * self.cols), i % (self.rows * self.cols));
        let (r, c) = (rest / self.cols, rest % self.cols);
        m * self.per_matrix + (r / self.bm) * self.grid_cols + c / self.bn
    }

    /// Scales `[first, last]` as f32, each checked finite and positive.
    fn read_scales(&self, first: u64, last: u64, out: &mut Vec<f32>) -> Result<()> {
        let size = self.entry.dtype.size();
        let n = (last + 1 - first) as usize;
        let mut bytes = vec![0u8; n * size];
        self.file.read_at(&self.entry, first * size as u64, &mut bytes)?;
        out.clear();
        out.extend(bytes.chunks_exact(size).map(|b| match self.entry.dtype {
            Dtype::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            Dtype::BF16 => bf16_to_f32(u16::from_le_bytes([b[0], b[1]])),
            Dtype::F16 => half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32(),
            Dtype::F8_E4M3 => f8_e4m3_to_f32(b[0]),
            _ => e8m0_to_f32(b[0]),
        }));
        if let Some(k) = out.iter().position(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(bad(
                &self.model,
                &self.codes,
                format!(
                    "scale {} at index {} is {}: scales must be finite and positive",
                    self.entry.name,
                    first + k as u64,
                    out[k]
                ),
            ));
        }
        if let Some((g, divide)) = self.global {
            // One f32 operation a block, as the formats write it: E4M3(s) / g or E4M3(s) · g.
            for v in out.iter_mut() {
                *v = if divide { *v / g } else { *v * g };
            }
        }
        Ok(())
    }

    /// The dtype of the codes (`U8` for packed FP4).
    pub fn codes_dtype(&self) -> Dtype {
        self.codes_dtype
    }

    /// How the codes are packed, if they are.
    pub fn packed(&self) -> Option<Packed> {
        self.packed
    }

    /// Decode the codes of elements `[src, src + out.len())` into `out`, with `times`
    /// computing `out[k] = code(codes[k]) · s` over each run of one scale (the kernels'
    /// loop for [`Scales::codes_dtype`]).
    ///
    /// FP4 codes from an even element stay two a byte: `pairs` then computes the run's values
    /// from its bytes (`out[k] = E2M1(code k) · s`, the even element in the low nibble; `out`
    /// may end on a low nibble).
    pub fn decode(
        &self,
        src: u64,
        codes: &[u8],
        out: &mut [f32],
        times: impl Fn(&[u8], f32, i32, &mut [f32]),
        pairs: impl Fn(&[u8], f32, &mut [f32]),
    ) -> Result<()> {
        // Four-bit codes: `codes` are the bytes holding elements `[src, src + out.len())`, the
        // first one's code in the high nibble when `src` is odd. FP4 from an even element is
        // decoded two codes a byte as stored (every run then starts on a byte: groups and rows
        // are even); otherwise the codes are unpacked to one a byte first.
        let fp4_pairs = self.packed == Some(Packed::Fp4) && src.is_multiple_of(2);
        let unpacked: Vec<u8>;
        let codes = if self.packed.is_some_and(|p| p.bits() == 4) && !fp4_pairs {
            let odd = (src & 1) as usize;
            let n = out.len().min((codes.len() * 2).saturating_sub(odd));
            let mut all = Vec::with_capacity(codes.len() * 2);
            for &b in codes {
                all.extend_from_slice(&[b & 0xf, b >> 4]);
            }
            all.truncate(odd + n);
            all.drain(..odd);
            unpacked = all;
            &unpacked[..]
        } else {
            codes
        };
        let per_byte = if fp4_pairs { 2 } else { 1 };
        let n = (codes.len() * per_byte).min(out.len()) as u64;
        if n == 0 {
            return Ok(());
        }
        // The range's rows of blocks, whole: scale indices rise along a row of blocks, then
        // start again at the next row's first column.
        let g = self.grid_cols;
        let first = self.index(src) / g * g;
        let last = (self.index(src + n - 1) / g * g + g - 1)
            .min(self.entry.shape.iter().product::<u64>().max(1) - 1);
        let mut scales = Vec::new();
        self.read_scales(first, last, &mut scales)?;
        let zero = self.read_zero_points(src / self.cols, (src + n - 1) / self.cols)?;
        let mut i = src;
        let end = src + n;
        // The column and scale index of element `i`, kept up to date run by run (a run ends
        // at a block's last column or the row's): only a new row needs the divisions.
        let (mut c, mut idx) = (src % self.cols, self.index(src));
        while i < end {
            // One run of elements under the same scale: to the end of the block's columns,
            // of the row, or of the range.
            let run = if self.per_tensor {
                end - i
            } else {
                (self.bn - c % self.bn).min(self.cols - c).min(end - i)
            };
            let s = scales.get((idx - first) as usize).copied().unwrap_or(f32::NAN);
            let (a, b) = ((i - src) as usize, (i - src + run) as usize);
            let zp = match (&zero, self.packed) {
                (Some((w0, words)), Some(Packed::Int(bits))) => {
                    let (row, bits) = (i / self.cols, u64::from(bits));
                    let per = (self.rows * bits).div_ceil(32);
                    let word_row = (row / self.rows) * per + (row % self.rows) * bits / 32;
                    let at = (word_row - w0) * self.grid_cols + c / self.bn;
                    let word = words.get(at as usize).copied().unwrap_or(0);
                    let u = (word >> ((row % self.rows) * bits % 32)) & ((1 << bits) - 1);
                    u as i32 - (1 << (bits - 1))
                }
                _ => 0,
            };
            if fp4_pairs {
                pairs(&codes[a / 2..b.div_ceil(2)], s, &mut out[a..b]);
            } else {
                times(&codes[a..b], s, zp, &mut out[a..b]);
            }
            // A branch-free sweep first (it vectorizes); the position only on failure. FP4
            // values are at most 6 times the scale: finite whenever that is; E4M3 codes are
            // at most 448, and only `s 1111 111` is NaN (a sweep over the bytes).
            let e4m3 = self.packed.is_none() && self.codes_dtype == Dtype::F8_E4M3;
            let finite = (fp4_pairs && (s * 6.0).is_finite())
                || (e4m3
                    && (s * 448.0).is_finite()
                    && codes[a..b].iter().fold(true, |ok, &c| ok & (c & 0x7f != 0x7f)))
                || out[a..b].iter().fold(true, |ok, v| ok & v.is_finite());
            if let Some(k) = (!finite).then(|| out[a..b].iter().position(|v| !v.is_finite())).flatten() {
                let at = i + k as u64;
                return Err(bad(
                    &self.model,
                    &self.codes,
                    format!(
                        "code at index {at} (0x{:02x}) is not a finite number",
                        codes[(a + k) / per_byte]
                    ),
                ));
            }
            i += run;
            c += run;
            if c >= self.cols {
                c = 0;
                idx = if i < end { self.index(i) } else { idx };
            } else if !self.per_tensor {
                idx += 1;
            }
        }
        Ok(())
    }

    /// Bytes of scales read for `n` codes (about; for progress and plans).
    pub fn bytes_for(&self, n: u64) -> u64 {
        let per = if self.per_tensor { self.rows * self.cols } else { self.bm * self.bn };
        n.div_ceil(per.max(1)) * self.entry.dtype.size() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::dtype::f8_e4m3_to_f32;

    const E2M1: [f32; 16] =
        [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0];

    /// A one-file checkpoint of packed FP4 codes `[4, 64]` (two a byte) and E4M3 scales per 16.
    fn fp4_file(codes: &[u8], scales: &[u8]) -> Arc<SafeFile> {
        let dir = std::env::temp_dir().join(format!("mergex-quant-test-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("fp4.safetensors");
        let packed: Vec<u8> = codes.chunks(2).map(|p| p[0] | (p[1] << 4)).collect();
        let header = format!(
            r#"{{"w":{{"dtype":"U8","shape":[4,32],"data_offsets":[0,{}]}},"s":{{"dtype":"F8_E4M3","shape":[4,4],"data_offsets":[{},{}]}}}}"#,
            packed.len(),
            packed.len(),
            packed.len() + scales.len()
        );
        let mut h = header.into_bytes();
        h.resize(h.len().div_ceil(8) * 8, b' ');
        let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
        bytes.extend(h);
        bytes.extend(&packed);
        bytes.extend(scales);
        let _ = std::fs::write(&path, bytes);
        Arc::new(SafeFile::open(&path).unwrap_or_else(|e| unreachable!("{e}")))
    }

    #[test]
    fn fp4_ranges_decode_at_any_start() {
        let codes: Vec<u8> = (0..256u32).map(|i| ((i * 7 + 3) % 16) as u8).collect();
        let scales: Vec<u8> = (0..16u8).map(|i| 0x30 + i).collect();
        let file = fp4_file(&codes, &scales);
        let (w, s) = (file.tensor("w").cloned(), file.tensor("s").cloned());
        let (Some(w), Some(s)) = (w, s) else { unreachable!("both tensors are in the file") };
        let global = Some((4.0f32, true));
        let q = Scales::new(Path::new("m"), &w, file.clone(), s, Some([1, 16]), Some(Packed::Fp4), global)
            .unwrap_or_else(|e| unreachable!("{e}"));
        let want = |i: usize| E2M1[codes[i] as usize] * (f8_e4m3_to_f32(scales[i / 16]) / 4.0);
        for (start, n) in [(0usize, 256usize), (1, 100), (17, 31), (63, 2), (255, 1)] {
            let (b, e) = (start / 2, (start + n).div_ceil(2));
            let mut raw = vec![0u8; e - b];
            file.read_at(&w, b as u64, &mut raw).unwrap_or_else(|e| unreachable!("{e}"));
            let mut out = vec![0f32; n];
            let times = |c: &[u8], s: f32, _zp: i32, o: &mut [f32]| {
                for (o, &q) in o.iter_mut().zip(c) {
                    *o = E2M1[q as usize] * s;
                }
            };
            let pairs = |c: &[u8], s: f32, o: &mut [f32]| {
                for (k, o) in o.iter_mut().enumerate() {
                    let b = c[k / 2];
                    *o = E2M1[(if k % 2 == 0 { b & 0xf } else { b >> 4 }) as usize] * s;
                }
            };
            q.decode(start as u64, &raw, &mut out, times, pairs).unwrap_or_else(|e| unreachable!("{e}"));
            for (k, v) in out.iter().enumerate() {
                assert_eq!(v.to_bits(), want(start + k).to_bits(), "start {start}, element {k}");
            }
        }
    }
}
