//! Counter-based random numbers.
//!
//! Every random draw in the engine (initialisation, the split, shuffling, augmentation, dropout) is a pure
//! function of `(seed, stream, counter)`, so a run repeats exactly, a resumed run draws what the
//! uninterrupted run would have drawn, and a GPU kernel can reproduce the CPU's dropout mask bit for bit.
//! The mixer is SplitMix64's finaliser, whose output passes BigCrush when fed a counter.

/// FNV-1a over bytes, 64 bits: a content fingerprint (not for randomness), e.g. of the records that identify a
/// run's data or of a library file's bytes.
pub fn fnv1a(h: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(h, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

/// FNV-1a's starting value.
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// SplitMix64's finaliser: a bijective 64-bit mixer.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Derives an independent stream key from a parent key and a label (layer index, epoch, ...).
#[inline]
pub fn derive(key: u64, label: u64) -> u64 {
    mix64(key ^ mix64(label.wrapping_add(0x9e37_79b9_7f4a_7c15)))
}

/// `n` values drawn N(0, std^2) from `seed`: the random inputs of the tests, `asge bench` and the criterion
/// benches (one helper, so that a case means the same numbers in all three).
pub fn randn(n: usize, std: f64, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| (r.normal() * std) as f32).collect()
}

/// Chris Wellons' `lowbias32`: a 32-bit integer hash with near-ideal avalanche, cheap on SIMD lanes and GPUs.
#[inline(always)]
pub fn lowbias32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^= x >> 16;
    x
}

/// The per-element uniform in [0, 1) of the dropout masks: two rounds of [`lowbias32`] keyed by the two halves
/// of `key`. 32-bit so that it vectorises on the CPU and costs a few instructions in a CUDA kernel; the element
/// index of one layer's output fits in 32 bits for any realistic batch.
#[inline(always)]
pub fn dropout_uniform(key: u64, i: u32) -> f32 {
    let x = lowbias32(lowbias32(i ^ key as u32) ^ (key >> 32) as u32);
    (x >> 8) as f32 * (1.0 / 16_777_216.0)
}

/// A sequential generator over one stream: `next_u64` walks the counter.
#[derive(Clone, Debug)]
pub struct Rng {
    key: u64,
    counter: u64,
}

impl Rng {
    pub fn new(key: u64) -> Self {
        Rng { key: mix64(key), counter: 0 }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.counter += 1;
        mix64(self.key.wrapping_add(self.counter.wrapping_mul(0x9e37_79b9_7f4a_7c15)))
    }

    /// Uniform in [0, 1) with 53 bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / 9_007_199_254_740_992.0)
    }

    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.next_f64()
    }

    /// Uniform integer in [0, n), without modulo bias (Lemire's method).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "Rng::below(0)");
        loop {
            let m = (self.next_u64() as u128) * (n as u128);
            let low = m as u64;
            if low >= n.wrapping_neg() % n {
                return (m >> 64) as u64;
            }
        }
    }

    /// Standard normal by Box-Muller (one of the pair is used; simplicity over speed, init only).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.next_f64(); // (0, 1]
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_has_unit_moments() {
        let mut r = Rng::new(7);
        let n = 200_000;
        let xs: Vec<f64> = (0..n).map(|_| r.normal()).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.01, "var {var}");
    }

    #[test]
    fn dropout_uniform_is_in_range_and_balanced() {
        let n = 100_000u32;
        let mut below_half = 0;
        for i in 0..n {
            let u = dropout_uniform(0x1234_5678_9abc_def0, i);
            assert!((0.0..1.0).contains(&u));
            if u < 0.5 {
                below_half += 1;
            }
        }
        let frac = below_half as f64 / n as f64;
        assert!((frac - 0.5).abs() < 0.01, "{frac}");
        // Another key, another mask.
        let same = (0..1000u32).filter(|&i| (dropout_uniform(1, i) < 0.5) == (dropout_uniform(2, i) < 0.5)).count();
        assert!((400..600).contains(&same), "{same} of 1000 agree");
    }

    #[test]
    fn shuffle_is_a_permutation_and_seeded() {
        let mut a: Vec<u32> = (0..1000).collect();
        let mut b = a.clone();
        Rng::new(3).shuffle(&mut a);
        Rng::new(3).shuffle(&mut b);
        assert_eq!(a, b);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
        assert_ne!(a, sorted);
    }
}
