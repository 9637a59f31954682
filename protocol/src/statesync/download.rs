//! Downloading one vouched state in chunks from several peers.
//!
//! [`Download`] is driven like the other state machines: feed it
//! [`Download::handle_manifest`], [`Download::handle_chunk`] and
//! [`Download::handle_timeout`]; drain [`Download::poll_action`] (requests to
//! send) and [`Download::poll_event`]; call `handle_timeout` at
//! [`Download::poll_timeout`]; read the result from [`Download::outcome`].
//!
//! 1. It asks one holder for the manifest and accepts it only if its root is
//!    the vouched root, it fits the expected size, and its chunk digests make
//!    up its state digest ([`Manifest::check_digests`]). A holder that sends
//!    another manifest, none, or none in time is avoided; the next is asked.
//! 2. It requests every chunk, at most `per_peer` at a time from each
//!    holder, spreading them over all holders (least loaded first, in
//!    turn). A chunk whose length or digest does not match the manifest
//!    marks its sender [`Fault::Corrupt`]; a request unanswered within
//!    `request_timeout` marks it [`Fault::Timeout`]; a "not held" answer
//!    marks it [`Fault::NotHeld`]; a holder that leaves the swarm is
//!    [`Fault::Left`] at once. An avoided peer gets no more requests in
//!    this download, and its chunks go to the others.
//! 3. With every chunk in, it finishes: chunks that match digests which make
//!    up the state digest are that state, so the whole is not hashed again.
//!
//! It fails when no usable holder is left or `deadline` passes. Answers to
//! requests we did not send (or no longer wait for) are ignored, never trusted.

use super::{Claim, Digest, Manifest};
use crate::NodeId;
use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

/// Limits of one download.
#[derive(Clone, Debug)]
pub struct DownloadConfig {
    /// How long one manifest or chunk request may take.
    pub request_timeout: Duration,
    /// Requests in flight to one peer at a time.
    pub per_peer: usize,
    /// How long the whole download may take.
    pub deadline: Duration,
    /// The state's length in bytes (a model's parameter count times 4): a
    /// manifest of another length is refused before any chunk, and nothing
    /// larger is ever allocated, whatever a manifest says.
    pub expect_bytes: u64,
}

/// Why a peer is avoided for the rest of a download.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// It served a chunk whose length or digest does not match the manifest.
    Corrupt,
    /// It sent a manifest whose root is not the vouched one, or of the wrong size.
    BadManifest,
    /// It did not answer a request in time.
    Timeout,
    /// It said it does not hold the state (it moved on).
    NotHeld,
    /// It left the swarm (its connection closed).
    Left,
}

impl Fault {
    /// A short lower-case name for logs and event lines.
    pub fn as_str(self) -> &'static str {
        match self {
            Fault::Corrupt => "corrupt",
            Fault::BadManifest => "bad_manifest",
            Fault::Timeout => "timeout",
            Fault::NotHeld => "not_held",
            Fault::Left => "left",
        }
    }
}

/// A request to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DownloadAction {
    /// Ask `peer` for the manifest of `root`.
    RequestManifest {
        /// Whom to ask.
        peer: NodeId,
        /// The vouched root.
        root: Digest,
    },
    /// Ask `peer` for chunk `index` of `root`.
    RequestChunk {
        /// Whom to ask.
        peer: NodeId,
        /// The vouched root.
        root: Digest,
        /// The chunk.
        index: u32,
    },
}

/// What happened, for logs and reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DownloadEvent {
    /// The manifest arrived and matches the vouched root.
    Manifest {
        /// Its sender.
        from: NodeId,
        /// Chunks to fetch.
        chunks: u32,
    },
    /// A chunk arrived and verified.
    Chunk {
        /// Its sender.
        from: NodeId,
        /// The chunk.
        index: u32,
    },
    /// A peer is avoided from now on.
    Avoided {
        /// The peer.
        peer: NodeId,
        /// Why.
        fault: Fault,
    },
}

/// Why a download gave up.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DownloadError {
    /// Every holder was avoided before the state was complete.
    #[error("no usable peer holds the state any more ({avoided} avoided)")]
    NoPeers {
        /// Peers avoided.
        avoided: usize,
    },
    /// The deadline passed.
    #[error("the download did not finish within {0:?}")]
    Deadline(Duration),
}

/// A finished download.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Downloaded {
    /// The verified manifest (round, run length, digests).
    pub manifest: Manifest,
    /// The state's bytes; their blake3 is `manifest.state_digest`.
    pub bytes: Vec<u8>,
    /// Chunks each peer served (only verified ones count).
    pub served_by: BTreeMap<NodeId, u32>,
    /// Peers avoided, and why.
    pub avoided: BTreeMap<NodeId, Fault>,
}

/// One download in progress (see the module docs).
#[derive(Debug)]
pub struct Download {
    claim: Claim,
    config: DownloadConfig,
    deadline: Duration,
    /// Holders not (yet) avoided, in the order they are tried.
    usable: Vec<NodeId>,
    avoided: BTreeMap<NodeId, Fault>,
    manifest: Option<Manifest>,
    /// The manifest request in flight: whom we asked, and until when we wait.
    manifest_req: Option<(NodeId, Duration)>,
    bytes: Vec<u8>,
    have: Vec<bool>,
    pending: VecDeque<u32>,
    /// Chunk requests in flight: chunk -> (peer, answer deadline).
    in_flight: BTreeMap<u32, (NodeId, Duration)>,
    served_by: BTreeMap<NodeId, u32>,
    /// Turn counter that spreads chunks over equally loaded peers.
    turn: usize,
    actions: VecDeque<DownloadAction>,
    events: VecDeque<DownloadEvent>,
    outcome: Option<Result<Downloaded, DownloadError>>,
    /// Set once the download is over, and stays so after the outcome is
    /// taken: nothing may start it again.
    finished: bool,
}

impl Download {
    /// Starts downloading the state `claim` from `holders` (the peers that vouch for it).
    pub fn new(now: Duration, claim: Claim, holders: &[NodeId], config: DownloadConfig) -> Self {
        let mut usable = holders.to_vec();
        usable.sort();
        usable.dedup();
        let mut d = Download {
            claim,
            deadline: now.saturating_add(config.deadline),
            config,
            usable,
            avoided: BTreeMap::new(),
            manifest: None,
            manifest_req: None,
            bytes: Vec::new(),
            have: Vec::new(),
            pending: VecDeque::new(),
            in_flight: BTreeMap::new(),
            served_by: BTreeMap::new(),
            turn: 0,
            actions: VecDeque::new(),
            events: VecDeque::new(),
            outcome: None,
            finished: false,
        };
        d.progress(now);
        d
    }

    /// The state being downloaded.
    pub fn claim(&self) -> Claim {
        self.claim
    }

    /// An answer to a manifest request: `None` means the peer does not hold it.
    pub fn handle_manifest(&mut self, now: Duration, from: NodeId, manifest: Option<Manifest>) {
        if self.finished || self.manifest_req.map(|(p, _)| p) != Some(from) {
            return; // not asked, or no longer waited for
        }
        self.manifest_req = None;
        match manifest {
            None => self.avoid(from, Fault::NotHeld),
            Some(m) if !self.fits(&m) => self.avoid(from, Fault::BadManifest),
            Some(m) => {
                self.events.push_back(DownloadEvent::Manifest {
                    from,
                    chunks: m.num_chunks(),
                });
                self.bytes = vec![0; m.total_bytes as usize];
                self.have = vec![false; m.chunks.len()];
                self.pending = (0..m.num_chunks()).collect();
                self.manifest = Some(m);
            }
        }
        self.progress(now);
    }

    /// Whether a manifest is the vouched one, of the size we expect, and its chunk
    /// digests make up its state digest (checked last: it hashes).
    fn fits(&self, m: &Manifest) -> bool {
        m.validate().is_ok()
            && m.root() == self.claim.root
            && m.round == self.claim.round
            && m.total_bytes == self.config.expect_bytes
            && m.check_digests().is_ok()
    }

    /// An answer to a chunk request: `None` means the peer does not hold it.
    pub fn handle_chunk(&mut self, now: Duration, from: NodeId, index: u32, data: Option<&[u8]>) {
        if self.finished || self.in_flight.get(&index).map(|(p, _)| *p) != Some(from) {
            return;
        }
        let Some(manifest) = &self.manifest else {
            return;
        };
        self.in_flight.remove(&index);
        match data {
            None => {
                self.pending.push_front(index);
                self.avoid(from, Fault::NotHeld);
            }
            Some(data) if !manifest.chunk_matches(index, data) => {
                self.pending.push_front(index);
                self.avoid(from, Fault::Corrupt);
            }
            Some(data) => {
                let range = manifest.chunk_range(index);
                self.bytes[range].copy_from_slice(data);
                self.have[index as usize] = true;
                *self.served_by.entry(from).or_default() += 1;
                self.events.push_back(DownloadEvent::Chunk { from, index });
            }
        }
        self.progress(now);
    }

    /// A holder left the swarm: its requests go to the others now, without
    /// waiting for their timeouts.
    pub fn handle_peer_left(&mut self, now: Duration, peer: NodeId) {
        if self.finished || self.avoided.contains_key(&peer) {
            return;
        }
        if self.manifest_req.map(|(p, _)| p) == Some(peer) {
            self.manifest_req = None;
        }
        if self.usable.contains(&peer) {
            self.avoid(peer, Fault::Left);
            self.progress(now);
        }
    }

    /// Expires requests past their deadline (their peers are avoided) and the download's own.
    pub fn handle_timeout(&mut self, now: Duration) {
        if self.finished {
            return;
        }
        if now >= self.deadline {
            self.finish(Err(DownloadError::Deadline(self.config.deadline)));
            return;
        }
        if let Some((peer, until)) = self.manifest_req {
            if now >= until {
                self.manifest_req = None;
                self.avoid(peer, Fault::Timeout);
            }
        }
        let late: Vec<(u32, NodeId)> = self
            .in_flight
            .iter()
            .filter(|(_, (_, until))| now >= *until)
            .map(|(i, (p, _))| (*i, *p))
            .collect();
        for (index, peer) in late {
            // Avoiding the peer for an earlier late request re-queued its
            // others already: queuing one twice would ask for it twice.
            if self.in_flight.remove(&index).is_none() {
                continue;
            }
            self.pending.push_front(index);
            self.avoid(peer, Fault::Timeout);
        }
        self.progress(now);
    }

    /// The next request to send.
    pub fn poll_action(&mut self) -> Option<DownloadAction> {
        self.actions.pop_front()
    }

    /// The next thing that happened.
    pub fn poll_event(&mut self) -> Option<DownloadEvent> {
        self.events.pop_front()
    }

    /// When `handle_timeout` must be called next (`None` once finished).
    pub fn poll_timeout(&self) -> Option<Duration> {
        if self.finished {
            return None;
        }
        let requests = self
            .in_flight
            .values()
            .map(|(_, t)| *t)
            .chain(self.manifest_req.map(|(_, t)| t));
        Some(requests.fold(self.deadline, Duration::min))
    }

    /// The result, once the download is over (taken once).
    pub fn outcome(&mut self) -> Option<Result<Downloaded, DownloadError>> {
        self.outcome.take()
    }

    /// Whether the download is over (its outcome may already have been taken).
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    fn avoid(&mut self, peer: NodeId, fault: Fault) {
        self.usable.retain(|p| *p != peer);
        if self.avoided.insert(peer, fault).is_none() {
            self.events
                .push_back(DownloadEvent::Avoided { peer, fault });
        }
        // Its other requests will not be answered usefully: re-queue them now.
        let theirs: Vec<u32> = self
            .in_flight
            .iter()
            .filter(|(_, (p, _))| *p == peer)
            .map(|(i, _)| *i)
            .collect();
        for index in theirs {
            self.in_flight.remove(&index);
            self.pending.push_front(index);
        }
    }

    fn finish(&mut self, result: Result<Downloaded, DownloadError>) {
        self.actions.clear();
        self.in_flight.clear();
        self.manifest_req = None;
        self.outcome = Some(result);
        self.finished = true;
    }

    /// Sends what can be sent now and finishes when done or stuck.
    fn progress(&mut self, now: Duration) {
        if self.finished {
            return;
        }
        let until = now.saturating_add(self.config.request_timeout);
        let Some(manifest) = &self.manifest else {
            if self.manifest_req.is_none() {
                match self.usable.first() {
                    Some(&peer) => {
                        self.manifest_req = Some((peer, until));
                        self.actions.push_back(DownloadAction::RequestManifest {
                            peer,
                            root: self.claim.root,
                        });
                    }
                    None => self.finish(Err(DownloadError::NoPeers {
                        avoided: self.avoided.len(),
                    })),
                }
            }
            return;
        };
        if self.have.iter().all(|h| *h) {
            // Every chunk matched its digest, and the manifest was accepted only if
            // those digests make up its state digest: the bytes are that state.
            let result = Ok(Downloaded {
                manifest: manifest.clone(),
                bytes: std::mem::take(&mut self.bytes),
                served_by: std::mem::take(&mut self.served_by),
                avoided: self.avoided.clone(),
            });
            self.finish(result);
            return;
        }
        while let Some(&index) = self.pending.front() {
            if self.have.get(index as usize).copied().unwrap_or(true)
                || self.in_flight.contains_key(&index)
            {
                // Arrived meanwhile, or asked for already.
                self.pending.pop_front();
                continue;
            }
            let Some(peer) = self.least_loaded() else {
                break;
            };
            self.pending.pop_front();
            self.in_flight.insert(index, (peer, until));
            self.actions.push_back(DownloadAction::RequestChunk {
                peer,
                root: self.claim.root,
                index,
            });
        }
        if self.in_flight.is_empty() && !self.pending.is_empty() {
            self.finish(Err(DownloadError::NoPeers {
                avoided: self.avoided.len(),
            }));
        }
    }

    /// The usable peer with the fewest requests in flight (below `per_peer`),
    /// ties broken in turn so chunks spread over every holder.
    fn least_loaded(&mut self) -> Option<NodeId> {
        let n = self.usable.len();
        if n == 0 {
            return None;
        }
        let load = |p: &NodeId| self.in_flight.values().filter(|(q, _)| q == p).count();
        let pick = (0..n)
            .map(|k| self.usable[(self.turn + k) % n])
            .filter(|p| load(p) < self.config.per_peer.max(1))
            .min_by_key(|p| load(p))?;
        self.turn = self.turn.wrapping_add(1);
        Some(pick)
    }
}
