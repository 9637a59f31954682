//! Whether the system's UDP receive buffers can take a tensor part's burst.
//!
//! libp2p's QUIC transport leaves its socket's receive buffer at the system's
//! default (on Linux `net.core.rmem_default`, often 208 KiB) and offers no way
//! to set it. A tensor part arrives as a burst of megabytes; while the
//! receiving node is busy (decoding, reducing), the kernel drops what
//! overflows the buffer and QUIC stalls until it has resent it. Measured on
//! 2 cores, all-reduce of 1M values: with 208 KiB a third of the rounds took
//! 47-57 ms instead of 18-25 ms (a 2 MB transfer 33-37 ms instead of 7 ms), and
//! 4 peers took 95 ms a round; with 4 MiB the drops stopped and 4 peers took
//! 60-63 ms (see BENCHMARKS.md). A node tells its user so at start.

use tracing::info;

/// Default receive buffer below which a node advises raising it.
pub const ADVISED_BYTES: u64 = 4 * 1024 * 1024;

/// Where Linux keeps the default receive buffer size of a socket.
const RMEM_DEFAULT: &str = "/proc/sys/net/core/rmem_default";

/// What to tell the user of a system whose default UDP receive buffer is
/// `rmem_default` bytes; `None` when it is large enough.
pub fn advice(rmem_default: u64) -> Option<String> {
    (rmem_default < ADVISED_BYTES).then(|| {
        format!(
            "UDP receive buffers default to {} KiB (net.core.rmem_default): bursts of \
             tensor parts overflow them and QUIC stalls to resend what was dropped; \
             averaging is faster with `sudo sysctl -w net.core.rmem_default={ADVISED_BYTES}`",
            rmem_default / 1024
        )
    })
}

/// Logs [`advice`] for this system, where it can read the setting (Linux).
pub fn check() {
    let Ok(text) = std::fs::read_to_string(RMEM_DEFAULT) else {
        return;
    };
    if let Some(advice) = text.trim().parse().ok().and_then(advice) {
        info!("{advice}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_default_buffers_get_advice_that_names_the_fix() {
        let text = advice(212_992).expect("208 KiB is too small");
        assert!(text.contains("208 KiB"), "{text}");
        assert!(
            text.contains("sysctl -w net.core.rmem_default=4194304"),
            "{text}"
        );
        assert_eq!(advice(ADVISED_BYTES), None);
        assert_eq!(advice(16 << 20), None);
    }
}
