//! The TLS side of the QUIC handshake: libp2p's certificates and checks,
//! with the cipher both machines run fastest.
//!
//! libp2p-tls builds its rustls configurations with ChaCha20-Poly1305
//! first, and a TLS 1.3 server follows the client's order, so two libp2p
//! nodes always pick it. On a CPU with AES instructions AES-128-GCM costs
//! far less per byte (aws-lc's AVX-512 code; sealing and opening packets
//! went from 16% to 3% of a loopback all-reduce's CPU, BENCHMARKS.md), but
//! on one without them it runs in software, slower than ChaCha20. So a
//! connection uses AES-GCM only when both ends have AES instructions:
//! - a client offers the three suites with AES-GCM first where its CPU has
//!   AES instructions, libp2p's order (ChaCha20 first) where it has not;
//! - a server with AES instructions follows the client's order (a client
//!   without them, or any libp2p-quic client, gets ChaCha20); a server
//!   without them picks by its own order, ChaCha20 first, whatever the
//!   client offers.
//!
//! Certificates are libp2p-tls's own, and so is the check of what a peer
//! presents; libp2p-tls keeps its verifier private, so the few rules it
//! applies are applied here again ([`Libp2pCertificates`]).

use std::sync::Arc;

use libp2p::identity::Keypair;
use libp2p::PeerId;
use quinn::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use quinn::rustls::crypto::aws_lc_rs::{self, cipher_suite};
use quinn::rustls::crypto::CryptoProvider;
use quinn::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use quinn::rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use quinn::rustls::sign::{CertifiedKey, SingleCertAndKey};
use quinn::rustls::{
    self, CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme,
    SupportedCipherSuite,
};

/// The ALPN protocol id libp2p's QUIC handshake names.
const LIBP2P_ALPN: &[u8] = b"libp2p";

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// libp2p-tls could not make the node's certificate.
    #[error("cannot make the node's TLS certificate: {0}")]
    Certificate(#[from] libp2p_tls::certificate::GenError),
    /// rustls refused the configuration.
    #[error("rustls refused the TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// libp2p's three TLS 1.3 suites in the order this machine runs fastest.
fn cipher_suites(aes_in_hardware: bool) -> Vec<SupportedCipherSuite> {
    let chacha = cipher_suite::TLS13_CHACHA20_POLY1305_SHA256;
    let aes128 = cipher_suite::TLS13_AES_128_GCM_SHA256;
    let aes256 = cipher_suite::TLS13_AES_256_GCM_SHA384;
    if aes_in_hardware {
        vec![aes128, aes256, chacha]
    } else {
        // libp2p-tls's own order.
        vec![chacha, aes256, aes128]
    }
}

/// Whether the CPU has the instructions AES-GCM is fast with.
fn aes_in_hardware() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
            && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

fn provider(aes_in_hardware: bool) -> Arc<CryptoProvider> {
    let mut provider = aws_lc_rs::default_provider();
    provider.cipher_suites = cipher_suites(aes_in_hardware);
    Arc::new(provider)
}

/// libp2p's certificate for the node holding `keypair` (a fresh key of its
/// own, signed by the node's key in an extension), presented on every
/// handshake. rustls's `with_single_cert` would refuse it: checking that
/// the key matches, it parses the certificate with webpki, which does not
/// know libp2p's critical extension.
fn certificate(
    keypair: &Keypair,
    provider: &CryptoProvider,
) -> Result<Arc<SingleCertAndKey>, TlsError> {
    let (certificate, key) = libp2p_tls::certificate::generate(keypair)?;
    let key = provider.key_provider.load_private_key(key)?;
    Ok(Arc::new(SingleCertAndKey::from(CertifiedKey::new(
        vec![certificate],
        key,
    ))))
}

/// The client side for the node holding `keypair`. The peer id is checked by
/// the swarm once the connection is up, as with libp2p-quic.
pub fn client_config(keypair: &Keypair) -> Result<rustls::ClientConfig, TlsError> {
    client_config_with(keypair, aes_in_hardware())
}

fn client_config_with(
    keypair: &Keypair,
    aes_in_hardware: bool,
) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider(aes_in_hardware);
    let certificate = certificate(keypair, &provider)?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Libp2pCertificates))
        .with_client_cert_resolver(certificate);
    config.alpn_protocols = vec![LIBP2P_ALPN.to_vec()];
    config.key_log = Arc::new(rustls::KeyLogFile::new());
    Ok(config)
}

/// The server side for the node holding `keypair`: it follows the client's
/// order of suites where this CPU has AES instructions, and picks ChaCha20
/// by its own order where it has not (see the module docs).
pub fn server_config(keypair: &Keypair) -> Result<rustls::ServerConfig, TlsError> {
    server_config_with(keypair, aes_in_hardware())
}

fn server_config_with(
    keypair: &Keypair,
    aes_in_hardware: bool,
) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider(aes_in_hardware);
    let certificate = certificate(keypair, &provider)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(Libp2pCertificates))
        .with_cert_resolver(certificate);
    config.alpn_protocols = vec![LIBP2P_ALPN.to_vec()];
    config.key_log = Arc::new(rustls::KeyLogFile::new());
    config.ignore_client_order = !aes_in_hardware;
    Ok(config)
}

/// What the libp2p TLS specification asks of a peer's certificate, as
/// libp2p-tls checks it: exactly one certificate, self-signed, carrying a
/// libp2p extension signed by the peer's host key
/// ([`libp2p_tls::certificate::parse`] checks the last two); handshake
/// signatures made with the certificate's key; TLS 1.3 only. Both ends
/// present one (client authentication is mandatory in libp2p).
#[derive(Debug)]
struct Libp2pCertificates;

impl Libp2pCertificates {
    /// The peer id of a presented chain that follows the rules.
    fn check_chain(
        end_entity: &CertificateDer,
        intermediates: &[CertificateDer],
    ) -> Result<PeerId, rustls::Error> {
        if !intermediates.is_empty() {
            return Err(rustls::Error::General(
                "a libp2p peer presents exactly one certificate".into(),
            ));
        }
        Ok(libp2p_tls::certificate::parse(end_entity)?.peer_id())
    }

    fn check_signature(
        message: &[u8],
        cert: &CertificateDer,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        libp2p_tls::certificate::parse(cert)?.verify_signature(
            dss.scheme,
            message,
            dss.signature(),
        )?;
        Ok(HandshakeSignatureValid::assertion())
    }

    /// TLS 1.2 is not offered, so its signatures are never valid.
    fn no_tls12() -> rustls::Error {
        rustls::Error::InvalidCertificate(CertificateError::BadSignature)
    }

    /// The schemes libp2p-tls accepts, most preferred first.
    fn schemes() -> Vec<SignatureScheme> {
        vec![
            SignatureScheme::ECDSA_NISTP384_SHA384,
            SignatureScheme::ECDSA_NISTP256_SHA256,
            SignatureScheme::ED25519,
            SignatureScheme::RSA_PSS_SHA512,
            SignatureScheme::RSA_PSS_SHA384,
            SignatureScheme::RSA_PSS_SHA256,
            SignatureScheme::RSA_PKCS1_SHA512,
            SignatureScheme::RSA_PKCS1_SHA384,
            SignatureScheme::RSA_PKCS1_SHA256,
        ]
    }
}

impl ServerCertVerifier for Libp2pCertificates {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer,
        intermediates: &[CertificateDer],
        _server_name: &ServerName,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Self::check_chain(end_entity, intermediates)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(Self::no_tls12())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Self::check_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        Self::schemes()
    }
}

impl ClientCertVerifier for Libp2pCertificates {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer,
        intermediates: &[CertificateDer],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Self::check_chain(end_entity, intermediates)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(Self::no_tls12())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Self::check_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        Self::schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::{ClientConnection, ServerConnection};

    /// Runs a TLS handshake in memory; the suite chosen, and the peer ids
    /// each end saw, or the first error.
    fn handshake(
        client: rustls::ClientConfig,
        server: rustls::ServerConfig,
    ) -> Result<(SupportedCipherSuite, PeerId, PeerId), rustls::Error> {
        let name = ServerName::try_from("l").expect("a valid name");
        let mut client = ClientConnection::new(Arc::new(client), name)?;
        let mut server = ServerConnection::new(Arc::new(server))?;
        for _ in 0..10 {
            let mut bytes = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut bytes).expect("to memory");
            }
            server.read_tls(&mut &bytes[..]).expect("from memory");
            server.process_new_packets()?;
            bytes.clear();
            while server.wants_write() {
                server.write_tls(&mut bytes).expect("to memory");
            }
            client.read_tls(&mut &bytes[..]).expect("from memory");
            client.process_new_packets()?;
            if !client.is_handshaking() && !server.is_handshaking() {
                let peer = |certs: Option<&[CertificateDer]>| {
                    let cert = certs.and_then(<[_]>::first).expect("a certificate");
                    libp2p_tls::certificate::parse(cert)
                        .expect("a libp2p certificate")
                        .peer_id()
                };
                let suite = client.negotiated_cipher_suite().expect("negotiated");
                assert_eq!(server.negotiated_cipher_suite(), Some(suite));
                return Ok((
                    suite,
                    peer(client.peer_certificates()),
                    peer(server.peer_certificates()),
                ));
            }
        }
        panic!("the handshake did not finish");
    }

    fn suite_name(suite: SupportedCipherSuite) -> String {
        format!("{:?}", suite.suite())
    }

    #[test]
    fn aes_gcm_only_where_both_ends_have_aes_instructions() {
        let (a, b) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let suite = |client_aes: bool, server_aes: bool| {
            let (suite, server_seen, client_seen) = handshake(
                client_config_with(&a, client_aes).unwrap(),
                server_config_with(&b, server_aes).unwrap(),
            )
            .unwrap();
            assert_eq!(server_seen, b.public().to_peer_id());
            assert_eq!(client_seen, a.public().to_peer_id());
            suite_name(suite)
        };
        assert_eq!(suite(true, true), "TLS13_AES_128_GCM_SHA256");
        assert_eq!(suite(false, true), "TLS13_CHACHA20_POLY1305_SHA256");
        assert_eq!(suite(true, false), "TLS13_CHACHA20_POLY1305_SHA256");
        assert_eq!(suite(false, false), "TLS13_CHACHA20_POLY1305_SHA256");
    }

    #[test]
    fn libp2p_tls_peers_handshake_with_us_either_way() {
        let (a, b) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        // A libp2p-quic client offers ChaCha20 first; our server follows it.
        let theirs = libp2p_tls::make_client_config(&a, Some(b.public().to_peer_id())).unwrap();
        let (suite, server_seen, _) =
            handshake(theirs, server_config_with(&b, true).unwrap()).unwrap();
        assert_eq!(suite_name(suite), "TLS13_CHACHA20_POLY1305_SHA256");
        assert_eq!(server_seen, b.public().to_peer_id());
        // A libp2p-quic server follows our order.
        let theirs = libp2p_tls::make_server_config(&b).unwrap();
        let (suite, _, client_seen) =
            handshake(client_config_with(&a, true).unwrap(), theirs).unwrap();
        assert_eq!(suite_name(suite), "TLS13_AES_128_GCM_SHA256");
        assert_eq!(client_seen, a.public().to_peer_id());
        // And a libp2p-tls client that expects another peer refuses our
        // certificate: the checks are the same on both sides.
        let stranger = Keypair::generate_ed25519().public().to_peer_id();
        let expecting = libp2p_tls::make_client_config(&a, Some(stranger)).unwrap();
        assert!(handshake(expecting, server_config_with(&b, true).unwrap()).is_err());
    }

    #[test]
    fn chains_of_more_than_one_and_foreign_certificates_are_refused() {
        let keypair = Keypair::generate_ed25519();
        let (cert, _) = libp2p_tls::certificate::generate(&keypair).unwrap();
        assert_eq!(
            Libp2pCertificates::check_chain(&cert, &[]).unwrap(),
            keypair.public().to_peer_id()
        );
        let two = Libp2pCertificates::check_chain(&cert, std::slice::from_ref(&cert));
        assert!(two.unwrap_err().to_string().contains("exactly one"));
        let garbage = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00]);
        assert!(Libp2pCertificates::check_chain(&garbage, &[]).is_err());
    }
}
