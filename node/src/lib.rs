//! The p2ptrain peer: networking, local training and the driver that joins them.
//!
//! `protocol` decides; this crate carries out: [`net`] moves bytes between
//! peers, [`train`] runs burn models, [`compute`] keeps them off the async
//! runtime, and [`driver`] connects all three.

pub mod checkpoint;
pub mod cli;
pub mod compression;
pub mod compute;
pub mod config_file;
pub mod driver;
pub mod error_text;
pub mod export;
pub mod identity;
pub mod join_proof;
pub mod log_throttle;
pub mod metrics;
pub mod misbehave;
pub mod net;
pub mod plot;
pub mod progress;
pub mod run_record;
pub mod small_file;
pub mod stage_compute;
pub mod stop;
pub mod testnet;

/// Local training lives in its own crate so it can be optimised even in
/// debug builds; re-exported here under its design name.
pub use p2ptrain_train as train;
pub use p2ptrain_train::task;
