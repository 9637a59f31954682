//! Hole punching for a dial that must end as the accepting side of the
//! connection: packets to the peer's address open our NAT's mapping for it,
//! while the peer dials us from its side.

use std::convert::Infallible;
use std::hash::{BuildHasher, RandomState};
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use super::QuicError;

/// Bytes in one punching packet: small, and random so that it never reads
/// as a QUIC packet.
const PACKET_BYTES: usize = 64;

/// Sends a random packet to `remote` from `socket` (a listener's) every
/// 10-200 ms until dropped; returns only if sending fails.
pub(super) async fn punch(socket: UdpSocket, remote: SocketAddr) -> Result<Infallible, QuicError> {
    socket.set_nonblocking(true)?;
    let socket = tokio::net::UdpSocket::from_std(socket)?;
    let random = RandomState::new();
    let mut sent = 0u64;
    loop {
        let packet: Vec<u8> = (0..PACKET_BYTES / 8)
            .flat_map(|i| random.hash_one((sent, i)).to_le_bytes())
            .collect();
        socket.send_to(&packet, remote).await?;
        let pause = 10 + random.hash_one(sent) % 191;
        tokio::time::sleep(Duration::from_millis(pause)).await;
        sent = sent.wrapping_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn punching_sends_distinct_random_packets_to_the_peer() {
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let ours = UdpSocket::bind("127.0.0.1:0").unwrap();
        let task = tokio::spawn(punch(ours, peer.local_addr().unwrap()));
        let packets: Vec<Vec<u8>> = tokio::task::spawn_blocking(move || {
            (0..3)
                .map(|_| {
                    let mut buf = [0u8; 1500];
                    let n = peer.recv(&mut buf).unwrap();
                    buf[..n].to_vec()
                })
                .collect()
        })
        .await
        .unwrap();
        task.abort();
        assert!(packets.iter().all(|p| p.len() == PACKET_BYTES));
        assert_ne!(packets[0], packets[1]);
        assert_ne!(packets[1], packets[2]);
    }
}
