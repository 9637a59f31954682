//! A cap on the connections one IP address may have open to us.
//!
//! libp2p's connection limits count per peer id and in total, and peer ids
//! cost nothing: one host could open 8 connections under each of 128 fresh
//! ids and hold every one of the 1,024 inbound slots, so no member could
//! connect to us any more. Counting by the remote address as well bounds
//! what one host takes. IPv6 addresses count by their /64, which one host
//! usually holds whole. Loopback (a local testnet's nodes all share it) and
//! relayed connections (which name their source peer, not an address, and
//! are bounded by the relay) are not counted.

use libp2p::core::{transport::PortUse, ConnectedPoint, Endpoint};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{
    behaviour::{ConnectionClosed, ConnectionEstablished},
    dummy, ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId};
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::task::{Context, Poll};

/// Inbound connections one address may hold: several volunteers behind one
/// home router or carrier NAT fit many times over (each needs one or two).
pub const MAX_INBOUND_PER_IP: usize = 64;

/// Why an inbound connection was refused.
#[derive(Debug, thiserror::Error)]
#[error("{ip} already holds {MAX_INBOUND_PER_IP} inbound connections to this node")]
pub struct TooManyFromIp {
    /// The address that hit the cap.
    pub ip: IpAddr,
}

/// Inbound connections open, by the address they come from.
#[derive(Debug, Default)]
pub struct PerIpTally {
    by_ip: HashMap<IpAddr, usize>,
    of_connection: HashMap<ConnectionId, IpAddr>,
}

impl PerIpTally {
    /// Refuses a connection from `remote` when its address already holds
    /// `max` counted connections.
    pub fn check(&self, remote: &Multiaddr, max: usize) -> Result<(), TooManyFromIp> {
        match counted_ip(remote) {
            Some(ip) if self.by_ip.get(&ip).copied().unwrap_or(0) >= max => {
                Err(TooManyFromIp { ip })
            }
            _ => Ok(()),
        }
    }

    /// Inbound connection `id` from `remote` is established.
    pub fn opened(&mut self, id: ConnectionId, remote: &Multiaddr) {
        if let Some(ip) = counted_ip(remote) {
            if self.of_connection.insert(id, ip).is_none() {
                *self.by_ip.entry(ip).or_default() += 1;
            }
        }
    }

    /// Connection `id` closed.
    pub fn closed(&mut self, id: ConnectionId) {
        let Some(ip) = self.of_connection.remove(&id) else {
            return;
        };
        if let Some(n) = self.by_ip.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.by_ip.remove(&ip);
            }
        }
    }
}

/// The address a connection from `remote` counts against, if any: an
/// IPv4 address, or an IPv6 address's /64.
fn counted_ip(remote: &Multiaddr) -> Option<IpAddr> {
    if remote.iter().any(|p| matches!(p, Protocol::P2pCircuit)) {
        return None;
    }
    let ip = remote.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    })?;
    if ip.is_loopback() {
        return None;
    }
    Some(match ip {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & (!0u128 << 64)).into()),
        v4 => v4,
    })
}

/// The behaviour that applies [`MAX_INBOUND_PER_IP`].
#[derive(Debug, Default)]
pub struct PerIpLimit {
    tally: PerIpTally,
}

impl NetworkBehaviour for PerIpLimit {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.tally
            .check(remote, MAX_INBOUND_PER_IP)
            .map_err(ConnectionDenied::new)?;
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            // Counted once established: a connection another behaviour
            // refused never took a slot.
            FromSwarm::ConnectionEstablished(ConnectionEstablished {
                connection_id,
                endpoint: ConnectedPoint::Listener { send_back_addr, .. },
                ..
            }) => self.tally.opened(connection_id, send_back_addr),
            FromSwarm::ConnectionClosed(ConnectionClosed { connection_id, .. }) => {
                self.tally.closed(connection_id)
            }
            _ => {}
        }
    }

    fn on_connection_handler_event(
        &mut self,
        _: PeerId,
        _: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> Multiaddr {
        s.parse().unwrap()
    }

    #[test]
    fn one_address_holds_at_most_the_cap_and_closing_frees_a_slot() {
        let mut tally = PerIpTally::default();
        let host = addr("/ip4/203.0.113.7/udp/4001/quic-v1");
        let ids: Vec<ConnectionId> = (1..=3).map(ConnectionId::new_unchecked).collect();
        for id in &ids {
            tally.check(&host, 3).unwrap();
            tally.opened(*id, &host);
        }
        let e = tally.check(&host, 3).unwrap_err();
        assert!(e.to_string().contains("203.0.113.7"), "{e}");
        // Another address, and the same one on another port, are apart / alike.
        tally
            .check(&addr("/ip4/203.0.113.8/udp/4001/quic-v1"), 3)
            .unwrap();
        assert!(tally
            .check(&addr("/ip4/203.0.113.7/udp/9/quic-v1"), 3)
            .is_err());
        // A connection counted once, however often it is reported.
        tally.opened(ids[0], &host);
        tally.closed(ids[0]);
        tally.check(&host, 3).unwrap();
        tally.closed(ids[0]);
        tally.closed(ids[1]);
        tally.closed(ids[2]);
        assert!(tally.by_ip.is_empty() && tally.of_connection.is_empty());
    }

    #[test]
    fn an_ipv6_host_counts_by_its_64() {
        let mut tally = PerIpTally::default();
        let one = addr("/ip6/2001:db8:1:2::7/udp/4001/quic-v1");
        tally.opened(ConnectionId::new_unchecked(1), &one);
        let same_64 = addr("/ip6/2001:db8:1:2:ffff::9/udp/4001/quic-v1");
        assert!(
            tally.check(&same_64, 1).is_err(),
            "another address of the /64"
        );
        tally
            .check(&addr("/ip6/2001:db8:1:3::7/udp/4001/quic-v1"), 1)
            .unwrap();
    }

    #[test]
    fn loopback_and_relayed_connections_are_not_counted() {
        let mut tally = PerIpTally::default();
        // What libp2p's relay transport reports for an inbound relayed
        // connection (the source peer), and a circuit address.
        let relayed = addr("/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN");
        let circuit = addr(
            "/ip4/203.0.113.7/udp/4001/quic-v1/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN/p2p-circuit",
        );
        for (i, a) in [
            addr("/ip4/127.0.0.1/udp/4001/quic-v1"),
            addr("/ip6/::1/udp/1/quic-v1"),
            relayed,
            circuit,
        ]
        .iter()
        .enumerate()
        {
            for j in 0..5 {
                tally.check(a, 1).unwrap();
                tally.opened(ConnectionId::new_unchecked(i * 10 + j), a);
            }
        }
        assert!(tally.by_ip.is_empty());
    }
}
