//! The one loop that joins network, protocol and compute.
//!
//! It feeds network events and timer ticks into the sans-IO [`Averager`],
//! carries out the transmits it returns, and asks the compute thread for
//! local steps between averaging rounds. Every wait has a deadline: the
//! averager's own timeouts bound each round, and joining the swarm is bounded
//! by `wait_for_peers`.

mod diloco;
mod frames;
mod pipeline;
mod stage_checkpoint;
mod sync;

pub use pipeline::{
    parse_stage_model_name, run_pipeline, run_pipeline_with_metrics, stage_model_name,
    PipelineConfig, PipelineReport,
};
pub use stage_checkpoint::{StageCheckpoints, StageResume, StageResumeError};
pub use sync::Misbehave as StateMisbehave;

use crate::checkpoint::{self, Checkpoint, CheckpointError, CheckpointMeta};
use crate::compute::{Compute, ComputeError, ComputeGone};
use crate::identity::node_id_of;
use crate::join_proof::{JoinProofError, SignedJoins, StageScope};
use crate::metrics::Metrics;
use crate::net::{NetConfig, NetError, NetEvent, NetHandle, Network};
use crate::task::{Shard, Task};
use libp2p::{identity::Keypair, Multiaddr, PeerId};
use p2ptrain_protocol::averaging::{
    Averager, AveragingConfig, AveragingError, AvgEvent, AvgMessage, Destination, RoundOutcome,
    Transmit,
};
use p2ptrain_protocol::outer::{OuterConfig, OuterError};
use p2ptrain_protocol::statesync::{Download, Vouches};
use p2ptrain_protocol::swarm_round::SwarmRound;
use p2ptrain_protocol::wire::{self, Message, Progress};
use p2ptrain_protocol::{shards, NodeId};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::{debug, error, info, info_span, warn, Instrument};

/// How much training a node does before it stops.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Budget {
    /// This many local optimisation steps on every peer.
    Steps(u64),
    /// This many passes over the whole training set by the swarm together.
    Epochs(f64),
}

/// When to train and when to average.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    /// When to stop.
    pub budget: Budget,
    /// Local steps between averaging rounds.
    pub average_every: u64,
    /// Samples one local step consumes (the batch size), to turn epochs into steps.
    pub samples_per_step: u64,
    /// Evaluate on held-out data every this many rounds, for an accuracy
    /// curve and time-to-accuracy (0: only at the end).
    pub eval_every: u64,
}

impl Schedule {
    /// Local steps each peer takes, given the swarm size and data set size.
    pub fn total_steps(&self, peers: usize, train_samples: usize) -> u64 {
        match self.budget {
            Budget::Steps(s) => s,
            Budget::Epochs(e) => {
                let per_peer = e * train_samples as f64 / peers.max(1) as f64;
                (per_peer / self.samples_per_step.max(1) as f64)
                    .ceil()
                    .max(1.0) as u64
            }
        }
    }

    /// The run length a node that planned an epoch budget for `planned`
    /// peers (those it saw when it started) takes after averaging round 1
    /// in a group of `group` (see [`Schedule::total_steps`]): the plan for
    /// the group where that is larger, so that members that started moments
    /// apart, and saw fewer peers than came, end together with those that
    /// saw them all. `None` otherwise: a step budget, a later round, or a
    /// group no larger than planned for (a peer left out of round 1, or a
    /// swarm beyond the group size limit, keeps the plan every node made).
    pub fn first_group_plan(
        &self,
        round: u64,
        group: usize,
        planned: usize,
        train_samples: usize,
    ) -> Option<u64> {
        let epochs = matches!(self.budget, Budget::Epochs(_));
        (epochs && round == 1 && group > planned).then(|| self.total_steps(group, train_samples))
    }
}

/// Round deadlines for real networks.
///
/// The leader closes a group as soon as every live peer has joined, so a long
/// join window costs nothing when peers are healthy; it only bounds the wait
/// for a straggler. QUIC already delivers reliably, so retransmits only
/// matter after a broken connection and are kept rare: a full parameter part
/// re-sent too eagerly would double the traffic of a slow link.
pub fn network_averaging(join_window: Duration, reduce_timeout: Duration) -> AveragingConfig {
    AveragingConfig {
        join_window,
        group_timeout: join_window * 2,
        reduce_timeout,
        adaptive_deadline: true,
        retry_interval: (reduce_timeout / 3).max(Duration::from_millis(100)),
        join_retry_interval: Duration::from_secs(1),
        ..AveragingConfig::default()
    }
}

/// Peers × samples up to which the metrics registry is told every peer's shard size.
const OBSERVE_SHARDS_LIMIT: u64 = 4_000_000;
/// How long a node that syncs waits for its peers to say which state they hold.
const SYNC_WAIT: Duration = Duration::from_secs(5);
/// Downloads a node that is behind tries before training on with its own model.
const MAX_SYNC_ATTEMPTS: u32 = 3;
/// Rounds behind the swarm past which a node that synced or averaged before
/// downloads the swarm's model again rather than bring its own, which
/// missed those rounds, into the next average.
const FAR_BEHIND_ROUNDS: u64 = 3;

/// Everything a node needs to run, apart from its identity and task.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Network settings.
    pub net: NetConfig,
    /// Asked for by Ctrl-C or SIGTERM (see [`crate::stop`]): a data-parallel
    /// node stops at the next round boundary, checkpointed.
    pub stop: crate::stop::StopRequest,
    /// Start training only once this many peers (this one included) are in the swarm.
    pub min_peers: usize,
    /// Give up if `min_peers` are not there after this long.
    pub wait_for_peers: Duration,
    /// Training schedule.
    pub schedule: Schedule,
    /// Averaging round deadlines.
    pub averaging: AveragingConfig,
    /// Swarm-wide seed for data order.
    pub seed: u64,
    /// After the last round, keep answering peers this long so they can finish theirs.
    pub linger: Duration,
    /// Where and how often to write checkpoints; `None` writes none.
    pub checkpoints: Option<CheckpointPolicy>,
    /// A verified checkpoint to continue from instead of the initial weights.
    pub resume: Option<Checkpoint>,
    /// Tests only: corrupt every averaging payload this node sends.
    pub misbehave: Option<crate::misbehave::Misbehave>,
    /// Test only: misbehave as a state server (see [`Misbehave`]).
    pub misbehave_state: StateMisbehave,
    /// DiLoCo: average pseudo-gradients and take an outer Nesterov step with
    /// these settings; `None` averages the parameters themselves.
    pub outer: Option<OuterConfig>,
    /// DiLoCo only: send this fraction (in (0, 1]) of each pseudo-gradient's
    /// entries, the largest, carrying the rest into later rounds (top-k with
    /// error feedback). Turns `averaging.sparse` on.
    pub top_k: Option<f64>,
}

/// When and where a node writes checkpoints.
#[derive(Debug, Clone)]
pub struct CheckpointPolicy {
    /// Directory of checkpoint files.
    pub dir: PathBuf,
    /// Write after every this many rounds (and after the last one).
    pub every_rounds: u64,
    /// Recorded in each checkpoint so a resume can check it fits.
    pub model: String,
}

/// Where a run stands: what a checkpoint records beside the model.
#[derive(Debug, Clone, Copy)]
struct RunPoint {
    round: u64,
    step: u64,
    samples: u64,
}

/// Progress reports, in the order they happen. Serialized as JSON event lines.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum NodeEvent {
    /// The node is up; give these addresses to peers as `--bootstrap`.
    Listening {
        /// This node's peer id.
        peer_id: String,
        /// Full multiaddrs including `/p2p/PEER_ID`.
        addrs: Vec<String>,
    },
    /// Enough peers are here; training starts.
    Started {
        /// Swarm size, this node included.
        peers: usize,
        /// Samples in this node's shard.
        shard: usize,
        /// Local steps this node will take (0: set by the pipeline's first stage).
        total_steps: u64,
        /// In a pipeline, the stage this node holds.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stage: Option<u32>,
    },
    /// The model was evaluated on held-out data during training (`--eval-every`).
    Evaluated {
        /// Rounds done.
        round: u64,
        /// Local steps done.
        step: u64,
        /// Held-out accuracy, for classifiers.
        test_accuracy: Option<f32>,
        /// Held-out loss.
        test_loss: f32,
    },
    /// The node was behind and downloaded the model the swarm vouches for.
    Synced {
        /// The round the downloaded parameters are the result of.
        round: u64,
        /// The member that served the most chunks.
        from: String,
        /// blake3 of the downloaded parameters, hex.
        model_digest: String,
        /// Chunks the state came in.
        #[serde(default)]
        chunks: u32,
        /// Peers that vouched for the state.
        #[serde(default)]
        vouchers: usize,
        /// The vouchers still members when the download began: the peers it asked.
        #[serde(default)]
        holders: Vec<String>,
        /// Verified chunks each peer served.
        #[serde(default)]
        sources: BTreeMap<String, u32>,
        /// Peers avoided during the download, and why (`corrupt`, `timeout`, ...).
        #[serde(default)]
        avoided: BTreeMap<String, String>,
        /// Seconds the download took.
        #[serde(default)]
        secs: f64,
    },
    /// An averaging round ended.
    Round(RoundReport),
    /// Training ended and the final model was evaluated.
    Finished(FinalReport),
}

/// Figures of one round.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoundReport {
    /// Round number, from 1.
    pub round: u64,
    /// Local steps taken so far.
    pub step: u64,
    /// Where the run stands after this round: the steps of its schedule
    /// through this round. A node that downloaded the swarm's model, or
    /// skipped rounds to catch up, counts those rounds here and not in
    /// `step`. 0 in records written before it existed.
    #[serde(default)]
    pub run_step: u64,
    /// Steps of the run's schedule in all.
    pub total_steps: u64,
    /// Members of this round's group (1 means it averaged alone).
    pub peers: usize,
    /// Mean training loss of this round's local steps.
    #[serde(deserialize_with = "nan_from_null")]
    pub loss: f32,
    /// Samples trained on so far by this node.
    pub samples: u64,
    /// Local training throughput since this node started (a resumed
    /// node's earlier samples and time are not in it).
    pub samples_per_s: f64,
    /// Payload bytes this node has sent so far.
    pub bytes_sent: u64,
    /// Group members that missed a deadline this round.
    pub dropped: usize,
    /// Seconds this round's averaging took.
    pub averaging_s: f64,
    /// Seconds the next all-reduce may take before silent members are
    /// dropped (fitted to measured rounds unless `--fixed-deadline`).
    #[serde(default)]
    pub reduce_deadline_s: f64,
    /// Seconds the next round's leader waits for stragglers (fitted to
    /// measured rounds unless `--fixed-deadline`).
    #[serde(default)]
    pub join_window_s: f64,
    /// blake3 of the parameters after this round, hex.
    pub model_digest: String,
}

impl RoundReport {
    /// The step a progress line shows: where the run stands, or the local
    /// count in records that lack it.
    pub fn progress_step(&self) -> u64 {
        self.run_step.max(self.step)
    }
}

/// Figures of the finished run on one node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FinalReport {
    /// This node's peer id.
    pub peer_id: String,
    /// Averaging rounds of the run, those before a resume included.
    pub rounds: u64,
    /// Local steps of the run, those before a resume included.
    pub steps: u64,
    /// Samples trained on by this node, those before a resume included.
    pub samples: u64,
    /// Held-out accuracy of the final (averaged) model, for classifiers.
    pub test_accuracy: Option<f32>,
    /// Held-out loss of the final model.
    #[serde(deserialize_with = "nan_from_null")]
    pub test_loss: f32,
    /// Mean training loss of the last round this node trained (`null` when
    /// it trained none: resumed at the run's end).
    #[serde(deserialize_with = "nan_from_null")]
    pub final_loss: f32,
    /// Seconds from this node's start (this time, after a resume) to the
    /// end of evaluation; so are the times and counts below.
    pub wall_s: f64,
    /// Payload bytes this node sent.
    pub bytes_sent: u64,
    /// blake3 of the final parameters, hex; equal on peers holding the same model.
    pub model_digest: String,
    /// Rounds since this node started in which every member of the group
    /// contributed to every part.
    pub complete_rounds: u64,
    /// Seconds spent in averaging rounds (matchmaking, all-reduce, waiting for peers).
    pub averaging_s: f64,
    /// Seconds spent in local training steps.
    pub training_s: f64,
    /// Pipeline figures, when the node held a stage of a model cut into stages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<PipelineReport>,
    /// How this node reached each connected peer at the end (peer id →
    /// `direct` or `relay`): traffic takes a relay only where no direct
    /// connection exists.
    #[serde(default)]
    pub paths: std::collections::BTreeMap<String, crate::net::AddressKind>,
    /// Whether AutoNAT found this node reachable by others.
    #[serde(default)]
    pub reachability: crate::net::nat::Reachability,
}

/// JSON has no NaN: serde_json writes it as `null`; read that back as NaN
/// (a stage that computes no loss reports NaN).
fn nan_from_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f32, D::Error> {
    Ok(Option::<f32>::deserialize(d)?.unwrap_or(f32::NAN))
}

/// Why a node stopped early.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The network could not start.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The node cannot sign its averaging join proofs.
    #[error(transparent)]
    JoinProof(#[from] JoinProofError),
    /// Local compute failed.
    #[error(transparent)]
    Compute(#[from] ComputeError),
    /// The averaging state machine refused a round.
    #[error("averaging: {0}")]
    Averaging(AveragingError),
    /// Stopped on request (Ctrl-C, SIGTERM) at a round boundary.
    #[error("stopped by a signal {}", stopped_where(*round, checkpoint.as_deref()))]
    Stopped {
        /// The last round finished (0: before training).
        round: u64,
        /// Where that round's checkpoint is, if the node writes them.
        checkpoint: Option<PathBuf>,
    },
    /// Not enough peers showed up.
    #[error("only {have} of the {want} peers needed joined within {waited:?}; {hint}")]
    NotEnoughPeers {
        /// Peers present (this one included).
        have: usize,
        /// Peers required.
        want: usize,
        /// How long we waited.
        waited: Duration,
        /// What to check: the peers of this swarm seen with other settings
        /// where there were any, else the addresses and names.
        hint: String,
    },
    /// A checkpoint could not be written or does not fit this model.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The checkpoint to resume from belongs to another model.
    #[error("checkpoint holds {got} parameters but this model has {expected}: resume with the same --model as the run that wrote it")]
    CheckpointMismatch {
        /// Parameters of the model.
        expected: usize,
        /// Parameters in the checkpoint.
        got: usize,
    },
    /// The compute thread could not be started.
    #[error("cannot start the compute thread: {0}")]
    Spawn(std::io::Error),
    /// A pipeline message (a micro-batch's activations or gradient, a
    /// stage's parameters) could not be encoded, most likely too large for
    /// a message: dropping it would only stall the pipeline until its
    /// retries ran out, blaming the network.
    #[error("cannot send a pipeline {what}: {source}")]
    PipeEncode {
        /// What the message carries.
        what: &'static str,
        /// Why it could not be encoded.
        source: wire::WireError,
    },
    /// No peer serves a pipeline stage the run needs.
    #[error("no peer serves pipeline stage {stage}; start more nodes (at least one per stage) or lower --stages")]
    StageUnserved {
        /// The stage without replicas.
        stage: u32,
    },
    /// No peer of the other stages answered with the backup of the stage to take over.
    #[error("no peer sent a backup of pipeline stage {stage} to take over (the stage has not averaged yet, or every peer of the other stages is gone)")]
    StageBackupUnavailable {
        /// The stage.
        stage: u32,
    },
    /// A resumed stage's checkpoint is far behind a live replica of its stage.
    #[error("a replica of pipeline stage {stage} is at step {theirs}, too far past this node's checkpoint (step {ours}) to catch up (more than two checkpoint intervals, or the run's end): start without --resume to join the run as a new node")]
    StaleCheckpoint {
        /// The stage.
        stage: u32,
        /// The checkpoint's step.
        ours: u64,
        /// The replica's step.
        theirs: u64,
    },
    /// The backup does not fit the stage this node built.
    #[error("the backup of pipeline stage {stage} holds {got} parameters, this node's stage has {want}; peers run different models")]
    StageBackupMismatch {
        /// The stage.
        stage: u32,
        /// Parameters in the backup.
        got: usize,
        /// Parameters of our stage.
        want: usize,
    },
    /// A micro-batch got no answer from any replica of the next stage.
    #[error("a micro-batch sent {tries} times to stage {stage} got no answer; its replicas are unreachable")]
    MicroBatchLost {
        /// The stage that did not answer.
        stage: u32,
        /// Times it was sent.
        tries: u32,
    },
    /// Peers cannot be assigned to stages.
    #[error("stage assignment: {0}")]
    Stages(p2ptrain_protocol::stages::StageError),
    /// The network event loop ended unexpectedly.
    #[error("the network event loop stopped unexpectedly")]
    NetworkStopped,
    /// The DiLoCo outer step could not be taken.
    #[error("DiLoCo outer step: {0}")]
    Outer(OuterError),
}

// The inner errors are part of the message rather than a `source`, so
// `{:#}` at the binary's edge does not print them twice.
impl From<AveragingError> for NodeError {
    fn from(e: AveragingError) -> Self {
        NodeError::Averaging(e)
    }
}

impl From<OuterError> for NodeError {
    fn from(e: OuterError) -> Self {
        NodeError::Outer(e)
    }
}

impl From<ComputeGone> for NodeError {
    fn from(e: ComputeGone) -> Self {
        NodeError::Compute(e.into())
    }
}

/// Receives a node's progress events (printing them, collecting them in tests, ...).
pub type Reporter = Box<dyn FnMut(&NodeEvent) + Send>;

/// What woke the driver up.
enum Wake<T> {
    Done(T),
    Net(Option<NetEvent>),
    Timer,
}

struct Driver {
    me: NodeId,
    net: NetHandle,
    events: mpsc::Receiver<NetEvent>,
    averager: Averager,
    start: Instant,
    members: BTreeMap<NodeId, PeerId>,
    members_changed: bool,
    finished: Option<RoundOutcome>,
    listen_addrs: Vec<Multiaddr>,
    /// The rounds members are known to be ready for (from their Joins, or one
    /// past their Progress or state claims), so a node that is behind joins
    /// the swarm's current round instead of rounds nobody else runs any more.
    swarm_round: SwarmRound,
    /// Our last states, served in chunks to nodes catching up.
    served: sync::Served,
    /// What each peer may still ask us to send (states and stage backups).
    serve_limits: sync::ServeLimits,
    /// Which states members claim to hold, to pick the one the swarm vouches for.
    vouches: Vouches,
    /// The state download in progress, if any.
    download: Option<Download>,
    /// Members that answered our StateRequest.
    state_answers: BTreeSet<NodeId>,
    /// Local steps per peer this run lasts, told to nodes that download our model.
    total_steps: u64,
    /// We hold a model that went through an averaging round (or was downloaded).
    synced: bool,
    /// In a pipeline, the stage this node holds; `None` in data-parallel training.
    stage: Option<u32>,
    /// The stage our join proofs name: kept equal to `stage`.
    stage_scope: StageScope,
    /// Pipeline messages received and not yet handled, and who serves which stage.
    pipe: pipeline::Inbox,
    /// How long to wait for peers (at the start, and for a pipeline stage
    /// to be taken over).
    peer_wait: Duration,
    /// Tests only: how this node corrupts what it sends when averaging.
    misbehave: Option<crate::misbehave::Misbehave>,
    /// The live metrics registry, when `--metrics` serves one.
    metrics: Option<Metrics>,
    /// How long a node waits at the end of the run for what its peers hold
    /// (a pipeline stage's final parameters; data-parallel state claims):
    /// the time a peer's final averaging round may take beyond ours.
    closing_wait: Duration,
    /// DiLoCo's round-start snapshot and outer optimizer, when `--outer-lr` is set.
    diloco: Option<diloco::Diloco>,
}

/// Runs a node until its training budget is spent; returns its final report.
pub async fn run(
    config: NodeConfig,
    keypair: Keypair,
    task: Box<dyn Task>,
    report: Reporter,
) -> Result<FinalReport, NodeError> {
    run_with_metrics(config, keypair, task, report, None).await
}

/// [`run`], also feeding a live metrics registry (`--metrics`).
pub async fn run_with_metrics(
    config: NodeConfig,
    keypair: Keypair,
    task: Box<dyn Task>,
    mut report: Reporter,
    metrics: Option<Metrics>,
) -> Result<FinalReport, NodeError> {
    let peer_id = keypair.public().to_peer_id();
    let span = info_span!("node", peer = %peer_id);
    async move {
        let network = Network::start(config.net.clone(), keypair.clone())?;
        let compute =
            Compute::spawn(task, format!("compute-{peer_id}")).map_err(NodeError::Spawn)?;
        let mut driver = Driver::new(&config, network, &keypair)?;
        driver.pipe.data_parallel = true;
        driver.observe(metrics);
        let result = driver.train(&config, &compute, &mut report).await;
        if result.is_ok() {
            // A node asked to stop leaves at once.
            tokio::select! {
                () = driver.linger(config.linger) => {}
                () = config.stop.wait() => {}
            }
        }
        result
    }
    .instrument(span)
    .await
}

/// Whether every `--bootstrap` address (there is one at least) names this
/// node's own peer id: on any node but the first, a `--key` file copied from
/// the node it bootstraps from.
fn bootstraps_only_from_itself(bootstrap: &[Multiaddr], me: PeerId) -> bool {
    !bootstrap.is_empty()
        && bootstrap
            .iter()
            .all(|a| crate::net::peer_id_of(a) == Some(me))
}

/// Where a node stopped by a signal left its work.
fn stopped_where(round: u64, checkpoint: Option<&std::path::Path>) -> String {
    match (round, checkpoint) {
        (0, _) => "before training".to_string(),
        (r, Some(dir)) => format!(
            "after round {r}; its checkpoint is in {0}: resume with --resume {0}",
            dir.display()
        ),
        (r, None) => format!("after round {r}; nothing was saved (no --checkpoint-dir)"),
    }
}

/// What a node that waited for peers in vain should check: the peers it saw
/// on its swarm with other settings (they never become members), if any,
/// and a bootstrap list that names only itself.
fn missing_peers_hint(other_settings: &[(PeerId, String)], only_itself: bool) -> String {
    if only_itself {
        return "every --bootstrap address names this node's own peer id: each machine needs its own --key file (a copied one makes two nodes one peer)".to_string();
    }
    if other_settings.is_empty() {
        return "check --bootstrap addresses, firewalls, and --swarm names".to_string();
    }
    let peers: Vec<String> = other_settings
        .iter()
        .map(|(peer, differences)| format!("{peer} ({differences})"))
        .collect();
    format!(
        "{} peer(s) of this swarm run other settings and cannot join it: {}; start every node with the same settings",
        peers.len(),
        peers.join(", ")
    )
}

impl Driver {
    /// The driver of a node whose network is `network` and identity `keypair`.
    fn new(config: &NodeConfig, network: Network, keypair: &Keypair) -> Result<Driver, NodeError> {
        let Network {
            handle: net,
            events,
            topic,
            ..
        } = network;
        let me = node_id_of(&net.local_peer_id());
        let stage_scope = StageScope::default();
        let joins = SignedJoins::new(keypair, &topic, stage_scope.clone())?;
        Ok(Driver {
            me,
            net,
            events,
            averager: Averager::new(
                me,
                AveragingConfig {
                    sparse: config.averaging.sparse || config.top_k.is_some(),
                    ..config.averaging.clone()
                },
                Box::new(joins),
            ),
            stage_scope,
            start: Instant::now(),
            members: BTreeMap::new(),
            members_changed: true,
            finished: None,
            listen_addrs: Vec::new(),
            swarm_round: SwarmRound::default(),
            served: sync::Served::new(config.misbehave_state),
            serve_limits: sync::ServeLimits::new(),
            vouches: Vouches::default(),
            download: None,
            state_answers: BTreeSet::new(),
            total_steps: 0,
            synced: false,
            stage: None,
            pipe: pipeline::Inbox::default(),
            peer_wait: config.wait_for_peers,
            misbehave: config.misbehave,
            metrics: None,
            closing_wait: config.averaging.group_timeout
                + config.averaging.join_window
                + config.averaging.reduce_timeout * 2,
            diloco: None,
        })
    }

    /// Feeds `metrics` (if any) from now on: network counters, members, shards and stages.
    fn observe(&mut self, metrics: Option<Metrics>) {
        if let Some(m) = &metrics {
            m.attach_net(self.net.stats().clone());
        }
        self.metrics = metrics;
    }

    /// Tells the metrics registry every peer's shard size under `ids` (ours is `mine`).
    fn observe_shards(&self, ids: &[NodeId], num_samples: u64, mine: usize) {
        let Some(m) = &self.metrics else { return };
        let me = self.net.local_peer_id();
        let mut sizes = vec![(me, mine)];
        // Others' shards cost a pass over the data each: skip them for huge swarms.
        if ids.len() as u64 * num_samples <= OBSERVE_SHARDS_LIMIT {
            for id in ids {
                if let Some(peer) = self.members.get(id) {
                    sizes.push((*peer, shards::shard_of(*id, ids, num_samples).len()));
                }
            }
        }
        m.shards(me, &sizes);
    }

    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    /// The peers this node averages and shares data with: the whole swarm,
    /// or in a pipeline the replicas of its own stage.
    fn swarm_ids(&self) -> Vec<NodeId> {
        if let Some(stage) = self.stage {
            return self.live_replicas(stage);
        }
        let mut ids: Vec<NodeId> = self.members.keys().copied().collect();
        ids.push(self.me);
        ids.sort();
        ids
    }

    async fn train(
        &mut self,
        config: &NodeConfig,
        compute: &Compute,
        report: &mut Reporter,
    ) -> Result<FinalReport, NodeError> {
        self.announce_listening(report).await?;
        self.wait_for_peers(config.min_peers, config).await?;
        let peers = self.members.len() + 1;
        let total_steps = config
            .schedule
            .total_steps(peers, compute.num_train_samples);
        let shard = self.reshard(config, compute).await?;
        info!(peers, shard, total_steps, "training starts");
        report(&NodeEvent::Started {
            peers,
            shard,
            total_steps,
            stage: None,
        });

        let (mut step, mut round, mut samples) = (0u64, 0u64, 0u64);
        self.diloco = config
            .outer
            .map(|c| diloco::Diloco::new(c, compute.num_params, config.top_k))
            .transpose()?;
        if let Some(ckpt) = &config.resume {
            if ckpt.params.len() != compute.num_params {
                return Err(NodeError::CheckpointMismatch {
                    expected: compute.num_params,
                    got: ckpt.params.len(),
                });
            }
            self.pump(compute.set_params(ckpt.params.clone())).await??;
            (step, round, samples) = (ckpt.meta.step, ckpt.meta.round, ckpt.meta.samples);
            // Go on where this node's passes over its shard stood (exactly so
            // where the shard is the one it had; elsewhere as good a start
            // as any), not at the start of its shard again.
            self.pump(compute.skip_samples(samples)).await??;
            // The moments only tune step sizes: a checkpoint without them (an
            // older format) or with unusable ones resumes with fresh moments.
            let optim_time = match &ckpt.optim {
                Some(state) => match self.pump(compute.set_optim_state(state.clone())).await? {
                    Ok(()) => Some(state.time),
                    Err(e) => {
                        warn!(error = %e, "checkpoint's optimizer state not restored; fresh moments");
                        None
                    }
                },
                None => None,
            };
            if let Some(d) = self.diloco.as_mut() {
                match &ckpt.outer_momentum {
                    Some(m) => d.set_momentum(m.clone())?,
                    None => warn!(
                        "checkpoint holds no DiLoCo momentum (written without --outer-lr); it starts at zero, \
                         so this node's model drifts from a swarm that trained on with momentum"
                    ),
                }
            }
            info!(round, step, ?optim_time, "resumed from checkpoint");
        }
        let mut train_time = Duration::ZERO;
        // What a resumed node had trained before: not part of this run's
        // training time, so not of its throughput.
        let samples_before = samples;
        let mut last_loss = f32::NAN;
        let mut complete_rounds = 0u64;
        let mut averaging_total = 0.0f64;
        let mut total_steps = total_steps;
        self.total_steps = total_steps;
        // A new node, or a restarted one whose checkpoint the swarm has
        // moved past, starts from the model the swarm vouches for.
        if let Some(synced) = self
            .sync_with_swarm(compute, report, SYNC_WAIT, round)
            .await?
        {
            (round, total_steps) = synced;
        }
        // The run ends at a round, not at a step count: a node that skipped
        // rounds to catch up with the swarm (it downloaded the swarm's model)
        // still stops together with the others, holding the same model.
        let every = config.schedule.average_every.max(1);
        let mut sync_attempts = 0u32;
        let mut end_syncs = 0u32;
        // The round of the last checkpoint written, if any.
        let mut checkpointed = None;
        let mut stopped = false;
        let mut far_behind_syncs = 0u32;
        while round < total_steps.div_ceil(every) {
            if let Some(lag) = self.misbehave.and_then(|m| m.lag_before(round + 1)) {
                warn!(
                    secs = lag.as_secs(),
                    "test misbehaviour: stalling before the round"
                );
                self.pump(tokio::time::sleep(lag)).await?;
            }
            // Under DiLoCo a round seen only in part leaves a model apart
            // from the swarm's for good: realign with the majority.
            if self.diloco.is_some() && round > 0 {
                if let Some(synced) = self.realign(compute, report, round).await? {
                    (round, total_steps) = synced;
                }
            }
            // Behind the swarm and never synced (a late joiner, a restarted
            // peer), or far behind (a node that was suspended or cut off for
            // several rounds, whose model those rounds left behind): fetch
            // the swarm's current model before training on.
            let behind = self.swarm_round.round().saturating_sub(round);
            let never_synced = behind > 1 && !self.synced && sync_attempts < MAX_SYNC_ATTEMPTS;
            let far_behind = behind > FAR_BEHIND_ROUNDS && far_behind_syncs < MAX_SYNC_ATTEMPTS;
            if never_synced || far_behind {
                if never_synced {
                    sync_attempts += 1;
                } else {
                    far_behind_syncs += 1;
                }
                if let Some(synced) = self
                    .sync_with_swarm(compute, report, SYNC_WAIT, round)
                    .await?
                {
                    (round, total_steps) = synced;
                }
            }
            // Asked to stop: here, after a realignment or a download, so
            // the checkpoint written holds the model this node would go on
            // from.
            if config.stop.requested() {
                stopped = true;
                break;
            }
            // Number the round like the swarm does if we are behind.
            if self.swarm_round.round() > round.saturating_add(1) {
                info!(
                    from = round + 1,
                    to = self.swarm_round.round(),
                    "joining the swarm's current round"
                );
            }
            let next = round.saturating_add(1).max(self.swarm_round.round());
            let last = total_steps.div_ceil(every);
            if next > last {
                // The swarm is past the end of our run while we are behind
                // (a slow or cut-off node; `next` can only pass `last` by
                // following the swarm): end on the swarm's final model, not
                // on ours of rounds ago, which no later round will average in.
                if end_syncs < MAX_SYNC_ATTEMPTS {
                    end_syncs += 1;
                    // Members still finishing the last round claim it soon:
                    // wait, so as not to take the round before for the end.
                    self.wait_for_claims(last, SYNC_WAIT).await?;
                    if let Some(synced) = self
                        .sync_with_swarm(compute, report, SYNC_WAIT, round)
                        .await?
                    {
                        // Its run length is ours now: train on if it holds more.
                        (round, total_steps) = synced;
                        self.broadcast_claim()?;
                        continue;
                    }
                }
                break;
            }
            round = next;
            let span = info_span!("round", round);
            // Steps of this round under the run's schedule (the last one may be short).
            let n = every.min(total_steps.saturating_sub((round - 1).saturating_mul(every)));
            if self.diloco.as_ref().is_some_and(|d| d.needs_start()) {
                let start = self.pump(compute.params()).await??;
                if let Some(d) = self.diloco.as_mut() {
                    d.begin(start);
                }
            }
            let t0 = Instant::now();
            let stats = self
                .pump(compute.train(n))
                .instrument(span.clone())
                .await??;
            train_time += t0.elapsed();
            step += n;
            samples += stats.iter().map(|s| s.samples as u64).sum::<u64>();
            last_loss = stats.iter().map(|s| s.loss).sum::<f32>() / stats.len().max(1) as f32;

            let t1 = Instant::now();
            let params = self.pump(compute.params()).await??;
            // DiLoCo averages what the round moved the model, not the model.
            let (contribution, reference, current) = match self.diloco.as_mut() {
                Some(d) => {
                    let g = d.pseudo_gradient(&params)?;
                    (g, d.start().map(<[f32]>::to_vec), Some(params))
                }
                None => (params, None, None),
            };
            let mut outcome = self
                .average_around(round, contribution, reference)
                .instrument(span.clone())
                .await?;
            let new_params = match (self.diloco.as_mut(), current) {
                (Some(d), Some(current)) => d.finish(&outcome.values, &current)?,
                _ => std::mem::take(&mut outcome.values),
            };
            let averaging_s = t1.elapsed().as_secs_f64();
            averaging_total += averaging_s;
            let complete = outcome.group.len() > 1
                && outcome
                    .parts
                    .iter()
                    .all(|p| p.averaged && p.contributors.len() == outcome.group.len());
            complete_rounds += u64::from(complete);
            let group = outcome.group.len();
            let dropped = outcome.dropped.len();
            // Members that started moments apart planned an epoch budget for
            // the peers each saw then; the first round's group is one count
            // they all share, so they end at the same round. (Before the
            // state is served: a joiner takes the run length from it.)
            if let Some(plan) =
                config
                    .schedule
                    .first_group_plan(round, group, peers, compute.num_train_samples)
            {
                if plan != total_steps {
                    info!(
                        group,
                        from = total_steps,
                        to = plan,
                        "run length planned for the first round's group"
                    );
                    total_steps = plan;
                    self.total_steps = plan;
                }
            }
            // The served state's manifest hashes the model anyway; DiLoCo
            // serves more than the model, so its model is hashed apart. The
            // compute thread takes the new model in while the state to serve
            // is hashed here (both cost about a pass over the model).
            let (model_digest, setting) = match &self.diloco {
                Some(d) => {
                    let state = d.served_state(&new_params);
                    let n = new_params.len();
                    let setting = compute.start_set_params(new_params);
                    // The served state begins with the model.
                    let digest = checkpoint::params_digest(&state[..n]);
                    self.announce_state(round, &state)?;
                    (digest, setting)
                }
                None => {
                    let bytes = self.served.stage(&new_params);
                    let setting = compute.start_set_params(new_params);
                    (
                        checkpoint::hex(&self.announce_staged(round, bytes)?),
                        setting,
                    )
                }
            };
            self.pump(setting).await??;
            // Averaged with others: we hold the swarm's model now.
            self.synced |= group > 1;
            let r = RoundReport {
                round,
                step,
                run_step: round.saturating_mul(every).min(total_steps),
                total_steps,
                peers: group,
                loss: last_loss,
                samples,
                samples_per_s: samples.saturating_sub(samples_before) as f64
                    / train_time.as_secs_f64().max(1e-9),
                bytes_sent: self.net.stats().sent(),
                dropped,
                averaging_s,
                reduce_deadline_s: self.averager.reduce_deadline().as_secs_f64(),
                join_window_s: self.averager.join_window().as_secs_f64(),
                model_digest,
            };
            span.in_scope(|| {
                info!(
                    group,
                    dropped,
                    loss = last_loss,
                    averaging_s,
                    "round finished"
                )
            });
            report(&NodeEvent::Round(r));
            self.gossip_progress(round, step, last_loss, samples)?;
            let eval_every = config.schedule.eval_every;
            if eval_every > 0
                && round.is_multiple_of(eval_every)
                && round < total_steps.div_ceil(every)
            {
                let eval = self
                    .pump(compute.evaluate())
                    .instrument(span.clone())
                    .await??;
                span.in_scope(
                    || info!(accuracy = ?eval.accuracy, test_loss = eval.loss, "evaluated"),
                );
                report(&NodeEvent::Evaluated {
                    round,
                    step,
                    test_accuracy: eval.accuracy,
                    test_loss: eval.loss,
                });
            }
            if let Some(policy) = &config.checkpoints {
                let last = round >= total_steps.div_ceil(every);
                if round.is_multiple_of(policy.every_rounds.max(1)) || last {
                    let at = RunPoint {
                        round,
                        step,
                        samples,
                    };
                    // A failed write (a full disk, say) must not end hours of
                    // training: say so and try again at the next one. The
                    // run's final checkpoint, after the loop, still fails the run.
                    match self.save_checkpoint(config, policy, compute, at).await {
                        Ok(()) => checkpointed = Some(round),
                        Err(NodeError::Checkpoint(e)) => {
                            span.in_scope(|| {
                                error!(error = %e, "checkpoint not written; training goes on and the next checkpoint tries again")
                            });
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            if self.members_changed {
                self.reshard(config, compute).await?;
            }
        }

        if stopped {
            let mut checkpoint = None;
            if let Some(policy) = &config.checkpoints {
                if round > 0 && checkpointed != Some(round) {
                    let at = RunPoint {
                        round,
                        step,
                        samples,
                    };
                    self.save_checkpoint(config, policy, compute, at).await?;
                }
                checkpoint = (round > 0).then(|| policy.dir.clone());
            }
            return Err(NodeError::Stopped { round, checkpoint });
        }
        // Nothing after the last round would mend a node that saw it only in
        // part: once every member has said what it holds, join the majority.
        let mut downloaded_at_end = false;
        if round > 0 && !self.members.is_empty() {
            self.wait_for_claims(round, self.closing_wait).await?;
            if let Some(synced) = self.realign(compute, report, round).await? {
                round = synced.0;
                downloaded_at_end = true;
            }
        }
        // The model we end on is the one a restart should resume from, also
        // when it came from the swarm (an end-of-run sync or realignment).
        if let Some(policy) = &config.checkpoints {
            if round > 0 && (checkpointed != Some(round) || downloaded_at_end) {
                let at = RunPoint {
                    round,
                    step,
                    samples,
                };
                self.save_checkpoint(config, policy, compute, at).await?;
            }
        }
        let eval = self.pump(compute.evaluate()).await??;
        let params = self.pump(compute.params()).await??;
        let final_report = FinalReport {
            peer_id: self.net.local_peer_id().to_string(),
            rounds: round,
            steps: step,
            samples,
            test_accuracy: eval.accuracy,
            test_loss: eval.loss,
            final_loss: last_loss,
            wall_s: self.now().as_secs_f64(),
            bytes_sent: self.net.stats().sent(),
            model_digest: checkpoint::params_digest(&params),
            complete_rounds,
            averaging_s: averaging_total,
            training_s: train_time.as_secs_f64(),
            pipeline: None,
            paths: self.net.stats().paths(),
            reachability: self.net.stats().reachability().0,
        };
        info!(accuracy = ?eval.accuracy, test_loss = eval.loss, "training finished");
        report(&NodeEvent::Finished(final_report.clone()));
        Ok(final_report)
    }

    /// Writes the model, the optimizer state and (under DiLoCo) the outer
    /// momentum as the checkpoint of `at`, off the event loop.
    async fn save_checkpoint(
        &mut self,
        config: &NodeConfig,
        policy: &CheckpointPolicy,
        compute: &Compute,
        at: RunPoint,
    ) -> Result<(), NodeError> {
        let params = self.pump(compute.params()).await??;
        let optim = self.pump(compute.optim_state()).await??;
        let meta = CheckpointMeta {
            swarm: config.net.swarm.clone(),
            model: policy.model.clone(),
            round: at.round,
            step: at.step,
            samples: at.samples,
            params_digest: checkpoint::params_digest(&params),
            average_every: Some(config.schedule.average_every),
        };
        let dir = policy.dir.clone();
        let outer = self.diloco.as_ref().map(|d| d.momentum().to_vec());
        let path = self
            .write_off_loop(&policy.dir, move || {
                let state = checkpoint::State {
                    params: &params,
                    optim: optim.as_ref(),
                    outer_momentum: outer.as_deref(),
                };
                checkpoint::save_state(&dir, &meta, state)
            })
            .await?;
        debug!(path = %path.display(), "checkpoint written");
        Ok(())
    }

    /// Runs `write` (a checkpoint save into `dir`) on a blocking thread, so
    /// peers are served while the file is written and synced; returns its path.
    async fn write_off_loop(
        &mut self,
        dir: &std::path::Path,
        write: impl FnOnce() -> Result<PathBuf, CheckpointError> + Send + 'static,
    ) -> Result<PathBuf, NodeError> {
        let written = self.pump(tokio::task::spawn_blocking(write)).await?;
        let path = written.map_err(|e| {
            NodeError::Checkpoint(CheckpointError::Io {
                path: dir.to_owned(),
                source: std::io::Error::other(e),
            })
        })??;
        Ok(path)
    }

    /// Waits for the first listen address and reports it.
    async fn announce_listening(&mut self, report: &mut Reporter) -> Result<(), NodeError> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while self.listen_addrs.is_empty() {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(ev)) => self.on_net_event(ev)?,
                Ok(None) => return Err(NodeError::NetworkStopped),
                Err(_) => {
                    return Err(NodeError::Net(NetError::Setup(
                        "no listen address came up within 10 s".into(),
                    )))
                }
            }
        }
        // Collect the other interfaces' addresses that arrive right after the first.
        let settle = tokio::time::Instant::now() + Duration::from_millis(200);
        while let Ok(Some(ev)) = tokio::time::timeout_at(settle, self.events.recv()).await {
            self.on_net_event(ev)?;
        }
        report(&NodeEvent::Listening {
            peer_id: self.net.local_peer_id().to_string(),
            addrs: self.listen_addrs.iter().map(|a| a.to_string()).collect(),
        });
        Ok(())
    }

    /// Waits up to `--wait-peers-secs` until `want` peers (this one
    /// included) are members.
    async fn wait_for_peers(&mut self, want: usize, config: &NodeConfig) -> Result<(), NodeError> {
        let wait = config.wait_for_peers;
        let deadline = tokio::time::Instant::now() + wait;
        while self.members.len() + 1 < want {
            let event = tokio::select! {
                got = tokio::time::timeout_at(deadline, self.events.recv()) => got,
                () = config.stop.wait() => {
                    return Err(NodeError::Stopped { round: 0, checkpoint: None });
                }
            };
            match event {
                Ok(Some(ev)) => self.on_net_event(ev)?,
                Ok(None) => return Err(NodeError::NetworkStopped),
                Err(_) => {
                    return Err(NodeError::NotEnoughPeers {
                        have: self.members.len() + 1,
                        want,
                        waited: wait,
                        hint: missing_peers_hint(
                            &self.net.stats().other_settings(),
                            bootstraps_only_from_itself(
                                &config.net.bootstrap,
                                self.net.local_peer_id(),
                            ),
                        ),
                    })
                }
            }
        }
        Ok(())
    }

    /// Recomputes this node's data shard from the current peer set.
    async fn reshard(
        &mut self,
        config: &NodeConfig,
        compute: &Compute,
    ) -> Result<usize, NodeError> {
        let ids = self.swarm_ids();
        let shard = shards::shard_of(self.me, &ids, compute.num_train_samples as u64);
        let len = shard.len();
        self.observe_shards(&ids, compute.num_train_samples as u64, len);
        let seed = shards::epoch_seed(config.seed, 0, self.me);
        self.members_changed = false;
        debug!(peers = ids.len(), shard = len, "data shard assigned");
        self.pump(compute.set_shard(Shard {
            indices: shard,
            seed,
            peers: ids.len(),
        }))
        .await??;
        Ok(len)
    }

    /// Runs one averaging round to completion (the averager's deadlines bound it).
    async fn average(&mut self, round: u64, values: Vec<f32>) -> Result<RoundOutcome, NodeError> {
        self.average_around(round, values, None).await
    }

    /// [`Driver::average`] of offsets from `reference` (DiLoCo's
    /// pseudo-gradients from the round start), which robust rules screen in
    /// parameter space.
    async fn average_around(
        &mut self,
        round: u64,
        values: Vec<f32>,
        reference: Option<Vec<f32>>,
    ) -> Result<RoundOutcome, NodeError> {
        let ids = self.swarm_ids();
        self.averager.set_peers(&ids);
        self.averager
            .start_round_around(self.now(), round, values, reference)?;
        self.flush()?;
        let mut never = std::pin::pin!(std::future::pending::<()>());
        loop {
            if let Some(outcome) = self.finished.take() {
                if outcome.round == round {
                    return Ok(outcome);
                }
            }
            self.pump_once(never.as_mut()).await?;
        }
    }

    fn gossip_progress(
        &mut self,
        round: u64,
        step: u64,
        loss: f32,
        samples: u64,
    ) -> Result<(), NodeError> {
        let round = self.misbehave.map_or(round, |m| m.claimed_round(round));
        let msg = Message::Progress(Progress {
            round,
            step,
            loss,
            samples,
        });
        match wire::encode(&msg) {
            Ok(bytes) => self.check_sent(self.net.broadcast(bytes)),
            Err(e) => {
                warn!(error = %e, "cannot encode progress");
                Ok(())
            }
        }
    }

    /// Keeps serving peers (late retransmits of the last round) for `how_long`.
    async fn linger(&mut self, how_long: Duration) {
        let _ = tokio::time::timeout(how_long, async {
            let _ = self.pump(std::future::pending::<()>()).await;
        })
        .await;
    }

    /// Drives the network and the averager until `fut` completes.
    async fn pump<F: std::future::Future>(&mut self, fut: F) -> Result<F::Output, NodeError> {
        tokio::pin!(fut);
        loop {
            if let Some(out) = self.pump_once(fut.as_mut()).await? {
                return Ok(out);
            }
        }
    }

    /// Waits for one thing to happen (a network event, an averager deadline,
    /// or `fut` completing) and handles it.
    ///
    /// Only cancel-safe futures are raced (`recv`, `sleep`, `fut`); handling of
    /// what woke us runs to completion outside the race.
    async fn pump_once<F: std::future::Future>(
        &mut self,
        fut: std::pin::Pin<&mut F>,
    ) -> Result<Option<F::Output>, NodeError> {
        let deadline = self
            .averager
            .poll_timeout()
            .map(|t| tokio::time::Instant::from_std(self.start + t));
        let timer = async move {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        let wake = tokio::select! {
            out = fut => Wake::Done(out),
            ev = self.events.recv() => Wake::Net(ev),
            _ = timer => Wake::Timer,
        };
        match wake {
            Wake::Done(out) => return Ok(Some(out)),
            Wake::Net(Some(ev)) => self.on_net_event(ev)?,
            Wake::Net(None) => return Err(NodeError::NetworkStopped),
            Wake::Timer => {
                let now = self.now();
                self.averager.handle_timeout(now);
            }
        }
        self.flush()?;
        Ok(None)
    }

    /// A full outgoing queue costs one message (retransmits cover it); a
    /// stopped event loop ends the node.
    fn check_sent(&self, sent: Result<(), NetError>) -> Result<(), NodeError> {
        match sent {
            Err(NetError::Backpressure) => {
                warn!("outgoing queue full; a message was dropped");
                Ok(())
            }
            other => Ok(other?),
        }
    }

    /// Sends what the averager wants sent and collects its events.
    fn flush(&mut self) -> Result<(), NodeError> {
        let mut frames = frames::FrameOnce::default();
        while let Some(t) = self.averager.poll_transmit() {
            let transmits = match self.misbehave {
                Some(m) if m.withholds(&t.msg) => continue,
                Some(m) => m.redirect(Transmit {
                    to: t.to,
                    msg: m.apply(t.msg),
                }),
                None => vec![t],
            };
            for t in transmits {
                self.send_transmit(&mut frames, t)?;
            }
        }
        while let Some(event) = self.averager.poll_event() {
            match event {
                AvgEvent::GroupFormed { round, members } => {
                    debug!(round, size = members.len(), "group formed")
                }
                AvgEvent::Finished(outcome) => self.finished = Some(outcome),
                AvgEvent::Rejected { from, reason } => {
                    warn!(peer = %from, %reason, "averaging message rejected")
                }
            }
        }
        Ok(())
    }

    /// Encodes `t` (a reduced part once for all its recipients) and sends it.
    fn send_transmit(
        &mut self,
        frames: &mut frames::FrameOnce,
        t: Transmit,
    ) -> Result<(), NodeError> {
        let msg = match self.stage {
            Some(stage) => Message::StageAvg { stage, msg: t.msg },
            None => Message::Avg(t.msg),
        };
        let bytes = match frames.encode(msg) {
            Ok(b) => b,
            Err(e) => {
                warn!(error = %e, "cannot encode an averaging message; dropped");
                return Ok(());
            }
        };
        let sent = match t.to {
            Destination::Broadcast => {
                frames.forget();
                self.net.broadcast(Arc::unwrap_or_clone(bytes))
            }
            Destination::Peer(id) => match self.members.get(&id) {
                Some(peer) => self.net.send(*peer, bytes),
                None => {
                    debug!(peer = %id, "transmit to a peer that left; dropped");
                    Ok(())
                }
            },
        };
        self.check_sent(sent)
    }

    fn on_net_event(&mut self, event: NetEvent) -> Result<(), NodeError> {
        match event {
            NetEvent::Listening(addr) => self.listen_addrs.push(addr),
            NetEvent::PeerJoined(peer) => {
                if let Some(m) = &self.metrics {
                    m.peer_joined(peer);
                }
                self.members.insert(node_id_of(&peer), peer);
                self.members_changed = true;
                let ids = self.swarm_ids();
                self.averager.set_peers(&ids);
            }
            NetEvent::PeerLeft(peer) => {
                if let Some(m) = &self.metrics {
                    m.peer_left(&peer);
                }
                self.members.remove(&node_id_of(&peer));
                // A holder of the state we download: its requests go to the
                // others now, not after their timeouts.
                let now = self.now();
                if let Some(d) = self.download.as_mut() {
                    d.handle_peer_left(now, node_id_of(&peer));
                }
                self.pipe.forget_peer(&peer);
                self.vouches.forget(&node_id_of(&peer));
                self.swarm_round.forget(&node_id_of(&peer));
                self.members_changed = true;
                let ids = self.swarm_ids();
                self.averager.set_peers(&ids);
            }
            // Its share of the inbound budget goes back once it is handled
            // (what the protocol keeps of it has bounds of its own).
            NetEvent::Message {
                from,
                bytes,
                held: _held,
            } => {
                let from_id = node_id_of(&from);
                // Shared: a tensor part stays in the received frame, not copied out.
                let msg = match wire::decode_shared(Arc::new(bytes)) {
                    // Replicas of our stage average among themselves only.
                    Ok(Message::StageAvg { stage, msg }) if self.stage == Some(stage) => {
                        Ok(Message::Avg(msg))
                    }
                    Ok(Message::StageAvg { .. }) => return Ok(()),
                    // A plain averaging message from a data-parallel peer does not concern a stage.
                    Ok(Message::Avg(_) | Message::Progress(_)) if self.stage.is_some() => {
                        return Ok(())
                    }
                    other => other,
                };
                match msg {
                    Ok(Message::Avg(msg)) if self.misbehave.is_some_and(|m| m.ignores(&msg)) => {
                        debug!(peer = %from, "test misbehaviour: averaging message ignored");
                    }
                    Ok(Message::Avg(msg)) => {
                        if let AvgMessage::Join { round, .. } = &msg {
                            self.swarm_round.record(from_id, *round);
                        }
                        let now = self.now();
                        self.averager.handle_message(now, from_id, msg);
                    }
                    Ok(Message::Progress(p)) => {
                        self.swarm_round.record(from_id, p.round.saturating_add(1));
                        debug!(peer = %from, round = p.round, loss = p.loss, "peer progress")
                    }
                    Ok(
                        m @ (Message::StateRequest
                        | Message::StateAnnounce(_)
                        | Message::ManifestRequest { .. }
                        | Message::Manifest { .. }
                        | Message::ChunkRequest { .. }
                        | Message::Chunk { .. }),
                    ) => {
                        self.on_state_message(from, &m)?;
                    }
                    Ok(Message::StageHello(hello)) => {
                        if let Some(m) = &self.metrics {
                            m.peer_stage(from, hello.stage);
                        }
                        // A peer new to a stage, or moving between stages,
                        // may join or leave ours.
                        if self.pipe.on_hello(from, hello) {
                            let ids = self.swarm_ids();
                            self.averager.set_peers(&ids);
                            self.members_changed = true;
                        }
                    }
                    Ok(Message::StageState(state)) => self.pipe.on_stage_state(from, state),
                    Ok(Message::StageStateRequest(request)) => {
                        self.serve_stage_backup(from, request)?
                    }
                    Ok(Message::PipeForward(f)) => self.pipe.on_forward(from, f),
                    Ok(Message::PipeBackward(b)) => self.pipe.on_backward(from, b),
                    Ok(Message::StageAvg { .. }) => {} // filtered above
                    Err(e) => {
                        warn!(peer = %from, error = %e, "malformed message dropped");
                        // No honest peer sends invalid data: whatever it was, the
                        // round in flight stops waiting for this peer.
                        let now = self.now();
                        self.averager.exclude_member(now, from_id);
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_short_of_peers_is_told_what_to_check() {
        let me = Keypair::generate_ed25519().public().to_peer_id();
        let other = Keypair::generate_ed25519().public().to_peer_id();
        let at = |p: PeerId| -> Multiaddr {
            format!("/ip4/10.0.0.1/udp/4001/quic-v1/p2p/{p}")
                .parse()
                .unwrap()
        };
        assert!(bootstraps_only_from_itself(&[at(me)], me));
        assert!(!bootstraps_only_from_itself(&[at(me), at(other)], me));
        assert!(!bootstraps_only_from_itself(&[], me));
        assert!(missing_peers_hint(&[], false).contains("--bootstrap addresses"));
        assert!(missing_peers_hint(&[], true).contains("its own --key"));
        let seen = [(other, "--model: cnn there, mlp here".to_string())];
        let hint = missing_peers_hint(&seen, false);
        assert!(
            hint.contains(&format!("{other} (--model: cnn there, mlp here)")),
            "{hint}"
        );
    }

    #[test]
    fn an_epoch_budget_is_planned_again_for_the_first_rounds_group() {
        let schedule = |budget| Schedule {
            budget,
            average_every: 10,
            samples_per_step: 100,
            eval_every: 0,
        };
        let epochs = schedule(Budget::Epochs(2.0));
        // Started alone it planned 2 epochs of 6,000 samples by itself; the
        // first round's group of three takes a third each, as a node that
        // saw all three at its start planned.
        assert_eq!(epochs.total_steps(1, 6_000), 120);
        assert_eq!(epochs.first_group_plan(1, 3, 1, 6_000), Some(40));
        assert_eq!(
            epochs.first_group_plan(1, 3, 2, 6_000),
            Some(epochs.total_steps(3, 6_000))
        );
        // Not for a group no larger than planned for (a peer left out of
        // round 1, or groups capped below the swarm's size: every node
        // planned alike), a later round, or a step budget.
        assert_eq!(epochs.first_group_plan(1, 3, 3, 6_000), None);
        assert_eq!(epochs.first_group_plan(1, 2, 3, 6_000), None);
        assert_eq!(epochs.first_group_plan(1, 1, 1, 6_000), None);
        assert_eq!(epochs.first_group_plan(2, 3, 1, 6_000), None);
        assert_eq!(
            schedule(Budget::Steps(50)).first_group_plan(1, 3, 1, 6_000),
            None
        );
    }
}
