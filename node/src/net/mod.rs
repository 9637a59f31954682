//! The libp2p side of a node: discovery, membership and message transport.
//!
//! Follows rust-libp2p's file-sharing example: [`Network::start`] spawns an
//! event loop that owns the `Swarm`; the driver talks to it through a
//! cloneable [`NetHandle`] over a bounded channel and receives [`NetEvent`]s
//! on another bounded channel. The loop knows nothing about training: it
//! moves opaque, size-limited byte messages and reports who is in the swarm.

mod behaviour;
pub mod codec;
mod dial_guard;
mod early;
pub mod inbound_budget;
pub mod nat;
mod per_ip;
pub mod quic;
pub mod secret;
pub mod send_queue;
pub mod settings;
pub mod udp_buffers;

use behaviour::{Behaviour, BehaviourEvent};
use codec::DirectFrame;
use futures::StreamExt;
use libp2p::{
    autonat, dcutr, gossipsub, identify,
    identity::Keypair,
    kad, mdns,
    multiaddr::Protocol,
    relay, request_response,
    swarm::{ConnectionId, SwarmEvent},
    Multiaddr, PeerId, Swarm,
};
use nat::{MembersOnly, Reachability, RelayState};
use send_queue::{Pushed, SendQueues};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// Capacity of the command and event channels between driver and event loop.
const CHANNEL_CAPACITY: usize = 1024;
/// How often Kademlia refreshes its view of the swarm.
const KAD_BOOTSTRAP_EVERY: Duration = Duration::from_secs(10);
/// A newly identified peer triggers a Kademlia lookup at most this often, so
/// a joiner learns the rest of the swarm in seconds rather than at the next tick.
const KAD_BOOTSTRAP_MIN_GAP: Duration = Duration::from_secs(1);
/// Direct messages to a peer whose messages in flight have all been on their
/// way this long are let out beside them (see `EventLoop::unstick_queues`).
/// Longer than a 4 MB part takes at 1 MB/s.
const STALLED_AFTER: Duration = Duration::from_secs(5);
/// Sends of one direct message before it is given up (a dropped duplicate
/// connection or a redial can fail a send that a retry delivers).
const DIRECT_ATTEMPTS: u8 = 3;
/// How long a connected p2ptrain peer may go without announcing any gossip
/// topic before its connections are closed to start afresh. Gossipsub
/// announces subscriptions only on a peer's first connection, so a peer
/// that was frozen (suspended, swapping) past the idle timeout can come
/// back on a new connection while it still holds its old one: we dropped
/// it and wait for its topics, and it never sends them again.
const TOPICS_WITHIN: Duration = Duration::from_secs(10);
/// How long after its second failure a direct message is sent the last
/// time. The first retry goes at once (a duplicate connection closing under
/// it); a second failure at once more likely means a peer being redialled,
/// which a send straight away would fail the same way.
const LAST_RETRY_AFTER: Duration = Duration::from_secs(1);
/// How long a relayed connection stays open after a direct one to the same
/// peer opened: both ends must see the direct connection before the relayed
/// one closes, or the slower end takes the peer for gone (and gossip, which
/// announces topics once per peer, would not tell it the peer's topics again).
const RELAYED_GRACE: Duration = Duration::from_secs(3);

/// What a node needs to join the network.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Swarm name; only peers using the same name are members.
    pub swarm: String,
    /// Addresses to listen on (QUIC multiaddrs).
    pub listen: Vec<Multiaddr>,
    /// Peers to contact first; each must end in `/p2p/PEER_ID`.
    pub bootstrap: Vec<Multiaddr>,
    /// Discover peers on the LAN with mDNS.
    pub mdns: bool,
    /// How long a direct message may take before it counts as failed.
    pub request_timeout: Duration,
    /// The swarm secret's key: members only, every message authenticated.
    pub key: Option<secret::SwarmKey>,
    /// Relay connections for members that cannot be reached directly
    /// (`--relay`; only useful on a node others can reach).
    pub relay: bool,
    /// Tests only: subscribe to this topic instead of our own, as an
    /// outsider who copied a member's topic name would (our settings still
    /// end it).
    pub misbehave_topic: Option<String>,
    /// What every member must share besides the swarm name: peers whose
    /// settings differ are on another topic, so never members here.
    pub settings: settings::RunSettings,
}

/// Failures that stop the network from starting.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The swarm could not be built (transport or behaviour setup).
    #[error("cannot set up libp2p: {0}")]
    Setup(String),
    /// A listen address is unusable (wrong protocol or port in use).
    #[error("cannot listen on {addr}: {reason}")]
    Listen {
        /// The address that failed.
        addr: Multiaddr,
        /// Why.
        reason: String,
    },
    /// A bootstrap address lacks the peer id needed to authenticate it.
    #[error(
        "bootstrap address {0} must end in /p2p/PEER_ID (the id printed by the peer at start)"
    )]
    BootstrapWithoutPeerId(Multiaddr),
    /// The event loop ended, so commands cannot be delivered.
    #[error("the network event loop has stopped")]
    Stopped,
    /// The event loop has a full queue of outgoing messages; this one was dropped.
    #[error("outgoing message queue is full; message dropped")]
    Backpressure,
}

/// Traffic counters shared between the event loop and the driver.
#[derive(Debug, Default)]
pub struct NetStats {
    /// Application payload bytes this node sent (direct messages and gossip publishes).
    pub bytes_sent: AtomicU64,
    /// Application payload bytes this node received.
    pub bytes_received: AtomicU64,
    /// The remote address of each open connection per connected peer, so the
    /// status page can tell direct connections from relayed ones.
    remote_addrs: Mutex<HashMap<PeerId, Vec<(ConnectionId, Multiaddr)>>>,
    /// AutoNAT's verdict and the relays we hold reservations on.
    nat: Mutex<(Reachability, Vec<PeerId>)>,
    /// Peers seen on this swarm with other settings, and what differs (at
    /// most [`OTHER_SETTINGS_KEPT`]).
    other_settings: Mutex<Vec<(PeerId, String)>>,
}

/// How many peers with other settings [`NetStats`] describes.
const OTHER_SETTINGS_KEPT: usize = 8;

impl NetStats {
    /// Bytes sent so far.
    pub fn sent(&self) -> u64 {
        self.bytes_sent.load(Ordering::Relaxed)
    }

    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.bytes_received.load(Ordering::Relaxed)
    }

    /// The remote address of our connection to `peer`, a direct one where
    /// there is one (that is the one traffic takes), if any is open.
    pub fn remote_addr(&self, peer: &PeerId) -> Option<Multiaddr> {
        let addrs = self.addrs();
        let conns = addrs.get(peer)?;
        conns
            .iter()
            .find(|(_, a)| !nat::is_relayed(a))
            .or(conns.first())
            .map(|(_, a)| a.clone())
    }

    /// How each connected peer is reached (peer id → path), for reports.
    pub fn paths(&self) -> std::collections::BTreeMap<String, AddressKind> {
        let peers: Vec<PeerId> = self.addrs().keys().copied().collect();
        peers
            .into_iter()
            .filter_map(|p| Some((p.to_string(), address_kind(&self.remote_addr(&p)?))))
            .collect()
    }

    /// The peers seen on this swarm with other settings than ours, each with
    /// what differs; they are never members here.
    pub fn other_settings(&self) -> Vec<(PeerId, String)> {
        lock(&self.other_settings).clone()
    }

    /// Whether AutoNAT found us reachable, and the relays we reserved on.
    pub fn reachability(&self) -> (Reachability, Vec<PeerId>) {
        lock(&self.nat).clone()
    }

    fn addrs(&self) -> std::sync::MutexGuard<'_, HashMap<PeerId, Vec<(ConnectionId, Multiaddr)>>> {
        lock(&self.remote_addrs)
    }
}

/// Every update under these locks is one assignment, insert or remove, so
/// the data stays consistent even if a holder panicked.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How a connection reaches a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AddressKind {
    /// Straight to the peer's own address.
    Direct,
    /// Through a relay (the address holds `/p2p-circuit`).
    Relay,
}

/// Tells a relayed connection address from a direct one.
pub fn address_kind(addr: &Multiaddr) -> AddressKind {
    if addr.iter().any(|p| matches!(p, Protocol::P2pCircuit)) {
        AddressKind::Relay
    } else {
        AddressKind::Direct
    }
}

/// What the event loop reports to the driver.
#[derive(Debug)]
pub enum NetEvent {
    /// We listen on a new address (print it so others can bootstrap from it).
    Listening(Multiaddr),
    /// A peer of our swarm is reachable (connected and subscribed to our topic).
    PeerJoined(PeerId),
    /// A member is gone (all connections closed or unsubscribed).
    PeerLeft(PeerId),
    /// A message from a member, gossiped or direct, not yet decoded.
    Message {
        /// The originator.
        from: PeerId,
        /// The encoded wire message.
        bytes: Vec<u8>,
        /// A direct message's share of the inbound budget, given back when
        /// the driver drops this (having decoded the message).
        held: Option<inbound_budget::Held>,
    },
}

enum Command {
    Broadcast(Vec<u8>),
    Send { to: PeerId, bytes: Arc<Vec<u8>> },
}

/// The driver's way to send through the event loop. Cheap to clone.
#[derive(Clone)]
pub struct NetHandle {
    commands: mpsc::Sender<Command>,
    local_peer_id: PeerId,
    stats: Arc<NetStats>,
}

impl NetHandle {
    /// Gossips `bytes` to every member of the swarm.
    ///
    /// Never waits: if the event loop is this far behind, the message is
    /// dropped with [`NetError::Backpressure`] (the averaging protocol
    /// retransmits what matters). Waiting here could deadlock with the event
    /// loop waiting for the driver to take its events.
    pub fn broadcast(&self, bytes: Vec<u8>) -> Result<(), NetError> {
        self.enqueue(Command::Broadcast(bytes))
    }

    /// Sends `bytes` to one peer over a QUIC stream; never waits, like
    /// [`NetHandle::broadcast`]. Delivery is best effort.
    ///
    /// One frame for several peers goes as clones of one `Arc`: it is then
    /// neither copied per peer nor, with a swarm secret, sealed per peer.
    pub fn send(&self, to: PeerId, bytes: impl Into<Arc<Vec<u8>>>) -> Result<(), NetError> {
        self.enqueue(Command::Send {
            to,
            bytes: bytes.into(),
        })
    }

    fn enqueue(&self, command: Command) -> Result<(), NetError> {
        self.commands.try_send(command).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => NetError::Backpressure,
            mpsc::error::TrySendError::Closed(_) => NetError::Stopped,
        })
    }

    /// This node's libp2p identity.
    pub fn local_peer_id(&self) -> PeerId {
        self.local_peer_id
    }

    /// Traffic counters.
    pub fn stats(&self) -> &Arc<NetStats> {
        &self.stats
    }
}

/// The running network: a handle for commands and the event receiver.
pub struct Network {
    /// Commands go here.
    pub handle: NetHandle,
    /// Events come out here.
    pub events: mpsc::Receiver<NetEvent>,
    /// The swarm's gossip topic: what this node's join proofs are bound to.
    pub topic: String,
    task: tokio::task::JoinHandle<()>,
}

impl Network {
    /// Builds the swarm, starts listening and dialing, and spawns the event loop.
    pub fn start(config: NetConfig, keypair: Keypair) -> Result<Network, NetError> {
        let local_peer_id = keypair.public().to_peer_id();
        for addr in &config.bootstrap {
            if peer_id_of(addr).is_none() {
                return Err(NetError::BootstrapWithoutPeerId(addr.clone()));
            }
        }
        let base = match &config.misbehave_topic {
            Some(stolen) => stolen.clone(),
            None => topic_name(&config.swarm, config.key.as_ref()),
        };
        let topic = gossipsub::IdentTopic::new(format!("{base}/{}", config.settings.tag()));
        let relay_members = MembersOnly::default();
        let mut swarm = behaviour::build_swarm(&config, keypair, &topic, &relay_members)?;
        for addr in &config.listen {
            // An address naming another peer would be printed for others to
            // bootstrap from, and every dial of it would fail the peer check.
            // (A relay circuit address names its relay first: not ours to check.)
            let circuit = addr.iter().any(|p| matches!(p, Protocol::P2pCircuit));
            if let Some(named) = peer_id_of(addr).filter(|p| *p != local_peer_id && !circuit) {
                return Err(NetError::Listen {
                    addr: addr.clone(),
                    reason: format!(
                        "it names peer {named}, but this node is {local_peer_id} (drop the /p2p part, or pass that peer's --key)"
                    ),
                });
            }
            swarm
                .listen_on(addr.clone())
                .map_err(|e| NetError::Listen {
                    addr: addr.clone(),
                    reason: crate::error_text::error_text(&e),
                })?;
        }
        for addr in &config.bootstrap {
            if let Some(peer) = peer_id_of(addr) {
                swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
                if let Err(e) = swarm.dial(addr.clone()) {
                    warn!(%addr, error = %e, "cannot dial bootstrap peer");
                }
            }
        }
        let (cmd_tx, cmd_rx) = mpsc::channel(CHANNEL_CAPACITY);
        let (ev_tx, ev_rx) = mpsc::channel(CHANNEL_CAPACITY);
        let stats = Arc::new(NetStats::default());
        let topic_string = topic.to_string();
        let event_loop = EventLoop {
            swarm,
            topic,
            swarm_topics: format!("{base}/"),
            settings: config.settings.clone(),
            key: config.key.clone(),
            sealer: config.key.clone().map(secret::Sealer::new),
            commands: cmd_rx,
            events: ev_tx,
            stats: stats.clone(),
            members: HashSet::new(),
            candidates: HashSet::new(),
            proven: HashSet::new(),
            early: early::EarlyMessages::default(),
            in_flight: HashMap::new(),
            queues: SendQueues::default(),
            retry_later: Vec::new(),
            awaiting_topics: Vec::new(),
            last_bootstrap: None,
            relay_server: config.relay,
            loopback_only: config.listen.iter().all(nat::is_loopback),
            relay_members,
            relays: RelayState::default(),
            relayed_to_close: Vec::new(),
            kad_addresses: nat::SharedAddresses::default(),
        };
        let task = tokio::spawn(event_loop.run());
        Ok(Network {
            handle: NetHandle {
                commands: cmd_tx,
                local_peer_id,
                stats,
            },
            events: ev_rx,
            topic: topic_string,
            task,
        })
    }

    /// Stops the event loop, closing all connections.
    pub fn shutdown(self) {
        self.task.abort();
    }
}

/// Takes the items of `waiting` due by `now`, in the order they were put in.
fn take_due<T>(waiting: &mut Vec<(tokio::time::Instant, T)>, now: tokio::time::Instant) -> Vec<T> {
    let (due, later): (Vec<_>, Vec<_>) = std::mem::take(waiting)
        .into_iter()
        .partition(|(at, _)| *at <= now);
    *waiting = later;
    due.into_iter().map(|(_, item)| item).collect()
}

/// The gossip topic of a swarm: only peers on it can become members.
pub fn topic_name(swarm: &str, key: Option<&secret::SwarmKey>) -> String {
    match key {
        Some(key) => format!("p2ptrain/{swarm}/{}/control/1", key.topic_tag(swarm)),
        None => format!("p2ptrain/{swarm}/control/1"),
    }
}

/// The peer id at the end of a multiaddr, if any.
pub fn peer_id_of(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().find_map(|p| match p {
        Protocol::P2p(id) => Some(id),
        _ => None,
    })
}

struct EventLoop {
    swarm: Swarm<Behaviour>,
    topic: gossipsub::IdentTopic,
    /// What every topic of this swarm starts with, whatever its settings.
    swarm_topics: String,
    /// Ours, to name what differs in a peer on another of them.
    settings: settings::RunSettings,
    /// Seals what we send and opens what we receive, when the swarm has a secret.
    key: Option<secret::SwarmKey>,
    /// Seals direct messages with `key`, once per frame.
    sealer: Option<secret::Sealer>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<NetEvent>,
    stats: Arc<NetStats>,
    /// Peers subscribed to our swarm topic (and, with a swarm secret, proven
    /// to hold it).
    members: HashSet<PeerId>,
    /// With a swarm secret: peers subscribed to our topic, not yet proven.
    candidates: HashSet<PeerId>,
    /// With a swarm secret: peers whose membership proof checked out.
    proven: HashSet<PeerId>,
    /// Direct messages from peers not admitted yet (see [`early`]).
    early: early::EarlyMessages<PeerId, (Vec<u8>, Option<inbound_budget::Held>)>,
    /// Direct messages awaiting their acknowledgement, kept to retry them
    /// (at most [`send_queue::MAX_IN_FLIGHT`] per peer).
    in_flight: HashMap<request_response::OutboundRequestId, Outbound>,
    /// Direct messages held back so each peer receives them in order.
    queues: SendQueues<PeerId, Outbound>,
    /// Identified p2ptrain peers that are not members (nor candidates) yet,
    /// and by when they must have announced a topic: see [`TOPICS_WITHIN`].
    awaiting_topics: Vec<(tokio::time::Instant, PeerId)>,
    /// Direct messages to send again once their time comes
    /// ([`LAST_RETRY_AFTER`]).
    retry_later: Vec<(tokio::time::Instant, Outbound)>,
    /// When the last Kademlia lookup started.
    last_bootstrap: Option<tokio::time::Instant>,
    /// This node relays for others (`--relay`).
    relay_server: bool,
    /// Every listen address is loopback (a local testnet): a relay's
    /// loopback addresses are then the ones to hand out.
    loopback_only: bool,
    /// Who may use our relay: the members, shared with the relay behaviour.
    relay_members: MembersOnly,
    /// Reachability and relay reservations.
    relays: RelayState,
    /// Relayed connections to close once their grace period ends, because
    /// a direct connection to the same peer opened.
    relayed_to_close: Vec<(tokio::time::Instant, PeerId, ConnectionId)>,
    /// The addresses of each identified peer handed to Kademlia.
    kad_addresses: nat::SharedAddresses,
}

struct Outbound {
    peer: PeerId,
    /// Shared with the request handed to the transport, so keeping it for a
    /// retry copies nothing.
    bytes: Arc<Vec<u8>>,
    attempts: u8,
    /// It went through the peer's send queue (and holds one of its slots).
    queued: bool,
    /// When it was handed to the transport.
    sent: tokio::time::Instant,
}

impl EventLoop {
    async fn run(mut self) {
        let mut kad_tick = tokio::time::interval(KAD_BOOTSTRAP_EVERY);
        let mut housekeeping = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = housekeeping.tick() => {
                    self.send_due_retries();
                    self.restart_peers_without_topics();
                    self.close_superseded_relayed();
                    self.unstick_queues();
                    let dropped = self.early.expire(tokio::time::Instant::now());
                    if dropped > 0 {
                        debug!(dropped, "direct messages of peers never admitted dropped");
                    }
                }
                event = self.swarm.select_next_some() => self.on_swarm_event(event).await,
                command = self.commands.recv() => match command {
                    Some(c) => self.on_command(c),
                    None => return, // every handle dropped: the node is shutting down
                },
                _ = kad_tick.tick() => {
                    self.bootstrap();
                    // Also retries reservations a relay refused or ended.
                    self.reserve_relays();
                }
            }
        }
    }

    fn bootstrap(&mut self) {
        self.last_bootstrap = Some(tokio::time::Instant::now());
        if let Err(e) = self.swarm.behaviour_mut().kad.bootstrap() {
            debug!(error = %e, "kademlia bootstrap skipped");
        }
    }

    /// Closes relayed connections whose grace period is over, if a direct
    /// connection to the same peer is still open.
    fn close_superseded_relayed(&mut self) {
        let now = tokio::time::Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.relayed_to_close)
            .into_iter()
            .partition(|(at, _, _)| *at <= now);
        self.relayed_to_close = later;
        for (_, peer, id) in due {
            let direct_open = self
                .stats
                .addrs()
                .get(&peer)
                .is_some_and(|conns| conns.iter().any(|(_, a)| !nat::is_relayed(a)));
            if direct_open {
                debug!(%peer, "closing a relayed connection superseded by a direct one");
                self.swarm.close_connection(id);
            }
        }
    }

    /// Asks relays for reservations while AutoNAT says we are private and
    /// we hold fewer than we want.
    fn reserve_relays(&mut self) {
        let members = &self.members;
        let wanted = self
            .relays
            .wanted(std::time::Instant::now(), |p| members.contains(p));
        for (relay, addr) in wanted {
            match self.swarm.listen_on(addr.clone()) {
                Ok(id) => {
                    info!(%relay, %addr, "not reachable directly; asking a relay for a reservation");
                    self.relays.reserving(relay, id);
                }
                Err(e) => warn!(%relay, %addr, error = %e, "cannot listen through relay"),
            }
        }
        self.publish_nat();
    }

    fn publish_nat(&self) {
        *lock(&self.stats.nat) = (self.relays.reachability(), self.relays.reserved_on());
    }

    /// Sends a direct message to `peer`, behind those already on their way.
    fn send_direct(&mut self, peer: PeerId, bytes: Arc<Vec<u8>>) {
        self.send_outbound(Outbound {
            peer,
            bytes,
            attempts: 1,
            queued: false,
            sent: tokio::time::Instant::now(),
        });
    }

    /// Queues `out` behind the messages on their way to a connected peer. To a
    /// peer we are not connected to it goes out at once: its request waits for
    /// a dial that may fail or time out, and must not hold back the messages
    /// that a connection opened meanwhile (a relayed one, say) would carry.
    fn send_outbound(&mut self, out: Outbound) {
        if !self.is_connected(&out.peer) {
            self.dispatch(out, false);
            return;
        }
        match self.queues.push(out.peer, out) {
            Pushed::SendNow(out) => self.dispatch(out, true),
            Pushed::Waiting => {}
            Pushed::DroppedOldest(old) => {
                warn!(peer = %old.peer, "too many direct messages waiting; the oldest is dropped")
            }
        }
    }

    /// Hands a direct message to the transport; `queued` if it holds one of
    /// its peer's send-queue slots.
    fn dispatch(&mut self, out: Outbound, queued: bool) {
        let id = self
            .swarm
            .behaviour_mut()
            .direct
            .send_request(&out.peer, DirectFrame::outbound(Arc::clone(&out.bytes)));
        self.in_flight.insert(
            id,
            Outbound {
                queued,
                sent: tokio::time::Instant::now(),
                ..out
            },
        );
    }

    /// A queued direct message is done with (acknowledged or failed): the next
    /// one waiting for its peer goes out.
    fn release(&mut self, out: &Outbound) {
        if !out.queued {
            return;
        }
        if let Some(next) = self.queues.finished(&out.peer) {
            self.dispatch(next, true);
        }
    }

    /// Closes the connections of p2ptrain peers that have announced no gossip
    /// topic at all within [`TOPICS_WITHIN`] of being identified, so both
    /// sides meet again as new peers (and gossipsub exchanges topics). A
    /// peer on another topic (another swarm, other settings) is left alone.
    fn restart_peers_without_topics(&mut self) {
        let due = take_due(&mut self.awaiting_topics, tokio::time::Instant::now());
        if due.is_empty() {
            return;
        }
        let with_topics: HashSet<PeerId> = self
            .swarm
            .behaviour()
            .gossipsub
            .all_peers()
            .filter(|(_, topics)| !topics.is_empty())
            .map(|(peer, _)| *peer)
            .collect();
        for peer in due {
            if self.is_known(&peer) || with_topics.contains(&peer) || !self.is_connected(&peer) {
                continue;
            }
            info!(%peer, "peer announced no gossip topic (a connection it kept through a pause?); reconnecting afresh");
            let _ = self.swarm.disconnect_peer_id(peer);
        }
    }

    /// Sends the direct messages whose retry is due, to peers still members
    /// or candidates.
    fn send_due_retries(&mut self) {
        let due = take_due(&mut self.retry_later, tokio::time::Instant::now());
        for out in due {
            if self.is_known(&out.peer) {
                self.send_outbound(out);
            } else {
                debug!(peer = %out.peer, "direct message dropped: its peer left before the retry");
            }
        }
    }

    /// Lets more messages out to a peer whose messages in flight have all been
    /// on their way for [`STALLED_AFTER`]: a stream stuck until its request
    /// times out must not hold back everything queued behind it.
    fn unstick_queues(&mut self) {
        for peer in self.queues.peers_waiting() {
            let ages = self
                .in_flight
                .values()
                .filter(|o| o.queued && o.peer == peer)
                .map(|o| o.sent.elapsed());
            for _ in 0..send_queue::extra_slots(ages, STALLED_AFTER) {
                match self.queues.take_next(&peer) {
                    Some(next) => {
                        debug!(%peer, "direct messages in flight look stuck; sending the next one beside them");
                        self.dispatch(next, true);
                    }
                    None => break,
                }
            }
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Broadcast(bytes) => {
                let bytes = match &self.key {
                    Some(key) => key.seal(bytes),
                    None => bytes,
                };
                let len = bytes.len() as u64;
                match self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .publish(self.topic.clone(), bytes)
                {
                    Ok(_) => {
                        // Gossip fans out to each member: count each copy we send.
                        let copies = self.members.len().max(1) as u64;
                        self.stats
                            .bytes_sent
                            .fetch_add(len * copies, Ordering::Relaxed);
                    }
                    Err(e) => debug!(error = %e, "gossip publish dropped"),
                }
            }
            Command::Send { to, bytes } => {
                let bytes = match &mut self.sealer {
                    Some(sealer) => sealer.seal(bytes),
                    None => bytes,
                };
                self.stats
                    .bytes_sent
                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                self.send_direct(to, bytes);
            }
        }
    }

    /// Whether `peer` is a member, or (with a swarm secret) a candidate
    /// proving it holds the secret.
    fn is_known(&self, peer: &PeerId) -> bool {
        self.members.contains(peer) || self.candidates.contains(peer)
    }

    /// Whether any connection to `peer` is open.
    fn is_connected(&self, peer: &PeerId) -> bool {
        self.stats.addrs().contains_key(peer)
    }

    /// `peer` is a member now: subscribed to our topic and, with a swarm
    /// secret, proven to hold it.
    async fn admit(&mut self, peer: PeerId) {
        self.candidates.remove(&peer);
        self.awaiting_topics.retain(|(_, p)| *p != peer);
        if self.members.insert(peer) {
            info!(%peer, "member joined");
            // Restarted with our settings: no longer one to name.
            lock(&self.stats.other_settings).retain(|(p, _)| *p != peer);
            self.relay_members.insert(peer);
            self.relays.forget_refusals(&peer);
            self.emit(NetEvent::PeerJoined(peer)).await;
            // What it sent before it was admitted, after the driver knows it.
            for (bytes, held) in self.early.take(&peer) {
                self.received(peer, bytes, held);
            }
        }
    }

    /// Tells a direct message's sender it arrived (and is not to be sent again).
    fn acknowledge(&mut self, channel: request_response::ResponseChannel<Vec<u8>>) {
        let _ = self
            .swarm
            .behaviour_mut()
            .direct
            .send_response(channel, Vec::new());
    }

    /// Counts a member's message (direct or gossiped) and forwards it to
    /// the driver, dropping it if it fails the swarm secret's MAC or the
    /// driver is behind (so a flooding peer cannot stall the swarm's event
    /// loop); `false` where the MAC failed.
    fn received(
        &mut self,
        from: PeerId,
        bytes: Vec<u8>,
        held: Option<inbound_budget::Held>,
    ) -> bool {
        self.stats
            .bytes_received
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        let bytes = match &self.key {
            Some(key) => match key.open(bytes) {
                Some(b) => b,
                None => {
                    warn!(peer = %from, "message without a valid swarm-secret MAC dropped");
                    return false;
                }
            },
            None => bytes,
        };
        if let Err(e) = self
            .events
            .try_send(NetEvent::Message { from, bytes, held })
        {
            warn!(peer = %from, error = %e, "driver busy; inbound message dropped");
        }
        true
    }

    /// Forwards a membership or address event to the driver. These are few
    /// (bounded by connections), so waiting for room is safe: the driver
    /// never waits on this loop (its sends are non-blocking).
    async fn emit(&mut self, event: NetEvent) {
        if self.events.send(event).await.is_err() {
            debug!("driver gone; dropping network event");
        }
    }

    /// `peer` subscribed to a topic other than ours: if it is this swarm's
    /// with other settings, says once what differs (it never becomes a
    /// member here, and a node waiting for peers names it).
    fn on_other_topic(&mut self, peer: PeerId, topic: &str) {
        let differences = if topic == self.swarm_topics.trim_end_matches('/') {
            // The swarm's topic as versions before the settings named it.
            "an older p2ptrain, which does not name its settings: upgrade it".to_string()
        } else {
            let Some(theirs) = topic
                .strip_prefix(&self.swarm_topics)
                .and_then(settings::RunSettings::parse)
            else {
                return;
            };
            self.settings.differences(&theirs).join("; ")
        };
        let mut seen = lock(&self.stats.other_settings);
        if differences.is_empty()
            || seen.len() >= OTHER_SETTINGS_KEPT
            || seen.iter().any(|(p, _)| *p == peer)
        {
            return;
        }
        warn!(%peer, %differences, "peer of this swarm runs other settings; not training with it");
        seen.push((peer, differences));
    }

    /// Hands a gossip message to the driver if it is a member's (and, with a
    /// swarm secret, sealed with it); says whether gossipsub may pass it on.
    fn take_gossip(&mut self, message: gossipsub::Message) -> gossipsub::MessageAcceptance {
        let Some(from) = message.source else {
            return gossipsub::MessageAcceptance::Reject; // unsigned: refused already
        };
        if !self.members.contains(&from) {
            // Not passed on, but its forwarder is not blamed: the source may
            // be a member whose subscription has not reached us yet.
            debug!(peer = %from, "gossip from a non-member ignored");
            return gossipsub::MessageAcceptance::Ignore;
        }
        if self.received(from, message.data, None) {
            gossipsub::MessageAcceptance::Accept
        } else {
            gossipsub::MessageAcceptance::Reject
        }
    }

    async fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                if self.relay_server
                    && !nat::is_relayed(&address)
                    && (!nat::is_loopback(&address) || self.loopback_only)
                {
                    // A relay's reservations hand its addresses to the
                    // peers behind it; `--relay` vouches they are reachable.
                    self.swarm.add_external_address(address.clone());
                }
                let local = *self.swarm.local_peer_id();
                let full = if matches!(address.iter().last(), Some(Protocol::P2p(_))) {
                    address
                } else {
                    address.with(Protocol::P2p(local))
                };
                info!(addr = %full, "listening");
                self.emit(NetEvent::Listening(full)).await;
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                endpoint,
                connection_id,
                ..
            } => {
                let relayed = endpoint.is_relayed();
                let addr = match &endpoint {
                    // An inbound relayed connection's remote address is just
                    // `/p2p/PEER`; the circuit is in our local address.
                    libp2p::core::ConnectedPoint::Listener { local_addr, .. } if relayed => {
                        local_addr.clone().with(Protocol::P2p(peer_id))
                    }
                    _ => endpoint.get_remote_address().clone(),
                };
                let stale: Vec<ConnectionId> = {
                    let mut addrs = self.stats.addrs();
                    let conns = addrs.entry(peer_id).or_default();
                    conns.push((connection_id, addr.clone()));
                    if relayed {
                        Vec::new()
                    } else {
                        conns
                            .iter()
                            .filter(|(_, a)| nat::is_relayed(a))
                            .map(|(id, _)| *id)
                            .collect()
                    }
                };
                if relayed {
                    info!(peer = %peer_id, %addr, "connected through a relay");
                } else {
                    debug!(peer = %peer_id, %addr, "connected");
                }
                // Tensors take a relay only while no direct path exists.
                let at = tokio::time::Instant::now() + RELAYED_GRACE;
                for id in stale {
                    info!(peer = %peer_id, "direct connection open; the relayed one closes shortly");
                    self.relayed_to_close.push((at, peer_id, id));
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                ..
            } => {
                {
                    let mut addrs = self.stats.addrs();
                    if let Some(conns) = addrs.get_mut(&peer_id) {
                        conns.retain(|(id, _)| *id != connection_id);
                    }
                    if num_established == 0 {
                        addrs.remove(&peer_id);
                    }
                }
                if num_established == 0 {
                    let dropped = self.queues.forget(&peer_id);
                    if dropped > 0 {
                        debug!(peer = %peer_id, dropped, "peer disconnected; waiting direct messages dropped");
                    }
                    self.relays.peer_gone(&peer_id);
                    self.awaiting_topics.retain(|(_, p)| *p != peer_id);
                    self.candidates.remove(&peer_id);
                    self.proven.remove(&peer_id);
                    self.early.forget(&peer_id);
                    if self.members.remove(&peer_id) {
                        self.relay_members.remove(&peer_id);
                        info!(peer = %peer_id, "member left");
                        self.emit(NetEvent::PeerLeft(peer_id)).await;
                    }
                }
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                ..
            } => {
                let now = std::time::Instant::now();
                if let Some(relay) = self
                    .relays
                    .listener_closed(listener_id, reason.is_err(), now)
                {
                    match reason {
                        Ok(()) => info!(%relay, "relay reservation closed"),
                        Err(e) => {
                            warn!(%relay, error = %e, "relay reservation ended; will look for another")
                        }
                    }
                    self.publish_nat();
                }
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                debug!(peer = ?peer_id, error = %error, "dial failed");
            }
            SwarmEvent::Behaviour(event) => self.on_behaviour_event(event).await,
            _ => {}
        }
    }

    async fn on_behaviour_event(&mut self, event: BehaviourEvent) {
        match event {
            BehaviourEvent::Gossipsub(gossipsub::Event::Subscribed { peer_id, topic })
                if topic == self.topic.hash() =>
            {
                let Some(key) = &self.key else {
                    return self.admit(peer_id).await;
                };
                // Show the peer we hold the secret; admit it once it has
                // shown us the same.
                let me = self.swarm.local_peer_id().to_bytes();
                let proof = key.membership_proof(&me, &peer_id.to_bytes());
                self.candidates.insert(peer_id);
                self.send_direct(peer_id, Arc::new(proof));
                if self.proven.contains(&peer_id) {
                    self.admit(peer_id).await;
                }
            }
            BehaviourEvent::Gossipsub(gossipsub::Event::Subscribed { peer_id, topic }) => {
                self.on_other_topic(peer_id, topic.as_str())
            }
            BehaviourEvent::Gossipsub(gossipsub::Event::Unsubscribed { peer_id, topic })
                if topic == self.topic.hash() =>
            {
                self.candidates.remove(&peer_id);
                self.early.forget(&peer_id);
                if self.members.remove(&peer_id) {
                    self.relay_members.remove(&peer_id);
                    self.emit(NetEvent::PeerLeft(peer_id)).await;
                }
            }
            BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            }) => {
                // Gossipsub forwards a message to the rest of its mesh only
                // once we accept it: an outsider's (or a forged one) goes no
                // further than us.
                let verdict = self.take_gossip(message);
                self.swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(&message_id, &propagation_source, verdict);
            }
            BehaviourEvent::Direct(request_response::Event::Message {
                peer,
                message:
                    request_response::Message::Request {
                        request, channel, ..
                    },
                ..
            }) => {
                // Acknowledged only once it is taken (the protocol's own
                // messages carry meaning); one not acknowledged fails at its
                // sender, which tries again.
                let proof = self.key.as_ref().and_then(|key| {
                    let me = self.swarm.local_peer_id().to_bytes();
                    key.check_membership_proof(&request.bytes, &peer.to_bytes(), &me)
                });
                if let Some(valid) = proof {
                    self.acknowledge(channel);
                    if !valid {
                        warn!(%peer, "membership proof does not check out: the peer lacks the swarm secret");
                        return;
                    }
                    self.proven.insert(peer);
                    if self.candidates.contains(&peer) {
                        self.admit(peer).await;
                    }
                    return;
                }
                // The transport handed the only reference over: no copy.
                let bytes =
                    Arc::try_unwrap(request.bytes).unwrap_or_else(|shared| (*shared).clone());
                if self.members.contains(&peer) {
                    self.acknowledge(channel);
                    self.received(peer, bytes, request.held);
                    return;
                }
                // It may have overtaken what makes its sender a member.
                let now = tokio::time::Instant::now();
                match self
                    .early
                    .keep(peer, bytes.len(), (bytes, request.held), now)
                {
                    early::Keep::Kept => {
                        self.acknowledge(channel);
                        debug!(%peer, "direct message from a peer not admitted yet kept");
                    }
                    early::Keep::TooLarge => {
                        self.acknowledge(channel);
                        debug!(%peer, "large direct message from a non-member dropped");
                    }
                    early::Keep::NoRoom => {
                        debug!(%peer, "direct message from a non-member refused for now")
                    }
                }
            }
            BehaviourEvent::Direct(request_response::Event::Message {
                message: request_response::Message::Response { request_id, .. },
                ..
            }) => {
                if let Some(out) = self.in_flight.remove(&request_id) {
                    self.release(&out);
                }
            }
            BehaviourEvent::Direct(request_response::Event::OutboundFailure {
                peer,
                error,
                request_id,
                ..
            }) => match self.in_flight.remove(&request_id) {
                Some(out) => {
                    self.release(&out);
                    let retry = out.attempts < DIRECT_ATTEMPTS && self.is_known(&peer);
                    if retry {
                        debug!(%peer, %error, attempt = out.attempts, "direct message failed; retrying");
                        let again = Outbound {
                            attempts: out.attempts + 1,
                            ..out
                        };
                        if again.attempts < DIRECT_ATTEMPTS {
                            // Back in line behind what is queued for the peer.
                            self.send_outbound(again);
                        } else {
                            let at = tokio::time::Instant::now() + LAST_RETRY_AFTER;
                            self.retry_later.push((at, again));
                        }
                    } else {
                        warn!(%peer, %error, "direct message failed");
                    }
                }
                None => warn!(%peer, %error, "direct message failed"),
            },
            BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                connection_id,
            }) => {
                if info.protocol_version != behaviour::PROTOCOL_VERSION {
                    debug!(peer = %peer_id, version = %info.protocol_version, "not a p2ptrain peer");
                    return;
                }
                let awaited = self.awaiting_topics.iter().any(|(_, p)| *p == peer_id);
                if !self.is_known(&peer_id) && !awaited {
                    let by = tokio::time::Instant::now() + TOPICS_WITHIN;
                    self.awaiting_topics.push((by, peer_id));
                }
                let at = self.stats.addrs().get(&peer_id).and_then(|conns| {
                    conns
                        .iter()
                        .find(|(id, _)| *id == connection_id)
                        .map(|(_, a)| a.clone())
                });
                if nat::serves_relay(&info.protocols) {
                    if let Some(addr) = at.clone() {
                        debug!(relay = %peer_id, %addr, "peer offers to relay");
                        self.relays.relay_seen(peer_id, addr);
                        self.reserve_relays();
                    }
                }
                let via_loopback = at.as_ref().is_some_and(nat::is_loopback);
                let shared = nat::addresses_to_share(info.listen_addrs, via_loopback);
                let kad = &mut self.swarm.behaviour_mut().kad;
                for addr in &shared {
                    kad.add_address(&peer_id, addr.clone());
                }
                // An announcement with nothing to share (loopback only, seen
                // from elsewhere) keeps the old addresses: removing them all
                // would drop the peer from the DHT.
                if !shared.is_empty() {
                    for stale in self.kad_addresses.replace(peer_id, shared) {
                        kad.remove_address(&peer_id, &stale);
                    }
                }
                let due = self
                    .last_bootstrap
                    .is_none_or(|t| t.elapsed() >= KAD_BOOTSTRAP_MIN_GAP);
                if due {
                    self.bootstrap();
                }
            }
            BehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                for (peer, addr) in found {
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer, addr.clone());
                    if !self.is_connected(&peer) {
                        let _ = self.swarm.dial(addr);
                    }
                }
            }
            // Bootstrapping from one peer teaches us the rest: connect to
            // every peer Kademlia hears of so gossip reaches the whole swarm.
            BehaviourEvent::Kad(kad::Event::RoutingUpdated { peer, .. })
                if !self.is_connected(&peer) && peer != *self.swarm.local_peer_id() =>
            {
                if let Err(e) = self.swarm.dial(peer) {
                    debug!(%peer, error = %e, "dial of discovered peer failed");
                }
            }
            BehaviourEvent::Autonat(autonat::Event::StatusChanged { new, .. }) => {
                let r = match new {
                    autonat::NatStatus::Public(addr) => {
                        info!(%addr, "reachable directly (AutoNAT)");
                        Reachability::Public
                    }
                    autonat::NatStatus::Private => {
                        info!("not reachable directly (AutoNAT): will use a relay");
                        Reachability::Private
                    }
                    autonat::NatStatus::Unknown => Reachability::Unknown,
                };
                for listener in self.relays.set_reachability(r) {
                    self.swarm.remove_listener(listener);
                }
                self.reserve_relays();
            }
            BehaviourEvent::RelayClient(relay::client::Event::ReservationReqAccepted {
                relay_peer_id,
                renewal: false,
                ..
            }) => {
                self.relays.forget_refusals(&relay_peer_id);
                info!(relay = %relay_peer_id, "relay reservation accepted; reachable through it");
            }
            BehaviourEvent::Dcutr(dcutr::Event {
                remote_peer_id,
                result,
            }) => match result {
                Ok(_) => info!(peer = %remote_peer_id, "hole punch succeeded: direct connection"),
                Err(e) => {
                    info!(peer = %remote_peer_id, error = %e, "hole punch failed; traffic stays on the relay")
                }
            },
            BehaviourEvent::Relay(event) => debug!(?event, "relay service"),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_path_shown_is_the_direct_one_while_one_is_open() {
        let stats = NetStats::default();
        let (peer, relay) = (PeerId::random(), PeerId::random());
        let relayed: Multiaddr =
            format!("/ip4/10.0.0.1/udp/4001/quic-v1/p2p/{relay}/p2p-circuit/p2p/{peer}")
                .parse()
                .unwrap();
        let direct: Multiaddr = "/ip4/10.0.0.2/udp/4001/quic-v1".parse().unwrap();
        let (r, d) = (
            ConnectionId::new_unchecked(1),
            ConnectionId::new_unchecked(2),
        );
        stats.addrs().insert(peer, vec![(r, relayed.clone())]);
        assert_eq!(stats.remote_addr(&peer), Some(relayed.clone()));
        assert_eq!(stats.paths()[&peer.to_string()], AddressKind::Relay);
        stats
            .addrs()
            .get_mut(&peer)
            .unwrap()
            .push((d, direct.clone()));
        assert_eq!(stats.remote_addr(&peer), Some(direct));
        assert_eq!(stats.paths()[&peer.to_string()], AddressKind::Direct);
        assert_eq!(stats.reachability(), (Reachability::Unknown, Vec::new()));
    }

    #[test]
    fn transport_errors_keep_their_reason() {
        let os = std::io::Error::from(std::io::ErrorKind::AddrInUse);
        let e: libp2p::core::transport::TransportError<std::io::Error> =
            libp2p::core::transport::TransportError::Other(os);
        assert_eq!(e.to_string(), "", "libp2p's Display hides the reason");
        let text = crate::error_text::error_text(&e);
        assert!(text.to_lowercase().contains("address in use"), "{text}");
        let plain = std::io::Error::other("no route");
        assert_eq!(crate::error_text::error_text(&plain), "no route");
    }

    #[test]
    fn retries_leave_when_due_in_the_order_they_came() {
        let t0 = tokio::time::Instant::now();
        let s = Duration::from_secs(1);
        let mut waiting = vec![(t0 + 2 * s, "b"), (t0 + s, "a"), (t0 + 3 * s, "c")];
        assert!(take_due(&mut waiting, t0).is_empty());
        assert_eq!(take_due(&mut waiting, t0 + 2 * s), vec!["b", "a"]);
        assert_eq!(waiting.len(), 1);
        assert_eq!(take_due(&mut waiting, t0 + 9 * s), vec!["c"]);
        assert!(waiting.is_empty());
    }

    #[test]
    fn topic_names_differ_with_the_secret() {
        let key = secret::SwarmKey::from_secret(&[7; 32]);
        assert_eq!(topic_name("s", None), "p2ptrain/s/control/1");
        let keyed = topic_name("s", Some(&key));
        assert!(keyed.starts_with("p2ptrain/s/") && keyed != topic_name("s", None));
    }
}
