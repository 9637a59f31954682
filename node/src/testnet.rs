//! `p2ptrain testnet`: a whole swarm on this machine, as separate processes.
//!
//! Starts N `p2ptrain node` processes on loopback, bootstraps them all from
//! the first one, follows their JSON event lines, prints one progress line
//! per round on stderr and a JSON summary on stdout. It is the README's main
//! command and what the integration tests drive.

use crate::cli::{check_model_flags, load_data, load_text, ModelChoice, TestnetArgs, TrainArgs};
use crate::driver::{FinalReport, NodeEvent, RoundReport};
use anyhow::{anyhow, bail, Context};
use serde::Serialize;
use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

/// The line printed on stdout when the testnet finishes.
#[derive(Debug, Serialize)]
pub struct Summary {
    /// Node processes.
    pub nodes: usize,
    /// Averaging rounds (the most any node took).
    pub rounds: u64,
    /// Samples trained on, summed over nodes.
    pub samples: u64,
    /// Mean held-out accuracy of the nodes' final (averaged) models.
    pub test_accuracy: Option<f32>,
    /// Lowest held-out accuracy among the nodes.
    pub test_accuracy_min: Option<f32>,
    /// Mean held-out loss.
    pub test_loss: f32,
    /// Mean training loss of the last round.
    pub final_loss: f32,
    /// Seconds from the first spawn to the last node's report.
    pub wall_s: f64,
    /// Training samples per second over the whole swarm.
    pub samples_per_s: f64,
    /// Payload bytes sent, summed over nodes.
    pub bytes_sent: u64,
    /// Whether every node ended with bit-identical parameters.
    pub models_agree: bool,
    /// Rounds in which every group member contributed to every part, summed over nodes.
    pub complete_rounds: u64,
    /// Seconds a node spent averaging (mean over nodes).
    pub averaging_s: f64,
    /// Seconds a node spent in local training steps (mean over nodes).
    pub training_s: f64,
    /// Pipeline figures, when the model was cut into stages.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<PipelineSummary>,
}

/// Pipeline figures of a testnet run (`--model char-lm`).
#[derive(Debug, Serialize)]
pub struct PipelineSummary {
    /// Stages the model was cut into.
    pub stages: u32,
    /// Peers that held each stage.
    pub stage_peers: Vec<usize>,
    /// Held-out bits per character of the final model (mean over first-stage peers).
    pub val_loss: Option<f64>,
    /// Held-out bits per character before training.
    pub initial_val_loss: Option<f64>,
    /// Tokens trained on by the swarm.
    pub tokens: u64,
    /// Tokens per second of the swarm over the training phase.
    pub tokens_per_s: f64,
    /// Mean fraction of the training phase a node's compute sat idle.
    pub bubble: f64,
    /// Activation and gradient bytes per optimizer step (mean over first-stage peers).
    pub activation_bytes_per_step: f64,
    /// Micro-batches sent again after a timeout, summed over nodes.
    pub resent: u64,
    /// Per stage, the most training micro-batches whose activations one of
    /// its peers kept at once for the backward pass (see `--max-in-flight`).
    pub peak_held_micro_batches: Vec<usize>,
}

enum Line {
    Text(usize, String),
    Eof(usize),
}

fn train_flags(t: &TrainArgs) -> Vec<String> {
    let mut v = vec![
        "--model".into(),
        t.model.to_string(),
        "--batch-size".into(),
        t.batch_size.to_string(),
        "--lr".into(),
        t.lr.to_string(),
        "--epochs".into(),
        t.epochs.to_string(),
        "--average-every".into(),
        t.average_every.to_string(),
        "--eval-every".into(),
        t.eval_every.to_string(),
        "--join-window-secs".into(),
        t.join_window_secs.to_string(),
        "--reduce-timeout-secs".into(),
        t.reduce_timeout_secs.to_string(),
        "--compression".into(),
        t.compression.to_string(),
        "--aggregation".into(),
        aggregation_flag(t.aggregation),
        "--device".into(),
        t.device.to_string(),
        "--stages".into(),
        t.stages.to_string(),
        "--micro-batches".into(),
        t.micro_batches.to_string(),
        "--stage-timeout-secs".into(),
        t.stage_timeout_secs.to_string(),
    ];
    if t.fixed_deadline {
        v.push("--fixed-deadline".into());
    }
    if let Some(d) = &t.data {
        v.push("--data".into());
        v.push(d.display().to_string());
    }
    if let Some(n) = t.max_in_flight {
        v.push("--max-in-flight".into());
        v.push(n.to_string());
    }
    if let Some(s) = t.steps {
        v.push("--steps".into());
        v.push(s.to_string());
    }
    if let Some(lr) = t.outer_lr {
        v.push("--outer-lr".into());
        v.push(lr.to_string());
    }
    if let Some(mu) = t.outer_momentum {
        v.push("--outer-momentum".into());
        v.push(mu.to_string());
    }
    if let Some(s) = t.seed {
        v.push("--seed".into());
        v.push(s.to_string());
    }
    v
}

/// The `--aggregation` value that parses back to `a`.
fn aggregation_flag(a: p2ptrain_protocol::averaging::Aggregation) -> String {
    use p2ptrain_protocol::averaging::Aggregation;
    match a {
        Aggregation::Mean => "mean".into(),
        Aggregation::TrimmedMean { trim } => format!("trimmed-mean:{trim}"),
        Aggregation::CenteredClip { radius } => format!("centered-clip:{radius}"),
    }
}

/// Per-node observation flags: node i gets the metrics port + i and its own run directory.
struct Observe {
    metrics: Option<std::net::SocketAddr>,
    run_dir: Option<std::path::PathBuf>,
    /// Tests only: nodes from this index on get `--misbehave`.
    hostile: Option<(usize, crate::misbehave::Misbehave)>,
}

impl Observe {
    fn flags(&self, index: usize) -> anyhow::Result<Vec<String>> {
        let mut v = Vec::new();
        if let Some((from, how)) = self.hostile {
            if index >= from {
                v.push("--misbehave".into());
                v.push(how.to_string());
            }
        }
        if let Some(addr) = self.metrics {
            if addr.port() == 0 {
                bail!(
                    "--metrics {addr}: the testnet needs a fixed port (node i serves on port + i)"
                );
            }
            let wanted = usize::from(addr.port()) + index;
            let port = u16::try_from(wanted).map_err(|_| {
                anyhow!(
                    "--metrics {addr}: node {index} would need port {wanted}; pick a lower port"
                )
            })?;
            v.push("--metrics".into());
            v.push(std::net::SocketAddr::new(addr.ip(), port).to_string());
        }
        if let Some(dir) = &self.run_dir {
            v.push("--run-dir".into());
            v.push(dir.join(format!("node-{index}")).display().to_string());
        }
        Ok(v)
    }
}

/// Refuses a `--run-dir` that holds run records (an earlier testnet's, or any
/// run's the plot would read with this one's): nodes
/// append to their `metrics.jsonl` (a resumed node goes on with its own),
/// and a testnet never resumes, so its plot would average two runs' losses
/// per round and draw an earlier, larger testnet's extra nodes as its own.
fn refuse_earlier_records(dir: &std::path::Path) -> anyhow::Result<()> {
    // Wherever the plot reads records; none where DIR is not there yet (the
    // nodes create it).
    if let Some(records) = crate::run_record::earlier_records(dir) {
        bail!(
            "--run-dir {} holds an earlier run's records ({}): pick a new directory or remove them; this testnet's nodes would append to them, and the plot would mix the runs",
            dir.display(),
            records.display()
        );
    }
    Ok(())
}

/// SIGTERM and Ctrl-C, waited for while the testnet runs. Unhandled,
/// SIGTERM (from a supervisor, `kill`) would end the testnet process alone
/// and leave its nodes training, holding their ports; and Ctrl-C, which
/// reaches the whole process group, would leave each node finishing its
/// round on its own (see [`crate::stop`]). Handled, the testnet returns an
/// error, and dropping its children's handles kills them at once. A closed
/// terminal's SIGHUP keeps its default action (so `nohup` still works).
struct StopSignals {
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> anyhow::Result<StopSignals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(StopSignals {
                terminate: signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?,
                interrupt: signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?,
            })
        }
        #[cfg(not(unix))]
        Ok(StopSignals {})
    }

    /// Waits for a stop signal; its name.
    async fn recv(&mut self) -> &'static str {
        #[cfg(unix)]
        tokio::select! {
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.interrupt.recv() => "SIGINT (Ctrl-C)",
        }
        #[cfg(not(unix))]
        std::future::pending().await
    }
}

/// `node` settings from the environment that name one node's own files: a
/// testnet's nodes must not inherit them from the user's shell, or they would
/// share one identity (and never meet), one checkpoint or run directory
/// (pruning and appending over each other), or one config file applied to
/// every node (a `metrics` port only the first can bind). `P2PTRAIN_DATA`
/// and `P2PTRAIN_SECRET_FILE` are the same for every node and stay.
const PER_NODE_VARIABLES: [&str; 4] = [
    "P2PTRAIN_CONFIG",
    "P2PTRAIN_KEY",
    "P2PTRAIN_CHECKPOINT_DIR",
    "P2PTRAIN_RUN_DIR",
];

#[allow(clippy::too_many_arguments)]
fn spawn_node(
    index: usize,
    swarm: &str,
    nodes: usize,
    bootstrap: Option<&str>,
    train: &[String],
    checkpoints: Option<&std::path::Path>,
    observe: &Observe,
    lines: mpsc::Sender<Line>,
) -> anyhow::Result<Child> {
    let exe = std::env::current_exe().context("cannot find the p2ptrain executable")?;
    let mut cmd = Command::new(exe);
    cmd.arg("node")
        .args(["--swarm", swarm])
        .args(["--listen", "/ip4/127.0.0.1/udp/0/quic-v1"])
        .arg("--no-mdns")
        .arg("--events")
        .args(["--min-peers", &nodes.to_string()])
        .args(train)
        .args(observe.flags(index)?);
    if let Some(b) = bootstrap {
        cmd.args(["--bootstrap", b]);
    }
    if let Some(dir) = checkpoints {
        cmd.arg("--checkpoint-dir")
            .arg(dir.join(format!("node-{index}")));
    }
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "warn");
    }
    for var in PER_NODE_VARIABLES {
        cmd.env_remove(var);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start node {index}"))?;
    let stdout = child.stdout.take().expect("stdout is piped");
    tokio::spawn(async move {
        let mut reader = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            if lines.send(Line::Text(index, line)).await.is_err() {
                return;
            }
        }
        let _ = lines.send(Line::Eof(index)).await;
    });
    Ok(child)
}

/// Per-round figures gathered from every node before printing one line.
#[derive(Default)]
struct RoundAgg {
    reports: Vec<RoundReport>,
}

/// Runs the testnet to completion; prints the summary line on stdout.
pub async fn run(args: TestnetArgs) -> anyhow::Result<()> {
    let nodes = args.nodes as usize;
    // Fail fast, once, on bad flags or unreadable data rather than in N processes.
    check_model_flags(&args.train)?;
    if args.train.model == ModelChoice::CharLm {
        load_text(args.train.data.as_ref())?;
        if nodes < args.train.stages as usize {
            bail!(
                "--nodes {nodes} cannot hold --stages {}: every stage needs at least one node",
                args.train.stages
            );
        }
    } else {
        load_data(args.train.data.as_ref())?;
    }
    let train = train_flags(&args.train);
    let swarm = format!(
        "testnet-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    );
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout_secs);
    let (tx, mut rx) = mpsc::channel::<Line>(1024);
    let mut children: Vec<Child> = Vec::with_capacity(nodes);
    let ckpt = args.checkpoint_dir.as_deref();
    let observe = Observe {
        metrics: args.metrics,
        run_dir: args.run_dir.clone(),
        hostile: match (args.hostile, args.train.misbehave) {
            (0, _) => None,
            (n, Some(how)) => Some((nodes - n.min(nodes as u64) as usize, how)),
            (_, None) => {
                bail!("--hostile needs --misbehave HOW (flip, nan, scale:FACTOR, deaf:ROUND, mute:ROUND, absent:ROUND, phantom:ROUND, withhold:ROUND, lag:ROUND:SECS or claim-ahead)")
            }
        },
    };
    for i in 0..nodes {
        observe.flags(i)?; // a port range past 65535 fails before any node starts
    }
    if let Some(dir) = &args.run_dir {
        refuse_earlier_records(dir)?;
    }
    if let Some(addr) = args.metrics {
        eprintln!(
            "testnet: node i serves its status page at http://{}:{}+i/",
            addr.ip(),
            addr.port()
        );
    }
    children.push(spawn_node(
        0,
        &swarm,
        nodes,
        None,
        &train,
        ckpt,
        &observe,
        tx.clone(),
    )?);

    let mut finals: BTreeMap<usize, FinalReport> = BTreeMap::new();
    let mut rounds: BTreeMap<u64, RoundAgg> = BTreeMap::new();
    let mut printed_round = 0u64;
    let mut closed = vec![false; nodes];
    let mut signals = StopSignals::install()?;
    loop {
        let line = tokio::select! {
            got = tokio::time::timeout_at(deadline, rx.recv()) => match got {
                Ok(Some(l)) => l,
                Ok(None) => bail!("lost all node output"),
                Err(_) => bail!(
                    "testnet did not finish within {} s (raise --timeout-secs)",
                    args.timeout_secs
                ),
            },
            // Returning drops the children's handles, which kills them.
            name = signals.recv() => bail!("testnet stopped by {name}; its nodes were stopped with it"),
        };
        match line {
            Line::Text(i, text) => {
                let event: NodeEvent = match serde_json::from_str(&text) {
                    Ok(e) => e,
                    Err(_) => {
                        eprintln!("[node {i}] {text}");
                        continue;
                    }
                };
                match event {
                    NodeEvent::Listening { addrs, .. } if i == 0 => {
                        let boot = addrs
                            .iter()
                            .find(|a| a.contains("/ip4/127.0.0.1/"))
                            .or(addrs.first())
                            .ok_or_else(|| anyhow!("node 0 reported no listen address"))?
                            .clone();
                        eprintln!(
                            "testnet: node 0 listening on {boot}; starting {} more",
                            nodes - 1
                        );
                        for j in 1..nodes {
                            children.push(spawn_node(
                                j,
                                &swarm,
                                nodes,
                                Some(&boot),
                                &train,
                                ckpt,
                                &observe,
                                tx.clone(),
                            )?);
                        }
                    }
                    NodeEvent::Listening { .. } => {}
                    NodeEvent::Started {
                        peers,
                        shard,
                        total_steps,
                        stage: None,
                    } => {
                        eprintln!("testnet: node {i} training with {peers} peers, shard {shard}, {total_steps} steps");
                    }
                    NodeEvent::Started {
                        stage: Some(stage), ..
                    } => {
                        eprintln!("testnet: node {i} holds pipeline stage {stage}");
                    }
                    NodeEvent::Evaluated {
                        round,
                        test_accuracy: Some(a),
                        ..
                    } => {
                        eprintln!(
                            "testnet: node {i} after round {round}: test accuracy {:.2}%",
                            a * 100.0
                        );
                    }
                    NodeEvent::Evaluated { .. } => {}
                    NodeEvent::Synced { round, from, .. } => {
                        eprintln!(
                            "testnet: node {i} downloaded the model of round {round} from {from}"
                        );
                    }
                    NodeEvent::Round(r) => {
                        let round = r.round;
                        rounds.entry(round).or_default().reports.push(r);
                        let live = nodes - finals.len();
                        while let Some(agg) = rounds.get(&(printed_round + 1)) {
                            if agg.reports.len() < live {
                                break;
                            }
                            printed_round += 1;
                            print_round(printed_round, agg, started);
                            rounds.remove(&printed_round);
                        }
                    }
                    NodeEvent::Finished(f) => {
                        finals.insert(i, f);
                    }
                }
            }
            Line::Eof(i) => {
                closed[i] = true;
                let status = children[i].wait().await.context("cannot wait for node")?;
                if !status.success() || !finals.contains_key(&i) {
                    bail!("node {i} exited with {status} before finishing (see its log above)");
                }
                if closed.iter().all(|c| *c) {
                    break;
                }
            }
        }
    }
    let summary = summarize(nodes, &finals, started.elapsed());
    if let Some(dir) = &args.run_dir {
        let out = dir.join("loss.png");
        crate::plot::plot_run_dir(dir, &out, false)?;
        eprintln!("testnet: wrote {}", out.display());
    }
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}

fn print_round(round: u64, agg: &RoundAgg, started: Instant) {
    eprintln!("{}", round_line(round, agg, started.elapsed()));
}

/// The progress line of one round, `elapsed` into the run.
fn round_line(round: u64, agg: &RoundAgg, elapsed: Duration) -> String {
    let n = agg.reports.len().max(1) as f32;
    let loss = agg.reports.iter().map(|r| r.loss).sum::<f32>() / n;
    let peers = agg.reports.iter().map(|r| r.peers).max().unwrap_or(0);
    let sps: f64 = agg.reports.iter().map(|r| r.samples_per_s).sum();
    let sent: u64 = agg.reports.iter().map(|r| r.bytes_sent).sum();
    // The node that knows the run's length: in a pipeline only a first
    // stage plans steps (later stages report 0).
    let lead = agg.reports.iter().max_by_key(|r| r.total_steps);
    let total = lead.map(|r| r.total_steps).unwrap_or(0);
    let step = lead.map(RoundReport::progress_step).unwrap_or(0);
    format!(
        "round {round:>4}  step {step:>6}/{total}  peers {peers:>2}  loss {loss:.4}  {sps:>8.0} samples/s  sent {:>8.1} MB  {:>6.1} s",
        sent as f64 / 1e6,
        elapsed.as_secs_f64()
    )
}

fn summarize(nodes: usize, finals: &BTreeMap<usize, FinalReport>, wall: Duration) -> Summary {
    let n = finals.len().max(1) as f32;
    let accs: Vec<f32> = finals.values().filter_map(|f| f.test_accuracy).collect();
    let samples: u64 = finals.values().map(|f| f.samples).sum();
    let finite_mean = |v: Vec<f32>| {
        let v: Vec<f32> = v.into_iter().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            f32::NAN
        } else {
            v.iter().sum::<f32>() / v.len() as f32
        }
    };
    // In a pipeline only replicas of the same stage hold the same parameters.
    let models_agree = finals.values().all(|f| {
        finals.values().all(|g| {
            let stage = |r: &FinalReport| r.pipeline.as_ref().map(|p| p.stage);
            stage(f) != stage(g) || f.model_digest == g.model_digest
        })
    });
    Summary {
        nodes,
        rounds: finals.values().map(|f| f.rounds).max().unwrap_or(0),
        samples,
        test_accuracy: (!accs.is_empty()).then(|| accs.iter().sum::<f32>() / accs.len() as f32),
        test_accuracy_min: accs.iter().copied().reduce(f32::min),
        test_loss: finite_mean(finals.values().map(|f| f.test_loss).collect()),
        final_loss: finite_mean(finals.values().map(|f| f.final_loss).collect()),
        wall_s: wall.as_secs_f64(),
        samples_per_s: samples as f64 / wall.as_secs_f64().max(1e-9),
        bytes_sent: finals.values().map(|f| f.bytes_sent).sum(),
        models_agree,
        complete_rounds: finals.values().map(|f| f.complete_rounds).sum(),
        averaging_s: finals.values().map(|f| f.averaging_s).sum::<f64>() / f64::from(n),
        training_s: finals.values().map(|f| f.training_s).sum::<f64>() / f64::from(n),
        pipeline: summarize_pipeline(finals),
    }
}

fn summarize_pipeline(finals: &BTreeMap<usize, FinalReport>) -> Option<PipelineSummary> {
    let reports: Vec<&crate::driver::PipelineReport> = finals
        .values()
        .filter_map(|f| f.pipeline.as_ref())
        .collect();
    let stages = reports.first()?.stages;
    let mut stage_peers = vec![0usize; stages as usize];
    let mut peak_held = vec![0usize; stages as usize];
    for r in &reports {
        if let Some(c) = stage_peers.get_mut(r.stage as usize) {
            *c += 1;
        }
        if let Some(p) = peak_held.get_mut(r.stage as usize) {
            *p = (*p).max(r.peak_held_micro_batches);
        }
    }
    let first: Vec<_> = reports.iter().filter(|r| r.stage == 0).collect();
    let mean_of = |v: Vec<f64>| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
    Some(PipelineSummary {
        stages,
        stage_peers,
        val_loss: mean_of(first.iter().filter_map(|r| r.val_bpc).collect()),
        initial_val_loss: mean_of(first.iter().filter_map(|r| r.initial_val_bpc).collect()),
        tokens: first.iter().map(|r| r.tokens).sum(),
        tokens_per_s: first.iter().map(|r| r.tokens_per_s).sum(),
        bubble: mean_of(reports.iter().map(|r| r.bubble).collect()).unwrap_or(0.0),
        activation_bytes_per_step: mean_of(
            first.iter().map(|r| r.activation_bytes_per_step).collect(),
        )
        .unwrap_or(0.0),
        resent: reports.iter().map(|r| r.resent).sum(),
        peak_held_micro_batches: peak_held,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(step: u64, total_steps: u64) -> RoundReport {
        serde_json::from_value(serde_json::json!({
            "round": 1, "step": step, "total_steps": total_steps, "peers": 2,
            "loss": 3.0, "samples": 64, "samples_per_s": 100.0, "bytes_sent": 0,
            "dropped": 0, "averaging_s": 0.1, "model_digest": "00",
        }))
        .expect("a round report")
    }

    #[test]
    fn a_pipelines_progress_line_counts_the_first_stages_steps() {
        // A later stage plans no steps (0); its report may come in first.
        let agg = RoundAgg {
            reports: vec![report(0, 0), report(10, 80)],
        };
        let line = round_line(1, &agg, Duration::from_secs(2));
        assert!(line.contains("step     10/80"), "{line}");
    }

    #[test]
    fn a_testnet_progress_line_shows_where_the_run_stands() {
        let mut joiner = report(10, 80);
        joiner.run_step = 40;
        let agg = RoundAgg {
            reports: vec![joiner],
        };
        let line = round_line(4, &agg, Duration::from_secs(2));
        assert!(line.contains("step     40/80"), "{line}");
    }
}
