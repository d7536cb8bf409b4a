//! The counter-based random draw of METHODS.md §3: a keep decision is a pure function of
//! (seed, tensor name, model position, element index), so masks do not depend on chunking,
//! threads, device or processing order.

/// The 32-bit finalizer used at every step.
#[inline(always)]
pub fn mix(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^= x >> 16;
    x
}

/// FNV-1a over the UTF-8 bytes of a tensor name.
pub fn fnv1a(name: &str) -> u32 {
    name.bytes().fold(0x811c_9dc5u32, |h, b| (h ^ b as u32).wrapping_mul(0x0100_0193))
}

/// The stream of one (seed, output tensor, model position).
pub fn stream(seed: u32, tensor: &str, model_pos: u32) -> u32 {
    mix(mix(mix(seed ^ 0x9e37_79b9) ^ fnv1a(tensor)) ^ model_pos.wrapping_add(1))
}

/// The draw of element `j` (flat index) in `stream`.
#[inline(always)]
pub fn draw(stream: u32, j: u64) -> u32 {
    mix(stream ^ index_hash(j))
}

/// The stream-independent half of [`draw`] for flat index `j`:
/// `mix(lo32(j)) ^ mix(hi32(j) ^ 0x85ebca6b)`.
#[inline(always)]
pub fn index_hash(j: u64) -> u32 {
    mix(j as u32) ^ mix((j >> 32) as u32 ^ 0x85eb_ca6b)
}

/// [`index_hash`] of elements `start..start+n`, shared by every model of a chunk; then
/// `draw(stream, j) == mix(stream ^ hashes[j - start])`.
#[inline(always)]
pub fn index_hashes(start: u64, n: usize, out: &mut Vec<u32>) {
    out.clear();
    out.reserve(n);
    let mut j = start;
    let end = start + n as u64;
    while j < end {
        // Runs within one 2^32 block share the high half.
        let hi = mix((j >> 32) as u32 ^ 0x85eb_ca6b);
        let block_end = ((j >> 32) + 1) << 32;
        let stop = end.min(block_end);
        out.extend((j..stop).map(|x| mix(x as u32) ^ hi));
        j = stop;
    }
}

/// `floor(p · 2^32)` computed in f64, clamped to the u64 range of a 32-bit draw: element
/// kept iff `draw < threshold`.
pub fn threshold(p: f64) -> u64 {
    if p.is_nan() || p <= 0.0 {
        0
    } else {
        (p * 4_294_967_296.0).floor().min(4_294_967_296.0) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAME: &str = "model.layers.0.mlp.up_proj.weight";

    #[test]
    fn spec_test_vectors() {
        assert_eq!(fnv1a(NAME), 0x53d3_8de8);
        let s = stream(0, NAME, 0);
        assert_eq!(s, 0x4add_06d6);
        let r: Vec<u32> = (0..4).map(|j| draw(s, j)).collect();
        assert_eq!(r, vec![0xb379_8433, 0xd212_0608, 0x92d8_90ef, 0x82f9_8eef]);
        assert_eq!(draw(s, (1u64 << 32) + 5), 0xb561_3fbd);
        let s1 = stream(0, NAME, 1);
        assert_eq!(s1, 0x7aef_8979);
        assert_eq!(draw(s1, 0), 0x79ba_6fb8);
        let s42 = stream(42, NAME, 0);
        assert_eq!(s42, 0xcf30_6dab);
        assert_eq!(draw(s42, 0), 0x4d92_4e58);
    }

    #[test]
    fn hashes_match_draws() {
        let s = stream(7, NAME, 3);
        let start = (1u64 << 32) - 5;
        let mut h = Vec::new();
        index_hashes(start, 10, &mut h);
        for (k, &v) in h.iter().enumerate() {
            assert_eq!(mix(s ^ v), draw(s, start + k as u64));
        }
    }

    #[test]
    fn thresholds() {
        assert_eq!(threshold(0.0), 0);
        assert_eq!(threshold(1.0), 1 << 32);
        assert_eq!(threshold(0.5), 1 << 31);
        assert_eq!(threshold(-3.0), 0);
    }
}
