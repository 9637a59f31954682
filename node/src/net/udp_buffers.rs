//! Larger receive buffers for the node's own QUIC sockets.
//!
//! libp2p's QUIC transport leaves its socket's receive buffer at the system's
//! default (on Linux `net.core.rmem_default`, often 208 KiB) and offers no way
//! to set it. A tensor part arrives as a burst of megabytes; while the
//! receiving node is busy (decoding, reducing), the kernel drops what
//! overflows the buffer and QUIC stalls until it has resent it. Measured on
//! 2 cores, all-reduce of 1M values: with 208 KiB a third of the rounds took
//! 47-57 ms instead of 18-25 ms (a 2 MB transfer 33-37 ms instead of 7 ms), and
//! 4 peers took 95 ms a round; with 4 MiB the drops stopped and 4 peers took
//! 60-63 ms (see BENCHMARKS.md).
//!
//! So once the transport reports a listening port, the node finds its own
//! UDP sockets bound to that port and raises their receive buffers itself, as
//! quic-go does for its sockets. It reaches a socket libp2p owns through a
//! duplicate of its descriptor (`pidfd_getfd` on this process, Linux 5.6 and
//! later), which shares the socket, so no unsafe code touches libp2p's
//! descriptor. An unprivileged process may ask for at most
//! `net.core.rmem_max`; a node with `CAP_NET_ADMIN` goes past it. Where that
//! cap leaves the buffer small, the node says which setting to raise.

use std::fmt;

use libp2p::multiaddr::Protocol;
use libp2p::Multiaddr;
use tracing::{debug, info};

/// Receive buffer a node asks for on each of its QUIC sockets: a couple of
/// tensor parts in flight fit in it.
pub const WANTED_BYTES: usize = 4 * 1024 * 1024;

/// One socket's receive buffer before and after [`raise_receive_buffers`], as
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

/// Why the buffers could not be raised; the node goes on with the defaults.
#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    /// No UDP socket of this process is bound to the port.
    #[error("no UDP socket of this process is bound to port {0}")]
    NoSocket(u16),
    /// The process cannot duplicate its own descriptors (an older kernel, or
    /// a sandbox that filters the system call).
    #[error("cannot reach this process's own sockets: {0}")]
    Unreachable(std::io::Error),
    /// Not Linux: nothing is done.
    #[error("raising UDP receive buffers is only done on Linux")]
    Unsupported,
}

/// Raises the receive buffer of every UDP socket of this process bound to
/// `port` to `want` bytes where the system allows it, never lowering one.
/// Returns what each socket had before and has now. Each port is tried once
/// per node (the caller keeps track), refused or not.
pub fn raise_receive_buffers(port: u16, want: usize) -> Result<Vec<Raised>, BufferError> {
    imp::raise_receive_buffers(port, want)
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

/// Raises the buffers of the sockets on `port` to [`WANTED_BYTES`] and logs
/// the outcome; any failure leaves the defaults and is only logged.
pub fn raise_and_report(port: u16) {
    match raise_receive_buffers(port, WANTED_BYTES) {
        Ok(sockets) => {
            for raised in sockets {
                match advice(port, raised, WANTED_BYTES) {
                    Some(advice) => info!("{advice}"),
                    None => debug!(
                        port,
                        before = %Kib(raised.before),
                        after = %Kib(raised.after),
                        "QUIC socket receive buffer raised (as the kernel counts it)"
                    ),
                }
            }
        }
        Err(BufferError::Unsupported) => {}
        // The socket keeps the system default, so that is the setting to name.
        Err(e) => info!(
            port,
            error = %e,
            "cannot raise the QUIC socket's UDP receive buffer; averaging is faster \
             with `sudo sysctl -w net.core.rmem_default={WANTED_BYTES}` and a restart \
             of the node"
        ),
    }
}

/// The UDP port of a QUIC listen address of our own, where a socket of ours
/// is bound; `None` for other transports and for relayed addresses (whose
/// port is the relay's).
pub fn quic_port(addr: &Multiaddr) -> Option<u16> {
    let mut parts = addr.iter().skip(1);
    let (Some(Protocol::Udp(port)), Some(Protocol::QuicV1)) = (parts.next(), parts.next()) else {
        return None;
    };
    match parts.next() {
        None | Some(Protocol::P2p(_)) if parts.next().is_none() => Some(port),
        _ => None,
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
    use std::net::SocketAddr;
    use std::os::fd::OwnedFd;

    use rustix::net::sockopt;
    use rustix::process::{getpid, pidfd_getfd, pidfd_open, PidfdFlags, PidfdGetfdFlags};

    use super::{holds, plain_request_raises, BufferError, Raised};

    pub(super) fn raise_receive_buffers(
        port: u16,
        want: usize,
    ) -> Result<Vec<Raised>, BufferError> {
        let unreachable = |e: std::io::Error| BufferError::Unreachable(e);
        let pidfd = pidfd_open(getpid(), PidfdFlags::empty()).map_err(|e| unreachable(e.into()))?;
        let mut raised = Vec::new();
        let mut refused = None;
        for entry in std::fs::read_dir("/proc/self/fd").map_err(unreachable)? {
            let Ok(entry) = entry else { continue };
            let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            let is_socket = std::fs::read_link(entry.path())
                .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"));
            if !is_socket {
                continue;
            }
            // A duplicate shares the socket (and its buffer) and is closed on
            // drop. Should the number have been closed and reused meanwhile,
            // the checks below see whatever it is now.
            match pidfd_getfd(&pidfd, fd, PidfdGetfdFlags::empty()) {
                Ok(socket) if is_udp_on(&socket, port) => raised.push(raise(&socket, want)),
                Ok(_) => {}
                Err(e) => refused = Some(e),
            }
        }
        match (raised.is_empty(), refused) {
            (true, Some(e)) => Err(unreachable(e.into())),
            (true, None) => Err(BufferError::NoSocket(port)),
            (false, _) => Ok(raised),
        }
    }

    /// Whether `socket` is a UDP socket bound to `port`.
    fn is_udp_on(socket: &OwnedFd, port: u16) -> bool {
        let datagram = sockopt::socket_type(socket) == Ok(rustix::net::SocketType::DGRAM);
        let bound = rustix::net::getsockname(socket)
            .ok()
            .and_then(|addr| SocketAddr::try_from(addr).ok())
            .is_some_and(|addr| addr.port() == port);
        datagram && bound
    }

    /// Asks for `want` bytes: past `net.core.rmem_max` where privileged,
    /// else up to it, and only where that is more than the socket has.
    fn raise(socket: &OwnedFd, want: usize) -> Raised {
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
        Raised {
            before,
            after: size(),
        }
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

    pub(super) fn raise_receive_buffers(
        _port: u16,
        _want: usize,
    ) -> Result<Vec<Raised>, BufferError> {
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

    #[test]
    fn only_direct_quic_addresses_name_a_port_of_ours() {
        let port = |s: &str| quic_port(&s.parse().expect("multiaddr"));
        let peer = "12D3KooWEYHJFFxmDWdZUMns8bYir6Q9L9Sn3ianwVLH6pbuoBFb";
        assert_eq!(port("/ip4/127.0.0.1/udp/4001/quic-v1"), Some(4001));
        assert_eq!(
            port(&format!("/ip6/::1/udp/4002/quic-v1/p2p/{peer}")),
            Some(4002)
        );
        assert_eq!(port("/ip4/127.0.0.1/tcp/4001"), None);
        assert_eq!(port("/ip4/127.0.0.1/udp/4001"), None);
        assert_eq!(
            port(&format!(
                "/ip4/10.0.0.1/udp/4001/quic-v1/p2p/{peer}/p2p-circuit/p2p/{peer}"
            )),
            None
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_socket_on_the_port_is_raised_and_no_other() {
        use rustix::net::sockopt::{set_socket_recv_buffer_size, socket_recv_buffer_size};

        let ours = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let other = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        // Shrunk first, so that raising it to 64 KiB is within any system's
        // net.core.rmem_max (208 KiB by default) and must happen.
        for s in [&ours, &other] {
            set_socket_recv_buffer_size(s, 16 * 1024).expect("shrink");
        }
        let other_before = socket_recv_buffer_size(&other).expect("size");
        let port = ours.local_addr().expect("addr").port();
        let want = 64 * 1024;

        let raised = match raise_receive_buffers(port, want) {
            // A sandbox (Docker's default seccomp profile without
            // CAP_SYS_PTRACE) or a kernel before 5.6 refuses pidfd_getfd:
            // the node then logs and keeps the defaults.
            Err(BufferError::Unreachable(e)) => {
                eprintln!("skipped: this process cannot duplicate its own descriptors: {e}");
                return;
            }
            other => other.expect("the socket on the port is found"),
        };
        assert_eq!(raised.len(), 1, "{raised:?}");
        assert!(raised[0].reached(want), "{raised:?}");
        assert!(raised[0].before < raised[0].after, "{raised:?}");
        assert_eq!(
            socket_recv_buffer_size(&ours).expect("size"),
            raised[0].after
        );
        assert_eq!(socket_recv_buffer_size(&other).expect("size"), other_before);

        // Never lowered: asking for less leaves it.
        let again = raise_receive_buffers(port, 1024).expect("reachable");
        assert_eq!(again[0].after, raised[0].after);

        drop(ours);
        assert!(matches!(
            raise_receive_buffers(port, want),
            Err(BufferError::NoSocket(p)) if p == port
        ));
    }
}
