//! Writing merged values back in a quantized format (QUANT.md §3–§7): the base model's
//! codes, block scales, global scale and zero points, from the f32 values of whole rows.
//!
//! A chunk is a range of whole rows whose first row starts a block of every kind the
//! format has (block FP8 rows, zero-point words), so each block is encoded from its own
//! values only and the output does not depend on how the tensor was cut. Scales that
//! depend on the whole tensor (per-tensor FP8, NVFP4 globals) come from an amax the engine
//! computes first.

use half::f16;

mod codes;
mod element;

pub use element::{e2m1, e4m3, minifloat};
use element::{pow2_at_least, pow2_byte};

use crate::error::{Error, Result};
use crate::format::dtype::{bf16_to_f32, e8m0_to_f32, f32_to_bf16, f8_e4m3_to_f32, Dtype};
use crate::format::writer::OutTensor;
use crate::job::{Companion, Encode};

/// Element types of quantized codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Element {
    /// 8-bit float codes (E4M3 or E5M2), one a byte.
    F8(Dtype),
    /// FP4 (E2M1) codes, two a byte, the even element in the low nibble.
    Fp4,
    /// Integers of this many bits, stored `q + 2^(b−1)` in little-endian `I32` words.
    Int(u8),
}

impl Element {
    /// The largest finite magnitude.
    fn max(self) -> f32 {
        match self {
            Element::F8(Dtype::F8_E5M2) => 57344.0,
            Element::F8(_) => 448.0,
            Element::Fp4 => 6.0,
            Element::Int(b) => ((1i32 << (b - 1)) - 1) as f32,
        }
    }
}

/// How a block's scale is chosen (QUANT.md §3–§6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    /// `s = amax / max` (block FP8, compressed-tensors FP8, ModelOpt FP8); zero block → 1.
    Amax,
    /// `s = 2^e`, the smallest with `amax ≤ max · 2^e` (`scale_fmt: ue8m0`); zero block → 1.
    Ue8m0,
    /// MX: scale byte `clamp(127 + e, 0, 254)`, `e` as for `Ue8m0`; zero group → byte 0.
    Mx,
    /// compressed-tensors NVFP4: E4M3 block scales over a global divisor.
    Nvfp4,
    /// ModelOpt NVFP4: E4M3 block scales times a global multiplier (`weight_scale_2`).
    Nvfp4Modelopt,
    /// Symmetric integers: `s = amax / (2^(b−1) − 1)`.
    Int,
    /// Asymmetric integers with zero points.
    IntAsym,
}

/// The encoded bytes of one chunk and where each part goes, in bytes from the start of its
/// tensor: the codes, the block scales and (asymmetric integers) the zero points.
#[derive(Debug, Default)]
pub struct Encoded {
    /// Codes of the chunk's rows.
    pub codes: Vec<u8>,
    /// Their offset in the codes tensor.
    pub codes_at: u64,
    /// Scales of the chunk's blocks (empty for a per-tensor scale).
    pub scales: Vec<u8>,
    /// Their offset in the scale tensor.
    pub scales_at: u64,
    /// Zero points of the chunk's rows (packed down the rows).
    pub zeros: Vec<u8>,
    /// Their offset in the zero-point tensor.
    pub zeros_at: u64,
    /// A transposed weight's values in stored order.
    stored: Vec<f32>,
}

/// How one output tensor is quantized.
#[derive(Debug, Clone)]
pub struct Encoder {
    /// The codes' tensor name, for errors.
    name: String,
    element: Element,
    rule: Rule,
    scale_dtype: Dtype,
    /// Rows and columns of one block; `None`: one scale for the whole tensor.
    block: Option<[u64; 2]>,
    /// Rows and columns of each matrix (the last two axes; 1-D tensors are one row).
    rows: u64,
    cols: u64,
    /// Blocks per matrix along the rows and the columns.
    grid_rows: u64,
    grid_cols: u64,
    /// gpt-oss: the codes store each matrix transposed; `rows` and `cols` are then the
    /// stored ones (`N`, `K` of the weight `[E, K, N]`).
    transposed: bool,
    /// Where the one-value tensors go among the companions: the per-tensor scale, the
    /// global scale.
    scalar_scale: bool,
    global: bool,
    /// The zero points' companion index, when there are zero points.
    zero_point: bool,
}

/// Position of each companion among an encoded tensor's outputs (after the codes).
pub const SCALE: usize = 1;

fn bad(name: &str, message: String) -> Error {
    Error::job("tensors", format!("tensor '{name}': {message}"))
}

impl Encoder {
    /// The encoder of the tensor `name` of logical `shape`, written as codes of `codes`
    /// dtype with `enc`'s companions; returns it with the output tensors it writes, the
    /// codes first, then the scale, the global scale and the zero points.
    pub fn new(name: &str, shape: &[u64], codes: Dtype, enc: &Encode) -> Result<(Encoder, Vec<OutTensor>)> {
        let rule = match enc.rule.as_str() {
            "amax" => Rule::Amax,
            "ue8m0" => Rule::Ue8m0,
            "mx" => Rule::Mx,
            "nvfp4" => Rule::Nvfp4,
            "nvfp4_modelopt" => Rule::Nvfp4Modelopt,
            "int" => Rule::Int,
            "int_asym" => Rule::IntAsym,
            other => return Err(bad(name, format!("unknown quantization rule '{other}'"))),
        };
        let element = match (codes, rule, enc.bits) {
            (Dtype::F8_E4M3 | Dtype::F8_E5M2, Rule::Amax | Rule::Ue8m0 | Rule::Mx, None) => {
                Element::F8(codes)
            }
            (Dtype::U8, Rule::Mx | Rule::Nvfp4 | Rule::Nvfp4Modelopt, None) => Element::Fp4,
            (Dtype::I32, Rule::Int | Rule::IntAsym, Some(b @ (4 | 8))) => Element::Int(b),
            _ => {
                return Err(bad(
                    name,
                    format!(
                        "codes of {} cannot follow rule '{}' (bits {:?})",
                        codes.name(),
                        enc.rule,
                        enc.bits
                    ),
                ))
            }
        };
        let (rows, cols) = match (shape, enc.transposed) {
            ([.., k, n], true) if shape.len() == 3 && rule == Rule::Mx && element == Element::Fp4 => (*n, *k),
            (_, true) => {
                return Err(bad(name, "only gpt-oss MXFP4 expert stacks are stored transposed".into()))
            }
            ([], _) => (1, 1),
            ([c], _) => (1, *c),
            ([.., r, c], _) => (*r, *c),
        };
        let matrices = if shape.len() > 2 { shape[..shape.len() - 2].iter().product() } else { 1 };
        if let Some([bm, bn]) = enc.block {
            if bm == 0 || bn == 0 {
                return Err(bad(name, "a block needs positive rows and columns".into()));
            }
        }
        let grouped = matches!(element, Element::Fp4 | Element::Int(_)) || rule == Rule::Mx;
        if grouped && !matches!(enc.block, Some([1, g]) if cols % g == 0 && g % 2 == 0) {
            return Err(bad(
                name,
                format!("{:?} needs groups of an even number of columns dividing {cols}", enc.block),
            ));
        }
        let (grid_rows, grid_cols) = match enc.block {
            Some([bm, bn]) => (rows.div_ceil(bm), cols.div_ceil(bn)),
            None => (1, 1),
        };
        let scale_dtype = Dtype::from_name(&enc.scale.dtype)
            .ok_or_else(|| bad(name, format!("unknown scale dtype '{}'", enc.scale.dtype)))?;
        let allowed = match rule {
            Rule::Amax | Rule::Int | Rule::IntAsym => {
                matches!(scale_dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16)
            }
            Rule::Ue8m0 => matches!(scale_dtype, Dtype::F32 | Dtype::F8_E8M0 | Dtype::U8),
            Rule::Mx => matches!(scale_dtype, Dtype::F8_E8M0 | Dtype::U8),
            Rule::Nvfp4 | Rule::Nvfp4Modelopt => scale_dtype == Dtype::F8_E4M3,
        };
        if !allowed {
            return Err(bad(
                name,
                format!("scales of {} cannot follow rule '{}'", scale_dtype.name(), enc.rule),
            ));
        }
        let e = Encoder {
            name: name.to_string(),
            element,
            rule,
            scale_dtype,
            block: enc.block,
            rows,
            cols,
            grid_rows,
            grid_cols,
            scalar_scale: enc.block.is_none(),
            global: enc.global.is_some(),
            zero_point: enc.zero_point.is_some(),
            transposed: enc.transposed,
        };
        let mut outs = vec![OutTensor { name: name.to_string(), dtype: codes, shape: e.codes_shape(shape) }];
        let scales = if e.scalar_scale { 1 } else { matrices * grid_rows * grid_cols };
        outs.push(companion(name, &enc.scale, scales)?);
        let needs_global = matches!(rule, Rule::Nvfp4 | Rule::Nvfp4Modelopt);
        match (&enc.global, needs_global) {
            (Some(g), true) => {
                let out = companion(name, g, 1)?;
                if out.dtype != Dtype::F32 {
                    return Err(bad(name, format!("global scale {} must be F32", g.name)));
                }
                outs.push(out);
            }
            (None, false) => {}
            _ => return Err(bad(name, format!("rule '{}' and the global scale disagree", enc.rule))),
        }
        match (&enc.zero_point, element, rule) {
            (Some(z), Element::Int(b), Rule::IntAsym) => {
                let words = matrices * (rows * u64::from(b)).div_ceil(32) * grid_cols;
                let out = companion(name, z, words)?;
                if out.dtype != Dtype::I32 {
                    return Err(bad(name, format!("zero points {} must be I32", z.name)));
                }
                outs.push(out);
            }
            (None, _, r) if r != Rule::IntAsym => {}
            _ => return Err(bad(name, "asymmetric integers and zero points go together".into())),
        }
        if e.scalar_scale && !matches!(rule, Rule::Amax) {
            return Err(bad(name, format!("rule '{}' needs blocks", enc.rule)));
        }
        Ok((e, outs))
    }

    /// The shape of the codes tensor.
    fn codes_shape(&self, shape: &[u64]) -> Vec<u64> {
        if self.transposed {
            // gpt-oss blocks: [E, N, K/32, 16].
            let lead = &shape[..shape.len().saturating_sub(2)];
            return [lead, &[self.rows, self.cols / 32, 16]].concat();
        }
        let mut s = shape.to_vec();
        if let Some(last) = s.last_mut() {
            *last = self.row_bytes() / self.element_bytes_divisor();
        }
        s
    }

    /// Bytes of one row of codes.
    fn row_bytes(&self) -> u64 {
        match self.element {
            Element::F8(_) => self.cols,
            Element::Fp4 => self.cols / 2,
            Element::Int(b) => (self.cols * u64::from(b)).div_ceil(32) * 4,
        }
    }

    /// Bytes of one code element of the codes tensor's dtype.
    fn element_bytes_divisor(&self) -> u64 {
        if matches!(self.element, Element::Int(_)) {
            4
        } else {
            1
        }
    }

    /// Chunks must be whole numbers of this many elements: whole rows, whole blocks of rows
    /// (block FP8) or of zero-point words, and, where a matrix of a stack ends inside such
    /// a block, whole matrices (QUANT.md §7).
    pub fn align(&self) -> u64 {
        if self.transposed {
            return self.rows * self.cols;
        }
        let rows = match (self.block, self.element, self.rule) {
            (_, Element::Int(b), Rule::IntAsym) => u64::from(32 / b),
            (Some([bm, _]), _, _) => bm,
            (None, _, _) => 1,
        };
        if self.rows.is_multiple_of(rows) {
            rows * self.cols
        } else {
            self.rows * self.cols
        }
    }

    /// Bytes of work space per element of a chunk: its f32 values (and, transposed, the
    /// same in stored order).
    pub fn bytes_per_elem(&self) -> u64 {
        if self.transposed {
            8
        } else {
            4
        }
    }

    /// Whether the scales need the merged tensor's amax first (a per-tensor scale or an
    /// NVFP4 global).
    pub fn needs_amax(&self) -> bool {
        self.scalar_scale || self.global
    }

    /// The one-value companions, from the amax of the merged tensor (or of its fusion
    /// group): `(companion index, bytes)`.
    pub fn scalars(&self, amax: f32) -> Result<Vec<(usize, Vec<u8>)>> {
        let mut out = Vec::new();
        if self.scalar_scale {
            let (_, bytes) = self.store(self.scale_for(amax))?;
            out.push((SCALE, bytes));
        }
        if self.global {
            out.push((SCALE + 1, self.global_value(amax).to_le_bytes().to_vec()));
        }
        Ok(out)
    }

    /// The global scale from the amax: the divisor `2688 · (1/amax)` (compressed-tensors,
    /// two f32 roundings) or the multiplier `amax / 2688` (ModelOpt); 1 for a zero amax.
    fn global_value(&self, amax: f32) -> f32 {
        if amax == 0.0 {
            return 1.0;
        }
        match self.rule {
            Rule::Nvfp4 => (1.0 / amax) * 2688.0,
            _ => amax / 2688.0,
        }
    }

    /// `s = amax / max`, 1 for a zero block.
    fn scale_for(&self, amax: f32) -> f32 {
        if amax == 0.0 {
            1.0
        } else {
            amax / self.element.max()
        }
    }

    /// A scale rounded to the scale container (RNE), as a value and as stored bytes. A
    /// positive scale that underflows becomes the container's smallest positive value.
    fn store(&self, s: f32) -> Result<(f32, Vec<u8>)> {
        let (v, bytes) = match self.scale_dtype {
            Dtype::BF16 => {
                let mut b = f32_to_bf16(s);
                if b == 0 && s > 0.0 {
                    b = 1;
                }
                (bf16_to_f32(b), b.to_le_bytes().to_vec())
            }
            Dtype::F16 => {
                let mut h = f16::from_f32(s);
                if h.to_bits() == 0 && s > 0.0 {
                    h = f16::from_bits(1);
                }
                (h.to_f32(), h.to_bits().to_le_bytes().to_vec())
            }
            Dtype::F8_E8M0 | Dtype::U8 => {
                let b = pow2_byte(s);
                (e8m0_to_f32(b), vec![b])
            }
            _ => (s, s.to_le_bytes().to_vec()),
        };
        if !(v.is_finite() && v > 0.0) {
            return Err(bad(&self.name, format!("the scale {s} does not fit {}", self.scale_dtype.name())));
        }
        Ok((v, bytes))
    }

    /// Encode the merged values of whole rows starting at element `start` into `out`;
    /// `amax` is the tensor's (or its fusion group's) when [`Encoder::needs_amax`].
    pub fn encode(&self, start: u64, values: &[f32], amax: Option<f32>, out: &mut Encoded) -> Result<()> {
        let finite = values.iter().fold(true, |ok, v| ok & v.is_finite());
        if let Some(k) = (!finite).then(|| values.iter().position(|v| !v.is_finite())).flatten() {
            return Err(Error::Degenerate {
                tensor: self.name.clone(),
                message: format!(
                    "merged value at index {} is {}; it cannot be quantized",
                    start + k as u64,
                    values[k]
                ),
            });
        }
        if self.transposed {
            // Whole matrices (chunks hold whole experts): encode them in stored order.
            let (k, n) = (self.cols as usize, self.rows as usize);
            if !start.is_multiple_of((k * n) as u64) || !values.len().is_multiple_of((k * n).max(1)) {
                return Err(bad(&self.name, format!("chunk {start}+{} is not whole experts", values.len())));
            }
            let mut stored = std::mem::take(&mut out.stored);
            stored.resize(values.len(), 0.0);
            for (src, dst) in values.chunks_exact(k * n).zip(stored.chunks_exact_mut(k * n)) {
                for (kk, row) in src.chunks_exact(n).enumerate() {
                    for (nn, &v) in row.iter().enumerate() {
                        dst[nn * k + kk] = v;
                    }
                }
            }
            let done = self.encode_rows(start, &stored, amax, out);
            out.stored = stored;
            return done;
        }
        self.encode_rows(start, values, amax, out)
    }

    /// [`Encoder::encode`] of values in stored order.
    fn encode_rows(&self, start: u64, values: &[f32], amax: Option<f32>, out: &mut Encoded) -> Result<()> {
        let (cols, len) = (self.cols, values.len() as u64);
        if !start.is_multiple_of(cols) || !len.is_multiple_of(cols) {
            return Err(bad(&self.name, format!("chunk {start}+{len} is not whole rows")));
        }
        let (r0, nrows) = (start / cols, len / cols);
        out.codes.clear();
        out.codes.resize((nrows * self.row_bytes()) as usize, 0);
        out.codes_at = r0 * self.row_bytes();
        out.scales.clear();
        out.zeros.clear();
        let global = match (self.needs_amax(), amax) {
            (true, Some(a)) => Some(a),
            (true, None) => return Err(bad(&self.name, "the amax of the merged tensor is missing".into())),
            (false, _) => None,
        };
        let Some([bm, bn]) = self.block else {
            let (s, _) = self.store(self.scale_for(global.unwrap_or(0.0)))?;
            for (r, row) in values.chunks_exact(cols as usize).enumerate() {
                self.put_row(out, r, 0, row, s, 0);
            }
            return Ok(());
        };
        let ssize = self.scale_dtype.size() as u64;
        let first = self.scale_index(r0);
        out.scales_at = first * ssize;
        if self.zero_point {
            let (zr, last) = (self.zero_row(r0), self.zero_row(r0 + nrows - 1));
            out.zeros.resize(((last + 1 - zr) * self.grid_cols * 4) as usize, 0);
            out.zeros_at = zr * self.grid_cols * 4;
        }
        let g = self.global.then(|| self.global_value(global.unwrap_or(0.0)));
        let mut r = r0;
        while r < r0 + nrows {
            let rin = r % self.rows;
            if !rin.is_multiple_of(bm) {
                return Err(bad(&self.name, format!("chunk at row {r} starts inside a block of {bm} rows")));
            }
            let h = bm.min(self.rows - rin).min(r0 + nrows - r);
            for c0 in (0..cols).step_by(bn as usize) {
                let w = bn.min(cols - c0);
                let at = |i: u64| ((r - r0 + i) * cols + c0) as usize;
                let block = (0..h).map(|i| &values[at(i)..at(i) + w as usize]);
                // The values are finite (checked above): plain comparisons, which vectorize.
                let (mut lo, mut hi, mut amax) = (0f32, 0f32, 0f32);
                for row in block.clone() {
                    if self.zero_point {
                        for &v in row {
                            lo = if v < lo { v } else { lo };
                            hi = if v > hi { v } else { hi };
                        }
                    }
                    amax = row.iter().fold(amax, |a, v| if v.abs() > a { v.abs() } else { a });
                }
                amax = if self.zero_point { hi.max(-lo) } else { amax };
                let (s, zp, bytes) = self.block_scale(amax, lo, hi, g)?;
                out.scales.extend_from_slice(&bytes);
                if self.zero_point {
                    self.put_zero_points(out, r, h, c0 / bn, zp);
                }
                for (i, row) in block.enumerate() {
                    self.put_row(out, (r - r0) as usize + i, c0 as usize, row, s, zp);
                }
            }
            r += h;
        }
        debug_assert_eq!(
            out.scales.len() as u64,
            (self.scale_index(r0 + nrows - 1) / self.grid_cols + 1).saturating_sub(first / self.grid_cols)
                * self.grid_cols
                * ssize
        );
        Ok(())
    }

    /// The flat index of the first scale of row `r` (flat over the stack's matrices).
    fn scale_index(&self, r: u64) -> u64 {
        let bm = self.block.map_or(self.rows, |b| b[0]);
        (r / self.rows) * self.grid_rows * self.grid_cols + (r % self.rows) / bm * self.grid_cols
    }

    /// The word row of row `r`'s zero points (flat over the stack's matrices).
    fn zero_row(&self, r: u64) -> u64 {
        let Element::Int(b) = self.element else { return 0 };
        let per = (self.rows * u64::from(b)).div_ceil(32);
        (r / self.rows) * per + (r % self.rows) * u64::from(b) / 32
    }

    /// A block's scale (the value codes are divided by), zero point and stored scale bytes.
    fn block_scale(&self, amax: f32, lo: f32, hi: f32, global: Option<f32>) -> Result<(f32, i32, Vec<u8>)> {
        Ok(match self.rule {
            Rule::Amax | Rule::Int => {
                let (s, bytes) = self.store(self.scale_for(amax))?;
                (s, 0, bytes)
            }
            Rule::Ue8m0 => {
                let s = if amax == 0.0 { 1.0 } else { pow2_at_least(amax, self.element.max()) };
                let (s, bytes) = self.store(s)?;
                (s, 0, bytes)
            }
            Rule::Mx => {
                let b = if amax == 0.0 { 0 } else { pow2_byte(pow2_at_least(amax, self.element.max())) };
                (e8m0_to_f32(b), 0, vec![b])
            }
            Rule::Nvfp4 => {
                let g = global.unwrap_or(1.0);
                let mut code = e4m3(g * (amax / 6.0));
                if code & 0x7f == 0 {
                    code = 0x20; // E4M3's eps, 0.125
                }
                (f8_e4m3_to_f32(code) / g, 0, vec![code])
            }
            Rule::Nvfp4Modelopt => {
                let w2 = global.unwrap_or(1.0);
                let mut v = amax / (6.0 * w2);
                if v == 0.0 {
                    v = 1.0;
                }
                let code = e4m3(v.clamp(1.0 / 512.0, 448.0));
                (f8_e4m3_to_f32(code) * w2, 0, vec![code])
            }
            Rule::IntAsym => {
                let Element::Int(b) = self.element else { return Err(bad(&self.name, "no bits".into())) };
                if lo == 0.0 && hi == 0.0 {
                    let (s, bytes) = self.store(1.0)?;
                    return Ok((s, 0, bytes));
                }
                let levels = ((1u32 << b) - 1) as f32;
                let (s, bytes) = self.store((hi - lo) / levels)?;
                let (qlo, qhi) = (-(1i32 << (b - 1)), (1i32 << (b - 1)) - 1);
                let zp = (qlo as f32 - lo / s).round_ties_even().clamp(qlo as f32, qhi as f32) as i32;
                (s, zp, bytes)
            }
        })
    }
}

/// A companion output tensor, checked to hold `numel` values.
fn companion(name: &str, c: &Companion, numel: u64) -> Result<OutTensor> {
    let dtype = Dtype::from_name(&c.dtype)
        .ok_or_else(|| bad(name, format!("{}: unknown dtype '{}'", c.name, c.dtype)))?;
    if c.shape.iter().product::<u64>() != numel {
        return Err(bad(name, format!("{} of shape {:?} should hold {numel} values", c.name, c.shape)));
    }
    Ok(OutTensor { name: c.name.clone(), dtype, shape: c.shape.clone() })
}
