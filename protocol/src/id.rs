//! Peer identities.
//!
//! Every protocol decision that depends on who a peer is (sample ownership, who leads a group,
//! member order in a reduction) compares or hashes a [`NodeId`], so all peers must derive the
//! same id for the same peer: it is the blake3 hash of the peer's public key bytes.

use serde::{Deserialize, Serialize};
use std::fmt::{self, Write as _};

/// A peer's identity: 32 bytes, the blake3 hash of its public key.
///
/// Ordered and hashable so that protocol rules ("the smallest id leads", "sum in member
/// order") are the same on every peer.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeId(pub [u8; 32]);

impl NodeId {
    /// Derives the id from a peer's public key bytes (the node passes libp2p `PeerId` bytes),
    /// so every peer computes the same id for the same key.
    pub fn from_key_bytes(bytes: &[u8]) -> NodeId {
        NodeId(*blake3::hash(bytes).as_bytes())
    }

    /// The full 64-character lowercase hex form, for logs and files where the short form of
    /// `Display` could be ambiguous.
    pub fn to_hex(&self) -> String {
        let mut out = String::with_capacity(64);
        for byte in &self.0 {
            // Writing to a String cannot fail.
            let _ = write!(out, "{byte:02x}");
        }
        out
    }
}

impl fmt::Display for NodeId {
    /// The first 8 hex characters: short enough for log lines, distinct enough in a swarm.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in &self.0[..4] {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for NodeId {
    /// Same short form as `Display`, so structures holding ids stay readable in `{:?}`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_is_blake3_of_key_bytes() {
        let id = NodeId::from_key_bytes(b"peer key");
        assert_eq!(id.0, *blake3::hash(b"peer key").as_bytes());
        assert_ne!(id, NodeId::from_key_bytes(b"other key"));
    }

    #[test]
    fn display_and_debug_show_first_8_hex_chars_and_to_hex_all() {
        let mut bytes = [0u8; 32];
        bytes[0] = 0xab;
        bytes[1] = 0x01;
        bytes[3] = 0xff;
        bytes[31] = 0x7e;
        let id = NodeId(bytes);
        assert_eq!(id.to_string(), "ab0100ff");
        assert_eq!(format!("{id:?}"), "ab0100ff");
        let hex = id.to_hex();
        assert_eq!(hex.len(), 64);
        assert!(hex.starts_with("ab0100ff"));
        assert!(hex.ends_with("7e"));
    }

    #[test]
    fn order_is_bytewise() {
        let mut low = [0u8; 32];
        let mut high = [0u8; 32];
        low[0] = 1;
        high[0] = 2;
        assert!(NodeId(low) < NodeId(high));
        low[0] = 2;
        low[31] = 1;
        assert!(NodeId(high) < NodeId(low));
    }

    #[test]
    fn postcard_encodes_32_raw_bytes() {
        let id = NodeId::from_key_bytes(b"x");
        let encoded = postcard::to_allocvec(&id).expect("encode");
        assert_eq!(encoded, id.0.to_vec());
        let back: NodeId = postcard::from_bytes(&encoded).expect("decode");
        assert_eq!(back, id);
    }
}
