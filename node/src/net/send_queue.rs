//! Direct messages to one peer leave in order, a few at a time.
//!
//! Every direct message is its own QUIC stream, and QUIC shares a connection's bandwidth
//! between its open streams. Handed to the transport all at once, the parts of an
//! all-reduce would all arrive at the very end together, and the receiver could not
//! reduce (and return) the first part while later ones are still in transit. Holding all
//! but [`MAX_IN_FLIGHT`] back per peer makes them arrive one after another; two in flight
//! keep the link busy across the acknowledgement's round trip.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::time::Duration;

/// Direct messages per peer handed to the transport at once.
pub const MAX_IN_FLIGHT: usize = 2;

/// Messages held back per peer; beyond it the oldest waiting one is dropped (the
/// averaging protocol re-sends what matters, and a peer this far behind is likely gone).
pub const MAX_WAITING: usize = 1024;

/// How many of a peer's waiting messages may go out beside those in flight (through
/// [`SendQueues::take_next`]), given how long each of its queued messages in flight has
/// been on its way: one in flight for `stalled_after` or longer no longer counts against
/// [`MAX_IN_FLIGHT`], so a stuck stream cannot hold back the queue until its request times
/// out.
pub fn extra_slots(ages: impl Iterator<Item = Duration>, stalled_after: Duration) -> usize {
    let moving = ages.filter(|age| *age < stalled_after).count();
    MAX_IN_FLIGHT.saturating_sub(moving)
}

/// Per-peer order and in-flight limit of direct messages; `P` is the peer, `M` the message.
#[derive(Debug)]
pub struct SendQueues<P, M> {
    peers: HashMap<P, PeerQueue<M>>,
}

#[derive(Debug)]
struct PeerQueue<M> {
    waiting: VecDeque<M>,
    in_flight: usize,
}

impl<P: Eq + Hash + Clone, M> Default for SendQueues<P, M> {
    fn default() -> Self {
        SendQueues {
            peers: HashMap::new(),
        }
    }
}

/// What [`SendQueues::push`] did with a message.
#[derive(Debug, PartialEq, Eq)]
pub enum Pushed<M> {
    /// A slot was free: send this message now.
    SendNow(M),
    /// Held back until a message in flight to the peer finishes.
    Waiting,
    /// Held back, and the oldest waiting message had to make room: it is dropped.
    DroppedOldest(M),
}

impl<P: Eq + Hash + Clone, M> SendQueues<P, M> {
    /// Queues `msg` for `peer`.
    pub fn push(&mut self, peer: P, msg: M) -> Pushed<M> {
        let q = self.peers.entry(peer).or_insert_with(|| PeerQueue {
            waiting: VecDeque::new(),
            in_flight: 0,
        });
        if q.in_flight < MAX_IN_FLIGHT && q.waiting.is_empty() {
            q.in_flight += 1;
            return Pushed::SendNow(msg);
        }
        q.waiting.push_back(msg);
        if q.waiting.len() > MAX_WAITING {
            if let Some(old) = q.waiting.pop_front() {
                return Pushed::DroppedOldest(old);
            }
        }
        Pushed::Waiting
    }

    /// A message in flight to `peer` finished (acknowledged, or failed for good): the next
    /// waiting one, if any, to send now.
    pub fn finished(&mut self, peer: &P) -> Option<M> {
        let q = self.peers.get_mut(peer)?;
        q.in_flight = q.in_flight.saturating_sub(1);
        let next = q.waiting.pop_front();
        if next.is_some() {
            q.in_flight += 1;
        } else if q.in_flight == 0 {
            self.peers.remove(peer);
        }
        next
    }

    /// Takes `peer`'s next waiting message past the in-flight limit, counting it in flight:
    /// for when the messages in flight are stuck (a stalled stream must not hold back
    /// everything behind it until the request times out).
    pub fn take_next(&mut self, peer: &P) -> Option<M> {
        let q = self.peers.get_mut(peer)?;
        let next = q.waiting.pop_front()?;
        q.in_flight += 1;
        Some(next)
    }

    /// Peers with messages waiting.
    pub fn peers_waiting(&self) -> Vec<P> {
        self.peers
            .iter()
            .filter(|(_, q)| !q.waiting.is_empty())
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// `peer` is gone: drops what waits for it; returns how many messages that was.
    pub fn forget(&mut self, peer: &P) -> usize {
        match self.peers.get_mut(peer) {
            Some(q) => {
                let dropped = q.waiting.len();
                q.waiting.clear();
                if q.in_flight == 0 {
                    self.peers.remove(peer);
                }
                dropped
            }
            None => 0,
        }
    }

    /// Messages held back for `peer`.
    pub fn waiting(&self, peer: &P) -> usize {
        self.peers.get(peer).map_or(0, |q| q.waiting.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_to_a_peer_leave_in_order_two_at_a_time() {
        let mut q = SendQueues::default();
        assert_eq!(q.push("a", 1), Pushed::SendNow(1));
        assert_eq!(q.push("a", 2), Pushed::SendNow(2));
        assert_eq!(q.push("a", 3), Pushed::Waiting);
        assert_eq!(q.push("a", 4), Pushed::Waiting);
        // Another peer has its own slots.
        assert_eq!(q.push("b", 10), Pushed::SendNow(10));
        assert_eq!(q.waiting(&"a"), 2);
        assert_eq!(q.finished(&"a"), Some(3));
        assert_eq!(q.finished(&"a"), Some(4));
        assert_eq!(q.finished(&"a"), None);
        assert_eq!(q.finished(&"a"), None);
        // Both slots free again.
        assert_eq!(q.push("a", 5), Pushed::SendNow(5));
        assert_eq!(q.push("a", 6), Pushed::SendNow(6));
        assert_eq!(q.finished(&"b"), None);
        assert_eq!(q.finished(&"unknown"), None);
    }

    #[test]
    fn only_messages_in_flight_for_too_long_free_their_slots() {
        let s = Duration::from_secs;
        let limit = s(5);
        assert_eq!(extra_slots([s(1), s(2)].into_iter(), limit), 0);
        assert_eq!(extra_slots([s(1), s(5)].into_iter(), limit), 1);
        assert_eq!(extra_slots([s(6), s(60)].into_iter(), limit), 2);
        // More in flight than the limit (after earlier releases): none is moving, two more.
        assert_eq!(extra_slots([s(6), s(7), s(8)].into_iter(), limit), 2);
        assert_eq!(extra_slots([s(1), s(1), s(9)].into_iter(), limit), 0);
        assert_eq!(extra_slots(std::iter::empty(), limit), MAX_IN_FLIGHT);
    }

    #[test]
    fn a_stuck_peer_can_be_given_more_in_flight() {
        let mut q = SendQueues::default();
        q.push("a", 1);
        q.push("a", 2);
        q.push("a", 3);
        q.push("b", 10);
        assert_eq!(q.peers_waiting(), vec!["a"]);
        assert_eq!(q.take_next(&"a"), Some(3));
        assert_eq!(q.take_next(&"a"), None);
        assert!(q.peers_waiting().is_empty());
        // Three in flight now: a new message waits until fewer than two are.
        assert_eq!(q.push("a", 4), Pushed::Waiting);
        assert_eq!(q.finished(&"a"), Some(4));
        assert_eq!(q.finished(&"a"), None);
        assert_eq!(q.push("a", 5), Pushed::Waiting);
        assert_eq!(q.finished(&"a"), Some(5));
        assert_eq!(q.finished(&"a"), None);
        assert_eq!(q.push("a", 6), Pushed::SendNow(6));
    }

    #[test]
    fn a_new_message_never_overtakes_waiting_ones() {
        let mut q = SendQueues::default();
        q.push("a", 1);
        q.push("a", 2);
        assert_eq!(q.push("a", 3), Pushed::Waiting);
        // One slot frees and is refilled from the queue, not by the newcomer.
        assert_eq!(q.finished(&"a"), Some(3));
        assert_eq!(q.push("a", 4), Pushed::Waiting);
        assert_eq!(q.finished(&"a"), Some(4));
    }

    #[test]
    fn a_gone_peer_loses_its_waiting_messages_and_the_queue_is_bounded() {
        let mut q = SendQueues::default();
        for m in 0..(MAX_IN_FLIGHT + MAX_WAITING) {
            assert!(!matches!(q.push("a", m), Pushed::DroppedOldest(_)));
        }
        assert_eq!(
            q.push("a", 9_999),
            Pushed::DroppedOldest(MAX_IN_FLIGHT),
            "the oldest waiting message makes room"
        );
        assert_eq!(q.waiting(&"a"), MAX_WAITING);
        assert_eq!(q.forget(&"a"), MAX_WAITING);
        assert_eq!(q.waiting(&"a"), 0);
        // The two in flight still finish; nothing follows them.
        assert_eq!(q.finished(&"a"), None);
        assert_eq!(q.finished(&"a"), None);
        assert_eq!(q.push("a", 1), Pushed::SendNow(1));
        assert_eq!(q.forget(&"nobody"), 0);
    }
}
