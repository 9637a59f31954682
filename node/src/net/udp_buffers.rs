//! Larger receive buffers for the node's QUIC sockets.
//!
//! A UDP socket's receive buffer starts at the system's default (on Linux
//! `net.core.rmem_default`, often 208 KiB). A tensor part arrives as a burst
//! of megabytes; while the receiving node is busy (decoding, reducing), the
//! kernel drops what overflows the buffer and QUIC stalls until it has resent
//! it. Measured on 2 cores, all-reduce of 1M values: with 208 KiB a third of
//! the rounds took 47-57 ms instead of 18-25 ms (a 2 MB transfer 33-37 ms
//! instead of 7 ms), and 4 peers took 95 ms a round; with 4 MiB the drops
//! stopped and 4 peers took 60-63 ms (see BENCHMARKS.md).
//!
//! So the node's transport (`net::quic`) raises each socket's buffer as it
//! binds it, as quic-go does for its sockets. An unprivileged process may
//! ask for at most `net.core.rmem_max`; a node with `CAP_NET_ADMIN` goes past
//! it. Where that cap leaves the buffer small, the node says which setting
//! to raise.

use std::fmt;

use std::net::UdpSocket;

use tracing::{debug, info};

/// Receive buffer a node asks for on each of its QUIC sockets: a couple of
/// tensor parts in flight fit in it.
pub const WANTED_BYTES: usize = 4 * 1024 * 1024;

/// One socket's receive buffer before and after [`raise_receive_buffer`], as
/// the kernel reports it (Linux reports twice what was asked for, the extra
/// half being its own bookkeeping).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Raised {
    /// Reported size before.
    pub before: usize,
    /// Reported size after.
    pub after: usize,
}

impl Raised {
    /// Whether the socket ended with at least `want` bytes of its own.
    pub fn reached(&self, want: usize) -> bool {
        holds(self.after, want)
    }
}

/// Whether a buffer the kernel counts as `size` holds `want` bytes of data
/// (it counts twice what was asked for).
fn holds(size: usize, want: usize) -> bool {
    size >= want.saturating_mul(2)
}

/// Why the buffer could not be raised; the node goes on with the default.
#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    /// Not Linux: nothing is done.
    #[error("raising UDP receive buffers is only done on Linux")]
    Unsupported,
}

/// Raises `socket`'s receive buffer to `want` bytes where the system allows
/// it, never lowering it. Returns what it had before and has now.
pub fn raise_receive_buffer(socket: &UdpSocket, want: usize) -> Result<Raised, BufferError> {
    imp::raise_receive_buffer(socket, want)
}

/// What to tell the user when a socket's buffer stayed below what the node
/// asked for; `None` when it got it.
pub fn advice(port: u16, raised: Raised, want: usize) -> Option<String> {
    (!raised.reached(want)).then(|| {
        format!(
            "the UDP receive buffer of the QUIC socket on port {port} stays at {} \
             as the kernel counts it, short of the {} it counts for the {} asked \
             (net.core.rmem_max caps what a process may ask for): bursts of tensor \
             parts overflow it and QUIC stalls to resend what was dropped; averaging \
             is faster after `sudo sysctl -w net.core.rmem_max={want}` and a restart \
             of the node",
            Kib(raised.after),
            Kib(want.saturating_mul(2)),
            Kib(want)
        )
    })
}

/// Raises `socket`'s buffer to [`WANTED_BYTES`] and logs the outcome; a
/// socket left short of it keeps working and is only logged.
pub fn raise_and_report(socket: &UdpSocket) {
    let port = socket.local_addr().map_or(0, |a| a.port());
    match raise_receive_buffer(socket, WANTED_BYTES) {
        Ok(raised) => match advice(port, raised, WANTED_BYTES) {
            Some(advice) => info!("{advice}"),
            None => debug!(
                port,
                before = %Kib(raised.before),
                after = %Kib(raised.after),
                "QUIC socket receive buffer raised (as the kernel counts it)"
            ),
        },
        Err(BufferError::Unsupported) => {}
    }
}

/// Bytes shown in KiB.
struct Kib(usize);

impl fmt::Display for Kib {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} KiB", self.0 / 1024)
    }
}

#[cfg(target_os = "linux")]
mod imp {
    use std::net::UdpSocket;

    use rustix::net::sockopt;

    use super::{holds, plain_request_raises, BufferError, Raised};

    /// Asks for `want` bytes: past `net.core.rmem_max` where privileged,
    /// else up to it, and only where that is more than the socket has.
    pub(super) fn raise_receive_buffer(
        socket: &UdpSocket,
        want: usize,
    ) -> Result<Raised, BufferError> {
        let size = || sockopt::socket_recv_buffer_size(socket).unwrap_or(0);
        let before = size();
        if !holds(before, want) {
            // Refused without CAP_NET_ADMIN, which changes nothing.
            let _ = sockopt::set_socket_recv_buffer_size_force(socket, want);
            let forced = size();
            if !holds(forced, want) && plain_request_raises(forced, want, rmem_max()) {
                // A failure leaves the size as it was, which is what gets reported.
                let _ = sockopt::set_socket_recv_buffer_size(socket, want);
            }
        }
        Ok(Raised {
            before,
            after: size(),
        })
    }

    /// `net.core.rmem_max`, the most an unprivileged request gets.
    fn rmem_max() -> Option<usize> {
        std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

/// Whether an unprivileged request for `want` bytes raises a socket that
/// has `current` (as the kernel counts it): the kernel grants
/// `2 min(want, rmem_max)` and would shrink a socket already above that
/// (say one given a large `net.core.rmem_default`). Unknown cap: no.
pub fn plain_request_raises(current: usize, want: usize, rmem_max: Option<usize>) -> bool {
    rmem_max.is_some_and(|cap| want.min(cap).saturating_mul(2) > current)
}

#[cfg(not(target_os = "linux"))]
mod imp {
    use super::{BufferError, Raised};

    pub(super) fn raise_receive_buffer(
        _socket: &std::net::UdpSocket,
        _want: usize,
    ) -> Result<Raised, BufferError> {
        Err(BufferError::Unsupported)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_capped_buffer_gets_advice_that_names_the_setting() {
        let capped = Raised {
            before: 425_984,
            after: 425_984,
        };
        let text = advice(4001, capped, WANTED_BYTES).expect("208 KiB is short of 4 MiB");
        assert!(text.contains("port 4001"), "{text}");
        assert!(text.contains("stays at 416 KiB"), "{text}");
        assert!(text.contains("short of the 8192 KiB"), "{text}");
        assert!(
            text.contains("sysctl -w net.core.rmem_max=4194304"),
            "{text}"
        );
        let full = Raised {
            before: 425_984,
            after: 2 * WANTED_BYTES,
        };
        assert_eq!(advice(4001, full, WANTED_BYTES), None);
    }

    #[test]
    fn an_unprivileged_request_is_made_only_where_it_raises() {
        let cap = Some(212_992);
        // Default 208 KiB, cap 208 KiB: the kernel would grant 416 KiB.
        assert!(plain_request_raises(212_992, WANTED_BYTES, cap));
        // A large rmem_default (4 MiB) under the default cap: asking would
        // shrink it to 416 KiB.
        assert!(!plain_request_raises(4_194_304, WANTED_BYTES, cap));
        assert!(plain_request_raises(
            4_194_304,
            WANTED_BYTES,
            Some(WANTED_BYTES)
        ));
        assert!(!plain_request_raises(
            2 * WANTED_BYTES,
            WANTED_BYTES,
            Some(usize::MAX)
        ));
        assert!(!plain_request_raises(0, WANTED_BYTES, None));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_socket_is_raised_and_never_lowered() {
        use rustix::net::sockopt::{set_socket_recv_buffer_size, socket_recv_buffer_size};

        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
        // Shrunk first, so that raising it to 64 KiB is within any system's
        // net.core.rmem_max (208 KiB by default) and must happen.
        set_socket_recv_buffer_size(&socket, 16 * 1024).expect("shrink");
        let want = 64 * 1024;
        let raised = raise_receive_buffer(&socket, want).expect("Linux");
        assert!(raised.reached(want), "{raised:?}");
        assert!(raised.before < raised.after, "{raised:?}");
        assert_eq!(
            socket_recv_buffer_size(&socket).expect("size"),
            raised.after
        );

        // Asking for less leaves it.
        let again = raise_receive_buffer(&socket, 1024).expect("Linux");
        assert_eq!(again.after, raised.after);
    }
}
