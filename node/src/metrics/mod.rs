//! Live figures of one node, for `--metrics ADDR`.
//!
//! [`Metrics`] is a cheap, cloneable handle on one registry. The driver's
//! progress events feed it through [`Metrics::tap`] (rounds, loss, samples,
//! accuracy), the driver tells it who the members are and which stage and
//! shard each holds, and the network's counters give bytes in and out and
//! each connection's address. [`http`] serves it as Prometheus text, as JSON
//! and as a self-contained status page.

pub mod http;

use crate::driver::{NodeEvent, Reporter};
use crate::net::{address_kind, AddressKind, NetStats};
use libp2p::PeerId;
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Points of loss and throughput history kept for the status page's charts.
pub const HISTORY_LIMIT: usize = 2000;

/// How long a served `/metrics` or `/status.json` body is reused: clients
/// asking in a loop cost the node a few builds a second (each walks every
/// member and the whole history), not one per request.
pub const BODY_MAX_AGE: Duration = Duration::from_millis(250);

/// A shared handle on one node's metrics registry.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Mutex<State>>,
    bodies: Arc<Mutex<Bodies>>,
}

/// A body served, with when it was built.
type Built = Option<(Instant, Vec<u8>)>;

/// The bodies last served.
#[derive(Default)]
struct Bodies {
    prometheus: Built,
    status: Built,
    /// Bodies built so far (for tests).
    built: u64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

struct State {
    created: Instant,
    net: Option<Arc<NetStats>>,
    peer_id: Option<String>,
    stage: Option<u32>,
    shard: Option<usize>,
    total_steps: u64,
    round: u64,
    step: u64,
    run_step: u64,
    loss: f32,
    samples: u64,
    samples_per_s: f64,
    group: usize,
    /// The all-reduce deadline the next round uses, in seconds.
    reduce_deadline_s: f64,
    /// The join window the next round's leader uses, in seconds.
    join_window_s: f64,
    dropped_total: u64,
    round_seconds_sum: f64,
    rounds_timed: u64,
    last_round_at: Option<Instant>,
    accuracy: Option<f32>,
    test_loss: Option<f32>,
    finished: bool,
    members: BTreeMap<PeerId, PeerInfo>,
    history: VecDeque<Point>,
}

#[derive(Debug, Clone, Default)]
struct PeerInfo {
    stage: Option<u32>,
    shard: Option<usize>,
}

/// One point of the charts: the figures of one round.
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    /// Seconds since the node started.
    pub t: f64,
    /// The round.
    pub round: u64,
    /// Mean training loss of the round (`None` when this node computes no loss).
    pub loss: Option<f32>,
    /// Training throughput so far.
    pub samples_per_s: f64,
}

/// One row of the peer table.
#[derive(Debug, Clone, Serialize)]
pub struct PeerRow {
    /// The peer's id.
    pub peer_id: String,
    /// Whether the row is this node.
    #[serde(rename = "self")]
    pub is_self: bool,
    /// Pipeline stage the peer holds, in pipeline runs.
    pub stage: Option<u32>,
    /// Samples (or text windows) in the peer's data shard, when known.
    pub shard: Option<usize>,
    /// Remote address of our connection to it (`None` for this node or while unconnected).
    pub address: Option<String>,
    /// Whether that connection is direct or relayed.
    pub kind: Option<AddressKind>,
}

/// Everything the status page shows, served as `/status.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// This node's peer id (`None` before the network is up).
    pub peer_id: Option<String>,
    /// This node's pipeline stage, in pipeline runs.
    pub stage: Option<u32>,
    /// Averaging rounds done.
    pub round: u64,
    /// Local steps done.
    pub step: u64,
    /// Where the run stands: the steps of its schedule through the last
    /// round, those a node downloaded or skipped to catch up included.
    pub run_step: u64,
    /// Local steps this run lasts (0 while unknown).
    pub total_steps: u64,
    /// Mean training loss of the last round.
    pub loss: Option<f32>,
    /// Held-out accuracy, once evaluated.
    pub accuracy: Option<f32>,
    /// Held-out loss, once evaluated.
    pub test_loss: Option<f32>,
    /// Samples trained on by this node.
    pub samples: u64,
    /// Training throughput so far.
    pub samples_per_s: f64,
    /// Payload bytes sent.
    pub bytes_sent: u64,
    /// Payload bytes received.
    pub bytes_received: u64,
    /// Group members dropped from rounds, summed.
    pub dropped: u64,
    /// Members of the swarm this node sees, itself included.
    pub peers: usize,
    /// Whether AutoNAT found this node reachable (`unknown` before the network is up).
    pub reachability: crate::net::nat::Reachability,
    /// Relays this node holds a reservation on (peer ids), when it is not reachable.
    pub relays: Vec<String>,
    /// Training is over.
    pub finished: bool,
    /// Seconds since the node started.
    pub uptime_s: f64,
    /// This node first, then the other members.
    pub peer_table: Vec<PeerRow>,
    /// One point per round, oldest first, at most [`HISTORY_LIMIT`].
    pub history: Vec<Point>,
}

impl Metrics {
    /// An empty registry.
    pub fn new() -> Metrics {
        Metrics {
            inner: Arc::new(Mutex::new(State {
                created: Instant::now(),
                net: None,
                peer_id: None,
                stage: None,
                shard: None,
                total_steps: 0,
                round: 0,
                step: 0,
                run_step: 0,
                loss: f32::NAN,
                samples: 0,
                samples_per_s: 0.0,
                group: 0,
                reduce_deadline_s: 0.0,
                join_window_s: 0.0,
                dropped_total: 0,
                round_seconds_sum: 0.0,
                rounds_timed: 0,
                last_round_at: None,
                accuracy: None,
                test_loss: None,
                finished: false,
                members: BTreeMap::new(),
                history: VecDeque::new(),
            })),
            bodies: Arc::default(),
        }
    }

    /// `/metrics`' body: [`Metrics::prometheus`], built at most every
    /// [`BODY_MAX_AGE`].
    pub fn prometheus_body(&self) -> Vec<u8> {
        let built: Result<_, std::convert::Infallible> =
            self.cached_body(|b| &mut b.prometheus, || Ok(self.prometheus().into_bytes()));
        built.unwrap_or_else(|never| match never {})
    }

    /// `/status.json`'s body: [`Metrics::status`] as JSON, built at most
    /// every [`BODY_MAX_AGE`].
    pub fn status_body(&self) -> Result<Vec<u8>, serde_json::Error> {
        self.cached_body(|b| &mut b.status, || serde_json::to_vec(&self.status()))
    }

    /// The body in `slot` if it is fresh, else a new one from `build`. The
    /// lock is held while building, so requests arriving meanwhile wait for
    /// that one build rather than each making their own.
    fn cached_body<E>(
        &self,
        slot: fn(&mut Bodies) -> &mut Built,
        build: impl FnOnce() -> Result<Vec<u8>, E>,
    ) -> Result<Vec<u8>, E> {
        let mut bodies = self.bodies.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((at, body)) = slot(&mut bodies) {
            if at.elapsed() < BODY_MAX_AGE {
                return Ok(body.clone());
            }
        }
        let body = build()?;
        bodies.built += 1;
        *slot(&mut bodies) = Some((Instant::now(), body.clone()));
        Ok(body)
    }

    /// Bodies built so far.
    #[cfg(test)]
    fn bodies_built(&self) -> u64 {
        self.bodies
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .built
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Every update leaves the state consistent, so a panicked holder is harmless.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Wraps a reporter so every event also updates this registry.
    pub fn tap(&self, mut inner: Reporter) -> Reporter {
        let metrics = self.clone();
        Box::new(move |event: &NodeEvent| {
            metrics.record(event);
            inner(event);
        })
    }

    /// Updates the registry from one progress event.
    pub fn record(&self, event: &NodeEvent) {
        let mut s = self.state();
        let now = Instant::now();
        match event {
            NodeEvent::Listening { peer_id, .. } => s.peer_id = Some(peer_id.clone()),
            NodeEvent::Started {
                shard,
                total_steps,
                stage,
                ..
            } => {
                s.stage = *stage;
                if stage.is_none() || *shard > 0 {
                    s.shard = Some(*shard);
                }
                s.total_steps = *total_steps;
                s.last_round_at = Some(now);
            }
            NodeEvent::Synced { round, .. } => s.round = *round,
            NodeEvent::Round(r) => {
                if let Some(prev) = s.last_round_at {
                    s.round_seconds_sum += now.duration_since(prev).as_secs_f64();
                    s.rounds_timed += 1;
                }
                s.last_round_at = Some(now);
                s.round = r.round;
                s.step = r.step;
                s.run_step = r.progress_step();
                s.total_steps = r.total_steps;
                s.loss = r.loss;
                s.samples = r.samples;
                s.samples_per_s = r.samples_per_s;
                s.group = r.peers;
                s.reduce_deadline_s = r.reduce_deadline_s;
                s.join_window_s = r.join_window_s;
                s.dropped_total += r.dropped as u64;
                let point = Point {
                    t: now.duration_since(s.created).as_secs_f64(),
                    round: r.round,
                    loss: r.loss.is_finite().then_some(r.loss),
                    samples_per_s: r.samples_per_s,
                };
                if s.history.len() >= HISTORY_LIMIT {
                    s.history.pop_front();
                }
                s.history.push_back(point);
            }
            NodeEvent::Evaluated {
                test_accuracy,
                test_loss,
                ..
            } => {
                s.accuracy = *test_accuracy;
                s.test_loss = test_loss.is_finite().then_some(*test_loss);
            }
            NodeEvent::Finished(f) => {
                s.finished = true;
                s.round = f.rounds;
                s.step = f.steps;
                s.samples = f.samples;
                s.accuracy = f.test_accuracy;
                s.test_loss = f.test_loss.is_finite().then_some(f.test_loss);
            }
        }
    }

    /// Gives the registry the network's counters and connection addresses.
    pub fn attach_net(&self, stats: Arc<NetStats>) {
        self.state().net = Some(stats);
    }

    /// A member joined the swarm.
    pub fn peer_joined(&self, peer: PeerId) {
        self.state().members.entry(peer).or_default();
    }

    /// A member left the swarm.
    pub fn peer_left(&self, peer: &PeerId) {
        self.state().members.remove(peer);
    }

    /// A member announced the pipeline stage it holds.
    pub fn peer_stage(&self, peer: PeerId, stage: u32) {
        if let Some(info) = self.state().members.get_mut(&peer) {
            info.stage = Some(stage);
        }
    }

    /// The data shards of this node and its members after a reshard, as
    /// (peer, samples); members not listed hold no shard.
    pub fn shards(&self, me: PeerId, sizes: &[(PeerId, usize)]) {
        let mut s = self.state();
        for info in s.members.values_mut() {
            info.shard = None;
        }
        for (peer, size) in sizes {
            if *peer == me {
                s.shard = Some(*size);
            } else if let Some(info) = s.members.get_mut(peer) {
                info.shard = Some(*size);
            }
        }
    }

    /// A consistent copy of everything, for `/status.json`.
    pub fn status(&self) -> Status {
        let s = self.state();
        let (sent, received) = s.net.as_ref().map_or((0, 0), |n| (n.sent(), n.received()));
        let (reachability, relays) = s.net.as_ref().map(|n| n.reachability()).unwrap_or_default();
        let mut table = vec![PeerRow {
            peer_id: s.peer_id.clone().unwrap_or_default(),
            is_self: true,
            stage: s.stage,
            shard: s.shard,
            address: None,
            kind: None,
        }];
        for (peer, info) in &s.members {
            let addr = s.net.as_ref().and_then(|n| n.remote_addr(peer));
            table.push(PeerRow {
                peer_id: peer.to_string(),
                is_self: false,
                stage: info.stage,
                shard: info.shard,
                kind: addr.as_ref().map(address_kind),
                address: addr.map(|a| a.to_string()),
            });
        }
        Status {
            peer_id: s.peer_id.clone(),
            stage: s.stage,
            round: s.round,
            step: s.step,
            run_step: s.run_step,
            total_steps: s.total_steps,
            loss: s.loss.is_finite().then_some(s.loss),
            accuracy: s.accuracy,
            test_loss: s.test_loss,
            samples: s.samples,
            samples_per_s: s.samples_per_s,
            bytes_sent: sent,
            bytes_received: received,
            dropped: s.dropped_total,
            peers: s.members.len() + 1,
            reachability,
            relays: relays.iter().map(PeerId::to_string).collect(),
            finished: s.finished,
            uptime_s: s.created.elapsed().as_secs_f64(),
            peer_table: table,
            history: s.history.iter().cloned().collect(),
        }
    }

    /// The registry in Prometheus' text exposition format (version 0.0.4).
    pub fn prometheus(&self) -> String {
        let st = self.status();
        let (round_sum, round_count, group, deadline, window) = {
            let s = self.state();
            (
                s.round_seconds_sum,
                s.rounds_timed,
                s.group,
                s.reduce_deadline_s,
                s.join_window_s,
            )
        };
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: f64| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {}", prom_value(value));
        };
        metric(
            "p2ptrain_rounds_total",
            "counter",
            "Averaging rounds this node finished.",
            st.round as f64,
        );
        metric(
            "p2ptrain_steps_total",
            "counter",
            "Local optimisation steps this node took.",
            st.step as f64,
        );
        metric(
            "p2ptrain_loss",
            "gauge",
            "Mean training loss of the last round (NaN before the first, or on a stage without loss).",
            st.loss.map_or(f64::NAN, f64::from),
        );
        metric(
            "p2ptrain_accuracy",
            "gauge",
            "Held-out accuracy of the latest evaluation (NaN until evaluated; see --eval-every).",
            st.accuracy.map_or(f64::NAN, f64::from),
        );
        metric(
            "p2ptrain_samples_total",
            "counter",
            "Training samples this node stepped on.",
            st.samples as f64,
        );
        metric(
            "p2ptrain_samples_per_second",
            "gauge",
            "Training throughput of this node over its training time so far.",
            st.samples_per_s,
        );
        metric(
            "p2ptrain_bytes_sent_total",
            "counter",
            "Application payload bytes sent (gossip counted once per member).",
            st.bytes_sent as f64,
        );
        metric(
            "p2ptrain_bytes_received_total",
            "counter",
            "Application payload bytes received from members.",
            st.bytes_received as f64,
        );
        metric(
            "p2ptrain_peers",
            "gauge",
            "Members of the swarm this node sees, itself included.",
            st.peers as f64,
        );
        metric(
            "p2ptrain_round_group_size",
            "gauge",
            "Members of the last averaging round's group.",
            group as f64,
        );
        metric(
            "p2ptrain_reduce_deadline_seconds",
            "gauge",
            "How long the next all-reduce waits for silent members (fitted to measured rounds).",
            deadline,
        );
        metric(
            "p2ptrain_join_window_seconds",
            "gauge",
            "How long the next round's leader waits for stragglers (fitted to measured rounds).",
            window,
        );
        metric(
            "p2ptrain_dropped_members_total",
            "counter",
            "Group members dropped from averaging rounds for missing a deadline, summed over rounds.",
            st.dropped as f64,
        );
        let _ = writeln!(
            out,
            "# HELP p2ptrain_round_duration_seconds Wall time between the ends of consecutive rounds (the first from the start of training)."
        );
        let _ = writeln!(out, "# TYPE p2ptrain_round_duration_seconds summary");
        let _ = writeln!(
            out,
            "p2ptrain_round_duration_seconds_sum {}",
            prom_value(round_sum)
        );
        let _ = writeln!(out, "p2ptrain_round_duration_seconds_count {round_count}");
        let _ = writeln!(
            out,
            "# HELP p2ptrain_node_info This node's identity; the value is always 1."
        );
        let _ = writeln!(out, "# TYPE p2ptrain_node_info gauge");
        let stage = st.stage.map_or(String::new(), |s| s.to_string());
        let _ = writeln!(
            out,
            "p2ptrain_node_info{{peer_id=\"{}\",stage=\"{stage}\"}} 1",
            st.peer_id.unwrap_or_default()
        );
        out
    }
}

/// Formats a sample value the way Prometheus reads it.
fn prom_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::{FinalReport, RoundReport};
    use libp2p::Multiaddr;

    fn round(round: u64, loss: f32, dropped: usize) -> NodeEvent {
        NodeEvent::Round(RoundReport {
            round,
            step: round * 10,
            run_step: round * 10,
            total_steps: 100,
            peers: 3,
            loss,
            samples: round * 640,
            samples_per_s: 1000.0,
            bytes_sent: 0,
            dropped,
            averaging_s: 0.1,
            reduce_deadline_s: 5.0,
            join_window_s: 2.0,
            model_digest: String::new(),
        })
    }

    #[test]
    fn clients_asking_in_a_loop_cost_a_build_per_body_age() {
        let m = Metrics::new();
        let mut tap = m.tap(Box::new(|_| {}));
        tap(&round(1, 2.5, 0));
        for _ in 0..200 {
            m.status_body().unwrap();
            m.prometheus_body();
        }
        assert_eq!(m.bodies_built(), 2);
        let json: serde_json::Value = serde_json::from_slice(&m.status_body().unwrap()).unwrap();
        assert_eq!(json["round"], 1);
        // A body older than its age is built again, with what changed since.
        tap(&round(2, 2.0, 0));
        std::thread::sleep(BODY_MAX_AGE + Duration::from_millis(20));
        let json: serde_json::Value = serde_json::from_slice(&m.status_body().unwrap()).unwrap();
        assert_eq!(json["round"], 2);
        assert!(String::from_utf8(m.prometheus_body())
            .unwrap()
            .contains("round"));
        assert_eq!(m.bodies_built(), 4);
    }

    #[test]
    fn the_status_says_where_the_run_stands_beside_the_local_steps() {
        let m = Metrics::new();
        let NodeEvent::Round(mut joiner) = round(51, 1.0, 0) else {
            unreachable!()
        };
        // Downloaded the model of round 50, then trained one round of 10.
        (joiner.step, joiner.run_step) = (10, 510);
        m.record(&NodeEvent::Round(joiner));
        let status = m.status();
        assert_eq!((status.step, status.run_step), (10, 510));
        assert!(m.prometheus().contains("\np2ptrain_steps_total 10\n"));
    }

    #[test]
    fn rounds_feed_gauges_counters_and_history() {
        let m = Metrics::new();
        m.record(&NodeEvent::Listening {
            peer_id: "me".into(),
            addrs: vec![],
        });
        m.record(&NodeEvent::Started {
            peers: 3,
            shard: 3333,
            total_steps: 100,
            stage: None,
        });
        m.record(&round(1, 2.0, 0));
        m.record(&round(2, 1.5, 1));
        let st = m.status();
        assert_eq!((st.round, st.step, st.samples), (2, 20, 1280));
        assert_eq!(st.loss, Some(1.5));
        assert_eq!(st.dropped, 1);
        assert_eq!(st.history.len(), 2);
        assert_eq!(st.peer_table[0].shard, Some(3333));
        let text = m.prometheus();
        assert!(text.contains("\np2ptrain_rounds_total 2\n"), "{text}");
        assert!(text.contains("\np2ptrain_loss 1.5\n"), "{text}");
        assert!(text.contains("\np2ptrain_accuracy NaN\n"), "{text}");
        assert!(text.contains("p2ptrain_round_duration_seconds_count 2\n"));
        assert!(
            text.contains("\np2ptrain_reduce_deadline_seconds 5\n")
                && text.contains("\np2ptrain_join_window_seconds 2\n"),
            "{text}"
        );
        // No network attached: nothing is known about reachability yet.
        assert_eq!(st.reachability, crate::net::nat::Reachability::Unknown);
        assert!(st.relays.is_empty());
        assert!(text.contains("p2ptrain_node_info{peer_id=\"me\",stage=\"\"} 1"));
    }

    #[test]
    fn history_is_bounded() {
        let m = Metrics::new();
        for r in 1..=(HISTORY_LIMIT as u64 + 5) {
            m.record(&round(r, 1.0, 0));
        }
        let st = m.status();
        assert_eq!(st.history.len(), HISTORY_LIMIT);
        assert_eq!(st.history[0].round, 6);
    }

    #[test]
    fn finish_sets_accuracy_and_members_get_stage_and_shard() {
        let m = Metrics::new();
        m.record(&NodeEvent::Evaluated {
            round: 2,
            step: 20,
            test_accuracy: Some(0.8),
            test_loss: 0.5,
        });
        assert_eq!(
            m.status().accuracy,
            Some(0.8),
            "a mid-run evaluation shows at once"
        );
        assert!(!m.status().finished);
        let (me, other) = (PeerId::random(), PeerId::random());
        m.peer_joined(other);
        m.peer_stage(other, 1);
        m.shards(me, &[(me, 10), (other, 20)]);
        m.record(&NodeEvent::Finished(FinalReport {
            peer_id: me.to_string(),
            rounds: 4,
            steps: 40,
            samples: 100,
            test_accuracy: Some(0.9),
            test_loss: 0.3,
            final_loss: 0.2,
            wall_s: 1.0,
            bytes_sent: 0,
            model_digest: String::new(),
            complete_rounds: 4,
            averaging_s: 0.0,
            training_s: 0.0,
            pipeline: None,
            paths: Default::default(),
            reachability: Default::default(),
        }));
        let st = m.status();
        assert_eq!(st.accuracy, Some(0.9));
        assert!(st.finished);
        assert_eq!(st.peers, 2);
        let row = &st.peer_table[1];
        assert_eq!((row.stage, row.shard), (Some(1), Some(20)));
        assert_eq!(st.peer_table[0].shard, Some(10));
        m.peer_left(&other);
        assert_eq!(m.status().peer_table.len(), 1);
    }

    #[test]
    fn relay_addresses_are_told_apart() {
        let direct: Multiaddr = "/ip4/127.0.0.1/udp/4001/quic-v1".parse().unwrap();
        let relayed: Multiaddr = format!(
            "/ip4/192.0.2.1/udp/4001/quic-v1/p2p/{}/p2p-circuit",
            PeerId::random()
        )
        .parse()
        .unwrap();
        assert_eq!(address_kind(&direct), AddressKind::Direct);
        assert_eq!(address_kind(&relayed), AddressKind::Relay);
    }
}
