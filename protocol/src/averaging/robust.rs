//! Robust aggregation: how a reducer combines its part's contributions when some members may
//! be hostile, and how a member screens the reduced parts it receives.
//!
//! Threat model: a minority of group members send arbitrary finite values (scaled,
//! sign-flipped, random) as their contributions and as the reduced parts they return.
//! Non-finite values never get this far: the wire validation refuses them, so a NaN sender
//! is simply not a contributor. A reducer combines contributions with [`Aggregation`]; a
//! member that receives a reduced part far from its own values for that part, or larger
//! than them (see [`Aggregation::plausible`]), keeps its own values for that part this
//! round, so a hostile reducer can hold its part back, shrink it by less than half, or
//! inflate it by at most 2% a round, but not push it anywhere. Everything runs in f64 in member
//! order, so every honest peer recomputes the same result bit for bit.

use serde::{Deserialize, Serialize};

/// How a reducer combines the contributions to its part.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, Default)]
pub enum Aggregation {
    /// The plain mean: exact and cheapest, but one hostile member moves it arbitrarily far.
    #[default]
    Mean,
    /// Per coordinate, drop the `ceil(trim * n)` largest and as many smallest values (at most
    /// `(n - 1) / 2` each, so at least one value stays) and average the rest. With `n`
    /// members it tolerates that many hostile ones per coordinate.
    TrimmedMean {
        /// Fraction trimmed from each end, in `(0, 0.5)`.
        trim: f32,
    },
    /// Centered clipping: start at the coordinate-wise median, then three times move the
    /// centre by the mean of the contributions' differences from it, each difference
    /// clipped to the radius `tau` (L2 over the part). `tau` is `radius` times the median of
    /// the contributions' distances from the median, so it follows the honest spread
    /// whatever the parameters' scale.
    CenteredClip {
        /// Radius in multiples of the median distance from the median, `> 0`.
        radius: f32,
    },
}

/// Iterations of centered clipping (the centre converges in a few).
const CLIP_ITERATIONS: usize = 3;

/// A reduced part is implausible when its L2 distance from the receiver's own values exceeds
/// this fraction of the larger of the two norms (and an absolute floor): honest averaging
/// moves parameters by a small fraction per round, a flipped or scaled part by 100% or more.
const PLAUSIBLE_FRACTION: f64 = 0.5;

/// A reduced part is also implausible when its norm exceeds the receiver's own by more than
/// this fraction. An honest result is a mean of members' values, so its norm is at most the
/// mean of theirs, and members that average regularly hold values of nearly the same norm
/// (measured: at most 0.1% above the receiver's own, 5 nodes on MNIST). Within the distance
/// bound alone a hostile reducer could grow its part by up to half every round, compounding
/// over rounds: a factor of 1.45 took a 5-node swarm from 92% to 79% test accuracy.
const MAX_NORM_GROWTH: f64 = 0.02;

impl Aggregation {
    /// Whether the rule refuses anything (the plain mean does not screen reduced parts).
    pub fn is_robust(self) -> bool {
        !matches!(self, Aggregation::Mean)
    }

    /// Checks the parameters are in range.
    pub fn validate(self) -> Result<(), String> {
        match self {
            Aggregation::Mean => Ok(()),
            Aggregation::TrimmedMean { trim } if trim > 0.0 && trim < 0.5 => Ok(()),
            Aggregation::TrimmedMean { trim } => Err(format!(
                "trimmed-mean fraction {trim} must be above 0 and below 0.5"
            )),
            Aggregation::CenteredClip { radius } if radius > 0.0 && radius.is_finite() => Ok(()),
            Aggregation::CenteredClip { radius } => {
                Err(format!("centered-clip radius {radius} must be positive"))
            }
        }
    }

    /// Combines `contributions` (each `len` values, in member order) into one part.
    pub fn reduce(self, contributions: &[&[f32]], len: usize) -> Vec<f32> {
        let n = contributions.len();
        if n == 0 {
            return vec![0.0; len];
        }
        match self {
            Aggregation::Mean => {
                let rows: Vec<Row> = contributions.iter().map(|c| Row::Values(c)).collect();
                mean(&rows, len)
            }
            Aggregation::TrimmedMean { trim } => {
                let k = ((f64::from(trim) * n as f64).ceil() as usize).min((n - 1) / 2);
                let mut column = Vec::with_capacity(n);
                (0..len)
                    .map(|i| {
                        column.clear();
                        column.extend(contributions.iter().map(|c| f64::from(c[i])));
                        column.sort_by(f64::total_cmp);
                        let kept = &column[k..n - k];
                        (kept.iter().sum::<f64>() / kept.len() as f64) as f32
                    })
                    .collect()
            }
            Aggregation::CenteredClip { radius } => centered_clip(contributions, len, radius),
        }
    }

    /// Whether a reduced part `reduced` is plausible given the receiver's own values `own`
    /// for that part (closer than half their norm, and not more than 2% larger); always
    /// true for the plain mean.
    pub fn plausible(self, own: &[f32], reduced: &[f32]) -> bool {
        if !self.is_robust() || own.len() != reduced.len() {
            return !self.is_robust() || own.len() == reduced.len();
        }
        let dist = l2(own
            .iter()
            .zip(reduced)
            .map(|(a, b)| f64::from(*a) - f64::from(*b)));
        let own_norm = l2(own.iter().map(|v| f64::from(*v)));
        let reduced_norm = l2(reduced.iter().map(|v| f64::from(*v)));
        let slack = 1e-6 * (own.len() as f64).sqrt();
        dist <= PLAUSIBLE_FRACTION * own_norm.max(reduced_norm) + slack
            && reduced_norm <= (1.0 + MAX_NORM_GROWTH) * own_norm + slack
    }
}

impl Aggregation {
    /// [`Aggregation::plausible`] for offsets from a shared `base`: compares
    /// the parameters they imply, `base - own` and `base - reduced`.
    pub fn plausible_around(self, base: &[f32], own: &[f32], reduced: &[f32]) -> bool {
        if base.len() != own.len() {
            return !self.is_robust();
        }
        let implied = |v: &[f32]| -> Vec<f32> { base.iter().zip(v).map(|(b, x)| b - x).collect() };
        self.plausible(&implied(own), &implied(reduced))
    }
}

fn l2(values: impl Iterator<Item = f64>) -> f64 {
    values.map(|v| v * v).sum::<f64>().sqrt()
}

/// Values summed at a time by [`mean`]: the f64 sums of a block stay in cache, and no
/// part-sized f64 buffer is allocated (and faulted in page by page) per reduction.
const MEAN_BLOCK: usize = 4096;

/// One member's values for a part, as its reducer holds them.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Row<'a> {
    /// The reducer's own values, the slot the result is written over (see
    /// [`Aggregation::reduce_into_own`]).
    Own,
    /// Decoded values (a part received in a lossy encoding).
    Values(&'a [f32]),
    /// A received f32 part's little-endian values, read where they lie in its frame
    /// (see [`crate::tensor::Payload::f32_le`]) instead of decoded into a copy first.
    F32Le(&'a [[u8; 4]]),
}

impl Row<'_> {
    /// Adds values `range` of the row (`own` for [`Row::Own`]) to `sums`, one
    /// per value; a row shorter than the range adds what it has.
    fn add_to(&self, own: &[f32], sums: &mut [f64], range: std::ops::Range<usize>) {
        match self {
            Row::Own => Row::Values(own).add_to(own, sums, range),
            Row::Values(v) => {
                for (s, v) in sums.iter_mut().zip(&v[clamp(&range, v.len())]) {
                    *s += f64::from(*v);
                }
            }
            Row::F32Le(b) => {
                for (s, b) in sums.iter_mut().zip(&b[clamp(&range, b.len())]) {
                    *s += f64::from(f32::from_le_bytes(*b));
                }
            }
        }
    }

    fn decoded<'a>(&'a self, own: &'a [f32]) -> std::borrow::Cow<'a, [f32]> {
        match self {
            Row::Own => std::borrow::Cow::Borrowed(own),
            Row::Values(v) => std::borrow::Cow::Borrowed(v),
            Row::F32Le(b) => b.iter().map(|b| f32::from_le_bytes(*b)).collect(),
        }
    }
}

impl Aggregation {
    /// [`Aggregation::reduce`] of `rows` (in member order, ours as [`Row::Own`]), written
    /// over `own`: the reducer's part of the round's vector becomes the result without a
    /// part-sized vector of its own. The mean sums received f32 parts where their bytes lie
    /// (the same result, bit for bit); the robust rules, which revisit every value, decode
    /// them first.
    pub(crate) fn reduce_into_own(self, rows: &[Row], own: &mut [f32]) {
        if self == Aggregation::Mean && !rows.is_empty() {
            mean_into(rows, own);
            return;
        }
        let result = {
            let decoded: Vec<_> = rows.iter().map(|r| r.decoded(own)).collect();
            let refs: Vec<&[f32]> = decoded.iter().map(|d| &d[..]).collect();
            self.reduce(&refs, own.len())
        };
        own.copy_from_slice(&result);
    }
}

/// The part of `range` inside a row of `len` values.
fn clamp(range: &std::ops::Range<usize>, len: usize) -> std::ops::Range<usize> {
    range.start.min(len)..range.end.min(len)
}

fn mean(rows: &[Row], len: usize) -> Vec<f32> {
    let mut out = vec![0.0; len];
    mean_into(rows, &mut out);
    out
}

/// The mean of `rows` written over `out` (which [`Row::Own`] rows read), a
/// block at a time: each block's sums are complete before its values are
/// written.
fn mean_into(rows: &[Row], out: &mut [f32]) {
    let n = rows.len() as f64;
    let len = out.len();
    let mut sums = [0f64; MEAN_BLOCK];
    let mut start = 0;
    while start < len {
        let end = (start + MEAN_BLOCK).min(len);
        let block = &mut sums[..end - start];
        block.fill(0.0);
        for row in rows {
            row.add_to(out, block, start..end);
        }
        for (dst, s) in out[start..end].iter_mut().zip(block.iter()) {
            *dst = (s / n) as f32;
        }
        start = end;
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

fn centered_clip(contributions: &[&[f32]], len: usize, radius: f32) -> Vec<f32> {
    let n = contributions.len();
    let mut column = vec![0f64; n];
    let mut centre: Vec<f64> = (0..len)
        .map(|i| {
            for (slot, c) in column.iter_mut().zip(contributions) {
                *slot = f64::from(c[i]);
            }
            median(&mut column)
        })
        .collect();
    let distance =
        |c: &[f32], centre: &[f64]| l2(c.iter().zip(centre).map(|(v, m)| f64::from(*v) - m));
    let mut distances: Vec<f64> = contributions.iter().map(|c| distance(c, &centre)).collect();
    let tau = f64::from(radius) * median(&mut distances);
    if tau <= 0.0 {
        // Most contributions coincide with the median: it is the answer.
        return centre.iter().map(|v| *v as f32).collect();
    }
    for _ in 0..CLIP_ITERATIONS {
        let mut step = vec![0f64; len];
        for c in contributions {
            let d = distance(c, &centre);
            let scale = if d > tau { tau / d } else { 1.0 };
            for ((s, v), m) in step.iter_mut().zip(c.iter()).zip(&centre) {
                *s += (f64::from(*v) - m) * scale;
            }
        }
        for (m, s) in centre.iter_mut().zip(&step) {
            *m += s / n as f64;
        }
    }
    centre.iter().map(|v| *v as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reduce(rule: Aggregation, rows: &[Vec<f32>]) -> Vec<f32> {
        let refs: Vec<&[f32]> = rows.iter().map(Vec::as_slice).collect();
        rule.reduce(&refs, rows[0].len())
    }

    #[test]
    fn the_blocked_mean_is_the_f64_mean_in_member_order_bit_for_bit() {
        // Lengths around the block size, and values whose sum order matters in f32.
        for len in [0, 1, MEAN_BLOCK - 1, MEAN_BLOCK, 2 * MEAN_BLOCK + 17] {
            let rows: Vec<Vec<f32>> = (0..3)
                .map(|r| {
                    (0..len)
                        .map(|i| ((i * 7 + r * 13) % 101) as f32 * 1e-3 + r as f32 * 1e7)
                        .collect()
                })
                .collect();
            let want: Vec<u32> = (0..len)
                .map(|i| {
                    let s: f64 = rows.iter().map(|r| f64::from(r[i])).sum();
                    ((s / 3.0) as f32).to_bits()
                })
                .collect();
            let got: Vec<u32> = reduce(Aggregation::Mean, &rows)
                .iter()
                .map(|v| v.to_bits())
                .collect();
            assert_eq!(got, want, "len {len}");
        }
    }

    #[test]
    fn results_written_over_our_row_are_the_reduction_of_its_values_bit_for_bit() {
        let len = 2 * MEAN_BLOCK + 5;
        let rows: Vec<Vec<f32>> = (0..4)
            .map(|r| {
                (0..len)
                    .map(|i| ((i * 11 + r * 5) % 97) as f32 * 1e-3 - r as f32 * 3e6)
                    .collect()
            })
            .collect();
        let bytes: Vec<Vec<[u8; 4]>> = rows
            .iter()
            .map(|r| r.iter().map(|v| v.to_le_bytes()).collect())
            .collect();
        // Member 1 is us; 2 sent a lossy part (decoded values); 0 and 3 sent f32 bytes.
        let mixed: Vec<Row> = (0..4)
            .map(|k| match k {
                1 => Row::Own,
                2 => Row::Values(&rows[2]),
                _ => Row::F32Le(&bytes[k]),
            })
            .collect();
        for rule in [
            Aggregation::Mean,
            Aggregation::TrimmedMean { trim: 0.25 },
            Aggregation::CenteredClip { radius: 2.0 },
        ] {
            let want: Vec<u32> = reduce(rule, &rows).iter().map(|v| v.to_bits()).collect();
            let mut own = rows[1].clone();
            rule.reduce_into_own(&mixed, &mut own);
            let got: Vec<u32> = own.iter().map(|v| v.to_bits()).collect();
            assert_eq!(got, want, "{rule:?}");
        }
        // Alone, the mean of our own values is themselves.
        let mut own = rows[0].clone();
        Aggregation::Mean.reduce_into_own(&[Row::Own], &mut own);
        assert_eq!(own, rows[0]);
    }

    #[test]
    fn trimmed_mean_drops_the_extremes_per_coordinate() {
        let rows = vec![
            vec![1.0, 10.0],
            vec![2.0, 20.0],
            vec![3.0, 30.0],
            vec![4.0, 40.0],
            vec![1000.0, -1000.0],
        ];
        // n = 5, trim 0.2: one value off each end; coordinate 0 keeps 2, 3, 4, coordinate 1
        // keeps 10, 20, 30.
        let got = reduce(Aggregation::TrimmedMean { trim: 0.2 }, &rows);
        assert_eq!(got, vec![3.0, 20.0]);
        // Four members, trim 0.2 still trims one each end (ceil), leaving the middle two.
        let got = reduce(Aggregation::TrimmedMean { trim: 0.2 }, &rows[1..]);
        assert_eq!(got, vec![3.5, 25.0]);
        // Two members: nothing can be trimmed, it is the mean.
        let got = reduce(Aggregation::TrimmedMean { trim: 0.4 }, &rows[..2]);
        assert_eq!(got, vec![1.5, 15.0]);
        assert_eq!(reduce(Aggregation::Mean, &rows[..2]), vec![1.5, 15.0]);
    }

    #[test]
    fn centered_clip_stays_near_the_honest_mean_when_one_member_flips_or_scales() {
        let honest: Vec<Vec<f32>> = (0..4)
            .map(|i| (0..8).map(|j| 1.0 + 0.01 * (i * 8 + j) as f32).collect())
            .collect();
        let honest_mean = reduce(Aggregation::Mean, &honest);
        for attack in [-1.0f32, 100.0, -50.0] {
            let mut rows = honest.clone();
            rows.push(honest[0].iter().map(|v| v * attack).collect());
            let plain = reduce(Aggregation::Mean, &rows);
            let clipped = reduce(Aggregation::CenteredClip { radius: 2.0 }, &rows);
            let trimmed = reduce(Aggregation::TrimmedMean { trim: 0.2 }, &rows);
            let err = |v: &[f32]| {
                l2(v.iter()
                    .zip(&honest_mean)
                    .map(|(a, b)| f64::from(*a) - f64::from(*b)))
            };
            // Both stay within the honest spread (0.24 per coordinate here); the mean does not.
            assert!(err(&plain) > 0.5, "attack {attack}: the mean should move");
            assert!(
                err(&clipped) < 0.2,
                "attack {attack}: clip error {}",
                err(&clipped)
            );
            assert!(
                err(&trimmed) < 0.2,
                "attack {attack}: trim error {}",
                err(&trimmed)
            );
        }
    }

    #[test]
    fn identical_contributions_reduce_to_themselves_under_every_rule() {
        let rows = vec![vec![0.5, -2.0, 3.25]; 3];
        for rule in [
            Aggregation::Mean,
            Aggregation::TrimmedMean { trim: 0.3 },
            Aggregation::CenteredClip { radius: 1.0 },
        ] {
            assert_eq!(reduce(rule, &rows), rows[0], "{rule:?}");
        }
    }

    #[test]
    fn a_flipped_or_scaled_reduced_part_is_implausible_an_averaged_one_is_not() {
        let rule = Aggregation::TrimmedMean { trim: 0.2 };
        let own: Vec<f32> = (0..16).map(|i| 0.1 * i as f32 - 0.7).collect();
        let averaged: Vec<f32> = own.iter().map(|v| v * 0.97 + 0.01).collect();
        assert!(rule.plausible(&own, &averaged));
        let flipped: Vec<f32> = own.iter().map(|v| -v).collect();
        let scaled: Vec<f32> = own.iter().map(|v| v * 10.0).collect();
        assert!(!rule.plausible(&own, &flipped));
        assert!(!rule.plausible(&own, &scaled));
        // Inflation inside the distance bound is refused; shrinking is not.
        let inflated: Vec<f32> = own.iter().map(|v| v * 1.45).collect();
        let grown: Vec<f32> = own.iter().map(|v| v * 1.03).collect();
        let shrunk: Vec<f32> = own.iter().map(|v| v * 0.6).collect();
        assert!(!rule.plausible(&own, &inflated));
        assert!(!rule.plausible(&own, &grown));
        assert!(rule.plausible(&own, &shrunk));
        let barely: Vec<f32> = own.iter().map(|v| v * 1.01).collect();
        assert!(rule.plausible(&own, &barely));
        // The plain mean accepts anything of the right length.
        assert!(Aggregation::Mean.plausible(&own, &flipped));
    }

    /// Pseudo-gradients of honest peers differ from their mean by about their
    /// own size (refused if screened as they are), but the parameters they
    /// imply around the shared reference are close; a far result still is not.
    #[test]
    fn offsets_are_screened_in_parameter_space() {
        let rule = Aggregation::TrimmedMean { trim: 0.2 };
        let base: Vec<f32> = (0..16).map(|i| 0.1 * i as f32 - 0.7).collect();
        let own: Vec<f32> = (0..16)
            .map(|i| if i % 2 == 0 { 0.01 } else { -0.01 })
            .collect();
        let mean: Vec<f32> = own.iter().map(|v| -0.2 * v).collect();
        assert!(!rule.plausible(&own, &mean));
        assert!(rule.plausible_around(&base, &own, &mean));
        let far: Vec<f32> = base.iter().map(|b| 2.0 * b).collect();
        assert!(!rule.plausible_around(&base, &own, &far));
        assert!(!rule.plausible_around(&base[..3], &own, &mean));
        assert!(Aggregation::Mean.plausible_around(&base, &own, &far));
    }

    #[test]
    fn parameters_out_of_range_are_refused() {
        assert!(Aggregation::TrimmedMean { trim: 0.5 }.validate().is_err());
        assert!(Aggregation::TrimmedMean { trim: 0.0 }.validate().is_err());
        assert!(Aggregation::CenteredClip { radius: 0.0 }
            .validate()
            .is_err());
        assert!(Aggregation::CenteredClip { radius: f32::NAN }
            .validate()
            .is_err());
        assert!(Aggregation::CenteredClip { radius: 2.0 }.validate().is_ok());
    }
}
