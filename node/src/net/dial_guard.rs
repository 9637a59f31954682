//! Keeps a dial to a peer from failing because one of its addresses leads
//! somewhere else.
//!
//! Peers announce every address they listen on, loopback and LAN ones
//! included, and volunteers mostly keep the default port. So a peer behind
//! another home router can announce `192.168.1.2:4001` or `127.0.0.1:4001`,
//! which from here is our own socket, or another machine on our own LAN.
//! libp2p dials a peer's addresses concurrently, settles on the first
//! connection that opens and only then checks whose it is: a wrong one
//! failed the whole dial, cancelling the relayed address that would have
//! worked. (The swarm drops dial addresses equal to its listen addresses,
//! but not the same ones with the peer's `/p2p/…` appended, as identify's
//! address cache offers them.) Two guards turn such an address into one
//! failed address among the peer's others:
//! - [`NoSelfDial`] refuses our own listen addresses before any packet;
//! - [`check_dialed_peer`] fails a connection that opened to another peer
//!   than the one the address names, before the swarm settles on it.

use super::nat::strip_peer;
use libp2p::core::transport::{DialOpts, ListenerId, Transport, TransportError, TransportEvent};
use libp2p::core::ConnectedPoint;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use std::pin::Pin;
use std::task::{Context, Poll};

/// A transport that refuses to dial the addresses it listens on itself.
pub struct NoSelfDial<T> {
    inner: T,
    /// Our listen addresses as the inner transport reported them.
    own: Vec<(ListenerId, Multiaddr)>,
}

impl<T> NoSelfDial<T> {
    /// Wraps `inner`, which then learns its own addresses from its events.
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            own: Vec::new(),
        }
    }

    fn is_own(&self, addr: &Multiaddr) -> bool {
        let addr = strip_peer(addr.clone());
        self.own.iter().any(|(_, a)| *a == addr)
    }
}

impl<T: Transport + Unpin> Transport for NoSelfDial<T> {
    type Output = T::Output;
    type Error = T::Error;
    type ListenerUpgrade = T::ListenerUpgrade;
    type Dial = T::Dial;

    fn listen_on(
        &mut self,
        id: ListenerId,
        addr: Multiaddr,
    ) -> Result<(), TransportError<Self::Error>> {
        self.inner.listen_on(id, addr)
    }

    fn remove_listener(&mut self, id: ListenerId) -> bool {
        self.inner.remove_listener(id)
    }

    fn dial(
        &mut self,
        addr: Multiaddr,
        opts: DialOpts,
    ) -> Result<Self::Dial, TransportError<Self::Error>> {
        if self.is_own(&addr) {
            tracing::debug!(%addr, "not dialing our own listen address");
            // "Not supported" fails this one address and lets the swarm
            // go on with the peer's others.
            return Err(TransportError::MultiaddrNotSupported(addr));
        }
        self.inner.dial(addr, opts)
    }

    fn poll(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<TransportEvent<Self::ListenerUpgrade, Self::Error>> {
        let this = self.get_mut();
        let event = std::task::ready!(Pin::new(&mut this.inner).poll(cx));
        this.track(&event);
        Poll::Ready(event)
    }
}

impl<T: Transport> NoSelfDial<T> {
    /// Keeps `own` in step with the inner transport's listeners.
    fn track(&mut self, event: &TransportEvent<T::ListenerUpgrade, T::Error>) {
        match event {
            TransportEvent::NewAddress {
                listener_id,
                listen_addr,
            } => self
                .own
                .push((*listener_id, strip_peer(listen_addr.clone()))),
            TransportEvent::AddressExpired {
                listener_id,
                listen_addr,
            } => {
                let gone = strip_peer(listen_addr.clone());
                self.own
                    .retain(|(id, a)| !(id == listener_id && *a == gone));
            }
            TransportEvent::ListenerClosed { listener_id, .. } => {
                self.own.retain(|(id, _)| id != listener_id);
            }
            _ => {}
        }
    }
}

/// A dialed address led to another peer than the one it names.
#[derive(Debug, thiserror::Error)]
#[error("{address} reached peer {obtained}, not the peer it names")]
pub struct WrongPeer {
    /// The address dialed, with the `/p2p/…` part naming the peer we wanted.
    pub address: Multiaddr,
    /// Whom the connection reached.
    pub obtained: PeerId,
}

/// For [`Transport::and_then`]: an outbound connection whose address names a
/// peer (`…/p2p/PEER`, as the swarm dials) must have reached that peer.
/// Failing here makes it one failed address of the dial instead of the
/// dial's outcome; inbound connections and addresses naming no peer pass.
pub fn check_dialed_peer<M>(
    (peer, connection): (PeerId, M),
    endpoint: ConnectedPoint,
) -> futures::future::Ready<Result<(PeerId, M), WrongPeer>> {
    let wanted = match &endpoint {
        ConnectedPoint::Dialer { address, .. } => named_peer(address).map(|p| (p, address)),
        ConnectedPoint::Listener { .. } => None,
    };
    futures::future::ready(match wanted {
        Some((want, address)) if want != peer => {
            tracing::debug!(%address, obtained = %peer, "address led to another peer");
            Err(WrongPeer {
                address: address.clone(),
                obtained: peer,
            })
        }
        _ => Ok((peer, connection)),
    })
}

/// The peer a `…/p2p/PEER` address names, if it ends so.
fn named_peer(addr: &Multiaddr) -> Option<PeerId> {
    match addr.iter().last() {
        Some(Protocol::P2p(peer)) => Some(peer),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::core::transport::{MemoryTransport, PortUse};
    use libp2p::core::Endpoint;

    type Event = TransportEvent<
        <MemoryTransport as Transport>::ListenerUpgrade,
        <MemoryTransport as Transport>::Error,
    >;

    fn dial_opts() -> DialOpts {
        DialOpts {
            role: Endpoint::Dialer,
            port_use: PortUse::New,
        }
    }

    /// Polls until the inner transport reports a listener change.
    fn next_listener_event(t: &mut NoSelfDial<MemoryTransport>) -> Event {
        futures::executor::block_on(futures::future::poll_fn(|cx| loop {
            match Pin::new(&mut *t).poll(cx) {
                Poll::Ready(TransportEvent::Incoming { .. }) => continue,
                Poll::Ready(event) => return Poll::Ready(event),
                Poll::Pending => return Poll::Pending,
            }
        }))
    }

    fn refused(t: &mut NoSelfDial<MemoryTransport>, addr: &Multiaddr) -> bool {
        match t.dial(addr.clone(), dial_opts()) {
            Err(TransportError::MultiaddrNotSupported(a)) => {
                assert_eq!(a, *addr);
                true
            }
            Err(e) => panic!("dialing {addr} failed another way: {e:?}"),
            Ok(_) => false,
        }
    }

    #[test]
    fn our_own_addresses_are_refused_and_a_peers_dialed() {
        let ours: Multiaddr = "/memory/7301".parse().unwrap();
        let theirs: Multiaddr = "/memory/7302".parse().unwrap();
        let mut peer = NoSelfDial::new(MemoryTransport::default());
        peer.listen_on(ListenerId::next(), theirs.clone()).unwrap();
        next_listener_event(&mut peer);

        let mut t = NoSelfDial::new(MemoryTransport::default());
        let listener = ListenerId::next();
        t.listen_on(listener, ours.clone()).unwrap();
        // Until the transport reports the address, nothing is refused.
        assert!(!t.is_own(&ours));
        assert!(matches!(
            next_listener_event(&mut t),
            TransportEvent::NewAddress { .. }
        ));
        assert!(refused(&mut t, &ours));
        let with_peer = ours.clone().with(Protocol::P2p(PeerId::random()));
        assert!(refused(&mut t, &with_peer), "the /p2p part is ignored");
        assert!(!refused(&mut t, &theirs), "a peer's address is dialed");

        // Once the listener is closed the address may be someone else's.
        assert!(t.remove_listener(listener));
        assert!(matches!(
            next_listener_event(&mut t),
            TransportEvent::ListenerClosed { .. }
        ));
        assert!(!t.is_own(&ours));
    }

    #[test]
    fn an_expired_address_is_dialed_again_and_the_listeners_others_are_not() {
        let mut t = NoSelfDial::new(MemoryTransport::default());
        let (a, b) = (ListenerId::next(), ListenerId::next());
        let lan: Multiaddr = "/ip4/192.168.1.2/udp/4001/quic-v1".parse().unwrap();
        let lo: Multiaddr = "/ip4/127.0.0.1/udp/4001/quic-v1".parse().unwrap();
        let other: Multiaddr = "/ip4/127.0.0.1/udp/4002/quic-v1".parse().unwrap();
        for (id, addr) in [(a, &lan), (a, &lo), (b, &other)] {
            t.track(&Event::NewAddress {
                listener_id: id,
                listen_addr: addr.clone(),
            });
        }
        assert!(t.is_own(&lan) && t.is_own(&lo) && t.is_own(&other));
        // An interface went away: only that address is freed, and only for
        // the listener that reported it.
        t.track(&Event::AddressExpired {
            listener_id: b,
            listen_addr: lan.clone(),
        });
        assert!(t.is_own(&lan));
        t.track(&Event::AddressExpired {
            listener_id: a,
            listen_addr: lan.clone(),
        });
        assert!(!t.is_own(&lan) && t.is_own(&lo));
        t.track(&Event::ListenerClosed {
            listener_id: a,
            reason: Ok(()),
        });
        assert!(!t.is_own(&lo) && t.is_own(&other));
    }

    #[test]
    fn a_dialed_connection_must_reach_the_peer_its_address_names() {
        use futures::FutureExt;
        let (want, other) = (PeerId::random(), PeerId::random());
        let base: Multiaddr = "/ip4/192.168.1.3/udp/4001/quic-v1".parse().unwrap();
        let named = base.clone().with(Protocol::P2p(want));
        let dialer = |address: &Multiaddr| ConnectedPoint::Dialer {
            address: address.clone(),
            role_override: Endpoint::Dialer,
            port_use: PortUse::Reuse,
        };
        let check = |peer, endpoint| {
            check_dialed_peer((peer, ()), endpoint)
                .now_or_never()
                .expect("decided at once")
        };
        let wrong = check(other, dialer(&named)).unwrap_err();
        assert_eq!(
            (wrong.address.clone(), wrong.obtained),
            (named.clone(), other)
        );
        assert!(wrong.to_string().contains("192.168.1.3"), "{wrong}");
        assert_eq!(check(want, dialer(&named)).unwrap().0, want);
        // No peer named (a bootstrap address given without one): any peer.
        assert_eq!(check(other, dialer(&base)).unwrap().0, other);
        let inbound = ConnectedPoint::Listener {
            local_addr: base.clone(),
            send_back_addr: base,
        };
        assert_eq!(check(other, inbound).unwrap().0, other);
    }
}
