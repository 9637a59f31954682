//! Pipeline (model-parallel) training: the model's layers are cut into
//! stages, each peer holds one stage, and micro-batches stream through them.
//!
//! The first stage's replicas own the data: each takes its shard of the
//! token windows, runs its stage forward on a step's micro-batches, sends
//! each micro-batch's activations to a replica of the next stage (round
//! robin over the live ones) and back-propagates each gradient as it
//! returns, keeping at most `max_in_flight` micro-batches in the pipeline
//! (1F1B: a gradient back lets the next micro-batch in, so the next stage
//! works on one while this one computes the next, and no stage holds more
//! than that many graphs per first-stage replica, however long the step,
//! resends after a timeout aside). Later stages only react: a micro-batch in, activations out
//! (or, at the last stage, loss and input gradient back). Every stage applies
//! an optimizer step per `micro_batches` micro-batches and averages with the
//! other replicas of its stage every `average_every` steps, with the same
//! averaging protocol as data-parallel training, scoped to the stage.
//!
//! Failure handling: a micro-batch whose answer does not come back within
//! `stage_timeout` is sent again to another replica of the next stage, so a
//! replica that dies costs its in-flight micro-batches one timeout. After
//! each of its averaging rounds a later stage sends its parameters to the
//! first stage's peers, and the first stage to the second stage's; they keep
//! the newest as that stage's backup (the first stage's also carries the
//! run's planned length). A node that starts while the run is in progress
//! (peers announce steps) takes the first stage if it has no replica left,
//! otherwise the later stage with the least measured throughput; it loads
//! that stage's backup (blake3-checked) and serves it, so a stage that lost
//! every replica is taken over by a new peer without restarting the swarm:
//! the other stages wait up to
//! `wait_for_peers` for a replica to appear before giving up. Without a new
//! peer, a spare moves: when a stage has had no live replica for a stage
//! timeout, the highest-id replica of the stage with the most replicas (at
//! least two) leaves it and takes the emptied stage over the same way. A
//! node taking the first stage over continues the run from the backup's step
//! to its planned end, re-splitting the training windows among the first
//! stage's replicas it sees.
//!
//! A whole run that stopped resumes from disk: each node checkpoints its
//! stage every few of the stage's rounds (`stage_checkpoint`), and a node
//! started with `--resume` holds its checkpoint's stage again: from the
//! checkpoint, announcing its step so that to peers starting later the run
//! is in progress; or, where a live replica of the stage is already past
//! it, from the swarm's backup with the checkpoint's Adam moments.

use super::stage_checkpoint::{StageCheckpoints, StagePoint, StageResume};
use super::{Driver, FinalReport, NodeConfig, NodeError, NodeEvent, Reporter, RoundReport};
use crate::checkpoint;
use crate::identity::node_id_of;
use crate::net::Network;
use crate::stage_compute::{StageCompute, StageFactory};
use crate::task::Shard;
use libp2p::{identity::Keypair, PeerId};
use p2ptrain_protocol::pipe::{
    PipeBackward, PipeForward, StageHello, StagePhase, StageState, StageStateRequest,
};
use p2ptrain_protocol::wire::{self, Message};
use p2ptrain_protocol::{shards, stages, tensor, NodeId};
use p2ptrain_train::stage::{Forward, StageSpec};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};
use tracing::{debug, error, info, info_span, warn, Instrument};

/// Pipeline messages a peer may have queued before we get to them; more are
/// dropped (their senders time out and resend).
const INBOX_LIMIT: usize = 1024;
/// Tensor bytes the queued micro-batches and gradients may hold together, at
/// least; beyond the bound more are dropped like past [`INBOX_LIMIT`]. A
/// queued message keeps its whole frame (its tensor is a view into it), and
/// the count alone would let peers pin up to a thousand 256 MiB frames while
/// this node averages or takes a stage over.
const INBOX_BYTES: usize = 1 << 30;

/// Upstream replicas whose micro-batches in flight the inbox holds room for
/// at once, beyond [`INBOX_BYTES`], when micro-batches are large.
const INBOX_REPLICAS: usize = 8;

/// The inbox's bound for `pcfg`: [`INBOX_BYTES`], or room for every
/// micro-batch [`INBOX_REPLICAS`] replicas of the stage before may have in
/// flight, whichever is more, so a configuration the flags accept (up to
/// 256 MiB micro-batches) never loses honest ones to the bound.
pub(super) fn inbox_bytes(pcfg: &PipelineConfig) -> usize {
    pcfg.micro_batch_bytes
        .saturating_mul(pcfg.max_in_flight.max(1))
        .saturating_mul(INBOX_REPLICAS)
        .max(INBOX_BYTES)
}
/// How often a pipeline peer repeats which stage it serves, for peers that
/// joined since and for gossip messages lost before the mesh formed.
const HELLO_EVERY: Duration = Duration::from_secs(1);
/// How long a node joining a run in progress listens for a first-stage
/// replica before it concludes the first stage has none and takes it over.
const FIRST_STAGE_CONFIRM: Duration = Duration::from_secs(5);
/// How long a first-stage node resumed from its checkpoint listens for the
/// other replicas' steps before it trains: they chose their checkpoints at
/// about the same moment, and one a round ahead is caught up to.
const RESUMED_REPLICAS_GRACE: Duration = Duration::from_secs(2);
/// How long a node taking a stage over waits, after a first backup comes,
/// for other holders' answers (their copies may be newer).
const BACKUP_SETTLE: Duration = Duration::from_millis(500);
/// A micro-batch sent this many times without an answer ends the run.
const MAX_TRIES: u32 = 6;

/// How the model is cut and streamed.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// Stages the model is cut into (at least 2).
    pub stages: u32,
    /// Micro-batches per optimizer step.
    pub micro_batches: usize,
    /// Training micro-batches a first-stage replica keeps in the pipeline at
    /// once (1F1B: each returning gradient lets the next one in), which
    /// bounds the graphs every stage holds for backward passes; at least
    /// `micro_batches` is GPipe (a step's forwards all go in first).
    pub max_in_flight: usize,
    /// How long a micro-batch may take to come back before it is sent to another replica.
    pub stage_timeout: Duration,
    /// Bytes of one training micro-batch's activations and token ids between
    /// stages: sizes the inbox's bound (see [`inbox_bytes`]).
    pub micro_batch_bytes: usize,
    /// Where and how often to write this node's stage as a checkpoint (see
    /// [`stage_model_name`]); `None` writes nothing.
    pub checkpoints: Option<StageCheckpoints>,
    /// The stage checkpoint to go on from (`--resume`): the node holds that
    /// stage, from that checkpoint's step and round.
    pub resume: Option<StageResume>,
}

/// The model name a stage's checkpoint records, so `p2ptrain sample` can
/// put a whole model together from one checkpoint per stage.
pub fn stage_model_name(stage: u32, stages: u32) -> String {
    format!("char-lm/stage-{stage}-of-{stages}")
}

/// Reads back what [`stage_model_name`] wrote: (stage, stages).
pub fn parse_stage_model_name(name: &str) -> Option<(u32, u32)> {
    let rest = name.strip_prefix("char-lm/stage-")?;
    let (stage, stages) = rest.split_once("-of-")?;
    let (stage, stages) = (stage.parse().ok()?, stages.parse().ok()?);
    (stage < stages).then_some((stage, stages))
}

/// Pipeline figures added to a node's final report.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PipelineReport {
    /// The stage this node held.
    pub stage: u32,
    /// Stages the model was cut into.
    pub stages: u32,
    /// Peers serving each stage at the end, as this node saw them.
    pub stage_peers: Vec<usize>,
    /// Held-out loss of the final model in bits per character (first stage only).
    pub val_bpc: Option<f64>,
    /// Held-out loss in bits per character before training (first stage only).
    pub initial_val_bpc: Option<f64>,
    /// Tokens this node's micro-batches trained on (first stage only).
    pub tokens: u64,
    /// Trained tokens per second of this node's training time (first stage only).
    pub tokens_per_s: f64,
    /// Fraction of the training phase this node's compute sat idle (the pipeline bubble).
    pub bubble: f64,
    /// Activation and gradient bytes this node sent per optimizer step.
    pub activation_bytes_per_step: f64,
    /// Micro-batches sent again after a timeout.
    pub resent: u64,
    /// The step this node's stage started from when it did not start the
    /// run with it: a backup's (it took the stage over in a run in
    /// progress) or its checkpoint's (`--resume`); `None` otherwise.
    pub resumed_at_step: Option<u64>,
    /// Micro-batches of its window order a first stage resumed from its
    /// checkpoint moved past (the steps it had trained before the stop),
    /// so it did not train on the start of its shard again.
    #[serde(default)]
    pub skipped_micro_batches: u64,
    /// The most training micro-batches whose activations this node's stage
    /// (the last it held) kept at once for their backward pass: its
    /// activation memory in micro-batches, bounded by `max_in_flight` per
    /// first-stage replica sending to it, but for micro-batches resent after
    /// a timeout (0 at the last stage, which back-propagates at once).
    #[serde(default)]
    pub peak_held_micro_batches: usize,
}

/// The bytes a queued micro-batch holds: its activations and token ids.
fn forward_bytes(f: &PipeForward) -> usize {
    f.activations
        .bytes
        .len()
        .saturating_add(f.tokens.len().saturating_mul(4))
}

/// Whether micro-batch `f` is for the stage a node holds (`own`; while it
/// holds none yet, any stage but the first). One for another stage was
/// meant for the stage the node held before it moved (or is made up), and
/// running it would join stages that do not follow each other. The
/// micro-batch names its stage itself: a sender that has just moved is told
/// apart from one still on its old stage before its new hello arrives.
fn runs_on(f: &PipeForward, own: Option<u32>) -> bool {
    f.to_stage != 0 && own.is_none_or(|ours| ours == f.to_stage)
}

/// The bytes a queued gradient holds.
fn backward_bytes(b: &PipeBackward) -> usize {
    b.grad.bytes.len()
}

/// Pipeline messages waiting for the pipeline loop, and who serves which stage.
#[derive(Default)]
pub(super) struct Inbox {
    /// Set on a data-parallel node, which has no use for activations,
    /// gradients or stage backups: nothing would ever take them out of the
    /// inbox, so a peer sending them could pin memory without bound.
    pub(super) data_parallel: bool,
    /// Stages our model is cut into (0 until the pipeline starts); peers
    /// announcing another count cannot exchange activations with us.
    stages: u32,
    forwards: VecDeque<(PeerId, PipeForward)>,
    backwards: VecDeque<(PeerId, PipeBackward)>,
    /// Tensor bytes the queued forwards and backwards hold.
    queued: usize,
    /// The bound on `queued`: [`inbox_bytes`] of the pipeline's
    /// configuration once it starts, [`INBOX_BYTES`] until then.
    queued_limit: Option<usize>,
    hellos: BTreeMap<PeerId, StageHello>,
    /// Our own optimizer steps, announced in every hello.
    step: u64,
    /// Our measured compute throughput on our stage, announced in every hello.
    throughput: stages::Throughput,
    /// The newest parameters heard of per stage: backups of the stages this
    /// node does not serve, one of which a node taking over a stage loads.
    /// Each with who sent it.
    backups: BTreeMap<u32, (PeerId, StageState)>,
    /// Since when each stage has had no live replica.
    empty_since: BTreeMap<u32, Instant>,
    /// Whether this node may move to an emptied stage now (while training,
    /// not while evaluating or finishing).
    may_move: bool,
    /// The stage this node decided to move to.
    move_to: Option<u32>,
    /// The final parameters replicas sent their stage at the end of the run
    /// (see `close_stage`), per stage and sender: kept apart, so one replica
    /// cannot overwrite the closer's.
    closing: BTreeMap<(u32, PeerId), StageState>,
    /// The stage this node holds, whose replicas' closing parameters alone
    /// it keeps (any others would pin up to a stage's worth of memory per
    /// stage and sender for nothing).
    own_stage: Option<u32>,
    /// The stage whose backup this node is asking for (taking it over), if
    /// any: only then may peers of other stages hand one on.
    asking_backup: Option<u32>,
    /// Per stage, the round of the backup last written beside this node's
    /// stage checkpoints, so an unchanged backup is not written again.
    pub(super) backups_saved: BTreeMap<u32, u64>,
}

impl Inbox {
    /// Records a peer's announcement; true if its stage is new to us.
    pub(super) fn on_hello(&mut self, from: PeerId, hello: StageHello) -> bool {
        if self.stages != 0 && hello.stages != self.stages {
            warn!(
                peer = %from,
                theirs = hello.stages,
                ours = self.stages,
                "peer cuts the model into another number of stages; ignored (use the same --stages)"
            );
            return false;
        }
        let before = self.hellos.insert(from, hello);
        // A resumer that starts training becomes a replica of its stage.
        let resuming = |h: &StageHello| h.phase == StagePhase::Resuming;
        before.is_none_or(|b| b.stage != hello.stage || resuming(&b) != resuming(&hello))
    }

    /// Whether a pipeline message from `from` is dropped because this node
    /// trains data-parallel.
    fn not_a_pipeline(&self, from: PeerId, what: &str) -> bool {
        if self.data_parallel {
            debug!(peer = %from, what, "pipeline message to a data-parallel node dropped");
        }
        self.data_parallel
    }

    /// Whether a micro-batch's activations or gradient from `from` fit in the
    /// inbox (by count and by bytes); warns when they do not.
    fn has_room(&self, from: PeerId, queue_len: usize, bytes: usize, what: &str) -> bool {
        let limit = self.queued_limit.unwrap_or(INBOX_BYTES);
        if queue_len >= INBOX_LIMIT || self.queued.saturating_add(bytes) > limit {
            warn!(peer = %from, what, "pipeline inbox full; dropped");
            return false;
        }
        true
    }

    pub(super) fn on_forward(&mut self, from: PeerId, f: PipeForward) {
        if self.not_a_pipeline(from, "activations") {
            return;
        }
        // The first stage computes its own activations, and activations for
        // a stage this node does not hold are not its to run: nothing would
        // take either out of the inbox.
        if !runs_on(&f, self.own_stage) {
            debug!(peer = %from, to_stage = f.to_stage, own_stage = ?self.own_stage, "activations for another stage dropped");
            return;
        }
        let bytes = forward_bytes(&f);
        if self.has_room(from, self.forwards.len(), bytes, "micro-batch") {
            self.queued += bytes;
            self.forwards.push_back((from, f));
        }
    }

    pub(super) fn on_backward(&mut self, from: PeerId, b: PipeBackward) {
        if self.not_a_pipeline(from, "gradient") {
            return;
        }
        // The last stage sends no activations on: no gradient answers it.
        if self.stages != 0 && self.own_stage == Some(self.stages - 1) {
            debug!(peer = %from, "gradient sent to a last-stage node dropped");
            return;
        }
        let bytes = backward_bytes(&b);
        if self.has_room(from, self.backwards.len(), bytes, "gradient") {
            self.queued += bytes;
            self.backwards.push_back((from, b));
        }
    }

    /// The next queued micro-batch. Only micro-batches that run on our stage
    /// are queued ([`runs_on`]), and holding another stage drops the rest.
    pub(super) fn next_forward(&mut self) -> Option<(PeerId, PipeForward)> {
        let (from, f) = self.forwards.pop_front()?;
        self.queued = self.queued.saturating_sub(forward_bytes(&f));
        Some((from, f))
    }

    /// The next queued gradient.
    pub(super) fn next_backward(&mut self) -> Option<(PeerId, PipeBackward)> {
        let (from, b) = self.backwards.pop_front()?;
        self.queued = self.queued.saturating_sub(backward_bytes(&b));
        Some((from, b))
    }

    /// Keeps a stage's parameters: a replica's closing parameters (per
    /// sender), and a backup of the stage. Backups count only from the
    /// stage's lowest-id replica as our hellos show it, the one peer that
    /// sends them, whose backup replaces any other sender's; or, while we
    /// ask for that stage's backup, from any peer holding one (newest wins).
    /// Otherwise any member could replace a stage's backup, or pin it with a
    /// made-up far round that no honest backup would ever be newer than.
    pub(super) fn on_stage_state(&mut self, from: PeerId, state: StageState) {
        if self.not_a_pipeline(from, "stage parameters") {
            return;
        }
        if self.stages != 0 && state.stages != self.stages {
            debug!(peer = %from, "stage parameters for another stage count ignored");
            return;
        }
        let replica = self
            .hellos
            .get(&from)
            .is_some_and(|h| h.stage == state.stage);
        let designated = self.lowest_replica(state.stage) == Some(from);
        // Asked: from a peer serving a stage (those are who we ask).
        let asked = self.asking_backup == Some(state.stage)
            && !state.last
            && self.hellos.contains_key(&from);
        let closing = replica && state.last;
        if !(designated || asked || closing) {
            warn!(peer = %from, stage = state.stage, "stage parameters from a peer that does not back the stage up; ignored");
            return;
        }
        if closing {
            if self.own_stage == Some(state.stage) {
                self.closing.insert((state.stage, from), state.clone());
            } else {
                debug!(peer = %from, stage = state.stage, "final parameters of a stage this node does not hold; ignored");
            }
        }
        if !designated && !asked {
            return;
        }
        let keep = match self.backups.get(&state.stage) {
            None => true,
            Some((held_from, held)) => {
                (designated && *held_from != from)
                    || (state.round, state.step) > (held.round, held.step)
            }
        };
        if keep {
            debug!(peer = %from, stage = state.stage, round = state.round, "stage backup kept");
            self.backups.insert(state.stage, (from, state));
        }
    }

    /// The replica of `stage` with the lowest node id among those whose
    /// hellos we hold: the one that backs the stage up.
    fn lowest_replica(&self, stage: u32) -> Option<PeerId> {
        self.peers_of_stage(stage).min_by_key(node_id_of)
    }

    /// The backups held of stages other than `own`, to save beside its
    /// checkpoint.
    pub(super) fn backups_of_others(&self, own: u32) -> Vec<StageState> {
        self.backups
            .iter()
            .filter(|(stage, _)| **stage != own)
            .map(|(_, (_, state))| state.clone())
            .collect()
    }

    /// Holds a backup this node (`me`) saved before it stopped, as sent by
    /// itself, unless it holds a newer one already; a backup the stage's
    /// replica sends later replaces it as any other holder's would. It is
    /// on disk already, so it is not saved again.
    pub(super) fn hold_saved_backup(&mut self, me: PeerId, state: StageState) {
        let newer =
            |(_, held): &(PeerId, StageState)| (state.round, state.step) > (held.round, held.step);
        if self.backups.get(&state.stage).is_none_or(newer) {
            self.backups_saved.insert(state.stage, state.round);
            self.backups.insert(state.stage, (me, state));
        }
    }

    /// Whether the backup held of `stage` is a copy this node (`me`) saved
    /// before a stop (no peer sends us our own) while the stage has a
    /// replica again: that replica's parameters are newer than the copy,
    /// and a node taking the stage over should wait for its backup.
    fn copy_outdated_by_replica(&self, stage: u32, me: PeerId) -> bool {
        self.backups
            .get(&stage)
            .is_some_and(|(from, _)| *from == me)
            && self.peers_of_stage(stage).next().is_some()
    }

    /// The backup to answer a request with, if we hold one.
    pub(super) fn backup_for(&self, request: StageStateRequest) -> Option<&StageState> {
        self.backups
            .get(&request.stage)
            .map(|(_, b)| b)
            .filter(|b| b.stages == request.stages)
    }

    /// Notes that this node holds `stage` now, forgetting closing
    /// parameters of any other.
    pub(super) fn hold_stage(&mut self, stage: u32) {
        // Micro-batches and gradients queued for the stage held before are
        // not this one's: their senders time out and send them elsewhere.
        // Queued before the first stage was held (a peer acting on an old
        // hello), a first stage takes no activations and a last one no
        // gradients: left queued, they would fill the bound for good.
        let moved = self.own_stage.is_some_and(|held| held != stage);
        self.forwards.retain(|(_, f)| runs_on(f, Some(stage)));
        if moved || stage.checked_add(1) == Some(self.stages) {
            self.backwards.clear();
        }
        self.queued = self
            .forwards
            .iter()
            .map(|(_, f)| forward_bytes(f))
            .sum::<usize>()
            + self
                .backwards
                .iter()
                .map(|(_, b)| backward_bytes(b))
                .sum::<usize>();
        self.own_stage = Some(stage);
        self.closing.retain(|(s, _), _| *s == stage);
    }

    pub(super) fn forget_peer(&mut self, peer: &PeerId) {
        self.hellos.remove(peer);
    }

    /// Peers whose announcement `wanted` accepts, in a fixed order.
    fn peers_where<'a>(
        &'a self,
        wanted: impl Fn(&StageHello) -> bool + 'a,
    ) -> impl Iterator<Item = PeerId> + 'a {
        self.hellos
            .iter()
            .filter(move |(_, h)| wanted(h))
            .map(|(p, _)| *p)
    }

    /// Peers known to serve `stage`, in a fixed order: its replicas, which
    /// take micro-batches, average and back the stage up. A resumer still
    /// deciding where it goes on from is none of them yet (it announces
    /// its stage only so that a joiner does not choose it).
    pub(super) fn peers_of_stage(&self, stage: u32) -> impl Iterator<Item = PeerId> + '_ {
        self.peers_where(move |h| h.stage == stage && h.phase != StagePhase::Resuming)
    }

    /// The peers a stage's lowest-id replica sends its backup to: the first
    /// stage's for a later stage, the second stage's for the first. One
    /// stage's replicas, not every peer: a stage's parameters can be large,
    /// and they go out after every averaging round.
    pub(super) fn backup_holders(&self, stage: u32) -> Vec<PeerId> {
        let holders = if stage == 0 { 1 } else { 0 };
        self.peers_of_stage(holders).collect()
    }

    /// Peers known to serve another stage than `stage`: those that may hold
    /// its backup (a replica that moved stages keeps what it held).
    pub(super) fn peers_not_of_stage(&self, stage: u32) -> Vec<PeerId> {
        self.peers_where(|h| h.stage != stage).collect()
    }

    fn phases_of_stage(&self, stage: u32) -> impl Iterator<Item = StagePhase> + '_ {
        self.hellos
            .values()
            .filter(move |h| h.stage == stage)
            .map(|h| h.phase)
    }
}

/// A first-stage micro-batch waiting for its answer.
struct InFlight {
    tokens: Vec<u32>,
    activations: Vec<f32>,
    to: PeerId,
    deadline: Instant,
    tries: u32,
}

/// Takes micro-batch `id` out of `waiting` for its answer from `from`, if it
/// still waits for one and `from` is the replica it was sent to (`sent_to`):
/// any other member's answer would be trained on in its place.
fn take_answered<T>(
    waiting: &mut BTreeMap<u64, T>,
    sent_to: impl Fn(&T) -> PeerId,
    from: PeerId,
    id: u64,
) -> Option<T> {
    let std::collections::btree_map::Entry::Occupied(entry) = waiting.entry(id) else {
        debug!(peer = %from, id, "late or duplicate answer ignored");
        return None;
    };
    let to = sent_to(entry.get());
    if to != from {
        warn!(peer = %from, id, expected = %to, "answer from a peer the micro-batch was not sent to; ignored");
        return None;
    }
    Some(entry.remove())
}

/// A middle-stage micro-batch passed on, waiting for its gradient.
struct Relayed {
    /// The replica of the next stage it went to, the only peer whose
    /// answer counts.
    downstream: PeerId,
    upstream: PeerId,
    upstream_id: u64,
    sent_at: Instant,
    train: bool,
}

/// What a stage's training loop works with: the run's settings, the
/// stage's compute, and where it resumed if it took the stage over or
/// resumed it from a checkpoint.
#[derive(Clone, Copy)]
struct StageRun<'a> {
    config: &'a NodeConfig,
    pcfg: &'a PipelineConfig,
    compute: &'a StageCompute,
    resume: Option<ResumePoint>,
}

/// Where a stage's training loop starts when this node did not start the
/// run with it: a backup's or a checkpoint's round and step.
#[derive(Clone, Copy)]
struct ResumePoint {
    round: u64,
    step: u64,
    /// The run's planned length (a first-stage backup's); `None` plans it
    /// from this node's flags.
    total_steps: Option<u64>,
    /// Whether it came from this node's own checkpoint (`--resume`) rather
    /// than a backup the swarm kept.
    from_checkpoint: bool,
}

/// Running totals of one node's pipeline work.
#[derive(Default)]
struct Tally {
    next_id: u64,
    busy: Duration,
    /// Micro-batches this node computed (forward, and backward when training).
    micro: u64,
    pipe_bytes: u64,
    resent: u64,
    tokens: u64,
}

/// Runs a pipeline node until the run is over; returns its final report.
pub async fn run_pipeline(
    config: NodeConfig,
    pipeline: PipelineConfig,
    keypair: Keypair,
    factory: StageFactory,
    report: Reporter,
) -> Result<FinalReport, NodeError> {
    run_pipeline_with_metrics(config, pipeline, keypair, factory, report, None).await
}

/// [`run_pipeline`], also feeding a live metrics registry (`--metrics`).
pub async fn run_pipeline_with_metrics(
    config: NodeConfig,
    pipeline: PipelineConfig,
    keypair: Keypair,
    factory: StageFactory,
    mut report: Reporter,
    metrics: Option<crate::metrics::Metrics>,
) -> Result<FinalReport, NodeError> {
    let peer_id = keypair.public().to_peer_id();
    let span = info_span!("node", peer = %peer_id);
    async move {
        let network = Network::start(config.net.clone(), keypair.clone())?;
        let mut driver = Driver::new(&config, network, &keypair)?;
        driver.observe(metrics);
        let result = driver
            .train_pipeline(&config, &pipeline, factory, &mut report)
            .await;
        if result.is_ok() {
            driver.linger(config.linger).await;
        }
        result
    }
    .instrument(span)
    .await
}

impl Driver {
    async fn train_pipeline(
        &mut self,
        config: &NodeConfig,
        pcfg: &PipelineConfig,
        factory: StageFactory,
        report: &mut Reporter,
    ) -> Result<FinalReport, NodeError> {
        self.announce_listening(report).await?;
        // Each stage needs a peer: a run cannot start with fewer, whatever
        // --min-peers says (a node joining a run in progress sees its peers).
        let want = config.min_peers.max(pcfg.stages as usize);
        self.wait_for_peers(want, config).await?;
        self.pipe.stages = pcfg.stages;
        self.pipe.queued_limit = Some(inbox_bytes(pcfg));
        // A resumer listens as long as a node about to take the first stage
        // over: hearing a live replica of its stage decides what it loads.
        // Meanwhile it announces its stage as resuming, so a node starting
        // beside it joins the run in progress (the stage no resumed node
        // holds) instead of starting afresh; and it serves the backups of
        // other stages it saved.
        let (listen, resuming) = match &pcfg.resume {
            Some(r) => {
                self.hold_saved_backups(r);
                self.pipe.step = r.step;
                (FIRST_STAGE_CONFIRM, Some(r.stage))
            }
            None => (HELLO_EVERY + HELLO_EVERY / 2, None),
        };
        self.listen_for_hellos(pcfg.stages, listen, resuming)
            .await?;
        // Peers but no announcement yet: gossip may not have carried one to
        // a node that has just connected; a resumed run's would put this
        // node on the stage nobody resumed, so listen a little longer.
        if resuming.is_none() && self.pipe.hellos.is_empty() && !self.members.is_empty() {
            self.listen_for_hellos(pcfg.stages, 2 * HELLO_EVERY, None)
                .await?;
        }
        // A node resuming from its stage checkpoint holds that stage again,
        // from the checkpoint; but where a live replica of the stage is past
        // it (the swarm trained on without this node), from the stage's
        // backup, as a late joiner would. Its hellos announce the step, so
        // to peers that start later the run is in progress.
        let mut from_disk = pcfg.resume.as_ref();
        let mut stale_checkpoint = None;
        if let Some(r) = from_disk {
            if let Some(ahead) = self.training_replica_ahead(r.stage, r.step) {
                info!(
                    stage = r.stage,
                    checkpoint_step = r.step,
                    replica_step = ahead,
                    "a replica of the stage is past our checkpoint; taking the stage's backup instead"
                );
                (from_disk, stale_checkpoint) = (None, Some((r, ahead)));
            } else {
                // A replica of its stage from now on, for the other
                // resumers comparing steps (micro-batches sent to it
                // meanwhile wait in its inbox until the stage is loaded).
                self.hello(r.stage, pcfg.stages, StagePhase::Training)?;
            }
        }
        let mut joining = match &pcfg.resume {
            Some(r) => Some(r.stage),
            None => self.stage_to_join(pcfg.stages),
        };
        // Announcements travel by gossip, which a node that has just
        // connected may not get from every peer within one period: before
        // taking the first stage over, listen longer for one of its replicas.
        let confirm_until = Instant::now() + FIRST_STAGE_CONFIRM;
        while pcfg.resume.is_none() && joining == Some(0) && Instant::now() < confirm_until {
            let timer = tokio::time::sleep(HELLO_EVERY / 4);
            let mut timer = std::pin::pin!(timer);
            self.pump_once(timer.as_mut()).await?;
            joining = self.stage_to_join(pcfg.stages);
        }
        let mut stage = match joining {
            Some(stage) => stage,
            None => self.choose_stage(pcfg.stages)?,
        };
        let mut take_over = joining.is_some();
        let mut tally = Tally::default();
        let mut everyone_there = false;
        // A node runs one stage at a time; it goes round again when it moves
        // to a stage left without replicas (see `spare_move`).
        let (stage, compute, resume, outcome, val_bpc) = loop {
            self.stage = Some(stage);
            self.pipe.hold_stage(stage);
            self.stage_scope.set(self.stage);
            let ids = self.swarm_ids();
            self.averager.set_peers(&ids);
            let spec = StageSpec {
                index: stage as usize,
                count: pcfg.stages as usize,
            };
            let name = format!("stage{stage}-{}", self.net.local_peer_id());
            let compute = self
                .pump(StageCompute::spawn(factory.clone(), spec, name))
                .await??;
            info!(
                stage,
                params = compute.num_params,
                "holding a pipeline stage"
            );
            let resume = if let Some(r) = from_disk.take() {
                self.load_stage(r, &compute).await?;
                info!(
                    stage,
                    round = r.round,
                    step = r.step,
                    "resumed the stage from its checkpoint"
                );
                Some(ResumePoint {
                    round: r.round,
                    step: r.step,
                    // The first stage plans the run's length from this
                    // run's flags, so a resumed run can be given more steps.
                    total_steps: None,
                    from_checkpoint: true,
                })
            } else if take_over {
                // A resumer that passed its stale checkpoint over waits for
                // a backup at least as far as the replica it heard (not one
                // a peer saved before the stop), and keeps the checkpoint's
                // moments under the backup's parameters.
                let stale = stale_checkpoint.take().filter(|(r, _)| r.stage == stage);
                // The replica backed the stage up at its last round boundary.
                let every = config.schedule.average_every.max(1);
                let at_least = stale.map_or(0, |(_, ahead)| ahead - ahead % every);
                let backup = self
                    .take_over_stage(stage, pcfg, &compute, at_least)
                    .await?;
                if let Some((r, _)) = stale {
                    self.restore_stage_moments(r, &compute).await?;
                }
                Some(ResumePoint {
                    round: backup.round,
                    step: backup.step,
                    // Later stages' backups carry 0: they plan nothing.
                    total_steps: Some(backup.total_steps).filter(|t| *t > 0),
                    from_checkpoint: false,
                })
            } else {
                None
            };
            let mut last_hello = self.hello(stage, pcfg.stages, StagePhase::Training)?;
            if !everyone_there {
                self.wait_for_every_stage(config, pcfg, stage, &mut last_hello)
                    .await?;
                everyone_there = true;
            }
            let ids = self.swarm_ids();
            self.averager.set_peers(&ids);
            report(&NodeEvent::Started {
                peers: self.members.len() + 1,
                shard: 0,
                total_steps: 0,
                stage: Some(stage),
            });
            let run = StageRun {
                config,
                pcfg,
                compute: &compute,
                resume,
            };
            let (outcome, val_bpc) = if spec.is_first() {
                let outcome = self
                    .first_stage(run, &mut last_hello, &mut tally, report)
                    .await?;
                if let Some(to) = outcome.moved_to {
                    (stage, take_over) = (to, true);
                    continue;
                }
                last_hello = self.hello(stage, pcfg.stages, StagePhase::Trained)?;
                // Evaluate once every stage holds its final (averaged) parameters.
                self.wait_for_later_stages(config, pcfg, &mut last_hello)
                    .await?;
                let bpc = self
                    .evaluate_pipeline(pcfg, &compute, &mut last_hello, &mut tally)
                    .await?;
                self.hello(stage, pcfg.stages, StagePhase::Done)?;
                (outcome, Some(bpc))
            } else {
                let outcome = self
                    .later_stage(run, &mut last_hello, &mut tally, report)
                    .await?;
                if let Some(to) = outcome.moved_to {
                    (stage, take_over) = (to, true);
                    continue;
                }
                (outcome, None)
            };
            break (stage, compute, resume, outcome, val_bpc);
        };
        let initial_bpc = outcome.initial_bpc;
        let params = self.pump(compute.params()).await??;
        let model_digest = checkpoint::params_digest(&params);
        if let Some(to) = &pcfg.checkpoints {
            let at = StagePoint {
                stage,
                stages: pcfg.stages,
                // A spare that moved stages may end on a backup's round,
                // below rounds it checkpointed in its old stage.
                round: outcome
                    .rounds
                    .max(self.averager.last_finished().unwrap_or(0)),
                step: outcome.steps,
                samples: samples_before(pcfg) + tally.tokens,
                params_digest: model_digest.clone(),
            };
            let path = self.save_stage(config, to, &compute, at, &params).await?;
            info!(path = %path.display(), "final stage parameters written");
            self.save_held_backups(config, to, stage).await?;
        }
        let stage_peers = (0..pcfg.stages)
            .map(|s| self.pipe.peers_of_stage(s).count() + usize::from(s == stage))
            .collect();
        let train_s = outcome.training.as_secs_f64().max(1e-9);
        let pipeline = PipelineReport {
            stage,
            stages: pcfg.stages,
            stage_peers,
            val_bpc,
            initial_val_bpc: initial_bpc,
            tokens: tally.tokens,
            tokens_per_s: tally.tokens as f64 / train_s,
            bubble: (1.0 - tally.busy.as_secs_f64() / train_s).clamp(0.0, 1.0),
            activation_bytes_per_step: tally.pipe_bytes as f64 / outcome.steps.max(1) as f64,
            resent: tally.resent,
            resumed_at_step: resume.map(|r| r.step),
            skipped_micro_batches: outcome.skipped_micro_batches,
            peak_held_micro_batches: compute.peak_graphs_held(),
        };
        let final_report = FinalReport {
            peer_id: self.net.local_peer_id().to_string(),
            rounds: outcome.rounds,
            steps: outcome.steps,
            samples: samples_before(pcfg) + tally.tokens,
            test_accuracy: None,
            test_loss: val_bpc.map_or(f32::NAN, |b| b as f32),
            final_loss: outcome.last_loss,
            wall_s: self.now().as_secs_f64(),
            bytes_sent: self.net.stats().sent(),
            model_digest,
            complete_rounds: outcome.complete_rounds,
            averaging_s: outcome.averaging_s,
            training_s: train_s,
            pipeline: Some(pipeline),
            paths: self.net.stats().paths(),
            reachability: self.net.stats().reachability().0,
        };
        info!(stage, val_bpc = ?val_bpc, "pipeline training finished");
        report(&NodeEvent::Finished(final_report.clone()));
        Ok(final_report)
    }

    /// Waits (bounded by the peer wait) until every stage has a replica:
    /// before that, no micro-batch can go through.
    async fn wait_for_every_stage(
        &mut self,
        config: &NodeConfig,
        pcfg: &PipelineConfig,
        stage: u32,
        last_hello: &mut Instant,
    ) -> Result<(), NodeError> {
        let deadline = Instant::now() + config.wait_for_peers;
        while let Some(missing) =
            (0..pcfg.stages).find(|s| *s != stage && self.pipe.peers_of_stage(*s).next().is_none())
        {
            if Instant::now() > deadline {
                return Err(NodeError::StageUnserved { stage: missing });
            }
            self.pipe_wait(
                last_hello,
                stage,
                pcfg.stages,
                StagePhase::Training,
                Duration::from_millis(200),
            )
            .await?;
        }
        Ok(())
    }

    /// The number of this node's next averaging round after `round`: past
    /// what the swarm has reached and past every round this node's averager
    /// has finished, which may be ahead when the node served another stage
    /// before a spare move (the averager refuses a round it has seen).
    fn next_stage_round(&self, round: u64) -> u64 {
        let after_finished = self
            .averager
            .last_finished()
            .map_or(0, |r| r.saturating_add(1));
        round
            .saturating_add(1)
            .max(self.swarm_round.round())
            .max(after_finished)
    }

    /// Live replicas of `stage` as this node sees them (itself included when
    /// it holds that stage), sorted: also a pipeline node's averaging group.
    pub(super) fn live_replicas(&self, stage: u32) -> Vec<NodeId> {
        let mut ids: Vec<NodeId> = self
            .pipe
            .peers_of_stage(stage)
            .map(|p| node_id_of(&p))
            .filter(|id| self.members.contains_key(id))
            .collect();
        if self.stage == Some(stage) {
            ids.push(self.me);
        }
        ids.sort();
        ids.dedup();
        ids
    }

    /// The stage this node should move to now, if any: when a stage has had
    /// no live replica for a stage timeout, the replica that
    /// [`stages::spare_to_move`] names on this node's view moves there and
    /// loads the stage's backup (its own copy, or a holder's).
    fn spare_move(&mut self, pcfg: &PipelineConfig) -> Option<u32> {
        self.stage?;
        let now = Instant::now();
        let mut empty = Vec::new();
        for s in 0..pcfg.stages {
            if self.live_replicas(s).is_empty() {
                let since = *self.pipe.empty_since.entry(s).or_insert(now);
                if now.duration_since(since) >= pcfg.stage_timeout {
                    empty.push(s as usize);
                }
            } else {
                self.pipe.empty_since.remove(&s);
            }
        }
        let serving: Vec<(NodeId, usize)> = (0..pcfg.stages)
            .flat_map(|s| {
                self.live_replicas(s)
                    .into_iter()
                    .map(move |id| (id, s as usize))
            })
            .collect();
        match stages::spare_to_move(&serving, &empty) {
            Some((mover, to)) if mover == self.me => Some(to as u32),
            _ => None,
        }
    }

    /// This node's stage under the assignment every peer computes from the
    /// same member set (the swarm waited for `--min-peers` first).
    fn choose_stage(&self, count: u32) -> Result<u32, NodeError> {
        let mut ids: Vec<NodeId> = self.members.keys().copied().collect();
        ids.push(self.me);
        let peers: Vec<_> = ids
            .iter()
            .map(|id| (*id, stages::Throughput::UNKNOWN))
            .collect();
        let assignment = stages::assign(&peers, count as usize).map_err(NodeError::Stages)?;
        let stage = assignment
            .stage_of(self.me)
            .ok_or(NodeError::StageUnserved { stage: 0 })?;
        Ok(stage as u32)
    }

    /// Gathers peers' stage announcements for `how_long` (a little over one
    /// hello period for a fresh node), so a node starting late sees the run
    /// it is joining; a resumer announces its stage (`resuming`) meanwhile.
    async fn listen_for_hellos(
        &mut self,
        stages: u32,
        how_long: Duration,
        resuming: Option<u32>,
    ) -> Result<(), NodeError> {
        if stages < 2 {
            return Ok(());
        }
        let until = Instant::now() + how_long;
        // A resumer announces at once and then every hello period.
        let mut next_hello = if resuming.is_some() {
            Instant::now()
        } else {
            until
        };
        while Instant::now() < until {
            if let Some(stage) = resuming.filter(|_| Instant::now() >= next_hello) {
                next_hello = self.hello(stage, stages, StagePhase::Resuming)? + HELLO_EVERY;
            }
            let timer = tokio::time::sleep_until(until.min(next_hello).into());
            let mut timer = std::pin::pin!(timer);
            self.pump_once(timer.as_mut()).await?;
        }
        // Announcements heard before we knew our stage count may not match it.
        self.pipe.hellos.retain(|_, h| h.stages == stages);
        Ok(())
    }

    /// The stage to take over when the run is already in progress (a peer
    /// announces steps taken or training finished): see
    /// [`stages::stage_to_take`]. `None` for a fresh run, where every peer
    /// computes the same assignment instead.
    fn stage_to_join(&self, stages: u32) -> Option<u32> {
        let hellos = &self.pipe.hellos;
        let in_progress = hellos
            .values()
            .any(|h| h.step > 0 || h.phase != StagePhase::Training);
        if !in_progress || stages < 2 {
            return None;
        }
        let current: Vec<(usize, stages::Throughput)> = hellos
            .values()
            .map(|h| {
                (
                    h.stage as usize,
                    stages::Throughput::from_milli(h.throughput),
                )
            })
            .collect();
        stages::stage_to_take(&current, stages as usize).map(|s| s as u32)
    }

    /// The highest step past `step` that a live replica of `stage` announces,
    /// if one does.
    fn replica_ahead(&self, stage: u32, step: u64) -> Option<u64> {
        self.step_ahead(stage, step, |_| true)
    }

    /// [`Self::replica_ahead`] among replicas still training: only they will
    /// average again and so back the stage up.
    fn training_replica_ahead(&self, stage: u32, step: u64) -> Option<u64> {
        self.step_ahead(stage, step, |h| h.phase == StagePhase::Training)
    }

    fn step_ahead(
        &self,
        stage: u32,
        step: u64,
        counts: impl Fn(&StageHello) -> bool,
    ) -> Option<u64> {
        self.pipe
            .hellos
            .iter()
            .filter(|(peer, h)| {
                h.stage == stage
                    && h.step > step
                    && counts(h)
                    && self.members.contains_key(&node_id_of(peer))
            })
            .map(|(_, h)| h.step)
            .max()
    }

    /// Loads stage `stage`'s newest backup into `compute`: this node's own if
    /// it holds one (a spare that served another stage), else asking the
    /// other stages' peers once a second until one answers (bounded by the
    /// peer wait) with one of step `at_least` or later. The payload's blake3
    /// digest was checked on decode.
    async fn take_over_stage(
        &mut self,
        stage: u32,
        pcfg: &PipelineConfig,
        compute: &StageCompute,
        at_least: u64,
    ) -> Result<StageState, NodeError> {
        let request = StageStateRequest {
            stage,
            stages: pcfg.stages,
        };
        let deadline = Instant::now() + self.peer_wait;
        let mut asked = Instant::now() - HELLO_EVERY;
        self.pipe.asking_backup = Some(stage);
        // Holders may hold copies of different ages (one saved before a
        // stop, say): after the first answer, the others get a moment to
        // answer too, and the newest is kept.
        let mut settle_until = None;
        let backup = loop {
            let fitting = self.pipe.backup_for(request).filter(|b| b.step >= at_least);
            if let Some(b) = fitting {
                let until = *settle_until.get_or_insert_with(|| Instant::now() + BACKUP_SETTLE);
                if Instant::now() >= until {
                    break b.clone();
                }
            }
            if Instant::now() > deadline {
                self.pipe.asking_backup = None;
                return Err(NodeError::StageBackupUnavailable { stage });
            }
            if asked.elapsed() >= HELLO_EVERY {
                let holders = self.pipe.peers_not_of_stage(stage);
                let ask = Message::StageStateRequest(request);
                self.send_each(holders, &ask, "stage backup request")?;
                asked = Instant::now();
            }
            let timer = tokio::time::sleep(Duration::from_millis(100));
            let mut timer = std::pin::pin!(timer);
            self.pump_once(timer.as_mut()).await?;
        };
        // (An error above ends the node, so it does not reset this.)
        self.pipe.asking_backup = None;
        let values = backup
            .params
            .decode()
            .map_err(|_| NodeError::StageBackupUnavailable { stage })?;
        if values.len() != compute.num_params {
            return Err(NodeError::StageBackupMismatch {
                stage,
                got: values.len(),
                want: compute.num_params,
            });
        }
        self.pump(compute.set_params(values)).await??;
        self.pipe.step = backup.step;
        info!(
            stage,
            round = backup.round,
            step = backup.step,
            "took over a stage of the run in progress from its backup"
        );
        Ok(backup)
    }

    /// Answers a request for a stage's backup, if we hold one.
    pub(super) fn serve_stage_backup(
        &mut self,
        to: PeerId,
        request: StageStateRequest,
    ) -> Result<(), NodeError> {
        let Some(backup) = self.pipe.backup_for(request) else {
            debug!(peer = %to, stage = request.stage, "no backup of the requested stage");
            return Ok(());
        };
        if self
            .pipe
            .copy_outdated_by_replica(request.stage, self.net.local_peer_id())
        {
            debug!(peer = %to, stage = request.stage, "our copy of the stage predates its live replica's; not served");
            return Ok(());
        }
        let now = self.now();
        if !self.serve_limits.allow_backup(node_id_of(&to), now) {
            warn!(peer = %to, stage = request.stage, "stage backup request over the peer's budget; refused");
            return Ok(());
        }
        info!(peer = %to, stage = request.stage, round = backup.round, "sending a stage backup");
        let msg = Message::StageState(backup.clone());
        self.send_each([to], &msg, "stage backup")
    }

    /// The run's last word within a stage. Its replicas can end the final
    /// averaging round holding different parameters (a reduced part that
    /// reached one replica too late), and nothing after it would mend that;
    /// so the stage's lowest-id live replica sends its final parameters to
    /// the others, which adopt them. A replica that hears nothing within the
    /// averaging deadlines (the sender died) keeps its own, with a warning.
    async fn close_stage(
        &mut self,
        stage: u32,
        round: u64,
        step: u64,
        values: Vec<f32>,
        num_params: usize,
    ) -> Result<Vec<f32>, NodeError> {
        let replicas = self.live_replicas(stage);
        let Some(&closer) = replicas.first() else {
            return Ok(values);
        };
        if closer == self.me {
            let msg = Message::StageState(StageState {
                stage,
                stages: self.pipe.stages,
                round,
                step,
                total_steps: 0,
                params: tensor::Payload::from_f32(&values),
                last: true,
            });
            let others: Vec<PeerId> = self
                .pipe
                .peers_of_stage(stage)
                .filter(|p| replicas.contains(&node_id_of(p)))
                .collect();
            self.send_each(others, &msg, "stage's final parameters")?;
            return Ok(values);
        }
        let deadline = Instant::now() + self.closing_wait;
        loop {
            let sent = self
                .pipe
                .closing
                .iter()
                .find(|((s, from), _)| *s == stage && node_id_of(from) == closer);
            if let Some(((_, from), state)) = sent {
                match state.params.decode() {
                    Ok(theirs) if theirs.len() == num_params => {
                        if theirs != values {
                            info!(
                                stage,
                                "adopted the stage's final parameters from its lowest-id replica"
                            );
                        }
                        return Ok(theirs);
                    }
                    _ => {
                        warn!(peer = %from, "final stage parameters of the wrong size; keeping ours");
                        return Ok(values);
                    }
                }
            }
            if Instant::now() >= deadline {
                warn!(
                    stage,
                    "the stage's lowest-id replica sent no final parameters; keeping ours (replicas may disagree)"
                );
                return Ok(values);
            }
            let timer = tokio::time::sleep(Duration::from_millis(50));
            let mut timer = std::pin::pin!(timer);
            self.pump_once(timer.as_mut()).await?;
        }
    }

    /// After a stage's averaging round, its lowest-id live replica sends the
    /// averaged parameters to the stage's [backup holders](Inbox::backup_holders),
    /// the first stage with the run's planned length (`total_steps`).
    ///
    /// Returns the blake3 of the parameters when it sent them (the payload's
    /// digest, which is the stage's model digest), so they are hashed once.
    fn back_up_stage(
        &mut self,
        stage: u32,
        round: u64,
        step: u64,
        total_steps: u64,
        values: &[f32],
    ) -> Result<Option<[u8; 32]>, NodeError> {
        let lowest = self.swarm_ids().first().copied();
        if lowest != Some(self.me) {
            return Ok(None);
        }
        let params = tensor::Payload::from_f32(values);
        let digest = params.digest;
        let msg = Message::StageState(StageState {
            stage,
            stages: self.pipe.stages,
            round,
            step,
            total_steps: if stage == 0 { total_steps } else { 0 },
            params,
            last: false,
        });
        let holders = self.pipe.backup_holders(stage);
        self.send_each(holders, &msg, "stage backup")?;
        Ok(Some(digest))
    }

    /// Announces our stage and phase to the swarm; returns when.
    fn hello(&mut self, stage: u32, stages: u32, phase: StagePhase) -> Result<Instant, NodeError> {
        let msg = Message::StageHello(StageHello {
            stage,
            stages,
            phase,
            step: self.pipe.step,
            throughput: self.pipe.throughput.milli().unwrap_or(0),
        });
        if let Ok(bytes) = wire::encode(&msg) {
            self.check_sent(self.net.broadcast(bytes))?;
        }
        Ok(Instant::now())
    }

    /// Handles network events for up to `wait`, repeating our announcement
    /// every [`HELLO_EVERY`].
    async fn pipe_wait(
        &mut self,
        last_hello: &mut Instant,
        stage: u32,
        stages: u32,
        phase: StagePhase,
        wait: Duration,
    ) -> Result<(), NodeError> {
        if last_hello.elapsed() >= HELLO_EVERY {
            *last_hello = self.hello(stage, stages, phase)?;
        }
        let timer = tokio::time::sleep(wait.min(HELLO_EVERY));
        let mut timer = std::pin::pin!(timer);
        self.pump_once(timer.as_mut()).await?;
        Ok(())
    }

    /// Sends `bytes` to `to`, counting them as pipeline traffic.
    fn send_pipe(&mut self, to: PeerId, msg: &Message, tally: &mut Tally) -> Result<(), NodeError> {
        match wire::encode(msg) {
            Ok(bytes) => {
                tally.pipe_bytes += bytes.len() as u64;
                self.check_sent(self.net.send(to, bytes))
            }
            Err(source) => Err(NodeError::PipeEncode {
                what: match msg {
                    Message::PipeForward(_) => "micro-batch's activations",
                    Message::PipeBackward(_) => "micro-batch's gradient",
                    Message::StageState(_) => "stage's parameters",
                    _ => "message",
                },
                source,
            }),
        }
    }

    /// The replica of `stage` to send the next micro-batch to: round robin
    /// over live replicas, avoiding `avoid` when another exists.
    fn route(&self, stage: u32, turn: u64, avoid: Option<PeerId>) -> Option<PeerId> {
        let live: Vec<PeerId> = self
            .pipe
            .peers_of_stage(stage)
            .filter(|p| self.members.contains_key(&node_id_of(p)))
            .collect();
        let choices: Vec<PeerId> = match avoid {
            Some(a) if live.len() > 1 => live.into_iter().filter(|p| *p != a).collect(),
            _ => live,
        };
        if choices.is_empty() {
            return None;
        }
        choices.get(turn as usize % choices.len()).copied()
    }

    /// The first stage's training loop. A node that took the stage over or
    /// resumed it from a checkpoint (`resume`) continues from that step and
    /// round to the run's planned end, and does not measure the starting
    /// loss again.
    async fn first_stage(
        &mut self,
        run: StageRun<'_>,
        last_hello: &mut Instant,
        tally: &mut Tally,
        report: &mut Reporter,
    ) -> Result<StageOutcome, NodeError> {
        let (config, pcfg, compute, resume) = (run.config, run.pcfg, run.compute, run.resume);
        let replicas = self.swarm_ids();
        self.set_window_shard(config, compute).await?;
        let total_steps = resume.and_then(|r| r.total_steps).unwrap_or_else(|| {
            config
                .schedule
                .total_steps(replicas.len(), compute.num_train_windows)
        });
        let every = config.schedule.average_every.max(1);
        let initial_bpc = match resume {
            Some(_) => None,
            None => Some(
                self.evaluate_pipeline(pcfg, compute, last_hello, tally)
                    .await?,
            ),
        };
        let (mut start, mut round) = resume.map_or((0, 0), |r| (r.step, r.round));
        if resume.is_some_and(|r| r.from_checkpoint) {
            // Replicas restarted together announce their checkpoints' steps
            // within moments of each other: hear them out before comparing.
            let until = Instant::now() + RESUMED_REPLICAS_GRACE;
            while Instant::now() < until {
                let left = until.saturating_duration_since(Instant::now());
                self.pipe_wait(last_hello, 0, pcfg.stages, StagePhase::Training, left)
                    .await?;
            }
        }
        let ahead = resume
            .filter(|r| r.from_checkpoint)
            .and_then(|_| self.replica_ahead(0, start));
        if let Some(ahead) = ahead {
            // Replicas restarted together may hold checkpoints one interval
            // apart (one was killed between its peers' writes): go on from
            // the furthest one's step and round, so they average together
            // and end the run together. A replica further ahead, or done,
            // trained on without this node: its checkpoint is stale.
            let interval = pcfg
                .checkpoints
                .as_ref()
                .map_or(every, |c| c.every_rounds.max(1).saturating_mul(every));
            let Some((step, r)) = catch_up(start, round, ahead, every, interval, total_steps)
            else {
                return Err(NodeError::StaleCheckpoint {
                    stage: 0,
                    ours: start,
                    theirs: ahead,
                });
            };
            info!(
                from = start,
                to = step,
                "stepping to a first-stage replica's later step"
            );
            (start, round) = (step, r);
            self.pipe.step = start;
        }
        // Go on where this node's passes over its shard stood (exactly so
        // where the shard is the one it had; elsewhere as good a start as
        // any), not at the start of its shard again. Replicas restarted
        // together have heard each other by now: the shard is the one the
        // run goes on with, so no reshard at its first round undoes this.
        let mut skipped = 0;
        if let Some(r) = resume.filter(|r| r.from_checkpoint) {
            if self.members_changed {
                self.set_window_shard(config, compute).await?;
            }
            let drawn = r.step.saturating_mul(pcfg.micro_batches as u64);
            skipped = self.pump(compute.skip_micro_batches(drawn)).await??;
        }
        info!(total_steps, start, initial_bpc = ?initial_bpc, "pipeline training starts");
        let mut outcome = StageOutcome {
            initial_bpc,
            steps: start,
            skipped_micro_batches: skipped,
            ..StageOutcome::default()
        };
        let mut round_losses = Vec::new();
        let t0 = Instant::now();
        self.pipe.may_move = true;
        for step in start.saturating_add(1)..=total_steps {
            let mut batch = Vec::with_capacity(pcfg.micro_batches);
            for _ in 0..pcfg.micro_batches {
                let t = Instant::now();
                batch.push(self.pump(compute.next_train_tokens()).await??);
                tally.busy += t.elapsed();
            }
            let Some(losses) = self
                .run_micro_batches(pcfg, compute, batch, true, last_hello, tally)
                .await?
            else {
                // This node moves to a stage left without replicas; the
                // step's work is dropped with this stage's compute.
                self.pipe.may_move = false;
                outcome.moved_to = self.pipe.move_to.take();
                outcome.rounds = round;
                outcome.training = t0.elapsed();
                return Ok(outcome);
            };
            let t = Instant::now();
            self.pump(compute.apply_step()).await??;
            tally.busy += t.elapsed();
            round_losses.extend(losses.iter().map(|(l, _, _)| *l));
            outcome.steps = step;
            self.pipe.step = step;
            if step % every == 0 || step == total_steps {
                round = self.next_stage_round(round);
                let loss = mean(&round_losses);
                round_losses.clear();
                self.stage_round(
                    run,
                    round,
                    step,
                    total_steps,
                    loss,
                    t0,
                    tally,
                    &mut outcome,
                    report,
                )
                .await?;
                if self.members_changed {
                    self.set_window_shard(config, compute).await?;
                }
            }
        }
        self.pipe.may_move = false;
        outcome.rounds = round;
        outcome.training = t0.elapsed();
        Ok(outcome)
    }

    /// One averaging round among this stage's replicas, and its report.
    #[allow(clippy::too_many_arguments)]
    async fn stage_round(
        &mut self,
        run: StageRun<'_>,
        round: u64,
        step: u64,
        total_steps: u64,
        loss: f32,
        t0: Instant,
        tally: &Tally,
        outcome: &mut StageOutcome,
        report: &mut Reporter,
    ) -> Result<(), NodeError> {
        let compute = run.compute;
        let span = info_span!("round", round);
        let t1 = Instant::now();
        let params = self.pump(compute.params()).await??;
        let avg = self.average(round, params).instrument(span.clone()).await?;
        let averaging_s = t1.elapsed().as_secs_f64();
        let group = avg.group.len();
        let complete = group > 1
            && avg
                .parts
                .iter()
                .all(|p| p.averaged && p.contributors.len() == group);
        self.pipe.throughput = stages::Throughput::from_per_sec(
            tally.micro as f64 / tally.busy.as_secs_f64().max(1e-9),
        )
        .coarse();
        let stage = compute.spec.index as u32;
        let last = total_steps != 0 && step >= total_steps;
        let values = if last {
            self.close_stage(stage, round, step, avg.values, compute.num_params)
                .await?
        } else {
            avg.values
        };
        let model_digest = match self.back_up_stage(stage, round, step, total_steps, &values)? {
            Some(digest) => checkpoint::hex(&digest),
            None => checkpoint::params_digest(&values),
        };
        let at = StagePoint {
            stage,
            stages: run.pcfg.stages,
            round,
            step,
            samples: samples_before(run.pcfg) + tally.tokens,
            params_digest: model_digest.clone(),
        };
        self.checkpoint_stage_round(run, at, &values, outcome)
            .instrument(span.clone())
            .await?;
        self.pump(compute.set_params(values)).await??;
        outcome.rounds = round;
        outcome.complete_rounds += u64::from(complete);
        outcome.averaging_s += averaging_s;
        outcome.last_loss = loss;
        span.in_scope(|| info!(group, loss, averaging_s, "stage round finished"));
        report(&NodeEvent::Round(RoundReport {
            round,
            step,
            // A stage counts the optimizer steps it took, in step with the
            // other stages.
            run_step: step,
            total_steps,
            peers: group,
            loss,
            samples: samples_before(run.pcfg) + tally.tokens,
            samples_per_s: tally.tokens as f64 / t0.elapsed().as_secs_f64().max(1e-9),
            bytes_sent: self.net.stats().sent(),
            dropped: avg.dropped.len(),
            averaging_s,
            reduce_deadline_s: self.averager.reduce_deadline().as_secs_f64(),
            join_window_s: self.averager.join_window().as_secs_f64(),
            model_digest,
        }));
        Ok(())
    }

    /// Writes the stage's checkpoint after round `at.round` where one is due:
    /// every replica and stage at the same rounds (the multiples of
    /// `--checkpoint-every`), and a node that took this stage over at its
    /// first round with it, so a stop right after a move does not leave only
    /// its old stage on disk. A failed write (a full disk, say) must not end
    /// the run: it is logged and the next checkpoint round tries again (the
    /// checkpoint at the end of the run still fails the node).
    async fn checkpoint_stage_round(
        &mut self,
        run: StageRun<'_>,
        at: StagePoint,
        values: &[f32],
        outcome: &mut StageOutcome,
    ) -> Result<(), NodeError> {
        let Some(to) = run.pcfg.checkpoints.as_ref() else {
            return Ok(());
        };
        if !at.round.is_multiple_of(to.every_rounds.max(1)) && outcome.tried_saving {
            return Ok(());
        }
        outcome.tried_saving = true;
        let stage = at.stage;
        match self
            .save_stage(run.config, to, run.compute, at, values)
            .await
        {
            Ok(_) => {}
            Err(NodeError::Checkpoint(e)) => {
                error!(error = %e, "stage checkpoint not written; training goes on and the next checkpoint tries again");
            }
            Err(e) => return Err(e),
        }
        self.save_held_backups(run.config, to, stage).await
    }

    /// Sends a first-stage batch of micro-batches through the pipeline and
    /// waits for every answer, back-propagating each gradient as it arrives
    /// (`train`) or only collecting losses. Returns (loss, predicted, tokens) per
    /// micro-batch, with the tokens its loss covered. A micro-batch not answered in time goes to another replica.
    ///
    /// In training at most `max_in_flight` micro-batches are in the pipeline
    /// at once, and each gradient back-propagated lets the next one in (one
    /// forward, one backward: 1F1B), so no stage holds more graphs than
    /// that for this replica (but for a resent micro-batch's first copy,
    /// until the slow replica answers or forgets it); evaluation keeps no
    /// graphs and sends all.
    async fn run_micro_batches(
        &mut self,
        pcfg: &PipelineConfig,
        compute: &StageCompute,
        batch: Vec<Vec<u32>>,
        train: bool,
        last_hello: &mut Instant,
        tally: &mut Tally,
    ) -> Result<Option<Vec<(f32, u32, Vec<u32>)>>, NodeError> {
        let stage = compute.spec.index as u32;
        let next = stage + 1;
        let window = if train {
            pcfg.max_in_flight.max(1)
        } else {
            usize::MAX
        };
        let mut pending: BTreeMap<u64, InFlight> = BTreeMap::new();
        let mut results = Vec::with_capacity(batch.len());
        let mut waiting = batch.into_iter();
        loop {
            while pending.len() < window {
                let Some(tokens) = waiting.next() else {
                    break;
                };
                tally.next_id += 1;
                let id = tally.next_id;
                let t = Instant::now();
                let fwd = self
                    .pump(compute.forward(id, tokens.clone(), None, train))
                    .await??;
                tally.busy += t.elapsed();
                tally.micro += 1;
                let activations = match fwd {
                    Forward::Activations(a) => a,
                    // A one-stage "pipeline" (the whole model here): done already.
                    Forward::Loss {
                        loss, tokens: n, ..
                    } => {
                        if train {
                            tally.tokens += n as u64;
                        }
                        results.push((loss, n as u32, tokens));
                        continue;
                    }
                };
                let Some(to) = self
                    .wait_for_route(next, id, None, last_hello, pcfg)
                    .await?
                else {
                    return Ok(None);
                };
                self.send_forward(to, next, id, train, &tokens, &activations, tally)?;
                pending.insert(
                    id,
                    InFlight {
                        tokens,
                        activations,
                        to,
                        deadline: Instant::now() + pcfg.stage_timeout,
                        tries: 1,
                    },
                );
            }
            // The batch is through when nothing waits for an answer and the
            // window above took every micro-batch left.
            if pending.is_empty() {
                break;
            }
            while let Some((from, b)) = self.pipe.next_backward() {
                let Some(p) = take_answered(&mut pending, |p| p.to, from, b.id) else {
                    continue;
                };
                // A bad answer sends the micro-batch to another replica now.
                let mut retry = |p: InFlight| {
                    pending.insert(
                        b.id,
                        InFlight {
                            deadline: Instant::now(),
                            ..p
                        },
                    );
                };
                if let Err(e) = b.fits(p.tokens.len()) {
                    warn!(peer = %from, error = %e, "answer does not fit its micro-batch; sending the micro-batch elsewhere");
                    retry(p);
                    continue;
                }
                if train {
                    let grad = match b.grad.decode() {
                        Ok(g) if g.len() == p.activations.len() => g,
                        Ok(g) => {
                            warn!(peer = %from, got = g.len(), want = p.activations.len(), "gradient of the wrong size; sending the micro-batch elsewhere");
                            retry(p);
                            continue;
                        }
                        Err(e) => {
                            warn!(peer = %from, error = %e, "undecodable gradient; sending the micro-batch elsewhere");
                            retry(p);
                            continue;
                        }
                    };
                    let t = Instant::now();
                    self.pump(compute.backward(b.id, grad)).await??;
                    tally.busy += t.elapsed();
                    tally.tokens += u64::from(b.predicted);
                }
                results.push((b.loss, b.predicted, p.tokens));
            }
            let now = Instant::now();
            let expired: Vec<u64> = pending
                .iter()
                .filter(|(_, p)| p.deadline <= now)
                .map(|(id, _)| *id)
                .collect();
            for id in expired {
                let Some(mut p) = pending.remove(&id) else {
                    continue;
                };
                if p.tries >= MAX_TRIES {
                    return Err(NodeError::MicroBatchLost {
                        stage: next,
                        tries: p.tries,
                    });
                }
                let Some(to) = self
                    .wait_for_route(next, id, Some(p.to), last_hello, pcfg)
                    .await?
                else {
                    return Ok(None);
                };
                warn!(id, from = %p.to, to = %to, "micro-batch unanswered; sending it to another replica");
                self.send_forward(to, next, id, train, &p.tokens, &p.activations, tally)?;
                tally.resent += 1;
                p.to = to;
                p.tries += 1;
                p.deadline = Instant::now() + pcfg.stage_timeout;
                pending.insert(id, p);
            }
            if !self.pipe.backwards.is_empty() {
                continue;
            }
            let wait = pending
                .values()
                .map(|p| p.deadline.saturating_duration_since(Instant::now()))
                .min()
                .unwrap_or_default();
            self.pipe_wait(
                last_hello,
                stage,
                pcfg.stages,
                StagePhase::Training,
                wait.max(Duration::from_millis(1)),
            )
            .await?;
        }
        Ok(Some(results))
    }

    #[allow(clippy::too_many_arguments)]
    fn send_forward(
        &mut self,
        to: PeerId,
        to_stage: u32,
        id: u64,
        train: bool,
        tokens: &[u32],
        activations: &[f32],
        tally: &mut Tally,
    ) -> Result<(), NodeError> {
        let msg = Message::PipeForward(PipeForward {
            id,
            to_stage,
            train,
            tokens: tokens.to_vec(),
            activations: tensor::Payload::from_f32(activations),
        });
        self.send_pipe(to, &msg, tally)
    }

    /// A replica of `stage` to send to, waiting (bounded by the peer wait)
    /// for one to be known if none is right now. `None`: this node is the
    /// spare that moves to a stage left without replicas (`pipe.move_to`).
    async fn wait_for_route(
        &mut self,
        stage: u32,
        turn: u64,
        avoid: Option<PeerId>,
        last_hello: &mut Instant,
        pcfg: &PipelineConfig,
    ) -> Result<Option<PeerId>, NodeError> {
        // A stage without any replica may be taken over by a new peer: wait
        // for one as long as for peers at the start.
        let deadline = Instant::now() + pcfg.stage_timeout.max(self.peer_wait);
        let me = self.stage.unwrap_or_default();
        let mut warned = false;
        loop {
            if let Some(to) = self.route(stage, turn, avoid) {
                return Ok(Some(to));
            }
            if self.pipe.may_move {
                if let Some(to) = self.spare_move(pcfg) {
                    info!(
                        from = me,
                        to, "moving to a pipeline stage left without replicas"
                    );
                    self.pipe.move_to = Some(to);
                    return Ok(None);
                }
            }
            if Instant::now() > deadline {
                return Err(NodeError::StageUnserved { stage });
            }
            if !warned {
                warn!(
                    stage,
                    wait_s = deadline.saturating_duration_since(Instant::now()).as_secs(),
                    "no live replica of the next stage; waiting for a peer to take it over"
                );
                warned = true;
            }
            self.pipe_wait(
                last_hello,
                me,
                pcfg.stages,
                StagePhase::Training,
                Duration::from_millis(100),
            )
            .await?;
        }
    }

    /// Gives this first-stage replica its shard of the training windows,
    /// shared among the first stage's replicas only.
    async fn set_window_shard(
        &mut self,
        config: &NodeConfig,
        compute: &StageCompute,
    ) -> Result<(), NodeError> {
        let ids = self.swarm_ids();
        let indices = shards::shard_of(self.me, &ids, compute.num_train_windows as u64);
        self.observe_shards(&ids, compute.num_train_windows as u64, indices.len());
        let seed = shards::epoch_seed(config.seed, 0, self.me);
        self.members_changed = false;
        debug!(
            replicas = ids.len(),
            windows = indices.len(),
            "window shard assigned"
        );
        self.pump(compute.set_shard(Shard {
            indices,
            seed,
            peers: ids.len(),
        }))
        .await??;
        Ok(())
    }

    /// Runs the held-out micro-batches through the pipeline; returns the
    /// loss in bits per character.
    async fn evaluate_pipeline(
        &mut self,
        pcfg: &PipelineConfig,
        compute: &StageCompute,
        last_hello: &mut Instant,
        tally: &mut Tally,
    ) -> Result<f64, NodeError> {
        let batches = self.pump(compute.eval_tokens()).await??;
        let (mut nats, mut predicted, mut bytes, mut chars) = (0f64, 0u64, 0u64, 0u64);
        for chunk in batches.chunks(pcfg.micro_batches.max(1) * 2) {
            let tokens_before = tally.tokens;
            // Moves are off while evaluating (`may_move`), so every batch is answered.
            let results = self
                .run_micro_batches(pcfg, compute, chunk.to_vec(), false, last_hello, tally)
                .await?
                .unwrap_or_default();
            tally.tokens = tokens_before;
            for (loss, n, tokens) in results {
                nats += f64::from(loss) * f64::from(n);
                predicted += u64::from(n);
                bytes += tokens.len() as u64;
                chars += tokens.iter().filter(|t| **t & 0xC0 != 0x80).count() as u64;
            }
        }
        Ok(bits_per_char(nats, predicted, bytes, chars))
    }

    /// First stage: waits (bounded) until every later stage's replicas have
    /// finished training and averaged, so evaluation sees the final model.
    async fn wait_for_later_stages(
        &mut self,
        config: &NodeConfig,
        pcfg: &PipelineConfig,
        last_hello: &mut Instant,
    ) -> Result<(), NodeError> {
        let deadline = Instant::now() + config.wait_for_peers;
        let me = self.stage.unwrap_or_default();
        while (1..pcfg.stages).any(|s| {
            self.pipe
                .phases_of_stage(s)
                .any(|p| p == StagePhase::Training)
        }) {
            if Instant::now() > deadline {
                warn!("later stages still training; evaluating anyway");
                break;
            }
            self.pipe_wait(
                last_hello,
                me,
                pcfg.stages,
                StagePhase::Trained,
                Duration::from_millis(100),
            )
            .await?;
        }
        Ok(())
    }

    /// A later stage's loop: serves micro-batches from the previous stage
    /// (passing them on, or computing the loss at the last stage), steps
    /// and averages like the first stage, and ends when the first stage's
    /// replicas are done (training and evaluation).
    async fn later_stage(
        &mut self,
        run: StageRun<'_>,
        last_hello: &mut Instant,
        tally: &mut Tally,
        report: &mut Reporter,
    ) -> Result<StageOutcome, NodeError> {
        let (config, pcfg, compute, resume) = (run.config, run.pcfg, run.compute, run.resume);
        let stage = compute.spec.index as u32;
        let next = stage + 1;
        let every = config.schedule.average_every.max(1);
        let mut phase = StagePhase::Training;
        let mut outcome = StageOutcome::default();
        let (mut micro, mut turn) = (0usize, 0u64);
        // A node that took the stage over, or resumed it from its checkpoint,
        // continues its step and round count.
        let (mut step, mut round) = resume.map_or((0, 0), |r| (r.step, r.round));
        let mut losses = Vec::new();
        let mut relayed: BTreeMap<u64, Relayed> = BTreeMap::new();
        let mut first_stage_absent_since: Option<Instant> = None;
        let t0 = Instant::now();
        loop {
            if let Some((from, f)) = self.pipe.next_forward() {
                let input = match f.activations.decode() {
                    Ok(v) => v,
                    Err(e) => {
                        warn!(peer = %from, error = %e, "undecodable activations dropped");
                        continue;
                    }
                };
                tally.next_id += 1;
                let local = tally.next_id;
                let t = Instant::now();
                let fwd = self
                    .pump(compute.forward(local, f.tokens.clone(), Some(input), f.train))
                    .await?;
                tally.busy += t.elapsed();
                tally.micro += 1;
                let fwd = match fwd {
                    Ok(fwd) => fwd,
                    Err(e @ crate::compute::ComputeError::Task(_)) => {
                        warn!(peer = %from, error = %e, "micro-batch refused");
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                };
                match fwd {
                    Forward::Loss {
                        loss,
                        tokens,
                        grad_input,
                    } => {
                        let msg = Message::PipeBackward(PipeBackward {
                            id: f.id,
                            loss,
                            predicted: tokens as u32,
                            grad: tensor::Payload::from_f32(&grad_input),
                        });
                        self.send_pipe(from, &msg, tally)?;
                        if f.train {
                            micro += 1;
                            losses.push(loss);
                        }
                    }
                    Forward::Activations(a) => {
                        turn += 1;
                        let Some(to) = self.route(next, turn, None) else {
                            warn!(
                                stage = next,
                                "no replica of the next stage; micro-batch dropped"
                            );
                            compute.forget(local)?;
                            continue;
                        };
                        self.send_forward(to, next, local, f.train, &f.tokens, &a, tally)?;
                        relayed.insert(
                            local,
                            Relayed {
                                downstream: to,
                                upstream: from,
                                upstream_id: f.id,
                                sent_at: Instant::now(),
                                train: f.train,
                            },
                        );
                    }
                }
            } else if let Some((from, b)) = self.pipe.next_backward() {
                let Some(r) = take_answered(&mut relayed, |r| r.downstream, from, b.id) else {
                    continue;
                };
                let grad_input = if r.train {
                    let grad = match b.grad.decode() {
                        Ok(g) => g,
                        Err(e) => {
                            warn!(peer = %from, error = %e, "undecodable gradient dropped");
                            compute.forget(b.id)?;
                            continue;
                        }
                    };
                    let t = Instant::now();
                    let back = self.pump(compute.backward(b.id, grad)).await?;
                    tally.busy += t.elapsed();
                    match back {
                        Ok(g) => g.unwrap_or_default(),
                        Err(e @ crate::compute::ComputeError::Task(_)) => {
                            warn!(peer = %from, error = %e, "gradient refused");
                            continue;
                        }
                        Err(e) => return Err(e.into()),
                    }
                } else {
                    Vec::new()
                };
                let msg = Message::PipeBackward(PipeBackward {
                    id: r.upstream_id,
                    loss: b.loss,
                    predicted: b.predicted,
                    grad: tensor::Payload::from_f32(&grad_input),
                });
                self.send_pipe(r.upstream, &msg, tally)?;
                if r.train {
                    micro += 1;
                    losses.push(b.loss);
                }
            } else {
                // Nothing queued: drop relays whose answer will not come, then
                // see whether the run has moved on.
                let stale: Vec<u64> = relayed
                    .iter()
                    .filter(|(_, r)| r.sent_at.elapsed() > pcfg.stage_timeout * 2)
                    .map(|(id, _)| *id)
                    .collect();
                for id in stale {
                    relayed.remove(&id);
                    compute.forget(id)?;
                }
                if phase == StagePhase::Training {
                    if let Some(to) = self.spare_move(pcfg) {
                        info!(
                            from = stage,
                            to, "moving to a pipeline stage left without replicas"
                        );
                        outcome.moved_to = Some(to);
                        outcome.steps = step;
                        outcome.rounds = round;
                        return Ok(outcome);
                    }
                }
                let first: Vec<StagePhase> = self.pipe.phases_of_stage(0).collect();
                if first.is_empty() {
                    let since = *first_stage_absent_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > config.wait_for_peers {
                        return Err(NodeError::StageUnserved { stage: 0 });
                    }
                } else {
                    first_stage_absent_since = None;
                }
                let first_trained =
                    !first.is_empty() && first.iter().all(|p| *p >= StagePhase::Trained);
                if phase == StagePhase::Training && first_trained && relayed.is_empty() {
                    // Training is over: step on what is left, then a last round
                    // so every replica of this stage holds the same parameters.
                    let stepped_since_round = micro > 0 || step % every != 0;
                    if micro > 0 {
                        self.pump(compute.apply_step()).await??;
                        step = step.saturating_add(1);
                        micro = 0;
                    }
                    // A lone replica that took no step since its last round has
                    // nothing to agree on, and one round more would number its
                    // rounds and checkpoints apart from the first stage's. Alone
                    // as this node sees it: a replica it cannot see but that sees
                    // it runs the round by itself after a join window, and the
                    // closing parameters (`Inbox::closing`) still bring the
                    // replicas onto one model.
                    let alone = self.live_replicas(stage).len() <= 1;
                    if stepped_since_round || !alone {
                        round = self.next_stage_round(round);
                        let loss = if losses.is_empty() {
                            outcome.last_loss
                        } else {
                            mean(&losses)
                        };
                        losses.clear();
                        self.stage_round(
                            run,
                            round,
                            step,
                            step,
                            loss,
                            t0,
                            tally,
                            &mut outcome,
                            report,
                        )
                        .await?;
                    }
                    outcome.training = t0.elapsed();
                    phase = StagePhase::Trained;
                    *last_hello = self.hello(stage, pcfg.stages, phase)?;
                    continue;
                }
                if phase == StagePhase::Trained
                    && first.iter().all(|p| *p == StagePhase::Done)
                    && !first.is_empty()
                {
                    break;
                }
                self.pipe_wait(
                    last_hello,
                    stage,
                    pcfg.stages,
                    phase,
                    Duration::from_millis(100),
                )
                .await?;
                continue;
            }
            if micro >= pcfg.micro_batches {
                let t = Instant::now();
                self.pump(compute.apply_step()).await??;
                tally.busy += t.elapsed();
                micro = 0;
                step = step.saturating_add(1);
                outcome.steps = step;
                self.pipe.step = step;
                if step % every == 0 {
                    round = self.next_stage_round(round);
                    let loss = mean(&losses);
                    losses.clear();
                    self.stage_round(run, round, step, 0, loss, t0, tally, &mut outcome, report)
                        .await?;
                }
            }
            if last_hello.elapsed() >= HELLO_EVERY {
                *last_hello = self.hello(stage, pcfg.stages, phase)?;
            }
        }
        outcome.steps = step;
        outcome.rounds = round;
        self.hello(stage, pcfg.stages, StagePhase::Done)?;
        Ok(outcome)
    }
}

/// What a stage's training loop leaves for the final report.
#[derive(Default)]
struct StageOutcome {
    /// Set when the node left this stage for one without replicas.
    moved_to: Option<u32>,
    steps: u64,
    rounds: u64,
    complete_rounds: u64,
    averaging_s: f64,
    last_loss: f32,
    initial_bpc: Option<f64>,
    /// Micro-batches the first stage's window order moved past at a resume.
    skipped_micro_batches: u64,
    /// Wall time of the training phase (for throughput and the bubble).
    training: Duration,
    /// Whether this node has tried to checkpoint this stage since it took it.
    tried_saving: bool,
}

/// The (step, round) a first-stage replica resumed at `start` and `round`
/// goes on from, where another replica announces the later step `ahead`:
/// the last round boundary (multiple of `every`) at or before `ahead`, with
/// the averaging rounds in between counted, so both number their next
/// round alike. The other may have trained a little since it resumed, so
/// up to two checkpoint intervals (`interval` steps each) are caught up;
/// `None` beyond that (it trained on without this node) or at the run's
/// end (`total_steps`).
fn catch_up(
    start: u64,
    round: u64,
    ahead: u64,
    every: u64,
    interval: u64,
    total_steps: u64,
) -> Option<(u64, u64)> {
    let every = every.max(1);
    let boundary = ahead - ahead % every;
    if boundary <= start {
        return Some((start, round));
    }
    if boundary >= total_steps || boundary - start > interval.saturating_mul(2) {
        return None;
    }
    Some((
        boundary,
        round.saturating_add(boundary / every - start / every),
    ))
}

/// Tokens the run had trained on before this node resumed it (0 on a fresh start).
fn samples_before(pcfg: &PipelineConfig) -> u64 {
    pcfg.resume.as_ref().map_or(0, |r| r.samples)
}

fn mean(values: &[f32]) -> f32 {
    if values.is_empty() {
        return f32::NAN;
    }
    values.iter().sum::<f32>() / values.len() as f32
}

/// Held-out loss in bits per character: nats per predicted token, in bits,
/// scaled by bytes per character (tokens are UTF-8 bytes; plain ASCII text
/// has exactly one byte per character).
fn bits_per_char(nats: f64, predicted: u64, bytes: u64, chars: u64) -> f64 {
    if predicted == 0 || chars == 0 {
        return f64::NAN;
    }
    nats / predicted as f64 / std::f64::consts::LN_2 * (bytes as f64 / chars as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn stage_model_names_round_trip() {
        assert_eq!(
            parse_stage_model_name(&stage_model_name(1, 3)),
            Some((1, 3))
        );
        assert_eq!(parse_stage_model_name("char-lm/stage-3-of-3"), None);
        assert_eq!(parse_stage_model_name("mlp"), None);
    }

    #[test]
    fn a_replica_one_checkpoint_behind_catches_up_and_a_stale_one_does_not() {
        // Rounds of 5 steps, a checkpoint every round, a 40-step run.
        assert_eq!(catch_up(10, 2, 15, 5, 5, 40), Some((15, 3)));
        assert_eq!(catch_up(15, 3, 15, 5, 5, 40), Some((15, 3)));
        assert_eq!(catch_up(15, 3, 10, 5, 5, 40), Some((15, 3)));
        // The other trained two steps since: the round boundary before it.
        assert_eq!(catch_up(10, 2, 17, 5, 5, 40), Some((15, 3)));
        // Or a round since: still within two intervals.
        assert_eq!(catch_up(10, 2, 21, 5, 5, 40), Some((20, 4)));
        // Checkpoints every 2 rounds: up to 20 steps apart.
        assert_eq!(catch_up(10, 2, 30, 5, 10, 40), Some((30, 6)));
        assert_eq!(catch_up(10, 2, 35, 5, 10, 40), None);
        // The other trained on without this node, or finished the run.
        assert_eq!(catch_up(10, 2, 25, 5, 5, 40), None);
        assert_eq!(catch_up(25, 5, 40, 5, 5, 40), None);
    }

    #[test]
    fn bits_per_char_converts_nats_per_byte() {
        // ln 2 nats per byte of ASCII text is one bit per character.
        let b = bits_per_char(std::f64::consts::LN_2 * 100.0, 100, 129, 129);
        assert!((b - 1.0).abs() < 1e-12);
        // Two bytes per character doubles it.
        let b = bits_per_char(std::f64::consts::LN_2 * 100.0, 100, 100, 50);
        assert!((b - 2.0).abs() < 1e-12);
        assert!(bits_per_char(1.0, 0, 1, 1).is_nan());
    }

    #[test]
    fn inbox_tracks_stages_and_bounds_its_queues() {
        let mut inbox = Inbox::default();
        let a = PeerId::random();
        let b = PeerId::random();
        let hello = |stage| StageHello {
            stage,
            stages: 2,
            phase: StagePhase::Training,
            step: 0,
            throughput: 0,
        };
        assert!(inbox.on_hello(a, hello(0)));
        assert!(!inbox.on_hello(a, hello(0)));
        assert!(inbox.on_hello(b, hello(1)));
        // A peer cutting the model differently is not routed to.
        inbox.stages = 2;
        let c = PeerId::random();
        let three = StageHello {
            stages: 3,
            ..hello(1)
        };
        assert!(!inbox.on_hello(c, three));
        assert_eq!(inbox.peers_of_stage(1).collect::<Vec<_>>(), vec![b]);
        assert_eq!(inbox.backup_holders(0), vec![b]);
        assert_eq!(inbox.backup_holders(1), vec![a]);
        inbox.forget_peer(&b);
        assert_eq!(inbox.peers_of_stage(1).count(), 0);
        assert!(inbox.peers_not_of_stage(0).is_empty());
        for id in 0..(INBOX_LIMIT as u64 + 10) {
            inbox.on_forward(
                a,
                PipeForward {
                    id,
                    to_stage: 1,
                    train: true,
                    tokens: vec![],
                    activations: tensor::Payload::from_f32(&[]),
                },
            );
        }
        assert_eq!(inbox.forwards.len(), INBOX_LIMIT);
    }

    fn forward(id: u64, to_stage: u32, values: usize) -> PipeForward {
        PipeForward {
            id,
            to_stage,
            train: true,
            tokens: vec![0; 33],
            activations: tensor::Payload::from_f32(&vec![0.5; values]),
        }
    }

    #[test]
    fn tensors_no_stage_would_take_are_not_queued_and_the_queue_is_bounded_in_bytes() {
        let (a, b) = (PeerId::random(), PeerId::random());
        let limit = 4 * (4 * 100 + 4 * 33);
        let mut inbox = Inbox {
            stages: 3,
            queued_limit: Some(limit),
            ..Inbox::default()
        };
        inbox.on_hello(a, hello(0, 3));
        inbox.on_hello(b, hello(2, 3));
        let grad = |id| PipeBackward {
            id,
            loss: 1.0,
            predicted: 1,
            grad: tensor::Payload::from_f32(&[0.5; 8]),
        };
        // Queued before this node held a stage, then held by the first
        // stage (activations) or the last (gradients): they go.
        inbox.on_forward(b, forward(7, 1, 8));
        inbox.on_backward(a, grad(7));
        inbox.hold_stage(0);
        assert!(inbox.forwards.is_empty() && inbox.backwards.len() == 1);
        inbox.own_stage = None;
        inbox.hold_stage(2);
        assert!(inbox.backwards.is_empty() && inbox.queued == 0);
        inbox.own_stage = None;
        // The first stage never takes activations; the last never gradients.
        inbox.hold_stage(0);
        inbox.on_forward(b, forward(1, 0, 8));
        assert!(inbox.forwards.is_empty());
        inbox.hold_stage(2);
        inbox.on_backward(a, grad(1));
        assert!(inbox.backwards.is_empty());
        // A middle stage takes both, up to the byte bound together (four
        // micro-batches of 100 values and 33 token ids fill it).
        inbox.hold_stage(1);
        for id in 0..4 {
            inbox.on_forward(a, forward(id, 1, 100));
        }
        assert_eq!((inbox.forwards.len(), inbox.queued), (4, limit));
        inbox.on_forward(a, forward(9, 1, 1));
        inbox.on_backward(b, grad(2));
        assert_eq!((inbox.forwards.len(), inbox.backwards.len()), (4, 0));
        // Taking one out makes room again.
        assert_eq!(inbox.next_forward().map(|(_, f)| f.id), Some(0));
        inbox.on_backward(b, grad(3));
        assert_eq!(inbox.next_backward().map(|(_, g)| g.id), Some(3));
        while inbox.next_forward().is_some() {}
        assert_eq!(inbox.queued, 0);
    }

    #[test]
    fn the_inbox_holds_what_eight_upstream_replicas_may_have_in_flight() {
        let pcfg = |micro_batch_bytes| PipelineConfig {
            stages: 2,
            micro_batches: 4,
            max_in_flight: 3,
            stage_timeout: Duration::from_secs(20),
            micro_batch_bytes,
            checkpoints: None,
            resume: None,
        };
        // The defaults' 1 MiB micro-batches: the floor.
        assert_eq!(inbox_bytes(&pcfg(1 << 20)), INBOX_BYTES);
        // The largest the flags accept (~256 MiB): 8 replicas x 3 in flight.
        assert_eq!(inbox_bytes(&pcfg(256 << 20)), 24 * (256 << 20));
        assert_eq!(inbox_bytes(&pcfg(usize::MAX)), usize::MAX);
    }

    #[test]
    fn a_micro_batch_for_another_stage_than_ours_is_dropped() {
        let (first, second, unknown) = (PeerId::random(), PeerId::random(), PeerId::random());
        let mut inbox = Inbox {
            stages: 3,
            ..Inbox::default()
        };
        inbox.on_hello(first, hello(0, 3));
        inbox.on_hello(second, hello(1, 3));
        // Queued before this node held a stage: only those for the stage it
        // then holds stay.
        inbox.on_forward(first, forward(1, 1, 8));
        inbox.on_forward(first, forward(2, 2, 8));
        inbox.hold_stage(1);
        inbox.on_forward(unknown, forward(3, 1, 8));
        inbox.on_forward(second, forward(4, 2, 8));
        // Stage 1 takes what was sent for stage 1, also from a peer whose
        // hello has not come yet.
        let ids = |inbox: &mut Inbox| {
            std::iter::from_fn(|| inbox.next_forward())
                .map(|(_, f)| f.id)
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(&mut inbox), vec![1, 3]);
        // Moved to stage 2 (a spare filling an emptied stage): what was
        // queued for stage 1 goes, and what comes for stage 1 after it.
        inbox.on_forward(first, forward(5, 1, 8));
        inbox.hold_stage(2);
        assert!(inbox.forwards.is_empty() && inbox.queued == 0);
        inbox.on_forward(first, forward(6, 1, 8));
        inbox.on_forward(second, forward(7, 2, 8));
        // A peer that moved from stage 0 to stage 1 sends for stage 2 before
        // its new hello arrives: its micro-batch is taken, not left to time out.
        inbox.on_forward(first, forward(8, 2, 8));
        assert_eq!(ids(&mut inbox), vec![7, 8]);
    }

    #[test]
    fn only_the_replica_a_micro_batch_went_to_answers_it() {
        let (to, other) = (PeerId::random(), PeerId::random());
        let mut waiting = BTreeMap::from([(1u64, to)]);
        assert_eq!(take_answered(&mut waiting, |t| *t, other, 1), None);
        assert_eq!(waiting.len(), 1, "another peer's answer took the batch");
        assert_eq!(take_answered(&mut waiting, |t| *t, to, 1), Some(to));
        assert_eq!(take_answered(&mut waiting, |t| *t, to, 1), None);
    }

    #[test]
    fn a_data_parallel_inbox_keeps_no_pipeline_tensors() {
        let mut inbox = Inbox {
            data_parallel: true,
            ..Inbox::default()
        };
        let a = PeerId::random();
        let payload = tensor::Payload::from_f32(&[1.0; 16]);
        inbox.on_forward(
            a,
            PipeForward {
                id: 1,
                to_stage: 1,
                train: true,
                tokens: vec![],
                activations: payload.clone(),
            },
        );
        inbox.on_backward(
            a,
            PipeBackward {
                id: 1,
                loss: 1.0,
                predicted: 1,
                grad: payload.clone(),
            },
        );
        inbox.on_stage_state(
            a,
            StageState {
                stage: 0,
                stages: 2,
                round: 1,
                step: 1,
                total_steps: 10,
                params: payload,
                last: true,
            },
        );
        assert!(inbox.forwards.is_empty() && inbox.backwards.is_empty());
        assert!(inbox.backups.is_empty() && inbox.closing.is_empty());
    }

    #[test]
    fn a_stage_backs_up_to_one_other_stage_and_a_taker_asks_them_all() {
        let mut inbox = Inbox {
            stages: 3,
            ..Inbox::default()
        };
        let peers: Vec<(PeerId, u32)> = [0, 1, 2, 2]
            .into_iter()
            .map(|s| (PeerId::random(), s))
            .collect();
        for (p, stage) in &peers {
            let hello = StageHello {
                stage: *stage,
                stages: 3,
                phase: StagePhase::Training,
                step: 4,
                throughput: 0,
            };
            inbox.on_hello(*p, hello);
        }
        let of = |stages: &[u32]| -> BTreeSet<PeerId> {
            peers
                .iter()
                .filter(|(_, s)| stages.contains(s))
                .map(|(p, _)| *p)
                .collect()
        };
        let set = |v: Vec<PeerId>| v.into_iter().collect::<BTreeSet<_>>();
        assert_eq!(set(inbox.backup_holders(0)), of(&[1]));
        assert_eq!(set(inbox.backup_holders(1)), of(&[0]));
        assert_eq!(set(inbox.backup_holders(2)), of(&[0]));
        assert_eq!(set(inbox.peers_not_of_stage(0)), of(&[1, 2]));
        assert_eq!(set(inbox.peers_not_of_stage(2)), of(&[0, 1]));
    }

    /// Stage 1 of 2's parameters `[value]` after `round`, at `step`, as its
    /// replica backs them up.
    fn backup_of_stage_1(round: u64, step: u64, value: f32) -> StageState {
        StageState {
            stage: 1,
            stages: 2,
            round,
            step,
            total_steps: 0,
            params: tensor::Payload::from_f32(&[value]),
            last: false,
        }
    }

    fn hello(stage: u32, stages: u32) -> StageHello {
        StageHello {
            stage,
            stages,
            phase: StagePhase::Training,
            step: 0,
            throughput: 0,
        }
    }

    #[test]
    fn inbox_keeps_the_newest_backup_per_stage() {
        let mut inbox = Inbox {
            stages: 2,
            ..Inbox::default()
        };
        let peer = PeerId::random();
        inbox.on_hello(peer, hello(1, 2));
        let state = backup_of_stage_1;
        let request = StageStateRequest {
            stage: 1,
            stages: 2,
        };
        assert!(inbox.backup_for(request).is_none());
        inbox.on_stage_state(peer, state(3, 15, 1.0));
        inbox.on_stage_state(peer, state(2, 10, 2.0)); // older: ignored
        assert_eq!(inbox.backup_for(request).map(|b| b.round), Some(3));
        inbox.on_stage_state(peer, state(4, 20, 3.0));
        assert_eq!(inbox.backup_for(request).map(|b| b.step), Some(20));
        // Another stage count, or a request for another cut, gets nothing.
        inbox.on_stage_state(
            peer,
            StageState {
                stages: 3,
                ..state(9, 45, 4.0)
            },
        );
        assert_eq!(inbox.backup_for(request).map(|b| b.round), Some(4));
        assert!(inbox
            .backup_for(StageStateRequest {
                stage: 1,
                stages: 3
            })
            .is_none());
    }

    #[test]
    fn a_saved_backup_is_served_until_the_stage_backs_itself_up() {
        let mut inbox = Inbox {
            stages: 2,
            ..Inbox::default()
        };
        let (me, replica) = (PeerId::random(), PeerId::random());
        let state = |round, step| backup_of_stage_1(round, step, 1.0);
        let request = StageStateRequest {
            stage: 1,
            stages: 2,
        };
        // Read back from disk: served to a node taking the stage over.
        inbox.hold_saved_backup(me, state(3, 15));
        assert_eq!(inbox.backup_for(request).map(|b| b.round), Some(3));
        assert!(!inbox.copy_outdated_by_replica(1, me));
        assert_eq!(inbox.backups_of_others(0).len(), 1);
        assert!(inbox.backups_of_others(1).is_empty());
        // The stage's replica resumes: until it backs itself up, the saved
        // copy is behind it and not handed on.
        inbox.on_hello(replica, hello(1, 2));
        assert!(inbox.copy_outdated_by_replica(1, me));
        // Its backup wins, and an older saved copy read later does not push
        // it out.
        inbox.on_stage_state(replica, state(4, 20));
        assert!(!inbox.copy_outdated_by_replica(1, me));
        inbox.hold_saved_backup(me, state(2, 10));
        assert_eq!(inbox.backup_for(request).map(|b| b.step), Some(20));
    }

    #[test]
    fn a_resuming_replica_gets_no_micro_batches_until_it_trains() {
        let mut inbox = Inbox {
            stages: 2,
            ..Inbox::default()
        };
        let peer = PeerId::random();
        let resuming = StageHello {
            phase: StagePhase::Resuming,
            step: 15,
            ..hello(1, 2)
        };
        assert!(inbox.on_hello(peer, resuming));
        // No replica yet: no micro-batches, averaging or backing up; but a
        // holder to ask for the other stage's backup.
        assert_eq!(inbox.peers_of_stage(1).count(), 0);
        assert_eq!(inbox.peers_not_of_stage(0), vec![peer]);
        assert!(!inbox.on_hello(peer, resuming), "nothing changed");
        // Training: now a replica, which changes the stage's membership.
        assert!(inbox.on_hello(peer, hello(1, 2)));
        assert_eq!(inbox.peers_of_stage(1).collect::<Vec<_>>(), vec![peer]);
    }

    #[test]
    fn inbox_keeps_a_stage_closing_parameters_with_their_sender() {
        let mut inbox = Inbox {
            stages: 2,
            own_stage: Some(1),
            ..Inbox::default()
        };
        let (closer, other) = (PeerId::random(), PeerId::random());
        inbox.on_hello(closer, hello(1, 2));
        inbox.on_hello(other, hello(1, 2));
        let state = |last, value| StageState {
            last,
            ..backup_of_stage_1(8, 40, value)
        };
        inbox.on_stage_state(other, state(false, 1.0));
        assert!(
            inbox.closing.is_empty(),
            "a round's backup is not a closing"
        );
        inbox.on_stage_state(closer, state(true, 2.0));
        let kept = inbox
            .closing
            .get(&(1, closer))
            .expect("the closing is kept");
        assert_eq!(kept.params.decode().unwrap(), vec![2.0]);
        // Another replica's closing is kept beside it, not over it.
        inbox.on_stage_state(other, state(true, 3.0));
        assert_eq!(inbox.closing.len(), 2);
        let kept = &inbox.closing[&(1, closer)];
        assert_eq!(kept.params.decode().unwrap(), vec![2.0]);
        // Another cut's closing is ignored.
        inbox.on_stage_state(
            closer,
            StageState {
                stages: 3,
                ..state(true, 4.0)
            },
        );
        assert_eq!(
            inbox.closing[&(1, closer)].params.decode().unwrap(),
            vec![2.0]
        );
        // A replica of a stage this node does not hold: nothing is kept.
        let elsewhere = PeerId::random();
        inbox.on_hello(elsewhere, hello(0, 2));
        inbox.on_stage_state(
            elsewhere,
            StageState {
                stage: 0,
                ..state(true, 5.0)
            },
        );
        assert_eq!(inbox.closing.len(), 2);
        // Nor are the old stage's once this node holds another.
        inbox.hold_stage(0);
        assert!(inbox.closing.is_empty());
    }

    #[test]
    fn stage_parameters_count_only_from_the_stage_or_when_asked_for() {
        let mut inbox = Inbox {
            stages: 2,
            own_stage: Some(1),
            ..Inbox::default()
        };
        let mut replicas = [PeerId::random(), PeerId::random()];
        replicas.sort_by_key(node_id_of);
        let [low, high] = replicas;
        let (outsider, stranger) = (PeerId::random(), PeerId::random());
        inbox.on_hello(low, hello(1, 2));
        inbox.on_hello(high, hello(1, 2));
        inbox.on_hello(outsider, hello(0, 2));
        let state = |round: u64, last| StageState {
            last,
            ..backup_of_stage_1(round, round.saturating_mul(5), round as f32)
        };
        let request = StageStateRequest {
            stage: 1,
            stages: 2,
        };
        let held = |inbox: &Inbox| inbox.backup_for(request).map(|b| b.round);
        // A peer of another stage, one never heard of, or a replica that is
        // not the stage's lowest-id one, sets no backup.
        for p in [outsider, stranger, high] {
            inbox.on_stage_state(p, state(u64::MAX, false));
        }
        assert_eq!(held(&inbox), None);
        // Only replicas close the stage, each kept apart.
        for p in [outsider, stranger] {
            inbox.on_stage_state(p, state(9, true));
        }
        assert!(inbox.closing.is_empty());
        inbox.on_stage_state(high, state(9, true));
        assert_eq!(
            held(&inbox),
            None,
            "a closing from a non-designated replica"
        );
        assert!(inbox.closing.contains_key(&(1, high)));
        inbox.on_stage_state(low, state(2, false));
        assert_eq!(held(&inbox), Some(2));
        inbox.on_stage_state(low, state(1, false));
        assert_eq!(held(&inbox), Some(2), "an older copy from the same sender");
        // The lowest-id replica leaves: the next one's backup replaces its
        // predecessor's, even with an older round.
        inbox.forget_peer(&low);
        inbox.on_stage_state(high, state(1, false));
        assert_eq!(held(&inbox), Some(1));
        // While we ask for the stage's backup, any peer serving a stage may
        // hand one on (a holder of another stage), newest wins, but not
        // close the stage; a peer that serves none is not who we asked.
        inbox.asking_backup = Some(1);
        inbox.on_stage_state(outsider, state(3, false));
        inbox.on_stage_state(outsider, state(4, true));
        assert_eq!(held(&inbox), Some(3));
        assert_eq!(inbox.closing.len(), 1);
        inbox.on_stage_state(stranger, state(u64::MAX, false));
        assert_eq!(held(&inbox), Some(3));
    }
}
