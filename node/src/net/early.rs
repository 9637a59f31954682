//! Direct messages from peers we have not admitted yet, kept until we do.
//!
//! A peer's first direct messages can overtake what makes it a member here:
//! its gossip subscription, or (with a swarm secret) its membership proof,
//! which travels on another stream. Dropping them after acknowledging them
//! loses them for good (the sender does not send them again), so a node's
//! first state request or `Join` went unanswered. They are kept instead,
//! a few per peer and briefly, and handed on in order when the peer is
//! admitted; what does not fit now is not acknowledged, so its sender
//! retries, and what could never fit (more than a peer's whole allowance)
//! is dropped as before.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::time::Duration;
use tokio::time::Instant;

/// Messages kept per peer.
const PER_PEER_MESSAGES: usize = 8;
/// Bytes kept per peer: early messages are small (requests, `Join`s, proofs).
const PER_PEER_BYTES: usize = 1 << 20;
/// Peers with messages kept at once.
const MAX_PEERS: usize = 64;
/// How long a peer that never becomes a member has its messages kept.
pub const KEEP_FOR: Duration = Duration::from_secs(10);

/// What became of a message offered to [`EarlyMessages::keep`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// Kept until its sender is admitted.
    Kept,
    /// No room now: not to be acknowledged, so its sender tries again.
    NoRoom,
    /// Larger than a peer's whole allowance: dropped (sending it again would
    /// not help).
    TooLarge,
}

/// Messages of type `M` from peers `K` not admitted yet.
#[derive(Debug)]
pub struct EarlyMessages<K, M> {
    by_peer: HashMap<K, Kept<M>>,
}

#[derive(Debug)]
struct Kept<M> {
    /// When the first of them arrived.
    since: Instant,
    bytes: usize,
    messages: VecDeque<M>,
}

impl<K: Hash + Eq + Copy, M> Default for EarlyMessages<K, M> {
    fn default() -> Self {
        EarlyMessages {
            by_peer: HashMap::new(),
        }
    }
}

impl<K: Hash + Eq + Copy, M> EarlyMessages<K, M> {
    /// Keeps `message` (`bytes` long) from `peer` if it fits.
    pub fn keep(&mut self, peer: K, bytes: usize, message: M, now: Instant) -> Keep {
        if bytes > PER_PEER_BYTES {
            return Keep::TooLarge;
        }
        if !self.by_peer.contains_key(&peer) && self.by_peer.len() >= MAX_PEERS {
            return Keep::NoRoom;
        }
        let kept = self.by_peer.entry(peer).or_insert_with(|| Kept {
            since: now,
            bytes: 0,
            messages: VecDeque::new(),
        });
        let fits = kept.messages.len() < PER_PEER_MESSAGES
            && kept.bytes.saturating_add(bytes) <= PER_PEER_BYTES;
        if fits {
            kept.bytes += bytes;
            kept.messages.push_back(message);
            return Keep::Kept;
        }
        if kept.messages.is_empty() {
            self.by_peer.remove(&peer);
        }
        Keep::NoRoom
    }

    /// `peer`'s messages, oldest first (it was admitted); none are kept after.
    pub fn take(&mut self, peer: &K) -> VecDeque<M> {
        self.by_peer
            .remove(peer)
            .map(|k| k.messages)
            .unwrap_or_default()
    }

    /// Drops `peer`'s messages (it left); returns how many.
    pub fn forget(&mut self, peer: &K) -> usize {
        self.take(peer).len()
    }

    /// Drops the messages of peers not admitted within [`KEEP_FOR`] of
    /// their first; returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        let mut dropped = 0;
        self.by_peer.retain(|_, k| {
            let keep = now.saturating_duration_since(k.since) < KEEP_FOR;
            if !keep {
                dropped += k.messages.len();
            }
            keep
        });
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_come_back_in_order_and_only_once() {
        let now = Instant::now();
        let mut early = EarlyMessages::default();
        assert_eq!(early.keep(1u8, 10, "first", now), Keep::Kept);
        assert_eq!(early.keep(2u8, 10, "other", now), Keep::Kept);
        assert_eq!(early.keep(1u8, 10, "second", now), Keep::Kept);
        assert_eq!(early.take(&1), ["first", "second"]);
        assert!(early.take(&1).is_empty());
        assert_eq!(early.forget(&2), 1);
        assert!(early.take(&2).is_empty());
    }

    #[test]
    fn each_peer_and_the_peers_together_are_bounded() {
        let now = Instant::now();
        let mut early = EarlyMessages::default();
        for i in 0..PER_PEER_MESSAGES {
            assert_eq!(early.keep(0u32, 1, i, now), Keep::Kept);
        }
        assert_eq!(early.keep(0u32, 1, 99, now), Keep::NoRoom, "count");
        assert_eq!(early.keep(1u32, PER_PEER_BYTES, 0, now), Keep::Kept);
        assert_eq!(early.keep(1u32, 1, 1, now), Keep::NoRoom, "one byte over");
        let huge = PER_PEER_BYTES + 1;
        assert_eq!(early.keep(2u32, huge, 0, now), Keep::TooLarge);
        for peer in 2..MAX_PEERS as u32 {
            assert_eq!(early.keep(peer, 1, 0, now), Keep::Kept);
        }
        let extra = MAX_PEERS as u32;
        assert_eq!(
            early.keep(extra, 1, 0, now),
            Keep::NoRoom,
            "one peer too many"
        );
        assert_eq!(early.take(&0).len(), PER_PEER_MESSAGES);
        assert_eq!(early.keep(extra, 1, 0, now), Keep::Kept, "room again");
    }

    #[test]
    fn peers_never_admitted_have_their_messages_dropped() {
        let start = Instant::now();
        let mut early = EarlyMessages::default();
        assert_eq!(early.keep(1u8, 1, (), start), Keep::Kept);
        assert_eq!(early.keep(2u8, 1, (), start + KEEP_FOR / 2), Keep::Kept);
        assert_eq!(early.keep(1u8, 1, (), start + KEEP_FOR / 2), Keep::Kept);
        assert_eq!(early.expire(start + KEEP_FOR - Duration::from_millis(1)), 0);
        assert_eq!(early.expire(start + KEEP_FOR), 2, "peer 1's two");
        assert!(early.take(&1).is_empty());
        assert_eq!(early.take(&2).len(), 1);
    }
}
