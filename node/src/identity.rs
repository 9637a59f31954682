//! The node's identity key, kept across restarts so its peer id is stable.

use libp2p::identity::Keypair;
use libp2p::PeerId;
use p2ptrain_protocol::NodeId;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Problems with the key file.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The file exists but cannot be read.
    #[error("cannot read key file {path}: {source}")]
    Read {
        /// The key file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file does not hold a libp2p key.
    #[error("key file {path} is not a p2ptrain/libp2p identity key ({reason}); move it away to create a new identity")]
    Decode {
        /// The key file.
        path: PathBuf,
        /// Why decoding failed.
        reason: String,
    },
    /// A new key cannot be written.
    #[error("cannot write key file {path}: {source}")]
    Write {
        /// The key file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// The protocol's id of `peer`: the smallest id among a round's joiners
/// leads its averaging group, and ids order each group's members.
pub fn node_id_of(peer: &PeerId) -> NodeId {
    NodeId::from_key_bytes(&peer.to_bytes())
}

/// Loads the key at `path`, or creates one there if the file does not exist.
///
/// A new key is written to a temporary file of its own and linked into
/// place only if nothing is there yet, so an interrupted start never leaves
/// a truncated key behind, no other file is touched, and of two nodes
/// starting on one key file at once both end with the one key written.
pub fn load_or_create(path: &Path) -> Result<Keypair, IdentityError> {
    match read_key(path) {
        Ok(bytes) => decode(path, &bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = Keypair::generate_ed25519();
            let bytes = key
                .to_protobuf_encoding()
                .expect("ed25519 keys always encode");
            let write_error = |source| IdentityError::Write {
                path: path.to_owned(),
                source,
            };
            match create_new(path, &bytes) {
                Ok(()) => Ok(key),
                // Another process created it first: use its key.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    match read_key(path) {
                        Ok(bytes) => decode(path, &bytes),
                        // Something is there that cannot be read: a link to
                        // nowhere, left as it is.
                        Err(_) => Err(write_error(e)),
                    }
                }
                Err(e) => Err(write_error(e)),
            }
        }
        Err(source) => Err(IdentityError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

/// A key file's bytes (a key is under 100 bytes; a larger file is not one).
fn read_key(path: &Path) -> std::io::Result<Vec<u8>> {
    crate::small_file::read_capped(path, 4096, "a p2ptrain key file")
}

fn decode(path: &Path, bytes: &[u8]) -> Result<Keypair, IdentityError> {
    let error = |reason: String| IdentityError::Decode {
        path: path.to_owned(),
        reason,
    };
    if bytes.is_empty() {
        return Err(error("the file is empty".into()));
    }
    Keypair::from_protobuf_encoding(bytes).map_err(|e| error(e.to_string()))
}

/// Writes `bytes` to `path` unless something already exists there (then
/// `AlreadyExists`, and `path` is untouched).
fn create_new(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    // Unique to this process and call: never a file someone else has.
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{}-{call}.tmp", std::process::id()));
    let tmp = path.with_file_name(name);
    let written = (|| {
        let mut opts = std::fs::OpenOptions::new();
        // A fresh file, private from its creation.
        opts.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = opts.open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        // A hard link fails if `path` exists, where a rename would replace it.
        match std::fs::hard_link(&tmp, path) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                // A file system without hard links: rename, if still free.
                if path.symlink_metadata().is_ok() {
                    return Err(std::io::ErrorKind::AlreadyExists.into());
                }
                std::fs::rename(&tmp, path)
            }
            linked => linked,
        }
    })();
    let _ = std::fs::remove_file(&tmp);
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/node.key");
        let a = load_or_create(&path).unwrap();
        let b = load_or_create(&path).unwrap();
        assert_eq!(a.public().to_peer_id(), b.public().to_peer_id());
    }

    #[test]
    fn garbage_key_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        std::fs::write(&path, b"not a key").unwrap();
        let err = load_or_create(&path).unwrap_err().to_string();
        assert!(
            err.contains("is not a p2ptrain/libp2p identity key"),
            "{err}"
        );
        // The bad file is left untouched: we never destroy a user's data.
        assert_eq!(std::fs::read(&path).unwrap(), b"not a key");
    }

    #[test]
    fn an_empty_key_file_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        std::fs::write(&path, b"").unwrap();
        let err = load_or_create(&path).unwrap_err().to_string();
        assert!(err.contains("the file is empty"), "{err}");
    }

    #[test]
    fn creating_a_key_touches_no_other_file() {
        let dir = tempfile::tempdir().unwrap();
        // `node.key`'s old temporary name, holding something of the user's.
        let notes = dir.path().join("node.tmp");
        std::fs::write(&notes, b"my notes").unwrap();
        let path = dir.path().join("node.key");
        load_or_create(&path).unwrap();
        assert_eq!(std::fs::read(&notes).unwrap(), b"my notes");
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["node.key", "node.tmp"]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn nodes_creating_one_key_at_once_all_get_the_written_one() {
        for _ in 0..10 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("race.key");
            let ids: Vec<_> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..4)
                    .map(|_| s.spawn(|| load_or_create(&path).unwrap().public().to_peer_id()))
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let on_disk = load_or_create(&path).unwrap().public().to_peer_id();
            assert!(ids.iter().all(|id| *id == on_disk), "{ids:?} vs {on_disk}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn a_link_to_nowhere_is_left_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        std::os::unix::fs::symlink(dir.path().join("missing.key"), &path).unwrap();
        let err = load_or_create(&path).unwrap_err().to_string();
        assert!(err.contains("cannot write key file"), "{err}");
        assert!(std::fs::read_link(&path).is_ok(), "the link was replaced");
    }
}
