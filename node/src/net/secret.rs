//! The swarm secret: a key every member holds, so outsiders can neither
//! join the swarm's gossip topic nor slip messages into it.
//!
//! The key names the topic (a peer without it subscribes to another topic
//! and never becomes a member) and every message carries a blake3 keyed MAC
//! of its bytes, checked before anything parses them. It keeps out peers
//! that do not hold the secret; it does not stop a member from replaying or
//! lying (that is robust aggregation's job).

use std::path::{Path, PathBuf};

/// Bytes of the MAC appended to every sealed message.
pub const MAC_LEN: usize = 32;
/// Fewest bytes a secret file must hold (128 bits).
pub const MIN_SECRET_BYTES: usize = 16;

/// A swarm key derived from a secret file.
#[derive(Clone, PartialEq, Eq)]
pub struct SwarmKey([u8; 32]);

impl std::fmt::Debug for SwarmKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SwarmKey(…)") // never print the key
    }
}

/// Why a secret file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The file cannot be read.
    #[error("cannot read the swarm secret {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },
    /// The file is too short to be a secret.
    #[error("the swarm secret {} holds {got} bytes; use at least {MIN_SECRET_BYTES} random bytes, e.g. `head -c 32 /dev/urandom > {}`", path.display(), path.display())]
    TooShort {
        /// The file.
        path: PathBuf,
        /// Its length.
        got: usize,
    },
}

impl SwarmKey {
    /// Derives the key from a secret file's bytes (any content of at least
    /// [`MIN_SECRET_BYTES`]; a trailing newline is part of the secret).
    pub fn from_file(path: &Path) -> Result<SwarmKey, SecretError> {
        let bytes = std::fs::read(path).map_err(|source| SecretError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if bytes.len() < MIN_SECRET_BYTES {
            return Err(SecretError::TooShort {
                path: path.to_path_buf(),
                got: bytes.len(),
            });
        }
        Ok(SwarmKey::from_secret(&bytes))
    }

    /// Derives the key from secret bytes.
    pub fn from_secret(secret: &[u8]) -> SwarmKey {
        SwarmKey(blake3::derive_key("p2ptrain 2026-11 swarm secret", secret))
    }

    /// A topic tag only holders of the key can compute.
    pub fn topic_tag(&self, swarm: &str) -> String {
        let tag = blake3::keyed_hash(&self.0, format!("topic {swarm}").as_bytes());
        tag.to_hex()[..16].to_string()
    }

    /// Appends the MAC of `bytes`.
    pub fn seal(&self, mut bytes: Vec<u8>) -> Vec<u8> {
        let mac = blake3::keyed_hash(&self.0, &bytes);
        bytes.extend_from_slice(mac.as_bytes());
        bytes
    }

    /// Checks and strips the MAC; `None` if it is missing or wrong.
    pub fn open(&self, mut bytes: Vec<u8>) -> Option<Vec<u8>> {
        let body_len = bytes.len().checked_sub(MAC_LEN)?;
        let mac: [u8; MAC_LEN] = bytes[body_len..].try_into().ok()?;
        // blake3::Hash compares in constant time.
        if blake3::keyed_hash(&self.0, &bytes[..body_len]) != blake3::Hash::from(mac) {
            return None;
        }
        bytes.truncate(body_len);
        Some(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_messages_open_only_with_the_same_key() {
        let key = SwarmKey::from_secret(b"correct horse battery staple");
        let other = SwarmKey::from_secret(b"correct horse battery stapler");
        let sealed = key.seal(b"hello".to_vec());
        assert_eq!(key.open(sealed.clone()), Some(b"hello".to_vec()));
        assert_eq!(other.open(sealed.clone()), None);
        let mut flipped = sealed.clone();
        flipped[0] ^= 1;
        assert_eq!(key.open(flipped), None);
        assert_eq!(key.open(sealed[..MAC_LEN - 1].to_vec()), None);
        assert_ne!(key.topic_tag("s"), other.topic_tag("s"));
        assert_ne!(key.topic_tag("s"), key.topic_tag("t"));
        assert_eq!(format!("{key:?}"), "SwarmKey(…)");
    }

    #[test]
    fn short_or_missing_secret_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let short = dir.path().join("short");
        std::fs::write(&short, b"abc").unwrap();
        let e = SwarmKey::from_file(&short).unwrap_err();
        assert!(e.to_string().contains("at least 16"), "{e}");
        let e = SwarmKey::from_file(&dir.path().join("missing")).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
        let good = dir.path().join("good");
        std::fs::write(&good, [7u8; 32]).unwrap();
        assert_eq!(
            SwarmKey::from_file(&good).unwrap(),
            SwarmKey::from_secret(&[7u8; 32])
        );
    }
}
