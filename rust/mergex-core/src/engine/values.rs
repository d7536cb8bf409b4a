//! What an output pass does with merged values: round them into the output buffer, keep
//! them as f32 for a quantized output, or fold them into an amax; and f32 buffers seen as
//! bytes.

use std::sync::atomic::{AtomicU32, Ordering};

use super::plan::Prepared;
use crate::error::{Error, Result};
use crate::format::dtype::Dtype;
use crate::format::writer::Writer;
use crate::kernels::real::Real;

/// Where the merged values of an output pass go.
pub(crate) enum Output<'a> {
    /// Written, with the amax of the tensor's fusion group when its scales need one.
    Write(&'a Writer, Option<f32>),
    /// Only their largest magnitude, folded into the cell (f32 bits).
    Amax(&'a AtomicU32),
}

/// Size a chunk's output buffers: its encoded bytes, or for a quantized output, its f32 values.
pub(crate) fn out_buffers(t: &Prepared, len: u64, bytes: &mut Vec<u8>, vals: &mut Vec<f32>) {
    if t.enc.is_some() {
        vals.resize(len as usize, 0.0);
    } else {
        bytes.resize(len as usize * t.out.dtype.size(), 0);
    }
}

/// Put a sub-block's merged values at element `off` of the chunk's output buffers (see
/// [`out_buffers`]), rounded once to the output dtype (or to f32, to be quantized).
pub(crate) fn place_out<T: Real>(t: &Prepared, out: &[T], off: usize, bytes: &mut [u8], vals: &mut [f32]) {
    let n = out.len();
    if t.enc.is_some() {
        if let Some(dst) = vals.get_mut(off..off + n) {
            to_f32(out, dst);
        }
    } else {
        let size = t.out.dtype.size();
        if let Some(dst) = bytes.get_mut(off * size..(off + n) * size) {
            crate::kernels::dispatch::encode(out, t.out.dtype, dst);
        }
    }
}

/// Merged values as f32 (f64 work rounds once).
pub(crate) fn to_f32<T: Real>(src: &[T], dst: &mut [f32]) {
    if let Some(v) = T::as_f32s(src) {
        dst.copy_from_slice(v);
        return;
    }
    let mut bytes = vec![0u8; src.len() * 4];
    T::encode(src, Dtype::F32, &mut bytes);
    for (d, b) in dst.iter_mut().zip(bytes.chunks_exact(4)) {
        *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
}

/// Fold the magnitudes of merged values (elements from `start` of `t`) into `cell`, the
/// f32 bits of an amax (bits order non-negative floats); a NaN or infinity is an error.
pub(crate) fn fold_amax(t: &Prepared, start: u64, vals: &[f32], cell: &AtomicU32) -> Result<()> {
    let amax = vals.iter().fold(0f32, |a, v| a.max(v.abs()));
    if !amax.is_finite() || vals.iter().any(|v| v.is_nan()) {
        let k = vals.iter().position(|v| !v.is_finite()).unwrap_or(0);
        return Err(Error::Degenerate {
            tensor: t.out.name.clone(),
            message: format!(
                "merged value at index {} is {}; it cannot be quantized",
                start + k as u64,
                vals[k]
            ),
        });
    }
    cell.fetch_max(amax.to_bits(), Ordering::Relaxed);
    Ok(())
}

/// f32 values as their bytes, to read F32 data into in place (on a little-endian machine,
/// where an f32's memory is its little-endian encoding: see the caller).
pub(crate) fn f32_bytes(values: &mut [f32]) -> &mut [u8] {
    // SAFETY: the bytes cover exactly the values' memory, u8 has no alignment requirement,
    // every bit pattern written through them is a valid f32, and the returned borrow keeps
    // `values` borrowed for as long as the bytes are used.
    unsafe { std::slice::from_raw_parts_mut(values.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(values)) }
}
