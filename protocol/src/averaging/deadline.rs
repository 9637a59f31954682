//! Round deadlines fitted to the rounds this peer has measured.
//!
//! A fixed timeout is a guess: a member that crashes mid-round costs every
//! survivor the whole timeout (30 s by default on the command line) even when
//! rounds take a fraction of a second. So each peer times what healthy rounds
//! took and waits [`FACTOR`] times the slowest of the last [`WINDOW`], kept
//! between a floor and the configured value. Three waits are fitted this way:
//!
//! - the all-reduce ([`ReduceDeadline`]): rounds finished with every member;
//! - the leader's join window ([`MatchmakingDeadlines::join_window`]): how long
//!   after our start the last peer of our live view joined, in rounds where
//!   all of them did (a round that closed on the window measures nothing);
//! - a member's wait for the leader's `Group`
//!   ([`MatchmakingDeadlines::group_wait`]): how long after our start it came.
//!
//! The configured value stays the ceiling of each: a deadline that could grow
//! on its own could be stretched without end by a member that answers just
//! before it every round.

use std::collections::VecDeque;
use std::time::Duration;

/// Multiple of the slowest recent measurement a deadline allows.
pub const FACTOR: u32 = 4;
/// Measurements a deadline looks back on.
pub const WINDOW: usize = 8;
/// Measurements taken before a deadline moves off the configured one.
pub const MIN_SAMPLES: usize = 3;
/// Lowest fitted reduce deadline: above a transport's dead-peer detection
/// (4 s over QUIC), so a peer that only hiccups is not dropped on a busy machine.
pub const FLOOR: Duration = Duration::from_secs(5);
/// Lowest fitted join window. Closing early is cheap for a straggler (its
/// `Join` is answered with the closed `Group` and it finishes that round
/// alone), so this only has to cover scheduling noise on a busy machine.
pub const JOIN_FLOOR: Duration = Duration::from_secs(2);
/// How much longer than its own join window a member waits for the `Group` at
/// least. Giving up is expensive (the leader then waits the reduce deadline
/// for our parts), so this stays well above a leader's window.
pub const GROUP_MARGIN: Duration = Duration::from_secs(4);

/// The slowest of the last [`WINDOW`] measurements, once there are
/// [`MIN_SAMPLES`] of them.
#[derive(Clone, Debug, Default, PartialEq)]
struct Samples(VecDeque<Duration>);

impl Samples {
    fn push(&mut self, took: Duration) {
        if self.0.len() == WINDOW {
            self.0.pop_front();
        }
        self.0.push_back(took);
    }

    /// `FACTOR` x the slowest sample within `floor..=ceiling` (the floor
    /// never above the ceiling), or `ceiling` while too few are measured.
    fn fit(&self, floor: Duration, ceiling: Duration) -> Duration {
        if self.0.len() < MIN_SAMPLES {
            return ceiling;
        }
        let slowest = self.0.iter().max().copied().unwrap_or_default();
        slowest
            .saturating_mul(FACTOR)
            .max(floor.min(ceiling))
            .min(ceiling)
    }
}

/// The reduce deadline of one peer; see the module docs.
#[derive(Clone, Debug, PartialEq)]
pub struct ReduceDeadline {
    ceiling: Duration,
    samples: Samples,
}

impl ReduceDeadline {
    /// Starts at `configured`, which also stays the ceiling.
    pub fn new(configured: Duration) -> Self {
        ReduceDeadline {
            ceiling: configured,
            samples: Samples::default(),
        }
    }

    /// The deadline for the next all-reduce.
    pub fn current(&self) -> Duration {
        self.samples.fit(FLOOR, self.ceiling)
    }

    /// An all-reduce finished with every member after `took`.
    pub fn observe_complete(&mut self, took: Duration) {
        self.samples.push(took);
    }

    /// Complete rounds measured so far (at most [`WINDOW`]).
    pub fn samples(&self) -> usize {
        self.samples.0.len()
    }
}

/// The join window and the wait for a `Group` of one peer; see the module docs.
#[derive(Clone, Debug, PartialEq)]
pub struct MatchmakingDeadlines {
    window_ceiling: Duration,
    give_up_ceiling: Duration,
    joins: Samples,
    groups: Samples,
}

impl MatchmakingDeadlines {
    /// Starts at the configured `join_window` and `join_window + group_timeout`
    /// (the ceilings).
    pub fn new(join_window: Duration, group_timeout: Duration) -> Self {
        MatchmakingDeadlines {
            window_ceiling: join_window,
            give_up_ceiling: join_window.saturating_add(group_timeout),
            joins: Samples::default(),
            groups: Samples::default(),
        }
    }

    /// How long after its start a leader waits for the rest of its live view.
    pub fn join_window(&self) -> Duration {
        self.joins.fit(JOIN_FLOOR, self.window_ceiling)
    }

    /// How long after its start a member waits for its leader's `Group`
    /// before finishing the round alone: never less than our own join window
    /// plus [`GROUP_MARGIN`].
    pub fn group_wait(&self) -> Duration {
        let floor = self.join_window().saturating_add(GROUP_MARGIN);
        self.groups.fit(floor, self.give_up_ceiling)
    }

    /// Every peer of our live view had joined `took` after our start.
    pub fn observe_joins(&mut self, took: Duration) {
        self.joins.push(took);
    }

    /// Our leader's `Group` came `took` after our start.
    pub fn observe_group(&mut self, took: Duration) {
        self.groups.push(took);
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

#[cfg(test)]
mod matchmaking_tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn the_join_window_fits_the_join_spread_within_floor_and_ceiling() {
        let mut d = MatchmakingDeadlines::new(Duration::from_secs(5), Duration::from_secs(10));
        assert_eq!(d.join_window(), Duration::from_secs(5));
        assert_eq!(d.group_wait(), Duration::from_secs(15));
        for t in [100, 700, 50] {
            d.observe_joins(ms(t));
        }
        assert_eq!(
            d.join_window(),
            ms(2_800),
            "4 x the slowest spread (700 ms)"
        );
        d.observe_joins(ms(3_000));
        assert_eq!(d.join_window(), Duration::from_secs(5), "capped");
        for _ in 0..WINDOW {
            d.observe_joins(ms(10));
        }
        assert_eq!(d.join_window(), JOIN_FLOOR, "the slow spread aged out");
    }

    #[test]
    fn the_group_wait_stays_a_margin_above_our_own_join_window() {
        let mut d = MatchmakingDeadlines::new(Duration::from_secs(5), Duration::from_secs(10));
        for _ in 0..MIN_SAMPLES {
            d.observe_joins(ms(10));
            d.observe_group(ms(20));
        }
        assert_eq!(d.group_wait(), JOIN_FLOOR + GROUP_MARGIN);
        for t in [500, 400, 600] {
            d.observe_joins(ms(t));
        }
        assert_eq!(d.join_window(), ms(2_400));
        assert_eq!(
            d.group_wait(),
            ms(2_400) + GROUP_MARGIN,
            "follows the window"
        );
        d.observe_group(ms(2_000));
        assert_eq!(d.group_wait(), ms(8_000), "4 x a slow leader");
        d.observe_group(ms(9_000));
        assert_eq!(d.group_wait(), Duration::from_secs(15), "capped");
    }

    #[test]
    fn a_configured_window_below_the_floors_is_kept() {
        let mut d = MatchmakingDeadlines::new(ms(300), ms(200));
        for _ in 0..WINDOW {
            d.observe_joins(ms(1));
            d.observe_group(ms(1));
        }
        assert_eq!(d.join_window(), ms(300));
        assert_eq!(d.group_wait(), ms(500));
    }
}
