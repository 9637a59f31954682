//! The composed libp2p behaviour and swarm construction.

use super::codec::{FrameCodec, DIRECT_PROTOCOL};
use super::dial_guard::{check_dialed_peer, NoSelfDial};
use super::inbound_budget::InboundBudget;
use super::nat::MembersOnly;
use super::per_ip::PerIpLimit;
use super::quic::{QuicSettings, QuicTransport};
use super::{NetConfig, NetError};
use libp2p::{
    autonat, connection_limits, dcutr, gossipsub, identify,
    identity::Keypair,
    kad, mdns, noise, relay, request_response,
    swarm::{behaviour::toggle::Toggle, NetworkBehaviour},
    yamux, StreamProtocol, Swarm, Transport,
};
use std::time::Duration;

/// Identify's protocol version: peers announcing another one are not ours.
pub const PROTOCOL_VERSION: &str = "/p2ptrain/1.0.0";
/// Our private Kademlia protocol, so we do not join the public IPFS DHT.
const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/p2ptrain/kad/1.0.0");
/// A connection silent this long (keep-alives included) counts as dead.
const DEAD_PEER_TIMEOUT: Duration = Duration::from_secs(4);
/// Longest a QUIC handshake may take: a few round trips on any path.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Control messages are small; parameters never travel by gossip.
const MAX_GOSSIP_BYTES: usize = 64 * 1024;

/// Direct-message streams open at once on one connection, both ways
/// (request-response counts inbound and outbound together): each side sends
/// two at a time (see `send_queue`), and two more every few seconds while
/// those are slow, up to the request timeout, so a slow link needs room.
/// Memory is bounded by the inbound budget, not by this.
const MAX_STREAMS: usize = 64;

/// Connections others may have open to us, or be opening: far more than a
/// swarm's members and relays need, few enough that a peer opening
/// connections in a loop cannot exhaust the node's sockets and memory.
fn connection_limits() -> connection_limits::ConnectionLimits {
    connection_limits::ConnectionLimits::default()
        .with_max_pending_incoming(Some(128))
        .with_max_established_incoming(Some(1024))
        // Direct both ways at once, relayed ones, and their replacements.
        .with_max_established_per_peer(Some(8))
}

#[derive(NetworkBehaviour)]
pub(super) struct Behaviour {
    /// Refuses connections beyond [`connection_limits`].
    pub limits: connection_limits::Behaviour,
    /// Refuses inbound connections beyond a few dozen from one address.
    pub per_ip: PerIpLimit,
    pub identify: identify::Behaviour,
    pub kad: kad::Behaviour<kad::store::MemoryStore>,
    pub mdns: Toggle<mdns::tokio::Behaviour>,
    pub gossipsub: gossipsub::Behaviour,
    pub direct: request_response::Behaviour<FrameCodec>,
    /// Tells us whether peers can dial us back (are we behind a NAT?).
    pub autonat: autonat::Behaviour,
    /// Reserves slots on relays and makes connections through them.
    pub relay_client: relay::client::Behaviour,
    /// Relays for other members: only on nodes started with `--relay`.
    pub relay: Toggle<relay::Behaviour>,
    /// Upgrades relayed connections to direct ones by hole punching.
    pub dcutr: dcutr::Behaviour,
}

/// How AutoNAT probes: soon after start (a node behind a NAT needs its
/// relay before training can reach it), again every half minute until sure.
fn autonat_config() -> autonat::Config {
    autonat::Config {
        boot_delay: Duration::from_secs(2),
        retry_interval: Duration::from_secs(20),
        refresh_interval: Duration::from_secs(5 * 60),
        throttle_server_period: Duration::from_secs(10),
        timeout: Duration::from_secs(15),
        // Volunteers on one LAN, or test namespaces, use private addresses.
        only_global_ips: false,
        ..autonat::Config::default()
    }
}

/// A relay that carries training traffic: circuits last and carry as much
/// as a run needs (libp2p's defaults, 2 minutes and 128 KiB, suit only
/// hole-punch signalling), and only members of the swarm may use it.
fn relay_config(members: &MembersOnly) -> relay::Config {
    let mut c = relay::Config {
        max_circuit_duration: Duration::from_secs(24 * 60 * 60),
        max_circuit_bytes: 0, // unlimited
        max_circuits: 64,
        max_circuits_per_peer: 8,
        ..relay::Config::default()
    };
    c.reservation_rate_limiters.push(Box::new(members.clone()));
    c.circuit_src_rate_limiters.push(Box::new(members.clone()));
    c
}

pub(super) fn build_swarm(
    config: &NetConfig,
    keypair: Keypair,
    topic: &gossipsub::IdentTopic,
    members: &MembersOnly,
) -> Result<Swarm<Behaviour>, NetError> {
    let setup = |e: &dyn std::fmt::Display| NetError::Setup(e.to_string());
    let mdns_on = config.mdns;
    let request_timeout = config.request_timeout;
    let relay_server = config.relay;
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_other_transport(|key| {
            let settings = QuicSettings {
                // Notice a crashed peer within seconds, not QUIC's usual
                // 10 s: until then rounds wait for it at the join window.
                idle_timeout: DEAD_PEER_TIMEOUT,
                keep_alive: DEAD_PEER_TIMEOUT / 4,
                handshake_timeout: HANDSHAKE_TIMEOUT,
            };
            Ok(NoSelfDial::new(QuicTransport::new(key, settings)?).and_then(check_dialed_peer))
        })
        .map_err(|e| setup(&e))?
        // Relayed connections are streams, not QUIC: they get their own
        // encryption and multiplexing.
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| setup(&e))?
        .with_behaviour(|key, relay_client| {
            let peer_id = key.public().to_peer_id();
            let gossip_config = gossipsub::ConfigBuilder::default()
                .heartbeat_interval(Duration::from_millis(500))
                .max_transmit_size(MAX_GOSSIP_BYTES)
                .validation_mode(gossipsub::ValidationMode::Strict)
                // Passed on only once the event loop accepts it (a member's,
                // sealed with the swarm secret where there is one).
                .validate_messages()
                .flood_publish(true)
                .build()
                .map_err(|e| e.to_string())?;
            let gossipsub = gossipsub::Behaviour::new(
                gossipsub::MessageAuthenticity::Signed(key.clone()),
                gossip_config,
            )?;
            let mut kad = kad::Behaviour::with_config(
                peer_id,
                kad::store::MemoryStore::new(peer_id),
                kad::Config::new(KAD_PROTOCOL),
            );
            // Every node serves the DHT: volunteers are equals.
            kad.set_mode(Some(kad::Mode::Server));
            let mdns = if mdns_on {
                Some(mdns::tokio::Behaviour::new(
                    mdns::Config::default(),
                    peer_id,
                )?)
            } else {
                None
            };
            let relay = relay_server.then(|| {
                let mut r = relay::Behaviour::new(peer_id, relay_config(members));
                // `--relay` says this node is reachable; do not wait for
                // AutoNAT to confirm it before advertising the service.
                r.set_status(Some(relay::Status::Enable));
                r
            });
            Ok(Behaviour {
                limits: connection_limits::Behaviour::new(connection_limits()),
                per_ip: PerIpLimit::default(),
                identify: identify::Behaviour::new(
                    identify::Config::new(PROTOCOL_VERSION.to_string(), key.public())
                        // A relay reservation is a new address: tell peers at once.
                        .with_push_listen_addr_updates(true),
                ),
                kad,
                mdns: mdns.into(),
                gossipsub,
                direct: request_response::Behaviour::with_codec(
                    FrameCodec::new(InboundBudget::default()),
                    [(DIRECT_PROTOCOL, request_response::ProtocolSupport::Full)],
                    request_response::Config::default()
                        .with_request_timeout(request_timeout)
                        .with_max_concurrent_streams(MAX_STREAMS),
                ),
                autonat: autonat::Behaviour::new(peer_id, autonat_config()),
                relay_client,
                relay: relay.into(),
                dcutr: dcutr::Behaviour::new(peer_id),
            })
        })
        .map_err(|e| setup(&e))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
        .build();
    swarm
        .behaviour_mut()
        .gossipsub
        .subscribe(topic)
        .map_err(|e| setup(&e))?;
    Ok(swarm)
}
