//! The node's QUIC transport for libp2p, on quinn directly.
//!
//! It speaks the same wire protocol as libp2p's own QUIC transport (QUIC v1
//! with libp2p's TLS certificates), so it meets any libp2p peer; it exists
//! because that transport fixes quinn's packet limits (see [`config`]).
//! Listeners also dial, so peers and NATs see one address per node, and a
//! dial that must end as the accepting side punches a hole ([`punch`]).

mod addr;
mod config;
mod connection;
mod listener;
mod punch;
pub mod tls;

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures::channel::oneshot;
use futures::future::BoxFuture;
use futures::FutureExt;
use libp2p::core::transport::{DialOpts, ListenerId, PortUse, TransportError, TransportEvent};
use libp2p::core::{Endpoint, Transport};
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use tracing::{debug, warn};

pub use config::{QuicSettings, LOOPBACK_PAYLOAD};
pub use connection::{Connection, Stream};

use addr::{to_multiaddr, to_socket_addr};
use config::QuinnConfigs;
use listener::{Listener, ListenerEvent};

/// Why a QUIC connection, listener or dial failed.
#[derive(Debug, thiserror::Error)]
pub enum QuicError {
    /// The transport could not be configured (a key TLS cannot use).
    #[error("QUIC setup: {0}")]
    Setup(String),
    /// A socket could not be bound, cloned or written.
    #[error("UDP socket: {0}")]
    Io(#[from] std::io::Error),
    /// quinn refused to start a connection.
    #[error("QUIC dial: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// A connection failed or was closed.
    #[error("QUIC connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// The handshake did not finish in time.
    #[error("QUIC handshake took longer than {0:?}")]
    HandshakeTimedOut(Duration),
    /// The peer's certificate names no libp2p peer.
    #[error("peer's certificate: {0}")]
    Certificate(String),
    /// A dial that must end as the accepting side needs a listener of the
    /// peer's address family to punch from.
    #[error("no listener to punch a hole to {0} from")]
    NoListenerToPunchFrom(SocketAddr),
    /// A hole punch to this address is already under way.
    #[error("a hole punch to {0} is already under way")]
    PunchInProgress(SocketAddr),
    /// The transport was dropped while a hole punch waited.
    #[error("the transport stopped while punching a hole")]
    PunchAbandoned,
}

impl From<QuicError> for TransportError<QuicError> {
    fn from(e: QuicError) -> Self {
        TransportError::Other(e)
    }
}

/// A connection being set up, dialled or accepted.
pub type Upgrade = BoxFuture<'static, Result<(PeerId, Connection), QuicError>>;

/// libp2p's view of the node's QUIC endpoints.
pub struct QuicTransport {
    configs: QuinnConfigs,
    listeners: Vec<Listener>,
    /// Endpoints for dials with no listener of the address family to dial
    /// from, one per family (`true` for IPv4), kept for reuse.
    dialers: HashMap<bool, quinn::Endpoint>,
    /// Dials waiting to accept the connection a hole punch brings, by the
    /// address it comes from.
    punches: HashMap<SocketAddr, oneshot::Sender<Upgrade>>,
    /// Woken when a listener is added or closed outside `poll`.
    waker: Option<Waker>,
}

impl QuicTransport {
    /// A transport for the node holding `keypair`.
    pub fn new(keypair: &Keypair, settings: QuicSettings) -> Result<Self, QuicError> {
        Ok(Self {
            configs: QuinnConfigs::new(keypair, settings)?,
            listeners: Vec::new(),
            dialers: HashMap::new(),
            punches: HashMap::new(),
            waker: None,
        })
    }

    /// An endpoint on `socket` with `config`; `server` for a listener's.
    fn endpoint(
        &self,
        config: &quinn::EndpointConfig,
        socket: UdpSocket,
        server: bool,
    ) -> Result<quinn::Endpoint, QuicError> {
        let server = server.then(|| self.configs.server_default());
        Ok(quinn::Endpoint::new(
            config.clone(),
            server,
            socket,
            Arc::new(quinn::TokioRuntime),
        )?)
    }

    /// An endpoint on a port of its own, for dials no listener serves:
    /// `shared` for all such dials of the address family, else for one dial
    /// (an AutoNAT dial-back, say), which gets quinn's small receive
    /// buffers and the socket's default one, as it carries no tensors.
    fn dialer(&self, family_of: SocketAddr, shared: bool) -> Result<quinn::Endpoint, QuicError> {
        let any: IpAddr = if family_of.is_ipv4() {
            Ipv4Addr::UNSPECIFIED.into()
        } else {
            Ipv6Addr::UNSPECIFIED.into()
        };
        let socket = bind(SocketAddr::new(any, 0), shared)?;
        let config = if shared {
            &self.configs.endpoint
        } else {
            &self.configs.one_dial_endpoint
        };
        self.endpoint(config, socket, false)
    }

    /// The endpoint all dials of `remote`'s address family share while no
    /// listener of that family serves them, made at the first.
    fn shared_dialer(&mut self, remote: SocketAddr) -> Result<quinn::Endpoint, QuicError> {
        if let Some(endpoint) = self.dialers.get(&remote.is_ipv4()) {
            return Ok(endpoint.clone());
        }
        let endpoint = self.dialer(remote, true)?;
        self.dialers.insert(remote.is_ipv4(), endpoint.clone());
        Ok(endpoint)
    }

    /// Wakes `poll` after a listener was added or closed outside it.
    fn wake(&mut self) {
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }

    /// A listener to dial `remote` from: of its address family and, for a
    /// loopback peer, one that listens on loopback. Among several, the same
    /// one each time for the same peer address.
    fn listener_for(&self, remote: SocketAddr) -> Option<&Listener> {
        // A loopback peer is reached from a listener on loopback, any other
        // from one that is not bound to loopback (which could not send there).
        let fits = |l: &&Listener| {
            let path_fits = if remote.ip().is_loopback() {
                l.addresses.iter().any(IpAddr::is_loopback)
            } else {
                !l.local.ip().is_loopback()
            };
            l.is_open() && l.local.is_ipv4() == remote.is_ipv4() && path_fits
        };
        // In the order of their addresses: `poll` reorders the list.
        let mut fitting: Vec<&Listener> = self.listeners.iter().filter(fits).collect();
        if fitting.is_empty() {
            return None;
        }
        fitting.sort_by_key(|l| l.local);
        let pick = BuildHasherDefault::<DefaultHasher>::default().hash_one(remote) as usize
            % fitting.len();
        Some(fitting[pick])
    }

    /// A dial that must end as the accepting side: punch a hole from a
    /// listener's port and take the connection the peer makes through it.
    fn dial_by_punching(&mut self, remote: SocketAddr, peer: PeerId) -> Result<Upgrade, QuicError> {
        let socket = self
            .listener_for(remote)
            .ok_or(QuicError::NoListenerToPunchFrom(remote))?
            .socket()?;
        // Punches whose dial gave up (timed out, or dropped) make way.
        self.punches.retain(|_, waiting| !waiting.is_canceled());
        if self.punches.contains_key(&remote) {
            return Err(QuicError::PunchInProgress(remote));
        }
        let (sender, receiver) = oneshot::channel();
        self.punches.insert(remote, sender);
        let timeout = self.configs.handshake_timeout;
        debug!(%remote, %peer, "punching a hole");
        Ok(async move {
            let punching = tokio::time::timeout(timeout, punch::punch(socket, remote));
            let upgrade = tokio::select! {
                upgrade = receiver => upgrade.map_err(|_| QuicError::PunchAbandoned)?,
                failed = punching => return Err(match failed {
                    Err(_) => QuicError::HandshakeTimedOut(timeout),
                    Ok(Err(e)) => e,
                    Ok(Ok(never)) => match never {},
                }),
            };
            let (inbound, connection) = upgrade.await?;
            if inbound != peer {
                warn!(%remote, expected = %peer, %inbound, "the hole punched brought another peer");
            }
            Ok((inbound, connection))
        }
        .boxed())
    }

    /// What the swarm hears of one listener event; `None` for an incoming
    /// connection a hole punch was waiting for.
    fn on_listener_event(
        &mut self,
        index: usize,
        event: ListenerEvent,
    ) -> Option<TransportEvent<Upgrade, QuicError>> {
        let listener = &self.listeners[index];
        let listener_id = listener.id;
        Some(match event {
            ListenerEvent::Incoming(incoming) => {
                let remote = incoming.remote_address();
                let connecting = match (*incoming).accept_with(self.configs.server_for(remote)) {
                    Ok(c) => c,
                    Err(e) => {
                        return Some(TransportEvent::ListenerError {
                            listener_id,
                            error: e.into(),
                        })
                    }
                };
                let mut upgrade =
                    connection::handshake(connecting, self.configs.handshake_timeout).boxed();
                if let Some(waiting) = self.punches.remove(&remote) {
                    match waiting.send(upgrade) {
                        Ok(()) => return None,
                        // That punch gave up; the connection is an ordinary one.
                        Err(back) => upgrade = back,
                    }
                }
                TransportEvent::Incoming {
                    listener_id,
                    upgrade,
                    local_addr: to_multiaddr(listener.local),
                    send_back_addr: to_multiaddr(remote),
                }
            }
            ListenerEvent::NewAddress(listen_addr) => TransportEvent::NewAddress {
                listener_id,
                listen_addr,
            },
            ListenerEvent::AddressExpired(listen_addr) => TransportEvent::AddressExpired {
                listener_id,
                listen_addr,
            },
            ListenerEvent::Error(error) => TransportEvent::ListenerError { listener_id, error },
            ListenerEvent::Closed => TransportEvent::ListenerClosed {
                listener_id,
                reason: Ok(()),
            },
        })
    }
}

/// A UDP socket bound to `addr`, with room for bursts of tensor parts
/// (`udp_buffers`) where `for_tensors`; an IPv6 one takes IPv6 only, so a
/// node may listen on the same port in both families.
fn bind(addr: SocketAddr, for_tensors: bool) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())?;
    let socket = socket.into();
    if for_tensors {
        super::udp_buffers::raise_and_report(&socket);
    }
    Ok(socket)
}

impl Transport for QuicTransport {
    type Output = (PeerId, Connection);
    type Error = QuicError;
    type ListenerUpgrade = Upgrade;
    type Dial = Upgrade;

    fn listen_on(
        &mut self,
        id: ListenerId,
        addr: Multiaddr,
    ) -> Result<(), TransportError<Self::Error>> {
        let Some((local, _)) = to_socket_addr(&addr) else {
            return Err(TransportError::MultiaddrNotSupported(addr));
        };
        let socket = bind(local, true).map_err(QuicError::from)?;
        let handle = socket.try_clone().map_err(QuicError::from)?;
        let endpoint = self.endpoint(&self.configs.endpoint, socket, true)?;
        self.listeners.push(Listener::new(id, endpoint, handle)?);
        // Later dials go out from the listener; the dialer's connections
        // keep its endpoint alive until they end.
        self.dialers.remove(&local.is_ipv4());
        self.wake();
        Ok(())
    }

    fn remove_listener(&mut self, id: ListenerId) -> bool {
        match self.listeners.iter_mut().find(|l| l.id == id) {
            Some(listener) => {
                listener.close();
                self.wake();
                true
            }
            None => false,
        }
    }

    fn dial(
        &mut self,
        addr: Multiaddr,
        opts: DialOpts,
    ) -> Result<Self::Dial, TransportError<Self::Error>> {
        let Some((remote, peer)) = to_socket_addr(&addr)
            .filter(|(remote, _)| remote.port() != 0 && !remote.ip().is_unspecified())
        else {
            return Err(TransportError::MultiaddrNotSupported(addr));
        };
        if let (Endpoint::Listener, PortUse::New) = (opts.role, opts.port_use) {
            let Some(peer) = peer else {
                return Err(TransportError::MultiaddrNotSupported(addr));
            };
            return Ok(self.dial_by_punching(remote, peer)?);
        }
        let endpoint = match opts.port_use {
            PortUse::New => self.dialer(remote, false)?,
            PortUse::Reuse => match self.listener_for(remote) {
                Some(listener) => listener.endpoint.clone(),
                None => self.shared_dialer(remote)?,
            },
        };
        let client = self.configs.client_for(remote);
        let timeout = self.configs.handshake_timeout;
        Ok(async move {
            // rustls wants a server name; libp2p's certificates name none.
            let connecting = endpoint.connect_with(client, remote, "l")?;
            connection::handshake(connecting, timeout).await
        }
        .boxed())
    }

    fn poll(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<TransportEvent<Self::ListenerUpgrade, Self::Error>> {
        let this = self.get_mut();
        let mut index = 0;
        while index < this.listeners.len() {
            match this.listeners[index].poll_event(cx) {
                Poll::Pending => index += 1,
                Poll::Ready(None) => {
                    this.listeners.swap_remove(index);
                }
                Poll::Ready(Some(event)) => {
                    let event = this.on_listener_event(index, event);
                    // The listener that spoke goes last, so that a flood on
                    // one (a burst of handshakes) keeps no other waiting.
                    let spoke = this.listeners.remove(index);
                    this.listeners.push(spoke);
                    if let Some(event) = event {
                        return Poll::Ready(event);
                    }
                }
            }
        }
        this.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{AsyncReadExt, AsyncWriteExt};
    use libp2p::core::muxing::StreamMuxerExt;

    const WAIT: Duration = Duration::from_secs(10);

    fn transport() -> (QuicTransport, PeerId) {
        let key = Keypair::generate_ed25519();
        let settings = QuicSettings {
            idle_timeout: Duration::from_secs(4),
            keep_alive: Duration::from_secs(1),
            handshake_timeout: Duration::from_secs(5),
        };
        (
            QuicTransport::new(&key, settings).unwrap(),
            key.public().to_peer_id(),
        )
    }

    async fn next_event(t: &mut QuicTransport) -> TransportEvent<Upgrade, QuicError> {
        let event = futures::future::poll_fn(|cx| Pin::new(&mut *t).poll(cx));
        tokio::time::timeout(WAIT, event)
            .await
            .expect("a transport event in time")
    }

    /// Listens on `addr` and returns the first address it reports.
    async fn listen(t: &mut QuicTransport, addr: &str) -> (ListenerId, Multiaddr) {
        let id = ListenerId::next();
        t.listen_on(id, addr.parse().unwrap()).unwrap();
        match next_event(t).await {
            TransportEvent::NewAddress { listen_addr, .. } => (id, listen_addr),
            _ => panic!("expected the listener's address first"),
        }
    }

    /// Drives `t` in a task, handing over every connection it accepts.
    fn accept_all(mut t: QuicTransport) -> tokio::sync::mpsc::Receiver<(PeerId, Connection)> {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            loop {
                let event = futures::future::poll_fn(|cx| Pin::new(&mut t).poll(cx)).await;
                if let TransportEvent::Incoming { upgrade, .. } = event {
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        if let Ok(accepted) = upgrade.await {
                            let _ = tx.send(accepted).await;
                        }
                    });
                }
            }
        });
        rx
    }

    fn dialer() -> DialOpts {
        DialOpts {
            role: Endpoint::Dialer,
            port_use: PortUse::Reuse,
        }
    }

    /// Sends `bytes` from `from` to `to` on a new stream and checks they
    /// arrive whole; returns `from`'s path MTU afterwards.
    async fn transfer(from: &mut Connection, to: &mut Connection, bytes: usize) -> u16 {
        let data: Vec<u8> = (0..bytes).map(|i| (i * 7 % 251) as u8).collect();
        let mut out = futures::future::poll_fn(|cx| from.poll_outbound_unpin(cx))
            .await
            .unwrap();
        let sending = async {
            out.write_all(&data).await.unwrap();
            out.close().await.unwrap();
        };
        let receiving = async {
            let mut inbound = futures::future::poll_fn(|cx| to.poll_inbound_unpin(cx))
                .await
                .unwrap();
            let mut got = Vec::new();
            inbound.read_to_end(&mut got).await.unwrap();
            got
        };
        let ((), got) = tokio::time::timeout(WAIT, futures::future::join(sending, receiving))
            .await
            .expect("the transfer in time");
        assert!(got == data, "the stream delivered other bytes");
        from.path_mtu()
    }

    /// Dials `listener_addr` from `dialing`, returning both ends.
    async fn connect(
        dialing: &mut QuicTransport,
        listener_addr: Multiaddr,
        accepted: &mut tokio::sync::mpsc::Receiver<(PeerId, Connection)>,
    ) -> ((PeerId, Connection), (PeerId, Connection)) {
        let dialled = dialing.dial(listener_addr, dialer()).unwrap();
        let dialled = tokio::time::timeout(WAIT, dialled).await.unwrap().unwrap();
        let accepted = tokio::time::timeout(WAIT, accepted.recv())
            .await
            .unwrap()
            .unwrap();
        (dialled, accepted)
    }

    #[tokio::test]
    async fn a_loopback_connection_names_both_peers_and_grows_its_packets_to_loopback_size() {
        let (mut a, a_id) = transport();
        let (mut b, b_id) = transport();
        let (_, a_addr) = listen(&mut a, "/ip4/127.0.0.1/udp/0/quic-v1").await;
        let mut accepted = accept_all(a);
        let ((dialled_peer, mut from_b), (accepted_peer, mut at_a)) =
            connect(&mut b, a_addr, &mut accepted).await;
        assert_eq!(dialled_peer, a_id);
        assert_eq!(accepted_peer, b_id);
        // Path-MTU discovery climbs while data flows; give it a few rounds.
        let mut mtu = 0;
        for _ in 0..20 {
            mtu = transfer(&mut from_b, &mut at_a, 1 << 20).await;
            if mtu > 1452 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(mtu > 8972, "a loopback path stayed at {mtu}-byte packets");
    }

    /// This machine's address on its default route, if it has one.
    fn non_loopback_ipv4() -> Option<IpAddr> {
        let probe = UdpSocket::bind("0.0.0.0:0").ok()?;
        probe.connect("192.0.2.1:9").ok()?;
        let ip = probe.local_addr().ok()?.ip();
        (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
    }

    #[tokio::test]
    async fn a_path_off_loopback_keeps_internet_sized_packets() {
        let Some(ip) = non_loopback_ipv4() else {
            eprintln!("no non-loopback IPv4 address here: nothing to check");
            return;
        };
        let (mut a, _) = transport();
        let (mut b, _) = transport();
        let (_, a_addr) = listen(&mut a, &format!("/ip4/{ip}/udp/0/quic-v1")).await;
        let mut accepted = accept_all(a);
        let ((_, mut from_b), (_, mut at_a)) = connect(&mut b, a_addr, &mut accepted).await;
        let mut mtu = 0;
        for _ in 0..5 {
            mtu = transfer(&mut from_b, &mut at_a, 1 << 20).await;
        }
        assert!(
            mtu <= 1452,
            "a path off loopback reached {mtu}-byte packets"
        );
    }

    #[tokio::test]
    async fn a_wildcard_listener_names_its_interfaces_and_reports_its_removal() {
        let (mut t, _) = transport();
        let (id, first) = listen(&mut t, "/ip4/0.0.0.0/udp/0/quic-v1").await;
        let mut seen = vec![first];
        while !seen
            .iter()
            .any(|a| a.to_string().starts_with("/ip4/127.0.0.1/udp/"))
        {
            match next_event(&mut t).await {
                TransportEvent::NewAddress { listen_addr, .. } => seen.push(listen_addr),
                _ => panic!("expected only addresses, got another event"),
            }
        }
        let port = to_socket_addr(&seen[0]).unwrap().0.port();
        assert_ne!(port, 0);
        assert!(seen
            .iter()
            .all(|a| to_socket_addr(a).unwrap().0.port() == port));
        assert!(t.remove_listener(id));
        assert!(!t.remove_listener(ListenerId::next()));
        loop {
            match next_event(&mut t).await {
                TransportEvent::ListenerClosed {
                    listener_id,
                    reason,
                } => {
                    assert_eq!(listener_id, id);
                    assert!(reason.is_ok());
                    break;
                }
                TransportEvent::NewAddress { .. } => {}
                _ => panic!("expected the listener to close"),
            }
        }
    }

    #[tokio::test]
    async fn a_dial_as_the_accepting_side_takes_the_connection_its_hole_punch_lets_in() {
        let (mut a, a_id) = transport();
        let (mut b, b_id) = transport();
        let (_, a_addr) = listen(&mut a, "/ip4/127.0.0.1/udp/0/quic-v1").await;
        let (_, b_addr) = listen(&mut b, "/ip4/127.0.0.1/udp/0/quic-v1").await;
        let punching = DialOpts {
            role: Endpoint::Listener,
            port_use: PortUse::New,
        };
        let to_b = b_addr.with(libp2p::multiaddr::Protocol::P2p(b_id));
        let punched = a.dial(to_b.clone(), punching).unwrap();
        assert!(
            matches!(
                a.dial(to_b, punching),
                Err(TransportError::Other(QuicError::PunchInProgress(_)))
            ),
            "a second punch to the same address must wait for the first"
        );
        // `b` dials `a` from its listening port, the one `a` punches to;
        // `a`'s listener must be polled to see that connection arrive.
        let dialled = b.dial(a_addr, dialer()).unwrap();
        let driving_a = async {
            loop {
                let event = futures::future::poll_fn(|cx| Pin::new(&mut a).poll(cx)).await;
                assert!(
                    !matches!(event, TransportEvent::Incoming { .. }),
                    "the punched connection was handed out as an ordinary one"
                );
            }
        };
        let both = async {
            tokio::select! {
                () = driving_a => unreachable!("the driver loops until dropped"),
                both = futures::future::join(punched, dialled) => both,
            }
        };
        let (punched, dialled) = tokio::time::timeout(WAIT, both).await.expect("in time");
        assert_eq!(punched.unwrap().0, b_id);
        assert_eq!(dialled.unwrap().0, a_id);
    }

    #[tokio::test]
    async fn a_listener_on_loopback_dials_only_loopback_peers() {
        let (mut t, _) = transport();
        let (_, addr) = listen(&mut t, "/ip4/127.0.0.1/udp/0/quic-v1").await;
        let local = to_socket_addr(&addr).unwrap().0;
        assert!(t.listener_for("127.0.0.1:4001".parse().unwrap()).is_some());
        // It could not send there: such a dial goes out from a dialer.
        assert!(t.listener_for("192.0.2.1:4001".parse().unwrap()).is_none());
        assert!(t.listener_for("[::1]:4001".parse().unwrap()).is_none());
        assert_eq!(t.listeners[0].local, local);
    }

    #[tokio::test]
    async fn a_dial_on_a_port_of_its_own_connects_and_leaves_no_shared_dialer() {
        let (mut a, a_id) = transport();
        let (mut b, _) = transport();
        let (_, a_addr) = listen(&mut a, "/ip4/127.0.0.1/udp/0/quic-v1").await;
        let mut accepted = accept_all(a);
        let fresh_port = DialOpts {
            role: Endpoint::Dialer,
            port_use: PortUse::New,
        };
        let dialled = b.dial(a_addr, fresh_port).unwrap();
        let (peer, mut from_b) = tokio::time::timeout(WAIT, dialled).await.unwrap().unwrap();
        let (_, mut at_a) = tokio::time::timeout(WAIT, accepted.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(peer, a_id);
        transfer(&mut from_b, &mut at_a, 100_000).await;
        assert!(
            b.dialers.is_empty(),
            "a one-dial endpoint is not kept for reuse"
        );
    }

    #[tokio::test]
    async fn listeners_take_turns_to_report() {
        let (mut t, _) = transport();
        let (a, b) = (ListenerId::next(), ListenerId::next());
        for id in [a, b] {
            t.listen_on(id, "/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap())
                .unwrap();
        }
        // `a` has two events to give (its address, then its closing), `b` one.
        assert!(t.remove_listener(a));
        let mut order = Vec::new();
        for _ in 0..3 {
            order.push(match next_event(&mut t).await {
                TransportEvent::NewAddress { listener_id, .. } => (listener_id, "address"),
                TransportEvent::ListenerClosed { listener_id, .. } => (listener_id, "closed"),
                _ => panic!("expected addresses and a closing only"),
            });
        }
        assert_eq!(order, [(a, "address"), (b, "address"), (a, "closed")]);
    }

    #[test]
    fn only_quic_addresses_with_a_port_and_a_host_are_dialled() {
        let (mut t, _) = transport();
        for text in [
            "/ip4/127.0.0.1/udp/0/quic-v1",
            "/ip4/0.0.0.0/udp/4001/quic-v1",
            "/ip4/127.0.0.1/tcp/4001",
        ] {
            let refused = t.dial(text.parse().unwrap(), dialer());
            assert!(
                matches!(refused, Err(TransportError::MultiaddrNotSupported(_))),
                "{text}"
            );
        }
    }
}
