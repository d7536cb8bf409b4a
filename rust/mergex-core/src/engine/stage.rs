//! A recipe stage fused into the stage that reads it (`mergex merge RECIPE`): the earlier
//! stage's output tensors are computed chunk by chunk as the later stage reads them, and
//! never written. Only element-wise stages are fused (a weighted sum of their inputs,
//! [`WeightedSum`]): each element of their output depends on the same element of their
//! inputs alone, so a chunk needs nothing but the same chunk of the inputs.

use super::read::{Computed, View};
use crate::error::Result;
use crate::format::dtype::Dtype;
use crate::kernels::real::{Raw, Real};
use crate::kernels::sums::SumInputs;
use crate::methods::WeightedSum;

/// The weighted sum of a stage's tensor, in its working precision.
#[derive(Debug)]
pub enum StageSum {
    F32(WeightedSum<f32>),
    F64(WeightedSum<f64>),
}

/// One output tensor of a fused stage: its inputs (the base first), its sum, and the dtype
/// its output file would hold. Read, it gives exactly the values that file would: the sum
/// rounded once to that dtype.
#[derive(Debug)]
pub struct StageTensor {
    name: String,
    views: Vec<View>,
    sum: StageSum,
    out: Dtype,
}

impl StageTensor {
    pub fn new(name: &str, views: Vec<View>, sum: StageSum, out: Dtype) -> StageTensor {
        StageTensor { name: name.to_string(), views, sum, out }
    }
}

fn weighted<T: Real>(s: &WeightedSum<T>, raw: &[Raw<'_>], out: &mut [T]) {
    let (base, models) = match (s.task, raw.split_first()) {
        (Some(_), Some((b, rest))) => (Some(*b), rest),
        _ => (None, raw),
    };
    let x = SumInputs { models, weights: &s.weights, base, divisor: s.divisor, lambda: s.task };
    crate::kernels::dispatch::weighted_sum(&x, out);
}

impl Computed for StageTensor {
    fn read(&self, start: u64, values: &mut [f32]) -> Result<()> {
        let n = values.len();
        let mut raws = Vec::with_capacity(self.views.len());
        for v in &self.views {
            let mut bytes = vec![0u8; n * v.dtype().size()];
            v.read_raw(start, &mut bytes)?;
            raws.push(bytes);
        }
        let raw: Vec<Raw<'_>> =
            self.views.iter().zip(&raws).map(|(v, b)| Raw { dtype: v.dtype(), bytes: b }).collect();
        let mut bytes = vec![0u8; n * self.out.size()];
        match &self.sum {
            StageSum::F32(s) => {
                let mut out = vec![0f32; n];
                weighted(s, &raw, &mut out);
                crate::kernels::dispatch::encode(&out, self.out, &mut bytes);
            }
            StageSum::F64(s) => {
                let mut out = vec![0f64; n];
                weighted(s, &raw, &mut out);
                crate::kernels::dispatch::encode(&out, self.out, &mut bytes);
            }
        }
        crate::kernels::dispatch::decode(self.out, &bytes, values);
        Ok(())
    }

    fn bytes_for(&self, len: u64) -> u64 {
        self.views.iter().map(|v| v.bytes_for(len)).sum()
    }

    fn describe(&self) -> String {
        format!("stage {} of {:?}", self.name, self.views.iter().map(|v| v.file.path()).collect::<Vec<_>>())
    }
}
