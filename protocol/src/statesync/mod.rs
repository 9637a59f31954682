//! State transfer: how a late joiner or a restarted peer gets the swarm's model.
//!
//! - [`Manifest`]: a state cut into fixed-size chunks, each with its node of
//!   the state's blake3 tree, bound together by one root digest.
//! - [`Vouches`]: peers gossip a [`Claim`] (round, root) after every round;
//!   the joiner downloads the state most peers vouch for at the newest round.
//! - [`Download`]: a sans-IO state machine that fetches the manifest, then the
//!   chunks in parallel from every holder, checks each chunk against the
//!   manifest, and avoids peers that serve bad chunks or stall; the chunk
//!   digests make up the state digest, so checked chunks are the whole state.
//! - [`ServeBudget`]: how many chunks one peer may ask a server for.
//!
//! Nothing here does I/O or reads a clock; `node` carries out the requests.

mod budget;
mod download;
mod manifest;
mod vouch;

#[cfg(test)]
mod tests;

pub use budget::ServeBudget;
pub use download::{
    Download, DownloadAction, DownloadConfig, DownloadError, DownloadEvent, Downloaded, Fault,
};
pub use manifest::{Manifest, CHUNK_BYTES, MAX_CHUNKS, MAX_CHUNK_BYTES, MIN_CHUNK_BYTES};
pub use vouch::{Choice, Claim, Vouches};

/// A blake3 digest.
pub type Digest = [u8; 32];

/// A manifest or state-transfer message that no honest peer sends.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// A chunk size that is not a power of two from [`MIN_CHUNK_BYTES`] to [`MAX_CHUNK_BYTES`].
    #[error("chunk size {got} bytes is not a power of two from {min} to {max}")]
    ChunkSize {
        /// The declared size.
        got: u32,
        /// The smallest size.
        min: u32,
        /// The largest size.
        max: u32,
    },
    /// Chunk digests that do not combine into the declared state digest.
    #[error("the chunk digests do not make up the declared state digest")]
    StateDigest,
    /// More chunks than [`MAX_CHUNKS`].
    #[error("{got} chunks exceed the maximum of {max}")]
    TooManyChunks {
        /// The count.
        got: usize,
        /// The limit.
        max: usize,
    },
    /// The chunk list does not cover `total_bytes` in `chunk_bytes` pieces.
    #[error("{listed} chunk digests do not fit {total_bytes} bytes in chunks of {chunk_bytes}")]
    ChunkCount {
        /// Digests listed.
        listed: usize,
        /// The state's length.
        total_bytes: u64,
        /// The chunk size.
        chunk_bytes: u32,
    },
    /// A chunk index no manifest can have.
    #[error("chunk index {index} is beyond the maximum of {max} chunks")]
    ChunkIndex {
        /// The index.
        index: u32,
        /// The limit.
        max: usize,
    },
    /// A chunk longer than any manifest allows.
    #[error("chunk of {len} bytes exceeds the {max}-byte limit")]
    ChunkTooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: u32,
    },
    /// A claim for round 0 (no state is the result of round 0).
    #[error("a state claim must name a round of at least 1")]
    RoundZero,
}
