//! What a state is made of: its chunks, their digests, and the root that binds them.
//!
//! A chunk's digest is its node in the state's own blake3 tree (the chaining value of the
//! subtree it is; for a state of one chunk, the state's blake3): the state digest follows
//! from the chunk digests, so a node serving its model hashes it once, not once whole and
//! once per chunk, and a joiner that checked every chunk has checked the whole state.

use super::{Digest, StateError};
use blake3::hazmat::{merge_subtrees_non_root, merge_subtrees_root, HasherExt, Mode};
use serde::{Deserialize, Serialize};
use std::ops::Range;

/// Chunk size honest peers cut states into: small enough that a 1 MB model
/// comes from several peers at once, large enough that a 1 GB one needs no
/// more than a few thousand requests.
pub const CHUNK_BYTES: u32 = 256 * 1024;
/// Largest chunk a manifest may declare (bounds every chunk message).
pub const MAX_CHUNK_BYTES: u32 = 4 * 1024 * 1024;
/// Smallest chunk a manifest may declare: blake3's own chunk. Chunk sizes are powers of
/// two from here to [`MAX_CHUNK_BYTES`], so every chunk is a subtree of the blake3 tree.
pub const MIN_CHUNK_BYTES: u32 = blake3::CHUNK_LEN as u32;
/// Most chunks a manifest may list (bounds the manifest message to 2 MiB of digests).
pub const MAX_CHUNKS: usize = 65_536;

/// Domain separation for [`Manifest::root`], so no other blake3 in the
/// protocol can collide with a manifest root by construction.
const ROOT_DOMAIN: &[u8] = b"p2ptrain/state-manifest/1";

/// The table of contents of one model state: who asks for it by
/// [`Manifest::root`] can check each chunk on its own as it arrives, and,
/// once [`Manifest::check_digests`] passed, every chunk matching means the
/// whole state does.
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
    /// Each chunk's node in the state's blake3 tree, in order (see the module docs).
    pub chunks: Vec<Digest>,
}

impl Manifest {
    /// Cuts `bytes` into chunks of `chunk_bytes` (rounded up to a power of two from
    /// [`MIN_CHUNK_BYTES`] to [`MAX_CHUNK_BYTES`]) and digests them, in one pass.
    pub fn build(round: u64, total_steps: u64, bytes: &[u8], chunk_bytes: u32) -> Manifest {
        let chunk_bytes = chunk_bytes
            .clamp(MIN_CHUNK_BYTES, MAX_CHUNK_BYTES)
            .next_power_of_two();
        let count = bytes.len().div_ceil(chunk_bytes as usize);
        let chunks: Vec<Digest> = bytes
            .chunks(chunk_bytes as usize)
            .enumerate()
            .map(|(index, data)| chunk_digest(count, chunk_bytes, index as u64, data))
            .collect();
        Manifest {
            round,
            total_steps,
            total_bytes: bytes.len() as u64,
            chunk_bytes,
            state_digest: state_digest_of(&chunks),
            chunks,
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
    /// manifest from a peer cannot make us allocate or request without bound. Cheap:
    /// it runs on every manifest message received; [`Manifest::check_digests`] is the
    /// hashing half, for the manifest a node is about to download by.
    pub fn validate(&self) -> Result<(), StateError> {
        if !chunk_size_is_valid(self.chunk_bytes) {
            return Err(StateError::ChunkSize {
                got: self.chunk_bytes,
                min: MIN_CHUNK_BYTES,
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

    /// Checks that the chunk digests make up the state digest, so chunks that match
    /// them are the state the digest names (one blake3 compression per chunk).
    pub fn check_digests(&self) -> Result<(), StateError> {
        if state_digest_of(&self.chunks) == self.state_digest {
            Ok(())
        } else {
            Err(StateError::StateDigest)
        }
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
        chunk_size_is_valid(self.chunk_bytes)
            && !data.is_empty()
            && data.len() == self.chunk_range(index).len()
            && chunk_digest(self.chunks.len(), self.chunk_bytes, u64::from(index), data) == *want
    }
}

/// A power of two from [`MIN_CHUNK_BYTES`] to [`MAX_CHUNK_BYTES`]: what makes every chunk
/// a subtree of the blake3 tree (and the hashing below panic-free).
fn chunk_size_is_valid(chunk_bytes: u32) -> bool {
    (MIN_CHUNK_BYTES..=MAX_CHUNK_BYTES).contains(&chunk_bytes) && chunk_bytes.is_power_of_two()
}

/// The digest of chunk `index` (non-empty, at most `chunk_bytes`, a valid size) of a state
/// of `count` chunks: the state's blake3 if it is the only chunk, else the chaining value
/// of the subtree it is.
fn chunk_digest(count: usize, chunk_bytes: u32, index: u64, data: &[u8]) -> Digest {
    if count == 1 {
        return *blake3::hash(data).as_bytes();
    }
    blake3::Hasher::new()
        .set_input_offset(index * u64::from(chunk_bytes))
        .update(data)
        .finalize_non_root()
}

/// blake3 of the state whose chunk digests are `chunks` (equal-sized chunks but the last),
/// merged as blake3's tree does: the left subtree holds the largest power of two of chunks
/// short of all of them.
fn state_digest_of(chunks: &[Digest]) -> Digest {
    match chunks {
        [] => *blake3::hash(&[]).as_bytes(),
        [only] => *only,
        _ => {
            let (left, right) = chunks.split_at(left_chunks(chunks.len()));
            *merge_subtrees_root(&subtree(left), &subtree(right), Mode::Hash).as_bytes()
        }
    }
}

/// The chaining value of the subtree made of these (at least one) chunks.
fn subtree(chunks: &[Digest]) -> Digest {
    match chunks {
        [] => [0; 32], // never asked for: both halves of a split hold a chunk
        [only] => *only,
        _ => {
            let (left, right) = chunks.split_at(left_chunks(chunks.len()));
            merge_subtrees_non_root(&subtree(left), &subtree(right), Mode::Hash)
        }
    }
}

/// Chunks in the left subtree of `count >= 2`: the largest power of two below `count`.
fn left_chunks(count: usize) -> usize {
    count.next_power_of_two() / 2
}
