//! A deterministic swarm simulator with a virtual clock.
//!
//! [`Sim`] owns N [`Averager`]s and an event queue of in-flight messages. Every random choice
//! (latency, loss) comes from one seeded [`Rng`] and every tie is broken by insertion order,
//! so the same [`SimConfig`] and the same calls give the identical run. This is where the
//! averaging protocol is tested under latency, loss, crashes and partitions.
//!
//! Network model: a `Broadcast` is copied to every other peer, each copy independently lost
//! with probability `loss` or delayed uniformly within `latency`. A crashed peer neither sends
//! nor receives (messages it sent before crashing still arrive). A message is dropped if, at
//! the moment it is sent, an active partition puts sender and receiver in different groups.
//! A forging peer ([`Sim::forge_groups`]) lists a made-up member in every `Group` it sends.

use crate::averaging::{
    Averager, AveragingConfig, AvgEvent, AvgMessage, Destination, OpenJoinProofs, RoundOutcome,
};
use crate::rng::Rng;
use crate::tensor::Bytes;
use crate::NodeId;
use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BinaryHeap};
use std::time::Duration;

/// The simulated swarm and network.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Number of peers.
    pub peers: usize,
    /// Seed for peer ids, latency and loss.
    pub seed: u64,
    /// One-way latency, uniform in `min..=max`.
    pub latency: (Duration, Duration),
    /// Probability that one message copy is lost.
    pub loss: f64,
    /// Configuration of every peer's [`Averager`].
    pub averaging: AveragingConfig,
}

impl Default for SimConfig {
    /// Four peers, 1–50 ms latency, no loss, default averaging.
    fn default() -> Self {
        SimConfig {
            peers: 4,
            seed: 0,
            latency: (Duration::from_millis(1), Duration::from_millis(50)),
            loss: 0.0,
            averaging: AveragingConfig::default(),
        }
    }
}

/// Something scheduled to happen at a virtual time.
#[derive(Debug)]
enum Action {
    Deliver {
        from: usize,
        to: usize,
        msg: AvgMessage,
    },
    Start {
        peer: usize,
        round: u64,
        values: Vec<f32>,
    },
    Crash {
        peer: usize,
    },
}

/// A queue entry, ordered by time then insertion order.
#[derive(Debug)]
struct Scheduled {
    at: Duration,
    seq: u64,
    action: Action,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// A partition: while active, messages between different sides are dropped.
#[derive(Debug)]
struct Partition {
    from: Duration,
    until: Duration,
    /// Side of each peer; peers not listed share one extra side.
    side: Vec<usize>,
}

/// A deterministic swarm of [`Averager`]s on a virtual network.
#[derive(Debug)]
pub struct Sim {
    cfg: SimConfig,
    ids: Vec<NodeId>,
    index: BTreeMap<NodeId, usize>,
    nodes: Vec<Averager>,
    crashed: Vec<bool>,
    /// Peers whose every `Group` also lists a made-up member (see [`Sim::forge_groups`]).
    forgers: Vec<bool>,
    partitions: Vec<Partition>,
    queue: BinaryHeap<Reverse<Scheduled>>,
    seq: u64,
    now: Duration,
    rng: Rng,
    outcomes: Vec<Vec<RoundOutcome>>,
    events: Vec<Vec<(Duration, AvgEvent)>>,
    messages_sent: u64,
    payload_bytes_sent: u64,
}

impl Sim {
    /// Builds the swarm: peer ids derived from the seed, every peer's live view = all peers.
    pub fn new(cfg: SimConfig) -> Self {
        let ids: Vec<NodeId> = (0..cfg.peers as u64)
            .map(|i| {
                let mut key = b"p2ptrain-sim".to_vec();
                key.extend_from_slice(&cfg.seed.to_le_bytes());
                key.extend_from_slice(&i.to_le_bytes());
                NodeId::from_key_bytes(&key)
            })
            .collect();
        let nodes = ids
            .iter()
            .map(|id| {
                let mut a = Averager::new(*id, cfg.averaging.clone(), Box::new(OpenJoinProofs));
                a.set_peers(&ids);
                a
            })
            .collect();
        Sim {
            index: ids.iter().enumerate().map(|(i, id)| (*id, i)).collect(),
            nodes,
            crashed: vec![false; cfg.peers],
            forgers: vec![false; cfg.peers],
            partitions: Vec::new(),
            queue: BinaryHeap::new(),
            seq: 0,
            now: Duration::ZERO,
            rng: Rng::new(cfg.seed ^ 0x05ee_d0f5_e700),
            outcomes: vec![Vec::new(); cfg.peers],
            events: vec![Vec::new(); cfg.peers],
            messages_sent: 0,
            payload_bytes_sent: 0,
            ids,
            cfg,
        }
    }

    /// Peer ids, by peer index.
    pub fn ids(&self) -> &[NodeId] {
        &self.ids
    }

    /// Crashes `peer` at time `at` (for good).
    pub fn crash(&mut self, at: Duration, peer: usize) {
        self.schedule(at, Action::Crash { peer });
    }

    /// Makes `peer` a hostile leader: every `Group` it sends from now on also lists a
    /// made-up member (the largest id there is) with a proof nobody made.
    pub fn forge_groups(&mut self, peer: usize) {
        if let Some(f) = self.forgers.get_mut(peer) {
            *f = true;
        }
    }

    /// Splits the network into `groups` (peer indices) from `from` until `until`; peers not
    /// listed form one more group together.
    pub fn partition(&mut self, from: Duration, until: Duration, groups: Vec<Vec<usize>>) {
        let mut side = vec![usize::MAX; self.cfg.peers];
        for (g, members) in groups.iter().enumerate() {
            for &p in members {
                if let Some(s) = side.get_mut(p) {
                    *s = g;
                }
            }
        }
        self.partitions.push(Partition { from, until, side });
    }

    /// Makes `peer` start `round` with `values` at time `at`.
    ///
    /// # Panics
    /// When the run reaches `at`, if the averager refuses the round (a misuse of the
    /// simulator by the test, e.g. starting a round while one is in flight).
    pub fn start_round(&mut self, peer: usize, at: Duration, round: u64, values: Vec<f32>) {
        self.schedule(
            at,
            Action::Start {
                peer,
                round,
                values,
            },
        );
    }

    /// Runs the swarm until virtual time `t` (events at exactly `t` included).
    ///
    /// # Panics
    /// If an averager asks for a timeout in the past after handling it (a protocol bug that
    /// would otherwise loop forever).
    pub fn run_until(&mut self, t: Duration) {
        loop {
            let next_msg = self.queue.peek().map(|Reverse(s)| s.at);
            let next_timer = self.next_timer();
            let next = match (next_msg, next_timer) {
                (Some(a), Some(b)) => a.min(b),
                (a, b) => match a.or(b) {
                    Some(x) => x,
                    None => break,
                },
            };
            if next > t {
                break;
            }
            self.now = self.now.max(next);
            if next_msg == Some(next) {
                if let Some(Reverse(s)) = self.queue.pop() {
                    self.apply(s.action);
                }
            } else {
                self.fire_timers();
            }
        }
        self.now = self.now.max(t);
    }

    /// Outcomes of the rounds `peer` finished, in order.
    pub fn outcomes(&self, peer: usize) -> &[RoundOutcome] {
        self.outcomes.get(peer).map_or(&[], Vec::as_slice)
    }

    /// Every event `peer` emitted, with the virtual time it was emitted at.
    pub fn events(&self, peer: usize) -> &[(Duration, AvgEvent)] {
        self.events.get(peer).map_or(&[], Vec::as_slice)
    }

    /// The averager of `peer`, for inspection.
    pub fn averager(&self, peer: usize) -> Option<&Averager> {
        self.nodes.get(peer)
    }

    /// Whether `peer` has crashed.
    pub fn is_crashed(&self, peer: usize) -> bool {
        self.crashed.get(peer).copied().unwrap_or(false)
    }

    /// The virtual time.
    pub fn now(&self) -> Duration {
        self.now
    }

    /// Message copies put on the network so far (one per destination, lost ones included).
    pub fn messages_sent(&self) -> u64 {
        self.messages_sent
    }

    /// Encoded tensor bytes (`Part` and `Reduced` payload bodies) put on the network so far,
    /// one count per copy: what compression saves.
    pub fn payload_bytes_sent(&self) -> u64 {
        self.payload_bytes_sent
    }

    fn schedule(&mut self, at: Duration, action: Action) {
        self.seq += 1;
        self.queue.push(Reverse(Scheduled {
            at: at.max(self.now),
            seq: self.seq,
            action,
        }));
    }

    fn next_timer(&self) -> Option<Duration> {
        self.nodes
            .iter()
            .zip(&self.crashed)
            .filter(|(_, crashed)| !**crashed)
            .filter_map(|(n, _)| n.poll_timeout())
            .min()
    }

    fn fire_timers(&mut self) {
        let now = self.now;
        for i in 0..self.nodes.len() {
            if self.crashed[i] || self.nodes[i].poll_timeout().is_none_or(|t| t > now) {
                continue;
            }
            self.nodes[i].handle_timeout(now);
            if self.nodes[i].poll_timeout().is_some_and(|t| t <= now) {
                panic!("sim: peer {i} asked for a timeout at or before {now:?} after handling it");
            }
            self.flush(i);
        }
    }

    fn apply(&mut self, action: Action) {
        match action {
            Action::Deliver { from, to, msg } => {
                if self.crashed.get(to).copied().unwrap_or(true) {
                    return;
                }
                let sender = self.ids[from];
                self.nodes[to].handle_message(self.now, sender, msg);
                self.flush(to);
            }
            Action::Start {
                peer,
                round,
                values,
            } => {
                if self.crashed.get(peer).copied().unwrap_or(true) {
                    return;
                }
                if let Err(e) = self.nodes[peer].start_round(self.now, round, values) {
                    panic!("sim: peer {peer} could not start round {round}: {e}");
                }
                self.flush(peer);
            }
            Action::Crash { peer } => {
                if let Some(c) = self.crashed.get_mut(peer) {
                    *c = true;
                }
            }
        }
    }

    /// Routes everything `peer` wants to send and records its events.
    fn flush(&mut self, peer: usize) {
        while let Some(mut t) = self.nodes[peer].poll_transmit() {
            if self.forgers[peer] {
                t.msg = with_phantom_member(t.msg);
            }
            match t.to {
                Destination::Broadcast => {
                    for to in 0..self.ids.len() {
                        if to != peer {
                            self.send(peer, to, t.msg.clone());
                        }
                    }
                }
                Destination::Peer(id) => {
                    if let Some(&to) = self.index.get(&id) {
                        self.send(peer, to, t.msg);
                    }
                }
            }
        }
        while let Some(e) = self.nodes[peer].poll_event() {
            if let AvgEvent::Finished(outcome) = &e {
                self.outcomes[peer].push(outcome.clone());
            }
            self.events[peer].push((self.now, e));
        }
    }

    fn send(&mut self, from: usize, to: usize, msg: AvgMessage) {
        self.messages_sent += 1;
        if let AvgMessage::Part { payload, .. } | AvgMessage::Reduced { payload, .. } = &msg {
            self.payload_bytes_sent += payload.bytes.len() as u64;
        }
        let lost = self.rng.chance(self.cfg.loss);
        let (lo, hi) = self.cfg.latency;
        let (lo, hi) = (lo.min(hi), lo.max(hi));
        let span = u64::try_from((hi - lo).as_nanos()).unwrap_or(u64::MAX);
        let delay = lo + Duration::from_nanos(self.rng.range(0..span.saturating_add(1)));
        if lost || self.partitioned(from, to) {
            return;
        }
        self.schedule(self.now + delay, Action::Deliver { from, to, msg });
    }

    fn partitioned(&self, a: usize, b: usize) -> bool {
        self.partitions
            .iter()
            .any(|p| p.from <= self.now && self.now < p.until && p.side.get(a) != p.side.get(b))
    }
}

/// `msg`, and if it is a `Group`, one that also lists a made-up member: the largest id
/// there is (so the leader still comes first), with a proof no key made. What a forging
/// peer sends here ([`Sim::forge_groups`]) and the node's test fault `phantom:ROUND`.
pub fn with_phantom_member(msg: AvgMessage) -> AvgMessage {
    match msg {
        AvgMessage::Group {
            round,
            len,
            mut members,
            mut proofs,
            signature,
        } => {
            let phantom = NodeId([0xff; 32]);
            if members.last() < Some(&phantom) {
                members.push(phantom);
                proofs.push(Bytes::from(vec![0x5a; 96]));
            }
            AvgMessage::Group {
                round,
                len,
                members,
                proofs,
                signature,
            }
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheduled_orders_by_time_then_insertion() {
        let mut sim = Sim::new(SimConfig::default());
        sim.crash(Duration::from_millis(5), 1);
        sim.crash(Duration::from_millis(5), 2);
        sim.crash(Duration::from_millis(1), 3);
        let order: Vec<u64> =
            std::iter::from_fn(|| sim.queue.pop().map(|Reverse(s)| s.seq)).collect();
        assert_eq!(order, vec![3, 1, 2]);
    }

    #[test]
    fn crashed_peers_neither_send_nor_receive() {
        let mut sim = Sim::new(SimConfig {
            peers: 3,
            ..SimConfig::default()
        });
        sim.crash(Duration::ZERO, 2);
        sim.start_round(0, Duration::from_millis(1), 1, vec![1.0; 6]);
        sim.start_round(1, Duration::from_millis(1), 1, vec![3.0; 6]);
        sim.start_round(2, Duration::from_millis(1), 1, vec![5.0; 6]);
        sim.run_until(Duration::from_secs(30));
        assert!(sim.outcomes(2).is_empty());
        assert!(sim.is_crashed(2));
        for p in 0..2 {
            let o = &sim.outcomes(p)[0];
            assert_eq!(o.group.len(), 2, "crashed peer never joined");
            assert_eq!(o.values, vec![2.0; 6]);
        }
    }

    #[test]
    fn run_until_advances_the_clock_even_when_idle() {
        let mut sim = Sim::new(SimConfig::default());
        sim.run_until(Duration::from_secs(3));
        assert_eq!(sim.now(), Duration::from_secs(3));
        assert_eq!(sim.messages_sent(), 0);
        assert_eq!(sim.payload_bytes_sent(), 0);
    }
}
