//! What one chunk of an output tensor hands a method: the same element range of every
//! input, decoded or as stored.

use crate::kernels::real::{Raw, Real};

/// What one chunk of an output tensor reads: the same element range of every input,
/// decoded to the working precision. Methods may overwrite the models' buffers in place
/// (they are re-read for every pass).
#[derive(Debug)]
pub struct ChunkInputs<'a, T> {
    /// Flat index of the first element.
    pub start: u64,
    /// The base model's values, when the method uses a base.
    pub base: Option<&'a [T]>,
    /// The other models' values, in config order.
    pub models: Vec<&'a mut [T]>,
    /// Every input's stored bytes over the same elements, the base first when there is one,
    /// when they are not decoded (else empty).
    pub stored: Vec<Raw<'a>>,
    /// Whether `base` and `models` hold the decoded values; when the method said it
    /// [takes the stored bytes](TensorMerge::takes_stored), they are empty.
    pub decoded: bool,
}

impl<T: Real> ChunkInputs<'_, T> {
    /// The stored inputs decoded, `n` values each: the base (when there is one), then the
    /// models, for [`ChunkInputs::with_decoded`].
    pub fn decode_stored(&self, n: usize) -> Vec<Vec<T>> {
        let decode = |r: &Raw<'_>| {
            let mut v = vec![T::ZERO; n];
            crate::kernels::dispatch::decode(r.dtype, r.bytes, &mut v);
            v
        };
        self.stored.iter().map(decode).collect()
    }

    /// Inputs over the same elements holding `values` (from [`ChunkInputs::decode_stored`]).
    pub fn with_decoded<'v>(&self, values: &'v mut [Vec<T>]) -> ChunkInputs<'v, T> {
        let (base, models): (Option<&[T]>, &mut [Vec<T>]) = if self.base.is_some() {
            match values.split_first_mut() {
                Some((b, rest)) => (Some(&b[..]), rest),
                None => (None, &mut []),
            }
        } else {
            (None, values)
        };
        let models = models.iter_mut().map(|m| &mut m[..]).collect();
        ChunkInputs { start: self.start, base, models, stored: Vec::new(), decoded: true }
    }

    /// Replace the models' values by their task vectors `x_i − b`, when there is a base.
    #[inline(always)]
    pub fn to_deltas(&mut self) {
        let Some(base) = self.base else { return };
        for m in self.models.iter_mut() {
            for (v, &b) in m.iter_mut().zip(base) {
                *v = *v - b;
            }
        }
    }
}
