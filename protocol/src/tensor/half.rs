//! IEEE-754 binary16 (`f16`) and bfloat16 (`bf16`) conversions, written out here so the
//! protocol needs no extra dependency and every peer rounds identically.
//!
//! `f32 -> f16/bf16` rounds to nearest, ties to even, with correct subnormals. Finite input
//! never becomes infinite: a finite value beyond the format's largest finite value saturates
//! to that value (±65504 for f16, ±3.3895e38 for bf16), because an infinity would make the
//! whole payload unusable (receivers refuse non-finite values). Infinities stay infinite and
//! NaN stays NaN (quiet), so a diverged model still produces a payload receivers refuse.
//! `f16/bf16 -> f32` is exact.

/// Largest finite f16, as bits (65504).
const F16_MAX_BITS: u16 = 0x7bff;
/// Largest finite bf16, as bits (≈3.3895e38).
const BF16_MAX_BITS: u16 = 0x7f7f;

/// Rounds `x` to the nearest f16 (ties to even), saturating finite overflow to ±65504.
pub fn f32_to_f16(x: f32) -> u16 {
    let bits = x.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exp = (bits >> 23) & 0xff;
    let man = bits & 0x007f_ffff;
    if exp == 0xff {
        // Infinity stays infinity; NaN becomes a quiet NaN keeping its top payload bits.
        let nan = if man != 0 {
            0x0200 | (man >> 13) as u16
        } else {
            0
        };
        return sign | 0x7c00 | nan;
    }
    // f16 biased exponent of x (f32 bias 127, f16 bias 15).
    let e = exp as i32 - 112;
    if e >= 0x1f {
        return sign | F16_MAX_BITS;
    }
    if e <= 0 {
        // f16 subnormal (or zero): value = m16 * 2^-24. With the implicit bit, x equals
        // (2^23 + man) * 2^(exp - 150), i.e. (2^23 + man) >> (14 - e) units of 2^-24.
        // f32 subnormals (exp == 0) are far below half the smallest f16 subnormal.
        if e < -10 {
            return sign;
        }
        let m = man | 0x0080_0000;
        let shift = (14 - e) as u32; // 14..=24
        return sign | round_shift(m, shift) as u16;
    }
    // Normal: keep 10 of the 23 mantissa bits; a carry out of the mantissa correctly bumps
    // the exponent, and a carry into the infinity exponent saturates instead.
    let h = ((e as u32) << 10) + round_shift(man, 13);
    if h >= 0x7c00 {
        sign | F16_MAX_BITS
    } else {
        sign | h as u16
    }
}

/// `m >> shift` rounded to nearest, ties to even (`1 <= shift <= 31`).
fn round_shift(m: u32, shift: u32) -> u32 {
    let q = m >> shift;
    let rem = m & ((1 << shift) - 1);
    let half = 1 << (shift - 1);
    if rem > half || (rem == half && q & 1 == 1) {
        q + 1
    } else {
        q
    }
}

/// The exact f32 value of the f16 with bits `h` (infinities and NaN included).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h & 0x8000) << 16;
    let exp = u32::from((h >> 10) & 0x1f);
    let man = u32::from(h & 0x03ff);
    match exp {
        0 => {
            // Zero or subnormal: man * 2^-24, exact in f32.
            let magnitude = man as f32 * f32::from_bits(0x3380_0000);
            f32::from_bits(sign | magnitude.to_bits())
        }
        0x1f => f32::from_bits(sign | 0x7f80_0000 | (man << 13)),
        _ => f32::from_bits(sign | ((exp + 112) << 23) | (man << 13)),
    }
}

/// Rounds `x` to the nearest bf16 (ties to even), saturating finite overflow to the largest
/// finite bf16.
pub fn f32_to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) as u16) | 0x0040;
    }
    // Adding 0x7fff plus the lowest kept bit rounds the dropped 16 bits to nearest-even;
    // no overflow: the largest finite magnitude is 0x7f7f_ffff and the sign bit is spare.
    let rounded = (bits + 0x7fff + ((bits >> 16) & 1)) >> 16;
    let out = rounded as u16;
    if x.is_finite() && out & 0x7f80 == 0x7f80 {
        (out & 0x8000) | BF16_MAX_BITS
    } else {
        out
    }
}

/// The exact f32 value of the bf16 with bits `b`.
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// Every finite f16/bf16, in increasing order from the smallest positive to the max.
    fn positive_finite(max_bits: u16) -> impl Iterator<Item = u16> {
        0..=max_bits
    }

    #[test]
    fn f16_every_value_roundtrips_exactly() {
        for h in 0..=u16::MAX {
            let x = f16_to_f32(h);
            if x.is_nan() {
                assert!(f16_to_f32(f32_to_f16(x)).is_nan(), "{h:#06x}");
            } else {
                assert_eq!(f32_to_f16(x), h, "{h:#06x} -> {x}");
            }
        }
    }

    #[test]
    fn bf16_every_value_roundtrips_exactly() {
        for b in 0..=u16::MAX {
            let x = bf16_to_f32(b);
            if x.is_nan() {
                assert!(bf16_to_f32(f32_to_bf16(x)).is_nan(), "{b:#06x}");
            } else {
                assert_eq!(f32_to_bf16(x), b, "{b:#06x} -> {x}");
            }
        }
    }

    /// Between every two neighbouring finite values a and b (subnormals included), the exact
    /// midpoint rounds to the one with the even mantissa, and the f32 values just below and
    /// just above it round to a and b: round-to-nearest-even, checked exhaustively.
    fn check_midpoints(max_bits: u16, to: fn(f32) -> u16, from: fn(u16) -> f32) {
        for lo in positive_finite(max_bits - 1) {
            let hi = lo + 1;
            let (a, b) = (from(lo), from(hi));
            let mid = ((f64::from(a) + f64::from(b)) / 2.0) as f32;
            assert_eq!(f64::from(mid), (f64::from(a) + f64::from(b)) / 2.0, "exact");
            let even = if lo & 1 == 0 { lo } else { hi };
            for sign in [0u16, 0x8000] {
                let s = |x: f32| if sign == 0 { x } else { -x };
                assert_eq!(to(s(mid)), sign | even, "midpoint of {lo:#06x}");
                assert_eq!(to(s(mid.next_down())), sign | lo, "below {lo:#06x}");
                assert_eq!(to(s(mid.next_up())), sign | hi, "above {lo:#06x}");
            }
        }
    }

    #[test]
    fn f16_rounds_to_nearest_even_between_every_pair() {
        check_midpoints(F16_MAX_BITS, f32_to_f16, f16_to_f32);
    }

    #[test]
    fn bf16_rounds_to_nearest_even_between_every_pair() {
        check_midpoints(BF16_MAX_BITS, f32_to_bf16, bf16_to_f32);
    }

    #[test]
    fn finite_overflow_saturates_and_specials_are_kept() {
        assert_eq!(f16_to_f32(F16_MAX_BITS), 65504.0);
        for x in [65504.0, 65519.99, 65520.0, 1e6, 1e38, f32::MAX] {
            assert_eq!(f32_to_f16(x), F16_MAX_BITS, "{x}");
            assert_eq!(f32_to_f16(-x), 0x8000 | F16_MAX_BITS, "-{x}");
        }
        let bf_max = bf16_to_f32(BF16_MAX_BITS);
        assert!(bf_max.is_finite() && bf_max > 3.38e38);
        for x in [bf_max, bf_max.next_up(), f32::MAX] {
            assert_eq!(f32_to_bf16(x), BF16_MAX_BITS, "{x}");
            assert_eq!(f32_to_bf16(-x), 0x8000 | BF16_MAX_BITS, "-{x}");
        }
        assert_eq!(f32_to_f16(f32::INFINITY), 0x7c00);
        assert_eq!(f32_to_f16(f32::NEG_INFINITY), 0xfc00);
        assert_eq!(f32_to_bf16(f32::INFINITY), 0x7f80);
        assert_eq!(f32_to_bf16(f32::NEG_INFINITY), 0xff80);
        assert!(f16_to_f32(f32_to_f16(f32::NAN)).is_nan());
        assert!(bf16_to_f32(f32_to_bf16(f32::NAN)).is_nan());
        // A NaN whose payload sits only in the low bits must not collapse to infinity.
        let low_nan = f32::from_bits(0x7f80_0001);
        assert!(f16_to_f32(f32_to_f16(low_nan)).is_nan());
        assert!(bf16_to_f32(f32_to_bf16(low_nan)).is_nan());
        // Signed zeros and values below half the smallest subnormal.
        assert_eq!(f32_to_f16(-0.0), 0x8000);
        assert_eq!(f32_to_f16(1e-10), 0);
        assert_eq!(f32_to_f16(f32::from_bits(1)), 0);
        assert_eq!(f32_to_bf16(f32::from_bits(1)), 0);
        assert_eq!(f32_to_bf16(f32::from_bits(0x8000)), 0, "tie to even zero");
        assert_eq!(f32_to_bf16(f32::from_bits(0x8001)), 1);
        // Smallest f16 subnormal and normal.
        assert_eq!(f16_to_f32(1), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x0400), 2f32.powi(-14));
    }

    #[test]
    fn relative_error_bounds_hold_on_random_values() {
        let mut rng = Rng::new(16);
        for _ in 0..200_000 {
            // Log-uniform magnitudes over the f16 normal range, random sign.
            let mag = 2f64.powf(rng.next_f64() * 29.9 - 14.0);
            let x = (if rng.chance(0.5) { mag } else { -mag }) as f32;
            let h = f64::from(f16_to_f32(f32_to_f16(x)));
            assert!((h - f64::from(x)).abs() <= f64::from(x).abs() * 2f64.powi(-11));
            let b = f64::from(bf16_to_f32(f32_to_bf16(x)));
            assert!((b - f64::from(x)).abs() <= f64::from(x).abs() * 2f64.powi(-8));
        }
    }
}
