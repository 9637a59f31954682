//! A small deterministic PRNG.
//!
//! The protocol must be reproducible by seed (shard order, simulator latency and loss), so it
//! never touches a global or OS random source. [`Rng`] is xoshiro256** seeded through
//! SplitMix64: fast, tiny, good statistical quality, and not meant for cryptography.

use std::ops::Range;

/// A seeded xoshiro256** generator: the same seed yields the same sequence on every platform.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rng {
    state: [u64; 4],
}

/// One SplitMix64 step: spreads a 64-bit seed over xoshiro's 256-bit state so that nearby
/// seeds (0, 1, 2…) give unrelated streams.
fn splitmix64(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Rng {
    /// Creates a generator from a 64-bit seed.
    pub fn new(seed: u64) -> Rng {
        let mut x = seed;
        let state = [
            splitmix64(&mut x),
            splitmix64(&mut x),
            splitmix64(&mut x),
            splitmix64(&mut x),
        ];
        Rng { state }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.state;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// A uniform float in `[0, 1)` with 53 random bits, for probabilities and fractions.
    pub fn next_f64(&mut self) -> f64 {
        const SCALE: f64 = 1.0 / (1u64 << 53) as f64;
        (self.next_u64() >> 11) as f64 * SCALE
    }

    /// A uniform integer in `range` (start inclusive, end exclusive), without modulo bias.
    /// An empty range yields its `start`, so callers never hit a panic on degenerate bounds.
    pub fn range(&mut self, range: Range<u64>) -> u64 {
        if range.start >= range.end {
            return range.start;
        }
        let span = range.end - range.start;
        // Reject the lowest (2^64 mod span) values so every residue is equally likely.
        let threshold = span.wrapping_neg() % span;
        loop {
            let x = self.next_u64();
            if x >= threshold {
                return range.start + x % span;
            }
        }
    }

    /// `true` with probability `p` (clamped to `[0, 1]`), for simulated message loss.
    pub fn chance(&mut self, p: f64) -> bool {
        self.next_f64() < p
    }

    /// Shuffles `items` in place (Fisher-Yates): every permutation is equally likely.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.range(0..i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_reference_xoshiro256starstar() {
        // Computed with an independent Python implementation of SplitMix64 + xoshiro256**.
        let mut rng = Rng::new(0);
        assert_eq!(rng.next_u64(), 0x99ec_5f36_cb75_f2b4);
        assert_eq!(rng.next_u64(), 0xbf6e_1f78_4956_452a);
        assert_eq!(rng.next_u64(), 0x1a5f_849d_4933_e6e0);
        let mut rng = Rng::new(42);
        assert_eq!(rng.next_u64(), 0x1578_0b2e_0c2e_c716);
    }

    #[test]
    fn same_seed_same_stream_different_seed_different_stream() {
        let a: Vec<u64> = {
            let mut r = Rng::new(7);
            (0..16).map(|_| r.next_u64()).collect()
        };
        let b: Vec<u64> = {
            let mut r = Rng::new(7);
            (0..16).map(|_| r.next_u64()).collect()
        };
        let c: Vec<u64> = {
            let mut r = Rng::new(8);
            (0..16).map(|_| r.next_u64()).collect()
        };
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn next_f64_is_in_unit_interval_with_sane_mean() {
        let mut r = Rng::new(1);
        let mut sum = 0.0;
        for _ in 0..100_000 {
            let x = r.next_f64();
            assert!((0.0..1.0).contains(&x), "{x} outside [0,1)");
            sum += x;
        }
        let mean = sum / 100_000.0;
        assert!((mean - 0.5).abs() < 0.01, "mean {mean}");
    }

    #[test]
    fn range_stays_in_bounds_and_hits_every_value_evenly() {
        let mut r = Rng::new(2);
        let mut counts = [0u32; 7];
        for _ in 0..70_000 {
            let x = r.range(10..17);
            assert!((10..17).contains(&x));
            counts[(x - 10) as usize] += 1;
        }
        for c in counts {
            // Expected 10_000 each; 5 sigma is about 460.
            assert!((9_500..10_500).contains(&c), "uneven counts {counts:?}");
        }
        assert_eq!(r.range(5..5), 5);
        let (hi, lo) = (9, 3);
        assert_eq!(r.range(hi..lo), 9);
        // The full u64 span works too.
        let _ = r.range(0..u64::MAX);
    }

    #[test]
    fn shuffle_is_a_deterministic_permutation() {
        let mut a: Vec<u32> = (0..100).collect();
        let mut b = a.clone();
        Rng::new(3).shuffle(&mut a);
        Rng::new(3).shuffle(&mut b);
        assert_eq!(a, b);
        assert_ne!(a, (0..100).collect::<Vec<_>>(), "100 items left in order");
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        let mut empty: [u8; 0] = [];
        Rng::new(3).shuffle(&mut empty);
    }

    #[test]
    fn shuffle_puts_first_item_anywhere_uniformly() {
        let mut r = Rng::new(4);
        let mut counts = [0u32; 5];
        for _ in 0..50_000 {
            let mut items = [0u8, 1, 2, 3, 4];
            r.shuffle(&mut items);
            let pos = items.iter().position(|&x| x == 0).unwrap_or(0);
            counts[pos] += 1;
        }
        for c in counts {
            assert!((9_500..10_500).contains(&c), "biased shuffle {counts:?}");
        }
    }

    #[test]
    fn chance_matches_probability() {
        let mut r = Rng::new(5);
        let hits = (0..100_000).filter(|_| r.chance(0.3)).count();
        assert!((29_000..31_000).contains(&hits), "{hits}");
        assert!(!(0..1000).any(|_| r.chance(0.0)));
        assert!((0..1000).all(|_| r.chance(1.0)));
    }
}
