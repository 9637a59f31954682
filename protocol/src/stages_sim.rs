//! Stage assignment under churn, in virtual time.
//!
//! Peers join and crash at random times; every live peer learns of each membership change
//! after its own random delay (notices may arrive out of order), keeps its own view of the
//! swarm, and computes [`assign`] from that view, listing the peers in its own order. The
//! tests check that:
//!
//! - whenever all live peers' views agree, they all compute the same assignment, the one of
//!   the true membership;
//! - every view with at least `K` peers gives an assignment with every stage served and the
//!   viewing peer in it, and a smaller view gives [`StageError::NotEnoughPeers`] with its
//!   counts;
//! - along the true membership sequence, one change moves at most `K - 1` other peers when
//!   throughputs are equal (the bound stated in the module doc of [`super`]), and between two
//!   moments of agreement at most `K - 1` per change in between.

use super::*;
use crate::rng::Rng;
use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap};
use std::time::Duration;

/// A membership notice: peer `.0` is alive (`true`, it joined) or gone (`false`, it crashed).
type Notice = (usize, bool);

/// One peer's knowledge of the swarm: what it last heard about each peer. A crash notice is
/// final, so a join notice that arrives after it (reordered) does not resurrect the peer.
#[derive(Clone, Default)]
struct View {
    heard: BTreeMap<usize, bool>,
}

impl View {
    fn apply(&mut self, (peer, alive): Notice) {
        if alive {
            self.heard.entry(peer).or_insert(true);
        } else {
            self.heard.insert(peer, false);
        }
    }

    fn alive(&self) -> BTreeSet<usize> {
        self.heard
            .iter()
            .filter(|(_, a)| **a)
            .map(|(p, _)| *p)
            .collect()
    }
}

/// What one simulated run saw.
#[derive(Default)]
struct Report {
    /// Membership changes with at least `K` peers before and after.
    changes: usize,
    /// Other peers moved over those changes.
    moved: usize,
    /// Most other peers moved by one change.
    worst: usize,
    /// Moments when all live views agreed (each checked).
    agreements: usize,
    /// Views evaluated.
    evaluations: usize,
}

/// Runs one churn scenario: `stages` stages, `initial` peers at time 0, then `changes` joins
/// and crashes; throughputs equal if `equal`, else 1x, 2x or 4x at random.
fn run(seed: u64, stages: usize, initial: usize, changes: usize, equal: bool) -> Report {
    let mut rng = Rng::new(seed);
    let mut ids = Vec::new();
    let mut tputs = Vec::new();
    let new_peer = |ids: &mut Vec<NodeId>, tputs: &mut Vec<Throughput>, rng: &mut Rng| {
        let i = ids.len() as u64;
        ids.push(NodeId::from_key_bytes(
            format!("stages-sim-{seed}-{i}").as_bytes(),
        ));
        tputs.push(if equal {
            Throughput::UNKNOWN
        } else {
            Throughput::from_milli(1000 << rng.range(0..3))
        });
        ids.len() - 1
    };
    let input = |alive: &BTreeSet<usize>,
                 ids: &[NodeId],
                 tputs: &[Throughput],
                 rng: &mut Rng|
     -> Vec<(NodeId, Throughput)> {
        let mut v: Vec<(NodeId, Throughput)> = alive.iter().map(|&p| (ids[p], tputs[p])).collect();
        // Each peer lists the swarm in its own order.
        rng.shuffle(&mut v);
        v
    };

    let mut truth: BTreeSet<usize> = (0..initial)
        .map(|_| new_peer(&mut ids, &mut tputs, &mut rng))
        .collect();
    let mut views: BTreeMap<usize, View> = truth
        .iter()
        .map(|&p| {
            let mut v = View::default();
            for &q in &truth {
                v.apply((q, true));
            }
            (p, v)
        })
        .collect();
    // Deliveries: (time, seq, viewer, notice).
    let mut queue: BinaryHeap<Reverse<(Duration, u64, usize, Notice)>> = BinaryHeap::new();
    let mut seq = 0u64;
    let mut report = Report::default();
    let mut prev_truth_assign = assign(&input(&truth, &ids, &tputs, &mut rng), stages).ok();
    let mut last_agreed: Option<(Assignment, usize)> = None;
    let mut change_count = 0usize;

    let mut next_change = Duration::from_millis(rng.range(0..3000));
    let mut done_changes = 0;
    loop {
        let next_delivery = queue.peek().map(|Reverse((at, ..))| *at);
        let change_due = done_changes < changes && next_delivery.is_none_or(|d| next_change <= d);
        if change_due {
            let now = next_change;
            done_changes += 1;
            change_count += 1;
            let notice = if truth.len() <= 1 || (rng.chance(0.5) && truth.len() < 40) {
                let p = new_peer(&mut ids, &mut tputs, &mut rng);
                truth.insert(p);
                // The joiner bootstraps with the membership as it is now.
                let mut v = View::default();
                for &q in &truth {
                    v.apply((q, true));
                }
                views.insert(p, v);
                (p, true)
            } else {
                let live: Vec<usize> = truth.iter().copied().collect();
                let p = live[rng.range(0..live.len() as u64) as usize];
                truth.remove(&p);
                views.remove(&p);
                (p, false)
            };
            for &viewer in truth.iter().filter(|&&v| v != notice.0) {
                seq += 1;
                let delay = Duration::from_millis(rng.range(0..4000));
                queue.push(Reverse((now + delay, seq, viewer, notice)));
            }
            // Moves along the true membership sequence.
            let now_assign = assign(&input(&truth, &ids, &tputs, &mut rng), stages).ok();
            if let (Some(before), Some(after)) = (&prev_truth_assign, &now_assign) {
                let m = moved(before, after).len();
                if equal {
                    assert!(
                        m < stages,
                        "seed {seed}: change {done_changes} moved {m} other peers, K = {stages}"
                    );
                }
                report.changes += 1;
                report.moved += m;
                report.worst = report.worst.max(m);
            }
            prev_truth_assign = now_assign;
            next_change = now + Duration::from_millis(rng.range(0..3000));
        } else if let Some(Reverse((_, _, viewer, notice))) = queue.pop() {
            // A crashed viewer hears nothing.
            if let Some(v) = views.get_mut(&viewer) {
                v.apply(notice);
            }
        } else {
            break;
        }

        // Every live peer evaluates its own view (once per distinct view, from the first
        // holder's own listing order: the answer does not depend on order).
        let mut results = Vec::new();
        let mut cache: BTreeMap<BTreeSet<usize>, Result<Assignment, StageError>> = BTreeMap::new();
        for (&me, view) in &views {
            let alive = view.alive();
            let got = cache
                .entry(alive.clone())
                .or_insert_with(|| assign(&input(&alive, &ids, &tputs, &mut rng), stages))
                .clone();
            report.evaluations += 1;
            if alive.len() >= stages {
                let a = got.unwrap_or_else(|e| panic!("seed {seed}: view of {me}: {e}"));
                assert!((0..stages).all(|s| !a.replicas(s).is_empty()));
                assert!(
                    a.stage_of(ids[me]).is_some(),
                    "a peer missing from its own view"
                );
                results.push((alive, Some(a)));
            } else {
                assert_eq!(
                    got,
                    Err(StageError::NotEnoughPeers {
                        peers: alive.len(),
                        stages
                    })
                );
                results.push((alive, None));
            }
        }
        // When all views agree with the truth, everyone computes the same assignment.
        if !results.is_empty() && results.iter().all(|(alive, _)| *alive == truth) {
            report.agreements += 1;
            let expected = assign(&input(&truth, &ids, &tputs, &mut rng), stages).ok();
            for (_, a) in &results {
                assert_eq!(*a, expected, "seed {seed}: peers with equal views disagree");
            }
            if let Some(a) = expected {
                if let Some((prev, at_change)) = &last_agreed {
                    let m = moved(prev, &a).len();
                    let between = change_count - at_change;
                    if equal {
                        assert!(
                            m <= between * (stages - 1),
                            "seed {seed}: {m} moved over {between} changes, K = {stages}"
                        );
                    }
                }
                last_agreed = Some((a, change_count));
            } else {
                last_agreed = None;
            }
        }
    }
    report
}

#[test]
fn churn_with_equal_throughputs_stays_within_the_move_bound() {
    let (mut changes, mut moved_total, mut agreements) = (0, 0, 0);
    for seed in 0..12u64 {
        let stages = 2 + (seed as usize % 5);
        let r = run(seed, stages, stages + 3, 60, true);
        assert!(r.evaluations > 0);
        changes += r.changes;
        moved_total += r.moved;
        agreements += r.agreements;
    }
    assert!(changes > 300, "only {changes} changes with enough peers");
    assert!(agreements > 12, "views agreed only {agreements} times");
    let mean = moved_total as f64 / changes as f64;
    // The proven bound is K - 1 (asserted per change in `run`); measured mean 0.68.
    assert!(mean <= 1.0, "mean other peers moved per change {mean}");
}

#[test]
fn churn_with_mixed_throughputs_keeps_every_stage_served_and_views_consistent() {
    let (mut changes, mut moved_total, mut agreements) = (0, 0, 0);
    for seed in 100..110u64 {
        let stages = 2 + (seed as usize % 4);
        let r = run(seed, stages, stages + 4, 60, false);
        changes += r.changes;
        moved_total += r.moved;
        agreements += r.agreements;
    }
    assert!(changes > 250, "only {changes} changes with enough peers");
    assert!(agreements > 10, "views agreed only {agreements} times");
    let mean = moved_total as f64 / changes as f64;
    // Measured at the time of writing: 1.80; no bound is proven for mixed throughputs.
    assert!(mean <= 2.5, "mean other peers moved per change {mean}");
}

#[test]
fn the_same_scenario_runs_the_same_way() {
    let a = run(7, 3, 5, 30, true);
    let b = run(7, 3, 5, 30, true);
    assert_eq!(
        (a.changes, a.moved, a.worst, a.agreements, a.evaluations),
        (b.changes, b.moved, b.worst, b.agreements, b.evaluations)
    );
}

/// A running pipeline under churn: peers crash at random, new peers join by
/// [`stage_to_join`], and emptied later stages are refilled by [`spare_to_move`], one move at a
/// time as the nodes do. Checks that a move always comes from a stage with a replica to spare,
/// never empties a stage, never targets the first stage, and that after the moves a later
/// stage is empty only when no stage has two replicas; and that a joiner always fills an empty
/// later stage first.
fn run_running_pipeline(seed: u64, stages: usize, peers: usize, events: usize) -> (usize, usize) {
    let mut rng = Rng::new(seed);
    let mut next_id = 0u8;
    let mut fresh = |rng: &mut Rng| {
        next_id = next_id.wrapping_add(1);
        let mut bytes = [0u8; 32];
        for b in &mut bytes {
            *b = rng.next_u64() as u8;
        }
        bytes[0] = next_id;
        NodeId(bytes)
    };
    let ids: Vec<(NodeId, Throughput)> = (0..peers)
        .map(|_| (fresh(&mut rng), Throughput::UNKNOWN))
        .collect();
    let start = assign(&ids, stages).expect("enough peers");
    let mut serving: Vec<(NodeId, usize)> = ids
        .iter()
        .map(|(id, _)| (*id, start.stage_of(*id).expect("assigned")))
        .collect();
    let (mut moves, mut joins) = (0, 0);
    for _ in 0..events {
        if rng.chance(0.6) && serving.len() > 1 {
            // A crash, never of the last first-stage peer (the run ends then).
            let i = rng.range(0..serving.len() as u64) as usize;
            let first_stage_peers = serving.iter().filter(|(_, s)| *s == 0).count();
            if serving[i].1 != 0 || first_stage_peers > 1 {
                serving.remove(i);
            }
        } else {
            let current: Vec<(usize, Throughput)> = serving
                .iter()
                .map(|(_, s)| (*s, Throughput::from_milli(rng.range(1..4000) as u32)))
                .collect();
            let empty_before: Vec<usize> = (1..stages)
                .filter(|s| !serving.iter().any(|(_, t)| t == s))
                .collect();
            let stage = stage_to_join(&current, stages, 1..stages).expect("a later stage");
            if let Some(first_empty) = empty_before.first() {
                assert!(
                    empty_before.contains(&stage),
                    "joined {stage}, {first_empty} was empty"
                );
            }
            serving.push((fresh(&mut rng), stage));
            joins += 1;
        }
        loop {
            let empty: Vec<usize> = (1..stages)
                .filter(|s| !serving.iter().any(|(_, t)| t == s))
                .collect();
            let Some((mover, to)) = spare_to_move(&serving, &empty) else {
                let spare =
                    (0..stages).any(|s| serving.iter().filter(|(_, t)| *t == s).count() >= 2);
                assert!(
                    empty.is_empty() || !spare,
                    "stage {empty:?} left empty with a spare"
                );
                break;
            };
            assert_ne!(to, 0, "nobody moves to the first stage");
            let entry = serving
                .iter_mut()
                .find(|(id, _)| *id == mover)
                .expect("the mover serves");
            let from = entry.1;
            entry.1 = to;
            assert!(
                serving.iter().any(|(_, s)| *s == from),
                "the move emptied stage {from}"
            );
            moves += 1;
        }
    }
    (moves, joins)
}

#[test]
fn a_running_pipeline_refills_emptied_stages_from_spares_and_joiners() {
    let (mut moves, mut joins) = (0, 0);
    for seed in 0..200 {
        let stages = 2 + (seed % 4) as usize;
        let (m, j) = run_running_pipeline(seed, stages, stages + 3, 40);
        moves += m;
        joins += j;
    }
    // The scenarios exercise both paths often.
    assert!(moves > 200 && joins > 1000, "moves {moves}, joins {joins}");
}
