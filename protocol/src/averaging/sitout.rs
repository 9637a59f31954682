//! Members that keep stalling rounds sit out the next ones.
//!
//! A member dropped from a round (it joined the group, then never sent its
//! contributions or its reduced part) costs every other member the reduce
//! deadline. Once is a hiccup; a member that does it every round (hostile,
//! or stuck) would cost that deadline every round. So each peer counts the
//! strikes of the members its rounds dropped: from the second unforgiven
//! strike on, the member sits out the next rounds, 2 after the second
//! strike, twice as many after each further one (at most [`MAX_SIT_OUT`]).
//! A round the member finishes in the group forgives one strike. A peer
//! that joined a round and led it (the smallest id) but never sent its
//! `Group` earns a strike from each peer that gave up waiting for it. A leader
//! whose `Group` lists a member it cannot prove joined earns two strikes at
//! once: no honest leader sends one. While a
//! member sits out, a peer does not count its `Join`, does not wait for it
//! when closing, and ignores a `Group` it sends, so the others average
//! without it at full speed.
//!
//! Every member of a round sees the same stalled member drop out (its parts
//! are missing at every reducer), so the peers' tallies agree; where they
//! do not (a member dropped by one peer only), groups may split for a few
//! rounds, which costs averaging but not correctness.

use crate::NodeId;
use std::collections::BTreeMap;

use super::config::MAX_GROUP_MEMBERS;

/// Rounds sat out after the second strike.
pub const FIRST_SIT_OUT: u64 = 2;
/// Longest sit-out, in rounds.
pub const MAX_SIT_OUT: u64 = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Strikes {
    count: u32,
    /// Sits out every round up to and including this one.
    through: u64,
}

/// One peer's tally of stalled members; see the module docs.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct SitOuts {
    by_peer: BTreeMap<NodeId, Strikes>,
}

impl SitOuts {
    /// Tallies `round`, finished with `group`, `dropped` of which stalled it.
    pub(crate) fn record(&mut self, round: u64, group: &[NodeId], dropped: &[NodeId]) {
        for member in group {
            if dropped.contains(member) {
                self.strike(*member, round);
            } else if let Some(s) = self.by_peer.get_mut(member) {
                s.count -= 1;
                if s.count == 0 {
                    self.by_peer.remove(member);
                }
            }
        }
    }

    /// `leader` sent a `Group` for `round` listing a member it could not
    /// prove joined, which no honest leader does: two strikes at once, so it
    /// sits out the next rounds straight away (and ever longer if it goes on).
    pub(crate) fn forged_group(&mut self, leader: NodeId, round: u64) {
        self.strike(leader, round);
        self.strike(leader, round);
    }

    /// `leader` joined `round` and led it (the smallest id) but no `Group`
    /// of it came by the give-up time: one strike, as for a member that
    /// stalled the round.
    pub(crate) fn silent_leader(&mut self, leader: NodeId, round: u64) {
        self.strike(leader, round);
    }

    /// One strike against `member` in `round`.
    fn strike(&mut self, member: NodeId, round: u64) {
        if !self.by_peer.contains_key(&member) && self.by_peer.len() >= MAX_GROUP_MEMBERS {
            return; // bounded: a swarm this large has bigger problems
        }
        let s = self.by_peer.entry(member).or_insert(Strikes {
            count: 0,
            through: 0,
        });
        s.count = s.count.saturating_add(1);
        if s.count >= 2 {
            let sit = FIRST_SIT_OUT
                .saturating_mul(1u64 << (s.count - 2).min(16))
                .min(MAX_SIT_OUT);
            s.through = round.saturating_add(sit);
        }
    }

    /// Whether `peer` sits out `round`.
    pub(crate) fn sits_out(&self, peer: NodeId, round: u64) -> bool {
        self.by_peer
            .get(&peer)
            .is_some_and(|s| s.count >= 2 && round <= s.through)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> NodeId {
        NodeId([n; 32])
    }

    #[test]
    fn a_member_that_stalls_every_round_sits_out_ever_longer() {
        let mut s = SitOuts::default();
        let group = [id(1), id(2), id(3)];
        let mut round = 1;
        // Rounds in which 3 takes part (and stalls); the others it sits out.
        let mut stalled = Vec::new();
        while round <= 40 {
            if !s.sits_out(id(3), round) {
                stalled.push(round);
                s.record(round, &group, &[id(3)]);
            } else {
                s.record(round, &group[..2], &[]);
            }
            round += 1;
        }
        assert_eq!(stalled, vec![1, 2, 5, 10, 19, 36], "sit-outs 2, 4, 8, 16");
        assert!(!s.sits_out(id(1), 5) && !s.sits_out(id(2), 5));
    }

    #[test]
    fn one_hiccup_is_forgiven_and_good_rounds_wear_strikes_off() {
        let mut s = SitOuts::default();
        let group = [id(1), id(2)];
        s.record(1, &group, &[id(2)]);
        assert!(!s.sits_out(id(2), 2), "a single drop costs nothing");
        s.record(2, &group, &[]);
        s.record(3, &group, &[id(2)]);
        assert!(!s.sits_out(id(2), 4), "the good round forgave the first");
        s.record(4, &group, &[id(2)]);
        assert!(s.sits_out(id(2), 5) && s.sits_out(id(2), 6));
        assert!(!s.sits_out(id(2), 7), "two rounds only");
        s.record(7, &group, &[]);
        s.record(8, &group, &[]);
        assert_eq!(s, SitOuts::default(), "all strikes worn off");
    }

    #[test]
    fn a_forged_group_makes_its_leader_sit_out_at_once() {
        let mut s = SitOuts::default();
        s.forged_group(id(1), 5);
        assert!(s.sits_out(id(1), 6) && s.sits_out(id(1), 7));
        assert!(!s.sits_out(id(1), 8));
        s.forged_group(id(1), 8);
        assert!(
            s.sits_out(id(1), 16) && !s.sits_out(id(1), 17),
            "8 rounds next"
        );
    }
}
