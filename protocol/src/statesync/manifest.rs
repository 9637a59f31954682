//! What a state is made of: its chunks, their digests, and the root that binds them.

use super::{Digest, StateError};
use serde::{Deserialize, Serialize};
use std::ops::Range;

/// Chunk size honest peers cut states into: small enough that a 1 MB model
/// comes from several peers at once, large enough that a 1 GB one needs no
/// more than a few thousand requests.
pub const CHUNK_BYTES: u32 = 256 * 1024;
/// Largest chunk a manifest may declare (bounds every chunk message).
pub const MAX_CHUNK_BYTES: u32 = 4 * 1024 * 1024;
/// Most chunks a manifest may list (bounds the manifest message to 2 MiB of digests).
pub const MAX_CHUNKS: usize = 65_536;

/// Domain separation for [`Manifest::root`], so no other blake3 in the
/// protocol can collide with a manifest root by construction.
const ROOT_DOMAIN: &[u8] = b"p2ptrain/state-manifest/1";

/// The table of contents of one model state: who asks for it by
/// [`Manifest::root`] can check each chunk on its own as it arrives, and the
/// whole state once reassembled.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    /// The averaging round the state is the result of.
    pub round: u64,
    /// Local steps per peer the swarm's run lasts, so a node installing this
    /// state stops at the same round as the swarm.
    pub total_steps: u64,
    /// Length of the state in bytes.
    pub total_bytes: u64,
    /// Bytes per chunk (the last one may be shorter).
    pub chunk_bytes: u32,
    /// blake3 of the whole state's bytes (for a model: the model digest nodes report).
    pub state_digest: Digest,
    /// blake3 of each chunk, in order.
    pub chunks: Vec<Digest>,
}

impl Manifest {
    /// Cuts `bytes` into `chunk_bytes` chunks and digests them.
    pub fn build(round: u64, total_steps: u64, bytes: &[u8], chunk_bytes: u32) -> Manifest {
        let size = chunk_bytes.max(1) as usize;
        Manifest {
            round,
            total_steps,
            total_bytes: bytes.len() as u64,
            chunk_bytes: chunk_bytes.max(1),
            state_digest: *blake3::hash(bytes).as_bytes(),
            chunks: bytes
                .chunks(size)
                .map(|c| *blake3::hash(c).as_bytes())
                .collect(),
        }
    }

    /// The state's identity, which peers announce and vouch for: blake3 over
    /// every field, so a manifest whose root matches a vouched root is that
    /// manifest, and each chunk digest in it is the one the vouchers hold.
    pub fn root(&self) -> Digest {
        let mut h = blake3::Hasher::new();
        h.update(ROOT_DOMAIN);
        h.update(&self.round.to_le_bytes());
        h.update(&self.total_steps.to_le_bytes());
        h.update(&self.total_bytes.to_le_bytes());
        h.update(&self.chunk_bytes.to_le_bytes());
        h.update(&self.state_digest);
        h.update(&(self.chunks.len() as u64).to_le_bytes());
        for c in &self.chunks {
            h.update(c);
        }
        *h.finalize().as_bytes()
    }

    /// Checks that the sizes add up and stay within the limits, so a
    /// manifest from a peer cannot make us allocate or request without bound.
    pub fn validate(&self) -> Result<(), StateError> {
        if self.chunk_bytes == 0 || self.chunk_bytes > MAX_CHUNK_BYTES {
            return Err(StateError::ChunkSize {
                got: self.chunk_bytes,
                max: MAX_CHUNK_BYTES,
            });
        }
        if self.chunks.len() > MAX_CHUNKS {
            return Err(StateError::TooManyChunks {
                got: self.chunks.len(),
                max: MAX_CHUNKS,
            });
        }
        let want = self.total_bytes.div_ceil(u64::from(self.chunk_bytes));
        if want != self.chunks.len() as u64 {
            return Err(StateError::ChunkCount {
                listed: self.chunks.len(),
                total_bytes: self.total_bytes,
                chunk_bytes: self.chunk_bytes,
            });
        }
        Ok(())
    }

    /// Number of chunks.
    pub fn num_chunks(&self) -> u32 {
        self.chunks.len() as u32
    }

    /// Byte range of chunk `index` within the state (empty if out of range).
    pub fn chunk_range(&self, index: u32) -> Range<usize> {
        let size = u64::from(self.chunk_bytes);
        let start = (u64::from(index) * size).min(self.total_bytes);
        let end = (start + size).min(self.total_bytes);
        start as usize..end as usize
    }

    /// Whether `data` is chunk `index` of this state (length and digest).
    pub fn chunk_matches(&self, index: u32, data: &[u8]) -> bool {
        let Some(want) = self.chunks.get(index as usize) else {
            return false;
        };
        data.len() == self.chunk_range(index).len() && blake3::hash(data).as_bytes() == want
    }
}
