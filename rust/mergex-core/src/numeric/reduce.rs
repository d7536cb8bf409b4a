//! Whole-tensor reductions that do not depend on chunking or thread count.
//!
//! Elements are summed in f64 within fixed blocks of [`BLOCK`] elements in index order
//! (chunks always start on a block boundary), and block sums are combined in an exact
//! accumulator. Exact addition is associative, so the total is the same whatever order the
//! chunks finish in and however they are cut.

/// Elements per reduction block. Chunks are a whole number of blocks.
pub const BLOCK: u64 = 256;

const LIMBS: usize = 70;
const LIMB_BITS: u32 = 32;
/// Bit position of 2^-1074 (the smallest subnormal) is 0.
const BIAS: i32 = 1074;

/// An exact sum of f64 values (a "superaccumulator"): 32-bit digits held in i64 so that
/// billions of additions fit before a carry pass is needed.
#[derive(Clone, Debug, PartialEq)]
pub struct ExactSum {
    limbs: Vec<i64>,
    pending: u32,
    nan: bool,
    pos_inf: bool,
    neg_inf: bool,
}

impl Default for ExactSum {
    fn default() -> Self {
        ExactSum { limbs: vec![0; LIMBS], pending: 0, nan: false, pos_inf: false, neg_inf: false }
    }
}

impl ExactSum {
    /// Add one value exactly.
    pub fn add(&mut self, x: f64) {
        if !x.is_finite() {
            if x.is_nan() {
                self.nan = true;
            } else if x > 0.0 {
                self.pos_inf = true;
            } else {
                self.neg_inf = true;
            }
            return;
        }
        if x == 0.0 {
            return;
        }
        let bits = x.to_bits();
        let exp = ((bits >> 52) & 0x7ff) as i32;
        let frac = bits & ((1u64 << 52) - 1);
        let (mant, e) = if exp == 0 { (frac, -1074) } else { (frac | (1u64 << 52), exp - 1075) };
        let pos = (e + BIAS) as u32;
        let limb = (pos / LIMB_BITS) as usize;
        let wide = (mant as u128) << (pos % LIMB_BITS);
        let sign = if x < 0.0 { -1 } else { 1 };
        for k in 0..3 {
            let digit = ((wide >> (32 * k)) & 0xffff_ffff) as i64;
            if let Some(l) = self.limbs.get_mut(limb + k) {
                *l += sign * digit;
            }
        }
        self.pending += 1;
        if self.pending >= 1 << 30 {
            self.normalize();
        }
    }

    /// Add another accumulator exactly.
    pub fn merge(&mut self, other: &ExactSum) {
        let mut o = other.clone();
        o.normalize();
        self.normalize();
        for (a, b) in self.limbs.iter_mut().zip(&o.limbs) {
            *a += b;
        }
        self.pending = 2;
        self.nan |= other.nan;
        self.pos_inf |= other.pos_inf;
        self.neg_inf |= other.neg_inf;
    }

    /// Propagate carries so that every limb but the last lies in [0, 2^32).
    fn normalize(&mut self) {
        let mut carry = 0i64;
        let last = self.limbs.len() - 1;
        for (i, l) in self.limbs.iter_mut().enumerate() {
            let v = *l + carry;
            if i == last {
                *l = v;
            } else {
                *l = v & 0xffff_ffff;
                carry = v >> 32;
            }
        }
        self.pending = 0;
    }

    /// The sum, as an f64 (a deterministic function of the exact sum).
    pub fn value(&self) -> f64 {
        if self.nan || (self.pos_inf && self.neg_inf) {
            return f64::NAN;
        }
        if self.pos_inf {
            return f64::INFINITY;
        }
        if self.neg_inf {
            return f64::NEG_INFINITY;
        }
        let mut s = self.clone();
        s.normalize();
        // After normalizing, the top limb carries the sign: work on the magnitude.
        let negative = s.limbs.last().is_some_and(|&l| l < 0);
        if negative {
            s.limbs.iter_mut().for_each(|l| *l = -*l);
            s.normalize();
        }
        let Some(h) = s.limbs.iter().rposition(|&l| l != 0) else { return 0.0 };
        // The top three limbs (96 bits) and a sticky bit for anything below round correctly
        // to the 53 bits of an f64.
        let limb = |i: usize| s.limbs.get(i).map_or(0u128, |&l| l as u128 & 0xffff_ffff);
        let lo = h.saturating_sub(2);
        let mut m = 0u128;
        for i in (lo..=h).rev() {
            m = (m << 32) | limb(i);
        }
        let sticky = s.limbs[..lo].iter().any(|&l| l != 0);
        let m = (m << 1) | u128::from(sticky);
        let v = ldexp(m as f64, lo as i32 * LIMB_BITS as i32 - BIAS - 1);
        if negative {
            -v
        } else {
            v
        }
    }
}

/// `x · 2^e` without the intermediate overflow of `2f64.powi(e)` for very negative `e`.
fn ldexp(mut x: f64, mut e: i32) -> f64 {
    while e < -1000 {
        x *= 2f64.powi(-1000);
        e += 1000;
    }
    x * 2f64.powi(e)
}

/// Sum `values` the chunk-invariant way: in f64 within each [`BLOCK`] (counted from the
/// first value, whose index must be a multiple of `BLOCK`), block sums exactly. Within a
/// block, element `i` goes to lane `i % 8` and the lanes are folded in a fixed tree: a
/// fixed order that does not depend on chunking, with eight independent addition chains
/// instead of one.
pub fn block_sum(values: impl IntoIterator<Item = f64>, acc: &mut ExactSum) {
    let mut lanes = [0f64; 8];
    let mut n = 0usize;
    for v in values {
        lanes[n & 7] += v;
        n += 1;
        if n == BLOCK as usize {
            acc.add(fold(&lanes));
            lanes = [0.0; 8];
            n = 0;
        }
    }
    if n > 0 {
        acc.add(fold(&lanes));
    }
}

/// The fixed summation tree of the eight lanes of a block.
pub(crate) fn fold(l: &[f64; 8]) -> f64 {
    ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn negative_and_rounded_totals() {
        let mut s = ExactSum::default();
        for v in [-0.25, 1e-30, -1e-30, 0.5, -0.5] {
            s.add(v);
        }
        assert_eq!(s.value(), -0.25);
        let mut t = ExactSum::default();
        t.add(-1e300);
        t.add(-3.0);
        assert_eq!(t.value(), -1e300);
        // Correct rounding with a sticky bit: 1 + 2^-53 + 2^-100 rounds up to 1 + 2^-52.
        let mut u = ExactSum::default();
        u.add(1.0);
        u.add(2f64.powi(-53));
        u.add(2f64.powi(-100));
        assert_eq!(u.value(), 1.0 + 2f64.powi(-52));
        // Exactly halfway (no sticky): ties to even, stays 1.
        let mut w = ExactSum::default();
        w.add(1.0);
        w.add(2f64.powi(-53));
        assert_eq!(w.value(), 1.0);
    }

    #[test]
    fn exact_where_f64_is_not() {
        let mut s = ExactSum::default();
        for v in [1e20, 1.0, -1e20, 1e-300, 3.0] {
            s.add(v);
        }
        assert_eq!(s.value(), 4.0);
        let mut t = ExactSum::default();
        t.add(f64::MIN_POSITIVE / 4.0);
        t.add(f64::MAX);
        t.add(-f64::MAX);
        assert_eq!(t.value(), f64::MIN_POSITIVE / 4.0);
    }

    proptest! {
        #[test]
        fn chunking_and_order_do_not_matter(
            xs in proptest::collection::vec(-1e6f32..1e6f32, 0..3000),
            cut in 1usize..12,
        ) {
            let whole = {
                let mut acc = ExactSum::default();
                block_sum(xs.iter().map(|&x| x as f64), &mut acc);
                acc
            };
            // Cut into chunks of `cut` blocks, sum each on its own, merge in reverse.
            let chunk = cut * BLOCK as usize;
            let mut parts: Vec<ExactSum> = xs.chunks(chunk).map(|c| {
                let mut acc = ExactSum::default();
                block_sum(c.iter().map(|&x| x as f64), &mut acc);
                acc
            }).collect();
            parts.reverse();
            let mut merged = ExactSum::default();
            for p in &parts {
                merged.merge(p);
            }
            prop_assert_eq!(whole.value().to_bits(), merged.value().to_bits());
            // The total is the correctly rounded sum of the block sums.
            let mut blocks: Vec<f64> = xs.chunks(BLOCK as usize).map(|c| {
                let mut acc = ExactSum::default();
                block_sum(c.iter().map(|&x| x as f64), &mut acc);
                acc.value()
            }).collect();
            blocks.sort_by(|a, b| a.abs().total_cmp(&b.abs()));
            let naive: f64 = blocks.iter().sum();
            prop_assert!((whole.value() - naive).abs() <= 1e-9 * naive.abs().max(1.0));
        }
    }
}
