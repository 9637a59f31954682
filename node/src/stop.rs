//! Ctrl-C and SIGTERM: a data-parallel node finishes the round it is in,
//! writes its checkpoint and exits, so an operator who stops it loses no
//! trained round (a second signal, or a round that takes too long, still
//! stops it at once).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Exit status of a node stopped by a signal (128 + SIGINT, as shells do).
pub const STOPPED_EXIT_CODE: u8 = 130;

/// A request to stop at the next round boundary, shared between the signal
/// handler and the driver. The default is never requested.
#[derive(Clone, Debug, Default)]
pub struct StopRequest(Arc<(AtomicBool, tokio::sync::Notify)>);

impl StopRequest {
    /// Asks the node to stop.
    pub fn request(&self) {
        self.0 .0.store(true, Ordering::SeqCst);
        self.0 .1.notify_waiters();
    }

    /// Whether a stop was asked for.
    pub fn requested(&self) -> bool {
        self.0 .0.load(Ordering::SeqCst)
    }

    /// Waits until a stop is asked for.
    pub async fn wait(&self) {
        loop {
            let notified = self.0 .1.notified();
            if self.requested() {
                return;
            }
            notified.await;
        }
    }
}

/// Turns the first Ctrl-C or SIGTERM into `stop`, saying so; a second one,
/// or `grace` passing after the first, exits at once.
pub fn on_signals(stop: StopRequest, grace: Duration) -> std::io::Result<()> {
    #[cfg(unix)]
    let (mut interrupt, mut terminate) = {
        use tokio::signal::unix::{signal, SignalKind};
        (
            signal(SignalKind::interrupt())?,
            signal(SignalKind::terminate())?,
        )
    };
    tokio::spawn(async move {
        let mut signals = 0;
        loop {
            #[cfg(unix)]
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
            #[cfg(not(unix))]
            if tokio::signal::ctrl_c().await.is_err() {
                return;
            }
            signals += 1;
            if signals > 1 {
                eprintln!("stopped at once (second signal)");
                std::process::exit(i32::from(STOPPED_EXIT_CODE));
            }
            eprintln!(
                "stopping after this round (its checkpoint is written if --checkpoint-dir is set); signal again to stop at once"
            );
            stop.request();
            tokio::spawn(async move {
                tokio::time::sleep(grace).await;
                eprintln!("stopped at once: the node was still busy {grace:?} after the signal");
                std::process::exit(i32::from(STOPPED_EXIT_CODE));
            });
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stop_wakes_whoever_waits_for_it() {
        let stop = StopRequest::default();
        assert!(!stop.requested());
        let waiting = tokio::spawn({
            let stop = stop.clone();
            async move { stop.wait().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        stop.request();
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("woken")
            .unwrap();
        // Asked already: returns at once.
        stop.wait().await;
        assert!(stop.requested());
    }
}
