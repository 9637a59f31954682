//! Sans-IO, deterministic protocol core of p2ptrain.
//!
//! Everything peers say to each other and every decision they take from it lives here, with no
//! I/O, no clock and no global randomness: time arrives as a `now: Duration` argument and
//! randomness as seeds. That keeps the protocol reproducible, so it can be tested in the
//! [`sim`] swarm simulator by seed, and lets the `node` crate drive it from any runtime, the
//! way quinn drives `quinn-proto`.
//!
//! - [`id`]: peer identities ([`NodeId`]).
//! - [`rng`]: the small seeded PRNG every randomised decision uses.
//! - [`tensor`]: flat payloads with blake3 digests, their compression codecs (f16/bf16,
//!   blockwise int8, top-k with error feedback), and how vectors are split into parts.
//! - [`wire`]: the versioned, size-limited, validating codec for every message.
//! - [`shards`]: which peer trains on which sample (rendezvous hashing).
//! - [`averaging`]: one averaging round: matchmaking and a butterfly all-reduce.
//! - [`outer`]: DiLoCo's outer optimizer (Nesterov SGD on averaged pseudo-gradients).
//! - [`stages`]: which peer holds which pipeline stage (balanced by throughput, stable under churn).
//! - [`pipe`]: messages of pipeline (model-parallel) training.
//! - [`statesync`]: how a joiner downloads the state the swarm vouches for, in verified chunks from several peers.
//! - [`swarm_round`]: the round the swarm has reached, which no single member can move alone.
//! - [`sim`]: a deterministic swarm simulator that drives many [`averaging::Averager`]s.

pub mod averaging;
pub mod id;
pub mod outer;
pub mod pipe;
pub mod rng;
pub mod shards;
pub mod sim;
pub mod stages;
pub mod statesync;
pub mod swarm_round;
pub mod tensor;
pub mod wire;

pub use id::NodeId;
