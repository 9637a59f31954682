//! Command-line interface: flag definitions and the binary's entry point.
//!
//! This is the binary's edge, so errors become `anyhow` here and are printed
//! as one line naming the problem.

use crate::checkpoint::CheckpointError;
use crate::compression::Compression;
use crate::driver::{self, Budget, NodeConfig, NodeEvent, PipelineConfig, Schedule};
use crate::error_text::error_text;
use crate::net::settings::RunSettings;
use crate::net::{peer_id_of, NetConfig};
use crate::stage_compute::StageFactory;
use crate::testnet;
use crate::train::backend::{build_mnist_task, DeviceKind, TaskSpec};
use crate::train::data::MnistData;
use crate::train::lm::text::TextData;
use crate::train::lm::{build_stage, CharLmConfig};
use crate::train::model::ModelKind;
use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use libp2p::multiaddr::Protocol;
use libp2p::Multiaddr;
use p2ptrain_protocol::averaging::{Aggregation, AveragingConfig};
use p2ptrain_protocol::outer::OuterConfig;
use p2ptrain_protocol::wire;
use std::ffi::OsString;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// p2ptrain: train one model together on many volunteer machines.
#[derive(Debug, Parser)]
#[command(name = "p2ptrain", version, about, long_about = None)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Log output formats.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
// Parsed once per process: the node variant's size costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Join (or start) a swarm and train on this machine.
    Node(NodeArgs),
    /// Start N nodes as local processes on loopback, train, and print a JSON summary.
    Testnet(TestnetArgs),
    /// Print the peer id of a key file, creating the key if it does not exist.
    Id(IdArgs),
    /// Generate text with a trained char-lm, put together from its stages' checkpoints.
    Sample(SampleArgs),
    /// Draw a run's loss and accuracy curves (per node and averaged) to a PNG.
    Plot(PlotArgs),
    /// Write a checkpoint's weights to a safetensors file PyTorch can load.
    Export(ExportArgs),
    /// Config files for `node --config`.
    Config(ConfigArgs),
}

/// Flags of `p2ptrain config`.
#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: ConfigAction,
}

/// `p2ptrain config` actions.
#[derive(Debug, Subcommand)]
pub enum ConfigAction {
    /// Print a commented example config with every node flag at its default.
    Example,
}

/// Flags of `p2ptrain export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// A checkpoint file, or a checkpoint directory (its newest checkpoint of
    /// the run that wrote last into it is taken): an mlp or cnn checkpoint, or
    /// one char-lm pipeline stage's.
    #[arg(value_name = "CHECKPOINT")]
    pub checkpoint: PathBuf,
    /// The safetensors file to write. Tensors are named like the PyTorch
    /// modules (`fc1.weight`, `fc1.bias`, ...), Linear weights are
    /// `[out, in]` as in torch.nn.Linear, and LayerNorm's gamma/beta are
    /// `weight`/`bias`.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Replace FILE if it exists.
    #[arg(long)]
    pub force: bool,
}

/// Flags of `p2ptrain plot`.
#[derive(Debug, Args)]
pub struct PlotArgs {
    /// Run directory: one written by `node --run-dir`, or a testnet's, whose
    /// subdirectories hold one node's records each.
    #[arg(value_name = "RUN_DIR")]
    pub run_dir: PathBuf,
    /// Where to write the PNG (default: RUN_DIR/loss.png). A plot drawn
    /// before is replaced; any other file there only with --force.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Replace the --out file even if it is not a PNG.
    #[arg(long)]
    pub force: bool,
}

/// Flags of `p2ptrain sample`.
#[derive(Debug, Args)]
pub struct SampleArgs {
    /// Directories searched (with their subdirectories) for char-lm stage
    /// checkpoints, as written by `node --checkpoint-dir` or
    /// `testnet --checkpoint-dir`; one checkpoint per stage is needed.
    #[arg(long = "from", value_name = "DIR", required = true)]
    pub from: Vec<PathBuf>,
    /// Text the generated characters continue.
    #[arg(long, default_value = "It is a truth universally acknowledged")]
    pub prompt: String,
    /// Bytes to generate.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=100_000), allow_negative_numbers = true)]
    pub chars: u64,
    /// Sampling temperature: lower is more conservative.
    #[arg(long, default_value_t = 0.8, value_parser = parse_temperature, allow_negative_numbers = true)]
    pub temperature: f64,
    /// Seed of the sampling.
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    pub seed: u64,
}

fn parse_temperature(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("`{s}` is not a number"))?;
    if v.is_finite() && v > 0.0 && v <= 10.0 {
        Ok(v)
    } else {
        Err(format!("temperature must be in (0, 10], got {v}"))
    }
}

/// Flags of `p2ptrain id`.
#[derive(Debug, Args)]
pub struct IdArgs {
    /// Identity key file (as given to `node --key`).
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
}

/// Training settings shared by `node` and `testnet`.
#[derive(Debug, Clone, Args)]
pub struct TrainArgs {
    /// Model to train: mlp (784-256-256-10 on MNIST), cnn (small convolutional net on
    /// MNIST), or char-lm (character-level transformer on text, can be cut into --stages).
    #[arg(long, default_value = "mlp")]
    pub model: ModelChoice,
    /// MNIST: a directory with the IDX files (train-images-idx3-ubyte[.gz], ...).
    /// char-lm: a UTF-8 text file. Default: the bundled subset.
    #[arg(long, value_name = "PATH", env = "P2PTRAIN_DATA")]
    pub data: Option<PathBuf>,
    /// Pipeline stages to cut the model's layers into (char-lm only): each peer
    /// holds one stage, and the replicas of a stage average with each other.
    /// A node waits for at least this many peers (itself included).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256), allow_negative_numbers = true)]
    pub stages: u32,
    /// Char-lm only: micro-batches per optimizer step in a pipeline; --batch-size (a
    /// multiple of it) is split among them.
    #[arg(long, default_value_t = DEFAULT_MICRO_BATCHES, value_parser = clap::value_parser!(u64).range(1..=1024), allow_negative_numbers = true)]
    pub micro_batches: u64,
    /// Training micro-batches a first-stage replica keeps in the pipeline at once:
    /// each returning gradient lets the next one in (1F1B), so a stage holds at most
    /// this many micro-batches' activations per first-stage replica (resends after a
    /// timeout aside). Default: --stages plus one (keeps every stage busy while
    /// micro-batches travel); --micro-batches or more is GPipe.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1024), allow_negative_numbers = true)]
    pub max_in_flight: Option<u64>,
    /// Char-lm only: seconds a micro-batch may take to come back before it goes to another replica.
    #[arg(long, default_value_t = DEFAULT_STAGE_TIMEOUT_SECS, value_parser = parse_secs, allow_negative_numbers = true)]
    pub stage_timeout_secs: f64,
    /// Samples per local step (MNIST images, or char-lm text windows).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=65536), allow_negative_numbers = true)]
    pub batch_size: u64,
    /// Learning rate of the local Adam optimizer (above the usual 0.001: averaging
    /// every few steps shrinks each peer's effective step).
    #[arg(long, default_value_t = 3e-3, value_parser = parse_lr, allow_negative_numbers = true)]
    pub lr: f64,
    /// Local steps per node (overrides --epochs). A node that joins mid-run
    /// and downloads the swarm's model ends with the swarm instead.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..), allow_negative_numbers = true)]
    pub steps: Option<u64>,
    /// Passes over the training set by the whole swarm (planned for the peers
    /// seen at start, or the first round's group where that is larger).
    #[arg(long, default_value_t = 3.0, value_parser = parse_epochs, allow_negative_numbers = true)]
    pub epochs: f64,
    /// Local steps between averaging rounds (`--sync-every` is the same flag, the
    /// name DiLoCo users know: H local steps between outer steps).
    #[arg(long, visible_alias = "sync-every", value_name = "H", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..), allow_negative_numbers = true)]
    pub average_every: u64,
    /// Evaluate the model on held-out data every N averaging rounds (0: only
    /// at the end), for the accuracy curve of `--run-dir`/`plot`, the status
    /// page and time-to-accuracy. MNIST models only (char-lm evaluates at the end).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    pub eval_every: u64,
    /// DiLoCo: with an outer learning rate, rounds average the pseudo-gradient
    /// (round-start parameters minus current ones) instead of the parameters, and
    /// every peer applies an outer Nesterov SGD step to the round-start parameters
    /// (DiLoCo uses 0.7; 1.0 with --outer-momentum 0 is plain parameter averaging).
    /// All peers of a swarm must use the same.
    #[arg(long, value_name = "LR", value_parser = parse_outer_lr, allow_negative_numbers = true)]
    pub outer_lr: Option<f32>,
    /// DiLoCo: Nesterov momentum of the outer step, in [0, 1) (needs --outer-lr;
    /// default 0.9, as in DiLoCo).
    #[arg(long, value_name = "MU", value_parser = parse_outer_momentum, allow_negative_numbers = true)]
    pub outer_momentum: Option<f32>,
    /// Seconds the round leader waits for stragglers before averaging without them: the
    /// ceiling of a window that shrinks to 4x the latest a whole swarm joined in the last 8
    /// rounds (not below 2 s) once 3 are measured, unless --fixed-deadline. Members wait for
    /// the leader up to 3x this (fitted likewise, at least their own window + 4 s).
    #[arg(long, default_value_t = 5.0, value_parser = parse_secs, allow_negative_numbers = true)]
    pub join_window_secs: f64,
    /// Seconds an all-reduce may take before silent members are dropped from the round: the
    /// ceiling of the deadline, which shrinks to 4x the slowest of the last 8 complete rounds
    /// (not below 5 s) once 3 are measured, unless --fixed-deadline.
    #[arg(long, default_value_t = 30.0, value_parser = parse_secs, allow_negative_numbers = true)]
    pub reduce_timeout_secs: f64,
    /// Always wait the full --join-window-secs and --reduce-timeout-secs for silent peers
    /// instead of fitting those deadlines to measured rounds.
    #[arg(long)]
    pub fixed_deadline: bool,
    /// How peers encode what they average: f32 (exact), f16, bf16, int8 or int8:BLOCK
    /// (blockwise, ~1/4 of the bytes); with --outer-lr also topk:FRACTION, which sends that
    /// share of each pseudo-gradient's entries (e.g. 0.01), the largest, and carries the
    /// rest into later rounds (error feedback). All peers of a swarm must use the same.
    #[arg(long, default_value = "f32")]
    pub compression: Compression,
    /// How reducers combine peers' parameters: mean, trimmed-mean[:FRACTION] (default 0.2
    /// off each end per coordinate) or centered-clip[:RADIUS] (default 2, in multiples of
    /// the contributions' median spread). The robust rules also make peers refuse reduced
    /// parts far from their own values. All peers of a swarm should use the same.
    #[arg(long, default_value = "mean", value_parser = parse_aggregation)]
    pub aggregation: Aggregation,
    /// Tests only: make this node hostile, corrupting every averaging payload it sends
    /// (flip, nan or scale:FACTOR; deaf:ROUND ignores the reduced parts it gets in that round; mute:ROUND sends no tensor from that round on;
    /// absent:ROUND takes no part in averaging from that round on; lag:ROUND:SECS stalls SECS seconds before training that round;
    /// claim-ahead tells the swarm it has reached the last possible round; phantom:ROUND lists a made-up member in the groups it leads from that round on; withhold:ROUND never sends those groups to their largest-id member).
    #[arg(long, hide = true, value_name = "HOW")]
    pub misbehave: Option<crate::misbehave::Misbehave>,
    /// Compute device: cpu, or cuda (needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: DeviceKind,
    /// Seed for model initialisation and data order (default: derived from the swarm name; all peers must agree).
    #[arg(long, allow_negative_numbers = true)]
    pub seed: Option<u64>,
}

/// A model the command line can name: an MNIST classifier (data-parallel)
/// or the character-level language model (data- and pipeline-parallel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelChoice {
    /// An MNIST classifier.
    Mnist(ModelKind),
    /// The character-level transformer language model.
    CharLm,
}

impl std::str::FromStr for ModelChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim().eq_ignore_ascii_case("char-lm") {
            return Ok(ModelChoice::CharLm);
        }
        s.parse::<ModelKind>()
            .map(ModelChoice::Mnist)
            .map_err(|_| format!("unknown model {s:?}; valid models are: mlp, cnn, char-lm"))
    }
}

impl std::fmt::Display for ModelChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModelChoice::Mnist(kind) => write!(f, "{kind}"),
            ModelChoice::CharLm => f.write_str("char-lm"),
        }
    }
}

/// Flags of `p2ptrain node`.
#[derive(Debug, Args)]
pub struct NodeArgs {
    /// Read flags from this TOML file (keys are the long flag names; see
    /// `p2ptrain config example`). Flags and P2PTRAIN_* variables override it.
    #[arg(long, value_name = "FILE", env = "P2PTRAIN_CONFIG")]
    pub config: Option<PathBuf>,
    /// Swarm name: only peers with the same name train together (letters, digits, '-', '_', '.'; at most 64).
    #[arg(long, default_value = "p2ptrain-mnist", value_parser = parse_swarm)]
    pub swarm: String,
    /// Address to listen on (repeatable); QUIC only.
    #[arg(long, value_name = "MULTIADDR", default_value = "/ip4/0.0.0.0/udp/0/quic-v1", value_parser = parse_listen)]
    pub listen: Vec<Multiaddr>,
    /// Peer to contact first, e.g. /ip4/203.0.113.5/udp/4001/quic-v1/p2p/12D3Koo... (repeatable).
    #[arg(long, value_name = "MULTIADDR", value_parser = parse_bootstrap)]
    pub bootstrap: Vec<Multiaddr>,
    /// Do not discover peers on the local network with mDNS.
    #[arg(long)]
    pub no_mdns: bool,
    /// Relay connections for swarm members behind NATs (give this to nodes others can reach).
    #[arg(long)]
    pub relay: bool,
    /// Tests only: subscribe to this gossip topic, as an outsider who copied a member's would.
    #[arg(long, hide = true, value_name = "TOPIC")]
    pub misbehave_topic: Option<String>,
    /// Identity key file, created if missing, so the peer id survives restarts (default: a new identity each run).
    #[arg(long, value_name = "FILE", env = "P2PTRAIN_KEY")]
    pub key: Option<PathBuf>,
    /// Wait until this many peers (this one included) are in the swarm before training.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1024), allow_negative_numbers = true)]
    pub min_peers: u64,
    /// Give up if --min-peers are not there after this many seconds (at most a week).
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(0..=MAX_WAIT_SECS), allow_negative_numbers = true)]
    pub wait_peers_secs: u64,
    /// Print progress as JSON event lines on stdout (for scripts and `testnet`).
    #[arg(long)]
    pub events: bool,
    /// Seconds to keep serving peers after training ends, so they can finish the last round (at most 86400).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(0..=86_400), allow_negative_numbers = true)]
    pub linger_secs: u64,
    /// Write checkpoints (atomic, blake3-verified) into this directory; one
    /// already holding this swarm's checkpoints needs --resume DIR.
    #[arg(long, value_name = "DIR", env = "P2PTRAIN_CHECKPOINT_DIR")]
    pub checkpoint_dir: Option<PathBuf>,
    /// File holding the swarm secret (at least 16 bytes, e.g. from
    /// `head -c 32 /dev/urandom`): only peers with the same file are members,
    /// and every message carries a MAC under it.
    #[arg(long, value_name = "FILE", env = "P2PTRAIN_SECRET_FILE")]
    pub secret_file: Option<PathBuf>,
    /// Write a checkpoint every this many averaging rounds (and of the model the run ends on).
    #[arg(long, default_value_t = DEFAULT_CHECKPOINT_EVERY, value_parser = clap::value_parser!(u64).range(1..), allow_negative_numbers = true)]
    pub checkpoint_every: u64,
    /// Continue from the newest valid checkpoint of this swarm in DIR (and keep checkpointing there
    /// unless --checkpoint-dir says otherwise); a char-lm node holds that
    /// checkpoint's stage again, or the swarm's newer backup of it.
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
    /// Serve Prometheus metrics at /metrics and a status page at / on this
    /// address, e.g. 127.0.0.1:9100.
    #[arg(long, value_name = "ADDR", value_parser = parse_metrics_addr)]
    pub metrics: Option<SocketAddr>,
    /// Append per-round figures as JSON lines to DIR/metrics.jsonl, for `p2ptrain plot`.
    #[arg(long, value_name = "DIR", env = "P2PTRAIN_RUN_DIR")]
    pub run_dir: Option<PathBuf>,
    /// Test only: `corrupt` makes this node serve corrupted state chunks to
    /// joiners (its manifest stays honest), to test that they detect and avoid it.
    #[arg(long, value_name = "HOW", hide = true, value_parser = ["corrupt"])]
    pub misbehave_state: Option<String>,
    /// Training settings.
    #[command(flatten)]
    pub train: TrainArgs,
}

/// Flags of `p2ptrain testnet`.
#[derive(Debug, Args)]
pub struct TestnetArgs {
    /// Number of node processes.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=64), allow_negative_numbers = true)]
    pub nodes: u64,
    /// Abort (and exit non-zero) if training takes longer than this many seconds (at most a week).
    #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..=MAX_WAIT_SECS), allow_negative_numbers = true)]
    pub timeout_secs: u64,
    /// Give node i `--checkpoint-dir DIR/node-i` (char-lm: each node's stage,
    /// for `p2ptrain sample --from DIR`).
    #[arg(long, value_name = "DIR")]
    pub checkpoint_dir: Option<PathBuf>,
    /// Serve node i's metrics and status page on ADDR's port + i.
    #[arg(long, value_name = "ADDR", value_parser = parse_metrics_addr)]
    pub metrics: Option<SocketAddr>,
    /// Give node i `--run-dir DIR/node-i` and draw DIR/loss.png at the end.
    #[arg(long, value_name = "DIR")]
    pub run_dir: Option<PathBuf>,
    /// Tests only: make the last N nodes hostile (with `--misbehave HOW`).
    #[arg(
        long,
        hide = true,
        default_value_t = 0,
        value_name = "N",
        allow_negative_numbers = true
    )]
    pub hostile: u64,
    /// Training settings, passed to every node.
    #[command(flatten)]
    pub train: TrainArgs,
}

fn parse_lr(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("`{s}` is not a number"))?;
    if v.is_finite() && v > 0.0 && v < 10.0 {
        Ok(v)
    } else {
        Err(format!("learning rate must be in (0, 10), got {v}"))
    }
}

/// DiLoCo's outer momentum when `--outer-momentum` is not given.
pub const DEFAULT_OUTER_MOMENTUM: f32 = 0.9;

fn parse_outer_lr(s: &str) -> Result<f32, String> {
    let lr: f32 = s.parse().map_err(|_| format!("`{s}` is not a number"))?;
    OuterConfig { lr, momentum: 0.0 }
        .validate()
        .map_err(|e| e.to_string())?;
    Ok(lr)
}

fn parse_outer_momentum(s: &str) -> Result<f32, String> {
    let momentum: f32 = s.parse().map_err(|_| format!("`{s}` is not a number"))?;
    OuterConfig { lr: 1.0, momentum }
        .validate()
        .map_err(|e| e.to_string())?;
    Ok(momentum)
}

impl TrainArgs {
    /// The DiLoCo outer optimizer's settings, when `--outer-lr` turns it on.
    pub fn outer(&self) -> Option<OuterConfig> {
        self.outer_lr.map(|lr| OuterConfig {
            lr,
            momentum: self.outer_momentum.unwrap_or(DEFAULT_OUTER_MOMENTUM),
        })
    }
}

fn parse_epochs(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("`{s}` is not a number"))?;
    if v.is_finite() && v > 0.0 && v <= 10_000.0 {
        Ok(v)
    } else {
        Err(format!("epochs must be in (0, 10000], got {v}"))
    }
}

fn parse_aggregation(s: &str) -> Result<Aggregation, String> {
    let (name, arg) = match s.split_once(':') {
        Some((n, a)) => (n, Some(a)),
        None => (s, None),
    };
    let number = |default: f32| -> Result<f32, String> {
        arg.map_or(Ok(default), |a| {
            a.parse()
                .map_err(|_| format!("`{a}` is not a number (in `{s}`)"))
        })
    };
    let rule = match name {
        "mean" if arg.is_none() => Aggregation::Mean,
        "trimmed-mean" => Aggregation::TrimmedMean { trim: number(0.2)? },
        "centered-clip" => Aggregation::CenteredClip {
            radius: number(2.0)?,
        },
        _ => {
            return Err(format!(
                "`{s}` is not an aggregation rule: use mean, trimmed-mean[:FRACTION] or centered-clip[:RADIUS]"
            ))
        }
    };
    rule.validate()?;
    Ok(rule)
}

/// The longest a node waits for peers, or a testnet for its nodes: a week.
/// Durations are added to the clock, so they need some bound, and a week
/// is beyond any real wait.
const MAX_WAIT_SECS: u64 = 7 * 86_400;

fn parse_secs(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds"))?;
    if v.is_finite() && v > 0.0 && v <= 86_400.0 {
        Ok(v)
    } else {
        Err(format!(
            "must be more than 0 and at most 86400 seconds, got {v}"
        ))
    }
}

/// Longest swarm name accepted.
const MAX_SWARM_NAME: usize = 64;

/// A swarm name goes into the gossip topic (`p2ptrain/NAME/...`) and into
/// checkpoints: an empty one, or one with `/` that could read as another
/// swarm's topic, is refused rather than joined.
fn parse_swarm(s: &str) -> Result<String, String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if s.is_empty() {
        return Err("the swarm name is empty; peers with the same name train together".into());
    }
    if s.len() > MAX_SWARM_NAME {
        return Err(format!(
            "the swarm name is {} characters long; at most {MAX_SWARM_NAME}",
            s.len()
        ));
    }
    match s.chars().find(|c| !allowed(*c)) {
        Some(c) => Err(format!(
            "the swarm name `{s}` holds {c:?}; use letters, digits, '-', '_' and '.' only"
        )),
        None => Ok(s.to_string()),
    }
}

fn parse_metrics_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|_| format!("`{s}` is not an IP address and port; expected e.g. 127.0.0.1:9100"))
}

fn parse_multiaddr(s: &str) -> Result<Multiaddr, String> {
    s.parse::<Multiaddr>().map_err(|e| {
        format!(
            "`{s}` is not a valid multiaddr ({e}); expected e.g. /ip4/192.0.2.7/udp/4001/quic-v1"
        )
    })
}

fn is_quic(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::QuicV1))
}

fn parse_listen(s: &str) -> Result<Multiaddr, String> {
    let addr = parse_multiaddr(s)?;
    if !is_quic(&addr) {
        return Err(format!("`{s}` is not a QUIC address; p2ptrain listens on QUIC only, e.g. /ip4/0.0.0.0/udp/4001/quic-v1"));
    }
    Ok(addr)
}

fn parse_bootstrap(s: &str) -> Result<Multiaddr, String> {
    let addr = parse_multiaddr(s)?;
    if !is_quic(&addr) {
        return Err(format!(
            "`{s}` is not a QUIC address (…/udp/PORT/quic-v1/p2p/PEER_ID)"
        ));
    }
    if peer_id_of(&addr).is_none() {
        return Err(format!(
            "`{s}` lacks the peer id: append /p2p/PEER_ID as printed by that node at start"
        ));
    }
    Ok(addr)
}

/// A swarm-wide seed from the swarm name, so peers agree without talking.
pub fn seed_from_name(name: &str) -> u64 {
    let h = blake3::hash(name.as_bytes());
    u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"))
}

/// How long a node asked to stop may take to finish its round and write its
/// checkpoint before it stops at once.
const STOP_GRACE: Duration = Duration::from_secs(60);

/// Loads the MNIST data named by `--data`, or the bundled subset.
pub fn load_data(data: Option<&PathBuf>) -> anyhow::Result<Arc<MnistData>> {
    let d = match data {
        Some(dir) => crate::train::data::load_dir(dir)
            .with_context(|| format!("cannot load MNIST from {}", dir.display()))?,
        None => {
            crate::train::data::load_bundled().context("cannot load the bundled MNIST subset")?
        }
    };
    Ok(Arc::new(d))
}

/// Sets up the diagnostic log on stderr. `live` (a node drawing its live
/// progress line on a terminal) lowers the default level to warnings, whose
/// lines would otherwise break the line every round; RUST_LOG still rules.
fn init_logging(format: LogFormat, live: bool) {
    let default = if live { "warn" } else { "info,libp2p=warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colours only on a terminal: in a file or a pipe they are escape codes.
    let colour = {
        use std::io::IsTerminal;
        std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none()
    };
    use tracing_subscriber::filter::FilterExt;
    use tracing_subscriber::layer::{Layer, SubscriberExt};
    use tracing_subscriber::util::SubscriberInitExt;
    // A peer sending junk as fast as it can gets a few lines per window, not
    // one per message.
    let filter = filter.and(crate::log_throttle::PeerWarnings::default());
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => tracing_subscriber::registry()
            .with(layer.with_filter(filter))
            .try_init(),
        LogFormat::Json => tracing_subscriber::registry()
            .with(layer.json().with_filter(filter))
            .try_init(),
    };
}

/// A command line that could not be turned into a [`Cli`].
#[derive(Debug)]
pub enum CliError {
    /// The flags themselves.
    Clap(clap::Error),
    /// The `--config` file.
    Config(crate::config_file::ConfigError),
}

/// The `node` subcommand's definition, for config files.
pub fn node_command() -> clap::Command {
    use clap::CommandFactory;
    let mut cli = Cli::command();
    // Built, so the global flags (`--log-format`) are the node's too and a
    // config file may set them.
    cli.build();
    cli.find_subcommand("node")
        .cloned()
        .expect("p2ptrain has a node subcommand")
}

/// Parses `argv`; for `node --config FILE`, adds the file's values for the
/// flags that neither the command line nor the environment set, and parses
/// again, so every value passes the flag's own checks.
pub fn parse_with_config(argv: Vec<OsString>) -> Result<Cli, CliError> {
    use clap::{CommandFactory, FromArgMatches};
    let matches = Cli::command()
        .try_get_matches_from(argv.clone())
        .map_err(CliError::Clap)?;
    let cli = Cli::from_arg_matches(&matches).map_err(CliError::Clap)?;
    let path = match &cli.command {
        Command::Node(NodeArgs {
            config: Some(path), ..
        }) => path.clone(),
        _ => return Ok(cli),
    };
    let node = matches
        .subcommand_matches("node")
        .expect("parsed as the node subcommand");
    let given = |id: &str| {
        matches!(
            node.value_source(id),
            Some(clap::parser::ValueSource::CommandLine | clap::parser::ValueSource::EnvVariable)
        )
    };
    let extra = crate::config_file::args_from_file(&path, &node_command(), given)
        .map_err(CliError::Config)?;
    let mut argv = argv;
    argv.extend(extra);
    Cli::try_parse_from(argv).map_err(CliError::Clap)
}

/// Whether checkpoints go to the directory the node resumed from (then the
/// run they hold is this one's), however the two paths are spelt.
fn is_resume_dir(dir: &std::path::Path, resume: Option<&std::path::Path>) -> bool {
    let canonical = |p: &std::path::Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_owned());
    resume.is_some_and(|r| canonical(r) == canonical(dir))
}

/// A checkpoint resumes only the swarm and model that wrote it: another
/// swarm's would mix runs in one directory, another model's cannot load.
fn check_resumable(
    dir: &std::path::Path,
    meta: &crate::checkpoint::CheckpointMeta,
    swarm: &str,
    model: &str,
    average_every: u64,
) -> anyhow::Result<()> {
    if let Some((stage, stages)) = driver::parse_stage_model_name(&meta.model) {
        anyhow::bail!(
            "the newest checkpoint in {} holds stage {stage} of {stages} of a char-lm pipeline: pass --model char-lm --stages {stages} to resume it",
            dir.display()
        );
    }
    meta.check_run(dir, swarm, average_every)?;
    if meta.model != model {
        anyhow::bail!(
            "the newest checkpoint in {} is of model `{}`, not `{model}`: pass --model {} to resume it",
            dir.display(),
            meta.model,
            meta.model
        );
    }
    Ok(())
}

/// Refuses to resume a DiLoCo node's checkpoint (it holds an outer momentum)
/// without `--outer-lr`: the node would send its parameters where its peers
/// send pseudo-gradients, wrecking their outer steps, and would drop the
/// momentum from its later checkpoints. The other way round (a plain
/// checkpoint resumed under DiLoCo) only starts the momentum at zero, which
/// the driver warns about.
fn check_outer_resumable(
    dir: &std::path::Path,
    written_by_diloco: bool,
    diloco: bool,
) -> anyhow::Result<()> {
    if written_by_diloco && !diloco {
        anyhow::bail!(
            "the newest checkpoint in {} was written by a DiLoCo node (it holds an outer momentum): pass --outer-lr (and --outer-momentum, --sync-every as before) to resume it",
            dir.display()
        );
    }
    Ok(())
}

/// Where a flag error names a flag whose environment variable is set but
/// empty (`P2PTRAIN_CONFIG=`), the variable to blame: the user never typed
/// the flag, so clap's "a value is required for '--config'" misleads.
fn empty_variable_behind(error_line: &str) -> Option<String> {
    use clap::CommandFactory;
    let cli = Cli::command();
    let blame = cli
        .get_subcommands()
        .flat_map(|c| c.get_arguments())
        .filter_map(|a| Some((a.get_long()?, a.get_env()?)))
        .find(|(long, var)| {
            std::env::var_os(var).is_some_and(|v| v.is_empty())
                && error_line.contains(&format!("'--{long}"))
        })
        .map(|(long, var)| {
            format!(
                "the environment variable {} is set but empty (it stands for --{long}): unset it or give it a value",
                var.to_string_lossy()
            )
        });
    blame
}

/// The binary's entry point: parses flags, runs, and turns errors into one line and exit code.
pub fn main_entry() -> ExitCode {
    let heap = p2ptrain_heap::keep_large_buffers();
    let cli = match parse_with_config(std::env::args_os().collect()) {
        Ok(cli) => cli,
        Err(CliError::Config(e)) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
        Err(CliError::Clap(e)) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // No subcommand: the help, but on stderr and as a failure, so a
            // script that forgot the command does not pass.
            if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                let _ = e.print();
                return ExitCode::from(2);
            }
            let line = crate::error_text::clap_one_line(&e)
                .unwrap_or_else(|| "error: invalid arguments".into());
            match empty_variable_behind(&line) {
                Some(blame) => eprintln!("error: {blame}"),
                None => eprintln!("{line} (see `p2ptrain --help`)"),
            }
            return ExitCode::from(2);
        }
    };
    let live = {
        use std::io::IsTerminal;
        matches!(&cli.command, Command::Node(a) if !a.events) && std::io::stdout().is_terminal()
    };
    let log_format = cli.log_format;
    init_logging(log_format, live);
    tracing::debug!(?heap, "allocator keeps large buffers in the heap");
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Node(args) => run_node(args).await,
            Command::Testnet(args) => testnet::run(args).await,
            Command::Sample(args) => run_sample(args),
            Command::Plot(args) => {
                let out = args.out.unwrap_or_else(|| args.run_dir.join("loss.png"));
                let plotted = crate::plot::plot_run_dir(&args.run_dir, &out, args.force)?;
                println!(
                    "{} ({} node(s), {}x{})",
                    out.display(),
                    plotted.nodes,
                    plotted.width,
                    plotted.height
                );
                Ok(())
            }
            Command::Config(ConfigArgs {
                action: ConfigAction::Example,
            }) => {
                print!("{}", crate::config_file::example(&node_command()));
                Ok(())
            }
            Command::Export(args) => {
                let done = crate::export::export_file(&args.checkpoint, &args.out, args.force)?;
                println!(
                    "{} ({} tensors, {} values)",
                    args.out.display(),
                    done.tensors,
                    done.values
                );
                Ok(())
            }
            Command::Id(args) => {
                let key = crate::identity::load_or_create(&args.key)?;
                println!("{}", key.public().to_peer_id());
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}", final_error_line(log_format, &error_text(e.as_ref())));
            match e.downcast_ref() {
                Some(driver::NodeError::Stopped { .. }) => {
                    ExitCode::from(crate::stop::STOPPED_EXIT_CODE)
                }
                _ => ExitCode::FAILURE,
            }
        }
    }
}

/// The line a command that failed once running ends with on stderr: in the
/// log format asked for, so a script reading JSON logs gets the error as one
/// more JSON line. (Errors in the flags or the config file come before any
/// log format is known, and stay plain text.)
/// Printed directly, not through the logger, so `RUST_LOG=off` cannot hide
/// why the command failed.
fn final_error_line(format: LogFormat, text: &str) -> String {
    match format {
        LogFormat::Text => format!("error: {text}"),
        LogFormat::Json => serde_json::json!({
            "level": "ERROR",
            "fields": { "message": text },
            "target": "p2ptrain",
        })
        .to_string(),
    }
}

async fn run_node(args: NodeArgs) -> anyhow::Result<()> {
    // Flags first: a refused combination must not leave a new key file behind.
    check_model_flags(&args.train)?;
    if args.min_peers > 1 && args.wait_peers_secs == 0 {
        anyhow::bail!(
            "--wait-peers-secs 0 leaves no time for the --min-peers {} peers to join: give it the seconds to wait",
            args.min_peers
        );
    }
    if let Some(dir) = args.run_dir.as_ref().filter(|d| d.exists() && !d.is_dir()) {
        anyhow::bail!(
            "--run-dir {} is a file; give a directory (the node writes its metrics.jsonl there)",
            dir.display()
        );
    }
    if let (Some(dir), None) = (&args.run_dir, &args.resume) {
        if let Some(records) = crate::run_record::earlier_records(dir) {
            anyhow::bail!(
                "--run-dir {} holds an earlier run's records ({}): pick a new directory or remove them (a node resumed with --resume goes on appending to its own); this run would append to them, and the plot would mix the runs",
                dir.display(),
                records.display()
            );
        }
    }
    let no_checkpoints = args.checkpoint_dir.is_none() && args.resume.is_none();
    if no_checkpoints && args.checkpoint_every != DEFAULT_CHECKPOINT_EVERY {
        anyhow::bail!(
            "--checkpoint-every {} needs --checkpoint-dir DIR (or --resume DIR): without one no checkpoint is written",
            args.checkpoint_every
        );
    }
    let keypair = match &args.key {
        Some(path) => crate::identity::load_or_create(path)?,
        None => libp2p::identity::Keypair::generate_ed25519(),
    };
    let seed = args
        .train
        .seed
        .unwrap_or_else(|| seed_from_name(&args.swarm));
    let key = match &args.secret_file {
        Some(path) => Some(crate::net::secret::SwarmKey::from_file(path)?),
        None => None,
    };
    let pipeline = args.train.model == ModelChoice::CharLm;
    // Checked before the node joins a swarm: a text too short to train on
    // must not cost the peers a member that leaves once its stage starts.
    let text = if pipeline {
        Some(load_text(args.train.data.as_ref())?)
    } else {
        None
    };
    let mnist = match &text {
        Some(_) => None,
        None => Some(load_data(args.train.data.as_ref())?),
    };
    let settings = {
        let (model, data) = match (&text, &mnist) {
            (Some(text), _) => (
                format!("{}:{}", args.train.model, args.train.stages),
                text.fingerprint(),
            ),
            (None, Some(mnist)) => (args.train.model.to_string(), mnist.fingerprint()),
            (None, None) => anyhow::bail!("no training data loaded"),
        };
        RunSettings::new(
            &model,
            &data,
            args.train.aggregation,
            &args.train.compression.to_string(),
            args.train.outer(),
        )
    };
    // A pipeline node resumes its stage; a data-parallel one the whole model.
    let (resume, stage_resume) = match &args.resume {
        Some(dir) => {
            let ckpt =
                crate::checkpoint::load_latest_of(dir, &args.swarm).map_err(|e| match e {
                    CheckpointError::NoneFound(..) => {
                        anyhow::anyhow!("{e}; start without --resume to train from scratch")
                    }
                    other => other.into(),
                })?;
            if pipeline {
                let cut = (args.train.stages, args.train.average_every);
                let mut stage = driver::StageResume::from_checkpoint(ckpt, dir, &args.swarm, cut)?;
                stage.read_saved_backups(dir, &args.swarm, cut);
                (None, Some(stage))
            } else {
                check_resumable(
                    dir,
                    &ckpt.meta,
                    &args.swarm,
                    &args.train.model.to_string(),
                    args.train.average_every,
                )?;
                check_outer_resumable(
                    dir,
                    ckpt.outer_momentum.is_some(),
                    args.train.outer_lr.is_some(),
                )?;
                (Some(ckpt), None)
            }
        }
        None => (None, None),
    };
    // A resumed run goes on checkpointing where it resumed from.
    let checkpoint_dir = args.checkpoint_dir.clone().or_else(|| args.resume.clone());
    let checkpoints =
        checkpoint_dir
            .clone()
            .filter(|_| !pipeline)
            .map(|dir| driver::CheckpointPolicy {
                dir,
                every_rounds: args.checkpoint_every,
                model: args.train.model.to_string(),
            });
    let stage_checkpoints =
        checkpoint_dir
            .filter(|_| pipeline)
            .map(|dir| driver::StageCheckpoints {
                dir,
                every_rounds: args.checkpoint_every,
            });
    let dirs = checkpoints.iter().map(|p| &p.dir);
    for dir in dirs.chain(stage_checkpoints.iter().map(|c| &c.dir)) {
        crate::checkpoint::check_writable(dir)?;
        if !is_resume_dir(dir, args.resume.as_deref()) {
            crate::checkpoint::refuse_earlier_run(dir, &args.swarm)?;
        }
    }
    // A data-parallel node stops at a round boundary, checkpointed (a
    // pipeline stage keeps the default: its replicas and backups cover it).
    let stop = crate::stop::StopRequest::default();
    if !pipeline {
        crate::stop::on_signals(stop.clone(), STOP_GRACE)?;
    }
    let config = NodeConfig {
        net: NetConfig {
            swarm: args.swarm.clone(),
            listen: args.listen.clone(),
            bootstrap: args.bootstrap.clone(),
            mdns: !args.no_mdns,
            request_timeout: Duration::from_secs(60),
            key,
            relay: args.relay,
            misbehave_topic: args.misbehave_topic.clone(),
            settings,
        },
        stop: stop.clone(),
        min_peers: args.min_peers as usize,
        wait_for_peers: Duration::from_secs(args.wait_peers_secs),
        schedule: Schedule {
            budget: match args.train.steps {
                Some(s) => Budget::Steps(s),
                None => Budget::Epochs(args.train.epochs),
            },
            average_every: args.train.average_every,
            samples_per_step: args.train.batch_size,
            eval_every: args.train.eval_every,
        },
        averaging: AveragingConfig {
            compression: args.train.compression.dense(),
            aggregation: args.train.aggregation,
            adaptive_deadline: !args.train.fixed_deadline,
            ..driver::network_averaging(
                Duration::from_secs_f64(args.train.join_window_secs),
                Duration::from_secs_f64(args.train.reduce_timeout_secs),
            )
        },
        seed,
        linger: Duration::from_secs(args.linger_secs),
        checkpoints,
        resume,
        misbehave: args.train.misbehave,
        outer: args.train.outer(),
        top_k: args.train.compression.top_k(),
        misbehave_state: match args.misbehave_state.as_deref() {
            Some("corrupt") => driver::StateMisbehave::CorruptState,
            _ => driver::StateMisbehave::None,
        },
    };
    let reporter: driver::Reporter = if args.events {
        Box::new(|e: &NodeEvent| {
            if let Ok(line) = serde_json::to_string(e) {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{line}");
                let _ = out.flush();
            }
        })
    } else {
        {
            use std::io::IsTerminal;
            let live = std::io::stdout().is_terminal();
            let mut human = crate::progress::HumanOutput::new(std::io::stdout(), live);
            Box::new(move |e: &NodeEvent| human.report(e))
        }
    };
    let reporter = match &args.run_dir {
        Some(dir) => crate::run_record::RunRecorder::create(dir)?.tap(reporter),
        None => reporter,
    };
    let metrics = match args.metrics {
        Some(addr) => {
            let metrics = crate::metrics::Metrics::new();
            let bound = crate::metrics::http::serve(addr, metrics.clone()).await?;
            eprintln!("metrics: http://{bound}/ (Prometheus at /metrics)");
            Some(metrics)
        }
        None => None,
    };
    let reporter = match &metrics {
        Some(m) => m.tap(reporter),
        None => reporter,
    };
    match args.train.model {
        ModelChoice::Mnist(model) => {
            let task = build_mnist_task(TaskSpec {
                model,
                data: mnist.context("MNIST loaded above")?,
                batch_size: args.train.batch_size as usize,
                lr: args.train.lr,
                seed,
                device: args.train.device,
            })?;
            driver::run_with_metrics(config, keypair, task, reporter, metrics).await?;
        }
        ModelChoice::CharLm => {
            let text = text.context("char-lm text loaded above")?;
            let factory = charlm_factory(&args.train, text, seed);
            let pipeline = PipelineConfig {
                stages: args.train.stages,
                micro_batches: args.train.micro_batches as usize,
                max_in_flight: args
                    .train
                    .max_in_flight
                    .unwrap_or(u64::from(args.train.stages) + 1)
                    as usize,
                stage_timeout: Duration::from_secs_f64(args.train.stage_timeout_secs),
                micro_batch_bytes: micro_batch_bytes(
                    &CharLmConfig::default(),
                    args.train.batch_size / args.train.micro_batches.max(1),
                ),
                checkpoints: stage_checkpoints,
                resume: stage_resume,
            };
            driver::run_pipeline_with_metrics(
                config, pipeline, keypair, factory, reporter, metrics,
            )
            .await?;
        }
    }
    Ok(())
}

/// Puts a char-lm together from one checkpoint per stage and prints generated text.
fn run_sample(args: SampleArgs) -> anyhow::Result<()> {
    let mut stages: std::collections::BTreeMap<u32, crate::checkpoint::Checkpoint> =
        std::collections::BTreeMap::new();
    let mut count = None;
    let mut dirs = Vec::new();
    let mut unread: Vec<PathBuf> = args.from.clone();
    while let Some(dir) = unread.pop() {
        let entries = std::fs::read_dir(&dir)
            .with_context(|| format!("cannot read checkpoint directory {}", dir.display()))?;
        for entry in entries.flatten() {
            if entry.path().is_dir() {
                unread.push(entry.path());
            }
        }
        dirs.push(dir);
    }
    // Directories that several runs wrote into (a testnet run twice with one
    // --checkpoint-dir) make the model of the pipeline run written last.
    let swarm = dirs
        .iter()
        .filter_map(|d| {
            crate::checkpoint::last_written_swarm(d, |model| {
                driver::parse_stage_model_name(model).is_some()
            })
        })
        .max()
        .map(|(_, swarm)| swarm)
        .unwrap_or_default();
    for dir in &dirs {
        let Ok(Some(ckpt)) = crate::checkpoint::latest_of_swarm(dir, &swarm) else {
            continue;
        };
        let Some((stage, of)) = driver::parse_stage_model_name(&ckpt.meta.model) else {
            continue;
        };
        if *count.get_or_insert(of) != of {
            anyhow::bail!(
                "checkpoints of swarm `{swarm}` under the given directories come from models cut into different numbers of stages ({of} and {}); pass the directories of one run",
                count.unwrap_or(of)
            );
        }
        // Replicas of a stage each wrote one: the furthest trained wins.
        let newer = |held: &crate::checkpoint::Checkpoint| {
            (ckpt.meta.round, ckpt.meta.step) > (held.meta.round, held.meta.step)
        };
        if stages.get(&stage).is_none_or(newer) {
            stages.insert(stage, ckpt);
        }
    }
    let Some(count) = count else {
        anyhow::bail!("no char-lm stage checkpoint found; train with `testnet --model char-lm --checkpoint-dir DIR` first");
    };
    let mut params = Vec::new();
    for stage in 0..count {
        let ckpt = stages.get(&stage).ok_or_else(|| {
            anyhow::anyhow!(
                "no checkpoint of stage {stage} of {count} of swarm `{swarm}` (the run written last) found; every stage is needed"
            )
        })?;
        params.extend_from_slice(&ckpt.params);
    }
    let text = crate::train::lm::sample(
        &CharLmConfig::default(),
        &params,
        &args.prompt,
        args.chars as usize,
        args.temperature as f32,
        args.seed,
    )
    .context("the checkpoints do not make a char-lm of this version")?;
    println!("{text}");
    Ok(())
}

/// `--checkpoint-every` unless given.
const DEFAULT_CHECKPOINT_EVERY: u64 = 10;
/// `--micro-batches` unless given.
const DEFAULT_MICRO_BATCHES: u64 = 4;
/// `--stage-timeout-secs` unless given.
const DEFAULT_STAGE_TIMEOUT_SECS: f64 = 20.0;

/// Refuses flag combinations that cannot work, or that name a setting the
/// chosen model would ignore, before any network starts.
pub fn check_model_flags(train: &TrainArgs) -> anyhow::Result<()> {
    if train.model == ModelChoice::CharLm && train.eval_every > 0 {
        anyhow::bail!(
            "--eval-every works in data-parallel (MNIST) training only; char-lm, which runs as a pipeline even with --stages 1, evaluates at the end"
        );
    }
    // Flags set away from their defaults that this model would ignore.
    if train.model != ModelChoice::CharLm {
        let pipeline_only = [
            (
                train.micro_batches != DEFAULT_MICRO_BATCHES,
                "--micro-batches",
            ),
            (
                train.stage_timeout_secs != DEFAULT_STAGE_TIMEOUT_SECS,
                "--stage-timeout-secs",
            ),
        ];
        if let Some((_, flag)) = pipeline_only.iter().find(|(set, _)| *set) {
            anyhow::bail!(
                "{flag} applies to pipeline training (--model char-lm) only; --model {} would ignore it",
                train.model
            );
        }
    }
    if train.stages > 1 && train.model != ModelChoice::CharLm {
        anyhow::bail!(
            "--stages {} needs --model char-lm: only the language model can be cut into pipeline stages",
            train.stages
        );
    }
    if let (Some(n), false) = (
        train.max_in_flight,
        train.model == ModelChoice::CharLm && train.stages > 1,
    ) {
        anyhow::bail!(
            "--max-in-flight {n} schedules micro-batches between pipeline stages and needs --model char-lm --stages 2 or more"
        );
    }
    if let (Some(_), None) = (train.compression.top_k(), train.outer_lr) {
        anyhow::bail!(
            "--compression {} needs --outer-lr: top-k sends part of each pseudo-gradient and carries \
             the rest into later rounds (averaged parameters would lose the dropped ones); \
             --outer-lr 1 --outer-momentum 0 is local SGD on pseudo-gradients",
            train.compression
        );
    }
    if train.outer_momentum.is_some() && train.outer_lr.is_none() {
        anyhow::bail!("--outer-momentum needs --outer-lr, which turns DiLoCo on");
    }
    if train.outer_lr.is_some() && train.model == ModelChoice::CharLm {
        anyhow::bail!(
            "--outer-lr (DiLoCo) works with the data-parallel MNIST models only; pipeline stages average their parameters"
        );
    }
    if train.model == ModelChoice::CharLm {
        let blocks = CharLmConfig::default().blocks as u32;
        if train.stages > blocks + 2 {
            anyhow::bail!(
                "--stages {} is more than char-lm's {} layers (embedding, {blocks} blocks, head)",
                train.stages,
                blocks + 2
            );
        }
        if train.batch_size < train.micro_batches {
            anyhow::bail!(
                "--batch-size {} is smaller than --micro-batches {}: every micro-batch needs at least one text window",
                train.batch_size,
                train.micro_batches
            );
        }
        let (batch, micro) = (train.batch_size, train.micro_batches);
        let windows = batch / micro.max(1);
        let max = max_micro_batch_windows(&CharLmConfig::default());
        if windows > max {
            anyhow::bail!(
                "--batch-size {batch} in --micro-batches {micro} makes micro-batches of {windows} text windows, whose activations would not fit in one message between stages (at most {max} windows, {} MiB): raise --micro-batches or lower --batch-size",
                wire::MAX_MESSAGE_BYTES >> 20
            );
        }
        if !batch.is_multiple_of(micro) {
            anyhow::bail!(
                "--batch-size {batch} is not a multiple of --micro-batches {micro}: each micro-batch takes an equal share of a step's text windows, so a step would train on {} of the {batch}, and epochs would cover less text than asked",
                batch - batch % micro
            );
        }
    }
    Ok(())
}

/// Bytes of a micro-batch of `windows` text windows between stages: its
/// activations (f32, `[windows, context, width]`) and token ids.
fn micro_batch_bytes(config: &CharLmConfig, windows: u64) -> usize {
    let per_window = 4 * (config.context * config.width + config.context + 1) as u64;
    usize::try_from(per_window.saturating_mul(windows)).unwrap_or(usize::MAX)
}

/// The most text windows a micro-batch may hold to fit in one message
/// between stages, with room to spare for the message's other fields.
fn max_micro_batch_windows(config: &CharLmConfig) -> u64 {
    const ROOM_FOR_THE_REST: u64 = 64 * 1024;
    (wire::MAX_MESSAGE_BYTES as u64 - ROOM_FOR_THE_REST) / micro_batch_bytes(config, 1) as u64
}

/// Loads the text named by `--data`, or the bundled Austen subset, and
/// checks it holds a training and a validation window for char-lm.
pub fn load_text(data: Option<&PathBuf>) -> anyhow::Result<Arc<TextData>> {
    let text = match data {
        Some(file) => crate::train::lm::text::load_file(file)
            .with_context(|| format!("cannot load text from {}", file.display()))?,
        None => {
            crate::train::lm::text::load_bundled().context("cannot load the bundled Austen text")?
        }
    };
    text.check_context(CharLmConfig::default().context)?;
    Ok(Arc::new(text))
}

/// Builds the char-lm stage a node is assigned, on its compute thread.
fn charlm_factory(train: &TrainArgs, text: Arc<TextData>, seed: u64) -> StageFactory {
    let config = CharLmConfig {
        micro_batch: (train.batch_size / train.micro_batches).max(1) as usize,
        micro_batches: train.micro_batches as usize,
        lr: train.lr,
        seed,
        ..CharLmConfig::default()
    };
    let device = train.device;
    Arc::new(move |spec| build_stage(&config, spec, text.clone(), device))
}

#[cfg(test)]
mod tests {
    use super::{error_text, parse_swarm};
    use anyhow::Context;

    #[test]
    fn a_resume_needs_the_averaging_period_the_checkpoint_was_written_with() {
        let meta = |average_every| crate::checkpoint::CheckpointMeta {
            swarm: "s".into(),
            model: "mlp".into(),
            round: 6,
            step: 30,
            samples: 1920,
            params_digest: String::new(),
            average_every,
        };
        let dir = std::path::Path::new("ck");
        let err = super::check_resumable(dir, &meta(Some(5)), "s", "mlp", 10).unwrap_err();
        assert!(err.to_string().contains("pass --average-every 5"), "{err}");
        assert!(super::check_resumable(dir, &meta(Some(5)), "s", "mlp", 5).is_ok());
        // Files of older versions do not say: resumed as before.
        assert!(super::check_resumable(dir, &meta(None), "s", "mlp", 10).is_ok());
    }

    #[test]
    fn a_diloco_checkpoint_resumes_only_under_diloco() {
        let dir = std::path::Path::new("ck");
        let err = super::check_outer_resumable(dir, true, false).unwrap_err();
        assert!(err.to_string().contains("pass --outer-lr"), "{err}");
        assert!(super::check_outer_resumable(dir, true, true).is_ok());
        assert!(super::check_outer_resumable(dir, false, false).is_ok());
        // A plain checkpoint under DiLoCo: momentum from zero, with a warning.
        assert!(super::check_outer_resumable(dir, false, true).is_ok());
    }

    #[test]
    fn a_config_file_sets_the_log_format_unless_the_command_line_does() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node.toml");
        std::fs::write(&file, "log-format = \"json\"\n").unwrap();
        let parse = |argv: &[&str]| {
            let mut all = vec!["p2ptrain"];
            all.extend_from_slice(argv);
            all.extend_from_slice(&["--config", file.to_str().unwrap()]);
            super::parse_with_config(all.into_iter().map(Into::into).collect())
                .map(|cli| cli.log_format)
                .map_err(|e| format!("{e:?}"))
        };
        assert!(matches!(parse(&["node"]), Ok(super::LogFormat::Json)));
        for given in [
            &["--log-format", "text", "node"][..],
            &["node", "--log-format", "text"][..],
        ] {
            let got = parse(given);
            assert!(
                matches!(got, Ok(super::LogFormat::Text)),
                "{given:?}: {got:?}"
            );
        }
    }

    #[test]
    fn swarm_names_are_plain_and_bounded() {
        for good in ["p2ptrain-mnist", "a", "Run_2.b", &"x".repeat(64)] {
            assert_eq!(parse_swarm(good).unwrap(), good);
        }
        assert!(parse_swarm("").unwrap_err().contains("empty"));
        assert!(parse_swarm(&"x".repeat(65))
            .unwrap_err()
            .contains("at most 64"));
        for bad in ["a/b", "my swarm", "é", "a\n"] {
            let e = parse_swarm(bad).unwrap_err();
            assert!(e.contains("letters, digits"), "{bad}: {e}");
        }
    }

    #[test]
    fn errors_print_each_cause_once() {
        let missing = std::path::Path::new("/nonexistent/p2ptrain-secret");
        let e = crate::net::secret::SwarmKey::from_file(missing).unwrap_err();
        let text = error_text(anyhow::Error::new(e).as_ref());
        assert!(
            text.starts_with("cannot read the swarm secret /nonexistent"),
            "{text}"
        );
        assert_eq!(text.matches("os error 2").count(), 1, "{text}");
        // A cause the message does not hold is still printed.
        let chained = Err::<(), _>(std::io::Error::other("disk on fire"))
            .context("writing the run record")
            .unwrap_err();
        assert_eq!(
            error_text(chained.as_ref()),
            "writing the run record: disk on fire"
        );
    }
}
