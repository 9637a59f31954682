//! The swarm secret: a key every member holds, so outsiders can neither
//! join the swarm's gossip topic nor slip messages into it.
//!
//! The key names the topic (a peer without it subscribes to another topic),
//! a peer becomes a member only once it has sent a membership proof (a MAC
//! over both peer ids: copying the topic name off a member's subscriptions
//! is not enough), and every message carries a blake3 keyed MAC of its
//! bytes, checked before anything parses them. It keeps out peers
//! that do not hold the secret; it does not stop a member from replaying or
//! lying (that is robust aggregation's job).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};

/// Bytes of the MAC appended to every sealed message.
pub const MAC_LEN: usize = 32;
/// Opens a membership proof on the direct channel (a sealed wire message
/// never starts so: wire messages start with their own version header).
const PROOF_TAG: &[u8; 16] = b"p2ptrain-member1";
/// Bytes of a membership proof frame.
pub const PROOF_LEN: usize = PROOF_TAG.len() + MAC_LEN;
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
    // The advice names a new file rather than `path`: the short file may be
    // something else given by mistake, and must not be overwritten.
    #[error("the swarm secret {} holds {got} bytes; a secret needs at least {MIN_SECRET_BYTES} random bytes: make one with `head -c 32 /dev/urandom > swarm.secret`, copy it to every member, and pass --secret-file swarm.secret", path.display())]
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
        let limit = crate::small_file::SMALL_FILE_LIMIT;
        let bytes = crate::small_file::read_capped(path, limit, "a swarm secret file").map_err(
            |source| SecretError::Io {
                path: path.to_path_buf(),
                source,
            },
        )?;
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

    /// The frame by which `prover` shows `verifier` that it holds the key.
    /// It binds both peer ids, which the transport authenticates, so it is
    /// useless to anyone but `prover`, and only towards `verifier`: a peer
    /// that read a member's topic name off its subscriptions cannot pass.
    pub fn membership_proof(&self, prover: &[u8], verifier: &[u8]) -> Vec<u8> {
        let mut frame = PROOF_TAG.to_vec();
        frame.extend_from_slice(self.proof_mac(prover, verifier).as_bytes());
        frame
    }

    /// `None` if `frame` is no membership proof (an ordinary message);
    /// otherwise whether it proves that `prover` holds the key.
    pub fn check_membership_proof(
        &self,
        frame: &[u8],
        prover: &[u8],
        verifier: &[u8],
    ) -> Option<bool> {
        if frame.len() != PROOF_LEN || !frame.starts_with(PROOF_TAG) {
            return None;
        }
        let mac: [u8; MAC_LEN] = frame[PROOF_TAG.len()..].try_into().ok()?;
        // blake3::Hash compares in constant time.
        Some(self.proof_mac(prover, verifier) == blake3::Hash::from(mac))
    }

    fn proof_mac(&self, prover: &[u8], verifier: &[u8]) -> blake3::Hash {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(b"membership proof");
        for id in [prover, verifier] {
            h.update(&(id.len() as u64).to_le_bytes());
            h.update(id);
        }
        h.finalize()
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

/// A frame, shared between the sends that carry it.
type Frame = Arc<Vec<u8>>;
/// A frame remembered without keeping it alive.
type Remembered = Weak<Vec<u8>>;

/// Seals outgoing direct frames: a frame sent to several peers (a reduced
/// part goes to every member of the group) is sealed, and copied, once.
#[derive(Debug)]
pub struct Sealer {
    key: SwarmKey,
    /// The last frame sealed while shared, and its sealed copy. Both weak:
    /// the copy lives only as long as the sends that carry it, and the
    /// frame's address cannot go to another frame while it is remembered.
    last: Option<(Remembered, Remembered)>,
}

impl Sealer {
    /// Seals with `key`.
    pub fn new(key: SwarmKey) -> Sealer {
        Sealer { key, last: None }
    }

    /// `frame` with its MAC appended: in place when no one else holds the
    /// frame, else a sealed copy made once while any send still carries it.
    pub fn seal(&mut self, frame: Frame) -> Frame {
        if let Some((plain, sealed)) = &self.last {
            if plain.as_ptr() == Arc::as_ptr(&frame) {
                if let Some(sealed) = sealed.upgrade() {
                    return sealed;
                }
            }
        }
        match Arc::try_unwrap(frame) {
            Ok(frame) => Arc::new(self.key.seal(frame)),
            Err(shared) => {
                let mut copy = Vec::with_capacity(shared.len() + MAC_LEN);
                copy.extend_from_slice(&shared);
                let sealed = Arc::new(self.key.seal(copy));
                self.last = Some((Arc::downgrade(&shared), Arc::downgrade(&sealed)));
                sealed
            }
        }
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
    fn a_frame_for_several_peers_is_sealed_once_and_a_lone_one_in_place() {
        let key = SwarmKey::from_secret(b"correct horse battery staple");
        let mut sealer = Sealer::new(key.clone());
        let frame = Arc::new(vec![9u8; 1000]);
        let first = sealer.seal(frame.clone());
        let second = sealer.seal(frame.clone());
        assert!(Arc::ptr_eq(&first, &second), "sealed once for both peers");
        assert_eq!(key.open(first.as_ref().clone()), Some(vec![9u8; 1000]));
        // Nothing keeps the sealed copy once its sends are done: a later
        // send of the same frame seals it again.
        let weak = Arc::downgrade(&first);
        drop((first, second));
        assert!(weak.upgrade().is_none());
        let first = sealer.seal(frame.clone());
        assert_eq!(key.open(first.as_ref().clone()), Some(vec![9u8; 1000]));
        // Another frame with the same bytes is sealed anew.
        let other = Arc::new(vec![9u8; 1000]);
        let third = sealer.seal(other.clone());
        assert!(!Arc::ptr_eq(&first, &third));
        assert_eq!(first, third);
        // The original frame's address stays taken while remembered, so a
        // later frame can never be mistaken for it.
        drop((frame, other));
        let mut lone = Vec::with_capacity(64 + MAC_LEN);
        lone.extend_from_slice(b"alone");
        let at = lone.as_ptr();
        let sealed = sealer.seal(Arc::new(lone));
        assert_eq!(
            sealed.as_ptr(),
            at,
            "a frame no one shares is sealed in place"
        );
        assert_eq!(key.open(sealed.as_ref().clone()), Some(b"alone".to_vec()));
    }

    #[test]
    fn membership_proofs_bind_the_key_and_both_peers() {
        let key = SwarmKey::from_secret(b"correct horse battery staple");
        let other = SwarmKey::from_secret(b"another secret of enough bytes");
        let (a, b, c) = (
            b"peer-a".as_slice(),
            b"peer-b".as_slice(),
            b"peer-c".as_slice(),
        );
        let proof = key.membership_proof(a, b);
        assert_eq!(proof.len(), PROOF_LEN);
        assert_eq!(key.check_membership_proof(&proof, a, b), Some(true));
        // Another key, a replay by another peer, or towards another verifier fails.
        assert_eq!(other.check_membership_proof(&proof, a, b), Some(false));
        assert_eq!(key.check_membership_proof(&proof, c, b), Some(false));
        assert_eq!(key.check_membership_proof(&proof, a, c), Some(false));
        assert_eq!(key.check_membership_proof(&proof, b, a), Some(false));
        let mut flipped = proof.clone();
        flipped[PROOF_LEN - 1] ^= 1;
        assert_eq!(key.check_membership_proof(&flipped, a, b), Some(false));
        // Ordinary sealed messages are not proofs.
        assert_eq!(
            key.check_membership_proof(&key.seal(vec![1; 16]), a, b),
            None
        );
        assert_eq!(
            key.check_membership_proof(&proof[..PROOF_LEN - 1], a, b),
            None
        );
    }

    #[test]
    fn short_or_missing_secret_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let short = dir.path().join("short");
        std::fs::write(&short, b"abc").unwrap();
        let e = SwarmKey::from_file(&short).unwrap_err();
        assert!(e.to_string().contains("at least 16"), "{e}");
        // It names the file, and never advises overwriting it.
        assert!(e.to_string().contains(&*short.to_string_lossy()), "{e}");
        assert!(
            !e.to_string().contains(&format!("> {}", short.display())),
            "{e}"
        );
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
