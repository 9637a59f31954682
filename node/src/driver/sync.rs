//! How a node serves its model state to joiners and downloads the swarm's.
//!
//! Serving: after every round the node cuts its averaged parameters into a
//! [`Manifest`] of chunks, keeps its last two states (so a download of round
//! r survives the swarm finishing r+1) and gossips a [`Claim`] for the newest.
//!
//! Downloading: a node that starts in a swarm already training, or falls
//! behind without ever averaging, picks the state the swarm vouches for
//! ([`Vouches::choose`]), runs the sans-IO [`Download`] against the peers that
//! serve it, and installs the parameters only after every chunk and the whole
//! digest verified. The local Adam moments are not downloaded: each peer's
//! are its own (built from its own shard's gradients), so no quorum can vouch
//! for them, and Adam's bias correction makes fresh moments a sound start.
//! Under DiLoCo the served state is the parameters followed by the outer
//! momentum, which every member computes from the same averaged
//! pseudo-gradients, so the vouched root covers both and a joiner continues
//! with exactly the swarm's outer optimizer.

use super::{Driver, NodeError, NodeEvent, Reporter};
use crate::checkpoint;
use crate::compute::Compute;
use crate::identity::node_id_of;
use libp2p::PeerId;
use p2ptrain_protocol::statesync::{
    Claim, Digest, Download, DownloadAction, DownloadConfig, DownloadEvent, Manifest, ServeBudget,
    CHUNK_BYTES,
};
use p2ptrain_protocol::tensor::{self, Bytes};
use p2ptrain_protocol::wire::{self, Message};
use p2ptrain_protocol::NodeId;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// States a node keeps serving: its newest and the one before.
const SERVED_STATES: usize = 2;
/// Peers that must vouch for a state before a joiner downloads it (fewer if
/// fewer peers have announced any state).
pub(super) const MIN_VOUCHERS: usize = 2;
/// How long one manifest or chunk request may take before its peer is avoided.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Chunk requests in flight to one peer at a time.
const PER_PEER: usize = 2;
/// How long a whole download may take.
const DOWNLOAD_DEADLINE: Duration = Duration::from_secs(120);

/// Test-only misbehaviour, to check that joiners detect and avoid bad peers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Misbehave {
    /// Serve honestly.
    #[default]
    None,
    /// Flip one byte of every state chunk served (the manifest stays honest).
    CorruptState,
}

/// The window over which a peer's chunk budget refills.
pub(super) const SERVE_WINDOW: Duration = Duration::from_secs(60);
/// The smallest chunk budget per window, for small models.
const MIN_CHUNK_BUDGET: u32 = 16;

/// Stage backups one peer may have per [`SERVE_WINDOW`]. A node taking over
/// a stage asks every second until a backup arrives, and a backup is a whole
/// stage's parameters: a few answers cover a slow first transfer, and a peer
/// asking forever gets one every ten seconds, not one per request.
const BACKUPS_PER_WINDOW: u32 = 6;

/// What one peer may ask this node to send, per [`SERVE_WINDOW`]: each
/// answer costs our upload, so a peer that keeps asking must not turn a few
/// bytes of requests into an unbounded stream of answers.
#[derive(Debug)]
pub(super) struct ServeLimits {
    /// Chunks and manifests of our states, sized to the newest state.
    states: ServeBudget,
    /// Pipeline stage backups.
    backups: ServeBudget,
}

impl ServeLimits {
    pub(super) fn new() -> ServeLimits {
        ServeLimits {
            states: ServeBudget::new(SERVE_WINDOW),
            backups: ServeBudget::new(SERVE_WINDOW),
        }
    }

    /// Whether `peer` may have one more chunk or manifest of our states,
    /// given the per-window budget `Served::chunks_per_window`. A manifest
    /// costs as much as a chunk: an honest joiner asks for one per server.
    pub(super) fn allow_state(&mut self, peer: NodeId, now: Duration, budget: u32) -> bool {
        self.states.allow(peer, now, budget)
    }

    /// Whether `peer` may have one more stage backup.
    pub(super) fn allow_backup(&mut self, peer: NodeId, now: Duration) -> bool {
        self.backups.allow(peer, now, BACKUPS_PER_WINDOW)
    }
}

/// The states this node serves.
#[derive(Debug, Default)]
pub(super) struct Served {
    /// (root, manifest, bytes), oldest first.
    states: VecDeque<(Digest, Manifest, Vec<u8>)>,
    misbehave: Misbehave,
}

impl Served {
    pub(super) fn new(misbehave: Misbehave) -> Served {
        Served {
            states: VecDeque::new(),
            misbehave,
        }
    }

    /// Makes `params`, the result of `round`, the newest served state; returns its claim
    /// and the blake3 digest of `params` (their little-endian bytes, as
    /// [`tensor::digest_f32`] computes it), which the manifest holds anyway.
    pub(super) fn publish(
        &mut self,
        round: u64,
        total_steps: u64,
        params: &[f32],
    ) -> (Claim, Digest) {
        let bytes = self.stage(params);
        self.publish_staged(round, total_steps, bytes)
    }

    /// The first half of [`Served::publish`]: `params` as the bytes to serve,
    /// so the caller can hand `params` on before [`Served::publish_staged`]
    /// hashes them. When the served states are full, the oldest stops being
    /// served here and lends its buffer.
    pub(super) fn stage(&mut self, params: &[f32]) -> Vec<u8> {
        // The state that would be dropped lends its buffer: a model-sized
        // allocation every round would be mapped and zeroed afresh.
        let mut bytes = if self.states.len() >= SERVED_STATES {
            self.states
                .pop_front()
                .map(|(_, _, b)| b)
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        tensor::f32_le_bytes_into(params, &mut bytes);
        bytes
    }

    /// The second half of [`Served::publish`], on the bytes [`Served::stage`] gave.
    pub(super) fn publish_staged(
        &mut self,
        round: u64,
        total_steps: u64,
        bytes: Vec<u8>,
    ) -> (Claim, Digest) {
        let manifest = Manifest::build(round, total_steps, &bytes, CHUNK_BYTES);
        let digest = manifest.state_digest;
        let claim = Claim {
            round,
            root: manifest.root(),
        };
        // At most SERVED_STATES: the oldest was taken out above when full.
        self.states.push_back((claim.root, manifest, bytes));
        (claim, digest)
    }

    /// Chunks one peer may ask for per [`SERVE_WINDOW`]: twice the newest
    /// state (an honest joiner asks each server for a share of it once).
    pub(super) fn chunks_per_window(&self) -> u32 {
        let chunks = self.states.back().map_or(0, |(_, m, _)| m.num_chunks());
        chunks.saturating_mul(2).max(MIN_CHUNK_BUDGET)
    }

    /// The newest state's claim, if any.
    pub(super) fn latest(&self) -> Option<Claim> {
        self.states.back().map(|(root, m, _)| Claim {
            round: m.round,
            root: *root,
        })
    }

    fn find(&self, root: &Digest) -> Option<(&Manifest, &[u8])> {
        self.states
            .iter()
            .find(|(r, _, _)| r == root)
            .map(|(_, m, b)| (m, b.as_slice()))
    }

    /// The manifest of a served state.
    pub(super) fn manifest(&self, root: &Digest) -> Option<Manifest> {
        self.find(root).map(|(m, _)| m.clone())
    }

    /// One chunk of a served state (corrupted under [`Misbehave::CorruptState`]).
    pub(super) fn chunk(&self, root: &Digest, index: u32) -> Option<Vec<u8>> {
        let (m, bytes) = self.find(root)?;
        if index >= m.num_chunks() {
            return None;
        }
        let mut data = bytes.get(m.chunk_range(index))?.to_vec();
        if self.misbehave == Misbehave::CorruptState {
            if let Some(b) = data.first_mut() {
                *b ^= 0x5a;
            }
        }
        Some(data)
    }
}

/// Figures of one finished download, for the `synced` event.
pub(super) struct SyncFigures {
    pub(super) holders: Vec<String>,
    pub(super) sources: BTreeMap<String, u32>,
    pub(super) avoided: BTreeMap<String, String>,
}

impl Driver {
    /// Sends `msg` to one peer, logging an encoding failure.
    fn send_msg(&self, to: PeerId, msg: &Message) -> Result<(), NodeError> {
        self.send_each([to], msg, "state-transfer message")
    }

    /// Encodes `msg` once and sends it to each of `peers`; a message that
    /// cannot be encoded (`what` names it in the log) is not sent.
    pub(super) fn send_each(
        &self,
        peers: impl IntoIterator<Item = PeerId>,
        msg: &Message,
        what: &str,
    ) -> Result<(), NodeError> {
        match wire::encode(msg) {
            Ok(bytes) => {
                let bytes = Arc::new(bytes);
                for to in peers {
                    self.check_sent(self.net.send(to, bytes.clone()))?;
                }
                Ok(())
            }
            Err(e) => {
                warn!(error = %e, "cannot encode a {what}; not sent");
                Ok(())
            }
        }
    }

    /// Serves `params` as this node's state after `round` and announces its
    /// claim; returns the digest of `params` (see [`Served::publish`]).
    pub(super) fn announce_state(
        &mut self,
        round: u64,
        params: &[f32],
    ) -> Result<Digest, NodeError> {
        let bytes = self.served.stage(params);
        self.announce_staged(round, bytes)
    }

    /// [`Driver::announce_state`] of bytes from [`Served::stage`].
    pub(super) fn announce_staged(
        &mut self,
        round: u64,
        bytes: Vec<u8>,
    ) -> Result<Digest, NodeError> {
        let (_, digest) = self.served.publish_staged(round, self.total_steps, bytes);
        self.broadcast_claim()?;
        Ok(digest)
    }

    /// Tells every member which state we hold now (members wait for these
    /// claims at the end of a run, and joiners choose what to download by them).
    pub(super) fn broadcast_claim(&mut self) -> Result<(), NodeError> {
        match wire::encode(&Message::StateAnnounce(self.served.latest())) {
            Ok(bytes) => self.check_sent(self.net.broadcast(bytes)),
            Err(e) => {
                warn!(error = %e, "cannot encode our state claim");
                Ok(())
            }
        }
    }

    /// Handles a state-transfer message (others are ignored here).
    pub(super) fn on_state_message(
        &mut self,
        from: PeerId,
        msg: &Message,
    ) -> Result<(), NodeError> {
        let from_id = node_id_of(&from);
        match msg {
            Message::StateRequest => {
                self.send_msg(from, &Message::StateAnnounce(self.served.latest()))?
            }
            Message::StateAnnounce(claim) => {
                self.state_answers.insert(from_id);
                if let Some(c) = claim {
                    self.swarm_round.record(from_id, c.round.saturating_add(1));
                    self.vouches.record(from_id, *c);
                }
            }
            Message::ManifestRequest { root } => {
                let budget = self.served.chunks_per_window();
                let now = self.now();
                let manifest = if self.serve_limits.allow_state(from_id, now, budget) {
                    self.served.manifest(root)
                } else {
                    warn!(peer = %from, budget, "manifest request over the peer's budget; refused");
                    None
                };
                self.send_msg(
                    from,
                    &Message::Manifest {
                        root: *root,
                        manifest,
                    },
                )?;
            }
            Message::Manifest { root, manifest } => {
                let now = self.now();
                if let Some(d) = self.download.as_mut().filter(|d| d.claim().root == *root) {
                    d.handle_manifest(now, from_id, manifest.clone());
                }
            }
            Message::ChunkRequest { root, index } => {
                let budget = self.served.chunks_per_window();
                let now = self.now();
                let data = if self.serve_limits.allow_state(from_id, now, budget) {
                    self.served.chunk(root, *index).map(Bytes::from)
                } else {
                    warn!(peer = %from, index, budget, "chunk request over the peer's budget; refused");
                    None
                };
                debug!(peer = %from, index, served = data.is_some(), "chunk request");
                self.send_msg(
                    from,
                    &Message::Chunk {
                        root: *root,
                        index: *index,
                        data,
                    },
                )?;
            }
            Message::Chunk { root, index, data } => {
                let now = self.now();
                if let Some(d) = self.download.as_mut().filter(|d| d.claim().root == *root) {
                    d.handle_chunk(now, from_id, *index, data.as_deref());
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Asks every member which state it holds, waits for their answers (at
    /// most `wait`), then downloads the vouched state if it is newer than
    /// round `ours`. Used at start and whenever the node finds itself behind
    /// without a model from the swarm (claims otherwise arrive only once per round).
    pub(super) async fn sync_with_swarm(
        &mut self,
        compute: &Compute,
        report: &mut Reporter,
        wait: Duration,
        ours: u64,
    ) -> Result<Option<(u64, u64)>, NodeError> {
        let members: Vec<PeerId> = self.members.values().copied().collect();
        if members.is_empty() {
            return Ok(None);
        }
        self.state_answers.clear();
        for peer in &members {
            self.send_msg(*peer, &Message::StateRequest)?;
        }
        let mut timer = std::pin::pin!(tokio::time::sleep(wait));
        while members
            .iter()
            .any(|p| !self.state_answers.contains(&node_id_of(p)))
        {
            if self.pump_once(timer.as_mut()).await?.is_some() {
                break;
            }
        }
        self.download_vouched(compute, report, ours).await
    }

    /// After round `round`: if a strict majority of the swarm vouches for
    /// another state of that round than ours (we saw the round only in part
    /// and ended it on values of our own), download theirs. Returns the round
    /// and run length installed, if any.
    pub(super) async fn realign(
        &mut self,
        compute: &Compute,
        report: &mut Reporter,
        round: u64,
    ) -> Result<Option<(u64, u64)>, NodeError> {
        let Some(mine) = self.served.latest().filter(|c| c.round == round) else {
            return Ok(None);
        };
        let swarm = self.members.len() + 1;
        let Some(target) = self.vouches.realign_target(round, &mine.root, swarm) else {
            return Ok(None);
        };
        warn!(
            round,
            vouchers = target.vouchers.len(),
            "our model differs from the one most of the swarm holds after this round; downloading theirs"
        );
        self.download_vouched(compute, report, round.saturating_sub(1))
            .await
    }

    /// Waits (at most `wait`) until every member has said which state it
    /// holds after `round`, so [`Self::realign`] sees the whole swarm.
    pub(super) async fn wait_for_claims(
        &mut self,
        round: u64,
        wait: Duration,
    ) -> Result<(), NodeError> {
        let mut timer = std::pin::pin!(tokio::time::sleep(wait));
        while self.vouches.voters_at(round) < self.members.len() {
            if self.pump_once(timer.as_mut()).await?.is_some() {
                break;
            }
        }
        Ok(())
    }

    /// Downloads the state the swarm vouches for and installs it; returns its
    /// round and the swarm's run length, or `None` (we train on with our own
    /// model) if nothing is vouched for yet or the download fails.
    async fn download_vouched(
        &mut self,
        compute: &Compute,
        report: &mut Reporter,
        ours: u64,
    ) -> Result<Option<(u64, u64)>, NodeError> {
        let Some(choice) = self.vouches.choose(MIN_VOUCHERS) else {
            debug!("no state is vouched for yet");
            return Ok(None);
        };
        if choice.claim.round <= ours {
            debug!(
                vouched = choice.claim.round,
                ours, "our model is as recent as the swarm's"
            );
            return Ok(None);
        }
        let holders: Vec<NodeId> = choice
            .vouchers
            .iter()
            .filter(|id| self.members.contains_key(id))
            .copied()
            .collect();
        info!(
            round = choice.claim.round,
            holders = holders.len(),
            "downloading the swarm's state"
        );
        let started = Instant::now();
        let config = DownloadConfig {
            request_timeout: REQUEST_TIMEOUT,
            per_peer: PER_PEER,
            deadline: DOWNLOAD_DEADLINE,
            // Under DiLoCo the state is the parameters and the outer momentum.
            expect_bytes: compute.num_params as u64 * 4 * (1 + u64::from(self.diloco.is_some())),
        };
        self.download = Some(Download::new(self.now(), choice.claim, &holders, config));
        let outcome = loop {
            let Some(d) = self.download.as_mut() else {
                return Ok(None);
            };
            let mut actions = Vec::new();
            while let Some(a) = d.poll_action() {
                actions.push(a);
            }
            while let Some(e) = d.poll_event() {
                log_event(&e);
            }
            if let Some(outcome) = d.outcome() {
                break outcome;
            }
            let wake = d.poll_timeout().unwrap_or(DOWNLOAD_DEADLINE);
            for a in actions {
                self.send_request(a)?;
            }
            let deadline = tokio::time::Instant::from_std(self.start + wake);
            let mut timer = std::pin::pin!(tokio::time::sleep_until(deadline));
            if self.pump_once(timer.as_mut()).await?.is_some() {
                let now = self.now();
                if let Some(d) = self.download.as_mut() {
                    d.handle_timeout(now);
                }
            }
        };
        self.download = None;
        let got = match outcome {
            Ok(got) => got,
            Err(e) => {
                warn!(error = %e, "state download failed; training on our own model for now");
                return Ok(None);
            }
        };
        let values: Vec<f32> = got
            .bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let params = values[..compute.num_params.min(values.len())].to_vec();
        if let Err(e) = self.pump(compute.set_params(params.clone())).await? {
            warn!(error = %e, "downloaded state does not fit this model; training on our own");
            return Ok(None);
        }
        if let Some(d) = self.diloco.as_mut() {
            if let Err(e) = d.install(values.clone()) {
                // Our own momentum does not go with the swarm's parameters:
                // the next round starts from the parameters just installed.
                d.forget_start();
                warn!(error = %e, "downloaded DiLoCo momentum unusable; keeping ours");
            }
        }
        let name = |id: &NodeId| match self.members.get(id) {
            Some(p) => p.to_string(),
            None => id.to_hex(),
        };
        let figures = SyncFigures {
            holders: holders.iter().map(name).collect(),
            sources: got.served_by.iter().map(|(id, n)| (name(id), *n)).collect(),
            avoided: got
                .avoided
                .iter()
                .map(|(id, f)| (name(id), f.as_str().to_string()))
                .collect(),
        };
        let (round, total_steps) = (got.manifest.round, got.manifest.total_steps);
        self.synced = true;
        self.total_steps = total_steps;
        self.served.publish(round, total_steps, &values);
        let secs = started.elapsed().as_secs_f64();
        info!(
            round,
            total_steps,
            chunks = got.manifest.num_chunks(),
            peers = figures.sources.len(),
            avoided = figures.avoided.len(),
            secs,
            "downloaded the swarm's model; its run length is ours now"
        );
        let from = got
            .served_by
            .iter()
            .max_by_key(|(_, n)| **n)
            .map(|(id, _)| name(id))
            .unwrap_or_default();
        report(&NodeEvent::Synced {
            round,
            from,
            model_digest: checkpoint::params_digest(&params),
            chunks: got.manifest.num_chunks(),
            vouchers: choice.vouchers.len(),
            holders: figures.holders,
            sources: figures.sources,
            avoided: figures.avoided,
            secs,
        });
        Ok(Some((round, total_steps)))
    }

    fn send_request(&mut self, action: DownloadAction) -> Result<(), NodeError> {
        let (peer, msg) = match action {
            DownloadAction::RequestManifest { peer, root } => {
                (peer, Message::ManifestRequest { root })
            }
            DownloadAction::RequestChunk { peer, root, index } => {
                (peer, Message::ChunkRequest { root, index })
            }
        };
        match self.members.get(&peer) {
            Some(p) => self.send_msg(*p, &msg),
            // It left just now: told of it, the download asks another.
            None => Ok(()),
        }
    }
}

fn log_event(event: &DownloadEvent) {
    match event {
        DownloadEvent::Manifest { from, chunks } => {
            debug!(peer = %from, chunks, "state manifest verified")
        }
        DownloadEvent::Chunk { from, index } => debug!(peer = %from, index, "chunk verified"),
        DownloadEvent::Avoided { peer, fault } => {
            warn!(peer = %peer, fault = fault.as_str(), "peer avoided for the rest of the download")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_and_chunks_share_a_budget_and_backups_have_their_own() {
        let mut limits = ServeLimits::new();
        let (peer, other) = (NodeId([1; 32]), NodeId([2; 32]));
        let t0 = Duration::from_secs(100);
        for _ in 0..16 {
            assert!(limits.allow_state(peer, t0, 16));
        }
        assert!(
            !limits.allow_state(peer, t0, 16),
            "a 17th chunk or manifest"
        );
        assert!(limits.allow_state(other, t0, 16), "budgets are per peer");
        for _ in 0..BACKUPS_PER_WINDOW {
            assert!(limits.allow_backup(peer, t0));
        }
        assert!(!limits.allow_backup(peer, t0 + Duration::from_secs(1)));
        // One backup's share of the window later, one more.
        let later = t0 + SERVE_WINDOW / BACKUPS_PER_WINDOW;
        assert!(limits.allow_backup(peer, later));
        assert!(!limits.allow_backup(peer, later));
    }

    #[test]
    fn publishing_a_state_gives_the_model_digest_nodes_report() {
        let mut served = Served::new(Misbehave::None);
        let params: Vec<f32> = (0..70_000).map(|i| (i as f32).sin()).collect();
        let (claim, digest) = served.publish(3, 90, &params);
        // Reports and checkpoints identify a model by this digest; it must
        // not change because the node now takes it from the manifest.
        assert_eq!(digest, tensor::digest_f32(&params));
        assert_eq!(checkpoint::hex(&digest), checkpoint::params_digest(&params));
        assert_eq!(served.latest(), Some(claim));
        let manifest = served.manifest(&claim.root).expect("served");
        assert_eq!(manifest.state_digest, digest);
    }

    #[test]
    fn a_new_state_takes_over_the_buffer_of_the_one_it_retires() {
        let mut served = Served::new(Misbehave::None);
        let model = |round: u64| -> Vec<f32> {
            (0..100_000)
                .map(|i| (i as f32 + round as f32).cos())
                .collect()
        };
        let mut claims = Vec::new();
        for round in 1..=SERVED_STATES as u64 {
            claims.push(served.publish(round, 90, &model(round)).0);
        }
        let oldest = served.states.front().map(|(_, _, b)| b.as_ptr());
        let (newest, _) = served.publish(9, 90, &model(9));
        // The oldest state is no longer served; the newest sits in its buffer.
        assert_eq!(served.states.len(), SERVED_STATES);
        assert_eq!(served.manifest(&claims[0].root), None);
        assert_eq!(served.states.back().map(|(_, _, b)| b.as_ptr()), oldest);
        // Every state still served hands out its own bytes, chunk by chunk.
        for (round, claim) in [
            (SERVED_STATES as u64, claims[SERVED_STATES - 1]),
            (9, newest),
        ] {
            let want = tensor::f32_le_bytes(&model(round));
            let manifest = served.manifest(&claim.root).expect("served");
            let mut got = Vec::new();
            for index in 0..manifest.num_chunks() {
                let chunk = served.chunk(&claim.root, index).expect("chunk");
                assert!(manifest.chunk_matches(index, &chunk));
                got.extend_from_slice(&chunk);
            }
            assert_eq!(got, want, "round {round}");
        }
    }
}
