//! The all-reduce deadline, fitted to the rounds this peer has measured.
//!
//! A fixed reduce timeout is a guess: a member that crashes mid-round costs
//! every survivor the whole timeout (30 s by default on the command line)
//! even when rounds take a fraction of a second. So each peer times the
//! all-reduces it finished with every member (rounds that dropped someone
//! ran into the deadline and measure nothing) and uses [`FACTOR`] times the
//! slowest of the last [`WINDOW`], kept between a floor and the configured
//! timeout. The configured timeout stays the ceiling: a deadline that could
//! grow on its own could be stretched without end by a member that answers
//! just before it every round.

use std::collections::VecDeque;
use std::time::Duration;

/// Multiple of the slowest recent all-reduce the deadline allows.
pub const FACTOR: u32 = 4;
/// Complete rounds the estimate looks back on.
pub const WINDOW: usize = 8;
/// Complete rounds measured before the deadline moves off the configured one.
pub const MIN_SAMPLES: usize = 3;
/// Lowest adapted deadline: above a transport's dead-peer detection (4 s
/// over QUIC), so a peer that only hiccups is not dropped on a busy machine.
pub const FLOOR: Duration = Duration::from_secs(5);

/// The reduce deadline of one peer; see the module docs.
#[derive(Clone, Debug, PartialEq)]
pub struct ReduceDeadline {
    ceiling: Duration,
    samples: VecDeque<Duration>,
}

impl ReduceDeadline {
    /// Starts at `configured`, which also stays the ceiling.
    pub fn new(configured: Duration) -> Self {
        ReduceDeadline {
            ceiling: configured,
            samples: VecDeque::with_capacity(WINDOW),
        }
    }

    /// The deadline for the next all-reduce.
    pub fn current(&self) -> Duration {
        if self.samples.len() < MIN_SAMPLES {
            return self.ceiling;
        }
        let slowest = self.samples.iter().max().copied().unwrap_or_default();
        slowest
            .saturating_mul(FACTOR)
            .max(FLOOR.min(self.ceiling))
            .min(self.ceiling)
    }

    /// An all-reduce finished with every member after `took`.
    pub fn observe_complete(&mut self, took: Duration) {
        if self.samples.len() == WINDOW {
            self.samples.pop_front();
        }
        self.samples.push_back(took);
    }

    /// Complete rounds measured so far (at most [`WINDOW`]).
    pub fn samples(&self) -> usize {
        self.samples.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn fast_rounds_shrink_the_deadline_to_the_floor_and_no_lower() {
        let mut d = ReduceDeadline::new(Duration::from_secs(30));
        for _ in 0..MIN_SAMPLES - 1 {
            d.observe_complete(ms(200));
            assert_eq!(d.current(), Duration::from_secs(30), "too few samples yet");
        }
        d.observe_complete(ms(200));
        assert_eq!(d.current(), FLOOR);
    }

    #[test]
    fn the_slowest_recent_round_sets_the_deadline_within_the_ceiling() {
        let mut d = ReduceDeadline::new(Duration::from_secs(30));
        for t in [2000, 1000, 1500] {
            d.observe_complete(ms(t));
        }
        assert_eq!(d.current(), ms(8000), "4 x the slowest (2 s)");
        d.observe_complete(ms(9000));
        assert_eq!(d.current(), Duration::from_secs(30), "4 x 9 s is capped");
        // The slow round ages out after WINDOW more.
        for _ in 0..WINDOW {
            d.observe_complete(ms(1000));
        }
        assert_eq!(d.samples(), WINDOW);
        assert_eq!(d.current(), FLOOR);
    }

    #[test]
    fn a_configured_deadline_below_the_floor_is_kept() {
        let mut d = ReduceDeadline::new(ms(800));
        for _ in 0..WINDOW {
            d.observe_complete(ms(10));
        }
        assert_eq!(
            d.current(),
            ms(800),
            "the floor never exceeds the configured deadline"
        );
    }
}
