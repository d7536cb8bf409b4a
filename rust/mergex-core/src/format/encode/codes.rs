//! Writing one block's codes: rounding each value over its scale to the nearest code and
//! packing the codes (and asymmetric integers' zero points) as the format stores them.

use super::element::minifloat;
use super::{e2m1, e4m3, Element, Encoded, Encoder};
use crate::format::dtype::Dtype;

impl Encoder {
    /// Quantize `values` (part of row `r` of the chunk, from column `c0`) with scale `s`.
    pub(super) fn put_row(&self, out: &mut Encoded, r: usize, c0: usize, values: &[f32], s: f32, zp: i32) {
        let row = r * self.row_bytes() as usize;
        match self.element {
            Element::F8(dtype) => {
                let dst = &mut out.codes[row + c0..row + c0 + values.len()];
                if dtype == Dtype::F8_E5M2 {
                    for (q, &v) in dst.iter_mut().zip(values) {
                        *q = minifloat(v / s, 5, 2, 15, 0x7b);
                    }
                } else {
                    for (q, &v) in dst.iter_mut().zip(values) {
                        *q = e4m3(v / s);
                    }
                }
            }
            Element::Fp4 => {
                // Groups are of an even number of columns, so pairs never straddle them.
                let dst = &mut out.codes[row + c0 / 2..row + (c0 + values.len()) / 2];
                for (q, pair) in dst.iter_mut().zip(values.chunks_exact(2)) {
                    *q = e2m1(pair[0] / s) | (e2m1(pair[1] / s) << 4);
                }
            }
            Element::Int(b) => {
                let (qlo, qhi) = (-(1i32 << (b - 1)), (1i32 << (b - 1)) - 1);
                for (k, &v) in values.iter().enumerate() {
                    let y = if zp == 0 { v / s } else { v / s + zp as f32 };
                    let q = y.round_ties_even().clamp(qlo as f32, qhi as f32) as i32;
                    let u = (q - qlo) as u32;
                    let bit = (c0 + k) * b as usize;
                    let word = row + bit / 32 * 4;
                    let w = u32::from_le_bytes(out.codes[word..word + 4].try_into().unwrap_or([0; 4]));
                    out.codes[word..word + 4].copy_from_slice(&(w | (u << (bit % 32))).to_le_bytes());
                }
            }
        }
    }

    /// Set the zero point of group `group` for rows `[r, r + h)` (whole zero-point words).
    pub(super) fn put_zero_points(&self, out: &mut Encoded, r: u64, h: u64, group: u64, zp: i32) {
        let Element::Int(b) = self.element else { return };
        let first = out.zeros_at / 4;
        let u = (zp + (1 << (b - 1))) as u32;
        for row in r..r + h {
            let word = ((self.zero_row(row) * self.grid_cols + group - first) * 4) as usize;
            let bit = (row % self.rows) * u64::from(b) % 32;
            let w = u32::from_le_bytes(out.zeros[word..word + 4].try_into().unwrap_or([0; 4]));
            out.zeros[word..word + 4].copy_from_slice(&(w | (u << bit)).to_le_bytes());
        }
    }
}
