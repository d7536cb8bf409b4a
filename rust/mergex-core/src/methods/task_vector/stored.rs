//! The task-vector family's fast paths over stored bf16 bytes and the fused TIES kernels:
//! the same numbers as the semantic pipeline in `task_vector`, computed without decoding
//! every input first. Each is chosen only where it gives identical results.

use super::super::slots::TaskSlots;
use super::*;

impl<T: Real> TaskVector<T> {
    /// TIES with a top-k cut per model, in f32, in the build that has a fused form of the
    /// task vectors, keep masks, weighting and election (AVX-512): the same output from the
    /// models' values (not yet task vectors), in one sweep with every model's lanes in
    /// registers. `false` (nothing done) elsewhere.
    #[inline(always)]
    pub(super) fn fused_ties(&self, x: &ChunkInputs<'_, T>, base: &[T], out: &mut [T]) -> bool {
        if T::KEY_BITS > 32 || !crate::kernels::dispatch::has_fused_ties(x.models.len()) {
            return false;
        }
        let lambda = T::as_f32s(std::slice::from_ref(&self.lambda)).and_then(|l| l.first().copied());
        let (Some(weights), Some(scales), Some(lambda)) =
            (T::as_f32s(&self.weights), T::as_f32s(&self.scales), lambda)
        else {
            return false;
        };
        // What each model keeps: the top of its magnitudes (TIES) or its draws (DARE-TIES).
        let (mut cuts, draws): (Vec<_>, Vec<_>);
        let keep = if let Some(c) =
            self.sparsifiers.iter().map(|sp| sp.top_cut().map(|c| c.top_cut_f32(x.start))).collect()
        {
            cuts = c;
            Keep::Cuts(&mut cuts)
        } else if let Some(d) = self.sparsifiers.iter().map(Sparsifier::draws).collect() {
            draws = d;
            Keep::Draws { start: x.start, draws: &draws }
        } else {
            return false;
        };
        let decoded: Option<Vec<&[f32]>> = x.models.iter().map(|m| T::as_f32s(m)).collect();
        let stored: Vec<&[u8]> = x.stored.iter().skip(1).map(|r| r.bytes).collect();
        let values = match (x.decoded, &decoded, T::as_f32s(base), x.stored.first()) {
            (true, Some(models), Some(base), _) => TiesValues::F32 { models, base },
            (false, _, _, Some(b)) if x.stored.iter().all(|r| r.dtype == Dtype::BF16) => {
                TiesValues::Bf16 { models: &stored, base: b.bytes }
            }
            _ => return false,
        };
        let inputs = TiesInputs { values, weights, scales, normalize: self.normalize, lambda };
        T::as_f32s_mut(out).is_some_and(|out| crate::kernels::dispatch::ties_f32(&inputs, keep, out))
    }

    /// A statistics pass's chunk from the stored bf16 inputs ([`TensorMerge::takes_stored`]):
    /// the selections' band sweeps over the task vectors, taken while reading.
    pub(super) fn stat_stored(&self, x: &mut ChunkInputs<'_, T>, acc: &mut Stats) -> Result<()> {
        let dtypes: Vec<Dtype> = x.stored.iter().map(|r| r.dtype).collect();
        let sweeps = self.wants_pass() && self.takes_stored(&dtypes);
        if sweeps && self.dare_l1_stored() {
            return self.dare_l1_chunk(x, acc);
        }
        match x.stored.split_first() {
            Some((base, models)) if sweeps => {
                for (i, (m, sp)) in models.iter().zip(&self.sparsifiers).enumerate() {
                    sp.collect_stored_bf16(i, x.start, m.bytes, base.bytes, acc);
                }
                Ok(())
            }
            // Not reached (`takes_stored` promised the sweeps), but never wrong.
            _ => {
                let n = x.stored.first().map_or(0, |r| r.bytes.len() / r.dtype.size());
                let mut values = x.decode_stored(n);
                self.stat_chunk(&mut x.with_decoded(&mut values), acc)
            }
        }
    }

    /// DARE's only statistics, the L1 norms of every model's task vector and of what its
    /// draws keep, summed from the stored bf16 values (`dispatch::dare_l1_bf16`).
    pub(super) fn dare_l1_stored(&self) -> bool {
        self.pass == 0
            && self.rescaling()
            && !self.selecting()
            && self.sparsifiers.iter().all(|sp| sp.draws().is_some())
            && crate::kernels::dispatch::has_bf16_kernels()
    }

    /// [`TaskVector::dare_l1_stored`] over one sub-block: the kernel's whole groups of
    /// blocks, then the rest decoded, as the decoded pass sums it.
    fn dare_l1_chunk(&self, x: &ChunkInputs<'_, T>, acc: &mut Stats) -> Result<()> {
        let Some((base, models)) = x.stored.split_first() else { return Ok(()) };
        let (mut hashes, mut mask) = (Vec::new(), Vec::new());
        index_hashes(x.start, base.bytes.len() / 2, &mut hashes);
        for (i, (m, sp)) in models.iter().zip(&self.sparsifiers).enumerate() {
            let Some(draw) = sp.draws() else { continue };
            let (all, kept) = acc.sum_pair(TaskSlots::l1_all(i));
            let done = crate::kernels::dispatch::dare_l1_bf16(
                m.bytes,
                base.bytes,
                &hashes,
                draw,
                &mut |l| all.add(fold(l)),
                &mut |l| kept.add(fold(l)),
            )
            .unwrap_or(0);
            let n = m.bytes.len() / 2;
            if done >= n {
                continue;
            }
            let decode = |b: &[u8]| -> Vec<T> {
                let mut v = vec![T::ZERO; n - done];
                crate::kernels::dispatch::decode(Dtype::BF16, b.get(2 * done..).unwrap_or_default(), &mut v);
                v
            };
            let (xs, bs) = (decode(m.bytes), decode(base.bytes));
            let delta: Vec<T> = xs.iter().zip(&bs).map(|(&v, &b)| v - b).collect();
            let start = x.start + done as u64;
            sp.mask(start, &delta, hashes.get(done..).unwrap_or_default(), &mut mask);
            reduce_abs(&delta, None, all);
            reduce_abs(&delta, Some(&mask), kept);
        }
        Ok(())
    }
}
