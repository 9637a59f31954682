//! `Part`s that arrive before our `Group` message, held for replay.
//!
//! Gossip and direct streams are not ordered, so a member's parts can overtake
//! the `Group` that tells us we reduce them. Replaying them once the group
//! forms saves waiting for the sender's retransmit. Until then nothing about a
//! part can be checked against a group, so what is held is bounded by what an
//! honest round could send us: all parts of a round together cover the model
//! once (twice if the round regroups), in at most 8 bytes per value (top-k's
//! index and value; dense encodings take at most 4), and one sender's parts
//! cover at most the whole model (twice). A hostile member can neither fill
//! our memory nor, past its own share, crowd out the honest members' parts.

use crate::tensor::Payload;
use crate::NodeId;

use super::config::MAX_GROUP_MEMBERS;

/// Bytes held per value of the model in all: every part twice (a regroup),
/// each value in the widest encoding.
const BYTES_PER_VALUE: usize = 2 * 8;

/// Bytes one sender's parts may take per value of the model: half of the
/// round's, so the other members' parts always find room.
const SENDER_BYTES_PER_VALUE: usize = BYTES_PER_VALUE / 2;

/// Parts held in all: a round has at most [`MAX_GROUP_MEMBERS`] parts, twice
/// with a regroup.
const MAX_PARTS: usize = 2 * MAX_GROUP_MEMBERS;

/// Bytes held in any case, so tiny models still get their parts' headers.
const MIN_BYTES: usize = 64 * 1024;

/// The early parts of the round in matchmaking.
#[derive(Debug, Default)]
pub(crate) struct EarlyParts {
    parts: Vec<(NodeId, u32, Payload)>,
}

impl EarlyParts {
    /// Holds `payload` for a model of `values` values unless it is a copy of
    /// one held (the first copy wins), longer than the model, or over the
    /// sender's or the round's share of bytes. Returns whether it was kept.
    pub(crate) fn keep(
        &mut self,
        from: NodeId,
        part: u32,
        payload: &Payload,
        values: usize,
    ) -> bool {
        let budget = |per_value: usize| values.saturating_mul(per_value).max(MIN_BYTES);
        let size = payload.bytes.len();
        let (mut total, mut from_sender, mut seen) = (0usize, 0usize, false);
        for (f, p, held) in &self.parts {
            total += held.bytes.len();
            if *f == from {
                from_sender += held.bytes.len();
                seen |= *p == part;
            }
        }
        let fits = payload.len as usize <= values
            && self.parts.len() < MAX_PARTS
            && from_sender.saturating_add(size) <= budget(SENDER_BYTES_PER_VALUE)
            && total.saturating_add(size) <= budget(BYTES_PER_VALUE);
        if seen || !fits {
            return false;
        }
        self.parts.push((from, part, payload.clone()));
        true
    }

    /// Hands over every part held, in arrival order, and forgets them.
    pub(crate) fn take(&mut self) -> Vec<(NodeId, u32, Payload)> {
        std::mem::take(&mut self.parts)
    }

    /// Forgets every part held (the round ended).
    pub(crate) fn clear(&mut self) {
        self.parts.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> NodeId {
        NodeId([n; 32])
    }

    fn payload(values: usize) -> Payload {
        Payload::from_f32(&vec![1.0; values])
    }

    #[test]
    fn first_copy_of_each_part_is_kept_and_handed_over_in_order() {
        let mut early = EarlyParts::default();
        assert!(early.keep(id(1), 0, &payload(10), 40));
        assert!(!early.keep(id(1), 0, &payload(10), 40), "a copy");
        assert!(early.keep(id(2), 1, &payload(10), 40));
        let held: Vec<(NodeId, u32)> = early.take().iter().map(|(f, p, _)| (*f, *p)).collect();
        assert_eq!(held, [(id(1), 0), (id(2), 1)]);
        assert!(early.take().is_empty());
    }

    #[test]
    fn one_sender_gets_at_most_half_the_room() {
        let mut early = EarlyParts::default();
        // A model of 100k values: 800 kB per sender, 1.6 MB in all.
        let values = 100_000;
        // An honest sender's five parts of a fifth of the model each (more
        // parts than members), twice over (a regroup), all fit.
        for part in 0..10 {
            assert!(
                early.keep(id(7), part, &payload(values / 5), values),
                "part {part}"
            );
        }
        assert!(
            !early.keep(id(7), 10, &payload(values / 5), values),
            "past its half"
        );
        assert!(
            early.keep(id(8), 0, &payload(values), values),
            "others keep their room"
        );
    }

    #[test]
    fn parts_longer_than_the_model_or_over_the_round_budget_are_refused() {
        let mut early = EarlyParts::default();
        assert!(
            !early.keep(id(1), 0, &payload(41), 40),
            "longer than the model"
        );
        // A model of 100k values: 1.6 MB of early parts in all, four whole models.
        let values = 100_000;
        let big = payload(values); // 400 kB of f32
        for sender in 0..4 {
            assert!(early.keep(id(sender), 0, &big, values));
        }
        assert!(
            !early.keep(id(4), 0, &big, values),
            "a fifth whole model is over budget"
        );
        early.clear();
        assert!(
            early.keep(id(4), 0, &big, values),
            "the budget is per round"
        );
    }
}
