//! The composed libp2p behaviour and swarm construction.

use super::codec::{FrameCodec, DIRECT_PROTOCOL};
use super::{NetConfig, NetError};
use libp2p::{
    gossipsub, identify,
    identity::Keypair,
    kad, mdns, request_response,
    swarm::{behaviour::toggle::Toggle, NetworkBehaviour},
    StreamProtocol, Swarm,
};
use std::time::Duration;

/// Identify's protocol version: peers announcing another one are not ours.
pub const PROTOCOL_VERSION: &str = "/p2ptrain/1.0.0";
/// Our private Kademlia protocol, so we do not join the public IPFS DHT.
const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/p2ptrain/kad/1.0.0");
/// A connection silent this long (keep-alives included) counts as dead.
const DEAD_PEER_TIMEOUT: Duration = Duration::from_secs(4);
/// Control messages are small; parameters never travel by gossip.
const MAX_GOSSIP_BYTES: usize = 64 * 1024;

#[derive(NetworkBehaviour)]
pub(super) struct Behaviour {
    pub identify: identify::Behaviour,
    pub kad: kad::Behaviour<kad::store::MemoryStore>,
    pub mdns: Toggle<mdns::tokio::Behaviour>,
    pub gossipsub: gossipsub::Behaviour,
    pub direct: request_response::Behaviour<FrameCodec>,
}

pub(super) fn build_swarm(
    config: &NetConfig,
    keypair: Keypair,
    topic: &gossipsub::IdentTopic,
) -> Result<Swarm<Behaviour>, NetError> {
    let setup = |e: &dyn std::fmt::Display| NetError::Setup(e.to_string());
    let mdns_on = config.mdns;
    let request_timeout = config.request_timeout;
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_quic_config(|mut c| {
            // Notice a crashed peer within seconds, not QUIC's default 10 s:
            // until then rounds wait for it at the join window.
            c.max_idle_timeout = DEAD_PEER_TIMEOUT.as_millis() as u32;
            c.keep_alive_interval = DEAD_PEER_TIMEOUT / 4;
            c
        })
        .with_behaviour(|key| {
            let peer_id = key.public().to_peer_id();
            let gossip_config = gossipsub::ConfigBuilder::default()
                .heartbeat_interval(Duration::from_millis(500))
                .max_transmit_size(MAX_GOSSIP_BYTES)
                .validation_mode(gossipsub::ValidationMode::Strict)
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
            Ok(Behaviour {
                identify: identify::Behaviour::new(identify::Config::new(
                    PROTOCOL_VERSION.to_string(),
                    key.public(),
                )),
                kad,
                mdns: mdns.into(),
                gossipsub,
                direct: request_response::Behaviour::with_codec(
                    FrameCodec,
                    [(DIRECT_PROTOCOL, request_response::ProtocolSupport::Full)],
                    request_response::Config::default().with_request_timeout(request_timeout),
                ),
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
