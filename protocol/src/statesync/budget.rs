//! How many chunks one peer may ask a server for: a token bucket per peer.
//!
//! An honest joiner asks each server for a share of the chunks once (and a
//! few again after a fault elsewhere), so it never comes near a budget of
//! twice the whole state per minute; a member that asks for the same chunk
//! over and over is refused past it (answered "not held", a few bytes)
//! instead of costing the server its bandwidth.

use crate::NodeId;
use std::collections::HashMap;
use std::time::Duration;

/// Peers tracked at once; beyond this, peers with a full bucket are forgotten
/// (they would get a full bucket again anyway).
pub const MAX_TRACKED_PEERS: usize = 4096;

/// Per-peer chunk budgets of one server; time is the caller's `now`.
#[derive(Clone, Debug)]
pub struct ServeBudget {
    window: Duration,
    buckets: HashMap<NodeId, Bucket>,
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Duration,
}

impl ServeBudget {
    /// Lets a peer take a burst of a whole budget, refilled over `window`.
    pub fn new(window: Duration) -> Self {
        ServeBudget {
            window,
            buckets: HashMap::new(),
        }
    }

    /// Whether `peer` may have one more chunk at `now`, given a budget of
    /// `capacity` chunks per window (the caller sizes it to the state it
    /// serves); takes the chunk from its bucket if so.
    pub fn allow(&mut self, peer: NodeId, now: Duration, capacity: u32) -> bool {
        let capacity = f64::from(capacity.max(1));
        if self.buckets.len() >= MAX_TRACKED_PEERS && !self.buckets.contains_key(&peer) {
            self.forget_full(now, capacity);
        }
        let window = self.window.as_secs_f64().max(1e-3);
        let b = self.buckets.entry(peer).or_insert(Bucket {
            tokens: capacity,
            at: now,
        });
        let elapsed = now.saturating_sub(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * capacity / window).min(capacity);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn forget_full(&mut self, now: Duration, capacity: f64) {
        let window = self.window.as_secs_f64().max(1e-3);
        self.buckets.retain(|_, b| {
            b.tokens + now.saturating_sub(b.at).as_secs_f64() * capacity / window < capacity
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u16) -> NodeId {
        let mut b = [0u8; 32];
        b[..2].copy_from_slice(&n.to_le_bytes());
        NodeId(b)
    }

    #[test]
    fn a_peer_gets_its_burst_then_the_refill_rate() {
        let mut b = ServeBudget::new(Duration::from_secs(60));
        let t0 = Duration::from_secs(100);
        for i in 0..10 {
            assert!(b.allow(id(1), t0, 10), "request {i} is within the burst");
        }
        assert!(!b.allow(id(1), t0, 10), "the 11th at once is refused");
        assert!(b.allow(id(2), t0, 10), "another peer has its own budget");
        // 10 per 60 s: one more every 6 s, so two after 12 s.
        assert!(!b.allow(id(1), t0 + Duration::from_secs(5), 10));
        let t12 = t0 + Duration::from_secs(12);
        assert!(b.allow(id(1), t12, 10));
        assert!(b.allow(id(1), t12, 10));
        assert!(!b.allow(id(1), t12, 10));
        // A long pause refills the bucket only up to the burst.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..10 {
            assert!(b.allow(id(1), later, 10));
        }
        assert!(!b.allow(id(1), later, 10));
    }

    #[test]
    fn tracking_stays_bounded() {
        let mut b = ServeBudget::new(Duration::from_secs(1));
        for n in 0..(MAX_TRACKED_PEERS as u16 + 100) {
            // Each peer comes one second after the last: earlier buckets are full again.
            assert!(b.allow(id(n), Duration::from_secs(u64::from(n)), 4));
        }
        assert!(b.buckets.len() <= MAX_TRACKED_PEERS);
    }
}
