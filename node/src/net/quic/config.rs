//! quinn's configuration for a node: libp2p's TLS handshake (with the
//! cipher order of [`super::tls`]), the node's timeouts, and packet sizes
//! chosen per path.
//!
//! libp2p's own QUIC transport keeps quinn's packet limits: every endpoint
//! tells its peers it takes UDP payloads of at most 1472 bytes, and path-MTU
//! discovery stops at 1452, even on loopback's 64 KiB MTU. quinn encrypts,
//! frames, acknowledges and paces per packet, so on a CPU-bound machine that
//! limit is most of what an all-reduce between local peers costs
//! (BENCHMARKS.md, "Packet size"). Here listening endpoints and the shared
//! dialing ones accept payloads up to [`LOOPBACK_PAYLOAD`] (an endpoint made
//! for one dial keeps quinn's 1472), and a connection to a loopback address
//! lets discovery climb to it; every other path keeps quinn's defaults,
//! which fit the internet's 1500-byte links.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use libp2p::identity::Keypair;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{ClientConfig, EndpointConfig, MtuDiscoveryConfig, ServerConfig, TransportConfig};

use super::{tls, QuicError};

/// Largest UDP payload an endpoint accepts, and the bound of path-MTU
/// discovery on a loopback path: QUIC's own maximum. Loopback's 64 KiB MTU
/// carries a little less (65507 bytes over IPv4); discovery settles there,
/// its larger probes refused by the kernel.
pub const LOOPBACK_PAYLOAD: u16 = 65_527;

/// Largest payload sent with segmentation offload. quinn 0.11 hands the
/// kernel up to 10 packets per offloaded send, and a send over 64 KiB is
/// refused, which stalls the connection; loopback-sized packets go out one
/// per send instead (`bench/tests/quinn.rs` holds the same limit).
const LARGEST_OFFLOADED_PAYLOAD: u16 = 6_500;

/// What the node sets; everything else is quinn's default or fixed here.
#[derive(Debug, Clone, Copy)]
pub struct QuicSettings {
    /// A connection silent this long is closed (both ends must agree).
    pub idle_timeout: Duration,
    /// Period of silence after which a keep-alive is sent.
    pub keep_alive: Duration,
    /// Longest a handshake may take, dialled or accepted.
    pub handshake_timeout: Duration,
}

/// Streams one peer may hold open at once: far more than the node's
/// protocols use, few enough to bound what a peer can make us keep.
const MAX_STREAMS: u32 = 256;
/// Unacknowledged bytes one stream may have in flight: a tensor part streams
/// at full speed, and no one stream takes the connection's whole window.
const STREAM_WINDOW: u32 = 10_000_000;
/// Unacknowledged bytes a connection may have in flight on all streams.
const CONNECTION_WINDOW: u32 = 15_000_000;

/// The configurations a node's endpoints and connections use.
pub(super) struct QuinnConfigs {
    /// Shared by the node's listening and dialing endpoints.
    pub endpoint: EndpointConfig,
    /// For an endpoint made for one dial: quinn's own payload limit, whose
    /// receive buffers are 1/44 the size (quinn sizes them by the limit,
    /// ~128 MiB of address space at [`LOOPBACK_PAYLOAD`]).
    pub one_dial_endpoint: EndpointConfig,
    /// Handshake time limit, applied by the transport.
    pub handshake_timeout: Duration,
    server_default: Arc<ServerConfig>,
    server_loopback: Arc<ServerConfig>,
    client_default: ClientConfig,
    client_loopback: ClientConfig,
}

impl QuinnConfigs {
    /// Builds them for the node holding `keypair`.
    pub fn new(keypair: &Keypair, settings: QuicSettings) -> Result<Self, QuicError> {
        let setup =
            |what: &str, e: &dyn std::fmt::Display| QuicError::Setup(format!("{what}: {e}"));
        let server_tls = tls::server_config(keypair).map_err(|e| setup("TLS", &e))?;
        let server_tls =
            Arc::new(QuicServerConfig::try_from(server_tls).map_err(|e| setup("TLS", &e))?);
        let client_tls = tls::client_config(keypair).map_err(|e| setup("TLS", &e))?;
        let client_tls =
            Arc::new(QuicClientConfig::try_from(client_tls).map_err(|e| setup("TLS", &e))?);

        let server = |transport: Arc<TransportConfig>| {
            let mut c = ServerConfig::with_crypto(server_tls.clone());
            c.transport_config(transport);
            // A connection stays on the address it was made on: the swarm
            // names each connection by its addresses.
            c.migration(false);
            Arc::new(c)
        };
        let client = |transport: Arc<TransportConfig>| {
            let mut c = ClientConfig::new(client_tls.clone());
            c.transport_config(transport);
            c
        };
        let default = transport_config(settings, None);
        let loopback = transport_config(settings, Some(LOOPBACK_PAYLOAD));

        let mut endpoint = match keypair.derive_secret(b"p2ptrain quic stateless reset key") {
            Some(secret) => EndpointConfig::new(Arc::new(ResetKey(secret))),
            None => EndpointConfig::default(),
        };
        endpoint.supported_versions(vec![1]);
        let one_dial_endpoint = endpoint.clone();
        endpoint
            .max_udp_payload_size(LOOPBACK_PAYLOAD)
            .map_err(|e| setup("UDP payload size", &e))?;
        Ok(Self {
            endpoint,
            one_dial_endpoint,
            handshake_timeout: settings.handshake_timeout,
            server_default: server(default.clone()),
            server_loopback: server(loopback.clone()),
            client_default: client(default),
            client_loopback: client(loopback),
        })
    }

    /// The server configuration for a connection from `remote`.
    pub fn server_for(&self, remote: SocketAddr) -> Arc<ServerConfig> {
        if is_loopback(remote) {
            self.server_loopback.clone()
        } else {
            self.server_default.clone()
        }
    }

    /// The server configuration an endpoint starts with (each accepted
    /// connection then gets [`Self::server_for`] its address).
    pub fn server_default(&self) -> ServerConfig {
        (*self.server_default).clone()
    }

    /// The client configuration for a connection to `remote`.
    pub fn client_for(&self, remote: SocketAddr) -> ClientConfig {
        if is_loopback(remote) {
            self.client_loopback.clone()
        } else {
            self.client_default.clone()
        }
    }
}

/// Whether `addr` is on this machine's loopback, where packets can be as
/// large as QUIC allows.
fn is_loopback(addr: SocketAddr) -> bool {
    addr.ip().to_canonical().is_loopback()
}

/// Transport settings; `largest_payload` lets path-MTU discovery climb past
/// quinn's default bound of 1452 bytes.
fn transport_config(settings: QuicSettings, largest_payload: Option<u16>) -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    // libp2p runs every protocol on bidirectional streams, and no datagrams.
    t.max_concurrent_uni_streams(0u32.into());
    t.max_concurrent_bidi_streams(MAX_STREAMS.into());
    t.datagram_receive_buffer_size(None);
    t.keep_alive_interval(Some(settings.keep_alive));
    // Out of range only past 2^62 microseconds; a node's timeouts are seconds.
    t.max_idle_timeout(quinn::IdleTimeout::try_from(settings.idle_timeout).ok());
    t.allow_spin(false);
    t.stream_receive_window(STREAM_WINDOW.into());
    t.receive_window(CONNECTION_WINDOW.into());
    if let Some(payload) = largest_payload {
        let mut mtu = MtuDiscoveryConfig::default();
        mtu.upper_bound(payload);
        t.mtu_discovery_config(Some(mtu));
        t.enable_segmentation_offload(payload <= LARGEST_OFFLOADED_PAYLOAD);
    }
    Arc::new(t)
}

/// Signs stateless resets with a key derived from the node's identity, so a
/// node restarted on the same key can tell a peer still holding the old
/// connection to drop it at once, instead of after the idle timeout.
struct ResetKey([u8; 32]);

impl quinn::crypto::HmacKey for ResetKey {
    fn sign(&self, data: &[u8], signature_out: &mut [u8]) {
        let tag = blake3::keyed_hash(&self.0, data);
        let n = signature_out.len().min(blake3::OUT_LEN);
        signature_out[..n].copy_from_slice(&tag.as_bytes()[..n]);
    }

    fn signature_len(&self) -> usize {
        blake3::OUT_LEN
    }

    fn verify(&self, data: &[u8], signature: &[u8]) -> Result<(), quinn::crypto::CryptoError> {
        let Ok(bytes) = <[u8; blake3::OUT_LEN]>::try_from(signature) else {
            return Err(quinn::crypto::CryptoError);
        };
        // `Hash`'s equality runs in constant time.
        if blake3::keyed_hash(&self.0, data) == blake3::Hash::from_bytes(bytes) {
            Ok(())
        } else {
            Err(quinn::crypto::CryptoError)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quinn::crypto::HmacKey;

    #[test]
    fn a_reset_signature_verifies_only_for_its_own_data_and_key() {
        let key = ResetKey([7; 32]);
        let mut tag = vec![0; key.signature_len()];
        key.sign(b"connection id", &mut tag);
        assert!(key.verify(b"connection id", &tag).is_ok());
        assert!(key.verify(b"another id", &tag).is_err());
        assert!(ResetKey([8; 32]).verify(b"connection id", &tag).is_err());
        assert!(key.verify(b"connection id", &tag[..16]).is_err());
    }

    #[test]
    fn only_loopback_paths_get_loopback_sized_packets() {
        let at = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(is_loopback(at("127.0.0.1:4001")));
        assert!(is_loopback(at("[::1]:4001")));
        assert!(is_loopback(at("[::ffff:127.0.0.1]:4001")));
        assert!(!is_loopback(at("192.168.1.2:4001")));
        assert!(!is_loopback(at("[2001:db8::1]:4001")));
    }
}
