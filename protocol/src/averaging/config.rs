//! Timeouts, group size and the hard limits of an averaging round.

use crate::tensor::{Encoding, TensorError};
use std::time::Duration;

/// Most members a group may have; also bounds every id list and part index on the wire and
/// the joiners buffered per round.
pub const MAX_GROUP_MEMBERS: usize = 1024;

/// Longest vector (in values) a round may average: a part must fit a payload's `u32` length.
pub const MAX_VECTOR_LEN: u64 = u32::MAX as u64;

/// How far past our current (or last finished) round a `Join` may be and still be buffered.
pub const MAX_ROUNDS_AHEAD: u64 = 4;

/// How many future rounds' `Join`s are buffered at once.
pub const MAX_BUFFERED_ROUNDS: usize = 4;

/// Default [`AveragingConfig::part_values`]: 4 MB of f32, small enough that a 10M-value
/// vector streams in several parts per member, large enough that per-message costs
/// (a stream, an acknowledgement, a digest) stay negligible.
pub const DEFAULT_PART_VALUES: usize = 1 << 20;

/// Shortest retry interval actually used, so a zero setting cannot spin the driver.
const MIN_RETRY: Duration = Duration::from_millis(1);

/// Timing and size knobs of an averaging round. All times are relative; the state machine
/// adds them to the `now` values it is given.
#[derive(Clone, Debug, PartialEq)]
pub struct AveragingConfig {
    /// How long the leader waits for `Join`s before closing the group (it closes earlier when
    /// every peer of its live view has joined). With `adaptive_deadline`, the ceiling.
    pub join_window: Duration,
    /// How long, after the join window, a non-leader waits for a `Group` before finishing
    /// the round alone. With `adaptive_deadline`, `join_window + group_timeout` is the
    /// ceiling of that whole wait.
    pub group_timeout: Duration,
    /// How long after group formation the all-reduce may take; silent members are dropped
    /// at this deadline instead of being waited for. With `adaptive_deadline`, the ceiling.
    pub reduce_timeout: Duration,
    /// Fit the reduce deadline, the join window and the wait for a `Group` to the rounds
    /// measured so far (see [`deadline`](super::deadline)), within the configured values,
    /// instead of always waiting those for a silent member or leader.
    pub adaptive_deadline: bool,
    /// How often unacknowledged `Part`s are re-sent (at least 1 ms is used). Parts are
    /// large: on a reliable transport keep this long.
    pub retry_interval: Duration,
    /// How often `Join` is re-broadcast while matchmaking (at least 1 ms is used). Joins
    /// are tiny and a re-sent one makes the leader re-send a lost `Group`, so this can be
    /// short even where `retry_interval` is long.
    pub join_retry_interval: Duration,
    /// Largest group the leader forms (clamped to `1..=MAX_GROUP_MEMBERS`). Its `Group`
    /// carries every member's join proof (about 130 bytes per member with the node's
    /// Ed25519 proofs), so a transport with a message limit caps it too: the node's
    /// 64 KiB gossip limit holds about 500 members.
    pub max_group_size: usize,
    /// How this peer encodes its `Part` and `Reduced` payloads (the swarm's
    /// `--compression`): trades exactness for traffic. Only dense encodings (f32, f16, bf16,
    /// int8) can carry parameters; [`AveragingConfig::validate`] refuses top-k and a bad int8
    /// block, and an [`Averager`](super::Averager) given one anyway sends `F32`. Received
    /// payloads are accepted in any dense encoding.
    pub compression: Encoding,
    /// The values are sparse pseudo-gradients (top-k with error feedback upstream, see
    /// [`ErrorFeedback::sparsify`](crate::tensor::ErrorFeedback::sparsify)): a part or reduced
    /// part travels as exact `(index, value)` entries of its nonzero values whenever that is
    /// smaller than `compression` (which stays the dense fallback), and sparse payloads are
    /// accepted. Off, a sparse payload is refused: it would average dropped parameters as
    /// zeros. All members of a swarm must agree.
    pub sparse: bool,
    /// How a reducer combines its part's contributions (the swarm's `--aggregation`), and
    /// whether members screen the reduced parts they receive (robust rules only).
    pub aggregation: super::Aggregation,
    /// Values per part above which a member's share of a long vector is cut into several
    /// parts ([`AveragingConfig::part_count`]), so reduced parts stream back while later
    /// ones still arrive. Changes how parts are numbered: all members of a swarm must agree
    /// (members that do not refuse each other's parts with a message saying so).
    pub part_values: usize,
}

/// Why an [`AveragingConfig`] cannot be used as given.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AveragingConfigError {
    /// Top-k drops values; averaged parameters would be pulled toward zero.
    #[error(
        "compression {0} is sparse and cannot average parameters (dropped values would count \
         as zeros); use f32, f16, bf16 or int8 (top-k is for pseudo-gradients)"
    )]
    SparseCompression(Encoding),
    /// The encoding's own parameters are invalid (int8 block size).
    #[error("compression: {0}")]
    Compression(#[from] TensorError),
}

impl Default for AveragingConfig {
    /// Values for peers on one LAN or a decent WAN: 2 s to gather, 5 s more to hear from the
    /// leader, 10 s for the all-reduce, retries every 500 ms, groups of up to 64.
    fn default() -> Self {
        AveragingConfig {
            join_window: Duration::from_secs(2),
            group_timeout: Duration::from_secs(5),
            reduce_timeout: Duration::from_secs(10),
            adaptive_deadline: false,
            retry_interval: Duration::from_millis(500),
            join_retry_interval: Duration::from_millis(500),
            max_group_size: 64,
            compression: Encoding::F32,
            sparse: false,
            aggregation: super::Aggregation::Mean,
            part_values: DEFAULT_PART_VALUES,
        }
    }
}

impl AveragingConfig {
    /// Refuses settings no round can use: a sparse (top-k) compression or an invalid int8
    /// block. The durations and group size need no check (they are clamped). A node checks
    /// this at startup so a bad `--compression` fails loudly instead of silently sending f32.
    pub fn validate(&self) -> Result<(), AveragingConfigError> {
        self.compression.validate()?;
        if !self.compression.is_dense() {
            return Err(AveragingConfigError::SparseCompression(self.compression));
        }
        Ok(())
    }

    /// The encoding actually sent: `compression`, or `F32` if [`AveragingConfig::validate`]
    /// refuses it.
    pub(crate) fn wire_encoding(&self) -> Encoding {
        if self.validate().is_ok() {
            self.compression
        } else {
            Encoding::F32
        }
    }

    /// The retry interval actually used.
    pub(crate) fn retry(&self) -> Duration {
        self.retry_interval.max(MIN_RETRY)
    }

    /// The `Join` re-broadcast interval actually used.
    pub(crate) fn join_retry(&self) -> Duration {
        self.join_retry_interval.max(MIN_RETRY)
    }

    /// The group size limit actually used.
    pub(crate) fn group_limit(&self) -> usize {
        self.max_group_size.clamp(1, MAX_GROUP_MEMBERS)
    }

    /// How many parts a round over `len` values among `members` members has: one per
    /// member, or several per member (the same number for each) when a member's share is
    /// longer than [`AveragingConfig::part_values`], at most [`MAX_GROUP_MEMBERS`] in all.
    /// Part `k` is reduced by member `k mod members`. Every member computes the same count.
    pub fn part_count(&self, len: usize, members: usize) -> usize {
        let members = members.clamp(1, MAX_GROUP_MEMBERS);
        let per_member = len / members / self.part_values.max(1);
        members * per_member.clamp(1, MAX_GROUP_MEMBERS / members)
    }

    /// When, after group formation, a reducer stops waiting for contributions: three
    /// quarters of the reduce timeout, leaving the last quarter for `Reduced` to travel.
    pub(crate) fn reducer_wait(&self) -> Duration {
        self.reduce_timeout - self.reduce_timeout / 4
    }
}

/// How a part of `values` travels: exact sparse entries of its nonzero values when the
/// swarm's values are [`sparse`](AveragingConfig::sparse) and that is smaller than `dense`,
/// else `dense`. Sparse entries cost 8 bytes each, so a part denser than half (a quarter
/// against f16, an eighth against int8) goes dense.
pub(crate) fn part_encoding(values: &[f32], dense: Encoding, sparse: bool) -> Encoding {
    if !sparse {
        return dense;
    }
    let Ok(len) = u32::try_from(values.len()) else {
        return dense;
    };
    let nonzero = values.iter().filter(|v| **v != 0.0).count() as u32;
    let entries = Encoding::TopK { k: nonzero };
    match (entries.encoded_bytes(len), dense.encoded_bytes(len)) {
        (Ok(s), Ok(d)) if s < d => entries,
        _ => dense,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_vectors_get_several_parts_per_member_within_the_limit() {
        let cfg = AveragingConfig::default();
        // Short vectors (every model we bundle): one part per member.
        assert_eq!(cfg.part_count(269_322, 4), 4);
        assert_eq!(cfg.part_count(3, 8), 8);
        assert_eq!(cfg.part_count(0, 1), 1);
        // 10M values: 5M per member of a pair, 4 parts of at least 1Mi values each.
        assert_eq!(cfg.part_count(10_000_000, 2), 8);
        assert_eq!(cfg.part_count(25_000_000, 4), 20);
        // Never more parts than the wire allows, always a multiple of the members.
        let tiny = AveragingConfig {
            part_values: 1,
            ..cfg
        };
        assert_eq!(tiny.part_count(1_000_000, 2), MAX_GROUP_MEMBERS);
        assert_eq!(tiny.part_count(1_000_000, 3), 1023);
        assert_eq!(
            tiny.part_count(1_000_000, MAX_GROUP_MEMBERS),
            MAX_GROUP_MEMBERS
        );
        assert_eq!(tiny.part_count(1_000_000, 5_000), MAX_GROUP_MEMBERS);
    }

    #[test]
    fn effective_values_are_clamped() {
        let cfg = AveragingConfig {
            retry_interval: Duration::ZERO,
            max_group_size: 0,
            reduce_timeout: Duration::from_secs(8),
            ..AveragingConfig::default()
        };
        assert_eq!(cfg.retry(), MIN_RETRY);
        assert_eq!(cfg.group_limit(), 1);
        assert_eq!(cfg.reducer_wait(), Duration::from_secs(6));
        let cfg = AveragingConfig {
            max_group_size: usize::MAX,
            reduce_timeout: Duration::MAX,
            ..AveragingConfig::default()
        };
        assert_eq!(cfg.group_limit(), MAX_GROUP_MEMBERS);
        assert!(cfg.reducer_wait() < Duration::MAX);
    }

    #[test]
    fn compression_is_validated_and_falls_back_to_f32() {
        let with = |compression| AveragingConfig {
            compression,
            ..AveragingConfig::default()
        };
        assert_eq!(AveragingConfig::default().compression, Encoding::F32);
        for ok in [
            Encoding::F32,
            Encoding::F16,
            Encoding::Bf16,
            Encoding::Int8 { block: 1 },
            Encoding::Int8 { block: 65_536 },
        ] {
            assert_eq!(with(ok).validate(), Ok(()));
            assert_eq!(with(ok).wire_encoding(), ok);
        }
        let topk = Encoding::TopK { k: 10 };
        assert_eq!(
            with(topk).validate(),
            Err(AveragingConfigError::SparseCompression(topk))
        );
        assert!(with(topk)
            .validate()
            .is_err_and(|e| e.to_string().contains("pseudo-gradients")));
        assert_eq!(with(topk).wire_encoding(), Encoding::F32);
        let bad = Encoding::Int8 { block: 0 };
        assert_eq!(
            with(bad).validate(),
            Err(AveragingConfigError::Compression(TensorError::BadBlock {
                block: 0
            }))
        );
        assert_eq!(with(bad).wire_encoding(), Encoding::F32);
    }
}
