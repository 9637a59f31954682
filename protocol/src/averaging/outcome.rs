//! What an [`Averager`](super::Averager) hands back to its driver: messages to send, events,
//! round results and errors.

use super::AvgMessage;
use crate::NodeId;
use std::collections::VecDeque;
use std::ops::Range;

/// Where a [`Transmit`] goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Destination {
    /// Every peer, via gossip (small control messages: `Join`, `Group`).
    Broadcast,
    /// One peer, directly (tensors and targeted re-sends).
    Peer(NodeId),
}

/// A message the driver must send.
#[derive(Clone, Debug, PartialEq)]
pub struct Transmit {
    /// Recipient(s).
    pub to: Destination,
    /// The message.
    pub msg: AvgMessage,
}

/// How one part of the vector ended up, so the caller can see which values were averaged and
/// with whom.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartOutcome {
    /// The values of the vector this part covers.
    pub range: Range<usize>,
    /// Whose initial values were averaged into this range, ascending. For a part that was
    /// not averaged this is just ourselves, so "the range holds the mean over
    /// `contributors`" always holds (exactly with f32 compression, within the codec's error
    /// bound otherwise).
    pub contributors: Vec<NodeId>,
    /// Whether the range holds its reducer's result (otherwise it keeps our local values).
    pub averaged: bool,
}

/// The result of one averaging round.
#[derive(Clone, Debug, PartialEq)]
pub struct RoundOutcome {
    /// The round.
    pub round: u64,
    /// The group, ascending; `[me]` if the round finished alone.
    pub group: Vec<NodeId>,
    /// The full vector after the round: averaged parts replaced, the rest local.
    pub values: Vec<f32>,
    /// One entry per part, in order (`split_ranges(len, part_count)`, see
    /// [`AveragingConfig::part_count`](super::AveragingConfig::part_count)): one per member
    /// for short vectors, part k reduced by member `k mod group.len()`.
    pub parts: Vec<PartOutcome>,
    /// Other members that failed us somewhere: missing from an averaged part's contributors,
    /// or the reducer of a part we never got. Ascending, never ourselves.
    pub dropped: Vec<NodeId>,
}

/// Something the driver should know about.
#[derive(Clone, Debug, PartialEq)]
pub enum AvgEvent {
    /// We are in a group for `round` (as leader or member).
    GroupFormed {
        /// The round.
        round: u64,
        /// The members, ascending.
        members: Vec<NodeId>,
    },
    /// The round in flight finished (exactly once per started round).
    Finished(RoundOutcome),
    /// A message was refused; `reason` says what was wrong. Worth logging, and a peer that
    /// keeps causing these deserves suspicion.
    Rejected {
        /// The sender.
        from: NodeId,
        /// What was wrong.
        reason: String,
    },
}

/// Why [`Averager::start_round`](super::Averager::start_round) refused to start.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AveragingError {
    /// A round is still running.
    #[error(
        "round {round} is still in flight; wait for its Finished event before starting another"
    )]
    InFlight {
        /// The round in flight.
        round: u64,
    },
    /// The round number does not move forward.
    #[error(
        "round {round} is not after the last finished round {last}; round numbers must increase"
    )]
    Stale {
        /// The requested round.
        round: u64,
        /// The last finished round.
        last: u64,
    },
    /// The vector is longer than a round can carry.
    #[error("vector of {len} values exceeds the {max}-value limit of an averaging round")]
    TooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: u64,
    },
    /// The vector holds NaN or infinity; peers would refuse it.
    #[error("value at index {index} is NaN or infinite; refusing to average a diverged model")]
    NonFinite {
        /// Position of the first bad value.
        index: usize,
    },
    /// The plausibility reference does not match the vector averaged.
    #[error("plausibility reference of {got} values for a vector of {want}")]
    ReferenceLength {
        /// The vector's length.
        want: usize,
        /// The reference's length.
        got: usize,
    },
}

/// A message waiting in the [`Outbox`].
#[derive(Debug)]
pub(crate) enum Pending {
    /// Built already.
    Ready(Transmit),
    /// Our `Part` of the all-reduce in flight, encoded only when the driver takes it, so
    /// the messages before it (the leader's `Group`, earlier parts) leave first and the
    /// transport sends one part while the next is being encoded.
    Part {
        /// Its reducer.
        to: NodeId,
        /// The round.
        round: u64,
        /// The part index.
        part: u32,
    },
}

/// The queues of outputs the driver polls.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    pub(crate) transmits: VecDeque<Pending>,
    pub(crate) events: VecDeque<AvgEvent>,
}

impl Outbox {
    /// Queues a message.
    pub(crate) fn send(&mut self, to: Destination, msg: AvgMessage) {
        self.transmits
            .push_back(Pending::Ready(Transmit { to, msg }));
    }

    /// Queues our `Part` `part` of `round` for `to`, to be encoded when polled.
    pub(crate) fn send_part(&mut self, to: NodeId, round: u64, part: u32) {
        self.transmits.push_back(Pending::Part { to, round, part });
    }

    /// Queues an event.
    pub(crate) fn event(&mut self, event: AvgEvent) {
        self.events.push_back(event);
    }

    /// Queues a `Rejected` event.
    pub(crate) fn reject(&mut self, from: NodeId, reason: impl Into<String>) {
        self.events.push_back(AvgEvent::Rejected {
            from,
            reason: reason.into(),
        });
    }
}

/// The outcome of a round that found no group: values unchanged, nothing averaged.
pub(crate) fn solo_outcome(me: NodeId, round: u64, values: Vec<f32>) -> RoundOutcome {
    RoundOutcome {
        round,
        group: vec![me],
        parts: vec![PartOutcome {
            range: 0..values.len(),
            contributors: vec![me],
            averaged: false,
        }],
        values,
        dropped: Vec::new(),
    }
}
