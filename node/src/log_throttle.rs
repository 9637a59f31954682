//! At most a few warnings per peer and kind in the log per window.
//!
//! Many warnings name a peer that sent something wrong (a bad MAC, a
//! malformed or rejected message, a full inbox). Each costs the peer one
//! cheap message and the node one log line, so without a limit a peer could
//! grow a volunteer's log (and the disk under it) as fast as it sends. This
//! filter lets through the first [`LINES_PER_WINDOW`] warnings of each kind
//! (call site) per peer in each [`WINDOW`], and drops the rest; lines without
//! a `peer` field, and those below WARN, are never dropped.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tracing::callsite::Identifier;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Metadata};
use tracing_subscriber::layer::{Context, Filter};

/// Warnings of one kind from one peer shown per window.
pub const LINES_PER_WINDOW: u32 = 5;
/// The window.
pub const WINDOW: Duration = Duration::from_secs(10);
/// Peer and kind pairs counted at once; past it, finished windows are
/// forgotten first, then all (so the map stays bounded however many peer
/// ids a hostile swarm makes up).
const MAX_COUNTED: usize = 4096;

/// The filter (see the module docs).
#[derive(Debug)]
pub struct PeerWarnings {
    window: Duration,
    counts: Mutex<HashMap<(Identifier, String), (Instant, u32)>>,
}

impl Default for PeerWarnings {
    fn default() -> Self {
        PeerWarnings::with_window(WINDOW)
    }
}

impl PeerWarnings {
    /// A filter counting over windows of `window`.
    pub fn with_window(window: Duration) -> Self {
        PeerWarnings {
            window,
            counts: Mutex::new(HashMap::new()),
        }
    }

    /// Whether a warning from `peer` at call site `site` is shown now.
    fn admit(&self, site: Identifier, peer: String) -> bool {
        let now = Instant::now();
        // A poisoned lock (a panic while counting) stops no log line.
        let Ok(mut counts) = self.counts.lock() else {
            return true;
        };
        if counts.len() >= MAX_COUNTED {
            let window = self.window;
            counts.retain(|_, (start, _)| now.duration_since(*start) < window);
            if counts.len() >= MAX_COUNTED {
                counts.clear();
            }
        }
        let (start, shown) = counts.entry((site, peer)).or_insert((now, 0));
        if now.duration_since(*start) >= self.window {
            (*start, *shown) = (now, 0);
        }
        *shown += 1;
        *shown <= LINES_PER_WINDOW
    }
}

/// Finds an event's `peer` field.
#[derive(Default)]
struct PeerField(Option<String>);

impl Visit for PeerField {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "peer" {
            self.0 = Some(format!("{value:?}"));
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "peer" {
            self.0 = Some(value.to_owned());
        }
    }
}

impl<S> Filter<S> for PeerWarnings {
    fn enabled(&self, _: &Metadata<'_>, _: &Context<'_, S>) -> bool {
        true
    }

    fn event_enabled(&self, event: &Event<'_>, _: &Context<'_, S>) -> bool {
        let meta = event.metadata();
        if *meta.level() > Level::WARN {
            return true;
        }
        let mut peer = PeerField::default();
        event.record(&mut peer);
        match peer.0 {
            Some(peer) => self.admit(meta.callsite(), peer),
            None => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tracing_subscriber::layer::{Layer, SubscriberExt};

    /// Counts the events that reach it.
    struct Count(Arc<AtomicUsize>);

    impl<S: tracing::Subscriber> Layer<S> for Count {
        fn on_event(&self, _: &Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn warn_from(peer: &str) {
        tracing::warn!(peer = %peer, "bad message dropped");
    }

    #[test]
    fn each_peer_gets_a_few_warnings_per_window_and_other_lines_pass() {
        let shown = Arc::new(AtomicUsize::new(0));
        let window = Duration::from_millis(300);
        let subscriber = tracing_subscriber::registry()
            .with(Count(shown.clone()).with_filter(PeerWarnings::with_window(window)));
        tracing::subscriber::with_default(subscriber, || {
            let count = || shown.load(Ordering::Relaxed);
            for _ in 0..1000 {
                warn_from("flooder");
            }
            assert_eq!(count(), LINES_PER_WINDOW as usize);
            // Another peer has its own count, as has another kind of warning.
            warn_from("honest");
            tracing::warn!(peer = %"flooder", "another kind");
            assert_eq!(count(), LINES_PER_WINDOW as usize + 2);
            // Lines naming no peer, and those below WARN, all pass.
            for _ in 0..20 {
                tracing::warn!("no peer named");
                tracing::info!(peer = %"flooder", "progress");
            }
            assert_eq!(count(), LINES_PER_WINDOW as usize + 42);
            // The next window shows the flooder again.
            std::thread::sleep(window + Duration::from_millis(50));
            for _ in 0..10 {
                warn_from("flooder");
            }
            assert_eq!(count(), 2 * LINES_PER_WINDOW as usize + 42);
        });
    }

    #[test]
    fn made_up_peers_cannot_grow_the_counts_without_bound() {
        let filter = PeerWarnings::default();
        let site = {
            // Any call site will do as the key's first half.
            struct Site;
            static SITE: Site = Site;
            impl tracing::callsite::Callsite for Site {
                fn set_interest(&self, _: tracing::subscriber::Interest) {}
                fn metadata(&self) -> &Metadata<'_> {
                    unreachable!("not registered")
                }
            }
            Identifier(&SITE)
        };
        for i in 0..3 * MAX_COUNTED {
            assert!(filter.admit(site.clone(), format!("peer-{i}")));
        }
        assert!(filter.counts.lock().unwrap().len() <= MAX_COUNTED);
    }
}
