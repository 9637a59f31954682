//! Matchmaking: who joined a round, who leads it, when the group closes, and the bounded
//! buffer of `Join`s for rounds we have not started yet.

use super::config::{AveragingConfig, MAX_BUFFERED_ROUNDS, MAX_GROUP_MEMBERS, MAX_ROUNDS_AHEAD};
use crate::tensor::Bytes;
use crate::NodeId;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// `Join`s received for rounds we have not started, so a peer that is a little behind still
/// counts everyone who was ready before it. Bounded in rounds and senders.
#[derive(Debug, Default)]
pub(crate) struct JoinBuffer {
    rounds: BTreeMap<u64, BTreeMap<NodeId, Joined>>,
}

/// A peer's (verified) `Join`: its vector length and its proof.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Joined {
    /// Its vector length.
    pub(crate) len: u64,
    /// Its join proof, passed on in the `Group` of a leader that lists it.
    pub(crate) proof: Bytes,
}

impl JoinBuffer {
    /// Records that `from` is ready for `round` as `joined` says. `base` is our
    /// current or last finished round, if any. Errors explain why the join was dropped.
    /// A peer is in one round at a time, so its earlier buffered `Join`s go first (even if
    /// this one is then dropped: it is past those rounds), and a late copy of an earlier
    /// `Join` than one already buffered changes nothing.
    pub(crate) fn insert(
        &mut self,
        base: Option<u64>,
        round: u64,
        from: NodeId,
        joined: Joined,
    ) -> Result<(), String> {
        // A peer is in one round at a time: a `Join` for a later round means it
        // finished the earlier ones, and one for an earlier round is a stale copy.
        if self
            .rounds
            .range(round.saturating_add(1)..)
            .any(|(_, senders)| senders.contains_key(&from))
        {
            return Ok(());
        }
        for (_, senders) in self.rounds.range_mut(..round) {
            senders.remove(&from);
        }
        self.rounds.retain(|_, senders| !senders.is_empty());
        if let Some(base) = base {
            if round > base.saturating_add(MAX_ROUNDS_AHEAD) {
                return Err(format!(
                    "Join for round {round} is more than {MAX_ROUNDS_AHEAD} rounds ahead of our \
                     round {base}; dropped"
                ));
            }
        }
        if !self.rounds.contains_key(&round) && self.rounds.len() >= MAX_BUFFERED_ROUNDS {
            // Keep the nearest rounds: they are the ones we will start next.
            match self.rounds.last_key_value() {
                Some((&highest, _)) if round < highest => {
                    self.rounds.remove(&highest);
                }
                _ => {
                    return Err(format!(
                        "Join for round {round} dropped: already buffering {MAX_BUFFERED_ROUNDS} \
                         nearer future rounds"
                    ))
                }
            }
        }
        let senders = self.rounds.entry(round).or_default();
        if senders.contains_key(&from) {
            return Ok(());
        }
        if senders.len() >= MAX_GROUP_MEMBERS {
            return Err(format!(
                "Join for round {round} dropped: already {MAX_GROUP_MEMBERS} peers buffered"
            ));
        }
        senders.insert(from, joined);
        Ok(())
    }

    /// Removes and returns the joiners of `round`, forgetting every round up to it.
    pub(crate) fn take(&mut self, round: u64) -> BTreeMap<NodeId, Joined> {
        let joiners = self.rounds.remove(&round).unwrap_or_default();
        self.forget_through(round);
        joiners
    }

    /// Forgets every round up to and including `round`.
    pub(crate) fn forget_through(&mut self, round: u64) {
        self.rounds.retain(|&r, _| r > round);
    }

    /// The peers that joined a round after `round`: they are past it, so a
    /// round `round` of ours neither counts nor waits for them.
    pub(crate) fn ahead_of(&self, round: u64) -> BTreeSet<NodeId> {
        self.rounds
            .range(round.saturating_add(1)..)
            .flat_map(|(_, senders)| senders.keys().copied())
            .collect()
    }

    /// Number of buffered rounds (for tests).
    #[cfg(test)]
    pub(crate) fn rounds(&self) -> usize {
        self.rounds.len()
    }
}

/// A round in matchmaking: our vector, who has joined, and the timers.
#[derive(Debug)]
pub(crate) struct Matchmaking {
    /// The round.
    pub(crate) round: u64,
    /// Our vector length.
    pub(crate) len: u64,
    /// Our values, handed to the all-reduce once a group forms.
    pub(crate) values: Vec<f32>,
    /// Our join proof for this round.
    pub(crate) proof: Bytes,
    started: Duration,
    /// When the leader closes at the latest (start + join window).
    close_at: Duration,
    /// When a non-leader stops waiting for a `Group` and finishes alone.
    give_up_at: Duration,
    /// Who joined, with their join proofs and when their `Join` was counted.
    joined: BTreeMap<NodeId, (Bytes, Duration)>,
    /// A `Group` for this round came from a leader that sits out for us: the
    /// peers that joined follow it, so the next smallest id among them does
    /// not lead and is not to blame for the missing `Group`.
    group_from_benched_leader: bool,
    /// Peers in another leader's group for this round that left us out: we
    /// regroup without them.
    taken: BTreeSet<NodeId>,
    /// When the latest new joiner was counted.
    last_join: Duration,
    next_join: Duration,
}

/// How long a round's matchmaking may take, from its start: fitted or configured
/// (see [`deadline`](super::deadline)).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Waits {
    /// The leader's join window.
    pub(crate) join_window: Duration,
    /// A member's wait for the `Group`.
    pub(crate) group_wait: Duration,
}

impl Matchmaking {
    /// Starts matchmaking at `now` (the caller broadcasts the first `Join`).
    pub(crate) fn new(
        round: u64,
        values: Vec<f32>,
        proof: Bytes,
        now: Duration,
        waits: Waits,
        cfg: &AveragingConfig,
    ) -> Self {
        Matchmaking {
            round,
            len: values.len() as u64,
            values,
            proof,
            started: now,
            close_at: now.saturating_add(waits.join_window),
            give_up_at: now.saturating_add(waits.group_wait),
            joined: BTreeMap::new(),
            group_from_benched_leader: false,
            taken: BTreeSet::new(),
            last_join: now,
            next_join: now.saturating_add(cfg.join_retry()),
        }
    }

    /// How long after our start every peer of `peers` had joined, if all have.
    pub(crate) fn all_joined_after(&self, peers: &BTreeSet<NodeId>) -> Option<Duration> {
        self.awaited(peers)
            .all(|p| self.joined.contains_key(p))
            .then(|| self.last_join.saturating_sub(self.started))
    }

    /// Time since our start.
    pub(crate) fn elapsed(&self, now: Duration) -> Duration {
        now.saturating_sub(self.started)
    }

    /// Counts `from` as joined if its vector length matches ours. The caller has checked
    /// its join proof.
    pub(crate) fn add_joiner(
        &mut self,
        now: Duration,
        me: NodeId,
        from: NodeId,
        joined: Joined,
    ) -> Result<(), String> {
        let Joined { len, proof } = joined;
        if len != self.len {
            return Err(format!(
                "Join for round {} with {len} values, ours has {}; not averaging different models",
                self.round, self.len
            ));
        }
        if from == me || self.joined.contains_key(&from) || self.taken.contains(&from) {
            return Ok(());
        }
        if self.joined.len() >= MAX_GROUP_MEMBERS {
            return Err(format!(
                "Join for round {} dropped: already {MAX_GROUP_MEMBERS} joiners",
                self.round
            ));
        }
        self.joined.insert(from, (proof, now));
        self.last_join = self.last_join.max(now);
        Ok(())
    }

    /// The smallest id among us and the peers that joined with our length.
    pub(crate) fn leader(&self, me: NodeId) -> NodeId {
        self.joined
            .first_key_value()
            .map_or(me, |(&first, _)| first.min(me))
    }

    /// Whether `peer` joined with exactly this `proof` (a re-broadcast).
    pub(crate) fn has_joined_with(&self, peer: &NodeId, proof: &[u8]) -> bool {
        self.joined.get(peer).is_some_and(|(p, _)| **p == *proof)
    }

    /// Notes that a `Group` for this round came from a leader sitting out.
    pub(crate) fn saw_group_of_benched_leader(&mut self) {
        self.group_from_benched_leader = true;
    }

    /// The peer that led this round and never sent its `Group` by `now`,
    /// if one is to blame: another peer leads it (the smallest id that
    /// joined), its `Join` was counted at least `window` (a leader's join
    /// window) ago, so an honest one would have closed and sent its `Group`
    /// by now, and no `Group` of a benched leader explains its silence.
    pub(crate) fn silent_leader(
        &self,
        me: NodeId,
        now: Duration,
        window: Duration,
    ) -> Option<NodeId> {
        let leader = self.leader(me);
        let (_, joined_at) = self.joined.get(&leader)?;
        let had_its_window = now.saturating_sub(*joined_at) >= window;
        (leader != me && had_its_window && !self.group_from_benched_leader).then_some(leader)
    }

    /// Whether `peer`'s `Join` for this round reached us (its proof is checked).
    pub(crate) fn has_joined(&self, peer: &NodeId) -> bool {
        self.joined.contains_key(peer)
    }

    /// When a non-leader stops waiting for a `Group` and finishes alone.
    pub(crate) fn give_up_at(&self) -> Duration {
        self.give_up_at
    }

    /// Whether we lead and may close now: every live peer joined, or the window is over.
    pub(crate) fn should_close(&self, me: NodeId, peers: &BTreeSet<NodeId>, now: Duration) -> bool {
        self.leader(me) == me
            && (now >= self.close_at || self.awaited(peers).all(|p| self.joined.contains_key(p)))
    }

    /// The peers of `peers` we still wait for: not in a group that left us out.
    fn awaited<'a>(&'a self, peers: &'a BTreeSet<NodeId>) -> impl Iterator<Item = &'a NodeId> {
        peers.iter().filter(|p| !self.taken.contains(p))
    }

    /// `members` will not average this round with us (another leader's group
    /// left us out, or they already joined a later round): they are taken for
    /// this round, so we regroup with the peers left. Refuses (and changes
    /// nothing) once [`MAX_GROUP_MEMBERS`] peers are taken.
    pub(crate) fn set_aside(&mut self, members: &[NodeId]) -> Result<(), ()> {
        let new = members.iter().filter(|m| !self.taken.contains(m)).count();
        if self.taken.len() + new > MAX_GROUP_MEMBERS {
            return Err(());
        }
        for m in members {
            self.joined.remove(m);
            self.taken.insert(*m);
        }
        Ok(())
    }

    /// The group the leader (`me`) forms: us and the joiners, ascending, at most `limit`
    /// (the smallest ids, so the leader is always in), each with its join proof.
    pub(crate) fn members(&self, me: NodeId, limit: usize) -> (Vec<NodeId>, Vec<Bytes>) {
        let mut members: Vec<(NodeId, Bytes)> = self
            .joined
            .iter()
            .filter(|(&id, _)| id != me)
            .map(|(&id, (proof, _))| (id, proof.clone()))
            .collect();
        members.push((me, self.proof.clone()));
        members.sort_unstable_by_key(|&(id, _)| id);
        members.truncate(limit.max(1));
        members.into_iter().unzip()
    }

    /// Re-arms and reports the periodic `Join` re-broadcast if it is due.
    pub(crate) fn rebroadcast_due(&mut self, now: Duration, cfg: &AveragingConfig) -> bool {
        if now < self.next_join {
            return false;
        }
        self.next_join = now.saturating_add(cfg.join_retry());
        true
    }

    /// The earliest time something can happen in matchmaking.
    pub(crate) fn next_timeout(&self, me: NodeId) -> Duration {
        let mut t = self.next_join.min(self.give_up_at);
        if self.leader(me) == me {
            t = t.min(self.close_at);
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> NodeId {
        NodeId([n; 32])
    }

    fn j(len: u64) -> Joined {
        Joined {
            len,
            proof: Bytes::from(vec![]),
        }
    }

    fn waits(cfg: &AveragingConfig) -> Waits {
        Waits {
            join_window: cfg.join_window,
            group_wait: cfg.join_window + cfg.group_timeout,
        }
    }

    #[test]
    fn buffer_limits_rounds_ahead_and_keeps_the_nearest_rounds() {
        let mut buf = JoinBuffer::default();
        assert!(
            buf.insert(Some(10), 15, id(1), j(4)).is_err(),
            "5 rounds ahead"
        );
        assert!(buf.insert(Some(10), 14, id(1), j(4)).is_ok());
        // Fresh node (no base): any round, but at most MAX_BUFFERED_ROUNDS of them.
        let mut buf = JoinBuffer::default();
        for (r, from) in [(100, 1), (200, 2), (300, 3), (400, 4)] {
            assert!(buf.insert(None, r, id(from), j(4)).is_ok());
        }
        assert!(
            buf.insert(None, 500, id(5), j(4)).is_err(),
            "beyond the nearest 4"
        );
        assert!(
            buf.insert(None, 50, id(5), j(4)).is_ok(),
            "nearer round evicts 400"
        );
        assert_eq!(buf.rounds(), MAX_BUFFERED_ROUNDS);
        assert!(buf.take(400).is_empty(), "400 was evicted");
        assert_eq!(buf.rounds(), 0, "take forgets every round up to it");
    }

    #[test]
    fn a_later_join_replaces_a_peers_earlier_ones_and_marks_it_ahead() {
        let mut buf = JoinBuffer::default();
        assert!(buf.insert(Some(1), 2, id(1), j(4)).is_ok());
        assert!(buf.insert(Some(1), 2, id(2), j(4)).is_ok());
        assert!(buf.insert(Some(1), 3, id(1), j(4)).is_ok());
        assert!(
            buf.insert(Some(1), 2, id(1), j(4)).is_ok(),
            "a stale copy is ignored"
        );
        assert_eq!(buf.ahead_of(2), [id(1)].into_iter().collect());
        assert!(buf.ahead_of(3).is_empty());
        let joiners = buf.take(2);
        assert_eq!(joiners.keys().copied().collect::<Vec<_>>(), vec![id(2)]);
        assert_eq!(buf.take(3).keys().copied().collect::<Vec<_>>(), vec![id(1)]);
        // A peer moving on leaves no empty round behind to crowd out others.
        let mut buf = JoinBuffer::default();
        for r in 2..=5 {
            assert!(buf.insert(Some(1), r, id(1), j(4)).is_ok());
        }
        assert_eq!(buf.rounds(), 1);
    }

    #[test]
    fn buffer_limits_senders_per_round_and_take_returns_them() {
        let mut buf = JoinBuffer::default();
        for i in 0..MAX_GROUP_MEMBERS as u32 {
            let mut b = [0u8; 32];
            b[..4].copy_from_slice(&i.to_le_bytes());
            assert!(buf.insert(None, 1, NodeId(b), j(8)).is_ok());
        }
        assert!(buf.insert(None, 1, id(0xff), j(8)).is_err());
        let mut b = [0u8; 32];
        b[0] = 3;
        assert!(
            buf.insert(None, 1, NodeId(b), j(9)).is_ok(),
            "repeat is a no-op"
        );
        let taken = buf.take(1);
        assert_eq!(taken.len(), MAX_GROUP_MEMBERS);
        assert_eq!(
            taken.get(&NodeId(b)).map(|j| j.len),
            Some(8),
            "first join wins"
        );
    }

    #[test]
    fn leader_is_smallest_and_closing_follows_view_or_window() {
        let cfg = AveragingConfig::default();
        let mut mm = Matchmaking::new(
            1,
            vec![0.0; 4],
            Bytes::from(vec![]),
            Duration::ZERO,
            waits(&cfg),
            &cfg,
        );
        let me = id(5);
        let peers: BTreeSet<NodeId> = [id(3), id(7)].into_iter().collect();
        assert_eq!(mm.leader(me), me);
        assert!(!mm.should_close(me, &peers, Duration::from_millis(10)));
        assert!(mm.add_joiner(Duration::ZERO, me, id(7), j(4)).is_ok());
        assert!(
            mm.add_joiner(Duration::ZERO, me, id(3), j(3)).is_err(),
            "length mismatch is refused"
        );
        assert_eq!(mm.leader(me), me);
        assert!(mm.should_close(me, &peers, cfg.join_window), "window over");
        assert!(mm.add_joiner(Duration::ZERO, me, id(3), j(4)).is_ok());
        assert_eq!(mm.leader(me), id(3));
        assert!(!mm.should_close(me, &peers, cfg.join_window), "not leader");
        assert_eq!(mm.members(me, 2).0, vec![id(3), id(5)]);
        assert_eq!(mm.members(me, 10).0, vec![id(3), id(5), id(7)]);
    }

    #[test]
    fn the_join_spread_is_measured_only_when_the_whole_view_joined() {
        let cfg = AveragingConfig::default();
        let start = Duration::from_secs(10);
        let mut mm = Matchmaking::new(
            1,
            vec![0.0; 4],
            Bytes::from(vec![]),
            start,
            waits(&cfg),
            &cfg,
        );
        let me = id(5);
        let peers: BTreeSet<NodeId> = [id(3), id(7)].into_iter().collect();
        assert_eq!(mm.all_joined_after(&peers), None);
        let ms = Duration::from_millis;
        assert!(mm.add_joiner(start + ms(40), me, id(7), j(4)).is_ok());
        assert_eq!(mm.all_joined_after(&peers), None, "3 has not joined");
        assert!(mm.add_joiner(start + ms(90), me, id(3), j(4)).is_ok());
        assert!(
            mm.add_joiner(start + ms(500), me, id(3), j(4)).is_ok(),
            "a repeated Join"
        );
        assert_eq!(mm.all_joined_after(&peers), Some(ms(90)));
        assert_eq!(mm.elapsed(start + ms(120)), ms(120));
        assert_eq!(mm.give_up_at(), start + cfg.join_window + cfg.group_timeout);
    }

    #[test]
    fn rebroadcast_rearms() {
        let cfg = AveragingConfig::default();
        let mut mm = Matchmaking::new(
            1,
            vec![],
            Bytes::from(vec![]),
            Duration::ZERO,
            waits(&cfg),
            &cfg,
        );
        assert!(!mm.rebroadcast_due(Duration::from_millis(499), &cfg));
        assert!(mm.rebroadcast_due(Duration::from_millis(500), &cfg));
        assert!(!mm.rebroadcast_due(Duration::from_millis(999), &cfg));
        assert_eq!(mm.next_timeout(id(9)), Duration::from_millis(1000));
    }
}
