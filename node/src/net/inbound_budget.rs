//! A cap on the bytes of direct messages a node holds at once.
//!
//! A direct message is read whole before anything can be checked (its sender's
//! membership, the swarm-secret MAC, its content), and up to 256 MiB long. Without a
//! cap, any peer that can open a connection could make the node buffer one such frame per
//! stream it opens, and a member sending faster than the driver decodes could fill the
//! event queue with them. Every inbound frame takes its bytes from one budget as they
//! arrive, and gives them back only when the driver has taken the message: a frame that
//! would exceed it fails its stream (its sender sees the failure and may retry), so the
//! node's memory for messages in transit stays bounded whatever peers send.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Bytes of inbound direct messages a node holds at most: three of the largest frames
/// (256 MiB each), or hundreds of averaging parts of the default size.
pub const INBOUND_BUDGET_BYTES: usize = 1 << 30;

/// The shared count of bytes held by inbound frames. Cheap to clone.
#[derive(Clone, Debug)]
pub struct InboundBudget(Arc<Shared>);

#[derive(Debug)]
struct Shared {
    limit: usize,
    used: AtomicUsize,
}

/// More bytes were asked of an [`InboundBudget`] than it has left.
#[derive(Debug, thiserror::Error)]
#[error(
    "inbound message budget exhausted: {wanted} more bytes asked with {used} of {limit} held by \
     messages not yet handled"
)]
pub struct BudgetExhausted {
    /// Bytes asked for.
    pub wanted: usize,
    /// Bytes held when asked.
    pub used: usize,
    /// The budget.
    pub limit: usize,
}

impl InboundBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Self {
        InboundBudget(Arc::new(Shared {
            limit,
            used: AtomicUsize::new(0),
        }))
    }

    /// An empty claim on the budget, grown as a frame's bytes arrive.
    pub fn claim(&self) -> Held {
        Held {
            budget: self.clone(),
            bytes: 0,
        }
    }

    /// Bytes held now.
    pub fn in_use(&self) -> usize {
        self.0.used.load(Ordering::Acquire)
    }
}

impl Default for InboundBudget {
    fn default() -> Self {
        InboundBudget::new(INBOUND_BUDGET_BYTES)
    }
}

/// Bytes of the budget held for one frame; given back when dropped.
#[derive(Debug)]
pub struct Held {
    budget: InboundBudget,
    bytes: usize,
}

impl Held {
    /// Holds `more` bytes more, or refuses (holding nothing more) if that would
    /// exceed the budget.
    pub fn grow(&mut self, more: usize) -> Result<(), BudgetExhausted> {
        let shared = &self.budget.0;
        shared
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(more)
                    .filter(|total| *total <= shared.limit)
            })
            .map_err(|used| BudgetExhausted {
                wanted: more,
                used,
                limit: shared.limit,
            })?;
        self.bytes += more;
        Ok(())
    }

    /// Bytes this claim holds.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budget.0.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_share_the_budget_and_give_it_back_when_dropped() {
        let budget = InboundBudget::new(100);
        let mut a = budget.claim();
        let mut b = budget.claim();
        a.grow(60).unwrap();
        b.grow(30).unwrap();
        assert_eq!(budget.in_use(), 90);
        let err = b.grow(11).unwrap_err();
        assert_eq!((err.wanted, err.used, err.limit), (11, 90, 100));
        assert!(err.to_string().contains("budget exhausted"), "{err}");
        // A refused claim holds nothing more.
        assert_eq!(b.bytes(), 30);
        b.grow(10).unwrap();
        assert_eq!(budget.in_use(), 100);
        drop(a);
        assert_eq!(budget.in_use(), 40);
        drop(b);
        assert_eq!(budget.in_use(), 0);
        // Sizes that would overflow the count are refused, not wrapped.
        let mut c = budget.claim();
        c.grow(usize::MAX).unwrap_err();
        assert_eq!(budget.in_use(), 0);
    }
}
