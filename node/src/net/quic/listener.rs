//! One listening endpoint: accepts connections and reports the addresses it
//! can be reached at (every interface's, for a wildcard address).

use std::collections::{HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use futures::FutureExt;
use if_watch::IfEvent;
use libp2p::core::transport::ListenerId;
use libp2p::Multiaddr;

use super::addr::to_multiaddr;
use super::QuicError;

/// What a listener has to tell the transport.
pub(super) enum ListenerEvent {
    /// A peer started a handshake (boxed: quinn's handle is large).
    Incoming(Box<quinn::Incoming>),
    /// The listener can now be reached at this address.
    NewAddress(Multiaddr),
    /// It can no longer be reached at this address.
    AddressExpired(Multiaddr),
    /// Watching the interfaces failed; the listener goes on.
    Error(QuicError),
    /// It was closed; its last event.
    Closed,
}

/// A bound endpoint that accepts connections.
pub(super) struct Listener {
    /// The swarm's name for it.
    pub id: ListenerId,
    /// Also dials, so peers see one address for the node (and a NAT one
    /// mapping), and hole punches go out from the port peers know.
    pub endpoint: quinn::Endpoint,
    /// The endpoint's socket, to send hole-punching packets from.
    socket: UdpSocket,
    /// Where it is bound.
    pub local: SocketAddr,
    /// The interface addresses it is reachable at, for dialing loopback
    /// peers only from a listener that listens on loopback.
    pub addresses: HashSet<IpAddr>,
    accept: BoxFuture<'static, Option<quinn::Incoming>>,
    /// For a wildcard address: the machine's interfaces as they come and go.
    interfaces: Option<if_watch::tokio::IfWatcher>,
    pending: VecDeque<ListenerEvent>,
    closed: bool,
}

impl Listener {
    /// Starts listening on `endpoint`, bound through `socket` (a clone of
    /// the endpoint's).
    pub fn new(
        id: ListenerId,
        endpoint: quinn::Endpoint,
        socket: UdpSocket,
    ) -> Result<Self, QuicError> {
        let local = socket.local_addr()?;
        let mut addresses = HashSet::new();
        let mut pending = VecDeque::new();
        let interfaces = if local.ip().is_unspecified() {
            Some(if_watch::tokio::IfWatcher::new()?)
        } else {
            addresses.insert(local.ip());
            pending.push_back(ListenerEvent::NewAddress(to_multiaddr(local)));
            None
        };
        Ok(Self {
            id,
            accept: accept_next(endpoint.clone()),
            endpoint,
            socket,
            local,
            addresses,
            interfaces,
            pending,
            closed: false,
        })
    }

    /// A second handle on the socket, to punch holes from.
    pub fn socket(&self) -> std::io::Result<UdpSocket> {
        self.socket.try_clone()
    }

    /// Whether it still accepts connections.
    pub fn is_open(&self) -> bool {
        !self.closed
    }

    /// Stops accepting; [`ListenerEvent::Closed`] follows. Connections
    /// already made on the endpoint are closed with it.
    pub fn close(&mut self) {
        if !self.closed {
            self.closed = true;
            self.endpoint.close(0u32.into(), b"listener removed");
            self.pending.push_back(ListenerEvent::Closed);
        }
    }

    /// The next event; `None` once [`ListenerEvent::Closed`] was given.
    pub fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<ListenerEvent>> {
        if let Some(event) = self.pending.pop_front() {
            return Poll::Ready(Some(event));
        }
        if self.closed {
            return Poll::Ready(None);
        }
        if let Poll::Ready(event) = self.poll_interfaces(cx) {
            return Poll::Ready(Some(event));
        }
        match self.accept.poll_unpin(cx) {
            Poll::Ready(Some(incoming)) => {
                self.accept = accept_next(self.endpoint.clone());
                Poll::Ready(Some(ListenerEvent::Incoming(Box::new(incoming))))
            }
            // The endpoint was closed under it.
            Poll::Ready(None) => {
                self.close();
                Poll::Ready(self.pending.pop_front())
            }
            Poll::Pending => Poll::Pending,
        }
    }

    /// An interface of the endpoint's address family that came or went.
    fn poll_interfaces(&mut self, cx: &mut Context<'_>) -> Poll<ListenerEvent> {
        let Some(interfaces) = self.interfaces.as_mut() else {
            return Poll::Pending;
        };
        loop {
            let (ip, up) = match futures::ready!(interfaces.poll_if_event(cx)) {
                Ok(IfEvent::Up(net)) => (net.addr(), true),
                Ok(IfEvent::Down(net)) => (net.addr(), false),
                Err(e) => return Poll::Ready(ListenerEvent::Error(e.into())),
            };
            if ip.is_ipv4() != self.local.is_ipv4() {
                continue;
            }
            let addr = to_multiaddr(SocketAddr::new(ip, self.local.port()));
            return Poll::Ready(if up {
                self.addresses.insert(ip);
                ListenerEvent::NewAddress(addr)
            } else {
                self.addresses.remove(&ip);
                ListenerEvent::AddressExpired(addr)
            });
        }
    }
}

fn accept_next(endpoint: quinn::Endpoint) -> BoxFuture<'static, Option<quinn::Incoming>> {
    async move { endpoint.accept().await }.boxed()
}
