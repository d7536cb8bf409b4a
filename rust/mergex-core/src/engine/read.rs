//! Reading element ranges of an input tensor as stored: the engine decodes them, or hands the
//! bytes to kernels that read them undecoded.

use std::path::Path;
use std::sync::Arc;

use super::adapter::Lora;
use crate::error::{Error, Result};
use crate::format::dtype::Dtype;
use crate::format::file::SafeFile;
use crate::format::gptoss::Transposed;
use crate::format::header::TensorEntry;
use crate::format::quant::{Packed, Scales};

/// An input tensor seen through the output tensor's shape: the whole tensor, or (for
/// embeddings of padded vocabularies) its top-left block.
#[derive(Debug, Clone)]
pub struct View {
    /// The file holding the tensor.
    pub file: Arc<SafeFile>,
    /// The tensor.
    pub entry: TensorEntry,
    /// Columns of the input (last axis), when it is cut to a narrower block.
    in_cols: u64,
    /// Columns of the output block; 0 when the view is the whole tensor, contiguous.
    out_cols: u64,
    /// The scales of a quantized weight: the reader hands out its decoded f32 values.
    scales: Option<Scales>,
    /// Bits per element of packed codes (element `i` in bits `i·b .. (i+1)·b` of the
    /// tensor's data, little-endian); 0 when each element has its own dtype-sized slot.
    packed: u64,
    /// A gpt-oss MXFP4 weight, read as the transpose of its stored blocks.
    transposed: Option<Transposed>,
    /// A LoRA adapter added to the values read (as f32).
    lora: Option<Lora>,
    /// A vocabulary-indexed tensor gathered row by row from other views.
    rows: Option<Arc<Rows>>,
    /// Values computed from other inputs as they are read (a fused recipe stage's output):
    /// `file` and `entry` are then the stage's output as laid out, never read.
    computed: Option<Arc<dyn Computed>>,
}

/// Values an input computes instead of reading them from its file (f32, exactly the values
/// its file would hold).
pub trait Computed: std::fmt::Debug + Send + Sync {
    /// Elements `[start, start + values.len())`.
    fn read(&self, start: u64, values: &mut [f32]) -> Result<()>;
    /// Bytes of input files read for `len` elements.
    fn bytes_for(&self, len: u64) -> u64;
    /// Identifies the computation (sweeps compare inputs by it).
    fn describe(&self) -> String;
}

impl View {
    /// Whether `other` reads the same values: the same tensor of the same file, cut alike,
    /// with the same adapter (a sweep reads its members' inputs through one of them).
    pub(crate) fn same_source(&self, other: &View) -> bool {
        fn lora(v: &View) -> Option<(&Path, &str, &str, u64)> {
            v.lora.as_ref().map(|l| l.source())
        }
        self.file.path() == other.file.path()
            && self.entry.name == other.entry.name
            && (self.in_cols, self.out_cols, self.packed) == (other.in_cols, other.out_cols, other.packed)
            && lora(self) == lora(other)
            && self.rows.is_some() == other.rows.is_some()
            && self.computed.as_ref().map(|c| c.describe()) == other.computed.as_ref().map(|c| c.describe())
    }

    /// The whole tensor `entry`, as stored.
    fn whole(file: Arc<SafeFile>, entry: TensorEntry) -> View {
        View {
            file,
            entry,
            in_cols: 0,
            out_cols: 0,
            scales: None,
            packed: 0,
            transposed: None,
            lora: None,
            rows: None,
            computed: None,
        }
    }

    /// `entry` of `file` (laid out, never read) with values `computed` as they are read.
    pub fn computed(file: Arc<SafeFile>, entry: TensorEntry, computed: Arc<dyn Computed>) -> View {
        View { computed: Some(computed), ..View::whole(file, entry) }
    }

    /// A view of `entry` as a tensor of `shape`; `None` when `shape` is neither the
    /// tensor's own nor (2-D) a top-left block of it.
    pub fn new(file: Arc<SafeFile>, entry: TensorEntry, shape: &[u64]) -> Option<View> {
        if entry.shape == shape {
            return Some(View::whole(file, entry));
        }
        match (entry.shape.as_slice(), shape) {
            ([r, c], [ro, co]) if ro <= r && co <= c => {
                let (in_cols, out_cols) = if co == c { (0, 0) } else { (*c, *co) };
                Some(View { in_cols, out_cols, ..View::whole(file, entry) })
            }
            _ => None,
        }
    }

    /// A view of packed codes (`bits` a element along the last axis: FP4 in `U8`, integers in
    /// `I32` words) as the weight of `shape` they encode; `None` unless the codes' rows hold
    /// exactly the shape's last axis.
    pub fn packed(file: Arc<SafeFile>, entry: TensorEntry, shape: &[u64], bits: u64) -> Option<View> {
        let (last, lead) = shape.split_last()?;
        let (codes_last, codes_lead) = entry.shape.split_last()?;
        let fits = codes_lead == lead && codes_last * entry.dtype.size() as u64 * 8 == last * bits;
        fits.then(|| View { packed: bits, ..View::whole(file, entry) })
    }

    /// The plain transpose of a gpt-oss MXFP4 weight (`entry` its blocks).
    pub fn transposed(file: Arc<SafeFile>, entry: TensorEntry, t: Transposed) -> View {
        View { transposed: Some(t), ..View::whole(file, entry) }
    }

    /// The gpt-oss weight this view reads, if it is one.
    pub fn gpt_oss(&self) -> Option<&Transposed> {
        self.transposed.as_ref()
    }

    /// The same view reading a quantized weight: its codes decoded with `scales`.
    pub fn with_scales(mut self, scales: Scales) -> View {
        self.scales = Some(scales);
        self
    }

    /// A vocabulary-indexed tensor gathered by `rows` (its file and entry name the first
    /// source, for messages); `None` when `rows` has no source.
    pub fn gathered(rows: Rows) -> Option<View> {
        let first = rows.first()?;
        let (file, entry) = (first.file.clone(), first.entry.clone());
        Some(View { rows: Some(Arc::new(rows)), ..View::whole(file, entry) })
    }

    /// The same view with a LoRA adapter added to its values.
    pub fn with_lora(mut self, lora: Lora) -> View {
        self.lora = Some(lora);
        self
    }

    /// Whether the view's values are decoded from stored codes (a quantized weight).
    pub fn is_quantized(&self) -> bool {
        self.scales.is_some() || self.transposed.is_some()
    }

    /// Bytes of the per-thread buffers one reading thread holds for this view, beyond its
    /// sub-block (a LoRA adapter's factors).
    pub fn buffer_bytes(&self, sub_block: u64) -> u64 {
        self.lora.as_ref().map_or(0, |l| l.buffer_bytes(sub_block))
            + self.rows.as_ref().map_or(0, |r| r.buffer_bytes())
    }

    /// The dtype of what [`View::read_raw`] hands out: the stored one, or F32 for a
    /// quantized weight (decoded in the reader) or a weight with a LoRA adapter.
    pub fn dtype(&self) -> Dtype {
        if self.lora.is_some() || self.rows.is_some() || self.computed.is_some() {
            return Dtype::F32;
        }
        self.values_dtype()
    }

    /// [`View::dtype`] without the adapter.
    fn values_dtype(&self) -> Dtype {
        if self.scales.is_some() || self.transposed.is_some() {
            Dtype::F32
        } else {
            self.entry.dtype
        }
    }

    /// Stored bytes per element.
    fn elem(&self) -> u64 {
        self.entry.dtype.size() as u64
    }

    /// Runs of contiguous source elements `(src_start, out_offset, len)` covering output
    /// elements `[start, start+len)`.
    fn runs(&self, start: u64, len: u64, mut f: impl FnMut(u64, usize, u64) -> Result<()>) -> Result<()> {
        if self.out_cols == 0 {
            return f(start, 0, len);
        }
        let (mut j, end) = (start, start + len);
        while j < end {
            let (r, c) = (j / self.out_cols, j % self.out_cols);
            let seg = (self.out_cols - c).min(end - j);
            f(r * self.in_cols + c, (j - start) as usize, seg)?;
            j += seg;
        }
        Ok(())
    }

    /// Copy the stored bytes of output elements `[start, start + n)` into `out` (`n` times
    /// the element size), undecoded; a block view's rows land at their output places.
    pub fn read_raw(&self, start: u64, out: &mut [u8]) -> Result<()> {
        if let Some(rows) = &self.rows {
            return with_f32s(out, |values| rows.read(start, values));
        }
        if let Some(c) = &self.computed {
            return with_f32s(out, |values| c.read(start, values));
        }
        let Some(lora) = &self.lora else { return self.read_values(start, out) };
        with_f32s(out, |values| {
            let dtype = self.values_dtype();
            let mut raw = vec![0u8; values.len() * dtype.size()];
            self.read_values(start, &mut raw)?;
            crate::kernels::dispatch::decode(dtype, &raw, values);
            self.runs(start, values.len() as u64, |src, o, n| {
                lora.add(src, values.get_mut(o..o + n as usize).unwrap_or_default())
            })
        })
    }

    /// [`View::read_raw`] without the adapter.
    fn read_values(&self, start: u64, out: &mut [u8]) -> Result<()> {
        if let Some(scales) = &self.scales {
            return self.read_decoded(scales, start, out);
        }
        if let Some(t) = &self.transposed {
            return with_f32s(out, |values| t.decode(start, values));
        }
        let sz = self.elem();
        self.runs(start, out.len() as u64 / sz, |src, o, n| {
            let (b, e) = (o * sz as usize, (o + n as usize) * sz as usize);
            self.file.read_at(&self.entry, src * sz, out.get_mut(b..e).unwrap_or_default())
        })
    }

    /// A quantized weight's elements `[start, start + n)` decoded, as f32 little-endian
    /// bytes (`out` holds `n` of them).
    fn read_decoded(&self, scales: &Scales, start: u64, out: &mut [u8]) -> Result<()> {
        let n = out.len() / 4;
        let (dtype, packed) = (scales.codes_dtype(), scales.packed());
        let times = |c: &[u8], s: f32, zp: i32, o: &mut [f32]| match packed {
            Some(Packed::Fp4) => crate::kernels::real::fp4_times(c, s, o),
            Some(Packed::Int(bits)) => crate::kernels::real::int_times(c, bits, zp, s, o),
            None => crate::kernels::dispatch::f8_times(dtype, c, s, o),
        };
        let pairs = crate::kernels::dispatch::fp4_pairs_times;
        let decode = |values: &mut [f32]| {
            if self.packed > 0 {
                // One run (packed views are whole tensors): the bytes holding the elements.
                let (b, e) = self.span(start, n as u64);
                return with_codes((e - b) as usize, |codes| {
                    self.file.read_at(&self.entry, b, codes)?;
                    scales.decode(start, codes, values, times, pairs)
                });
            }
            with_codes(n, |codes| {
                self.runs(start, n as u64, |src, o, len| {
                    let (b, e) = (o, o + len as usize);
                    let codes = codes.get_mut(b..e).unwrap_or_default();
                    self.file.read_at(&self.entry, src, codes)?;
                    scales.decode(src, codes, values.get_mut(b..e).unwrap_or_default(), times, pairs)
                })
            })
        };
        with_f32s(out, decode)
    }

    /// The raw bytes of output elements `[start, start+len)` (contiguous views only).
    pub fn raw(&self, start: u64, len: u64) -> Result<&[u8]> {
        let sz = self.elem();
        self.file.bytes(&self.entry, start * sz, (start + len) * sz)
    }

    /// Source byte span (relative to the tensor) that output elements `[start, start+len)` touch.
    fn span(&self, start: u64, len: u64) -> (u64, u64) {
        if let Some(t) = &self.transposed {
            return t.span(start, len);
        }
        if self.packed > 0 {
            return (start * self.packed / 8, ((start + len) * self.packed).div_ceil(8));
        }
        let sz = self.elem();
        if self.out_cols == 0 || len == 0 {
            return (start * sz, (start + len) * sz);
        }
        let last = start + len - 1;
        let src = |j: u64| (j / self.out_cols) * self.in_cols + j % self.out_cols;
        (src(start) * sz, (src(last) + 1) * sz)
    }

    /// Bytes read for output elements `[start, start+len)`.
    pub fn bytes_for(&self, len: u64) -> u64 {
        if let Some(rows) = &self.rows {
            return rows.bytes_for(len);
        }
        if let Some(c) = &self.computed {
            return c.bytes_for(len);
        }
        let adapter = self.lora.as_ref().map_or(0, |l| l.bytes_for(len));
        if let Some(t) = &self.transposed {
            return t.bytes_for(len) + adapter;
        }
        let codes = if self.packed > 0 { (len * self.packed).div_ceil(8) } else { len * self.elem() };
        codes + self.scales.as_ref().map_or(0, |s| s.bytes_for(len)) + adapter
    }

    /// Ask the kernel to start reading output elements `[start, start+len)` from disk now
    /// (a chunk is announced whole before it is read piece by piece, so cold reads are
    /// large and queued deep while the merge works through the first pieces).
    pub fn will_need(&self, start: u64, len: u64) {
        if self.rows.is_some() || self.computed.is_some() {
            return;
        }
        let (b, e) = self.span(start, len);
        self.file.will_need(&self.entry, b, e);
    }

    /// [`View::will_need`] for element ranges `(start, len)`, in ascending order, skipped
    /// when the first and the last are in the page cache already.
    pub fn will_need_all(&self, ranges: &[(u64, u64)]) {
        if self.rows.is_some() || self.computed.is_some() {
            return;
        }
        let spans: Vec<(u64, u64)> = ranges.iter().map(|&(start, len)| self.span(start, len)).collect();
        self.file.will_need_all(&self.entry, &spans);
    }

    /// Release the mapped pages behind output elements `[start, start+len)` (after
    /// [`View::raw`]).
    pub fn release(&self, start: u64, len: u64) {
        if self.rows.is_some() || self.computed.is_some() {
            return;
        }
        let (b, e) = self.span(start, len);
        self.file.release(&self.entry, b, e);
    }
}

/// Run `fill` on `out` (little-endian f32 bytes) seen as f32 values: in place when aligned,
/// else through a buffer.
fn with_f32s(out: &mut [u8], fill: impl FnOnce(&mut [f32]) -> Result<()>) -> Result<()> {
    // SAFETY: every bit pattern is a valid f32, and `align_to_mut` only hands out the
    // aligned middle; on a little-endian machine those bytes are the values' encoding.
    let (head, values, tail) = unsafe { out.align_to_mut::<f32>() };
    if cfg!(target_endian = "little") && head.is_empty() && tail.is_empty() {
        return fill(values);
    }
    let mut values = vec![0f32; out.len() / 4];
    fill(&mut values)?;
    for (dst, v) in out.chunks_exact_mut(4).zip(&values) {
        dst.copy_from_slice(&v.to_le_bytes());
    }
    Ok(())
}

/// Drop the per-thread buffers of the inputs read during a chunk (gpt-oss experts, LoRA
/// factors).
pub fn release_thread() {
    crate::format::gptoss::release_thread();
    super::adapter::release_thread();
}

thread_local! {
    /// The codes of the range being decoded, kept from read to read on each thread (a fresh
    /// buffer a read cost an allocation and a page fault per 4 KiB).
    static CODES: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Run `f` with this thread's codes buffer, `n` bytes long.
fn with_codes<R>(n: usize, f: impl FnOnce(&mut [u8]) -> Result<R>) -> Result<R> {
    CODES.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            buf.resize(n, 0);
            f(&mut buf[..n])
        }
        // Not re-entered in practice; a fresh buffer if it ever is.
        Err(_) => f(&mut vec![0u8; n]),
    })
}

// --------------------------------------------------------------------------- row maps

// Vocabulary-indexed tensors read in the output vocabulary's order: output row `r` is a row
// of one of the source tensors (the model's own, another model's, or a row computed while
// planning), or zeros. A chunk of output rows reads the matching rows of each source only.
// The map is kept as runs of consecutive rows (a vocabulary in another order is a few runs
// a reordered block), found by binary search.

/// The row map of one input.
#[derive(Debug)]
pub struct Rows {
    sources: Vec<View>,
    /// Runs `(first output row, source or None for zeros, first source row)`, in order.
    runs: Vec<(u64, Option<usize>, u64)>,
    cols: u64,
}

impl Rows {
    /// The rows of a tensor of `shape` from `sources` (views of whole tensors, decoded as
    /// the reader decodes them) by `runs` (`[rows, source or -1 for zeros, first row]`).
    pub fn new(
        model: &Path,
        name: &str,
        sources: Vec<View>,
        runs: &[(u64, i64, u64)],
        shape: &[u64],
    ) -> Result<Rows> {
        let bad = |message: String| {
            Error::job("tensors", format!("{}: tensor '{name}': {message}", model.display()))
        };
        let (rows, cols) = match *shape {
            [r, c] => (r, c),
            [r] => (r, 1),
            _ => return Err(bad(format!("a row map needs a 1-D or 2-D tensor, not {shape:?}"))),
        };
        let mut source_rows = Vec::with_capacity(sources.len());
        for v in &sources {
            let s = &v.entry.shape;
            let fits = match (s.as_slice(), shape.len()) {
                ([_, c], 2) => *c == cols,
                ([_], 1) => true,
                _ => false,
            };
            if !fits || !v.dtype().is_float() {
                let (n, d) = (&v.entry.name, v.entry.dtype.name());
                return Err(bad(format!("row source '{n}' {s:?} {d} does not fit rows of {cols}")));
            }
            source_rows.push(s.first().copied().unwrap_or(0));
        }
        let mut out = Vec::with_capacity(runs.len());
        let mut at = 0u64;
        for &(n, source, first) in runs {
            let source = usize::try_from(source).ok();
            if let Some(s) = source {
                if source_rows.get(s).is_none_or(|&m| first.checked_add(n).is_none_or(|end| end > m)) {
                    return Err(bad(format!("output rows {at}..{} map past the rows of source {s}", at + n)));
                }
            }
            out.push((at, source, first));
            at = at.saturating_add(n);
        }
        if at != rows {
            return Err(bad(format!("the row map covers {at} rows, the tensor has {rows}")));
        }
        Ok(Rows { sources, runs: out, cols })
    }

    /// The first source.
    pub fn first(&self) -> Option<&View> {
        self.sources.first()
    }

    /// Bytes held besides the sub-block buffers: the runs.
    pub fn buffer_bytes(&self) -> u64 {
        (self.runs.len() * std::mem::size_of::<(u64, Option<usize>, u64)>()) as u64
    }

    /// Bytes read for `len` output elements (at most the widest source's).
    pub fn bytes_for(&self, len: u64) -> u64 {
        let widest = self.sources.iter().map(|v| v.bytes_for(self.cols)).max().unwrap_or(0);
        len.div_ceil(self.cols.max(1)) * widest
    }

    /// Output elements `[start, start + values.len())` as f32.
    pub fn read(&self, start: u64, values: &mut [f32]) -> Result<()> {
        let n = values.len() as u64;
        let mut raw = Vec::new();
        let mut at = 0u64;
        while at < n {
            let (row, col) = ((start + at) / self.cols, (start + at) % self.cols);
            let len = (self.cols - col).min(n - at);
            let out = &mut values[at as usize..(at + len) as usize];
            // The run holding `row`: the last one starting at or before it.
            let k = self.runs.partition_point(|r| r.0 <= row).saturating_sub(1);
            let (first_out, source, first_src) = self.runs.get(k).copied().unwrap_or((0, None, 0));
            match source.and_then(|s| self.sources.get(s)) {
                None => out.fill(0.0),
                Some(v) => {
                    let src_row = first_src + (row - first_out);
                    let dtype = v.dtype();
                    raw.resize(len as usize * dtype.size(), 0);
                    v.read_raw(src_row * self.cols + col, &mut raw)?;
                    crate::kernels::dispatch::decode(dtype, &raw, out);
                }
            }
            at += len;
        }
        Ok(())
    }
}
