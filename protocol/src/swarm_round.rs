//! The round the swarm has reached, as its members report it.
//!
//! A node that is behind (a late joiner, a restarted or slow peer) numbers its
//! next round like the swarm does, and a node whose swarm is past the end of
//! its run ends on the swarm's model. Both follow what members say about their
//! rounds, so one member's word alone must not decide it: a single peer
//! claiming round 2^64 - 1 would otherwise end every node's run at once. The
//! figure is the second-highest member's round, which a lone peer moves only
//! while it is the only member heard from.

use std::collections::BTreeMap;

use crate::NodeId;

/// Each member's highest reported round, and the round they put the swarm at.
#[derive(Clone, Debug, Default)]
pub struct SwarmRound {
    reported: BTreeMap<NodeId, u64>,
}

impl SwarmRound {
    /// Notes that `peer` is ready for `round` (its Join, one past its
    /// Progress or state claim). Members only move forward, so a lower round
    /// than it reported before changes nothing.
    pub fn record(&mut self, peer: NodeId, round: u64) {
        let r = self.reported.entry(peer).or_insert(round);
        *r = (*r).max(round);
    }

    /// Drops a member that left: it no longer speaks for the swarm.
    pub fn forget(&mut self, peer: &NodeId) {
        self.reported.remove(peer);
    }

    /// The round the swarm is at: the second-highest member's round, or the
    /// only member's while just one has reported (0 before any).
    pub fn round(&self) -> u64 {
        let (mut first, mut second) = (0, 0);
        for &r in self.reported.values() {
            if r > first {
                second = first;
                first = r;
            } else if r > second {
                second = r;
            }
        }
        if self.reported.len() < 2 {
            first
        } else {
            second
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> NodeId {
        NodeId::from_key_bytes(&[n])
    }

    #[test]
    fn one_member_alone_sets_the_round() {
        let mut s = SwarmRound::default();
        assert_eq!(s.round(), 0);
        s.record(id(1), 7);
        assert_eq!(s.round(), 7);
        s.record(id(1), 5);
        assert_eq!(s.round(), 7, "members only move forward");
    }

    #[test]
    fn a_single_member_cannot_push_the_swarm_ahead() {
        let mut s = SwarmRound::default();
        s.record(id(1), 40);
        s.record(id(2), u64::MAX);
        assert_eq!(s.round(), 40);
        s.record(id(3), 41);
        assert_eq!(s.round(), 41);
        // Two members that agree on a later round move it.
        s.record(id(4), 90);
        s.record(id(1), 90);
        assert_eq!(s.round(), 90);
    }

    #[test]
    fn equal_reports_count_each() {
        let mut s = SwarmRound::default();
        s.record(id(1), 12);
        s.record(id(2), 12);
        assert_eq!(s.round(), 12);
    }

    #[test]
    fn a_member_that_left_no_longer_counts() {
        let mut s = SwarmRound::default();
        s.record(id(1), 30);
        s.record(id(2), 20);
        s.record(id(3), 10);
        assert_eq!(s.round(), 20);
        s.forget(&id(1));
        assert_eq!(s.round(), 10);
        s.forget(&id(3));
        assert_eq!(s.round(), 20);
    }
}
