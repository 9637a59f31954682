//! Averaging rounds in the deterministic swarm simulator: loss, crashes, partitions.
//!
//! Every test is deterministic by seed. The central check, [`check_outcome`], recomputes
//! independently what each part must hold: the f64 sum of the contributors' initial values
//! in ascending-id order, divided by their count, cast to f32, compared bit for bit (the
//! default f32 compression is exact). With a lossy compression,
//! [`check_compressed_outcome`] bounds each averaged value's distance to that exact mean by
//! the codec's error bound applied twice: to each contribution and to the result.

use p2ptrain_protocol::averaging::{AveragingConfig, AvgEvent, RoundOutcome};
use p2ptrain_protocol::rng::Rng;
use p2ptrain_protocol::sim::{Sim, SimConfig};
use p2ptrain_protocol::tensor::{split_ranges, Encoding};
use p2ptrain_protocol::NodeId;
use std::collections::BTreeSet;
use std::time::Duration;

const LEN: usize = 1000;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Latest finish of a round started at `start`: give-up or formation bound plus reduce.
fn round_bound(cfg: &AveragingConfig, start: Duration) -> Duration {
    start + cfg.join_window + cfg.group_timeout + cfg.reduce_timeout
}

fn initial_values(seed: u64, peers: usize) -> Vec<Vec<f32>> {
    let mut rng = Rng::new(seed);
    (0..peers)
        .map(|_| {
            (0..LEN)
                .map(|_| (rng.next_f64() * 2.0 - 1.0) as f32 * 100.0)
                .collect()
        })
        .collect()
}

fn peer_of(ids: &[NodeId], id: NodeId) -> usize {
    ids.iter().position(|x| *x == id).expect("a sim id")
}

/// The protocol's mean, recomputed here from the initial vectors.
fn expected_mean(
    ids: &[NodeId],
    initial: &[Vec<f32>],
    contributors: &[NodeId],
    range: std::ops::Range<usize>,
) -> Vec<f32> {
    let mut sorted = contributors.to_vec();
    sorted.sort();
    range
        .map(|i| {
            let mut sum = 0f64;
            for c in &sorted {
                sum += f64::from(initial[peer_of(ids, *c)][i]);
            }
            (sum / sorted.len() as f64) as f32
        })
        .collect()
}

/// Every invariant one outcome must satisfy.
fn check_outcome(ids: &[NodeId], initial: &[Vec<f32>], peer: usize, o: &RoundOutcome) {
    check_structure(ids, peer, o);
    for (k, part) in o.parts.iter().enumerate() {
        let want = expected_mean(ids, initial, &part.contributors, part.range.clone());
        let got = &o.values[part.range.clone()];
        let same = want
            .iter()
            .zip(got)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(
            same,
            "peer {peer} round {} part {k}: values are not the exact mean of {:?}",
            o.round, part.contributors
        );
    }
}

/// The invariants that do not depend on the values: group, ranges, contributors, dropped.
fn check_structure(ids: &[NodeId], peer: usize, o: &RoundOutcome) {
    let me = ids[peer];
    assert!(o.group.windows(2).all(|w| w[0] < w[1]), "group not sorted");
    assert!(o.group.contains(&me), "own group lacks me");
    assert_eq!(o.values.len(), LEN);
    let ranges: Vec<_> = o.parts.iter().map(|p| p.range.clone()).collect();
    assert_eq!(ranges, split_ranges(LEN, o.parts.len()));
    assert_eq!(
        o.parts.len() % o.group.len(),
        0,
        "parts not a multiple of members"
    );
    for (k, part) in o.parts.iter().enumerate() {
        assert!(!part.contributors.is_empty());
        assert!(part.contributors.windows(2).all(|w| w[0] < w[1]));
        assert!(
            part.contributors.iter().all(|c| o.group.contains(c)),
            "contributors outside the group"
        );
        if !part.averaged {
            assert_eq!(part.contributors, vec![me], "part {k}");
        }
    }
    assert!(!o.dropped.contains(&me));
    assert!(o.dropped.iter().all(|d| o.group.contains(d)));
}

fn rejections(sim: &Sim, peer: usize) -> usize {
    sim.events(peer)
        .iter()
        .filter(|(_, e)| matches!(e, AvgEvent::Rejected { .. }))
        .count()
}

fn finish_time(sim: &Sim, peer: usize, round: u64) -> Option<Duration> {
    sim.events(peer).iter().find_map(|(t, e)| match e {
        AvgEvent::Finished(o) if o.round == round => Some(*t),
        _ => None,
    })
}

fn lossy(seed: u64, loss: f64) -> SimConfig {
    SimConfig {
        peers: 16,
        seed,
        latency: (ms(1), ms(50)),
        loss,
        averaging: AveragingConfig::default(),
    }
}

fn run_one_round(cfg: SimConfig) -> (Sim, Vec<Vec<f32>>) {
    let mut sim = Sim::new(cfg.clone());
    let initial = initial_values(cfg.seed, cfg.peers);
    for (p, v) in initial.iter().enumerate() {
        sim.start_round(p, ms(0), 1, v.clone());
    }
    sim.run_until(round_bound(&cfg.averaging, ms(0)));
    (sim, initial)
}

#[test]
fn ten_percent_loss_everyone_averages_everything_exactly() {
    let (sim, initial) = run_one_round(lossy(11, 0.1));
    let ids = sim.ids().to_vec();
    let all: Vec<NodeId> = ids
        .iter()
        .copied()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let reference = sim.outcomes(0)[0].values.clone();
    for p in 0..16 {
        let outs = sim.outcomes(p);
        assert_eq!(outs.len(), 1, "peer {p} finished {} times", outs.len());
        let o = &outs[0];
        check_outcome(&ids, &initial, p, o);
        assert_eq!(o.group, all, "peer {p} not in the full group");
        for part in &o.parts {
            assert!(
                part.averaged && part.contributors == all,
                "peer {p}: {part:?}"
            );
        }
        assert!(o.dropped.is_empty());
        // Everyone ends with the same vector.
        assert_eq!(o.values, reference);
        assert_eq!(rejections(&sim, p), 0, "honest traffic was rejected");
        assert_eq!(sim.averager(p).and_then(|a| a.in_flight()), None);
    }
    // Retransmission must not turn into a storm: a clean round is 15 Joins x 15 + Group x 15
    // + 2 x 16 x 15 tensor messages = 705 copies.
    assert!(
        sim.messages_sent() < 3_000,
        "{} messages",
        sim.messages_sent()
    );
}

#[test]
fn same_seed_same_run_other_seed_other_run() {
    let (a, _) = run_one_round(lossy(5, 0.2));
    let (b, _) = run_one_round(lossy(5, 0.2));
    let (c, _) = run_one_round(lossy(6, 0.2));
    assert_eq!(a.messages_sent(), b.messages_sent());
    for p in 0..16 {
        assert_eq!(a.events(p), b.events(p));
        assert_eq!(a.outcomes(p), b.outcomes(p));
    }
    let differs = a.messages_sent() != c.messages_sent()
        || (0..16).any(|p| a.events(p).len() != c.events(p).len())
        || (0..16).any(|p| a.events(p).first().map(|e| e.0) != c.events(p).first().map(|e| e.0));
    assert!(differs, "a different seed gave the same run");
}

#[test]
fn thirty_percent_loss_and_two_crashed_members_still_terminate() {
    let cfg = lossy(21, 0.3);
    let mut sim = Sim::new(cfg.clone());
    let ids = sim.ids().to_vec();
    let leader = (0..16).min_by_key(|&p| ids[p]).expect("peers");
    // Two non-leaders crash 1 ms in: their first Join may be out, no Group can reach them.
    let crashed: Vec<usize> = (0..16).filter(|&p| p != leader).take(2).collect();
    let initial = initial_values(cfg.seed, 16);
    for (p, v) in initial.iter().enumerate() {
        sim.start_round(p, ms(0), 1, v.clone());
    }
    for &p in &crashed {
        sim.crash(ms(1), p);
    }
    sim.run_until(round_bound(&cfg.averaging, ms(0)));
    let crashed_ids: Vec<NodeId> = crashed.iter().map(|&p| ids[p]).collect();
    let mut averaged_parts = 0;
    for p in 0..16 {
        if crashed.contains(&p) {
            assert!(sim.outcomes(p).is_empty());
            continue;
        }
        assert_eq!(
            sim.outcomes(p).len(),
            1,
            "survivor {p} did not finish in time"
        );
        let o = &sim.outcomes(p)[0];
        check_outcome(&ids, &initial, p, o);
        for (part, reducer) in o.parts.iter().zip(&o.group) {
            assert!(
                part.contributors.iter().all(|c| !crashed_ids.contains(c)),
                "a peer that crashed before the group formed contributed"
            );
            averaged_parts += usize::from(part.averaged);
            // A crashed member never reduces its part.
            if crashed_ids.contains(reducer) {
                assert!(!part.averaged);
            }
        }
        for c in &crashed_ids {
            if o.group.contains(c) {
                assert!(o.dropped.contains(c), "crashed member not reported dropped");
            }
        }
        assert_eq!(rejections(&sim, p), 0);
    }
    // 14 survivors: with 30% loss the bulk of the parts must still be averaged.
    assert!(
        averaged_parts >= 14 * 10,
        "only {averaged_parts} parts averaged"
    );
}

#[test]
fn a_crashed_leader_leaves_everyone_alone_by_the_group_timeout() {
    let cfg = lossy(31, 0.0);
    let mut sim = Sim::new(cfg.clone());
    let ids = sim.ids().to_vec();
    let leader = (0..16).min_by_key(|&p| ids[p]).expect("peers");
    let initial = initial_values(cfg.seed, 16);
    for (p, v) in initial.iter().enumerate() {
        sim.start_round(p, ms(0), 1, v.clone());
    }
    sim.crash(ms(0), leader);
    sim.run_until(round_bound(&cfg.averaging, ms(0)));
    let give_up = cfg.averaging.join_window + cfg.averaging.group_timeout;
    for p in (0..16).filter(|&p| p != leader) {
        let o = &sim.outcomes(p)[0];
        assert_eq!(o.group, vec![ids[p]]);
        assert_eq!(o.values, initial[p]);
        assert_eq!(finish_time(&sim, p, 1), Some(give_up));
    }
}

/// 16 peers start round 1 at time 0 with seeded values, and `crashes` of
/// them, picked by the seed, crash at random times in the first 3 s.
fn start_all_then_crash(
    cfg: &SimConfig,
    seed: u64,
    crashes: usize,
) -> (Sim, Vec<NodeId>, Vec<Vec<f32>>, Vec<usize>) {
    let mut sim = Sim::new(cfg.clone());
    let ids = sim.ids().to_vec();
    let initial = initial_values(seed, 16);
    for (p, v) in initial.iter().enumerate() {
        sim.start_round(p, ms(0), 1, v.clone());
    }
    let mut rng = Rng::new(seed);
    let mut crashed: Vec<usize> = (0..16).collect();
    rng.shuffle(&mut crashed);
    crashed.truncate(crashes);
    for &p in &crashed {
        sim.crash(ms(rng.range(0..3_000)), p);
    }
    (sim, ids, initial, crashed)
}

#[test]
fn a_third_of_the_peers_crash_at_random_times_under_thirty_percent_loss() {
    for seed in [41, 42, 43] {
        let cfg = lossy(seed, 0.3);
        let (mut sim, ids, initial, crashed) = start_all_then_crash(&cfg, seed, 5);
        sim.run_until(round_bound(&cfg.averaging, ms(0)));
        for p in 0..16 {
            let outs = sim.outcomes(p);
            if crashed.contains(&p) {
                assert!(outs.len() <= 1);
            } else {
                assert_eq!(outs.len(), 1, "seed {seed}: survivor {p} did not finish");
            }
            for o in outs {
                check_outcome(&ids, &initial, p, o);
            }
            assert_eq!(rejections(&sim, p), 0);
        }
    }
}

#[test]
fn several_parts_per_member_stay_exact_under_loss_and_crashes() {
    for seed in [61, 62] {
        let mut cfg = lossy(seed, 0.3);
        // 1000 values among up to 16 members: 3 parts of ~20 values per member.
        cfg.averaging.part_values = 20;
        let (mut sim, ids, initial, crashed) = start_all_then_crash(&cfg, seed, 5);
        sim.run_until(round_bound(&cfg.averaging, ms(0)));
        let (mut averaged, mut total) = (0, 0);
        for p in 0..16 {
            let outs = sim.outcomes(p);
            if !crashed.contains(&p) {
                assert_eq!(outs.len(), 1, "seed {seed}: survivor {p} did not finish");
            }
            for o in outs {
                check_outcome(&ids, &initial, p, o);
                let n = o.group.len();
                if n > 1 {
                    assert_eq!(o.parts.len(), cfg.averaging.part_count(LEN, n));
                    assert_eq!(o.parts.len(), 3 * n, "seed {seed}: peer {p}");
                }
                averaged += o.parts.iter().filter(|q| q.averaged).count();
                total += o.parts.len();
            }
            assert_eq!(rejections(&sim, p), 0);
        }
        // 30% loss and 5 crashes in the first 3 s: most parts still get averaged.
        assert!(
            averaged * 2 >= total,
            "seed {seed}: only {averaged} of {total} parts averaged"
        );
    }
}

#[test]
fn a_reducer_that_crashes_after_contributing_leaves_its_part_local() {
    // Fixed 10 ms latency, no loss: Joins land at 10 ms, the leader closes and its Group
    // lands at 20 ms, every member's Parts at 30 ms. The victim crashes at 25 ms: its own
    // Parts are already on the wire, but it never reduces its part.
    let cfg = SimConfig {
        peers: 8,
        seed: 51,
        latency: (ms(10), ms(10)),
        loss: 0.0,
        averaging: AveragingConfig::default(),
    };
    let mut sim = Sim::new(cfg.clone());
    let ids = sim.ids().to_vec();
    let all: Vec<NodeId> = ids
        .iter()
        .copied()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let initial = initial_values(cfg.seed, 8);
    for (p, v) in initial.iter().enumerate() {
        sim.start_round(p, ms(0), 1, v.clone());
    }
    let victim_id = all[3];
    let victim = peer_of(&ids, victim_id);
    sim.crash(ms(25), victim);
    sim.run_until(round_bound(&cfg.averaging, ms(0)));
    for p in (0..8).filter(|&p| p != victim) {
        let o = &sim.outcomes(p)[0];
        check_outcome(&ids, &initial, p, o);
        assert_eq!(o.group, all);
        for (k, part) in o.parts.iter().enumerate() {
            if k == 3 {
                assert!(!part.averaged);
                assert_eq!(o.values[part.range.clone()], initial[p][part.range.clone()]);
            } else {
                assert!(part.averaged);
                assert_eq!(part.contributors, all, "the victim's Parts count");
            }
        }
        assert_eq!(o.dropped, vec![victim_id]);
        // Members wait for the missing part until the reduce deadline.
        let t = finish_time(&sim, p, 1).expect("finished");
        assert!(t >= AveragingConfig::default().reduce_timeout, "{t:?}");
    }
    assert!(sim.outcomes(victim).is_empty());
}

#[test]
fn a_partition_that_heals_across_three_rounds() {
    let cfg = lossy(61, 0.05);
    let mut sim = Sim::new(cfg.clone());
    let ids = sim.ids().to_vec();
    let left: Vec<usize> = (0..8).collect();
    let right: Vec<usize> = (8..16).collect();
    let starts = [secs(0), secs(20), secs(40)];
    // Round 1 entirely split; round 3 split only for its first 0.8 s of matchmaking.
    sim.partition(secs(0), secs(18), vec![left.clone(), right.clone()]);
    sim.partition(secs(40), ms(40_800), vec![left.clone(), right.clone()]);
    let initial: Vec<Vec<Vec<f32>>> = (0..3).map(|r| initial_values(100 + r, 16)).collect();
    for ((r, start), values) in starts.iter().enumerate().zip(&initial) {
        for (p, v) in values.iter().enumerate() {
            sim.start_round(p, *start, r as u64 + 1, v.clone());
        }
    }
    sim.run_until(round_bound(&cfg.averaging, starts[2]));
    let side_ids = |side: &[usize]| -> BTreeSet<NodeId> { side.iter().map(|&p| ids[p]).collect() };
    let all: Vec<NodeId> = ids
        .iter()
        .copied()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    for p in 0..16 {
        let outs = sim.outcomes(p);
        let rounds: Vec<u64> = outs.iter().map(|o| o.round).collect();
        assert_eq!(rounds, vec![1, 2, 3], "peer {p}");
        for (r, o) in outs.iter().enumerate() {
            check_outcome(&ids, &initial[r], p, o);
        }
        let mine = side_ids(if p < 8 { &left } else { &right });
        let r1: BTreeSet<NodeId> = outs[0].group.iter().copied().collect();
        assert_eq!(r1, mine, "round 1 groups follow the partition");
        assert!(outs[0].parts.iter().all(|q| q.averaged));
        assert_eq!(outs[1].group, all, "round 2 after healing is one group");
        assert_eq!(outs[2].group, all, "round 3 heals during matchmaking");
        assert!(outs[2]
            .parts
            .iter()
            .all(|q| q.averaged && q.contributors == all));
        assert_eq!(rejections(&sim, p), 0);
    }
}

#[test]
fn a_small_group_limit_lets_the_rest_regroup_promptly() {
    let cfg = SimConfig {
        peers: 8,
        seed: 71,
        latency: (ms(1), ms(50)),
        loss: 0.0,
        averaging: AveragingConfig {
            max_group_size: 4,
            ..AveragingConfig::default()
        },
    };
    let (sim, initial) = run_one_round(cfg);
    let ids = sim.ids().to_vec();
    let mut sorted = ids.clone();
    sorted.sort();
    for p in 0..8 {
        let o = &sim.outcomes(p)[0];
        check_outcome(&ids, &initial, p, o);
        if sorted[..4].contains(&ids[p]) {
            assert_eq!(o.group, sorted[..4].to_vec());
        } else {
            // Left out of the full group, they average among themselves; they
            // learn it from the leader's Group, not from the group timeout.
            assert_eq!(o.group, sorted[4..].to_vec());
            assert!(finish_time(&sim, p, 1) < Some(ms(500)));
        }
    }
}

#[test]
fn a_late_starter_learns_it_is_out_from_the_leader() {
    let cfg = SimConfig {
        peers: 4,
        seed: 81,
        latency: (ms(1), ms(50)),
        loss: 0.0,
        averaging: AveragingConfig::default(),
    };
    let mut sim = Sim::new(cfg.clone());
    let ids = sim.ids().to_vec();
    let leader = (0..4).min_by_key(|&p| ids[p]).expect("peers");
    let late = (0..4).find(|&p| p != leader).expect("peers");
    let initial = initial_values(cfg.seed, 4);
    for (p, v) in initial.iter().enumerate() {
        let at = if p == late { secs(3) } else { ms(0) };
        sim.start_round(p, at, 1, v.clone());
    }
    sim.run_until(round_bound(&cfg.averaging, secs(3)));
    let o = &sim.outcomes(late)[0];
    assert_eq!(o.group, vec![ids[late]]);
    let t = finish_time(&sim, late, 1).expect("finished");
    assert!(t < ms(3_200), "late peer waited until {t:?}");
    let g = &sim.outcomes(leader)[0];
    assert_eq!(g.group.len(), 3);
    check_outcome(&ids, &initial, leader, g);
}

/// Upper bound on the error one encode/decode of `values` (one part, as sent) adds to each
/// value, from the codec's documented bound.
fn codec_error(encoding: Encoding, values: &[f64]) -> Vec<f64> {
    // Half an ulp of an f32 of magnitude |x| (plus the subnormal floor): final-rounding slack.
    let half_ulp = |x: f64| x.abs() * 2f64.powi(-24) + 2f64.powi(-150);
    match encoding {
        Encoding::F32 => vec![0.0; values.len()],
        // |y - x| <= 2^-11 |x| in the normal range, <= 2^-25 below it.
        Encoding::F16 => values
            .iter()
            .map(|x| x.abs() * 2f64.powi(-11) + 2f64.powi(-25))
            .collect(),
        Encoding::Int8 { block } => {
            let mut out = Vec::with_capacity(values.len());
            for chunk in values.chunks(block as usize) {
                let max = chunk.iter().fold(0f64, |m, x| m.max(x.abs()));
                // The scale is max/127 rounded up to an f32: at most one f32 ulp above.
                let scale = max / 127.0 * (1.0 + 2f64.powi(-23));
                // Half a scale, plus the encoder's f32-reciprocal slack of 2^-16 scales.
                out.extend(
                    chunk
                        .iter()
                        .map(|x| scale * (0.5 + 2f64.powi(-16)) + half_ulp(*x)),
                );
            }
            out
        }
        other => panic!("no bound for {other}"),
    }
}

/// Checks a compressed round: structure as always, every member of a part's group ends with
/// the same values, non-averaged parts keep the local values exactly, and each averaged value
/// lies within (mean of the contributions' codec errors) + (codec error of the result) of
/// the exact mean. Returns the largest error seen relative to its bound.
fn check_compressed_outcome(
    ids: &[NodeId],
    initial: &[Vec<f32>],
    peer: usize,
    o: &RoundOutcome,
    encoding: Encoding,
) -> f64 {
    check_structure(ids, peer, o);
    let mut worst = 0f64;
    for (k, part) in o.parts.iter().enumerate() {
        let range = part.range.clone();
        let got = &o.values[range.clone()];
        if !part.averaged {
            assert_eq!(got, &initial[peer][range.clone()], "part {k} is local");
            continue;
        }
        let n = part.contributors.len() as f64;
        let exact: Vec<f64> = expected_mean(ids, initial, &part.contributors, range.clone())
            .iter()
            .map(|v| f64::from(*v))
            .collect();
        // First quantisation: each contributor's part as it sent it.
        let mut contribution_err = vec![0f64; range.len()];
        for c in &part.contributors {
            let x: Vec<f64> = initial[peer_of(ids, *c)][range.clone()]
                .iter()
                .map(|v| f64::from(*v))
                .collect();
            for (e, ce) in contribution_err.iter_mut().zip(codec_error(encoding, &x)) {
                *e += ce / n;
            }
        }
        // Second: the reducer's mean, which lies within contribution_err of the exact mean
        // (plus the f32 rounding of the mean).
        let worst_mean: Vec<f64> = exact
            .iter()
            .zip(&contribution_err)
            .map(|(m, e)| {
                let v = m.abs() + e;
                v + v * 2f64.powi(-24)
            })
            .collect();
        let result_err = codec_error(encoding, &worst_mean);
        for i in 0..range.len() {
            let bound = contribution_err[i]
                + result_err[i]
                + (exact[i].abs() + contribution_err[i]) * 2f64.powi(-24);
            let err = (f64::from(got[i]) - exact[i]).abs();
            assert!(
                err <= bound,
                "peer {peer} part {k} value {i}: {} is {err} from the exact mean {}, bound {bound}",
                got[i],
                exact[i]
            );
            if bound > 0.0 {
                worst = worst.max(err / bound);
            }
        }
    }
    worst
}

#[test]
fn int8_and_f16_rounds_stay_within_the_codec_bounds_of_the_exact_mean() {
    let f32_bytes = {
        let (sim, _) = run_one_round(lossy(91, 0.1));
        sim.payload_bytes_sent()
    };
    for (encoding, max_ratio) in [
        (Encoding::F16, 0.51),
        (Encoding::Int8 { block: 64 }, 0.27),
        (Encoding::Int8 { block: 7 }, 0.43),
    ] {
        let mut cfg = lossy(91, 0.1);
        cfg.averaging.compression = encoding;
        let (sim, initial) = run_one_round(cfg);
        let ids = sim.ids().to_vec();
        let reference = sim.outcomes(0)[0].values.clone();
        let mut worst = 0f64;
        let mut lossy_values = 0usize;
        for p in 0..16 {
            let outs = sim.outcomes(p);
            assert_eq!(outs.len(), 1, "{encoding}: peer {p}");
            let o = &outs[0];
            assert_eq!(
                o.group.len(),
                16,
                "{encoding}: peer {p} not in the full group"
            );
            assert!(o.parts.iter().all(|q| q.averaged), "{encoding}: peer {p}");
            worst = worst.max(check_compressed_outcome(&ids, &initial, p, o, encoding));
            // Everyone ends with the same vector, as with f32.
            assert_eq!(o.values, reference, "{encoding}: peer {p} differs");
            assert_eq!(
                rejections(&sim, p),
                0,
                "{encoding}: honest traffic rejected"
            );
            let part = &o.parts[0];
            let exact = expected_mean(&ids, &initial, &part.contributors, part.range.clone());
            lossy_values += exact
                .iter()
                .zip(&o.values[part.range.clone()])
                .filter(|(a, b)| a != b)
                .count();
        }
        assert!(lossy_values > 0, "{encoding} changed nothing: not applied?");
        assert!(worst <= 1.0);
        let ratio = sim.payload_bytes_sent() as f64 / f32_bytes as f64;
        assert!(
            ratio <= max_ratio,
            "{encoding}: sent {ratio:.3} of the f32 traffic"
        );
        println!("{encoding}: worst error {worst:.3} of the bound, {ratio:.3} of f32 bytes");
    }
}

#[test]
fn compressed_rounds_with_crashes_under_loss_keep_the_bounds() {
    let encoding = Encoding::Int8 { block: 32 };
    for seed in [44, 45] {
        let mut cfg = lossy(seed, 0.3);
        cfg.averaging.compression = encoding;
        let (mut sim, ids, initial, crashed) = start_all_then_crash(&cfg, seed, 4);
        sim.run_until(round_bound(&cfg.averaging, ms(0)));
        for p in 0..16 {
            let outs = sim.outcomes(p);
            if !crashed.contains(&p) {
                assert_eq!(outs.len(), 1, "seed {seed}: survivor {p} did not finish");
            }
            for o in outs {
                check_compressed_outcome(&ids, &initial, p, o, encoding);
            }
            assert_eq!(rejections(&sim, p), 0);
        }
    }
}

/// Ten rounds, 100 s apart, of 16 peers under 10% loss with generous
/// configured waits; a third of the peers crash early in round 6 and stay in
/// everyone's view (the simulator never removes them). Returns how long each
/// survivor's rounds 7..=10 took, after checking every outcome.
fn rounds_after_crashes(seed: u64, adaptive: bool) -> Vec<Duration> {
    let averaging = AveragingConfig {
        join_window: secs(20),
        group_timeout: secs(40),
        reduce_timeout: secs(30),
        adaptive_deadline: adaptive,
        ..AveragingConfig::default()
    };
    let cfg = SimConfig {
        averaging,
        ..lossy(seed, 0.1)
    };
    let mut sim = Sim::new(cfg.clone());
    let ids = sim.ids().to_vec();
    let start = |r: u64| secs(100 * (r - 1));
    let initial: Vec<Vec<Vec<f32>>> = (1..=10)
        .map(|r| initial_values(seed * 100 + r, 16))
        .collect();
    for (r, values) in (1..=10).zip(&initial) {
        for (p, v) in values.iter().enumerate() {
            sim.start_round(p, start(r), r, v.clone());
        }
    }
    let mut rng = Rng::new(seed);
    let mut crashed: Vec<usize> = (0..16).collect();
    rng.shuffle(&mut crashed);
    crashed.truncate(5);
    for &p in &crashed {
        sim.crash(start(6) + ms(rng.range(0..2_000)), p);
    }
    sim.run_until(round_bound(&cfg.averaging, start(10)));
    let mut took = Vec::new();
    for p in (0..16).filter(|p| !crashed.contains(p)) {
        let outs = sim.outcomes(p);
        let rounds: Vec<u64> = outs.iter().map(|o| o.round).collect();
        assert_eq!(rounds, (1..=10).collect::<Vec<_>>(), "seed {seed} peer {p}");
        for o in outs {
            check_outcome(&ids, &initial[o.round as usize - 1], p, o);
        }
        for r in 7..=10 {
            let done = finish_time(&sim, p, r).expect("finished");
            took.push(done - start(r));
        }
    }
    took
}

#[test]
fn fitted_waits_keep_rounds_after_crashes_short_and_the_invariants_whole() {
    for seed in [71, 72] {
        let fitted = rounds_after_crashes(seed, true);
        let slowest = fitted.iter().max().copied().unwrap_or_default();
        assert!(
            slowest < secs(10),
            "seed {seed}: a round after the crashes took {slowest:?} with fitted waits"
        );
        let fixed = rounds_after_crashes(seed, false);
        let quickest = fixed.iter().min().copied().unwrap_or_default();
        assert!(
            quickest >= secs(20),
            "seed {seed}: fixed waits close on the configured 20 s window ({quickest:?})"
        );
    }
}

/// 8 peers under 10% loss, the one with the smallest id (so the leader of
/// every round it joins) listing a made-up member in every `Group` it sends.
/// Nobody follows those groups: every honest peer averages every round with
/// other honest peers, never with the forger or its phantom, each part the
/// exact mean of its contributors, before the reduce deadline.
#[test]
fn a_leader_forging_its_groups_is_never_followed() {
    let cfg = SimConfig {
        peers: 8,
        seed: 81,
        latency: (ms(1), ms(50)),
        loss: 0.1,
        averaging: AveragingConfig::default(),
    };
    let mut sim = Sim::new(cfg.clone());
    let ids = sim.ids().to_vec();
    let forger = peer_of(&ids, *ids.iter().min().expect("peers"));
    sim.forge_groups(forger);
    let initial = initial_values(cfg.seed, cfg.peers);
    let rounds = 8;
    for round in 1..=rounds {
        let start = secs(30 * (round - 1));
        for (p, v) in initial.iter().enumerate() {
            sim.start_round(p, start, round, v.clone());
        }
        sim.run_until(start + secs(29));
    }
    let phantom = NodeId([0xff; 32]);
    let mut slowest = Duration::ZERO;
    for p in (0..cfg.peers).filter(|&p| p != forger) {
        let outcomes = sim.outcomes(p);
        assert_eq!(outcomes.len(), rounds as usize, "peer {p}");
        for o in outcomes {
            check_outcome(&ids, &initial, p, o);
            assert!(
                !o.group.contains(&ids[forger]) && !o.group.contains(&phantom),
                "peer {p} round {}: {:?}",
                o.round,
                o.group
            );
            assert!(o.group.len() >= 2, "peer {p} round {} alone", o.round);
            let took = finish_time(&sim, p, o.round).expect("finished") - secs(30 * (o.round - 1));
            slowest = slowest.max(took);
        }
    }
    // A member listed by a forged group would have been dropped at the
    // reduce deadline; rounds here end on loss-driven re-sends instead.
    assert!(slowest < cfg.averaging.reduce_timeout, "{slowest:?}");
}
