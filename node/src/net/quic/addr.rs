//! QUIC multiaddrs (`/ip4|ip6/ADDR/udp/PORT/quic-v1[/p2p/PEER]`) to socket
//! addresses and back: the only address form this transport takes.

use std::net::SocketAddr;

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};

/// The UDP address `addr` names and the peer it names, if any; `None` for
/// anything but a QUIC v1 address (draft-29, DNS and relayed addresses are
/// for other transports).
pub(super) fn to_socket_addr(addr: &Multiaddr) -> Option<(SocketAddr, Option<PeerId>)> {
    let mut parts = addr.iter();
    let ip: std::net::IpAddr = match parts.next()? {
        Protocol::Ip4(ip) => ip.into(),
        Protocol::Ip6(ip) => ip.into(),
        _ => return None,
    };
    let Protocol::Udp(port) = parts.next()? else {
        return None;
    };
    let Protocol::QuicV1 = parts.next()? else {
        return None;
    };
    let peer = match parts.next() {
        None => None,
        Some(Protocol::P2p(peer)) => Some(peer),
        Some(_) => return None,
    };
    if parts.next().is_some() {
        return None;
    }
    Some((SocketAddr::new(ip, port), peer))
}

/// The QUIC v1 multiaddr of a UDP address, as listeners report theirs and
/// connections name their ends.
pub(super) fn to_multiaddr(addr: SocketAddr) -> Multiaddr {
    Multiaddr::empty()
        .with(addr.ip().into())
        .with(Protocol::Udp(addr.port()))
        .with(Protocol::QuicV1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quic_addresses_round_trip_with_and_without_a_peer() {
        let peer = PeerId::random();
        for text in ["/ip4/192.0.2.7/udp/4001/quic-v1", "/ip6/::1/udp/9/quic-v1"] {
            let addr: Multiaddr = text.parse().unwrap();
            let (socket, named) = to_socket_addr(&addr).unwrap();
            assert_eq!(named, None);
            assert_eq!(to_multiaddr(socket), addr);
            let with_peer = addr.clone().with(Protocol::P2p(peer));
            assert_eq!(to_socket_addr(&with_peer), Some((socket, Some(peer))));
        }
    }

    #[test]
    fn other_transports_addresses_are_not_taken() {
        let peer = PeerId::random();
        for text in [
            "/ip4/192.0.2.7/udp/4001/quic".to_string(),
            "/ip4/192.0.2.7/tcp/4001".to_string(),
            "/dns4/example.com/udp/4001/quic-v1".to_string(),
            "/ip4/192.0.2.7/udp/4001".to_string(),
            format!("/ip4/192.0.2.7/udp/4001/quic-v1/p2p/{peer}/p2p-circuit"),
            "/ip4/192.0.2.7/udp/4001/quic-v1/webtransport".to_string(),
        ] {
            let addr: Multiaddr = text.parse().unwrap();
            assert_eq!(to_socket_addr(&addr), None, "{text}");
        }
    }
}
