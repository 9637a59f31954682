//! `p2ptrain-bench`: the Rust side of the benchmark harness in `bench/`.
//!
//! Every subcommand prints one JSON object per line on stdout (the figures),
//! and human-readable notes on stderr. `bench/run.sh` runs them next to the
//! PyTorch and hivemind counterparts in `bench/py/` and compares the figures
//! measured in the same run.
//!
//! - `step`: local step speed of the MNIST MLP through `p2ptrain-train`.
//! - `allreduce`: averaging rounds of a synthetic vector among N local node
//!   processes, through the real driver, network stack and averager
//!   (`avg-node` is one of those processes).
//! - `codec`: the CPU cost of one all-reduce part in our wire path.
//! - `quinn`: the same traffic pattern over raw quinn streams with the TLS
//!   setup libp2p uses, as the transport's bound (`quinn-node` is one process).
//! - `testnet` and `node`: `p2ptrain`'s own commands, unchanged (this binary
//!   hands them to `p2ptrain_node::cli`), so the training comparison runs
//!   p2ptrain built in the same optimised profile as the other benchmarks.

#[cfg(feature = "swarm")]
mod avg;
mod codec;
mod quic;
mod step;
mod util;

use clap::{Parser, Subcommand};

/// Command line of `p2ptrain-bench`.
#[derive(Debug, Parser)]
#[command(
    name = "p2ptrain-bench",
    about = "p2ptrain benchmarks (JSON lines on stdout)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Time forward + backward + Adam steps of the MNIST MLP on the CPU.
    Step(step::StepArgs),
    /// Time the phases of the MLP step (forward, backward, Adam) and its matrix products alone.
    StepBreakdown(step::StepArgs),
    /// Time averaging rounds among N local node processes.
    #[cfg(feature = "swarm")]
    Allreduce(avg::AllreduceArgs),
    /// One node process of `allreduce` (started by it).
    #[cfg(feature = "swarm")]
    AvgNode(avg::AvgNodeArgs),
    /// Time the CPU stages one all-reduce part goes through (codec, digest, wire format).
    Codec(codec::CodecArgs),
    /// Time the all-reduce traffic pattern over raw quinn among N processes.
    Quinn(quic::QuinnArgs),
    /// One process of `quinn` (started by it).
    QuinnNode(quic::QuinnNodeArgs),
}

fn main() -> anyhow::Result<()> {
    // Every subcommand, the raw-quinn bound included, runs with the heap
    // settings of the `p2ptrain` binary, so the comparisons stay like for like.
    p2ptrain_heap::keep_large_buffers();
    // `testnet` starts `node` processes from this same executable.
    #[cfg(feature = "swarm")]
    if matches!(
        std::env::args().nth(1).as_deref(),
        Some("testnet" | "node" | "id")
    ) {
        let code = p2ptrain_node::cli::main_entry();
        return if code == std::process::ExitCode::SUCCESS {
            Ok(())
        } else {
            std::process::exit(1)
        };
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    match Cli::parse().command {
        Command::Step(a) => step::run(&a),
        Command::StepBreakdown(a) => step::breakdown(&a),
        #[cfg(feature = "swarm")]
        Command::Allreduce(a) => runtime()?.block_on(avg::run(a)),
        #[cfg(feature = "swarm")]
        Command::AvgNode(a) => runtime()?.block_on(avg::run_node(a)),
        Command::Codec(a) => codec::run(&a),
        Command::Quinn(a) => runtime()?.block_on(quic::run(a)),
        Command::QuinnNode(a) => runtime()?.block_on(quic::run_node(a)),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}
