//! Averaging throughput through the real stack: N `p2ptrain-bench avg-node`
//! processes on loopback, each running `p2ptrain_node::driver::run` (libp2p
//! QUIC, gossip matchmaking, the butterfly all-reduce of
//! `p2ptrain_protocol::averaging`) with a [`SyntheticTask`] whose parameter
//! vector has the requested length. One local "step" per round keeps the
//! vectors different between peers and rounds, and each node checks that
//! what comes back is the exact mean.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use libp2p::identity::Keypair;
use libp2p::Multiaddr;
use p2ptrain_node::driver::{self, Budget, NodeConfig, NodeEvent, Schedule};
use p2ptrain_node::net::settings::RunSettings;
use p2ptrain_node::net::NetConfig;
use p2ptrain_node::task::{validate_params, EvalStats, Shard, StepStats, Task, TaskError};
use p2ptrain_protocol::averaging::{Aggregation, AveragingConfig, DEFAULT_PART_VALUES};
use p2ptrain_protocol::tensor::Encoding;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;

use crate::util::{emit, median};

/// Flags of `p2ptrain-bench allreduce`.
#[derive(Debug, Clone, clap::Args)]
pub struct AllreduceArgs {
    /// Node processes.
    #[arg(long, default_value_t = 2)]
    pub peers: usize,
    /// Length of the averaged f32 vector.
    #[arg(long, default_value_t = 1_000_000)]
    pub values: usize,
    /// Averaging rounds; the first is a warm-up and not counted.
    #[arg(long, default_value_t = 5)]
    pub rounds: u64,
    /// Averaging codec: f32, f16, bf16, int8 or int8:BLOCK.
    #[arg(long, default_value = "f32")]
    pub compression: String,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout_secs: u64,
    /// Values per averaging part before a member's share is cut into several
    /// (the protocol's `part_values`); a huge value sends one part per member.
    #[arg(long, default_value_t = DEFAULT_PART_VALUES)]
    pub part_values: usize,
}

/// Flags of `p2ptrain-bench avg-node` (one process of `allreduce`).
#[derive(Debug, clap::Args)]
pub struct AvgNodeArgs {
    /// This node's index, 0..peers; it fixes the values it contributes.
    #[arg(long)]
    pub index: u32,
    /// Node processes in the swarm.
    #[arg(long)]
    pub peers: usize,
    /// Length of the averaged vector.
    #[arg(long)]
    pub values: usize,
    /// Averaging rounds.
    #[arg(long)]
    pub rounds: u64,
    /// Averaging codec.
    #[arg(long)]
    pub compression: String,
    /// Values per averaging part.
    #[arg(long)]
    pub part_values: usize,
    /// Swarm name (unique per run).
    #[arg(long)]
    pub swarm: String,
    /// Address of the first node.
    #[arg(long)]
    pub bootstrap: Option<Multiaddr>,
}

/// Entries after which [`increment`]'s pattern repeats.
const PATTERN: usize = 1024;

/// Value node `index` adds to entry `j` on each step.
fn increment(index: u32, j: usize) -> f32 {
    index as f32 + (j % PATTERN) as f32 / PATTERN as f32
}

/// `increment(0, j)` for `j` in `0..PATTERN`: walking the vector in blocks of
/// [`PATTERN`] beside this table vectorises, where `j % PATTERN` per entry
/// does not, so the task's own passes take little of the CPU the nodes
/// being measured share.
fn pattern() -> Vec<f32> {
    (0..PATTERN).map(|j| increment(0, j)).collect()
}

/// A learner with no model: a vector of `n` values to which each "step" adds
/// [`increment`]. After `s` steps and averaging among `peers` nodes with
/// indices `0..peers`, entry `j` must be `s * mean_k increment(k, j)`;
/// every `set_params` records its largest deviation from that.
struct SyntheticTask {
    values: Vec<f32>,
    index: u32,
    peers: usize,
    steps: u64,
    /// [`pattern`].
    pattern: Vec<f32>,
    max_err: Arc<Mutex<f64>>,
}

impl SyntheticTask {
    /// The largest `|v - expected|` over `values`. Every expected value is a
    /// multiple of 1/1024 below `steps × peers`, so f32 holds it exactly while
    /// that is under 2^14 (thousands of rounds): the difference is then
    /// rounded once.
    fn max_deviation(&self, values: &[f32]) -> f64 {
        let s = self.steps as f32;
        let mean_index = (self.peers as f32 - 1.0) / 2.0;
        // Deviations are finite and non-negative (`values` were checked
        // finite), so their bit patterns order as they do: an integer
        // maximum, which vectorises where a float one does not.
        let mut worst = 0u32;
        for block in values.chunks(PATTERN) {
            for (v, offset) in block.iter().zip(&self.pattern) {
                let expected = s * (mean_index + offset);
                worst = worst.max((v - expected).abs().to_bits());
            }
        }
        f64::from(f32::from_bits(worst))
    }
}

impl Task for SyntheticTask {
    fn num_params(&self) -> usize {
        self.values.len()
    }

    fn params_into(&self, out: &mut Vec<f32>) {
        out.clear();
        out.extend_from_slice(&self.values);
    }

    fn set_params(&mut self, values: &[f32]) -> Result<(), TaskError> {
        validate_params(self.values.len(), values)?;
        let err = self.max_deviation(values);
        if let Ok(mut m) = self.max_err.lock() {
            *m = m.max(err);
        }
        self.values.copy_from_slice(values);
        Ok(())
    }

    fn num_train_samples(&self) -> usize {
        1024
    }

    fn set_shard(&mut self, _shard: Shard) {}

    fn train_step(&mut self) -> Result<StepStats, TaskError> {
        let index = self.index as f32;
        for block in self.values.chunks_mut(PATTERN) {
            for (v, offset) in block.iter_mut().zip(&self.pattern) {
                *v += index + offset;
            }
        }
        self.steps += 1;
        Ok(StepStats {
            loss: 0.0,
            samples: 1,
        })
    }

    fn evaluate(&mut self) -> Result<EvalStats, TaskError> {
        Ok(EvalStats {
            loss: 0.0,
            accuracy: None,
            samples: 0,
        })
    }
}

/// One node process: runs the driver with a [`SyntheticTask`], printing the
/// driver's JSON events and, at the end, `{"check": ...}` with the largest
/// error seen in an averaged vector.
pub async fn run_node(args: AvgNodeArgs) -> anyhow::Result<()> {
    let compression: Encoding = args
        .compression
        .parse()
        .map_err(|e| anyhow::anyhow!("--compression: {e}"))?;
    let max_err = Arc::new(Mutex::new(0.0f64));
    let task = SyntheticTask {
        values: vec![0.0; args.values],
        index: args.index,
        peers: args.peers,
        steps: 0,
        pattern: pattern(),
        max_err: max_err.clone(),
    };
    let config = NodeConfig {
        net: NetConfig {
            swarm: args.swarm.clone(),
            listen: vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse()?],
            bootstrap: args.bootstrap.into_iter().collect(),
            mdns: false,
            request_timeout: Duration::from_secs(120),
            key: None,
            relay: false,
            misbehave_topic: None,
            settings: RunSettings::new(
                &format!("synthetic:{}", args.values),
                &[0; 32],
                Aggregation::Mean,
                &args.compression,
                None,
            ),
        },
        stop: Default::default(),
        min_peers: args.peers,
        wait_for_peers: Duration::from_secs(60),
        schedule: Schedule {
            budget: Budget::Steps(args.rounds),
            average_every: 1,
            samples_per_step: 1,
            eval_every: 0,
        },
        averaging: AveragingConfig {
            compression,
            part_values: args.part_values,
            ..driver::network_averaging(Duration::from_secs(10), Duration::from_secs(120))
        },
        seed: 1,
        linger: Duration::from_secs(2),
        checkpoints: None,
        resume: None,
        misbehave: None,
        misbehave_state: driver::StateMisbehave::None,
        outer: None,
        top_k: None,
    };
    let reporter: driver::Reporter = Box::new(|event: &NodeEvent| {
        if let Ok(v) = serde_json::to_value(event) {
            emit(&v);
        }
    });
    driver::run(
        config,
        Keypair::generate_ed25519(),
        Box::new(task),
        reporter,
    )
    .await?;
    let err = *max_err.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    emit(&json!({ "check": { "max_abs_err": err } }));
    Ok(())
}

/// A line from child `index`, or its end.
enum Line {
    Text(usize, String),
    Eof,
}

/// Starts N node processes, collects their round reports and prints one JSON
/// line with seconds per averaging round.
///
/// A round's time is, for each round after the first, the smallest
/// `averaging_s` over the nodes: the node that joined last waits for no
/// one, so its time is matchmaking plus the all-reduce itself (the others
/// also waited for it to arrive). The figure is the median over rounds.
pub async fn run(args: AllreduceArgs) -> anyhow::Result<()> {
    if args.peers < 2 || args.rounds < 2 {
        bail!("--peers and --rounds must be at least 2");
    }
    let exe = std::env::current_exe()?;
    let swarm = format!("bench-{}-{}", std::process::id(), args.values);
    let (tx, mut rx) = mpsc::channel::<Line>(1024);
    let mut children = Vec::new();
    let spawn =
        |index: usize, bootstrap: Option<String>| -> anyhow::Result<tokio::process::Child> {
            let mut cmd = Command::new(&exe);
            cmd.arg("avg-node")
                .args(["--index", &index.to_string()])
                .args(["--peers", &args.peers.to_string()])
                .args(["--values", &args.values.to_string()])
                .args(["--rounds", &args.rounds.to_string()])
                .args(["--compression", &args.compression])
                .args(["--part-values", &args.part_values.to_string()])
                .args(["--swarm", &swarm]);
            if let Some(b) = bootstrap {
                cmd.args(["--bootstrap", &b]);
            }
            cmd.stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true);
            let mut child = cmd.spawn().context("starting an avg-node process")?;
            let stdout = child.stdout.take().context("child stdout")?;
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stdout).lines();
                while let Ok(Some(l)) = lines.next_line().await {
                    if tx.send(Line::Text(index, l)).await.is_err() {
                        return;
                    }
                }
                let _ = tx.send(Line::Eof).await;
            });
            Ok(child)
        };

    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout_secs);
    children.push(spawn(0, None)?);
    // rounds[r][node] = (averaging_s, group size, dropped)
    let mut rounds: BTreeMap<u64, BTreeMap<usize, (f64, usize, usize)>> = BTreeMap::new();
    let mut max_err = 0.0f64;
    let mut bytes_sent = BTreeMap::new();
    // sent_by[node][round] = payload bytes the node had sent when the round ended
    let mut sent_by: BTreeMap<usize, BTreeMap<u64, u64>> = BTreeMap::new();
    let mut finished = 0usize;
    let mut checked = 0usize;
    let mut ended = 0usize;
    while ended < children.len() {
        let line = match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(l)) => l,
            Ok(None) => break,
            Err(_) => bail!(
                "allreduce of {} values on {} peers timed out after {} s",
                args.values,
                args.peers,
                args.timeout_secs
            ),
        };
        let (node, text) = match line {
            Line::Text(i, t) => (i, t),
            Line::Eof => {
                ended += 1;
                continue;
            }
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        if let Some(err) = v.pointer("/check/max_abs_err").and_then(|e| e.as_f64()) {
            max_err = max_err.max(err);
            checked += 1;
            continue;
        }
        match serde_json::from_value::<NodeEvent>(v) {
            Ok(NodeEvent::Listening { addrs, .. }) if node == 0 => {
                let addr = addrs
                    .iter()
                    .find(|a| a.contains("127.0.0.1"))
                    .or(addrs.first())
                    .context("node 0 reported no address")?
                    .clone();
                for i in 1..args.peers {
                    children.push(spawn(i, Some(addr.clone()))?);
                }
            }
            Ok(NodeEvent::Round(r)) => {
                rounds
                    .entry(r.round)
                    .or_default()
                    .insert(node, (r.averaging_s, r.peers, r.dropped));
                sent_by
                    .entry(node)
                    .or_default()
                    .insert(r.round, r.bytes_sent);
            }
            Ok(NodeEvent::Finished(f)) => {
                bytes_sent.insert(node, f.bytes_sent);
                finished += 1;
            }
            _ => {}
        }
    }
    for mut c in children {
        let _ = tokio::time::timeout(Duration::from_secs(10), c.wait()).await;
    }
    if finished < args.peers || checked < args.peers {
        bail!(
            "only {finished} of {} nodes finished (see their errors above)",
            args.peers
        );
    }
    let mut per_round = Vec::new();
    let mut per_round_mean = Vec::new();
    let mut complete = true;
    for (round, nodes) in &rounds {
        let full =
            nodes.len() == args.peers && nodes.values().all(|&(_, g, d)| g == args.peers && d == 0);
        complete &= full;
        if *round == 1 || !full {
            continue;
        }
        let times: Vec<f64> = nodes.values().map(|t| t.0).collect();
        per_round.push(times.iter().copied().fold(f64::INFINITY, f64::min));
        per_round_mean.push(times.iter().sum::<f64>() / times.len() as f64);
    }
    let s = median(&per_round);
    let bytes = args.values as f64 * 4.0;
    let bound_bytes = 2.0 * (args.peers as f64 - 1.0) / args.peers as f64 * bytes;
    let total_sent: u64 = bytes_sent.values().sum();
    let sent_per_round = sent_per_round_after_the_first(&sent_by)
        .unwrap_or(total_sent as f64 / (args.peers as f64 * rounds.len().max(1) as f64));
    emit(&json!({
        "bench": "allreduce",
        "impl": "p2ptrain",
        "peers": args.peers,
        "values": args.values,
        "compression": args.compression,
        "part_values": args.part_values,
        "rounds_timed": per_round.len(),
        "s_median": s,
        "s_min": per_round.iter().copied().fold(f64::INFINITY, f64::min),
        "s_max": per_round.iter().copied().fold(0.0f64, f64::max),
        "s_node_mean_median": median(&per_round_mean),
        "bytes_f32": bytes,
        "bound_bytes_per_peer": bound_bytes,
        "busbw_mb_s": bound_bytes / s / 1e6,
        "bytes_sent_per_peer_round": sent_per_round,
        "all_rounds_complete": complete,
        "max_abs_err": max_err,
    }));
    Ok(())
}

/// Payload bytes a node sent per round, mean over nodes, from each node's
/// counter at the end of its first and last rounds: the first round also
/// carries the start-up traffic (discovery, state announcements) and the
/// end the lingering, neither of which is the all-reduce's. `None` where no
/// node reported two rounds.
fn sent_per_round_after_the_first(sent_by: &BTreeMap<usize, BTreeMap<u64, u64>>) -> Option<f64> {
    let per_node: Vec<f64> = sent_by
        .values()
        .filter_map(|by_round| {
            let (first_round, first) = by_round.first_key_value()?;
            let (last_round, last) = by_round.last_key_value()?;
            (last_round > first_round)
                .then(|| last.saturating_sub(*first) as f64 / (last_round - first_round) as f64)
        })
        .collect();
    (!per_node.is_empty()).then(|| per_node.iter().sum::<f64>() / per_node.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_task_checks_the_mean() {
        let max_err = Arc::new(Mutex::new(0.0));
        let mut t = SyntheticTask {
            values: vec![0.0; 3000],
            index: 1,
            peers: 2,
            steps: 0,
            pattern: pattern(),
            max_err: max_err.clone(),
        };
        t.train_step().unwrap();
        let stepped: Vec<f32> = (0..3000).map(|j| increment(1, j)).collect();
        assert_eq!(t.values, stepped);
        // The exact mean of nodes 0 and 1 after one step.
        let mean: Vec<f32> = (0..3000)
            .map(|j| (increment(0, j) + increment(1, j)) / 2.0)
            .collect();
        t.set_params(&mean).unwrap();
        assert_eq!(*max_err.lock().unwrap(), 0.0);
        let mut off = mean.clone();
        off[5] += 0.5;
        t.set_params(&off).unwrap();
        assert_eq!(*max_err.lock().unwrap(), 0.5);
        // Past the last whole block, and below the mean.
        let mut off = mean.clone();
        off[2999] -= 0.75;
        t.set_params(&off).unwrap();
        assert_eq!(*max_err.lock().unwrap(), 0.75);
    }

    #[test]
    fn the_payload_per_round_leaves_the_first_round_out() {
        let mut sent_by = BTreeMap::new();
        // Node 0: 5,000 bytes of start-up and round 1, then 1,000 a round.
        sent_by.insert(0, BTreeMap::from([(1, 5_000), (2, 6_000), (4, 8_000)]));
        // Node 1: 1,200 a round after its first.
        sent_by.insert(1, BTreeMap::from([(1, 3_000), (3, 5_400)]));
        // Node 2 reported one round only: no figure of its own.
        sent_by.insert(2, BTreeMap::from([(1, 9_999)]));
        assert_eq!(sent_per_round_after_the_first(&sent_by), Some(1_100.0));
        assert_eq!(sent_per_round_after_the_first(&BTreeMap::new()), None);
    }
}
