//! Checkpoints: a node's parameters and progress on disk, so it can resume.
//!
//! Each checkpoint is one file named after its round and the blake3 hash of
//! its bytes (`ckpt-r00000042-<hash>.bin`), written to a temporary file,
//! synced and renamed into place: a crash mid-write leaves at worst a stray
//! temporary file, never a checkpoint that loads wrongly. Loading verifies the
//! file hash against the name and the parameter digest inside, and falls back
//! to the newest checkpoint that verifies.
//!
//! Format: `P2PTCKPT`, format version (u32 LE), header length (u32 LE), a JSON
//! header, then the parameters as little-endian f32.

use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use tracing::warn;

const MAGIC: &[u8; 8] = b"P2PTCKPT";
const FORMAT_VERSION: u32 = 1;
/// Checkpoints kept per directory; older ones are deleted after a new one lands.
pub const KEEP: usize = 3;
/// Longest JSON header we accept, so a corrupt length cannot make us allocate wildly.
const MAX_HEADER: usize = 64 * 1024;

/// What a checkpoint says about the run, beside the parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// Swarm the parameters belong to.
    pub swarm: String,
    /// Model name, e.g. `mlp`.
    pub model: String,
    /// Last averaging round completed.
    pub round: u64,
    /// Local steps taken.
    pub step: u64,
    /// Samples trained on by this node.
    pub samples: u64,
    /// blake3 of the parameters' little-endian bytes, hex.
    pub params_digest: String,
}

/// A loaded, verified checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// Progress and identity of the run.
    pub meta: CheckpointMeta,
    /// Flat parameters.
    pub params: Vec<f32>,
}

/// Checkpoint failures.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// Reading or writing failed.
    #[error("checkpoint I/O on {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file is not a valid checkpoint.
    #[error("{path} is not a valid checkpoint: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// No checkpoint in the directory verifies.
    #[error("no valid checkpoint in {0}; start without --resume to train from scratch")]
    NoneFound(PathBuf),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Lower-case hex, as digests appear in reports and file names.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn params_bytes(params: &[f32]) -> Vec<u8> {
    params.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// The parameter digest stored in checkpoints and reported by nodes (the
/// protocol's payload digest, in hex), so the two can be compared.
pub fn params_digest(params: &[f32]) -> String {
    hex(&p2ptrain_protocol::tensor::digest_f32(params))
}

fn encode(meta: &CheckpointMeta, params: &[f32]) -> Vec<u8> {
    let header = serde_json::to_vec(meta).expect("checkpoint metadata always serialises");
    let mut out = Vec::with_capacity(16 + header.len() + params.len() * 4);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(&params_bytes(params));
    out
}

fn decode(path: &Path, bytes: &[u8]) -> Result<Checkpoint, CheckpointError> {
    let invalid = |reason: String| CheckpointError::Invalid {
        path: path.to_owned(),
        reason,
    };
    if bytes.len() < 16 || &bytes[..8] != MAGIC {
        return Err(invalid("missing the P2PTCKPT header".into()));
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if version != FORMAT_VERSION {
        return Err(invalid(format!(
            "format version {version}, expected {FORMAT_VERSION}"
        )));
    }
    let header_len = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes")) as usize;
    if header_len > MAX_HEADER || 16 + header_len > bytes.len() {
        return Err(invalid(format!(
            "header length {header_len} does not fit the file"
        )));
    }
    let meta: CheckpointMeta = serde_json::from_slice(&bytes[16..16 + header_len])
        .map_err(|e| invalid(format!("header: {e}")))?;
    let body = &bytes[16 + header_len..];
    if !body.len().is_multiple_of(4) {
        return Err(invalid(format!(
            "parameter section of {} bytes is not whole f32s",
            body.len()
        )));
    }
    let params: Vec<f32> = body
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect();
    if params_digest(&params) != meta.params_digest {
        return Err(invalid("parameter digest does not match the header".into()));
    }
    if let Some(i) = params.iter().position(|v| !v.is_finite()) {
        return Err(invalid(format!("parameter {i} is not finite")));
    }
    Ok(Checkpoint { meta, params })
}

/// Writes a checkpoint into `dir` atomically and prunes old ones; returns its path.
pub fn save(dir: &Path, meta: &CheckpointMeta, params: &[f32]) -> Result<PathBuf, CheckpointError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let bytes = encode(meta, params);
    let hash = blake3::hash(&bytes);
    let name = format!(
        "ckpt-r{:08}-{}.bin",
        meta.round,
        &hex(hash.as_bytes())[..32]
    );
    let path = dir.join(&name);
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut f = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(&bytes).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
    }
    std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
    // Make the rename itself durable.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    prune(dir, KEEP);
    Ok(path)
}

/// Checkpoint files in `dir`, newest round first.
fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>, CheckpointError> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let path = entry.map_err(io_err(dir))?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(rest) = name
            .strip_prefix("ckpt-r")
            .and_then(|r| r.strip_suffix(".bin"))
        else {
            continue;
        };
        if let Some(round) = rest.split('-').next().and_then(|r| r.parse::<u64>().ok()) {
            found.push((round, path));
        }
    }
    found.sort_by(|a, b| b.cmp(a));
    Ok(found)
}

fn prune(dir: &Path, keep: usize) {
    if let Ok(found) = list(dir) {
        for (_, old) in found.into_iter().skip(keep) {
            if let Err(e) = std::fs::remove_file(&old) {
                warn!(path = %old.display(), error = %e, "cannot delete an old checkpoint");
            }
        }
    }
}

/// Reads and verifies one checkpoint file (its hash must match its name).
pub fn load_file(path: &Path) -> Result<Checkpoint, CheckpointError> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let want = name
        .strip_suffix(".bin")
        .and_then(|n| n.rsplit('-').next())
        .unwrap_or_default();
    let got = hex(blake3::hash(&bytes).as_bytes());
    if want.is_empty() || !got.starts_with(want) {
        return Err(CheckpointError::Invalid {
            path: path.to_owned(),
            reason: "content hash does not match the file name (truncated or altered)".into(),
        });
    }
    decode(path, &bytes)
}

/// The newest checkpoint in `dir` that verifies; bad ones are skipped with a warning.
pub fn load_latest(dir: &Path) -> Result<Checkpoint, CheckpointError> {
    for (_, path) in list(dir)? {
        match load_file(&path) {
            Ok(c) => return Ok(c),
            Err(e) => warn!(error = %e, "skipping checkpoint"),
        }
    }
    Err(CheckpointError::NoneFound(dir.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(round: u64, params: &[f32]) -> CheckpointMeta {
        CheckpointMeta {
            swarm: "s".into(),
            model: "mlp".into(),
            round,
            step: round * 10,
            samples: round * 640,
            params_digest: params_digest(params),
        }
    }

    #[test]
    fn round_trip_and_newest_wins() {
        let dir = tempfile::tempdir().unwrap();
        for r in 1..=5u64 {
            let p = vec![r as f32; 100];
            save(dir.path(), &meta(r, &p), &p).unwrap();
        }
        let c = load_latest(dir.path()).unwrap();
        assert_eq!(c.meta.round, 5);
        assert_eq!(c.params, vec![5.0; 100]);
        // Only the newest KEEP survive.
        assert_eq!(list(dir.path()).unwrap().len(), KEEP);
    }

    #[test]
    fn corrupt_or_truncated_newest_falls_back_to_last_good() {
        let dir = tempfile::tempdir().unwrap();
        let good = vec![1.5f32; 64];
        save(dir.path(), &meta(1, &good), &good).unwrap();
        let newer = vec![2.5f32; 64];
        let path = save(dir.path(), &meta(2, &newer), &newer).unwrap();
        // A kill mid-write can leave only a temporary file: ignored.
        std::fs::write(dir.path().join(".ckpt-r00000003-ab.bin.tmp"), b"P2PT").unwrap();
        // Flip one byte of the newest checkpoint.
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let c = load_latest(dir.path()).unwrap();
        assert_eq!(c.meta.round, 1);
        assert_eq!(c.params, good);
        // Truncate it instead: same result.
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        assert_eq!(load_latest(dir.path()).unwrap().meta.round, 1);
    }

    #[test]
    fn forged_file_with_matching_name_is_still_checked_inside() {
        let dir = tempfile::tempdir().unwrap();
        let p = vec![1.0f32; 8];
        let mut m = meta(7, &p);
        m.params_digest = "00".repeat(32);
        let bytes = encode(&m, &p);
        let name = format!(
            "ckpt-r00000007-{}.bin",
            &hex(blake3::hash(&bytes).as_bytes())[..32]
        );
        std::fs::write(dir.path().join(name), bytes).unwrap();
        let err = load_latest(dir.path()).unwrap_err();
        assert!(matches!(err, CheckpointError::NoneFound(_)), "{err}");
    }

    #[test]
    fn empty_directory_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_latest(dir.path()).unwrap_err().to_string();
        assert!(err.contains("no valid checkpoint"), "{err}");
    }
}
